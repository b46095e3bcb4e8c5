//! `porteiro flywheel`: the upstream tiers' logged answers (`[flywheel] collect = true`) curated and
//! clustered into task types. Each stage writes its output under the flywheel folder
//! (`$PORTEIRO_HOME/flywheel` unless `--dir`), which the next stage reads.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use futures_util::StreamExt;
use porteiro_flywheel::promote::{decide, Score};
use porteiro_flywheel::{Cluster, ClusterOptions, CurateOptions, Item};
use porteiro_models::fetch;
use porteiro_telemetry::log::{RequestLog, Sealer};

use crate::router_cmd::{config, progress, EncoderArgs};

#[derive(Subcommand)]
pub enum FlywheelCmd {
    /// S2: read the collected samples, drop what a student must not learn from (truncated, empty,
    /// conversations with a person, exact and near duplicates), mask personal data consistently in
    /// prompt and answer; writes curated.jsonl and prints what was dropped and why.
    Curate(CurateArgs),
    /// S3: group the curated samples into task types (structure, then k-means over the encoder's
    /// embeddings); writes clusters.json and prints size, share of traffic and spend, and an example.
    Clusters(ClustersArgs),
    /// S4: per cluster, hold out a test split and score each candidate local model against the
    /// teacher's answers, zero-shot, few-shot (the nearest training samples of the cluster as
    /// earlier turns) and with the cluster's adapter when `finetune` trained one, each candidate
    /// served by `porteiro serve` exactly as it would serve the traffic; agreement with a 95%
    /// Wilson interval; writes select.json.
    Select(SelectArgs),
    /// S5: a LoRA adapter per cluster on its training split (the teacher's answers), within a time
    /// budget, evaluated on the held-out split; the adapter, its loss curve and eval go under
    /// adapters/ in the flywheel folder.
    Finetune(FinetuneArgs),
    /// Where each cluster stands: its size and shares, its best candidates, and whether one
    /// qualifies for promotion (lower bound of its agreement with the teacher ≥ --threshold).
    Status(StatusArgs),
    /// S6: each cluster whose best servable candidate (zero-shot, or its adapter) qualifies goes
    /// into the routes file the server reloads: in shadow first (the candidate answers a sample of
    /// the live traffic off the request path; live agreement then promotes or rolls it back), or
    /// promoted at once with --no-shadow. Every change is a new version of the file and a record in
    /// the audit trail.
    Promote(PromoteArgs),
    /// The whole loop once: curate, clusters, finetune (with --finetune), select, status, and
    /// promote (with --promote).
    Run(RunArgs),
}

#[derive(Args)]
pub struct PromoteArgs {
    #[command(flatten)]
    common: Common,
    /// The routes file (default: `[flywheel] routes` from --config, else routes.json in the
    /// flywheel folder).
    #[arg(long)]
    routes: Option<PathBuf>,
    /// Least lower bound (95% Wilson) of a candidate's held-out agreement with the teacher.
    #[arg(long, default_value_t = 0.95)]
    threshold: f64,
    /// Promote at once, without the shadow stage.
    #[arg(long)]
    no_shadow: bool,
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    common: Common,
    /// The request log (default: `[log] path` from --config, else $PORTEIRO_HOME/requests.db).
    #[arg(long)]
    db: Option<PathBuf>,
    /// Samples of this period, ending now: 30m, 24h, 30d …
    #[arg(long, default_value = "30d")]
    since: String,
    /// Candidate local models for `select`, comma-separated.
    #[arg(long, default_value = "smollm2-135m,qwen2.5-0.5b")]
    models: String,
    /// Train an adapter of this model per cluster before `select` (default: no fine-tuning).
    #[arg(long)]
    finetune: Option<String>,
    /// Minutes of training per cluster at most (with --finetune).
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Least lower bound of agreement with the teacher to promote a candidate.
    #[arg(long, default_value_t = 0.95)]
    threshold: f64,
    /// Finish with `promote`: qualifying clusters go into the routes file, in shadow.
    #[arg(long)]
    promote: bool,
    /// Fewest samples a cluster split from a task frame may have.
    #[arg(long, default_value_t = 5)]
    min_size: usize,
    /// Held-out share of each cluster.
    #[arg(long, default_value_t = 0.3)]
    test_share: f64,
}

