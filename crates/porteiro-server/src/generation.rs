//! `/v1/chat/completions` and `/v1/completions`: validate the request (400 naming the parameter),
//! render and tokenize the prompt, check it against the context window, submit it to the engine, then
//! answer with one JSON object or a stream of server-sent events ending in `data: [DONE]`.
//!
//! The receiver of the engine's events lives in the handler (non-streaming) or in the response body
//! (streaming): when the client goes away it is dropped, and the engine frees the sequence at its next
//! step.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::stream::{self, StreamExt};
use porteiro_config::LOCAL_TIER;
use porteiro_engine::scheduler::{Event, EventSink, GenRequest, SubmitError, TokenLogprob};
use porteiro_engine::{FinishReason as EngineFinish, SamplingParams};
use porteiro_models::template::ChatMessage as TemplateMessage;
use porteiro_protocol::*;
use serde_json::Value;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::privacy::RequestCtx;
use crate::structured::{spec_of, tool_calls, Mode, ToolStream};
use crate::telemetry::Trace;
use crate::{ApiError, AppState, Generator, OpenAiJson, OpenAiJsonRaw};

/// Most alternatives per token OpenAI allows for chat (`top_logprobs`).
const MAX_TOP_LOGPROBS: i64 = 20;
/// Legacy completions allow up to 5 (`logprobs`).
const MAX_COMPLETION_LOGPROBS: i64 = 5;
/// OpenAI's default `max_tokens` for legacy completions.
const COMPLETIONS_DEFAULT_MAX_TOKENS: usize = 16;

struct ChannelSink(UnboundedSender<Event>);

impl EventSink for ChannelSink {
    fn send(&mut self, ev: Event) -> bool {
        self.0.send(ev).is_ok()
    }
    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Api {
    Chat,
    Completion,
}

impl Api {
    fn endpoint(self) -> &'static str {
        match self {
            Api::Chat => "chat",
            Api::Completion => "completions",
        }
    }
}

/// Sampling and limits shared by both endpoints, validated.
struct Knobs {
    max_tokens: Option<i64>,
    max_tokens_param: &'static str,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<i64>,
    stop: Option<Stop>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    n: Option<i64>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    ignore_eos: Option<bool>,
}

struct Limits {
    max_tokens: Option<usize>,
    stop: Vec<String>,
    sampling: SamplingParams,
    ignore_eos: bool,
}

fn random_seed(st: &AppState) -> u64 {
    let id = st.new_id("seed");
    id.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

impl Knobs {
    fn validate(self, st: &AppState) -> Result<Limits, ApiError> {
        if let Some(n) = self.n {
            if n != 1 {
                return Err(ApiError::invalid(
                    "n",
                    format!("Only n=1 is supported (got {n})."),
                ));
            }
        }
        let max_tokens = match self.max_tokens {
            None => None,
            Some(m) if m >= 1 => Some(m as usize),
            Some(m) => {
                return Err(ApiError::invalid(
                    self.max_tokens_param,
                    format!("`{}` must be at least 1 (got {m}).", self.max_tokens_param),
                ))
            }
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(
                "temperature",
                format!("`temperature` must be between 0 and 2 (got {temperature})."),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(
                "top_p",
                format!("`top_p` must be greater than 0 and at most 1 (got {top_p})."),
            ));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if let Some(v) = v {
                if !(-2.0..=2.0).contains(&v) {
                    return Err(ApiError::invalid(
                        name,
                        format!("`{name}` must be between -2 and 2 (got {v})."),
                    ));
                }
            }
        }
        let top_k = match self.top_k {
            None => 0,
            Some(k) if k >= 0 => k as usize,
            Some(k) => {
                return Err(ApiError::invalid(
                    "top_k",
                    format!("`top_k` must be >= 0 (got {k})."),
                ))
            }
        };
        let min_p = self.min_p.unwrap_or(0.0);
        if !(0.0..=1.0).contains(&min_p) {
            return Err(ApiError::invalid(
                "min_p",
                format!("`min_p` must be between 0 and 1 (got {min_p})."),
            ));
        }
        let repeat_penalty = self.repetition_penalty.unwrap_or(1.0);
        if !(repeat_penalty.is_finite() && repeat_penalty > 0.0) {
            return Err(ApiError::invalid(
                "repetition_penalty",
                format!("`repetition_penalty` must be > 0 (got {repeat_penalty})."),
            ));
        }
        let stop = self.stop.map(Stop::into_vec).unwrap_or_default();
        if stop.len() > 4 {
            return Err(ApiError::invalid(
                "stop",
                "At most 4 stop sequences are allowed.",
            ));
        }
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid(
                "stop",
                "Stop sequences must not be empty.",
            ));
        }
        let sampling = SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty,
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            seed: match self.seed {
                Some(s) => s as u64,
                None => random_seed(st),
            },
            ..SamplingParams::default()
        };
        sampling.validate().map_err(|e| {
            let param = e.split(':').next().unwrap_or("").to_string();
            ApiError::invalid(param, e)
        })?;
        Ok(Limits {
            max_tokens,
            stop,
            sampling,
            ignore_eos: self.ignore_eos.unwrap_or(false),
        })
    }
}

