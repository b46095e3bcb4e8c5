//! `porteiro lora`: LoRA adapters. `train` fine-tunes one on the CPU over the quantized model
//! (`porteiro-train`), rendering its data through the server's own prompt code. `bench` measures what serving adapters costs: the decode
//! overhead of one adapter on every linear layer against the base, and the aggregate throughput of
//! many streams spread over several adapters (one shared batch) against the same streams on the
//! base, interleaved in one run so the machine's noise hits both sides alike.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use porteiro_engine::lora::{Adapter, Proj};
use porteiro_engine::sampler::Rng;
use porteiro_engine::{BatchToken, KvCache, Model, Scratch};
use porteiro_models::gguf::GgufFile;
use porteiro_models::template::ChatTemplate;
use porteiro_models::tokenizer::Tokenizer;
use porteiro_train::base::Base;
use porteiro_train::data::{self, Render};
use porteiro_train::optim::AdamW;
use porteiro_train::run::{checkpoint_path, parse_targets, Event, Options, Run, Trace};

use crate::ModelArgs;

#[derive(Subcommand)]
pub enum LoraCmd {
    /// Decode overhead of an adapter on every linear layer, and aggregate throughput of streams
    /// spread over several adapters against the base (random adapters of the given rank).
    Bench(LoraBenchArgs),
    /// Train an adapter on chat data (OpenAI's fine-tuning JSONL: one {"messages": [...],
    /// "tools": [...]} per line; the loss falls on assistant turns) over the frozen quantized model.
    Train(Box<TrainArgs>),
    /// Merge an adapter into its base model: every adapted matrix becomes W + s·B·A (s =
    /// scale·alpha/rank), the base dequantized first; written at --type (F16 by default), so a
    /// fine-tuned model can be quantized and measured (`porteiro quantize`, `porteiro compare`).
    Merge(MergeArgs),
}

#[derive(Args)]
pub struct MergeArgs {
    /// The base model the adapter was trained on (catalog alias or .gguf path).
    #[arg(long, short)]
    model: String,
    /// The adapter (GGUF, as `porteiro lora train` writes it).
    #[arg(long)]
    adapter: PathBuf,
    /// The merged model to write.
    #[arg(long)]
    out: PathBuf,
    /// File type of the result (as `porteiro quantize --type`).
    #[arg(long = "type", default_value = "F16")]
    ftype: String,
    /// Multiplier of the adapter's update (as `--lora-scale` when serving).
    #[arg(long, default_value_t = 1.0)]
    scale: f32,
    /// Replace OUT if it exists.
    #[arg(long)]
    force: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// Training data (JSONL, OpenAI chat fine-tuning format).
    #[arg(long)]
    data: PathBuf,
    /// Held-out data for the loss reported after each epoch (same format).
    #[arg(long)]
    eval: Option<PathBuf>,
    /// The adapter to write (GGUF, loads in `porteiro serve --lora` and llama.cpp `--lora`).
    #[arg(long)]
    out: PathBuf,
    /// Adapter rank.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// LoRA alpha (the update is scaled by alpha / rank).
    #[arg(long, default_value_t = 32.0)]
    alpha: f32,
    /// Projections to adapt: attn (q,k,v,o), mlp (gate,up,down), all, or any of q,k,v,o,gate,up,down.
    #[arg(long, default_value = "attn,mlp")]
    targets: String,
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 2e-4)]
    lr: f32,
    /// Warm-up updates (default: 5% of the run).
    #[arg(long)]
    warmup: Option<usize>,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    /// Clip the gradient's global norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    clip: f32,
    /// Tokens per optimizer step (sequences are packed up to it).
    #[arg(long, default_value_t = 2048)]
    batch_tokens: usize,
    /// Tokens per forward/backward pass; a step's passes accumulate their gradients (memory grows
    /// with this, not with --batch-tokens).
    #[arg(long, default_value_t = 512)]
    micro_tokens: usize,
    /// Longest sequence accepted (default: min(1024, the model's context)).
    #[arg(long)]
    max_seq: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop after this many updates (the schedule still spans the whole run).
    #[arg(long)]
    max_steps: Option<usize>,
    /// Time budget in minutes: no update starts after it; the adapter holds the updates done (and a
    /// checkpoint is kept, so --resume goes on). The schedule still spans the whole run.
    #[arg(long)]
    minutes: Option<f64>,
    /// Save a checkpoint (<out>.ckpt) every this many updates (0: only on Ctrl-C).
    #[arg(long, default_value_t = 50)]
    checkpoint_every: usize,
    /// Continue from <out>.ckpt (same data and options).
    #[arg(long)]
    resume: bool,
    /// Skip bad lines (counted) instead of stopping at the first.
    #[arg(long)]
    skip_bad: bool,
    /// Start B uniform in ±this instead of zero (reference checks of the first step's gradients).
    #[arg(long, default_value_t = 0.0)]
    init_b: f32,
    /// Write a JSONL trace of the run (config, every step's sequences, loss and learning rate) with
    /// the initial adapter and the first step's gradients next to it (the PyTorch reference check,
    /// scripts/lora_reference.py, replays it).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Print a JSON summary (tokens/s after the first step, peak RSS) on stdout at the end.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct LoraBenchArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// Adapter rank.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Streams decoded together for the aggregate test.
    #[arg(long, default_value_t = 16)]
    streams: usize,
    /// Adapters the streams are spread over (stream i uses adapter i mod N).
    #[arg(long, default_value_t = 4)]
    adapters: usize,
    /// Tokens decoded per measurement.
    #[arg(short = 'n', long, default_value_t = 64)]
    gen: usize,
    /// Repetitions of each measurement (alternating base and adapter); medians are reported.
    #[arg(short = 'r', long, default_value_t = 3)]
    reps: usize,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(c: &LoraCmd) -> Result<()> {
    match c {
        LoraCmd::Bench(a) => bench(a),
        LoraCmd::Train(a) => train(a),
        LoraCmd::Merge(a) => merge(a),
    }
}

