//! `porteiro perplexity`: quality of a (quantized) model on real text, comparable with llama-perplexity.

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use std::path::Path;

use porteiro_models::tokenizer::Tokenizer;

use crate::ModelArgs;

#[derive(Args)]
pub struct PplArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// Text file to score.
    #[arg(short, long)]
    file: std::path::PathBuf,
    /// Window size in tokens; the second half of each window is scored.
    #[arg(short = 'c', long = "window", default_value_t = 512)]
    window: usize,
    /// Number of windows to score (at most what the text holds).
    #[arg(long, default_value_t = 16)]
    chunks: usize,
    /// Score the model with this LoRA adapter (llama.cpp GGUF) applied, as `llama-perplexity --lora`.
    #[arg(long)]
    lora: Option<std::path::PathBuf>,
    /// The adapter's multiplier (as llama.cpp's `--lora-scaled FILE SCALE`).
    #[arg(long, default_value_t = 1.0)]
    lora_scale: f32,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// The text's token ids (at least two windows of them) and how many windows to score.
pub fn windows(
    tok: &Tokenizer,
    text: &str,
    file: &Path,
    window: usize,
    chunks: usize,
) -> Result<(Vec<u32>, usize)> {
    let ids = tok.encode(text, true, false);
    if ids.len() < 2 * window {
        bail!(
            "{} tokenizes to {} tokens; need at least {} for a window of {}",
            file.display(),
            ids.len(),
            2 * window,
            window
        );
    }
    let n = chunks.min(ids.len() / window);
    Ok((ids, n))
}

/// The progress bar over `n` windows.
pub fn window_bar(n: usize) -> ProgressBar {
    let pb = ProgressBar::new(n as u64);
    pb.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} windows  {msg}  eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb
}

/// The token each window starts with, when the model adds one.
pub fn bos(tok: &Tokenizer) -> Option<u32> {
    tok.adds_bos().then(|| tok.bos_id()).flatten()
}

pub fn run(a: &PplArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading {}", a.file.display()))?;
    let lm = a.m.load()?;
    let adapter = match &a.lora {
        Some(p) => Some(porteiro_engine::lora::Adapter::open(
            p,
            &lm.model.cfg,
            a.lora_scale,
        )?),
        None => None,
    };
    let (ids, n) = windows(&lm.tokenizer, &text, &a.file, a.window, a.chunks)?;
    let pb = window_bar(n);
    let bos = bos(&lm.tokenizer);
    let r = porteiro_engine::eval::perplexity_with(
        &lm.model,
        adapter.as_ref(),
        &ids,
        a.window,
        n,
        bos,
        &mut |done, ppl| {
            pb.set_position(done as u64);
            pb.set_message(format!("ppl {ppl:.4}"));
        },
    )?;
    pb.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "perplexity {:.4} over {} tokens ({} windows of {})",
            r.ppl, r.scored_tokens, r.chunks, a.window
        );
    }
    Ok(())
}
