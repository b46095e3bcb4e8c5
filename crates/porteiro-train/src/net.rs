//! The training forward and backward passes of the three decoder families (llama, qwen2, gemma3),
//! written once like the engine's inference pass, in plain `R` arithmetic (f32 to train, f64 for the
//! gradient checks). Only the LoRA matrices get gradients: the base is frozen, so its weights are
//! only multiplied, forward (x·Wᵀ) and backward (dy·W), dequantized tile by tile. Logits are computed
//! only at the positions that have a target, and over vocabulary tiles with a streaming
//! log-sum-exp, so no `tokens x vocab` matrix is ever held.

use std::ops::Range;

use porteiro_engine::lora::Proj;
use porteiro_engine::model::Config;

use crate::base::{Base, Block};
use crate::real::{gemm, par_gemm, par_map, part, rm, tr, Real, View};
use crate::TrainError;

/// One adapted matrix: A is `rank x in`, B is `out x rank`, row-major (llama.cpp's `lora_a` /
/// `lora_b` as stored).
#[derive(Debug, Clone, PartialEq)]
pub struct Pair<R> {
    pub a: Vec<R>,
    pub b: Vec<R>,
}

/// The trainable parameters (or their gradients, or optimizer moments: the same shape).
#[derive(Debug, Clone, PartialEq)]
pub struct Lora<R> {
    pub rank: usize,
    pub alpha: f32,
    /// Per layer, per projection (in [`Proj::ALL`] order).
    pub slots: Vec<[Option<Pair<R>>; 7]>,
}

impl<R: Real> Lora<R> {
    /// PEFT's initialisation: A uniform in ±1/√in (Kaiming-uniform with a = √5), B = 0 (the adapter
    /// starts as the identity). `b_amp` > 0 draws B uniform in ±b_amp instead (gradient checks: with
    /// B = 0 the first step's A gradients are zero).
    pub fn init(
        cfg: &Config,
        rank: usize,
        alpha: f32,
        projs: &[Proj],
        seed: u64,
        b_amp: f32,
    ) -> Self {
        let mut rng = porteiro_engine::sampler::Rng::new(seed);
        let mut uniform = |n: usize, amp: f32| -> Vec<R> {
            (0..n)
                .map(|_| R::of((rng.f64() as f32 * 2.0 - 1.0) * amp))
                .collect()
        };
        let slots = (0..cfg.n_layer)
            .map(|_| {
                let mut s: [Option<Pair<R>>; 7] = Default::default();
                for &p in projs {
                    let (k, n) = p.dims(cfg);
                    let a = uniform(rank * k, 1.0 / (k as f32).sqrt());
                    let b = if b_amp > 0.0 {
                        uniform(n * rank, b_amp)
                    } else {
                        vec![R::zero(); n * rank]
                    };
                    s[p.index()] = Some(Pair { a, b });
                }
                s
            })
            .collect();
        Self { rank, alpha, slots }
    }

    /// Zeros of the same shape.
    pub fn zeros_like(&self) -> Self {
        let slots = self
            .slots
            .iter()
            .map(|s| {
                s.clone().map(|p| {
                    p.map(|p| Pair {
                        a: vec![R::zero(); p.a.len()],
                        b: vec![R::zero(); p.b.len()],
                    })
                })
            })
            .collect();
        Self {
            rank: self.rank,
            alpha: self.alpha,
            slots,
        }
    }

    /// The multiplier of B·A·x (`alpha / rank`, as llama.cpp applies it at scale 1).
    pub fn scale(&self) -> R {
        R::of(self.alpha / self.rank as f32)
    }

    pub fn pair(&self, l: usize, p: Proj) -> Option<&Pair<R>> {
        self.slots.get(l).and_then(|s| s[p.index()].as_ref())
    }

    /// Every tensor with its GGUF name (`blk.N.<stem>.weight.lora_a` / `.lora_b`) and ggml dims.
    pub fn tensors(&self) -> Vec<(String, Vec<u64>, &[R])> {
        let mut out = Vec::new();
        for (l, s) in self.slots.iter().enumerate() {
            for p in Proj::ALL {
                if let Some(pair) = &s[p.index()] {
                    let base = format!("blk.{l}.{}.weight", p.stem());
                    let (k, n) = (pair.a.len() / self.rank, pair.b.len() / self.rank);
                    out.push((
                        format!("{base}.lora_a"),
                        vec![k as u64, self.rank as u64],
                        &pair.a[..],
                    ));
                    out.push((
                        format!("{base}.lora_b"),
                        vec![self.rank as u64, n as u64],
                        &pair.b[..],
                    ));
                }
            }
        }
        out
    }

