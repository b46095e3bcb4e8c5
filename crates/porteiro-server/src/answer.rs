//! The combinators between a tier and the response, applied in this order for every answer:
//!
//! 1. [`first_answer`]: the plan's tiers in order; one that fails before its first chunk hands
//!    over to the next (fallback).
//! 2. [`continue_locally`]: an upstream stream that breaks after its first chunk is continued by the
//!    local model from the text already sent (or ends with an error, per `router.mid_stream`).
//! 3. [`unmask`]: placeholders of a masked request restored in the answer, even when one is cut
//!    across chunks.
//! 4. [`observe`]: the one place that feeds the request's trace and the HTTP-level metrics.
//!
//! Then `respond` encodes the chunks as server-sent events or collects them into one JSON body.

use std::collections::BTreeMap;
use std::time::Instant;

use futures_util::stream::{self, StreamExt};
use porteiro_config::{MidStream, LOCAL_TIER};
use porteiro_privacy::{StreamUnmasker, Unmasker};
use porteiro_protocol::{FinishReason, FunctionDelta, ToolCallDelta, Usage};
use serde_json::Value;

use crate::privacy::unmask_json;
use crate::telemetry::Trace;
use crate::tier::local::LocalTier;
use crate::tier::{Api, ChoiceDelta, Chunk, Chunks, Tier, TierError, TierRequest};
use crate::{ApiError, AppState};

/// The tier that started answering.
pub struct Started {
    pub tier: String,
    pub chunks: Chunks,
    /// Why an earlier tier was skipped (`x-porteiro-fallback`).
    pub fallback: Option<&'static str>,
}

/// Tries the tiers in order. A tier with a successor must deliver its first chunk before it
/// serves (the client has seen nothing yet, so the next tier can still answer instead); the last
/// tier serves whatever happens. `serving` is told the tier that serves, as soon as it is known.
pub async fn first_answer(
    st: &AppState,
    tiers: Vec<Box<dyn Tier>>,
    req: &TierRequest,
    trace: &Trace,
    serving: &(dyn Fn(&str) + Sync),
) -> Result<Started, TierError> {
    let n = tiers.len();
    let mut fallback = None;
    for (i, tier) in tiers.into_iter().enumerate() {
        let last = i + 1 == n;
        trace.served(tier.name(), tier.model());
        if last {
            serving(tier.name());
        }
        let local = tier.name() == LOCAL_TIER;
        let waited = Instant::now();
        let answer = tier.answer(req).await;
        if !local {
            trace.upstream_wait(waited.elapsed());
        }
        // The wait for the first chunk counts as waiting on the upstream, like every later one.
        let failed = match answer.map(|c| waited_on(c, trace, local)) {
            Ok(chunks) if last => {
                return Ok(Started {
                    tier: tier.name().to_string(),
                    chunks,
                    fallback,
                })
            }
            Ok(mut chunks) => match chunks.next().await {
                Some(Ok(c)) => {
                    serving(tier.name());
                    return Ok(Started {
                        tier: tier.name().to_string(),
                        chunks: Box::pin(stream::iter([Ok(c)]).chain(chunks)),
                        fallback,
                    });
                }
                Some(Err(TierError::Upstream(e))) => e,
                Some(Err(e)) => return Err(e),
                None => porteiro_upstream::UpstreamError::Broken {
                    name: tier.name().to_string(),
                    why: "empty stream".into(),
                },
            },
            Err(TierError::Upstream(e)) if !last => e,
            Err(e) => return Err(e),
        };
        let kind = crate::tier::upstream::failure_kind(&failed);
        st.metrics.upstream_failure(tier.name(), kind);
        st.metrics.fallback(tier.name(), "before_first_token");
        trace.fallback(kind);
        fallback = Some(kind);
    }
    Err(ApiError::internal("no tier could answer this request").into())
}

/// Adds the time spent waiting on an upstream's chunks to the trace (the gateway's overhead is
/// the request's time minus that).
fn waited_on(chunks: Chunks, trace: &Trace, local: bool) -> Chunks {
    if local {
        return chunks;
    }
    let trace = trace.clone();
    Box::pin(stream::unfold(
        (chunks, trace),
        |(mut s, trace)| async move {
            let t = Instant::now();
            let next = s.next().await;
            trace.upstream_wait(t.elapsed());
            next.map(|item| (item, (s, trace)))
        },
    ))
}

