//! The last step of every answer: chunks encoded as server-sent events (OpenAI's chunk objects,
//! then `data: [DONE]`), or collected into one JSON response. Fields an upstream sent that Porteiro
//! does not model are merged back at the level they came from.

use std::collections::BTreeMap;
use std::convert::Infallible;

use axum::http::HeaderValue;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, StreamExt};
use porteiro_protocol::{
    AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChatLogprobs, ChunkChoice,
    Completion, CompletionChoice, CompletionLogprobs, Delta, FinishReason, FunctionCall, ToolCall,
    Usage,
};
use serde_json::{Map, Value};

use crate::tier::{Api, ChoiceDelta, Chunk, Chunks, Head, Logprobs};
use crate::ApiError;

/// What every chunk of one response shares.
pub struct Shape {
    pub api: Api,
    pub id: String,
    pub model: String,
    pub created: u64,
    pub system_fingerprint: Option<String>,
    /// `stream_options.include_usage`: `usage: null` on every chunk and a last usage chunk.
    pub include_usage: bool,
    /// Whether the id and model are still the defaults (an upstream's head replaces them once).
    adopted: bool,
}

impl Shape {
    pub fn new(api: Api, id: String, model: String, created: u64, include_usage: bool) -> Self {
        Self {
            api,
            id,
            model,
            created,
            system_fingerprint: None,
            include_usage,
            adopted: false,
        }
    }

    fn adopt(&mut self, head: &Option<Head>) {
        if let (false, Some(h)) = (self.adopted, head) {
            self.id = h.id.clone();
            self.model = h.model.clone();
            if let Some(c) = h.created {
                self.created = c;
            }
            self.system_fingerprint = h.system_fingerprint.clone();
            self.adopted = true;
        }
    }
}

fn merge(target: &mut Value, extra: &Map<String, Value>) {
    if let Some(o) = target.as_object_mut() {
        for (k, v) in extra {
            o.insert(k.clone(), v.clone());
        }
    }
}

fn to_value(v: &impl serde::Serialize) -> Value {
    serde_json::to_value(v).unwrap_or_else(|e| {
        serde_json::json!({"error": {"message": format!("serialising a chunk: {e}"), "type": "server_error"}})
    })
}

fn chat_logprobs(lp: &Option<Logprobs>) -> Option<ChatLogprobs> {
    match lp {
        Some(Logprobs::Chat(c)) => Some(c.clone()),
        _ => None,
    }
}

fn completion_logprobs(lp: &Option<Logprobs>) -> Option<CompletionLogprobs> {
    match lp {
        Some(Logprobs::Completion(c)) => Some(c.clone()),
        _ => None,
    }
}

/// Patches an encoded choice with what the typed structs do not carry.
fn patch_choice(v: &mut Value, d: &ChoiceDelta, body_key: Option<&str>) {
    if let Some(Logprobs::Raw(raw)) = &d.logprobs {
        v["logprobs"] = raw.clone();
    }
    if let (false, Some(k)) = (d.delta_extra.is_empty(), body_key) {
        merge(&mut v[k], &d.delta_extra);
    }
    merge(v, &d.extra);
}

fn needs_patch(c: &Chunk) -> bool {
    !c.extra.is_empty()
        || c.choices.iter().any(|d| {
            !d.extra.is_empty()
                || !d.delta_extra.is_empty()
                || matches!(d.logprobs, Some(Logprobs::Raw(_)))
        })
}

/// One chunk as the JSON text of an SSE event; None when there is nothing to send.
fn encode(shape: &Shape, c: &Chunk) -> Option<String> {
    let usage = c
        .usage
        .filter(|_| !c.usage_observed_only && shape.include_usage);
    if c.choices.is_empty() && usage.is_none() {
        return None;
    }
    let typed = match shape.api {
        Api::Chat => to_json(
            &ChatCompletionChunk {
                id: shape.id.clone(),
                object: "chat.completion.chunk",
                created: shape.created,
                model: shape.model.clone(),
                choices: c
                    .choices
                    .iter()
                    .map(|d| ChunkChoice {
                        index: d.index,
                        delta: Delta {
                            role: d.role,
                            content: d.content.clone(),
                            tool_calls: d.tool_calls.clone(),
                        },
                        logprobs: chat_logprobs(&d.logprobs),
                        finish_reason: d.finish_reason,
                    })
                    .collect(),
                usage: shape.include_usage.then_some(usage),
                system_fingerprint: shape.system_fingerprint.clone(),
            },
            c,
            Some("delta"),
        ),
        Api::Completion => to_json(
            &Completion {
                id: shape.id.clone(),
                object: "text_completion",
                created: shape.created,
                model: shape.model.clone(),
                choices: c
                    .choices
                    .iter()
                    .map(|d| CompletionChoice {
                        text: d.content.clone().unwrap_or_default(),
                        index: d.index,
                        logprobs: completion_logprobs(&d.logprobs),
                        finish_reason: d.finish_reason,
                    })
                    .collect(),
                usage,
                system_fingerprint: None,
            },
            c,
            None,
        ),
    };
    Some(typed)
}

