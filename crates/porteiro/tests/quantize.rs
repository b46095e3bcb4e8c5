//! `porteiro quantize` against `llama-quantize` (golden/quantize.json, scripts/golden_quantize.py):
//! from the same F16 input, every file type's file is byte-identical to llama.cpp's, without and
//! with an importance matrix; the F16 input itself, converted from the catalog's Q4_1 smollm2, too. Then the engine runs what we wrote, and
//! bad input gets a clear refusal.
//!
//! Skipped with a message when the model is missing, unless PORTEIRO_REQUIRE_MODELS=1.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr
)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

fn porteiro(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_porteiro"))
        .args(args)
        .output()
        .unwrap()
}

fn sha256(p: &Path) -> String {
    let mut h = Sha256::new();
    let mut f = std::fs::File::open(p).unwrap();
    std::io::copy(&mut f, &mut h).unwrap();
    format!("{:x}", h.finalize())
}

fn golden() -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/quantize.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn files_are_byte_identical_to_llama_quantize() {
    let g = golden();
    let alias = g["model"].as_str().unwrap();
    if !common::cached(alias) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f16 = dir.path().join("f16.gguf");
    let o = porteiro(&["quantize", alias, f16.to_str().unwrap(), "--type", "F16"]);
    ok(&o, "F16 conversion");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("dequantized to f32 first"),
        "requantizing must say so"
    );
    assert_eq!(
        sha256(&f16),
        g["f16_sha256"],
        "F16 conversion differs from llama-quantize's"
    );
    for (ty, want) in g["files"].as_object().unwrap() {
        let out = dir.path().join(format!("{ty}.gguf"));
        ok(
            &porteiro(&[
                "quantize",
                f16.to_str().unwrap(),
                out.to_str().unwrap(),
                "--type",
                ty,
            ]),
            ty,
        );
        assert_eq!(
            std::fs::metadata(&out).unwrap().len(),
            want["bytes"].as_u64().unwrap(),
            "{ty}: size"
        );
        assert_eq!(
            sha256(&out),
            want["sha256"],
            "{ty}: bytes differ from llama-quantize's"
        );
        if ty == "Q4_K_M" {
            runs_in_the_engine(&f16, &out);
        }
        std::fs::remove_file(&out).unwrap();
    }
    with_an_importance_matrix(&g, dir.path());
}

/// The importance of column i of `name` (scripts/golden_quantize.py computes the same).
fn synthetic_importance(name: &str, cols: usize) -> Vec<f64> {
    (0..cols)
        .map(|i| 1.0 + ((i * 37 + name.len() * 11) % 101) as f64 / 64.0)
        .collect()
}

/// With an importance matrix (a synthetic one, as the golden script's), the files are
/// llama-quantize --imatrix's, byte for byte: the weighted quantizers, Q4_0's Q4_1 layers and the
/// metadata recording the imatrix.
fn with_an_importance_matrix(g: &serde_json::Value, dir: &Path) {
    let f16 = porteiro_models::gguf::GgufFile::open(dir.join("f16.gguf")).unwrap();
    let mut c = porteiro_engine::imatrix::Collector::default();
    for t in f16.tensors() {
        if t.name.starts_with("blk.") && t.dims.len() >= 2 && t.dims[1] > 1 {
            let cols = t.dims[0] as usize;
            c.sums
                .insert(t.name.clone(), (synthetic_importance(&t.name, cols), 1));
        }
    }
    c.save(&dir.join("synthetic.imatrix.gguf"), "synthetic", 1, 512)
        .unwrap();
    for (ty, want) in g["files_imatrix"].as_object().unwrap() {
        let out = format!("{ty}.im.gguf");
        let o = Command::new(env!("CARGO_BIN_EXE_porteiro"))
            .current_dir(dir)
            .args(["quantize", "f16.gguf", &out, "--type", ty])
            .args(["--imatrix", "synthetic.imatrix.gguf"])
            .output()
            .unwrap();
        ok(&o, ty);
        assert_eq!(
            sha256(&dir.join(&out)),
            want["sha256"],
            "{ty} with an imatrix: bytes differ from llama-quantize's"
        );
        std::fs::remove_file(dir.join(&out)).unwrap();
    }
}

