//! LoRA adapters on a real model (smollm2-135m): a batch that mixes sequences with different
//! adapters and none gives each sequence exactly the logits it gets alone, and an adapter whose B
//! is zero changes nothing. Against llama.cpp: the perplexity of a model with a fixed adapter
//! written by Porteiro, as `llama-perplexity --lora` measured it (tests/golden/lora.json, from
//! scripts/golden_lora.py), is reproduced within 1% (so llama.cpp loads what we write, and both
//! apply it alike). The delta's arithmetic is also checked against f64 in `lora`'s unit tests.
//!
//! Skipped with a message when the model is not cached, unless PORTEIRO_REQUIRE_MODELS=1.

// A test: a failed unwrap is a failed test; skip messages go to stderr.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use porteiro_engine::lora::{Adapter, Proj};
use porteiro_engine::{BatchToken, LocalModel, Model, Scratch};

fn open() -> Option<LocalModel> {
    open_alias("smollm2-135m")
}

/// A rank-`r` adapter on every projection of every layer.
fn adapter(m: &Model, r: usize, seed: u64, zero_b: bool) -> Adapter {
    let b_amp = if zero_b { 0.0 } else { 0.05 };
    Adapter::random(&m.cfg, r, &Proj::ALL, b_amp, 2.0 * r as f32, seed)
}

/// The fixed adapter of the golden check: rank 4 on every projection of every layer, from a
/// seeded generator, alpha 8 (scale 2), B's amplitude chosen per model so that perplexity moves a
/// few percent (Qwen reacts far more strongly). Its perplexity under llama.cpp is in
/// tests/golden/lora.json.
fn golden_adapter(m: &Model, alias: &str) -> Adapter {
    let amp = if alias.starts_with("qwen") {
        0.06
    } else {
        0.25
    };
    Adapter::random(&m.cfg, 4, &Proj::ALL, amp, 8.0, 1)
}

fn open_alias(alias: &str) -> Option<LocalModel> {
    match porteiro_models::fetch::resolve_model(alias, false) {
        Ok(p) => Some(LocalModel::open(&p, 2).unwrap()),
        Err(e) => {
            assert!(
                std::env::var("PORTEIRO_REQUIRE_MODELS").is_err(),
                "{alias} required but not cached: {e}"
            );
            eprintln!("skipping: {alias} not cached: {e}");
            None
        }
    }
}

/// Writes the golden adapters for scripts/golden_lora.py (into $PORTEIRO_LORA_OUT/<alias>.gguf).
#[test]
#[ignore = "run by scripts/golden_lora.py"]
fn write_golden_adapters() {
    let out = std::path::PathBuf::from(std::env::var("PORTEIRO_LORA_OUT").unwrap());
    for alias in ["smollm2-135m", "qwen2.5-0.5b"] {
        let lm = open_alias(alias).unwrap();
        golden_adapter(&lm.model, alias)
            .write(&out.join(format!("{alias}.gguf")), lm.model.cfg.arch.name())
            .unwrap();
    }
}

#[test]
fn perplexity_with_an_adapter_matches_llama_cpp() {
    let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/lora.json");
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let wiki = porteiro_models::fetch::home_dir().join("data/wiki.txt");
    let Ok(text) = std::fs::read_to_string(&wiki) else {
        assert!(
            std::env::var("PORTEIRO_REQUIRE_MODELS").is_err(),
            "{} missing: run scripts/fetch-text.sh",
            wiki.display()
        );
        eprintln!("skipping: {} missing", wiki.display());
        return;
    };
    for (alias, g) in golden["models"].as_object().unwrap() {
        let Some(lm) = open_alias(alias) else {
            continue;
        };
        let (window, chunks) = (
            g["window"].as_u64().unwrap() as usize,
            g["chunks"].as_u64().unwrap() as usize,
        );
        let ids = lm.tokenizer.encode(&text, true, false);
        let bos = lm
            .tokenizer
            .adds_bos()
            .then(|| lm.tokenizer.bos_id())
            .flatten();
        let ad = golden_adapter(&lm.model, alias);
        let ours = porteiro_engine::eval::perplexity_with(
            &lm.model,
            Some(&ad),
            &ids,
            window,
            chunks,
            bos,
            &mut |_, _| {},
        )
        .unwrap()
        .ppl;
        let (reference, base) = (
            g["ppl_lora"].as_f64().unwrap(),
            g["ppl_base"].as_f64().unwrap(),
        );
        let rel = (ours - reference).abs() / reference;
        eprintln!(
            "{alias}: perplexity with the adapter ours {ours:.4} llama.cpp {reference:.4} ({:+.3}%; base {base:.4})",
            (ours / reference - 1.0) * 100.0
        );
        assert!(rel < 0.01, "{alias}: {ours} vs llama.cpp {reference}");
        // The adapter matters: a check that passes with the adapter ignored proves nothing.
        assert!(
            (reference / base - 1.0).abs() > 0.05,
            "{alias}: the golden adapter barely changes perplexity"
        );
    }
}

/// Last-position logits of each prompt, run as one batch with the given adapters.
fn run(m: &Model, prompts: &[Vec<u32>], adapters: &[Option<&Adapter>]) -> Vec<Vec<f32>> {
    let mut caches: Vec<_> = prompts.iter().map(|_| m.new_cache(64)).collect();
    let mut refs: Vec<_> = caches.iter_mut().collect();
    let mut batch = Vec::new();
    let mut rows = Vec::new();
    for (seq, p) in prompts.iter().enumerate() {
        for (pos, &t) in p.iter().enumerate() {
            batch.push(BatchToken {
                token: t,
                seq,
                pos,
                logits: pos + 1 == p.len(),
            });
            rows.push(adapters[seq]);
        }
    }
    let mut s = Scratch::default();
    let lora: Vec<Option<&Adapter>> = if rows.iter().all(Option::is_none) {
        Vec::new()
    } else {
        rows
    };
    m.forward_lora(&batch, &lora, &mut refs, &mut s).unwrap();
    let v = m.cfg.vocab;
    (0..prompts.len())
        .map(|i| s.logits[i * v..(i + 1) * v].to_vec())
        .collect()
}

#[test]
fn batches_mixing_adapters_match_each_sequence_alone() {
    let Some(lm) = open() else { return };
    let m = &lm.model;
    let a1 = adapter(m, 8, 1, false);
    let a2 = adapter(m, 4, 2, false);
    let zero = adapter(m, 4, 3, true);
    let prompts: Vec<Vec<u32>> = ["The capital of France is", "def add(a, b):", "Hello there"]
        .iter()
        .map(|t| lm.tokenizer.encode(t, true, false))
        .collect();
    let alone: Vec<Vec<f32>> = [Some(&a1), None, Some(&a2)]
        .iter()
        .zip(&prompts)
        .map(|(a, p)| run(m, std::slice::from_ref(p), &[*a]).remove(0))
        .collect();
    let mixed = run(m, &prompts, &[Some(&a1), None, Some(&a2)]);
    for (i, (x, y)) in alone.iter().zip(&mixed).enumerate() {
        assert_eq!(x, y, "sequence {i}: batched logits differ from alone");
    }
    // The adapters change the answer; one with B = 0 changes nothing.
    let base = run(m, &prompts, &[None, None, None]);
    let diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    assert!(diff(&base[0], &mixed[0]) > 1e-2, "adapter 1 had no effect");
    assert_eq!(base[1], mixed[1]);
    let z = run(m, &prompts, &[Some(&zero), Some(&zero), Some(&zero)]);
    assert_eq!(z, base);
}
