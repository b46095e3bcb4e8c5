//! The OpenAI-compatible HTTP server. [`app`] builds the axum router over an [`AppState`]; [`serve`]
//! runs it on a listener with graceful shutdown. Handlers never touch the model: they validate, render
//! and tokenize, then hand a [`porteiro_engine::scheduler::GenRequest`] to the engine thread and turn
//! the events that come back into JSON or server-sent events.
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `POST /v1/embeddings`,
//! `GET /v1/models[/{id}]`, `GET /health`, `GET /metrics`.

pub mod dashboard;
pub mod embeddings;
pub mod error;
pub mod generation;
pub mod metrics;
pub mod privacy;
pub mod routing;
pub mod structured;
pub mod telemetry;

use std::future::{Future, IntoFuture};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{FromRequest, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use porteiro_config::Config;
use porteiro_encoder::bert::{BertEncoder, BertError};
use porteiro_engine::scheduler::{self, EngineConfig, EngineHandle};
use porteiro_engine::{LoadError, LocalModel};
use porteiro_models::template::ChatTemplate;
use porteiro_models::tokenizer::Tokenizer;
use porteiro_protocol::{ModelCard, ModelList};
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;

pub use error::ApiError;
pub use metrics::Metrics;

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
}

impl Settings {
    pub fn from_config(cfg: &Config) -> Self {
        Self {
            model_id: model_id(&cfg.model),
            embedding_id: cfg.embedding_model.as_deref().map(model_id),
            api_keys: cfg.api_keys.clone(),
            max_body_bytes: cfg.max_body_bytes,
            default_max_tokens: cfg.default_max_tokens,
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
}

impl Generator {
    /// Starts the engine thread on `lm`.
    pub fn start(
        lm: LocalModel,
        cfg: EngineConfig,
    ) -> std::io::Result<(Self, std::thread::JoinHandle<()>)> {
        let tokenizer = Arc::new(lm.tokenizer);
        let (engine, join) = scheduler::spawn(lm.model, tokenizer.clone(), cfg)?;
        Ok((
            Self {
                engine,
                tokenizer,
                template: lm.template,
                grammars: OnceLock::new(),
            },
            join,
        ))
    }
}

/// The sentence encoder behind /v1/embeddings; one request computes at a time so that embeddings
/// cannot take every core from the generation engine.
pub struct Embedder {
    pub encoder: Arc<BertEncoder>,
    permits: Semaphore,
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
    // f16 keys and values for every layer.
    let kv_bytes_per_token = (mc.n_layer * 2 * mc.kv_dim() * 2) as u64;
    let kv_budget_tokens = (cfg.kv_cache_bytes / kv_bytes_per_token) as usize;
    let ecfg = EngineConfig {
        n_ctx,
        max_seqs: cfg.max_seqs,
        max_queue: cfg.max_queue,
        kv_budget_tokens,
        prefill_chunk: cfg.prefill_chunk,
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
    generator: OnceLock<Generator>,
    embedder: OnceLock<Embedder>,
    routing: OnceLock<routing::Routing>,
    privacy: OnceLock<privacy::Guard>,
    telemetry: OnceLock<telemetry::Telemetry>,
    pub metrics: Metrics,
    draining: AtomicBool,
    created: u64,
    ids: AtomicU64,
}

/// Shared by all handlers; models are set once they are loaded (`/health` is ready from then on).
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

impl AppState {
    pub fn new(settings: Settings) -> Self {
        Self(Arc::new(Inner {
            settings,
            generator: OnceLock::new(),
            embedder: OnceLock::new(),
            routing: OnceLock::new(),
            privacy: OnceLock::new(),
            telemetry: OnceLock::new(),
            metrics: Metrics::default(),
            draining: AtomicBool::new(false),
            created: unix_now(),
            ids: AtomicU64::new(0),
        }))
    }

    /// Makes the generative model available (once; later calls are ignored and return false).
    pub fn set_generator(&self, g: Generator) -> bool {
        self.0.generator.set(g).is_ok()
    }

    pub fn set_embedder(&self, e: Embedder) -> bool {
        self.0.embedder.set(e).is_ok()
    }

    /// Installs the router and upstream clients (once).
    pub fn set_routing(&self, r: routing::Routing) -> bool {
        self.0.routing.set(r).is_ok()
    }

    pub fn routing(&self) -> Option<&routing::Routing> {
        self.0.routing.get()
    }

    /// Installs the privacy guard (once).
    pub fn set_privacy(&self, g: privacy::Guard) -> bool {
        self.0.privacy.set(g).is_ok()
    }

    pub fn privacy(&self) -> Option<&privacy::Guard> {
        self.0.privacy.get()
    }

    /// Installs request telemetry (pricing, live KPIs, the request log), once.
    pub fn set_telemetry(&self, t: telemetry::Telemetry) -> bool {
        self.0.telemetry.set(t).is_ok()
    }

    pub fn telemetry(&self) -> Option<&telemetry::Telemetry> {
        self.0.telemetry.get()
    }

    pub fn generator(&self) -> Option<&Generator> {
        self.0.generator.get()
    }

    pub fn embedder(&self) -> Option<&Embedder> {
        self.0.embedder.get()
    }

    /// Ready: the generative model and (when configured) the embedding model are loaded, the engine
    /// thread is running, and the server is not shutting down.
    pub fn ready(&self) -> bool {
        self.generator().is_some_and(|g| g.engine.is_running())
            && (self.settings.embedding_id.is_none() || self.embedder().is_some())
            && !self.draining.load(Ordering::Acquire)
    }

    /// Stops the engine: running and queued generations end with an error event.
    pub fn stop_engine(&self) {
        if let Some(g) = self.generator() {
            g.engine.shutdown();
        }
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

/// The router with every route, the API-key check on `/v1`, and request metrics.
pub fn app(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/chat/completions", post(generation::chat))
        .route("/completions", post(generation::completions))
        .route("/embeddings", post(embeddings::embeddings))
        .route("/models", get(list_models))
        .route("/models/{id}", get(get_model))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .nest("/v1", v1)
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/", get(dashboard::page))
        .route("/api/dashboard", get(dashboard::data))
        .fallback(|| async { ApiError::not_found("Unknown path; see /v1/models.") })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

/// Runs the server until `shutdown` resolves, then stops accepting connections and lets in-flight
/// requests finish for up to `grace`; what is still running after that is cancelled (streams end
/// with an error event) and the server returns at most 2 s later.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let st = state.clone();
    let server = axum::serve(listener, app(state.clone())).with_graceful_shutdown(async move {
        shutdown.await;
        st.draining.store(true, Ordering::Release);
        let _ = tx.send(());
    });
    let server = server.into_future();
    tokio::pin!(server);
    let result = tokio::select! {
        r = &mut server => r,
        _ = rx => match tokio::time::timeout(grace, &mut server).await {
            Ok(r) => r,
            Err(_) => {
                state.stop_engine();
                tokio::time::timeout(Duration::from_secs(2), &mut server)
                    .await
                    .unwrap_or(Ok(()))
            }
        },
    };
    state.stop_engine();
    result
}

/// Records route, status and time to the response head; gives the request its id (`x-request-id`).
async fn track(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    let id = st.new_id("req");
    req.extensions_mut().insert(privacy::RequestCtx {
        id: id.clone(),
        key_id: porteiro_privacy::key_id(None),
    });
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let t0 = Instant::now();
    let mut resp = next.run(req).await;
    st.metrics
        .request(&route, resp.status().as_u16(), t0.elapsed().as_secs_f64());
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// With API keys configured, `/v1` needs `Authorization: Bearer <key>`.
async fn auth(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    let keys = &st.settings.api_keys;
    if keys.is_empty() {
        return next.run(req).await;
    }
    match bearer(req.headers()) {
        Some(k) if key_allowed(keys, k) => {
            let key_id = porteiro_privacy::key_id(Some(k));
            if let Some(ctx) = req.extensions_mut().get_mut::<privacy::RequestCtx>() {
                ctx.key_id = key_id;
            }
            next.run(req).await
        }
        Some(_) => ApiError::unauthorized("Incorrect API key provided.").into_response(),
        None => ApiError::unauthorized(
            "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
        )
        .into_response(),
    }
}

/// The key in `Authorization: Bearer <key>`, if any.
pub(crate) fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Whether `given` is one of the configured keys (compared in constant time).
pub(crate) fn key_allowed(keys: &[String], given: &str) -> bool {
    keys.iter()
        .any(|key| constant_time_eq(key.as_bytes(), given.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn health(State(st): State<AppState>) -> Response {
    if st.ready() {
        Json(serde_json::json!({"status": "ok"})).into_response()
    } else {
        let status = if st.draining.load(Ordering::Acquire) {
            "shutting_down"
        } else {
            "loading"
        };
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": status })),
        )
            .into_response()
    }
}

async fn metrics_text(State(st): State<AppState>) -> Response {
    let mut body = st
        .metrics
        .render(st.generator().map(|g| g.engine.stats()), st.ready());
    if let Some(t) = st.telemetry() {
        st.metrics.render_telemetry(&mut body, &t.snapshot());
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

fn cards(st: &AppState) -> Vec<ModelCard> {
    // The local model, the embedding model, then the routed name and each upstream's name.
    let routed: Vec<String> = st.routing().map_or(Vec::new(), |r| {
        std::iter::once(r.cfg.auto_model.clone())
            .chain(r.upstreams.iter().map(|u| u.name().to_string()))
            .collect()
    });
    std::iter::once(&st.settings.model_id)
        .chain(st.settings.embedding_id.as_ref())
        .chain(routed.iter())
        .map(|id| ModelCard {
            id: id.clone(),
            object: "model",
            created: st.created,
            owned_by: "porteiro",
        })
        .collect()
}

async fn list_models(State(st): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: cards(&st),
    })
}

async fn get_model(
    State(st): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<ModelCard>, ApiError> {
    cards(&st)
        .into_iter()
        .find(|c| c.id == id)
        .map(Json)
        .ok_or_else(|| ApiError::model_not_found(&id))
}

/// A JSON body read within the size limit (413 beyond it) and parsed with the path of the first bad
/// field, so that a 400 can name the parameter.
pub struct OpenAiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for OpenAiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, st: &AppState) -> Result<Self, ApiError> {
        let limit = st.settings.max_body_bytes;
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(ApiError::too_large(limit));
        }
        let bytes = read_limited(req.into_body(), limit).await?;
        parse_json(&bytes).map(OpenAiJson)
    }
}

/// Like [`OpenAiJson`], also keeping the body as a JSON value (passed through to upstreams as sent).
pub struct OpenAiJsonRaw<T>(pub T, pub serde_json::Value);

impl<T: DeserializeOwned> FromRequest<AppState> for OpenAiJsonRaw<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, st: &AppState) -> Result<Self, ApiError> {
        let OpenAiJson(raw) = OpenAiJson::<serde_json::Value>::from_request(req, st).await?;
        let bytes = serde_json::to_vec(&raw)
            .map_err(|e| ApiError::malformed(format!("re-reading the body: {e}")))?;
        let typed = parse_json(&bytes)?;
        Ok(OpenAiJsonRaw(typed, raw))
    }
}

async fn read_limited(body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::malformed(format!("reading the body: {e}")))?;
        if buf.len() + chunk.len() > limit {
            return Err(ApiError::too_large(limit));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

/// Parses a request body; errors name the JSON path of the offending parameter.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, T>(de) {
        Ok(v) => Ok(v),
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            match inner.classify() {
                serde_json::error::Category::Data => {
                    let msg = inner.to_string();
                    // "missing field `model` at line 1 column 2": the path is the parent object.
                    let param = match msg.strip_prefix("missing field `") {
                        Some(rest) => {
                            let field = rest.split('`').next().unwrap_or("");
                            if path == "." {
                                field.to_string()
                            } else {
                                format!("{path}.{field}")
                            }
                        }
                        None => path,
                    };
                    let what = msg.split(" at line ").next().unwrap_or(&msg).to_string();
                    Err(ApiError::invalid(
                        param.clone(),
                        format!("Invalid parameter `{param}`: {what}."),
                    ))
                }
                _ => Err(ApiError::malformed(format!(
                    "We could not parse the JSON body of your request ({inner})."
                ))),
            }
        }
    }
}
