//! The server's state, built once: settings, the privacy guard, telemetry, the routing tiers and
//! the sentence encoder are given when the state is built (no-op guard, telemetry and routing when
//! off); only the generative model is filled in later, because it loads after the listener starts
//! (`/health` answers 503 until then).

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use porteiro_config::Config;
use porteiro_encoder::bert::{BertEncoder, BertError};
use porteiro_engine::scheduler::{self, EngineConfig, EngineHandle};
use porteiro_engine::{LoadError, LocalModel};
use porteiro_models::template::ChatTemplate;
use porteiro_models::tokenizer::Tokenizer;
use tokio::sync::Semaphore;

use crate::adapters::Adapters;
use crate::metrics::Metrics;
use crate::plan::Routing;
use crate::privacy::Guard;
use crate::telemetry::Telemetry;

/// Settings the handlers need, taken from the validated [`Config`].
#[derive(Debug, Clone)]
pub struct Settings {
    /// Id clients use for the generative model (`model` in requests, `/v1/models`).
    pub model_id: String,
    /// Id of the embedding model, when /v1/embeddings is on.
    pub embedding_id: Option<String>,
    pub api_keys: Vec<String>,
    pub max_body_bytes: usize,
    /// Chat completion length when a request gives no max_tokens (capped by the context left).
    pub default_max_tokens: usize,
    /// The key of the admin endpoints (read from `server.admin_key_env`); None: they are off.
    pub admin_key: Option<String>,
}

impl Settings {
    pub fn from_config(cfg: &Config) -> Self {
        Self {
            model_id: model_id(&cfg.model),
            embedding_id: cfg.embedding_model.as_deref().map(model_id),
            api_keys: cfg.api_keys.clone(),
            max_body_bytes: cfg.max_body_bytes,
            default_max_tokens: cfg.default_max_tokens,
            admin_key: std::env::var(&cfg.admin_key_env)
                .ok()
                .filter(|k| !k.trim().is_empty()),
        }
    }
}

/// The id a model is served under: the catalog alias as given, or a file's stem.
pub fn model_id(name_or_path: &str) -> String {
    let p = Path::new(name_or_path);
    if p.exists() {
        if let Some(stem) = p.file_stem().and_then(|s| s.to_str()) {
            return stem.to_string();
        }
    }
    name_or_path.to_string()
}

/// The generative model as the handlers see it: an engine handle plus what is needed to build prompts.
pub struct Generator {
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    pub template: Option<ChatTemplate>,
    /// Structured output's token trie, built on the first request that needs it.
    pub grammars: OnceLock<Result<Arc<porteiro_grammar::Grammars>, String>>,
    /// The model's shape (adapters are checked against it).
    pub model_cfg: porteiro_engine::model::Config,
    /// KV cache bytes per token (other memory is accounted in the KV budget in these units).
    pub kv_bytes_per_token: u64,
}

/// f16 keys and values for every layer.
fn kv_bytes_per_token(mc: &porteiro_engine::model::Config) -> u64 {
    (mc.n_layer * 2 * mc.kv_dim() * 2) as u64
}

impl Generator {
    /// Starts the engine thread on `lm`.
    pub fn start(
        lm: LocalModel,
        cfg: EngineConfig,
    ) -> std::io::Result<(Self, std::thread::JoinHandle<()>)> {
        let tokenizer = Arc::new(lm.tokenizer);
        let model_cfg = lm.model.cfg.clone();
        let kv_bytes_per_token = kv_bytes_per_token(&model_cfg);
        let (engine, join) = scheduler::spawn(lm.model, tokenizer.clone(), cfg)?;
        Ok((
            Self {
                engine,
                tokenizer,
                template: lm.template,
                grammars: OnceLock::new(),
                model_cfg,
                kv_bytes_per_token,
            },
            join,
        ))
    }
}

/// The sentence encoder behind /v1/embeddings; one request computes at a time so that embeddings
/// cannot take every core from the generation engine.
pub struct Embedder {
    pub encoder: Arc<BertEncoder>,
    pub(crate) permits: Semaphore,
}

impl Embedder {
    pub fn new(encoder: BertEncoder) -> Self {
        Self {
            encoder: Arc::new(encoder),
            permits: Semaphore::new(1),
        }
    }

    pub fn open(dir: &Path) -> Result<Self, BertError> {
        Ok(Self::new(BertEncoder::open(dir)?))
    }
}

/// Why the generative model could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("loading {path}: {source}")]
    Load { path: String, source: LoadError },
    #[error("{0}")]
    Config(String),
    #[error("starting the engine thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// Loads a GGUF model and sizes the scheduler from the configuration: the context window (configured,
/// else min(training context, 4096)) and the KV budget in tokens from `kv_cache_mib`.
pub fn load_generator(
    path: &Path,
    cfg: &Config,
) -> Result<(Generator, std::thread::JoinHandle<()>), StartError> {
    let threads = if cfg.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        cfg.threads
    };
    let lm = LocalModel::open(path, threads).map_err(|source| StartError::Load {
        path: path.display().to_string(),
        source,
    })?;
    let mc = &lm.model.cfg;
    let n_ctx = cfg.ctx.unwrap_or(mc.n_ctx_train.min(4096));
    if n_ctx > mc.n_ctx_train {
        return Err(StartError::Config(format!(
            "model.ctx = {n_ctx} exceeds the model's training context of {} tokens",
            mc.n_ctx_train
        )));
    }
    let kv_bytes_per_token = kv_bytes_per_token(mc);
    let kv_budget_tokens = (cfg.kv_cache_bytes / kv_bytes_per_token) as usize;
    let ecfg = EngineConfig {
        n_ctx,
        max_seqs: cfg.max_seqs,
        max_queue: cfg.max_queue,
        kv_budget_tokens,
        prefill_chunk: cfg.prefill_chunk,
        nice: cfg.nice,
    };
    ecfg.validate().map_err(|why| {
        StartError::Config(format!(
            "{why}: raise limits.kv_cache_mib to at least {} or lower model.ctx",
            (n_ctx as u64 * kv_bytes_per_token).div_ceil(1 << 20)
        ))
    })?;
    Ok(Generator::start(lm, ecfg)?)
}

