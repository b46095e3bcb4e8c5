//! `response_format` and `tools` for the local tier: what the request asks for becomes a
//! [`Spec`], the spec a grammar constraint for the engine and instructions in the system prompt;
//! tool-call answers are turned back into OpenAI `tool_calls` (whole, or streamed as
//! `delta.tool_calls` fragments).

use porteiro_grammar::{call_header, Header, ObjectScan, Scan, Spec, Tool, ToolPlan, ToolSyntax};
use porteiro_protocol::{
    ChatCompletionRequest, FunctionCall, FunctionDelta, ToolCall, ToolCallDelta,
};
use serde_json::Value;

use crate::ApiError;

/// What a request constrains its answer to.
#[derive(Debug, Clone)]
pub enum Structured {
    /// `response_format`: the JSON is the message content.
    Json(Spec),
    /// `tools`: text and/or calls in the model's syntax, returned as `tool_calls`.
    Tools(ToolPlan),
}

fn bad(param: &str, msg: impl Into<String>) -> ApiError {
    ApiError::invalid(param, msg)
}

/// What a chat request asks for, if anything, for a model whose calls take `syntax`.
pub fn spec_of(
    req: &ChatCompletionRequest,
    syntax: &ToolSyntax,
) -> Result<Option<Structured>, ApiError> {
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
            Some("json_object") => return Ok(Some(Structured::Json(Spec::JsonObject))),
            Some("json_schema") => {
                let schema = &rf["json_schema"]["schema"];
                if !schema.is_object() {
                    return Err(bad(
                        "response_format.json_schema.schema",
                        "`json_schema.schema` must be a JSON Schema object.",
                    ));
                }
                return Ok(Some(Structured::Json(Spec::JsonSchema(schema.clone()))));
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
    let parallel = req.parallel_tool_calls.unwrap_or(true);
    let plan = |tools: Vec<Tool>, required: bool| {
        Ok(Some(Structured::Tools(ToolPlan {
            tools,
            syntax: syntax.clone(),
            required,
            parallel,
        })))
    };
    match &req.tool_choice {
        Some(Value::String(s)) if s == "none" => Ok(None),
        Some(Value::String(s)) if s == "required" => plan(tools, true),
        // `auto` (the default): the model decides; a call it starts is held to the schemas.
        None => plan(tools, false),
        Some(Value::String(s)) if s == "auto" => plan(tools, false),
        Some(v @ Value::Object(_)) => {
            let name = v["function"]["name"].as_str().unwrap_or_default();
            let one: Vec<Tool> = tools.into_iter().filter(|t| t.name == name).collect();
            if one.is_empty() {
                return Err(bad(
                    "tool_choice",
                    format!("`{name}` is not one of the tools given."),
                ));
            }
            plan(one, true)
        }
        Some(_) => Err(bad(
            "tool_choice",
            "`tool_choice` must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": …}}.",
        )),
    }
}

/// One complete call `{"name": …, "arguments": {…}}` (as the grammar makes the model write it)
/// as OpenAI's `ToolCall`.
pub fn tool_call(text: &str, id: &str) -> Result<ToolCall, ApiError> {
    let v: Value = serde_json::from_str(text.trim()).map_err(|e| {
        ApiError::internal(format!("the constrained call is not JSON ({e}): {text}"))
    })?;
    match (&v["name"], &v["arguments"]) {
        (Value::String(name), args @ Value::Object(_)) => Ok(ToolCall {
            id: id.to_string(),
            kind: "function".into(),
            function: FunctionCall {
                name: name.clone(),
                arguments: args.to_string(),
            },
        }),
        _ => Err(ApiError::internal(format!(
            "the constrained call lacks a name or an arguments object: {text}"
        ))),
    }
}

/// What a piece of generated text adds to the answer.
#[derive(Debug, Default)]
pub struct Split {
    pub content: String,
    pub calls: Vec<ToolCallDelta>,
}

