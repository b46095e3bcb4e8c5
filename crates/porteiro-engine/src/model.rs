//! Decoder-only transformers (llama, qwen2, gemma3) written once against shared building blocks.
//!
//! Weights are immutable views into the memory-mapped GGUF file; everything that belongs to one
//! sequence (KV cache, positions) lives in `KvCache`, and scratch space in `Scratch`, so several
//! sequences can share one model and be batched in one forward call.

// Weight rows are read through a raw pointer into the GGUF mapping, and pool threads write
// disjoint parts of one output buffer through a shared raw pointer.
#![allow(unsafe_code)]

use std::sync::Arc;

use half::f16;
use porteiro_models::gguf::{GgmlType, GgufError, GgufFile, TensorInfo};

use crate::lora::{self, Adapter, Proj};
use crate::quant::{self, act_type, ActType};
use crate::repack::{self, Acts, Repacked};
use crate::simd::{self, Dot4Fn, DotFn, Tile4Fn, Tile8Fn};
use porteiro_pool::{split, ThreadPool};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("unsupported architecture `{0}` (supported: llama, qwen2, gemma3)")]
    UnsupportedArch(String),
    #[error("tensor `{name}` has type {dtype}, which porteiro cannot compute with (supported: {supported})")]
    UnsupportedType {
        name: String,
        dtype: String,
        supported: &'static str,
    },
    #[error("tensor `{0}` is missing from the model file")]
    MissingTensor(String),
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    BadShape {
        name: String,
        found: Vec<u64>,
        expected: Vec<u64>,
    },
    #[error("invalid hyperparameter: {0}")]
    BadConfig(String),
    #[error("starting the worker threads: {0}")]
    Threads(std::io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Gemma3,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Gemma3 => "gemma3",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub arch: Arch,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub vocab: usize,
    pub n_ctx_train: usize,
    pub eps: f32,
    pub rope_base: f32,
    /// Rope base of sliding-window layers (gemma3).
    pub rope_base_swa: f32,
    /// NeoX rotation pairs (i, i + d/2) instead of adjacent pairs (2i, 2i+1).
    pub rope_neox: bool,
    /// Sliding-window size and which layers use it.
    pub swa: Option<(usize, Vec<bool>)>,
    /// Multiplies queries before they meet the keys (gemma's query_pre_attn_scalar).
    pub q_scale: f32,
    /// Multiplies attention scores (1/sqrt(head_dim) for llama and qwen2).
    pub kq_scale: f32,
    /// Multiplies token embeddings (gemma: sqrt(n_embd)).
    pub embd_scale: f32,
    pub gelu: bool,
}

impl Config {
    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }
    /// The sliding window of `layer`, if it is a sliding-window layer.
    pub fn is_swa(&self, layer: usize) -> Option<usize> {
        self.swa.as_ref().and_then(|(w, l)| l[layer].then_some(*w))
    }

    /// The hyperparameters of a GGUF model (its metadata and the token embedding's shape).
    pub fn from_gguf(g: &GgufFile) -> Result<Self, ModelError> {
        let arch_name = g.architecture()?.to_string();
        let arch = match arch_name.as_str() {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "gemma3" => Arch::Gemma3,
            _ => return Err(ModelError::UnsupportedArch(arch_name)),
        };
        let a = arch.name();
        let u = |k: &str| g.get_u64(&format!("{a}.{k}")).map(|v| v as usize);
        let n_embd = u("embedding_length")?;
        let n_head = u("attention.head_count")?;
        let n_head_kv = u("attention.head_count_kv").unwrap_or(n_head);
        if n_head == 0 || n_head_kv == 0 || n_head % n_head_kv != 0 {
            return Err(ModelError::BadConfig(format!(
                "{n_head} heads with {n_head_kv} KV heads"
            )));
        }
        let head_dim = u("attention.key_length").unwrap_or(n_embd / n_head);
        let n_layer = u("block_count")?;
        let rope_base = g.get_f64(&format!("{a}.rope.freq_base")).unwrap_or(10000.0) as f32;
        let eps = g.get_f64(&format!("{a}.attention.layer_norm_rms_epsilon"))? as f32;
        let tok = g
            .tensor("token_embd.weight")
            .ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?;
        let vocab = tok.dims.get(1).copied().unwrap_or(0) as usize;
        let mut c = Config {
            arch,
            n_embd,
            n_layer,
            n_head,
            n_head_kv,
            head_dim,
            n_ff: u("feed_forward_length")?,
            vocab,
            n_ctx_train: u("context_length").unwrap_or(4096),
            eps,
            rope_base,
            rope_base_swa: rope_base,
            rope_neox: arch != Arch::Llama,
            swa: None,
            q_scale: 1.0,
            kq_scale: 1.0 / (head_dim as f32).sqrt(),
            embd_scale: 1.0,
            gelu: false,
        };
        if arch == Arch::Gemma3 {
            c.gelu = true;
            c.kq_scale = 1.0;
            c.embd_scale = (n_embd as f32).sqrt();
            // Gemma's reference scales queries by 1/sqrt(head_dim), except the 27B (62 layers).
            c.q_scale = if n_layer == 62 {
                1.0 / ((n_embd / n_head) as f32).sqrt()
            } else {
                1.0 / (head_dim as f32).sqrt()
            };
            if let Ok(w) = u("attention.sliding_window") {
                if w > 0 {
                    let pattern = u("attention.sliding_window_pattern").unwrap_or(6).max(1);
                    let layers = (0..n_layer).map(|l| l % pattern < pattern - 1).collect();
                    c.swa = Some((w, layers));
                    c.rope_base_swa = g
                        .get_f64(&format!("{a}.rope.freq_base_swa"))
                        .unwrap_or(10000.0) as f32;
                }
            }
        }
        Ok(c)
    }
}

/// A weight matrix in the mapping: `rows` outputs, each a row of `cols` inputs.
pub struct QMatrix {
    pub name: String,
    pub dtype: GgmlType,
    pub rows: usize,
    pub cols: usize,
    row_bytes: usize,
    data: *const u8,
    kernel: DotFn,
    kernel4: Option<Dot4Fn>,
    tile4: Option<Tile4Fn>,
    tile8: Option<Tile8Fn>,
    pub act: ActType,
    /// The 16-row layout (see `repack`), used for every token where this CPU and the matrix's type
    /// and shape allow it; the blocks at `data` are then not read again.
    fast: Option<Repacked>,
    _file: Arc<GgufFile>,
    /// Weights held in memory instead of the file's ([`Model::swap_matrix`]); `data` points here.
    _owned: Option<Arc<[u8]>>,
}

// SAFETY: the raw `data` is the only field that is not Send; it points into the GGUF file's bytes,
// which `_file` (an Arc, itself Send + Sync) keeps alive, or into `_owned` (likewise); nothing ever
// writes either.
unsafe impl Send for QMatrix {}
// SAFETY: as for Send: shared access only ever reads through `data`, from bytes nothing writes.
unsafe impl Sync for QMatrix {}

