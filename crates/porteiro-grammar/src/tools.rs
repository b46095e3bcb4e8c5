//! Tool calls as a lazy grammar. With `tool_choice: auto` the model writes freely (no mask, no
//! cost per token) until it starts a call in its own syntax; from that token on, decoding is held
//! to a valid call against the tools' schemas. After a call, further calls may follow when parallel
//! calls are allowed; otherwise generation stops there. `required` (or a named function) forces a
//! call from the first token.
//!
//! Two syntaxes, by chat template family:
//! - **Tagged** (Hermes, Qwen2.5: templates that mention `<tool_call>`): each call is
//!   `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>`; the trigger is the opening tag.
//!   Small models often drop the tags and answer with the bare object, or a fenced one (llama.cpp
//!   accepts both for this family), so such an answer is read as calls too (below).
//! - **Json** (templates without a tool syntax, which get our instructions instead): a call is a bare
//!   `{"name": …, "arguments": {…}}` object (optionally in a ```` ```json ```` fence), several one
//!   after the other with parallel calls; a call repeating an earlier one ends the answer (a small
//!   model that repeats itself would otherwise run to `max_tokens`).
//!
//! A bare answer is a call only if the model itself names one of the tools: it writes freely until
//! the `"name"` value is complete ([`call_header`]); a tool's name hands the tokens so far to the
//! grammar, anything else leaves the answer as text. So `auto` can decline: a model that answers
//! `{"name": "hello", …}` to "hello" has not called a tool.

use llguidance::api::TopLevelGrammar;
use llguidance::Matcher;
use porteiro_engine::scheduler::TokenConstraint;
use serde_json::Value;

use crate::{Constraint, GrammarError, Grammars, Spec, Tool};

/// How a model writes its tool calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolSyntax {
    /// `<open>\n{"name": …, "arguments": {…}}\n<close>` per call.
    Tagged { open: String, close: String },
    /// Bare JSON objects, one per line.
    Json,
}

impl ToolSyntax {
    /// The syntax a chat template's source implies (Hermes-style tags when it writes them).
    pub fn of_template(src: Option<&str>) -> Self {
        match src {
            Some(s) if s.contains("<tool_call>") && s.contains("</tool_call>") => Self::Tagged {
                open: "<tool_call>".into(),
                close: "</tool_call>".into(),
            },
            _ => Self::Json,
        }
    }
}

/// Under `auto`, what a tagged template is told besides its own tool prompt.
const DECLINE: &str = "Call a function only when one of the functions provided does what the user asks. If none of them does, do not call any: answer in plain text.";

/// What a request allows: which tools, whether a call is forced, whether several may follow.
#[derive(Debug, Clone)]
pub struct ToolPlan {
    pub tools: Vec<Tool>,
    pub syntax: ToolSyntax,
    /// `required` or a named function: a call from the first token.
    pub required: bool,
    /// `parallel_tool_calls` (OpenAI's default: true).
    pub parallel: bool,
}

impl ToolPlan {
    /// The system-prompt note. A tagged template lists the tools and their syntax itself, but says
    /// nothing of when *not* to call one, so under `auto` it gets only that; the JSON syntax gets
    /// the whole description.
    pub fn instructions(&self) -> Option<String> {
        if let ToolSyntax::Tagged { .. } = &self.syntax {
            // Only when not to call: naming the tags here made qwen2.5-1.5b write `<tools>` blocks
            // of its own instead of calls (BFCL simple_python dev slice 30/30 -> 9/30).
            return (!self.required).then(|| DECLINE.to_string());
        }
        let mut s = if self.required {
            String::from(
                "Call one of these functions. Answer only with a JSON object {\"name\": <function name>, \"arguments\": <arguments object>}",
            )
        } else {
            String::from(
                "You may call one of these functions. If one of them is needed to answer, reply only with a JSON object {\"name\": <function name>, \"arguments\": <arguments object>}",
            )
        };
        s.push_str(if self.parallel {
            " (one per line when several calls are needed).\n"
        } else {
            ".\n"
        });
        if !self.required {
            s.push_str("If none of them fits the request, answer in plain text instead.\n");
        }
        for t in &self.tools {
            s.push_str(&format!(
                "- {}: {} Parameters (JSON Schema): {}\n",
                t.name,
                t.description.as_deref().unwrap_or(""),
                serde_json::to_string(&t.parameters).unwrap_or_default()
            ));
        }
        Some(s)
    }

