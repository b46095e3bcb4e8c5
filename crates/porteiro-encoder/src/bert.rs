//! A BERT sentence encoder in f32 (MiniLM-L6 from the catalog: 6 layers, hidden 384, 12 heads), read
//! from a sentence-transformers folder: `model.safetensors`, `config.json`, `tokenizer.json`,
//! `sentence_bert_config.json` (max_seq_length) and `1_Pooling/config.json` (mean pooling). The
//! sentence vector is the mean of the last hidden states over the tokens, L2-normalised.
//!
//! Weights are copied out of the file once, except the word embeddings (30522×384), whose rows are read
//! from the memory map as needed. On CPUs with AMX or AVX-512 BF16 the matrix products (the six linear
//! layers and both halves of attention) run in bf16 (see `bf16`), with the residual stream,
//! LayerNorm, softmax and GELU kept in f32; elsewhere an f32 GEMM does them.

// A kernel module: AVX-512 variants of the elementwise steps, the memory map, and row views
// shared by the pool's threads.
#![allow(unsafe_code)]

use std::path::Path;

use memmap2::Mmap;
use porteiro_pool::{self as pool, ThreadPool};
use safetensors::{Dtype, SafeTensors};

use std::ops::Range;
use std::sync::Mutex;

use crate::bf16::{self, Kernel, PackedA, PackedB};
use crate::int8::{self, PackedA8, PackedB8};
use crate::wordpiece::{WordPiece, WordPieceError};

/// `$wide`: the method `$body` compiled for AVX-512, so the elementwise loops inlined into it
/// (LayerNorm, softmax, GELU, residuals, operand packing) run 16 wide; the binary itself targets
/// baseline x86-64. Callers check `self.avx512` first.
macro_rules! avx512_variant {
    ($wide:ident => $body:ident ( $($arg:ident : $ty:ty),* $(,)? )) => {
        /// # Safety
        /// The CPU must have AVX-512 F/BW/VL and FMA (`self.avx512`).
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $wide(&self, $($arg: $ty),*) {
            self.$body($($arg),*)
        }
    };
}

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
    #[error("starting the worker threads: {0}")]
    Threads(std::io::Error),
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
    /// [out][in]; empty when the weights live in `packed`.
    w: Vec<f32>,
    b: Vec<f32>,
    n_in: usize,
    /// The weights packed as bf16 tiles, when the encoder runs in bf16.
    packed: Option<PackedB>,
    /// The weights as int8, when the linear layers run on VNNI.
    packed8: Option<PackedB8>,
}

impl Linear {
    /// y[t][out] = x[t][in] · Wᵀ + b for `n` tokens; `xa` is `x` packed as bf16 (used when the
    /// weights are packed, on `kernel`). `y` holds at least `n` rows of `out`; `tmp` is scratch.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        kernel: Kernel,
        x: &[f32],
        xa: &PackedA,
        xq: &PackedA8,
        n: usize,
        y: &mut [f32],
        tmp: &mut Vec<f32>,
    ) {
        let out = self.b.len();
        let y = &mut y[..n * out];
        if let Some(p8) = &self.packed8 {
            int8::gemm(xq, p8, Some(&self.b), y, out);
            return;
        }
        if let Some(pb) = &self.packed {
            let ld = pb.cols_padded();
            if ld == out && y.len() == xa.rows_padded() * out {
                bf16::gemm_with(kernel, xa, pb, y, ld);
            } else {
                grow(tmp, xa.rows_padded() * ld);
                bf16::gemm_with(kernel, xa, pb, tmp, ld);
                for (dst, src) in y.chunks_exact_mut(out).zip(tmp.chunks_exact(ld)) {
                    dst.copy_from_slice(&src[..out]);
                }
            }
            for row in y.chunks_exact_mut(out) {
                row.iter_mut().zip(&self.b).for_each(|(v, b)| *v += b);
            }
            return;
        }
        for row in y.chunks_exact_mut(out) {
            row.copy_from_slice(&self.b);
        }
        // A cache-blocked GEMM: the weights are read once per block of tokens, not once per token.
        sgemm(
            n, self.n_in, out, x, self.n_in, 1, &self.w, 1, self.n_in, y, out, 1.0,
        );
    }

    /// Packs `m` input rows (`n_in` wide) into the operand this layer's weights take: int8 or bf16
    /// (nothing for f32 weights, which read `x` itself).
    fn pack_input(&self, x: &[f32], m: usize, xa: &mut PackedA, xq: &mut PackedA8) {
        if self.packed8.is_some() {
            xq.pack(x, m, self.n_in, self.n_in);
        } else if self.packed.is_some() {
            xa.pack(x, m, self.n_in, self.n_in);
        }
    }

    /// Moves the weights into int8 columns.
    fn pack8(&mut self) {
        self.packed8 = Some(PackedB8::pack(&self.w, self.n_in, self.b.len()));
        self.w = Vec::new();
    }

    /// Moves the weights into bf16 tiles.
    fn pack(&mut self) {
        let mut pb = PackedB::default();
        pb.pack(&self.w, self.n_in, self.b.len(), self.n_in, 1);
        self.packed = Some(pb);
        self.w = Vec::new();
    }
}

