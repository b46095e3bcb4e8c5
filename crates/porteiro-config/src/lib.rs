//! `porteiro.toml`: parsed into raw structs that reject unknown keys, then validated into [`Config`]
//! with messages that name the key and say what is allowed. Command-line flags override the file
//! ([`Overrides`]); `PORTEIRO_API_KEYS` (comma-separated) adds API keys without writing them to a file.
//!
//! ```toml
//! [server]
//! host = "127.0.0.1"
//! port = 8080
//! api_keys = []              # empty: no authentication
//! max_body_bytes = 4194304   # larger request bodies get 413
//! shutdown_grace_s = 10      # in-flight streams may finish for this long after SIGINT/SIGTERM
//! admin_key_env = "PORTEIRO_ADMIN_KEY"  # /admin needs `Authorization: Bearer <this key>`; unset: off
//!
//! [model]
//! name = "qwen2.5-0.5b"      # catalog alias or a .gguf path
//! threads = 0                # 0: all cores
//! nice = 10                  # the generating threads' niceness (0..19): routing decisions and
//!                            # embeddings preempt decoding on a busy machine (their p95 under load)
//! ctx = 4096                 # context window per sequence
//! default_max_tokens = 1024  # completion length when a request gives none
//!
//! [embeddings]
//! model = "minilm-l6"        # "" turns /v1/embeddings off
//!
//! [limits]
//! max_seqs = 16              # sequences decoded together
//! max_queue = 64             # requests waiting beyond that; more get 429
//! kv_cache_mib = 1024        # KV memory reserved across running sequences at most
//! prefill_chunk = 256        # prompt tokens per scheduler step
//!
//! [router]
//! auto_model = "auto"        # requests for this model are routed
//! local_min_score = 0.5      # stay local when the router's score reaches this (calibrated)
//! similarity_floor = 0.45    # a route matches only this close to one of its examples
//! mid_stream = "continue"    # upstream stream broken mid-way: "continue" locally or "error"
//!
//! [[upstreams]]              # cheapest first; any OpenAI-compatible endpoint
//! name = "big"
//! base_url = "http://127.0.0.1:8081/v1"
//! model = "qwen2.5-1.5b"
//! api_key_env = "BIG_API_KEY"    # the key is read from this variable, never from the file
//! price_in_per_m = 0.15      # USD per 1M prompt tokens
//! price_out_per_m = 0.60     # USD per 1M completion tokens
//! timeout_s = 60             # whole request
//! connect_timeout_s = 3
//! retries = 2                # on 429/5xx/connect errors, never after tokens reached the client
//! breaker_failures = 5       # consecutive failures that open the circuit
//! breaker_cooldown_s = 30    # open circuit: requests skip this upstream this long
//! min_score = 0.0            # routed here when the score reaches this (the last tier catches all)
//! privacy = "mask"           # this tier's policy for requests holding personal data (default: [privacy].policy)
//!
//! [[adapters]]               # LoRA adapters of the model (llama.cpp GGUF); also `serve --lora NAME=PATH`
//! name = "tickets"           # requests with `model: "tickets"` use it
//! path = "tickets.gguf"
//! model = "qwen2.5-0.5b"     # the base it was trained on (default: the served model)
//! scale = 1.0
//!
//! [[routes]]                 # rules by example: the nearest route above the floor wins
//! name = "extract"
//! tier = "local"             # "local" or an upstream's name
//! examples = ["extract the fields from this text", "format this as JSON"]
//! privacy = "keep_local"     # wins over the tier's and the default policy
//!
//! [privacy]                  # what leaves the machine when a request holds PII / PHI / secrets
//! policy = "keep_local"      # keep_local | mask | block | allow (secrets leave only under allow)
//! audit_db = "porteiro-audit.db"   # hash-chained audit trail; "" turns it off
//! audit_key_env = "PORTEIRO_AUDIT_KEY"  # if set, the chain is an HMAC under this key
//! names = "names"            # first-name list for person detection (catalog alias, path, or "")
//! unknown_names = true       # a capitalised word that is no English/Portuguese word is a name
//! quasi_identifiers = false  # also dates, ages, web addresses, places, groups, employers, job titles
//!
//! [telemetry]
//! machine_price_per_hour = 0.10   # USD; local requests cost their share of the engine's busy time
//! baseline = "big"           # upstream whose token prices price the all-upstream counterfactual
//!                            # (default: the most expensive upstream; with none, the prices below)
//! baseline_price_in_per_m = 2.50
//! baseline_price_out_per_m = 10.00
//!
//! [log]                      # the request log (SQLite, WAL, written off the request path)
//! path = "requests.db"       # default $PORTEIRO_HOME/requests.db; "" turns it off
//! queue = 10000              # records waiting for the writer; beyond this they are dropped (counted)
//! retention_days = 30        # older rows are purged
//! store_text = false         # also keep prompts/answers, AES-256-GCM sealed with the key in key_env
//! key_env = "PORTEIRO_LOG_KEY"
//! postgres_env = "PORTEIRO_POSTGRES"  # if set: write to PostgreSQL instead (the variable holds the
//!                            # connection string, e.g. "host=db user=porteiro dbname=porteiro password=…")
//!
//! [flywheel]                 # learning the upstream tiers' traffic (`porteiro flywheel`)
//! collect = false            # keep each upstream-answered request with its answer in the request
//!                            # log, sealed with the log's key (needs the log and its key)
//! routes = "flywheel/routes.json"  # the learned routes `porteiro flywheel promote` writes; the
//!                            # server reloads it when it changes (default $PORTEIRO_HOME/flywheel/routes.json)
//! similarity_floor = 0.8     # a learned route matches only this close to one of its examples
//! shadow_sample = 0.25       # share of a shadow cluster's requests the candidate also answers
//! monitor_sample = 0.05      # share of a promoted cluster's requests the teacher also answers
//! threshold = 0.95           # live agreement a shadow route needs to be promoted, and below
//!                            # which a promoted one is rolled back
//! min_live = 20              # comparisons before live agreement decides
//! window = 50                # the last comparisons live agreement counts
//! schedule = "24h"           # `serve` runs the whole loop (`porteiro flywheel run --promote`) this
//!                            # often; unset: never
//! ```