pub struct Inner {
    pub settings: Settings,
    /// The only late part: set once the model is loaded.
    generator: OnceLock<Generator>,
    pub embedder: Option<Embedder>,
    pub routing: Routing,
    pub privacy: Arc<Guard>,
    pub telemetry: Arc<Telemetry>,
    /// LoRA adapters of the model, by the names requests use.
    pub adapters: Adapters,
    /// The flywheel's learned routes, when routing is on.
    pub flywheel: Option<Arc<crate::learned::Flywheel>>,
    pub metrics: Metrics,
    draining: AtomicBool,
    created: u64,
    ids: AtomicU64,
}

/// Shared by all handlers.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Builds an [`AppState`]; what is not given is off.
pub struct StateBuilder {
    settings: Settings,
    embedder: Option<Embedder>,
    routing: Option<Routing>,
    privacy: Option<Guard>,
    telemetry: Option<Telemetry>,
    flywheel: Option<crate::learned::Flywheel>,
}

impl StateBuilder {
    /// The flywheel's learned routes (reloaded by `flywheel::watch`).
    pub fn flywheel(mut self, f: crate::learned::Flywheel) -> Self {
        self.flywheel = Some(f);
        self
    }

    pub fn embedder(mut self, e: Embedder) -> Self {
        self.embedder = Some(e);
        self
    }

    /// The router and upstream clients.
    pub fn routing(mut self, r: Routing) -> Self {
        self.routing = Some(r);
        self
    }

    pub fn privacy(mut self, g: Guard) -> Self {
        self.privacy = Some(g);
        self
    }

    /// Pricing, live KPIs and the request log.
    pub fn telemetry(mut self, t: Telemetry) -> Self {
        self.telemetry = Some(t);
        self
    }

    pub fn build(self) -> AppState {
        AppState(Arc::new(Inner {
            settings: self.settings,
            generator: OnceLock::new(),
            embedder: self.embedder,
            routing: self.routing.unwrap_or_else(Routing::off),
            privacy: Arc::new(self.privacy.unwrap_or_else(Guard::off)),
            telemetry: Arc::new(self.telemetry.unwrap_or_else(Telemetry::off)),
            adapters: Adapters::default(),
            flywheel: self.flywheel.map(Arc::new),
            metrics: Metrics::default(),
            draining: AtomicBool::new(false),
            created: unix_now(),
            ids: AtomicU64::new(0),
        }))
    }
}

impl AppState {
    pub fn builder(settings: Settings) -> StateBuilder {
        StateBuilder {
            settings,
            embedder: None,
            routing: None,
            privacy: None,
            telemetry: None,
            flywheel: None,
        }
    }

    /// A state with everything but the model off.
    pub fn new(settings: Settings) -> Self {
        Self::builder(settings).build()
    }

    /// Makes the generative model available (once; later calls are ignored and return false).
    pub fn set_generator(&self, g: Generator) -> bool {
        let stats = g.engine.shared_stats();
        let set = self.0.generator.set(g).is_ok();
        if set {
            self.telemetry.set_engine(stats);
        }
        set
    }

    pub fn generator(&self) -> Option<&Generator> {
        self.0.generator.get()
    }

    /// Loads a LoRA adapter of `g`'s model under `name` (see [`Adapters::load`]).
    pub fn load_adapter(
        &self,
        g: &Generator,
        name: &str,
        path: &Path,
        scale: f32,
    ) -> Result<usize, crate::ApiError> {
        self.adapters.load(
            &g.engine,
            &g.model_cfg,
            g.kv_bytes_per_token,
            name,
            path,
            scale,
        )
    }

    pub fn embedder(&self) -> Option<&Embedder> {
        self.0.embedder.as_ref()
    }

    /// Ready: the generative model and (when configured) the embedding model are loaded, the engine
    /// thread is running, and the server is not shutting down.
    pub fn ready(&self) -> bool {
        self.generator().is_some_and(|g| g.engine.is_running())
            && (self.settings.embedding_id.is_none() || self.embedder().is_some())
            && !self.draining()
    }

    pub(crate) fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub(crate) fn created(&self) -> u64 {
        self.created
    }

    /// Stops the engine: running and queued generations end with an error event.
    pub fn stop_engine(&self) {
        if let Some(g) = self.generator() {
            g.engine.shutdown();
        }
    }

    /// Waits for queued audit records and request-log records to be written (shutdown, tests).
    pub fn flush(&self) -> Result<(), porteiro_privacy::audit::AuditError> {
        self.telemetry.flush();
        self.privacy.flush_audit()
    }

    /// A fresh id such as `chatcmpl-6f1c...`: time and a counter, mixed.
    pub(crate) fn new_id(&self, prefix: &str) -> String {
        let n = self.ids.fetch_add(1, Ordering::Relaxed);
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mut r = porteiro_engine::sampler::Rng::new(t ^ n.rotate_left(32));
        format!("{prefix}-{:016x}{:08x}", r.next_u64(), n as u32)
    }
}
