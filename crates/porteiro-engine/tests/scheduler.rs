//! The continuous-batching scheduler on a real model (smollm2-135m): sequences decoded together give
//! the same greedy tokens as one at a time, prompts longer than a prefill chunk are fed in pieces while
//! other sequences decode, and a dropped receiver frees its sequence at once.
//!
//! Skipped with a message when the model is not cached, unless PORTEIRO_REQUIRE_MODELS=1.

// A test: a failed unwrap is a failed test; skip messages go to stderr.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use porteiro_engine::scheduler::{self, EngineConfig, Event, EventSink, GenRequest, Usage};
use porteiro_engine::{generate, FinishReason, GenerateOptions, LocalModel, SamplingParams};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn open() -> Option<LocalModel> {
    match porteiro_models::fetch::resolve_model("smollm2-135m", false) {
        Ok(p) => Some(LocalModel::open(&p, 2).unwrap()),
        Err(e) => {
            assert!(
                std::env::var("PORTEIRO_REQUIRE_MODELS").is_err(),
                "smollm2-135m required but not cached: {e}"
            );
            eprintln!("skipping: smollm2-135m not cached: {e}");
            None
        }
    }
}

struct Sink(mpsc::Sender<Event>);

impl EventSink for Sink {
    fn send(&mut self, ev: Event) -> bool {
        self.0.send(ev).is_ok()
    }
    fn is_closed(&self) -> bool {
        // std's Sender cannot tell; a failed send cancels instead.
        false
    }
}

fn request(prompt: Vec<u32>, max_tokens: usize) -> (GenRequest, mpsc::Receiver<Event>) {
    let (tx, rx) = mpsc::channel();
    (
        GenRequest {
            prompt,
            max_tokens,
            stop: vec![],
            sampling: SamplingParams::greedy(),
            logprobs: None,
            constraint: None,
            adapter: None,
            ignore_eos: true,
            sink: Box::new(Sink(tx)),
        },
        rx,
    )
}

fn collect(rx: &mpsc::Receiver<Event>) -> (String, FinishReason, Usage) {
    let mut text = String::new();
    loop {
        match rx
            .recv_timeout(Duration::from_secs(60))
            .expect("engine answers")
        {
            Event::Text { text: t, .. } => text.push_str(&t),
            Event::Done { finish, usage } => return (text, finish, usage),
            Event::Error(e) => panic!("engine error: {e}"),
        }
    }
}

fn wait_until(cond: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "condition not reached in 5 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn batched_greedy_matches_one_sequence_at_a_time() {
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(lm) = open() else { return };
    let prompts = [
        "The capital of France is",
        "def fibonacci(n):",
        // Longer than the 16-token prefill chunk below: prefilled over several steps while the other
        // sequences decode.
        "Once upon a time, in a small village at the edge of a great forest, there lived an old \
         woodcutter and his three daughters, who",
    ];
    let n = 24;
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| lm.tokenizer.encode(p, true, false))
        .collect();
    let want: Vec<String> = ids
        .iter()
        .map(|p| {
            let mut kv = lm.model.new_cache(256);
            let opts = GenerateOptions {
                max_tokens: n,
                sampling: SamplingParams::greedy(),
                ..Default::default()
            };
            let mut out = String::new();
            // generate() stops at end-of-generation; the prompts above do not reach it in 24 tokens.
            let g = generate(&lm.model, &lm.tokenizer, p, &opts, &mut kv, &mut |t| {
                out.push_str(t)
            })
            .unwrap();
            assert_eq!(g.tokens.len(), n, "reference stopped early on {p:?}");
            out
        })
        .collect();

    let tok = Arc::new(lm.tokenizer);
    let cfg = EngineConfig {
        n_ctx: 256,
        max_seqs: 4,
        max_queue: 4,
        kv_budget_tokens: 1024,
        prefill_chunk: 16,
        nice: 0,
    };
    let (h, join) = scheduler::spawn(lm.model, tok, cfg).unwrap();
    let rxs: Vec<_> = ids
        .iter()
        .map(|p| {
            let (req, rx) = request(p.clone(), n);
            h.submit(req).unwrap();
            rx
        })
        .collect();
    for ((rx, want), p) in rxs.iter().zip(&want).zip(&ids) {
        let (text, finish, usage) = collect(rx);
        assert_eq!(&text, want);
        assert_eq!(finish, FinishReason::Length);
        assert_eq!(
            usage,
            Usage {
                prompt_tokens: p.len(),
                completion_tokens: n
            }
        );
    }
    let st = h.stats();
    // Done is sent before the finished sequences are swept at the end of the step.
    wait_until(|| st.running.load(Ordering::Relaxed) == 0);
    // Three sequences of 24 tokens in far fewer than 3 × 24 steps: they were decoded together.
    let steps = st.steps.load(Ordering::Relaxed);
    assert!(steps < 40, "{steps} steps");
    assert_eq!(st.running.load(Ordering::Relaxed), 0);
    assert_eq!(st.kv_bytes.load(Ordering::Relaxed), 0);
    h.shutdown();
    join.join().unwrap();
}