struct LayerNorm {
    w: Vec<f32>,
    b: Vec<f32>,
}

impl LayerNorm {
    #[inline(always)]
    fn apply(&self, x: &mut [f32], eps: f32) {
        for row in x.chunks_exact_mut(self.w.len()) {
            let n = row.len() as f32;
            let mean = lanes_sum(row) / n;
            let var = lanes_fold(
                row,
                0.0,
                |acc, v| acc + (v - mean) * (v - mean),
                |a, b| a + b,
            ) / n;
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
    /// The bf16 kernel the matrix products run on; `None`: f32.
    kernel: Option<Kernel>,
    /// Whether the linear layers run in int8 (VNNI); attention then stays on `kernel` or f32.
    int8: bool,
    /// Whether the CPU has AVX-512 (the elementwise work then runs 16 wide).
    avx512: bool,
    /// Threads a pass is split over (by tokens), when more than one.
    pool: Option<ThreadPool>,
    /// Per-thread buffers, kept between calls (a pass holds the lock).
    scratch: Mutex<Buffers>,
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
    /// dtype other than F32) is an error naming what is wrong. Runs in bf16 where the CPU has a
    /// kernel for it (`Kernel::best`).
    pub fn open(dir: &Path) -> Result<Self, BertError> {
        Self::open_with(dir, Kernel::best(), Self::default_threads())
    }

    /// Threads a pass uses by default: all cores.
    pub fn default_threads() -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    /// `open`, choosing the bf16 kernel (`None`, or one this CPU cannot run: f32) and how many
    /// threads share a pass (split by tokens; the vectors do not depend on it). The linear layers
    /// run in int8 where the CPU has no AMX (on AVX-512 VNNI, else AVX2).
    pub fn open_with(
        dir: &Path,
        kernel: Option<Kernel>,
        threads: usize,
    ) -> Result<Self, BertError> {
        // On AMX the tiles' bf16 is both faster and closer to f32 than int8 on VNNI.
        let int8 = int8::available() && kernel != Some(Kernel::Amx);
        Self::open_opts(dir, kernel, int8, threads)
    }

    /// `open_with`, also choosing whether the linear layers run in int8 (`int8`, honoured only where
    /// the CPU has AVX-512 VNNI or AVX2).
    pub fn open_opts(
        dir: &Path,
        kernel: Option<Kernel>,
        int8: bool,
        threads: usize,
    ) -> Result<Self, BertError> {
        let kernel = kernel.filter(|k| k.runs_here());
        let int8 = int8 && int8::available();
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
                    packed: None,
                    packed8: None,
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
        let (pos_emb, type_emb, emb_ln, mut layers) = weights;
        if kernel.is_some() || int8 {
            for l in &mut layers {
                for lin in [
                    &mut l.q,
                    &mut l.k,
                    &mut l.v,
                    &mut l.o,
                    &mut l.up,
                    &mut l.down,
                ] {
                    if int8 {
                        lin.pack8();
                    } else {
                        lin.pack();
                    }
                }
            }
        }
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
            kernel,
            int8,
            #[cfg(target_arch = "x86_64")]
            avx512: bf16::wide_allowed()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("fma"),
            #[cfg(not(target_arch = "x86_64"))]
            avx512: false,
            pool: (threads > 1)
                .then(|| ThreadPool::named(threads, "porteiro-encoder"))
                .transpose()
                .map_err(BertError::Threads)?,
            scratch: Mutex::default(),
        })
    }

    /// Threads a pass is split over.
    pub fn threads(&self) -> usize {
        self.pool.as_ref().map_or(1, |p| p.threads())
    }

    /// The bf16 kernel this encoder's matrix products run on (`None`: f32).
    pub fn kernel(&self) -> Option<Kernel> {
        self.kernel
    }

    /// `kernel`, or the scalar one where the products run in f32 (never called then).
    fn k16(&self) -> Kernel {
        self.kernel.unwrap_or(Kernel::Scalar)
    }

    /// Whether the linear layers run in int8 (VNNI or AVX2).
    pub fn int8(&self) -> bool {
        self.int8
    }