use std::path::Path;

use serde::Deserialize;

pub const DEFAULT_HOST: &str = "127.0.0.1";
pub const DEFAULT_PORT: u16 = 8080;
pub const DEFAULT_EMBEDDING_MODEL: &str = "minilm-l6";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {why}")]
    Read { path: String, why: String },
    #[error("{path}: {why}")]
    Parse { path: String, why: String },
    #[error("invalid configuration: `{key}` {why}")]
    Invalid { key: &'static str, why: String },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: Option<RawServer>,
    model: Option<RawModel>,
    embeddings: Option<RawEmbeddings>,
    limits: Option<RawLimits>,
    router: Option<RawRouter>,
    #[serde(default)]
    upstreams: Vec<RawUpstream>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    #[serde(default)]
    adapters: Vec<RawAdapter>,
    privacy: Option<RawPrivacy>,
    telemetry: Option<RawTelemetry>,
    log: Option<RawLog>,
    flywheel: Option<RawFlywheel>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdapter {
    name: String,
    path: String,
    model: Option<String>,
    scale: Option<f64>,
}

/// A LoRA adapter the server loads at start.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    /// The model name requests use for it.
    pub name: String,
    pub path: String,
    /// Multiplies the adapter's delta (llama.cpp's `--lora-scaled`).
    pub scale: f32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTelemetry {
    machine_price_per_hour: Option<f64>,
    baseline: Option<String>,
    baseline_price_in_per_m: Option<f64>,
    baseline_price_out_per_m: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    path: Option<String>,
    queue: Option<usize>,
    retention_days: Option<f64>,
    store_text: Option<bool>,
    key_env: Option<String>,
    postgres_env: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlywheel {
    collect: Option<bool>,
    routes: Option<String>,
    similarity_floor: Option<f64>,
    shadow_sample: Option<f64>,
    monitor_sample: Option<f64>,
    threshold: Option<f64>,
    min_live: Option<usize>,
    window: Option<usize>,
    schedule: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrivacy {
    policy: Option<String>,
    audit_db: Option<String>,
    audit_key_env: Option<String>,
    names: Option<String>,
    unknown_names: Option<bool>,
    quasi_identifiers: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouter {
    auto_model: Option<String>,
    local_min_score: Option<f64>,
    similarity_floor: Option<f64>,
    mid_stream: Option<String>,
    scorer: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    name: String,
    base_url: String,
    model: String,
    api_key_env: Option<String>,
    price_in_per_m: Option<f64>,
    price_out_per_m: Option<f64>,
    timeout_s: Option<u64>,
    connect_timeout_s: Option<u64>,
    retries: Option<u32>,
    breaker_failures: Option<u32>,
    breaker_cooldown_s: Option<u64>,
    min_score: Option<f64>,
    privacy: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: String,
    tier: String,
    examples: Vec<String>,
    privacy: Option<String>,
}

/// The name of the local tier in routes and headers.
pub const LOCAL_TIER: &str = "local";

/// What happens when an upstream stream breaks after tokens reached the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MidStream {
    /// The local model continues the answer from what was already streamed.
    Continue,
    /// The stream ends with an error event (never a silently truncated answer).
    Error,
}

/// An OpenAI-compatible endpoint the router may escalate to.
#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    pub name: String,
    /// Base URL up to and including `/v1`.
    pub base_url: String,
    /// Model name sent upstream; clients may also ask for it by this name.
    pub model: String,
    /// Environment variable holding the API key (read at start).
    pub api_key_env: Option<String>,
    pub price_in_per_m: f64,
    pub price_out_per_m: f64,
    pub timeout_s: u64,
    pub connect_timeout_s: u64,
    pub retries: u32,
    pub breaker_failures: u32,
    pub breaker_cooldown_s: u64,
    /// Requests whose router score reaches this go here (tiers are tried cheapest first).
    pub min_score: f64,
    /// Privacy policy for this tier; None: `[privacy].policy`.
    pub privacy: Option<String>,
}

/// A named route: example utterances and the tier that serves them.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub name: String,
    pub tier: String,
    pub examples: Vec<String>,
    /// Privacy policy for requests on this route; wins over the tier's.
    pub privacy: Option<String>,
}

/// `[telemetry]`: how requests are priced.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryConfig {
    /// USD per hour of the machine running the local tier.
    pub machine_price_per_hour: f64,
    /// Upstream whose prices price the all-upstream baseline; None: the most expensive one.
    pub baseline: Option<String>,
    /// Baseline prices (USD per 1M tokens) when no upstream is configured.
    pub baseline_price_in_per_m: f64,
    pub baseline_price_out_per_m: f64,
}

