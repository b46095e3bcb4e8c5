//! Tiers behind one endpoint. A chat request for the auto model (`router.auto_model`) is routed by
//! the semantic router; a request naming an upstream (its `name` or `model`) goes there directly;
//! anything else is the local model's.
//!
//! Upstream answers are passed through (JSON, or SSE chunk by chunk). When the upstream fails before
//! the first token (down, breaker open, 5xx after retries, timeout) the local tier answers instead;
//! when a stream breaks after tokens reached the client, the local model continues from the text
//! already streamed (`mid_stream = "continue"`) or the stream ends with an error event — never a
//! silently truncated answer. Every routed response carries `x-porteiro-tier`, `x-porteiro-route`
//! and `x-porteiro-score` (plus `x-porteiro-fallback` when the local tier took over).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::http::HeaderValue;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, StreamExt};
use porteiro_config::{MidStream, RouterConfig, LOCAL_TIER};
use porteiro_engine::scheduler::Event;
use porteiro_privacy::{StreamUnmasker, Unmasker};
use porteiro_protocol::{ChatCompletionRequest, Content};
use porteiro_router::{Decision, Router};
use porteiro_upstream::{ChunkStream, Reply, UpstreamClient, UpstreamError};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::generation::{chat_local, finish_reason, local_chat_events};
use crate::privacy::{counts_list, describe, unmask_json, Counts, RequestCtx, Verdict};
use crate::telemetry::Trace;
use crate::{ApiError, AppState};

/// Request fields only local servers understand; removed before a body goes upstream.
const LOCAL_ONLY_FIELDS: [&str; 4] = ["top_k", "min_p", "repetition_penalty", "ignore_eos"];

pub struct Routing {
    pub cfg: RouterConfig,
    /// None when no sentence encoder is loaded (then auto requests stay local).
    pub router: Option<Router>,
    /// Cheapest first, as configured.
    pub upstreams: Vec<Arc<UpstreamClient>>,
}

/// Where a request goes.
pub struct Routed {
    /// Index into `Routing::upstreams`; None is the local tier.
    pub upstream: Option<usize>,
    pub decision: Option<Decision>,
}

/// Routes requests for the auto model or an upstream's name; None for anything else.
pub async fn resolve(
    st: &AppState,
    req: &ChatCompletionRequest,
) -> Result<Option<Routed>, ApiError> {
    let Some(r) = st.routing() else {
        return Ok(None);
    };
    if let Some(i) = r
        .upstreams
        .iter()
        .position(|u| u.name() == req.model || u.config().model == req.model)
    {
        if req.model != st.settings.model_id {
            return Ok(Some(Routed {
                upstream: Some(i),
                decision: None,
            }));
        }
    }
    if req.model != r.cfg.auto_model {
        return Ok(None);
    }
    let text = porteiro_router::request_text(req.messages.iter().map(|m| {
        let content = match &m.content {
            Some(Content::Text(t)) => t.as_str(),
            Some(Content::Parts(p)) => p.iter().find_map(|p| p.text.as_deref()).unwrap_or_default(),
            None => "",
        };
        (m.role.as_str(), content)
    }));
    let st2 = st.clone();
    let decision = tokio::task::spawn_blocking(move || {
        st2.routing()
            .and_then(|r| r.router.as_ref())
            .map(|router| router.decide(&text))
    })
    .await
    .map_err(|e| ApiError::internal(format!("routing: {e}")))?;
    let upstream = decision
        .as_ref()
        .and_then(|d| r.upstreams.iter().position(|u| u.name() == d.tier));
    Ok(Some(Routed { upstream, decision }))
}

fn header(resp: &mut Response, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        resp.headers_mut().insert(name, v);
    }
}

fn decorate(
    mut resp: Response,
    tier: &str,
    d: Option<&Decision>,
    fallback: Option<&str>,
) -> Response {
    header(&mut resp, "x-porteiro-tier", tier);
    header(
        &mut resp,
        "x-porteiro-route",
        d.map_or("explicit", |d| d.route.as_str()),
    );
    header(
        &mut resp,
        "x-porteiro-score",
        &d.map_or_else(|| "none".to_string(), |d| d.score_header()),
    );
    if let Some(f) = fallback {
        header(&mut resp, "x-porteiro-fallback", f);
    }
    resp
}

