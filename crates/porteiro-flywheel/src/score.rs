//! S4's yardstick: whether a candidate's answer agrees with the teacher's, by answer kind, and the
//! confidence interval of an agreement rate.
//!
//! - tool calls: the same functions with equal arguments, compared as parsed JSON (key order and
//!   spacing never matter; numbers compare by value, so `5` equals `5.0`), in any order;
//! - JSON: the candidate parses to an object with the teacher's fields equal;
//! - labels: equal after trimming, case folding and dropping trailing punctuation;
//! - free text: token-set F1 ≥ 0.5 (a cheap similarity), or with a judge ([`judge_request`],
//!   [`Verdict`]): an upstream model compares the two answers pairwise, in both orders; the
//!   candidate agrees when it is not worse in either order.

use serde_json::Value;

use crate::item::{content_text, AnswerKind};

/// JSON equality with numbers compared by value.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0),
            _ => x == y,
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

/// (name, parsed arguments) of each call of an assistant message.
fn calls(m: &Value) -> Vec<(String, Value)> {
    m["tool_calls"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let f = &c["function"];
            let args = match &f["arguments"] {
                Value::String(s) => serde_json::from_str(s).unwrap_or(Value::String(s.clone())),
                v => v.clone(),
            };
            (f["name"].as_str().unwrap_or("").to_string(), args)
        })
        .collect()
}

fn label(s: &str) -> String {
    s.trim()
        .trim_end_matches(['.', '!', '?', ';', ':'])
        .trim_matches(['"', '\'', '`', '*'])
        .to_lowercase()
}

fn tokens(s: &str) -> Vec<String> {
    let mut v: Vec<String> = s
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Token-set F1 of two texts.
pub fn f1(a: &str, b: &str) -> f64 {
    let (x, y) = (tokens(a), tokens(b));
    if x.is_empty() && y.is_empty() {
        return 1.0;
    }
    let common = x.iter().filter(|t| y.binary_search(t).is_ok()).count() as f64;
    if common == 0.0 {
        return 0.0;
    }
    let (p, r) = (common / y.len() as f64, common / x.len() as f64);
    2.0 * p * r / (p + r)
}

const JUDGE_SYSTEM: &str = "You compare two answers to the same request. Judge correctness first, \
then completeness and clarity; ignore length and style otherwise. Reply with exactly one word: \
A if answer A is better, B if answer B is better, TIE if they are equally good.";

/// The chat request (without `model`) asking a judge which of two answers to `question` is better:
/// `first` is shown as answer A. Ask twice, swapping the answers, to cancel the judge's position bias.
pub fn judge_request(question: &str, first: &str, second: &str) -> Value {
    serde_json::json!({
        "messages": [
            {"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": format!(
                "Request:\n{question}\n\n[Answer A]\n{first}\n[End of answer A]\n\n[Answer B]\n{second}\n[End of answer B]\n\nWhich is better: A, B or TIE?")}
        ],
        "temperature": 0,
        "max_tokens": 4,
    })
}

/// A judge's reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    A,
    B,
    Tie,
}

impl Verdict {
    /// The verdict in a judge's reply (its first word), if it gave one.
    pub fn parse(reply: &str) -> Option<Self> {
        let w = reply
            .trim()
            .split(|c: char| !c.is_alphanumeric())
            .find(|w| !w.is_empty())?;
        match w.to_ascii_uppercase().as_str() {
            "A" => Some(Self::A),
            "B" => Some(Self::B),
            "TIE" => Some(Self::Tie),
            _ => None,
        }
    }
}

/// Whether the candidate agrees with the teacher by the judge: not worse in either order
/// (`teacher_first`: the teacher was A; `candidate_first`: the candidate was A). A judge that gave no
/// verdict counts as disagreement.
pub fn judged(teacher_first: Option<Verdict>, candidate_first: Option<Verdict>) -> bool {
    matches!(teacher_first, Some(Verdict::B | Verdict::Tie))
        && matches!(candidate_first, Some(Verdict::A | Verdict::Tie))
}

/// Whether `candidate` (an assistant message) agrees with `teacher`'s answer of kind `kind`.
pub fn agrees(kind: AnswerKind, teacher: &Value, candidate: &Value) -> bool {
    match kind {
        AnswerKind::ToolCalls => {
            let mut want = calls(teacher);
            let got = calls(candidate);
            if want.len() != got.len() {
                return false;
            }
            for (n, a) in got {
                match want.iter().position(|(m, b)| *m == n && same(&a, b)) {
                    Some(i) => {
                        want.swap_remove(i);
                    }
                    None => return false,
                }
            }
            true
        }
        AnswerKind::Json => {
            let parse =
                |m: &Value| serde_json::from_str::<Value>(content_text(&m["content"]).trim()).ok();
            match (parse(teacher), parse(candidate)) {
                (Some(t), Some(c)) => same(&t, &c),
                _ => false,
            }
        }
        AnswerKind::Label => {
            label(&content_text(&teacher["content"])) == label(&content_text(&candidate["content"]))
                && calls(candidate).is_empty()
        }
        AnswerKind::Text => {
            f1(
                &content_text(&teacher["content"]),
                &content_text(&candidate["content"]),
            ) >= 0.5
        }
    }
}