impl QMatrix {
    fn new(file: &Arc<GgufFile>, t: &TensorInfo) -> Result<Self, ModelError> {
        let unsupported = || ModelError::UnsupportedType {
            name: t.name.clone(),
            dtype: t.dtype.name(),
            supported: quant::SUPPORTED_TYPES,
        };
        let act = act_type(t.dtype).ok_or_else(unsupported)?;
        let kernel = simd::kernel(t.dtype).ok_or_else(unsupported)?;
        let (bs, ts) = t.dtype.block_layout().ok_or_else(unsupported)?;
        let cols = t.dims[0] as usize;
        let rows = t.dims.iter().skip(1).product::<u64>() as usize;
        if matches!(act, ActType::Q8K) && !cols.is_multiple_of(quant::QK_K)
            || !cols.is_multiple_of(quant::QK) && !matches!(act, ActType::F32)
        {
            return Err(ModelError::BadShape {
                name: t.name.clone(),
                found: t.dims.clone(),
                expected: vec![(cols / bs * bs) as u64],
            });
        }
        let data = file.data(t).as_ptr();
        Ok(Self {
            name: t.name.clone(),
            dtype: t.dtype,
            rows,
            cols,
            row_bytes: cols / bs * ts,
            data,
            kernel,
            kernel4: simd::kernel4(t.dtype),
            tile4: simd::tile4(t.dtype),
            tile8: simd::tile8(t.dtype),
            act,
            fast: None,
            _file: file.clone(),
            _owned: None,
        })
    }

    /// The same matrix with other weights, `bytes` of type `dtype` held in memory (repacked where
    /// the CPU runs the repacked kernels).
    fn with_bytes(&self, dtype: GgmlType, bytes: Arc<[u8]>) -> Result<Self, ModelError> {
        let bad = |why: String| ModelError::BadShape {
            name: format!("{} ({why})", self.name),
            found: vec![bytes.len() as u64],
            expected: vec![self.rows as u64, self.cols as u64],
        };
        let unsupported = || ModelError::UnsupportedType {
            name: self.name.clone(),
            dtype: dtype.name(),
            supported: quant::SUPPORTED_TYPES,
        };
        let act = act_type(dtype).ok_or_else(unsupported)?;
        let kernel = simd::kernel(dtype).ok_or_else(unsupported)?;
        let (bs, ts) = dtype.block_layout().ok_or_else(unsupported)?;
        if !self.cols.is_multiple_of(bs)
            || (matches!(act, ActType::Q8K) && !self.cols.is_multiple_of(quant::QK_K))
        {
            return Err(bad(format!("rows are not whole {} blocks", dtype.name())));
        }
        let row_bytes = self.cols / bs * ts;
        if bytes.len() != row_bytes * self.rows {
            return Err(bad(format!("{} bytes", bytes.len())));
        }
        let fast = if Repacked::available() && self.fast.is_some() {
            Repacked::new(dtype, &bytes, self.rows, self.cols)
        } else {
            None
        };
        Ok(Self {
            name: self.name.clone(),
            dtype,
            rows: self.rows,
            cols: self.cols,
            row_bytes,
            data: bytes.as_ptr(),
            kernel,
            kernel4: simd::kernel4(dtype),
            tile4: simd::tile4(dtype),
            tile8: simd::tile8(dtype),
            act,
            fast,
            _file: self._file.clone(),
            _owned: Some(bytes),
        })
    }

    #[inline]
    pub fn row(&self, r: usize) -> &[u8] {
        debug_assert!(r < self.rows);
        // SAFETY: for r < rows the row ends within rows * row_bytes, the tensor's size, which
        // GgufFile::parse checked lies inside the file's bytes (kept alive by `_file`, never written).
        // r < rows is only debug-asserted: callers pass a row of the matmul's split (< rows) or a token
        // id that forward() checked against vocab, the embedding's row count (checked at load).
        unsafe { std::slice::from_raw_parts(self.data.add(r * self.row_bytes), self.row_bytes) }
    }

    /// Bytes of the weights as they are read: the repacked copy where there is one.
    pub fn bytes(&self) -> usize {
        self.fast
            .as_ref()
            .map_or(self.rows * self.row_bytes, Repacked::bytes)
    }

    /// Rows `r..` as one slice (tile kernels read several consecutive rows).
    #[inline]
    fn rows_from(&self, r: usize) -> &[u8] {
        debug_assert!(r < self.rows);
        // SAFETY: as in `row`: for r < rows (the matmul's tile loop keeps row + 4 <= rows) rows r..rows
        // end at the tensor's end, inside the file's bytes.
        unsafe {
            std::slice::from_raw_parts(
                self.data.add(r * self.row_bytes),
                (self.rows - r) * self.row_bytes,
            )
        }
    }

    /// Dequantizes row `r` (an embedding lookup).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        quant::dequantize_row(self.dtype, self.row(r), out);
    }
}

pub struct Layer {
    attn_norm: Vec<f32>,
    wq: QMatrix,
    wk: QMatrix,
    wv: QMatrix,
    wo: QMatrix,
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    post_attn_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    gate: QMatrix,
    up: QMatrix,
    down: QMatrix,
    post_ffn_norm: Option<Vec<f32>>,
}

impl Layer {
    fn matrices(&self) -> [&QMatrix; 7] {
        [
            &self.wq, &self.wk, &self.wv, &self.wo, &self.gate, &self.up, &self.down,
        ]
    }
    fn matrices_mut(&mut self) -> [&mut QMatrix; 7] {
        [
            &mut self.wq,
            &mut self.wk,
            &mut self.wv,
            &mut self.wo,
            &mut self.gate,
            &mut self.up,
            &mut self.down,
        ]
    }
}

/// Builds the repacked copies of `all` on `threads` threads, largest matrices first. The file pages
/// of each repacked original are released as soon as it is done (so peak memory stays near one copy):
/// they are not read again, except the token embedding's (lookups), even when the output projection
/// shares it.
fn repack_all(all: &mut [&mut QMatrix], threads: usize, file: &GgufFile) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    all.sort_by_key(|m| std::cmp::Reverse(m.rows * m.row_bytes));
    let work: Vec<Mutex<&mut QMatrix>> = all.iter_mut().map(|m| Mutex::new(&mut **m)).collect();
    let next = AtomicUsize::new(0);
    std::thread::scope(|sc| {
        for _ in 0..threads.max(1) {
            sc.spawn(|| {
                while let Some(cell) = work.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let mut guard = cell.lock().unwrap_or_else(|e| e.into_inner());
                    let m = &mut **guard;
                    // SAFETY: rows * row_bytes is the tensor's size (parse() checked row length is a
                    // multiple of the block), which parse() checked lies inside the file's bytes.
                    let data = unsafe { std::slice::from_raw_parts(m.data, m.rows * m.row_bytes) };
                    m.fast = Repacked::new(m.dtype, data, m.rows, m.cols);
                    if m.fast.is_some() && m.name != "token_embd.weight" {
                        if let Some(t) = file.tensor(&m.name) {
                            file.release(t);
                        }
                    }
                }
            });
        }
    });
}

pub struct Model {
    pub cfg: Config,
    pub file: Arc<GgufFile>,
    tok_embd: QMatrix,
    output: QMatrix,
    output_norm: Vec<f32>,
    layers: Vec<Layer>,
    pool: ThreadPool,
}

/// A norm or bias vector of `len` values (f32, f16 or bf16 in the file), as f32.
pub fn vec_f32(file: &GgufFile, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
    let t = file
        .tensor(name)
        .ok_or_else(|| ModelError::MissingTensor(name.into()))?;
    if t.n_elements() as usize != len {
        return Err(ModelError::BadShape {
            name: name.into(),
            found: t.dims.clone(),
            expected: vec![len as u64],
        });
    }
    if !matches!(t.dtype, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
        return Err(ModelError::UnsupportedType {
            name: name.into(),
            dtype: t.dtype.name(),
            supported: "F32, F16, BF16 (for norms and biases)",
        });
    }
    let mut v = vec![0f32; len];
    quant::dequantize_row(t.dtype, file.data(t), &mut v);
    Ok(v)
}

