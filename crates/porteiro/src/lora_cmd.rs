//! `porteiro lora`: LoRA adapters. `bench` measures what serving adapters costs: the decode
//! overhead of one adapter on every linear layer against the base, and the aggregate throughput of
//! many streams spread over several adapters (one shared batch) against the same streams on the
//! base, interleaved in one run so the machine's noise hits both sides alike.

use std::time::Instant;

use anyhow::Result;
use clap::{Args, Subcommand};
use porteiro_engine::lora::{Adapter, Proj};
use porteiro_engine::sampler::Rng;
use porteiro_engine::{BatchToken, KvCache, Model, Scratch};

use crate::ModelArgs;

#[derive(Subcommand)]
pub enum LoraCmd {
    /// Decode overhead of an adapter on every linear layer, and aggregate throughput of streams
    /// spread over several adapters against the base (random adapters of the given rank).
    Bench(LoraBenchArgs),
}

#[derive(Args)]
pub struct LoraBenchArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// Adapter rank.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Streams decoded together for the aggregate test.
    #[arg(long, default_value_t = 16)]
    streams: usize,
    /// Adapters the streams are spread over (stream i uses adapter i mod N).
    #[arg(long, default_value_t = 4)]
    adapters: usize,
    /// Tokens decoded per measurement.
    #[arg(short = 'n', long, default_value_t = 64)]
    gen: usize,
    /// Repetitions of each measurement (alternating base and adapter); medians are reported.
    #[arg(short = 'r', long, default_value_t = 3)]
    reps: usize,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(c: &LoraCmd) -> Result<()> {
    match c {
        LoraCmd::Bench(a) => bench(a),
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Aggregate tokens/s of `kvs.len()` sequences decoding `n` tokens, one batched forward per step;
/// `adapters[i]` is sequence i's adapter (empty: the base for all).
fn decode(
    m: &Model,
    kvs: &mut [KvCache],
    n: usize,
    adapters: &[Option<&Adapter>],
    s: &mut Scratch,
    seed: u64,
) -> Result<f64> {
    let b = kvs.len();
    for kv in kvs.iter_mut() {
        kv.truncate(0);
    }
    let mut rng = Rng::new(seed);
    let t = Instant::now();
    for pos in 0..n {
        let batch: Vec<BatchToken> = (0..b)
            .map(|seq| BatchToken {
                token: (rng.next_u64() % m.cfg.vocab as u64) as u32,
                seq,
                pos,
                logits: true,
            })
            .collect();
        let mut refs: Vec<&mut KvCache> = kvs.iter_mut().collect();
        m.forward_lora(&batch, adapters, &mut refs, s)?;
    }
    Ok((n * b) as f64 / t.elapsed().as_secs_f64())
}

fn bench(a: &LoraBenchArgs) -> Result<()> {
    anyhow::ensure!(
        a.rank > 0 && a.adapters > 0 && a.streams > 0 && a.gen > 0,
        "--rank, --adapters, --streams and -n must be at least 1"
    );
    let lm = a.m.load()?;
    let m = &lm.model;
    let t = Instant::now();
    let ads: Vec<Adapter> = (0..a.adapters)
        .map(|i| {
            // B small and non-zero, so that the delta is really computed.
            let alpha = 2.0 * a.rank as f32;
            Adapter::random(&m.cfg, a.rank, &Proj::ALL, 0.01, alpha, 1 + i as u64)
        })
        .collect();
    let build_ms = t.elapsed().as_secs_f64() * 1e3;
    let mb = ads[0].bytes() as f64 / (1 << 20) as f64;
    let mut s = Scratch::default();
    let mut one = vec![m.new_cache(a.gen)];
    let mut many: Vec<KvCache> = (0..a.streams).map(|_| m.new_cache(a.gen)).collect();
    let spread: Vec<Option<&Adapter>> = (0..a.streams).map(|i| Some(&ads[i % ads.len()])).collect();
    // Warm-up: weights and buffers touched once.
    decode(m, &mut one, a.gen.min(4), &[Some(&ads[0])], &mut s, 9)?;
    decode(m, &mut many, 2, &spread, &mut s, 9)?;
    let (mut base1, mut lora1, mut base_n, mut lora_n) = (vec![], vec![], vec![], vec![]);
    for rep in 0..a.reps.max(1) {
        let seed = 100 + rep as u64;
        base1.push(decode(m, &mut one, a.gen, &[], &mut s, seed)?);
        lora1.push(decode(m, &mut one, a.gen, &[Some(&ads[0])], &mut s, seed)?);
        base_n.push(decode(m, &mut many, a.gen, &[], &mut s, seed)?);
        lora_n.push(decode(m, &mut many, a.gen, &spread, &mut s, seed)?);
    }
    let (b1, l1, bn, ln) = (
        median(&mut base1),
        median(&mut lora1),
        median(&mut base_n),
        median(&mut lora_n),
    );
    let overhead = b1 / l1 - 1.0;
    let ratio = ln / bn;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "model": a.m.model, "threads": m.threads(), "rank": a.rank,
                "adapter_mib": mb, "decode_base_tok_s": b1, "decode_lora_tok_s": l1,
                "decode_overhead": overhead, "streams": a.streams, "adapters": a.adapters,
                "aggregate_base_tok_s": bn, "aggregate_lora_tok_s": ln, "aggregate_ratio": ratio,
            })
        );
        return Ok(());
    }
    println!(
        "model {} ({} threads); rank-{} adapters on every linear layer: {mb:.1} MiB each (built in {build_ms:.0} ms)",
        a.m.model,
        m.threads(),
        a.rank
    );
    println!("| measurement | base tok/s | with adapters tok/s | result |");
    println!("|---|---|---|---|");
    println!(
        "| decode, 1 stream, 1 adapter | {b1:.1} | {l1:.1} | overhead {:.1}% (target <= 10%) |",
        overhead * 100.0
    );
    println!(
        "| decode, {} streams over {} adapters (one batch) | {bn:.1} | {ln:.1} | {:.1}% of base (target >= 80%) |",
        a.streams,
        a.adapters,
        ratio * 100.0
    );
    println!(
        "medians of {} alternating repetitions of {} tokens",
        a.reps.max(1),
        a.gen
    );
    Ok(())
}
