//! Analytic LoRA gradients against central finite differences, in f64, on tiny random models of each
//! architecture (every optional part present: qwen2's biases; gemma3's q/k norms, sandwich norms,
//! GELU, scaled embeddings and a sliding window shorter than the sequences).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use porteiro_engine::lora::Proj;
use porteiro_engine::model::Arch;
use porteiro_train::base::Base;
use porteiro_train::net::{Lora, Net, Seq};

fn seqs(vocab: u32) -> Vec<Seq> {
    let mut rng = porteiro_engine::sampler::Rng::new(7);
    [7usize, 5]
        .iter()
        .map(|&t| {
            let tokens = (0..t)
                .map(|_| (rng.next_u64() % vocab as u64) as u32)
                .collect();
            let mask = (0..t).map(|i| i >= 2).collect();
            Seq { tokens, mask }
        })
        .collect()
}

fn mean_loss(net: &Net, lora: &Lora<f64>, s: &[&Seq]) -> f64 {
    let p = net.pass(lora, s, None).unwrap();
    p.loss_sum / p.targets as f64
}

fn check(arch: Arch) {
    let base = Base::tiny(arch, 11);
    for threads in [1, 2] {
        let net = Net {
            base: &base,
            threads,
        };
        let lora: Lora<f64> = Lora::init(&base.cfg, 2, 4.0, &Proj::ALL, 3, 0.2);
        let data = seqs(base.cfg.vocab as u32);
        let s: Vec<&Seq> = data.iter().collect();
        let targets: usize = data.iter().map(Seq::targets).sum();
        let mut grads = lora.zeros_like();
        // Two micro-batches accumulate into the gradient of the mean over both.
        let w = 1.0 / targets as f64;
        net.pass(&lora, &s[..1], Some((&mut grads, w))).unwrap();
        net.pass(&lora, &s[1..], Some((&mut grads, w))).unwrap();
        let names: Vec<String> = grads.tensors().iter().map(|t| t.0.clone()).collect();
        let analytic: Vec<Vec<f64>> = grads.tensors().iter().map(|t| t.2.to_vec()).collect();
        let h = 1e-5;
        let mut worst = 0f64;
        for (ti, an) in analytic.iter().enumerate() {
            let mut fd = vec![0.0; an.len()];
            for (j, fd) in fd.iter_mut().enumerate() {
                let mut plus = lora.clone();
                plus.tensors_mut()[ti][j] += h;
                let mut minus = lora.clone();
                minus.tensors_mut()[ti][j] -= h;
                *fd = (mean_loss(&net, &plus, &s) - mean_loss(&net, &minus, &s)) / (2.0 * h);
            }
            let diff: f64 = an
                .iter()
                .zip(&fd)
                .map(|(a, f)| (a - f).powi(2))
                .sum::<f64>()
                .sqrt();
            let norm: f64 = fd.iter().map(|f| f * f).sum::<f64>().sqrt();
            assert!(
                norm > 1e-6,
                "{arch:?} {}: zero gradient, the check would be vacuous",
                names[ti]
            );
            let rel = diff / norm;
            worst = worst.max(rel);
            assert!(
                rel < 1e-6,
                "{arch:?} threads={threads} {}: relative error {rel:e}",
                names[ti]
            );
        }
        println!(
            "{arch:?} threads={threads}: {} tensors, worst relative error {worst:.2e}",
            analytic.len()
        );
    }
}

#[test]
fn llama_gradients_match_finite_differences() {
    check(Arch::Llama);
}

#[test]
fn qwen2_gradients_match_finite_differences() {
    check(Arch::Qwen2);
}

#[test]
fn gemma3_gradients_match_finite_differences() {
    check(Arch::Gemma3);
}
