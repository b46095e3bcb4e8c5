//! `porteiro`: the command-line front door. Subcommands stay thin; the work lives in the library crates.

// The command line is the one place that prints: its output is the product.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod bench;
mod compare;
mod flywheel_cmd;
mod imatrix_cmd;
mod lora_cmd;
mod perplexity;
mod privacy_cmd;
mod quantize;
mod report_cmd;
mod router_cmd;
mod serve;

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use porteiro_engine::{generate, FinishReason, GenerateOptions, LocalModel, SamplingParams};
use porteiro_models::catalog;
use porteiro_models::fetch::{self, PullOptions};
use porteiro_models::template::ChatMessage;

/// The default local model: small enough for any laptop, good enough for format/extract/classify work.
pub const DEFAULT_MODEL: &str = "qwen2.5-0.5b";

#[derive(Parser)]
#[command(
    name = "porteiro",
    version,
    about = "SLM-first inference gateway: answer with small local models, escalate only what needs a big one."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the OpenAI-compatible API (chat, completions, embeddings) with continuous batching.
    Serve(serve::ServeArgs),
    /// LoRA adapters of a local model: `bench` (what serving adapters costs).
    #[command(subcommand)]
    Lora(lora_cmd::LoraCmd),
    /// Download a catalog model into the cache ($PORTEIRO_HOME, default ~/.cache/porteiro) and verify it.
    Pull {
        /// Catalog alias (see `porteiro models --catalog`).
        name: String,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// List cached models (or the whole catalog with --catalog).
    Models {
        /// Machine-readable output: a JSON list of objects with name, path, size_bytes.
        #[arg(long)]
        json: bool,
        /// Show every model Porteiro can pull, cached or not.
        #[arg(long)]
        catalog: bool,
    },
    /// Answer one prompt with a local model, streaming the text.
    Run {
        #[command(flatten)]
        m: ModelArgs,
        #[command(flatten)]
        s: SampleArgs,
        /// Send the prompt as raw text (no chat template).
        #[arg(long)]
        raw: bool,
        /// System message for the chat template.
        #[arg(long)]
        system: Option<String>,
        /// Print timing figures to stderr at the end.
        #[arg(long)]
        verbose: bool,
        /// Print the rendered prompt (after the chat template) to stderr before answering.
        #[arg(long)]
        show_prompt: bool,
        /// The prompt; read from stdin when absent.
        prompt: Option<String>,
    },
    /// Interactive chat in the terminal (empty line or Ctrl-D quits, /reset clears the history).
    Chat {
        #[command(flatten)]
        m: ModelArgs,
        #[command(flatten)]
        s: SampleArgs,
        #[arg(long)]
        system: Option<String>,
    },
    /// Measure prefill and decode speed, time to first token, load time and peak memory.
    Bench(bench::BenchArgs),
    /// Perplexity of a model on a text file, computed the way llama-perplexity does.
    Perplexity(perplexity::PplArgs),
    /// How far a (quantized) model is from its reference on a text: PPL of both and their ratio,
    /// KL divergence (mean, percentiles), RMS Δp, same top-1, as llama-perplexity --kl-divergence.
    Compare(compare::CompareArgs),
    /// Rewrite a model at another precision (Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q3_K_M, Q2_K, F16, …) with
    /// llama.cpp's mixtures and reference quantizers: the same bytes llama-quantize writes.
    Quantize(quantize::QuantizeArgs),
    /// Importance matrix of a model on calibration text (llama.cpp's imatrix format), for
    /// `quantize --imatrix`.
    Imatrix(imatrix_cmd::ImatrixArgs),
    /// The semantic router: train its scorer, calibrate, evaluate, measure decision latency.
    #[command(subcommand)]
    Router(router_cmd::RouterCmd),
    /// The flywheel: curate the upstream answers collected by `serve` ([flywheel] collect = true)
    /// and cluster them into task types.
    #[command(subcommand)]
    Flywheel(flywheel_cmd::FlywheelCmd),
    /// The privacy guard's detectors: scan a text, measure precision/recall on a labelled corpus, bench.
    Privacy(privacy_cmd::PrivacyArgs),
    /// FinOps report of a period from the request log: HTML (charts inline) and Markdown.
    Report(report_cmd::ReportArgs),
    /// Measure the gateway's own overhead at a request rate against an instant upstream (loopback).
    GatewayBench(report_cmd::GatewayBenchArgs),
    /// The tamper-evident audit trail: verify its hash chain, export it.
    #[command(subcommand)]
    Audit(privacy_cmd::AuditCmd),
    /// Show the token ids of a text.
    Tokenize {
        #[command(flatten)]
        m: ModelArgs,
        /// Do not add BOS/EOS even if the model asks for them.
        #[arg(long)]
        no_special: bool,
        /// Treat special-token text such as <|im_start|> as plain text.
        #[arg(long)]
        no_parse_special: bool,
        /// TEXT is a chat-completion request (a JSON file, `-` for stdin): print the prompt the
        /// local tier builds from it (the model's chat template, tools included), then its ids.
        #[arg(long)]
        chat: bool,
        /// The text to tokenize (with --chat: the request file).
        text: String,
    },
}

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Catalog alias or path to a .gguf file (pulled automatically if missing).
    #[arg(short, long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Worker threads (default: all cores).
    #[arg(short, long)]
    pub threads: Option<usize>,
    /// Context window in tokens (default: min(model's, 8192)).
    #[arg(long)]
    pub ctx: Option<usize>,
}