/// Splits an answer into text and tool calls as it streams, in the model's call syntax (see
/// `porteiro_grammar::ToolSyntax`): text goes out as content, each call as `delta.tool_calls`
/// with its own index and id. Blank text is held back and dropped once a call starts (a call's
/// answer has no content).
pub struct CallParser {
    syntax: ToolSyntax,
    /// The tools' names: a bare answer is a call only if it names one (as the constraint decides).
    names: Vec<String>,
    ids: Box<dyn FnMut() -> String + Send>,
    /// Text not yet classified (a possible start of a tag, blanks).
    pending: String,
    /// The call being read.
    inside: Option<ToolStream>,
    /// Complete calls' texts, checked at the end.
    done: Vec<String>,
    started: u32,
    /// The first non-blank character has been seen (and `json` / `text` set from it).
    decided: bool,
    /// Calls are bare JSON objects (the JSON syntax, or a tagged family's answer that starts with
    /// `{` or a fence).
    json: bool,
    /// JSON syntax: the answer turned out to be text.
    text: bool,
    /// A bare answer's text so far, and where its object starts.
    raw: String,
    /// A bare answer repeated a call: the rest is ignored.
    repeated: bool,
    call_at: Option<usize>,
    /// Where the bare answer's text stands among its objects.
    scan: ObjectScan,
}

/// The length of the longest suffix of `s` that is a proper prefix of `tag`.
fn partial_tag(s: &str, tag: &str) -> usize {
    (1..tag.len().min(s.len() + 1))
        .rev()
        .find(|&n| s.is_char_boundary(s.len() - n) && tag.starts_with(&s[s.len() - n..]))
        .unwrap_or(0)
}

impl CallParser {
    pub fn new(
        syntax: ToolSyntax,
        names: Vec<String>,
        ids: Box<dyn FnMut() -> String + Send>,
    ) -> Self {
        Self {
            syntax,
            names,
            ids,
            pending: String::new(),
            inside: None,
            done: Vec::new(),
            started: 0,
            decided: false,
            json: false,
            text: false,
            raw: String::new(),
            repeated: false,
            call_at: None,
            scan: ObjectScan::default(),
        }
    }

    fn open_call(&mut self) -> ToolStream {
        let ts = ToolStream::new((self.ids)(), self.started);
        self.started += 1;
        ts
    }

    /// Content that may go out: blanks wait until something else follows, and vanish once a
    /// call has started.
    fn emit(&mut self, out: &mut Split, text: &str) {
        if self.started > 0 && text.trim().is_empty() {
            return;
        }
        out.content.push_str(text);
    }

    pub fn push(&mut self, piece: &str) -> Split {
        let mut out = Split::default();
        self.pending.push_str(piece);
        if !self.decided {
            match self.pending.trim_start().chars().next() {
                None => return out,
                Some('{' | '`') => match call_header(&self.pending) {
                    Header::Undecided => return out,
                    Header::Name(n) if self.names.contains(&n) => {
                        self.decided = true;
                        self.json = true;
                    }
                    _ => {
                        self.decided = true;
                        self.text = true;
                    }
                },
                Some(_) => {
                    self.decided = true;
                    self.text = self.syntax == ToolSyntax::Json;
                }
            }
        }
        if self.text {
            let t = std::mem::take(&mut self.pending);
            self.emit(&mut out, &t);
            return out;
        }
        if self.json {
            self.json_calls(&mut out);
            return out;
        }
        if let ToolSyntax::Tagged { open, close } = self.syntax.clone() {
            self.tagged(&mut out, &open, &close);
        }
        out
    }

    fn tagged(&mut self, out: &mut Split, open: &str, close: &str) {
        loop {
            match self.inside.as_mut() {
                None => {
                    if let Some(i) = self.pending.find(open) {
                        let before: String = self.pending.drain(..i + open.len()).collect();
                        let before = &before[..i];
                        if !before.trim().is_empty() {
                            self.emit(out, before);
                        }
                        let ts = self.open_call();
                        self.inside = Some(ts);
                        continue;
                    }
                    let keep = partial_tag(&self.pending, open);
                    let cut = self.pending.len() - keep;
                    if self.pending[..cut].trim().is_empty() {
                        // Blanks wait for what follows them.
                        return;
                    }
                    let text: String = self.pending.drain(..cut).collect();
                    self.emit(out, &text);
                    return;
                }
                Some(ts) => {
                    if let Some(j) = self.pending.find(close) {
                        let body: String = self.pending.drain(..j + close.len()).collect();
                        out.calls.extend(ts.push(&body[..j]));
                        out.calls.extend(ts.finish());
                        self.done.push(ts.text().to_string());
                        self.inside = None;
                        continue;
                    }
                    let keep = partial_tag(&self.pending, close);
                    let body: String = self.pending.drain(..self.pending.len() - keep).collect();
                    out.calls.extend(ts.push(&body));
                    return;
                }
            }
        }
    }

