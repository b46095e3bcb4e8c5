//! `porteiro serve`: resolve (and pull) the models, listen, load, serve until SIGINT/SIGTERM.

/// A line on stdout that cannot panic: when the parent closed the pipe (it went away), a status
/// line is lost, not the shutdown.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use porteiro_config::{Config, Overrides};
use porteiro_models::fetch;
use porteiro_server::{load_generator, AppState, Embedder, Settings};

use crate::DEFAULT_MODEL;

#[derive(Args, Clone)]
pub struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1, or server.host from the config].
    #[arg(long)]
    host: Option<String>,
    /// Port to listen on (0 picks a free one) [default: 8080, or server.port from the config].
    #[arg(long)]
    port: Option<u16>,
    /// Catalog alias or .gguf path of the generative model [default: qwen2.5-0.5b].
    #[arg(short, long)]
    model: Option<String>,
    /// Worker threads of the engine [default: all cores].
    #[arg(short, long)]
    threads: Option<usize>,
    /// Context window per sequence in tokens [default: min(model's, 4096)].
    #[arg(long)]
    ctx: Option<usize>,
    /// porteiro.toml with everything else (limits, API keys, embeddings); flags win over it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Serve a LoRA adapter (llama.cpp GGUF) of the model under a name: requests with
    /// `model: NAME` use it. Repeatable; adds to the config's [[adapters]].
    #[arg(long = "lora", value_name = "NAME=PATH")]
    lora: Vec<String>,
}

/// `NAME=PATH` of `--lora`.
fn lora_flag(s: &str) -> Result<(String, String)> {
    match s.split_once('=') {
        Some((n, p)) if !n.trim().is_empty() && !p.trim().is_empty() => {
            Ok((n.trim().to_string(), p.trim().to_string()))
        }
        _ => bail!("--lora takes NAME=PATH (e.g. --lora tickets=tickets.gguf), got `{s}`"),
    }
}

pub fn run(a: &ServeArgs) -> Result<()> {
    let overrides = Overrides {
        host: a.host.clone(),
        port: a.port,
        model: a.model.clone(),
        threads: a.threads,
        ctx: a.ctx,
        lora: a.lora.iter().map(|s| lora_flag(s)).collect::<Result<_>>()?,
    };
    let cfg = Config::load(a.config.as_deref(), &overrides, DEFAULT_MODEL)?;
    let model_path = fetch::resolve_model(&cfg.model, true)?;
    if model_path.is_dir() {
        bail!(
            "{} is an encoder model; `model.name` must be a generative GGUF model",
            cfg.model
        );
    }
    if cfg.embedding_model.is_none() && (!cfg.routes.is_empty() || cfg.router.scorer.is_some()) {
        bail!("the router needs the sentence encoder: set [embeddings] model (e.g. \"minilm-l6\") or remove [[routes]] and router.scorer");
    }
    let embed_path = match &cfg.embedding_model {
        Some(m) => {
            Some(fetch::resolve_model(m, true).with_context(|| format!("embedding model {m}"))?)
        }
        None => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let schedule = match &cfg.flywheel.schedule {
        Some(p) => Some(
            crate::report_cmd::parse_period(p)
                .with_context(|| format!("[flywheel] schedule = {p:?}"))?,
        ),
        None => None,
    };
    rt.block_on(serve(
        cfg,
        model_path,
        embed_path,
        schedule.map(|p| (p, a.config.clone())),
    ))
}

/// Runs `porteiro flywheel run --promote` every `period` (the first after one period), one at a
/// time, its output on the server's stderr. The server reloads the routes file it writes.
fn schedule_loop(period: Duration, config: Option<PathBuf>) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(period).await;
            let Ok(exe) = std::env::current_exe() else {
                return;
            };
            let mut cmd = std::process::Command::new(exe);
            cmd.args(["flywheel", "run", "--promote", "--since"])
                .arg(format!("{}s", period.as_secs().max(60)));
            if let Some(c) = &config {
                cmd.arg("--config").arg(c);
            }
            eprintln!("porteiro: flywheel: the scheduled loop starts");
            let status = tokio::task::spawn_blocking(move || {
                cmd.stdout(std::process::Stdio::null()).status()
            })
            .await
            .map_err(std::io::Error::other)
            .and_then(|s| s);
            match status {
                Ok(s) if s.success() => eprintln!("porteiro: flywheel: the scheduled loop is done"),
                Ok(s) => eprintln!(
                    "porteiro: flywheel: the scheduled loop failed ({s}); routes unchanged"
                ),
                Err(e) => eprintln!("porteiro: flywheel: cannot start the scheduled loop: {e}"),
            }
        }
    });
}

