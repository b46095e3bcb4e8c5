//! Continuous batching. One engine thread owns the [`Model`] and runs the loop below; everything else
//! talks to it through an [`EngineHandle`] (a request in, a stream of [`Event`]s out through the
//! request's [`EventSink`]).
//!
//! One step of the loop:
//! 1. take new requests off the channel into the waiting queue (FIFO);
//! 2. drop requests whose receiver is gone (client disconnected): their KV cache is freed at once;
//! 3. admit waiting requests while a sequence slot is free and their KV reservation (prompt +
//!    max_tokens positions) fits the KV budget;
//! 4. build one batch: one token for every decoding sequence, then up to `prefill_chunk` prompt tokens
//!    of the sequences still prefilling (`plan_prefill`), so a long prompt never stalls running streams;
//! 5. one `forward` over the batch, then per sequence: sample, stop strings / end of generation /
//!    length, and send the new text.
//!
//! Every running sequence gets a token each step, and admission is first come first served, so a long
//! generation does not starve short ones.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Instant;

use porteiro_models::tokenizer::Tokenizer;

use crate::generate::{FinishReason, StopText};
use crate::model::{BatchToken, KvCache, Model, Scratch};
use crate::sampler::{log_softmax, Sampler, SamplingParams};

/// Scheduler limits. Validated by [`EngineConfig::validate`] before the engine starts.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Context window of one sequence (prompt + completion), tokens.
    pub n_ctx: usize,
    /// Sequences decoded together at most.
    pub max_seqs: usize,
    /// Requests that may wait for a slot; one more is refused (HTTP 429).
    pub max_queue: usize,
    /// KV-cache positions reserved across all running sequences at most.
    pub kv_budget_tokens: usize,
    /// Prompt tokens prefilled per step (shared by all prefilling sequences).
    pub prefill_chunk: usize,
    /// Niceness of the generating threads (the scheduler's and the model's pool): above 0, short
    /// work on other threads (the router's encoder) preempts decoding when the cores are busy.
    pub nice: i32,
}

impl EngineConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.n_ctx < 2 {
            return Err(format!("n_ctx is {}, it must be at least 2", self.n_ctx));
        }
        if self.max_seqs == 0 {
            return Err("max_seqs must be at least 1".into());
        }
        if self.prefill_chunk == 0 {
            return Err("prefill_chunk must be at least 1".into());
        }
        if self.kv_budget_tokens < self.n_ctx {
            return Err(format!(
                "the KV budget ({} tokens) does not hold one full context of {} tokens",
                self.kv_budget_tokens, self.n_ctx
            ));
        }
        Ok(())
    }
}

/// One generation request, already tokenized and validated.
pub struct GenRequest {
    pub prompt: Vec<u32>,
    /// Completion tokens at most (prompt + max_tokens must fit `n_ctx`).
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub sampling: SamplingParams,
    /// Log-probabilities: `None` = off, `Some(k)` = the chosen token's and the `k` most likely.
    pub logprobs: Option<usize>,
    /// Keep generating through end-of-generation tokens (benchmarks and load tests).
    pub ignore_eos: bool,
    /// Structured output: which tokens may come next (None: unconstrained).
    pub constraint: Option<Box<dyn TokenConstraint>>,
    /// A LoRA adapter of this model applied to this sequence only (None: the base model).
    pub adapter: Option<std::sync::Arc<crate::lora::Adapter>>,
    pub sink: Box<dyn EventSink>,
}

/// Limits the next token to what a grammar allows (structured output). Implemented over
/// llguidance by `porteiro-grammar`; the engine only masks logits and reports the chosen tokens.
pub trait TokenConstraint: Send {
    /// Allowed next tokens as a bitset over the vocabulary (bit `id % 32` of word `id / 32`), or
    /// None when any token may follow (a lazy grammar before its trigger). End-of-generation
    /// tokens are allowed only where the grammar may end.
    fn allowed(&mut self) -> Result<Option<Vec<u32>>, String>;
    /// The token chosen; returns true once the grammar is complete (generation stops there).
    fn commit(&mut self, token: u32) -> Result<bool, String>;
}