struct AdapterMerge(Adapter);

impl crate::quantize::Merge for AdapterMerge {
    fn adapts(&self, name: &str) -> bool {
        self.0.pair_for(name).is_some()
    }

    fn apply(&self, name: &str, w: &mut [f32], cols: usize) {
        let Some(m) = self.0.pair_for(name) else {
            return;
        };
        let (a, b, r) = (m.a(), m.b(), m.rank);
        let s = self.0.effective_scale(r);
        // Row o of W (one output, `cols` inputs) gains s·Σ_j B[o][j]·A[j].
        for (o, row) in w.chunks_exact_mut(cols).enumerate() {
            for j in 0..r {
                let c = s * b[o * r + j];
                for (x, av) in row.iter_mut().zip(&a[j * cols..(j + 1) * cols]) {
                    *x += c * av;
                }
            }
        }
    }
}

fn merge(a: &MergeArgs) -> Result<()> {
    let ftype = porteiro_engine::mix::Ftype::parse(&a.ftype).ok_or_else(|| {
        anyhow::anyhow!(
            "unknown file type `{}`: one of {}",
            a.ftype,
            porteiro_engine::mix::Ftype::ALL
                .map(|f| f.name())
                .join(", ")
        )
    })?;
    let (path, src) = crate::quantize::open_model(&a.model)?;
    let cfg = porteiro_engine::model::Config::from_gguf(&src)?;
    let adapter = Adapter::open(&a.adapter, &cfg, a.scale)?;
    let n = adapter.pairs().count();
    eprintln!(
        "merging {} ({n} matrices) into {}",
        a.adapter.display(),
        path.display()
    );
    let opts = porteiro_engine::mix::Options {
        ftype: Some(ftype),
        ..Default::default()
    };
    let out = crate::quantize::Output {
        imatrix: None,
        extra_meta: Vec::new(),
        path: &a.out,
        force: a.force,
        threads: a.threads,
        quiet: false,
    };
    crate::quantize::rewrite(&path, &src, &out, &opts, Some(&AdapterMerge(adapter)))
}

/// Training data rendered by the server's own prompt code.
pub(crate) struct ServerRender(pub(crate) Option<ChatTemplate>);

