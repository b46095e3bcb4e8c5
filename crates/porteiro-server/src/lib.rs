//! The OpenAI-compatible HTTP server. A chat or completion request reads top to bottom:
//!
//! `handlers` (validate the body) → `plan` (tier order, route, router decision, privacy verdict;
//! no HTTP) → `tier` (the local model or an upstream, behind one trait, answering in typed chunks)
//! → `answer` (fallback, local continuation, un-masking, observation: one order for every tier) →
//! `respond` (server-sent events or one JSON body).
//!
//! Around it: `state` (built once; only the model loads late), `http` (routes, middleware,
//! graceful shutdown, `/health`, `/metrics`, `/v1/models`), `auth` (API keys), `extract` (bodies
//! within the size limit, errors naming the parameter), `privacy` (the guard), `telemetry`
//! (traces, live KPIs, the request log), `metrics` (Prometheus counters), `embeddings`,
//! `dashboard`, `prompt` (a chat request as the model's prompt, shared with LoRA training),
//! `structured` (`response_format` / `tools` for the local tier), `adapters`
//! (LoRA adapters by name), `admin` (their endpoints), `learned` (the flywheel's routes as held: sampling, live agreement),
//! `flywheel` (reloading them, shadow and monitor comparisons, rollback), `error`.
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `POST /v1/embeddings`,
//! `GET /v1/models[/{id}]`, `GET /health`, `GET /metrics`, `GET /`, `GET /api/dashboard`,
//! `GET|POST /admin/adapters`, `DELETE /admin/adapters/{name}`.

pub mod adapters;
pub mod admin;
pub mod answer;
pub mod auth;
pub mod dashboard;
pub mod embeddings;
pub mod error;
pub mod extract;
pub mod flywheel;
pub mod handlers;
pub mod http;
pub mod learned;
pub mod metrics;
pub mod plan;
pub mod privacy;
pub mod prompt;
pub mod respond;
pub mod state;
pub mod structured;
pub mod telemetry;
pub mod tier;

pub use error::ApiError;
pub use extract::{parse_json, OpenAiJson, OpenAiJsonRaw};
pub use http::{app, serve};
pub use metrics::Metrics;
pub use plan::Routing;
pub use state::{load_generator, model_id, AppState, Embedder, Generator, Settings, StartError};
