//! The golden check against llama.cpp shared by `golden.rs` (default kernels) and
//! `golden_per_block.rs` (the per-block kernels, `PORTEIRO_REPACK=0`).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use porteiro_engine::eval::{greedy_ids, perplexity, top1_against};
use porteiro_engine::Model;
use porteiro_models::gguf::GgufFile;
use porteiro_models::tokenizer::Tokenizer;
use serde_json::Value;

/// Models use every core; running two at once would only measure contention.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn golden(alias: &str) -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/golden/{alias}.json"));
    serde_json::from_str(
        &std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap()
}

pub fn load(alias: &str) -> Option<(Model, Tokenizer)> {
    let path = match porteiro_models::fetch::resolve_model(alias, false) {
        Ok(p) => p,
        Err(e) => {
            assert!(
                std::env::var("PORTEIRO_REQUIRE_MODELS").is_err(),
                "{alias} required but not cached: {e}"
            );
            eprintln!("skipping {alias}: {e}");
            return None;
        }
    };
    let file = Arc::new(GgufFile::open(&path).unwrap());
    let tok = Tokenizer::from_gguf(&file).unwrap();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    Some((Model::load(file, threads).unwrap(), tok))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn wiki_text() -> Option<String> {
    let p = porteiro_models::fetch::home_dir().join("data/wiki.txt");
    match std::fs::read_to_string(&p) {
        Ok(t) => Some(t),
        Err(e) => {
            assert!(
                std::env::var("PORTEIRO_REQUIRE_MODELS").is_err(),
                "{} missing ({e}): run scripts/fetch-text.sh",
                p.display()
            );
            eprintln!(
                "skipping perplexity: {} missing; run scripts/fetch-text.sh",
                p.display()
            );
            None
        }
    }
}

pub fn check(alias: &str) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let g = golden(alias);
    let Some((model, tok)) = load(alias) else {
        return;
    };

    // Top-1 agreement at every position of real text, and the tokenizer on the same text.
    let text = wiki_text();
    let (mut agree, mut total, mut gaps) = (0usize, 0usize, Vec::new());
    for (w, win) in g["top1"].as_array().unwrap().iter().enumerate() {
        let window = ids(&win["ids"]);
        let want = ids(&win["argmax"]);
        if let Some(text) = &text {
            let mut ours = tok.encode(text, true, false);
            if let Some(b) = g["bos"].as_u64() {
                ours[w * 512] = b as u32;
            }
            assert_eq!(
                &ours[w * 512..w * 512 + window.len()],
                &window[..],
                "{alias}: token ids of window {w} differ from llama.cpp"
            );
        }
        let r = top1_against(&model, &window, &want).unwrap();
        agree += r.agree;
        total += r.total;
        gaps.extend(r.gaps);
    }
    gaps.sort_by(|a, b| a.total_cmp(b));
    let top1 = agree as f64 / total as f64;
    let worst = gaps.last().copied().unwrap_or(0.0);
    eprintln!(
        "{alias}: top-1 agreement with llama.cpp {agree}/{total} = {:.2}%; where they differ, llama.cpp's pick is behind ours by median {:.3}, max {worst:.3} logits",
        top1 * 100.0,
        gaps.get(gaps.len() / 2).copied().unwrap_or(0.0)
    );
    // Float summation order alone moves top-1 by a few percent on these quantized models, because
    // activations are re-quantized to int8 at every matmul and a tiny difference can flip a rounding:
    // llama.cpp's flash-attention and unfused paths agree on only 96.6% of these SmolLM2 positions, and our
    // engine against itself with only the order of the attention-value sum reversed agrees on 97.1%
    // (SmolLM2) and 98.2% (Qwen2.5-0.5B). So the bar is agreement of at least 95% with every disagreement
    // a near-tie (the reference's pick within one logit of ours); a wrong kernel or layout breaks both.
    assert!(
        top1 >= 0.95,
        "{alias}: top-1 agreement {:.2}% < 95%",
        top1 * 100.0
    );
    assert!(
        worst < 1.0,
        "{alias}: llama.cpp's pick is {worst:.3} logits behind ours somewhere: not a near-tie"
    );
    // Greedy continuations: the prompt tokenizes identically, and the continuation is identical or
    // diverges only after both engines agree on a long prefix (float summation order differs).
    let mut identical = 0;
    for case in g["greedy"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let want_prompt = ids(&case["prompt_ids"]);
        assert_eq!(
            tok.encode(prompt, true, false),
            want_prompt,
            "{alias}: prompt {prompt:?} tokenizes differently"
        );
        let want = ids(&case["ids"]);
        let got = greedy_ids(&model, &want_prompt, want.len()).unwrap();
        let same = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
        assert!(
            same >= 2,
            "{alias}: {prompt:?}: greedy continuation differs from llama.cpp at token {same}"
        );
        if same == want.len() {
            identical += 1;
        } else {
            eprintln!(
                "{alias}: {prompt:?} diverges at token {same}/{}",
                want.len()
            );
        }
    }
    eprintln!("{alias}: {identical}/5 greedy 64-token continuations identical to llama.cpp");

    // Perplexity on the same tokens, same procedure.
    if let Some(text) = &text {
        let p = &g["perplexity"];
        let (window, chunks) = (
            p["window"].as_u64().unwrap() as usize,
            p["chunks"].as_u64().unwrap() as usize,
        );
        let all = tok.encode(text, true, false);
        let bos = g["bos"].as_u64().map(|b| b as u32);
        let ours = perplexity(&model, &all, window, chunks, bos, &mut |_, _| {})
            .unwrap()
            .ppl;
        let reference = p["ppl"].as_f64().unwrap();
        let rel = (ours - reference).abs() / reference;
        eprintln!(
            "{alias}: perplexity ours {ours:.4} llama.cpp {reference:.4} ({:+.3}%)",
            (ours / reference - 1.0) * 100.0
        );
        assert!(
            rel < 0.01,
            "{alias}: perplexity {ours} vs llama.cpp {reference}: {:.2}% apart",
            rel * 100.0
        );
    }
}