// ------------------------------------------------------------------------------------------------
// Continuation after a broken stream
// ------------------------------------------------------------------------------------------------

struct Continuation {
    st: AppState,
    upstream: String,
    mode: MidStream,
    req: TierRequest,
    inner: Chunks,
    /// Content sent so far (what the local model continues from).
    text: String,
    local: bool,
    done: bool,
}

/// When an upstream stream breaks after its first chunk, the local model continues from the text
/// already streamed (`mid_stream = "continue"`), or the stream ends with an error event
/// (`"error"`): a 200 must never end silently short.
pub fn continue_locally(
    st: &AppState,
    upstream: &str,
    mode: MidStream,
    req: TierRequest,
    chunks: Chunks,
    trace: &Trace,
) -> Chunks {
    let c = Continuation {
        st: st.clone(),
        upstream: upstream.to_string(),
        mode,
        req,
        inner: chunks,
        text: String::new(),
        local: false,
        done: false,
    };
    let trace = trace.clone();
    Box::pin(stream::unfold((c, trace), |(mut c, trace)| async move {
        if c.done {
            return None;
        }
        let item = c.next(&trace).await?;
        Some((item, (c, trace)))
    }))
}

impl Continuation {
    async fn next(&mut self, trace: &Trace) -> Option<Result<Chunk, TierError>> {
        match self.inner.next().await {
            None => None,
            Some(Ok(mut c)) => {
                if self.local {
                    // The continuation speaks as the upstream's answer: no second role, and its
                    // tokens are observed but not reported as the answer's usage.
                    for d in &mut c.choices {
                        d.role = None;
                    }
                    if let Some(u) = c.usage.as_mut() {
                        *u = Usage::new(0, u.completion_tokens as usize);
                        c.usage_observed_only = true;
                    }
                } else {
                    for d in &c.choices {
                        if let Some(t) = &d.content {
                            self.text.push_str(t);
                        }
                    }
                }
                Some(Ok(c))
            }
            Some(Err(TierError::Upstream(e))) if !self.local => {
                let kind = crate::tier::upstream::failure_kind(&e);
                trace.fallback("mid_stream");
                self.st.metrics.upstream_failure(&self.upstream, kind);
                if self.mode == MidStream::Error {
                    self.done = true;
                    return Some(Err(ApiError::bad_gateway(format!(
                        "The upstream answer broke off: {e}"
                    ))
                    .into()));
                }
                self.st.metrics.fallback(&self.upstream, "mid_stream");
                self.req.prefix = Some(self.text.clone());
                self.req.stream = true;
                let local = LocalTier::new(self.st.clone());
                match local.answer(&self.req).await {
                    Ok(chunks) => {
                        // The request stays recorded under the upstream that started it.
                        self.inner = chunks;
                        self.local = true;
                        Box::pin(self.next(trace)).await
                    }
                    Err(err) => {
                        self.done = true;
                        Some(Err(ApiError::internal(format!(
                            "The upstream answer broke off ({e}) and the local tier could not continue it: {}",
                            err.message()
                        ))
                        .into()))
                    }
                }
            }
            Some(Err(e)) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Un-masking
// ------------------------------------------------------------------------------------------------

/// Key of a held-back piece: (choice, tool call index or CONTENT).
const CONTENT: u64 = u64::MAX;

struct Unmasking {
    un: Unmasker,
    held: BTreeMap<(u32, u64), StreamUnmasker>,
}

impl Unmasking {
    fn push(&mut self, key: (u32, u64), text: &str, finishing: bool) -> String {
        let un = &self.un;
        let s = self.held.entry(key).or_insert_with(|| un.stream());
        let mut out = s.push(text);
        if finishing {
            out.push_str(&s.finish());
        }
        out
    }

    /// Restores a chunk's content and tool-call arguments; a finishing choice releases all it holds.
    fn chunk(&mut self, c: &mut Chunk) {
        for v in c.extra.values_mut() {
            unmask_json(v, &self.un);
        }
        for d in &mut c.choices {
            let finishing = d.finish_reason.is_some();
            let idx = d.index;
            if let Some(t) = d.content.take() {
                d.content = Some(self.push((idx, CONTENT), &t, finishing));
            }
            if let Some(calls) = d.tool_calls.as_mut() {
                for tc in calls.iter_mut() {
                    let a = std::mem::take(&mut tc.function.arguments);
                    tc.function.arguments = self.push((idx, u64::from(tc.index)), &a, finishing);
                }
            }
            for v in d.delta_extra.values_mut().chain(d.extra.values_mut()) {
                unmask_json(v, &self.un);
            }
            if finishing {
                self.release(d);
            }
        }
    }

    /// Held text of a finishing choice whose key did not appear in its last chunk.
    fn release(&mut self, d: &mut ChoiceDelta) {
        let keys: Vec<(u32, u64)> = self
            .held
            .range((d.index, 0)..=(d.index, CONTENT))
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            let rest = self
                .held
                .remove(&key)
                .map(|mut s| s.finish())
                .unwrap_or_default();
            if rest.is_empty() {
                continue;
            }
            if key.1 == CONTENT {
                d.content.get_or_insert_with(String::new).push_str(&rest);
            } else {
                d.tool_calls
                    .get_or_insert_with(Vec::new)
                    .push(ToolCallDelta {
                        index: key.1 as u32,
                        id: None,
                        kind: None,
                        function: FunctionDelta {
                            name: None,
                            arguments: rest,
                        },
                    });
            }
        }
    }

    /// A chunk with the content still held (the stream ended, or broke, without finishing).
    fn flush(&mut self) -> Option<Chunk> {
        let held = std::mem::take(&mut self.held);
        let mut by_choice: BTreeMap<u32, String> = BTreeMap::new();
        for ((choice, key), mut s) in held {
            if key == CONTENT {
                by_choice.entry(choice).or_default().push_str(&s.finish());
            }
        }
        let choices: Vec<ChoiceDelta> = by_choice
            .into_iter()
            .filter(|(_, t)| !t.is_empty())
            .map(|(index, t)| ChoiceDelta {
                index,
                content: Some(t),
                ..Default::default()
            })
            .collect();
        (!choices.is_empty()).then(|| Chunk {
            choices,
            ..Default::default()
        })
    }
}

/// Restores the placeholders of a masked request in its answer.
pub fn unmask(chunks: Chunks, un: Option<Unmasker>) -> Chunks {
    let Some(un) = un else {
        return chunks;
    };
    let state = Unmasking {
        un,
        held: BTreeMap::new(),
    };
    Box::pin(
        stream::unfold((chunks, state, false), |(mut s, mut u, done)| async move {
            if done {
                return None;
            }
            let batch: Vec<Result<Chunk, TierError>> = match s.next().await {
                Some(Ok(mut c)) => {
                    u.chunk(&mut c);
                    vec![Ok(c)]
                }
                Some(Err(e)) => {
                    let mut v: Vec<_> = u.flush().into_iter().map(Ok).collect();
                    v.push(Err(e));
                    v
                }
                None => {
                    let v: Vec<_> = u.flush().into_iter().map(Ok).collect();
                    if v.is_empty() {
                        return None;
                    }
                    return Some((stream::iter(v), (s, u, true)));
                }
            };
            Some((stream::iter(batch), (s, u, false)))
        })
        .flatten(),
    )
}

// ------------------------------------------------------------------------------------------------
// Observation
// ------------------------------------------------------------------------------------------------

struct Observer {
    st: AppState,
    trace: Trace,
    api: Api,
    t0: Instant,
    first: bool,
    /// The answer's text, when the request log keeps texts.
    text: Option<String>,
    /// The whole answer message, when it may become a flywheel sample or is tapped.
    message: Option<Message>,
    tap: Option<Tap>,
    prompt: u64,
    completion: u64,
    failed: bool,
}

/// An answer message put back together from its chunks (choice 0).
#[derive(Default)]
struct Message {
    content: String,
    /// (id, name, arguments) by call index.
    calls: BTreeMap<u32, (String, String, String)>,
    finish: Option<FinishReason>,
}

impl Message {
    fn add(&mut self, d: &ChoiceDelta) {
        if d.index != 0 {
            return;
        }
        if let Some(t) = &d.content {
            self.content.push_str(t);
        }
        for t in d.tool_calls.iter().flatten() {
            let c = self.calls.entry(t.index).or_default();
            if let Some(id) = &t.id {
                c.0.clone_from(id);
            }
            if let Some(n) = &t.function.name {
                c.1.push_str(n);
            }
            c.2.push_str(&t.function.arguments);
        }
        if d.finish_reason.is_some() {
            self.finish = d.finish_reason;
        }
    }

    fn json(self) -> (Value, Option<String>) {
        let mut m = serde_json::json!({"role": "assistant",
            "content": (!self.content.is_empty()).then_some(self.content)});
        if !self.calls.is_empty() {
            m["tool_calls"] = self
                .calls
                .into_values()
                .map(|(id, name, args)| {
                    serde_json::json!({"id": id, "type": "function",
                        "function": {"name": name, "arguments": args}})
                })
                .collect();
        }
        let finish = self
            .finish
            .and_then(|f| serde_json::to_value(f).ok())
            .and_then(|v| v.as_str().map(str::to_string));
        (m, finish)
    }
}

impl Observer {
    fn chunk(&mut self, c: &Chunk) {
        for d in &c.choices {
            if let Some(m) = self.message.as_mut() {
                m.add(d);
            }
            if d.has_output() {
                self.trace.token();
                if std::mem::replace(&mut self.first, false) {
                    self.st
                        .metrics
                        .first_token(self.api.endpoint(), self.t0.elapsed().as_secs_f64());
                }
            }
            if let (Some(acc), Some(t)) = (self.text.as_mut(), &d.content) {
                acc.push_str(t);
            }
        }
        if let Some(u) = c.usage {
            self.prompt += u64::from(u.prompt_tokens);
            self.completion += u64::from(u.completion_tokens);
            self.trace
                .add_usage(u64::from(u.prompt_tokens), u64::from(u.completion_tokens));
        }
    }

    fn failed(&mut self, e: &TierError) {
        self.failed = true;
        let status = match e {
            TierError::Upstream(_) => 502,
            TierError::Api(a) => a.status.as_u16(),
        };
        self.trace.fail(status, &e.message());
    }

    fn done(&mut self) {
        if self.failed {
            return;
        }
        self.trace.texts(None, self.text.take());
        if let Some(m) = self.message.take() {
            let (answer, finish) = m.json();
            if let Some(tap) = self.tap.take() {
                tap(answer.clone());
            }
            if self.trace.collects() {
                self.trace.sample_answer(answer, finish);
            }
        }
        self.st.metrics.generation_done(
            self.api.endpoint(),
            self.t0.elapsed().as_secs_f64(),
            self.prompt as usize,
            self.completion as usize,
        );
    }
}

/// Called with the whole answer message (choice 0) once an answer completed without error.
pub type Tap = Box<dyn FnOnce(Value) + Send>;

/// Feeds the trace (tokens, usage, texts, outcome) and the HTTP-level metrics (first token,
/// generation done) from the chunks as they pass: every tier, every path, one place. `tap` gets the
/// complete answer (the flywheel's comparisons).
pub fn observe(
    st: &AppState,
    chunks: Chunks,
    trace: &Trace,
    api: Api,
    t0: Instant,
    tap: Option<Tap>,
) -> Chunks {
    let obs = Observer {
        st: st.clone(),
        trace: trace.clone(),
        api,
        t0,
        first: true,
        text: trace.stores_text().then(String::new),
        message: ((trace.collects() || tap.is_some()) && api == Api::Chat).then(Message::default),
        tap,
        prompt: 0,
        completion: 0,
        failed: false,
    };
    Box::pin(stream::unfold((chunks, obs), |(mut s, mut o)| async move {
        match s.next().await {
            Some(Ok(c)) => {
                o.chunk(&c);
                Some((Ok(c), (s, o)))
            }
            Some(Err(e)) => {
                o.failed(&e);
                Some((Err(e), (s, o)))
            }
            None => {
                o.done();
                None
            }
        }
    }))
}

/// The answer message (choice 0) of a whole stream of chunks; None when the tier failed.
pub async fn message(mut chunks: Chunks) -> Option<Value> {
    let mut m = Message::default();
    while let Some(c) = chunks.next().await {
        for d in &c.ok()?.choices {
            m.add(d);
        }
    }
    Some(m.json().0)
}
