//! Types per tensor fitted to a byte budget from measured loss.
//!
//! Each tensor's sensitivity is measured, not guessed: starting from the model with every tensor
//! at Q8_0, that tensor alone is quantized to each candidate type and the mean KL divergence from
//! the original's predictions on calibration text is measured ([`measure`]). Treating the losses
//! as additive, [`allocate`] then picks one type per tensor to minimise their sum under the
//! budget: a Lagrangian sweep over the price of a byte, then the best remaining upgrades by loss
//! saved per byte.

use porteiro_models::gguf::GgmlType;

use crate::eval::Reference;
use crate::model::{ForwardError, Model, ModelError};
use crate::quantize::{quantize_row, row_bytes};

/// One type a tensor may take.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub dtype: GgmlType,
    pub bytes: usize,
    /// Mean KLD added by this tensor alone at this type (against all tensors at Q8_0).
    pub dkld: f64,
}

#[derive(Debug, Clone)]
pub struct Sensitivity {
    pub name: String,
    /// Ascending in bytes.
    pub choices: Vec<Choice>,
}

#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error("{0}")]
    Infeasible(String),
}

/// The candidate types a row of `cols` values can take, each through llama.cpp's fallback for
/// rows that are not whole 256-blocks, without repeats; ascending in size.
pub fn candidates(cols: usize, types: &[GgmlType]) -> Vec<GgmlType> {
    let mut out: Vec<GgmlType> = Vec::new();
    for &t in types {
        let t = crate::mix::fallback(cols as u64, t);
        if row_bytes(t, cols).is_some() && !out.contains(&t) {
            out.push(t);
        }
    }
    out.sort_by_key(|&t| row_bytes(t, cols));
    out
}

/// Quantizes `x` (rows of `cols`) to `t`.
pub fn quantize_tensor(t: GgmlType, x: &[f32], cols: usize) -> Vec<u8> {
    let rb = row_bytes(t, cols).unwrap_or(0);
    let mut out = vec![0u8; x.len() / cols.max(1) * rb];
    for (r, o) in x.chunks_exact(cols).zip(out.chunks_exact_mut(rb)) {
        quantize_row(t, r, o);
    }
    out
}