/// `[log]`: the request log.
#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    /// SQLite file; None: default location ($PORTEIRO_HOME/requests.db); Some("") is off.
    pub path: Option<String>,
    pub queue: usize,
    pub retention_days: f64,
    pub store_text: bool,
    pub key_env: String,
    /// Env var holding a PostgreSQL connection string; the log goes there instead of SQLite.
    pub postgres_env: Option<String>,
}

/// `[flywheel]`: learning from the upstream tiers' answers.
#[derive(Debug, Clone, PartialEq)]
pub struct FlywheelConfig {
    /// Keep every request an upstream tier answered, with its answer, in the request log (sealed
    /// with the log's key) for `porteiro flywheel`.
    pub collect: bool,
    /// The learned routes file (None: `$PORTEIRO_HOME/flywheel/routes.json`, the binary's default).
    pub routes: Option<String>,
    pub similarity_floor: f64,
    pub shadow_sample: f64,
    pub monitor_sample: f64,
    pub threshold: f64,
    pub min_live: usize,
    pub window: usize,
    /// How often `serve` runs the loop (a period such as "24h"; parsed by the binary).
    pub schedule: Option<String>,
}

impl Default for FlywheelConfig {
    fn default() -> Self {
        Self {
            collect: false,
            routes: None,
            similarity_floor: 0.8,
            shadow_sample: 0.25,
            monitor_sample: 0.05,
            threshold: 0.95,
            min_live: 20,
            window: 50,
            schedule: None,
        }
    }
}

/// The privacy policies `[privacy]`, `[[upstreams]]` and `[[routes]]` accept.
pub const PRIVACY_POLICIES: [&str; 4] = ["keep_local", "mask", "block", "allow"];

/// `[privacy]`: what happens to requests holding personal data before they leave the machine.
#[derive(Debug, Clone, PartialEq)]
pub struct PrivacyConfig {
    /// Default policy of upstream tiers.
    pub policy: String,
    /// The audit trail's SQLite file; None: no audit trail.
    pub audit_db: Option<String>,
    pub audit_key_env: String,
    /// First-name list (catalog alias or path); None: context rules only.
    pub names: Option<String>,
    /// Whether capitalised words that are no English or Portuguese word count as names (`NAME`).
    pub unknown_names: bool,
    /// Whether dates, ages, web addresses, places, groups, organisations and job titles count too
    /// (`porteiro_privacy::quasi`, `porteiro_privacy::affiliation`).
    pub quasi_identifiers: bool,
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        Self {
            policy: "keep_local".into(),
            audit_db: None,
            audit_key_env: "PORTEIRO_AUDIT_KEY".into(),
            names: Some("names".into()),
            unknown_names: true,
            quasi_identifiers: false,
        }
    }
}

