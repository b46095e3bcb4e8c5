//! An OpenAI-compatible endpoint as a tier. The request goes out as the client's JSON body (after
//! the privacy guard; local-only fields removed, `model` replaced by the client), so OpenAI fields
//! Porteiro does not model reach the upstream unchanged; its answer comes back as typed chunks
//! whose unmodelled fields ride along in `extra` and reach the client unchanged too.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::stream::{self, StreamExt};
use porteiro_protocol::{FinishReason, FunctionDelta, ToolCallDelta, Usage};
use porteiro_upstream::{Reply, UpstreamClient, UpstreamError};
use serde_json::{Map, Value};

use super::{ChoiceDelta, Chunk, Chunks, Head, Logprobs, Tier, TierError, TierRequest};
use crate::ApiError;

/// Request fields only local servers understand; removed before a body goes upstream.
const LOCAL_ONLY_FIELDS: [&str; 4] = ["top_k", "min_p", "repetition_penalty", "ignore_eos"];

pub struct UpstreamTier {
    client: Arc<UpstreamClient>,
}

impl UpstreamTier {
    pub fn new(client: Arc<UpstreamClient>) -> Self {
        Self { client }
    }
}

/// Short label of an upstream failure (metrics, the request log, `x-porteiro-fallback`).
pub fn failure_kind(e: &UpstreamError) -> &'static str {
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

impl Tier for UpstreamTier {
    fn name(&self) -> &str {
        self.client.name()
    }

    fn model(&self) -> &str {
        &self.client.config().model
    }

    fn answer<'a>(&'a self, req: &'a TierRequest) -> BoxFuture<'a, Result<Chunks, TierError>> {
        Box::pin(async move {
            let body = req
                .passthrough
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            let Some(mut body) = body else {
                return Err(ApiError::internal("no request body to send upstream").into());
            };
            if let Some(o) = body.as_object_mut() {
                for f in LOCAL_ONLY_FIELDS {
                    o.remove(f);
                }
            }
            if req.stream {
                // Usage comes back in the stream's last chunk; the encoder drops it again unless the
                // client asked for it.
                body["stream_options"]["include_usage"] = true.into();
            }
            let name = self.client.name().to_string();
            match self.client.chat(body).await? {
                (Reply::Json(v), _) => {
                    let chunk = chunk_of(v, &name);
                    Ok(Box::pin(stream::iter([chunk])) as Chunks)
                }
                (Reply::Stream(s), _) => Ok(Box::pin(s.map(move |item| match item {
                    Ok(v) => chunk_of(v, &name),
                    Err(e) => Err(TierError::Upstream(e)),
                })) as Chunks),
            }
        })
    }
}

fn protocol(name: &str, why: impl Into<String>) -> TierError {
    TierError::Upstream(UpstreamError::Protocol {
        name: name.to_string(),
        why: why.into(),
    })
}

/// A chat completion or one of its stream chunks as a [`Chunk`].
fn chunk_of(v: Value, name: &str) -> Result<Chunk, TierError> {
    let Value::Object(mut o) = v else {
        return Err(protocol(name, "a chunk that is not a JSON object"));
    };
    o.remove("object");
    let text = |o: &mut Map<String, Value>, k: &str| match o.remove(k) {
        Some(Value::String(s)) => Some(s),
        _ => None,
    };
    let id = text(&mut o, "id");
    let model = text(&mut o, "model");
    let created = o.remove("created").and_then(|c| c.as_u64());
    let system_fingerprint = text(&mut o, "system_fingerprint");
    let head = (id.is_some() || model.is_some()).then(|| Head {
        id: id.unwrap_or_else(|| "chatcmpl-upstream".into()),
        model: model.unwrap_or_else(|| name.to_string()),
        created,
        system_fingerprint,
    });
    let usage = match o.remove("usage") {
        Some(u @ Value::Object(_)) => Some(
            serde_json::from_value::<Usage>(u)
                .map_err(|e| protocol(name, format!("usage: {e}")))?,
        ),
        _ => None,
    };
    let choices = match o.remove("choices") {
        Some(Value::Array(a)) => a.into_iter().map(choice_of).collect::<Vec<ChoiceDelta>>(),
        _ => Vec::new(),
    };
    Ok(Chunk {
        head,
        choices,
        usage,
        usage_observed_only: false,
        extra: o,
    })
}

