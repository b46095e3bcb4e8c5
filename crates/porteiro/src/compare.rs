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
    #[arg(short, long, required_unless_present = "tasks")]
    file: Option<std::path::PathBuf>,
    /// Task accuracy too: chat JSONL (OpenAI's fine-tuning format, e.g. a flywheel cluster's
    /// held-out requests), each line's last assistant message the expected answer. Both models
    /// answer every request through `porteiro serve` (greedy); answers are scored by kind (tool
    /// calls and JSON compared parsed, labels exactly, free text by token F1 ≥ 0.5).
    #[arg(long, value_name = "JSONL")]
    tasks: Option<std::path::PathBuf>,
    /// Most tokens per task answer.
    #[arg(long, default_value_t = 256)]
    max_tokens: u32,
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
    let tasks = a.tasks.as_deref().map(read_tasks).transpose()?;
    if let Some(file) = &a.file {
        text_stats(a, file)?;
    }
    if let Some(t) = tasks {
        task_accuracy(a, &t)?;
    }
    Ok(())
}

/// (request without the answer, expected answer) per line.
fn read_tasks(path: &std::path::Path) -> Result<Vec<(serde_json::Value, serde_json::Value)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let bad = |why: &str| anyhow::anyhow!("{}:{}: {why}", path.display(), i + 1);
        let mut req: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(&e.to_string()))?;
        let msgs = req["messages"]
            .as_array_mut()
            .ok_or_else(|| bad("no `messages` array"))?;
        if msgs.last().and_then(|m| m["role"].as_str()) != Some("assistant") {
            return Err(bad("the last message is not the expected assistant answer"));
        }
        let expected = msgs.pop().unwrap_or_default();
        out.push((req, expected));
    }
    if out.is_empty() {
        bail!("{} holds no tasks", path.display());
    }
    Ok(out)
}

/// Each model's share of tasks answered as expected (Wilson 95% interval), and how often the two
/// agree with each other.
fn task_accuracy(a: &CompareArgs, tasks: &[(serde_json::Value, serde_json::Value)]) -> Result<()> {
    use porteiro_flywheel::item::kind_of;
    use porteiro_flywheel::score::{agrees, wilson};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(900))
        .build()?;
    let requests: Vec<serde_json::Value> = tasks.iter().map(|(r, _)| r.clone()).collect();
    let mut answers = Vec::new();
    for model in [&a.base, &a.quant] {
        let mut child = crate::flywheel_cmd::spawn_server(model, &[])?;
        rt.block_on(crate::flywheel_cmd::ready(&client, &mut child))?;
        // The name the server gives the model (a path's file stem, an alias as given).
        let listed: serde_json::Value = rt.block_on(async {
            client
                .get(format!("{}/v1/models", child.base))
                .send()
                .await?
                .json()
                .await
        })?;
        let served = listed["data"][0]["id"]
            .as_str()
            .unwrap_or(model)
            .to_string();
        let served = served.as_str();
        let pb = crate::router_cmd::progress(tasks.len(), &format!("{model}: tasks"));
        let got = rt.block_on(crate::flywheel_cmd::answer_all(
            &client,
            &child.base,
            served,
            &requests,
            a.max_tokens,
            &pb,
        ));
        pb.finish_and_clear();
        answers.push(got);
    }
    let score = |got: &[std::result::Result<serde_json::Value, String>]| -> usize {
        got.iter()
            .zip(tasks)
            .filter(|(g, (req, want))| {
                g.as_ref()
                    .is_ok_and(|g| agrees(kind_of(req, want), want, g))
            })
            .count()
    };
    let n = tasks.len();
    let same = answers[0]
        .iter()
        .zip(&answers[1])
        .zip(tasks)
        .filter(|((x, y), (req, want))| match (x, y) {
            (Ok(x), Ok(y)) => agrees(kind_of(req, want), x, y),
            _ => false,
        })
        .count();
    let mut out = serde_json::Map::new();
    for (name, model, got) in [
        ("base", &a.base, &answers[0]),
        ("quant", &a.quant, &answers[1]),
    ] {
        let k = score(got);
        let (lo, hi) = wilson(k, n);
        let errors = got.iter().filter(|g| g.is_err()).count();
        if a.json {
            out.insert(
                name.into(),
                serde_json::json!({"model": model, "correct": k, "tasks": n, "accuracy": k as f64 / n as f64, "low": lo, "high": hi, "errors": errors}),
            );
        } else {
            println!(
                "{name:<5} {model}: {k}/{n} tasks as expected, {:.1}% (95% CI {:.1}–{:.1}){}",
                100.0 * k as f64 / n as f64,
                100.0 * lo,
                100.0 * hi,
                if errors > 0 {
                    let first = got
                        .iter()
                        .find_map(|g| g.as_ref().err())
                        .cloned()
                        .unwrap_or_default();
                    format!(", {errors} errors (first: {first})")
                } else {
                    String::new()
                }
            );
        }
    }
    if a.json {
        out.insert("agree".into(), serde_json::json!(same as f64 / n as f64));
        println!("{}", serde_json::Value::Object(out));
    } else {
        println!(
            "the two answer alike on {same}/{n} tasks ({:.1}%)",
            100.0 * same as f64 / n as f64
        );
    }
    Ok(())
}

fn text_stats(a: &CompareArgs, file: &std::path::Path) -> Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
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
    let (ids, n) = crate::perplexity::windows(&base.tokenizer, &text, file, a.window, a.chunks)?;
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