fn policy(key: &'static str, v: Option<String>) -> Result<Option<String>, ConfigError> {
    match v {
        None => Ok(None),
        Some(p) if PRIVACY_POLICIES.contains(&p.as_str()) => Ok(Some(p)),
        Some(p) => Err(ConfigError::Invalid {
            key,
            why: format!("is `{p}`; use one of {}", PRIVACY_POLICIES.join(", ")),
        }),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouterConfig {
    pub auto_model: String,
    pub local_min_score: f64,
    pub similarity_floor: f64,
    pub mid_stream: MidStream,
    /// A learned difficulty scorer (`porteiro router train`), if any.
    pub scorer: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    host: Option<String>,
    port: Option<u16>,
    api_keys: Option<Vec<String>>,
    max_body_bytes: Option<u64>,
    shutdown_grace_s: Option<u64>,
    admin_key_env: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: Option<String>,
    threads: Option<usize>,
    nice: Option<i32>,
    ctx: Option<usize>,
    default_max_tokens: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEmbeddings {
    model: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_seqs: Option<usize>,
    max_queue: Option<usize>,
    kv_cache_mib: Option<u64>,
    prefill_chunk: Option<usize>,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub host: String,
    pub port: u16,
    pub api_keys: Vec<String>,
    pub max_body_bytes: usize,
    pub shutdown_grace_s: u64,
    /// The variable holding the key of the admin endpoints (adapters); they are off without it.
    pub admin_key_env: String,
    /// LoRA adapters of the generative model, loaded at start (the file's, then `--lora`'s).
    pub adapters: Vec<AdapterConfig>,
    /// How many of `adapters` came from `--lora` (their paths are not the config's to resolve).
    lora_count: usize,
    /// Catalog alias or path of the generative model.
    pub model: String,
    /// Worker threads; 0 means all cores.
    pub threads: usize,
    /// The generating threads' niceness (0..=19, lower priority than the request handlers').
    pub nice: i32,
    /// Context window per sequence; None means min(model's training context, 4096).
    pub ctx: Option<usize>,
    pub default_max_tokens: usize,
    /// The embedding model, if /v1/embeddings is on.
    pub embedding_model: Option<String>,
    pub max_seqs: usize,
    pub max_queue: usize,
    pub kv_cache_bytes: u64,
    pub prefill_chunk: usize,
    pub router: RouterConfig,
    /// Upstream tiers, cheapest first.
    pub upstreams: Vec<Upstream>,
    pub routes: Vec<Route>,
    pub privacy: PrivacyConfig,
    pub telemetry: TelemetryConfig,
    pub log: LogConfig,
    pub flywheel: FlywheelConfig,
}

/// Values from the command line; they win over the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub model: Option<String>,
    pub threads: Option<usize>,
    pub ctx: Option<usize>,
    /// `--lora NAME=PATH`, added to the file's `[[adapters]]`.
    pub lora: Vec<(String, String)>,
}

impl Config {
    /// Reads and validates a TOML file, applying `overrides` and `PORTEIRO_API_KEYS`.
    pub fn load(
        path: Option<&Path>,
        overrides: &Overrides,
        default_model: &str,
    ) -> Result<Self, ConfigError> {
        let (text, name) = match path {
            Some(p) => (
                std::fs::read_to_string(p).map_err(|e| ConfigError::Read {
                    path: p.display().to_string(),
                    why: e.to_string(),
                })?,
                p.display().to_string(),
            ),
            None => (String::new(), "(defaults)".to_string()),
        };
        let env_keys = std::env::var("PORTEIRO_API_KEYS").ok();
        let mut cfg = Self::from_toml(&text, &name, overrides, default_model, env_keys.as_deref())?;
        if let Some(dir) = path.and_then(Path::parent) {
            cfg.resolve_paths(dir);
        }
        Ok(cfg)
    }

    /// Makes the file paths a config names (scorer, request log, audit trail) relative to the
    /// config's own folder, so a config works from any working directory.
    fn resolve_paths(&mut self, dir: &Path) {
        let resolve = |p: &mut String| {
            if !p.is_empty() && Path::new(p.as_str()).is_relative() {
                *p = dir.join(&*p).display().to_string();
            }
        };
        [
            self.router.scorer.as_mut(),
            self.log.path.as_mut(),
            self.privacy.audit_db.as_mut(),
        ]
        .into_iter()
        .flatten()
        .for_each(resolve);
        // Adapters from the file (those from --lora are relative to the working directory and
        // were resolved already).
        let from_file = self.adapters.len() - self.lora_count;
        self.adapters[..from_file]
            .iter_mut()
            .for_each(|a| resolve(&mut a.path));
    }

    /// Parses and validates TOML text (`name` is used in messages).
    pub fn from_toml(
        text: &str,
        name: &str,
        o: &Overrides,
        default_model: &str,
        env_api_keys: Option<&str>,
    ) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: name.to_string(),
            why: e.to_string().trim_end().to_string(),
        })?;
        let s = raw.server.unwrap_or_default();
        let m = raw.model.unwrap_or_default();
        let e = raw.embeddings.unwrap_or_default();
        let l = raw.limits.unwrap_or_default();
        let invalid = |key, why: &str| ConfigError::Invalid {
            key,
            why: why.to_string(),
        };

        let host = o
            .host
            .clone()
            .or(s.host)
            .unwrap_or_else(|| DEFAULT_HOST.into());
        if host.trim().is_empty() {
            return Err(invalid(
                "server.host",
                "is empty; use e.g. \"127.0.0.1\" or \"0.0.0.0\"",
            ));
        }
        let port = o.port.or(s.port).unwrap_or(DEFAULT_PORT);
        let mut api_keys = s.api_keys.unwrap_or_default();
        if let Some(env) = env_api_keys {
            api_keys.extend(
                env.split(',')
                    .map(str::trim)
                    .filter(|k| !k.is_empty())
                    .map(String::from),
            );
        }
        if api_keys
            .iter()
            .any(|k| k.trim().is_empty() || k.chars().any(char::is_whitespace))
        {
            return Err(invalid(
                "server.api_keys",
                "holds an empty key or a key with spaces",
            ));
        }
        let max_body_bytes = s.max_body_bytes.unwrap_or(4 << 20);
        if !(1024..=1 << 30).contains(&max_body_bytes) {
            return Err(invalid(
                "server.max_body_bytes",
                "must be between 1024 and 1073741824",
            ));
        }
        let shutdown_grace_s = s.shutdown_grace_s.unwrap_or(10);
        if shutdown_grace_s > 3600 {
            return Err(invalid(
                "server.shutdown_grace_s",
                "must be at most 3600 seconds",
            ));
        }

        let model = o
            .model
            .clone()
            .or(m.name)
            .unwrap_or_else(|| default_model.into());
        if model.trim().is_empty() {
            return Err(invalid(
                "model.name",
                "is empty; give a catalog alias (see `porteiro models --catalog`) or a .gguf path",
            ));
        }
        let threads = o.threads.or(m.threads).unwrap_or(0);
        if threads > 1024 {
            return Err(invalid(
                "model.threads",
                "must be at most 1024 (0 = all cores)",
            ));
        }
        let nice = m.nice.unwrap_or(10);
        if !(0..=19).contains(&nice) {
            return Err(invalid(
                "model.nice",
                "must be 0..19 (0: the same priority as the rest of the server)",
            ));
        }
        let ctx = o.ctx.or(m.ctx);
        if ctx.is_some_and(|c| c < 16) {
            return Err(invalid("model.ctx", "must be at least 16 tokens"));
        }
        let default_max_tokens = m.default_max_tokens.unwrap_or(1024);
        if default_max_tokens == 0 {
            return Err(invalid("model.default_max_tokens", "must be at least 1"));
        }
        let embedding_model = match e.model {
            None => Some(DEFAULT_EMBEDDING_MODEL.to_string()),
            Some(s) if s.trim().is_empty() => None,
            Some(s) => Some(s),
        };

        let max_seqs = l.max_seqs.unwrap_or(16);
        if !(1..=1024).contains(&max_seqs) {
            return Err(invalid("limits.max_seqs", "must be between 1 and 1024"));
        }
        let max_queue = l.max_queue.unwrap_or(64);
        if max_queue > 100_000 {
            return Err(invalid("limits.max_queue", "must be at most 100000"));
        }
        let kv_cache_mib = l.kv_cache_mib.unwrap_or(1024);
        if !(1..=1 << 20).contains(&kv_cache_mib) {
            return Err(invalid(
                "limits.kv_cache_mib",
                "must be between 1 and 1048576",
            ));
        }
        let prefill_chunk = l.prefill_chunk.unwrap_or(256);
        if !(1..=8192).contains(&prefill_chunk) {
            return Err(invalid(
                "limits.prefill_chunk",
                "must be between 1 and 8192",
            ));
        }
        let (router, upstreams, routes) =
            validate_routing(raw.router.unwrap_or_default(), raw.upstreams, raw.routes)?;
        let p = raw.privacy.unwrap_or_default();
        let d = PrivacyConfig::default();
        let privacy = PrivacyConfig {
            policy: policy("privacy.policy", p.policy)?.unwrap_or(d.policy),
            audit_db: p.audit_db.filter(|s| !s.trim().is_empty()),
            audit_key_env: p
                .audit_key_env
                .filter(|s| !s.is_empty())
                .unwrap_or(d.audit_key_env),
            names: match p.names {
                Some(n) if n.trim().is_empty() => None,
                Some(n) => Some(n),
                None => d.names,
            },
            unknown_names: p.unknown_names.unwrap_or(d.unknown_names),
            quasi_identifiers: p.quasi_identifiers.unwrap_or(d.quasi_identifiers),
        };
        let t = raw.telemetry.unwrap_or_default();
        let nonneg = |key: &'static str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(v)
            } else {
                Err(ConfigError::Invalid {
                    key,
                    why: format!("must be a number >= 0 (got {v})"),
                })
            }
        };
        if let Some(b) = &t.baseline {
            if !upstreams.iter().any(|u| &u.name == b) {
                return Err(ConfigError::Invalid {
                    key: "telemetry.baseline",
                    why: format!("`{b}` is not a configured upstream"),
                });
            }
        }
        let telemetry = TelemetryConfig {
            machine_price_per_hour: nonneg(
                "telemetry.machine_price_per_hour",
                t.machine_price_per_hour.unwrap_or(0.10),
            )?,
            baseline: t.baseline,
            baseline_price_in_per_m: nonneg(
                "telemetry.baseline_price_in_per_m",
                t.baseline_price_in_per_m.unwrap_or(2.50),
            )?,
            baseline_price_out_per_m: nonneg(
                "telemetry.baseline_price_out_per_m",
                t.baseline_price_out_per_m.unwrap_or(10.00),
            )?,
        };
        let lg = raw.log.unwrap_or_default();
        let queue = lg.queue.unwrap_or(10_000);
        if !(1..=10_000_000).contains(&queue) {
            return Err(ConfigError::Invalid {
                key: "log.queue",
                why: "must be between 1 and 10000000".into(),
            });
        }
        let log = LogConfig {
            path: lg.path,
            queue,
            retention_days: nonneg("log.retention_days", lg.retention_days.unwrap_or(30.0))?,
            store_text: lg.store_text.unwrap_or(false),
            key_env: lg
                .key_env
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "PORTEIRO_LOG_KEY".into()),
            postgres_env: lg.postgres_env.filter(|s| !s.is_empty()),
        };
        let flywheel = flywheel_config(raw.flywheel.unwrap_or_default())?;
        if flywheel.collect && log.path.as_deref() == Some("") {
            return Err(ConfigError::Invalid {
                key: "flywheel.collect",
                why: "keeps its samples in the request log, which `[log] path = \"\"` turns off"
                    .into(),
            });
        }
        let mut adapters = Vec::new();
        let file_adapters = raw
            .adapters
            .into_iter()
            .map(|a| (a.name, a.path, a.model, a.scale));
        let flag_adapters = o
            .lora
            .iter()
            .map(|(n, p)| (n.clone(), p.clone(), None, None));
        let lora_count = o.lora.len();
        for (name, path, base, scale) in file_adapters.chain(flag_adapters) {
            let bad = |why: String| ConfigError::Invalid {
                key: "adapters",
                why,
            };
            if name.trim().is_empty() || name.chars().any(char::is_whitespace) {
                return Err(bad(format!(
                    "name `{name}` must be non-empty, without spaces"
                )));
            }
            if name == model
                || name == router.auto_model
                || upstreams.iter().any(|u| u.name == name || u.model == name)
                || adapters.iter().any(|a: &AdapterConfig| a.name == name)
            {
                return Err(bad(format!(
                    "name `{name}` is already the name of the model, the auto model, an upstream or another adapter"
                )));
            }
            if path.trim().is_empty() {
                return Err(bad(format!("`{name}` has an empty path")));
            }
            if let Some(b) = base.filter(|b| *b != model) {
                return Err(bad(format!(
                    "`{name}` is an adapter of `{b}`, but the server runs `{model}`"
                )));
            }
            let scale = scale.unwrap_or(1.0);
            if !scale.is_finite() {
                return Err(bad(format!("`{name}`: scale must be a finite number")));
            }
            adapters.push(AdapterConfig {
                name,
                path,
                scale: scale as f32,
            });
        }
        let admin_key_env = s
            .admin_key_env
            .unwrap_or_else(|| "PORTEIRO_ADMIN_KEY".to_string());
        Ok(Config {
            admin_key_env,
            adapters,
            lora_count,
            telemetry,
            log,
            flywheel,
            privacy,
            router,
            upstreams,
            routes,
            host,
            port,
            api_keys,
            max_body_bytes: max_body_bytes as usize,
            shutdown_grace_s,
            model,
            threads,
            nice,
            ctx,
            default_max_tokens,
            embedding_model,
            max_seqs,
            max_queue,
            kv_cache_bytes: kv_cache_mib << 20,
            prefill_chunk,
        })
    }
}

