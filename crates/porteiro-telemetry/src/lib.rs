//! FinOps telemetry shared by the server (live metrics, dashboard) and the CLI (`porteiro report`):
//! the record of one request ([`RequestRecord`]), the KPIs computed from records ([`kpi`]), the SQLite
//! request log ([`log`]) and the self-contained report ([`report`]).

pub mod kpi;
pub mod log;
pub mod pg;
pub mod report;

use serde::{Deserialize, Serialize};

/// The local tier's name, defined once in the config crate.
pub use porteiro_config::LOCAL_TIER;

/// One request as the request log and the report see it. Texts are present only when the log is
/// configured to store them (sealed at rest) and the privacy policy allows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RequestRecord {
    pub id: String,
    pub ts_ms: i64,
    pub key_id: String,
    /// `chat` or `completions`.
    pub endpoint: String,
    /// `local` or an upstream's name: where the answer came from.
    pub tier: String,
    pub model: String,
    pub route: String,
    pub status: u16,
    pub error: Option<String>,
    pub stream: bool,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub latency_ms: f64,
    pub ttft_ms: Option<f64>,
    /// What this request cost (upstream token prices, or the local machine's time).
    pub cost_usd: f64,
    /// What it would have cost at the baseline upstream's token prices.
    pub baseline_usd: f64,
    /// What the privacy guard did (`none`, `mask`, `keep_local`, `block`, `allow`).
    pub privacy: String,
    /// Why the local tier took over, if it did.
    pub fallback: Option<String>,
    pub prompt: Option<String>,
    pub response: Option<String>,
    /// The flywheel's copy of an upstream answer (`[flywheel] collect`): a [`Sample`] as JSON.
    pub sample: Option<String>,
}

/// What the flywheel keeps of a request an upstream tier answered: everything a student model
/// needs to learn the answer (usage, route and latency are the record's own columns).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Sample {
    /// The chat request as the client sent it, without `model` and `stream`: `messages`, `tools`,
    /// `tool_choice`, `response_format`, sampling fields.
    pub request: serde_json::Value,
    /// The assistant message: `content` and/or `tool_calls` (arguments as the JSON text received).
    pub answer: serde_json::Value,
    /// `stop`, `length`, `tool_calls`, `content_filter`.
    pub finish_reason: Option<String>,
}

impl RequestRecord {
    pub fn is_error(&self) -> bool {
        self.status >= 400 || self.error.is_some()
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Token prices in USD per million tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Prices {
    pub input_per_m: f64,
    pub output_per_m: f64,
}

impl Prices {
    pub fn cost(&self, prompt_tokens: u64, completion_tokens: u64) -> f64 {
        (prompt_tokens as f64 * self.input_per_m + completion_tokens as f64 * self.output_per_m)
            / 1e6
    }
}
