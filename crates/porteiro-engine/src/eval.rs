//! Model-quality measurements that compare against a reference: perplexity the way llama-perplexity
//! computes it, and the argmax prediction at every position (top-1 agreement).

use crate::lora::Adapter;
use crate::model::{BatchToken, ForwardError, Model, Scratch};
use crate::sampler::{argmax, log_softmax};

#[derive(Debug, Clone, serde::Serialize)]
pub struct Perplexity {
    pub ppl: f64,
    pub nll: f64,
    pub scored_tokens: usize,
    pub chunks: usize,
}

/// Splits `tokens` into `chunks` windows of `ctx` tokens; the first token of each window becomes BOS
/// (when the model uses one) and only the second half of each window is scored, so every scored token
/// has at least ctx/2 tokens of context — llama-perplexity's procedure, so the figures compare.
pub fn perplexity(
    model: &Model,
    tokens: &[u32],
    ctx: usize,
    chunks: usize,
    bos: Option<u32>,
    progress: &mut dyn FnMut(usize, f64),
) -> Result<Perplexity, ForwardError> {
    perplexity_with(model, None, tokens, ctx, chunks, bos, progress)
}

/// Window `c` of `ctx` tokens (its first token BOS when the model uses one) and its batch, with
/// logits at the scored positions: the second half, but the last (whose next token is outside).
fn scored_window(
    tokens: &[u32],
    c: usize,
    ctx: usize,
    bos: Option<u32>,
) -> (Vec<u32>, Vec<BatchToken>) {
    let mut chunk = tokens[c * ctx..(c + 1) * ctx].to_vec();
    if let Some(b) = bos {
        chunk[0] = b;
    }
    let first = ctx / 2;
    let batch = chunk
        .iter()
        .enumerate()
        .map(|(pos, &token)| BatchToken {
            token,
            seq: 0,
            pos,
            logits: pos >= first && pos + 1 < ctx,
        })
        .collect();
    (chunk, batch)
}

/// [`perplexity`] of the model with a LoRA adapter applied.
pub fn perplexity_with(
    model: &Model,
    adapter: Option<&Adapter>,
    tokens: &[u32],
    ctx: usize,
    chunks: usize,
    bos: Option<u32>,
    progress: &mut dyn FnMut(usize, f64),
) -> Result<Perplexity, ForwardError> {
    let rows: Vec<Option<&Adapter>> = match adapter {
        Some(a) => vec![Some(a); ctx],
        None => Vec::new(),
    };
    let n_chunks = chunks.min(tokens.len() / ctx.max(2));
    let first = ctx / 2;
    let mut nll = 0f64;
    let mut count = 0usize;
    let mut s = Scratch::default();
    let mut kv = model.new_cache(ctx);
    for c in 0..n_chunks {
        let (chunk, batch) = scored_window(tokens, c, ctx, bos);
        kv.truncate(0);
        model.forward_lora(&batch, &rows, &mut [&mut kv], &mut s)?;
        let v = model.cfg.vocab;
        for (j, pos) in (first..ctx - 1).enumerate() {
            let lp = log_softmax(&s.logits[j * v..(j + 1) * v]);
            nll -= lp[chunk[pos + 1] as usize] as f64;
            count += 1;
        }
        progress(c + 1, (nll / count as f64).exp());
    }
    Ok(Perplexity {
        ppl: (nll / count.max(1) as f64).exp(),
        nll,
        scored_tokens: count,
        chunks: n_chunks,
    })
}

/// How far a model (`quant`) is from a reference (`base`) on the same text: the statistics
/// `llama-perplexity --kl-divergence` prints, computed the same way over the same windows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Comparison {
    pub ppl_base: f64,
    pub ppl: f64,
    /// exp(mean ln(PPL(Q)/PPL(base))) = ppl / ppl_base.
    pub ppl_ratio: f64,
    pub mean_kld: f64,
    pub max_kld: f64,
    pub kld_p999: f64,
    pub kld_p99: f64,
    pub kld_p95: f64,
    pub kld_p90: f64,
    pub kld_median: f64,
    /// Mean of p_quant(next token) − p_base(next token).
    pub mean_dp: f64,
    /// Root mean square of that difference.
    pub rms_dp: f64,
    /// Share of positions where both models' most likely token is the same.
    pub same_top1: f64,
    pub scored_tokens: usize,
    pub chunks: usize,
}

