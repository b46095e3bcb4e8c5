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
use porteiro_engine::quantize::{quantize_row_weighted, row_bytes};
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
    /// File type: F32, F16, BF16, Q8_0, Q4_0, Q2_K, Q3_K_S, Q3_K_M (or Q3_K), Q3_K_L, Q4_K_S,
    /// Q4_K_M (or Q4_K), Q5_K_S, Q5_K_M (or Q5_K), Q6_K. The _S/_M/_L mixtures (and Q2_K's) give
    /// some tensors more bits, as llama.cpp does.
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
    /// Fit the types to a size (e.g. 300MB, 1.2GiB, or bytes): each quantizable tensor's loss is
    /// measured at every candidate type on --calib text, then the types with the least total loss
    /// that fit are chosen (--type then only names the file type recorded).
    #[arg(long, value_name = "SIZE", conflicts_with = "bpw", requires = "calib")]
    budget: Option<String>,
    /// As --budget, in bits per weight over the whole model.
    #[arg(long, requires = "calib")]
    bpw: Option<f64>,
    /// Calibration text for --budget/--bpw (measure the result on other text).
    #[arg(long)]
    calib: Option<PathBuf>,
    /// Calibration window in tokens (the second half of each is scored).
    #[arg(long, default_value_t = 256)]
    calib_window: usize,
    /// Calibration windows.
    #[arg(long, default_value_t = 2)]
    calib_chunks: usize,
    /// Types the budget may choose from (each falls back as llama.cpp does where rows are not
    /// whole 256-blocks).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "Q4_0,Q4_K,Q5_K,Q6_K,Q8_0"
    )]
    candidates: Vec<String>,
    /// Keep the per-tensor measurements of --budget/--bpw in FILE (JSON) and reuse them when
    /// FILE already holds the same input, calibration text, window and candidates: fitting the
    /// same model to several budgets measures once.
    #[arg(long, value_name = "FILE", requires = "calib")]
    sensitivities: Option<PathBuf>,
    /// Importance matrix (`porteiro imatrix` or llama-imatrix, GGUF format): quantization errors
    /// weighted by how much each input column matters, as llama-quantize --imatrix.
    #[arg(long)]
    imatrix: Option<PathBuf>,
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
            "unknown file type `{}`: one of {}",
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
        imatrix: a.imatrix.is_some(),
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
    let imatrix = a
        .imatrix
        .as_deref()
        .map(porteiro_engine::imatrix::load)
        .transpose()?;
    let mut extra_meta = Vec::new();
    if let (Some(m), Some(file)) = (&imatrix, &a.imatrix) {
        eprintln!("importance matrix: {} matrices", m.data.len());
        // The keys llama-quantize writes, in its order (strings cut at 127 bytes as it does).
        let cut = |s: &str| {
            s.char_indices()
                .take_while(|(i, c)| i + c.len_utf8() <= 127)
                .map(|(_, c)| c)
                .collect::<String>()
        };
        extra_meta.push((
            "quantize.imatrix.file",
            Value::String(cut(&file.to_string_lossy())),
        ));
        if let Some(d) = m.datasets.first() {
            extra_meta.push(("quantize.imatrix.dataset", Value::String(cut(d))));
        }
        extra_meta.push((
            "quantize.imatrix.entries_count",
            Value::U32(m.data.len() as u32),
        ));
        if m.chunk_count > 0 {
            extra_meta.push((
                "quantize.imatrix.chunks_count",
                Value::U32(m.chunk_count as u32),
            ));
        }
    }
    let out = Output {
        imatrix: imatrix.as_ref().map(|m| &m.data),
        extra_meta,
        path: &a.output,
        force: a.force,
        threads: a.threads,
        quiet: false,
    };
    if a.budget.is_some() || a.bpw.is_some() {
        return fit_budget(a, &path, &src, &out, &opts);
    }
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
    /// Importance per matrix name (mean squared input per column).
    pub imatrix: Option<&'a std::collections::HashMap<String, Vec<f32>>>,
    /// Metadata appended after the file type (llama-quantize records the imatrix it used).
    pub extra_meta: Vec<(&'static str, Value)>,
    pub force: bool,
    pub threads: Option<usize>,
    /// No notes, progress or summary (a working copy).
    pub quiet: bool,
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
    // llama.cpp's n_gqa(): query heads per key/value head (1 without a KV head count, 0 without
    // a head count).
    let head = |k: &str| src.get_u64(&format!("{}.attention.{k}", src.architecture()?));
    let n_gqa = match (head("head_count"), head("head_count_kv")) {
        (Ok(h), Ok(kv)) if kv > 0 => (h / kv) as usize,
        (Ok(_), Err(_)) => 1,
        _ => 0,
    };
    let plan = mix::plan(&tensors, opts, n_layer, n_gqa);

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
    if !requantized.is_empty() && !out.quiet {
        eprintln!(
            "note: {} holds {} tensors; they are dequantized to f32 first, so the result carries \
             both roundings (an F16/BF16 original gives a better file)",
            path.display(),
            requantized.into_iter().collect::<Vec<_>>().join("/")
        );
    }
    // Rows that are not whole blocks of the wanted type: one line per substitution.
    let mut fell: std::collections::BTreeMap<(String, String), Vec<&str>> = Default::default();
    for (t, c) in tensors.iter().zip(&plan) {
        if let Some(w) = c.wanted {
            fell.entry((w.name(), c.dtype.name()))
                .or_default()
                .push(t.name);
        }
    }
    for ((w, got), names) in fell.iter().filter(|_| !out.quiet) {
        eprintln!(
            "note: {} tensors ({}{}) have rows that are not whole {w} blocks: {got} instead",
            names.len(),
            names[0],
            if names.len() > 1 { ", …" } else { "" }
        );
    }

    // Metadata in the input's order; the quantization version and file type moved to the end, as
    // llama-quantize does (so the files match byte for byte).
    let mut meta: Vec<(&str, Value)> = src
        .key_order
        .iter()
        .filter(|k| !out.extra_meta.iter().any(|(e, _)| e == k))
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
    for (k, v) in &out.extra_meta {
        meta.retain(|(m, _)| m != k);
        meta.push((k, v.clone()));
    }

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
    let pb = if out.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(elements)
    };
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
        let qw = out
            .imatrix
            .and_then(|m| m.get(&t.name))
            .filter(|q| q.len() == cols)
            .map(Vec::as_slice);
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
                qw,
            ))?;
        } else if spec.dtype == t.dtype {
            w.push(data)?;
        } else {
            w.push(&convert(data, t.dtype, spec.dtype, cols, threads, qw))?;
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

    if out.quiet {
        return Ok(());
    }
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
fn convert(
    data: &[u8],
    from: GgmlType,
    to: GgmlType,
    cols: usize,
    threads: usize,
    qw: Option<&[f32]>,
) -> Vec<u8> {
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
                    quantize_row_weighted(to, &f, o, qw);
                }
            });
        }
    });
    out
}

