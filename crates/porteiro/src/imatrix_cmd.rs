//! `porteiro imatrix -m MODEL -f TEXT -o FILE`: the importance matrix of a model on calibration
//! text — per weight matrix, the sum of squared inputs per column — in llama.cpp's imatrix format,
//! for `porteiro quantize --imatrix` and `llama-quantize --imatrix` alike.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use porteiro_engine::{LocalModel, Scratch};
use porteiro_models::fetch;

#[derive(Args)]
pub struct ImatrixArgs {
    /// The model (catalog alias or .gguf path); the one to be quantized, in its best precision.
    #[arg(short, long)]
    model: String,
    /// Calibration text (pick text like the traffic the model will serve; measure on other text).
    #[arg(
        short,
        long,
        required_unless_present = "from_log",
        conflicts_with = "from_log"
    )]
    file: Option<PathBuf>,
    /// Calibrate on served traffic instead: chat JSONL (OpenAI's fine-tuning format), e.g. a
    /// flywheel cluster's `cluster-N-*.jsonl`; each conversation is rendered with the model's own
    /// chat template, answer included, as the server renders it.
    #[arg(long, value_name = "JSONL")]
    from_log: Option<PathBuf>,
    /// The imatrix file to write.
    #[arg(short, long)]
    out: PathBuf,
    /// Tokens per window (as llama-imatrix's -c).
    #[arg(short = 'c', long = "window", default_value_t = 512)]
    window: usize,
    /// Windows to run (at most what the text holds).
    #[arg(long, default_value_t = 32)]
    chunks: usize,
    /// Worker threads (default: all cores).
    #[arg(short, long)]
    threads: Option<usize>,
}

pub fn run(a: &ImatrixArgs) -> Result<()> {
    if a.window < 2 || a.chunks == 0 {
        bail!("--window must be at least 2 and --chunks at least 1");
    }
    let threads = a
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let path = fetch::resolve_model(&a.model, true)?;
    if path.is_dir() {
        bail!(
            "{} is an encoder model; imatrix takes generative GGUF models",
            a.model
        );
    }
    let mut m =
        LocalModel::open(&path, threads).with_context(|| format!("loading {}", path.display()))?;
    let (ids, source) = match (&a.file, &a.from_log) {
        (Some(f), _) => {
            let text =
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            (m.tokenizer.encode(&text, true, false), f)
        }
        (None, Some(log)) => {
            let render = crate::lora_cmd::ServerRender(m.template.take());
            let loaded = porteiro_train::data::load(log, &m.tokenizer, &render, 1 << 20, true)?;
            if !loaded.skipped.is_empty() {
                eprintln!(
                    "skipped {} lines of {} (not chat requests with an answer)",
                    loaded.skipped.len(),
                    log.display()
                );
            }
            let ids: Vec<u32> = loaded
                .examples
                .iter()
                .flat_map(|e| e.seq.tokens.iter().copied())
                .collect();
            (ids, log)
        }
        (None, None) => bail!("give -f TEXT or --from-log JSONL"),
    };
    let n = a.chunks.min(ids.len() / a.window);
    if n == 0 {
        bail!(
            "{} gives {} tokens, less than one window of {}",
            source.display(),
            ids.len(),
            a.window
        );
    }
    let bos = crate::perplexity::bos(&m.tokenizer);
    let pb = crate::perplexity::window_bar(n);
    let mut s = Scratch::default();
    s.collect_imatrix();
    let mut kv = m.model.new_cache(a.window);
    for c in 0..n {
        let mut chunk = ids[c * a.window..(c + 1) * a.window].to_vec();
        if let Some(b) = bos {
            chunk[0] = b;
        }
        // One pass over the window (logits only at its end: the sums are what is wanted).
        kv.truncate(0);
        porteiro_engine::generate::prefill(&m.model, &chunk, &mut kv, &mut s, chunk.len())?;
        pb.set_position(c as u64 + 1);
    }
    pb.finish_and_clear();
    let Some(sums) = s.take_imatrix() else {
        bail!("nothing was collected");
    };
    let dataset = source.file_name().map_or_else(
        || source.display().to_string(),
        |f| f.to_string_lossy().into_owned(),
    );
    sums.save(&a.out, &dataset, n, a.window)
        .with_context(|| format!("writing {}", a.out.display()))?;
    println!(
        "{}: {} matrices over {n} windows of {} tokens ({} tokens)",
        a.out.display(),
        sums.sums.len(),
        a.window,
        n * a.window
    );
    Ok(())
}
