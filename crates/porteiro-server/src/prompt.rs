//! How the local tier turns a chat request into the model's prompt. A template with a tool syntax
//! of its own (Hermes / Qwen2.5 `<tool_call>`) gets the request as OpenAI's JSON: `tools`, the
//! assistant's earlier `tool_calls` and `role: tool` results, rendered the way the model was trained
//! on. Any other template gets roles every template understands, tool results and earlier calls
//! written as text, and the instructions of a `response_format` / `tools` spec in the system
//! message. LoRA training (`porteiro lora train`) renders its data through the same functions, so an
//! adapter learns the prompts it will be served.

use porteiro_grammar::ToolSyntax;
use porteiro_models::template::{ChatMessage as TemplateMessage, ChatTemplate};
use porteiro_protocol::{ChatCompletionRequest, ChatMessage, Content};
use serde_json::{json, Value};

use crate::structured::{spec_of, Structured};
use crate::ApiError;

/// The tool-call syntax of a model's template.
pub fn syntax(template: Option<&ChatTemplate>) -> ToolSyntax {
    ToolSyntax::of_template(template.map(ChatTemplate::source))
}

/// One call as the grammar makes the model write it: compact `{"name":…,"arguments":…}`.
fn call_json(c: &Value) -> String {
    let args = c["function"]["arguments"].as_str().unwrap_or("{}");
    let args: Value = serde_json::from_str(args).unwrap_or_else(|_| json!({}));
    format!(
        "{{\"name\":{},\"arguments\":{args}}}",
        c["function"]["name"]
    )
}

/// Tool calls as the model writes them in `syntax`: tagged blocks, or one JSON object per line.
fn calls_text(calls: &[Value], syntax: &ToolSyntax) -> String {
    let one = |c: &Value| match syntax {
        ToolSyntax::Tagged { open, close } => format!("{open}\n{}\n{close}", call_json(c)),
        ToolSyntax::Json => call_json(c),
    };
    calls.iter().map(one).collect::<Vec<_>>().join("\n")
}

/// A message's text (text parts joined; other parts refused by name).
fn content_text(i: usize, m: &ChatMessage) -> Result<String, ApiError> {
    Ok(match &m.content {
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
                            format!("Only text content parts are supported (got `{}`).", p.kind),
                        ))
                    }
                }
            }
            s
        }
    })
}

fn bad_role(i: usize, other: &str) -> ApiError {
    ApiError::invalid(
        format!("messages[{i}].role"),
        format!("Unsupported role `{other}`; use system, developer, user, assistant or tool."),
    )
}

/// The messages as OpenAI's JSON for a template that renders tools itself: call arguments parsed
/// into objects (templates write them with `tojson`), `developer` as `system`.
fn json_messages(msgs: &[ChatMessage]) -> Result<Vec<Value>, ApiError> {
    msgs.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                r @ ("user" | "assistant" | "tool") => r,
                other => return Err(bad_role(i, other)),
            };
            let mut v = json!({"role": role, "content": content_text(i, m)?});
            if let (Some(Value::Array(calls)), "assistant") = (&m.tool_calls, role) {
                let calls: Vec<Value> = calls
                    .iter()
                    .map(|c| {
                        let args = c["function"]["arguments"].as_str().unwrap_or("{}");
                        json!({
                            "id": c["id"],
                            "type": "function",
                            "function": {
                                "name": c["function"]["name"],
                                "arguments": serde_json::from_str::<Value>(args)
                                    .unwrap_or_else(|_| Value::String(args.to_string())),
                            },
                        })
                    })
                    .collect();
                v["tool_calls"] = Value::Array(calls);
            }
            if let Some(id) = &m.tool_call_id {
                v["tool_call_id"] = Value::String(id.clone());
            }
            if let Some(n) = &m.name {
                v["name"] = Value::String(n.clone());
            }
            Ok(v)
        })
        .collect()
}

fn chat_messages(msgs: &[ChatMessage]) -> Result<Vec<TemplateMessage>, ApiError> {
    msgs.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                // Tool results reach the model as a user turn every chat template understands.
                "user" | "tool" => "user",
                "assistant" => "assistant",
                other => return Err(bad_role(i, other)),
            };
            let content = content_text(i, m)?;
            let content = match (m.role.as_str(), &m.tool_calls) {
                ("tool", _) => format!("Tool result: {content}"),
                // The model sees the calls it made in the shape it was asked to produce them.
                ("assistant", Some(Value::Array(calls))) if content.is_empty() => {
                    calls_text(calls, &ToolSyntax::Json)
                }
                _ => content,
            };
            Ok(TemplateMessage::new(role, content))
        })
        .collect()
}

/// Adds `note` (what a constrained answer must look like) to the leading system message, or puts
/// it in front as one: `system_text` is a message's text when it is a system message.
fn add_note<M>(
    msgs: &mut Vec<M>,
    note: Option<String>,
    system_text: impl FnOnce(&mut M) -> Option<&mut String>,
    system: impl FnOnce(String) -> M,
) {
    let Some(note) = note else {
        return;
    };
    match msgs.first_mut().and_then(system_text) {
        Some(t) => {
            t.push_str("\n\n");
            t.push_str(&note);
        }
        None => msgs.insert(0, system(note)),
    }
}