/// [`vec_f32`] of a tensor the architecture may lack.
pub fn opt_vec(file: &GgufFile, name: &str, len: usize) -> Result<Option<Vec<f32>>, ModelError> {
    if file.tensor(name).is_some() {
        vec_f32(file, name, len).map(Some)
    } else {
        Ok(None)
    }
}

/// The descriptor of a `rows x cols` matrix, its shape checked.
pub fn matrix_info<'a>(
    file: &'a GgufFile,
    name: &str,
    cols: usize,
    rows: usize,
) -> Result<&'a TensorInfo, ModelError> {
    let t = file
        .tensor(name)
        .ok_or_else(|| ModelError::MissingTensor(name.into()))?;
    if t.dims.len() != 2 || t.dims[0] as usize != cols || t.dims[1] as usize != rows {
        return Err(ModelError::BadShape {
            name: name.into(),
            found: t.dims.clone(),
            expected: vec![cols as u64, rows as u64],
        });
    }
    Ok(t)
}

fn matrix(
    file: &Arc<GgufFile>,
    name: &str,
    cols: usize,
    rows: usize,
) -> Result<QMatrix, ModelError> {
    QMatrix::new(file, matrix_info(file, name, cols, rows)?)
}

impl Model {
    pub fn load(file: Arc<GgufFile>, threads: usize) -> Result<Self, ModelError> {
        let cfg = Config::from_gguf(&file)?;
        let (e, qd, kvd, ff) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim(), cfg.n_ff);
        let tok_embd = matrix(&file, "token_embd.weight", e, cfg.vocab)?;
        let output = if file.tensor("output.weight").is_some() {
            matrix(&file, "output.weight", e, cfg.vocab)?
        } else {
            matrix(&file, "token_embd.weight", e, cfg.vocab)?
        };
        let output_norm = vec_f32(&file, "output_norm.weight", e)?;
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for l in 0..cfg.n_layer {
            let n = |s: &str| format!("blk.{l}.{s}");
            let hd = cfg.head_dim;
            layers.push(Layer {
                attn_norm: vec_f32(&file, &n("attn_norm.weight"), e)?,
                wq: matrix(&file, &n("attn_q.weight"), e, qd)?,
                wk: matrix(&file, &n("attn_k.weight"), e, kvd)?,
                wv: matrix(&file, &n("attn_v.weight"), e, kvd)?,
                wo: matrix(&file, &n("attn_output.weight"), qd, e)?,
                bq: opt_vec(&file, &n("attn_q.bias"), qd)?,
                bk: opt_vec(&file, &n("attn_k.bias"), kvd)?,
                bv: opt_vec(&file, &n("attn_v.bias"), kvd)?,
                q_norm: opt_vec(&file, &n("attn_q_norm.weight"), hd)?,
                k_norm: opt_vec(&file, &n("attn_k_norm.weight"), hd)?,
                post_attn_norm: opt_vec(&file, &n("post_attention_norm.weight"), e)?,
                ffn_norm: vec_f32(&file, &n("ffn_norm.weight"), e)?,
                gate: matrix(&file, &n("ffn_gate.weight"), e, ff)?,
                up: matrix(&file, &n("ffn_up.weight"), e, ff)?,
                down: matrix(&file, &n("ffn_down.weight"), ff, e)?,
                post_ffn_norm: opt_vec(&file, &n("post_ffw_norm.weight"), e)?,
            });
        }
        let mut output = output;
        if Repacked::available() {
            let mut all: Vec<&mut QMatrix> =
                layers.iter_mut().flat_map(Layer::matrices_mut).collect();
            all.push(&mut output);
            repack_all(&mut all, threads, &file);
        }
        Ok(Self {
            cfg,
            file,
            tok_embd,
            output,
            output_norm,
            layers,
            pool: ThreadPool::named(threads, "porteiro-engine").map_err(ModelError::Threads)?,
        })
    }

    /// Replaces every use of matrix `name` (the token embedding and a tied output projection are
    /// one tensor) by `bytes` of type `dtype`, same shape; returns what it replaced, for
    /// [`Model::restore_matrix`]. Sensitivity measurements swap one tensor at a time this way.
    pub fn swap_matrix(
        &mut self,
        name: &str,
        dtype: GgmlType,
        bytes: Vec<u8>,
    ) -> Result<Vec<QMatrix>, ModelError> {
        let bytes: Arc<[u8]> = bytes.into();
        let mut slots: Vec<&mut QMatrix> = std::iter::once(&mut self.tok_embd)
            .chain(std::iter::once(&mut self.output))
            .chain(self.layers.iter_mut().flat_map(Layer::matrices_mut))
            .filter(|m| m.name == name)
            .collect();
        if slots.is_empty() {
            return Err(ModelError::MissingTensor(name.to_string()));
        }
        let new: Vec<QMatrix> = slots
            .iter()
            .map(|m| m.with_bytes(dtype, bytes.clone()))
            .collect::<Result<_, _>>()?;
        Ok(slots
            .iter_mut()
            .zip(new)
            .map(|(slot, n)| std::mem::replace(&mut **slot, n))
            .collect())
    }

    /// Puts back what [`Model::swap_matrix`] took out.
    pub fn restore_matrix(&mut self, old: Vec<QMatrix>) {
        let mut old = old.into_iter();
        let slots = std::iter::once(&mut self.tok_embd)
            .chain(std::iter::once(&mut self.output))
            .chain(self.layers.iter_mut().flat_map(Layer::matrices_mut));
        let mut next = old.next();
        for slot in slots {
            match next.take() {
                Some(m) if m.name == slot.name => {
                    *slot = m;
                    next = old.next();
                }
                n => next = n,
            }
        }
    }

    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// Lowers the priority of the calling thread and the pool's workers to `nice` (see
    /// `porteiro_pool::ThreadPool::lower_priority`).
    pub fn lower_priority(&self, nice: i32) {
        self.pool.lower_priority(nice);
    }

    /// Bytes of weights read to decode one token (every layer matrix, the output projection, one
    /// embedding row and the norms): the numerator of the memory-bandwidth ceiling.
    pub fn bytes_per_token(&self) -> usize {
        let mut b = self.output.bytes() + self.tok_embd.row_bytes + self.output_norm.len() * 4;
        for l in &self.layers {
            b += l.matrices().iter().map(|m| m.bytes()).sum::<usize>();
            b += (l.attn_norm.len() + l.ffn_norm.len()) * 4;
        }
        b
    }

    pub fn new_cache(&self, n_ctx: usize) -> KvCache {
        KvCache::new(&self.cfg, n_ctx)
    }
}

/// Keys and values of one sequence, f16, layout [layer][position][kv_head][head_dim].
pub struct KvCache {
    k: Vec<Vec<u16>>,
    v: Vec<Vec<u16>>,
    n_ctx: usize,
    kv_dim: usize,
    len: usize,
}