impl Render for ServerRender {
    fn prompt(&self, request: &serde_json::Value) -> Result<String, String> {
        porteiro_server::prompt::chat_prompt(self.0.as_ref(), request).map_err(|e| e.message)
    }
    fn answer(&self, message: &serde_json::Value) -> Result<String, String> {
        porteiro_server::prompt::assistant_text(self.0.as_ref(), message).map_err(|e| e.message)
    }
}

/// Ctrl-C sets `stop` (the loop saves a checkpoint after the pass in flight); a second one exits.
fn on_interrupt(stop: &'static AtomicBool) {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            while tokio::signal::ctrl_c().await.is_ok() {
                if stop.swap(true, Ordering::SeqCst) {
                    std::process::exit(130);
                }
            }
        });
    });
}

fn train(a: &TrainArgs) -> Result<()> {
    static STOP: AtomicBool = AtomicBool::new(false);
    let path = crate::model_path(&a.m.model)?;
    let file = Arc::new(GgufFile::open(&path)?);
    let tok = Tokenizer::from_gguf(&file)?;
    let template = ChatTemplate::from_gguf(&file, &tok)?;
    let base = Base::from_gguf(file.clone())?;
    let arch = base.cfg.arch.name();
    let max_seq = a.max_seq.unwrap_or(base.cfg.n_ctx_train.min(1024));
    if max_seq > base.cfg.n_ctx_train {
        bail!(
            "--max-seq {max_seq} is over the model's context ({})",
            base.cfg.n_ctx_train
        );
    }
    if a.rank == 0 || a.epochs == 0 || a.batch_tokens == 0 || a.micro_tokens == 0 {
        bail!("--rank, --epochs, --batch-tokens and --micro-tokens must be at least 1");
    }
    if !(a.lr > 0.0 && a.lr.is_finite()) {
        bail!("--lr must be a positive number");
    }
    let render = ServerRender(template);
    let train = data::load(&a.data, &tok, &render, max_seq, a.skip_bad)?;
    for (line, why) in train.skipped.iter().take(5) {
        eprintln!("skipped {}:{line}: {why}", a.data.display());
    }
    let eval = match &a.eval {
        Some(p) => data::load(p, &tok, &render, max_seq, a.skip_bad)?,
        None => data::Loaded::default(),
    };
    let tokens: usize = train.examples.iter().map(|e| e.seq.tokens.len()).sum();
    let targets: usize = train.examples.iter().map(|e| e.seq.targets()).sum();
    eprintln!(
        "{}: {} sequences ({} tokens, {} target tokens){}; eval: {} sequences",
        a.data.display(),
        train.examples.len(),
        tokens,
        targets,
        if train.skipped.is_empty() {
            String::new()
        } else {
            format!(", {} lines skipped", train.skipped.len())
        },
        eval.examples.len()
    );
    let opts = Options {
        rank: a.rank,
        alpha: a.alpha,
        targets: parse_targets(&a.targets)?
            .iter()
            .map(|p| p.short().to_string())
            .collect(),
        epochs: a.epochs,
        opt: AdamW {
            lr: a.lr,
            weight_decay: a.weight_decay,
            ..AdamW::default()
        },
        batch_tokens: a.batch_tokens,
        micro_tokens: a.micro_tokens,
        warmup: a.warmup,
        clip: (a.clip > 0.0).then_some(a.clip),
        seed: a.seed,
        threads: a.m.threads(),
        max_steps: a.max_steps,
        checkpoint_every: a.checkpoint_every,
        init_b: a.init_b,
    };
    on_interrupt(&STOP);
    let run = Run {
        base: &base,
        arch,
        model_path: &path,
        opts,
        train: &train.examples,
        eval: &eval.examples,
        out: &a.out,
        resume: a.resume,
        stop: &STOP,
        trace: a.trace.as_deref().map(Trace::create).transpose()?,
        deadline: a
            .minutes
            .and_then(|m| std::time::Duration::try_from_secs_f64(m.max(0.0) * 60.0).ok())
            .and_then(|d| Instant::now().checked_add(d)),
    };
    let pb = ProgressBar::hidden();
    let started = Instant::now();
    let mut done_tokens = 0usize;
    // The loss curve and the evals, for the --json summary.
    let (mut losses, mut evals) = (Vec::new(), Vec::new());
    // Steady-state speed: the steps after the first of this run (which pays page faults and warm-up).
    let (mut steady_tokens, mut steady_secs, mut seen) = (0usize, 0f64, 0usize);
    let mut logged = Instant::now();
    // Without a terminal the bar is hidden: lines go to stderr, steps every 10 s.
    let say = |pb: &ProgressBar, line: String| {
        if pb.is_hidden() {
            eprintln!("{line}");
        } else {
            pb.println(line);
        }
    };
    let mut on = |ev: Event| match ev {
        Event::Start {
            steps,
            params,
            first,
        } => {
            pb.set_draw_target(ProgressDrawTarget::stderr());
            pb.set_length(steps as u64);
            pb.set_position(first as u64);
            pb.reset_eta();
            pb.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg} ETA {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            say(
                &pb,
                format!(
                    "training {params} parameters (rank {}, {}) on {}{}",
                    a.rank,
                    a.targets,
                    path.display(),
                    if first > 0 {
                        format!(", resuming after step {first}")
                    } else {
                        String::new()
                    }
                ),
            );
        }
        Event::Step {
            step,
            loss,
            grad_norm,
            lr,
            tokens,
            secs,
            epoch,
            steps,
        } => {
            done_tokens += tokens;
            losses.push(loss);
            seen += 1;
            if seen > 1 {
                steady_tokens += tokens;
                steady_secs += secs;
            }
            pb.set_position(step as u64);
            let msg = format!(
                "epoch {} loss {loss:.4} |g| {grad_norm:.3} lr {lr:.2e} {:.0} tok/s",
                epoch + 1,
                tokens as f64 / secs.max(1e-9)
            );
            if pb.is_hidden() && (logged.elapsed().as_secs() >= 10 || step == 1 || step == steps) {
                logged = Instant::now();
                eprintln!("step {step}/{steps} {msg}");
            }
            pb.set_message(msg);
        }
        Event::Eval {
            epoch,
            loss,
            targets,
        } => {
            evals.push(serde_json::json!({"epoch": epoch, "loss": loss, "targets": targets}));
            say(
                &pb,
                format!(
                    "epoch {}: eval loss {loss:.4} over {targets} target tokens",
                    epoch + 1
                ),
            );
        }
        Event::Checkpoint { step, path } => {
            say(&pb, format!("step {step}: checkpoint {}", path.display()))
        }
        Event::OutOfTime { step } => say(
            &pb,
            format!("time budget spent after step {step}: writing the adapter with the steps done"),
        ),
        Event::Interrupted { step } => say(
            &pb,
            format!(
                "interrupted: checkpoint after step {step} in {}; continue with --resume",
                checkpoint_path(&a.out).display()
            ),
        ),
    };
    let (_, interrupted) = run.go(&mut on)?;
    pb.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    if interrupted {
        std::process::exit(130);
    }
    let rate = steady_tokens as f64 / steady_secs.max(1e-9);
    let rss = crate::peak_rss_bytes() as f64 / (1 << 20) as f64;
    eprintln!(
        "wrote {} ({done_tokens} tokens in {secs:.1} s; training {rate:.1} tok/s after the first step; peak RSS {rss:.0} MiB)",
        a.out.display(),
    );
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "impl": "porteiro", "model": a.m.model, "steps": seen, "tokens": done_tokens,
                "tokens_per_s": rate, "peak_rss_mib": rss, "threads": a.m.threads(), "rank": a.rank,
                "losses": losses, "evals": evals,
            })
        );
    }
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Aggregate tokens/s of `kvs.len()` sequences decoding `n` tokens, one batched forward per step;
/// `adapters[i]` is sequence i's adapter (empty: the base for all).
fn decode(
    m: &Model,
    kvs: &mut [KvCache],
    n: usize,
    adapters: &[Option<&Adapter>],
    s: &mut Scratch,
    seed: u64,
) -> Result<f64> {
    let b = kvs.len();
    for kv in kvs.iter_mut() {
        kv.truncate(0);
    }
    let mut rng = Rng::new(seed);
    let t = Instant::now();
    for pos in 0..n {
        let batch: Vec<BatchToken> = (0..b)
            .map(|seq| BatchToken {
                token: (rng.next_u64() % m.cfg.vocab as u64) as u32,
                seq,
                pos,
                logits: true,
            })
            .collect();
        let mut refs: Vec<&mut KvCache> = kvs.iter_mut().collect();
        m.forward_lora(&batch, adapters, &mut refs, s)?;
    }
    Ok((n * b) as f64 / t.elapsed().as_secs_f64())
}

