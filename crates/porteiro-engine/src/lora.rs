//! LoRA adapters in llama.cpp's GGUF format, applied at run time: y = W·x + s·B·(A·x), with the
//! quantized base weights untouched and shared. A batch may mix sequences with different adapters
//! and none: the base matmul runs once for every row, then each row adds its own adapter's delta.
//!
//! File format (what `convert_lora_to_gguf.py` writes and `llama --lora` reads): `general.type =
//! "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha`, `general.architecture` equal to the
//! base's, and for each adapted matrix `<base tensor>.lora_a` with ggml dims `[in, rank]` and
//! `<base tensor>.lora_b` with dims `[rank, out]` (f32, f16 or bf16). The effective scale is
//! `scale · alpha / rank` (`scale` when alpha is 0), as in llama.cpp.
//!
//! Weights are held in f16 (half the bytes of f32: decoding is bound by the bytes read per step),
//! converted to f32 a row at a time, with f32 arithmetic.

// A kernel module: the f16 × f32 dot product has an AVX2/F16C/FMA variant picked at run time (each
// unsafe use says why it is sound), checked against the scalar one by the tests.
#![allow(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use half::{bf16, f16};
use porteiro_models::gguf::{GgmlType, GgufFile, TensorInfo, Value};
use porteiro_models::gguf_write::{self, TensorOut};

use crate::model::Config;

