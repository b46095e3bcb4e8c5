//! Token ids must equal llama.cpp's. The golden files in tests/golden/tokens-*.json come from the
//! reference `llama-tokenize` (scripts/golden_tokens.py) run on the same GGUF files.
//!
//! A model that is not cached is skipped with a message, unless PORTEIRO_REQUIRE_MODELS=1 (set by CI,
//! which pulls every model first): then it is a failure.

// A test: a failed unwrap is a failed test; skip messages go to stderr.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::path::Path;

use porteiro_models::gguf::GgufFile;
use porteiro_models::tokenizer::{StreamDecoder, Tokenizer};

const ALIASES: &[&str] = &["smollm2-135m", "qwen2.5-0.5b", "gemma3-270m"];

fn required() -> bool {
    std::env::var_os("PORTEIRO_REQUIRE_MODELS").is_some()
}

fn load(alias: &str) -> Option<Tokenizer> {
    let path = match porteiro_models::fetch::resolve_model(alias, false) {
        Ok(p) => p,
        Err(e) => {
            assert!(!required(), "{alias} required but not cached: {e}");
            eprintln!("skipping {alias}: {e}");
            return None;
        }
    };
    let g = GgufFile::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Some(Tokenizer::from_gguf(&g).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

#[derive(serde::Deserialize)]
struct Entry {
    text: String,
    ids: Vec<u32>,
    add_special: bool,
    parse_special: bool,
}

fn golden(alias: &str) -> Vec<Entry> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("tokens-{alias}.json"));
    let s = std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/golden_tokens.py)", p.display()));
    serde_json::from_str(&s).unwrap()
}

fn show(tok: &Tokenizer, ids: &[u32]) -> String {
    ids.iter()
        .map(|&i| format!("{i}:{:?}", tok.token_text(i).unwrap_or("?")))
        .collect::<Vec<_>>()
        .join(" ")
}

fn has_special_text(s: &str) -> bool {
    [
        "<|",
        "<s>",
        "</s>",
        "<bos>",
        "<eos>",
        "<start_of_turn>",
        "<end_of_turn>",
        "<unk>",
        "<pad>",
        "<mask>",
    ]
    .iter()
    .any(|m| s.contains(m))
}

fn check_model(alias: &str) {
    let Some(tok) = load(alias) else { return };
    let entries = golden(alias);
    let mut failures = Vec::new();
    for e in &entries {
        let ids = tok.encode(&e.text, e.add_special, e.parse_special);
        if ids != e.ids {
            let at = ids
                .iter()
                .zip(&e.ids)
                .position(|(a, b)| a != b)
                .unwrap_or(ids.len().min(e.ids.len()));
            let lo = at.saturating_sub(3);
            failures.push(format!(
                "{:?} (add_special={}, parse_special={}): first difference at {at}\n   ours: {}\n  llama: {}",
                e.text.chars().take(80).collect::<String>(),
                e.add_special,
                e.parse_special,
                show(&tok, &ids[lo.min(ids.len())..(at + 4).min(ids.len())]),
                show(&tok, &e.ids[lo.min(e.ids.len())..(at + 4).min(e.ids.len())]),
            ));
        }
        if !has_special_text(&e.text) {
            let plain = tok.encode(&e.text, false, false);
            assert_eq!(
                tok.decode(&plain, false),
                e.text,
                "{alias}: decode(encode(text)) differs"
            );
            // the stream decoder yields the same text, token by token
            let mut d = StreamDecoder::new(&tok);
            let mut s: String = plain.iter().map(|&i| d.push(i)).collect();
            s.push_str(&d.flush());
            let expect = tok.decode(&plain, false);
            assert_eq!(
                s.trim_start_matches(' '),
                expect.trim_start_matches(' '),
                "{alias}: stream decoding differs"
            );
        }
    }
    eprintln!(
        "{alias}: {}/{} golden entries identical to llama.cpp",
        entries.len() - failures.len(),
        entries.len()
    );
    assert!(
        failures.is_empty(),
        "{alias}: {} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn smollm2_matches_llama_cpp() {
    check_model("smollm2-135m");
}

#[test]
fn qwen25_matches_llama_cpp() {
    check_model("qwen2.5-0.5b");
}

#[test]
fn gemma3_matches_llama_cpp() {
    check_model("gemma3-270m");
}

/// End-of-generation sets as llama.cpp prints them when loading each model ("printing all EOG tokens").
#[test]
fn end_of_generation_sets_match_llama_cpp() {
    for (alias, expect) in [
        ("smollm2-135m", &[0u32, 2, 4][..]),
        (
            "qwen2.5-0.5b",
            &[128247, 151643, 151645, 151662, 151663, 151664][..],
        ),
        ("gemma3-270m", &[1, 106, 212][..]),
    ] {
        let Some(tok) = load(alias) else { continue };
        assert_eq!(tok.eog_ids(), expect, "{alias}");
    }
}

#[test]
fn special_token_ids_and_end_of_generation() {
    if let Some(tok) = load("qwen2.5-0.5b") {
        let end = tok.token_id("<|im_end|>").unwrap();
        let eot = tok.token_id("<|endoftext|>").unwrap();
        assert!(tok.is_eog(end) && tok.is_eog(eot));
        assert!(!tok.is_eog(tok.token_id("<|im_start|>").unwrap()));
        assert_eq!(tok.eos_id(), Some(end));
        assert_eq!(tok.decode(&[end], false), "");
        assert_eq!(tok.decode(&[end], true), "<|im_end|>");
    }
    if let Some(tok) = load("smollm2-135m") {
        assert!(tok.is_eog(tok.token_id("<|im_end|>").unwrap()));
        assert!(tok.is_eog(tok.token_id("<|endoftext|>").unwrap()));
    }
    if let Some(tok) = load("gemma3-270m") {
        assert!(tok.is_eog(tok.token_id("<end_of_turn>").unwrap()));
        assert!(tok.is_eog(tok.eos_id().unwrap()));
        assert_eq!(tok.bos_id(), tok.token_id("<bos>"));
        assert_eq!(tok.encode("", true, true), vec![tok.bos_id().unwrap()]);
    }
}

#[test]
fn long_text_is_fast() {
    let path = porteiro_models::fetch::home_dir().join("data/wiki.txt");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            assert!(
                !required(),
                "{} missing ({e}): run scripts/fetch-text.sh",
                path.display()
            );
            eprintln!(
                "skipping: {} missing ({e}); run scripts/fetch-text.sh",
                path.display()
            );
            return;
        }
    };
    let text: String = text.chars().take(300_000).collect();
    for alias in ALIASES {
        let Some(tok) = load(alias) else { continue };
        let t0 = std::time::Instant::now();
        let ids = tok.encode(&text, true, true);
        let dt = t0.elapsed();
        eprintln!(
            "{alias}: {} KB -> {} tokens in {:.0} ms",
            text.len() / 1024,
            ids.len(),
            dt.as_secs_f64() * 1e3
        );
        assert!(
            dt.as_secs_f64() < 2.0,
            "{alias}: tokenizing {} bytes took {dt:?}",
            text.len()
        );
        let plain = tok.encode(&text, false, false);
        assert_eq!(tok.decode(&plain, false), text);
    }
}
