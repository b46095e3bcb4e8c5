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
        let mut chunk = tokens[c * ctx..(c + 1) * ctx].to_vec();
        if let Some(b) = bos {
            chunk[0] = b;
        }
        kv.truncate(0);
        let batch: Vec<BatchToken> = chunk
            .iter()
            .enumerate()
            .map(|(pos, &token)| BatchToken {
                token,
                seq: 0,
                pos,
                logits: pos >= first && pos + 1 < ctx,
            })
            .collect();
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
