//! `response_format` and `tools` for the local tier: what the request asks for becomes a
//! [`Spec`], the spec a grammar constraint for the engine and instructions in the system prompt;
//! tool-call answers are turned back into OpenAI `tool_calls` (whole, or streamed as
//! `delta.tool_calls` fragments).

use porteiro_grammar::{Spec, Tool};
use porteiro_protocol::{
    ChatCompletionRequest, FunctionCall, FunctionDelta, ToolCall, ToolCallDelta,
};
use serde_json::Value;

use crate::ApiError;

/// How the answer is returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The JSON is the message content.
    Json,
    /// The JSON is one function call: returned as `tool_calls`.
    Tools,
}

fn bad(param: &str, msg: impl Into<String>) -> ApiError {
    ApiError::invalid(param, msg)
}

/// The spec a chat request asks for, if any.
pub fn spec_of(req: &ChatCompletionRequest) -> Result<Option<(Spec, Mode)>, ApiError> {
    if req.functions.is_some() || req.function_call.is_some() {
        return Err(bad(
            "functions",
            "The legacy `functions` / `function_call` fields are not supported; use `tools` and `tool_choice`.",
        ));
    }
    let tools = match &req.tools {
        None => Vec::new(),
        Some(Value::Array(a)) if a.is_empty() => {
            return Err(bad("tools", "`tools` must not be empty (omit it instead)."))
        }
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let p = format!("tools[{i}]");
                if t["type"] != "function" {
                    return Err(bad(&p, "Only tools of type `function` are supported."));
                }
                let f = &t["function"];
                let name = f["name"]
                    .as_str()
                    .filter(|n| !n.is_empty())
                    .ok_or_else(|| bad(&p, "`function.name` is required."))?;
                let parameters = match &f["parameters"] {
                    Value::Null => serde_json::json!({"type": "object", "properties": {}}),
                    v @ Value::Object(_) => v.clone(),
                    _ => {
                        return Err(bad(
                            &p,
                            "`function.parameters` must be a JSON Schema object.",
                        ))
                    }
                };
                Ok(Tool {
                    name: name.to_string(),
                    description: f["description"].as_str().map(str::to_string),
                    parameters,
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err(bad("tools", "`tools` must be an array.")),
    };
    if let Some(rf) = &req.response_format {
        if !tools.is_empty() && rf["type"] != "text" {
            return Err(bad(
                "response_format",
                "`response_format` together with `tools` is not supported; use one or the other.",
            ));
        }
        match rf["type"].as_str() {
            Some("text") => {}
            Some("json_object") => return Ok(Some((Spec::JsonObject, Mode::Json))),
            Some("json_schema") => {
                let schema = &rf["json_schema"]["schema"];
                if !schema.is_object() {
                    return Err(bad(
                        "response_format.json_schema.schema",
                        "`json_schema.schema` must be a JSON Schema object.",
                    ));
                }
                return Ok(Some((Spec::JsonSchema(schema.clone()), Mode::Json)));
            }
            other => {
                return Err(bad(
                    "response_format.type",
                    format!(
                        "`{}` is not a response format; use text, json_object or json_schema.",
                        other.unwrap_or("(missing)")
                    ),
                ))
            }
        }
    }
    if tools.is_empty() {
        if req.tool_choice.is_some() {
            return Err(bad("tool_choice", "`tool_choice` needs `tools`."));
        }
        return Ok(None);
    }
    let chosen = match &req.tool_choice {
        Some(Value::String(s)) if s == "none" => return Ok(None),
        Some(Value::String(s)) if s == "required" => tools,
        // `auto` (the default): a small model decides badly whether to call; Porteiro calls a tool
        // when the user spoke last and answers in text after tool results (documented in the README).
        None => return Ok(auto_call(req, tools)),
        Some(Value::String(s)) if s == "auto" => return Ok(auto_call(req, tools)),
        Some(v @ Value::Object(_)) => {
            let name = v["function"]["name"].as_str().unwrap_or_default();
            let one: Vec<Tool> = tools.into_iter().filter(|t| t.name == name).collect();
            if one.is_empty() {
                return Err(bad(
                    "tool_choice",
                    format!("`{name}` is not one of the tools given."),
                ));
            }
            one
        }
        Some(_) => {
            return Err(bad(
                "tool_choice",
                "`tool_choice` must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": …}}.",
            ))
        }
    };
    Ok(Some((Spec::ToolCall(chosen), Mode::Tools)))
}

