//! A BERT sentence encoder in f32 (MiniLM-L6 from the catalog: 6 layers, hidden 384, 12 heads), read
//! from a sentence-transformers folder: `model.safetensors`, `config.json`, `tokenizer.json`,
//! `sentence_bert_config.json` (max_seq_length) and `1_Pooling/config.json` (mean pooling). The
//! sentence vector is the mean of the last hidden states over the tokens, L2-normalised.
//!
//! Weights are copied out of the file once, except the word embeddings (30522×384), whose rows are read
//! from the memory map as needed.

use std::path::Path;

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::wordpiece::{WordPiece, WordPieceError};

#[derive(Debug, thiserror::Error)]
pub enum BertError {
    #[error("{path}: {why}")]
    Io { path: String, why: String },
    #[error("model.safetensors: {0}")]
    SafeTensors(String),
    #[error("model.safetensors: tensor `{name}` {why}")]
    Tensor { name: String, why: String },
    #[error("config: {0}")]
    Config(String),
    #[error(transparent)]
    Tokenizer(#[from] WordPieceError),
}

#[derive(Debug, Clone)]
pub struct BertConfig {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub max_positions: usize,
    pub eps: f32,
    /// Tokens per input at most, [CLS] and [SEP] included (longer inputs are truncated).
    pub max_seq: usize,
}

struct Linear {
    /// [out][in]
    w: Vec<f32>,
    b: Vec<f32>,
    n_in: usize,
}

impl Linear {
    /// y[t][out] = x[t][in] · Wᵀ + b for `n` tokens.
    fn forward(&self, x: &[f32], n: usize, y: &mut Vec<f32>) {
        let out = self.b.len();
        y.clear();
        for _ in 0..n {
            y.extend_from_slice(&self.b);
        }
        // A cache-blocked GEMM: the weights are read once per block of tokens, not once per token.
        sgemm(
            n, self.n_in, out, x, self.n_in, 1, &self.w, 1, self.n_in, y, out, 1.0,
        );
    }
}

struct LayerNorm {
    w: Vec<f32>,
    b: Vec<f32>,
}

impl LayerNorm {
    fn apply(&self, x: &mut [f32], eps: f32) {
        for row in x.chunks_exact_mut(self.w.len()) {
            let n = row.len() as f32;
            let mean = row.iter().sum::<f32>() / n;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
            let inv = 1.0 / (var + eps).sqrt();
            for ((v, w), b) in row.iter_mut().zip(&self.w).zip(&self.b) {
                *v = (*v - mean) * inv * w + b;
            }
        }
    }
}

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln1: LayerNorm,
    up: Linear,
    down: Linear,
    ln2: LayerNorm,
}

pub struct BertEncoder {
    pub cfg: BertConfig,
    pub tokenizer: WordPiece,
    map: Mmap,
    /// Byte offset of the word-embedding table in `map`.
    word_emb_at: usize,
    vocab: usize,
    pos_emb: Vec<f32>,
    type_emb: Vec<f32>,
    emb_ln: LayerNorm,
    layers: Vec<Layer>,
}

