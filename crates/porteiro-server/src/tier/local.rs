//! The local model as a tier: validate the request for the engine (400 naming the parameter),
//! render and tokenize the prompt, check it against the context window, submit it, and turn the
//! engine's events into chunks. The receiver of the events lives in the chunk stream: when the
//! client goes away the stream is dropped, and the engine frees the sequence at its next step.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::stream::{self, StreamExt};
use porteiro_config::LOCAL_TIER;
use porteiro_engine::lora::Adapter;
use porteiro_engine::scheduler::{
    Event, EventSink, GenRequest, SubmitError, TokenConstraint, TokenLogprob,
};
use porteiro_engine::{FinishReason as EngineFinish, SamplingParams};
use porteiro_protocol::{
    ChatCompletionRequest, ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, CompletionRequest,
    FinishReason, Prompt, Stop, TopLogprob, Usage,
};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::{Body, ChoiceDelta, Chunk, Chunks, Logprobs, Tier, TierError, TierRequest};
use crate::prompt::build;
use crate::structured::{spec_of, CallParser, Structured};
use crate::{ApiError, AppState, Generator};

/// Most alternatives per token OpenAI allows for chat (`top_logprobs`).
const MAX_TOP_LOGPROBS: i64 = 20;
/// Legacy completions allow up to 5 (`logprobs`).
const MAX_COMPLETION_LOGPROBS: i64 = 5;
/// OpenAI's default `max_tokens` for legacy completions.
const COMPLETIONS_DEFAULT_MAX_TOKENS: usize = 16;

/// The local model (whatever name the request used for it).
pub struct LocalTier {
    st: AppState,
}

impl LocalTier {
    pub fn new(st: AppState) -> Self {
        Self { st }
    }
}

impl Tier for LocalTier {
    fn name(&self) -> &str {
        LOCAL_TIER
    }

    fn model(&self) -> &str {
        &self.st.settings.model_id
    }

    fn answer<'a>(&'a self, req: &'a TierRequest) -> BoxFuture<'a, Result<Chunks, TierError>> {
        Box::pin(async move {
            let st = &self.st;
            let (rx, shape) = match &req.body {
                Body::Chat(c) => {
                    let (rx, syntax) =
                        prepare_chat(st, c, req.prefix.clone(), req.adapter.clone()).await?;
                    let tools = syntax.map(|(syntax, names)| {
                        let st = st.clone();
                        Box::new(CallParser::new(
                            syntax,
                            names,
                            Box::new(move || st.new_id("call")),
                        ))
                    });
                    (rx, Shape::Chat { tools })
                }
                Body::Completion(c) => {
                    let (rx, echo) = prepare_completion(st, c, req.adapter.clone()).await?;
                    (rx, Shape::Completion { echo, offset: 0 })
                }
            };
            Ok(events_to_chunks(rx, shape, req.stream))
        })
    }
}

struct ChannelSink(UnboundedSender<Event>);

impl EventSink for ChannelSink {
    fn send(&mut self, ev: Event) -> bool {
        self.0.send(ev).is_ok()
    }
    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

// ------------------------------------------------------------------------------------------------
// Validation shared by both endpoints
// ------------------------------------------------------------------------------------------------

/// Sampling and limits shared by both endpoints, before validation.
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

/// The knobs of a chat or completion request: both carry the same sampling fields by name, so
/// they are read in this one place.
macro_rules! knobs {
    ($req:expr, $max_tokens:expr, $param:expr) => {
        Knobs {
            max_tokens: $max_tokens,
            max_tokens_param: $param,
            temperature: $req.temperature,
            top_p: $req.top_p,
            seed: $req.seed,
            stop: $req.stop.clone(),
            presence_penalty: $req.presence_penalty,
            frequency_penalty: $req.frequency_penalty,
            n: $req.n,
            top_k: $req.top_k,
            min_p: $req.min_p,
            repetition_penalty: $req.repetition_penalty,
            ignore_eos: $req.ignore_eos,
        }
    };
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

fn check_range(name: &str, v: Option<f32>, lo: f32, hi: f32) -> Result<(), ApiError> {
    match v {
        Some(v) if !(lo..=hi).contains(&v) => Err(ApiError::invalid(
            name,
            format!("`{name}` must be between {lo} and {hi} (got {v})."),
        )),
        _ => Ok(()),
    }
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
        check_range("temperature", Some(temperature), 0.0, 2.0)?;
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(
                "top_p",
                format!("`top_p` must be greater than 0 and at most 1 (got {top_p})."),
            ));
        }
        check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)?;
        check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)?;
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
        check_range("min_p", Some(min_p), 0.0, 1.0)?;
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

