//! The training loop on a tiny random model: it learns (the loss falls), an interrupted and resumed
//! run ends with exactly the parameters of an uninterrupted one, a checkpoint of another run is
//! refused, and the adapter it writes loads in the engine.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, Ordering};

use porteiro_engine::lora::Adapter;
use porteiro_engine::model::Arch;
use porteiro_train::base::Base;
use porteiro_train::data::Example;
use porteiro_train::net::{Lora, Seq};
use porteiro_train::optim::AdamW;
use porteiro_train::run::{checkpoint_path, Event, Options, Run};

fn examples(vocab: u32) -> Vec<Example> {
    // A learnable task: the answer token is a fixed function of the prompt's first token.
    (0..24)
        .map(|i| {
            let a = i * 7 % (vocab - 4) + 2;
            let tokens = vec![a, 1, (a * 3) % vocab, 0, (a + 5) % vocab, (a + 9) % vocab];
            let mask = vec![false, false, false, false, true, true];
            Example {
                line: i as usize + 1,
                seq: Seq { tokens, mask },
            }
        })
        .collect()
}

fn opts() -> Options {
    Options {
        rank: 4,
        alpha: 8.0,
        targets: vec!["attn".into(), "mlp".into()],
        epochs: 8,
        opt: AdamW {
            lr: 3e-2,
            ..AdamW::default()
        },
        batch_tokens: 24,
        micro_tokens: 12,
        warmup: Some(2),
        clip: Some(1.0),
        seed: 5,
        threads: 2,
        max_steps: None,
        checkpoint_every: 0,
        init_b: 0.0,
    }
}

fn train(
    base: &Base,
    data: &[Example],
    out: &std::path::Path,
    resume: bool,
    stop_after: Option<usize>,
) -> (Lora<f32>, bool, Vec<f64>) {
    let stop = AtomicBool::new(false);
    let run = Run {
        base,
        arch: "llama",
        model_path: std::path::Path::new("tiny"),
        opts: opts(),
        train: data,
        eval: &data[..4],
        out,
        resume,
        stop: &stop,
        trace: None,
        deadline: None,
    };
    let mut losses = Vec::new();
    let mut on = |e: Event| {
        if let Event::Step { step, loss, .. } = e {
            losses.push(loss);
            if Some(step) == stop_after {
                stop.store(true, Ordering::SeqCst);
            }
        }
    };
    let (p, interrupted) = run.go(&mut on).unwrap();
    (p, interrupted, losses)
}

#[test]
fn learns_and_resumes_exactly() {
    let base = Base::tiny(Arch::Llama, 3);
    let data = examples(base.cfg.vocab as u32);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("a.gguf");
    let (whole, interrupted, losses) = train(&base, &data, &out, false, None);
    assert!(!interrupted);
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(
        last < first * 0.7,
        "the loss did not fall: {first} -> {last}"
    );
    assert!(
        !checkpoint_path(&out).exists(),
        "a finished run removes its checkpoint"
    );
    let adapter = Adapter::open(&out, &base.cfg, 1.0).unwrap();
    assert_eq!(adapter.pairs().count(), 2 * 7);

    let out2 = dir.path().join("b.gguf");
    let (_, interrupted, _) = train(&base, &data, &out2, false, Some(4));
    assert!(interrupted && checkpoint_path(&out2).exists() && !out2.exists());
    let (resumed, interrupted, rest) = train(&base, &data, &out2, true, None);
    assert!(!interrupted);
    assert_eq!(rest.len(), losses.len() - 4);
    assert_eq!(
        resumed, whole,
        "resumed run differs from the uninterrupted one"
    );
}

#[test]
fn a_checkpoint_of_another_run_is_refused() {
    let base = Base::tiny(Arch::Qwen2, 3);
    let data = examples(base.cfg.vocab as u32);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("a.gguf");
    train(&base, &data, &out, false, Some(2));
    let stop = AtomicBool::new(false);
    let run = Run {
        base: &base,
        arch: "qwen2",
        model_path: std::path::Path::new("tiny"),
        opts: Options { rank: 8, ..opts() },
        train: &data,
        eval: &[],
        out: &out,
        resume: true,
        stop: &stop,
        trace: None,
        deadline: None,
    };
    let err = run
        .go(&mut |_| {})
        .expect_err("resume of a different run")
        .to_string();
    assert!(err.contains("different run"), "{err}");
}

#[test]
fn a_spent_time_budget_writes_the_adapter_of_the_steps_done() {
    let base = Base::tiny(Arch::Llama, 3);
    let data = examples(base.cfg.vocab as u32);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("a.gguf");
    let stop = AtomicBool::new(false);
    let run = Run {
        base: &base,
        arch: "llama",
        model_path: std::path::Path::new("tiny"),
        opts: opts(),
        train: &data,
        eval: &data[..4],
        out: &out,
        resume: false,
        stop: &stop,
        trace: None,
        // Already spent: one step runs (a run always makes progress), then it stops.
        deadline: Some(std::time::Instant::now()),
    };
    let (mut steps, mut out_of_time, mut evals) = (0, None, 0);
    let (_, interrupted) = run
        .go(&mut |e| match e {
            Event::Step { .. } => steps += 1,
            Event::OutOfTime { step } => out_of_time = Some(step),
            Event::Eval { .. } => evals += 1,
            _ => {}
        })
        .unwrap();
    assert!(!interrupted);
    assert_eq!((steps, out_of_time, evals), (1, Some(1), 1));
    assert!(out.exists() && checkpoint_path(&out).exists());
    // The checkpoint lets --resume finish the schedule.
    let (_, interrupted, rest) = train(&base, &data, &out, true, None);
    assert!(!interrupted && !rest.is_empty());
}