    /// How the matrix products run, for reports: "int8 VNNI" for the linear layers if so, then the
    /// bf16 kernel's name or "f32".
    pub fn path_name(&self) -> String {
        let rest = self.kernel.map_or("f32", Kernel::name);
        if self.int8 {
            let k = int8::kernel().unwrap_or(int8::Int8Kernel::Scalar);
            format!("{} + {rest} attention", k.name())
        } else {
            rest.to_string()
        }
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
        let threads = self.threads();
        let mut guard = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let bufs = &mut *guard;
        bufs.threads.resize_with(threads, Scratch::default);
        bufs.heads.resize_with(c.heads, Mutex::default);
        let scratch: Vec<Mutex<&mut Scratch>> = bufs.threads.iter_mut().map(Mutex::new).collect();
        let heads = &bufs.heads;
        for buf in [&mut bufs.q, &mut bufs.k, &mut bufs.v] {
            grow(buf, n * h);
        }
        let (xs, qs) = (Rows::new(&mut x, h), Rows::new(&mut bufs.q[..n * h], h));
        let (ks, vs) = (
            Rows::new(&mut bufs.k[..n * h], h),
            Rows::new(&mut bufs.v[..n * h], h),
        );
        // Every step of a layer is local to a token except attention's reads of K and V, so a layer is
        // two passes over each thread's tokens with the heads' K/V packing between them.
        for l in &self.layers {
            self.parallel(&|t, nt| {
                let rows = pool::split(n, t, nt, 2 * bf16::TILE);
                let mut s = scratch[t].lock().unwrap_or_else(|e| e.into_inner());
                // SAFETY: each thread takes its own rows of x, q, k and v.
                let (x, q, k, v) = unsafe {
                    (
                        xs.rows(rows.clone()),
                        qs.rows(rows.clone()),
                        ks.rows(rows.clone()),
                        vs.rows(rows.clone()),
                    )
                };
                let m = rows.len();
                #[cfg(target_arch = "x86_64")]
                if self.avx512 {
                    // SAFETY: the CPU has AVX-512 (checked at open).
                    unsafe { self.project_qkv_avx512(l, &mut s, x, q, k, v, m) };
                    return;
                }
                self.project_qkv(l, &mut s, x, q, k, v, m);
            });
            if self.kernel.is_some() {
                self.parallel(&|t, nt| {
                    // SAFETY: k and v are only read in this pass.
                    let (k, v) = unsafe { (ks.rows(0..n), vs.rows(0..n)) };
                    #[cfg(target_arch = "x86_64")]
                    if self.avx512 {
                        // SAFETY: the CPU has AVX-512 (checked at open).
                        unsafe { self.pack_heads_avx512(heads, k, v, n, t, nt) };
                        return;
                    }
                    self.pack_heads(heads, k, v, n, t, nt);
                });
            }
            self.parallel(&|t, nt| {
                let rows = pool::split(n, t, nt, 2 * bf16::TILE);
                let mut s = scratch[t].lock().unwrap_or_else(|e| e.into_inner());
                // SAFETY: each thread writes its own rows of x and reads its rows of q; k and v are
                // only read in this pass.
                let (x, q, k, v) = unsafe {
                    (
                        xs.rows(rows.clone()),
                        qs.rows(rows),
                        ks.rows(0..n),
                        vs.rows(0..n),
                    )
                };
                #[cfg(target_arch = "x86_64")]
                if self.avx512 {
                    // SAFETY: the CPU has AVX-512 (checked at open).
                    unsafe { self.attend_and_feed_forward_avx512(l, &mut s, heads, x, q, k, v, n) };
                    return;
                }
                self.attend_and_feed_forward(l, &mut s, heads, x, q, k, v, n);
            });
        }
        let mut pooled = vec![0f32; h];
        for row in x.chunks_exact(h) {
            pooled.iter_mut().zip(row).for_each(|(p, v)| *p += v);
        }
        let norm = pooled.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        pooled.iter_mut().for_each(|v| *v /= norm);
        pooled
    }

    fn parallel(&self, f: &(dyn Fn(usize, usize) + Sync)) {
        match &self.pool {
            Some(p) => p.run(f),
            None => f(0, 1),
        }
    }

    avx512_variant!(project_qkv_avx512 => project_qkv(
        l: &Layer, s: &mut Scratch, x: &[f32], q: &mut [f32], k: &mut [f32], v: &mut [f32], m: usize
    ));
    avx512_variant!(attend_and_feed_forward_avx512 => attend_and_feed_forward(
        l: &Layer, s: &mut Scratch, heads: &[Mutex<HeadKv>], x: &mut [f32], q: &[f32], k: &[f32],
        v: &[f32], n: usize
    ));

    avx512_variant!(pack_heads_avx512 => pack_heads(
        heads: &[Mutex<HeadKv>], k: &[f32], v: &[f32], n: usize, t: usize, nt: usize
    ));