/// `tool_choice: auto`: a call when the user spoke last, text otherwise.
fn auto_call(req: &ChatCompletionRequest, tools: Vec<Tool>) -> Option<(Spec, Mode)> {
    let last_is_user = req.messages.last().is_some_and(|m| m.role == "user");
    last_is_user.then_some((Spec::ToolCall(tools), Mode::Tools))
}

/// A complete tool-call answer `{"name": …, "arguments": {…}}` as OpenAI's `tool_calls`.
pub fn tool_calls(text: &str, id: &str) -> Result<Vec<ToolCall>, ApiError> {
    let v: Value = serde_json::from_str(text).map_err(|e| {
        ApiError::internal(format!("the constrained answer is not JSON ({e}): {text}"))
    })?;
    Ok(vec![ToolCall {
        id: id.to_string(),
        kind: "function".into(),
        function: FunctionCall {
            name: v["name"].as_str().unwrap_or_default().to_string(),
            arguments: v["arguments"].to_string(),
        },
    }])
}

/// Streams a tool-call answer as it is generated: once `{"name":"…","arguments":` is complete the
/// first delta carries id, type and name; then argument fragments follow, holding back the last
/// character, which may be the wrapper's closing brace.
pub struct ToolStream {
    id: String,
    text: String,
    /// Bytes of `text` already sent as argument fragments (from the start of the arguments).
    sent: usize,
    args_start: Option<usize>,
}

const ARGS_KEY: &str = "\"arguments\":";

impl ToolStream {
    pub fn new(id: String) -> Self {
        Self {
            id,
            text: String::new(),
            sent: 0,
            args_start: None,
        }
    }

    /// Everything generated so far (the whole call once the grammar is complete).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Deltas for the next piece of generated text.
    pub fn push(&mut self, piece: &str) -> Vec<ToolCallDelta> {
        self.text.push_str(piece);
        let mut out = Vec::new();
        if self.args_start.is_none() {
            let Some(i) = self.text.find(ARGS_KEY) else {
                return out;
            };
            let head: Value =
                serde_json::from_str(&format!("{}0}}", &self.text[..i + ARGS_KEY.len()]))
                    .unwrap_or(Value::Null);
            let start = i + ARGS_KEY.len();
            self.args_start = Some(start);
            self.sent = start;
            out.push(ToolCallDelta {
                index: 0,
                id: Some(self.id.clone()),
                kind: Some("function"),
                function: FunctionDelta {
                    name: Some(head["name"].as_str().unwrap_or_default().to_string()),
                    arguments: String::new(),
                },
            });
        }
        // Everything but the last character (a possible closing brace of the wrapper).
        let mut end = self.text.len().saturating_sub(1).max(self.sent);
        while !self.text.is_char_boundary(end) {
            end -= 1;
        }
        if end > self.sent {
            out.push(Self::fragment(&self.text[self.sent..end]));
            self.sent = end;
        }
        out
    }

    /// The last fragment, without the wrapper's closing brace.
    pub fn finish(&mut self) -> Vec<ToolCallDelta> {
        let rest = self.text[self.sent.min(self.text.len())..].trim_end();
        let rest = rest.strip_suffix('}').unwrap_or(rest);
        if rest.is_empty() {
            Vec::new()
        } else {
            vec![Self::fragment(rest)]
        }
    }

    fn fragment(s: &str) -> ToolCallDelta {
        ToolCallDelta {
            index: 0,
            id: None,
            kind: None,
            function: FunctionDelta {
                name: None,
                arguments: s.to_string(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_fragments_reassemble_the_arguments() {
        let text = r#"{"name":"get_weather","arguments":{"city":"Lisboa","unit":"c"}}"#;
        for size in 1..8 {
            let mut ts = ToolStream::new("call_1".into());
            let mut deltas = Vec::new();
            let chars: Vec<char> = text.chars().collect();
            for piece in chars.chunks(size) {
                deltas.extend(ts.push(&piece.iter().collect::<String>()));
            }
            deltas.extend(ts.finish());
            assert_eq!(deltas[0].function.name.as_deref(), Some("get_weather"));
            assert_eq!(deltas[0].id.as_deref(), Some("call_1"));
            let args: String = deltas
                .iter()
                .map(|d| d.function.arguments.as_str())
                .collect();
            assert_eq!(args, r#"{"city":"Lisboa","unit":"c"}"#, "size {size}");
        }
        let calls = tool_calls(text, "call_2").unwrap();
        assert_eq!(calls[0].function.name, "get_weather");
        let args: Value = serde_json::from_str(&calls[0].function.arguments).unwrap();
        assert_eq!(args["city"], "Lisboa");
    }
}
