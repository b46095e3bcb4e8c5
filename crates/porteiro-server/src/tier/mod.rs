//! Answer sources. A [`Tier`] takes a validated request and returns a stream of typed [`Chunk`]s, or
//! an error before the first chunk. The local model ([`local::LocalTier`]) and each upstream endpoint
//! ([`upstream::UpstreamTier`]) implement it; everything after (fallback, continuation, unmasking,
//! observation, encoding) works on chunks and never asks which tier made them.
//!
//! To add a field to every answer, add it to [`Chunk`] / [`ChoiceDelta`] and to the encoder in
//! `respond.rs`; to add a kind of tier, implement [`Tier`] and give `plan.rs` a way to pick it.

pub mod local;
pub mod upstream;

use std::pin::Pin;

use futures_util::future::BoxFuture;
use futures_util::Stream;
use porteiro_protocol::{
    ChatCompletionRequest, ChatLogprobs, CompletionLogprobs, CompletionRequest, FinishReason,
    ToolCallDelta, Usage,
};
use porteiro_upstream::UpstreamError;
use serde_json::{Map, Value};

use crate::ApiError;

/// Which OpenAI endpoint an answer is for (decides the chunk and response shapes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Chat,
    Completion,
}

impl Api {
    /// The `endpoint` label of metrics and the request log.
    pub fn endpoint(self) -> &'static str {
        match self {
            Api::Chat => "chat",
            Api::Completion => "completions",
        }
    }
}

/// The request as every tier receives it: typed and parsed; the upstream tier also gets the
/// client's body (after the privacy guard) so that fields Porteiro does not model pass through.
pub struct TierRequest {
    pub body: Body,
    /// The LoRA adapter the local model applies (the request named it); upstreams ignore it.
    pub adapter: Option<std::sync::Arc<porteiro_engine::lora::Adapter>>,
    /// The client's JSON body as it may leave the machine (masked when the guard masked it); the
    /// upstream tier takes it (one upstream per plan), so it is never copied.
    pub passthrough: std::sync::Mutex<Option<Value>>,
    pub stream: bool,
    /// Assistant text already sent to the client, which this tier continues (a broken upstream
    /// stream taken over by the local model). Plain text: no structured output on continuations.
    pub prefix: Option<String>,
}

pub enum Body {
    Chat(Box<ChatCompletionRequest>),
    Completion(Box<CompletionRequest>),
}

impl TierRequest {
    pub fn api(&self) -> Api {
        match self.body {
            Body::Chat(_) => Api::Chat,
            Body::Completion(_) => Api::Completion,
        }
    }
}

/// The id, model and creation time an upstream gave its answer (the local tier leaves them to the
/// encoder).
#[derive(Debug, Clone, PartialEq)]
pub struct Head {
    pub id: String,
    pub model: String,
    pub created: Option<u64>,
    pub system_fingerprint: Option<String>,
}

/// Log-probabilities in the layout of the endpoint they are for.
#[derive(Debug, Clone)]
pub enum Logprobs {
    Chat(ChatLogprobs),
    Completion(CompletionLogprobs),
    /// An upstream's, passed through as sent.
    Raw(Value),
}

/// One choice's piece of an answer.
#[derive(Debug, Clone, Default)]
pub struct ChoiceDelta {
    pub index: u32,
    pub role: Option<&'static str>,
    /// Chat content, or the text of a legacy completion.
    pub content: Option<String>,
    pub tool_calls: Option<Vec<ToolCallDelta>>,
    pub logprobs: Option<Logprobs>,
    pub finish_reason: Option<FinishReason>,
    /// Fields of an upstream's `delta` (or `message`) that Porteiro does not model.
    pub delta_extra: Map<String, Value>,
    /// Fields of an upstream's choice that Porteiro does not model.
    pub extra: Map<String, Value>,
}

impl ChoiceDelta {
    /// Whether this piece carries answer text or a tool call (a "token" for TTFT and traces).
    pub fn has_output(&self) -> bool {
        self.content.as_deref().is_some_and(|c| !c.is_empty())
            || self.tool_calls.as_ref().is_some_and(|t| !t.is_empty())
    }
}

/// A piece of an answer, from any tier.
#[derive(Debug, Clone, Default)]
pub struct Chunk {
    pub head: Option<Head>,
    pub choices: Vec<ChoiceDelta>,
    pub usage: Option<Usage>,
    /// Usage seen by observation but not sent (a local continuation's tokens: the client's usage
    /// would mix two models' token counts).
    pub usage_observed_only: bool,
    /// Top-level fields of an upstream chunk that Porteiro does not model.
    pub extra: Map<String, Value>,
}

impl Chunk {
    pub fn choice(delta: ChoiceDelta) -> Self {
        Self {
            choices: vec![delta],
            ..Default::default()
        }
    }

    pub fn usage(u: Usage) -> Self {
        Self {
            usage: Some(u),
            ..Default::default()
        }
    }
}

/// Why an answer failed.
#[derive(Debug)]
pub enum TierError {
    /// An upstream failed: another tier may take over (before the first chunk) or continue it.
    Upstream(UpstreamError),
    /// A failure no other tier can fix: the request is invalid for this tier, or the engine failed.
    Api(ApiError),
}

impl From<ApiError> for TierError {
    fn from(e: ApiError) -> Self {
        TierError::Api(e)
    }
}

impl From<UpstreamError> for TierError {
    fn from(e: UpstreamError) -> Self {
        TierError::Upstream(e)
    }
}

impl TierError {
    pub fn message(&self) -> String {
        match self {
            TierError::Upstream(e) => e.to_string(),
            TierError::Api(e) => e.message.clone(),
        }
    }

    /// The error the client sees.
    pub fn into_api(self) -> ApiError {
        match self {
            TierError::Upstream(e) => ApiError::bad_gateway(e.to_string()),
            TierError::Api(e) => e,
        }
    }
}

pub type Chunks = Pin<Box<dyn Stream<Item = Result<Chunk, TierError>> + Send>>;

/// An answer source.
pub trait Tier: Send + Sync {
    /// The tier's name (`local`, or the upstream's `name`), as in metrics and headers.
    fn name(&self) -> &str;
    /// The model that answers.
    fn model(&self) -> &str;
    /// Starts answering; an error here means nothing was produced.
    fn answer<'a>(&'a self, req: &'a TierRequest) -> BoxFuture<'a, Result<Chunks, TierError>>;
}

/// The tier a plan names.
pub fn build(st: &crate::AppState, t: crate::plan::TierRef) -> Box<dyn Tier> {
    match t {
        crate::plan::TierRef::Local => Box::new(local::LocalTier::new(st.clone())),
        crate::plan::TierRef::Upstream(i) => {
            Box::new(upstream::UpstreamTier::new(st.routing.upstreams[i].clone()))
        }
    }
}