/// Where a request's events go. `send` returning false (or `is_closed`) means the receiver is gone:
/// the request is cancelled and its memory freed.
pub trait EventSink: Send {
    fn send(&mut self, ev: Event) -> bool;
    fn is_closed(&self) -> bool;
}

/// Log-probability of one generated token (and of the most likely alternatives).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: TokenText,
    pub logprob: f32,
    pub top: Vec<(TokenText, f32)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenText {
    pub id: u32,
    /// The token's bytes as text (invalid UTF-8 replaced).
    pub text: String,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// New final text (possibly empty when only log-probabilities are new).
    Text {
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    Done {
        finish: FinishReason,
        usage: Usage,
    },
    /// The engine could not finish the request (shutdown, internal error).
    Error(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("the server is at capacity ({running} running, {waiting} waiting)")]
    Overloaded {
        running: usize,
        waiting: usize,
        retry_after_s: u64,
    },
    #[error("prompt ({prompt} tokens) + max_tokens ({max_tokens}) exceeds the context window of {n_ctx} tokens")]
    TooLong {
        prompt: usize,
        max_tokens: usize,
        n_ctx: usize,
    },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("max_tokens must be at least 1")]
    NoTokens,
    #[error("the engine has stopped")]
    Stopped,
}

/// Counters and gauges the engine keeps up to date; read by `/metrics`.
#[derive(Default)]
pub struct EngineStats {
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    pub kv_reserved_tokens: AtomicUsize,
    pub kv_bytes: AtomicUsize,
    pub steps: AtomicU64,
    pub batch_tokens: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub cancelled: AtomicU64,
    /// Moving average of a request's time in the engine, milliseconds (for Retry-After).
    pub avg_request_ms: AtomicU64,
    /// Time spent in forward passes, nanoseconds (what local requests cost is apportioned from it).
    pub busy_ns: AtomicU64,
    /// KV-budget tokens held by other memory (LoRA adapters): sequences are admitted within the rest.
    pub held_tokens: AtomicUsize,
}

enum Msg {
    Submit(Box<GenRequest>, Instant),
    Shutdown,
}

/// The handle HTTP handlers hold: cheap to clone, sends requests to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Msg>,
    cfg: Arc<EngineConfig>,
    stats: Arc<EngineStats>,
    stopped: Arc<AtomicBool>,
}

impl EngineHandle {
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Holds `tokens` of the KV budget for other memory (an adapter's weights), if at least one
    /// full-context sequence still fits beside everything held; returns the tokens left otherwise.
    pub fn hold_tokens(&self, tokens: usize) -> Result<(), usize> {
        let budget = self.cfg.kv_budget_tokens;
        let n_ctx = self.cfg.n_ctx;
        self.stats
            .held_tokens
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| {
                (h + tokens + n_ctx <= budget).then_some(h + tokens)
            })
            .map(|_| ())
            .map_err(|h| budget.saturating_sub(h + n_ctx))
    }

    /// Gives back tokens held by [`EngineHandle::hold_tokens`].
    pub fn release_tokens(&self, tokens: usize) {
        let _ = self
            .stats
            .held_tokens
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| {
                Some(h.saturating_sub(tokens))
            });
    }

    /// The counters, shared (for observers that outlive a borrow of the handle).
    pub fn shared_stats(&self) -> Arc<EngineStats> {
        self.stats.clone()
    }

    /// False once the engine thread has ended (shutdown, or a panic).
    pub fn is_running(&self) -> bool {
        !self.stopped.load(Ordering::Acquire)
    }

    /// Queues a request. Refuses at once (without queueing) when the prompt does not fit or when the
    /// waiting queue is full.
    pub fn submit(&self, req: GenRequest) -> Result<(), SubmitError> {
        if self.stopped.load(Ordering::Acquire) {
            return Err(SubmitError::Stopped);
        }
        if req.prompt.is_empty() {
            return Err(SubmitError::EmptyPrompt);
        }
        if req.max_tokens == 0 {
            return Err(SubmitError::NoTokens);
        }
        if req.prompt.len() + req.max_tokens > self.cfg.n_ctx {
            return Err(SubmitError::TooLong {
                prompt: req.prompt.len(),
                max_tokens: req.max_tokens,
                n_ctx: self.cfg.n_ctx,
            });
        }
        let s = &self.stats;
        // Free slots admit at the next step; beyond them, `max_queue` requests may wait.
        let running = s.running.load(Ordering::Acquire);
        let room = self.cfg.max_queue + self.cfg.max_seqs.saturating_sub(running);
        let admitted = s
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                (w < room).then_some(w + 1)
            });
        if let Err(waiting) = admitted {
            let avg_s = s.avg_request_ms.load(Ordering::Relaxed).div_ceil(1000);
            let per_slot = (waiting as u64 + 1).div_ceil(self.cfg.max_seqs as u64);
            return Err(SubmitError::Overloaded {
                running,
                waiting,
                retry_after_s: (avg_s * per_slot).clamp(1, 60),
            });
        }
        if self
            .tx
            .send(Msg::Submit(Box::new(req), Instant::now()))
            .is_err()
        {
            s.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(SubmitError::Stopped);
        }
        Ok(())
    }

    /// Stops the engine: every request still waiting or running ends with [`Event::Error`], then the
    /// engine thread exits.
    pub fn shutdown(&self) {
        self.stopped.store(true, Ordering::Release);
        let _ = self.tx.send(Msg::Shutdown);
    }
}

