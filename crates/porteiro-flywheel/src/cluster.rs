//! S3, clustering: curated items grouped into task types. First by structure (the same system
//! prompt template, tool set and schema are one task frame); then, inside each frame, k-means over
//! the router encoder's embeddings of the queries, with k chosen by silhouette (a frame stays whole
//! unless some split scores at least `min_silhouette`). Frames smaller than `min_size` are pooled
//! and split by their embeddings alone. Each cluster is named by its most
//! characteristic query terms and shows the items nearest its centre.

use std::collections::{BTreeMap, HashMap};

use linfa::prelude::*;
use linfa_clustering::KMeans;
use ndarray::Array2;
use rand_xoshiro::rand_core::SeedableRng;
use rand_xoshiro::Xoshiro256Plus;
use serde::{Deserialize, Serialize};

use crate::item::{AnswerKind, Item};
use crate::FlywheelError;

#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Most clusters one structure splits into.
    pub max_k: usize,
    /// Fewest items a split cluster may have (a smaller frame stays whole).
    pub min_size: usize,
    /// Least mean silhouette for a split to beat keeping the frame whole.
    pub min_silhouette: f64,
    /// Exemplars shown per cluster.
    pub exemplars: usize,
    pub seed: u64,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            max_k: 8,
            min_size: 5,
            min_silhouette: 0.1,
            exemplars: 3,
            seed: 7,
        }
    }
}

/// One task type.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Cluster {
    pub id: usize,
    /// Characteristic terms (and the tool, when the frame offers exactly one).
    pub name: String,
    /// The structure key shared by its members.
    pub structure: String,
    /// The answer kind most of its members have.
    pub kind: AnswerKind,
    /// Ids of its items.
    pub members: Vec<String>,
    /// Ids of the items nearest its centre, nearest first.
    pub exemplars: Vec<String>,
    /// Mean of its members' normalised embeddings (routes by example use the exemplars).
    pub centroid: Vec<f32>,
    /// Share of the curated items.
    pub share: f64,
    /// Share of the curated items' upstream spend.
    pub spend_share: f64,
}

/// The structure key of the pool of frames too small to stand alone.
pub const MIXED: &str = "(mixed)";

fn normalised(v: &[f32]) -> Vec<f64> {
    let n = v
        .iter()
        .map(|x| f64::from(*x).powi(2))
        .sum::<f64>()
        .sqrt()
        .max(1e-12);
    v.iter().map(|x| f64::from(*x) / n).collect()
}

fn dist(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt()
}

/// Mean silhouette of `labels` over (at most 600 evenly spaced) points.
fn silhouette(x: &[Vec<f64>], labels: &[usize], k: usize) -> f64 {
    let step = x.len().div_ceil(600).max(1);
    let idx: Vec<usize> = (0..x.len()).step_by(step).collect();
    let mut total = 0.0;
    for &i in &idx {
        let mut sum = vec![0.0; k];
        let mut cnt = vec![0usize; k];
        for &j in &idx {
            if i != j {
                sum[labels[j]] += dist(&x[i], &x[j]);
                cnt[labels[j]] += 1;
            }
        }
        let own = labels[i];
        if cnt[own] == 0 {
            continue; // a singleton scores 0
        }
        let a = sum[own] / cnt[own] as f64;
        let b = (0..k)
            .filter(|&c| c != own && cnt[c] > 0)
            .map(|c| sum[c] / cnt[c] as f64)
            .fold(f64::INFINITY, f64::min);
        if b.is_finite() {
            total += (b - a) / a.max(b).max(1e-12);
        }
    }
    total / idx.len() as f64
}

fn kmeans(x: &[Vec<f64>], k: usize, seed: u64) -> Result<Vec<usize>, FlywheelError> {
    let d = x[0].len();
    let arr = Array2::from_shape_vec((x.len(), d), x.concat())
        .map_err(|e| FlywheelError::Data(e.to_string()))?;
    let ds = DatasetBase::from(arr.clone());
    let model = KMeans::params_with_rng(k, Xoshiro256Plus::seed_from_u64(seed))
        .max_n_iterations(200)
        .tolerance(1e-5)
        .fit(&ds)
        .map_err(|e| FlywheelError::Data(format!("k-means: {e}")))?;
    Ok(model.predict(&arr).to_vec())
}

/// Splits one frame's points: labels 0..k, k chosen by silhouette (1 if nothing beats the floor).
fn split(x: &[Vec<f64>], o: &ClusterOptions) -> Result<Vec<usize>, FlywheelError> {
    let most = o.max_k.min(x.len() / o.min_size.max(1));
    let mut best = (o.min_silhouette, vec![0; x.len()]);
    for k in 2..=most {
        let labels = kmeans(x, k, o.seed)?;
        let mut sizes = vec![0usize; k];
        labels.iter().for_each(|&l| sizes[l] += 1);
        if sizes.iter().any(|&s| s < o.min_size) {
            continue;
        }
        let s = silhouette(x, &labels, k);
        if s > best.0 {
            best = (s, labels);
        }
    }
    Ok(best.1)
}