/// Wilson score interval (95%) of `k` successes in `n` trials: (low, high).
pub fn wilson(k: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let z = 1.959_963_984_540_054_f64;
    let (n, p) = (n as f64, k as f64 / n as f64);
    let d = 1.0 + z * z / n;
    let c = (p + z * z / (2.0 * n)) / d;
    let h = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / d;
    // Exact at the ends (rounding would otherwise put the bound a hair inside the estimate).
    let low = if k == 0 { 0.0 } else { (c - h).max(0.0) };
    let high = if k as f64 == n { 1.0 } else { (c + h).min(1.0) };
    (low, high)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn call(name: &str, args: &str) -> Value {
        json!({"id": "x", "type": "function", "function": {"name": name, "arguments": args}})
    }

    #[test]
    fn tool_calls_compare_parsed_and_in_any_order() {
        let t = json!({"tool_calls": [call("w", "{\"city\": \"Oslo\", \"days\": 5}"), call("t", "{}")]});
        let c =
            json!({"tool_calls": [call("t", "{}"), call("w", "{\"days\":5.0,\"city\":\"Oslo\"}")]});
        assert!(agrees(AnswerKind::ToolCalls, &t, &c));
        let wrong =
            json!({"tool_calls": [call("t", "{}"), call("w", "{\"days\":6,\"city\":\"Oslo\"}")]});
        assert!(!agrees(AnswerKind::ToolCalls, &t, &wrong));
        let fewer = json!({"tool_calls": [call("t", "{}")]});
        assert!(!agrees(AnswerKind::ToolCalls, &t, &fewer));
        assert!(!agrees(
            AnswerKind::ToolCalls,
            &t,
            &json!({"content": "Oslo"})
        ));
    }

    #[test]
    fn json_labels_and_text() {
        let t = json!({"content": "{\"name\": \"Ana\", \"age\": 30}"});
        assert!(agrees(
            AnswerKind::Json,
            &t,
            &json!({"content": " {\"age\": 30, \"name\": \"Ana\"}\n"})
        ));
        assert!(!agrees(
            AnswerKind::Json,
            &t,
            &json!({"content": "{\"age\": 31, \"name\": \"Ana\"}"})
        ));
        assert!(!agrees(
            AnswerKind::Json,
            &t,
            &json!({"content": "Ana, 30"})
        ));
        assert!(agrees(
            AnswerKind::Label,
            &json!({"content": "GetWeather"}),
            &json!({"content": " getweather."})
        ));
        assert!(!agrees(
            AnswerKind::Label,
            &json!({"content": "GetWeather"}),
            &json!({"content": "PlayMusic"})
        ));
        let t = json!({"content": "The parcel left Lisbon on Monday and arrives Friday."});
        assert!(agrees(
            AnswerKind::Text,
            &t,
            &json!({"content": "It left Lisbon Monday; arrives on Friday."})
        ));
        assert!(!agrees(
            AnswerKind::Text,
            &t,
            &json!({"content": "I cannot help with that."})
        ));
    }

    #[test]
    fn the_judge_must_not_prefer_the_teacher_in_either_order() {
        assert_eq!(Verdict::parse(" b."), Some(Verdict::B));
        assert_eq!(Verdict::parse("TIE"), Some(Verdict::Tie));
        assert_eq!(Verdict::parse("Answer"), None);
        assert_eq!(Verdict::parse(""), None);
        use Verdict::*;
        assert!(judged(Some(Tie), Some(Tie)));
        assert!(judged(Some(B), Some(A)));
        // Position bias: "A" both times means the judge prefers whatever comes first.
        assert!(!judged(Some(A), Some(A)));
        assert!(!judged(Some(Tie), Some(B)));
        assert!(!judged(None, Some(A)));
        let r = judge_request("Say hi", "hello", "hi there");
        let u = r["messages"][1]["content"].as_str().unwrap();
        assert!(u.find("hello").unwrap() < u.find("hi there").unwrap());
    }

    #[test]
    fn wilson_interval_matches_the_textbook() {
        // 8 of 10: 95% Wilson interval 0.4902 .. 0.9433.
        let (lo, hi) = wilson(8, 10);
        assert!(
            (lo - 0.4902).abs() < 1e-3 && (hi - 0.9433).abs() < 1e-3,
            "{lo} {hi}"
        );
        assert_eq!(wilson(0, 0), (0.0, 1.0));
        assert_eq!(wilson(0, 3).0, 0.0);
        let (lo, hi) = wilson(100, 100);
        assert!(lo > 0.96 && hi == 1.0);
    }
}
