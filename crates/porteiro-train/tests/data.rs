//! Training lines into sequences with the real smollm2 tokenizer: the loss mask covers the answer
//! and the end-of-turn token only; bad lines are errors naming the line, or skipped and counted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use porteiro_models::gguf::GgufFile;
use porteiro_models::tokenizer::Tokenizer;
use porteiro_train::data::{load, Render};
use serde_json::Value;

/// Messages joined as `role: content` lines (the server's renderer is tested in its own crate).
struct Plain;

impl Render for Plain {
    fn prompt(&self, request: &Value) -> Result<String, String> {
        let msgs = request["messages"].as_array().ok_or("no messages")?;
        let mut s: String = msgs
            .iter()
            .map(|m| {
                format!(
                    "{}: {}\n",
                    m["role"].as_str().unwrap_or(""),
                    m["content"].as_str().unwrap_or("")
                )
            })
            .collect();
        s.push_str("assistant:");
        Ok(s)
    }
    fn answer(&self, message: &Value) -> Result<String, String> {
        message["content"]
            .as_str()
            .map(|s| format!(" {s}"))
            .ok_or_else(|| "no content".into())
    }
}

fn tokenizer() -> Option<Tokenizer> {
    match porteiro_models::fetch::resolve_model("smollm2-135m", false) {
        Ok(p) => Some(Tokenizer::from_gguf(&GgufFile::open(p).unwrap()).unwrap()),
        Err(e) => {
            assert!(
                std::env::var("PORTEIRO_REQUIRE_MODELS").is_err(),
                "smollm2-135m not cached: {e}"
            );
            None
        }
    }
}

fn file(lines: &[&str]) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), lines.join("\n")).unwrap();
    f
}

const GOOD: &str = r#"{"messages":[{"role":"user","content":"2+2?"},{"role":"assistant","content":"4"},{"role":"user","content":"and 3+3?"},{"role":"assistant","content":"6"}]}"#;

#[test]
fn every_assistant_turn_is_a_sequence_with_the_loss_on_its_answer() {
    let Some(tok) = tokenizer() else { return };
    let f = file(&[GOOD, ""]);
    let got = load(f.path(), &tok, &Plain, 512, false).unwrap();
    assert_eq!(got.examples.len(), 2);
    let end = tok.eot_id().or(tok.eos_id()).unwrap();
    for (ex, answer) in got.examples.iter().zip([" 4", " 6"]) {
        let s = &ex.seq;
        assert_eq!(ex.line, 1);
        assert_eq!(*s.tokens.last().unwrap(), end);
        let target: Vec<u32> = s
            .tokens
            .iter()
            .zip(&s.mask)
            .filter(|(_, &m)| m)
            .map(|(&t, _)| t)
            .collect();
        let mut want = tok.encode(answer, false, false);
        want.push(end);
        assert_eq!(target, want);
        assert!(!s.mask[0]);
    }
    // The second turn's prompt holds the first exchange.
    assert!(got.examples[1].seq.tokens.len() > got.examples[0].seq.tokens.len() + 4);
}

#[test]
fn bad_lines_name_their_line_or_are_skipped_and_counted() {
    let Some(tok) = tokenizer() else { return };
    let long = format!(
        r#"{{"messages":[{{"role":"user","content":"{}"}},{{"role":"assistant","content":"x"}}]}}"#,
        "word ".repeat(300)
    );
    let cases: [(&str, &str); 5] = [
        ("{not json", "not JSON"),
        (
            r#"{"messages":[{"role":"user","content":"hi"}]}"#,
            "no assistant turn",
        ),
        (r#"{"prompt":"hi"}"#, "no `messages`"),
        (&long, "over --max-seq"),
        (
            r#"{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b","weight":0}]}"#,
            "no assistant turn",
        ),
    ];
    for (bad, why) in cases {
        let f = file(&[GOOD, bad]);
        let err = load(f.path(), &tok, &Plain, 256, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains(":2:") && err.contains(why), "{why}: {err}");
        let got = load(f.path(), &tok, &Plain, 256, true).unwrap();
        assert_eq!((got.examples.len(), got.skipped.len()), (2, 1), "{why}");
        assert_eq!(got.skipped[0].0, 2);
    }
    let f = file(&["{not json"]);
    let err = load(f.path(), &tok, &Plain, 256, true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no usable example"), "{err}");
}