/// Linear interpolation between the sorted values around `fraction` (llama.cpp's definition).
fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let p = fraction.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let i = p as usize;
    let w = p - i as f64;
    (1.0 - w) * sorted[i] + w * sorted[(i + 1).min(sorted.len() - 1)]
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    match n {
        0 => f64::NAN,
        _ if n.is_multiple_of(2) => 0.5 * (sorted[n / 2] + sorted[n / 2 - 1]),
        _ => sorted[n / 2],
    }
}

/// Per-token statistics of one scored position, from the two models' log-probabilities.
struct TokenStats {
    nll_base: f64,
    nll: f64,
    kld: f64,
    same_top: bool,
}

fn token_stats(base: &[f32], quant: &[f32], next: usize) -> TokenStats {
    // As llama.cpp: base log-probabilities at or below -16 add nothing (e^-16 ≈ 1e-7).
    let mut kld = 0f64;
    for (&b, &q) in base.iter().zip(quant) {
        if b > -16.0 {
            kld += f64::from(b).exp() * f64::from(b - q);
        }
    }
    TokenStats {
        nll_base: -f64::from(base[next]),
        nll: -f64::from(quant[next]),
        kld,
        same_top: argmax(base) == argmax(quant),
    }
}

/// Compares `quant` with `base` over `chunks` windows of `ctx` tokens (the second half of each
/// scored, as [`perplexity`]). The models must share a vocabulary.
pub fn compare(
    base: &Model,
    quant: &Model,
    tokens: &[u32],
    ctx: usize,
    chunks: usize,
    bos: Option<u32>,
    progress: &mut dyn FnMut(usize, f64),
) -> Result<Comparison, ForwardError> {
    let v = base.cfg.vocab;
    let n_chunks = chunks.min(tokens.len() / ctx.max(2));
    let first = ctx / 2;
    let mut stats = Vec::new();
    let mut s = Scratch::default();
    let (mut kv_b, mut kv_q) = (base.new_cache(ctx), quant.new_cache(ctx));
    for c in 0..n_chunks {
        let (chunk, batch) = scored_window(tokens, c, ctx, bos);
        kv_b.truncate(0);
        base.forward(&batch, &mut [&mut kv_b], &mut s)?;
        let base_lp: Vec<Vec<f32>> = (first..ctx - 1)
            .enumerate()
            .map(|(j, _)| log_softmax(&s.logits[j * v..(j + 1) * v]))
            .collect();
        kv_q.truncate(0);
        quant.forward(&batch, &mut [&mut kv_q], &mut s)?;
        for (j, pos) in (first..ctx - 1).enumerate() {
            let q = log_softmax(&s.logits[j * v..(j + 1) * v]);
            stats.push(token_stats(&base_lp[j], &q, chunk[pos + 1] as usize));
        }
        let kld = stats.iter().map(|t| t.kld).sum::<f64>() / stats.len() as f64;
        progress(c + 1, kld);
    }
    let n = stats.len().max(1) as f64;
    let mean = |f: &dyn Fn(&TokenStats) -> f64| stats.iter().map(f).sum::<f64>() / n;
    let (nll_b, nll_q) = (mean(&|t| t.nll_base), mean(&|t| t.nll));
    let dp = |t: &TokenStats| (-t.nll).exp() - (-t.nll_base).exp();
    let mut klds: Vec<f64> = stats.iter().map(|t| t.kld).collect();
    klds.sort_by(f64::total_cmp);
    Ok(Comparison {
        ppl_base: nll_b.exp(),
        ppl: nll_q.exp(),
        ppl_ratio: (nll_q - nll_b).exp(),
        mean_kld: mean(&|t| t.kld),
        max_kld: klds.last().copied().unwrap_or(f64::NAN),
        kld_p999: percentile(&klds, 0.999),
        kld_p99: percentile(&klds, 0.99),
        kld_p95: percentile(&klds, 0.95),
        kld_p90: percentile(&klds, 0.90),
        kld_median: median(&klds),
        mean_dp: mean(&dp),
        rms_dp: mean(&|t| dp(t).powi(2)).sqrt(),
        same_top1: mean(&|t| f64::from(u8::from(t.same_top))),
        scored_tokens: stats.len(),
        chunks: n_chunks,
    })
}

