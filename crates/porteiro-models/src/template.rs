//! Chat templates: the Jinja template in `tokenizer.chat_template`, rendered with minijinja.
//!
//! The environment imitates the one Hugging Face `transformers` (and llama.cpp) render templates in:
//! `trim_blocks` and `lstrip_blocks` on, Python string/dict/list methods (`.strip()`, `.split()`,
//! `.items()`, ...), `raise_exception(msg)`, `strftime_now(fmt)`, a `tojson` that writes JSON the way
//! Python's `json.dumps` does (`", "` and `": "` separators, no HTML escaping), and the variables
//! `messages`, `add_generation_prompt`, `bos_token`, `eos_token` and `tools` (none).

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};

use crate::gguf::{GgufFile, Value as GgufValue};
use crate::tokenizer::Tokenizer;

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("metadata key `tokenizer.chat_template` is not a string")]
    NotAString,
    #[error("chat template does not compile: {0}")]
    Syntax(String),
    #[error("chat template failed to render: {0}")]
    Render(String),
}

const NAME: &str = "chat_template";

pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos: String,
    eos: String,
    strip_bos: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish_non_exhaustive()
    }
}

/// minijinja's message plus the template location, on one line.
fn describe(e: &Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(&format!(": {inner}"));
        src = inner.source();
    }
    s
}

impl ChatTemplate {
    /// The template of a GGUF file, with the tokenizer's BOS/EOS texts; None when the file has none.
    pub fn from_gguf(g: &GgufFile, tok: &Tokenizer) -> Result<Option<Self>, TemplateError> {
        let src = match g.get("tokenizer.chat_template") {
            None => return Ok(None),
            Some(GgufValue::String(s)) => s,
            Some(_) => return Err(TemplateError::NotAString),
        };
        let text = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or("").to_string();
        let mut t = Self::from_source(src, &text(tok.bos_id()), &text(tok.eos_id()))?;
        // The prompt is encoded with add_special, which adds BOS already (llama.cpp strips it too).
        t.strip_bos = tok.adds_bos() && tok.bos_id().is_some();
        Ok(Some(t))
    }

    pub fn from_source(src: &str, bos: &str, eos: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, neutralise_generation_tags(src))
            .map_err(|e| TemplateError::Syntax(describe(&e)))?;
        Ok(Self {
            env,
            source: src.to_string(),
            bos: bos.to_string(),
            eos: eos.to_string(),
            strip_bos: false,
        })
    }

    /// Renders the conversation; with `add_generation_prompt` the text ends where the assistant's reply
    /// begins. `tools` is left undefined, as llama.cpp does when a request has none.
    ///
    /// For a template from [`ChatTemplate::from_gguf`] whose tokenizer adds BOS itself, a leading BOS text
    /// is removed from the result (as llama.cpp does), so the text is meant to be encoded with
    /// `add_special = true` and `parse_special = true`.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        self.render_with(Value::from_serialize(messages), None, add_generation_prompt)
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// [`ChatTemplate::render`] with messages as OpenAI's JSON (`tool_calls`, `tool_call_id`,
    /// `role: tool` as the template reads them) and the request's `tools` list, for templates that
    /// render tools themselves.
    pub fn render_json(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        self.render_with(
            Value::from_serialize(messages),
            tools.map(Value::from_serialize),
            add_generation_prompt,
        )
    }

    fn render_with(
        &self,
        messages: Value,
        tools: Option<Value>,
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| TemplateError::Syntax(describe(&e)))?;
        let base = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos.as_str(),
            eos_token => self.eos.as_str(),
        };
        // `tools` stays undefined without tools, as llama.cpp leaves it.
        let ctx = match tools {
            Some(t) => minijinja::context! { tools => t, ..base },
            None => base,
        };
        let out = tmpl
            .render(ctx)
            .map_err(|e| TemplateError::Render(describe(&e)))?;
        if self.strip_bos && !self.bos.is_empty() {
            if let Some(rest) = out.strip_prefix(self.bos.as_str()) {
                return Ok(rest.to_string());
            }
        }
        Ok(out)
    }
}