/// "300MB", "1.2GiB", "123456789" → bytes.
fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| anyhow!("--budget `{s}`: expected a size such as 300MB or 1.2GiB"))?;
    let mult = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        u => bail!("--budget `{s}`: unknown unit `{u}` (B, KB, MB, GB, KiB, MiB, GiB)"),
    };
    if n <= 0.0 {
        bail!("--budget must be positive");
    }
    Ok((n * mult) as u64)
}

fn dequantized(src: &GgufFile, name: &str) -> Vec<f32> {
    let Some(t) = src.tensor(name) else {
        return Vec::new();
    };
    let cols = t.dims[0] as usize;
    let mut x = vec![0f32; t.n_elements() as usize];
    if let Some(rb) = row_bytes(t.dtype, cols) {
        for (r, o) in src.data(t).chunks_exact(rb).zip(x.chunks_exact_mut(cols)) {
            dequantize_row(t.dtype, r, o);
        }
    }
    x
}

/// `--budget` / `--bpw`: measure, allocate, write, and measure what was written.
fn fit_budget(
    a: &QuantizeArgs,
    path: &Path,
    src: &GgufFile,
    out: &Output,
    opts: &Options,
) -> Result<()> {
    use porteiro_engine::budget;
    use porteiro_engine::eval::Reference;
    use porteiro_engine::Model;
    use std::sync::Arc;

    if out.path.exists() && !out.force {
        bail!("{} exists; pass --force to replace it", out.path.display());
    }
    let Some(calib) = &a.calib else {
        bail!("--budget and --bpw need --calib TEXT");
    };
    let text =
        std::fs::read_to_string(calib).with_context(|| format!("reading {}", calib.display()))?;
    let types: Vec<GgmlType> = a
        .candidates
        .iter()
        .map(|t| ty(t, "--candidates"))
        .collect::<Result<_>>()?;
    let threads = out
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let weights: u64 = src.tensors().iter().map(|t| t.n_elements()).sum();
    let header = src
        .file_size()
        .saturating_sub(src.tensors().iter().map(|t| t.size_bytes).sum());
    let target = match (&a.budget, a.bpw) {
        (Some(b), _) => parse_size(b)?,
        (None, Some(bpw)) if bpw > 0.0 => (bpw * weights as f64 / 8.0) as u64,
        _ => bail!("--bpw must be positive"),
    };
    let decide: Vec<(String, usize)> = src
        .tensors()
        .iter()
        .filter(|t| mix::quantizable(&t.name, &t.dims))
        .map(|t| (t.name.clone(), t.dims[0] as usize))
        .collect();
    let fixed: usize = src
        .tensors()
        .iter()
        .filter(|t| !mix::quantizable(&t.name, &t.dims))
        .map(|t| t.size_bytes.next_multiple_of(32))
        .sum();
    let room = (target as usize)
        .checked_sub(fixed + header)
        .ok_or_else(|| {
            anyhow!(
                "the budget {} does not even hold the unquantized tensors",
                human(target)
            )
        })?;

    // Refused up front when even the smallest candidates do not fit.
    let smallest: usize = src
        .tensors()
        .iter()
        .filter(|t| mix::quantizable(&t.name, &t.dims))
        .map(|t| {
            let cols = t.dims[0] as usize;
            let rows = (t.n_elements() / t.dims[0]) as usize;
            budget::candidates(cols, &types)
                .first()
                .and_then(|&c| row_bytes(c, cols))
                .map_or(t.size_bytes, |r| r * rows)
                .next_multiple_of(32)
        })
        .sum();
    if smallest > room {
        bail!(
            "the budget {} is below the smallest file the candidate types give (about {})",
            human(target),
            human((smallest + fixed + header) as u64)
        );
    }

    // The reference: the input's own predictions on the calibration text.
    let tok = porteiro_models::tokenizer::Tokenizer::from_gguf(src)?;
    let (ids, chunks) =
        crate::perplexity::windows(&tok, &text, calib, a.calib_window, a.calib_chunks)?;
    let bos = crate::perplexity::bos(&tok);
    eprintln!(
        "budget {}: measuring the reference on {chunks} windows of {} tokens",
        human(target),
        a.calib_window
    );
    let reference = {
        let m = Model::load(Arc::new(GgufFile::open(path)?), threads)?;
        Reference::new(&m, &ids, a.calib_window, chunks, bos)?
    };

    let key = {
        use sha2::{Digest, Sha256};
        let meta = std::fs::metadata(path)?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        serde_json::json!({
            "input_bytes": meta.len(),
            "input_mtime": mtime,
            "calib_sha256": format!("{:x}", Sha256::digest(text.as_bytes())),
            "window": a.calib_window,
            "chunks": chunks,
            "candidates": types.iter().map(|t| t.name()).collect::<Vec<_>>(),
        })
    };
    let cached = a
        .sensitivities
        .as_deref()
        .and_then(|f| read_sensitivities(f, &key, &decide));
    let (base, sens) = match cached {
        Some(c) => c,
        None => {
            let r = measure_sensitivities(path, src, out, &decide, &types, threads, &reference)?;
            if let Some(f) = &a.sensitivities {
                write_sensitivities(f, &key, &r)?;
                eprintln!("measurements kept in {}", f.display());
            }
            r
        }
    };
    let pick = budget::allocate(&sens, room).map_err(|e| {
        anyhow!(
            "{e}; the smallest candidate types give a file of about {}",
            human((fixed + header + sens.iter().map(|s| s.choices[0].bytes).sum::<usize>()) as u64)
        )
    })?;

    let overrides = sens
        .iter()
        .zip(&pick)
        .map(|(s, &i)| {
            let re = regex::Regex::new(&format!("^{}$", regex::escape(&s.name)))?;
            Ok((re, s.choices[i].dtype))
        })
        .collect::<Result<Vec<_>>>()?;
    let chosen = Options {
        ftype: opts.ftype,
        pure: true,
        overrides,
        output: None,
        token_embd: None,
        imatrix: out.imatrix.is_some(),
    };
    rewrite(path, src, out, &chosen, None)?;

    let predicted = base
        + sens
            .iter()
            .zip(&pick)
            .map(|(s, &i)| s.choices[i].dkld)
            .sum::<f64>();
    let got = {
        let m = Model::load(Arc::new(GgufFile::open(out.path)?), threads)?;
        reference.mean_kld(&m)?
    };
    let size = std::fs::metadata(out.path)?.len();
    println!("tensor types chosen (ΔKLD: that tensor alone at that type, all others at Q8_0):");
    for (s, &i) in sens.iter().zip(&pick) {
        let c = &s.choices[i];
        println!(
            "  {:<32} {:>5} {:>10}  ΔKLD {:+.6}",
            s.name,
            c.dtype.name(),
            human(c.bytes as u64),
            c.dkld
        );
    }
    println!(
        "budget {}, file {} ({:.2} bits per weight); calibration KLD: predicted {predicted:.6}, measured {got:.6} (all Q8_0: {base:.6})",
        human(target),
        human(size),
        8.0 * size as f64 / weights as f64
    );
    Ok(())
}

