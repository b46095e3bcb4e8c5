//! The frozen base model as training reads it: each matrix stays as stored (quantized rows in the
//! GGUF mapping) and is dequantized a tile of rows at a time, inside the product that needs it, so no
//! full-precision copy of the model is ever held. Tiny dense models (random weights) serve the
//! gradient checks.

use std::sync::Arc;

use porteiro_engine::lora::Proj;
use porteiro_engine::model::{self, matrix_info, Arch, Config, ModelError};
use porteiro_engine::quant;
use porteiro_models::gguf::{GgufFile, TensorInfo};

use crate::real::{gemm, par_map, part, rm, tr, Real};
use crate::TrainError;

/// Rows of a matrix dequantized at once: big enough for an efficient product, small enough to stay
/// in cache next to the activations.
const TILE: usize = 128;
/// Largest dequantized tile of the forward product (4 Mi floats: 16 MiB in f32).
const MAX_TILE_FLOATS: usize = 4 << 20;

enum Src {
    Quant {
        file: Arc<GgufFile>,
        info: TensorInfo,
        row_bytes: usize,
    },
    Dense(Vec<f32>),
}

/// A `rows x cols` weight matrix (`rows` outputs).
pub struct Linear {
    pub rows: usize,
    pub cols: usize,
    src: Src,
}

impl Linear {
    fn quant(
        file: &Arc<GgufFile>,
        name: &str,
        cols: usize,
        rows: usize,
    ) -> Result<Self, TrainError> {
        let t = matrix_info(file, name, cols, rows).map_err(model_err)?;
        let (bs, ts) = t
            .dtype
            .block_layout()
            .filter(|_| quant::act_type(t.dtype).is_some())
            .ok_or_else(|| {
                TrainError::Model(format!(
                    "tensor `{name}`: type {} is not supported",
                    t.dtype.name()
                ))
            })?;
        Ok(Self {
            rows,
            cols,
            src: Src::Quant {
                file: file.clone(),
                info: t.clone(),
                row_bytes: cols / bs * ts,
            },
        })
    }

    pub fn dense(rows: usize, cols: usize, w: Vec<f32>) -> Self {
        assert_eq!(w.len(), rows * cols);
        Self {
            rows,
            cols,
            src: Src::Dense(w),
        }
    }

    /// Rows `r0..r1` as `R`, row-major, into `out`.
    pub fn rows_into<R: Real>(&self, r0: usize, r1: usize, out: &mut Vec<R>) {
        out.clear();
        match &self.src {
            Src::Dense(w) => {
                out.extend(w[r0 * self.cols..r1 * self.cols].iter().map(|&v| R::of(v)))
            }
            Src::Quant {
                file,
                info,
                row_bytes,
            } => {
                let data = file.data(info);
                let mut row = vec![0f32; self.cols];
                for r in r0..r1 {
                    quant::dequantize_row(
                        info.dtype,
                        &data[r * row_bytes..(r + 1) * row_bytes],
                        &mut row,
                    );
                    out.extend(row.iter().map(|&v| R::of(v)));
                }
            }
        }
    }

    /// y (n x rows) = x (n x cols) · Wᵀ. One large tile per thread: every product call packs x
    /// again, so few calls (measured: packing was 15% of a training step with 128-row tiles).
    pub fn forward<R: Real>(&self, x: &[R], n: usize, threads: usize) -> Vec<R> {
        let (rows, cols) = (self.rows, self.cols);
        let tile = rows
            .div_ceil(threads.max(1))
            .clamp(TILE, (MAX_TILE_FLOATS / cols.max(1)).max(TILE));
        let tiles = rows.div_ceil(tile);
        let parts = par_map(threads, tiles, |t| {
            let (r0, r1) = (t * tile, ((t + 1) * tile).min(rows));
            let mut w = Vec::new();
            self.rows_into(r0, r1, &mut w);
            let mut y = vec![R::zero(); n * (r1 - r0)];
            gemm(
                n,
                cols,
                r1 - r0,
                R::one(),
                rm(x, cols),
                tr(&w, cols),
                R::zero(),
                &mut y,
                r1 - r0,
            );
            y
        });
        let mut y = vec![R::zero(); n * rows];
        for (t, part) in parts.iter().enumerate() {
            let (r0, r1) = (t * tile, ((t + 1) * tile).min(rows));
            for i in 0..n {
                y[i * rows + r0..i * rows + r1]
                    .copy_from_slice(&part[i * (r1 - r0)..(i + 1) * (r1 - r0)]);
            }
        }
        y
    }

