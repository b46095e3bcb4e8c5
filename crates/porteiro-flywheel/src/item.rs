//! One logged upstream answer as the flywheel reads it: the request, the teacher's answer, what kind
//! of answer it is, and the structure (system prompt, tools, schema) that marks its task.

use porteiro_telemetry::{RequestRecord, Sample};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::FlywheelError;

/// What the teacher answered: decides how a candidate's answer is compared with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum AnswerKind {
    /// One or more tool calls: function and parsed arguments must be equal.
    ToolCalls,
    /// A JSON document (a `response_format` answer, or text that parses as an object).
    Json,
    /// A short label (a classification): at most 4 words, exact match.
    Label,
    /// Anything else.
    Text,
}

/// A sample with the record's figures.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Item {
    pub id: String,
    pub ts_ms: i64,
    /// The upstream tier that answered (the teacher).
    pub tier: String,
    pub model: String,
    pub route: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub latency_ms: f64,
    pub cost_usd: f64,
    pub request: Value,
    pub answer: Value,
    pub finish_reason: Option<String>,
}

impl Item {
    /// The item of a log record that carries a sample.
    pub fn from_record(r: &RequestRecord) -> Result<Self, FlywheelError> {
        let text = r
            .sample
            .as_deref()
            .ok_or_else(|| FlywheelError::Data(format!("record {} has no sample", r.id)))?;
        let s: Sample = serde_json::from_str(text)
            .map_err(|e| FlywheelError::Data(format!("record {}: bad sample: {e}", r.id)))?;
        Ok(Self {
            id: r.id.clone(),
            ts_ms: r.ts_ms,
            tier: r.tier.clone(),
            model: r.model.clone(),
            route: r.route.clone(),
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
            latency_ms: r.latency_ms,
            cost_usd: r.cost_usd,
            request: s.request,
            answer: s.answer,
            finish_reason: s.finish_reason,
        })
    }

    pub fn messages(&self) -> &[Value] {
        messages(&self.request)
    }

    /// The system (or developer) prompt, joined.
    pub fn system(&self) -> String {
        texts_of(&self.request, &["system", "developer"]).join("\n")
    }

    /// How many turns a person (the `user` role) spoke.
    pub fn user_turns(&self) -> usize {
        texts_of(&self.request, &["user"]).len()
    }

    /// What the task is about, for embedding and naming: the last user message.
    pub fn query(&self) -> String {
        texts_of(&self.request, &["user"]).pop().unwrap_or_default()
    }

    /// Sorted names of the tools offered.
    pub fn tool_names(&self) -> Vec<String> {
        tool_names(&self.request)
    }

    /// Whether the answer is bound to a schema (`response_format` json_schema / json_object).
    pub fn schema_bound(&self) -> bool {
        matches!(
            self.request["response_format"]["type"].as_str(),
            Some("json_schema" | "json_object")
        )
    }

    pub fn answer_text(&self) -> String {
        content_text(&self.answer["content"])
    }

    pub fn kind(&self) -> AnswerKind {
        kind_of(&self.request, &self.answer)
    }

    /// The structure a task shares across its requests: the system prompt with its numbers and
    /// quoted values blanked (templates fill those per request), the tool set, the schema.
    pub fn structure(&self) -> String {
        structure_of(&self.request)
    }
}

#[cfg(test)]
impl Item {
    /// A sample for tests: the given request and answer, neutral figures.
    pub(crate) fn test(id: &str, request: Value, answer: Value, finish: &str) -> Self {
        Self {
            id: id.into(),
            ts_ms: 0,
            tier: "big".into(),
            model: "m".into(),
            route: "auto".into(),
            prompt_tokens: 1,
            completion_tokens: 1,
            latency_ms: 1.0,
            cost_usd: 0.0,
            request,
            answer,
            finish_reason: Some(finish.into()),
        }
    }
}

/// A message's text: a string, or its text parts joined.
fn messages(request: &Value) -> &[Value] {
    request["messages"].as_array().map_or(&[], Vec::as_slice)
}

fn texts_of(request: &Value, roles: &[&str]) -> Vec<String> {
    messages(request)
        .iter()
        .filter(|m| roles.contains(&m["role"].as_str().unwrap_or("")))
        .map(|m| content_text(&m["content"]))
        .collect()
}