fn failure_kind(e: &UpstreamError) -> &'static str {
    match e {
        UpstreamError::Status { status: 429, .. } => "rate_limited",
        UpstreamError::Status { .. } => "status",
        UpstreamError::Connect { .. } => "connect",
        UpstreamError::Timeout { .. } => "timeout",
        UpstreamError::BreakerOpen { .. } => "breaker_open",
        UpstreamError::Protocol { .. } => "protocol",
        UpstreamError::Broken { .. } => "broken_stream",
    }
}

/// Serves a routed chat request.
pub async fn serve_routed(
    st: AppState,
    req: ChatCompletionRequest,
    raw: Value,
    routed: Routed,
    t0: Instant,
    ctx: RequestCtx,
    trace: Trace,
) -> Result<Response, ApiError> {
    let routing = st
        .routing()
        .ok_or_else(|| ApiError::internal("routing is not configured"))?;
    let d = routed.decision.as_ref();
    let local_id = st.settings.model_id.clone();
    let wanted = match d {
        Some(d) if d.would_escalate && routed.upstream.is_none() => "escalate".to_string(),
        Some(d) => d.tier.clone(),
        None => routed.upstream.map_or(LOCAL_TIER.to_string(), |i| {
            routing.upstreams[i].name().to_string()
        }),
    };
    let route = d.map_or("explicit", |d| d.route.as_str()).to_string();
    trace.route(&route);
    let secs = d.map_or(0.0, |d| d.elapsed.as_secs_f64());
    let Some(i) = routed.upstream else {
        audit_local(&st, &ctx, &raw, &route);
        st.metrics.routed(&wanted, LOCAL_TIER, &route, secs);
        let resp = chat_local(&st, &req, t0, Some(local_id), trace).await?;
        return Ok(decorate(resp, LOCAL_TIER, d, None));
    };
    let client = routing.upstreams[i].clone();
    trace.served(client.name(), &client.config().model);
    let streaming = raw["stream"].as_bool().unwrap_or(false);
    let client_wants_usage = raw["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false);
    let mut body = raw;
    if let Some(o) = body.as_object_mut() {
        for f in LOCAL_ONLY_FIELDS {
            o.remove(f);
        }
    }
    let mut unmasker: Option<Unmasker> = None;
    let mut action = "none";
    if let Some(g) = st.privacy() {
        let tier = client.name();
        let verdict = g.inspect(&body, tier, d.map(|d| d.route.as_str()));
        let (act, counts): (&'static str, Counts) = match &verdict {
            Verdict::Clean => ("none", Counts::new()),
            Verdict::KeepLocal(c) => ("keep_local", c.clone()),
            Verdict::Block(c) => ("block", c.clone()),
            Verdict::Mask(c, ..) => ("mask", c.clone()),
            Verdict::Allow(c) => ("allow", c.clone()),
        };
        let served = if act == "keep_local" {
            LOCAL_TIER
        } else {
            tier
        };
        g.audit(&ctx, served, &route, act, &counts);
        st.metrics.privacy(served, act, &counts_list(&counts));
        trace.privacy(act);
        action = act;
        match verdict {
            Verdict::KeepLocal(_) => {
                st.metrics.routed(&wanted, LOCAL_TIER, &route, secs);
                let resp = chat_local(&st, &req, t0, Some(local_id), trace).await?;
                let mut resp = decorate(resp, LOCAL_TIER, d, None);
                header(&mut resp, "x-porteiro-privacy", "keep_local");
                return Ok(resp);
            }
            Verdict::Block(c) => {
                return Err(ApiError::invalid(
                    "messages",
                    format!(
                        "This request holds personal data or secrets ({}); the privacy policy for tier `{tier}` is `block`, so it was not sent.",
                        describe(&c)
                    ),
                ));
            }
            Verdict::Mask(_, masked, un) => {
                body = masked;
                unmasker = Some(un);
            }
            Verdict::Clean | Verdict::Allow(_) => {}
        }
    }
    let privacy_header = |mut resp: Response| {
        if action != "none" {
            header(&mut resp, "x-porteiro-privacy", action);
        }
        resp
    };
    if streaming {
        // Usage comes back in the stream's last chunk; it is removed again unless the client asked.
        body["stream_options"]["include_usage"] = true.into();
    }
    let waited = Instant::now();
    let reply = client.chat(body).await;
    trace.upstream_wait(waited.elapsed());
    let fallback = |e: UpstreamError| {
        let st = st.clone();
        let req = req.clone();
        let (local_id, wanted, route) = (local_id.clone(), wanted.clone(), route.clone());
        let d = routed.decision.clone();
        let trace = trace.clone();
        async move {
            st.metrics
                .upstream_failure(client_name(&st, i), failure_kind(&e));
            st.metrics
                .fallback(client_name(&st, i), "before_first_token");
            st.metrics.routed(&wanted, LOCAL_TIER, &route, secs);
            trace.fallback(failure_kind(&e));
            let resp = chat_local(&st, &req, t0, Some(local_id), trace).await?;
            Ok(decorate(
                resp,
                LOCAL_TIER,
                d.as_ref(),
                Some(failure_kind(&e)),
            ))
        }
    };
    match reply {
        Err(e) => fallback(e).await,
        Ok((Reply::Json(mut v), _)) => {
            st.metrics.routed(&wanted, client.name(), &route, secs);
            trace.token();
            trace.usage(
                v["usage"]["prompt_tokens"].as_u64().unwrap_or(0),
                v["usage"]["completion_tokens"].as_u64().unwrap_or(0),
            );
            if let Some(un) = &unmasker {
                unmask_json(&mut v, un);
            }
            Ok(privacy_header(decorate(
                Json(v).into_response(),
                client.name(),
                d,
                None,
            )))
        }
        Ok((Reply::Stream(mut s), _)) => match s.next().await {
            None => {
                fallback(UpstreamError::Broken {
                    name: client.name().to_string(),
                    why: "empty stream".into(),
                })
                .await
            }
            Some(Err(e)) => fallback(e).await,
            Some(Ok(first)) => {
                st.metrics.routed(&wanted, client.name(), &route, secs);
                let relay = Relay {
                    st: st.clone(),
                    req: req.clone(),
                    upstream: client.name().to_string(),
                    mode: routing.cfg.mid_stream,
                    phase: Phase::Upstream(s),
                    pending: Some(first),
                    text: String::new(),
                    id: String::new(),
                    model: String::new(),
                    created: crate::unix_now(),
                    unmask: unmasker,
                    held: BTreeMap::new(),
                    prefix: Vec::new(),
                    trace: trace.clone(),
                    client_wants_usage,
                };
                let events = stream::unfold(relay, |mut r| async move {
                    let batch = r.next_events().await?;
                    Some((stream::iter(batch.into_iter().map(Ok::<_, Infallible>)), r))
                })
                .flatten();
                let resp = Sse::new(events)
                    .keep_alive(KeepAlive::default())
                    .into_response();
                Ok(privacy_header(decorate(resp, client.name(), d, None)))
            }
        },
    }
}

/// Audit record of a request the local tier serves (nothing leaves the machine).
pub(crate) fn audit_local(st: &AppState, ctx: &RequestCtx, raw: &Value, route: &str) {
    if let Some(g) = st.privacy() {
        let counts = g.count(raw);
        g.audit(ctx, LOCAL_TIER, route, "none", &counts);
        st.metrics
            .privacy(LOCAL_TIER, "none", &counts_list(&counts));
    }
}

fn client_name(st: &AppState, i: usize) -> &str {
    st.routing().map_or("?", |r| r.upstreams[i].name())
}

enum Phase {
    Upstream(ChunkStream),
    Local(UnboundedReceiver<Event>),
    Done,
}

/// Relays an upstream stream to the client, switching to the local model if it breaks.
struct Relay {
    st: AppState,
    req: ChatCompletionRequest,
    upstream: String,
    mode: MidStream,
    phase: Phase,
    pending: Option<Value>,
    /// Assistant text the client has received so far.
    text: String,
    id: String,
    model: String,
    created: u64,
    /// Restores placeholders when the request was masked.
    unmask: Option<Unmasker>,
    /// (choice, tool call or u64::MAX for content) -> text held back mid-placeholder.
    held: BTreeMap<(u64, u64), StreamUnmasker>,
    /// Events to send before the next ones (held text flushed when the upstream stream ends).
    prefix: Vec<SseEvent>,
    trace: Trace,
    /// Whether the client asked for the usage chunk (Porteiro always asks the upstream for it).
    client_wants_usage: bool,
}

const CONTENT: u64 = u64::MAX;

fn data(v: &Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}

fn error_events(msg: &str) -> Vec<SseEvent> {
    vec![
        data(
            &json!({"error": {"message": msg, "type": "server_error", "param": null, "code": null}}),
        ),
        SseEvent::default().data("[DONE]"),
    ]
}

impl Relay {
    fn chunk(
        &self,
        content: Option<&str>,
        finish: Option<porteiro_protocol::FinishReason>,
    ) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": 0,
                "delta": match content { Some(c) => json!({"content": c}), None => json!({}) },
                "finish_reason": finish,
            }],
        })
    }

    /// Restores placeholders in a chunk's content and tool-call arguments; a finishing choice
    /// releases whatever it still holds.
    fn unmask_chunk(&mut self, v: &mut Value) {
        let Some(un) = &self.unmask else {
            return;
        };
        let Some(choices) = v.get_mut("choices").and_then(Value::as_array_mut) else {
            return;
        };
        for ch in choices {
            let idx = ch["index"].as_u64().unwrap_or(0);
            let finishing = !ch["finish_reason"].is_null();
            let delta = &mut ch["delta"];
            let mut push = |key: (u64, u64), text: &str| {
                let s = self.held.entry(key).or_insert_with(|| un.stream());
                let mut out = s.push(text);
                if finishing {
                    out.push_str(&s.finish());
                }
                out
            };
            if let Some(c) = delta["content"].as_str() {
                let c = c.to_string();
                delta["content"] = push((idx, CONTENT), &c).into();
            }
            if let Some(tcs) = delta["tool_calls"].as_array_mut() {
                for tc in tcs {
                    let ti = tc["index"].as_u64().unwrap_or(0);
                    if let Some(a) = tc["function"]["arguments"].as_str() {
                        let a = a.to_string();
                        tc["function"]["arguments"] = push((idx, ti), &a).into();
                    }
                }
            }
            if finishing {
                // Held text whose key did not appear in this chunk.
                let keys: Vec<(u64, u64)> = self
                    .held
                    .range((idx, 0)..=(idx, CONTENT))
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
                        let c = delta["content"].as_str().unwrap_or_default().to_string();
                        delta["content"] = (c + &rest).into();
                    } else {
                        let entry = json!({"index": key.1, "function": {"arguments": rest}});
                        match delta["tool_calls"].as_array_mut() {
                            Some(a) => a.push(entry),
                            None => delta["tool_calls"] = json!([entry]),
                        }
                    }
                }
            }
        }
    }

    /// A chunk carrying everything still held (the stream ended without a finishing chunk).
    fn flush_held(&mut self) -> Option<SseEvent> {
        let held = std::mem::take(&mut self.held);
        let text: String = held
            .into_iter()
            .filter(|((_, k), _)| *k == CONTENT)
            .map(|(_, mut s)| s.finish())
            .collect();
        if text.is_empty() {
            return None;
        }
        self.text.push_str(&text);
        Some(data(&self.chunk(Some(&text), None)))
    }

    /// The event for an upstream chunk; None for a usage chunk the client did not ask for.
    fn forward(&mut self, mut v: Value) -> Option<SseEvent> {
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            self.trace.usage(
                u["prompt_tokens"].as_u64().unwrap_or(0),
                u["completion_tokens"].as_u64().unwrap_or(0),
            );
            let no_choices = v["choices"].as_array().is_none_or(|c| c.is_empty());
            if no_choices && !self.client_wants_usage {
                return None;
            }
        }
        self.unmask_chunk(&mut v);
        if self.id.is_empty() {
            self.id = v["id"].as_str().unwrap_or("chatcmpl-upstream").to_string();
            self.model = v["model"].as_str().unwrap_or(&self.upstream).to_string();
            if let Some(c) = v["created"].as_u64() {
                self.created = c;
            }
        }
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            if !t.is_empty() {
                self.trace.token();
            }
            self.text.push_str(t);
        }
        Some(data(&v))
    }

    /// The next SSE events; None once the stream is over.
    async fn next_events(&mut self) -> Option<Vec<SseEvent>> {
        let next = self.next_inner().await;
        let mut out = std::mem::take(&mut self.prefix);
        match next {
            Some(ev) => {
                out.extend(ev);
                Some(out)
            }
            None if !out.is_empty() => Some(out),
            None => None,
        }
    }

    async fn next_inner(&mut self) -> Option<Vec<SseEvent>> {
        if let Some(v) = self.pending.take() {
            if let Some(ev) = self.forward(v) {
                return Some(vec![ev]);
            }
        }
        loop {
            match &mut self.phase {
                Phase::Done => return None,
                Phase::Upstream(s) => {
                    let waited = Instant::now();
                    let next = s.next().await;
                    self.trace.upstream_wait(waited.elapsed());
                    match next {
                        Some(Ok(v)) => {
                            if let Some(ev) = self.forward(v) {
                                return Some(vec![ev]);
                            }
                        }
                        None => {
                            if self.trace.stores_text() {
                                self.trace.texts(None, Some(self.text.clone()));
                            }
                            self.phase = Phase::Done;
                            let mut ev: Vec<SseEvent> = self.flush_held().into_iter().collect();
                            ev.push(SseEvent::default().data("[DONE]"));
                            return Some(ev);
                        }
                        Some(Err(e)) => {
                            if let Some(ev) = self.flush_held() {
                                self.prefix.push(ev);
                            }
                            self.trace.fallback("mid_stream");
                            self.st
                                .metrics
                                .upstream_failure(&self.upstream, failure_kind(&e));
                            if self.mode == MidStream::Error {
                                self.trace.fail(502, &e.to_string());
                                self.phase = Phase::Done;
                                return Some(error_events(&format!(
                                    "The upstream answer broke off: {e}"
                                )));
                            }
                            self.st.metrics.fallback(&self.upstream, "mid_stream");
                            let mut req = self.req.clone();
                            req.stream = Some(true);
                            match local_chat_events(&self.st, &req, Some(self.text.clone())).await {
                                Ok((rx, _)) => self.phase = Phase::Local(rx),
                                Err(err) => {
                                    self.phase = Phase::Done;
                                    return Some(error_events(&format!(
                                    "The upstream answer broke off ({e}) and the local tier could not continue it: {}",
                                    err.message
                                )));
                                }
                            }
                        }
                    }
                }
                Phase::Local(rx) => {
                    let ev = rx.recv().await;
                    return Some(match ev {
                        Some(Event::Text { text, .. }) => {
                            self.trace.token();
                            self.text.push_str(&text);
                            vec![data(&self.chunk(Some(&text), None))]
                        }
                        Some(Event::Done { finish, usage }) => {
                            self.trace.add_usage(0, usage.completion_tokens as u64);
                            if self.trace.stores_text() {
                                self.trace.texts(None, Some(self.text.clone()));
                            }
                            self.phase = Phase::Done;
                            vec![
                                data(&self.chunk(None, Some(finish_reason(finish)))),
                                SseEvent::default().data("[DONE]"),
                            ]
                        }
                        Some(Event::Error(msg)) => {
                            self.trace.fail(500, &msg);
                            self.phase = Phase::Done;
                            error_events(&msg)
                        }
                        None => {
                            self.trace.fail(500, "the engine stopped");
                            self.phase = Phase::Done;
                            error_events("The engine stopped before the answer was complete.")
                        }
                    });
                }
            }
        }
    }
}