    /// Thread `t` of `nt` packs every `nt`-th head's K and V for the tiles.
    #[inline(always)]
    fn pack_heads(
        &self,
        heads: &[Mutex<HeadKv>],
        k: &[f32],
        v: &[f32],
        n: usize,
        t: usize,
        nt: usize,
    ) {
        let c = &self.cfg;
        let hd = c.hidden / c.heads;
        for head in (t..c.heads).step_by(nt) {
            let mut kv = heads[head].lock().unwrap_or_else(|e| e.into_inner());
            kv.pack(k, v, n, c.hidden, head * hd, hd);
        }
    }

    /// q, k, v for `m` tokens (one thread's rows).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn project_qkv(
        &self,
        l: &Layer,
        s: &mut Scratch,
        x: &[f32],
        q: &mut [f32],
        k: &mut [f32],
        v: &mut [f32],
        m: usize,
    ) {
        if m == 0 {
            return;
        }
        // q, k and v read the same input, packed once.
        l.q.pack_input(x, m, &mut s.xa, &mut s.xq);
        l.q.forward(self.k16(), x, &s.xa, &s.xq, m, q, &mut s.tmp);
        l.k.forward(self.k16(), x, &s.xa, &s.xq, m, k, &mut s.tmp);
        l.v.forward(self.k16(), x, &s.xa, &s.xq, m, v, &mut s.tmp);
    }

    /// The rest of a layer for one thread's tokens: attention of its queries over all `n` keys, the
    /// output projection, residual and LayerNorm, the feed-forward block, residual and LayerNorm.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn attend_and_feed_forward(
        &self,
        l: &Layer,
        s: &mut Scratch,
        heads: &[Mutex<HeadKv>],
        x: &mut [f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        n: usize,
    ) {
        let c = &self.cfg;
        let (h, hd, inter) = (c.hidden, c.hidden / c.heads, c.intermediate);
        let m = x.len() / h;
        if m == 0 {
            return;
        }
        let scale = 1.0 / (hd as f32).sqrt();
        grow(&mut s.ctx, m * h);
        for head in 0..c.heads {
            let off = head * hd;
            if self.kernel.is_some() {
                let kv = heads[head].lock().unwrap_or_else(|e| e.into_inner());
                // scores = Q_h·K_hᵀ, then P·V_h.
                s.qa.pack(&q[off..], m, hd, h);
                let ld = kv.kb.cols_padded();
                grow(&mut s.scores, s.qa.rows_padded() * ld);
                bf16::gemm_with(self.k16(), &s.qa, &kv.kb, &mut s.scores, ld);
                // e^((s − max)·scale) is computed while packing P to bf16, and the rows' 1/sum is
                // applied to P·V instead of P: the scores are read once after the max, never
                // written back.
                s.row_max.clear();
                // A loop, not an iterator adapter: a closure would be compiled without AVX-512.
                for row in s.scores.chunks_exact(ld).take(m) {
                    s.row_max.push(lanes_max(&row[..n]));
                }
                s.sums.clear();
                s.sums.resize(m, 0.0);
                let (row_max, sums, avx512) = (&s.row_max, &mut s.sums, self.avx512);
                s.pa.pack_map(&s.scores, m, n, ld, |r, c0, vals| {
                    let valid = (n - c0).min(bf16::TILE_K);
                    sums[r] += exp_chunk(vals, row_max[r], scale, valid, avx512);
                });
                let ldo = kv.vb.cols_padded();
                grow(&mut s.head_out, s.pa.rows_padded() * ldo);
                bf16::gemm_with(self.k16(), &s.pa, &kv.vb, &mut s.head_out, ldo);
                for (t, &sum) in s.sums.iter().enumerate() {
                    let inv = 1.0 / sum;
                    for (c, o) in s.ctx[t * h + off..t * h + off + hd]
                        .iter_mut()
                        .zip(&s.head_out[t * ldo..t * ldo + hd])
                    {
                        *c = o * inv;
                    }
                }
                continue;
            }
            grow(&mut s.scores, m * n);
            s.scores[..m * n].fill(0.0);
            // scores[t][j] = q_t · k_j (k read transposed through its strides).
            sgemm(
                m,
                hd,
                n,
                &q[off..],
                h,
                1,
                &k[off..],
                1,
                h,
                &mut s.scores,
                n,
                1.0,
            );
            for row in s.scores.chunks_exact_mut(n).take(m) {
                softmax(row, scale);
            }
            for t in 0..m {
                s.ctx[t * h + off..t * h + off + hd].fill(0.0);
            }
            sgemm(
                m,
                n,
                hd,
                &s.scores,
                n,
                1,
                &v[off..],
                h,
                1,
                &mut s.ctx[off..],
                h,
                1.0,
            );
        }
        let Scratch {
            xa,
            xq,
            tmp,
            ctx,
            ff,
            out,
            ..
        } = s;
        l.o.pack_input(ctx, m, xa, xq);
        grow(out, m * h);
        l.o.forward(self.k16(), ctx, xa, xq, m, out, tmp);
        x.iter_mut().zip(out.iter()).for_each(|(a, b)| *a += b);
        l.ln1.apply(x, c.eps);
        l.up.pack_input(x, m, xa, xq);
        if let Some(up8) = &l.up.packed8 {
            // Bias and GELU applied in 32-wide chunks (the vector versions), then the hidden layer
            // quantized for the down projection.
            grow(ff, m * inter);
            int8::gemm(xq, up8, None, &mut ff[..m * inter], inter);
            let avx512 = self.avx512;
            for row in ff[..m * inter].chunks_exact_mut(inter) {
                let mut chunks = row.chunks_exact_mut(bf16::TILE_K);
                for (i, chunk) in chunks.by_ref().enumerate() {
                    if let Ok(vals) = <&mut [f32; bf16::TILE_K]>::try_from(chunk) {
                        gelu_chunk(vals, &l.up.b[i * bf16::TILE_K..], avx512);
                    }
                }
                let done = inter - chunks.into_remainder().len();
                for (v, b) in row[done..].iter_mut().zip(&l.up.b[done..]) {
                    *v = gelu_erf(*v + b);
                }
            }
            l.down.pack_input(ff, m, xa, xq);
        } else if let Some(up) = &l.up.packed {
            // The products go straight from the tiles into the next packing with bias and GELU
            // applied on the way: the f32 activations are read once, never written back.
            let ld = up.cols_padded();
            grow(tmp, xa.rows_padded() * ld);
            bf16::gemm_with(self.k16(), xa, up, tmp, ld);
            let (bias, avx512) = (&l.up.b, self.avx512);
            xa.pack_map(tmp, m, inter, ld, |_, c0, vals| {
                gelu_chunk(vals, &bias[c0..], avx512)
            });
        } else {
            grow(ff, m * inter);
            l.up.forward(self.k16(), x, xa, xq, m, ff, tmp);
            ff[..m * inter].iter_mut().for_each(|g| *g = gelu_erf(*g));
        }
        l.down.forward(self.k16(), ff, xa, xq, m, out, tmp);
        x.iter_mut().zip(out.iter()).for_each(|(a, b)| *a += b);
        l.ln2.apply(x, c.eps);
    }
}