    /// The calls' schema, with JSON whitespace as the model likes to write it (bounded, so a small
    /// model cannot wander off into blank lines).
    fn call_schema(&self) -> Value {
        let mut s = Spec::ToolCall(self.tools.clone()).plain_schema();
        if let Some(o) = s.as_object_mut() {
            o.insert(
                "x-guidance".into(),
                serde_json::json!({"whitespace_pattern": "[ \\n]{1,8}"}),
            );
        }
        s
    }
}

fn lark_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// What the start of a bare answer says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Header {
    /// Not enough text yet.
    Undecided,
    /// A call of the function so named (not yet checked against the tools).
    Name(String),
    /// Not a call.
    Text,
}

/// Reads the start of an answer: blanks, an optional ```` ```json ```` fence, `{`, blanks,
/// `"name"`, `:`, and the name's string.
pub fn call_header(s: &str) -> Header {
    let mut r = s.trim_start();
    if let Some(rest) = r.strip_prefix("```") {
        let lang = rest
            .find(|c: char| !c.is_ascii_alphanumeric())
            .unwrap_or(rest.len());
        if lang == rest.len() {
            return if rest.len() < 12 {
                Header::Undecided
            } else {
                Header::Text
            };
        }
        r = rest[lang..].trim_start();
    } else if "```".starts_with(r) && !r.is_empty() {
        return Header::Undecided;
    }
    let undecided_if = |done: bool| {
        if done {
            Header::Undecided
        } else {
            Header::Text
        }
    };
    let Some(rest) = r.strip_prefix('{') else {
        return undecided_if(r.is_empty());
    };
    let rest = rest.trim_start();
    let Some(rest) = rest.strip_prefix("\"name\"") else {
        return undecided_if("\"name\"".starts_with(rest));
    };
    let rest = rest.trim_start();
    let Some(rest) = rest.strip_prefix(':') else {
        return undecided_if(rest.is_empty());
    };
    let rest = rest.trim_start();
    let Some(rest) = rest.strip_prefix('"') else {
        return undecided_if(rest.is_empty());
    };
    match rest.find('"') {
        Some(end) => Header::Name(rest[..end].to_string()),
        None => undecided_if(rest.len() <= 64),
    }
}

enum State {
    /// Free text so far (JSON syntax: blanks only); `tail` holds the last bytes, to spot the
    /// trigger.
    Free { tail: Vec<u8> },
    /// A bare answer that may be a call: written freely until its name is known.
    Header { tokens: Vec<u32>, text: Vec<u8> },
    /// Inside a call.
    Call(Constraint),
    /// Free text for good: the answer is not a call.
    Text,
}

/// The per-request tool-call constraint (see the module documentation).
pub struct ToolConstraint {
    grammars: std::sync::Arc<Grammars>,
    plan: ToolPlan,
    /// A call after the opening tag (tagged syntax only).
    body: Option<Matcher>,
    /// Bare calls, as a model writes them at the start of its answer (compiled only where free
    /// text can occur).
    bare: Option<Matcher>,
    /// Nothing but blanks written so far.
    at_start: bool,
    /// A bare answer's calls: the text of the one being written and those done (to stop a
    /// repetition).
    objects: Objects,
    state: State,
}

/// Where a byte of text stands among top-level JSON objects (brace depth outside strings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// Between objects.
    Outside,
    /// The `{` that opens an object.
    Open,
    /// Inside an object.
    Inside,
    /// The `}` that closes it.
    Closed,
}

/// Finds the top-level JSON objects in streamed text, a byte at a time (braces, quotes and
/// backslashes are ASCII, so UTF-8 text can be fed bytewise). Shared by the constraint and the
/// server's reading of a bare answer, so both split it the same way.
#[derive(Debug, Default, Clone)]
pub struct ObjectScan {
    depth: usize,
    in_str: bool,
    esc: bool,
}

impl ObjectScan {
    pub fn step(&mut self, b: u8) -> Scan {
        if self.depth == 0 {
            if b != b'{' {
                return Scan::Outside;
            }
            self.depth = 1;
            return Scan::Open;
        }
        if self.in_str {
            match (self.esc, b) {
                (true, _) => self.esc = false,
                (false, b'\\') => self.esc = true,
                (false, b'"') => self.in_str = false,
                _ => {}
            }
            return Scan::Inside;
        }
        match b {
            b'"' => self.in_str = true,
            b'{' => self.depth += 1,
            b'}' => {
                self.depth -= 1;
                if self.depth == 0 {
                    return Scan::Closed;
                }
            }
            _ => {}
        }
        Scan::Inside
    }
}