async fn serve(
    cfg: Config,
    model_path: PathBuf,
    embed_path: Option<PathBuf>,
    schedule: Option<(Duration, Option<PathBuf>)>,
) -> Result<()> {
    let addr = format!("{}:{}", cfg.host, cfg.port);
    // Upstream clients first: a missing API key variable should stop the start, not the first request.
    let upstreams = cfg
        .upstreams
        .iter()
        .map(|u| porteiro_upstream::UpstreamClient::new(u.clone()).map(std::sync::Arc::new))
        .collect::<Result<Vec<_>, String>>()
        .map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| {
            format!("cannot listen on {addr} (use --port or server.port for another port)")
        })?;
    let local = listener.local_addr()?;
    say!("porteiro: listening on http://{local}");
    let settings = Settings::from_config(&cfg);
    // The sentence encoder (small: under a second) and the router over it load before the state is
    // built; only the generative model loads while the server answers (/health is 503 until then).
    let mut builder = AppState::builder(settings.clone())
        .privacy(privacy_guard(&cfg)?)
        .telemetry(telemetry(&cfg)?);
    let mut router = None;
    if let Some(p) = embed_path {
        let e = tokio::task::spawn_blocking(move || {
            Embedder::open(&p).with_context(|| format!("loading {}", p.display()))
        })
        .await
        .context("the loading task failed")??;
        router = Some(porteiro_router::Router::new(&cfg, e.encoder.clone())?);
        builder = builder.embedder(e);
    }
    if router.is_some() {
        let path = cfg.flywheel.routes.as_ref().map_or_else(
            || fetch::home_dir().join("flywheel").join("routes.json"),
            PathBuf::from,
        );
        builder = builder.flywheel(porteiro_server::flywheel::Flywheel::new(
            cfg.flywheel.clone(),
            path,
        ));
    }
    let state = builder
        .routing(porteiro_server::Routing::new(
            cfg.router.clone(),
            router,
            upstreams,
        ))
        .build();
    let grace = Duration::from_secs(cfg.shutdown_grace_s);
    let server = tokio::spawn(porteiro_server::serve(
        listener,
        state.clone(),
        shutdown_signal(grace),
        grace,
    ));

    let (st, c) = (state.clone(), cfg.clone());
    let loaded = tokio::task::spawn_blocking(move || -> Result<usize> {
        let (g, _engine_thread) = load_generator(&model_path, &c)?;
        let n_ctx = g.engine.config().n_ctx;
        for a in &c.adapters {
            st.load_adapter(&g, &a.name, std::path::Path::new(&a.path), a.scale)
                .map_err(|e| anyhow::anyhow!("adapter `{}`: {}", a.name, e.message))?;
        }
        st.set_generator(g);
        Ok(n_ctx)
    })
    .await
    .context("the loading task failed")?;
    let n_ctx = match loaded {
        Ok(n) => n,
        Err(e) => {
            state.stop_engine();
            return Err(e);
        }
    };
    if state.flywheel.is_some() {
        porteiro_server::flywheel::watch(state.clone());
    }
    if let Some((period, config)) = schedule {
        schedule_loop(period, config);
    }

    let host = if local.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        local.ip().to_string()
    };
    let base = format!("http://{host}:{}", local.port());
    let auth = if settings.api_keys.is_empty() {
        String::new()
    } else {
        " -H \"Authorization: Bearer $KEY\"".to_string()
    };
    say!(
        "porteiro: serving {} (context {n_ctx} tokens, {} sequences at once{}) at {base}/v1",
        settings.model_id,
        cfg.max_seqs,
        settings
            .embedding_id
            .as_deref()
            .map(|e| format!(", embeddings by {e}"))
            .unwrap_or_default()
    );
    if let Some(auto) = state.routing.auto_model() {
        let r = &state.routing;
        let tiers: Vec<String> = std::iter::once(format!("local ({})", settings.model_id))
            .chain(r.upstreams.iter().map(|u| {
                format!(
                    "{} ({} at {})",
                    u.name(),
                    u.config().model,
                    u.config().base_url
                )
            }))
            .collect();
        say!(
            "porteiro: model \"{}\" is routed over tiers: {}; {} routes",
            auto,
            tiers.join(", "),
            cfg.routes.len()
        );
    }
    for (name, path, bytes) in state.adapters.list() {
        say!(
            "porteiro: adapter \"{name}\" ({path}, {:.1} MiB) answers as model \"{name}\"",
            bytes as f64 / (1 << 20) as f64
        );
    }
    say!(
        "try: curl {base}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n  -d '{{\"model\": \"{}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Say hello\"}}]}}'",
        settings.model_id
    );
    server.await.context("the server task failed")??;
    if let Err(e) = state.flush() {
        eprintln!("porteiro: audit trail: {e}");
    }
    say!("porteiro: stopped");
    Ok(())
}

