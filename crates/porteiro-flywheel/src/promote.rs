//! S6's decision: which candidate may take a cluster's traffic. A candidate qualifies when the lower
//! bound of its agreement with the teacher (95% Wilson) reaches the threshold (default 0.95: the
//! teacher agrees with itself, so "95% of the teacher's score"); among qualifiers the cheapest mode
//! wins (zero-shot, then an adapter, then few-shot, whose prompt carries examples), then the higher
//! bound. No qualifier: the cluster stays with the teacher, and the best candidate says why.

use serde::{Deserialize, Serialize};

/// One candidate's score on one cluster's test split (what `select` writes).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Score {
    pub cluster: usize,
    pub name: String,
    pub model: String,
    /// `zero-shot`, `few-shot` or `lora`.
    pub mode: String,
    pub n: usize,
    pub agree: usize,
    pub errors: usize,
    pub rate: f64,
    pub low: f64,
    pub high: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Decision {
    pub cluster: usize,
    /// The candidate to shadow and promote, if one qualifies.
    pub promote: Option<Score>,
    pub why: String,
}

fn cost_rank(mode: &str) -> u8 {
    match mode {
        "zero-shot" => 0,
        "lora" => 1,
        _ => 2,
    }
}

/// The decision for one cluster from its candidates' scores.
pub fn decide(cluster: usize, scores: &[Score], threshold: f64) -> Decision {
    let mine: Vec<&Score> = scores.iter().filter(|s| s.cluster == cluster).collect();
    let best = mine.iter().filter(|s| s.low >= threshold).min_by(|a, b| {
        cost_rank(&a.mode)
            .cmp(&cost_rank(&b.mode))
            .then(b.low.total_cmp(&a.low))
    });
    let said = |s: &Score, cmp: &str| {
        format!(
            "{} {} at {}/{} held-out samples (lower bound {:.1}% {cmp} {:.1}%)",
            s.model,
            s.mode,
            s.agree,
            s.n,
            s.low * 100.0,
            threshold * 100.0
        )
    };
    match best {
        Some(s) => Decision {
            cluster,
            promote: Some((*s).clone()),
            why: said(s, "≥"),
        },
        None => Decision {
            cluster,
            promote: None,
            why: mine
                .iter()
                .max_by(|a, b| a.low.total_cmp(&b.low))
                .map_or("not evaluated".into(), |s| {
                    format!("best: {}", said(s, "<"))
                }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::score::wilson;

    fn score(mode: &str, agree: usize, n: usize) -> Score {
        let (low, high) = wilson(agree, n);
        Score {
            cluster: 0,
            name: "c".into(),
            model: "m".into(),
            mode: mode.into(),
            n,
            agree,
            errors: 0,
            rate: agree as f64 / n as f64,
            low,
            high,
        }
    }

    #[test]
    fn the_cheapest_candidate_whose_lower_bound_clears_the_threshold_wins() {
        // All three clear 0.9 (lower bounds 94.0%, 98.1%, 91.0%): zero-shot costs least.
        let s = vec![
            score("few-shot", 200, 200),
            score("zero-shot", 60, 60),
            score("lora", 190, 200),
        ];
        let d = decide(0, &s, 0.9);
        assert_eq!(
            d.promote.as_ref().map(|p| p.mode.as_str()),
            Some("zero-shot"),
            "{d:?}"
        );
        // A perfect score on few samples is not evidence enough.
        let d = decide(0, &[score("zero-shot", 10, 10)], 0.95);
        assert!(d.promote.is_none() && d.why.contains("10/10"), "{d:?}");
        assert_eq!(decide(1, &s, 0.5).why, "not evaluated");
    }
}