fn choice_of(v: Value) -> ChoiceDelta {
    let Value::Object(mut c) = v else {
        return ChoiceDelta::default();
    };
    let index = c.remove("index").and_then(|i| i.as_u64()).unwrap_or(0) as u32;
    let mut d = ChoiceDelta {
        index,
        ..Default::default()
    };
    match c.remove("logprobs") {
        None | Some(Value::Null) => {}
        Some(lp) => d.logprobs = Some(Logprobs::Raw(lp)),
    }
    match c.remove("finish_reason") {
        None | Some(Value::Null) => {}
        Some(f) => match serde_json::from_value::<FinishReason>(f.clone()) {
            Ok(f) => d.finish_reason = Some(f),
            // A reason we do not know passes through as sent.
            Err(_) => {
                c.insert("finish_reason".into(), f);
            }
        },
    }
    let body = c.remove("delta").or_else(|| c.remove("message"));
    if let Some(Value::Object(mut m)) = body {
        if let Some(Value::String(_)) = m.remove("role") {
            d.role = Some("assistant");
        }
        if let Some(Value::String(s)) = m.remove("content") {
            d.content = Some(s);
        }
        match m.remove("tool_calls") {
            Some(Value::Array(calls)) => {
                d.tool_calls = Some(
                    calls
                        .into_iter()
                        .enumerate()
                        .map(|(i, tc)| tool_call_of(i, tc))
                        .collect(),
                )
            }
            Some(Value::Null) | None => {}
            Some(other) => {
                m.insert("tool_calls".into(), other);
            }
        }
        d.delta_extra = m;
    }
    d.extra = c;
    d
}

fn tool_call_of(position: usize, tc: Value) -> ToolCallDelta {
    let f = &tc["function"];
    ToolCallDelta {
        index: tc["index"].as_u64().unwrap_or(position as u64) as u32,
        id: tc["id"].as_str().map(str::to_string),
        kind: tc["type"].as_str().map(|_| "function"),
        function: FunctionDelta {
            name: f["name"].as_str().map(str::to_string),
            arguments: f["arguments"].as_str().unwrap_or_default().to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unmodelled_fields_are_kept_at_every_level() {
        let v = json!({
            "id": "c1", "object": "chat.completion.chunk", "created": 7, "model": "big",
            "service_tier": "default",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi", "refusal": null},
                         "logprobs": {"content": []}, "finish_reason": null, "stop_reason": 5}],
        });
        let c = chunk_of(v, "up").unwrap();
        let h = c.head.unwrap();
        assert_eq!(
            (h.id.as_str(), h.model.as_str(), h.created),
            ("c1", "big", Some(7))
        );
        assert_eq!(c.extra["service_tier"], "default");
        let d = &c.choices[0];
        assert_eq!(d.content.as_deref(), Some("Hi"));
        assert_eq!(d.role, Some("assistant"));
        assert!(d.delta_extra.contains_key("refusal"));
        assert_eq!(d.extra["stop_reason"], 5);
        assert!(matches!(d.logprobs, Some(Logprobs::Raw(_))));
    }

    #[test]
    fn a_whole_completion_becomes_one_chunk_with_its_calls_and_usage() {
        let v = json!({
            "id": "c2", "object": "chat.completion", "created": 1, "model": "big",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": null,
                "tool_calls": [{"id": "call_1", "type": "function",
                                "function": {"name": "f", "arguments": "{\"a\":1}"}}]}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        });
        let c = chunk_of(v, "up").unwrap();
        assert_eq!(c.usage, Some(Usage::new(3, 2)));
        let d = &c.choices[0];
        assert_eq!(d.finish_reason, Some(FinishReason::ToolCalls));
        let tc = &d.tool_calls.as_ref().unwrap()[0];
        assert_eq!((tc.index, tc.id.as_deref()), (0, Some("call_1")));
        assert_eq!(tc.function.arguments, "{\"a\":1}");
    }

    #[test]
    fn an_unknown_finish_reason_passes_through() {
        let v = json!({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "eos"}]});
        let c = chunk_of(v, "up").unwrap();
        assert_eq!(c.choices[0].finish_reason, None);
        assert_eq!(c.choices[0].extra["finish_reason"], "eos");
    }
}
