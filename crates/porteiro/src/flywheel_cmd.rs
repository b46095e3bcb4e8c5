//! `porteiro flywheel`: the upstream tiers' logged answers (`[flywheel] collect = true`) curated and
//! clustered into task types. Each stage writes its output under the flywheel folder
//! (`$PORTEIRO_HOME/flywheel` unless `--dir`), which the next stage reads.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use porteiro_config::{Config, Overrides};
use porteiro_flywheel::{Cluster, ClusterOptions, CurateOptions, Item};
use porteiro_models::fetch;
use porteiro_telemetry::log::{RequestLog, Sealer};

use crate::router_cmd::{progress, EncoderArgs};

#[derive(Subcommand)]
pub enum FlywheelCmd {
    /// S2: read the collected samples, drop what a student must not learn from (truncated, empty,
    /// conversations with a person, exact and near duplicates), mask personal data consistently in
    /// prompt and answer; writes curated.jsonl and prints what was dropped and why.
    Curate(CurateArgs),
    /// S3: group the curated samples into task types (structure, then k-means over the encoder's
    /// embeddings); writes clusters.json and prints size, share of traffic and spend, and an example.
    Clusters(ClustersArgs),
}

#[derive(Args)]
pub struct Common {
    /// The server's configuration (request log, its key, privacy settings).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where the stages keep their outputs (default: $PORTEIRO_HOME/flywheel).
    #[arg(long)]
    dir: Option<PathBuf>,
    #[command(flatten)]
    enc: EncoderArgs,
    /// One JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct CurateArgs {
    #[command(flatten)]
    common: Common,
    /// The request log (default: `[log] path` from --config, else $PORTEIRO_HOME/requests.db).
    #[arg(long)]
    db: Option<PathBuf>,
    /// Samples of this period, ending now: 30m, 24h, 30d …
    #[arg(long, default_value = "30d")]
    since: String,
    /// Queries of one task frame at or above this cosine are near duplicates.
    #[arg(long, default_value_t = 0.97)]
    near_cosine: f32,
}

#[derive(Args)]
pub struct ClustersArgs {
    #[command(flatten)]
    common: Common,
    /// Most clusters one task frame (system prompt, tools, schema) splits into.
    #[arg(long, default_value_t = 8)]
    max_k: usize,
    /// Fewest samples a cluster split from a frame may have.
    #[arg(long, default_value_t = 5)]
    min_size: usize,
    /// Least mean silhouette for a split to beat keeping a frame whole.
    #[arg(long, default_value_t = 0.1)]
    min_silhouette: f64,
}

pub fn run(c: &FlywheelCmd) -> Result<()> {
    match c {
        FlywheelCmd::Curate(a) => curate(a),
        FlywheelCmd::Clusters(a) => clusters(a),
    }
}

fn config(path: Option<&Path>) -> Result<Config> {
    Ok(Config::load(
        path,
        &Overrides::default(),
        crate::DEFAULT_MODEL,
    )?)
}

fn dir(c: &Common) -> Result<PathBuf> {
    let d = c
        .dir
        .clone()
        .unwrap_or_else(|| fetch::home_dir().join("flywheel"));
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    Ok(d)
}

/// Writes `text` to `path` through a temporary file and a rename (never half a file).
fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

fn embed_queries(enc: &porteiro_encoder::bert::BertEncoder, qs: &[String]) -> Vec<Vec<f32>> {
    let pb = progress(qs.len(), "embedding");
    let out = qs
        .iter()
        .map(|q| {
            pb.inc(1);
            enc.embed(q).vector
        })
        .collect();
    pb.finish_and_clear();
    out
}

