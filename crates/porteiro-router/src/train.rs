//! Training the scorer from labelled rows and calibrating the local threshold.
//!
//! A labelled row is one prompt with the quality of the local and of the upstream answer (each in
//! [0, 1], e.g. 1 for a correct multiple-choice letter). The scorer learns P(local >= upstream): the
//! local answer is as good as what escalation would buy.

use serde::{Deserialize, Serialize};

use crate::features::{feature_vector, sigmoid, Scorer, CHEAP};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Labelled {
    pub prompt: String,
    /// Quality of the local tier's answer in [0, 1].
    pub local: f32,
    /// Quality of the upstream tier's answer in [0, 1].
    pub upstream: f32,
    /// Optional group (dataset, subject) for reports.
    #[serde(default)]
    pub group: String,
}

impl Labelled {
    pub fn local_good_enough(&self) -> bool {
        self.local >= self.upstream
    }
}

/// Reads JSON lines of [`Labelled`]; the error names the line.
pub fn read_labelled(path: &std::path::Path) -> Result<Vec<Labelled>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str::<Labelled>(l)
                .map_err(|e| format!("{} line {}: {e}", path.display(), i + 1))
                .and_then(|r| {
                    if (0.0..=1.0).contains(&r.local) && (0.0..=1.0).contains(&r.upstream) {
                        Ok(r)
                    } else {
                        Err(format!(
                            "{} line {}: `local` and `upstream` must be in [0, 1]",
                            path.display(),
                            i + 1
                        ))
                    }
                })
        })
        .collect()
}

/// Logistic regression by full-batch gradient descent with L2, on standardised inputs folded back
/// into the weights (so the saved scorer takes raw features).
pub fn fit(xs: &[Vec<f32>], ys: &[f32], l2: f32, epochs: usize) -> (Vec<f32>, f32) {
    let n = xs.len().max(1) as f32;
    let d = xs.first().map_or(0, |x| x.len());
    let mut mean = vec![0f32; d];
    for x in xs {
        for (m, v) in mean.iter_mut().zip(x) {
            *m += v / n;
        }
    }
    let mut sd = vec![0f32; d];
    for x in xs {
        for ((s, v), m) in sd.iter_mut().zip(x).zip(&mean) {
            *s += (v - m) * (v - m) / n;
        }
    }
    for s in sd.iter_mut() {
        *s = s.sqrt().max(1e-4);
    }
    let z: Vec<Vec<f32>> = xs
        .iter()
        .map(|x| {
            x.iter()
                .zip(&mean)
                .zip(&sd)
                .map(|((v, m), s)| (v - m) / s)
                .collect()
        })
        .collect();
    let (mut w, mut b) = (vec![0f32; d], 0f32);
    let lr = 0.5f32;
    for _ in 0..epochs {
        let mut gw = vec![0f32; d];
        let mut gb = 0f32;
        for (x, &y) in z.iter().zip(ys) {
            let p = sigmoid(crate::dot(&w, x) + b);
            let e = p - y;
            for (g, v) in gw.iter_mut().zip(x) {
                *g += e * v / n;
            }
            gb += e / n;
        }
        for (wi, g) in w.iter_mut().zip(&gw) {
            *wi -= lr * (g + l2 * *wi);
        }
        b -= lr * gb;
    }
    // Fold the standardisation back: w·(x-m)/s + b = (w/s)·x + (b - Σ w m / s).
    let raw_w: Vec<f32> = w.iter().zip(&sd).map(|(wi, s)| wi / s).collect();
    let raw_b = b - raw_w.iter().zip(&mean).map(|(wi, m)| wi * m).sum::<f32>();
    (raw_w, raw_b)
}

/// Trains a scorer on rows with their embeddings.
pub fn train_scorer(rows: &[Labelled], embeddings: &[Vec<f32>], l2: f32, source: &str) -> Scorer {
    let xs: Vec<Vec<f32>> = rows
        .iter()
        .zip(embeddings)
        .map(|(r, e)| feature_vector(&r.prompt, e))
        .collect();
    let ys: Vec<f32> = rows
        .iter()
        .map(|r| if r.local_good_enough() { 1.0 } else { 0.0 })
        .collect();
    let (weights, bias) = fit(&xs, &ys, l2, 300);
    Scorer {
        embedding_dim: embeddings.first().map_or(0, |e| e.len()),
        cheap: CHEAP.iter().map(|s| s.to_string()).collect(),
        weights,
        bias,
        trained_on: source.to_string(),
    }
}

/// The threshold that keeps `share` of these scores local (score >= threshold stays local).
pub fn calibrate(scores: &[f32], share: f64) -> f64 {
    if scores.is_empty() {
        return 0.5;
    }
    let mut s: Vec<f32> = scores.to_vec();
    s.sort_by(|a, b| b.total_cmp(a));
    let keep = ((share.clamp(0.0, 1.0) * s.len() as f64).round() as usize).min(s.len());
    match keep {
        0 => s[0] as f64 + 1e-6,
        k => s[k - 1] as f64,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn logistic_regression_learns_a_separable_rule() {
        // y = 1 when x0 > 0.5, with a distractor feature.
        let xs: Vec<Vec<f32>> = (0..200)
            .map(|i| vec![(i % 100) as f32 / 100.0, ((i * 37) % 11) as f32])
            .collect();
        let ys: Vec<f32> = xs.iter().map(|x| (x[0] > 0.5) as u8 as f32).collect();
        let (w, b) = fit(&xs, &ys, 1e-3, 500);
        let acc = xs
            .iter()
            .zip(&ys)
            .filter(|(x, y)| (sigmoid(crate::dot(&w, x) + b) > 0.5) == (**y > 0.5))
            .count() as f32
            / xs.len() as f32;
        assert!(acc > 0.95, "{acc}");
    }

    #[test]
    fn calibration_hits_the_share() {
        let scores: Vec<f32> = (0..100).map(|i| i as f32 / 100.0).collect();
        let t = calibrate(&scores, 0.7);
        let kept = scores.iter().filter(|s| **s as f64 >= t).count();
        assert_eq!(kept, 70);
        assert_eq!(
            scores
                .iter()
                .filter(|s| **s as f64 >= calibrate(&scores, 0.0))
                .count(),
            0
        );
        assert_eq!(
            scores
                .iter()
                .filter(|s| **s as f64 >= calibrate(&scores, 1.0))
                .count(),
            100
        );
    }
}
