//! `porteiro bench`: prefill and decode throughput measured like llama-bench (random tokens, pp from an
//! empty cache in one batch, tg one token at a time from an empty cache), optionally against llama.cpp's
//! own llama-bench on the same file, threads and token counts in the same invocation, runs interleaved.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use porteiro_engine::sampler::Rng;
use porteiro_engine::{BatchToken, KvCache, LocalModel, Scratch};
use serde::Serialize;

use crate::ModelArgs;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// Prompt tokens for the prefill test (0 skips it).
    #[arg(short = 'p', long, default_value_t = 512)]
    prompt: usize,
    /// Generated tokens for the decode test (0 skips it).
    #[arg(short = 'n', long, default_value_t = 128)]
    gen: usize,
    /// Repetitions; the median is reported.
    #[arg(short = 'r', long, default_value_t = 3)]
    reps: usize,
    /// Also run a peer engine in the same invocation: `llama.cpp` (llama-bench from
    /// scripts/build-llama-cpp.sh, its AVX2 build under PORTEIRO_ISA=avx2, or the binary named by
    /// $PORTEIRO_LLAMA_BENCH).
    #[arg(long)]
    compare: Option<String>,
    /// Aggregate decode throughput with this many sequences decoded together (comma-separated).
    #[arg(long, value_delimiter = ',')]
    batch: Vec<usize>,
    /// Also measure this machine's read bandwidth (multi-threaded streaming read of a 1 GiB buffer)
    /// and report decode against the ceiling it implies (bandwidth / weight bytes read per token).
    #[arg(long)]
    ceiling: bool,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// Streaming read bandwidth in bytes/s with `threads` threads over a buffer far larger than the caches
/// (best of three passes).
fn read_bandwidth(threads: usize) -> f64 {
    const BYTES: usize = 1 << 30;
    let buf: Vec<u64> = (0..BYTES / 8).map(|i| i as u64).collect();
    let chunk = buf.len().div_ceil(threads.max(1));
    let mut best = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let total: u64 = std::thread::scope(|sc| {
            let hs: Vec<_> = buf
                .chunks(chunk)
                .map(|part| {
                    sc.spawn(move || {
                        // Four independent sums keep several loads in flight per thread.
                        let mut acc = [0u64; 4];
                        for c in part.chunks_exact(4) {
                            for j in 0..4 {
                                acc[j] = acc[j].wrapping_add(c[j]);
                            }
                        }
                        acc.iter().fold(0u64, |a, b| a.wrapping_add(*b))
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or(0))
                .fold(0u64, |a, b| a.wrapping_add(b))
        });
        std::hint::black_box(total);
        best = best.max(BYTES as f64 / t.elapsed().as_secs_f64());
    }
    best
}

#[derive(Serialize, Default, Clone)]
struct Figures {
    prefill_tok_s: f64,
    decode_tok_s: f64,
    ttft_ms: f64,
    load_ms: f64,
    peak_rss_bytes: u64,
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn random_tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut r = Rng::new(seed);
    (0..n)
        .map(|_| (r.next_u64() % vocab as u64) as u32)
        .collect()
}

/// Buffers kept across repetitions, as llama-bench keeps its context: only the first run pays for
/// touching fresh memory (slow on VMs), not every measured one.
struct Bufs {
    s: Scratch,
    kv_p: KvCache,
    kv_n: KvCache,
}

/// (prefill seconds, decode seconds) for one repetition.
fn one_rep(lm: &LocalModel, b: &mut Bufs, p: usize, n: usize, rep: usize) -> Result<(f64, f64)> {
    let model = &lm.model;
    let s = &mut b.s;
    let mut pp = 0.0;
    if p > 0 {
        let toks = random_tokens(p, model.cfg.vocab, rep as u64);
        let kv = &mut b.kv_p;
        kv.truncate(0);
        let batch: Vec<BatchToken> = toks
            .iter()
            .enumerate()
            .map(|(pos, &token)| BatchToken {
                token,
                seq: 0,
                pos,
                logits: pos + 1 == p,
            })
            .collect();
        let t = Instant::now();
        model.forward(&batch, &mut [&mut *kv], s)?;
        pp = t.elapsed().as_secs_f64();
    }
    let mut tg = 0.0;
    if n > 0 {
        let toks = random_tokens(n, model.cfg.vocab, 1000 + rep as u64);
        let kv = &mut b.kv_n;
        kv.truncate(0);
        let t = Instant::now();
        for (pos, &token) in toks.iter().enumerate() {
            model.forward(
                &[BatchToken {
                    token,
                    seq: 0,
                    pos,
                    logits: true,
                }],
                &mut [&mut *kv],
                s,
            )?;
        }
        tg = t.elapsed().as_secs_f64();
    }
    Ok((pp, tg))
}

/// Aggregate tokens/s when `b` sequences decode `n` tokens each, one batched forward per step.
fn batched_decode(lm: &LocalModel, b: usize, n: usize) -> Result<f64> {
    let model = &lm.model;
    let mut s = Scratch::default();
    let mut kvs: Vec<_> = (0..b).map(|_| model.new_cache(n)).collect();
    let toks = random_tokens(n * b, model.cfg.vocab, 77);
    let t = Instant::now();
    for pos in 0..n {
        let batch: Vec<BatchToken> = (0..b)
            .map(|seq| BatchToken {
                token: toks[pos * b + seq],
                seq,
                pos,
                logits: true,
            })
            .collect();
        let mut refs: Vec<&mut porteiro_engine::KvCache> = kvs.iter_mut().collect();
        model.forward(&batch, &mut refs, &mut s)?;
    }
    Ok((n * b) as f64 / t.elapsed().as_secs_f64())
}

fn llama_bench_path() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("PORTEIRO_LLAMA_BENCH") {
        return Ok(PathBuf::from(p));
    }
    let home = porteiro_models::fetch::home_dir();
    // Capped to AVX2, we compare against the peer built for AVX2 (PORTEIRO_LLAMA_ISA=avx2).
    let avx2 = std::env::var("PORTEIRO_ISA").is_ok_and(|v| v == "avx2");
    let (dir, how) = if avx2 {
        (
            "llama.cpp-0.3.36-avx2",
            "PORTEIRO_LLAMA_ISA=avx2 scripts/build-llama-cpp.sh",
        )
    } else {
        ("llama.cpp-0.3.36", "scripts/build-llama-cpp.sh")
    };
    let p = home.join(dir).join("bin/llama-bench");
    if p.exists() {
        Ok(p)
    } else {
        bail!(
            "llama-bench not found at {}; build it with {how} or set PORTEIRO_LLAMA_BENCH",
            p.display()
        )
    }
}

/// One llama-bench run: (pp tok/s, tg tok/s).
/// Why a peer process failed: its exit status (a signal named, SIGILL explained) and the end of its
/// stderr, so a reference built for another CPU is not a silent "failed:".
fn peer_failure(what: &str, status: std::process::ExitStatus, stderr: &str) -> String {
    #[cfg(unix)]
    let how = {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(c), _) => format!("exit status {c}"),
            (None, Some(4)) => "killed by SIGILL: it uses an instruction this CPU lacks; rebuild it here with scripts/build-llama-cpp.sh".to_string(),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            (None, None) => status.to_string(),
        }
    };
    #[cfg(not(unix))]
    let how = status.to_string();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(12)..].join("\n");
    if tail.is_empty() {
        format!("{what} failed ({how}), nothing on stderr")
    } else {
        format!("{what} failed ({how}); its stderr ends with:\n{tail}")
    }
}