/// Residual streams recorded by [`Reference::record`], one per window.
pub struct States(Vec<Vec<f32>>);

/// A reference model's log-probabilities over the scored positions of some windows, kept so
/// that many variants of another model can be scored against it (per-tensor sensitivity).
pub struct Reference {
    windows: Vec<(Vec<u32>, Vec<BatchToken>)>,
    ctx: usize,
    lp: Vec<Vec<f32>>,
}

impl Reference {
    pub fn new(
        model: &Model,
        tokens: &[u32],
        ctx: usize,
        chunks: usize,
        bos: Option<u32>,
    ) -> Result<Self, ForwardError> {
        let v = model.cfg.vocab;
        let n_chunks = chunks.min(tokens.len() / ctx.max(2));
        let mut s = Scratch::default();
        let mut kv = model.new_cache(ctx);
        let (mut windows, mut lp) = (Vec::new(), Vec::new());
        for c in 0..n_chunks {
            let w = scored_window(tokens, c, ctx, bos);
            kv.truncate(0);
            model.forward(&w.1, &mut [&mut kv], &mut s)?;
            let scored = ctx - 1 - ctx / 2;
            lp.extend((0..scored).map(|j| log_softmax(&s.logits[j * v..(j + 1) * v])));
            windows.push(w);
        }
        Ok(Self { windows, ctx, lp })
    }

    /// Scored positions.
    pub fn len(&self) -> usize {
        self.lp.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lp.is_empty()
    }

    /// Mean KL divergence of `model` from the reference over the same positions.
    pub fn mean_kld(&self, model: &Model) -> Result<f64, ForwardError> {
        self.kld_tapped(model, None)
    }

    /// `model`'s residual stream over each window at every layer's entry
    /// ([`Model::forward_recording`]), for [`Reference::mean_kld_from`].
    pub fn record(&self, model: &Model) -> Result<States, ForwardError> {
        let mut s = Scratch::default();
        let mut kv = model.new_cache(self.ctx);
        let mut out = Vec::with_capacity(self.windows.len());
        for (_, batch) in &self.windows {
            kv.truncate(0);
            let mut st = Vec::new();
            model.forward_recording(batch, &mut [&mut kv], &mut s, &mut st)?;
            out.push(st);
        }
        Ok(States(out))
    }

    /// [`Reference::mean_kld`] of a model that differs from the one `states` were recorded on only
    /// from `layer` on ([`Model::resume_at`] of the changed matrix): the layers before are not
    /// run again. Same result, bit for bit.
    pub fn mean_kld_from(
        &self,
        model: &Model,
        states: &States,
        layer: usize,
    ) -> Result<f64, ForwardError> {
        self.kld_tapped(model, Some((states, layer)))
    }

    fn kld_tapped(
        &self,
        model: &Model,
        from: Option<(&States, usize)>,
    ) -> Result<f64, ForwardError> {
        let v = model.cfg.vocab;
        let mut s = Scratch::default();
        let mut kv = model.new_cache(self.ctx);
        let (mut sum, mut i) = (0f64, 0usize);
        for (w, (chunk, batch)) in self.windows.iter().enumerate() {
            kv.truncate(0);
            match from {
                Some((st, layer)) => {
                    let x = st.0.get(w).ok_or(ForwardError::BadResume {
                        layer,
                        layers: model.cfg.n_layer,
                    })?;
                    model.forward_from(batch, &mut [&mut kv], &mut s, layer, x)?
                }
                None => model.forward(batch, &mut [&mut kv], &mut s)?,
            }
            for (j, pos) in (self.ctx / 2..self.ctx - 1).enumerate() {
                let q = log_softmax(&s.logits[j * v..(j + 1) * v]);
                sum += token_stats(&self.lp[i], &q, chunk[pos + 1] as usize).kld;
                i += 1;
            }
        }
        Ok(sum / i.max(1) as f64)
    }
}

