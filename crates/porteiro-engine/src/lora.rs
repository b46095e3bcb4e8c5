//! LoRA adapters in llama.cpp's GGUF format, applied at run time: y = W·x + s·B·(A·x), with the
//! quantized base weights untouched and shared. A batch may mix sequences with different adapters
//! and none: the base matmul runs once for every row, then each row adds its own adapter's delta.
//!
//! File format (what `convert_lora_to_gguf.py` writes and `llama --lora` reads): `general.type =
//! "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha`, `general.architecture` equal to the
//! base's, and for each adapted matrix `<base tensor>.lora_a` with ggml dims `[in, rank]` and
//! `<base tensor>.lora_b` with dims `[rank, out]` (f32, f16 or bf16). The effective scale is
//! `scale · alpha / rank` (`scale` when alpha is 0), as in llama.cpp.

use std::path::{Path, PathBuf};

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

    fn index(self) -> usize {
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

/// One adapted matrix: A is rank × in, B is out × rank, both row-major f32.
#[derive(Debug, Clone)]
pub struct LoraPair {
    pub rank: usize,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

/// A loaded adapter.
#[derive(Debug)]
pub struct Adapter {
    pub path: PathBuf,
    pub alpha: f32,
    /// The user's multiplier (`--lora-scale`, the config's `scale`).
    pub scale: f32,
    /// Per layer, per projection (indexed by `Proj as usize`).
    layers: Vec<[Option<LoraPair>; 7]>,
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
        let mut layers: Vec<[Option<LoraPair>; 7]> =
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
            layers[layer][proj.index()] = Some(LoraPair {
                rank,
                a: floats(&file, t, path)?,
                b: floats(&file, tb, path)?,
            });
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
        let mut layers: Vec<[Option<LoraPair>; 7]> =
            (0..cfg.n_layer).map(|_| Default::default()).collect();
        for (l, p, pair) in pairs {
            if let Some(slot) = layers.get_mut(l) {
                slot[p.index()] = Some(pair);
            }
        }
        Self {
            path: PathBuf::new(),
            alpha,
            scale,
            layers,
        }
    }

    /// Writes the adapter as llama.cpp reads it (f32 tensors), atomically.
    pub fn write(&self, path: &Path, arch: &str) -> Result<(), LoraError> {
        let mut bufs: Vec<(String, Vec<u64>, Vec<u8>)> = Vec::new();
        for (l, projs) in self.layers.iter().enumerate() {
            for p in Proj::ALL {
                if let Some(pair) = &projs[p.index()] {
                    let k = pair.a.len() / pair.rank;
                    let n = pair.b.len() / pair.rank;
                    let base = format!("blk.{l}.{}.weight", p.stem());
                    let le = |v: &[f32]| v.iter().flat_map(|f| f.to_le_bytes()).collect();
                    bufs.push((
                        format!("{base}.lora_a"),
                        vec![k as u64, pair.rank as u64],
                        le(&pair.a),
                    ));
                    bufs.push((
                        format!("{base}.lora_b"),
                        vec![pair.rank as u64, n as u64],
                        le(&pair.b),
                    ));
                }
            }
        }
        let tensors: Vec<TensorOut> = bufs
            .iter()
            .map(|(name, dims, data)| TensorOut {
                name: name.clone(),
                dims: dims.clone(),
                dtype: GgmlType::F32,
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
        self.pairs()
            .map(|(_, _, p)| (p.a.len() + p.b.len()) * 4)
            .sum()
    }

    /// Every adapted matrix.
    pub fn pairs(&self) -> impl Iterator<Item = (usize, Proj, &LoraPair)> {
        self.layers.iter().enumerate().flat_map(|(l, projs)| {
            Proj::ALL
                .into_iter()
                .filter_map(move |p| projs[p.index()].as_ref().map(|pair| (l, p, pair)))
        })
    }

    pub fn pair(&self, layer: usize, p: Proj) -> Option<&LoraPair> {
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

/// Dot product in eight independent lanes (vectorizes without reassociation flags).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Adds each row's adapter delta to the output, from `x` (one row of `k` inputs per batch row):
/// rows are grouped by adapter, so each B row is read once per group, and `add(row, output, v)`
/// receives the delta of output columns `out_cols` (the caller's share of the columns).
/// `rows[i]` is batch row i's adapter.
#[allow(clippy::too_many_arguments)]
pub fn apply(
    rows: &[Option<&Adapter>],
    layer: usize,
    proj: Proj,
    x: &[f32],
    k: usize,
    out_cols: std::ops::Range<usize>,
    mut add: impl FnMut(usize, usize, f32),
) {
    let n = rows.len();
    let mut h = Vec::new();
    for (i, ad) in rows.iter().enumerate() {
        let Some(ad) = ad else { continue };
        // The first row of each adapter group does the group's work.
        if rows[..i]
            .iter()
            .any(|o| o.is_some_and(|o| std::ptr::eq(o, *ad)))
        {
            continue;
        }
        let Some(pair) = ad.pair(layer, proj) else {
            continue;
        };
        let r = pair.rank;
        let s = ad.effective_scale(r);
        let members: Vec<usize> = (i..n)
            .filter(|&j| rows[j].is_some_and(|o| std::ptr::eq(o, *ad)))
            .collect();
        h.clear();
        h.resize(members.len() * r, 0.0);
        for (m, &t) in members.iter().enumerate() {
            let xt = &x[t * k..(t + 1) * k];
            for j in 0..r {
                h[m * r + j] = s * dot(&pair.a[j * k..(j + 1) * k], xt);
            }
        }
        for o in out_cols.clone() {
            let brow = &pair.b[o * r..(o + 1) * r];
            for (m, &t) in members.iter().enumerate() {
                add(t, o, dot(brow, &h[m * r..(m + 1) * r]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        apply(&rows, 1, Proj::Up, &x, k, 0..n, |t, o, v| {
            out[t * n + o] += v
        });
        // Dense reference: W' = s · B·A, in f64.
        for (t, ad) in rows.iter().enumerate() {
            for o in 0..n {
                let want = match ad {
                    None => 1.0,
                    Some(ad) => {
                        let p = ad.pair(1, Proj::Up).unwrap();
                        let s = f64::from(ad.effective_scale(p.rank));
                        let mut acc = 0f64;
                        for j in 0..p.rank {
                            let ax: f64 = (0..k)
                                .map(|c| f64::from(p.a[j * k + c]) * f64::from(x[t * k + c]))
                                .sum();
                            acc += f64::from(p.b[o * p.rank + j]) * ax;
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
        apply(&rows, 0, Proj::Up, &x, k, 0..n, |t, o, v| {
            out0[t * n + o] += v
        });
        assert!(out0.iter().all(|&v| v == 1.0));
        assert_eq!(a1.effective_scale(4), 2.0);
        assert_eq!(a2.effective_scale(2), 0.5);
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
            back.pair(1, Proj::Down).unwrap().b,
            ad.pair(1, Proj::Down).unwrap().b
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
