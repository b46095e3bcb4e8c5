//! `porteiro quantize IN OUT --type T`: a model rewritten at another precision, with llama.cpp's
//! mixtures (Q4_K_M keeps attn_v and ffn_down at Q6_K in the layers that matter most, …) and
//! llama.cpp's reference quantizers, so the file is the one `llama-quantize` would write.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use porteiro_engine::mix::{self, Ftype, Options};
use porteiro_engine::quant::dequantize_row;
use porteiro_engine::quantize::{quantize_row, row_bytes};
use porteiro_models::fetch;
use porteiro_models::gguf::{GgmlType, GgufFile, Value};
use porteiro_models::gguf_write::{self, TensorSpec, Writer};

#[derive(Args)]
pub struct QuantizeArgs {
    /// The model to quantize (catalog alias or .gguf path): F32/F16/BF16, or any type the engine
    /// reads (dequantized first: the result carries both roundings).
    input: String,
    /// The file to write (atomically: a temporary file beside it, renamed when complete).
    output: PathBuf,
    /// File type: F32, F16, BF16, Q8_0, Q4_0, Q4_K_S, Q4_K_M (or Q4_K), Q5_K_S, Q5_K_M (or Q5_K),
    /// Q6_K. The _M and _S mixtures give some tensors more bits, as llama.cpp does.
    #[arg(long = "type", short = 't')]
    ftype: String,
    /// Every quantizable tensor at the file type's base type (no mixture).
    #[arg(long)]
    pure: bool,
    /// REGEX=TYPE: tensors whose name matches REGEX get TYPE (first match wins; repeatable).
    #[arg(long = "tensor-type", value_name = "REGEX=TYPE")]
    tensor_type: Vec<String>,
    /// Type of the output projection (output.weight; the token embedding too when they are tied).
    #[arg(long)]
    output_tensor_type: Option<String>,
    /// Type of the token embedding.
    #[arg(long)]
    token_embedding_type: Option<String>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Replace OUTPUT if it exists.
    #[arg(long)]
    force: bool,
}

fn ty(s: &str, what: &str) -> Result<GgmlType> {
    mix::parse_type(s).ok_or_else(|| {
        anyhow!(
            "{what}: unknown or unsupported tensor type `{s}` (writable: {})",
            porteiro_engine::quantize::WRITABLE
                .map(|t| t.name())
                .join(", ")
        )
    })
}

fn options(a: &QuantizeArgs) -> Result<Options> {
    let ftype = Ftype::parse(&a.ftype).ok_or_else(|| {
        anyhow!(
            "unknown file type `{}`: one of {} (Q3_K and Q2_K are not written yet: the engine has no \
             kernels to run them)",
            a.ftype,
            Ftype::ALL.map(Ftype::name).join(", ")
        )
    })?;
    let mut overrides = Vec::new();
    for o in &a.tensor_type {
        let (re, t) = o
            .rsplit_once('=')
            .ok_or_else(|| anyhow!("--tensor-type `{o}`: expected REGEX=TYPE"))?;
        let re = regex::Regex::new(re).with_context(|| format!("--tensor-type `{o}`"))?;
        overrides.push((re, ty(t, "--tensor-type")?));
    }
    Ok(Options {
        ftype: Some(ftype),
        pure: a.pure,
        overrides,
        output: a
            .output_tensor_type
            .as_deref()
            .map(|t| ty(t, "--output-tensor-type"))
            .transpose()?,
        token_embd: a
            .token_embedding_type
            .as_deref()
            .map(|t| ty(t, "--token-embedding-type"))
            .transpose()?,
    })
}

/// Free bytes on the file system that will hold `path`.
fn free_space(path: &Path) -> Option<u64> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let s = rustix::fs::statvfs(dir).ok()?;
    Some(s.f_bavail.saturating_mul(s.f_frsize))
}