impl KvCache {
    pub fn new(cfg: &Config, n_ctx: usize) -> Self {
        let kv_dim = cfg.kv_dim();
        Self {
            k: (0..cfg.n_layer).map(|_| Vec::new()).collect(),
            v: (0..cfg.n_layer).map(|_| Vec::new()).collect(),
            n_ctx,
            kv_dim,
            len: 0,
        }
    }
    /// Positions filled so far.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> usize {
        self.n_ctx
    }
    /// Forgets everything from position `pos` on (memory is kept for reuse).
    pub fn truncate(&mut self, pos: usize) {
        self.len = self.len.min(pos);
    }
    pub fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(|x| x.capacity() * 2).sum()
    }
    fn reserve(&mut self, upto: usize) {
        let need = upto * self.kv_dim;
        for buf in self.k.iter_mut().chain(self.v.iter_mut()) {
            if buf.len() < need {
                // Grow geometrically so long generations do not reallocate per token.
                let target = need
                    .max(buf.len() * 2)
                    .min(self.n_ctx * self.kv_dim)
                    .max(need);
                buf.resize(target, 0);
            }
        }
    }
}

/// One token in a batch: which sequence it belongs to and whether its logits are wanted.
#[derive(Debug, Clone, Copy)]
pub struct BatchToken {
    pub token: u32,
    pub seq: usize,
    pub pos: usize,
    pub logits: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(
        "cannot resume at layer {layer} of {layers}: the recorded states do not fit this batch"
    )]
    BadResume { layer: usize, layers: usize },
    #[error("context full: position {pos} does not fit a context of {n_ctx} tokens")]
    ContextFull { pos: usize, n_ctx: usize },
    #[error("token id {0} is outside the vocabulary")]
    BadToken(u32),
    #[error("{rows} adapter rows given for a batch of {batch} tokens")]
    LoraRows { rows: usize, batch: usize },
    #[error("batch token refers to sequence {0}, but only {1} caches were given")]
    BadSeq(usize, usize),
    #[error("positions of sequence {seq} must continue its cache: got {pos}, expected {expected}")]
    BadPos {
        seq: usize,
        pos: usize,
        expected: usize,
    },
}

/// What a forward pass does with the residual stream at each layer's entry.
enum Tap<'a> {
    None,
    Record(&'a mut Vec<f32>),
    /// Start at this layer from this stream.
    From(usize, &'a [f32]),
}

/// Quantized activations, reused across steps.
#[derive(Default)]
struct MatmulBufs {
    /// One buffer per activation format of the per-block kernels (indexed by `act_index`).
    acts: [Vec<u8>; 4],
    /// Activations for the repacked kernels.
    fast: Acts,
    /// When set, every matrix's inputs are summed here (an importance matrix).
    imatrix: Option<Box<crate::imatrix::Collector>>,
}

/// Reusable buffers; grows to the largest batch seen.
#[derive(Default)]
pub struct Scratch {
    x: Vec<f32>,
    xb: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    hb: Vec<f32>,
    hb2: Vec<f32>,
    mm: MatmulBufs,
    pub logits: Vec<f32>,
}

impl Scratch {
    /// From now on, sum every matrix's squared inputs (see [`crate::imatrix`]).
    pub fn collect_imatrix(&mut self) {
        self.mm.imatrix.get_or_insert_with(Default::default);
    }

    /// The sums collected since [`Scratch::collect_imatrix`]; collection stops.
    pub fn take_imatrix(&mut self) -> Option<crate::imatrix::Collector> {
        self.mm.imatrix.take().map(|b| *b)
    }
}

fn grow<T: Default + Clone>(v: &mut Vec<T>, n: usize) {
    if v.len() < n {
        v.resize(n, T::default());
    }
}

/// A raw pointer that may be shared between the pool's threads; each thread writes disjoint indices.
#[derive(Clone, Copy)]
struct Shared<T>(*mut T);

/// One projection's LoRA work in a step: the rows' adapter groups and their scaled A·x.
struct Delta<'a> {
    groups: Vec<lora::Group<'a>>,
    /// Σ rank over the groups: the A rows to run.
    total: usize,
    h: Vec<f32>,
    n_out: usize,
}

impl<T> Shared<T> {
    /// Through a method, closures capture the whole `Shared` (which is Sync), not the raw field.
    #[inline]
    fn ptr(&self) -> *mut T {
        self.0
    }
}
// SAFETY: Shared is private to this module and wraps only pointers to f32/u8 scratch buffers that
// outlive the `pool.run` call using them (it returns when every thread is done); each use writes
// indices disjoint from every other thread's (see the SAFETY comment at each dereference).
unsafe impl<T> Send for Shared<T> {}
// SAFETY: as for Send: threads share the pointer, never the same element.
unsafe impl<T> Sync for Shared<T> {}

fn rms_norm(x: &mut [f32], w: &[f32], eps: f32) {
    let ss: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    let scale = 1.0 / ((ss / x.len() as f64) as f32 + eps).sqrt();
    for (v, g) in x.iter_mut().zip(w) {
        *v = *v * scale * g;
    }
}

fn rms_norm_to(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    out.copy_from_slice(x);
    rms_norm(out, w, eps);
}

/// Rotates `x` (one head) in place for position `pos`.
fn rope(x: &mut [f32], pos: usize, base: f32, neox: bool) {
    let d = x.len();
    let theta_scale = base.powf(-2.0 / d as f32);
    let mut theta = pos as f32;
    for i in 0..d / 2 {
        let (s, c) = theta.sin_cos();
        let (a, b) = if neox {
            (i, i + d / 2)
        } else {
            (2 * i, 2 * i + 1)
        };
        let (x0, x1) = (x[a], x[b]);
        x[a] = x0 * c - x1 * s;
        x[b] = x0 * s + x1 * c;
        theta *= theta_scale;
    }
}

#[inline]
fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2/pi)
    0.5 * x * (1.0 + (C * x * (1.0 + 0.044715 * x * x)).tanh())
}

/// GELU of every f16 value, rounded to f16: llama.cpp evaluates GEGLU through such a table (input
/// rounded to f16, outside ±10 taken as 0 or x), and matching its roundings keeps our logits next
/// to its; a lookup is also far cheaper than tanh per element.
fn gelu_table() -> &'static [u16] {
    static TABLE: std::sync::OnceLock<Vec<u16>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|b| f16::from_f32(gelu_tanh(f16::from_bits(b).to_f32())).to_bits())
            .collect()
    })
}

#[inline]
fn gelu_lookup(table: &[u16], x: f32) -> f32 {
    if x <= -10.0 {
        0.0
    } else if x >= 10.0 {
        x
    } else {
        f16::from_bits(table[f16::from_f32(x).to_bits() as usize]).to_f32()
    }
}

#[inline]
fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Writes a tile result `v[r][j]` (row `row + r`, token `t + j`) into the token-major output.
///
/// # Safety
/// `out` must hold `(t + N) * rows` floats and no other thread may write these positions.
#[inline]
unsafe fn scatter_tile<const N: usize>(
    out: *mut f32,
    rows: usize,
    t: usize,
    row: usize,
    v: &[[f32; N]; 4],
) {
    for (r, vr) in v.iter().enumerate() {
        for (j, x) in vr.iter().enumerate() {
            *out.add((t + j) * rows + row + r) = *x;
        }
    }
}

fn quant_f16_dot(w: &[u8], a: &[u8], k: usize) -> f32 {
    quant::dot_scalar(GgmlType::F16, w, a, k)
}

fn act_index(t: ActType) -> usize {
    match t {
        ActType::F32 => 0,
        ActType::Q8_0 => 1,
        ActType::Q8_1 => 2,
        ActType::Q8K => 3,
    }
}