/// Buffers kept between passes, so a pass allocates (and page-faults) nothing in steady state.
#[derive(Default)]
struct Buffers {
    threads: Vec<Scratch>,
    heads: Vec<Mutex<HeadKv>>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

/// One thread's buffers for a pass.
#[derive(Default)]
struct Scratch {
    xa: PackedA,
    xq: PackedA8,
    qa: PackedA,
    pa: PackedA,
    scores: Vec<f32>,
    row_max: Vec<f32>,
    sums: Vec<f32>,
    head_out: Vec<f32>,
    ctx: Vec<f32>,
    ff: Vec<f32>,
    out: Vec<f32>,
    tmp: Vec<f32>,
}

/// One head's K and V as AMX right-hand operands: B(d, j) = k[j][off + d] for the scores, and
/// B(j, d) = v[j][off + d] for the weighted sum.
#[derive(Default)]
struct HeadKv {
    kb: PackedB,
    vb: PackedB,
}

impl HeadKv {
    #[inline(always)]
    fn pack(&mut self, k: &[f32], v: &[f32], n: usize, h: usize, off: usize, hd: usize) {
        self.kb.pack(&k[off..], hd, n, h, 1);
        self.vb.pack(&v[off..], n, hd, 1, h);
    }
}

/// Grows `v` to at least `n` elements (new ones zero); existing contents are left for the caller to
/// overwrite, so steady-state passes do not clear megabytes of buffers.
fn grow(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
}

/// A row-major buffer whose disjoint row ranges are handed to different threads.
struct Rows {
    ptr: *mut f32,
    len: usize,
    width: usize,
}

// SAFETY: `rows` is unsafe; callers guarantee that ranges written by one thread are not touched by
// another in the same pass.
unsafe impl Sync for Rows {}

impl Rows {
    fn new(v: &mut [f32], width: usize) -> Self {
        Rows {
            ptr: v.as_mut_ptr(),
            len: v.len(),
            width,
        }
    }