const STOP: &[&str] = &[
    "the", "and", "for", "with", "that", "this", "what", "which", "from", "are", "was", "were",
    "you", "your", "can", "how", "please", "into", "have", "has", "had", "not", "but", "all",
    "any", "its", "will", "would", "could", "should", "there", "their", "them", "they", "then",
    "than", "also", "about", "give", "tell", "find", "get", "use", "using", "like", "want", "need",
    "some", "each", "our", "out", "one", "two", "his", "her", "him", "she", "who", "when", "where",
    "why", "does", "did", "is", "be", "of", "to", "in", "on", "a", "an", "it", "me", "my", "i",
    "we", "do",
];

fn terms(text: &str) -> Vec<String> {
    let mut v: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .map(str::to_lowercase)
        .filter(|w| {
            w.len() >= 3 && !w.chars().all(|c| c.is_ascii_digit()) && !STOP.contains(&w.as_str())
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Clusters `items` with their query embeddings `vecs` (same order).
pub fn cluster(
    items: &[Item],
    vecs: &[Vec<f32>],
    o: &ClusterOptions,
) -> Result<Vec<Cluster>, FlywheelError> {
    if items.len() != vecs.len() {
        return Err(FlywheelError::Data(format!(
            "{} items but {} embeddings",
            items.len(),
            vecs.len()
        )));
    }
    let x: Vec<Vec<f64>> = vecs.iter().map(|v| normalised(v)).collect();
    let mut frames: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (n, i) in items.iter().enumerate() {
        frames.entry(i.structure()).or_default().push(n);
    }
    // Frames too small to be a task on their own (a tool offered once, a one-off system prompt)
    // are pooled and left to the embeddings.
    let small: Vec<String> = frames
        .iter()
        .filter(|(_, m)| m.len() < o.min_size)
        .map(|(k, _)| k.clone())
        .collect();
    if small.len() > 1 {
        let mut pooled = Vec::new();
        for k in small {
            pooled.extend(frames.remove(&k).unwrap_or_default());
        }
        pooled.sort_unstable();
        frames.insert(MIXED.to_string(), pooled);
    }
    let docs: Vec<Vec<String>> = items.iter().map(|i| terms(&i.query())).collect();
    let mut df: HashMap<&str, usize> = HashMap::new();
    for d in &docs {
        for t in d {
            *df.entry(t.as_str()).or_default() += 1;
        }
    }
    let total_spend: f64 = items.iter().map(|i| i.cost_usd).sum();
    let mut out = Vec::new();
    for (structure, members) in frames {
        let px: Vec<Vec<f64>> = members.iter().map(|&n| x[n].clone()).collect();
        let labels = if members.len() >= 2 * o.min_size {
            split(&px, o)?
        } else {
            vec![0; members.len()]
        };
        let k = labels.iter().max().map_or(0, |m| m + 1);
        for c in 0..k {
            let mine: Vec<usize> = members
                .iter()
                .zip(&labels)
                .filter(|(_, &l)| l == c)
                .map(|(&n, _)| n)
                .collect();
            let d = x[0].len();
            let mut centroid = vec![0f64; d];
            for &n in &mine {
                centroid
                    .iter_mut()
                    .zip(&x[n])
                    .for_each(|(a, b)| *a += b / mine.len() as f64);
            }
            let mut near = mine.clone();
            near.sort_by(|&a, &b| dist(&x[a], &centroid).total_cmp(&dist(&x[b], &centroid)));
            // Characteristic terms: frequent here, rare elsewhere (tf-idf over queries).
            let mut tf: HashMap<&str, usize> = HashMap::new();
            for &n in &mine {
                for t in &docs[n] {
                    *tf.entry(t.as_str()).or_default() += 1;
                }
            }
            let mut scored: Vec<(f64, &str)> = tf
                .iter()
                .filter(|(_, &c)| c >= 2 || mine.len() < 4)
                .map(|(t, &c)| {
                    (
                        c as f64 / mine.len() as f64 * (items.len() as f64 / df[t] as f64).ln(),
                        *t,
                    )
                })
                .collect();
            scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)));
            let mut name: Vec<String> = scored.iter().take(3).map(|(_, t)| t.to_string()).collect();
            let tools = items[mine[0]].tool_names();
            if tools.len() == 1 && structure != MIXED {
                name.insert(0, tools[0].clone());
            }
            let mut kinds: BTreeMap<AnswerKind, usize> = BTreeMap::new();
            mine.iter()
                .for_each(|&n| *kinds.entry(items[n].kind()).or_default() += 1);
            let kind = kinds
                .iter()
                .max_by_key(|(k, c)| (**c, std::cmp::Reverse(**k)))
                .map_or(AnswerKind::Text, |(k, _)| *k);
            let spend: f64 = mine.iter().map(|&n| items[n].cost_usd).sum();
            out.push(Cluster {
                id: 0,
                name: if name.is_empty() {
                    "misc".into()
                } else {
                    name.join("-")
                },
                structure: structure.clone(),
                kind,
                members: mine.iter().map(|&n| items[n].id.clone()).collect(),
                exemplars: near
                    .iter()
                    .take(o.exemplars)
                    .map(|&n| items[n].id.clone())
                    .collect(),
                centroid: centroid.iter().map(|&v| v as f32).collect(),
                share: mine.len() as f64 / items.len() as f64,
                spend_share: if total_spend > 0.0 {
                    spend / total_spend
                } else {
                    0.0
                },
            });
        }
    }
    out.sort_by(|a, b| {
        b.members
            .len()
            .cmp(&a.members.len())
            .then(a.name.cmp(&b.name))
    });
    for (i, c) in out.iter_mut().enumerate() {
        c.id = i;
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn item(id: usize, system: &str, q: &str, tools: bool) -> Item {
        let mut request = json!({"messages": [{"role": "system", "content": system}, {"role": "user", "content": q}]});
        if tools {
            request["tools"] = json!([{"type": "function", "function": {"name": "get_weather"}}]);
        }
        Item {
            cost_usd: if tools { 3.0 } else { 1.0 },
            ..Item::test(&format!("i{id}"), request, json!({"content": "ok"}), "stop")
        }
    }

    #[test]
    fn frames_split_by_structure_then_by_embedding() {
        let mut items = Vec::new();
        let mut vecs = Vec::new();
        // One bare frame holding two well separated topics, and a tool frame.
        for n in 0..12 {
            let (q, v) = if n % 2 == 0 {
                (
                    format!("translate sentence {n} into french"),
                    vec![1.0, 0.05 * n as f32, 0.0],
                )
            } else {
                (
                    format!("summarise article {n} briefly"),
                    vec![0.0, 0.05 * n as f32, 1.0],
                )
            };
            items.push(item(n, "You help.", &q, false));
            vecs.push(v);
        }
        for n in 12..18 {
            items.push(item(n, "Agent.", &format!("weather in city {n}"), true));
            vecs.push(vec![0.5, 0.5, 0.5 + 0.01 * n as f32]);
        }
        let cl = cluster(&items, &vecs, &ClusterOptions::default()).unwrap();
        assert_eq!(cl.len(), 3, "{cl:#?}");
        let names: Vec<&str> = cl.iter().map(|c| c.name.as_str()).collect();
        assert!(
            names
                .iter()
                .any(|n| n.contains("translate") && n.contains("french")),
            "{names:?}"
        );
        assert!(names.iter().any(|n| n.contains("summarise")), "{names:?}");
        assert!(
            names.iter().any(|n| n.starts_with("get_weather")),
            "{names:?}"
        );
        let weather = cl
            .iter()
            .find(|c| c.name.starts_with("get_weather"))
            .unwrap();
        assert_eq!(weather.members.len(), 6);
        assert!((weather.share - 6.0 / 18.0).abs() < 1e-9);
        assert!((weather.spend_share - 18.0 / 30.0).abs() < 1e-9);
        assert_eq!(weather.exemplars.len(), 3);
        let shares: f64 = cl.iter().map(|c| c.share).sum();
        assert!((shares - 1.0).abs() < 1e-9);
    }

    #[test]
    fn one_off_frames_are_pooled_and_split_by_embedding() {
        // Each request offers its own tool (as BFCL's do): two topics, ten frames of one.
        let mut items = Vec::new();
        let mut vecs = Vec::new();
        for n in 0..10 {
            let mut i = item(n, "", &format!("topic {} item {n}", n % 2), true);
            i.request["tools"][0]["function"]["name"] = json!(format!("tool_{n}"));
            items.push(i);
            vecs.push(if n % 2 == 0 {
                vec![1.0, 0.0, 0.01 * n as f32]
            } else {
                vec![0.0, 1.0, 0.01 * n as f32]
            });
        }
        let cl = cluster(&items, &vecs, &ClusterOptions::default()).unwrap();
        assert_eq!(cl.len(), 2, "{cl:#?}");
        assert!(cl
            .iter()
            .all(|c| c.structure == MIXED && c.members.len() == 5));
    }

    #[test]
    fn a_homogeneous_frame_stays_whole() {
        let items: Vec<Item> = (0..40)
            .map(|n| item(n, "S", &format!("question {n}"), false))
            .collect();
        // One isotropic cloud in 64 dimensions (as one task's sentence embeddings are): no split
        // is convincing.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut noise = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f32 / (1u64 << 53) as f32 - 0.5
        };
        let vecs: Vec<Vec<f32>> = (0..40)
            .map(|_| {
                (0..64)
                    .map(|d| if d == 0 { 10.0 } else { noise() })
                    .collect()
            })
            .collect();
        let cl = cluster(&items, &vecs, &ClusterOptions::default()).unwrap();
        assert_eq!(
            cl.len(),
            1,
            "{:?}",
            cl.iter().map(|c| c.members.len()).collect::<Vec<_>>()
        );
        assert!(cluster(&items, &vecs[..3], &ClusterOptions::default()).is_err());
    }
}