fn refuse_if_present<T>(v: &Option<T>, name: &str, what: &str) -> Result<(), ApiError> {
    if v.is_some() {
        return Err(ApiError::invalid(
            name,
            format!("`{name}` is not supported: {what}."),
        ));
    }
    Ok(())
}

fn generator<'a>(st: &'a AppState, model: &str) -> Result<&'a Generator, ApiError> {
    if model == st.settings.model_id {
        return st
            .generator()
            .ok_or_else(|| ApiError::unavailable("The model is still loading; retry shortly."));
    }
    if st.settings.embedding_id.as_deref() == Some(model) {
        return Err(ApiError::invalid(
            "model",
            format!("`{model}` is an embedding model; use /v1/embeddings."),
        ));
    }
    Err(ApiError::model_not_found(model))
}

/// Picks max_tokens and checks prompt + max_tokens against the context window.
fn completion_budget(
    g: &Generator,
    prompt: usize,
    requested: Option<usize>,
    default: usize,
) -> Result<usize, ApiError> {
    let n_ctx = g.engine.config().n_ctx;
    match requested {
        Some(m) if prompt + m > n_ctx => Err(ApiError::context_overflow(n_ctx, prompt, m)),
        Some(m) => Ok(m),
        None if prompt >= n_ctx => Err(ApiError::context_overflow(n_ctx, prompt, 1)),
        None => Ok(default.min(n_ctx - prompt)),
    }
}

fn submit(
    st: &AppState,
    g: &Generator,
    prompt: Vec<u32>,
    max_tokens: usize,
    limits: Limits,
    logprobs: Option<usize>,
    constraint: Option<Box<dyn porteiro_engine::scheduler::TokenConstraint>>,
) -> Result<UnboundedReceiver<Event>, ApiError> {
    let (tx, rx) = unbounded_channel();
    let req = GenRequest {
        prompt,
        max_tokens,
        stop: limits.stop,
        sampling: limits.sampling,
        logprobs,
        ignore_eos: limits.ignore_eos,
        constraint,
        sink: Box::new(ChannelSink(tx)),
    };
    match g.engine.submit(req) {
        Ok(()) => Ok(rx),
        Err(SubmitError::Overloaded {
            running,
            waiting,
            retry_after_s,
        }) => {
            st.metrics.rejected();
            Err(ApiError::overloaded(
                retry_after_s,
                &format!("{running} running, {waiting} waiting"),
            ))
        }
        Err(SubmitError::TooLong {
            prompt,
            max_tokens,
            n_ctx,
        }) => Err(ApiError::context_overflow(n_ctx, prompt, max_tokens)),
        Err(SubmitError::EmptyPrompt) => Err(ApiError::invalid("prompt", "The prompt is empty.")),
        Err(SubmitError::NoTokens) => Err(ApiError::invalid(
            "max_tokens",
            "`max_tokens` must be at least 1.",
        )),
        Err(SubmitError::Stopped) => Err(ApiError::unavailable(
            "The engine is not running (the server is shutting down).",
        )),
    }
}