/// The privacy guard: detectors (with the first-name list unless `[privacy] names = ""`), the
/// policies, and the audit trail when `[privacy] audit_db` is set.
pub(crate) fn privacy_guard(cfg: &Config) -> Result<porteiro_server::privacy::Guard> {
    let det = crate::privacy_cmd::detector(
        cfg.privacy.names.as_deref(),
        cfg.privacy.unknown_names,
        cfg.privacy.quasi_identifiers,
    )?;
    let audit = match &cfg.privacy.audit_db {
        None => None,
        Some(p) => {
            let key = std::env::var(&cfg.privacy.audit_key_env).ok();
            let log = porteiro_privacy::AuditLog::open(
                std::path::Path::new(p),
                key.as_deref().map(str::as_bytes),
            )?;
            Some(porteiro_privacy::AuditWriter::spawn(log).context("starting the audit writer")?)
        }
    };
    Ok(porteiro_server::privacy::Guard::new(cfg, det, audit))
}

/// Where the request log lives: `[log] path`, else $PORTEIRO_HOME/requests.db; None when off.
pub fn request_log_path(cfg: &Config) -> Option<PathBuf> {
    match cfg.log.path.as_deref() {
        Some("") => None,
        Some(p) => Some(PathBuf::from(p)),
        None => Some(fetch::home_dir().join("requests.db")),
    }
}

/// Pricing, live KPIs and the request log (opened and migrated here, so a bad path stops the start).
pub(crate) fn telemetry(cfg: &Config) -> Result<porteiro_server::telemetry::Telemetry> {
    use porteiro_telemetry::log::{LogWriter, RequestLog, Sealer};
    let sealer = if cfg.log.store_text || cfg.flywheel.collect {
        let what = if cfg.log.store_text {
            "[log] store_text = true"
        } else {
            "[flywheel] collect = true"
        };
        let key = std::env::var(&cfg.log.key_env).map_err(|_| {
            anyhow::anyhow!(
                "{what} needs the encryption key in ${} (texts are never stored in clear)",
                cfg.log.key_env
            )
        })?;
        Some(Sealer::new(key.as_bytes()))
    } else {
        None
    };
    let ttl = (cfg.log.retention_days > 0.0)
        .then(|| Duration::from_secs_f64(cfg.log.retention_days * 86400.0));
    const WRITER: &str = "starting the request-log writer";
    let writer = if let Some(var) = &cfg.log.postgres_env {
        let conninfo = std::env::var(var)
            .map_err(|_| anyhow::anyhow!("[log] postgres_env names ${var}, which is not set"))?;
        let pg = porteiro_telemetry::pg::PgLog::connect(&conninfo)?;
        Some(LogWriter::spawn(pg, cfg.log.queue, sealer, ttl).context(WRITER)?)
    } else {
        match request_log_path(cfg) {
            None => None,
            Some(p) => {
                if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                }
                let log = RequestLog::open(&p)?;
                Some(LogWriter::spawn(log, cfg.log.queue, sealer, ttl).context(WRITER)?)
            }
        }
    };
    Ok(porteiro_server::telemetry::Telemetry::new(cfg, writer))
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal(grace: Duration) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!(
        "porteiro: shutting down; in-flight requests have {} s to finish",
        grace.as_secs()
    );
}