/// A bare answer's objects, to stop a repeated call.
#[derive(Default)]
struct Objects {
    on: bool,
    scan: ObjectScan,
    cur: Vec<u8>,
    done: Vec<Value>,
}

impl Objects {
    /// Feeds text; true when an object just completed that repeats an earlier one.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        let mut repeat = false;
        for &b in bytes {
            match self.scan.step(b) {
                Scan::Outside => {}
                Scan::Open | Scan::Inside => self.cur.push(b),
                Scan::Closed => {
                    self.cur.push(b);
                    let v: Value = serde_json::from_slice(&self.cur).unwrap_or(Value::Null);
                    self.cur.clear();
                    repeat |= self.done.contains(&v);
                    self.done.push(v);
                }
            }
        }
        repeat
    }
}

impl Grammars {
    fn matcher(&self, lark: String) -> Result<Matcher, GrammarError> {
        let parser = self
            .factory
            .create_parser(TopLevelGrammar::from_lark(lark))
            .map_err(|e| GrammarError::Unsupported(e.to_string()))?;
        let m = Matcher::new(Ok(parser));
        match m.get_error() {
            Some(e) => Err(GrammarError::Unsupported(e)),
            None => Ok(m),
        }
    }

    /// The constraint for a request's tools (grammars compiled once here; each call clones one).
    pub fn tool_constraint(
        self: &std::sync::Arc<Self>,
        plan: ToolPlan,
    ) -> Result<ToolConstraint, GrammarError> {
        let call = format!("call: %json {}\n", plan.call_schema());
        let blank = "BLANK: /[ \\t\\n]+/\n";
        // Blanks, an optional fence, the object(s), the fence's end. A model that repeats a call is
        // stopped at the repetition (`commit`).
        let more = if plan.parallel { " (BLANK? call)*" } else { "" };
        let bare = format!(
            "start: BLANK? FENCE? BLANK? call{more} (BLANK? \"```\")?\nFENCE: /```[a-z]*/\n{blank}{call}"
        );
        let (body, first) = match &plan.syntax {
            ToolSyntax::Tagged { open, close } => (
                Some(format!(
                    "start: \"\\n\" call \"\\n\" {}\n{call}",
                    lark_str(close)
                )),
                format!(
                    "start: {} \"\\n\" call \"\\n\" {}\n{call}",
                    lark_str(open),
                    lark_str(close)
                ),
            ),
            // A forced call is written compact, as the instructions show it (a 135M model loops in
            // free whitespace).
            ToolSyntax::Json => (
                None,
                format!(
                    "start: call\ncall: %json {}\n",
                    Spec::ToolCall(plan.tools.clone()).schema()
                ),
            ),
        };
        let state = if plan.required {
            State::Call(Constraint::spawn(self.matcher(first)?, self.vocab)?)
        } else {
            State::Free { tail: Vec::new() }
        };
        // Free text (where a bare call can start) comes first, or after a forced tagged call when
        // more may follow.
        let tagged = matches!(plan.syntax, ToolSyntax::Tagged { .. });
        let bare = (!plan.required || (plan.parallel && tagged))
            .then(|| self.matcher(bare))
            .transpose()?;
        Ok(ToolConstraint {
            grammars: self.clone(),
            body: body.map(|b| self.matcher(b)).transpose()?,
            bare,
            plan,
            at_start: true,
            objects: Objects::default(),
            state,
        })
    }
}

impl ToolConstraint {
    fn start_call(&self) -> Result<Constraint, String> {
        let body = self
            .body
            .as_ref()
            .ok_or("internal: no tagged call grammar")?;
        Constraint::spawn(body.deep_clone(), self.grammars.vocab).map_err(|e| e.to_string())
    }

    /// The bare grammar, fed the tokens the model wrote freely before naming a tool: None when it
    /// refuses them (the answer is then text).
    fn take_over(&self, tokens: &[u32]) -> Result<Option<Constraint>, String> {
        let bare = self.bare.as_ref().ok_or("internal: no bare call grammar")?;
        let mut m = bare.deep_clone();
        if m.consume_tokens(tokens).is_err() || m.is_error() {
            return Ok(None);
        }
        Constraint::spawn(m, self.grammars.vocab)
            .map(Some)
            .map_err(|e| e.to_string())
    }
}