impl ModelArgs {
    pub fn threads(&self) -> usize {
        self.threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    pub fn load(&self) -> Result<LocalModel> {
        let path = fetch::resolve_model(&self.model, true)?;
        if path.is_dir() {
            bail!(
                "{} is an encoder model; this command needs a generative GGUF model",
                self.model
            );
        }
        LocalModel::open(&path, self.threads())
            .with_context(|| format!("loading {}", path.display()))
    }

    pub fn ctx(&self, lm: &LocalModel) -> usize {
        self.ctx.unwrap_or(lm.model.cfg.n_ctx_train.min(8192))
    }
}

#[derive(Args, Clone)]
struct SampleArgs {
    /// Maximum tokens to generate.
    #[arg(short = 'n', long, default_value_t = 512)]
    max_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.7)]
    temp: f32,
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    /// Random seed: the same seed gives the same text.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Stop when this string appears (repeatable).
    #[arg(long)]
    stop: Vec<String>,
}

impl SampleArgs {
    fn options(&self) -> Result<GenerateOptions> {
        let sampling = SamplingParams {
            temperature: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
            ..SamplingParams::default()
        };
        sampling.validate().map_err(anyhow::Error::msg)?;
        Ok(GenerateOptions {
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
            sampling,
            ..Default::default()
        })
    }
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = dispatch(cli.cmd) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn dispatch(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Serve(a) => serve::run(&a),
        Cmd::Pull { name, quiet } => {
            let entry = catalog::lookup(&name).with_context(|| {
                format!(
                    "unknown model `{name}`; known: {}",
                    catalog::aliases().join(", ")
                )
            })?;
            let path = fetch::pull(
                entry,
                &PullOptions {
                    quiet,
                    ..Default::default()
                },
            )?;
            println!("{}", path.display());
            Ok(())
        }
        Cmd::Models { json, catalog: all } => models(json, all),
        Cmd::Run {
            m,
            s,
            raw,
            system,
            verbose,
            show_prompt,
            prompt,
        } => {
            let prompt = match prompt {
                Some(p) => p,
                None => {
                    let mut buf = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut buf)?;
                    buf
                }
            };
            let lm = m.load()?;
            let opts = s.options()?;
            let mut msgs = Vec::new();
            if let Some(sys) = system {
                msgs.push(ChatMessage {
                    role: "system".into(),
                    content: sys,
                });
            }
            msgs.push(ChatMessage {
                role: "user".into(),
                content: prompt.clone(),
            });
            let text = if raw { prompt } else { render(&lm, &msgs)? };
            if show_prompt {
                eprintln!("{text}");
            }
            let g = answer(&lm, &m, &text, &opts)?;
            if verbose {
                eprintln!(
                    "[{} prompt tokens, {} generated, prefill {:.1} tok/s, decode {:.1} tok/s, ttft {:.0} ms]",
                    g.prompt_tokens,
                    g.tokens.len(),
                    g.prompt_tokens as f64 / g.prefill_s.max(1e-9),
                    g.tokens.len().saturating_sub(1) as f64 / g.decode_s.max(1e-9),
                    g.ttft_s * 1e3
                );
            }
            Ok(())
        }
        Cmd::Chat { m, s, system } => chat(&m, &s, system),
        Cmd::Bench(a) => bench::run(&a),
        Cmd::Lora(c) => lora_cmd::run(&c),
        Cmd::Perplexity(a) => perplexity::run(&a),
        Cmd::Compare(a) => compare::run(&a),
        Cmd::Quantize(a) => quantize::run(&a),
        Cmd::Imatrix(a) => imatrix_cmd::run(&a),
        Cmd::Router(c) => router_cmd::run(&c),
        Cmd::Flywheel(c) => flywheel_cmd::run(&c),
        Cmd::Privacy(c) => privacy_cmd::run_privacy(&c),
        Cmd::Audit(c) => privacy_cmd::run_audit(&c),
        Cmd::Report(a) => report_cmd::report(&a),
        Cmd::GatewayBench(a) => report_cmd::gateway_bench(&a),
        Cmd::Tokenize {
            m,
            no_special,
            no_parse_special,
            chat,
            text,
        } => {
            let path = fetch::resolve_model(&m.model, true)?;
            let file = porteiro_models::gguf::GgufFile::open(&path)?;
            let tok = porteiro_models::tokenizer::Tokenizer::from_gguf(&file)?;
            let text = if chat {
                let body = if text == "-" {
                    std::io::read_to_string(std::io::stdin())?
                } else {
                    std::fs::read_to_string(&text)
                        .with_context(|| format!("reading the chat request {text}"))?
                };
                let request: serde_json::Value = serde_json::from_str(&body)
                    .with_context(|| format!("{text} is not a JSON chat request"))?;
                let template = porteiro_models::template::ChatTemplate::from_gguf(&file, &tok)?;
                let prompt = porteiro_server::prompt::chat_prompt(template.as_ref(), &request)
                    .map_err(|e| anyhow::anyhow!("{}", e.message))?;
                println!("{prompt}");
                prompt
            } else {
                text
            };
            let ids = tok.encode(&text, !no_special, !no_parse_special);
            println!("{}", serde_json::to_string(&ids)?);
            Ok(())
        }
    }
}