/// Runs one window from a fresh cache with logits at every position (left in `s.logits`).
fn forward_all(model: &Model, ids: &[u32], s: &mut Scratch) -> Result<(), ForwardError> {
    let mut kv = model.new_cache(ids.len());
    let batch: Vec<BatchToken> = ids
        .iter()
        .enumerate()
        .map(|(pos, &token)| BatchToken {
            token,
            seq: 0,
            pos,
            logits: true,
        })
        .collect();
    model.forward(&batch, &mut [&mut kv], s)
}

/// The model's most likely next token after every prefix of `ids` (one window, fresh cache).
pub fn argmax_at_each_position(model: &Model, ids: &[u32]) -> Result<Vec<u32>, ForwardError> {
    let mut s = Scratch::default();
    forward_all(model, ids, &mut s)?;
    let v = model.cfg.vocab;
    Ok((0..ids.len())
        .map(|i| argmax(&s.logits[i * v..(i + 1) * v]))
        .collect())
}

/// Compares our next-token choice with a reference's at every position of one window. Where the two
/// disagree, `gaps` holds how far (in logits, by our model) the reference's choice is behind ours: a
/// small gap means a near-tie that float summation order can flip.
#[derive(Debug, Clone, Default)]
pub struct Top1 {
    pub agree: usize,
    pub total: usize,
    pub gaps: Vec<f32>,
}

pub fn top1_against(model: &Model, ids: &[u32], reference: &[u32]) -> Result<Top1, ForwardError> {
    let mut s = Scratch::default();
    forward_all(model, ids, &mut s)?;
    let v = model.cfg.vocab;
    let mut r = Top1::default();
    for (i, &want) in reference.iter().enumerate().take(ids.len()) {
        let row = &s.logits[i * v..(i + 1) * v];
        let ours = argmax(row);
        r.total += 1;
        if ours == want {
            r.agree += 1;
        } else {
            r.gaps.push(
                row[ours as usize] - row.get(want as usize).copied().unwrap_or(f32::NEG_INFINITY),
            );
        }
    }
    Ok(r)
}

/// Greedy continuation of `prompt` for `n` tokens, as raw ids (no stop conditions).
pub fn greedy_ids(model: &Model, prompt: &[u32], n: usize) -> Result<Vec<u32>, ForwardError> {
    let mut s = Scratch::default();
    let mut kv = model.new_cache(prompt.len() + n + 1);
    let mut logits = crate::generate::prefill(model, prompt, &mut kv, &mut s, 512)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = argmax(&logits);
        out.push(t);
        let pos = kv.len();
        model.forward(
            &[BatchToken {
                token: t,
                seq: 0,
                pos,
                logits: true,
            }],
            &mut [&mut kv],
            &mut s,
        )?;
        logits.copy_from_slice(&s.logits[..model.cfg.vocab]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_as_llama_cpp() {
        let v = [0.0, 1.0, 2.0, 3.0];
        assert_eq!(percentile(&v, 0.5), 1.5);
        assert!((percentile(&v, 0.99) - 2.97).abs() < 1e-12);
        assert_eq!(percentile(&v, 1.0), 3.0);
        assert_eq!(median(&v), 1.5);
        assert_eq!(median(&v[..3]), 1.0);
    }

    #[test]
    fn kld_is_zero_for_equal_distributions_and_the_textbook_value_otherwise() {
        let p = log_softmax(&[1.0, 2.0, 0.5]);
        let t = token_stats(&p, &p, 1);
        assert!(t.kld.abs() < 1e-12 && t.same_top);
        // KL([0.5, 0.5] || [0.9, 0.1]) = 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1) = 0.5108256…
        let b = [0.5f32.ln(), 0.5f32.ln()];
        let q = [0.9f32.ln(), 0.1f32.ln()];
        let t = token_stats(&b, &q, 0);
        assert!((t.kld - 0.510_825_6).abs() < 1e-6, "{}", t.kld);
        assert!((t.nll - -(0.9f64.ln())).abs() < 1e-6);
    }
}