impl Model {
    /// gate = act(gate) * up over `n` token rows, the rows split across the pool.
    fn glu(&self, gelu: bool, gate: &mut [f32], up: &[f32], n: usize) {
        let ff = gate.len() / n.max(1);
        let table = gelu.then(gelu_table);
        let g = Shared(gate.as_mut_ptr());
        let run = |rows: std::ops::Range<usize>| {
            // SAFETY: rows comes from split(n, ..) (or is 0..n), so rows.end * ff <= n * ff <= gate.len();
            // the pool hands each thread a disjoint range, so no two slices overlap.
            let gate = unsafe {
                std::slice::from_raw_parts_mut(g.ptr().add(rows.start * ff), rows.len() * ff)
            };
            let up = &up[rows.start * ff..rows.end * ff];
            for (g, u) in gate.iter_mut().zip(up) {
                *g = match table {
                    Some(t) => gelu_lookup(t, *g),
                    None => silu(*g),
                } * u;
            }
        };
        if n < 2 {
            run(0..n);
        } else {
            self.pool.run(&|ti, nt| run(split(n, ti, nt, 1)));
        }
    }

    /// y[n][rows] = x[n][cols] · W^T for one or more matrices sharing the input `x`: the repacked
    /// ones through the repacked kernels, the others through the per-block kernels. Either way a
    /// token's result does not depend on the other tokens of the step.
    fn matmul(&self, jobs: &mut [(&QMatrix, &mut [f32])], x: &[f32], n: usize, s: &mut MatmulBufs) {
        self.matmul_lora(jobs, &[], x, n, s);
    }

    /// [`Model::matmul`] plus each job's LoRA delta (`deltas[i]` for `jobs[i]`; empty: none): each
    /// thread adds B·h to the output columns it has just computed, so the up-projection costs no
    /// synchronisation of its own and is split like the base rows.
    fn matmul_lora(
        &self,
        jobs: &mut [(&QMatrix, &mut [f32])],
        deltas: &[Option<Delta>],
        x: &[f32],
        n: usize,
        s: &mut MatmulBufs,
    ) {
        if let Some(c) = s.imatrix.as_mut() {
            // As llama-imatrix: the output projection is not collected (it is quantized without).
            for (w, _) in jobs.iter().filter(|(w, _)| !std::ptr::eq(*w, &self.output)) {
                c.add(&w.name, x, n);
            }
        }
        let mut fast: Vec<(&Repacked, &mut [f32], Option<&Delta>)> = Vec::new();
        let mut slow: Vec<(&QMatrix, &mut [f32], Option<&Delta>)> = Vec::new();
        for (i, (w, y)) in jobs.iter_mut().enumerate() {
            let d = deltas.get(i).and_then(Option::as_ref);
            debug_assert!(d.is_none_or(|d| y.len() >= n * d.n_out));
            match &w.fast {
                Some(r) => fast.push((r, &mut **y, d)),
                None => slow.push((&**w, &mut **y, d)),
            }
        }
        if !slow.is_empty() {
            self.matmul_blocks(&mut slow, x, n, &mut s.acts);
        }
        if !fast.is_empty() {
            self.matmul_repacked(&mut fast, x, n, &mut s.fast);
        }
    }

    /// The repacked path: activations quantized once, then 16-row groups of all matrices split
    /// across the pool, tokens walked in cache-sized tiles.
    fn matmul_repacked(
        &self,
        jobs: &mut [(&Repacked, &mut [f32], Option<&Delta>)],
        x: &[f32],
        n: usize,
        acts: &mut Acts,
    ) {
        let k = x.len() / n;
        acts.reset(k, n);
        {
            let acts = &*acts;
            let quant = |range: std::ops::Range<usize>| {
                for t in range {
                    // SAFETY: split() gives each thread its own tokens, so no token is handed to two
                    // threads (token_mut's contract); t < n, and acts.reset(k, n) sized n tokens.
                    let (q, d, s) = unsafe { acts.token_mut(t) };
                    repack::quantize(&x[t * k..(t + 1) * k], q, d, s);
                }
            };
            if n < 4 {
                quant(0..n);
            } else {
                self.pool.run(&|ti, nt| quant(split(n, ti, nt, 1)));
            }
        }
        let acts = &*acts;
        let outs: Vec<(&Repacked, Shared<f32>, Option<&Delta>)> = jobs
            .iter_mut()
            .map(|(w, y, d)| (&**w, Shared(y.as_mut_ptr()), *d))
            .collect();
        let total: usize = outs.iter().map(|o| o.0.groups()).sum();
        // Activations of a token tile (up to 128 x 4864 bytes) stay in L2 while weight groups stream.
        const TILE: usize = 128;
        self.pool.run(&|ti, nt| {
            let mine = split(total, ti, nt, 1);
            let mut t0 = 0;
            while t0 < n {
                let t1 = (t0 + TILE).min(n);
                let mut base = 0;
                for (w, out, _) in &outs {
                    let (lo, hi) = (mine.start.max(base), mine.end.min(base + w.groups()));
                    for grp in lo..hi {
                        // SAFETY: forward() passes each output as n x rows floats, t1 <= n, and the
                        // 16-row groups are split disjointly across threads, so `run` writes inside
                        // the buffer and no position twice.
                        unsafe { w.run(grp - base, acts, t0, t1, out.ptr(), w.rows()) };
                    }
                    base += w.groups();
                }
                t0 = t1;
            }
            let mut base = 0;
            for (w, out, d) in &outs {
                let (lo, hi) = (mine.start.max(base), mine.end.min(base + w.groups()));
                base += w.groups();
                if let Some(d) = d.filter(|_| lo < hi) {
                    let cols = (lo - (base - w.groups())) * 16
                        ..((hi - (base - w.groups())) * 16).min(d.n_out);
                    // SAFETY: the output holds n rows of n_out = w.rows() floats; this thread's
                    // 16-row groups are its alone, so are the columns they cover.
                    unsafe { lora::up_project(&d.groups, &d.h, d.n_out, cols, out.ptr()) };
                }
            }
        });
    }

