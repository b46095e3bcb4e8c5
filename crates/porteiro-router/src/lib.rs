//! The semantic router: decides, per request, which tier answers it.
//!
//! Two layers, both over one local sentence encoder (MiniLM, in-process):
//! 1. **Routes by example** ([`RouteIndex`]): each named route has example utterances; a request goes
//!    to the route whose nearest example is most similar (cosine), if that similarity reaches the
//!    floor. Routes name a tier explicitly ("format as JSON" → local, "prove" → upstream).
//! 2. **A learned difficulty scorer** ([`Scorer`]): logistic regression over the embedding plus cheap
//!    features (length, code, math, non-ASCII share) giving P(the local answer is good enough). Tiers
//!    are tried cheapest first; the first whose `min_score` the score reaches serves the request.
//!
//! Before both, the routes the flywheel learned ([`LearnedIndex`], reloaded at run time through
//! [`Router::set_learned`]): a request with a promoted cluster's structure, close enough to one of its
//! examples, is answered locally (with the cluster's adapter); a shadow cluster only marks the
//! decision, so the server can have the candidate answer off the request path.
//!
//! Without a scorer and without a matching route, requests stay local (score unknown). Metrics for
//! router evaluation (APGR, CPT) are in [`eval`]; training and calibration in [`train`].

pub mod eval;
pub mod features;
pub mod train;

use std::time::{Duration, Instant};

use porteiro_config::{Config, Route, LOCAL_TIER};
use porteiro_encoder::bert::BertEncoder;
use serde::{Deserialize, Serialize};

pub use features::Scorer;

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("cannot read the scorer {path}: {why}")]
    Scorer { path: String, why: String },
    #[error("the scorer {path} expects {want} embedding dimensions but the encoder gives {got}")]
    ScorerDim {
        path: String,
        want: usize,
        got: usize,
    },
}

/// Example embeddings of one route.
pub struct RouteIndex {
    pub name: String,
    pub tier: String,
    examples: Vec<Vec<f32>>,
}

impl RouteIndex {
    pub fn build(route: &Route, enc: &BertEncoder) -> Self {
        Self {
            name: route.name.clone(),
            tier: route.tier.clone(),
            examples: route
                .examples
                .iter()
                .filter(|e| !e.trim().is_empty())
                .map(|e| enc.embed(e).vector)
                .collect(),
        }
    }

    /// Highest cosine similarity between `v` (normalised) and the route's examples.
    pub fn similarity(&self, v: &[f32]) -> f32 {
        self.examples
            .iter()
            .map(|e| dot(e, v))
            .fold(f32::NEG_INFINITY, f32::max)
    }
}

/// A route the flywheel learned: a cluster a local candidate took over (or shadows).
pub struct LearnedIndex {
    pub name: String,
    /// The structure key a request must have (`porteiro_flywheel`'s); None matches any.
    pub structure: Option<String>,
    examples: Vec<Vec<f32>>,
    /// Shadow only: the request still goes where the rest of the router sends it.
    pub shadow: bool,
    /// The adapter the local tier answers with (by its name on the server).
    pub adapter: Option<String>,
}

impl LearnedIndex {
    /// `examples`: normalised embeddings of the cluster's routing texts.
    pub fn new(
        name: String,
        structure: Option<String>,
        examples: Vec<Vec<f32>>,
        shadow: bool,
        adapter: Option<String>,
    ) -> Self {
        Self {
            name,
            structure,
            examples,
            shadow,
            adapter,
        }
    }

    fn similarity(&self, v: &[f32]) -> f32 {
        self.examples
            .iter()
            .map(|e| dot(e, v))
            .fold(f32::NEG_INFINITY, f32::max)
    }
}

/// The learned route a request matched.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LearnedMatch {
    pub name: String,
    pub shadow: bool,
    pub adapter: Option<String>,
    pub similarity: f32,
}

struct Learned {
    floor: f32,
    routes: Vec<LearnedIndex>,
}

pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// One tier as the router sees it: its name and the lowest score it accepts.
#[derive(Debug, Clone, PartialEq)]
pub struct TierRule {
    pub name: String,
    pub min_score: f64,
}

/// How a decision was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Basis {
    /// A route's example was close enough.
    Route,
    /// The learned scorer.
    Scorer,
    /// Neither: the cheapest tier by default.
    Default,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    /// The tier chosen by the router (may be an upstream even if none is reachable; the server
    /// records what it would have escalated).
    pub tier: String,
    /// The matched route's name, or "scorer" / "default".
    pub route: String,
    pub basis: Basis,
    /// P(local is good enough) from the scorer, when there is one.
    pub score: Option<f32>,
    /// Similarity to the nearest route example.
    pub similarity: f32,
    /// Encoder tokens the decision was computed from.
    pub tokens: usize,
    /// The evidence says escalate, but the chosen tier is local (no upstream tier takes it): what
    /// the router would have escalated, for the record.
    pub would_escalate: bool,
    /// The flywheel's route the request matched (promoted: it decided; shadow: it only watches).
    pub learned: Option<LearnedMatch>,
    #[serde(skip)]
    pub elapsed: Duration,
}