#[test]
fn dropped_receiver_frees_the_sequence_and_the_queue_refuses_when_full() {
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(lm) = open() else { return };
    let prompt = lm
        .tokenizer
        .encode("Count to one thousand: 1, 2, 3,", true, false);
    let tok = Arc::new(lm.tokenizer);
    let cfg = EngineConfig {
        n_ctx: 1024,
        max_seqs: 1,
        max_queue: 1,
        kv_budget_tokens: 1024,
        prefill_chunk: 64,
        nice: 0,
    };
    let (h, join) = scheduler::spawn(lm.model, tok, cfg).unwrap();
    let (a, rx_a) = request(prompt.clone(), 900);
    h.submit(a).unwrap();
    // Wait until `a` runs, then queue `b`; a third request finds the queue full.
    match rx_a.recv_timeout(Duration::from_secs(30)).unwrap() {
        Event::Text { .. } => {}
        other => panic!("unexpected {other:?}"),
    }
    let (b, rx_b) = request(prompt.clone(), 4);
    h.submit(b).unwrap();
    let (c, _rx_c) = request(prompt.clone(), 4);
    match h.submit(c) {
        Err(scheduler::SubmitError::Overloaded { retry_after_s, .. }) => {
            assert!(retry_after_s >= 1)
        }
        other => panic!("expected Overloaded, got {other:?}"),
    }
    // The client of `a` goes away: at the next send the engine drops it and admits `b`.
    drop(rx_a);
    let t0 = Instant::now();
    let (_, finish, usage) = collect(&rx_b);
    assert_eq!((finish, usage.completion_tokens), (FinishReason::Length, 4));
    assert!(t0.elapsed() < Duration::from_secs(10));
    let st = h.stats();
    wait_until(|| st.running.load(Ordering::Relaxed) == 0);
    assert_eq!(st.waiting.load(Ordering::Relaxed), 0);
    assert_eq!(st.kv_reserved_tokens.load(Ordering::Relaxed), 0);
    h.shutdown();
    join.join().unwrap();
}

#[test]
fn prompt_plus_max_tokens_over_the_context_is_refused_before_queueing() {
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(lm) = open() else { return };
    let tok = Arc::new(lm.tokenizer);
    let cfg = EngineConfig {
        n_ctx: 64,
        max_seqs: 2,
        max_queue: 2,
        kv_budget_tokens: 128,
        prefill_chunk: 64,
        nice: 0,
    };
    let (h, join) = scheduler::spawn(lm.model, tok, cfg).unwrap();
    let (r, _rx) = request(vec![1; 60], 10);
    assert_eq!(
        h.submit(r).unwrap_err(),
        scheduler::SubmitError::TooLong {
            prompt: 60,
            max_tokens: 10,
            n_ctx: 64
        }
    );
    h.shutdown();
    join.join().unwrap();
}

/// Sends every event to one shared channel, tagged, so that the order across requests is visible.
struct Tagged(usize, mpsc::Sender<(usize, Event)>);

impl EventSink for Tagged {
    fn send(&mut self, ev: Event) -> bool {
        self.1.send((self.0, ev)).is_ok()
    }
    fn is_closed(&self) -> bool {
        false
    }
}

#[test]
fn a_short_prompt_behind_a_long_one_gets_its_first_token_first() {
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(lm) = open() else { return };
    let long = lm.tokenizer.encode(
        &"The quick brown fox jumps over the lazy dog. ".repeat(12),
        true,
        false,
    );
    let short = lm.tokenizer.encode("Hi", true, false);
    assert!(long.len() > 100 && short.len() < 8);
    let tok = Arc::new(lm.tokenizer);
    let cfg = EngineConfig {
        n_ctx: 512,
        max_seqs: 4,
        max_queue: 4,
        kv_budget_tokens: 1024,
        prefill_chunk: 16,
        nice: 0,
    };
    let (h, join) = scheduler::spawn(lm.model, tok, cfg).unwrap();
    let (tx, rx) = mpsc::channel();
    for (tag, prompt) in [(0, long), (1, short)] {
        h.submit(GenRequest {
            prompt,
            max_tokens: 4,
            stop: vec![],
            sampling: SamplingParams::greedy(),
            logprobs: None,
            constraint: None,
            adapter: None,
            ignore_eos: true,
            sink: Box::new(Tagged(tag, tx.clone())),
        })
        .unwrap();
    }
    let (first, _) = rx.recv_timeout(Duration::from_secs(60)).unwrap();
    assert_eq!(
        first, 1,
        "the long prompt's prefill held back the short one"
    );
    let mut done = 0;
    while done < 2 {
        if let (_, Event::Done { .. }) = rx.recv_timeout(Duration::from_secs(60)).unwrap() {
            done += 1;
        }
    }
    h.shutdown();
    join.join().unwrap();
}