/// One sentence vector and the number of tokens it was computed from.
pub struct Embedding {
    pub vector: Vec<f32>,
    pub tokens: usize,
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> BertError {
    BertError::Io {
        path: path.display().to_string(),
        why: e.to_string(),
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value, BertError> {
    let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    serde_json::from_str(&text).map_err(|e| io_err(path, e))
}

impl BertEncoder {
    /// Opens a sentence-transformers folder. Anything unexpected (another pooling, a missing tensor, a
    /// dtype other than F32) is an error naming what is wrong.
    pub fn open(dir: &Path) -> Result<Self, BertError> {
        let c = read_json(&dir.join("config.json"))?;
        let get = |k: &str| {
            c[k].as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| BertError::Config(format!("config.json has no integer `{k}`")))
        };
        if c["hidden_act"].as_str().unwrap_or("gelu") != "gelu" {
            return Err(BertError::Config(format!(
                "hidden_act `{}` is not supported (gelu only)",
                c["hidden_act"]
            )));
        }
        let pooling = dir.join("1_Pooling/config.json");
        if pooling.exists() {
            let p = read_json(&pooling)?;
            if p["pooling_mode_mean_tokens"].as_bool() != Some(true)
                || p["pooling_mode_cls_token"].as_bool() == Some(true)
                || p["pooling_mode_max_tokens"].as_bool() == Some(true)
            {
                return Err(BertError::Config(
                    "1_Pooling/config.json: only mean pooling is supported".into(),
                ));
            }
        }
        let max_positions = get("max_position_embeddings")?;
        let sb = dir.join("sentence_bert_config.json");
        let max_seq = if sb.exists() {
            read_json(&sb)?["max_seq_length"]
                .as_u64()
                .map_or(max_positions, |v| v as usize)
        } else {
            max_positions
        }
        .min(max_positions);
        let cfg = BertConfig {
            hidden: get("hidden_size")?,
            layers: get("num_hidden_layers")?,
            heads: get("num_attention_heads")?,
            intermediate: get("intermediate_size")?,
            max_positions,
            eps: c["layer_norm_eps"].as_f64().unwrap_or(1e-12) as f32,
            max_seq,
        };
        if cfg.heads == 0 || !cfg.hidden.is_multiple_of(cfg.heads) {
            return Err(BertError::Config(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                cfg.hidden, cfg.heads
            )));
        }
        let tokenizer = WordPiece::from_file(&dir.join("tokenizer.json"))?;

        let path = dir.join("model.safetensors");
        let file = std::fs::File::open(&path).map_err(|e| io_err(&path, e))?;
        // SAFETY: the cache file is not modified while mapped (the cache only ever replaces files).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| io_err(&path, e))?;
        let (word_emb_at, vocab, weights) = {
            let st = SafeTensors::deserialize(&map)
                .map_err(|e| BertError::SafeTensors(e.to_string()))?;
            let h = cfg.hidden;
            let tensor = |name: &str, shape: &[usize]| -> Result<Vec<f32>, BertError> {
                let t = find(&st, name)?;
                check(name, &t, shape)?;
                Ok(t.data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect())
            };
            let linear = |name: &str, n_out: usize, n_in: usize| -> Result<Linear, BertError> {
                Ok(Linear {
                    w: tensor(&format!("{name}.weight"), &[n_out, n_in])?,
                    b: tensor(&format!("{name}.bias"), &[n_out])?,
                    n_in,
                })
            };
            let norm = |name: &str| -> Result<LayerNorm, BertError> {
                Ok(LayerNorm {
                    w: tensor(&format!("{name}.weight"), &[h])?,
                    b: tensor(&format!("{name}.bias"), &[h])?,
                })
            };
            let we_name = "embeddings.word_embeddings.weight";
            let we = find(&st, we_name)?;
            let vocab = we.shape().first().copied().unwrap_or(0);
            check(we_name, &we, &[vocab, h])?;
            let at = we.data().as_ptr() as usize - map.as_ptr() as usize;
            let mut layers = Vec::with_capacity(cfg.layers);
            for i in 0..cfg.layers {
                let p = format!("encoder.layer.{i}");
                layers.push(Layer {
                    q: linear(&format!("{p}.attention.self.query"), h, h)?,
                    k: linear(&format!("{p}.attention.self.key"), h, h)?,
                    v: linear(&format!("{p}.attention.self.value"), h, h)?,
                    o: linear(&format!("{p}.attention.output.dense"), h, h)?,
                    ln1: norm(&format!("{p}.attention.output.LayerNorm"))?,
                    up: linear(&format!("{p}.intermediate.dense"), cfg.intermediate, h)?,
                    down: linear(&format!("{p}.output.dense"), h, cfg.intermediate)?,
                    ln2: norm(&format!("{p}.output.LayerNorm"))?,
                });
            }
            let pos = tensor("embeddings.position_embeddings.weight", &[max_positions, h])?;
            let types = find(&st, "embeddings.token_type_embeddings.weight")?;
            let n_types = types.shape().first().copied().unwrap_or(0).max(1);
            let typ = tensor("embeddings.token_type_embeddings.weight", &[n_types, h])?;
            let emb_ln = norm("embeddings.LayerNorm")?;
            (at, vocab, (pos, typ, emb_ln, layers))
        };
        let (pos_emb, type_emb, emb_ln, layers) = weights;
        if [tokenizer.cls, tokenizer.sep]
            .iter()
            .any(|&t| t as usize >= vocab)
        {
            return Err(BertError::Config(
                "tokenizer ids exceed the embedding table".into(),
            ));
        }
        Ok(Self {
            cfg,
            tokenizer,
            map,
            word_emb_at,
            vocab,
            pos_emb,
            type_emb,
            emb_ln,
            layers,
        })
    }

    pub fn dim(&self) -> usize {
        self.cfg.hidden
    }

    /// Token ids fed to the encoder: [CLS] text [SEP], truncated to `max_seq`.
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        let mut ids = vec![self.tokenizer.cls];
        let body = self.tokenizer.encode(text);
        let room = self.cfg.max_seq.saturating_sub(2);
        ids.extend(body.iter().take(room).copied());
        ids.push(self.tokenizer.sep);
        ids
    }

