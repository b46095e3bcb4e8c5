//! `porteiro router`: train the difficulty scorer, calibrate the local threshold, evaluate a router
//! against baselines, and measure decision latency.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use porteiro_config::{Config, Overrides};
use porteiro_encoder::bert::BertEncoder;
use porteiro_encoder::bf16::Kernel;
use porteiro_models::fetch;
use porteiro_router::eval::{self, Summary};
use porteiro_router::train::{self, Labelled};
use porteiro_router::{Router, Scorer};

#[derive(Subcommand)]
pub enum RouterCmd {
    /// Train the difficulty scorer (logistic regression over the embedding and cheap features) from
    /// labelled rows: JSON lines {"prompt", "local", "upstream"} with each tier's answer quality in [0, 1].
    Train {
        #[arg(long)]
        data: PathBuf,
        /// Where to write the scorer (point router.scorer at it).
        #[arg(long, default_value = "scorer.json")]
        out: PathBuf,
        /// Share of rows held out to report accuracy (every k-th row).
        #[arg(long, default_value_t = 0.2)]
        holdout: f64,
        /// L2 penalty on the (standardised) weights; raise it when rows are few.
        #[arg(long, default_value_t = 0.1)]
        l2: f32,
        #[command(flatten)]
        enc: EncoderArgs,
    },
    /// Set the local threshold so that this share of the data's traffic stays local; prints it and,
    /// with --config, writes router.local_min_score into that file.
    Calibrate {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        local_share: f64,
        /// The scorer to calibrate (default: router.scorer from --config).
        #[arg(long)]
        scorer: Option<PathBuf>,
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        enc: EncoderArgs,
    },
    /// Router metrics on held-out labelled rows: APGR, CPT(50%), CPT(80%) and the quality vs
    /// share-escalated curve, beside random, always-local, always-upstream and oracle routers.
    Eval {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        scorer: Option<PathBuf>,
        #[arg(long)]
        config: Option<PathBuf>,
        /// Write the curve as SVG here.
        #[arg(long)]
        plot: Option<PathBuf>,
        #[command(flatten)]
        enc: EncoderArgs,
    },
    /// Whether the encoder's fast path (bf16, int8) decides as its f32 path does: every row's
    /// decision (tier and route, with the routes and scorer of --config) on both paths, the share
    /// identical, and how far the vectors and scores moved.
    Parity {
        /// Rows to decide: labelled rows (JSON lines with a "prompt"; the labels are not used).
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        enc: EncoderArgs,
    },
    /// Decision latency (encode + decide) for prompts of a given length, with the routes of --config.
    Bench {
        /// Encoder tokens per prompt.
        #[arg(long, default_value_t = 256)]
        tokens: usize,
        /// Decisions to time.
        #[arg(long, default_value_t = 100)]
        n: usize,
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        enc: EncoderArgs,
    },
}

#[derive(Args, Clone)]
pub struct EncoderArgs {
    /// Sentence encoder (catalog alias or folder).
    #[arg(long, default_value = "minilm-l6")]
    encoder: String,
    /// Threads one encoder pass is split over (default: all cores). The vectors do not depend on it.
    #[arg(long)]
    encoder_threads: Option<usize>,
}

impl EncoderArgs {
    pub(crate) fn load(&self) -> Result<BertEncoder> {
        self.open(|dir, threads| BertEncoder::open_with(dir, Kernel::best(), threads))
    }

    /// The encoder on its f32 path (the reference `router parity` compares against).
    fn load_f32(&self) -> Result<BertEncoder> {
        self.open(|dir, threads| BertEncoder::open_opts(dir, None, false, threads))
    }

    fn open(
        &self,
        how: impl Fn(&Path, usize) -> Result<BertEncoder, porteiro_encoder::BertError>,
    ) -> Result<BertEncoder> {
        let dir = fetch::resolve_model(&self.encoder, true)?;
        let threads = self
            .encoder_threads
            .unwrap_or_else(BertEncoder::default_threads)
            .max(1);
        how(&dir, threads).with_context(|| format!("loading {}", dir.display()))
    }
}

pub(crate) fn config(path: Option<&Path>) -> Result<Config> {
    Ok(Config::load(
        path,
        &Overrides::default(),
        crate::DEFAULT_MODEL,
    )?)
}