fn curate(a: &CurateArgs) -> Result<()> {
    let cfg = config(a.common.config.as_deref())?;
    let db = match &a.db {
        Some(p) => p.clone(),
        None => crate::serve::request_log_path(&cfg)
            .context("the request log is off in this configuration ([log] path = \"\")")?,
    };
    if !db.exists() {
        bail!(
            "{} does not exist: nothing collected yet (serve with [flywheel] collect = true)",
            db.display()
        );
    }
    let key = std::env::var(&cfg.log.key_env).map_err(|_| {
        anyhow::anyhow!(
            "the samples are sealed: set ${} to the key the server collected them with",
            cfg.log.key_env
        )
    })?;
    let sealer = Sealer::new(key.as_bytes());
    let since = porteiro_telemetry::now_ms()
        - crate::report_cmd::parse_period(&a.since)?.as_millis() as i64;
    let recs = RequestLog::open(&db)?
        .samples(since, &sealer)
        .context("reading the samples (wrong key?)")?;
    if recs.is_empty() {
        bail!(
            "no samples in {} over the last {}: serve with [flywheel] collect = true and let an upstream tier answer some requests",
            db.display(),
            a.since
        );
    }
    let mut items = Vec::with_capacity(recs.len());
    let mut unreadable = 0;
    for r in &recs {
        match Item::from_record(r) {
            Ok(i) => items.push(i),
            Err(e) => {
                unreadable += 1;
                eprintln!("skipped: {e}");
            }
        }
    }
    let enc = a.common.enc.load()?;
    let det = crate::privacy_cmd::detector(
        cfg.privacy.names.as_deref(),
        cfg.privacy.unknown_names,
        cfg.privacy.quasi_identifiers,
    )?;
    let opts = CurateOptions {
        near_cosine: a.near_cosine,
    };
    let (kept, mut report) =
        porteiro_flywheel::curate(items, &mut |qs| embed_queries(&enc, qs), Some(&det), &opts);
    if unreadable > 0 {
        report.dropped.insert("unreadable", unreadable);
        report.input += unreadable;
    }
    let out = dir(&a.common)?.join("curated.jsonl");
    let mut text = String::new();
    for i in &kept {
        text.push_str(&serde_json::to_string(i)?);
        text.push('\n');
    }
    write_atomic(&out, &text)?;
    if a.common.json {
        println!("{}", serde_json::json!({"report": report, "output": out}));
    } else {
        println!(
            "{} samples read, {} kept ({} with personal data masked)",
            report.input, report.kept, report.masked_items
        );
        for (why, n) in &report.dropped {
            println!("  dropped {n:>6}  {why}");
        }
        for (cat, n) in &report.masked {
            println!("  masked  {n:>6}  {cat}");
        }
        println!("wrote {}", out.display());
    }
    Ok(())
}

fn read_curated(path: &Path) -> Result<Vec<Item>> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "reading {} (run `porteiro flywheel curate` first)",
            path.display()
        )
    })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| {
            serde_json::from_str(l).with_context(|| format!("{}:{}", path.display(), n + 1))
        })
        .collect()
}

fn clusters(a: &ClustersArgs) -> Result<()> {
    let d = dir(&a.common)?;
    let items = read_curated(&d.join("curated.jsonl"))?;
    if items.is_empty() {
        bail!("curated.jsonl holds no samples: nothing to cluster");
    }
    if a.min_size == 0 || a.max_k == 0 {
        bail!("--min-size and --max-k must be at least 1");
    }
    let enc = a.common.enc.load()?;
    let qs: Vec<String> = items.iter().map(Item::query).collect();
    let vecs = embed_queries(&enc, &qs);
    let opts = ClusterOptions {
        max_k: a.max_k,
        min_size: a.min_size,
        min_silhouette: a.min_silhouette,
        ..Default::default()
    };
    let cl: Vec<Cluster> = porteiro_flywheel::cluster(&items, &vecs, &opts)?;
    let out = d.join("clusters.json");
    write_atomic(&out, &serde_json::to_string_pretty(&cl)?)?;
    if a.common.json {
        println!("{}", serde_json::json!({"clusters": cl, "output": out}));
        return Ok(());
    }
    println!(
        "{:>3}  {:<36} {:<10} {:>6} {:>7} {:>7}  example",
        "id", "name", "kind", "size", "traffic", "spend"
    );
    for c in &cl {
        let example = c
            .exemplars
            .first()
            .and_then(|id| items.iter().find(|i| &i.id == id))
            .map(|i| i.query().replace('\n', " "))
            .unwrap_or_default();
        let kind = serde_json::to_value(c.kind)?;
        println!(
            "{:>3}  {:<36} {:<10} {:>6} {:>6.1}% {:>6.1}%  {}",
            c.id,
            c.name.chars().take(36).collect::<String>(),
            kind.as_str().unwrap_or(""),
            c.members.len(),
            c.share * 100.0,
            c.spend_share * 100.0,
            example.chars().take(70).collect::<String>()
        );
    }
    println!("wrote {}", out.display());
    Ok(())
}