    /// The L2-normalised mean-pooled sentence vector of `text`.
    pub fn embed(&self, text: &str) -> Embedding {
        let ids = self.tokenize(text);
        let vector = self.embed_ids(&ids);
        Embedding {
            vector,
            tokens: ids.len(),
        }
    }

    fn word_row(&self, id: u32, out: &mut [f32]) {
        let h = self.cfg.hidden;
        let id = (id as usize).min(self.vocab - 1);
        let at = self.word_emb_at + id * h * 4;
        for (o, b) in out.iter_mut().zip(self.map[at..at + h * 4].chunks_exact(4)) {
            *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
    }

    /// Runs the encoder over `ids` (one sequence, no padding) and pools.
    pub fn embed_ids(&self, ids: &[u32]) -> Vec<f32> {
        let c = &self.cfg;
        let (h, n) = (c.hidden, ids.len().min(c.max_positions));
        let hd = h / c.heads;
        // x: [n][h] hidden states.
        let mut x = vec![0f32; n * h];
        for (t, &id) in ids[..n].iter().enumerate() {
            let row = &mut x[t * h..(t + 1) * h];
            self.word_row(id, row);
            for ((v, p), ty) in row
                .iter_mut()
                .zip(&self.pos_emb[t * h..(t + 1) * h])
                .zip(&self.type_emb[..h])
            {
                *v += p + ty;
            }
        }
        self.emb_ln.apply(&mut x, c.eps);
        let (mut q, mut k, mut v, mut ctx, mut tmp, mut ff) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            vec![0f32; n * h],
            Vec::new(),
            Vec::new(),
        );
        let mut scores = vec![0f32; n * n];
        let scale = 1.0 / (hd as f32).sqrt();
        for l in &self.layers {
            l.q.forward(&x, n, &mut q);
            l.k.forward(&x, n, &mut k);
            l.v.forward(&x, n, &mut v);
            // Bidirectional attention per head: ctx[t][head] = softmax(q·kᵀ/√d) · v, as two GEMMs.
            for head in 0..c.heads {
                let off = head * hd;
                scores.fill(0.0);
                // scores[t][j] = q_t · k_j (k read transposed through its strides).
                sgemm(
                    n,
                    hd,
                    n,
                    &q[off..],
                    h,
                    1,
                    &k[off..],
                    1,
                    h,
                    &mut scores,
                    n,
                    scale,
                );
                for row in scores.chunks_exact_mut(n) {
                    let mx = row.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                    let mut sum = 0.0;
                    for s in row.iter_mut() {
                        *s = (*s - mx).exp();
                        sum += *s;
                    }
                    row.iter_mut().for_each(|s| *s /= sum);
                }
                for t in 0..n {
                    ctx[t * h + off..t * h + off + hd].fill(0.0);
                }
                sgemm(
                    n,
                    n,
                    hd,
                    &scores,
                    n,
                    1,
                    &v[off..],
                    h,
                    1,
                    &mut ctx[off..],
                    h,
                    1.0,
                );
            }
            l.o.forward(&ctx, n, &mut tmp);
            x.iter_mut().zip(&tmp).for_each(|(a, b)| *a += b);
            l.ln1.apply(&mut x, c.eps);
            l.up.forward(&x, n, &mut ff);
            ff.iter_mut().for_each(|g| *g = gelu_erf(*g));
            l.down.forward(&ff, n, &mut tmp);
            x.iter_mut().zip(&tmp).for_each(|(a, b)| *a += b);
            l.ln2.apply(&mut x, c.eps);
        }
        let mut pooled = vec![0f32; h];
        for row in x.chunks_exact(h) {
            pooled.iter_mut().zip(row).for_each(|(p, v)| *p += v);
        }
        let norm = pooled.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        pooled.iter_mut().for_each(|v| *v /= norm);
        pooled
    }
}