    /// Bare calls: each top-level `{…}` object (brace depth outside strings) must be a call of a
    /// given tool, held until the answer ends and then sent whole; blanks and a fence may surround
    /// them. A call repeating an earlier one ends the answer (the constraint stops there too).
    /// Anything else makes the whole answer text (as the constraint reads it).
    fn json_calls(&mut self, out: &mut Split) {
        let text = std::mem::take(&mut self.pending);
        if self.repeated {
            return;
        }
        let start = self.raw.len();
        self.raw.push_str(&text);
        let mut utf8 = [0u8; 4];
        for (i, c) in text.char_indices() {
            // A multi-byte character is never a brace or a quote: all its bytes scan alike.
            let step = c
                .encode_utf8(&mut utf8)
                .bytes()
                .map(|b| self.scan.step(b))
                .last();
            match step.unwrap_or(Scan::Inside) {
                Scan::Outside => {
                    if !(c.is_whitespace() || c == '`' || "json".contains(c)) {
                        self.become_text(out);
                        return;
                    }
                }
                Scan::Open => self.call_at = Some(start + i),
                Scan::Inside => {}
                Scan::Closed => {
                    let from = self.call_at.unwrap_or(0);
                    let call = self.raw[from..start + i + 1].to_string();
                    let named = tool_call(&call, "check")
                        .is_ok_and(|c| self.names.contains(&c.function.name));
                    if !named {
                        self.become_text(out);
                        return;
                    }
                    let v: Value = serde_json::from_str(&call).unwrap_or(Value::Null);
                    if self
                        .done
                        .iter()
                        .any(|d| serde_json::from_str::<Value>(d).is_ok_and(|dv| dv == v))
                    {
                        self.repeated = true;
                        return;
                    }
                    self.done.push(call);
                }
            }
        }
    }

    /// A bare answer that is not a call after all: everything so far goes out as content.
    fn become_text(&mut self, out: &mut Split) {
        self.json = false;
        self.text = true;
        self.done.clear();
        self.started = 0;
        out.content.push_str(&std::mem::take(&mut self.raw));
    }

    /// The end of the answer: the rest of the text and of the last call. A tagged call cut short
    /// (by `max_tokens`) is flushed as it stands; every complete call must parse (the grammar
    /// guarantees it). Returns the number of complete calls.
    pub fn finish(&mut self) -> Result<(Split, usize), ApiError> {
        let mut out = Split::default();
        if !self.decided && !self.pending.trim().is_empty() {
            // An answer that ended before its header was complete is text.
            self.text = true;
        }
        if self.json && self.done.is_empty() {
            // A bare object cut short (max_tokens) before any call completed is text.
            self.pending.insert_str(0, &std::mem::take(&mut self.raw));
            self.json = false;
            self.done.clear();
        }
        if self.json {
            // The bare answer's calls, whole.
            for call in self.done.clone() {
                let mut ts = self.open_call();
                out.calls.extend(ts.push(&call));
                out.calls.extend(ts.finish());
            }
            self.pending.clear();
        }
        if let Some(mut ts) = self.inside.take() {
            let rest = std::mem::take(&mut self.pending);
            out.calls.extend(ts.push(&rest));
            out.calls.extend(ts.finish());
        }
        let rest = std::mem::take(&mut self.pending);
        if !self.json && (self.started == 0 || !rest.trim().is_empty()) {
            out.content.push_str(&rest);
        }
        for (i, t) in self.done.iter().enumerate() {
            tool_call(t, &format!("check{i}"))?;
        }
        Ok((out, self.done.len()))
    }
}

/// Streams a tool-call answer as it is generated: once `{"name":"…","arguments":` is complete the
/// first delta carries id, type and name; then argument fragments follow, holding back the last
/// character, which may be the wrapper's closing brace.
pub struct ToolStream {
    id: String,
    index: u32,
    text: String,
    /// Bytes of `text` already sent as argument fragments (from the start of the arguments).
    sent: usize,
    args_start: Option<usize>,
    /// No argument text sent yet: blanks before it are skipped.
    blank_args: bool,
}

const ARGS_KEY: &str = "\"arguments\":";