/// Runs prompt rendering and tokenization off the async workers (a prompt can be megabytes).
async fn blocking<T: Send + 'static>(
    st: &AppState,
    f: impl FnOnce(&Generator) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let st = st.clone();
    tokio::task::spawn_blocking(move || match st.generator() {
        Some(g) => f(g),
        None => Err(ApiError::unavailable(
            "The model is still loading; retry shortly.",
        )),
    })
    .await
    .map_err(|e| ApiError::internal(format!("the tokenizer task failed: {e}")))?
}

pub(crate) fn finish_reason(f: EngineFinish) -> FinishReason {
    match f {
        EngineFinish::Stop => FinishReason::Stop,
        EngineFinish::Length => FinishReason::Length,
    }
}

// ------------------------------------------------------------------------------------------------
// Chat
// ------------------------------------------------------------------------------------------------

fn chat_messages(msgs: &[ChatMessage]) -> Result<Vec<TemplateMessage>, ApiError> {
    if msgs.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must not be empty.",
        ));
    }
    msgs.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                // Tool results reach the model as a user turn every chat template understands.
                "user" | "tool" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(ApiError::invalid(
                        format!("messages[{i}].role"),
                        format!(
                            "Unsupported role `{other}`; use system, developer, user, assistant or tool."
                        ),
                    ))
                }
            };
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut s = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => s.push_str(t),
                            _ => {
                                return Err(ApiError::invalid(
                                    format!("messages[{i}].content[{j}]"),
                                    format!(
                                        "Only text content parts are supported (got `{}`).",
                                        p.kind
                                    ),
                                ))
                            }
                        }
                    }
                    s
                }
            };
            let content = match (m.role.as_str(), &m.tool_calls) {
                ("tool", _) => format!("Tool result: {content}"),
                // The model sees the calls it made in the shape it was asked to produce them.
                ("assistant", Some(Value::Array(calls))) if content.is_empty() => calls
                    .iter()
                    .map(|c| {
                        let args = c["function"]["arguments"].as_str().unwrap_or("{}");
                        format!(
                            "{{\"name\":{},\"arguments\":{args}}}",
                            c["function"]["name"]
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n"),
                _ => content,
            };
            Ok(TemplateMessage::new(role, content))
        })
        .collect()
}

pub async fn chat(
    State(st): State<AppState>,
    Extension(ctx): Extension<RequestCtx>,
    OpenAiJsonRaw(req, raw): OpenAiJsonRaw<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let t0 = Instant::now();
    let trace = Trace::new(&st, &ctx, "chat", &req.model, req.stream.unwrap_or(false));
    if trace.stores_text() {
        trace.texts(serde_json::to_string(&raw["messages"]).ok(), None);
    }
    let result = async {
        match crate::routing::resolve(&st, &req).await? {
            None => {
                generator(&st, &req.model)?;
                crate::routing::audit_local(&st, &ctx, &raw, "-");
                chat_local(&st, &req, t0, None, trace.clone()).await
            }
            Some(routed) => {
                crate::routing::serve_routed(st.clone(), req, raw, routed, t0, ctx, trace.clone())
                    .await
            }
        }
    }
    .await;
    if let Err(e) = &result {
        trace.fail(e.status.as_u16(), &e.message);
    }
    result
}

/// The local tier's answer to a chat request (whatever model name it asked for).
pub(crate) async fn chat_local(
    st: &AppState,
    req: &ChatCompletionRequest,
    t0: Instant,
    model_name: Option<String>,
    trace: Trace,
) -> Result<Response, ApiError> {
    trace.served(LOCAL_TIER, &st.settings.model_id);
    let (rx, mode) = local_chat_events(st, req, None).await?;
    let out = Output {
        mode,
        st: st.clone(),
        api: Api::Chat,
        id: st.new_id("chatcmpl"),
        created: crate::unix_now(),
        model: model_name.unwrap_or_else(|| req.model.clone()),
        t0,
        trace,
    };
    out.respond(rx, req.stream, req.stream_options.as_ref(), None)
        .await
}