/// The quantized file loads and predicts like its F16 original on a few sentences: mostly the same
/// top token, small KL divergence, perplexity within 20%.
fn runs_in_the_engine(f16: &Path, quant: &Path) {
    use porteiro_engine::LocalModel;
    let a = LocalModel::open(f16, 2).unwrap();
    let b = LocalModel::open(quant, 2).unwrap();
    let ids = a.tokenizer.encode(
        "The quick brown fox jumps over the lazy dog. The capital of France is Paris, and the \
         capital of Italy is Rome. One, two, three, four, five, six, seven, eight",
        true,
        false,
    );
    let bos = a
        .tokenizer
        .adds_bos()
        .then(|| a.tokenizer.bos_id())
        .flatten();
    let r =
        porteiro_engine::eval::compare(&a.model, &b.model, &ids, ids.len(), 1, bos, &mut |_, _| {})
            .unwrap();
    eprintln!("Q4_K_M vs F16: {r:?}");
    assert!(
        r.same_top1 >= 0.8 && r.mean_kld < 0.2 && (r.ppl_ratio - 1.0).abs() < 0.2,
        "Q4_K_M strays from its F16 original: {r:?}"
    );
}

#[test]
fn bad_requests_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.gguf");
    let o = out.to_str().unwrap();
    let err = |args: &[&str]| {
        let r = porteiro(args);
        assert!(!r.status.success(), "{args:?} should fail");
        String::from_utf8_lossy(&r.stderr).into_owned()
    };
    assert!(err(&["quantize", "x.gguf", o, "--type", "Q2_K_S"]).contains("unknown file type"));
    assert!(err(&[
        "quantize",
        "x.gguf",
        o,
        "--type",
        "Q4_K_M",
        "--tensor-type",
        "ffn"
    ])
    .contains("REGEX=TYPE"));
    assert!(err(&[
        "quantize",
        "x.gguf",
        o,
        "--type",
        "Q4_K_M",
        "--tensor-type",
        "ffn=IQ4_NL"
    ])
    .contains("unsupported tensor type `IQ4_NL`"));
    assert!(err(&["quantize", "/nonexistent.gguf", o, "--type", "Q8_0"]).contains("nonexistent"));
    if common::cached("smollm2-135m") {
        std::fs::write(&out, b"keep me").unwrap();
        assert!(err(&["quantize", "smollm2-135m", o, "--type", "Q8_0"]).contains("--force"));
        assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
    }
}