    /// dx (n x cols) += dy (n x rows) · W.
    pub fn backward<R: Real>(&self, dy: &[R], n: usize, dx: &mut [R], threads: usize) {
        let (rows, cols) = (self.rows, self.cols);
        let tiles = rows.div_ceil(TILE);
        let threads = threads.clamp(1, tiles.max(1));
        let partials = par_map(threads, threads, |p| {
            let mut acc = vec![R::zero(); n * cols];
            let mut w = Vec::new();
            for t in part(tiles, p, threads) {
                let (r0, r1) = (t * TILE, ((t + 1) * TILE).min(rows));
                self.rows_into(r0, r1, &mut w);
                let a = crate::real::View {
                    data: &dy[r0..],
                    rs: rows,
                    cs: 1,
                };
                gemm(
                    n,
                    r1 - r0,
                    cols,
                    R::one(),
                    a,
                    rm(&w, cols),
                    R::one(),
                    &mut acc,
                    cols,
                );
            }
            acc
        });
        for p in partials {
            dx.iter_mut().zip(p).for_each(|(d, v)| *d += v);
        }
    }
}

/// One transformer block's frozen weights.
pub struct Block {
    pub attn_norm: Vec<f32>,
    pub mats: [Linear; 7],
    pub bq: Option<Vec<f32>>,
    pub bk: Option<Vec<f32>>,
    pub bv: Option<Vec<f32>>,
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    pub post_attn_norm: Option<Vec<f32>>,
    pub ffn_norm: Vec<f32>,
    pub post_ffn_norm: Option<Vec<f32>>,
}

impl Block {
    pub fn mat(&self, p: Proj) -> &Linear {
        &self.mats[p.index()]
    }
}

/// The whole frozen model.
pub struct Base {
    pub cfg: Config,
    pub tok_embd: Linear,
    pub output: Linear,
    pub output_norm: Vec<f32>,
    pub blocks: Vec<Block>,
}

fn model_err(e: ModelError) -> TrainError {
    TrainError::Model(e.to_string())
}

fn vec_f32(file: &GgufFile, name: &str, len: usize) -> Result<Vec<f32>, TrainError> {
    model::vec_f32(file, name, len).map_err(model_err)
}

fn opt_vec(file: &GgufFile, name: &str, len: usize) -> Result<Option<Vec<f32>>, TrainError> {
    model::opt_vec(file, name, len).map_err(model_err)
}

impl Base {
    pub fn from_gguf(file: Arc<GgufFile>) -> Result<Self, TrainError> {
        let cfg = Config::from_gguf(&file).map_err(|e| TrainError::Model(e.to_string()))?;
        let e = cfg.n_embd;
        let tok_embd = Linear::quant(&file, "token_embd.weight", e, cfg.vocab)?;
        let out_name = if file.tensor("output.weight").is_some() {
            "output.weight"
        } else {
            "token_embd.weight"
        };
        let output = Linear::quant(&file, out_name, e, cfg.vocab)?;
        let output_norm = vec_f32(&file, "output_norm.weight", e)?;
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for l in 0..cfg.n_layer {
            let n = |s: &str| format!("blk.{l}.{s}");
            let mat = |p: Proj| {
                let (k, o) = p.dims(&cfg);
                Linear::quant(&file, &n(&format!("{}.weight", p.stem())), k, o)
            };
            let (qd, kvd, hd) = (cfg.q_dim(), cfg.kv_dim(), cfg.head_dim);
            blocks.push(Block {
                attn_norm: vec_f32(&file, &n("attn_norm.weight"), e)?,
                mats: [
                    mat(Proj::Q)?,
                    mat(Proj::K)?,
                    mat(Proj::V)?,
                    mat(Proj::O)?,
                    mat(Proj::Gate)?,
                    mat(Proj::Up)?,
                    mat(Proj::Down)?,
                ],
                bq: opt_vec(&file, &n("attn_q.bias"), qd)?,
                bk: opt_vec(&file, &n("attn_k.bias"), kvd)?,
                bv: opt_vec(&file, &n("attn_v.bias"), kvd)?,
                q_norm: opt_vec(&file, &n("attn_q_norm.weight"), hd)?,
                k_norm: opt_vec(&file, &n("attn_k_norm.weight"), hd)?,
                post_attn_norm: opt_vec(&file, &n("post_attention_norm.weight"), e)?,
                ffn_norm: vec_f32(&file, &n("ffn_norm.weight"), e)?,
                post_ffn_norm: opt_vec(&file, &n("post_ffw_norm.weight"), e)?,
            });
        }
        Ok(Self {
            cfg,
            tok_embd,
            output,
            output_norm,
            blocks,
        })
    }