fn tool_names(request: &Value) -> Vec<String> {
    let mut v: Vec<String> = request["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["function"]["name"].as_str().map(str::to_string))
        .collect();
    v.sort();
    v.dedup();
    v
}

/// The kind of `answer` (an assistant message) to `request`: tool calls, JSON (schema-bound or an
/// object), a short label, or free text. Answers are compared by the teacher's answer's own kind
/// (a pooled cluster mixes kinds).
pub fn kind_of(request: &Value, answer: &Value) -> AnswerKind {
    if answer["tool_calls"]
        .as_array()
        .is_some_and(|c| !c.is_empty())
    {
        return AnswerKind::ToolCalls;
    }
    let t = content_text(&answer["content"]);
    let t = t.trim();
    let schema_bound = matches!(
        request["response_format"]["type"].as_str(),
        Some("json_schema" | "json_object")
    );
    if schema_bound || serde_json::from_str::<Value>(t).is_ok_and(|v| v.is_object()) {
        AnswerKind::Json
    } else if !t.is_empty() && t.split_whitespace().count() <= 4 && !t.contains('\n') {
        AnswerKind::Label
    } else {
        AnswerKind::Text
    }
}

/// A chat request's structure key (see [`Item::structure`]): the server matches live requests to
/// promoted clusters with it.
pub fn structure_of(request: &Value) -> String {
    let schema = match &request["response_format"] {
        Value::Null => String::new(),
        v => v.to_string(),
    };
    format!(
        "{}\u{1f}{}\u{1f}{schema}",
        template_of(&texts_of(request, &["system", "developer"]).join("\n")),
        tool_names(request).join(",")
    )
}

pub fn content_text(c: &Value) -> String {
    match c {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// `text` with digits and quoted spans replaced, so prompts filled from one template compare equal.
pub fn template_of(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut quote: Option<char> = None;
    for c in text.chars() {
        match quote {
            Some(q) if c == q => {
                quote = None;
                out.push(c);
            }
            Some(_) => {}
            None if c == '"' || c == '`' => {
                quote = Some(c);
                out.push(c);
                out.push('…');
            }
            None if c.is_ascii_digit() => {
                if !out.ends_with('#') {
                    out.push('#');
                }
            }
            None => out.push(c),
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn item(request: Value, answer: Value) -> Item {
        let rec = RequestRecord {
            id: "r1".into(),
            tier: "big".into(),
            sample: Some(
                serde_json::to_string(&Sample {
                    request,
                    answer,
                    finish_reason: Some("stop".into()),
                })
                .unwrap(),
            ),
            ..Default::default()
        };
        Item::from_record(&rec).unwrap()
    }

    #[test]
    fn kinds_and_structure() {
        let req = json!({"messages": [{"role": "system", "content": "Ticket 4411 from \"Ana\": classify."},
            {"role": "user", "content": "My card was charged twice"}]});
        let i = item(
            req.clone(),
            json!({"role": "assistant", "content": "billing"}),
        );
        assert_eq!(i.kind(), AnswerKind::Label);
        assert_eq!(i.query(), "My card was charged twice");
        let j = item(
            json!({"messages": [{"role": "system", "content": "Ticket 97 from \"Bob Smith\": classify."},
            {"role": "user", "content": "x"}]}),
            json!({"content": "{\"a\": 1}"}),
        );
        assert_eq!(j.kind(), AnswerKind::Json);
        assert_eq!(i.structure(), j.structure());
        let t = item(
            json!({"messages": [{"role": "user", "content": "weather?"}], "tools": [{"type": "function", "function": {"name": "w"}}]}),
            json!({"tool_calls": [{"function": {"name": "w", "arguments": "{}"}}]}),
        );
        assert_eq!(t.kind(), AnswerKind::ToolCalls);
        assert_ne!(t.structure(), i.structure());
        let long = item(
            req,
            json!({"content": "Billing, because the card was charged twice."}),
        );
        assert_eq!(long.kind(), AnswerKind::Text);
    }

    #[test]
    fn a_record_without_a_sample_is_an_error() {
        assert!(Item::from_record(&RequestRecord::default()).is_err());
    }
}
