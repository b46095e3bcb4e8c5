//! `porteiro compare BASE QUANT -f TEXT`: how far a (quantized) model is from its reference on real
//! text — perplexity of both and their ratio, KL divergence with its percentiles, RMS Δp and same
//! top-1 — the statistics `llama-perplexity --kl-divergence` prints, over the same windows.

use anyhow::{bail, Context, Result};
use clap::Args;
use porteiro_engine::LocalModel;
use porteiro_models::fetch;

#[derive(Args)]
pub struct CompareArgs {
    /// The reference model (catalog alias or .gguf path).
    base: String,
    /// The model compared with it (same vocabulary).
    quant: String,
    /// Text file to score.
    #[arg(short, long)]
    file: std::path::PathBuf,
    /// Window size in tokens; the second half of each window is scored.
    #[arg(short = 'c', long = "window", default_value_t = 512)]
    window: usize,
    /// Number of windows to score (at most what the text holds).
    #[arg(long, default_value_t = 16)]
    chunks: usize,
    /// Worker threads (default: all cores).
    #[arg(short, long)]
    threads: Option<usize>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn load(name: &str, threads: usize) -> Result<LocalModel> {
    let path = fetch::resolve_model(name, true)?;
    if path.is_dir() {
        bail!("{name} is an encoder model; compare needs generative GGUF models");
    }
    LocalModel::open(&path, threads).with_context(|| format!("loading {}", path.display()))
}

pub fn run(a: &CompareArgs) -> Result<()> {
    if a.window < 4 || a.chunks == 0 {
        bail!("--window must be at least 4 and --chunks at least 1");
    }
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading {}", a.file.display()))?;
    let threads = a
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let base = load(&a.base, threads)?;
    let quant = load(&a.quant, threads)?;
    if base.model.cfg.vocab != quant.model.cfg.vocab {
        bail!(
            "{} has a vocabulary of {} tokens and {} of {}: only models sharing a tokenizer compare",
            a.base,
            base.model.cfg.vocab,
            a.quant,
            quant.model.cfg.vocab
        );
    }
    let (ids, n) = crate::perplexity::windows(&base.tokenizer, &text, &a.file, a.window, a.chunks)?;
    let pb = crate::perplexity::window_bar(n);
    let bos = crate::perplexity::bos(&base.tokenizer);
    let r = porteiro_engine::eval::compare(
        &base.model,
        &quant.model,
        &ids,
        a.window,
        n,
        bos,
        &mut |done, kld| {
            pb.set_position(done as u64);
            pb.set_message(format!("mean KLD {kld:.6}"));
        },
    )?;
    pb.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!(
        "{} windows of {} tokens, {} scored",
        r.chunks, a.window, r.scored_tokens
    );
    println!("PPL(base)        {:>12.6}", r.ppl_base);
    println!("PPL(Q)           {:>12.6}", r.ppl);
    println!("PPL(Q)/PPL(base) {:>12.6}", r.ppl_ratio);
    println!("mean KLD         {:>12.6}", r.mean_kld);
    println!("max KLD          {:>12.6}", r.max_kld);
    println!("99.9% KLD        {:>12.6}", r.kld_p999);
    println!("99% KLD          {:>12.6}", r.kld_p99);
    println!("95% KLD          {:>12.6}", r.kld_p95);
    println!("90% KLD          {:>12.6}", r.kld_p90);
    println!("median KLD       {:>12.6}", r.kld_median);
    println!("mean Δp          {:>11.3}%", 100.0 * r.mean_dp);
    println!("RMS Δp           {:>11.3}%", 100.0 * r.rms_dp);
    println!("same top-1       {:>11.3}%", 100.0 * r.same_top1);
    Ok(())
}