    /// The per-block path: the rows of all matrices are split across the pool together (fewer
    /// synchronisations, and small matrices do not leave threads idle). `x` is quantized once per
    /// activation format.
    fn matmul_blocks(
        &self,
        jobs: &mut [(&QMatrix, &mut [f32], Option<&Delta>)],
        x: &[f32],
        n: usize,
        acts: &mut [Vec<u8>; 4],
    ) {
        let k = jobs[0].0.cols;
        let mut done = [false; 4];
        for (w, _, _) in jobs.iter() {
            debug_assert_eq!(w.cols, k);
            let i = act_index(w.act);
            if !done[i] {
                let rb = w.act.row_bytes(k);
                grow(&mut acts[i], rb * n);
                self.quantize_rows(w.act, x, k, n, &mut acts[i][..rb * n]);
                done[i] = true;
            }
        }
        let outs: Vec<_> = jobs
            .iter_mut()
            .map(|(w, y, d)| {
                (
                    &**w,
                    Shared(y.as_mut_ptr()),
                    &acts[act_index(w.act)][..],
                    *d,
                )
            })
            .collect();
        let total: usize = outs.iter().map(|o| o.0.rows).sum();
        // Tokens are processed in tiles so the activation tile stays in cache while weight rows stream.
        const TILE: usize = 64;
        self.pool.run(&|ti, nt| {
            let mine = split(total, ti, nt, 4);
            let mut base = 0;
            for (w, out, act, d) in &outs {
                let (lo, hi) = (mine.start.max(base), mine.end.min(base + w.rows));
                base += w.rows;
                if lo >= hi {
                    continue;
                }

                let rb = w.act.row_bytes(w.cols);
                let rows = w.rows;
                let mut t0 = 0;
                while t0 < n {
                    let t1 = (t0 + TILE).min(n);
                    let one_row = |row: usize, from: usize| {
                        let wr = w.row(row);
                        let mut t = from;
                        if let Some(k4) = w.kernel4 {
                            let mut v = [0f32; 4];
                            while t + 4 <= t1 {
                                k4(wr, &act[t * rb..], rb, w.cols, &mut v);
                                for (j, x) in v.iter().enumerate() {
                                    // SAFETY: t + j < t1 <= n and row < rows, inside the n x rows
                                    // output; rows are split disjointly, so no other thread writes it.
                                    unsafe { *out.ptr().add((t + j) * rows + row) = *x };
                                }
                                t += 4;
                            }
                        }
                        for t in t..t1 {
                            let v = (w.kernel)(wr, &act[t * rb..(t + 1) * rb], w.cols);
                            // SAFETY: t < t1 <= n and row < rows, inside the n x rows output; rows are
                            // split disjointly, so no other thread writes it.
                            unsafe { *out.ptr().add(t * rows + row) = v };
                        }
                    };
                    let (r0, r1) = (lo - (base - rows), hi - (base - rows));
                    let mut row = r0;
                    if let Some(tile) = w.tile4.filter(|_| t1 - t0 >= 4) {
                        let mut v = [[0f32; 4]; 4];
                        while row + 4 <= r1 {
                            let mut t = t0;
                            if let Some(tile8) = w.tile8 {
                                let mut v8 = [[0f32; 8]; 4];
                                while t + 8 <= t1 {
                                    tile8(
                                        w.rows_from(row),
                                        w.row_bytes,
                                        &act[t * rb..],
                                        rb,
                                        w.cols,
                                        &mut v8,
                                    );
                                    // SAFETY: t + 8 <= t1 <= n and row + 4 <= rows, so the n x rows
                                    // output holds the tile; its rows are this thread's alone.
                                    unsafe { scatter_tile(out.ptr(), rows, t, row, &v8) };
                                    t += 8;
                                }
                            }
                            while t + 4 <= t1 {
                                tile(
                                    w.rows_from(row),
                                    w.row_bytes,
                                    &act[t * rb..],
                                    rb,
                                    w.cols,
                                    &mut v,
                                );
                                // SAFETY: t + 4 <= t1 <= n and row + 4 <= rows, so the n x rows
                                // output holds the tile; its rows are this thread's alone.
                                unsafe { scatter_tile(out.ptr(), rows, t, row, &v) };
                                t += 4;
                            }
                            if t < t1 {
                                for r in row..row + 4 {
                                    one_row(r, t);
                                }
                            }
                            row += 4;
                        }
                    }
                    for row in row..r1 {
                        one_row(row, t0);
                    }
                    t0 = t1;
                }
                if let Some(d) = d {
                    let cols = lo - (base - rows)..hi - (base - rows);
                    // SAFETY: the output holds n rows of `rows` = n_out floats; this thread's rows
                    // of the matrix (the output's columns `cols`) are its alone.
                    unsafe { lora::up_project(&d.groups, &d.h, d.n_out, cols, out.ptr()) };
                }
            }
        });
    }

    fn quantize_rows(&self, t: ActType, x: &[f32], k: usize, n: usize, out: &mut [u8]) {
        let rb = t.row_bytes(k);
        if n < 4 {
            for i in 0..n {
                simd::quantize_act(t, &x[i * k..(i + 1) * k], &mut out[i * rb..(i + 1) * rb]);
            }
            return;
        }
        let o = Shared(out.as_mut_ptr());
        self.pool.run(&|ti, nt| {
            for i in split(n, ti, nt, 1) {
                // SAFETY: i < n and `out` is rb * n bytes (the caller slices it so); split() gives
                // each thread its own tokens, so the rb-byte rows do not overlap.
                let dst = unsafe { std::slice::from_raw_parts_mut(o.ptr().add(i * rb), rb) };
                simd::quantize_act(t, &x[i * k..(i + 1) * k], dst);
            }
        });
    }