    /// Every tensor, mutably, in the order of [`Lora::tensors`].
    pub fn tensors_mut(&mut self) -> Vec<&mut Vec<R>> {
        let mut out = Vec::new();
        for s in self.slots.iter_mut() {
            for pair in s.iter_mut().flatten() {
                out.push(&mut pair.a);
                out.push(&mut pair.b);
            }
        }
        out
    }

    pub fn fill_zero(&mut self) {
        for t in self.tensors_mut() {
            t.fill(R::zero());
        }
    }

    pub fn n_params(&self) -> usize {
        self.tensors().iter().map(|t| t.2.len()).sum()
    }
}

/// One training sequence: tokens, and which of them are targets (predicted from the tokens before).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Seq {
    pub tokens: Vec<u32>,
    pub mask: Vec<bool>,
}

impl Seq {
    pub fn targets(&self) -> usize {
        self.mask.iter().skip(1).filter(|&&m| m).count()
    }
}

/// What a pass over a micro-batch measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pass {
    /// Sum of the targets' cross-entropy (nats).
    pub loss_sum: f64,
    pub targets: usize,
    pub tokens: usize,
}

struct Rows {
    pos: Vec<usize>,
    seqs: Vec<Range<usize>>,
}

fn rms_fwd<R: Real>(x: &[R], w: &[f32], dim: usize, eps: f32) -> (Vec<R>, Vec<R>) {
    let n = x.len() / dim;
    let mut y = vec![R::zero(); x.len()];
    let mut rinv = vec![R::zero(); n];
    for i in 0..n {
        let xi = &x[i * dim..(i + 1) * dim];
        let ms = xi.iter().map(|&v| v * v).sum::<R>() / R::of(dim as f32);
        let r = (ms + R::of(eps)).sqrt().recip();
        rinv[i] = r;
        for ((o, &v), &g) in y[i * dim..(i + 1) * dim].iter_mut().zip(xi).zip(w) {
            *o = v * r * R::of(g);
        }
    }
    (y, rinv)
}

/// dx of y = x·r·w with r = 1/√(mean(x²)+eps): r·(dy·w) − x·r³·mean((dy·w)·x).
fn rms_bwd<R: Real>(x: &[R], rinv: &[R], w: &[f32], dy: &[R], dim: usize) -> Vec<R> {
    let mut dx = vec![R::zero(); x.len()];
    for (i, &r) in rinv.iter().enumerate() {
        let (xi, di) = (&x[i * dim..(i + 1) * dim], &dy[i * dim..(i + 1) * dim]);
        let dot = xi
            .iter()
            .zip(di)
            .zip(w)
            .map(|((&x, &d), &g)| x * d * R::of(g))
            .sum::<R>()
            / R::of(dim as f32);
        let r3 = r * r * r;
        for (((o, &x), &d), &g) in dx[i * dim..(i + 1) * dim].iter_mut().zip(xi).zip(di).zip(w) {
            *o = r * d * R::of(g) - x * r3 * dot;
        }
    }
    dx
}

/// Rotates every head of every row by its position (`sign` -1: the inverse rotation, for gradients).
/// Angles are computed once per position (in f64), not per row and head.
fn rope<R: Real>(x: &mut [R], pos: &[usize], hd: usize, base: f32, neox: bool, sign: f64) {
    let width = x.len() / pos.len().max(1);
    let half = hd / 2;
    let freqs: Vec<f64> = (0..half)
        .map(|i| (base as f64).powf(-2.0 * i as f64 / hd as f64))
        .collect();
    let max = pos.iter().copied().max().unwrap_or(0);
    let table: Vec<(R, R)> = (0..=max)
        .flat_map(|p| {
            freqs.iter().map(move |f| {
                let (s, c) = (p as f64 * f * sign).sin_cos();
                (R::of64(s), R::of64(c))
            })
        })
        .collect();
    for (row, &p) in x.chunks_exact_mut(width).zip(pos) {
        let angles = &table[p * half..(p + 1) * half];
        for h in row.chunks_exact_mut(hd) {
            for (i, &(s, c)) in angles.iter().enumerate() {
                let (a, b) = if neox {
                    (i, i + half)
                } else {
                    (2 * i, 2 * i + 1)
                };
                let (x0, x1) = (h[a], h[b]);
                h[a] = x0 * c - x1 * s;
                h[b] = x0 * s + x1 * c;
            }
        }
    }
}

/// `f` over `threads` contiguous ranges of 0..n, results concatenated in order.
fn par_chunks<T: Send>(
    threads: usize,
    n: usize,
    f: impl Fn(Range<usize>) -> Vec<T> + Sync,
) -> Vec<T> {
    let parts = threads.clamp(1, n.max(1));
    par_map(parts, parts, |p| f(part(n, p, parts)))
        .into_iter()
        .flatten()
        .collect()
}

