//! Training data in OpenAI's chat fine-tuning format, one `{"messages": [...], "tools": [...]?}` per
//! line. Each assistant turn becomes one sequence: the prompt exactly as the server would build it
//! for a request holding the messages before that turn (tools, instructions and template included,
//! through [`Render`]), then the answer as the model produces it, then the end-of-turn token. The
//! loss falls on the answer and the end-of-turn token only. (One sequence per turn, not one per
//! conversation: the server's prompt for turn k is not always a prefix of turn k+1's.) Assistant
//! messages with `"weight": 0` are context only, as in OpenAI's format.

use std::path::Path;

use porteiro_models::tokenizer::Tokenizer;
use serde_json::Value;

use crate::net::Seq;
use crate::TrainError;

/// How the server turns a chat request into the model's prompt, and an assistant message into the
/// text the model generates (implemented by the server crate so training renders exactly as
/// serving does).
pub trait Render: Sync {
    /// The prompt text for a chat request `{"messages": [...], "tools": [...]?}`, ending where the
    /// assistant's answer begins.
    fn prompt(&self, request: &Value) -> Result<String, String>;
    /// An assistant message as the model writes it (its text, or its tool calls).
    fn answer(&self, message: &Value) -> Result<String, String>;
}

#[derive(Debug, Clone)]
pub struct Example {
    /// 1-based line of the file.
    pub line: usize,
    pub seq: Seq,
}

#[derive(Debug, Default)]
pub struct Loaded {
    pub examples: Vec<Example>,
    /// Lines refused (with `skip_bad`): line number and why.
    pub skipped: Vec<(usize, String)>,
}

/// Reads and tokenizes a JSONL file. A bad line (not JSON, no `messages`, no assistant turn, a
/// sequence over `max_seq` tokens, a template error) is an error naming the line, or with `skip_bad`
/// is counted in [`Loaded::skipped`].
pub fn load(
    path: &Path,
    tok: &Tokenizer,
    render: &dyn Render,
    max_seq: usize,
    skip_bad: bool,
) -> Result<Loaded, TrainError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| TrainError::Io(format!("reading {}: {e}", path.display())))?;
    let end = tok
        .eot_id()
        .or(tok.eos_id())
        .ok_or_else(|| TrainError::Model("the tokenizer has no end-of-turn or EOS token".into()))?;
    let mut out = Loaded::default();
    for (i, line) in text.lines().enumerate() {
        let no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        match parse_line(line, tok, render, max_seq, end) {
            Ok(seqs) => out
                .examples
                .extend(seqs.into_iter().map(|seq| Example { line: no, seq })),
            Err(why) if skip_bad => out.skipped.push((no, why)),
            Err(why) => {
                return Err(TrainError::Data(format!(
                    "{}:{no}: {why} (--skip-bad skips such lines)",
                    path.display()
                )))
            }
        }
    }
    if out.examples.is_empty() {
        return Err(TrainError::Data(format!(
            "{}: no usable example ({} lines skipped)",
            path.display(),
            out.skipped.len()
        )));
    }
    Ok(out)
}

fn parse_line(
    line: &str,
    tok: &Tokenizer,
    render: &dyn Render,
    max_seq: usize,
    end: u32,
) -> Result<Vec<Seq>, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let msgs = v
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or("no `messages` array")?;
    let tools = v.get("tools").filter(|t| !t.is_null());
    let mut seqs = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        if m.get("role").and_then(Value::as_str) != Some("assistant") {
            continue;
        }
        if m.get("weight").and_then(Value::as_f64) == Some(0.0) {
            continue;
        }
        if i == 0 {
            return Err("the conversation starts with an assistant turn".into());
        }
        let mut req = serde_json::json!({ "messages": &msgs[..i] });
        if let Some(t) = tools {
            req["tools"] = t.clone();
        }
        let prompt = render
            .prompt(&req)
            .map_err(|e| format!("messages[{i}]: {e}"))?;
        let answer = render
            .answer(m)
            .map_err(|e| format!("messages[{i}]: {e}"))?;
        let mut tokens = tok.encode(&prompt, true, true);
        let n_prompt = tokens.len();
        tokens.extend(tok.encode(&answer, false, false));
        tokens.push(end);
        if tokens.len() > max_seq {
            return Err(format!(
                "messages[{i}]: the sequence has {} tokens, over --max-seq {max_seq}",
                tokens.len()
            ));
        }
        let mask = (0..tokens.len()).map(|t| t >= n_prompt).collect();
        seqs.push(Seq { tokens, mask });
    }
    if seqs.is_empty() {
        return Err("no assistant turn to learn from".into());
    }
    Ok(seqs)
}