fn flywheel_config(f: RawFlywheel) -> Result<FlywheelConfig, ConfigError> {
    let d = FlywheelConfig::default();
    let invalid = |key, why: String| ConfigError::Invalid { key, why };
    let unit = |key, v: Option<f64>, default: f64| match v {
        None => Ok(default),
        Some(v) if (0.0..=1.0).contains(&v) => Ok(v),
        Some(v) => Err(invalid(key, format!("must be between 0 and 1 (got {v})"))),
    };
    let count = |key, v: Option<usize>, default: usize| match v {
        Some(0) => Err(invalid(key, "must be at least 1".into())),
        v => Ok(v.unwrap_or(default)),
    };
    Ok(FlywheelConfig {
        collect: f.collect.unwrap_or(false),
        routes: f.routes.filter(|s| !s.is_empty()),
        similarity_floor: unit(
            "flywheel.similarity_floor",
            f.similarity_floor,
            d.similarity_floor,
        )?,
        shadow_sample: unit("flywheel.shadow_sample", f.shadow_sample, d.shadow_sample)?,
        monitor_sample: unit(
            "flywheel.monitor_sample",
            f.monitor_sample,
            d.monitor_sample,
        )?,
        threshold: unit("flywheel.threshold", f.threshold, d.threshold)?,
        min_live: count("flywheel.min_live", f.min_live, d.min_live)?,
        window: count("flywheel.window", f.window, d.window)?,
        schedule: f.schedule.filter(|s| !s.trim().is_empty()),
    })
}