fn silu_and_grad<R: Real>(x: R) -> (R, R) {
    let s = (R::one() + (-x).exp()).recip();
    (x * s, s * (R::one() + x * (R::one() - s)))
}

fn gelu_and_grad<R: Real>(x: R) -> (R, R) {
    let c = R::of(0.797_884_6);
    let k = R::of(0.044715);
    let half = R::of(0.5);
    let u = c * (x + k * x * x * x);
    let t = u.tanh();
    let y = half * x * (R::one() + t);
    let du = c * (R::one() + R::of(3.0) * k * x * x);
    (
        y,
        half * (R::one() + t) + half * x * (R::one() - t * t) * du,
    )
}

/// What the backward pass of one block needs from its forward pass.
struct Acts<R> {
    x_in: Vec<R>,
    r1: Vec<R>,
    xn1: Vec<R>,
    /// input · Aᵀ of each adapted projection.
    ha: [Option<Vec<R>>; 7],
    q_lin: Vec<R>,
    q_r: Option<Vec<R>>,
    k_lin: Vec<R>,
    k_r: Option<Vec<R>>,
    q: Vec<R>,
    k: Vec<R>,
    v: Vec<R>,
    att: Vec<R>,
    o_lin: Vec<R>,
    r_o: Option<Vec<R>>,
    x1: Vec<R>,
    r2: Vec<R>,
    xn2: Vec<R>,
    g: Vec<R>,
    u: Vec<R>,
    h: Vec<R>,
    d_lin: Vec<R>,
    r_d: Option<Vec<R>>,
}

/// The trainable model: a frozen base plus the threads to run on.
pub struct Net<'a> {
    pub base: &'a Base,
    pub threads: usize,
}