/// Each tensor of `decide` at each candidate type, from a working copy at Q8_0.
#[allow(clippy::too_many_arguments)]
fn measure_sensitivities(
    path: &Path,
    src: &GgufFile,
    out: &Output,
    decide: &[(String, usize)],
    types: &[GgmlType],
    threads: usize,
    reference: &porteiro_engine::eval::Reference,
) -> Result<(f64, Vec<porteiro_engine::budget::Sensitivity>)> {
    use porteiro_engine::budget;
    use porteiro_engine::Model;
    use std::sync::Arc;
    // A working copy with every quantizable tensor at Q8_0, the starting point of each measurement.
    let work = out.path.with_file_name(format!(
        ".{}.q8_0.partial",
        out.path
            .file_name()
            .map_or("out".into(), |n| n.to_string_lossy())
    ));
    let q8 = Options {
        ftype: Some(Ftype::Q8_0),
        pure: true,
        ..Default::default()
    };
    let w = Output {
        imatrix: None,
        extra_meta: Vec::new(),
        path: &work,
        force: true,
        threads: out.threads,
        quiet: true,
    };
    rewrite(path, src, &w, &q8, None)?;
    let measured = (|| -> Result<_> {
        let mut model = Model::load(Arc::new(GgufFile::open(&work)?), threads)?;
        let total: usize = decide
            .iter()
            .map(|(_, c)| budget::candidates(*c, types).len())
            .sum();
        let pb = ProgressBar::new(total as u64);
        pb.set_style(
            ProgressStyle::with_template(
                "{spinner} measuring each tensor at each type [{bar:30}] {pos}/{len} ({elapsed}, ~{eta} left)",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let r = budget::measure(
            &mut model,
            reference,
            decide,
            types,
            &|name| dequantized(src, name),
            &mut |done, _| pb.set_position(done as u64),
        )?;
        pb.finish_and_clear();
        Ok(r)
    })();
    let _ = std::fs::remove_file(&work);
    measured
}

/// Measurements kept by an earlier run, when they were taken under `key` and cover `decide`.
fn read_sensitivities(
    file: &Path,
    key: &serde_json::Value,
    decide: &[(String, usize)],
) -> Option<(f64, Vec<porteiro_engine::budget::Sensitivity>)> {
    use porteiro_engine::budget::{Choice, Sensitivity};
    let text = std::fs::read_to_string(file).ok()?;
    let v: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            eprintln!(
                "{}: not a measurements file ({e}); measuring again",
                file.display()
            );
            return None;
        }
    };
    if v.get("key") != Some(key) {
        eprintln!(
            "{}: measured on another input, text, window or candidate set; measuring again",
            file.display()
        );
        return None;
    }
    let sens: Option<Vec<Sensitivity>> = v["tensors"]
        .as_array()?
        .iter()
        .map(|t| {
            Some(Sensitivity {
                name: t["name"].as_str()?.to_string(),
                choices: t["choices"]
                    .as_array()?
                    .iter()
                    .map(|c| {
                        Some(Choice {
                            dtype: mix::parse_type(c["type"].as_str()?)?,
                            bytes: c["bytes"].as_u64()? as usize,
                            dkld: c["dkld"].as_f64()?,
                        })
                    })
                    .collect::<Option<_>>()?,
            })
        })
        .collect();
    let sens = sens.filter(|s| {
        s.len() == decide.len() && s.iter().zip(decide).all(|(s, (n, _))| &s.name == n)
    })?;
    eprintln!("reusing the measurements in {}", file.display());
    Some((v["base"].as_f64()?, sens))
}

fn write_sensitivities(
    file: &Path,
    key: &serde_json::Value,
    (base, sens): &(f64, Vec<porteiro_engine::budget::Sensitivity>),
) -> Result<()> {
    let v = serde_json::json!({
        "key": key,
        "base": base,
        "tensors": sens.iter().map(|s| serde_json::json!({
            "name": s.name,
            "choices": s.choices.iter().map(|c| serde_json::json!({
                "type": c.dtype.name(), "bytes": c.bytes, "dkld": c.dkld,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    crate::flywheel_cmd::write_atomic(file, &serde_json::to_string_pretty(&v)?)
}