/// `{% generation %}` ... `{% endgeneration %}` (a transformers extension that marks assistant text for
/// training masks) renders its body unchanged: rewrite the tags into `if true` / `endif`, keeping their
/// whitespace control.
fn neutralise_generation_tags(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(p) = rest.find("{%") {
        out.push_str(&rest[..p]);
        let tag = &rest[p..];
        let Some(close) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..close];
        let (lead, body) = match inner.strip_prefix(['-', '+']) {
            Some(b) => (&inner[..1], b),
            None => ("", inner),
        };
        let (body, trail) = match body.strip_suffix(['-', '+']) {
            Some(b) => (b, &body[b.len()..]),
            None => (body, ""),
        };
        match body.trim() {
            "generation" => out.push_str(&format!("{{%{lead} if true {trail}%}}")),
            "endgeneration" => out.push_str(&format!("{{%{lead} endif {trail}%}}")),
            _ => out.push_str(&tag[..close + 2]),
        }
        rest = &tag[close + 2..];
    }
    out.push_str(rest);
    out
}

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

// ---------------------------------------------------------------------------------------------------
// tojson, Python style
// ---------------------------------------------------------------------------------------------------

fn tojson(v: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    // separators are accepted for compatibility; the Python defaults are used
    let _: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(i) if i.is_none() => None,
        Some(i) => match i64::try_from(i.clone()) {
            Ok(n) => Some(" ".repeat(n.max(0) as usize)),
            Err(_) => Some(i.as_str().unwrap_or("").to_string()),
        },
    };
    let opts = JsonOpts {
        indent,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    write_json(&v, &opts, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

struct JsonOpts {
    indent: Option<String>,
    sort_keys: bool,
    ensure_ascii: bool,
}

fn write_json_str(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && (c as u32) > 0x7E) => {
                let mut buf = [0u16; 2];
                for u in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Serialises like Python's `json.dumps(v, ensure_ascii=False)`: `", "`/`": "` separators (`","` at
/// line ends when indenting), keys in the value's own order.
fn write_json(v: &Value, o: &JsonOpts, depth: usize, out: &mut String) -> Result<(), Error> {
    use minijinja::value::ValueKind as K;
    let newline = |out: &mut String, d: usize| {
        if let Some(ind) = &o.indent {
            out.push('\n');
            for _ in 0..d {
                out.push_str(ind);
            }
        }
    };
    let item_sep = if o.indent.is_some() { "," } else { ", " };
    match v.kind() {
        K::Undefined | K::None => out.push_str("null"),
        K::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        K::Number => {
            if let Ok(i) = i128::try_from(v.clone()) {
                out.push_str(&i.to_string());
            } else {
                let f = f64::try_from(v.clone()).unwrap_or(f64::NAN);
                out.push_str(&if f.is_nan() {
                    "NaN".to_string()
                } else if f.is_infinite() {
                    if f > 0.0 { "Infinity" } else { "-Infinity" }.to_string()
                } else {
                    // Python's repr: always a decimal point or an exponent
                    let s = format!("{f:?}");
                    match s.split_once('e') {
                        Some((m, e)) => {
                            let (sign, digits) =
                                e.strip_prefix('-').map(|d| ('-', d)).unwrap_or(('+', e));
                            format!("{m}e{sign}{digits:0>2}")
                        }
                        None => s,
                    }
                });
            }
        }
        K::String => write_json_str(v.as_str().unwrap_or(""), o.ensure_ascii, out),
        K::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if o.sort_keys {
                keys.sort_by_key(|k| k.to_string());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json_str(&k.to_string(), o.ensure_ascii, out);
                out.push_str(": ");
                write_json(&v.get_item(k)?, o, depth + 1, out)?;
            }
            newline(out, depth);
            out.push('}');
        }
        K::Seq | K::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json(x, o, depth + 1, out)?;
            }
            newline(out, depth);
            out.push(']');
        }
        _ => {
            // bytes, plain objects: fall back to their string form
            write_json_str(&v.to_string(), o.ensure_ascii, out)
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// strftime_now
// ---------------------------------------------------------------------------------------------------

/// Current UTC time formatted with the common C `strftime` directives.
fn strftime_now(fmt: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(&fmt, secs)
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn strftime(fmt: &str, secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (tod / 3600, tod / 60 % 60, tod % 60);
    let wd = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let yday = days - {
        // days since epoch of Jan 1st of year y
        let mut lo = days - 366;
        while civil_from_days(lo).0 < y {
            lo += 1;
        }
        lo
    } + 1;
    let mut out = String::new();
    let mut it = fmt.chars();
    while let Some(c) = it.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('e') => out.push_str(&format!("{d:2}")),
            Some('B') => out.push_str(MONTHS[m as usize - 1]),
            Some('b') | Some('h') => out.push_str(&MONTHS[m as usize - 1][..3]),
            Some('A') => out.push_str(DAYS[wd]),
            Some('a') => out.push_str(&DAYS[wd][..3]),
            Some('H') => out.push_str(&format!("{hh:02}")),
            Some('I') => out.push_str(&format!("{:02}", if hh % 12 == 0 { 12 } else { hh % 12 })),
            Some('M') => out.push_str(&format!("{mm:02}")),
            Some('S') => out.push_str(&format!("{ss:02}")),
            Some('p') => out.push_str(if hh < 12 { "AM" } else { "PM" }),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('F') => out.push_str(&format!("{y}-{m:02}-{d:02}")),
            Some('T') => out.push_str(&format!("{hh:02}:{mm:02}:{ss:02}")),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
// Tests: a failed unwrap is a failed test, and skipped checks say so on stderr.
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn conversation() -> Vec<ChatMessage> {
        vec![
            ChatMessage::new("system", "You are terse."),
            ChatMessage::new("user", "Olá! Quanto é 2+2?"),
            ChatMessage::new("assistant", "4."),
            ChatMessage::new("user", "E 3+3?"),
        ]
    }

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_chatml() {
        let t = ChatTemplate::from_source(CHATML, "", "<|im_end|>").unwrap();
        let out = t.render(&conversation(), true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nOlá! Quanto é 2+2?<|im_end|>\n\
             <|im_start|>assistant\n4.<|im_end|>\n<|im_start|>user\nE 3+3?<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t.render(&conversation()[..2], false).unwrap();
        assert!(out.ends_with("2+2?<|im_end|>\n"));
    }

    #[test]
    fn raise_exception_is_a_render_error_with_the_message() {
        let t = ChatTemplate::from_source("{{ raise_exception('roles must alternate') }}", "", "")
            .unwrap();
        let e = t.render(&conversation(), true).unwrap_err().to_string();
        assert!(e.contains("roles must alternate"), "{e}");
    }

    #[test]
    fn syntax_errors_are_reported_at_construction() {
        let e = ChatTemplate::from_source("{% for x in %}", "", "").unwrap_err();
        assert!(matches!(e, TemplateError::Syntax(_)), "{e}");
    }

    #[test]
    fn python_methods_blocks_and_variables() {
        let src = "{{ bos_token }}{% for m in messages %}{% if m.content.startswith('Olá') %}[{{ m.content.split('!')[0].upper() }}]{% endif %}\n{% endfor %}{{ eos_token }}|{{ tools is defined }}|{{ {'a': none, 'b': [1, 2.5, 1e-7, 'x\"y']} | tojson }}|{{ ['é'] | tojson(indent=2) }}|{% generation %}g{% endgeneration %}";
        let t = ChatTemplate::from_source(src, "<s>", "</s>").unwrap();
        let out = t.render(&conversation(), false).unwrap();
        assert_eq!(
            out,
            "<s>[OLÁ]</s>|False|{\"a\": null, \"b\": [1, 2.5, 1e-07, \"x\\\"y\"]}|[\n  \"é\"\n]|g"
        );
        let t =
            ChatTemplate::from_source("{{ strftime_now('%Y-%m-%d') | length }}", "", "").unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "10");
    }

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-07-26 13:05:09 UTC, a Friday, day 208 of a leap year
        let t = 1_722_000_000 - 1_722_000_000 % 86_400 + 13 * 3600 + 5 * 60 + 9;
        assert_eq!(
            strftime("%d %b %Y %A %H:%M:%S %j %I%p %%", t),
            "26 Jul 2024 Friday 13:05:09 208 01PM %"
        );
        assert_eq!(strftime("%F %a", 0), "1970-01-01 Thu");
        assert_eq!(strftime("%F %j", 951_782_400), "2000-02-29 060");
    }

    fn templates_dir() -> PathBuf {
        let dirs = [
            std::env::var("PORTEIRO_LLAMA_CPP_SRC")
                .map(PathBuf::from)
                .unwrap_or_default(),
            PathBuf::from("/work/cache/src/llama_cpp_python-0.3.36/vendor/llama.cpp"),
        ];
        dirs.iter()
            .map(|d| d.join("models/templates"))
            .find(|d| d.is_dir())
            .unwrap_or_default()
    }

    fn load(name: &str) -> Option<String> {
        let p = templates_dir().join(name);
        match std::fs::read_to_string(&p) {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("skipping {name}: cannot read {} ({e}); set PORTEIRO_LLAMA_CPP_SRC to a llama.cpp checkout", p.display());
                None
            }
        }
    }

    fn three() -> Vec<ChatMessage> {
        conversation()[..3].to_vec()
    }

    #[test]
    fn qwen25_template() {
        let Some(src) = load("Qwen-Qwen2.5-7B-Instruct.jinja") else {
            return;
        };
        let t = ChatTemplate::from_source(&src, "", "<|im_end|>").unwrap();
        assert_eq!(
            t.render(&three(), true).unwrap(),
            "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nOlá! Quanto é 2+2?<|im_end|>\n\
             <|im_start|>assistant\n4.<|im_end|>\n<|im_start|>assistant\n"
        );
        // without a system message the default one is used
        let out = t.render(&three()[1..2], true).unwrap();
        assert!(
            out.starts_with("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud."),
            "{out}"
        );
    }

    #[test]
    fn gemma2_template() {
        let Some(src) = load("google-gemma-2-2b-it.jinja") else {
            return;
        };
        let t = ChatTemplate::from_source(&src, "<bos>", "<eos>").unwrap();
        let e = t.render(&three(), true).unwrap_err().to_string();
        assert!(e.contains("System role not supported"), "{e}");
        let out = t.render(&three()[1..], true).unwrap();
        assert_eq!(
            out,
            "<bos><start_of_turn>user\nOlá! Quanto é 2+2?<end_of_turn>\n<start_of_turn>model\n4.<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn llama32_template() {
        let Some(src) = load("meta-llama-Llama-3.2-3B-Instruct.jinja") else {
            return;
        };
        let t = ChatTemplate::from_source(&src, "<|begin_of_text|>", "<|eot_id|>").unwrap();
        let out = t.render(&three(), true).unwrap();
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let today = strftime("%d %b %Y", secs);
        assert_eq!(
            out,
            format!(
                "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n\
                 Today Date: {today}\n\nYou are terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n\
                 Olá! Quanto é 2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n4.<|eot_id|>\
                 <|start_header_id|>assistant<|end_header_id|>\n\n"
            )
        );
    }

    #[test]
    fn llama31_template() {
        let Some(src) = load("meta-llama-Llama-3.1-8B-Instruct.jinja") else {
            return;
        };
        let t = ChatTemplate::from_source(&src, "<|begin_of_text|>", "<|eot_id|>").unwrap();
        let out = t.render(&three(), true).unwrap();
        assert_eq!(
            out,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n\
             Today Date: 26 Jul 2024\n\nYou are terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n\
             Olá! Quanto é 2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n4.<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn phi35_template() {
        let Some(src) = load("microsoft-Phi-3.5-mini-instruct.jinja") else {
            return;
        };
        let t = ChatTemplate::from_source(&src, "<s>", "<|endoftext|>").unwrap();
        assert_eq!(
            t.render(&three(), true).unwrap(),
            "<|system|>\nYou are terse.<|end|>\n<|user|>\nOlá! Quanto é 2+2?<|end|>\n<|assistant|>\n4.<|end|>\n<|assistant|>\n"
        );
        assert!(t
            .render(&three(), false)
            .unwrap()
            .ends_with("4.<|end|>\n<|endoftext|>"));
    }

    #[test]
    fn mistral_nemo_template() {
        let Some(src) = load("mistralai-Mistral-Nemo-Instruct-2407.jinja") else {
            return;
        };
        let t = ChatTemplate::from_source(&src, "<s>", "</s>").unwrap();
        // the system message goes with the last user turn
        assert_eq!(
            t.render(&conversation(), true).unwrap(),
            "<s>[INST]Olá! Quanto é 2+2?[/INST]4.</s>[INST]You are terse.\n\nE 3+3?[/INST]"
        );
        let bad = [ChatMessage::new("user", "a"), ChatMessage::new("user", "b")];
        assert!(t
            .render(&bad, true)
            .unwrap_err()
            .to_string()
            .contains("alternate"));
    }

    fn model_file(alias: &str) -> Option<PathBuf> {
        match crate::fetch::resolve_model(alias, false) {
            Ok(p) => Some(p),
            Err(e) => {
                assert!(
                    std::env::var_os("PORTEIRO_REQUIRE_MODELS").is_none(),
                    "{alias} required but not cached: {e}"
                );
                eprintln!("skipping {alias}: {e}");
                None
            }
        }
    }

    #[test]
    fn templates_embedded_in_the_models() {
        let chatml = "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nOlá! Quanto é 2+2?<|im_end|>\n\
                      <|im_start|>assistant\n4.<|im_end|>\n<|im_start|>assistant\n";
        for alias in ["smollm2-135m", "qwen2.5-0.5b"] {
            let Some(path) = model_file(alias) else {
                continue;
            };
            let g = GgufFile::open(&path).unwrap();
            let tok = Tokenizer::from_gguf(&g).unwrap();
            let t = ChatTemplate::from_gguf(&g, &tok)
                .unwrap()
                .expect("chat template");
            let out = t.render(&three(), true).unwrap();
            assert_eq!(out, chatml, "{alias}");
            // the rendered prompt encodes with the chat markers as single control tokens
            let ids = tok.encode(&out, true, true);
            let start = tok.token_id("<|im_start|>").unwrap();
            assert_eq!(ids.iter().filter(|&&i| i == start).count(), 4, "{alias}");
            assert_eq!(ids[0], start, "{alias}");
            // without a system message each model uses its own default
            let out = t.render(&three()[1..2], true).unwrap();
            assert!(
                out.starts_with("<|im_start|>system\nYou are "),
                "{alias}: {out}"
            );
        }
        if let Some(path) = model_file("gemma3-270m") {
            // the base (pre-trained) gemma-3-270m ships without a chat template
            let g = GgufFile::open(&path).unwrap();
            let tok = Tokenizer::from_gguf(&g).unwrap();
            let t = ChatTemplate::from_gguf(&g, &tok).unwrap();
            if g.get("tokenizer.chat_template").is_none() {
                assert!(t.is_none());
            }
        }
    }

    #[test]
    fn bos_is_stripped_when_the_tokenizer_adds_it() {
        let mut t = ChatTemplate::from_source("{{ bos_token }}hi", "<bos>", "<eos>").unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "<bos>hi");
        t.strip_bos = true;
        assert_eq!(t.render(&[], false).unwrap(), "hi");
    }

    #[test]
    fn is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<ChatTemplate>();
        check::<Tokenizer>();
    }

    #[test]
    fn many_real_templates_render() {
        let dir = templates_dir();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            eprintln!(
                "skipping: no llama.cpp templates directory at {}",
                dir.display()
            );
            return;
        };
        let mut failures = Vec::new();
        let mut n = 0;
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_none_or(|x| x != "jinja") {
                continue;
            }
            let src = std::fs::read_to_string(&p).unwrap();
            n += 1;
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let res = ChatTemplate::from_source(&src, "<s>", "</s>").and_then(|t| {
                // some templates refuse a system turn; those must at least render user/assistant
                t.render(&three(), true)
                    .or_else(|_| t.render(&three()[1..], true))
            });
            match res {
                Ok(out) => {
                    if !out.contains("Quanto é 2+2?") {
                        failures.push(format!("{name}: user text missing from {out:?}"));
                    }
                }
                Err(e) => failures.push(format!("{name}: {e}")),
            }
        }
        eprintln!("{} of {n} llama.cpp templates rendered", n - failures.len());
        for f in &failures {
            eprintln!("  {f}");
        }
        // a few exotic templates rely on features minijinja lacks; the common families must work
        for must in [
            "Qwen-Qwen2.5",
            "Qwen-Qwen3-0.6B",
            "Qwen3-Coder",
            "gemma-2",
            "Llama-3",
            "SmolLM3",
            "Phi-3.5",
            "Mistral-Nemo",
            "Hermes",
            "DeepSeek-R1",
        ] {
            assert!(
                !failures.iter().any(|f| f.contains(must)),
                "{must} failed: {failures:#?}"
            );
        }
    }
}