/// C[m][n] += alpha · A[m][k] · B[k][n], each matrix given by its row and column strides.
#[allow(clippy::too_many_arguments)]
fn sgemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    rsa: usize,
    csa: usize,
    b: &[f32],
    rsb: usize,
    csb: usize,
    c: &mut [f32],
    rsc: usize,
    alpha: f32,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    // The last element each operand addresses must be in bounds (checked once; the kernel trusts it).
    assert!((m - 1) * rsa + (k - 1) * csa < a.len());
    assert!((k - 1) * rsb + (n - 1) * csb < b.len());
    assert!((m - 1) * rsc + n - 1 < c.len());
    // SAFETY: the asserts above bound every index the GEMM touches; C does not alias A or B.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            rsa as isize,
            csa as isize,
            b.as_ptr(),
            rsb as isize,
            csb as isize,
            1.0,
            c.as_mut_ptr(),
            rsc as isize,
            1,
        );
    }
}

fn find<'a>(
    st: &'a SafeTensors<'a>,
    name: &str,
) -> Result<safetensors::tensor::TensorView<'a>, BertError> {
    st.tensor(name).map_err(|_| BertError::Tensor {
        name: name.into(),
        why: "is missing".into(),
    })
}

fn check(
    name: &str,
    t: &safetensors::tensor::TensorView<'_>,
    shape: &[usize],
) -> Result<(), BertError> {
    if t.dtype() != Dtype::F32 {
        return Err(BertError::Tensor {
            name: name.into(),
            why: format!("has dtype {:?}; only F32 is supported", t.dtype()),
        });
    }
    if t.shape() != shape {
        return Err(BertError::Tensor {
            name: name.into(),
            why: format!("has shape {:?}, expected {shape:?}", t.shape()),
        });
    }
    Ok(())
}

/// GELU with the exact erf (BERT's `gelu`).
fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x / std::f32::consts::SQRT_2))
}

/// erf to about 1e-7 (Abramowitz & Stegun 7.1.26 is 1.5e-7; computed in f64).
fn erf(x: f32) -> f32 {
    let x = x as f64;
    let s = x.signum();
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.3275911 * a);
    let y = 1.0
        - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t
            + 0.254829592)
            * t
            * (-a * a).exp();
    (s * y) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_known_values() {
        for (x, want) in [
            (0.0f32, 0.0f32),
            (0.5, 0.520_499_9),
            (1.0, 0.842_700_8),
            (-2.0, -0.995_322_3),
        ] {
            assert!((erf(x) - want).abs() < 2e-6, "erf({x}) = {}", erf(x));
        }
    }

    /// The GEMM wrapper against a naive triple loop, with transposed and strided operands as the
    /// attention uses them (a head's slice of q, k read transposed, the output into a wider row).
    #[test]
    fn sgemm_matches_naive_products_with_strides() {
        let (m, k, n, h) = (5usize, 7usize, 3usize, 11usize);
        let a: Vec<f32> = (0..m * h).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..n * h).map(|i| (i as f32 * 0.91).cos()).collect();
        let mut c = vec![1.0f32; m * h];
        // c[i][2 + j] += 0.5 * sum_p a[i][1 + p] * b[j][1 + p]  (b read transposed)
        sgemm(m, k, n, &a[1..], h, 1, &b[1..], 1, h, &mut c[2..], h, 0.5);
        for i in 0..m {
            for j in 0..n {
                let want: f32 = 1.0
                    + 0.5
                        * (0..k)
                            .map(|p| a[i * h + 1 + p] * b[j * h + 1 + p])
                            .sum::<f32>();
                assert!((c[i * h + 2 + j] - want).abs() < 1e-5, "{i},{j}");
            }
            assert_eq!(c[i * h], 1.0);
        }
    }
}