    /// The LoRA deltas of projections that all read `x` (`rows[i]`: batch row i's adapter): each
    /// group's scaled A·x, the A rows of every projection split over the pool in one step (on this
    /// thread when too small to pay for it). The B half runs inside the base matmul
    /// ([`Model::matmul_lora`]). Empty when no row has an adapter.
    fn deltas<'a>(
        &self,
        rows: &[Option<&'a Adapter>],
        li: usize,
        projs: &[Proj],
        x: &[f32],
    ) -> Vec<Option<Delta<'a>>> {
        if rows.iter().all(Option::is_none) {
            return Vec::new();
        }
        let k = x.len() / rows.len();
        let mut ds: Vec<Option<Delta<'a>>> = projs
            .iter()
            .map(|&p| {
                let (groups, n_h) = lora::groups(rows, li, p);
                (!groups.is_empty()).then(|| Delta {
                    total: groups.iter().map(|g| g.m.rank).sum(),
                    groups,
                    h: vec![0f32; n_h],
                    n_out: p.dims(&self.cfg).1,
                })
            })
            .collect();
        let macs: usize = ds
            .iter()
            .flatten()
            .flat_map(|d| d.groups.iter().map(|g| g.rows.len() * g.m.rank * k))
            .sum();
        // Below this a pool step (a few microseconds) costs more than the products it splits.
        if macs < 1 << 15 {
            for d in ds.iter_mut().flatten() {
                let h = &mut d.h;
                lora::down_project(&d.groups, x, k, 0..d.total, |i, v| h[i] = v);
            }
            return ds;
        }
        let parts: Vec<(&Delta, Shared<f32>, usize)> = ds
            .iter_mut()
            .flatten()
            .map(|d| {
                let (p, len) = (Shared(d.h.as_mut_ptr()), d.h.len());
                (&*d, p, len)
            })
            .collect();
        let all: usize = parts.iter().map(|p| p.0.total).sum();
        self.pool.run(&|ti, nt| {
            let mine = split(all, ti, nt, 1);
            let mut first = 0;
            for (d, h, len) in &parts {
                let (lo, hi) = (mine.start.max(first), mine.end.min(first + d.total));
                first += d.total;
                if lo >= hi {
                    continue;
                }
                let js = lo - (first - d.total)..hi - (first - d.total);
                lora::down_project(&d.groups, x, k, js, |i, v| {
                    assert!(i < *len);
                    // SAFETY: i < len = h.len(); split() gives each thread its own A rows, and each
                    // (member, A row) index of h belongs to exactly one A row, so no element is
                    // written twice.
                    unsafe { *h.ptr().add(i) = v };
                });
            }
        });
        ds
    }

    /// Runs one forward step over a batch of tokens from one or more sequences. Logits of the tokens
    /// marked `logits` are left in `scratch.logits`, `vocab` floats each, in batch order.
    pub fn forward(
        &self,
        batch: &[BatchToken],
        caches: &mut [&mut KvCache],
        s: &mut Scratch,
    ) -> Result<(), ForwardError> {
        self.forward_lora(batch, &[], caches, s)
    }

    /// [`Model::forward`] with LoRA adapters: `lora[i]` is batch token i's adapter (an empty slice:
    /// none for any token). The base matmuls are shared; each token adds its own adapter's delta.
    pub fn forward_lora(
        &self,
        batch: &[BatchToken],
        lora: &[Option<&Adapter>],
        caches: &mut [&mut KvCache],
        s: &mut Scratch,
    ) -> Result<(), ForwardError> {
        self.forward_tapped(batch, lora, caches, s, Tap::None)
    }

    /// [`Model::forward`] that also keeps the residual stream of the whole batch at the entry of
    /// every layer and after the last (`n_layers + 1` snapshots of `batch.len() × n_embd`, in
    /// `states`), so that [`Model::forward_from`] can re-run only the layers after a change.
    pub fn forward_recording(
        &self,
        batch: &[BatchToken],
        caches: &mut [&mut KvCache],
        s: &mut Scratch,
        states: &mut Vec<f32>,
    ) -> Result<(), ForwardError> {
        states.clear();
        self.forward_tapped(batch, &[], caches, s, Tap::Record(states))
    }

    /// Re-runs the same batch as a [`Model::forward_recording`] call from the entry of `layer`
    /// (`n_layers`: only the output projection), the earlier layers' output taken from `states`.
    /// Exact when nothing before `layer` changed since the recording (a sensitivity measurement
    /// swaps one matrix). The caches of the skipped layers are left as they were.
    pub fn forward_from(
        &self,
        batch: &[BatchToken],
        caches: &mut [&mut KvCache],
        s: &mut Scratch,
        layer: usize,
        states: &[f32],
    ) -> Result<(), ForwardError> {
        let per = batch.len() * self.cfg.n_embd;
        if layer > self.layers.len() || states.len() != (self.layers.len() + 1) * per {
            return Err(ForwardError::BadResume {
                layer,
                layers: self.layers.len(),
            });
        }
        self.forward_tapped(
            batch,
            &[],
            caches,
            s,
            Tap::From(layer, &states[layer * per..(layer + 1) * per]),
        )
    }

    /// Where [`Model::forward_from`] may resume after matrix `name` changed: the first layer that
    /// uses it (`n_layers` for an untied output projection); `None` for the token embedding, which
    /// changes the first layer's input itself (run the whole pass).
    pub fn resume_at(&self, name: &str) -> Result<Option<usize>, ModelError> {
        if self.tok_embd.name == name {
            return Ok(None);
        }
        if let Some(li) = self
            .layers
            .iter()
            .position(|l| l.matrices().iter().any(|m| m.name == name))
        {
            return Ok(Some(li));
        }
        if self.output.name == name {
            return Ok(Some(self.layers.len()));
        }
        Err(ModelError::MissingTensor(name.to_string()))
    }

    fn forward_tapped(
        &self,
        batch: &[BatchToken],
        lora: &[Option<&Adapter>],
        caches: &mut [&mut KvCache],
        s: &mut Scratch,
        mut tap: Tap,
    ) -> Result<(), ForwardError> {
        let c = &self.cfg;
        let n = batch.len();
        if !lora.is_empty() && lora.len() != n {
            return Err(ForwardError::LoraRows {
                rows: lora.len(),
                batch: n,
            });
        }
        if n == 0 {
            return Ok(());
        }
        // Validate before touching any state.
        let mut next: Vec<usize> = caches.iter().map(|kv| kv.len).collect();
        for b in batch {
            if b.token as usize >= c.vocab {
                return Err(ForwardError::BadToken(b.token));
            }
            let kv = caches
                .get(b.seq)
                .ok_or(ForwardError::BadSeq(b.seq, caches.len()))?;
            if b.pos >= kv.n_ctx {
                return Err(ForwardError::ContextFull {
                    pos: b.pos,
                    n_ctx: kv.n_ctx,
                });
            }
            if b.pos != next[b.seq] {
                return Err(ForwardError::BadPos {
                    seq: b.seq,
                    pos: b.pos,
                    expected: next[b.seq],
                });
            }
            next[b.seq] += 1;
        }
        for (kv, &upto) in caches.iter_mut().zip(&next) {
            kv.reserve(upto);
        }

        let (e, qd, kvd, ff, hd) = (c.n_embd, c.q_dim(), c.kv_dim(), c.n_ff, c.head_dim);
        grow(&mut s.x, n * e);
        grow(&mut s.xb, n * e.max(qd));
        grow(&mut s.q, n * qd);
        grow(&mut s.k, n * kvd);
        grow(&mut s.v, n * kvd);
        grow(&mut s.att, n * qd);
        grow(&mut s.hb, n * ff);
        grow(&mut s.hb2, n * ff);

        let start = match tap {
            Tap::From(layer, x) => {
                s.x[..n * e].copy_from_slice(x);
                layer
            }
            _ => {
                for (i, b) in batch.iter().enumerate() {
                    let x = &mut s.x[i * e..(i + 1) * e];
                    self.tok_embd.row_f32(b.token as usize, x);
                    if c.embd_scale != 1.0 {
                        x.iter_mut().for_each(|v| *v *= c.embd_scale);
                    }
                }
                0
            }
        };

        for (li, l) in self.layers.iter().enumerate().skip(start) {
            if let Tap::Record(states) = &mut tap {
                states.extend_from_slice(&s.x[..n * e]);
            }
            // Attention block.
            for i in 0..n {
                rms_norm_to(
                    &mut s.xb[i * e..(i + 1) * e],
                    &s.x[i * e..(i + 1) * e],
                    &l.attn_norm,
                    c.eps,
                );
            }
            let d = self.deltas(lora, li, &[Proj::Q, Proj::K, Proj::V], &s.xb[..n * e]);
            self.matmul_lora(
                &mut [
                    (&l.wq, &mut s.q[..n * qd]),
                    (&l.wk, &mut s.k[..n * kvd]),
                    (&l.wv, &mut s.v[..n * kvd]),
                ],
                &d,
                &s.xb[..n * e],
                n,
                &mut s.mm,
            );
            let base = if c.is_swa(li).is_some() {
                c.rope_base_swa
            } else {
                c.rope_base
            };
            for (i, b) in batch.iter().enumerate() {
                let q = &mut s.q[i * qd..(i + 1) * qd];
                let k = &mut s.k[i * kvd..(i + 1) * kvd];
                for (v, bias) in [(&mut *q, &l.bq), (&mut *k, &l.bk)] {
                    if let Some(bias) = bias {
                        v.iter_mut().zip(bias).for_each(|(a, b)| *a += b);
                    }
                }
                if let Some(bv) = &l.bv {
                    s.v[i * kvd..(i + 1) * kvd]
                        .iter_mut()
                        .zip(bv)
                        .for_each(|(a, b)| *a += b);
                }
                for h in q.chunks_exact_mut(hd) {
                    if let Some(w) = &l.q_norm {
                        rms_norm(h, w, c.eps);
                    }
                    rope(h, b.pos, base, c.rope_neox);
                    if c.q_scale != 1.0 {
                        h.iter_mut().for_each(|v| *v *= c.q_scale);
                    }
                }
                for h in k.chunks_exact_mut(hd) {
                    if let Some(w) = &l.k_norm {
                        rms_norm(h, w, c.eps);
                    }
                    rope(h, b.pos, base, c.rope_neox);
                }
                let kv = &mut caches[b.seq];
                let at = b.pos * kvd;
                for (dst, src) in kv.k[li][at..at + kvd].iter_mut().zip(k.iter()) {
                    *dst = f16::from_f32(*src).to_bits();
                }
                for (dst, src) in kv.v[li][at..at + kvd]
                    .iter_mut()
                    .zip(&s.v[i * kvd..(i + 1) * kvd])
                {
                    *dst = f16::from_f32(*src).to_bits();
                }
            }
            self.attention(li, batch, caches, s);
            let d = self.deltas(lora, li, &[Proj::O], &s.att[..n * qd]);
            self.matmul_lora(
                &mut [(&l.wo, &mut s.xb[..n * e])],
                &d,
                &s.att[..n * qd],
                n,
                &mut s.mm,
            );
            for i in 0..n {
                let o = &mut s.xb[i * e..(i + 1) * e];
                if let Some(w) = &l.post_attn_norm {
                    rms_norm(o, w, c.eps);
                }
                s.x[i * e..(i + 1) * e]
                    .iter_mut()
                    .zip(o.iter())
                    .for_each(|(a, b)| *a += b);
            }

            // Feed-forward block.
            for i in 0..n {
                rms_norm_to(
                    &mut s.xb[i * e..(i + 1) * e],
                    &s.x[i * e..(i + 1) * e],
                    &l.ffn_norm,
                    c.eps,
                );
            }
            let d = self.deltas(lora, li, &[Proj::Gate, Proj::Up], &s.xb[..n * e]);
            self.matmul_lora(
                &mut [
                    (&l.gate, &mut s.hb[..n * ff]),
                    (&l.up, &mut s.hb2[..n * ff]),
                ],
                &d,
                &s.xb[..n * e],
                n,
                &mut s.mm,
            );
            self.glu(c.gelu, &mut s.hb[..n * ff], &s.hb2[..n * ff], n);
            let d = self.deltas(lora, li, &[Proj::Down], &s.hb[..n * ff]);
            self.matmul_lora(
                &mut [(&l.down, &mut s.xb[..n * e])],
                &d,
                &s.hb[..n * ff],
                n,
                &mut s.mm,
            );
            for i in 0..n {
                let o = &mut s.xb[i * e..(i + 1) * e];
                if let Some(w) = &l.post_ffn_norm {
                    rms_norm(o, w, c.eps);
                }
                s.x[i * e..(i + 1) * e]
                    .iter_mut()
                    .zip(o.iter())
                    .for_each(|(a, b)| *a += b);
            }
        }
        if let Tap::Record(states) = &mut tap {
            states.extend_from_slice(&s.x[..n * e]);
        }
        for (kv, &upto) in caches.iter_mut().zip(&next) {
            kv.len = upto;
        }

        // Output projection only for the tokens that asked for logits.
        let want: Vec<usize> = (0..n).filter(|&i| batch[i].logits).collect();
        let m = want.len();
        for (j, &i) in want.iter().enumerate() {
            rms_norm_to(
                &mut s.xb[j * e..(j + 1) * e],
                &s.x[i * e..(i + 1) * e],
                &self.output_norm,
                c.eps,
            );
        }
        grow(&mut s.logits, m * c.vocab);
        s.logits.truncate(m * c.vocab);
        let mut logits = std::mem::take(&mut s.logits);
        if m > 0 {
            self.matmul(
                &mut [(&self.output, &mut logits[..])],
                &s.xb[..m * e],
                m,
                &mut s.mm,
            );
        }
        s.logits = logits;
        Ok(())
    }

    /// Causal attention of every (token, head) of the batch against its own sequence's cache.
    fn attention(&self, li: usize, batch: &[BatchToken], caches: &[&mut KvCache], s: &mut Scratch) {
        let c = &self.cfg;
        let (qd, kvd, hd) = (c.q_dim(), c.kv_dim(), c.head_dim);
        let group = c.n_head / c.n_head_kv;
        let window = c.is_swa(li);
        let n = batch.len();
        let work = n * c.n_head;
        let out = Shared(s.att.as_mut_ptr());
        let q = &s.q;
        self.pool.run(&|ti, nt| {
            let mut scores: Vec<f32> = Vec::new();
            let mut q16: Vec<u8> = Vec::with_capacity(hd * 4);
            let f16dot = simd::kernel(GgmlType::F16).unwrap_or(quant_f16_dot);
            // Round-robin: later tokens of a prefill see more keys, so contiguous ranges would be uneven.
            for w in (ti..work).step_by(nt) {
                let (i, h) = (w / c.n_head, w % c.n_head);
                let b = batch[i];
                let kv = &caches[b.seq];
                let kh = h / group;
                let qh = &q[i * qd + h * hd..i * qd + (h + 1) * hd];
                let start = window.map_or(0, |win| (b.pos + 1).saturating_sub(win));
                let len = b.pos + 1 - start;
                scores.clear();
                scores.resize(len, 0.0);
                let kc = &kv.k[li];
                // Queries meet f16 keys as f16, and probabilities meet f16 values as f16: the same
                // roundings as llama.cpp's attention, which keeps greedy decoding in step with it.
                q16.clear();
                q16.extend(
                    qh.iter()
                        .flat_map(|&v| f16::from_f32(v).to_f32().to_le_bytes()),
                );
                for (j, sc) in scores.iter_mut().enumerate() {
                    let at = (start + j) * kvd + kh * hd;
                    // SAFETY: kc[at..at + hd] is a bounds-checked slice of hd initialised u16s, i.e.
                    // hd * 2 bytes; u8 has alignment 1 and any bit pattern is a valid u8.
                    let kb: &[u8] = unsafe {
                        std::slice::from_raw_parts(kc[at..at + hd].as_ptr() as *const u8, hd * 2)
                    };
                    *sc = f16dot(kb, &q16, hd) * c.kq_scale;
                }
                let mx = scores.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let mut sum = 0f64;
                for v in scores.iter_mut() {
                    *v = (*v - mx).exp();
                    sum += *v as f64;
                }
                let inv = (1.0 / sum) as f32;
                // SAFETY: i < n and h < n_head, so the hd floats at i * qd + h * hd lie inside s.att
                // (grown to n * qd in forward); each work item w, i.e. each (token, head), goes to
                // exactly one thread (w steps by nt from ti), so the slices are disjoint.
                let o =
                    unsafe { std::slice::from_raw_parts_mut(out.ptr().add(i * qd + h * hd), hd) };
                o.fill(0.0);
                let vc = &kv.v[li];
                for (j, &p) in scores.iter().enumerate() {
                    let at = (start + j) * kvd + kh * hd;
                    simd::axpy_f16(o, f16::from_f32(p * inv).to_f32(), &vc[at..at + hd]);
                }
            }
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn rope_rotates_pairs_and_preserves_norm() {
        let mut x: Vec<f32> = (0..8).map(|i| i as f32 * 0.1 + 0.3).collect();
        let before: f32 = x.iter().map(|v| v * v).sum();
        rope(&mut x, 7, 10000.0, true);
        let after: f32 = x.iter().map(|v| v * v).sum();
        assert!((before - after).abs() < 1e-4);
        let mut y: Vec<f32> = vec![1.0, 0.0, 1.0, 0.0];
        rope(&mut y, 0, 10000.0, false);
        assert_eq!(y, vec![1.0, 0.0, 1.0, 0.0]);
    }

    #[test]
    fn rms_norm_unit_weights_gives_unit_rms() {
        let mut x = vec![1.0f32, 2.0, 3.0, 4.0];
        rms_norm(&mut x, &[1.0; 4], 0.0);
        let ms: f32 = x.iter().map(|v| v * v).sum::<f32>() / 4.0;
        assert!((ms - 1.0).abs() < 1e-5);
    }
}