fn refuse_logit_bias(b: &Option<BTreeMap<String, f32>>) -> Result<(), ApiError> {
    if b.as_ref().is_some_and(|b| !b.is_empty()) {
        return Err(ApiError::invalid(
            "logit_bias",
            "`logit_bias` is not supported.",
        ));
    }
    Ok(())
}

fn loaded(st: &AppState) -> Result<&Generator, ApiError> {
    st.generator()
        .ok_or_else(|| ApiError::unavailable("The model is still loading; retry shortly."))
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

/// What a request asks of the engine beyond its prompt.
struct Ask {
    max_tokens: usize,
    limits: Limits,
    logprobs: Option<usize>,
    constraint: Option<Box<dyn TokenConstraint>>,
    adapter: Option<Arc<Adapter>>,
}

fn submit(
    st: &AppState,
    g: &Generator,
    prompt: Vec<u32>,
    ask: Ask,
) -> Result<UnboundedReceiver<Event>, ApiError> {
    let Ask {
        max_tokens,
        limits,
        logprobs,
        constraint,
        adapter,
    } = ask;
    let (tx, rx) = unbounded_channel();
    let req = GenRequest {
        prompt,
        max_tokens,
        stop: limits.stop,
        sampling: limits.sampling,
        logprobs,
        ignore_eos: limits.ignore_eos,
        constraint,
        adapter,
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
    tokio::task::spawn_blocking(move || f(loaded(&st)?))
        .await
        .map_err(|e| ApiError::internal(format!("the tokenizer task failed: {e}")))?
}

// ------------------------------------------------------------------------------------------------
// Chat
// ------------------------------------------------------------------------------------------------

/// Validates a chat request for the local engine and submits it; `prefix` is assistant text already
/// given to the client (an upstream's answer cut mid-way), which the local model continues.
/// How an answer that may call tools is read back: the calls' syntax and the tools' names.
type ToolAnswer = (porteiro_grammar::ToolSyntax, Vec<String>);

async fn prepare_chat(
    st: &AppState,
    req: &ChatCompletionRequest,
    prefix: Option<String>,
    adapter: Option<Arc<Adapter>>,
) -> Result<(UnboundedReceiver<Event>, Option<ToolAnswer>), ApiError> {
    let g = loaded(st)?;
    let syntax = crate::prompt::syntax(g.template.as_ref());
    // A continuation of an upstream's answer is plain text.
    let structured = match prefix {
        Some(_) => None,
        None => spec_of(req, &syntax)?,
    };
    refuse_logit_bias(&req.logit_bias)?;
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
    let limits = knobs!(req, max_tokens, param).validate(st)?;
    let mut constraint = None;
    if let Some(structured) = &structured {
        let (param, structured) = match structured {
            Structured::Tools(_) => ("tools", structured.clone()),
            Structured::Json(_) => ("response_format", structured.clone()),
        };
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
                let c = match structured {
                    Structured::Json(spec) => grammars
                        .constraint(&spec)
                        .map(|c| Box::new(c) as Box<dyn TokenConstraint>),
                    Structured::Tools(plan) => grammars
                        .tool_constraint(plan)
                        .map(|c| Box::new(c) as Box<dyn TokenConstraint>),
                };
                c.map_err(|e| match e {
                    // The machine's fault, not the schema's.
                    porteiro_grammar::GrammarError::Thread(_) => ApiError::internal(e.to_string()),
                    _ => ApiError::invalid(param, format!("The schema cannot be enforced: {e}")),
                })
            })
            .await?,
        );
    }
    let (msgs, tools, spec) = (req.messages.clone(), req.tools.clone(), structured.clone());
    let prompt = blocking(st, move |g| {
        let mut text = build(g.template.as_ref(), &msgs, tools.as_ref(), spec.as_ref())?;
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
    let ask = Ask {
        max_tokens,
        limits,
        logprobs,
        constraint,
        adapter,
    };
    let calls = match structured {
        Some(Structured::Tools(plan)) => Some((
            plan.syntax,
            plan.tools.into_iter().map(|t| t.name).collect(),
        )),
        _ => None,
    };
    submit(st, g, prompt, ask).map(|rx| (rx, calls))
}

// ------------------------------------------------------------------------------------------------
// Legacy completions
// ------------------------------------------------------------------------------------------------

/// Validates a legacy completion and submits it; returns the prompt's text when `echo` asks for it.
async fn prepare_completion(
    st: &AppState,
    req: &CompletionRequest,
    adapter: Option<Arc<Adapter>>,
) -> Result<(UnboundedReceiver<Event>, Option<String>), ApiError> {
    let g = loaded(st)?;
    if req.suffix.is_some() {
        return Err(ApiError::invalid(
            "suffix",
            "`suffix` is not supported: insertion is not implemented.",
        ));
    }
    refuse_logit_bias(&req.logit_bias)?;
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
    let limits = knobs!(req, req.max_tokens, "max_tokens").validate(st)?;
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
    let prompt = match req.prompt.clone() {
        None => return Err(ApiError::invalid("prompt", "`prompt` is required.")),
        Some(Prompt::Text(t)) => {
            blocking(st, move |g| Ok(g.tokenizer.encode(&t, true, true))).await?
        }
        Some(Prompt::Texts(mut v)) => {
            one("prompts", v.len())?;
            let t = v.swap_remove(0);
            blocking(st, move |g| Ok(g.tokenizer.encode(&t, true, true))).await?
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
    let ask = Ask {
        max_tokens,
        limits,
        logprobs,
        constraint: None,
        adapter,
    };
    let rx = submit(st, g, prompt, ask)?;
    Ok((rx, echo_text))
}

// ------------------------------------------------------------------------------------------------
// Engine events into chunks
// ------------------------------------------------------------------------------------------------

fn finish_reason(f: EngineFinish) -> FinishReason {
    match f {
        EngineFinish::Stop => FinishReason::Stop,
        EngineFinish::Length => FinishReason::Length,
    }
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

/// Engine log-probabilities in the legacy layout; `offset` is the text offset of the first.
fn completion_logprobs(lps: &[TokenLogprob], offset: &mut usize) -> CompletionLogprobs {
    let mut acc = CompletionLogprobs::default();
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
    acc
}

enum Shape {
    Chat {
        /// An answer that may call tools: split into content and `tool_calls` deltas as it is
        /// generated (every complete call checked at the end).
        tools: Option<Box<CallParser>>,
    },
    Completion {
        /// The prompt's text, sent before the first generated text.
        echo: Option<String>,
        offset: usize,
    },
}

struct Events {
    rx: UnboundedReceiver<Event>,
    shape: Shape,
    /// A failure inside a stream is reported as a server error event (a 200 is already sent);
    /// before a JSON answer, as 503 with Retry-After.
    stream: bool,
    first: bool,
    done: bool,
}

fn events_to_chunks(rx: UnboundedReceiver<Event>, shape: Shape, stream: bool) -> Chunks {
    let ev = Events {
        rx,
        shape,
        stream,
        first: true,
        done: false,
    };
    Box::pin(
        stream::unfold(ev, |mut ev| async move {
            if ev.done {
                return None;
            }
            let batch = ev.next().await;
            Some((stream::iter(batch), ev))
        })
        .flatten(),
    )
}

impl Events {
    async fn next(&mut self) -> Vec<Result<Chunk, TierError>> {
        let Some(event) = self.rx.recv().await else {
            self.done = true;
            return vec![Err(ApiError::internal(
                "The engine stopped before the answer was complete.",
            )
            .into())];
        };
        match event {
            Event::Text { text, logprobs } => {
                self.text(text, &logprobs).into_iter().map(Ok).collect()
            }
            Event::Done { finish, usage } => {
                self.done = true;
                self.finish(finish_reason(finish), usage)
            }
            Event::Error(msg) => {
                self.done = true;
                let e = if self.stream {
                    ApiError::internal(msg)
                } else {
                    ApiError::unavailable(msg)
                };
                vec![Err(e.into())]
            }
        }
    }

    fn text(&mut self, text: String, lps: &[TokenLogprob]) -> Option<Chunk> {
        let first = self.first;
        let mut d = ChoiceDelta {
            role: first.then_some("assistant"),
            ..Default::default()
        };
        match &mut self.shape {
            Shape::Chat { tools } => {
                if !lps.is_empty() {
                    d.logprobs = Some(Logprobs::Chat(ChatLogprobs {
                        content: lps.iter().map(chat_logprob).collect(),
                    }));
                }
                match tools {
                    Some(p) => {
                        let split = p.push(&text);
                        if split.calls.is_empty() && split.content.is_empty() && !first {
                            return None;
                        }
                        d.content = (!split.content.is_empty()).then_some(split.content);
                        d.tool_calls = (!split.calls.is_empty()).then_some(split.calls);
                    }
                    None => d.content = Some(text),
                }
            }
            Shape::Completion { echo, offset } => {
                d.role = None;
                let mut text = text;
                if first {
                    if let Some(e) = echo.take() {
                        *offset = e.len();
                        text.insert_str(0, &e);
                    }
                }
                if !lps.is_empty() {
                    d.logprobs = Some(Logprobs::Completion(completion_logprobs(lps, offset)));
                }
                d.content = Some(text);
            }
        }
        self.first = false;
        Some(Chunk::choice(d))
    }

    fn finish(
        &mut self,
        finish: FinishReason,
        usage: porteiro_engine::scheduler::Usage,
    ) -> Vec<Result<Chunk, TierError>> {
        let mut out = Vec::new();
        let mut finish = finish;
        let mut first = self.first;
        let mut last = ChoiceDelta::default();
        match &mut self.shape {
            Shape::Chat { tools } => {
                if let Some(p) = tools {
                    let (rest, calls) = match p.finish() {
                        Ok(r) => r,
                        Err(e) => return vec![Err(e.into())],
                    };
                    if calls > 0 && finish == FinishReason::Stop {
                        finish = FinishReason::ToolCalls;
                    }
                    if !rest.calls.is_empty() || !rest.content.is_empty() {
                        out.push(Ok(Chunk::choice(ChoiceDelta {
                            role: first.then_some("assistant"),
                            content: (!rest.content.is_empty()).then_some(rest.content),
                            tool_calls: (!rest.calls.is_empty()).then_some(rest.calls),
                            ..Default::default()
                        })));
                        first = false;
                    }
                }
                last.role = first.then_some("assistant");
                last.content = (first && tools.is_none()).then(String::new);
            }
            Shape::Completion { echo, .. } => {
                last.content = Some(echo.take().unwrap_or_default());
            }
        }
        last.finish_reason = Some(finish);
        out.push(Ok(Chunk::choice(last)));
        out.push(Ok(Chunk::usage(Usage::new(
            usage.prompt_tokens,
            usage.completion_tokens,
        ))));
        out
    }
}