/// A token's text (special tokens without the trie's marker byte).
fn token_bytes(g: &Grammars, token: u32) -> Vec<u8> {
    let b = g.factory.tok_env().tok_trie().token(token);
    match b.split_first() {
        Some((&0xFF, rest)) => rest.to_vec(),
        _ => b.to_vec(),
    }
}

impl TokenConstraint for ToolConstraint {
    fn allowed(&mut self) -> Result<Option<Vec<u32>>, String> {
        match &mut self.state {
            State::Call(c) => c.allowed(),
            _ => Ok(None),
        }
    }

    fn commit(&mut self, token: u32) -> Result<bool, String> {
        match &mut self.state {
            State::Text => Ok(false),
            State::Call(c) => {
                let done = c.commit(token)?;
                if self.objects.on && self.objects.feed(&token_bytes(&self.grammars, token)) {
                    // The model repeats a call it has made: the answer ends here.
                    return Ok(true);
                }
                if !done {
                    return Ok(false);
                }
                // A call is complete: more may follow (tagged syntax) or the answer ends here.
                if self.plan.parallel && matches!(self.plan.syntax, ToolSyntax::Tagged { .. }) {
                    self.state = State::Free { tail: Vec::new() };
                    return Ok(false);
                }
                Ok(true)
            }
            State::Header { tokens, text } => {
                tokens.push(token);
                text.extend_from_slice(&token_bytes(&self.grammars, token));
                let tool = match call_header(&String::from_utf8_lossy(text)) {
                    Header::Undecided => return Ok(false),
                    Header::Name(n) => self.plan.tools.iter().any(|t| t.name == n),
                    Header::Text => false,
                };
                let tokens = std::mem::take(tokens);
                let text = std::mem::take(text);
                self.state = match tool {
                    true => match self.take_over(&tokens)? {
                        Some(c) => {
                            self.objects.on = true;
                            self.objects.feed(&text);
                            State::Call(c)
                        }
                        None => State::Text,
                    },
                    false => State::Text,
                };
                Ok(false)
            }
            State::Free { tail } => {
                let bytes = token_bytes(&self.grammars, token);
                let first = bytes.iter().find(|b| !b" \t\r\n".contains(b)).copied();
                if self.at_start && first.is_some() {
                    self.at_start = false;
                    if matches!(first, Some(b'{' | b'`')) {
                        // Blanks before it were free text; the bare grammar allows them.
                        self.state = State::Header {
                            tokens: vec![token],
                            text: bytes,
                        };
                        return Ok(false);
                    }
                    if self.plan.syntax == ToolSyntax::Json {
                        self.state = State::Text;
                        return Ok(false);
                    }
                }
                if let ToolSyntax::Tagged { open, .. } = &self.plan.syntax {
                    tail.extend_from_slice(&bytes);
                    if tail.ends_with(open.as_bytes()) {
                        let c = self.start_call()?;
                        self.state = State::Call(c);
                    } else if tail.len() > 4 * open.len() {
                        let keep = open.len();
                        tail.drain(..tail.len() - keep);
                    }
                }
                Ok(false)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_decide_on_the_name_alone() {
        for (s, want) in [
            ("", Header::Undecided),
            ("  {", Header::Undecided),
            ("{\"na", Header::Undecided),
            ("{\"name\": \"get_w", Header::Undecided),
            (
                "{\"name\": \"get_weather\"",
                Header::Name("get_weather".into()),
            ),
            ("```json\n{\n  \"name\": \"f\",", Header::Name("f".into())),
            ("``", Header::Undecided),
            ("```json", Header::Undecided),
            ("{\"arguments\": {}}", Header::Text),
            ("Hello", Header::Text),
            ("```python\nprint(1)", Header::Text),
        ] {
            assert_eq!(call_header(s), want, "{s:?}");
        }
    }

    #[test]
    fn a_tagged_template_is_told_only_when_not_to_call() {
        let plan = |required| ToolPlan {
            tools: vec![],
            syntax: ToolSyntax::of_template(Some("<tool_call>{{ x }}</tool_call>")),
            required,
            parallel: true,
        };
        assert_eq!(plan(false).instructions().as_deref(), Some(DECLINE));
        assert_eq!(plan(true).instructions(), None);
        let json = ToolPlan {
            syntax: ToolSyntax::Json,
            ..plan(false)
        };
        assert!(json.instructions().unwrap().contains("plain text"));
    }
}