fn models(json: bool, all: bool) -> Result<()> {
    let cached = fetch::cached_models();
    if json {
        let list: Vec<_> = if all {
            catalog::catalog()
                .iter()
                .map(|e| {
                    let c = cached.iter().find(|c| c.name == e.alias);
                    serde_json::json!({"name": e.alias, "description": e.description, "cached": c.is_some(),
                        "path": c.map(|c| c.path.display().to_string()), "size_bytes": c.map(|c| c.size_bytes)})
                })
                .collect()
        } else {
            cached
                .iter()
                .map(|c| serde_json::json!({"name": c.name, "path": c.path.display().to_string(), "size_bytes": c.size_bytes}))
                .collect()
        };
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    if all {
        for e in catalog::catalog() {
            let mark = if cached.iter().any(|c| c.name == e.alias) {
                "cached"
            } else {
                ""
            };
            println!("{:<14} {:<7} {}", e.alias, mark, e.description);
        }
    } else if cached.is_empty() {
        println!(
            "no models cached in {}; try `porteiro pull {DEFAULT_MODEL}`",
            fetch::home_dir().display()
        );
    } else {
        for c in &cached {
            println!(
                "{:<14} {:>8.1} MB  {}",
                c.name,
                c.size_bytes as f64 / 1e6,
                c.path.display()
            );
        }
    }
    Ok(())
}

fn render(lm: &LocalModel, msgs: &[ChatMessage]) -> Result<String> {
    match &lm.template {
        Some(t) => Ok(t.render(msgs, true)?),
        // Base models without a template get the conversation as plain text.
        None => Ok(msgs
            .iter()
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>()
            .join("\n\n")),
    }
}

fn answer(
    lm: &LocalModel,
    m: &ModelArgs,
    text: &str,
    opts: &GenerateOptions,
) -> Result<porteiro_engine::Generation> {
    let ids = lm.tokenizer.encode(text, true, true);
    let n_ctx = m.ctx(lm);
    if ids.len() + 1 > n_ctx {
        bail!(
            "the prompt has {} tokens, more than the context window of {n_ctx}",
            ids.len()
        );
    }
    let mut kv = lm.model.new_cache(n_ctx);
    let mut out = std::io::stdout();
    let g = generate(&lm.model, &lm.tokenizer, &ids, opts, &mut kv, &mut |t| {
        let _ = out.write_all(t.as_bytes());
        let _ = out.flush();
    })?;
    if g.finish == FinishReason::Length && g.tokens.len() < opts.max_tokens {
        eprintln!("\n[context window of {n_ctx} tokens is full]");
    }
    println!();
    Ok(g)
}

fn chat(m: &ModelArgs, s: &SampleArgs, system: Option<String>) -> Result<()> {
    let lm = m.load()?;
    let opts = s.options()?;
    let mut history: Vec<ChatMessage> = system
        .iter()
        .map(|c| ChatMessage {
            role: "system".into(),
            content: c.clone(),
        })
        .collect();
    let base = history.len();
    eprintln!(
        "porteiro chat with {} — empty line or Ctrl-D to quit, /reset to start over",
        m.model
    );
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            return Ok(());
        }
        if line.trim() == "/reset" {
            history.truncate(base);
            continue;
        }
        history.push(ChatMessage {
            role: "user".into(),
            content: line.trim_end().to_string(),
        });
        let text = render(&lm, &history)?;
        let g = answer(&lm, m, &text, &opts)?;
        history.push(ChatMessage {
            role: "assistant".into(),
            content: g.text,
        });
    }
}

/// Peak resident memory of this process (VmHWM), bytes.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_owned)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

pub fn model_path(name: &str) -> Result<PathBuf> {
    Ok(fetch::resolve_model(name, true)?)
}