fn validate_routing(
    r: RawRouter,
    ups: Vec<RawUpstream>,
    routes: Vec<RawRoute>,
) -> Result<(RouterConfig, Vec<Upstream>, Vec<Route>), ConfigError> {
    let invalid = |key, why: String| ConfigError::Invalid { key, why };
    let unit = |key, v: f64| {
        if (0.0..=1.0).contains(&v) {
            Ok(v)
        } else {
            Err(invalid(key, format!("must be between 0 and 1 (got {v})")))
        }
    };
    let auto_model = r.auto_model.unwrap_or_else(|| "auto".into());
    if auto_model.trim().is_empty() {
        return Err(invalid("router.auto_model", "is empty".into()));
    }
    let mid_stream = match r.mid_stream.as_deref().unwrap_or("continue") {
        "continue" => MidStream::Continue,
        "error" => MidStream::Error,
        other => {
            return Err(invalid(
                "router.mid_stream",
                format!("is `{other}`; use \"continue\" or \"error\""),
            ))
        }
    };
    let router = RouterConfig {
        auto_model,
        local_min_score: unit("router.local_min_score", r.local_min_score.unwrap_or(0.5))?,
        similarity_floor: unit(
            "router.similarity_floor",
            r.similarity_floor.unwrap_or(0.45),
        )?,
        mid_stream,
        scorer: r.scorer.filter(|s| !s.trim().is_empty()),
    };
    let mut upstreams: Vec<Upstream> = Vec::new();
    for u in ups {
        let name = u.name.trim().to_string();
        if name.is_empty() || name == LOCAL_TIER {
            return Err(invalid(
                "upstreams.name",
                format!("`{name}` is empty or reserved for the local tier"),
            ));
        }
        if upstreams.iter().any(|x| x.name == name) {
            return Err(invalid("upstreams.name", format!("`{name}` appears twice")));
        }
        if !(u.base_url.starts_with("http://") || u.base_url.starts_with("https://")) {
            return Err(invalid(
                "upstreams.base_url",
                format!("`{}` must start with http:// or https://", u.base_url),
            ));
        }
        let price = |key, v: Option<f64>| match v.unwrap_or(0.0) {
            p if p.is_finite() && p >= 0.0 => Ok(p),
            p => Err(invalid(key, format!("must be a price >= 0 (got {p})"))),
        };
        let timeout_s = u.timeout_s.unwrap_or(60);
        if !(1..=3600).contains(&timeout_s) {
            return Err(invalid(
                "upstreams.timeout_s",
                "must be between 1 and 3600".into(),
            ));
        }
        let retries = u.retries.unwrap_or(2);
        if retries > 10 {
            return Err(invalid("upstreams.retries", "must be at most 10".into()));
        }
        upstreams.push(Upstream {
            base_url: u.base_url.trim_end_matches('/').to_string(),
            model: u.model,
            api_key_env: u.api_key_env.filter(|s| !s.is_empty()),
            price_in_per_m: price("upstreams.price_in_per_m", u.price_in_per_m)?,
            price_out_per_m: price("upstreams.price_out_per_m", u.price_out_per_m)?,
            timeout_s,
            connect_timeout_s: u.connect_timeout_s.unwrap_or(3).clamp(1, timeout_s),
            retries,
            breaker_failures: u.breaker_failures.unwrap_or(5).max(1),
            breaker_cooldown_s: u.breaker_cooldown_s.unwrap_or(30),
            min_score: unit("upstreams.min_score", u.min_score.unwrap_or(0.0))?,
            privacy: policy("upstreams.privacy", u.privacy)?,
            name,
        });
    }
    let mut out_routes: Vec<Route> = Vec::new();
    for rt in routes {
        if rt.tier != LOCAL_TIER && !upstreams.iter().any(|u| u.name == rt.tier) {
            let known: Vec<&str> = std::iter::once(LOCAL_TIER)
                .chain(upstreams.iter().map(|u| u.name.as_str()))
                .collect();
            return Err(invalid(
                "routes.tier",
                format!(
                    "route `{}` names tier `{}`, which is not configured (tiers: {})",
                    rt.name,
                    rt.tier,
                    known.join(", ")
                ),
            ));
        }
        if rt.examples.iter().all(|e| e.trim().is_empty()) {
            return Err(invalid(
                "routes.examples",
                format!("route `{}` needs at least one example", rt.name),
            ));
        }
        if out_routes.iter().any(|x| x.name == rt.name) {
            return Err(invalid(
                "routes.name",
                format!("`{}` appears twice", rt.name),
            ));
        }
        out_routes.push(Route {
            name: rt.name,
            tier: rt.tier,
            examples: rt.examples,
            privacy: policy("routes.privacy", rt.privacy)?,
        });
    }
    Ok((router, upstreams, out_routes))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(
            text,
            "porteiro.toml",
            &Overrides::default(),
            "qwen2.5-0.5b",
            None,
        )
    }

    /// File paths in a config are taken relative to the config's folder; absolute paths, an empty
    /// log path (log off) and names that are not paths stay as written.
    #[test]
    fn relative_paths_resolve_against_the_config_folder() {
        let dir = std::env::temp_dir().join(format!("porteiro-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("porteiro.toml");
        let text = "[router]\nscorer = \"scorer.json\"\n[log]\npath = \"\"\n\
                    [privacy]\naudit_db = \"/var/audit.db\"\n";
        std::fs::write(&file, text).unwrap();
        let cfg = Config::load(Some(&file), &Overrides::default(), "qwen2.5-0.5b").unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let scorer = dir.join("scorer.json").display().to_string();
        assert_eq!(cfg.router.scorer.as_deref(), Some(scorer.as_str()));
        assert_eq!(cfg.log.path.as_deref(), Some(""));
        assert_eq!(cfg.privacy.audit_db.as_deref(), Some("/var/audit.db"));
        assert_eq!(cfg.privacy.names.as_deref(), Some("names"));
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = parse("").unwrap();
        assert_eq!((c.host.as_str(), c.port), ("127.0.0.1", 8080));
        assert_eq!(c.model, "qwen2.5-0.5b");
        assert_eq!(c.embedding_model.as_deref(), Some("minilm-l6"));
        assert!(c.api_keys.is_empty());
        assert!(c.privacy.unknown_names);
        assert!(
            !parse("[privacy]\nunknown_names = false\n")
                .unwrap()
                .privacy
                .unknown_names
        );
        assert!(!c.privacy.quasi_identifiers);
        assert!(
            parse("[privacy]\nquasi_identifiers = true\n")
                .unwrap()
                .privacy
                .quasi_identifiers
        );
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name_and_the_allowed_ones() {
        let e = parse("[server]\nprot = 9000\n").unwrap_err().to_string();
        assert!(
            e.contains("porteiro.toml") && e.contains("unknown field `prot`"),
            "{e}"
        );
        assert!(e.contains("`port`"), "{e}");
        let e = parse("[limit]\nmax_seqs = 2\n").unwrap_err().to_string();
        assert!(e.contains("unknown field `limit`"), "{e}");
    }

    #[test]
    fn invalid_values_name_the_key() {
        let e = parse("[limits]\nmax_seqs = 0\n").unwrap_err().to_string();
        assert!(
            e.contains("limits.max_seqs") && e.contains("between 1 and 1024"),
            "{e}"
        );
        let e = parse("[server]\nport = \"http\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("port"), "{e}");
        let e = parse("[flywheel]\nthreshold = 1.5\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("flywheel.threshold"), "{e}");
        let e = parse("[flywheel]\nmin_live = 0\n").unwrap_err().to_string();
        assert!(e.contains("flywheel.min_live"), "{e}");
        let c = parse("[flywheel]\nshadow_sample = 1.0\nroutes = \"r.json\"\n").unwrap();
        assert_eq!(c.flywheel.shadow_sample, 1.0);
        assert_eq!(c.flywheel.routes.as_deref(), Some("r.json"));
        assert_eq!(c.flywheel.threshold, 0.95);
    }

    #[test]
    fn flags_override_the_file_and_env_adds_keys() {
        let o = Overrides {
            port: Some(9001),
            model: Some("smollm2-135m".into()),
            ..Default::default()
        };
        let c = Config::from_toml(
            "[server]\nport = 9000\napi_keys = [\"a\"]\n[embeddings]\nmodel = \"\"\n",
            "f",
            &o,
            "qwen2.5-0.5b",
            Some("b, c"),
        )
        .unwrap();
        assert_eq!(c.port, 9001);
        assert_eq!(c.model, "smollm2-135m");
        assert_eq!(c.api_keys, vec!["a", "b", "c"]);
        assert_eq!(c.embedding_model, None);
    }

    #[test]
    fn tiers_and_routes_are_validated() {
        let c = parse(
            "[[upstreams]]\nname = \"big\"\nbase_url = \"http://127.0.0.1:9/v1/\"\nmodel = \"m\"\nprice_in_per_m = 1.5\n\n[[routes]]\nname = \"json\"\ntier = \"local\"\nexamples = [\"format as JSON\"]\n",
        )
        .unwrap();
        assert_eq!(c.upstreams[0].base_url, "http://127.0.0.1:9/v1");
        assert_eq!(c.upstreams[0].price_in_per_m, 1.5);
        assert_eq!(c.routes[0].tier, "local");
        assert_eq!(c.router.auto_model, "auto");
        let e = parse("[[routes]]\nname = \"x\"\ntier = \"cloud\"\nexamples = [\"a\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tier `cloud`") && e.contains("tiers: local"),
            "{e}"
        );
        let e = parse("[[upstreams]]\nname = \"b\"\nbase_url = \"ftp://x\"\nmodel = \"m\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("http://"), "{e}");
        let e = parse("[router]\nmid_stream = \"drop\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("router.mid_stream"), "{e}");
    }
}