/// `porteiro lora merge`: the merged F16 model predicts as the F16 base with the adapter applied at
/// run time (the same perplexity within 0.5%), and the adapter is strong enough that skipping the
/// merge would show (perplexity moved by more than 5%).
#[test]
fn merged_adapter_predicts_like_the_adapter_served() {
    use porteiro_engine::eval::{perplexity, perplexity_with};
    use porteiro_engine::lora::{Adapter, Proj};
    use porteiro_engine::LocalModel;
    if !common::cached("smollm2-135m") {
        return;
    }
    let path = porteiro_models::fetch::resolve_model("smollm2-135m", false).unwrap();
    let base = LocalModel::open(&path, 2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ad = dir.path().join("a.gguf");
    Adapter::random(&base.model.cfg, 8, &Proj::ALL, 0.1, 16.0, 7)
        .write(&ad, base.model.cfg.arch.name())
        .unwrap();
    let merged = dir.path().join("merged.gguf");
    let o = porteiro(&[
        "lora",
        "merge",
        "--model",
        "smollm2-135m",
        "--adapter",
        ad.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    ok(&o, "lora merge");
    let m = LocalModel::open(&merged, 2).unwrap();
    let f16 = dir.path().join("f16.gguf");
    ok(
        &porteiro(&[
            "quantize",
            "smollm2-135m",
            f16.to_str().unwrap(),
            "--type",
            "F16",
        ]),
        "F16",
    );
    let f16 = LocalModel::open(&f16, 2).unwrap();
    let text =
        "The history of the city begins with a small fishing village on the river. Over the \
        centuries it grew into a market town, then a port, and finally the capital of a province. \
        Its cathedral was built in the twelfth century and rebuilt after a fire in 1540. Today the \
        old town is known for its narrow streets, its university and its annual music festival, \
        which draws visitors from across the country every summer.";
    let ids = base.tokenizer.encode(text, true, false);
    let bos = base
        .tokenizer
        .adds_bos()
        .then(|| base.tokenizer.bos_id())
        .flatten();
    let ctx = ids.len() & !1;
    let served = Adapter::open(&ad, &base.model.cfg, 1.0).unwrap();
    let p = |model, adapter| {
        perplexity_with(model, adapter, &ids, ctx, 1, bos, &mut |_, _| {})
            .unwrap()
            .ppl
    };
    let (plain, runtime) = (p(&base.model, None), p(&base.model, Some(&served)));
    let merged_ppl = perplexity(&m.model, &ids, ctx, 1, bos, &mut |_, _| {})
        .unwrap()
        .ppl;
    let f16_ppl = p(&f16.model, None);
    let f16_runtime = p(&f16.model, Some(&served));
    eprintln!("ppl: base {plain:.3}, adapter at run time {runtime:.3}, merged {merged_ppl:.3}, base F16 {f16_ppl:.3}, F16 + adapter {f16_runtime:.3}");
    assert!(
        (runtime / plain - 1.0).abs() > 0.05,
        "the adapter should matter"
    );
    // Against the same weights at run time (the F16 base): only the f16 rounding of W + s·B·A.
    assert!(
        (merged_ppl / f16_runtime - 1.0).abs() < 0.005,
        "merged {merged_ppl} vs served on the F16 base {f16_runtime}"
    );
}

/// `--budget`: every quantizable tensor measured (here at Q4_0 against Q8_0 only, on one short
/// window, to keep the test short), a file that fits the budget, mixing both types, with the
/// predicted and measured calibration KLD printed.
#[test]
fn budget_fits_types_to_a_size() {
    if !common::cached("smollm2-135m") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f16 = dir.path().join("f16.gguf");
    ok(
        &porteiro(&[
            "quantize",
            "smollm2-135m",
            f16.to_str().unwrap(),
            "--type",
            "F16",
        ]),
        "F16",
    );
    let size = |t: &str| {
        let out = dir.path().join(format!("{t}.gguf"));
        ok(
            &porteiro(&[
                "quantize",
                f16.to_str().unwrap(),
                out.to_str().unwrap(),
                "--type",
                t,
                "--pure",
            ]),
            t,
        );
        std::fs::metadata(&out).unwrap().len()
    };
    let (small, large) = (size("Q4_0"), size("Q8_0"));
    let budget = (small + large) / 2;
    let calib = dir.path().join("calib.txt");
    std::fs::write(
        &calib,
        "The river flows through the old town, past the market and the cathedral, and on to the \
         sea. Fishermen have worked its mouth for centuries; their boats still leave before dawn \
         and come back at noon with the catch, which is sold on the quay to cooks and traders. "
            .repeat(8),
    )
    .unwrap();
    let sens = dir.path().join("sens.json");
    let fit = |out: &std::path::Path, budget: u64| {
        porteiro(&[
            "quantize",
            f16.to_str().unwrap(),
            out.to_str().unwrap(),
            "--type",
            "Q4_0",
            "--budget",
            &budget.to_string(),
            "--calib",
            calib.to_str().unwrap(),
            "--calib-window",
            "64",
            "--calib-chunks",
            "1",
            "--candidates",
            "Q4_0,Q8_0",
            "--sensitivities",
            sens.to_str().unwrap(),
        ])
    };
    let out = dir.path().join("fit.gguf");
    let o = fit(&out, budget);
    ok(&o, "budget");
    let text = String::from_utf8_lossy(&o.stdout);
    let got = std::fs::metadata(&out).unwrap().len();
    assert!(
        got <= budget && got > small,
        "{small} < {got} <= {budget}\n{text}"
    );
    assert!(
        text.contains("predicted") && text.contains("measured"),
        "{text}"
    );
    assert!(text.contains(" Q4_0 ") && text.contains(" Q8_0 "), "{text}");
    assert!(!dir.path().join(".fit.gguf.q8_0.partial").exists());
    // Another budget on the same input and text reuses the kept measurements: nothing re-measured,
    // and the smaller budget still holds.
    let again = dir.path().join("fit2.gguf");
    let budget2 = (small * 3 + large) / 4;
    let o = fit(&again, budget2);
    ok(&o, "budget from kept measurements");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("reusing the measurements"), "{err}");
    assert!(!err.contains("measuring each tensor"), "{err}");
    let got2 = std::fs::metadata(&again).unwrap().len();
    assert!(got2 <= budget2 && got2 < got, "{got2} vs {budget2}, {got}");
    // Too small a budget is refused before anything is written.
    let tiny = porteiro(&[
        "quantize",
        f16.to_str().unwrap(),
        dir.path().join("tiny.gguf").to_str().unwrap(),
        "--type",
        "Q4_0",
        "--budget",
        "10MB",
        "--calib",
        calib.to_str().unwrap(),
    ]);
    assert!(!tiny.status.success());
    assert!(String::from_utf8_lossy(&tiny.stderr).contains("budget"));
}

/// `porteiro imatrix` on a model and text: every layer matrix gets positive mean squared inputs,
/// and the file feeds `quantize --imatrix`, which records it in the output's metadata.
#[test]
fn imatrix_from_text_feeds_quantize() {
    if !common::cached("smollm2-135m") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("t.txt");
    std::fs::write(
        &text,
        "A calibration text: the model reads it and we record how large each input column is. "
            .repeat(30),
    )
    .unwrap();
    let im = dir.path().join("im.gguf");
    let o = porteiro(&[
        "imatrix",
        "-m",
        "smollm2-135m",
        "-f",
        text.to_str().unwrap(),
        "-o",
        im.to_str().unwrap(),
        "-c",
        "64",
        "--chunks",
        "4",
    ]);
    ok(&o, "imatrix");
    let m = porteiro_engine::imatrix::load(&im).unwrap();
    // 30 layers × 7 matrices; the output projection is not collected.
    assert_eq!(
        m.data.len(),
        210,
        "{:?}",
        m.data.keys().take(3).collect::<Vec<_>>()
    );
    assert_eq!(m.chunk_count, 4);
    assert!(m
        .data
        .values()
        .all(|v| v.iter().all(|x| *x >= 0.0) && v.iter().any(|x| *x > 0.0)));
    let out = dir.path().join("q.gguf");
    ok(
        &porteiro(&[
            "quantize",
            "smollm2-135m",
            out.to_str().unwrap(),
            "--type",
            "Q4_K_M",
            "--imatrix",
            im.to_str().unwrap(),
        ]),
        "quantize --imatrix",
    );
    let q = porteiro_models::gguf::GgufFile::open(&out).unwrap();
    assert_eq!(q.get_u64("quantize.imatrix.entries_count").unwrap(), 210);

    // From served traffic: chat requests with their answers, rendered with the model's template.
    let log = dir.path().join("cluster-0-intent.jsonl");
    let line = |i: usize| {
        serde_json::json!({"messages": [
            {"role": "system", "content": "Classify the request into one intent label."},
            {"role": "user", "content": format!("play song number {i} by the band from the radio")},
            {"role": "assistant", "content": "PlayMusic"}
        ]})
        .to_string()
    };
    let body: Vec<String> = (0..40).map(line).collect();
    std::fs::write(&log, body.join("\n")).unwrap();
    let im2 = dir.path().join("im2.gguf");
    let o = porteiro(&[
        "imatrix",
        "-m",
        "smollm2-135m",
        "--from-log",
        log.to_str().unwrap(),
        "-o",
        im2.to_str().unwrap(),
        "-c",
        "64",
        "--chunks",
        "4",
    ]);
    ok(&o, "imatrix --from-log");
    let m2 = porteiro_engine::imatrix::load(&im2).unwrap();
    assert_eq!((m2.data.len(), m2.chunk_count), (210, 4));
    assert_eq!(m2.datasets, ["cluster-0-intent.jsonl"]);
    assert_ne!(m2.data, m.data, "traffic and text calibrate differently");
}

/// `compare --tasks`: both models answer every task through `porteiro serve`; a model against
/// itself answers alike everywhere and scores the same; expected labels are matched exactly.
#[test]
fn compare_tasks_scores_both_models() {
    if !common::cached("smollm2-135m") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tasks = dir.path().join("t.jsonl");
    let line = |u: &str, label: &str| {
        serde_json::json!({"messages": [
            {"role": "system", "content": "Answer with one word: the colour named."},
            {"role": "user", "content": u},
            {"role": "assistant", "content": label}
        ]})
        .to_string()
    };
    let body = [
        line("The sky is blue.", "blue"),
        line("Grass is green.", "green"),
        line("Snow is white.", "white"),
    ]
    .join("\n");
    std::fs::write(&tasks, body).unwrap();
    let o = porteiro(&[
        "compare",
        "smollm2-135m",
        "smollm2-135m",
        "--tasks",
        tasks.to_str().unwrap(),
        "--max-tokens",
        "8",
        "--json",
    ]);
    ok(&o, "compare --tasks");
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["base"]["tasks"], 3, "{r}");
    assert_eq!(r["base"]["correct"], r["quant"]["correct"], "{r}");
    assert_eq!(r["agree"], 1.0, "{r}");
    assert_eq!(r["base"]["errors"], 0, "{r}");
    // A task file without the expected answer is refused, naming the line.
    std::fs::write(&tasks, r#"{"messages":[{"role":"user","content":"hi"}]}"#).unwrap();
    let bad = porteiro(&[
        "compare",
        "smollm2-135m",
        "smollm2-135m",
        "--tasks",
        tasks.to_str().unwrap(),
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains(":1: the last message"));
}