impl Decision {
    /// Whether the router wanted an upstream tier.
    pub fn escalates(&self) -> bool {
        self.tier != LOCAL_TIER
    }

    /// The value of the `x-porteiro-score` header.
    pub fn score_header(&self) -> String {
        match (self.basis, self.score) {
            (Basis::Route, _) => format!("{:.4}", self.similarity),
            (_, Some(s)) => format!("{s:.4}"),
            // No scorer and no route close enough: the best similarity, for the record.
            _ => format!("{:.4}", self.similarity),
        }
    }
}

pub struct Router {
    encoder: std::sync::Arc<BertEncoder>,
    routes: Vec<RouteIndex>,
    floor: f32,
    tiers: Vec<TierRule>,
    scorer: Option<Scorer>,
    learned: std::sync::RwLock<std::sync::Arc<Learned>>,
}

impl Router {
    /// Builds the router from the configuration: embeds every route example now (once).
    pub fn new(cfg: &Config, encoder: std::sync::Arc<BertEncoder>) -> Result<Self, RouterError> {
        let scorer = match &cfg.router.scorer {
            Some(path) => {
                let s = Scorer::load(std::path::Path::new(path))?;
                if s.embedding_dim() != encoder.dim() {
                    return Err(RouterError::ScorerDim {
                        path: path.clone(),
                        want: s.embedding_dim(),
                        got: encoder.dim(),
                    });
                }
                Some(s)
            }
            None => None,
        };
        let mut tiers = vec![TierRule {
            name: LOCAL_TIER.into(),
            min_score: cfg.router.local_min_score,
        }];
        tiers.extend(cfg.upstreams.iter().map(|u| TierRule {
            name: u.name.clone(),
            min_score: u.min_score,
        }));
        let routes = cfg
            .routes
            .iter()
            .map(|r| RouteIndex::build(r, &encoder))
            .collect();
        Ok(Self {
            encoder,
            routes,
            floor: cfg.router.similarity_floor as f32,
            tiers,
            scorer,
            learned: std::sync::RwLock::new(std::sync::Arc::new(Learned {
                floor: 1.0,
                routes: Vec::new(),
            })),
        })
    }

    /// Replaces the learned routes (the server calls this when the flywheel's routes file changes);
    /// one matches only at or above `floor` cosine to one of its examples.
    pub fn set_learned(&self, routes: Vec<LearnedIndex>, floor: f32) {
        let l = std::sync::Arc::new(Learned { floor, routes });
        *self.learned.write().unwrap_or_else(|p| p.into_inner()) = l;
    }

    /// Names of the learned routes in use.
    pub fn learned_names(&self) -> Vec<String> {
        let l = self
            .learned
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        l.routes.iter().map(|r| r.name.clone()).collect()
    }

    pub fn tiers(&self) -> &[TierRule] {
        &self.tiers
    }

    pub fn encoder(&self) -> &BertEncoder {
        &self.encoder
    }

    /// Decides for one request text (for chat: the conversation's text, see `request_text`).
    pub fn decide(&self, text: &str) -> Decision {
        self.decide_structured(text, None)
    }

    /// Decides for a chat request: its text and its structure key (learned routes match only
    /// requests of their cluster's structure).
    pub fn decide_structured(&self, text: &str, structure: Option<&str>) -> Decision {
        let t0 = Instant::now();
        let emb = self.encoder.embed(text);
        let mut d = self.decide_embedded(text, &emb.vector);
        let learned = self
            .learned
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        d.learned = learned_match(&learned, &emb.vector, structure);
        if let Some(m) = d.learned.as_ref().filter(|m| !m.shadow) {
            d.tier = LOCAL_TIER.to_string();
            d.route.clone_from(&m.name);
            d.basis = Basis::Route;
            d.similarity = m.similarity;
            d.would_escalate = false;
        }
        d.tokens = emb.tokens;
        d.elapsed = t0.elapsed();
        d
    }