/// The instructions a constrained answer adds to the system message, if any.
fn note(structured: Option<&Structured>) -> Option<String> {
    match structured? {
        Structured::Json(spec) => Some(spec.instructions()),
        Structured::Tools(plan) => plan.instructions(),
    }
}

/// The prompt of a chat request (ending where the assistant's answer begins) for a model with
/// `template`, given what the request constrains.
pub fn build(
    template: Option<&ChatTemplate>,
    msgs: &[ChatMessage],
    tools: Option<&Value>,
    structured: Option<&Structured>,
) -> Result<String, ApiError> {
    if msgs.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must not be empty.",
        ));
    }
    let failed = |e| ApiError::invalid("messages", format!("The chat template failed: {e}"));
    match (template, syntax(template)) {
        (Some(t), ToolSyntax::Tagged { .. }) => {
            let mut msgs = json_messages(msgs)?;
            add_note(
                &mut msgs,
                note(structured),
                |m| match (m["role"] == "system", &mut m["content"]) {
                    (true, Value::String(c)) => Some(c),
                    _ => None,
                },
                |note| json!({"role": "system", "content": note}),
            );
            let tools = match structured {
                Some(Structured::Tools(_)) => tools,
                _ => None,
            };
            t.render_json(&Value::Array(msgs), tools, true)
                .map_err(failed)
        }
        _ => {
            let mut msgs = chat_messages(msgs)?;
            add_note(
                &mut msgs,
                note(structured),
                |m| (m.role == "system").then_some(&mut m.content),
                |note| TemplateMessage::new("system", note),
            );
            render(template, &msgs)
        }
    }
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
    let spec = spec_of(&req, &syntax(template))?;
    build(template, &req.messages, req.tools.as_ref(), spec.as_ref())
}

/// An assistant message as the model writes it for `template`: its text, or its tool calls in the
/// template's syntax (what the tool-call grammar makes it produce).
pub fn assistant_text(
    template: Option<&ChatTemplate>,
    message: &Value,
) -> Result<String, ApiError> {
    match (&message["content"], &message["tool_calls"]) {
        // Text before the calls (the model wrote it, then opened a call): both, as the model
        // produced them; the text alone would teach a student to stop before calling.
        (Value::String(s), Value::Array(calls)) if !s.is_empty() && !calls.is_empty() => {
            Ok(format!("{s}\n{}", calls_text(calls, &syntax(template))))
        }
        (Value::String(s), _) if !s.is_empty() => Ok(s.clone()),
        (_, Value::Array(calls)) if !calls.is_empty() => Ok(calls_text(calls, &syntax(template))),
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
            p.starts_with("<system>You may call one of these functions."),
            "{p}"
        );
        assert!(
            p.contains("get_weather") && p.ends_with("<user>Rain in Oslo?\n<assistant>"),
            "{p}"
        );
        let call = serde_json::json!({"role": "assistant", "content": null, "tool_calls": [{"id": "c1",
            "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]});
        assert_eq!(
            assistant_text(Some(&t), &call).unwrap(),
            r#"{"name":"get_weather","arguments":{"city":"Oslo"}}"#
        );
        assert!(assistant_text(Some(&t), &serde_json::json!({"role": "assistant"})).is_err());
        // Text and a call: the text, then the call (a trained student must still call).
        let both = serde_json::json!({"role": "assistant", "content": "Checking.", "tool_calls": call["tool_calls"]});
        assert_eq!(
            assistant_text(Some(&t), &both).unwrap(),
            "Checking.\n{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Oslo\"}}"
        );
    }

    #[test]
    fn a_template_with_a_tool_syntax_renders_tools_calls_and_results_itself() {
        let t = ChatTemplate::from_source(
            "{% if tools %}<tools>{% for x in tools %}{{ x.function.name }};{% endfor %}</tools>{% endif %}{% for m in messages %}{% if m.role == 'tool' %}<tool_response>{{ m.content }}</tool_response>{% elif m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function.arguments | tojson }}</tool_call>{% endfor %}{% else %}<{{ m.role }}>{{ m.content }}{% endif %}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        assert!(matches!(syntax(Some(&t)), ToolSyntax::Tagged { .. }));
        let req = serde_json::json!({"messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": "Rain in Oslo?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "rain"}],
            "tools": [{"type": "function", "function": {"name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]});
        let p = chat_prompt(Some(&t), &req).unwrap();
        assert_eq!(
            p,
            "<tools>get_weather;</tools><system>Be brief.\n\nCall a function only when one of the functions provided does what the user asks. If none of them does, do not call any: answer in plain text.<user>Rain in Oslo?<tool_call>{\"city\": \"Oslo\"}</tool_call><tool_response>rain</tool_response>"
        );
        // tool_choice none: the tools are not shown.
        let mut none = req.clone();
        none["tool_choice"] = "none".into();
        assert!(!chat_prompt(Some(&t), &none).unwrap().contains("<tools>"));
        let call = serde_json::json!({"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
            "function": {"name": "f", "arguments": "{}"}}, {"id": "c2", "type": "function",
            "function": {"name": "g", "arguments": "{\"a\": 1}"}}]});
        assert_eq!(
            assistant_text(Some(&t), &call).unwrap(),
            "<tool_call>\n{\"name\":\"f\",\"arguments\":{}}\n</tool_call>\n<tool_call>\n{\"name\":\"g\",\"arguments\":{\"a\":1}}\n</tool_call>"
        );
    }
}