/// Validates a chat request for the local engine and submits it; `prefix` is assistant text already
/// given to the client (an upstream's answer cut mid-way), which the local model continues.
pub(crate) async fn local_chat_events(
    st: &AppState,
    req: &ChatCompletionRequest,
    prefix: Option<String>,
) -> Result<(UnboundedReceiver<Event>, Option<Mode>), ApiError> {
    let g = st
        .generator()
        .ok_or_else(|| ApiError::unavailable("The model is still loading; retry shortly."))?;
    // A continuation of an upstream's answer is plain text.
    let structured = match prefix {
        Some(_) => None,
        None => spec_of(req)?,
    };
    if req.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
        return Err(ApiError::invalid(
            "logit_bias",
            "`logit_bias` is not supported.",
        ));
    }
    let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (_, Some(k)) if !(0..=MAX_TOP_LOGPROBS).contains(&k) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                format!("`top_logprobs` must be between 0 and {MAX_TOP_LOGPROBS} (got {k})."),
            ))
        }
        (false, Some(_)) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "`top_logprobs` needs `logprobs` set to true.",
            ))
        }
        (true, k) => Some(k.unwrap_or(0) as usize),
        (false, None) => None,
    };
    let (max_tokens, param) = match (req.max_completion_tokens, req.max_tokens) {
        (Some(m), _) => (Some(m), "max_completion_tokens"),
        (None, m) => (m, "max_tokens"),
    };
    let limits = Knobs {
        max_tokens,
        max_tokens_param: param,
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed,
        stop: req.stop.clone(),
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        n: req.n,
        top_k: req.top_k,
        min_p: req.min_p,
        repetition_penalty: req.repetition_penalty,
        ignore_eos: req.ignore_eos,
    }
    .validate(st)?;
    let mut msgs = chat_messages(&req.messages)?;
    let mut constraint = None;
    if let Some((spec, mode)) = &structured {
        let note = spec.instructions();
        match msgs.first_mut() {
            Some(m) if m.role == "system" => m.content = format!("{}\n\n{note}", m.content),
            _ => msgs.insert(0, TemplateMessage::new("system", note)),
        }
        let (spec, param) = (
            spec.clone(),
            if *mode == Mode::Tools {
                "tools"
            } else {
                "response_format"
            },
        );
        constraint = Some(
            blocking(st, move |g| {
                let grammars = g
                    .grammars
                    .get_or_init(|| {
                        porteiro_grammar::Grammars::new(g.tokenizer.clone())
                            .map(Arc::new)
                            .map_err(|e| e.to_string())
                    })
                    .clone()
                    .map_err(ApiError::internal)?;
                let c = grammars.constraint(&spec).map_err(|e| {
                    ApiError::invalid(param, format!("The schema cannot be enforced: {e}"))
                })?;
                Ok(Box::new(c) as Box<dyn porteiro_engine::scheduler::TokenConstraint>)
            })
            .await?,
        );
    }
    let prompt = blocking(st, move |g| {
        let mut text = match &g.template {
            Some(t) => t.render(&msgs, true).map_err(|e| {
                ApiError::invalid("messages", format!("The chat template failed: {e}"))
            })?,
            None => msgs
                .iter()
                .map(|m| m.content.as_str())
                .collect::<Vec<_>>()
                .join("\n\n"),
        };
        if let Some(p) = prefix {
            text.push_str(&p);
        }
        Ok(g.tokenizer.encode(&text, true, true))
    })
    .await?;
    let max_tokens = completion_budget(
        g,
        prompt.len(),
        limits.max_tokens,
        st.settings.default_max_tokens,
    )?;
    submit(st, g, prompt, max_tokens, limits, logprobs, constraint)
        .map(|rx| (rx, structured.map(|(_, m)| m)))
}

// ------------------------------------------------------------------------------------------------
// Legacy completions
// ------------------------------------------------------------------------------------------------

pub async fn completions(
    State(st): State<AppState>,
    Extension(ctx): Extension<RequestCtx>,
    OpenAiJson(req): OpenAiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let trace = Trace::new(
        &st,
        &ctx,
        "completions",
        &req.model,
        req.stream.unwrap_or(false),
    );
    trace.served(LOCAL_TIER, &st.settings.model_id);
    let result = completions_inner(&st, req, trace.clone()).await;
    if let Err(e) = &result {
        trace.fail(e.status.as_u16(), &e.message);
    }
    result
}