impl ToolStream {
    pub fn new(id: String, index: u32) -> Self {
        Self {
            id,
            index,
            text: String::new(),
            sent: 0,
            args_start: None,
            blank_args: false,
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
            self.blank_args = true;
            self.sent = start;
            out.push(ToolCallDelta {
                index: self.index,
                id: Some(self.id.clone()),
                kind: Some("function"),
                function: FunctionDelta {
                    name: Some(head["name"].as_str().unwrap_or_default().to_string()),
                    arguments: String::new(),
                },
            });
        }
        // The arguments start at their first non-blank character.
        if self.blank_args {
            let rest = &self.text[self.sent..];
            let skip = rest.len() - rest.trim_start().len();
            self.sent += skip;
            if skip < rest.len() {
                self.blank_args = false;
            }
        }
        // Everything but the last character other than trailing blanks (a possible closing brace
        // of the wrapper).
        let mut end = self.text.trim_end().len().saturating_sub(1).max(self.sent);
        while !self.text.is_char_boundary(end) {
            end -= 1;
        }
        if end > self.sent {
            out.push(self.fragment(&self.text[self.sent..end]));
            self.sent = end;
        }
        out
    }

    /// The last fragment, without the wrapper's closing brace.
    pub fn finish(&mut self) -> Vec<ToolCallDelta> {
        let rest = self.text[self.sent.min(self.text.len())..].trim_end();
        let rest = rest.strip_suffix('}').unwrap_or(rest);
        if rest.is_empty() || self.args_start.is_none() {
            Vec::new()
        } else {
            vec![self.fragment(rest)]
        }
    }