pub(crate) fn progress(n: usize, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(n as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb.set_message(what.to_string());
    pb
}

fn embed_all(enc: &BertEncoder, rows: &[Labelled]) -> Vec<Vec<f32>> {
    let pb = progress(rows.len(), "embedding");
    let out = rows
        .iter()
        .map(|r| {
            pb.inc(1);
            enc.embed(&r.prompt).vector
        })
        .collect();
    pb.finish_and_clear();
    out
}

/// The scorer's P(local good enough) for every row.
fn score_all(enc: &BertEncoder, scorer: &Scorer, rows: &[Labelled]) -> Vec<f32> {
    embed_all(enc, rows)
        .iter()
        .zip(rows)
        .map(|(e, r)| scorer.score(&r.prompt, e))
        .collect()
}

fn load_scorer(scorer: Option<&Path>, cfg: Option<&Path>) -> Result<Scorer> {
    let path = match scorer {
        Some(p) => p.to_path_buf(),
        None => match config(cfg)?.router.scorer {
            Some(p) => PathBuf::from(p),
            None => bail!("no scorer: pass --scorer or set router.scorer in --config (train one with `porteiro router train`)"),
        },
    };
    Ok(Scorer::load(&path)?)
}

fn read(data: &Path) -> Result<Vec<Labelled>> {
    let rows = train::read_labelled(data).map_err(anyhow::Error::msg)?;
    if rows.len() < 2 {
        bail!("{}: at least 2 labelled rows are needed", data.display());
    }
    Ok(rows)
}

pub fn run(cmd: &RouterCmd) -> Result<()> {
    match cmd {
        RouterCmd::Train {
            data,
            out,
            holdout,
            l2,
            enc,
        } => {
            let rows = read(data)?;
            let enc = enc.load()?;
            let embs = embed_all(&enc, &rows);
            let k = if *holdout > 0.0 {
                (1.0 / holdout.clamp(0.01, 0.5)).round() as usize
            } else {
                usize::MAX
            };
            let (mut tr, mut te) = (vec![], vec![]);
            for (i, (r, e)) in rows.iter().zip(&embs).enumerate() {
                if k != usize::MAX && i % k == k - 1 {
                    te.push((r.clone(), e.clone()));
                } else {
                    tr.push((r.clone(), e.clone()));
                }
            }
            let (tr_rows, tr_emb): (Vec<_>, Vec<_>) = tr.into_iter().unzip();
            let source = format!("{} ({} training rows)", data.display(), tr_rows.len());
            let scorer = train::train_scorer(&tr_rows, &tr_emb, *l2, &source);
            let acc = |set: &[(Labelled, Vec<f32>)]| {
                let ok = set
                    .iter()
                    .filter(|(r, e)| (scorer.score(&r.prompt, e) >= 0.5) == r.local_good_enough())
                    .count();
                ok as f64 / set.len().max(1) as f64
            };
            let base =
                rows.iter().filter(|r| r.local_good_enough()).count() as f64 / rows.len() as f64;
            scorer
                .save(out)
                .with_context(|| format!("writing {}", out.display()))?;
            println!("scorer written to {}", out.display());
            println!(
                "rows: {} training, {} held out; local good enough in {:.1}% of all rows",
                tr_rows.len(),
                te.len(),
                base * 100.0
            );
            if !te.is_empty() {
                println!("held-out accuracy of P(local good enough) >= 0.5: {:.1}% (majority class: {:.1}%)", acc(&te) * 100.0, base.max(1.0 - base) * 100.0);
            }
            Ok(())
        }
        RouterCmd::Calibrate {
            data,
            local_share,
            scorer,
            config: cfg_path,
            enc,
        } => {
            if !(0.0..=1.0).contains(local_share) {
                bail!("--local-share must be between 0 and 1");
            }
            let rows = read(data)?;
            let scorer = load_scorer(scorer.as_deref(), cfg_path.as_deref())?;
            let scores = score_all(&enc.load()?, &scorer, &rows);
            let t = train::calibrate(&scores, *local_share);
            let (esc, q) = eval::at_threshold(&rows, &scores, t);
            println!("router.local_min_score = {t:.6}");
            println!(
                "on {}: {:.1}% local, quality {:.4} (all local {:.4}, all upstream {:.4})",
                data.display(),
                (1.0 - esc) * 100.0,
                q,
                eval::mean(&rows, |r| r.local),
                eval::mean(&rows, |r| r.upstream)
            );
            if let Some(p) = cfg_path {
                write_threshold(p, t)?;
                println!("written to {}", p.display());
            }
            Ok(())
        }
        RouterCmd::Eval {
            data,
            scorer,
            config: cfg_path,
            plot,
            enc,
        } => {
            let rows = read(data)?;
            let scorer = load_scorer(scorer.as_deref(), cfg_path.as_deref())?;
            let threshold = match cfg_path {
                Some(p) => Some(config(Some(p))?.router.local_min_score),
                None => None,
            };
            let scores = score_all(&enc.load()?, &scorer, &rows);
            let router = eval::router_curve(&rows, &scores);
            let random = eval::random_curve(&rows);
            let oracle = eval::oracle_curve(&rows);
            let (ql, qu) = (
                eval::mean(&rows, |r| r.local),
                eval::mean(&rows, |r| r.upstream),
            );
            println!(
                "{} rows from {}; quality all-local {ql:.4}, all-upstream {qu:.4}",
                rows.len(),
                data.display()
            );
            println!(
                "{:<16} {:>7} {:>9} {:>9} {:>22}",
                "router", "APGR", "CPT(50%)", "CPT(80%)", "at threshold"
            );
            let pct = |v: f64| {
                if v.is_nan() {
                    "n/a".to_string()
                } else {
                    format!("{:.1}%", v * 100.0)
                }
            };
            let line = |s: &Summary| {
                let at = s.at_threshold.map_or(String::new(), |(e, q)| {
                    format!("{:.1}% up, q {q:.4}", e * 100.0)
                });
                println!(
                    "{:<16} {:>7.4} {:>9} {:>9} {:>22}",
                    s.name,
                    s.apgr,
                    pct(s.cpt50),
                    pct(s.cpt80),
                    at
                );
            };
            line(&eval::summarize(
                &router,
                &rows,
                threshold.map(|t| eval::at_threshold(&rows, &scores, t)),
            ));
            line(&eval::summarize(&random, &rows, None));
            line(&eval::summarize(&oracle, &rows, None));
            println!(
                "{:<16} {:>7} {:>9} {:>9} {:>22}",
                "always-local",
                "-",
                "-",
                "-",
                format!("0.0% up, q {ql:.4}")
            );
            println!(
                "{:<16} {:>7} {:>9} {:>9} {:>22}",
                "always-upstream",
                "-",
                "-",
                "-",
                format!("100.0% up, q {qu:.4}")
            );
            if let Some(p) = plot {
                let title = format!("quality vs share escalated ({})", data.display());
                std::fs::write(p, eval::svg(&title, &[router, random, oracle]))
                    .with_context(|| format!("writing {}", p.display()))?;
                println!("curve written to {}", p.display());
            }
            Ok(())
        }
        RouterCmd::Parity {
            data,
            config: cfg_path,
            enc,
        } => {
            let fast_enc = std::sync::Arc::new(enc.load()?);
            if fast_enc.kernel().is_none() && !fast_enc.int8() {
                bail!("the encoder runs in f32 here (no AMX, AVX-512 BF16, VNNI or AVX2, or turned off by PORTEIRO_BF16=0 / PORTEIRO_INT8=0 / PORTEIRO_ISA=scalar): there is nothing to compare");
            }
            let rows = read(data)?;
            let cfg = config(cfg_path.as_deref())?;
            let f32_enc = std::sync::Arc::new(enc.load_f32()?);
            let (f32_router, fast_router) = (
                Router::new(&cfg, f32_enc.clone())?,
                Router::new(&cfg, fast_enc.clone())?,
            );
            let pb = progress(rows.len(), "deciding on both paths");
            let (mut same, mut same_tier, mut min_cos, mut max_dscore) =
                (0usize, 0usize, 1f32, 0f32);
            let mut differing = Vec::new();
            for r in &rows {
                let (a, b) = (f32_enc.embed(&r.prompt), fast_enc.embed(&r.prompt));
                let cos: f32 = a.vector.iter().zip(&b.vector).map(|(x, y)| x * y).sum();
                min_cos = min_cos.min(cos);
                let (da, db) = (
                    f32_router.decide_embedded(&r.prompt, &a.vector),
                    fast_router.decide_embedded(&r.prompt, &b.vector),
                );
                if let (Some(x), Some(y)) = (da.score, db.score) {
                    max_dscore = max_dscore.max((x - y).abs());
                }
                same_tier += usize::from(da.tier == db.tier);
                if (&da.tier, &da.route) == (&db.tier, &db.route) {
                    same += 1;
                } else {
                    differing.push((r.prompt.clone(), da, db));
                }
                pb.inc(1);
            }
            pb.finish_and_clear();
            println!(
                "{} rows from {}: {} ({:.2}%) decided alike (tier and route; the tier alone: {:.2}%) by f32 and {}; lowest cosine between their vectors {min_cos:.6}{}",
                rows.len(),
                data.display(),
                same,
                100.0 * same as f64 / rows.len() as f64,
                100.0 * same_tier as f64 / rows.len() as f64,
                fast_enc.path_name(),
                if cfg.router.scorer.is_some() {
                    format!("; largest scorer difference {max_dscore:.5}")
                } else {
                    String::new()
                }
            );
            for (prompt, a, b) in differing.iter().take(10) {
                println!(
                    "  differs: f32 {}/{} (sim {:.4}, score {:?}) vs {}/{} (sim {:.4}, score {:?}): {}",
                    a.tier,
                    a.route,
                    a.similarity,
                    a.score,
                    b.tier,
                    b.route,
                    b.similarity,
                    b.score,
                    prompt.chars().take(80).collect::<String>()
                );
            }
            Ok(())
        }
        RouterCmd::Bench {
            tokens,
            n,
            config: cfg_path,
            enc,
        } => {
            let cfg = config(cfg_path.as_deref())?;
            let enc = std::sync::Arc::new(enc.load()?);
            let router = Router::new(&cfg, enc.clone())?;
            let text = bench_text(&enc, *tokens);
            let measured = enc.tokenize(&text).len();
            for _ in 0..3 {
                router.decide(&text);
            }
            let mut ms: Vec<f64> = (0..*n)
                .map(|_| {
                    let t = Instant::now();
                    std::hint::black_box(router.decide(&text));
                    t.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            ms.sort_by(f64::total_cmp);
            let q = |p: f64| ms[((p * (ms.len() - 1) as f64).round() as usize).min(ms.len() - 1)];
            println!(
                "decision latency, {measured} encoder tokens, {} routes, {} decisions, {} thread(s), {}:",
                cfg.routes.len(),
                n,
                enc.threads(),
                enc.path_name()
            );
            println!(
                "p50 {:.2} ms   p95 {:.2} ms   p99 {:.2} ms   max {:.2} ms",
                q(0.5),
                q(0.95),
                q(0.99),
                ms[ms.len() - 1]
            );
            Ok(())
        }
    }
}

/// Real prose of about `tokens` encoder tokens (a fixed passage repeated and cut).
fn bench_text(enc: &BertEncoder, tokens: usize) -> String {
    const PASSAGE: &str = "Extract the customer's name, order number and delivery address from the message below and return them as JSON. \
        The parcel was supposed to arrive on Tuesday, but the tracking page still says it is waiting at the regional depot. \
        I have called twice and nobody could tell me when it will be delivered. Please refund the shipping fee or send a replacement. ";
    let mut words: Vec<&str> = Vec::new();
    let all: Vec<&str> = PASSAGE.split_whitespace().collect();
    let mut i = 0;
    loop {
        words.push(all[i % all.len()]);
        i += 1;
        if enc.tokenize(&words.join(" ")).len() >= tokens || i > tokens * 4 {
            return words.join(" ");
        }
    }
}

/// Sets `local_min_score` under `[router]` in a TOML file, keeping everything else as written.
fn write_threshold(path: &Path, t: f64) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out: Vec<String> = Vec::new();
    let mut section = String::new();
    let mut done = false;
    let mut saw_router = false;
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            if section == "[router]" && !done {
                out.push(format!("local_min_score = {t:.6}"));
                done = true;
            }
            section = trimmed.split('#').next().unwrap_or("").trim().to_string();
            saw_router |= section == "[router]";
        }
        if section == "[router]" && trimmed.starts_with("local_min_score") {
            out.push(format!("local_min_score = {t:.6}"));
            done = true;
            continue;
        }
        out.push(line.to_string());
    }
    if !done {
        if !saw_router {
            out.push(String::new());
            out.push("[router]".into());
        }
        out.push(format!("local_min_score = {t:.6}"));
    }
    let new = out.join("\n") + "\n";
    // Refuse to write a file that no longer parses.
    Config::from_toml(
        &new,
        &path.display().to_string(),
        &Overrides::default(),
        crate::DEFAULT_MODEL,
        None,
    )
    .context("the updated config would not be valid")?;
    std::fs::write(path, new).with_context(|| format!("writing {}", path.display()))
}