#[derive(Args)]
pub struct StatusArgs {
    /// Where the stages keep their outputs (default: $PORTEIRO_HOME/flywheel).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The routes file (default: routes.json in the flywheel folder).
    #[arg(long)]
    routes: Option<PathBuf>,
    /// Least lower bound (95% Wilson) of a candidate's agreement with the teacher to promote it.
    #[arg(long, default_value_t = 0.95)]
    threshold: f64,
    /// One JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct FinetuneArgs {
    #[command(flatten)]
    common: Common,
    /// The student model (catalog alias or .gguf path).
    #[arg(long, default_value = "qwen2.5-0.5b")]
    model: String,
    /// Only this cluster (default: every cluster with --min-cluster samples).
    #[arg(long)]
    cluster: Option<usize>,
    /// Share held out for the test, as in `select` (the same samples).
    #[arg(long, default_value_t = 0.3)]
    test_share: f64,
    #[arg(long, default_value_t = 8)]
    min_cluster: usize,
    /// Minutes of training per cluster at most.
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    #[arg(long, default_value_t = 2)]
    epochs: usize,
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Longest training sequence (agents' prompts carry their tool lists: 1000+ tokens is common).
    #[arg(long, default_value_t = 4096)]
    max_seq: usize,
}

#[derive(Args)]
pub struct SelectArgs {
    #[command(flatten)]
    common: Common,
    /// Candidate local models (catalog aliases or .gguf paths), comma-separated.
    #[arg(long, default_value = "smollm2-135m,qwen2.5-0.5b")]
    models: String,
    /// Share of each cluster held out for the test (at least 3 samples).
    #[arg(long, default_value_t = 0.3)]
    test_share: f64,
    /// Clusters smaller than this are not evaluated (too small to split).
    #[arg(long, default_value_t = 8)]
    min_cluster: usize,
    /// Test samples scored per cluster at most (0: all). A lower bound of 95% needs at least 59
    /// samples, all agreeing.
    #[arg(long, default_value_t = 200)]
    max_test: usize,
    /// Examples in a few-shot prompt (0: zero-shot only).
    #[arg(long, default_value_t = 3)]
    shots: usize,
    /// Tokens a candidate may write per answer.
    #[arg(long, default_value_t = 256)]
    max_tokens: u32,
    /// Judge free-text answers with this upstream tier of --config (pairwise against the teacher's,
    /// both orders; the candidate agrees when not worse in either) instead of token-set F1.
    #[arg(long)]
    judge: Option<String>,
}

#[derive(Args, Clone)]
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
    /// The request log (default: the PostgreSQL sink when --config names one, else `[log] path`
    /// from --config, else $PORTEIRO_HOME/requests.db).
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
        FlywheelCmd::Select(a) => select(a),
        FlywheelCmd::Finetune(a) => finetune(a),
        FlywheelCmd::Status(a) => status(a),
        FlywheelCmd::Promote(a) => promote(a),
        FlywheelCmd::Run(a) => run_all(a),
    }
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
pub(crate) fn write_atomic(path: &Path, text: &str) -> Result<()> {
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
    let key = std::env::var(&cfg.log.key_env).map_err(|_| {
        anyhow::anyhow!(
            "the samples are sealed: set ${} to the key the server collected them with",
            cfg.log.key_env
        )
    })?;
    let sealer = Sealer::new(key.as_bytes());
    let since = porteiro_telemetry::now_ms()
        - crate::report_cmd::parse_period(&a.since)?.as_millis() as i64;
    // The PostgreSQL sink when the configuration names one (replicas share it), else the SQLite log.
    let (recs, source) = match (&a.db, &cfg.log.postgres_env) {
        (None, Some(var)) => {
            let conninfo = std::env::var(var).map_err(|_| {
                anyhow::anyhow!("[log] postgres_env names ${var}, which is not set")
            })?;
            let recs = porteiro_telemetry::pg::PgLog::connect(&conninfo)?
                .samples(since, &sealer)
                .context("reading the samples from PostgreSQL (wrong key?)")?;
            (recs, format!("PostgreSQL (${var})"))
        }
        _ => {
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
            let recs = RequestLog::open(&db)?
                .samples(since, &sealer)
                .context("reading the samples (wrong key?)")?;
            (recs, db.display().to_string())
        }
    };
    if recs.is_empty() {
        bail!(
            "no samples in {source} over the last {}: serve with [flywheel] collect = true and let an upstream tier answer some requests",
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

fn read_clusters(d: &Path) -> Result<Vec<Cluster>> {
    let p = d.join("clusters.json");
    let text = std::fs::read_to_string(&p).with_context(|| {
        format!(
            "reading {} (run `porteiro flywheel curate` and `clusters` first)",
            p.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| p.display().to_string())
}

/// Where `finetune` writes the adapter of `model` for cluster `id`, and `select` looks for it.
fn adapter_path(d: &Path, id: usize, model: &str) -> PathBuf {
    // A catalog alias ("qwen2.5-0.5b") is kept whole; a path gives its file name without ".gguf".
    let stem = match Path::new(model).file_name() {
        Some(f) => f.to_string_lossy().trim_end_matches(".gguf").to_string(),
        None => model.to_string(),
    };
    d.join("adapters").join(format!("cluster-{id}-{stem}.gguf"))
}

/// A cluster's (test, train) samples: a stable hash of each id picks the test side, topped up to 3
/// from the end of the training side when the hash gave fewer. `select` and `finetune` both split
/// here, so an adapter is never scored on samples it trained on.
fn split<'a>(
    c: &Cluster,
    by_id: &std::collections::HashMap<&str, &'a Item>,
    share: f64,
) -> Result<(Vec<&'a Item>, Vec<&'a Item>)> {
    if !(0.0..1.0).contains(&share) || share == 0.0 {
        bail!("--test-share must be between 0 and 1");
    }
    let (mut test, mut train): (Vec<&Item>, Vec<&Item>) = c
        .members
        .iter()
        .filter_map(|m| by_id.get(m.as_str()).copied())
        .partition(|i| is_test(&i.id, share));
    while test.len() < 3 && train.len() > 1 {
        test.extend(train.pop());
    }
    Ok((test, train))
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

/// Whether sample `id` is in the test split (a stable hash, so reruns and later stages agree).
pub fn is_test(id: &str, share: f64) -> bool {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(id.as_bytes());
    (u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as f64 / u32::MAX as f64) < share
}

/// A `porteiro serve` child on a loopback port, killed on drop.
pub(crate) struct Child {
    proc: std::process::Child,
    pub(crate) base: String,
    _cfg: tempfile::NamedTempFile,
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.proc.kill();
        let _ = self.proc.wait();
    }
}

pub(crate) fn spawn_server(model: &str, adapters: &[(String, PathBuf)]) -> Result<Child> {
    use std::io::{BufRead, Write};
    let mut cfg = tempfile::NamedTempFile::new()?;
    // Nothing but the model: no encoder, no privacy scan, no log (the evaluation stays off the books).
    write!(
        cfg,
        "[embeddings]\nmodel = \"\"\n[privacy]\npolicy = \"allow\"\naudit_db = \"\"\n[log]\npath = \"\"\n"
    )?;
    let exe = std::env::current_exe()?;
    let mut proc = std::process::Command::new(exe)
        .args(["serve", "--port", "0", "--model", model, "--config"])
        .arg(cfg.path())
        .args(
            adapters
                .iter()
                .flat_map(|(n, p)| ["--lora".to_string(), format!("{n}={}", p.display())]),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting porteiro serve")?;
    let mut line = String::new();
    let out = proc.stdout.take().context("no stdout")?;
    let mut reader = std::io::BufReader::new(out);
    reader.read_line(&mut line)?;
    let port = line
        .trim()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse::<u16>().ok())
        .with_context(|| format!("porteiro serve said {line:?}"))?;
    // Keep draining its stdout so it never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sink = String::new();
        while reader.read_line(&mut sink).is_ok_and(|n| n > 0) {
            sink.clear();
        }
    });
    Ok(Child {
        proc,
        base: format!("http://127.0.0.1:{port}"),
        _cfg: cfg,
    })
}

pub(crate) async fn ready(client: &reqwest::Client, c: &mut Child) -> Result<()> {
    let t0 = std::time::Instant::now();
    loop {
        if let Ok(r) = client.get(format!("{}/health", c.base)).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        if let Some(s) = c.proc.try_wait()? {
            bail!("porteiro serve exited with {s} while loading the model");
        }
        if t0.elapsed().as_secs() > 600 {
            bail!("porteiro serve did not become ready in 600 s");
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// The candidate's answer message to `request`, or an error message.
pub(crate) async fn answer(
    client: &reqwest::Client,
    base: &str,
    model: &str,
    mut request: serde_json::Value,
    max_tokens: u32,
) -> std::result::Result<serde_json::Value, String> {
    if let Some(o) = request.as_object_mut() {
        o.insert("model".into(), model.into());
        o.insert("temperature".into(), 0.into());
        o.insert("max_tokens".into(), max_tokens.into());
        for k in ["stream", "stream_options", "n", "seed", "top_p"] {
            o.remove(k);
        }
    }
    let r = client
        .post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(request.to_string())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status();
    let body: serde_json::Value = serde_json::from_str(&r.text().await.map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(body["error"]["message"]
            .as_str()
            .unwrap_or("error")
            .to_string());
    }
    Ok(body["choices"][0]["message"].clone())
}

/// Every request's answer from `served`, in order, four in flight; `pb` counts them.
pub(crate) async fn answer_all(
    client: &reqwest::Client,
    base: &str,
    served: &str,
    reqs: &[serde_json::Value],
    max_tokens: u32,
    pb: &indicatif::ProgressBar,
) -> Vec<std::result::Result<serde_json::Value, String>> {
    let futs = reqs.iter().map(|r| async move {
        let a = answer(client, base, served, r.clone(), max_tokens).await;
        pb.inc(1);
        a
    });
    futures_util::stream::iter(futs)
        .buffered(4)
        .collect::<Vec<_>>()
        .await
}

/// Asks the judge tier twice (teacher first, then candidate first) whether the candidate's free-text
/// answer is at least as good as the teacher's; a judge that fails or gives no verdict disagrees.
async fn judge_agrees(
    client: &reqwest::Client,
    u: &porteiro_config::Upstream,
    i: &Item,
    candidate: &serde_json::Value,
) -> bool {
    use porteiro_flywheel::item::content_text;
    use porteiro_flywheel::score::{judge_request, judged, Verdict};
    let (t, c) = (
        content_text(&i.answer["content"]),
        content_text(&candidate["content"]),
    );
    let ask = |first: String, second: String| async move {
        let mut req = judge_request(&i.query(), &first, &second);
        req["model"] = u.model.clone().into();
        let mut r = client
            .post(format!(
                "{}/chat/completions",
                u.base_url.trim_end_matches('/')
            ))
            .json(&req);
        if let Some(k) = u.api_key_env.as_ref().and_then(|v| std::env::var(v).ok()) {
            r = r.bearer_auth(k);
        }
        let body: serde_json::Value = r.send().await.ok()?.json().await.ok()?;
        Verdict::parse(body["choices"][0]["message"]["content"].as_str()?)
    };
    let teacher_first = ask(t.clone(), c.clone()).await;
    let candidate_first = ask(c, t).await;
    judged(teacher_first, candidate_first)
}

/// `item`'s request with `shots` (earlier requests of the task with the teacher's answers) as turns
/// before its own last message.
fn few_shot(item: &Item, shots: &[&Item]) -> serde_json::Value {
    let mut req = item.request.clone();
    let Some(msgs) = req["messages"].as_array_mut() else {
        return req;
    };
    let at = msgs.len().saturating_sub(1);
    let mut extra = Vec::new();
    for s in shots {
        extra.push(serde_json::json!({"role": "user", "content": s.query()}));
        let mut a = s.answer.clone();
        if let Some(o) = a.as_object_mut() {
            o.insert("role".into(), "assistant".into());
        }
        extra.push(a);
    }
    msgs.splice(at..at, extra);
    req
}

fn select(a: &SelectArgs) -> Result<()> {
    use porteiro_flywheel::score::{agrees, wilson};
    let d = dir(&a.common)?;
    let items = read_curated(&d.join("curated.jsonl"))?;
    let clusters = read_clusters(&d)?;
    let by_id: std::collections::HashMap<&str, &Item> =
        items.iter().map(|i| (i.id.as_str(), i)).collect();
    // The test split and the few-shot prompts of every cluster big enough to split.
    let mut plans = Vec::new();
    let enc = if a.shots > 0 {
        Some(a.common.enc.load()?)
    } else {
        None
    };
    for c in &clusters {
        if c.members.len() < a.min_cluster {
            eprintln!(
                "cluster {} `{}`: {} samples, fewer than --min-cluster {}: not evaluated",
                c.id,
                c.name,
                c.members.len(),
                a.min_cluster
            );
            continue;
        }
        let (mut test, train) = split(c, &by_id, a.test_share)?;
        if a.max_test > 0 {
            test.truncate(a.max_test);
        }
        let zero: Vec<serde_json::Value> = test.iter().map(|i| i.request.clone()).collect();
        let shots: Vec<serde_json::Value> = match &enc {
            Some(e) if !train.is_empty() => {
                let tv: Vec<Vec<f32>> = train.iter().map(|i| e.embed(&i.query()).vector).collect();
                test.iter()
                    .map(|i| {
                        let q = e.embed(&i.query()).vector;
                        let mut order: Vec<usize> = (0..train.len()).collect();
                        let dot = |v: &[f32]| v.iter().zip(&q).map(|(x, y)| x * y).sum::<f32>();
                        order.sort_by(|&x, &y| dot(&tv[y]).total_cmp(&dot(&tv[x])));
                        let picked: Vec<&Item> =
                            order.iter().take(a.shots).map(|&k| train[k]).collect();
                        few_shot(i, &picked)
                    })
                    .collect()
            }
            _ => Vec::new(),
        };
        plans.push((c, test, zero, shots));
    }
    if plans.is_empty() {
        bail!(
            "no cluster has --min-cluster {} samples: collect more traffic first",
            a.min_cluster
        );
    }
    let judge = match &a.judge {
        None => None,
        Some(name) => {
            let cfg = config(a.common.config.as_deref())?;
            let u = cfg
                .upstreams
                .iter()
                .find(|u| u.name == *name)
                .cloned()
                .with_context(|| {
                    format!("--judge {name}: no upstream tier of that name in the configuration")
                })?;
            Some(u)
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(900))
        .build()?;
    let mut scores = Vec::new();
    for model in a.models.split(',').map(str::trim).filter(|m| !m.is_empty()) {
        // The adapters `finetune` trained for this model, by cluster.
        let adapters: Vec<(String, PathBuf)> = plans
            .iter()
            .map(|(c, ..)| (format!("cluster-{}", c.id), adapter_path(&d, c.id, model)))
            .filter(|(_, p)| p.exists())
            .collect();
        let mut child = spawn_server(model, &adapters)?;
        rt.block_on(ready(&client, &mut child))?;
        for (c, test, zero, shots) in &plans {
            let tuned = format!("cluster-{}", c.id);
            let has_adapter = adapters.iter().any(|(n, _)| *n == tuned);
            for (mode, reqs) in [("zero-shot", zero), ("few-shot", shots), ("lora", zero)] {
                if reqs.is_empty() || (mode == "lora" && !has_adapter) {
                    continue;
                }
                let served = if mode == "lora" {
                    tuned.as_str()
                } else {
                    model
                };
                let pb = progress(reqs.len(), &format!("{model} {mode} cluster {}", c.id));
                let answers = rt.block_on(answer_all(
                    &client,
                    &child.base,
                    served,
                    reqs,
                    a.max_tokens,
                    &pb,
                ));
                pb.finish_and_clear();
                let errors = answers.iter().filter(|x| x.is_err()).count();
                let verdicts: Vec<bool> = rt.block_on(async {
                    let futs = answers.iter().zip(test).map(|(x, i)| {
                        let (client, judge) = (&client, judge.as_ref());
                        async move {
                            let Ok(m) = x else { return false };
                            match (judge, i.kind()) {
                                (Some(u), porteiro_flywheel::AnswerKind::Text) => {
                                    judge_agrees(client, u, i, m).await
                                }
                                (_, kind) => agrees(kind, &i.answer, m),
                            }
                        }
                    });
                    futures_util::stream::iter(futs)
                        .buffered(4)
                        .collect::<Vec<_>>()
                        .await
                });
                let agree = verdicts.iter().filter(|v| **v).count();
                let (low, high) = wilson(agree, answers.len());
                scores.push(Score {
                    cluster: c.id,
                    name: c.name.clone(),
                    model: model.to_string(),
                    mode: mode.to_string(),
                    n: answers.len(),
                    agree,
                    errors,
                    rate: agree as f64 / answers.len().max(1) as f64,
                    low,
                    high,
                });
            }
        }
    }
    let out = d.join("select.json");
    write_atomic(&out, &serde_json::to_string_pretty(&scores)?)?;
    if a.common.json {
        println!("{}", serde_json::json!({"scores": scores, "output": out}));
        return Ok(());
    }
    println!(
        "{:>3}  {:<30} {:<16} {:<9} {:>4}  agreement with the teacher (95% CI)",
        "id", "cluster", "model", "mode", "n"
    );
    for s in &scores {
        println!(
            "{:>3}  {:<30} {:<16} {:<9} {:>4}  {:>5.1}% ({:.1}–{:.1}){}",
            s.cluster,
            s.name.chars().take(30).collect::<String>(),
            s.model,
            s.mode,
            s.n,
            s.rate * 100.0,
            s.low * 100.0,
            s.high * 100.0,
            if s.errors > 0 {
                format!("  {} errors", s.errors)
            } else {
                String::new()
            }
        );
    }
    println!("wrote {}", out.display());
    Ok(())
}

/// A sample as a line of OpenAI's chat fine-tuning format: its messages, the teacher's answer as the
/// last assistant turn, its tools.
fn training_line(i: &Item) -> serde_json::Value {
    let mut msgs = i.messages().to_vec();
    let mut a = i.answer.clone();
    if let Some(o) = a.as_object_mut() {
        o.insert("role".into(), "assistant".into());
    }
    msgs.push(a);
    let mut line = serde_json::json!({ "messages": msgs });
    for k in [
        "tools",
        "tool_choice",
        "response_format",
        "parallel_tool_calls",
    ] {
        if !i.request[k].is_null() {
            line[k] = i.request[k].clone();
        }
    }
    line
}

fn finetune(a: &FinetuneArgs) -> Result<()> {
    let d = dir(&a.common)?;
    let items = read_curated(&d.join("curated.jsonl"))?;
    let clusters = read_clusters(&d)?;
    if let Some(n) = a.cluster {
        if !clusters.iter().any(|c| c.id == n) {
            bail!(
                "no cluster {n} in clusters.json ({} clusters)",
                clusters.len()
            );
        }
    }
    let by_id: std::collections::HashMap<&str, &Item> =
        items.iter().map(|i| (i.id.as_str(), i)).collect();
    let out_dir = d.join("adapters");
    std::fs::create_dir_all(&out_dir)?;
    let mut results = Vec::new();
    for c in clusters
        .iter()
        .filter(|c| a.cluster.is_none_or(|n| n == c.id))
    {
        if c.members.len() < a.min_cluster {
            eprintln!(
                "cluster {} `{}`: {} samples, too few to train on",
                c.id,
                c.name,
                c.members.len()
            );
            continue;
        }
        let (test, train) = split(c, &by_id, a.test_share)?;
        if train.is_empty() {
            eprintln!(
                "cluster {} `{}`: every sample is in the test split",
                c.id, c.name
            );
            continue;
        }
        let write = |name: &str, rows: &[&Item]| -> Result<PathBuf> {
            let p = out_dir.join(format!("cluster-{}-{name}.jsonl", c.id));
            let text: String = rows
                .iter()
                .map(|i| training_line(i).to_string() + "\n")
                .collect();
            write_atomic(&p, &text)?;
            Ok(p)
        };
        let train_p = write("train", &train)?;
        let adapter = adapter_path(&d, c.id, &a.model);
        let mut cmd = std::process::Command::new(std::env::current_exe()?);
        cmd.args(["lora", "train", "--model", &a.model, "--data"])
            .arg(&train_p)
            .arg("--out")
            .arg(&adapter)
            .args([
                "--epochs",
                &a.epochs.to_string(),
                "--rank",
                &a.rank.to_string(),
            ])
            .args(["--max-seq", &a.max_seq.to_string()])
            .args(["--minutes", &a.minutes.to_string(), "--skip-bad", "--json"]);
        if !test.is_empty() {
            cmd.arg("--eval").arg(write("test", &test)?);
        }
        eprintln!(
            "cluster {} `{}`: training {} on {} samples ({} held out), at most {} min",
            c.id,
            c.name,
            a.model,
            train.len(),
            test.len(),
            a.minutes
        );
        let out = cmd
            .stderr(std::process::Stdio::inherit())
            .output()
            .context("running porteiro lora train")?;
        if !out.status.success() {
            // A failed run (diverged, bad data) leaves the other clusters and the routes alone.
            eprintln!(
                "cluster {}: training failed ({}); no adapter",
                c.id, out.status
            );
            results.push(serde_json::json!({"cluster": c.id, "name": c.name, "error": out.status.to_string()}));
            continue;
        }
        let summary: serde_json::Value = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or_default();
        let record = serde_json::json!({"cluster": c.id, "name": c.name, "model": a.model,
            "adapter": adapter, "train": train.len(), "test": test.len(), "training": summary});
        write_atomic(
            &adapter.with_extension("json"),
            &serde_json::to_string_pretty(&record)?,
        )?;
        results.push(record);
    }
    if results.is_empty() {
        bail!(
            "no cluster has --min-cluster {} samples to train on",
            a.min_cluster
        );
    }
    if a.common.json {
        println!("{}", serde_json::json!({ "adapters": results }));
    } else {
        for r in &results {
            println!(
                "cluster {:>3}  {:<30} {}",
                r["cluster"].as_u64().unwrap_or(0),
                r["name"].as_str().unwrap_or(""),
                r["adapter"]
                    .as_str()
                    .map_or_else(|| format!("failed: {}", r["error"]), str::to_string)
            );
        }
    }
    Ok(())
}

fn status(a: &StatusArgs) -> Result<()> {
    if !(0.0..=1.0).contains(&a.threshold) {
        bail!("--threshold must be between 0 and 1");
    }
    let d = a
        .dir
        .clone()
        .unwrap_or_else(|| fetch::home_dir().join("flywheel"));
    let clusters = read_clusters(&d)?;
    let scores: Vec<Score> = match std::fs::read_to_string(d.join("select.json")) {
        Ok(t) => serde_json::from_str(&t).context("select.json")?,
        Err(_) => Vec::new(),
    };
    let rpath = a.routes.clone().unwrap_or_else(|| d.join("routes.json"));
    let routes = porteiro_flywheel::routes::Routes::load(&rpath)?;
    let shadow = std::fs::read_to_string(rpath.with_file_name("shadow.jsonl")).unwrap_or_default();
    let rows: Vec<serde_json::Value> = clusters
        .iter()
        .map(|c| {
            let dec = decide(c.id, &scores, a.threshold);
            let adapters: Vec<String> = std::fs::read_dir(d.join("adapters"))
                .into_iter()
                .flatten()
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("cluster-{}-", c.id)) && n.ends_with(".gguf"))
                .collect();
            let route = routes.get(&format!("cluster-{}", c.id));
            let live = route.map(|r| live_since(&shadow, &r.name, r.changed_ms));
            let stage = if let Some(r) = route {
                r.stage.as_str()
            } else if dec.promote.is_some() {
                "qualifies"
            } else if scores.iter().any(|s| s.cluster == c.id) {
                "evaluated"
            } else if !adapters.is_empty() {
                "tuned"
            } else {
                "clustered"
            };
            let why = match (route, live) {
                (Some(r), Some(l)) => format!(
                    "{} {}: {}; live: {}/{} agree since",
                    r.model, r.mode, r.why, l.agree, l.n
                ),
                _ => dec.why.clone(),
            };
            serde_json::json!({"cluster": c.id, "name": c.name, "size": c.members.len(), "share": c.share,
                "spend_share": c.spend_share, "stage": stage, "adapters": adapters, "decision": dec,
                "route": route, "live": live, "why": why})
        })
        .collect();
    if a.json {
        println!("{}", serde_json::json!({ "clusters": rows }));
        return Ok(());
    }
    println!(
        "{:>3}  {:<30} {:>6} {:>7} {:>7}  {:<10} why",
        "id", "cluster", "size", "traffic", "spend", "stage"
    );
    for r in &rows {
        println!(
            "{:>3}  {:<30} {:>6} {:>6.1}% {:>6.1}%  {:<10} {}",
            r["cluster"],
            short(&r["name"], 30),
            r["size"],
            r["share"].as_f64().unwrap_or(0.0) * 100.0,
            r["spend_share"].as_f64().unwrap_or(0.0) * 100.0,
            r["stage"].as_str().unwrap_or(""),
            r["why"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

/// A JSON string cut to `n` characters (table cells).
fn short(v: &serde_json::Value, n: usize) -> String {
    v.as_str().unwrap_or("").chars().take(n).collect()
}

/// Live comparisons of route `name` in shadow.jsonl since `since_ms` (all of them, not a window).
fn live_since(shadow: &str, name: &str, since_ms: i64) -> porteiro_flywheel::routes::Live {
    let mut l = porteiro_flywheel::routes::Live::default();
    for v in shadow
        .lines()
        .filter_map(|x| serde_json::from_str::<serde_json::Value>(x).ok())
    {
        if v["route"] == name && v["ts_ms"].as_i64().is_some_and(|t| t >= since_ms) {
            l.n += 1;
            l.agree += usize::from(v["agree"].as_bool() == Some(true));
        }
    }
    l
}

fn run_all(a: &RunArgs) -> Result<()> {
    let c = &a.common;
    curate(&CurateArgs {
        common: c.clone(),
        db: a.db.clone(),
        since: a.since.clone(),
        near_cosine: 0.97,
    })?;
    clusters(&ClustersArgs {
        common: c.clone(),
        max_k: 8,
        min_size: a.min_size,
        min_silhouette: 0.1,
    })?;
    if let Some(model) = &a.finetune {
        finetune(&FinetuneArgs {
            common: c.clone(),
            model: model.clone(),
            cluster: None,
            test_share: a.test_share,
            min_cluster: 8,
            minutes: a.minutes,
            epochs: 2,
            rank: 16,
            max_seq: 4096,
        })?;
    }
    let models = match &a.finetune {
        // The tuned model is a candidate too (its adapters are scored as `lora`).
        Some(m) if !a.models.split(',').any(|x| x.trim() == m) => format!("{},{m}", a.models),
        _ => a.models.clone(),
    };
    select(&SelectArgs {
        common: c.clone(),
        models,
        test_share: a.test_share,
        min_cluster: 8,
        max_test: 200,
        shots: 3,
        max_tokens: 256,
        judge: None,
    })?;
    status(&StatusArgs {
        dir: c.dir.clone(),
        routes: None,
        threshold: a.threshold,
        json: c.json,
    })?;
    if a.promote {
        promote(&PromoteArgs {
            common: c.clone(),
            routes: None,
            threshold: a.threshold,
            no_shadow: false,
        })?;
    }
    Ok(())
}

/// The routes file: --routes, else `[flywheel] routes`, else routes.json in the flywheel folder.
fn routes_path(flag: Option<&Path>, cfg: &porteiro_config::Config, d: &Path) -> PathBuf {
    flag.map(Path::to_path_buf)
        .or_else(|| cfg.flywheel.routes.as_ref().map(PathBuf::from))
        .unwrap_or_else(|| d.join("routes.json"))
}

fn promote(a: &PromoteArgs) -> Result<()> {
    use porteiro_flywheel::routes::{LearnedRoute, Routes, Stage};
    if !(0.0..=1.0).contains(&a.threshold) {
        bail!("--threshold must be between 0 and 1");
    }
    let cfg = config(a.common.config.as_deref())?;
    let d = dir(&a.common)?;
    let items = read_curated(&d.join("curated.jsonl"))?;
    let clusters = read_clusters(&d)?;
    let scores: Vec<Score> = serde_json::from_str(
        &std::fs::read_to_string(d.join("select.json"))
            .context("reading select.json (run `porteiro flywheel select` first)")?,
    )
    .context("select.json")?;
    // Few-shot prompts carry examples the server does not add: scored, not served.
    let servable: Vec<Score> = scores
        .into_iter()
        .filter(|s| s.mode == "zero-shot" || s.mode == "lora")
        .collect();
    let by_id: std::collections::HashMap<&str, &Item> =
        items.iter().map(|i| (i.id.as_str(), i)).collect();
    let to = if a.no_shadow {
        Stage::Promoted
    } else {
        Stage::Shadow
    };
    let mut wanted = Vec::new();
    let mut report = Vec::new();
    for c in &clusters {
        let dec = decide(c.id, &servable, a.threshold);
        let Some(s) = dec.promote else {
            report.push(serde_json::json!({"cluster": c.id, "name": c.name, "promoted": false, "why": dec.why}));
            continue;
        };
        let members: Vec<&Item> = c
            .members
            .iter()
            .filter_map(|m| by_id.get(m.as_str()).copied())
            .collect();
        let mut tiers: std::collections::BTreeMap<&str, usize> = Default::default();
        for i in &members {
            *tiers.entry(i.tier.as_str()).or_default() += 1;
        }
        let teacher = tiers
            .into_iter()
            .max_by_key(|(_, n)| *n)
            .map_or(String::new(), |(t, _)| t.to_string());
        // Exemplars (nearest the centre) first, then the rest: the server embeds the first ones.
        let mut order: Vec<&Item> = c
            .exemplars
            .iter()
            .filter_map(|m| by_id.get(m.as_str()).copied())
            .collect();
        order.extend(members.iter().filter(|i| !c.exemplars.contains(&i.id)));
        let examples = order
            .iter()
            .map(|i| {
                porteiro_router::request_text(i.messages().iter().map(|m| {
                    (
                        m["role"].as_str().unwrap_or(""),
                        m["content"].as_str().unwrap_or(""),
                    )
                }))
            })
            .collect();
        let adapter = if s.mode == "lora" {
            let p = adapter_path(&d, c.id, &s.model);
            Some(std::fs::canonicalize(&p).with_context(|| format!("{}", p.display()))?)
        } else {
            None
        };
        wanted.push(LearnedRoute {
            name: format!("cluster-{}", c.id),
            cluster: c.id,
            title: c.name.clone(),
            stage: to,
            structure: c.structure.clone(),
            kind: c.kind,
            examples,
            model: s.model.clone(),
            teacher,
            adapter,
            mode: s.mode.clone(),
            evidence: s.clone(),
            changed_ms: 0,
            why: String::new(),
        });
        report.push(serde_json::json!({"cluster": c.id, "name": c.name, "promoted": true, "stage": to.as_str(), "why": dec.why}));
    }
    let path = routes_path(a.routes.as_deref(), &cfg, &d);
    let (routes, changes) = Routes::update(&path, |r| {
        wanted
            .into_iter()
            .filter_map(|w| {
                let why = format!(
                    "held out: {}/{} agree with the teacher (lower bound {:.1}% ≥ {:.1}%)",
                    w.evidence.agree,
                    w.evidence.n,
                    w.evidence.low * 100.0,
                    a.threshold * 100.0
                );
                let name = w.name.clone();
                r.set(&name, to, &why, Some(w))
            })
            .collect()
    })?;
    if let (Some(db), false) = (&cfg.privacy.audit_db, changes.is_empty()) {
        let key = std::env::var(&cfg.privacy.audit_key_env).ok();
        let mut log =
            porteiro_privacy::AuditLog::open(Path::new(db), key.as_deref().map(str::as_bytes))?;
        let recs: Vec<_> = changes
            .iter()
            .map(|c| porteiro_server::privacy::flywheel_record(routes.version, c))
            .collect();
        log.append(&recs)?;
    }
    if a.common.json {
        println!(
            "{}",
            serde_json::json!({"routes": path, "version": routes.version, "changes": changes, "clusters": report})
        );
        return Ok(());
    }
    for r in &report {
        println!(
            "cluster {:>3}  {:<30} {}",
            r["cluster"],
            short(&r["name"], 30),
            if r["promoted"].as_bool() == Some(true) {
                format!(
                    "{}: {}",
                    r["stage"].as_str().unwrap_or(""),
                    r["why"].as_str().unwrap_or("")
                )
            } else {
                format!(
                    "stays with the teacher: {}",
                    r["why"].as_str().unwrap_or("")
                )
            }
        );
    }
    println!(
        "{} (version {}): {} change(s)",
        path.display(),
        routes.version,
        changes.len()
    );
    Ok(())
}