async fn completions_inner(
    st: &AppState,
    req: CompletionRequest,
    trace: Trace,
) -> Result<Response, ApiError> {
    let st = st.clone();
    let t0 = Instant::now();
    let g = generator(&st, &req.model)?;
    refuse_if_present(&req.suffix, "suffix", "insertion is not implemented")?;
    if req.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
        return Err(ApiError::invalid(
            "logit_bias",
            "`logit_bias` is not supported.",
        ));
    }
    if let Some(b) = req.best_of {
        if b != 1 {
            return Err(ApiError::invalid(
                "best_of",
                format!("Only best_of=1 is supported (got {b})."),
            ));
        }
    }
    let logprobs = match req.logprobs {
        None => None,
        Some(k) if (0..=MAX_COMPLETION_LOGPROBS).contains(&k) => Some(k as usize),
        Some(k) => {
            return Err(ApiError::invalid(
                "logprobs",
                format!("`logprobs` must be between 0 and {MAX_COMPLETION_LOGPROBS} (got {k})."),
            ))
        }
    };
    let echo = req.echo.unwrap_or(false);
    if echo && logprobs.is_some() {
        return Err(ApiError::invalid(
            "echo",
            "`echo` together with `logprobs` is not supported (prompt log-probabilities are not computed).",
        ));
    }
    let limits = Knobs {
        max_tokens: req.max_tokens,
        max_tokens_param: "max_tokens",
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed,
        stop: req.stop.clone(),
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        n: req.n,
        top_k: req.top_k,
        min_p: req.min_p,
        repetition_penalty: req.repetition_penalty,
        ignore_eos: req.ignore_eos,
    }
    .validate(&st)?;
    let vocab = g.tokenizer.vocab_size();
    let one = |what: &str, n: usize| -> Result<(), ApiError> {
        if n != 1 {
            return Err(ApiError::invalid(
                "prompt",
                format!("Exactly one prompt per request is supported (got {n} {what})."),
            ));
        }
        Ok(())
    };
    let prompt = match req.prompt {
        None => return Err(ApiError::invalid("prompt", "`prompt` is required.")),
        Some(Prompt::Text(t)) => {
            blocking(&st, move |g| Ok(g.tokenizer.encode(&t, true, true))).await?
        }
        Some(Prompt::Texts(mut v)) => {
            one("prompts", v.len())?;
            let t = v.swap_remove(0);
            blocking(&st, move |g| Ok(g.tokenizer.encode(&t, true, true))).await?
        }
        Some(Prompt::Tokens(ids)) => ids,
        Some(Prompt::TokenLists(mut v)) => {
            one("token lists", v.len())?;
            v.swap_remove(0)
        }
    };
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::invalid(
            "prompt",
            format!("Token id {bad} is outside the vocabulary of {vocab} tokens."),
        ));
    }
    if prompt.is_empty() {
        return Err(ApiError::invalid("prompt", "The prompt is empty."));
    }
    let echo_text = echo.then(|| g.tokenizer.decode(&prompt, false));
    let requested = limits.max_tokens.or(Some(COMPLETIONS_DEFAULT_MAX_TOKENS));
    let max_tokens = completion_budget(g, prompt.len(), requested, COMPLETIONS_DEFAULT_MAX_TOKENS)
        .map_err(|mut e| {
            e.param = Some("prompt".into());
            e
        })?;
    let rx = submit(&st, g, prompt, max_tokens, limits, logprobs, None)?;
    let out = Output {
        st: st.clone(),
        api: Api::Completion,
        id: st.new_id("cmpl"),
        created: crate::unix_now(),
        model: req.model.clone(),
        t0,
        trace,
        mode: None,
    };
    out.respond(rx, req.stream, req.stream_options.as_ref(), echo_text)
        .await
}

// ------------------------------------------------------------------------------------------------
// Turning engine events into responses
// ------------------------------------------------------------------------------------------------

struct Output {
    st: AppState,
    api: Api,
    id: String,
    created: u64,
    model: String,
    t0: Instant,
    trace: Trace,
    /// Structured output: how the constrained answer is returned.
    mode: Option<Mode>,
}