/// Measures every tensor in `tensors` (name, row length) at each of `types` on `model`, a model
/// with all of them at Q8_0: `weights(name)` gives a tensor's original values in f32. Q8_0 itself
/// costs nothing by definition. `progress(done, total)` after each measurement.
pub fn measure(
    model: &mut Model,
    reference: &Reference,
    tensors: &[(String, usize)],
    types: &[GgmlType],
    weights: &dyn Fn(&str) -> Vec<f32>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(f64, Vec<Sensitivity>), BudgetError> {
    let base = reference.mean_kld(model)?;
    // Swapping a matrix changes nothing before its first layer: those layers run once, here.
    let states = reference.record(model)?;
    let total: usize = tensors
        .iter()
        .map(|(_, c)| candidates(*c, types).len())
        .sum();
    let mut done = 0;
    let mut out = Vec::with_capacity(tensors.len());
    for (name, cols) in tensors {
        let x = weights(name);
        let mut choices = Vec::new();
        for t in candidates(*cols, types) {
            let bytes = quantize_tensor(t, &x, *cols);
            let size = bytes.len();
            let dkld = if t == GgmlType::Q8_0 {
                0.0
            } else {
                let resume = model.resume_at(name)?;
                let old = model.swap_matrix(name, t, bytes)?;
                let kld = match resume {
                    Some(layer) => reference.mean_kld_from(model, &states, layer),
                    None => reference.mean_kld(model),
                };
                model.restore_matrix(old);
                kld? - base
            };
            choices.push(Choice {
                dtype: t,
                bytes: size,
                dkld,
            });
            done += 1;
            progress(done, total);
        }
        monotone(&mut choices);
        out.push(Sensitivity {
            name: name.clone(),
            choices,
        });
    }
    Ok((base, out))
}

/// More bits never lose more: a measured loss below that of a larger choice (calibration noise,
/// at a few hundred scored tokens) is raised to it, so that noise cannot buy bytes back.
pub fn monotone(choices: &mut [Choice]) {
    let mut floor = 0.0f64;
    for c in choices.iter_mut().rev() {
        floor = floor.max(c.dkld);
        c.dkld = floor;
    }
}

/// One choice index per tensor whose bytes sum to at most `budget`, at the least total loss the
/// sweep finds. Infeasible when even the smallest choices exceed the budget.
pub fn allocate(sens: &[Sensitivity], budget: usize) -> Result<Vec<usize>, BudgetError> {
    let bytes = |pick: &[usize]| bytes(sens, pick);
    let at = |lambda: f64| -> Vec<usize> {
        sens.iter()
            .map(|s| {
                (0..s.choices.len())
                    .min_by(|&a, &b| {
                        let cost =
                            |i: usize| s.choices[i].dkld + lambda * s.choices[i].bytes as f64;
                        cost(a).total_cmp(&cost(b)).then(a.cmp(&b))
                    })
                    .unwrap_or(0)
            })
            .collect()
    };
    let smallest: Vec<usize> = vec![0; sens.len()];
    if bytes(&smallest) > budget {
        return Err(BudgetError::Infeasible(format!(
            "even the smallest types take {} bytes, over the budget of {budget}",
            bytes(&smallest)
        )));
    }
    // Price of a byte: 0 buys the least-loss choice everywhere; raise it until the plan fits.
    let mut pick = at(0.0);
    if bytes(&pick) > budget {
        let (mut lo, mut hi) = (0.0f64, 1e-12f64);
        while bytes(&at(hi)) > budget {
            hi *= 4.0;
            if hi > 1e6 {
                pick = smallest.clone();
                break;
            }
        }
        if bytes(&pick) > budget {
            for _ in 0..100 {
                let mid = 0.5 * (lo + hi);
                if bytes(&at(mid)) > budget {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            pick = at(hi);
        }
    }
    fill(sens, budget, &mut pick);
    // The sweep only reaches each tensor's lower convex hull, in steps as coarse as the largest
    // tensor (a tied embedding can be half the model); the knapsack does not have that gap.
    if let Some(mut dp) = knapsack(sens, budget) {
        fill(sens, budget, &mut dp);
        if loss(sens, &dp) < loss(sens, &pick) {
            pick = dp;
        }
    }
    Ok(pick)
}

fn bytes(sens: &[Sensitivity], pick: &[usize]) -> usize {
    sens.iter()
        .zip(pick)
        .map(|(s, &i)| s.choices[i].bytes)
        .sum()
}

fn loss(sens: &[Sensitivity], pick: &[usize]) -> f64 {
    sens.iter().zip(pick).map(|(s, &i)| s.choices[i].dkld).sum()
}

/// Buckets of the knapsack's capacity: each tensor's bytes round up to a bucket, so at most one
/// bucket per tensor is left unused (0.2% of the budget for 100 tensors), which `fill` then spends.
const BUCKETS: usize = 1 << 16;

/// The least-loss choices whose bytes, rounded up to buckets of budget / BUCKETS, fit: the
/// multiple-choice knapsack by dynamic programming over the capacity. None if nothing fits.
fn knapsack(sens: &[Sensitivity], budget: usize) -> Option<Vec<usize>> {
    let unit = budget.div_ceil(BUCKETS).max(1);
    let cap = budget / unit;
    // best[b]: least loss of the tensors so far within b buckets; choice[t][b]: tensor t's pick.
    let mut best = vec![0f64; cap + 1];
    let mut next = vec![f64::INFINITY; cap + 1];
    let mut choice = vec![vec![u8::MAX; cap + 1]; sens.len()];
    for (t, s) in sens.iter().enumerate() {
        next.fill(f64::INFINITY);
        for (i, c) in s.choices.iter().enumerate() {
            let w = c.bytes.div_ceil(unit);
            for b in w..=cap {
                let v = best[b - w] + c.dkld;
                if v < next[b] {
                    next[b] = v;
                    choice[t][b] = i as u8;
                }
            }
        }
        std::mem::swap(&mut best, &mut next);
    }
    if !best[cap].is_finite() {
        return None;
    }
    // Walk back from the full capacity.
    let mut pick = vec![0; sens.len()];
    let mut b = cap;
    for t in (0..sens.len()).rev() {
        let i = choice[t][b] as usize;
        pick[t] = i;
        b -= sens[t].choices.get(i)?.bytes.div_ceil(unit);
    }
    Some(pick)
}

/// Spends what is left of `budget` on the single upgrades that save the most loss per byte.
fn fill(sens: &[Sensitivity], budget: usize, pick: &mut [usize]) {
    let bytes = |pick: &[usize]| bytes(sens, pick);
    loop {
        let left = budget.saturating_sub(bytes(pick));
        let best = sens
            .iter()
            .enumerate()
            .flat_map(|(t, s)| {
                let cur = &s.choices[pick[t]];
                s.choices.iter().enumerate().filter_map(move |(i, c)| {
                    let extra = c.bytes.checked_sub(cur.bytes)?;
                    let saved = cur.dkld - c.dkld;
                    (extra > 0 && extra <= left && saved > 0.0).then_some((
                        t,
                        i,
                        saved / extra as f64,
                    ))
                })
            })
            .max_by(|a, b| a.2.total_cmp(&b.2));
        match best {
            Some((t, i, _)) => pick[t] = i,
            None => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(name: &str, opts: &[(usize, f64)]) -> Sensitivity {
        Sensitivity {
            name: name.into(),
            choices: opts
                .iter()
                .map(|&(bytes, dkld)| Choice {
                    dtype: GgmlType::Q4_0,
                    bytes,
                    dkld,
                })
                .collect(),
        }
    }

    #[test]
    fn bits_go_where_they_save_most() {
        // Tensor a is sensitive, b is not: with room for one upgrade, a gets it.
        let sens = [
            s("a", &[(100, 0.5), (150, 0.1), (200, 0.0)]),
            s("b", &[(100, 0.01), (150, 0.005), (200, 0.0)]),
        ];
        assert_eq!(allocate(&sens, 250).unwrap(), [1, 0]);
        assert_eq!(allocate(&sens, 300).unwrap(), [2, 0]);
        assert_eq!(allocate(&sens, 400).unwrap(), [2, 2]);
        assert!(allocate(&sens, 199).is_err());
    }

    #[test]
    fn the_budget_is_never_exceeded_and_is_used() {
        let sens: Vec<Sensitivity> = (0..20)
            .map(|i| {
                let w = 1.0 + (i * 7 % 5) as f64;
                s(
                    "t",
                    &[(40, 0.3 * w), (55, 0.1 * w), (66, 0.03 * w), (85, 0.0)],
                )
            })
            .collect();
        for budget in [800, 900, 1000, 1200, 1500, 1700] {
            let pick = allocate(&sens, budget).unwrap();
            let used = bytes(&sens, &pick);
            assert!(used <= budget, "{used} > {budget}");
            // No single upgrade still fits and helps.
            let left = budget - used;
            for (s, &i) in sens.iter().zip(&pick) {
                for c in &s.choices[i + 1..] {
                    assert!(c.bytes - s.choices[i].bytes > left || c.dkld >= s.choices[i].dkld);
                }
            }
        }
    }

    /// One tensor as large as most of the budget: the sweep's hull steps jump over the best plan
    /// (big at its top type, the small ones at their cheapest); the knapsack finds it.
    #[test]
    fn a_tensor_as_large_as_the_budget_does_not_strand_bytes() {
        let mut sens = vec![s("embd", &[(500, 0.05), (600, 0.02), (900, 0.0)])];
        sens.extend((0..10).map(|_| s("t", &[(10, 0.001), (20, 0.0)])));
        let pick = allocate(&sens, 1000).unwrap();
        assert_eq!(pick[0], 2, "{pick:?}");
        let used = bytes(&sens, &pick);
        assert!(used <= 1000);
        assert!((loss(&sens, &pick) - 0.01).abs() < 1e-12, "{pick:?}");
        // Brute force over the big tensor's choices agrees.
        assert_eq!(knapsack(&sens, 1000).map(|p| p[0]), Some(2));
    }

    #[test]
    fn noise_cannot_make_fewer_bits_better() {
        let mut c = s("t", &[(40, 0.2), (55, -0.01), (66, 0.03), (85, 0.0)]).choices;
        monotone(&mut c);
        let d: Vec<f64> = c.iter().map(|c| c.dkld).collect();
        assert_eq!(d, [0.2, 0.03, 0.03, 0.0]);
    }

    #[test]
    fn candidates_fall_back_like_llama_cpp() {
        let all = [
            GgmlType::Q4_0,
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
            GgmlType::Q8_0,
        ];
        assert_eq!(
            candidates(896, &all),
            [
                GgmlType::Q4_0,
                GgmlType::Q5_0,
                GgmlType::Q5_1,
                GgmlType::Q8_0
            ]
        );
        assert_eq!(
            candidates(1536, &all),
            [
                GgmlType::Q4_0,
                GgmlType::Q4_K,
                GgmlType::Q5_K,
                GgmlType::Q6_K,
                GgmlType::Q8_0
            ]
        );
    }
}