impl Net<'_> {
    fn cfg(&self) -> &Config {
        &self.base.cfg
    }

    /// y = x·Wᵀ (+ bias) + s·(x·Aᵀ)·Bᵀ; returns y and x·Aᵀ.
    fn proj<R: Real>(
        &self,
        blk: &Block,
        lora: &Lora<R>,
        l: usize,
        p: Proj,
        x: &[R],
        n: usize,
    ) -> (Vec<R>, Option<Vec<R>>) {
        let w = blk.mat(p);
        let mut y = w.forward(x, n, self.threads);
        let bias = match p {
            Proj::Q => blk.bq.as_ref(),
            Proj::K => blk.bk.as_ref(),
            Proj::V => blk.bv.as_ref(),
            _ => None,
        };
        if let Some(b) = bias {
            for row in y.chunks_exact_mut(w.rows) {
                row.iter_mut().zip(b).for_each(|(v, &b)| *v += R::of(b));
            }
        }
        let ha = lora.pair(l, p).map(|pair| {
            let r = lora.rank;
            let mut ha = vec![R::zero(); n * r];
            par_gemm(
                self.threads,
                n,
                w.cols,
                r,
                R::one(),
                rm(x, w.cols),
                tr(&pair.a, w.cols),
                R::zero(),
                &mut ha,
                r,
            );
            par_gemm(
                self.threads,
                n,
                r,
                w.rows,
                lora.scale(),
                rm(&ha, r),
                tr(&pair.b, r),
                R::one(),
                &mut y,
                w.rows,
            );
            ha
        });
        (y, ha)
    }

    /// dx += dy·W + s·(dy·B)·A; dB += s·dyᵀ·ha; dA += s·(dy·B)ᵀ·x.
    #[allow(clippy::too_many_arguments)]
    fn proj_bwd<R: Real>(
        &self,
        blk: &Block,
        lora: &Lora<R>,
        grads: &mut Lora<R>,
        l: usize,
        p: Proj,
        x: &[R],
        ha: Option<&Vec<R>>,
        dy: &[R],
        n: usize,
        dx: &mut [R],
    ) {
        let w = blk.mat(p);
        w.backward(dy, n, dx, self.threads);
        let (Some(pair), Some(ha)) = (lora.pair(l, p), ha) else {
            return;
        };
        let (r, s) = (lora.rank, lora.scale());
        let Some(g) = grads.slots[l][p.index()].as_mut() else {
            return;
        };
        par_gemm(
            self.threads,
            w.rows,
            n,
            r,
            s,
            tr(dy, w.rows),
            rm(ha, r),
            R::one(),
            &mut g.b,
            r,
        );
        let mut dha = vec![R::zero(); n * r];
        par_gemm(
            self.threads,
            n,
            w.rows,
            r,
            s,
            rm(dy, w.rows),
            rm(&pair.b, r),
            R::zero(),
            &mut dha,
            r,
        );
        par_gemm(
            self.threads,
            r,
            n,
            w.cols,
            R::one(),
            tr(&dha, r),
            rm(x, w.cols),
            R::one(),
            &mut g.a,
            w.cols,
        );
        par_gemm(
            self.threads,
            n,
            r,
            w.cols,
            R::one(),
            rm(&dha, r),
            rm(&pair.a, w.cols),
            R::one(),
            dx,
            w.cols,
        );
    }

    /// Attention probabilities of head `h` over sequence rows `rows` (T x T, zero where masked).
    fn probs<R: Real>(&self, l: usize, q: &[R], k: &[R], rows: &Range<usize>, h: usize) -> Vec<R> {
        let c = self.cfg();
        let (qd, kvd, hd) = (c.q_dim(), c.kv_dim(), c.head_dim);
        let kh = h / (c.n_head / c.n_head_kv);
        let t = rows.len();
        let mut p = vec![R::zero(); t * t];
        let qv = View {
            data: &q[rows.start * qd + h * hd..],
            rs: qd,
            cs: 1,
        };
        let kt = View {
            data: &k[rows.start * kvd + kh * hd..],
            rs: 1,
            cs: kvd,
        };
        gemm(t, hd, t, R::of(c.kq_scale), qv, kt, R::zero(), &mut p, t);
        let window = c.is_swa(l);
        for i in 0..t {
            let lo = window.map_or(0, |w| (i + 1).saturating_sub(w));
            let row = &mut p[i * t..(i + 1) * t];
            let mx = row[lo..=i].iter().fold(R::neg_infinity(), |m, &v| m.max(v));
            let mut sum = R::zero();
            for v in &mut row[lo..=i] {
                *v = (*v - mx).exp();
                sum += *v;
            }
            for (j, v) in row.iter_mut().enumerate() {
                *v = if j >= lo && j <= i {
                    *v / sum
                } else {
                    R::zero()
                };
            }
        }
        p
    }

    fn attention<R: Real>(&self, l: usize, q: &[R], k: &[R], v: &[R], rows: &Rows) -> Vec<R> {
        let c = self.cfg();
        let (qd, kvd, hd, nh) = (c.q_dim(), c.kv_dim(), c.head_dim, c.n_head);
        let group = nh / c.n_head_kv;
        let outs = par_map(self.threads, rows.seqs.len() * nh, |task| {
            let (s, h) = (task / nh, task % nh);
            let r = &rows.seqs[s];
            let t = r.len();
            let p = self.probs(l, q, k, r, h);
            let vv = View {
                data: &v[r.start * kvd + (h / group) * hd..],
                rs: kvd,
                cs: 1,
            };
            let mut o = vec![R::zero(); t * hd];
            gemm(t, t, hd, R::one(), rm(&p, t), vv, R::zero(), &mut o, hd);
            o
        });
        let mut att = vec![R::zero(); q.len()];
        for (task, o) in outs.iter().enumerate() {
            let (s, h) = (task / nh, task % nh);
            for (i, row) in rows.seqs[s].clone().enumerate() {
                att[row * qd + h * hd..row * qd + (h + 1) * hd]
                    .copy_from_slice(&o[i * hd..(i + 1) * hd]);
            }
        }
        att
    }

    /// Gradients of q, k and v from the gradient of the attention output (probabilities recomputed).
    fn attention_bwd<R: Real>(
        &self,
        l: usize,
        a: &Acts<R>,
        datt: &[R],
        rows: &Rows,
    ) -> (Vec<R>, Vec<R>, Vec<R>) {
        let c = self.cfg();
        let (qd, kvd, hd, nkv) = (c.q_dim(), c.kv_dim(), c.head_dim, c.n_head_kv);
        let group = c.n_head / nkv;
        let kq = R::of(c.kq_scale);
        let outs = par_map(self.threads, rows.seqs.len() * nkv, |task| {
            let (s, kh) = (task / nkv, task % nkv);
            let r = &rows.seqs[s];
            let t = r.len();
            let kv_at = r.start * kvd + kh * hd;
            let vt = View {
                data: &a.v[kv_at..],
                rs: 1,
                cs: kvd,
            };
            let kk = View {
                data: &a.k[kv_at..],
                rs: kvd,
                cs: 1,
            };
            let mut dk = vec![R::zero(); t * hd];
            let mut dv = vec![R::zero(); t * hd];
            let mut dqs = Vec::with_capacity(group);
            for h in kh * group..(kh + 1) * group {
                let p = self.probs(l, &a.q, &a.k, r, h);
                let q_at = r.start * qd + h * hd;
                let dout = View {
                    data: &datt[q_at..],
                    rs: qd,
                    cs: 1,
                };
                let mut dp = vec![R::zero(); t * t];
                gemm(t, hd, t, R::one(), dout, vt, R::zero(), &mut dp, t);
                gemm(t, t, hd, R::one(), tr(&p, t), dout, R::one(), &mut dv, hd);
                for i in 0..t {
                    let (pr, dr) = (&p[i * t..(i + 1) * t], &mut dp[i * t..(i + 1) * t]);
                    let dot: R = pr.iter().zip(dr.iter()).map(|(&p, &d)| p * d).sum();
                    for (d, &p) in dr.iter_mut().zip(pr) {
                        *d = p * (*d - dot);
                    }
                }
                let mut dq = vec![R::zero(); t * hd];
                gemm(t, t, hd, kq, rm(&dp, t), kk, R::zero(), &mut dq, hd);
                let qv = View {
                    data: &a.q[q_at..],
                    rs: qd,
                    cs: 1,
                };
                gemm(t, t, hd, kq, tr(&dp, t), qv, R::one(), &mut dk, hd);
                dqs.push(dq);
            }
            (dqs, dk, dv)
        });
        let n = rows.pos.len();
        let (mut dq, mut dk, mut dv) = (
            vec![R::zero(); n * qd],
            vec![R::zero(); n * kvd],
            vec![R::zero(); n * kvd],
        );
        for (task, (dqs, dkh, dvh)) in outs.iter().enumerate() {
            let (s, kh) = (task / nkv, task % nkv);
            for (i, row) in rows.seqs[s].clone().enumerate() {
                for (g, dqh) in dqs.iter().enumerate() {
                    let h = kh * group + g;
                    dq[row * qd + h * hd..row * qd + (h + 1) * hd]
                        .copy_from_slice(&dqh[i * hd..(i + 1) * hd]);
                }
                dk[row * kvd + kh * hd..row * kvd + (kh + 1) * hd]
                    .copy_from_slice(&dkh[i * hd..(i + 1) * hd]);
                dv[row * kvd + kh * hd..row * kvd + (kh + 1) * hd]
                    .copy_from_slice(&dvh[i * hd..(i + 1) * hd]);
            }
        }
        (dq, dk, dv)
    }

    fn rope_base(&self, l: usize) -> f32 {
        let c = self.cfg();
        if c.is_swa(l).is_some() {
            c.rope_base_swa
        } else {
            c.rope_base
        }
    }

    /// q or k after its linear map: per-head norm (gemma3), rotation, scale.
    fn qk_post<R: Real>(
        &self,
        l: usize,
        lin: &[R],
        norm: Option<&Vec<f32>>,
        pos: &[usize],
        scale: f32,
    ) -> (Vec<R>, Option<Vec<R>>) {
        let c = self.cfg();
        let (mut out, r) = match norm {
            Some(w) => {
                let (y, r) = rms_fwd(lin, w, c.head_dim, c.eps);
                (y, Some(r))
            }
            None => (lin.to_vec(), None),
        };
        rope(
            &mut out,
            pos,
            c.head_dim,
            self.rope_base(l),
            c.rope_neox,
            1.0,
        );
        if scale != 1.0 {
            out.iter_mut().for_each(|v| *v *= R::of(scale));
        }
        (out, r)
    }

    #[allow(clippy::too_many_arguments)]
    fn qk_post_bwd<R: Real>(
        &self,
        l: usize,
        mut d: Vec<R>,
        lin: &[R],
        r: Option<&Vec<R>>,
        norm: Option<&Vec<f32>>,
        pos: &[usize],
        scale: f32,
    ) -> Vec<R> {
        let c = self.cfg();
        if scale != 1.0 {
            d.iter_mut().for_each(|v| *v *= R::of(scale));
        }
        rope(
            &mut d,
            pos,
            c.head_dim,
            self.rope_base(l),
            c.rope_neox,
            -1.0,
        );
        match (norm, r) {
            (Some(w), Some(r)) => rms_bwd(lin, r, w, &d, c.head_dim),
            _ => d,
        }
    }

    fn block<R: Real>(
        &self,
        l: usize,
        lora: &Lora<R>,
        x: Vec<R>,
        rows: &Rows,
    ) -> (Vec<R>, Acts<R>) {
        let c = self.cfg();
        let blk = &self.base.blocks[l];
        let (e, n) = (c.n_embd, rows.pos.len());
        let mut ha: [Option<Vec<R>>; 7] = Default::default();
        let (xn1, r1) = rms_fwd(&x, &blk.attn_norm, e, c.eps);
        let (q_lin, h) = self.proj(blk, lora, l, Proj::Q, &xn1, n);
        ha[0] = h;
        let (k_lin, h) = self.proj(blk, lora, l, Proj::K, &xn1, n);
        ha[1] = h;
        let (v, h) = self.proj(blk, lora, l, Proj::V, &xn1, n);
        ha[2] = h;
        let (q, q_r) = self.qk_post(l, &q_lin, blk.q_norm.as_ref(), &rows.pos, c.q_scale);
        let (k, k_r) = self.qk_post(l, &k_lin, blk.k_norm.as_ref(), &rows.pos, 1.0);
        let att = self.attention(l, &q, &k, &v, rows);
        let (o_lin, h) = self.proj(blk, lora, l, Proj::O, &att, n);
        ha[3] = h;
        let (o, r_o) = match &blk.post_attn_norm {
            Some(w) => {
                let (y, r) = rms_fwd(&o_lin, w, e, c.eps);
                (y, Some(r))
            }
            None => (o_lin.clone(), None),
        };
        let x1: Vec<R> = x.iter().zip(&o).map(|(&a, &b)| a + b).collect();
        let (xn2, r2) = rms_fwd(&x1, &blk.ffn_norm, e, c.eps);
        let (g, hg) = self.proj(blk, lora, l, Proj::Gate, &xn2, n);
        let (u, hu) = self.proj(blk, lora, l, Proj::Up, &xn2, n);
        ha[4] = hg;
        ha[5] = hu;
        let act = if c.gelu {
            gelu_and_grad::<R>
        } else {
            silu_and_grad::<R>
        };
        // The activation is the costliest elementwise work (exp per element): split over threads.
        let hmid: Vec<R> = par_chunks(self.threads, g.len(), |r| {
            g[r.clone()]
                .iter()
                .zip(&u[r])
                .map(|(&g, &u)| act(g).0 * u)
                .collect()
        });
        let (d_lin, h) = self.proj(blk, lora, l, Proj::Down, &hmid, n);
        ha[6] = h;
        let (d, r_d) = match &blk.post_ffn_norm {
            Some(w) => {
                let (y, r) = rms_fwd(&d_lin, w, e, c.eps);
                (y, Some(r))
            }
            None => (d_lin.clone(), None),
        };
        let x2: Vec<R> = x1.iter().zip(&d).map(|(&a, &b)| a + b).collect();
        let acts = Acts {
            x_in: x,
            r1,
            xn1,
            ha,
            q_lin,
            q_r,
            k_lin,
            k_r,
            q,
            k,
            v,
            att,
            o_lin,
            r_o,
            x1,
            r2,
            xn2,
            g,
            u,
            h: hmid,
            d_lin,
            r_d,
        };
        (x2, acts)
    }

    fn block_bwd<R: Real>(
        &self,
        l: usize,
        lora: &Lora<R>,
        grads: &mut Lora<R>,
        a: &Acts<R>,
        dx2: Vec<R>,
        rows: &Rows,
    ) -> Vec<R> {
        let c = self.cfg();
        let blk = &self.base.blocks[l];
        let (e, n, ff, qd, kvd) = (c.n_embd, rows.pos.len(), c.n_ff, c.q_dim(), c.kv_dim());
        // Feed-forward.
        let dd = match (&blk.post_ffn_norm, &a.r_d) {
            (Some(w), Some(r)) => rms_bwd(&a.d_lin, r, w, &dx2, e),
            _ => dx2.clone(),
        };
        let mut dh = vec![R::zero(); n * ff];
        self.proj_bwd(
            blk,
            lora,
            grads,
            l,
            Proj::Down,
            &a.h,
            a.ha[6].as_ref(),
            &dd,
            n,
            &mut dh,
        );
        let act = if c.gelu {
            gelu_and_grad::<R>
        } else {
            silu_and_grad::<R>
        };
        let both: Vec<(R, R)> = par_chunks(self.threads, n * ff, |r| {
            r.map(|i| {
                let (y, dy) = act(a.g[i]);
                (dh[i] * a.u[i] * dy, dh[i] * y)
            })
            .collect()
        });
        drop(dh);
        let (dg, du): (Vec<R>, Vec<R>) = both.into_iter().unzip();
        let mut dxn2 = vec![R::zero(); n * e];
        self.proj_bwd(
            blk,
            lora,
            grads,
            l,
            Proj::Gate,
            &a.xn2,
            a.ha[4].as_ref(),
            &dg,
            n,
            &mut dxn2,
        );
        self.proj_bwd(
            blk,
            lora,
            grads,
            l,
            Proj::Up,
            &a.xn2,
            a.ha[5].as_ref(),
            &du,
            n,
            &mut dxn2,
        );
        let mut dx1 = rms_bwd(&a.x1, &a.r2, &blk.ffn_norm, &dxn2, e);
        dx1.iter_mut().zip(&dx2).for_each(|(d, &g)| *d += g);
        // Attention.
        let dout = match (&blk.post_attn_norm, &a.r_o) {
            (Some(w), Some(r)) => rms_bwd(&a.o_lin, r, w, &dx1, e),
            _ => dx1.clone(),
        };
        let mut datt = vec![R::zero(); n * qd];
        self.proj_bwd(
            blk,
            lora,
            grads,
            l,
            Proj::O,
            &a.att,
            a.ha[3].as_ref(),
            &dout,
            n,
            &mut datt,
        );
        let (dq, dk, dv) = self.attention_bwd(l, a, &datt, rows);
        let dq_lin = self.qk_post_bwd(
            l,
            dq,
            &a.q_lin,
            a.q_r.as_ref(),
            blk.q_norm.as_ref(),
            &rows.pos,
            c.q_scale,
        );
        let dk_lin = self.qk_post_bwd(
            l,
            dk,
            &a.k_lin,
            a.k_r.as_ref(),
            blk.k_norm.as_ref(),
            &rows.pos,
            1.0,
        );
        debug_assert_eq!(dk_lin.len(), n * kvd);
        let mut dxn1 = vec![R::zero(); n * e];
        self.proj_bwd(
            blk,
            lora,
            grads,
            l,
            Proj::Q,
            &a.xn1,
            a.ha[0].as_ref(),
            &dq_lin,
            n,
            &mut dxn1,
        );
        self.proj_bwd(
            blk,
            lora,
            grads,
            l,
            Proj::K,
            &a.xn1,
            a.ha[1].as_ref(),
            &dk_lin,
            n,
            &mut dxn1,
        );
        self.proj_bwd(
            blk,
            lora,
            grads,
            l,
            Proj::V,
            &a.xn1,
            a.ha[2].as_ref(),
            &dv,
            n,
            &mut dxn1,
        );
        let mut dx = rms_bwd(&a.x_in, &a.r1, &blk.attn_norm, &dxn1, e);
        dx.iter_mut().zip(&dx1).for_each(|(d, &g)| *d += g);
        dx
    }

    /// Cross-entropy of the targets (`(row, token)`) and, given a weight, its gradient w.r.t. the
    /// final hidden states times that weight. Vocabulary tiles are spread over the threads; a row's
    /// log-sum-exp is merged across tiles as it streams.
    fn head<R: Real>(
        &self,
        x: &[R],
        targets: &[(usize, u32)],
        weight: Option<R>,
    ) -> (f64, Option<Vec<R>>) {
        const VT: usize = 256;
        let c = self.cfg();
        let (e, m, vocab) = (c.n_embd, targets.len(), c.vocab);
        if m == 0 {
            return (0.0, weight.map(|_| vec![R::zero(); x.len()]));
        }
        let mut xt = Vec::with_capacity(m * e);
        for &(row, _) in targets {
            xt.extend_from_slice(&x[row * e..(row + 1) * e]);
        }
        let (xf, rinv) = rms_fwd(&xt, &self.base.output_norm, e, c.eps);
        let out = &self.base.output;
        let tiles = vocab.div_ceil(VT);
        let threads = self.threads.clamp(1, tiles);
        let logits_of = |t: usize, w: &mut Vec<R>| -> (usize, Vec<R>) {
            let (v0, v1) = (t * VT, ((t + 1) * VT).min(vocab));
            out.rows_into(v0, v1, w);
            let mut lg = vec![R::zero(); m * (v1 - v0)];
            gemm(
                m,
                e,
                v1 - v0,
                R::one(),
                rm(&xf, e),
                tr(w, e),
                R::zero(),
                &mut lg,
                v1 - v0,
            );
            (v0, lg)
        };
        // Pass 1: running max and sum of exp per row, and the target's logit.
        let stats = par_map(threads, threads, |p| {
            let mut mx = vec![R::neg_infinity(); m];
            let mut sum = vec![R::zero(); m];
            let mut tgt = vec![None; m];
            let mut w = Vec::new();
            for t in part(tiles, p, threads) {
                let (v0, lg) = logits_of(t, &mut w);
                let width = lg.len() / m;
                for i in 0..m {
                    let row = &lg[i * width..(i + 1) * width];
                    let tm = row.iter().fold(R::neg_infinity(), |a, &b| a.max(b));
                    let nm = mx[i].max(tm);
                    sum[i] = sum[i] * (mx[i] - nm).exp()
                        + row.iter().map(|&v| (v - nm).exp()).sum::<R>();
                    mx[i] = nm;
                    let tok = targets[i].1 as usize;
                    if (v0..v0 + width).contains(&tok) {
                        tgt[i] = Some(row[tok - v0]);
                    }
                }
            }
            (mx, sum, tgt)
        });
        let mut lse = vec![R::zero(); m];
        let mut loss = 0f64;
        for i in 0..m {
            let nm = stats.iter().fold(R::neg_infinity(), |a, s| a.max(s.0[i]));
            let s: R = stats.iter().map(|s| s.1[i] * (s.0[i] - nm).exp()).sum();
            lse[i] = nm + s.ln();
            let t = stats.iter().find_map(|s| s.2[i]).unwrap_or(R::zero());
            loss += (lse[i] - t).f64();
        }
        let Some(wgt) = weight else {
            return (loss, None);
        };
        // Pass 2: dlogits = (softmax − onehot)·weight, dxf = Σ dlogits · W_tile.
        let partials = par_map(threads, threads, |p| {
            let mut acc = vec![R::zero(); m * e];
            let mut w = Vec::new();
            for t in part(tiles, p, threads) {
                let (v0, mut lg) = logits_of(t, &mut w);
                let width = lg.len() / m;
                for i in 0..m {
                    let tok = targets[i].1 as usize;
                    for (j, v) in lg[i * width..(i + 1) * width].iter_mut().enumerate() {
                        let hot = if v0 + j == tok { R::one() } else { R::zero() };
                        *v = ((*v - lse[i]).exp() - hot) * wgt;
                    }
                }
                gemm(
                    m,
                    width,
                    e,
                    R::one(),
                    rm(&lg, width),
                    rm(&w, e),
                    R::one(),
                    &mut acc,
                    e,
                );
            }
            acc
        });
        let mut dxf = vec![R::zero(); m * e];
        for p in partials {
            dxf.iter_mut().zip(p).for_each(|(d, v)| *d += v);
        }
        let dxt = rms_bwd(&xt, &rinv, &self.base.output_norm, &dxf, e);
        let mut dx = vec![R::zero(); x.len()];
        for (i, &(row, _)) in targets.iter().enumerate() {
            dx[row * e..(row + 1) * e].copy_from_slice(&dxt[i * e..(i + 1) * e]);
        }
        (loss, Some(dx))
    }

    /// Loss over a micro-batch of sequences; with `grad`, adds `weight ·` d(loss sum)/d(LoRA) into
    /// the gradient buffers (weight: 1 / the step's target count, so micro-batches accumulate into
    /// the gradient of the step's mean loss).
    pub fn pass<R: Real>(
        &self,
        lora: &Lora<R>,
        seqs: &[&Seq],
        grad: Option<(&mut Lora<R>, R)>,
    ) -> Result<Pass, TrainError> {
        let c = self.cfg();
        let e = c.n_embd;
        let mut rows = Rows {
            pos: Vec::new(),
            seqs: Vec::new(),
        };
        let mut targets = Vec::new();
        for s in seqs {
            let start = rows.pos.len();
            if s.tokens.len() != s.mask.len() {
                return Err(TrainError::Data(
                    "a sequence's mask and tokens differ in length".into(),
                ));
            }
            for (i, &t) in s.tokens.iter().enumerate() {
                if t as usize >= c.vocab {
                    return Err(TrainError::Data(format!(
                        "token {t} is outside the vocabulary ({})",
                        c.vocab
                    )));
                }
                if i > 0 && s.mask[i] {
                    targets.push((start + i - 1, t));
                }
                rows.pos.push(i);
            }
            rows.seqs.push(start..rows.pos.len());
        }
        let n = rows.pos.len();
        let mut x = Vec::with_capacity(n * e);
        let mut row: Vec<R> = Vec::new();
        for s in seqs {
            for &t in &s.tokens {
                self.base
                    .tok_embd
                    .rows_into(t as usize, t as usize + 1, &mut row);
                x.extend(row.iter().map(|&v| v * R::of(c.embd_scale)));
            }
        }
        let pass = |loss_sum| Pass {
            loss_sum,
            targets: targets.len(),
            tokens: n,
        };
        match grad {
            None => {
                for l in 0..c.n_layer {
                    x = self.block(l, lora, x, &rows).0;
                }
                Ok(pass(self.head(&x, &targets, None).0))
            }
            Some((grads, weight)) => {
                let mut acts = Vec::with_capacity(c.n_layer);
                for l in 0..c.n_layer {
                    let (y, a) = self.block(l, lora, x, &rows);
                    acts.push(a);
                    x = y;
                }
                let (loss, dx) = self.head(&x, &targets, Some(weight));
                let mut dx = dx.unwrap_or_default();
                for l in (0..c.n_layer).rev() {
                    let a = acts
                        .pop()
                        .ok_or_else(|| TrainError::Data("internal: activations".into()))?;
                    dx = self.block_bwd(l, lora, grads, &a, dx, &rows);
                }
                Ok(pass(loss))
            }
        }
    }
}