fn human(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

pub fn run(a: &QuantizeArgs) -> Result<()> {
    let opts = options(a)?;
    let (path, src) = open_model(&a.input)?;
    let out = Output {
        path: &a.output,
        force: a.force,
        threads: a.threads,
    };
    rewrite(&path, &src, &out, &opts, None)
}

/// A generative GGUF model by catalog alias or path.
pub fn open_model(name: &str) -> Result<(PathBuf, GgufFile)> {
    let path = fetch::resolve_model(name, true)?;
    if path.is_dir() {
        bail!("{name} is an encoder model; this takes generative GGUF models");
    }
    let src = GgufFile::open(&path).with_context(|| format!("opening {}", path.display()))?;
    Ok((path, src))
}

pub struct Output<'a> {
    pub path: &'a Path,
    pub force: bool,
    pub threads: Option<usize>,
}

/// Changes some tensors' values before they are written (`lora merge` adds B·A to the adapted
/// matrices).
pub trait Merge {
    fn adapts(&self, name: &str) -> bool;
    /// `w`: the tensor in f32, rows of `cols` values.
    fn apply(&self, name: &str, w: &mut [f32], cols: usize);
}

/// Writes `src` at the types `opts` plans. A tensor `merge` adapts is re-quantized even at its
/// own type.
pub fn rewrite(
    path: &Path,
    src: &GgufFile,
    out: &Output,
    opts: &Options,
    merge: Option<&dyn Merge>,
) -> Result<()> {
    let ftype = opts.ftype.unwrap_or(Ftype::Q8_0);
    let output = out.path;
    if output.exists() && !out.force {
        bail!("{} exists; pass --force to replace it", output.display());
    }
    if output.canonicalize().ok() == path.canonicalize().ok() {
        bail!("the output would overwrite the input");
    }
    let n_layer = src
        .get_u64(&format!("{}.block_count", src.architecture()?))
        .context("the model has no block count")? as usize;

    let names: Vec<&str> = src.tensors().iter().map(|t| t.name.as_str()).collect();
    let idx = mix::order(&names);
    let tensors: Vec<mix::Tensor> = idx
        .iter()
        .map(|&i| {
            let t = &src.tensors()[i];
            mix::Tensor {
                name: &t.name,
                dims: &t.dims,
                dtype: t.dtype,
            }
        })
        .collect();
    let plan = mix::plan(&tensors, opts, n_layer);

    let mut specs = Vec::with_capacity(plan.len());
    let mut requantized = std::collections::BTreeSet::new();
    for (t, c) in tensors.iter().zip(&plan) {
        if c.dtype != t.dtype {
            if porteiro_engine::quant::act_type(t.dtype).is_none()
                && !matches!(t.dtype, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
            {
                bail!(
                    "tensor {} is {}, which the engine cannot read: nothing to quantize from",
                    t.name,
                    t.dtype.name()
                );
            }
            if !matches!(t.dtype, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
                requantized.insert(t.dtype.name());
            }
        }
        let n: u64 = t.dims.iter().product();
        let size = row_bytes(c.dtype, t.dims[0] as usize)
            .map(|r| r * (n / t.dims[0]) as usize)
            .ok_or_else(|| {
                anyhow!(
                    "tensor {} ({} columns) cannot be {}: rows are not whole blocks",
                    t.name,
                    t.dims[0],
                    c.dtype.name()
                )
            })?;
        specs.push(TensorSpec {
            name: t.name.to_string(),
            dims: t.dims.to_vec(),
            dtype: c.dtype,
            size,
        });
    }
    if !requantized.is_empty() {
        eprintln!(
            "note: {} holds {} tensors; they are dequantized to f32 first, so the result carries \
             both roundings (an F16/BF16 original gives a better file)",
            path.display(),
            requantized.into_iter().collect::<Vec<_>>().join("/")
        );
    }
    for (t, c) in tensors.iter().zip(&plan) {
        if let Some(w) = c.wanted {
            eprintln!(
                "note: {}: {} columns are not whole {} blocks; {} instead",
                t.name,
                t.dims[0],
                w.name(),
                c.dtype.name()
            );
        }
    }

    // Metadata in the input's order; the quantization version and file type moved to the end, as
    // llama-quantize does (so the files match byte for byte).
    let mut meta: Vec<(&str, Value)> = src
        .key_order
        .iter()
        .filter(|k| {
            !matches!(
                k.as_str(),
                "general.quantization_version"
                    | "general.file_type"
                    | "split.no"
                    | "split.count"
                    | "split.tensors.count"
            )
        })
        .filter_map(|k| src.get(k).map(|v| (k.as_str(), v.clone())))
        .collect();
    meta.push(("general.quantization_version", Value::U32(2)));
    meta.push(("general.file_type", Value::U32(ftype.code())));

    let total = gguf_write::file_size(&meta, &specs)?;
    if let Some(free) = free_space(output) {
        if free < total {
            bail!(
                "{} needs {} but only {} is free there",
                output.display(),
                human(total),
                human(free)
            );
        }
    }

    let threads = out
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let elements: u64 = tensors.iter().map(|t| t.dims.iter().product::<u64>()).sum();
    let pb = ProgressBar::new(elements);
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} quantizing [{bar:30}] {percent}% {msg} ({elapsed}, ~{eta} left)",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let start = Instant::now();
    let mut w = Writer::create(output, &meta, specs.clone())?;
    let mut by_type: std::collections::BTreeMap<String, (usize, u64)> = Default::default();
    for (&i, spec) in idx.iter().zip(&specs) {
        let t = &src.tensors()[i];
        pb.set_message(format!("{} → {}", t.name, spec.dtype.name()));
        let data = src.data(t);
        let n: u64 = t.dims.iter().product();
        let cols = t.dims[0] as usize;
        let merged = merge.filter(|m| m.adapts(&t.name)).and_then(|m| {
            let in_row = row_bytes(t.dtype, cols)?;
            let mut x = vec![0f32; n as usize];
            for (r, o) in data.chunks_exact(in_row).zip(x.chunks_exact_mut(cols)) {
                dequantize_row(t.dtype, r, o);
            }
            m.apply(&t.name, &mut x, cols);
            Some(x)
        });
        if let Some(x) = merged {
            let f32_bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
            w.push(&convert(
                &f32_bytes,
                GgmlType::F32,
                spec.dtype,
                cols,
                threads,
            ))?;
        } else if spec.dtype == t.dtype {
            w.push(data)?;
        } else {
            w.push(&convert(data, t.dtype, spec.dtype, cols, threads))?;
        }
        src.release(t);
        let e = by_type.entry(spec.dtype.name()).or_default();
        e.0 += spec.size;
        e.1 += n;
        pb.inc(n);
    }
    w.finish()
        .with_context(|| format!("writing {}", output.display()))?;
    pb.finish_and_clear();

    let weights: u64 = by_type.values().map(|v| v.1).sum();
    let bytes: usize = by_type.values().map(|v| v.0).sum();
    println!(
        "{} → {} ({}): {} in {:.1} s, {:.2} bits per weight",
        path.display(),
        output.display(),
        ftype.name(),
        human(total),
        start.elapsed().as_secs_f64(),
        8.0 * bytes as f64 / weights as f64
    );
    for (t, (b, n)) in by_type {
        println!("  {t:>5}: {:>10} weights, {}", n, human(b as u64));
    }
    Ok(())
}

/// A tensor from one type to another, rows split across threads (each row is quantized on its
/// own, so the bytes do not depend on the split).
fn convert(data: &[u8], from: GgmlType, to: GgmlType, cols: usize, threads: usize) -> Vec<u8> {
    let (in_row, out_row) = (
        row_bytes(from, cols).unwrap_or(0),
        row_bytes(to, cols).unwrap_or(0),
    );
    let rows = data.len() / in_row.max(1);
    let mut out = vec![0u8; rows * out_row];
    let per = rows.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (src, dst) in data.chunks(per * in_row).zip(out.chunks_mut(per * out_row)) {
            s.spawn(move || {
                let mut f = vec![0f32; cols];
                for (r, o) in src.chunks_exact(in_row).zip(dst.chunks_exact_mut(out_row)) {
                    dequantize_row(from, r, &mut f);
                    quantize_row(to, &f, o);
                }
            });
        }
    });
    out
}