fn bench(a: &LoraBenchArgs) -> Result<()> {
    anyhow::ensure!(
        a.rank > 0 && a.adapters > 0 && a.streams > 0 && a.gen > 0,
        "--rank, --adapters, --streams and -n must be at least 1"
    );
    let lm = a.m.load()?;
    let m = &lm.model;
    let t = Instant::now();
    let ads: Vec<Adapter> = (0..a.adapters)
        .map(|i| {
            // B small and non-zero, so that the delta is really computed.
            let alpha = 2.0 * a.rank as f32;
            Adapter::random(&m.cfg, a.rank, &Proj::ALL, 0.01, alpha, 1 + i as u64)
        })
        .collect();
    let build_ms = t.elapsed().as_secs_f64() * 1e3;
    let mb = ads[0].bytes() as f64 / (1 << 20) as f64;
    let mut s = Scratch::default();
    let mut one = vec![m.new_cache(a.gen)];
    let mut many: Vec<KvCache> = (0..a.streams).map(|_| m.new_cache(a.gen)).collect();
    let spread: Vec<Option<&Adapter>> = (0..a.streams).map(|i| Some(&ads[i % ads.len()])).collect();
    // Warm-up: weights and buffers touched once.
    decode(m, &mut one, a.gen.min(4), &[Some(&ads[0])], &mut s, 9)?;
    decode(m, &mut many, 2, &spread, &mut s, 9)?;
    let (mut base1, mut lora1, mut base_n, mut lora_n) = (vec![], vec![], vec![], vec![]);
    for rep in 0..a.reps.max(1) {
        let seed = 100 + rep as u64;
        // Which of a pair runs first alternates, so that a drift of the machine's speed during a
        // repetition does not count as overhead.
        let flip = rep % 2 == 1;
        for first in [!flip, flip] {
            if first {
                base1.push(decode(m, &mut one, a.gen, &[], &mut s, seed)?);
            } else {
                lora1.push(decode(m, &mut one, a.gen, &[Some(&ads[0])], &mut s, seed)?);
            }
        }
        for first in [flip, !flip] {
            if first {
                base_n.push(decode(m, &mut many, a.gen, &[], &mut s, seed)?);
            } else {
                lora_n.push(decode(m, &mut many, a.gen, &spread, &mut s, seed)?);
            }
        }
    }
    let (b1, l1, bn, ln) = (
        median(&mut base1),
        median(&mut lora1),
        median(&mut base_n),
        median(&mut lora_n),
    );
    let overhead = b1 / l1 - 1.0;
    let ratio = ln / bn;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "model": a.m.model, "threads": m.threads(), "rank": a.rank,
                "adapter_mib": mb, "decode_base_tok_s": b1, "decode_lora_tok_s": l1,
                "decode_overhead": overhead, "streams": a.streams, "adapters": a.adapters,
                "aggregate_base_tok_s": bn, "aggregate_lora_tok_s": ln, "aggregate_ratio": ratio,
            })
        );
        return Ok(());
    }
    println!(
        "model {} ({} threads); rank-{} adapters on every linear layer: {mb:.1} MiB each (built in {build_ms:.0} ms)",
        a.m.model,
        m.threads(),
        a.rank
    );
    println!("| measurement | base tok/s | with adapters tok/s | result |");
    println!("|---|---|---|---|");
    println!(
        "| decode, 1 stream, 1 adapter | {b1:.1} | {l1:.1} | overhead {:.1}% (target <= 10%) |",
        overhead * 100.0
    );
    println!(
        "| decode, {} streams over {} adapters (one batch) | {bn:.1} | {ln:.1} | {:.1}% of base (target >= 80%) |",
        a.streams,
        a.adapters,
        ratio * 100.0
    );
    println!(
        "medians of {} repetitions of {} tokens (base and adapters alternate, each first in turn)",
        a.reps.max(1),
        a.gen
    );
    Ok(())
}