fn chat_logprob(l: &TokenLogprob) -> ChatTokenLogprob {
    ChatTokenLogprob {
        token: l.token.text.clone(),
        logprob: l.logprob,
        bytes: l.token.bytes.clone(),
        top_logprobs: l
            .top
            .iter()
            .map(|(t, lp)| TopLogprob {
                token: t.text.clone(),
                logprob: *lp,
                bytes: t.bytes.clone(),
            })
            .collect(),
    }
}

/// Appends engine log-probabilities in the legacy layout; `offset` is the text offset of the first.
fn push_completion_logprobs(
    acc: &mut CompletionLogprobs,
    lps: &[TokenLogprob],
    offset: &mut usize,
) {
    for l in lps {
        acc.tokens.push(l.token.text.clone());
        acc.token_logprobs.push(l.logprob);
        acc.top_logprobs.push(
            l.top
                .iter()
                .map(|(t, lp)| (t.text.clone(), *lp))
                .collect::<BTreeMap<_, _>>(),
        );
        acc.text_offset.push(*offset);
        *offset += l.token.text.len();
    }
}

/// An error that arrives after the response has started.
fn stream_error(msg: &str) -> ErrorBody {
    ApiError::internal(msg).body()
}

impl Output {
    /// An SSE stream or one JSON body, as the request asked.
    async fn respond(
        self,
        rx: UnboundedReceiver<Event>,
        stream: Option<bool>,
        options: Option<&porteiro_protocol::StreamOptions>,
        echo: Option<String>,
    ) -> Result<Response, ApiError> {
        if stream.unwrap_or(false) {
            let include_usage = options.and_then(|o| o.include_usage).unwrap_or(false);
            Ok(self.stream(rx, include_usage, echo))
        } else {
            self.collect(rx, echo).await
        }
    }

    async fn collect(
        self,
        mut rx: UnboundedReceiver<Event>,
        echo: Option<String>,
    ) -> Result<Response, ApiError> {
        let mut text = echo.unwrap_or_default();
        let mut chat_lp = ChatLogprobs::default();
        let mut comp_lp = CompletionLogprobs::default();
        let mut any_lp = false;
        let mut offset = text.len();
        let mut first = true;
        loop {
            let Some(ev) = rx.recv().await else {
                return Err(ApiError::internal(
                    "The engine stopped before the answer was complete.",
                ));
            };
            match ev {
                Event::Text { text: t, logprobs } => {
                    self.trace.token();
                    if first {
                        self.st
                            .metrics
                            .first_token(self.api.endpoint(), self.t0.elapsed().as_secs_f64());
                        first = false;
                    }
                    text.push_str(&t);
                    any_lp |= !logprobs.is_empty();
                    chat_lp.content.extend(logprobs.iter().map(chat_logprob));
                    push_completion_logprobs(&mut comp_lp, &logprobs, &mut offset);
                }
                Event::Error(msg) => return Err(ApiError::unavailable(msg)),
                Event::Done { finish, usage } => {
                    self.trace
                        .usage(usage.prompt_tokens as u64, usage.completion_tokens as u64);
                    if self.trace.stores_text() {
                        self.trace.texts(None, Some(text.clone()));
                    }
                    self.st.metrics.generation_done(
                        self.api.endpoint(),
                        self.t0.elapsed().as_secs_f64(),
                        usage.prompt_tokens,
                        usage.completion_tokens,
                    );
                    let usage = Usage::new(usage.prompt_tokens, usage.completion_tokens);
                    let mut finish = finish_reason(finish);
                    let mut calls = None;
                    if self.mode == Some(Mode::Tools) && finish == FinishReason::Stop {
                        calls = Some(tool_calls(&text, &self.st.new_id("call"))?);
                        finish = FinishReason::ToolCalls;
                    }
                    let body = match self.api {
                        Api::Chat => serde_json::to_value(ChatCompletion {
                            id: self.id,
                            object: "chat.completion",
                            created: self.created,
                            model: self.model,
                            choices: vec![ChatChoice {
                                index: 0,
                                message: AssistantMessage {
                                    role: "assistant",
                                    content: calls.is_none().then_some(text),
                                    refusal: None,
                                    tool_calls: calls,
                                },
                                logprobs: any_lp.then_some(chat_lp),
                                finish_reason: finish,
                            }],
                            usage,
                            system_fingerprint: None,
                        }),
                        Api::Completion => serde_json::to_value(Completion {
                            id: self.id,
                            object: "text_completion",
                            created: self.created,
                            model: self.model,
                            choices: vec![CompletionChoice {
                                text,
                                index: 0,
                                logprobs: any_lp.then_some(comp_lp),
                                finish_reason: Some(finish),
                            }],
                            usage: Some(usage),
                            system_fingerprint: None,
                        }),
                    };
                    return body
                        .map(|v| Json(v).into_response())
                        .map_err(|e| ApiError::internal(format!("serialising the answer: {e}")));
                }
            }
        }
    }

