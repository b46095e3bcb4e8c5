//! Typed placeholders: `[EMAIL_1]`, `[CPF_2]` … replace values before a request leaves; the
//! answer is restored on the way back, also when a stream splits a placeholder across chunks.

use std::collections::{BTreeMap, HashMap};

use crate::detect::{Category, Detector};

/// Masks the strings of one request. The same value always gets the same placeholder.
pub struct Masker<'d> {
    det: &'d Detector,
    /// (category, value) → placeholder.
    by_value: HashMap<(Category, String), String>,
    next: HashMap<Category, usize>,
    /// Text the client sent: a placeholder already written there is never reused.
    original: String,
    /// Findings per category (each occurrence counted).
    pub counts: BTreeMap<Category, usize>,
}

impl<'d> Masker<'d> {
    /// `original` is all the client's text (e.g. the raw body), so that its own bracketed words
    /// are never taken for placeholders.
    pub fn new(det: &'d Detector, original: &str) -> Self {
        Self {
            det,
            by_value: HashMap::new(),
            next: HashMap::new(),
            original: original.to_string(),
            counts: BTreeMap::new(),
        }
    }

    /// Counts what `text` holds without masking it.
    pub fn count(&mut self, text: &str) {
        for f in self.det.scan(text) {
            *self.counts.entry(f.category).or_default() += 1;
        }
    }

    /// `text` with every finding replaced by its placeholder.
    pub fn mask(&mut self, text: &str) -> String {
        let findings = self.det.scan(text);
        if findings.is_empty() {
            return text.to_string();
        }
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for f in findings {
            *self.counts.entry(f.category).or_default() += 1;
            out.push_str(&text[at..f.start]);
            let value = f.value(text).to_string();
            let ph = match self.by_value.get(&(f.category, value.clone())) {
                Some(p) => p.clone(),
                None => {
                    let p = self.fresh(f.category);
                    self.by_value.insert((f.category, value), p.clone());
                    p
                }
            };
            out.push_str(&ph);
            at = f.end;
        }
        out.push_str(&text[at..]);
        out
    }

    fn fresh(&mut self, c: Category) -> String {
        let n = self.next.entry(c).or_insert(0);
        loop {
            *n += 1;
            let p = format!("[{}_{}]", c.label(), n);
            if !self.original.contains(&p) {
                return p;
            }
        }
    }

    pub fn found_any(&self) -> bool {
        !self.counts.is_empty()
    }

    /// The reverse map, for the answer.
    pub fn unmasker(&self) -> Unmasker {
        Unmasker {
            map: self
                .by_value
                .iter()
                .map(|((_, v), p)| (p.clone(), v.clone()))
                .collect(),
        }
    }
}

/// Restores placeholders in text coming back.
#[derive(Clone, Default, Debug)]
pub struct Unmasker {
    map: HashMap<String, String>,
}

/// Longest placeholder body we may have to wait for (`[CREDIT_CARD_123456]`).
const MAX_PLACEHOLDER: usize = 24;

fn placeholder_char(c: char) -> bool {
    c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'
}

impl Unmasker {
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// `text` with every known placeholder replaced by its value.
    pub fn unmask(&self, text: &str) -> String {
        if self.map.is_empty() || !text.contains('[') {
            return text.to_string();
        }
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(i) = rest.find('[') {
            out.push_str(&rest[..i]);
            let tail = &rest[i..];
            let close = tail[1..]
                .char_indices()
                .take_while(|&(_, c)| placeholder_char(c) || c == ']')
                .find(|&(_, c)| c == ']')
                .map(|(j, _)| j + 2);
            match close.and_then(|j| self.map.get(&tail[..j]).map(|v| (j, v))) {
                Some((j, v)) => {
                    out.push_str(v);
                    rest = &tail[j..];
                }
                None => {
                    out.push('[');
                    rest = &tail[1..];
                }
            }
        }
        out.push_str(rest);
        out
    }

    /// A streaming restorer for one choice of a stream.
    pub fn stream(&self) -> StreamUnmasker {
        StreamUnmasker {
            un: self.clone(),
            held: String::new(),
        }
    }
}

/// Holds back a tail that may be the start of a placeholder until the next chunk decides it.
pub struct StreamUnmasker {
    un: Unmasker,
    held: String,
}

impl StreamUnmasker {
    /// Text that can be sent now (restored); may be empty while a placeholder is incomplete.
    pub fn push(&mut self, chunk: &str) -> String {
        if self.un.is_empty() {
            return chunk.to_string();
        }
        self.held.push_str(chunk);
        let cut = match self.held.rfind('[') {
            Some(i)
                if self.held.len() - i <= MAX_PLACEHOLDER
                    && self.held[i + 1..].chars().all(placeholder_char) =>
            {
                i
            }
            _ => self.held.len(),
        };
        let ready = self.un.unmask(&self.held[..cut]);
        self.held.drain(..cut);
        ready
    }