fn to_json(typed: &impl serde::Serialize, c: &Chunk, body_key: Option<&str>) -> String {
    if !needs_patch(c) {
        return serde_json::to_string(typed)
            .unwrap_or_else(|e| to_value(&e.to_string()).to_string());
    }
    let mut v = to_value(typed);
    if let Some(choices) = v["choices"].as_array_mut() {
        for (cv, d) in choices.iter_mut().zip(&c.choices) {
            patch_choice(cv, d, body_key);
        }
    }
    merge(&mut v, &c.extra);
    v.to_string()
}

fn data(s: String) -> SseEvent {
    SseEvent::default().data(s)
}

/// The chunks as server-sent events; an error ends the stream with an error event, and every
/// stream ends with `data: [DONE]`.
pub fn sse(chunks: Chunks, shape: Shape) -> Response {
    let events = stream::unfold(
        (chunks, shape, false),
        |(mut s, mut shape, done)| async move {
            if done {
                return None;
            }
            loop {
                match s.next().await {
                    Some(Ok(c)) => {
                        shape.adopt(&c.head);
                        if let Some(text) = encode(&shape, &c) {
                            return Some((vec![data(text)], (s, shape, false)));
                        }
                    }
                    Some(Err(e)) => {
                        let body = to_value(&e.into_api().body()).to_string();
                        return Some((vec![data(body), data("[DONE]".into())], (s, shape, true)));
                    }
                    None => return Some((vec![data("[DONE]".into())], (s, shape, true))),
                }
            }
        },
    )
    .flat_map(|batch| stream::iter(batch.into_iter().map(Ok::<_, Infallible>)));
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// One choice, assembled from its pieces.
#[derive(Default)]
struct Assembled {
    content: Option<String>,
    calls: BTreeMap<u32, ToolCall>,
    chat_lp: Option<ChatLogprobs>,
    comp_lp: Option<CompletionLogprobs>,
    raw_lp: Option<Value>,
    finish: Option<FinishReason>,
    delta_extra: Map<String, Value>,
    extra: Map<String, Value>,
}

impl Assembled {
    fn add(&mut self, d: ChoiceDelta) {
        if let Some(t) = d.content {
            self.content.get_or_insert_with(String::new).push_str(&t);
        }
        for tc in d.tool_calls.into_iter().flatten() {
            let call = self.calls.entry(tc.index).or_insert_with(|| ToolCall {
                id: String::new(),
                kind: "function".into(),
                function: FunctionCall {
                    name: String::new(),
                    arguments: String::new(),
                },
            });
            if let Some(id) = tc.id {
                call.id = id;
            }
            if let Some(n) = tc.function.name {
                call.function.name.push_str(&n);
            }
            call.function.arguments.push_str(&tc.function.arguments);
        }
        match d.logprobs {
            Some(Logprobs::Chat(c)) => self
                .chat_lp
                .get_or_insert_with(Default::default)
                .content
                .extend(c.content),
            Some(Logprobs::Completion(c)) => {
                let acc = self.comp_lp.get_or_insert_with(Default::default);
                acc.tokens.extend(c.tokens);
                acc.token_logprobs.extend(c.token_logprobs);
                acc.top_logprobs.extend(c.top_logprobs);
                acc.text_offset.extend(c.text_offset);
            }
            Some(Logprobs::Raw(v)) => self.raw_lp = Some(v),
            None => {}
        }
        if d.finish_reason.is_some() {
            self.finish = d.finish_reason;
        }
        self.delta_extra.extend(d.delta_extra);
        self.extra.extend(d.extra);
    }
}

/// The chunks collected into one JSON response (`chat.completion` or `text_completion`).
pub async fn collect(mut chunks: Chunks, mut shape: Shape) -> Result<Response, ApiError> {
    let mut choices: BTreeMap<u32, Assembled> = BTreeMap::new();
    let mut usage: Option<Usage> = None;
    let mut extra = Map::new();
    while let Some(item) = chunks.next().await {
        let c = item.map_err(|e| e.into_api())?;
        shape.adopt(&c.head);
        if let (Some(u), false) = (c.usage, c.usage_observed_only) {
            usage = Some(u);
        }
        extra.extend(c.extra);
        for d in c.choices {
            choices.entry(d.index).or_default().add(d);
        }
    }
    if choices.is_empty() {
        choices.insert(0, Assembled::default());
    }
    let plain = extra.is_empty()
        && usage.is_some()
        && choices
            .values()
            .all(|a| a.extra.is_empty() && a.delta_extra.is_empty() && a.raw_lp.is_none());
    let mut v = match shape.api {
        Api::Chat => {
            let typed: Vec<ChatChoice> = choices
                .iter()
                .map(|(&index, a)| {
                    let calls: Vec<ToolCall> = a.calls.values().cloned().collect();
                    ChatChoice {
                        index,
                        message: AssistantMessage {
                            role: "assistant",
                            content: a.content.clone(),
                            refusal: None,
                            tool_calls: (!calls.is_empty()).then_some(calls),
                        },
                        logprobs: a.chat_lp.clone(),
                        finish_reason: a.finish.unwrap_or(FinishReason::Stop),
                    }
                })
                .collect();
            let body = ChatCompletion {
                id: shape.id,
                object: "chat.completion",
                created: shape.created,
                model: shape.model,
                choices: typed,
                usage: usage.unwrap_or_default(),
                system_fingerprint: shape.system_fingerprint,
            };
            if plain {
                // Nothing to merge: serialised straight from the typed answer.
                return Ok(axum::Json(body).into_response());
            }
            to_value(&body)
        }
        Api::Completion => {
            let typed: Vec<CompletionChoice> = choices
                .iter()
                .map(|(&index, a)| CompletionChoice {
                    text: a.content.clone().unwrap_or_default(),
                    index,
                    logprobs: a.comp_lp.clone(),
                    finish_reason: Some(a.finish.unwrap_or(FinishReason::Stop)),
                })
                .collect();
            let body = Completion {
                id: shape.id,
                object: "text_completion",
                created: shape.created,
                model: shape.model,
                choices: typed,
                usage: Some(usage.unwrap_or_default()),
                system_fingerprint: None,
            };
            if plain {
                return Ok(axum::Json(body).into_response());
            }
            to_value(&body)
        }
    };
    if usage.is_none() {
        // An upstream that reported no usage: none is made up.
        if let Some(o) = v.as_object_mut() {
            o.remove("usage");
        }
    }
    if let Some(arr) = v["choices"].as_array_mut() {
        for (cv, a) in arr.iter_mut().zip(choices.values()) {
            if let Some(raw) = &a.raw_lp {
                cv["logprobs"] = raw.clone();
            }
            if !a.delta_extra.is_empty() && shape.api == Api::Chat {
                merge(&mut cv["message"], &a.delta_extra);
            }
            merge(cv, &a.extra);
        }
    }
    merge(&mut v, &extra);
    Ok(axum::Json(v).into_response())
}

fn header(resp: &mut Response, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        resp.headers_mut().insert(name, v);
    }
}

/// The `x-porteiro-*` headers of a routed answer.
pub struct Routed<'a> {
    pub tier: &'a str,
    pub route: &'a str,
    pub score: String,
    /// How long the routing decision took (encoder pass included), in milliseconds.
    pub decision_ms: f64,
    pub fallback: Option<&'a str>,
    pub privacy: Option<&'a str>,
}

pub fn decorate(mut resp: Response, r: &Routed) -> Response {
    header(&mut resp, "x-porteiro-tier", r.tier);
    header(&mut resp, "x-porteiro-route", r.route);
    header(&mut resp, "x-porteiro-score", &r.score);
    header(
        &mut resp,
        "x-porteiro-decision-ms",
        &format!("{:.2}", r.decision_ms),
    );
    if let Some(f) = r.fallback {
        header(&mut resp, "x-porteiro-fallback", f);
    }
    if let Some(p) = r.privacy {
        header(&mut resp, "x-porteiro-privacy", p);
    }
    resp
}