/// Starts the engine thread, which owns `model` from now on.
pub fn spawn(
    model: Model,
    tokenizer: Arc<Tokenizer>,
    cfg: EngineConfig,
) -> std::io::Result<(EngineHandle, JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel();
    let cfg = Arc::new(cfg);
    let stats = Arc::new(EngineStats::default());
    let handle = EngineHandle {
        tx,
        cfg: cfg.clone(),
        stats: stats.clone(),
        stopped: Arc::new(AtomicBool::new(false)),
    };
    let stopped = handle.stopped.clone();
    let join = std::thread::Builder::new()
        .name("porteiro-engine".into())
        .spawn(move || {
            // Marks the engine stopped however the loop ends, a panic included.
            let _stopped = SetOnDrop(stopped);
            if cfg.nice > 0 {
                model.lower_priority(cfg.nice);
            }
            Scheduler::new(&model, &tokenizer, &cfg, &stats).run(rx);
        })?;
    Ok((handle, join))
}

struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// A request that has a slot and a KV cache.
struct Seq<'t> {
    req: Box<GenRequest>,
    started: Instant,
    cache: KvCache,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    /// The last sampled token, to be fed at the next step.
    next: Option<u32>,
    sampler: Sampler,
    out: StopText<'t>,
    generated: usize,
    /// Set when the sequence has ended (its `Done` or `Error` was sent, or its receiver is gone).
    finished: bool,
}

impl Seq<'_> {
    fn reserved(&self) -> usize {
        self.req.prompt.len() + self.req.max_tokens
    }
}

struct Scheduler<'a> {
    model: &'a Model,
    tok: &'a Tokenizer,
    cfg: &'a EngineConfig,
    stats: &'a EngineStats,
    waiting: VecDeque<(Box<GenRequest>, Instant)>,
    active: Vec<Seq<'a>>,
    scratch: Scratch,
    row: Vec<f32>,
    reserved: usize,
}