    /// Whatever is still held, at the end of the stream.
    pub fn finish(&mut self) -> String {
        let rest = std::mem::take(&mut self.held);
        self.un.unmask(&rest)
    }
}

/// Every string of `values` masked by one [`Masker`], so a value gets the same placeholder
/// wherever it appears (a request and its answer, for a student model to learn from). Identifiers
/// are left: `role`, `type`, `id`, `tool_call_id`, and a function's `name` (in `tools`,
/// `tool_calls`, `tool_choice`, a `tool` message); a message's `name` is a person's and is masked.
pub fn mask_together(
    det: &Detector,
    values: &mut [&mut serde_json::Value],
) -> BTreeMap<Category, usize> {
    use serde_json::Value;
    fn walk(v: &mut Value, key: &str, names_function: bool, f: &mut dyn FnMut(&mut String)) {
        match v {
            Value::String(s)
                if !(matches!(key, "role" | "type" | "id" | "tool_call_id")
                    || (key == "name" && names_function)) =>
            {
                f(s)
            }
            Value::Array(a) => a.iter_mut().for_each(|x| walk(x, key, false, f)),
            Value::Object(o) => {
                let function = key == "function"
                    || matches!(
                        o.get("role").and_then(Value::as_str),
                        Some("tool" | "function")
                    );
                o.iter_mut().for_each(|(k, x)| walk(x, k, function, f))
            }
            _ => {}
        }
    }
    let original: String = values.iter().map(|v| v.to_string()).collect();
    let mut m = Masker::new(det, &original);
    for v in values.iter_mut() {
        walk(v, "", false, &mut |s| *s = m.mask(s));
    }
    m.counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_value_same_placeholder_and_round_trip() {
        let det = Detector::new();
        let text = "Write to ana@example.com or bob@example.org; ana@example.com is primary. CPF 529.982.247-25.";
        let mut m = Masker::new(&det, text);
        let masked = m.mask(text);
        assert_eq!(
            masked,
            "Write to [EMAIL_1] or [EMAIL_2]; [EMAIL_1] is primary. CPF [CPF_1]."
        );
        assert_eq!(m.counts[&Category::Email], 3);
        assert_eq!(m.unmasker().unmask(&masked), text);
    }

    #[test]
    fn a_request_and_its_answer_share_placeholders() {
        let det = Detector::new();
        let mut req =
            serde_json::json!({"messages": [{"role": "user", "content": "Mail ana@example.com"}]});
        let mut ans = serde_json::json!({"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
            "function": {"name": "send_mail", "arguments": "{\"to\": \"ana@example.com\"}"}}]});
        let counts = mask_together(&det, &mut [&mut req, &mut ans]);
        assert_eq!(counts[&Category::Email], 2);
        assert_eq!(req["messages"][0]["content"], "Mail [EMAIL_1]");
        assert_eq!(
            ans["tool_calls"][0]["function"]["arguments"],
            "{\"to\": \"[EMAIL_1]\"}"
        );
        assert_eq!(ans["tool_calls"][0]["function"]["name"], "send_mail");
        // A message's `name` is the speaker's, not an identifier: masked like any text.
        let mut req = serde_json::json!({"messages": [{"role": "user", "name": "ana@example.com", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "ana@example.com"}}]});
        mask_together(&det, &mut [&mut req]);
        assert_eq!(req["messages"][0]["name"], "[EMAIL_1]");
        assert_eq!(req["tools"][0]["function"]["name"], "ana@example.com");
    }

    #[test]
    fn client_text_with_bracketed_words_is_not_a_placeholder() {
        let det = Detector::new();
        let text = "Template [EMAIL_1] stays; real: joe@example.com";
        let mut m = Masker::new(&det, text);
        let masked = m.mask(text);
        assert_eq!(masked, "Template [EMAIL_1] stays; real: [EMAIL_2]");
        assert_eq!(m.unmasker().unmask(&masked), text);
    }

    #[test]
    fn stream_restores_placeholders_split_anywhere() {
        let det = Detector::new();
        let text = "Mail joe@example.com and call +55 11 98765-4321 [not a placeholder] end";
        let mut m = Masker::new(&det, text);
        let masked = m.mask(text);
        let un = m.unmasker();
        for size in 1..=masked.len() {
            let mut s = un.stream();
            let mut out = String::new();
            let chars: Vec<char> = masked.chars().collect();
            for piece in chars.chunks(size) {
                out.push_str(&s.push(&piece.iter().collect::<String>()));
            }
            out.push_str(&s.finish());
            assert_eq!(out, text, "chunk size {size}");
        }
    }
}