/// The projections an adapter may target, in the order a layer runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// The base tensor's name stem in a layer (`blk.N.<stem>.weight`).
    pub fn stem(self) -> &'static str {
        match self {
            Proj::Q => "attn_q",
            Proj::K => "attn_k",
            Proj::V => "attn_v",
            Proj::O => "attn_output",
            Proj::Gate => "ffn_gate",
            Proj::Up => "ffn_up",
            Proj::Down => "ffn_down",
        }
    }

    /// Short name as in `--targets` (q, k, v, o, gate, up, down).
    pub fn short(self) -> &'static str {
        match self {
            Proj::Q => "q",
            Proj::K => "k",
            Proj::V => "v",
            Proj::O => "o",
            Proj::Gate => "gate",
            Proj::Up => "up",
            Proj::Down => "down",
        }
    }

    /// (input, output) sizes of the base matrix.
    pub fn dims(self, c: &Config) -> (usize, usize) {
        let (e, q, kv, ff) = (c.n_embd, c.q_dim(), c.kv_dim(), c.n_ff);
        match self {
            Proj::Q => (e, q),
            Proj::K | Proj::V => (e, kv),
            Proj::O => (q, e),
            Proj::Gate | Proj::Up => (e, ff),
            Proj::Down => (ff, e),
        }
    }

    /// Position in [`Proj::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error(transparent)]
    Gguf(#[from] porteiro_models::gguf::GgufError),
    #[error("{path}: not a LoRA adapter ({why})")]
    NotAdapter { path: PathBuf, why: String },
    #[error("{path}: the adapter is for architecture `{adapter}`, the model is `{model}`")]
    Architecture {
        path: PathBuf,
        adapter: String,
        model: String,
    },
    #[error("{path}: tensor `{tensor}`: {why}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        why: String,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One adapted matrix as given (training, tests): A is rank × in, B is out × rank, row-major.
#[derive(Debug, Clone)]
pub struct LoraPair {
    pub rank: usize,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

/// One adapted matrix as an adapter holds it: f16, A as in [`LoraPair`] (rank × in) and B
/// transposed (rank × out), so that B·h runs as `rank` contiguous axpys over the outputs instead
/// of one `rank`-long dot product (and a horizontal sum) per output.
#[derive(Debug, Clone)]
pub struct Matrices {
    pub rank: usize,
    a: Vec<f16>,
    bt: Vec<f16>,
}

impl Matrices {
    fn new(p: &LoraPair) -> Self {
        let n = p.b.len() / p.rank.max(1);
        let mut bt = vec![f16::ZERO; p.b.len()];
        for o in 0..n {
            for j in 0..p.rank {
                bt[j * n + o] = f16::from_f32(p.b[o * p.rank + j]);
            }
        }
        Self {
            rank: p.rank,
            a: p.a.iter().map(|&v| f16::from_f32(v)).collect(),
            bt,
        }
    }

    /// A (rank × in) in f32.
    pub fn a(&self) -> Vec<f32> {
        self.a.iter().map(|v| v.to_f32()).collect()
    }

    /// B (out × rank) in f32.
    pub fn b(&self) -> Vec<f32> {
        let (r, n) = (self.rank, self.n());
        let mut b = vec![0f32; self.bt.len()];
        for j in 0..r {
            for o in 0..n {
                b[o * r + j] = self.bt[j * n + o].to_f32();
            }
        }
        b
    }

    /// Inputs of the base matrix.
    pub fn k(&self) -> usize {
        self.a.len() / self.rank
    }

    /// Outputs of the base matrix.
    pub fn n(&self) -> usize {
        self.bt.len() / self.rank
    }

    /// Row `j` of A (k values).
    #[inline]
    pub fn a_row(&self, j: usize, k: usize) -> &[f16] {
        &self.a[j * k..(j + 1) * k]
    }

    /// Outputs `cols` of row `j` of Bᵀ (B's column j).
    #[inline]
    fn bt_cols(&self, j: usize, cols: std::ops::Range<usize>) -> &[f16] {
        let n = self.n();
        &self.bt[j * n + cols.start..j * n + cols.end]
    }

    fn bytes(&self) -> usize {
        (self.a.len() + self.bt.len()) * 2
    }
}

/// A loaded adapter.
#[derive(Debug)]
pub struct Adapter {
    pub path: PathBuf,
    pub alpha: f32,
    /// The user's multiplier (`--lora-scale`, the config's `scale`).
    pub scale: f32,
    /// Per layer, per projection (indexed by `Proj as usize`).
    layers: Vec<[Option<Matrices>; 7]>,
}

fn floats(file: &GgufFile, t: &TensorInfo, path: &Path) -> Result<Vec<f32>, LoraError> {
    let bytes = file.data(t);
    let bad = |why: String| LoraError::Tensor {
        path: path.to_path_buf(),
        tensor: t.name.clone(),
        why,
    };
    let n = t.n_elements() as usize;
    let v: Vec<f32> = match t.dtype {
        GgmlType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        GgmlType::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        GgmlType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(bad(format!(
                "type {} is not supported for adapters (f32, f16 or bf16)",
                other.name()
            )))
        }
    };
    if v.len() != n {
        return Err(bad(format!("holds {} values, its shape says {n}", v.len())));
    }
    Ok(v)
}

impl Adapter {
    /// Reads an adapter and checks it against the base model's configuration.
    pub fn open(path: &Path, cfg: &Config, scale: f32) -> Result<Self, LoraError> {
        let file = GgufFile::open(path)?;
        let p = path.to_path_buf();
        let not = |why: &str| LoraError::NotAdapter {
            path: p.clone(),
            why: why.to_string(),
        };
        match file.get("general.type") {
            Some(Value::String(s)) if s == "adapter" => {}
            Some(Value::String(s)) => return Err(not(&format!("general.type is `{s}`"))),
            _ => return Err(not("general.type is missing")),
        }
        match file.get("adapter.type") {
            Some(Value::String(s)) if s == "lora" => {}
            Some(Value::String(s)) => return Err(not(&format!("adapter.type is `{s}`"))),
            _ => return Err(not("adapter.type is missing")),
        }
        let arch = file.architecture()?.to_string();
        if arch != cfg.arch.name() {
            return Err(LoraError::Architecture {
                path: p,
                adapter: arch,
                model: cfg.arch.name().to_string(),
            });
        }
        let alpha = file
            .get("adapter.lora.alpha")
            .and_then(Value::as_f64)
            .unwrap_or(0.0) as f32;
        let mut layers: Vec<[Option<Matrices>; 7]> =
            (0..cfg.n_layer).map(|_| Default::default()).collect();
        let tensor_err = |tensor: &str, why: String| LoraError::Tensor {
            path: path.to_path_buf(),
            tensor: tensor.to_string(),
            why,
        };
        let mut found = 0;
        for t in file.tensors() {
            let Some(base) = t.name.strip_suffix(".lora_a") else {
                if t.name.ends_with(".lora_b") {
                    continue;
                }
                return Err(tensor_err(
                    &t.name,
                    "is neither a .lora_a nor a .lora_b tensor".into(),
                ));
            };
            let (layer, proj) = parse_target(base, cfg.n_layer).ok_or_else(|| {
                tensor_err(
                    &t.name,
                    format!(
                        "adapts `{base}`, which is not a layer's attention or MLP projection of this {} model ({} layers)",
                        cfg.arch.name(),
                        cfg.n_layer
                    ),
                )
            })?;
            let b_name = format!("{base}.lora_b");
            let tb = file
                .tensor(&b_name)
                .ok_or_else(|| tensor_err(&t.name, format!("has no `{b_name}`")))?;
            let (k, n) = proj.dims(cfg);
            let rank = match t.dims.as_slice() {
                [kk, r] if *kk as usize == k && *r > 0 => *r as usize,
                d => {
                    return Err(tensor_err(
                        &t.name,
                        format!(
                            "has shape {d:?}; the base takes {k} inputs, so it must be [{k}, rank]"
                        ),
                    ))
                }
            };
            if tb.dims.as_slice() != [rank as u64, n as u64] {
                return Err(tensor_err(
                    &b_name,
                    format!(
                        "has shape {:?}; with rank {rank} and {n} outputs it must be [{rank}, {n}]",
                        tb.dims
                    ),
                ));
            }
            layers[layer][proj.index()] = Some(Matrices::new(&LoraPair {
                rank,
                a: floats(&file, t, path)?,
                b: floats(&file, tb, path)?,
            }));
            found += 1;
        }
        for t in file.tensors() {
            if let Some(base) = t.name.strip_suffix(".lora_b") {
                if file.tensor(&format!("{base}.lora_a")).is_none() {
                    return Err(tensor_err(&t.name, format!("has no `{base}.lora_a`")));
                }
            }
        }
        if found == 0 {
            return Err(not("it holds no .lora_a / .lora_b tensor pairs"));
        }
        Ok(Self {
            path: path.to_path_buf(),
            alpha,
            scale,
            layers,
        })
    }

    /// An adapter built in memory (training, tests).
    pub fn from_pairs(
        cfg: &Config,
        alpha: f32,
        scale: f32,
        pairs: Vec<(usize, Proj, LoraPair)>,
    ) -> Self {
        let mut layers: Vec<[Option<Matrices>; 7]> =
            (0..cfg.n_layer).map(|_| Default::default()).collect();
        for (l, p, pair) in pairs {
            if let Some(slot) = layers.get_mut(l) {
                slot[p.index()] = Some(Matrices::new(&pair));
            }
        }
        Self {
            path: PathBuf::new(),
            alpha,
            scale,
            layers,
        }
    }

    /// A seeded random adapter of rank `rank` on `projs` of every layer (benchmarks, tests, golden
    /// checks): A uniform in ±1/√in (PEFT's Kaiming-uniform scale), B uniform in ±`b_amp` (0: the
    /// adapter changes nothing, as a freshly initialised one), `alpha` as given.
    pub fn random(
        cfg: &Config,
        rank: usize,
        projs: &[Proj],
        b_amp: f32,
        alpha: f32,
        seed: u64,
    ) -> Self {
        let mut rng = crate::sampler::Rng::new(seed);
        let mut uniform = |n: usize, amp: f32| -> Vec<f32> {
            (0..n)
                .map(|_| (rng.f64() as f32 * 2.0 - 1.0) * amp)
                .collect()
        };
        let mut pairs = Vec::new();
        for l in 0..cfg.n_layer {
            for &p in projs {
                let (k, n) = p.dims(cfg);
                let a = uniform(rank * k, 1.0 / (k as f32).sqrt());
                let b = uniform(n * rank, b_amp);
                pairs.push((l, p, LoraPair { rank, a, b }));
            }
        }
        Self::from_pairs(cfg, alpha, 1.0, pairs)
    }

    /// Writes the adapter as llama.cpp reads it (f16 tensors: exactly what is held), atomically.
    pub fn write(&self, path: &Path, arch: &str) -> Result<(), LoraError> {
        let mut bufs: Vec<(String, Vec<u64>, Vec<u8>)> = Vec::new();
        for (l, projs) in self.layers.iter().enumerate() {
            for p in Proj::ALL {
                if let Some(pair) = &projs[p.index()] {
                    let (k, n) = (pair.k(), pair.n());
                    let base = format!("blk.{l}.{}.weight", p.stem());
                    let le = |v: &[f16]| v.iter().flat_map(|f| f.to_le_bytes()).collect();
                    bufs.push((
                        format!("{base}.lora_a"),
                        vec![k as u64, pair.rank as u64],
                        le(&pair.a),
                    ));
                    bufs.push((
                        format!("{base}.lora_b"),
                        vec![pair.rank as u64, n as u64],
                        pair.b()
                            .iter()
                            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                            .collect(),
                    ));
                }
            }
        }
        let tensors: Vec<TensorOut> = bufs
            .iter()
            .map(|(name, dims, data)| TensorOut {
                name: name.clone(),
                dims: dims.clone(),
                dtype: GgmlType::F16,
                data,
            })
            .collect();
        let meta = [
            ("general.architecture", Value::String(arch.to_string())),
            ("general.type", Value::String("adapter".into())),
            ("adapter.type", Value::String("lora".into())),
            ("adapter.lora.alpha", Value::F32(self.alpha)),
        ];
        gguf_write::write(path, &meta, &tensors).map_err(|source| LoraError::Write {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Bytes the adapter holds in memory.
    pub fn bytes(&self) -> usize {
        self.pairs().map(|(_, _, p)| p.bytes()).sum()
    }

    /// Every adapted matrix.
    pub fn pairs(&self) -> impl Iterator<Item = (usize, Proj, &Matrices)> {
        self.layers.iter().enumerate().flat_map(|(l, projs)| {
            Proj::ALL
                .into_iter()
                .filter_map(move |p| projs[p.index()].as_ref().map(|pair| (l, p, pair)))
        })
    }

    /// The pair adapting the base tensor `name` (`blk.N.<stem>.weight`), if any.
    pub fn pair_for(&self, name: &str) -> Option<&Matrices> {
        let (layer, p) = parse_target(name, self.layers.len())?;
        self.pair(layer, p)
    }

    pub fn pair(&self, layer: usize, p: Proj) -> Option<&Matrices> {
        self.layers.get(layer).and_then(|l| l[p.index()].as_ref())
    }

    /// The multiplier of B·A·x: `scale · alpha / rank`, or `scale` when the file has no alpha.
    pub fn effective_scale(&self, rank: usize) -> f32 {
        if self.alpha == 0.0 {
            self.scale
        } else {
            self.scale * self.alpha / rank as f32
        }
    }
}

/// `blk.N.<stem>.weight` → (N, projection).
fn parse_target(base: &str, n_layer: usize) -> Option<(usize, Proj)> {
    let rest = base.strip_prefix("blk.")?;
    let (l, rest) = rest.split_once('.')?;
    let layer: usize = l.parse().ok()?;
    let stem = rest.strip_suffix(".weight")?;
    let proj = Proj::ALL.into_iter().find(|p| p.stem() == stem)?;
    (layer < n_layer).then_some((layer, proj))
}

/// `Σ a[i]·x[i]` for f16 weights and f32 inputs, in eight independent lanes (the scalar
/// reference of [`dot_f16`]).
pub fn dot_f16_scalar(a: &[f16], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cx) = (a.chunks_exact(8), x.chunks_exact(8));
    let (ra, rx) = (ca.remainder(), cx.remainder());
    for (w, v) in ca.zip(cx) {
        for i in 0..8 {
            acc[i] += w[i].to_f32() * v[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (w, v) in ra.iter().zip(rx) {
        s += w.to_f32() * v;
    }
    s
}

/// `Σ a[i]·x[i]` in f32, eight lanes (the scalar reference of [`dot_f32`]).
pub fn dot_f32_scalar(a: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cx) = (a.chunks_exact(8), x.chunks_exact(8));
    let (ra, rx) = (ca.remainder(), cx.remainder());
    for (w, v) in ca.zip(cx) {
        for i in 0..8 {
            acc[i] += w[i] * v[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (w, v) in ra.iter().zip(rx) {
        s += w * v;
    }
    s
}

/// `dst[i] = src[i]` widened (the scalar reference of [`widen`]).
pub fn widen_scalar(src: &[f16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

/// `out[c] += Σ_j h[j] · b[j·stride + c]` for `c < out.len()`: the rank-`h.len()` update of one
/// row's outputs from B's columns held in f32, `stride` apart (the scalar reference of [`axpys`]).
pub fn axpys_scalar(b: &[f32], stride: usize, h: &[f32], out: &mut [f32]) {
    for (j, &hj) in h.iter().enumerate() {
        let row = &b[j * stride..j * stride + out.len()];
        for (o, &w) in out.iter_mut().zip(row) {
            *o += hj * w;
        }
    }
}

/// [`axpys_scalar`] with B in f16 (the scalar reference of [`axpys_f16`]).
pub fn axpys_f16_scalar(b: &[f16], stride: usize, h: &[f32], out: &mut [f32]) {
    for (j, &hj) in h.iter().enumerate() {
        let row = &b[j * stride..j * stride + out.len()];
        for (o, &w) in out.iter_mut().zip(row) {
            *o += hj * w.to_f32();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::f16;
    use std::arch::x86_64::*;

    /// Sum of the eight lanes.
    #[target_feature(enable = "avx2")]
    unsafe fn hsum(acc: __m256) -> f32 {
        let hi = _mm256_extractf128_ps(acc, 1);
        let q = _mm_add_ps(_mm256_castps256_ps128(acc), hi);
        let d = _mm_add_ps(q, _mm_movehl_ps(q, q));
        _mm_cvtss_f32(_mm_add_ss(d, _mm_shuffle_ps(d, d, 1)))
    }

    /// # Safety
    /// The CPU must have AVX2, FMA and F16C (checked by the caller at run time).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16(a: &[f16], x: &[f32]) -> f32 {
        let n = a.len().min(x.len());
        let (pa, px) = (a.as_ptr(), x.as_ptr());
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: i + 16 <= n <= both lengths, so the 16 halves (two 128-bit loads) and the
            // 16 floats (two 256-bit loads) read are inside the slices; loads are unaligned.
            unsafe {
                let h0 = _mm_loadu_si128(pa.add(i) as *const __m128i);
                let h1 = _mm_loadu_si128(pa.add(i + 8) as *const __m128i);
                acc0 = _mm256_fmadd_ps(_mm256_cvtph_ps(h0), _mm256_loadu_ps(px.add(i)), acc0);
                acc1 = _mm256_fmadd_ps(_mm256_cvtph_ps(h1), _mm256_loadu_ps(px.add(i + 8)), acc1);
            }
            i += 16;
        }
        let mut s = hsum(_mm256_add_ps(acc0, acc1));
        for j in i..n {
            s += a[j].to_f32() * x[j];
        }
        s
    }

    /// # Safety
    /// The CPU must have AVX2 and FMA (checked by the caller at run time).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_f32(a: &[f32], x: &[f32]) -> f32 {
        let n = a.len().min(x.len());
        let (pa, px) = (a.as_ptr(), x.as_ptr());
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: i + 16 <= n <= both lengths: the four 8-float loads are inside the slices.
            unsafe {
                acc0 =
                    _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(px.add(i)), acc0);
                acc1 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(pa.add(i + 8)),
                    _mm256_loadu_ps(px.add(i + 8)),
                    acc1,
                );
            }
            i += 16;
        }
        let mut s = hsum(_mm256_add_ps(acc0, acc1));
        for j in i..n {
            s += a[j] * x[j];
        }
        s
    }

    /// # Safety
    /// The CPU must have AVX2 and F16C (checked by the caller at run time).
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn widen(src: &[f16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n <= both lengths: 8 halves read, 8 floats written, unaligned.
            unsafe {
                let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            }
            i += 8;
        }
        for j in i..n {
            dst[j] = src[j].to_f32();
        }
    }

    /// # Safety
    /// The CPU must have AVX2 and FMA; `b` holds `h.len()` rows of at least `out.len()` floats,
    /// `stride` apart (checked by the caller).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpys(b: &[f32], stride: usize, h: &[f32], out: &mut [f32]) {
        let n = out.len();
        let (pb, po) = (b.as_ptr(), out.as_mut_ptr());
        let mut c = 0;
        // 32 outputs at a time in four registers, each B element loaded once.
        while c + 32 <= n {
            // SAFETY: c + 32 <= n = out.len(), and row j's floats c..c + 32 lie inside `b`
            // (j·stride + n <= b.len(), the caller's contract).
            unsafe {
                let mut acc = [
                    _mm256_loadu_ps(po.add(c)),
                    _mm256_loadu_ps(po.add(c + 8)),
                    _mm256_loadu_ps(po.add(c + 16)),
                    _mm256_loadu_ps(po.add(c + 24)),
                ];
                for (j, &hj) in h.iter().enumerate() {
                    let v = _mm256_set1_ps(hj);
                    let row = pb.add(j * stride + c);
                    for (q, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(v, _mm256_loadu_ps(row.add(q * 8)), *a);
                    }
                }
                for (q, a) in acc.iter().enumerate() {
                    _mm256_storeu_ps(po.add(c + q * 8), *a);
                }
            }
            c += 32;
        }
        while c + 8 <= n {
            // SAFETY: as above, for 8 outputs.
            unsafe {
                let mut a = _mm256_loadu_ps(po.add(c));
                for (j, &hj) in h.iter().enumerate() {
                    a = _mm256_fmadd_ps(
                        _mm256_set1_ps(hj),
                        _mm256_loadu_ps(pb.add(j * stride + c)),
                        a,
                    );
                }
                _mm256_storeu_ps(po.add(c), a);
            }
            c += 8;
        }
        for c in c..n {
            for (j, &hj) in h.iter().enumerate() {
                out[c] += hj * b[j * stride + c];
            }
        }
    }

    /// # Safety
    /// The CPU must have AVX2, FMA and F16C; `b` holds `h.len()` rows of at least `out.len()`
    /// halves, `stride` apart (checked by the caller).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpys_f16(b: &[f16], stride: usize, h: &[f32], out: &mut [f32]) {
        let n = out.len();
        let (pb, po) = (b.as_ptr(), out.as_mut_ptr());
        let mut c = 0;
        while c + 32 <= n {
            // SAFETY: c + 32 <= n = out.len(), and row j's halves c..c + 32 lie inside `b`
            // (j·stride + n <= b.len(), the caller's contract).
            unsafe {
                let mut acc = [
                    _mm256_loadu_ps(po.add(c)),
                    _mm256_loadu_ps(po.add(c + 8)),
                    _mm256_loadu_ps(po.add(c + 16)),
                    _mm256_loadu_ps(po.add(c + 24)),
                ];
                for (j, &hj) in h.iter().enumerate() {
                    let v = _mm256_set1_ps(hj);
                    let row = pb.add(j * stride + c);
                    for (q, a) in acc.iter_mut().enumerate() {
                        let w = _mm256_cvtph_ps(_mm_loadu_si128(row.add(q * 8) as *const __m128i));
                        *a = _mm256_fmadd_ps(v, w, *a);
                    }
                }
                for (q, a) in acc.iter().enumerate() {
                    _mm256_storeu_ps(po.add(c + q * 8), *a);
                }
            }
            c += 32;
        }
        while c + 8 <= n {
            // SAFETY: as above, for 8 outputs.
            unsafe {
                let mut a = _mm256_loadu_ps(po.add(c));
                for (j, &hj) in h.iter().enumerate() {
                    let w =
                        _mm256_cvtph_ps(_mm_loadu_si128(pb.add(j * stride + c) as *const __m128i));
                    a = _mm256_fmadd_ps(_mm256_set1_ps(hj), w, a);
                }
                _mm256_storeu_ps(po.add(c), a);
            }
            c += 8;
        }
        for c in c..n {
            for (j, &hj) in h.iter().enumerate() {
                out[c] += hj * b[j * stride + c].to_f32();
            }
        }
    }
}

fn simd_ok() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::env::var("PORTEIRO_ISA").map_or(true, |v| v != "scalar")
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// `Σ a[i]·x[i]` for f16 weights and f32 inputs: AVX2/F16C/FMA where the CPU has them
/// (`PORTEIRO_ISA=scalar` forces the reference).
#[inline]
pub fn dot_f16(a: &[f16], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd_ok() {
        // SAFETY: simd_ok() checked AVX2, FMA and F16C on this CPU.
        return unsafe { x86::dot_f16(a, x) };
    }
    dot_f16_scalar(a, x)
}

/// `Σ a[i]·x[i]` in f32: AVX2/FMA where the CPU has them.
#[inline]
pub fn dot_f32(a: &[f32], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd_ok() {
        // SAFETY: simd_ok() checked AVX2 and FMA on this CPU.
        return unsafe { x86::dot_f32(a, x) };
    }
    dot_f32_scalar(a, x)
}

/// `dst[i] = src[i]` for `i < min(len)`: F16C where the CPU has it.
#[inline]
pub fn widen(src: &[f16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd_ok() {
        // SAFETY: simd_ok() checked AVX2 and F16C on this CPU.
        return unsafe { x86::widen(src, dst) };
    }
    widen_scalar(src, dst)
}

/// `out[c] += Σ_j h[j] · b[j·stride + c]`: AVX2/FMA where the CPU has them.
///
/// # Panics
/// If `b` does not hold `h.len()` rows of `out.len()` floats `stride` apart.
#[inline]
pub fn axpys(b: &[f32], stride: usize, h: &[f32], out: &mut [f32]) {
    if let Some(last) = h.len().checked_sub(1) {
        assert!(out.len() <= stride && last * stride + out.len() <= b.len());
    }
    #[cfg(target_arch = "x86_64")]
    if simd_ok() {
        // SAFETY: simd_ok() checked AVX2 and FMA; the assert above is the bounds contract.
        return unsafe { x86::axpys(b, stride, h, out) };
    }
    axpys_scalar(b, stride, h, out)
}

/// [`axpys`] with B in f16, widened on the fly (one row using the matrix: no reuse to pay for a
/// separate widening pass).
///
/// # Panics
/// If `b` does not hold `h.len()` rows of `out.len()` halves `stride` apart.
#[inline]
pub fn axpys_f16(b: &[f16], stride: usize, h: &[f32], out: &mut [f32]) {
    if let Some(last) = h.len().checked_sub(1) {
        assert!(out.len() <= stride && last * stride + out.len() <= b.len());
    }
    #[cfg(target_arch = "x86_64")]
    if simd_ok() {
        // SAFETY: simd_ok() checked AVX2, FMA and F16C; the assert above is the bounds contract.
        return unsafe { x86::axpys_f16(b, stride, h, out) };
    }
    axpys_f16_scalar(b, stride, h, out)
}

/// The batch rows that share one adapter's matrices for a projection.
pub struct Group<'a> {
    pub m: &'a Matrices,
    /// `scale · alpha / rank`.
    pub scale: f32,
    pub rows: Vec<usize>,
    /// Where this group's `rows.len() × rank` values of A·x start in the shared buffer.
    pub h_at: usize,
}

/// Groups the rows by adapter for one projection (`rows[i]`: batch row i's adapter); rows whose
/// adapter does not adapt this projection are left out. Returns the groups and the size of the
/// A·x buffer they need.
pub fn groups<'a>(
    rows: &[Option<&'a Adapter>],
    layer: usize,
    proj: Proj,
) -> (Vec<Group<'a>>, usize) {
    let mut out: Vec<(&'a Adapter, Group<'a>)> = Vec::new();
    for (i, ad) in rows.iter().enumerate() {
        let Some(ad) = *ad else { continue };
        if let Some((_, g)) = out.iter_mut().find(|(a, _)| std::ptr::eq(*a, ad)) {
            g.rows.push(i);
            continue;
        }
        if let Some(m) = ad.pair(layer, proj) {
            let scale = ad.effective_scale(m.rank);
            out.push((
                ad,
                Group {
                    m,
                    scale,
                    rows: vec![i],
                    h_at: 0,
                },
            ));
        }
    }
    let mut h = 0;
    let groups = out
        .into_iter()
        .map(|(_, mut g)| {
            g.h_at = h;
            h += g.rows.len() * g.m.rank;
            g
        })
        .collect();
    (groups, h)
}

/// Phase 1 for the flat index range `js` over every group's A rows (group by group, rank rows
/// each): `h[g.h_at + member · rank + j] = scale · A_j · x_row`, given to `put(index, value)`.
/// An A row shared by several rows is widened to f32 once.
pub fn down_project(
    groups: &[Group],
    x: &[f32],
    k: usize,
    js: std::ops::Range<usize>,
    mut put: impl FnMut(usize, f32),
) {
    let mut wide = Vec::new();
    let mut first = 0;
    for g in groups {
        let r = g.m.rank;
        let (lo, hi) = (js.start.max(first), js.end.min(first + r));
        for jj in lo..hi {
            let j = jj - first;
            let row = g.m.a_row(j, k);
            if g.rows.len() == 1 {
                let t = g.rows[0];
                put(g.h_at + j, g.scale * dot_f16(row, &x[t * k..(t + 1) * k]));
                continue;
            }
            wide.resize(k, 0f32);
            widen(row, &mut wide);
            for (m, &t) in g.rows.iter().enumerate() {
                let v = dot_f32(&wide, &x[t * k..(t + 1) * k]);
                put(g.h_at + m * r + j, g.scale * v);
            }
        }
        first += r;
    }
}

/// Phase 2 for output columns `cols`: adds B·h_row to columns `cols` of every group member's
/// output row (`out` holds the batch's rows of `n_out` floats). B's columns are widened to f32 a
/// tile at a time, once for all the members.
///
/// # Safety
/// `out` must point to at least `(max row + 1) · n_out` floats, `cols` must lie inside `0..n_out`,
/// and no one else may touch those columns of those rows meanwhile.
pub unsafe fn up_project(
    groups: &[Group],
    h: &[f32],
    n_out: usize,
    cols: std::ops::Range<usize>,
    out: *mut f32,
) {
    // 4 KiB of f32 per rank-16 tile: stays in L1 while the members' rows are updated.
    const TILE: usize = 64;
    let mut tile = Vec::new();
    for g in groups {
        let r = g.m.rank;
        if let [t] = g.rows[..] {
            let n = g.m.n();
            // SAFETY: as below, for row t's columns `cols`.
            let seg = unsafe {
                std::slice::from_raw_parts_mut(out.add(t * n_out + cols.start), cols.len())
            };
            axpys_f16(&g.m.bt[cols.start..], n, &h[g.h_at..g.h_at + r], seg);
            continue;
        }
        tile.resize(r * TILE, 0f32);
        let mut c0 = cols.start;
        while c0 < cols.end {
            let c1 = (c0 + TILE).min(cols.end);
            let w = c1 - c0;
            for j in 0..r {
                widen(g.m.bt_cols(j, c0..c1), &mut tile[j * TILE..j * TILE + w]);
            }
            for (m, &t) in g.rows.iter().enumerate() {
                let at = g.h_at + m * r;
                // SAFETY: the caller guarantees row t's columns c0..c1 (inside cols) are in `out`
                // and are ours alone.
                let seg = unsafe { std::slice::from_raw_parts_mut(out.add(t * n_out + c0), w) };
                axpys(&tile, TILE, &h[at..at + r], seg);
            }
            c0 = c1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both phases on one thread: adds each row's adapter delta (`add(row, column, v)`), for the
    /// `n_out` outputs of a projection from `x` (one row of `k` inputs per batch row).
    fn apply(
        rows: &[Option<&Adapter>],
        layer: usize,
        proj: Proj,
        x: &[f32],
        k: usize,
        n_out: usize,
        mut add: impl FnMut(usize, usize, f32),
    ) {
        let (groups, n_h) = groups(rows, layer, proj);
        let total: usize = groups.iter().map(|g| g.m.rank).sum();
        let mut h = vec![0f32; n_h];
        down_project(&groups, x, k, 0..total, |i, v| h[i] = v);
        let rows_n = rows.len();
        let mut out = vec![0f32; rows_n * n_out];
        // SAFETY: out holds every row's n_out columns, and this thread is the only user.
        unsafe { up_project(&groups, &h, n_out, 0..n_out, out.as_mut_ptr()) };
        for t in 0..rows_n {
            for o in 0..n_out {
                add(t, o, out[t * n_out + o]);
            }
        }
    }

    fn cfg() -> Config {
        Config {
            arch: crate::model::Arch::Qwen2,
            n_embd: 16,
            n_layer: 2,
            n_head: 2,
            n_head_kv: 1,
            head_dim: 8,
            n_ff: 24,
            vocab: 10,
            n_ctx_train: 64,
            eps: 1e-6,
            rope_base: 10000.0,
            rope_base_swa: 10000.0,
            rope_neox: true,
            swa: None,
            q_scale: 1.0,
            kq_scale: 1.0,
            embd_scale: 1.0,
            gelu: false,
        }
    }

    fn pair(k: usize, n: usize, r: usize, seed: u32) -> LoraPair {
        let f = |i: usize| {
            ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 1000.0 - 0.5
        };
        LoraPair {
            rank: r,
            a: (0..r * k).map(f).collect(),
            b: (0..n * r).map(|i| f(i + 7)).collect(),
        }
    }

    #[test]
    fn delta_matches_the_dense_product_per_row_and_mixes_adapters() {
        let c = cfg();
        let (k, n) = Proj::Up.dims(&c);
        let a1 = Adapter::from_pairs(&c, 8.0, 1.0, vec![(1, Proj::Up, pair(k, n, 4, 1))]);
        let a2 = Adapter::from_pairs(&c, 0.0, 0.5, vec![(1, Proj::Up, pair(k, n, 2, 9))]);
        let x: Vec<f32> = (0..3 * k).map(|i| (i % 7) as f32 / 7.0 - 0.3).collect();
        let rows = [Some(&a1), None, Some(&a2)];
        let mut out = vec![1.0f32; 3 * n];
        apply(&rows, 1, Proj::Up, &x, k, n, |t, o, v| out[t * n + o] += v);
        // Dense reference: W' = s · B·A, in f64.
        for (t, ad) in rows.iter().enumerate() {
            for o in 0..n {
                let want = match ad {
                    None => 1.0,
                    Some(ad) => {
                        let p = ad.pair(1, Proj::Up).unwrap();
                        let (pa, pb) = (p.a(), p.b());
                        let s = f64::from(ad.effective_scale(p.rank));
                        let mut acc = 0f64;
                        for j in 0..p.rank {
                            let ax: f64 = (0..k)
                                .map(|c| f64::from(pa[j * k + c]) * f64::from(x[t * k + c]))
                                .sum();
                            acc += f64::from(pb[o * p.rank + j]) * ax;
                        }
                        1.0 + s * acc
                    }
                };
                assert!(
                    (f64::from(out[t * n + o]) - want).abs() < 1e-4,
                    "row {t} out {o}"
                );
            }
        }
        // Layer 0 has no pair: nothing changes.
        let mut out0 = vec![1.0f32; 3 * n];
        apply(&rows, 0, Proj::Up, &x, k, n, |t, o, v| out0[t * n + o] += v);
        assert!(out0.iter().all(|&v| v == 1.0));
        assert_eq!(a1.effective_scale(4), 2.0);
        assert_eq!(a2.effective_scale(2), 0.5);
    }

    #[test]
    fn the_simd_dot_matches_the_scalar_reference() {
        for n in [0, 1, 7, 15, 16, 17, 33, 896, 4864] {
            let a: Vec<f16> = (0..n)
                .map(|i| f16::from_f32(((i * 37 % 101) as f32 - 50.0) / 97.0))
                .collect();
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0)
                .collect();
            let want: f64 = a
                .iter()
                .zip(&x)
                .map(|(w, v)| f64::from(w.to_f32()) * f64::from(*v))
                .sum();
            for got in [dot_f16_scalar(&a, &x), dot_f16(&a, &x)] {
                assert!(
                    (f64::from(got) - want).abs() < 1e-3 * (1.0 + want.abs()),
                    "n {n}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn the_simd_widen_dot_and_axpys_match_the_scalar_references() {
        for n in [0, 1, 7, 8, 31, 32, 33, 64, 100, 896] {
            let src: Vec<f16> = (0..n)
                .map(|i| f16::from_f32(((i * 37 % 101) as f32 - 50.0) / 97.0))
                .collect();
            let (mut w1, mut w2) = (vec![0f32; n], vec![0f32; n]);
            widen_scalar(&src, &mut w1);
            widen(&src, &mut w2);
            assert_eq!(w1, w2, "widen n {n}");
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0)
                .collect();
            let (a, b) = (dot_f32_scalar(&w1, &x), dot_f32(&w1, &x));
            assert!(
                (a - b).abs() < 1e-4 * (1.0 + a.abs()),
                "dot n {n}: {a} vs {b}"
            );
            for r in [1, 3, 16] {
                let stride = n + 5;
                let bm: Vec<f32> = (0..r * stride)
                    .map(|i| ((i * 7 % 23) as f32 - 11.0) / 13.0)
                    .collect();
                let h: Vec<f32> = (0..r).map(|j| j as f32 * 0.25 - 1.0).collect();
                let bh: Vec<f16> = bm.iter().map(|&v| f16::from_f32(v)).collect();
                let bw: Vec<f32> = bh.iter().map(|v| v.to_f32()).collect();
                let (mut o1, mut o2) = (x.clone(), x.clone());
                axpys_scalar(&bw, stride, &h, &mut o1);
                axpys(&bw, stride, &h, &mut o2);
                let (mut o3, mut o4) = (x.clone(), x.clone());
                axpys_f16_scalar(&bh, stride, &h, &mut o3);
                axpys_f16(&bh, stride, &h, &mut o4);
                for c in 0..n {
                    for got in [o2[c], o3[c], o4[c]] {
                        let want = o1[c];
                        assert!(
                            (want - got).abs() < 1e-4 * (1.0 + want.abs()),
                            "axpys n {n} r {r} c {c}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn rows_sharing_an_adapter_get_the_same_delta_as_alone() {
        // Wide enough for several B tiles and a ragged last one.
        let mut c = cfg();
        c.n_ff = 150;
        let (k, n) = Proj::Gate.dims(&c);
        let a1 = Adapter::from_pairs(&c, 8.0, 1.0, vec![(0, Proj::Gate, pair(k, n, 4, 1))]);
        let a2 = Adapter::from_pairs(&c, 0.0, 0.5, vec![(0, Proj::Gate, pair(k, n, 3, 9))]);
        let x: Vec<f32> = (0..5 * k).map(|i| (i % 11) as f32 / 11.0 - 0.4).collect();
        let mixed = [Some(&a1), None, Some(&a2), Some(&a1), Some(&a1)];
        let mut out = vec![0f32; 5 * n];
        apply(&mixed, 0, Proj::Gate, &x, k, n, |t, o, v| {
            out[t * n + o] += v
        });
        for (t, ad) in mixed.iter().enumerate() {
            let mut alone = vec![0f32; n];
            apply(
                &[*ad],
                0,
                Proj::Gate,
                &x[t * k..(t + 1) * k],
                k,
                n,
                |_, o, v| alone[o] += v,
            );
            for o in 0..n {
                assert!((out[t * n + o] - alone[o]).abs() < 1e-5, "row {t} out {o}");
            }
            assert_eq!(ad.is_none(), alone.iter().all(|&v| v == 0.0));
        }
    }

    #[test]
    fn written_adapters_read_back_and_bad_ones_are_refused_by_name() {
        let c = cfg();
        let dir = tempfile::tempdir().unwrap();
        let (k, n) = Proj::Q.dims(&c);
        let (kd, nd) = Proj::Down.dims(&c);
        let ad = Adapter::from_pairs(
            &c,
            16.0,
            1.0,
            vec![
                (0, Proj::Q, pair(k, n, 4, 3)),
                (1, Proj::Down, pair(kd, nd, 4, 5)),
            ],
        );
        let path = dir.path().join("a.gguf");
        ad.write(&path, "qwen2").unwrap();
        let back = Adapter::open(&path, &c, 1.0).unwrap();
        assert_eq!(back.alpha, 16.0);
        assert_eq!(back.pairs().count(), 2);
        assert_eq!(
            back.pair(1, Proj::Down).unwrap().b(),
            ad.pair(1, Proj::Down).unwrap().b()
        );
        assert_eq!(back.bytes(), ad.bytes());

        // Another architecture.
        let mut llama = c.clone();
        llama.arch = crate::model::Arch::Llama;
        let e = Adapter::open(&path, &llama, 1.0).unwrap_err().to_string();
        assert!(e.contains("qwen2") && e.contains("llama"), "{e}");
        // A model whose projection has another shape: the error names the tensor.
        let mut wide = c.clone();
        wide.n_ff = 32;
        let e = Adapter::open(&path, &wide, 1.0).unwrap_err().to_string();
        assert!(e.contains("blk.1.ffn_down.weight.lora_a"), "{e}");
        // Fewer layers than the adapter names.
        let mut short = c.clone();
        short.n_layer = 1;
        let e = Adapter::open(&path, &short, 1.0).unwrap_err().to_string();
        assert!(e.contains("blk.1.ffn_down.weight"), "{e}");
        // A model file is not an adapter.
        let plain = dir.path().join("m.gguf");
        gguf_write::write(
            &plain,
            &[("general.architecture", Value::String("qwen2".into()))],
            &[],
        )
        .unwrap();
        let e = Adapter::open(&plain, &c, 1.0).unwrap_err().to_string();
        assert!(e.contains("not a LoRA adapter"), "{e}");
    }
}