    fn stream(
        self,
        rx: UnboundedReceiver<Event>,
        include_usage: bool,
        echo: Option<String>,
    ) -> Response {
        let keep_text = self.trace.stores_text();
        let tools = (self.mode == Some(Mode::Tools) && self.api == Api::Chat)
            .then(|| ToolStream::new(self.st.new_id("call")));
        let state = StreamState {
            out: self,
            rx,
            include_usage,
            first: true,
            offset: 0,
            echo,
            finished: false,
            text: keep_text.then(String::new),
            tools,
        };
        let events = stream::unfold(state, |mut s| async move {
            if s.finished {
                return None;
            }
            let batch = s.next_events().await;
            Some((stream::iter(batch.into_iter().map(Ok::<_, Infallible>)), s))
        })
        .flatten();
        Sse::new(events)
            .keep_alive(KeepAlive::default())
            .into_response()
    }
}

struct StreamState {
    out: Output,
    rx: UnboundedReceiver<Event>,
    include_usage: bool,
    first: bool,
    offset: usize,
    echo: Option<String>,
    finished: bool,
    /// The answer so far, when the request log keeps texts.
    text: Option<String>,
    /// A tool-call answer being streamed as `delta.tool_calls`.
    tools: Option<ToolStream>,
}

impl StreamState {
    fn json(v: &impl serde::Serialize) -> SseEvent {
        SseEvent::default().data(serde_json::to_string(v).unwrap_or_else(|e| {
            format!("{{\"error\":{{\"message\":\"serialising a chunk: {e}\",\"type\":\"server_error\"}}}}")
        }))
    }