impl<'a> Scheduler<'a> {
    fn new(
        model: &'a Model,
        tok: &'a Tokenizer,
        cfg: &'a EngineConfig,
        stats: &'a EngineStats,
    ) -> Self {
        Self {
            model,
            tok,
            cfg,
            stats,
            waiting: VecDeque::new(),
            active: Vec::new(),
            scratch: Scratch::default(),
            row: Vec::new(),
            reserved: 0,
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        loop {
            if self.active.is_empty() && self.waiting.is_empty() {
                match rx.recv() {
                    Ok(m) => {
                        if !self.take(m) {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(m) => {
                        if !self.take(m) {
                            return;
                        }
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        if self.active.is_empty() && self.waiting.is_empty() {
                            return;
                        }
                        break;
                    }
                }
            }
            self.drop_cancelled();
            self.admit();
            self.step();
            self.sweep();
        }
    }

    /// Handles one message; false means shut down now.
    fn take(&mut self, m: Msg) -> bool {
        match m {
            Msg::Submit(req, t) => {
                self.waiting.push_back((req, t));
                true
            }
            Msg::Shutdown => {
                let msg = "the server is shutting down".to_string();
                for (mut req, _) in self.waiting.drain(..) {
                    self.stats.waiting.fetch_sub(1, Ordering::AcqRel);
                    req.sink.send(Event::Error(msg.clone()));
                }
                for s in &mut self.active {
                    s.req.sink.send(Event::Error(msg.clone()));
                    s.finished = true;
                }
                self.sweep();
                false
            }
        }
    }

    fn drop_cancelled(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|(r, _)| !r.sink.is_closed());
        let gone = before - self.waiting.len();
        if gone > 0 {
            self.stats.waiting.fetch_sub(gone, Ordering::AcqRel);
            self.stats
                .cancelled
                .fetch_add(gone as u64, Ordering::Relaxed);
        }
        for s in &mut self.active {
            if !s.finished && s.req.sink.is_closed() {
                s.finished = true;
                self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sweep();
    }

    fn admit(&mut self) {
        while self.active.len() < self.cfg.max_seqs {
            let Some((req, _)) = self.waiting.front() else {
                break;
            };
            let need = req.prompt.len() + req.max_tokens;
            let held = self.stats.held_tokens.load(Ordering::Acquire);
            if self.reserved + need + held > self.cfg.kv_budget_tokens {
                break;
            }
            // front() was Some just above: never breaks here.
            let Some((req, t)) = self.waiting.pop_front() else {
                break;
            };
            self.stats.waiting.fetch_sub(1, Ordering::AcqRel);
            self.reserved += need;
            let sampler = Sampler::new(req.sampling.clone());
            let out = StopText::new(self.tok, &req.stop);
            self.active.push(Seq {
                req,
                started: t,
                cache: self.model.new_cache(need),
                prefilled: 0,
                next: None,
                sampler,
                out,
                generated: 0,
                finished: false,
            });
        }
        self.publish();
    }

    fn publish(&self) {
        let s = self.stats;
        s.running.store(self.active.len(), Ordering::Release);
        s.kv_reserved_tokens.store(self.reserved, Ordering::Release);
        s.kv_bytes.store(
            self.active.iter().map(|q| q.cache.bytes()).sum(),
            Ordering::Release,
        );
    }

    /// Removes finished sequences, freeing their caches and reservations.
    fn sweep(&mut self) {
        let mut freed = 0;
        self.active.retain(|s| {
            if s.finished {
                freed += s.reserved();
            }
            !s.finished
        });
        self.reserved -= freed;
        self.publish();
    }

    fn step(&mut self) {
        let mut batch = Vec::new();
        for (i, s) in self.active.iter().enumerate() {
            if let Some(t) = s.next {
                batch.push(BatchToken {
                    token: t,
                    seq: i,
                    pos: s.cache.len(),
                    logits: true,
                });
            }
        }
        // Prompt tokens, within the step's prefill budget (see `plan_prefill`).
        let remaining: Vec<(usize, usize)> = (0..self.active.len())
            .map(|i| {
                (
                    i,
                    self.active[i].req.prompt.len() - self.active[i].prefilled,
                )
            })
            .filter(|&(_, r)| r > 0)
            .collect();
        for (i, take) in plan_prefill(&remaining, self.cfg.prefill_chunk) {
            let s = &self.active[i];
            let n = s.req.prompt.len();
            for (j, &t) in s.req.prompt[s.prefilled..s.prefilled + take]
                .iter()
                .enumerate()
            {
                batch.push(BatchToken {
                    token: t,
                    seq: i,
                    pos: s.prefilled + j,
                    logits: s.prefilled + j + 1 == n,
                });
            }
        }
        if batch.is_empty() {
            return;
        }
        // Each token's adapter; empty when no sequence has one (the plain forward pass).
        let adapters: Vec<Option<std::sync::Arc<crate::lora::Adapter>>> =
            if self.active.iter().any(|s| s.req.adapter.is_some()) {
                batch
                    .iter()
                    .map(|b| self.active[b.seq].req.adapter.clone())
                    .collect()
            } else {
                Vec::new()
            };
        let lora: Vec<Option<&crate::lora::Adapter>> =
            adapters.iter().map(|a| a.as_deref()).collect();
        let mut caches: Vec<&mut KvCache> = self.active.iter_mut().map(|s| &mut s.cache).collect();
        let t_forward = Instant::now();
        let fwd = self
            .model
            .forward_lora(&batch, &lora, &mut caches, &mut self.scratch);
        self.stats
            .busy_ns
            .fetch_add(t_forward.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if let Err(e) = fwd {
            // Inputs are validated before they get here; if it happens anyway, fail the batch's
            // sequences rather than the engine.
            let msg = format!("engine error: {e}");
            for s in &mut self.active {
                s.req.sink.send(Event::Error(msg.clone()));
                s.finished = true;
            }
            return;
        }
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        self.stats
            .batch_tokens
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let vocab = self.model.cfg.vocab;
        let mut row_i = 0;
        for b in &batch {
            let s = &mut self.active[b.seq];
            if b.logits {
                self.row.clear();
                self.row
                    .extend_from_slice(&self.scratch.logits[row_i * vocab..(row_i + 1) * vocab]);
                row_i += 1;
                Self::advance(self.tok, self.stats, s, &mut self.row);
            } else {
                s.prefilled += 1;
            }
        }
    }

    /// Samples the next token of `s` from `logits` and sends what it adds.
    fn advance(tok: &Tokenizer, stats: &EngineStats, s: &mut Seq<'_>, logits: &mut [f32]) {
        if s.next.take().is_none() {
            // This was the last prompt token.
            s.prefilled += 1;
            stats
                .prompt_tokens
                .fetch_add(s.req.prompt.len() as u64, Ordering::Relaxed);
        }
        if let Some(c) = s.req.constraint.as_mut() {
            match c.allowed() {
                Ok(None) => {}
                Ok(Some(bits)) => {
                    for (id, l) in logits.iter_mut().enumerate() {
                        if bits.get(id / 32).is_none_or(|w| w >> (id % 32) & 1 == 0) {
                            *l = f32::NEG_INFINITY;
                        }
                    }
                }
                Err(e) => return Self::fail(stats, s, format!("structured output: {e}")),
            }
        }
        let lp = s.req.logprobs.map(|k| token_logprobs(tok, logits, k));
        let t = s.sampler.sample(logits);
        let grammar_done = if tok.is_eog(t) {
            false
        } else {
            match s.req.constraint.as_mut().map(|c| c.commit(t)) {
                Some(Err(e)) => return Self::fail(stats, s, format!("structured output: {e}")),
                Some(Ok(done)) => done,
                None => false,
            }
        };
        if tok.is_eog(t) && !s.req.ignore_eos {
            let rest = s.out.finish(false);
            Self::finish(stats, s, rest, FinishReason::Stop);
            return;
        }
        s.sampler.accept(t);
        s.generated += 1;
        stats.completion_tokens.fetch_add(1, Ordering::Relaxed);
        let step = s.out.push(t);
        let logprobs = lp.map(|f| vec![f(t)]).unwrap_or_default();
        if step.stopped || grammar_done {
            let mut text = step.text;
            text.push_str(&s.out.finish(false));
            Self::send_text(stats, s, text, logprobs);
            Self::finish(stats, s, String::new(), FinishReason::Stop);
            return;
        }
        if s.generated >= s.req.max_tokens || s.cache.len() >= s.cache.capacity() {
            let mut text = step.text;
            text.push_str(&s.out.finish(true));
            Self::send_text(stats, s, text, logprobs);
            Self::finish(stats, s, String::new(), FinishReason::Length);
            return;
        }
        Self::send_text(stats, s, step.text, logprobs);
        s.next = Some(t);
    }

    /// Ends a sequence with an error event.
    fn fail(stats: &EngineStats, s: &mut Seq<'_>, msg: String) {
        if !s.finished {
            s.req.sink.send(Event::Error(msg));
            stats.cancelled.fetch_add(1, Ordering::Relaxed);
        }
        s.finished = true;
    }

    fn send_text(stats: &EngineStats, s: &mut Seq<'_>, text: String, logprobs: Vec<TokenLogprob>) {
        if s.finished || (text.is_empty() && logprobs.is_empty()) {
            return;
        }
        if !s.req.sink.send(Event::Text { text, logprobs }) {
            // The receiver is gone: the client disconnected.
            s.finished = true;
            stats.cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn finish(stats: &EngineStats, s: &mut Seq<'_>, rest: String, finish: FinishReason) {
        Self::send_text(stats, s, rest, Vec::new());
        if !s.finished {
            s.req.sink.send(Event::Done {
                finish,
                usage: Usage {
                    prompt_tokens: s.req.prompt.len(),
                    completion_tokens: s.generated,
                },
            });
        }
        s.finished = true;
        let ms = s.started.elapsed().as_millis() as u64;
        let old = stats.avg_request_ms.load(Ordering::Relaxed);
        let avg = if old == 0 { ms } else { (old * 7 + ms) / 8 };
        stats.avg_request_ms.store(avg, Ordering::Relaxed);
    }
}

/// Splits one step's prefill budget among the prefilling sequences, given as (index, prompt tokens
/// left) oldest first; returns (index, tokens this step) in index order. The oldest gets a quarter of
/// the budget first (so it always progresses), the rest goes shortest-remaining first (ties: oldest
/// first). Shortest-first gives a short prompt behind a long one its first token at once, and
/// prompts that arrive together finish one after another instead of all at the end.
fn plan_prefill(remaining: &[(usize, usize)], budget: usize) -> Vec<(usize, usize)> {
    let Some(&(oldest, left)) = remaining.first() else {
        return Vec::new();
    };
    let mut take: Vec<(usize, usize)> = remaining.iter().map(|&(i, _)| (i, 0)).collect();
    let guaranteed = left.min((budget / 4).max(1)).min(budget);
    take[0] = (oldest, guaranteed);
    let mut budget = budget - guaranteed;
    let mut order: Vec<usize> = (0..remaining.len()).collect();
    order.sort_by_key(|&k| (remaining[k].1 - take[k].1, k));
    for k in order {
        if budget == 0 {
            break;
        }
        let t = budget.min(remaining[k].1 - take[k].1);
        take[k].1 += t;
        budget -= t;
    }
    take.retain(|&(_, t)| t > 0);
    take
}

/// Log-probabilities of one position: returns a function giving the entry for the sampled token.
fn token_logprobs<'t>(
    tok: &'t Tokenizer,
    logits: &[f32],
    top: usize,
) -> impl FnOnce(u32) -> TokenLogprob + 't {
    let lp = log_softmax(logits);
    let mut best: Vec<(u32, f32)> = Vec::new();
    if top > 0 {
        let mut idx: Vec<(u32, f32)> = lp.iter().enumerate().map(|(i, &v)| (i as u32, v)).collect();
        let k = top.min(idx.len());
        let desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        idx.select_nth_unstable_by(k - 1, desc);
        idx.truncate(k);
        idx.sort_unstable_by(desc);
        best = idx;
    }
    move |t| TokenLogprob {
        token: token_text(tok, t),
        logprob: lp[t as usize],
        top: best
            .into_iter()
            .map(|(i, v)| (token_text(tok, i), v))
            .collect(),
    }
}

fn token_text(tok: &Tokenizer, id: u32) -> TokenText {
    let bytes = tok.token_bytes(id, true);
    TokenText {
        id,
        text: String::from_utf8_lossy(&bytes).into_owned(),
        bytes,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test
mod tests {
    use super::plan_prefill;

    #[test]
    fn short_prompt_behind_a_long_one_is_prefilled_at_once() {
        assert_eq!(
            plan_prefill(&[(0, 1000), (1, 5)], 256),
            vec![(0, 251), (1, 5)]
        );
    }

    #[test]
    fn prompts_arriving_together_finish_one_after_another() {
        // Four prompts of 100 with a budget of 128: the oldest completes now, the next one partly.
        assert_eq!(
            plan_prefill(&[(0, 100), (1, 100), (2, 100), (3, 100)], 128),
            vec![(0, 100), (1, 28)]
        );
    }

    #[test]
    fn the_oldest_always_progresses() {
        // Many short prompts cannot take the whole budget from an old long one.
        let mut r = vec![(0, 5000)];
        r.extend((1..100).map(|i| (i, 10)));
        let plan = plan_prefill(&r, 256);
        assert_eq!(plan[0], (0, 64));
        assert_eq!(plan.iter().map(|p| p.1).sum::<usize>(), 256);
        assert!(plan_prefill(&[], 256).is_empty());
        assert_eq!(plan_prefill(&[(3, 1)], 1), vec![(3, 1)]);
    }
}
