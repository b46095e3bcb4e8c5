//! How the local tier turns a chat request into the model's prompt: roles mapped onto what every
//! chat template understands, tool results and earlier tool calls written as text, the instructions
//! of a `response_format` / `tools` spec added to the system message, then the model's chat
//! template. LoRA training (`porteiro lora train`) renders its data through the same functions, so
//! an adapter learns the prompts it will be served.

use porteiro_grammar::Spec;
use porteiro_models::template::{ChatMessage as TemplateMessage, ChatTemplate};
use porteiro_protocol::{ChatCompletionRequest, ChatMessage, Content};
use serde_json::Value;

use crate::structured::spec_of;
use crate::ApiError;

/// Tool calls as the model writes them: one `{"name":…,"arguments":…}` object per line (the shape
/// the tool-call grammar makes it produce).
fn calls_text(calls: &[Value]) -> String {
    calls
        .iter()
        .map(|c| {
            let args = c["function"]["arguments"].as_str().unwrap_or("{}");
            format!(
                "{{\"name\":{},\"arguments\":{args}}}",
                c["function"]["name"]
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

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
                ("assistant", Some(Value::Array(calls))) if content.is_empty() => {
                    calls_text(calls)
                }
                _ => content,
            };
            Ok(TemplateMessage::new(role, content))
        })
        .collect()
}

/// The template messages of a request: its messages, plus the spec's instructions in the system
/// message when the answer is constrained.
pub fn prompt_messages(
    msgs: &[ChatMessage],
    spec: Option<&Spec>,
) -> Result<Vec<TemplateMessage>, ApiError> {
    let mut msgs = chat_messages(msgs)?;
    if let Some(spec) = spec {
        let note = spec.instructions();
        match msgs.first_mut() {
            Some(m) if m.role == "system" => m.content = format!("{}\n\n{note}", m.content),
            _ => msgs.insert(0, TemplateMessage::new("system", note)),
        }
    }
    Ok(msgs)
}

/// The messages through the chat template (ending where the assistant's answer begins), or joined
/// by blank lines for a model without one.
pub fn render(
    template: Option<&ChatTemplate>,
    msgs: &[TemplateMessage],
) -> Result<String, ApiError> {
    match template {
        Some(t) => t
            .render(msgs, true)
            .map_err(|e| ApiError::invalid("messages", format!("The chat template failed: {e}"))),
        None => Ok(msgs
            .iter()
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>()
            .join("\n\n")),
    }
}

/// The prompt text of a chat request (a JSON body), exactly as the local tier would build it.
pub fn chat_prompt(template: Option<&ChatTemplate>, request: &Value) -> Result<String, ApiError> {
    let mut request = request.clone();
    // The model name does not change the prompt; a training line has none.
    if let Some(o) = request.as_object_mut() {
        o.entry("model")
            .or_insert_with(|| Value::String(String::new()));
    }
    let req: ChatCompletionRequest = serde_json::from_value(request)
        .map_err(|e| ApiError::invalid("messages", format!("Not a chat request: {e}")))?;
    let spec = spec_of(&req)?;
    render(
        template,
        &prompt_messages(&req.messages, spec.as_ref().map(|s| &s.0))?,
    )
}

/// An assistant message as the model writes it: its text, or its tool calls.
pub fn assistant_text(message: &Value) -> Result<String, ApiError> {
    match (&message["content"], &message["tool_calls"]) {
        (Value::String(s), _) if !s.is_empty() => Ok(s.clone()),
        (_, Value::Array(calls)) if !calls.is_empty() => Ok(calls_text(calls)),
        _ => Err(ApiError::invalid(
            "messages",
            "An assistant message needs text `content` or `tool_calls`.",
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_training_line_renders_like_a_request_with_its_tools() {
        let t = ChatTemplate::from_source(
            "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
            "",
            "",
        )
        .unwrap();
        let tools = serde_json::json!([{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
        let req = serde_json::json!({"messages": [{"role": "user", "content": "Rain in Oslo?"}], "tools": tools});
        let p = chat_prompt(Some(&t), &req).unwrap();
        assert!(
            p.starts_with("<system>Call exactly one of these functions."),
            "{p}"
        );
        assert!(
            p.contains("get_weather") && p.ends_with("<user>Rain in Oslo?\n<assistant>"),
            "{p}"
        );
        let call = serde_json::json!({"role": "assistant", "content": null, "tool_calls": [{"id": "c1",
            "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]});
        assert_eq!(
            assistant_text(&call).unwrap(),
            r#"{"name":"get_weather","arguments":{"city":"Oslo"}}"#
        );
        assert!(assistant_text(&serde_json::json!({"role": "assistant"})).is_err());
    }
}