    fn fragment(&self, s: &str) -> ToolCallDelta {
        ToolCallDelta {
            index: self.index,
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

    fn tagged() -> ToolSyntax {
        ToolSyntax::Tagged {
            open: "<tool_call>".into(),
            close: "</tool_call>".into(),
        }
    }

    /// Feeds `text` in pieces of `size` characters; returns (content, calls as (id, name, args)).
    fn run(syntax: ToolSyntax, text: &str, size: usize) -> (String, Vec<(String, String, String)>) {
        let mut n = 0;
        let names = ["get_weather", "a", "b", "f"].map(String::from).to_vec();
        let mut p = CallParser::new(
            syntax,
            names,
            Box::new(move || {
                n += 1;
                format!("call_{n}")
            }),
        );
        let chars: Vec<char> = text.chars().collect();
        let mut splits = Vec::new();
        for piece in chars.chunks(size) {
            splits.push(p.push(&piece.iter().collect::<String>()));
        }
        let (last, _) = p.finish().unwrap();
        splits.push(last);
        let mut content = String::new();
        let mut calls: Vec<(String, String, String)> = Vec::new();
        for s in splits {
            content.push_str(&s.content);
            for d in s.calls {
                let i = d.index as usize;
                if calls.len() <= i {
                    calls.resize(i + 1, Default::default());
                }
                if let Some(id) = d.id {
                    calls[i].0 = id;
                }
                if let Some(name) = d.function.name {
                    calls[i].1.push_str(&name);
                }
                calls[i].2.push_str(&d.function.arguments);
            }
        }
        (content, calls)
    }

    #[test]
    fn streamed_fragments_reassemble_the_arguments() {
        let text = r#"{"name":"get_weather","arguments":{"city":"Lisboa","unit":"c"}}"#;
        for size in 1..8 {
            let (content, calls) = run(ToolSyntax::Json, text, size);
            assert_eq!(content, "");
            assert_eq!(calls.len(), 1, "size {size}");
            assert_eq!(calls[0].0, "call_1");
            assert_eq!(calls[0].1, "get_weather");
            assert_eq!(calls[0].2, r#"{"city":"Lisboa","unit":"c"}"#, "size {size}");
        }
        let call = tool_call(text, "call_2").unwrap();
        assert_eq!(call.function.name, "get_weather");
        let args: Value = serde_json::from_str(&call.function.arguments).unwrap();
        assert_eq!(args["city"], "Lisboa");
        assert!(tool_call(r#"{"name":"f"}"#, "x").is_err());
    }

    #[test]
    fn tagged_answers_split_into_text_and_parallel_calls() {
        let text = "<tool_call>\n{\"name\":\"a\",\"arguments\":{\"x\":1}}\n</tool_call>\n<tool_call>\n{\"name\":\"b\",\"arguments\":{\"s\":\"</tool\"}}\n</tool_call>";
        for size in [1, 2, 3, 5, 8, 13, 200] {
            let (content, calls) = run(tagged(), text, size);
            assert_eq!(content, "", "size {size}");
            assert_eq!(calls.len(), 2, "size {size}");
            assert_eq!((calls[0].0.as_str(), calls[0].1.as_str()), ("call_1", "a"));
            assert_eq!(calls[0].2, r#"{"x":1}"#, "size {size}");
            assert_eq!((calls[1].0.as_str(), calls[1].1.as_str()), ("call_2", "b"));
            assert_eq!(calls[1].2, r#"{"s":"</tool"}"#, "size {size}");
        }
        // Text only, with something that looks like the start of a tag.
        for size in [1, 4, 100] {
            let (content, calls) = run(tagged(), "Hello! a <b> and <tool", size);
            assert_eq!(content, "Hello! a <b> and <tool");
            assert!(calls.is_empty());
        }
        // A tagged family's answer that starts with a bare object: calls in the JSON syntax.
        let (content, calls) = run(tagged(), "{\"name\":\"a\",\"arguments\":{\"x\":2}}", 4);
        assert_eq!((content.as_str(), calls.len()), ("", 1));
        assert_eq!(calls[0].2, r#"{"x":2}"#);
        // Text, then a call.
        let (content, calls) = run(
            tagged(),
            "Let me check.\n<tool_call>\n{\"name\":\"a\",\"arguments\":{}}\n</tool_call>",
            3,
        );
        assert_eq!(content, "Let me check.\n");
        assert_eq!(calls[0].2, "{}");
    }

    #[test]
    fn bare_answers_are_text_or_one_call() {
        let (content, calls) = run(ToolSyntax::Json, "  The capital is Paris.", 2);
        assert_eq!(content, "  The capital is Paris.");
        assert!(calls.is_empty());
        let text = "{\"name\":\"a\",\"arguments\":{\"k\":[1,2],\"s\":\"}{\\\"\"}}\n";
        for size in [1, 3, 7, 100] {
            let (content, calls) = run(ToolSyntax::Json, text, size);
            assert_eq!(content, "", "size {size}");
            assert_eq!(calls.len(), 1, "size {size}");
            assert_eq!(calls[0].2, r#"{"k":[1,2],"s":"}{\""}"#);
        }
        // Several calls; a repeated one ends the answer.
        let calls3 = "{\"name\":\"a\",\"arguments\":{\"x\":1}}\n{\"name\":\"a\",\"arguments\":{\"x\":2}}\n{\"name\":\"a\",\"arguments\":{\"x\":1}}\n{\"name";
        for size in [1, 6, 200] {
            let (content, calls) = run(ToolSyntax::Json, calls3, size);
            assert_eq!((content.as_str(), calls.len()), ("", 2), "size {size}");
            assert_eq!(
                (calls[0].2.as_str(), calls[1].2.as_str()),
                (r#"{"x":1}"#, r#"{"x":2}"#)
            );
        }
        // Anything but calls: the whole answer is text.
        let two = "{\"name\":\"a\",\"arguments\":{}}\n{\"temp\":3}";
        let (content, calls) = run(ToolSyntax::Json, two, 5);
        assert_eq!((content.as_str(), calls.len()), (two, 0));
        // Fenced and pretty-printed, as small models write it.
        let fenced =
            "```json\n{\n  \"name\": \"a\",\n  \"arguments\": {\n    \"x\": 1\n  }\n}\n```";
        for size in [1, 4, 100] {
            let (content, calls) = run(ToolSyntax::Json, fenced, size);
            assert_eq!((content.as_str(), calls.len()), ("", 1), "size {size}");
            let args: Value = serde_json::from_str(&calls[0].2).unwrap();
            assert_eq!(args["x"], 1);
        }
        // An object that names no tool is text.
        let hello = "{\"name\": \"hello\", \"arguments\": {}}";
        let (content, calls) = run(tagged(), hello, 3);
        assert_eq!((content.as_str(), calls.len()), (hello, 0));
        // Cut short: text.
        let (content, calls) = run(tagged(), "{\"name\": \"a\", \"arguments\": {\"x\"", 3);
        assert_eq!(
            (content.as_str(), calls.len()),
            ("{\"name\": \"a\", \"arguments\": {\"x\"", 0)
        );
    }
}