fn llama_bench(bin: &Path, model: &Path, p: usize, n: usize, threads: usize) -> Result<(f64, f64)> {
    let lib = bin
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("lib"))
        .unwrap_or_default();
    let out = Command::new(bin)
        .args([
            "-m",
            &model.display().to_string(),
            "-t",
            &threads.to_string(),
            "-r",
            "1",
            "-o",
            "json",
        ])
        .args(["-p", &p.to_string(), "-n", &n.to_string()])
        .env("LD_LIBRARY_PATH", lib)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{}",
            peer_failure(
                "llama-bench",
                out.status,
                &String::from_utf8_lossy(&out.stderr)
            )
        );
    }
    let rows: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).context("parsing llama-bench JSON")?;
    let (mut pp, mut tg) = (0.0, 0.0);
    for r in rows {
        let ts = r["avg_ts"].as_f64().unwrap_or(0.0);
        if r["n_gen"].as_u64() == Some(0) {
            pp = ts;
        } else {
            tg = ts;
        }
    }
    Ok((pp, tg))
}

pub fn run(a: &BenchArgs) -> Result<()> {
    let path = crate::model_path(&a.m.model)?;
    let t = Instant::now();
    let lm = a.m.load()?;
    let load_ms = t.elapsed().as_secs_f64() * 1e3;
    let threads = lm.model.threads();
    let peer = match a.compare.as_deref() {
        None => None,
        Some("llama.cpp") | Some("llama-cpp") => Some(llama_bench_path()?),
        Some(other) => bail!("--compare {other}: only `llama.cpp` is supported"),
    };
    // Warm-up (as llama-bench does: a short run) pages the weights in; buffers persist across reps.
    let mut bufs = Bufs {
        s: Scratch::default(),
        kv_p: lm.model.new_cache(a.prompt.max(1)),
        kv_n: lm.model.new_cache(a.gen.max(1)),
    };
    one_rep(&lm, &mut bufs, a.prompt.min(32), a.gen.min(4), 99)?;
    let (mut pps, mut tgs, mut ttfts, mut peer_pp, mut peer_tg) =
        (vec![], vec![], vec![], vec![], vec![]);
    for rep in 0..a.reps.max(1) {
        let (pp, tg) = one_rep(&lm, &mut bufs, a.prompt, a.gen, rep)?;
        if a.prompt > 0 {
            pps.push(a.prompt as f64 / pp);
            ttfts.push(pp * 1e3);
        }
        if a.gen > 0 {
            tgs.push(a.gen as f64 / tg);
        }
        if let Some(bin) = &peer {
            let (p, g) = llama_bench(bin, &path, a.prompt, a.gen, threads)?;
            peer_pp.push(p);
            peer_tg.push(g);
        }
        if !a.json {
            eprint!("\rrep {}/{}", rep + 1, a.reps.max(1));
        }
    }
    if !a.json {
        eprintln!();
    }
    let ours = Figures {
        prefill_tok_s: median(&mut pps),
        decode_tok_s: median(&mut tgs),
        ttft_ms: median(&mut ttfts),
        load_ms,
        peak_rss_bytes: crate::peak_rss_bytes(),
    };
    let batched: Vec<(usize, f64)> = a
        .batch
        .iter()
        .map(|&b| Ok((b, batched_decode(&lm, b, a.gen.clamp(16, 64))?)))
        .collect::<Result<_>>()?;
    let bytes_tok = lm.model.bytes_per_token();
    let bandwidth = a.ceiling.then(|| read_bandwidth(threads));
    if a.json {
        let mut v = serde_json::to_value(&ours)?;
        v["model"] = a.m.model.clone().into();
        v["threads"] = threads.into();
        v["n_prompt"] = a.prompt.into();
        v["n_gen"] = a.gen.into();
        v["weight_bytes_per_token"] = bytes_tok.into();
        if let Some(bw) = bandwidth {
            v["read_bandwidth_bytes_s"] = bw.into();
            v["decode_ceiling_tok_s"] = (bw / bytes_tok as f64).into();
            v["decode_of_ceiling"] = (ours.decode_tok_s * bytes_tok as f64 / bw).into();
        }
        v["batched_decode_tok_s"] = batched
            .iter()
            .map(|(b, t)| serde_json::json!({"sequences": b, "tok_s": t}))
            .collect();
        if peer.is_some() {
            let (p, g) = (median(&mut peer_pp), median(&mut peer_tg));
            v["llama_cpp"] = serde_json::json!({"prefill_tok_s": p, "decode_tok_s": g});
            v["ratio"] = serde_json::json!({"prefill": ours.prefill_tok_s / p, "decode": ours.decode_tok_s / g});
        }
        println!("{}", serde_json::to_string(&v)?);
        return Ok(());
    }
    println!(
        "model {}  threads {threads}  weights read per token {:.1} MB",
        a.m.model,
        bytes_tok as f64 / 1e6
    );
    if peer.is_some() {
        let (p, g) = (median(&mut peer_pp), median(&mut peer_tg));
        println!(
            "{:<18} {:>12} {:>12} {:>8}",
            "test", "porteiro", "llama.cpp", "ratio"
        );
        // A skipped test (-p 0 or -n 0) gets no row.
        let rows = [
            (a.prompt, "pp", ours.prefill_tok_s, p),
            (a.gen, "tg", ours.decode_tok_s, g),
        ];
        for (count, tag, o, peer) in rows {
            if count > 0 {
                println!(
                    "{:<18} {:>12.1} {:>12.1} {:>7.2}x",
                    format!("{tag}{count} tok/s"),
                    o,
                    peer,
                    o / peer
                );
            }
        }
    } else {
        if a.prompt > 0 {
            println!(
                "prefill (pp{})   {:>10.1} tok/s",
                a.prompt, ours.prefill_tok_s
            );
        }
        if a.gen > 0 {
            println!("decode  (tg{})   {:>10.1} tok/s", a.gen, ours.decode_tok_s);
        }
    }
    println!("time to first token {:>8.1} ms", ours.ttft_ms);
    println!("load                {:>8.1} ms", ours.load_ms);
    println!(
        "peak RSS            {:>8.1} MB",
        ours.peak_rss_bytes as f64 / 1e6
    );
    if let Some(bw) = bandwidth {
        let ceiling = bw / bytes_tok as f64;
        println!(
            "read bandwidth      {:>8.1} GB/s ({threads} threads): decode ceiling {ceiling:.1} tok/s, achieved {:.0}%",
            bw / 1e9,
            100.0 * ours.decode_tok_s / ceiling
        );
    }
    for (b, t) in batched {
        println!("batched decode x{b:<3} {t:>8.1} tok/s aggregate");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn a_failing_peer_says_how_it_failed() {
        use std::os::unix::process::ExitStatusExt;
        let ill = peer_failure("llama-bench", std::process::ExitStatus::from_raw(4), "");
        assert!(
            ill.contains("SIGILL") && ill.contains("nothing on stderr"),
            "{ill}"
        );
        let code = peer_failure(
            "llama-bench",
            std::process::ExitStatus::from_raw(1 << 8),
            "loading\nerror: model not found\n",
        );
        assert!(
            code.contains("exit status 1") && code.ends_with("loading\nerror: model not found"),
            "{code}"
        );
    }
}
