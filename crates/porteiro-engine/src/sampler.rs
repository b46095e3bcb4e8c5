//! Token sampling: penalties, then greedy or (top-k → top-p → min-p → temperature → draw), the order
//! llama.cpp uses, with a seeded generator so that the same seed gives the same text.

use std::collections::HashMap;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1.0 disables.
    pub top_p: f32,
    /// 0 disables.
    pub min_p: f32,
    /// 1.0 disables; applied to tokens in the last `penalty_last_n` positions.
    pub repeat_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub penalty_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            penalty_last_n: 64,
            seed: 0xC0FFEE,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Rejects values that make no sense, naming the parameter.
    pub fn validate(&self) -> Result<(), String> {
        let bad = |name: &str, why: &str| Err(format!("{name}: {why}"));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad("temperature", "must be a finite number >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", "must be in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", "must be in [0, 1]");
        }
        if !self.repeat_penalty.is_finite() || self.repeat_penalty <= 0.0 {
            return bad("repeat_penalty", "must be > 0");
        }
        for (n, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !v.is_finite() || !(-2.0..=2.0).contains(&v) {
                return bad(n, "must be in [-2, 2]");
            }
        }
        Ok(())
    }
}

/// splitmix64 seeding a xoshiro256** generator: small, fast, reproducible across platforms.
#[derive(Clone)]
pub struct Rng([u64; 4]);

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9e3779b97f4a7c15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94d049bb133111eb);
            x ^ (x >> 31)
        };
        Self([next(), next(), next(), next()])
    }
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let r = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        r
    }
    /// Uniform in [0, 1).
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub struct Sampler {
    pub params: SamplingParams,
    rng: Rng,
    history: Vec<u32>,
    counts: HashMap<u32, u32>,
    cand: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = Rng::new(params.seed);
        Self {
            params,
            rng,
            history: Vec::new(),
            counts: HashMap::new(),
            cand: Vec::new(),
        }
    }

    /// Records a generated token (penalties look at generated tokens only, as OpenAI's do).
    pub fn accept(&mut self, tok: u32) {
        self.history.push(tok);
        *self.counts.entry(tok).or_insert(0) += 1;
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &n) in &self.counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
        if p.repeat_penalty != 1.0 {
            let start = self.history.len().saturating_sub(p.penalty_last_n);
            let mut seen = std::collections::HashSet::new();
            for &t in &self.history[start..] {
                if seen.insert(t) {
                    if let Some(l) = logits.get_mut(t as usize) {
                        *l = if *l > 0.0 {
                            *l / p.repeat_penalty
                        } else {
                            *l * p.repeat_penalty
                        };
                    }
                }
            }
        }
    }

    /// Picks the next token from raw logits (modified in place by penalties).
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        self.apply_penalties(logits);
        let p = self.params.clone();
        if p.temperature <= 0.0 {
            return argmax(logits);
        }
        let cand = &mut self.cand;
        cand.clear();
        cand.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
        let by_logit_desc =
            |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, by_logit_desc);
            cand.truncate(p.top_k);
        }
        let mx;
        if p.top_p >= 1.0 && cand.len() == logits.len() {
            // No top-k and no cumulative cut (OpenAI's defaults): order does not matter, so the whole
            // vocabulary is not sorted. Candidates stay in token-id order; min-p is a logit floor.
            mx = cand.iter().fold(f32::NEG_INFINITY, |m, c| m.max(c.1));
            if p.min_p > 0.0 {
                let floor = mx + p.min_p.ln();
                cand.retain(|c| c.1 >= floor);
            }
        } else {
            cand.sort_unstable_by(by_logit_desc);
            // Probabilities before temperature decide top-p and min-p.
            mx = cand[0].1;
            let probs: Vec<f32> = cand.iter().map(|c| (c.1 - mx).exp()).collect();
            let total: f32 = probs.iter().sum();
            let mut keep = cand.len();
            if p.top_p < 1.0 {
                let mut acc = 0.0;
                for (i, pr) in probs.iter().enumerate() {
                    acc += pr / total;
                    if acc >= p.top_p {
                        keep = i + 1;
                        break;
                    }
                }
            }
            if p.min_p > 0.0 {
                let floor = p.min_p * probs[0];
                keep = keep.min(probs.iter().take_while(|&&pr| pr >= floor).count().max(1));
            }
            cand.truncate(keep);
        }
        let weights: Vec<f64> = cand
            .iter()
            .map(|c| (((c.1 - mx) / p.temperature) as f64).exp())
            .collect();
        let sum: f64 = weights.iter().sum();
        let mut r = self.rng.f64() * sum;
        for (c, w) in cand.iter().zip(&weights) {
            if r < *w {
                return c.0;
            }
            r -= w;
        }
        cand[cand.len() - 1].0
    }
}

pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// log-softmax of one row, for log-probabilities and perplexity.
pub fn log_softmax(x: &[f32]) -> Vec<f32> {
    let mx = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let lse = mx + x.iter().map(|&v| ((v - mx) as f64).exp()).sum::<f64>().ln() as f32;
    x.iter().map(|&v| v - lse).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        (0..100).map(|i| ((i * 37) % 100) as f32 / 10.0).collect()
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy());
        let mut l = logits();
        assert_eq!(s.sample(&mut l), argmax(&logits()));
    }

    #[test]
    fn same_seed_same_draws_and_different_seed_differs() {
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams {
                temperature: 1.5,
                top_k: 0,
                top_p: 1.0,
                min_p: 0.0,
                seed,
                ..Default::default()
            });
            (0..50).map(|_| s.sample(&mut logits())).collect::<Vec<_>>()
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 1,
            ..Default::default()
        });
        for _ in 0..10 {
            assert_eq!(s.sample(&mut logits()), argmax(&logits()));
        }
    }

    #[test]
    fn frequency_penalty_discourages_repeats() {
        let mut s = Sampler::new(SamplingParams {
            frequency_penalty: 2.0,
            ..SamplingParams::greedy()
        });
        let top = argmax(&logits());
        for _ in 0..3 {
            s.accept(top);
        }
        assert_ne!(s.sample(&mut logits()), top);
    }

    #[test]
    fn unsorted_full_vocabulary_path_draws_from_the_softmax() {
        // p = 1/6, 2/6, 3/6 at temperature 1 (no top-k, no top-p: the path that skips sorting).
        let base: Vec<f32> = vec![1f32.ln(), 2f32.ln(), 3f32.ln()];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 3,
            ..Default::default()
        });
        let mut counts = [0usize; 3];
        let n = 30_000;
        for _ in 0..n {
            counts[s.sample(&mut base.clone()) as usize] += 1;
        }
        for (c, want) in counts.iter().zip([1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]) {
            let got = *c as f64 / n as f64;
            assert!((got - want).abs() < 0.015, "{counts:?}");
        }
        // min-p 0.5 keeps tokens with p >= 0.5 * p_max: only ids 1 and 2.
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.5,
            ..Default::default()
        });
        for _ in 0..200 {
            assert_ne!(s.sample(&mut base.clone()), 0);
        }
    }

    #[test]
    fn validate_names_the_parameter() {
        let e = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.starts_with("top_p"));
    }
}