    /// Rows `r` of the buffer.
    ///
    /// # Safety
    /// No other live reference may write to (or, if this one writes, read) the same rows, and the
    /// buffer must outlive the returned slice.
    #[allow(clippy::mut_from_ref)]
    unsafe fn rows(&self, r: Range<usize>) -> &mut [f32] {
        let (a, b) = (r.start * self.width, r.end * self.width);
        assert!(a <= b && b <= self.len);
        std::slice::from_raw_parts_mut(self.ptr.add(a), b - a)
    }
}

/// One 32-value chunk of a score row for the AMX path: v ← e^((v − max)·scale) for the first `valid`
/// values (the rest become zero); returns their sum. Both versions are within 4e-6 relative (the
/// rounding of x·log2 e); the results are rounded to bf16 next.
#[inline(always)]
fn exp_chunk(
    vals: &mut [f32; bf16::TILE_K],
    max: f32,
    scale: f32,
    valid: usize,
    avx512: bool,
) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx512 {
        // SAFETY: the caller runs this only where the CPU has AVX-512 (`avx512`).
        return unsafe { wide::exp_chunk(vals, max, scale, valid) };
    }
    let _ = avx512;
    let mut sum = 0.0;
    for v in &mut vals[..valid] {
        *v = exp_fast((*v - max) * scale);
        sum += *v;
    }
    vals[valid..].fill(0.0);
    sum
}

/// v ← GELU(v + bias) over a chunk (as far as `bias` reaches), before its rounding to bf16.
#[inline(always)]
fn gelu_chunk(vals: &mut [f32; bf16::TILE_K], bias: &[f32], avx512: bool) {
    #[cfg(target_arch = "x86_64")]
    if avx512 && bias.len() >= bf16::TILE_K {
        // SAFETY: the caller runs this only where the CPU has AVX-512 (`avx512`); bias has 32 values.
        unsafe { wide::gelu_chunk(vals, bias) };
        return;
    }
    let _ = avx512;
    for (v, b) in vals.iter_mut().zip(bias) {
        *v = gelu_erf(*v + b);
    }
}

/// exp and GELU 16 lanes at a time with AVX-512, for values rounded to bf16 right after: no division
/// (a reciprocal estimate refined once instead), and the exponent applied by `vscalefps`. Each
/// function carries the target feature itself: a closure does not inherit it from the method that
/// defines it, and intrinsics outside it become calls (measured 6x slower).
#[cfg(target_arch = "x86_64")]
mod wide {
    use std::arch::x86_64::*;

    /// 2^f on |f| ≤ ½, degree-5 minimax (relative error 8e-8), lowest degree first.
    const EXP2: [f32; 6] = [
        1.000_000_1,
        0.693_146_94,
        0.240_221_22,
        0.055_507_425,
        0.009_675_46,
        0.001_326_697_6,
    ];

    /// eˣ per lane for x ≤ 88; inputs below −80 give e⁻⁸⁰ (clear of subnormals, as `exp_fast`).
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp(x: __m512) -> __m512 {
        let y = _mm512_mul_ps(
            _mm512_max_ps(x, _mm512_set1_ps(-80.0)),
            _mm512_set1_ps(std::f32::consts::LOG2_E),
        );
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(y);
        let f = _mm512_sub_ps(y, n);
        let mut p = _mm512_set1_ps(EXP2[5]);
        for &c in EXP2[..5].iter().rev() {
            p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
        }
        _mm512_scalef_ps(p, n)
    }

    /// x·Φ(x) with Φ from erf by Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7), the one division
    /// replaced by `vrcp14ps` and a Newton step (relative error ~1e-8).
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn gelu(x: __m512) -> __m512 {
        let a = _mm512_min_ps(
            _mm512_abs_ps(_mm512_mul_ps(
                x,
                _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2),
            )),
            _mm512_set1_ps(4.0),
        );
        let d = _mm512_fmadd_ps(a, _mm512_set1_ps(0.327_591_1), _mm512_set1_ps(1.0));
        let r = _mm512_rcp14_ps(d);
        let t = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0)));
        let mut p = _mm512_set1_ps(1.061_405_4);
        for c in [-1.453_152, 1.421_413_7, -0.284_496_74, 0.254_829_6] {
            p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(c));
        }
        // ½·erfc(|x|/√2) = ½·p·t·e^(−a²): Φ(x) for x < 0, 1 − Φ(|x|) for x ≥ 0.
        let tail = _mm512_mul_ps(
            _mm512_mul_ps(_mm512_mul_ps(p, t), _mm512_set1_ps(0.5)),
            exp(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), a), a)),
        );
        let negative = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_setzero_ps());
        let phi = _mm512_mask_blend_ps(negative, _mm512_sub_ps(_mm512_set1_ps(1.0), tail), tail);
        _mm512_mul_ps(x, phi)
    }

    /// See `super::exp_chunk`.
    ///
    /// # Safety
    /// The CPU must have AVX-512F. (The loads and stores stay inside `vals`: two halves of 16.)
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_chunk(vals: &mut [f32; 32], max: f32, scale: f32, valid: usize) -> f32 {
        let (mx, sc) = (_mm512_set1_ps(max), _mm512_set1_ps(scale));
        let mut sum = _mm512_setzero_ps();
        for half in 0..2 {
            let lanes = valid.saturating_sub(16 * half).min(16);
            let keep: __mmask16 = ((1u32 << lanes) - 1) as __mmask16;
            let at = vals.as_mut_ptr().add(16 * half);
            let e = exp(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(at), mx), sc));
            let e = _mm512_maskz_mov_ps(keep, e);
            _mm512_storeu_ps(at, e);
            sum = _mm512_add_ps(sum, e);
        }
        _mm512_reduce_add_ps(sum)
    }

    /// See `super::gelu_chunk`.
    ///
    /// # Safety
    /// The CPU must have AVX-512F, and `bias` must hold at least 32 values (32 are read).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn gelu_chunk(vals: &mut [f32; 32], bias: &[f32]) {
        for half in 0..2 {
            let at = vals.as_mut_ptr().add(16 * half);
            let b = _mm512_loadu_ps(bias.as_ptr().add(16 * half));
            _mm512_storeu_ps(at, gelu(_mm512_add_ps(_mm512_loadu_ps(at), b)));
        }
    }
}