    /// A tiny model of architecture `arch` with seeded random weights, every optional tensor of that
    /// architecture present (biases for qwen2; q/k norms, sandwich norms, sliding window for gemma3).
    pub fn tiny(arch: Arch, seed: u64) -> Self {
        let mut rng = porteiro_engine::sampler::Rng::new(seed);
        let mut rand = |n: usize, amp: f32| -> Vec<f32> {
            (0..n)
                .map(|_| (rng.f64() as f32 * 2.0 - 1.0) * amp)
                .collect()
        };
        let (e, n_head, n_head_kv, hd, ff, vocab, n_layer) = (16, 4, 2, 8, 24, 40, 2);
        let gemma = arch == Arch::Gemma3;
        let cfg = Config {
            arch,
            n_embd: e,
            n_layer,
            n_head,
            n_head_kv,
            head_dim: hd,
            n_ff: ff,
            vocab,
            n_ctx_train: 64,
            eps: 1e-6,
            rope_base: 10000.0,
            rope_base_swa: 100.0,
            rope_neox: arch != Arch::Llama,
            swa: gemma.then(|| (3, vec![true, false])),
            q_scale: if gemma { 1.0 / (hd as f32).sqrt() } else { 1.0 },
            kq_scale: if gemma { 1.0 } else { 1.0 / (hd as f32).sqrt() },
            embd_scale: if gemma { (e as f32).sqrt() } else { 1.0 },
            gelu: gemma,
        };
        let norm = |r: &mut dyn FnMut(usize, f32) -> Vec<f32>, n: usize| -> Vec<f32> {
            r(n, 0.3).into_iter().map(|v| 1.0 + v).collect()
        };
        let mut blocks = Vec::new();
        for _ in 0..n_layer {
            let mut mat = |p: Proj| {
                let (k, o) = p.dims(&cfg);
                Linear::dense(o, k, rand(o * k, 1.0 / (k as f32).sqrt()))
            };
            let mats = Proj::ALL.map(&mut mat);
            let qwen = arch == Arch::Qwen2;
            blocks.push(Block {
                attn_norm: norm(&mut rand, e),
                mats,
                bq: qwen.then(|| rand(cfg.q_dim(), 0.1)),
                bk: qwen.then(|| rand(cfg.kv_dim(), 0.1)),
                bv: qwen.then(|| rand(cfg.kv_dim(), 0.1)),
                q_norm: gemma.then(|| norm(&mut rand, hd)),
                k_norm: gemma.then(|| norm(&mut rand, hd)),
                post_attn_norm: gemma.then(|| norm(&mut rand, e)),
                ffn_norm: norm(&mut rand, e),
                post_ffn_norm: gemma.then(|| norm(&mut rand, e)),
            });
        }
        let tok_embd = Linear::dense(vocab, e, rand(vocab * e, 0.5));
        let output = Linear::dense(vocab, e, rand(vocab * e, 0.5));
        Self {
            output_norm: norm(&mut rand, e),
            cfg,
            tok_embd,
            output,
            blocks,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn forward_and_backward_are_the_products_with_w() {
        let (rows, cols, n) = (300, 5, 3); // more rows than a tile
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7 % 13) as f32) - 6.0)
            .collect();
        let lin = Linear::dense(rows, cols, w.clone());
        let x: Vec<f64> = (0..n * cols).map(|i| i as f64 * 0.5 - 3.0).collect();
        let y = lin.forward(&x, n, 2);
        let dy: Vec<f64> = (0..n * rows).map(|i| (i % 5) as f64 - 2.0).collect();
        let mut dx = vec![1.0; n * cols];
        lin.backward(&dy, n, &mut dx, 2);
        for i in 0..n {
            for r in 0..rows {
                let v: f64 = (0..cols)
                    .map(|c| x[i * cols + c] * w[r * cols + c] as f64)
                    .sum();
                assert_eq!(y[i * rows + r], v);
            }
            for c in 0..cols {
                let v: f64 = (0..rows)
                    .map(|r| dy[i * rows + r] * w[r * cols + c] as f64)
                    .sum();
                assert!((dx[i * cols + c] - 1.0 - v).abs() < 1e-9);
            }
        }
    }
}