    /// The decision for an already embedded request.
    pub fn decide_embedded(&self, text: &str, v: &[f32]) -> Decision {
        let best = self
            .routes
            .iter()
            .map(|r| (r, r.similarity(v)))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        let similarity = best.map_or(0.0, |b| b.1);
        let score = self.scorer.as_ref().map(|s| s.score(text, v));
        let (tier, route, basis) = match best {
            Some((r, sim)) if sim >= self.floor => (r.tier.clone(), r.name.clone(), Basis::Route),
            _ => match score {
                Some(p) => (
                    pick_tier(&self.tiers, p as f64).to_string(),
                    "scorer".to_string(),
                    Basis::Scorer,
                ),
                None => (
                    LOCAL_TIER.to_string(),
                    "default".to_string(),
                    Basis::Default,
                ),
            },
        };
        let would_escalate = match basis {
            Basis::Route => tier != LOCAL_TIER,
            Basis::Scorer => score.is_some_and(|p| (p as f64) < self.tiers[0].min_score),
            Basis::Default => false,
        };
        Decision {
            tier,
            route,
            basis,
            score,
            similarity,
            tokens: 0,
            would_escalate,
            learned: None,
            elapsed: Duration::ZERO,
        }
    }
}

/// The nearest learned route of the request's structure at or above the floor.
fn learned_match(l: &Learned, v: &[f32], structure: Option<&str>) -> Option<LearnedMatch> {
    l.routes
        .iter()
        .filter(|r| match (&r.structure, structure) {
            (None, _) => true,
            (Some(want), Some(got)) => want == got,
            (Some(_), None) => false,
        })
        .map(|r| (r, r.similarity(v)))
        .filter(|(_, s)| *s >= l.floor)
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(r, s)| LearnedMatch {
            name: r.name.clone(),
            shadow: r.shadow,
            adapter: r.adapter.clone(),
            similarity: s,
        })
}

/// The cheapest tier whose `min_score` the score reaches; the last tier catches everything.
pub fn pick_tier(tiers: &[TierRule], score: f64) -> &str {
    tiers
        .iter()
        .find(|t| score >= t.min_score)
        .or(tiers.last())
        .map_or(LOCAL_TIER, |t| t.name.as_str())
}

/// The text a chat request is routed on: the last user message, preceded by the system prompt
/// (which often says what the task is). Long texts are cut by the encoder's own limit.
pub fn request_text<'a>(messages: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut system = String::new();
    let mut last_user = String::new();
    for (role, content) in messages {
        match role {
            "system" | "developer" => {
                system = content.to_string();
            }
            "user" => last_user = content.to_string(),
            _ => {}
        }
    }
    if system.is_empty() {
        last_user
    } else {
        format!("{system}\n{last_user}")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn tiers_are_tried_cheapest_first_and_the_last_catches_all() {
        let tiers = vec![
            TierRule {
                name: "local".into(),
                min_score: 0.6,
            },
            TierRule {
                name: "mid".into(),
                min_score: 0.3,
            },
            TierRule {
                name: "big".into(),
                min_score: 0.1,
            },
        ];
        assert_eq!(pick_tier(&tiers, 0.9), "local");
        assert_eq!(pick_tier(&tiers, 0.6), "local");
        assert_eq!(pick_tier(&tiers, 0.5), "mid");
        assert_eq!(pick_tier(&tiers, 0.2), "big");
        assert_eq!(pick_tier(&tiers, 0.0), "big");
    }

    #[test]
    fn learned_routes_match_by_structure_then_similarity() {
        let unit = |x: f32, y: f32| {
            let n = (x * x + y * y).sqrt();
            vec![x / n, y / n]
        };
        let l = Learned {
            floor: 0.9,
            routes: vec![
                LearnedIndex::new(
                    "cluster-1".into(),
                    Some("weather".into()),
                    vec![unit(1.0, 0.0)],
                    false,
                    Some("fw-1".into()),
                ),
                LearnedIndex::new("cluster-2".into(), None, vec![unit(0.0, 1.0)], true, None),
            ],
        };
        let m = learned_match(&l, &unit(1.0, 0.1), Some("weather")).unwrap();
        assert_eq!((m.name.as_str(), m.shadow), ("cluster-1", false));
        assert_eq!(m.adapter.as_deref(), Some("fw-1"));
        // Same text, other structure: no match (cluster-2 is too far).
        assert!(learned_match(&l, &unit(1.0, 0.1), Some("tickets")).is_none());
        assert!(learned_match(&l, &unit(1.0, 0.1), None).is_none());
        // Below the floor.
        assert!(learned_match(&l, &unit(1.0, 1.0), Some("weather")).is_none());
        let m = learned_match(&l, &unit(0.1, 1.0), Some("anything")).unwrap();
        assert_eq!((m.name.as_str(), m.shadow), ("cluster-2", true));
    }

    #[test]
    fn request_text_takes_system_and_last_user_message() {
        let t = request_text([
            ("system", "You extract fields."),
            ("user", "first"),
            ("assistant", "ok"),
            ("user", "Name: Ana"),
        ]);
        assert_eq!(t, "You extract fields.\nName: Ana");
        assert_eq!(request_text([("user", "hi")]), "hi");
    }
}