/// row ← softmax(row · scale).
#[inline(always)]
fn softmax(row: &mut [f32], scale: f32) {
    let mx = lanes_max(row);
    for s in row.iter_mut() {
        *s = exp_fast((*s - mx) * scale);
    }
    let inv = 1.0 / lanes_sum(row);
    row.iter_mut().for_each(|s| *s *= inv);
}

/// Folds `v` in 16 independent lanes with `f`, then merges the lanes with `merge`: a plain
/// `iter().sum()` is one serial chain of adds (4 cycles each) that the compiler may not reorder.
#[inline(always)]
fn lanes_fold(
    v: &[f32],
    init: f32,
    f: impl Fn(f32, f32) -> f32,
    merge: impl Fn(f32, f32) -> f32,
) -> f32 {
    let mut acc = [init; 16];
    let mut chunks = v.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            acc[i] = f(acc[i], c[i]);
        }
    }
    let mut r = init;
    for &x in chunks.remainder() {
        r = f(r, x);
    }
    acc.iter().fold(r, |a, &b| merge(a, b))
}

#[inline(always)]
fn lanes_sum(v: &[f32]) -> f32 {
    lanes_fold(v, 0.0, |a, b| a + b, |a, b| a + b)
}

#[inline(always)]
fn lanes_max(v: &[f32]) -> f32 {
    let max = |m: f32, s: f32| if s > m { s } else { m };
    lanes_fold(v, f32::MIN, max, max)
}

/// eˣ in plain arithmetic, so loops over it vectorise: 2ⁿ from the exponent bits times a degree-7
/// Taylor polynomial of e^f, |f| ≤ ln2/2 (relative error ≤ 4e-6, from rounding x·log2(e)). Inputs
/// below -80 give e⁻⁸⁰: softmax and erf need nothing smaller, and results stay clear of subnormals,
/// which cost a microcode assist per operation.
#[inline(always)]
fn exp_fast(x: f32) -> f32 {
    let y = (x.max(-80.0) * std::f32::consts::LOG2_E).min(126.0);
    // Round to nearest by the 1.5·2²³ trick (|y| < 2²²): the sum's low mantissa bits are n itself, so
    // 2ⁿ comes from integer arithmetic on them (a float-to-int `as` would not vectorise).
    const MAGIC: f32 = 12_582_912.0;
    let shifted = y + MAGIC;
    let n = shifted - MAGIC;
    let f = (y - n) * std::f32::consts::LN_2;
    let p = 1.0
        + f * (1.0
            + f * (0.5
                + f * (1.0 / 6.0
                    + f * (1.0 / 24.0
                        + f * (1.0 / 120.0 + f * (1.0 / 720.0 + f * (1.0 / 5040.0)))))));
    let two_n = (shifted
        .to_bits()
        .wrapping_sub(MAGIC.to_bits())
        .wrapping_add(127))
        << 23;
    p * f32::from_bits(two_n)
}