    fn chat_chunk(
        &self,
        delta: Delta,
        logprobs: Option<ChatLogprobs>,
        finish: Option<FinishReason>,
    ) -> SseEvent {
        let o = &self.out;
        Self::json(&ChatCompletionChunk {
            id: o.id.clone(),
            object: "chat.completion.chunk",
            created: o.created,
            model: o.model.clone(),
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                logprobs,
                finish_reason: finish,
            }],
            usage: self.include_usage.then_some(None),
            system_fingerprint: None,
        })
    }

    fn completion_chunk(
        &self,
        text: String,
        logprobs: Option<CompletionLogprobs>,
        finish: Option<FinishReason>,
    ) -> SseEvent {
        let o = &self.out;
        Self::json(&Completion {
            id: o.id.clone(),
            object: "text_completion",
            created: o.created,
            model: o.model.clone(),
            choices: vec![CompletionChoice {
                text,
                index: 0,
                logprobs,
                finish_reason: finish,
            }],
            usage: None,
            system_fingerprint: None,
        })
    }

    fn usage_chunk(&self, usage: Usage) -> SseEvent {
        let o = &self.out;
        match o.api {
            Api::Chat => Self::json(&ChatCompletionChunk {
                id: o.id.clone(),
                object: "chat.completion.chunk",
                created: o.created,
                model: o.model.clone(),
                choices: vec![],
                usage: Some(Some(usage)),
                system_fingerprint: None,
            }),
            Api::Completion => Self::json(&Completion {
                id: o.id.clone(),
                object: "text_completion",
                created: o.created,
                model: o.model.clone(),
                choices: vec![],
                usage: Some(usage),
                system_fingerprint: None,
            }),
        }
    }

    /// The SSE events for the next engine event (several at the end of the stream).
    async fn next_events(&mut self) -> Vec<SseEvent> {
        let Some(ev) = self.rx.recv().await else {
            self.finished = true;
            self.out
                .trace
                .fail(500, "The engine stopped before the answer was complete.");
            return vec![
                Self::json(&stream_error(
                    "The engine stopped before the answer was complete.",
                )),
                SseEvent::default().data("[DONE]"),
            ];
        };
        let mut out = Vec::new();
        match ev {
            Event::Text { text, logprobs } => {
                self.out.trace.token();
                if let Some(acc) = &mut self.text {
                    acc.push_str(&text);
                }
                let ep = self.out.api.endpoint();
                if self.first {
                    self.out
                        .st
                        .metrics
                        .first_token(ep, self.out.t0.elapsed().as_secs_f64());
                }
                let first = std::mem::replace(&mut self.first, false);
                match self.out.api {
                    Api::Chat => {
                        let lp = (!logprobs.is_empty()).then(|| ChatLogprobs {
                            content: logprobs.iter().map(chat_logprob).collect(),
                        });
                        let delta = match self.tools.as_mut() {
                            Some(ts) => {
                                let calls = ts.push(&text);
                                if calls.is_empty() && !first {
                                    return out;
                                }
                                Delta {
                                    role: first.then_some("assistant"),
                                    content: None,
                                    tool_calls: (!calls.is_empty()).then_some(calls),
                                }
                            }
                            None => Delta {
                                role: first.then_some("assistant"),
                                content: Some(text),
                                tool_calls: None,
                            },
                        };
                        out.push(self.chat_chunk(delta, lp, None));
                    }
                    Api::Completion => {
                        let mut text = text;
                        if first {
                            if let Some(e) = self.echo.take() {
                                self.offset = e.len();
                                text.insert_str(0, &e);
                            }
                        }
                        let lp = (!logprobs.is_empty()).then(|| {
                            let mut acc = CompletionLogprobs::default();
                            push_completion_logprobs(&mut acc, &logprobs, &mut self.offset);
                            acc
                        });
                        out.push(self.completion_chunk(text, lp, None));
                    }
                }
            }
            Event::Done { finish, usage } => {
                let o = &self.out;
                o.trace
                    .usage(usage.prompt_tokens as u64, usage.completion_tokens as u64);
                o.trace.texts(None, self.text.take());
                o.st.metrics.generation_done(
                    o.api.endpoint(),
                    o.t0.elapsed().as_secs_f64(),
                    usage.prompt_tokens,
                    usage.completion_tokens,
                );
                let usage = Usage::new(usage.prompt_tokens, usage.completion_tokens);
                let mut finish = Some(finish_reason(finish));
                match o.api {
                    Api::Chat => {
                        if let Some(ts) = self.tools.as_mut() {
                            let rest = ts.finish();
                            if finish == Some(FinishReason::Stop) {
                                finish = Some(FinishReason::ToolCalls);
                            }
                            if !rest.is_empty() {
                                let delta = Delta {
                                    role: None,
                                    content: None,
                                    tool_calls: Some(rest),
                                };
                                out.push(self.chat_chunk(delta, None, None));
                            }
                        }
                        let delta = Delta {
                            role: self.first.then_some("assistant"),
                            content: (self.first && self.tools.is_none()).then(String::new),
                            tool_calls: None,
                        };
                        out.push(self.chat_chunk(delta, None, finish));
                    }
                    Api::Completion => {
                        let text = self.echo.take().unwrap_or_default();
                        out.push(self.completion_chunk(text, None, finish));
                    }
                }
                if self.include_usage {
                    out.push(self.usage_chunk(usage));
                }
                out.push(SseEvent::default().data("[DONE]"));
                self.finished = true;
            }
            Event::Error(msg) => {
                self.out.trace.fail(500, &msg);
                out.push(Self::json(&stream_error(&msg)));
                out.push(SseEvent::default().data("[DONE]"));
                self.finished = true;
            }
        }
        out
    }
}
