//! AdamW (decoupled weight decay, bias-corrected moments, as `torch.optim.AdamW`), the learning-rate
//! schedule (linear warm-up, then cosine decay to zero) and global-norm gradient clipping (as
//! `torch.nn.utils.clip_grad_norm_`).

use crate::net::Lora;

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamW {
    fn default() -> Self {
        Self {
            lr: 2e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// The optimizer's moments, shaped like the parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Moments {
    pub m: Lora<f32>,
    pub v: Lora<f32>,
    /// Updates done so far.
    pub t: u64,
}

impl Moments {
    pub fn new(params: &Lora<f32>) -> Self {
        Self {
            m: params.zeros_like(),
            v: params.zeros_like(),
            t: 0,
        }
    }
}

impl AdamW {
    /// One update of `params` from `grads` at learning rate `lr`.
    pub fn step(&self, params: &mut Lora<f32>, grads: &Lora<f32>, st: &mut Moments, lr: f32) {
        st.t += 1;
        let t = st.t as i32;
        let bc1 = 1.0 - (self.beta1 as f64).powi(t);
        let bc2 = 1.0 - (self.beta2 as f64).powi(t);
        let grads = grads.tensors();
        let ms = st.m.tensors_mut();
        let vs = st.v.tensors_mut();
        for (((p, g), m), v) in params.tensors_mut().into_iter().zip(&grads).zip(ms).zip(vs) {
            for i in 0..p.len() {
                let gi = g.2[i] as f64;
                p[i] -= lr * self.weight_decay * p[i];
                m[i] = self.beta1 * m[i] + (1.0 - self.beta1) * gi as f32;
                v[i] = self.beta2 * v[i] + (1.0 - self.beta2) * (gi * gi) as f32;
                let mh = m[i] as f64 / bc1;
                let vh = v[i] as f64 / bc2;
                p[i] -= (lr as f64 * mh / (vh.sqrt() + self.eps as f64)) as f32;
            }
        }
    }
}

/// The learning rate of update `step` (1-based) of `total`: linear warm-up over `warmup` updates,
/// then cosine decay to zero at `total`.
pub fn lr_at(base: f32, step: usize, warmup: usize, total: usize) -> f32 {
    if step <= warmup {
        return base * step as f32 / warmup.max(1) as f32;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let done = ((step - warmup) as f64 / span).min(1.0);
    (base as f64 * 0.5 * (1.0 + (std::f64::consts::PI * done).cos())) as f32
}

/// The gradient's global L2 norm; scales it down to `max` when above (torch's 1e-6 guard included).
pub fn clip(grads: &mut Lora<f32>, max: Option<f32>) -> f32 {
    let norm = grads
        .tensors()
        .iter()
        .flat_map(|t| t.2.iter())
        .map(|&g| (g as f64) * (g as f64))
        .sum::<f64>()
        .sqrt();
    if let Some(max) = max {
        let coef = max as f64 / (norm + 1e-6);
        if coef < 1.0 {
            for t in grads.tensors_mut() {
                t.iter_mut().for_each(|g| *g = (*g as f64 * coef) as f32);
            }
        }
    }
    norm as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::Pair;

    fn one(a: Vec<f32>) -> Lora<f32> {
        let mut s: [Option<Pair<f32>>; 7] = Default::default();
        s[0] = Some(Pair { a, b: vec![0.0] });
        Lora {
            rank: 1,
            alpha: 1.0,
            slots: vec![s],
        }
    }

    #[test]
    fn adamw_first_step_moves_each_weight_by_lr_against_its_gradient_sign() {
        // With bias correction, step 1 is lr · g/(|g| + eps) — minus decay.
        let mut p = one(vec![1.0, -2.0]);
        let g = one(vec![0.5, -3.0]);
        let opt = AdamW {
            weight_decay: 0.1,
            ..AdamW::default()
        };
        let mut st = Moments::new(&p);
        opt.step(&mut p, &g, &mut st, 0.01);
        let a = &p.slots[0][0]
            .as_ref()
            .map(|x| x.a.clone())
            .unwrap_or_default();
        assert!((a[0] - (1.0 - 0.01 * 0.1 - 0.01)).abs() < 1e-6);
        assert!((a[1] - (-2.0 + 0.01 * 0.1 * 2.0 + 0.01)).abs() < 1e-6);
    }

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        assert_eq!(lr_at(1.0, 1, 4, 20), 0.25);
        assert_eq!(lr_at(1.0, 4, 4, 20), 1.0);
        assert!((lr_at(1.0, 12, 4, 20) - 0.5).abs() < 1e-6);
        assert!(lr_at(1.0, 20, 4, 20).abs() < 1e-6);
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let mut g = one(vec![3.0, 4.0]);
        assert_eq!(clip(&mut g, Some(1.0)), 5.0);
        let a = g.slots[0][0]
            .as_ref()
            .map(|x| x.a.clone())
            .unwrap_or_default();
        assert!((a[0] - 0.6).abs() < 1e-5 && (a[1] - 0.8).abs() < 1e-5);
    }
}