/// GELU with the exact erf (BERT's `gelu`).
#[inline(always)]
fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// erf to about 2e-7 (Abramowitz & Stegun 7.1.26, 1.5e-7, evaluated in f32). |x| is capped at 4,
/// where erf is 1 to f32 precision, so e^(-x²) never gets near subnormal.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs().min(4.0);
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let y = 1.0
        - (((((1.061_405_4 * t - 1.453_152) * t) + 1.421_413_7) * t - 0.284_496_74) * t
            + 0.254_829_6)
            * t
            * exp_fast(-a * a);
    y.copysign(x)
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

    /// The chunk helpers of the AMX path (wide where the CPU has AVX-512, scalar otherwise) against
    /// f64: exp within 4e-6 relative (as `exp_fast`) over softmax's whole input range, the row sum
    /// over the valid values only, and GELU within 1e-6 absolute or relative, far inside bf16's 4e-3.
    #[test]
    fn chunk_exp_and_gelu_track_f64() {
        let avx512 = cfg!(target_arch = "x86_64") && std::arch::is_x86_feature_detected!("avx512f");
        for wide in [false, avx512] {
            for start in (0..4000).map(|i| -100.0 + i as f32 * 0.025) {
                let mut vals: [f32; bf16::TILE_K] =
                    std::array::from_fn(|i| start + i as f32 * 0.0008);
                let orig = vals;
                let (max, scale, valid) = (0.5, 1.25, if start < -50.0 { 32 } else { 21 });
                let sum = exp_chunk(&mut vals, max, scale, valid, wide);
                let mut want_sum = 0.0;
                for i in 0..32 {
                    let want = if i < valid {
                        (((orig[i] - max) * scale) as f64).max(-80.0).exp()
                    } else {
                        0.0
                    };
                    want_sum += want;
                    assert!(
                        (vals[i] as f64 - want).abs() <= 4e-6 * want,
                        "wide {wide}: exp at {} = {}, want {want}",
                        orig[i],
                        vals[i]
                    );
                }
                assert!((sum as f64 - want_sum).abs() <= 4e-6 * want_sum);
                let bias: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) * 0.01).collect();
                let mut g: [f32; bf16::TILE_K] =
                    std::array::from_fn(|i| start * 0.08 + i as f32 * 0.001);
                let x = g;
                gelu_chunk(&mut g, &bias, wide);
                for i in 0..32 {
                    let v = (x[i] + bias[i]) as f64;
                    let want = 0.5 * v * (1.0 + erf_f64(v / std::f64::consts::SQRT_2));
                    assert!(
                        (g[i] as f64 - want).abs() <= 1e-6 * want.abs().max(1.0),
                        "wide {wide}: gelu({v}) = {}, want {want}",
                        g[i]
                    );
                }
            }
        }
    }

    /// erf in f64 by its Maclaurin series (|x| < 3) or the continued fraction of erfc (beyond), to
    /// ~1e-13: a reference independent of the f32 approximations under test.
    fn erf_f64(x: f64) -> f64 {
        let a = x.abs();
        let r = if a < 3.0 {
            let (mut term, mut sum, mut n) = (a, a, 0.0);
            while term.abs() > 1e-17 * sum.abs() {
                n += 1.0;
                term *= -a * a / n;
                sum += term / (2.0 * n + 1.0);
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc(a) = e^(−a²)/√π · 1/(a + ½/(a + 1/(a + 3/2/(a + ...)))).
            let mut f = a;
            for k in (1..60).rev() {
                f = a + (k as f64 / 2.0) / f;
            }
            1.0 - (-a * a).exp() / (std::f64::consts::PI.sqrt() * f)
        };
        r.copysign(x)
    }

    #[test]
    fn exp_softmax_and_layer_norm_track_f64() {
        for i in 0..20_001 {
            let x = -80.0 + i as f32 * 0.008;
            let (got, want) = (exp_fast(x) as f64, (x as f64).exp());
            assert!(
                (got - want).abs() <= 4e-6 * want,
                "exp({x}) = {got}, want {want}"
            );
        }
        assert_eq!(exp_fast(-1e4), exp_fast(-80.0));
        assert!(exp_fast(-80.0).is_normal());
        // Softmax and lane sums against plain f64 arithmetic, on a row with a 17-element tail.
        let mut row: Vec<f32> = (0..81)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.7)
            .collect();
        let orig = row.clone();
        softmax(&mut row, 0.5);
        let mx = orig.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let z: f64 = orig.iter().map(|&s| ((s as f64 - mx) * 0.5).exp()).sum();
        for (p, &s) in row.iter().zip(&orig) {
            let want = ((s as f64 - mx) * 0.5).exp() / z;
            assert!((*p as f64 - want).abs() <= 1e-6 * want + 1e-9);
        }
        assert!(
            (lanes_sum(&orig) as f64 - orig.iter().map(|&v| v as f64).sum::<f64>()).abs() < 1e-4
        );
        // LayerNorm (its variance is a lane fold with a different merge) against f64.
        let ln = LayerNorm {
            w: (0..81).map(|i| 1.0 + i as f32 * 0.01).collect(),
            b: (0..81).map(|i| i as f32 * -0.02).collect(),
        };
        let mut x = orig.clone();
        ln.apply(&mut x, 1e-12);
        let mean = orig.iter().map(|&v| v as f64).sum::<f64>() / 81.0;
        let var = orig.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / 81.0;
        for i in 0..81 {
            let want = (orig[i] as f64 - mean) / var.sqrt() * ln.w[i] as f64 + ln.b[i] as f64;
            assert!((x[i] as f64 - want).abs() < 1e-5, "{i}: {} vs {want}", x[i]);
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
