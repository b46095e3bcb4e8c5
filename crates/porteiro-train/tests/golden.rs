//! Training against PyTorch: replays the golden runs of scripts/golden_lora_train.py (each step's
//! token sequences and learning rate, as `porteiro lora train` planned them) on the real quantized
//! models and compares with the losses PyTorch computed for the same steps over the same weights
//! (dequantized by the `gguf` package, torch.optim.AdamW, clip_grad_norm_): the first loss and
//! gradient norm within 1e-3 relative, every loss within 1%.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::collections::BTreeMap;
use std::sync::Arc;

use porteiro_engine::lora::Proj;
use porteiro_models::gguf::GgufFile;
use porteiro_train::base::Base;
use porteiro_train::net::{Lora, Net, Seq};
use porteiro_train::optim::{clip, AdamW, Moments};

#[derive(serde::Deserialize)]
struct Golden {
    args: Vec<String>,
    rank: usize,
    alpha: f32,
    steps: Vec<Step>,
}

#[derive(serde::Deserialize)]
struct Step {
    lr: f32,
    loss_torch: f64,
    grad_norm_torch: f64,
    sequences: Vec<GSeq>,
}

#[derive(serde::Deserialize)]
struct GSeq {
    tokens: Vec<u32>,
    mask: String,
}

fn arg(g: &Golden, name: &str) -> f32 {
    let i = g.args.iter().position(|a| a == name).unwrap();
    g.args[i + 1].parse().unwrap()
}

#[test]
fn training_matches_pytorch() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/train.json"
    ))
    .unwrap();
    let golden: BTreeMap<String, Golden> = serde_json::from_str(&text).unwrap();
    assert!(
        golden.len() >= 3,
        "golden runs of all three architectures expected"
    );
    for (alias, g) in &golden {
        let path = match porteiro_models::fetch::resolve_model(alias, false) {
            Ok(p) => p,
            Err(e) => {
                assert!(
                    std::env::var("PORTEIRO_REQUIRE_MODELS").is_err(),
                    "{alias} not cached: {e}"
                );
                continue;
            }
        };
        let base = Base::from_gguf(Arc::new(GgufFile::open(path).unwrap())).unwrap();
        let net = Net {
            base: &base,
            threads: 2,
        };
        let mut params: Lora<f32> = Lora::init(
            &base.cfg,
            g.rank,
            g.alpha,
            &Proj::ALL,
            arg(g, "--seed") as u64,
            arg(g, "--init-b"),
        );
        let mut moments = Moments::new(&params);
        let mut grads = params.zeros_like();
        let opt = AdamW::default();
        let mut worst = 0f64;
        for (i, st) in g.steps.iter().enumerate() {
            let seqs: Vec<Seq> = st
                .sequences
                .iter()
                .map(|s| Seq {
                    tokens: s.tokens.clone(),
                    mask: s.mask.bytes().map(|b| b == b'1').collect(),
                })
                .collect();
            let refs: Vec<&Seq> = seqs.iter().collect();
            let targets: usize = seqs.iter().map(Seq::targets).sum();
            grads.fill_zero();
            let p = net
                .pass(&params, &refs, Some((&mut grads, 1.0 / targets as f32)))
                .unwrap();
            let loss = p.loss_sum / targets as f64;
            let rel = (loss - st.loss_torch).abs() / st.loss_torch;
            let norm = clip(&mut grads, Some(arg(g, "--clip"))) as f64;
            if i == 0 {
                assert!(
                    rel < 1e-3,
                    "{alias} step 1: loss {loss} vs PyTorch {}",
                    st.loss_torch
                );
                let grel = (norm - st.grad_norm_torch).abs() / st.grad_norm_torch;
                assert!(
                    grel < 1e-3,
                    "{alias} step 1: gradient norm {norm} vs PyTorch {}",
                    st.grad_norm_torch
                );
            }
            assert!(
                rel < 1e-2,
                "{alias} step {}: loss {loss} vs PyTorch {}",
                i + 1,
                st.loss_torch
            );
            worst = worst.max(rel);
            opt.step(&mut params, &grads, &mut moments, st.lr);
        }
        eprintln!(
            "{alias}: {} steps, worst loss difference to PyTorch {worst:.2e}",
            g.steps.len()
        );
    }
}
