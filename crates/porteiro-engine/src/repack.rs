//! Prefill weights. Prompt processing is compute-bound, and the per-block kernels in `simd` spend
//! most of their instructions unpacking nibbles and scaling every 4-element partial sum of every
//! block. At load, each supported matrix is also repacked into groups of 16 rows stored as unsigned
//! bytes, interleaved so that one AVX-512 VNNI instruction multiplies 4 consecutive weights of 16
//! rows by the same 4 activation bytes. After G/4 such instructions each 32-bit lane holds one row's
//! whole integer sub-block sum, and one multiply-add per 16 rows applies the scales. Weights are
//! unpacked once at load instead of once per token tile.
//!
//! Decode keeps the original blocks: it is bound by memory, and the repacked bytes are larger. Only
//! tokens of a sequence that has several tokens in a step (prompt chunks) take this path, so a
//! decoded token's logits do not depend on what else shares its step (see `Model::forward`).

use crate::quant::{f16_at, k4_scale_min, QK, QK_K};
use porteiro_models::gguf::GgmlType;

/// Rows per group: one per 32-bit lane of a 512-bit register.
pub const ROWS: usize = 16;

/// One 64-byte line: four weights of each of the group's 16 rows.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct Line(pub [u8; 64]);

/// How a weight type maps to (sub-block length, offset of the stored unsigned values, has mins).
fn format(t: GgmlType) -> Option<(usize, i32, bool)> {
    Some(match t {
        GgmlType::Q4_0 => (32, 8, false),
        GgmlType::Q5_0 => (32, 16, false),
        GgmlType::Q8_0 => (32, 128, false),
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => (32, 0, true),
        GgmlType::Q6_K => (16, 32, false),
        _ => return None,
    })
}

/// Unpacks one row into unsigned values (`q`), and per sub-block a scale and a min, so that element
/// i is `scale[i / g] * (q[i] - off) + min[i / g]` exactly as `quant::dequantize_row` computes it.
fn row_ints(t: GgmlType, row: &[u8], q: &mut [u8], scale: &mut [f32], min: &mut [f32]) {
    match t {
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let bs = if t == GgmlType::Q4_0 { 18 } else { 20 };
            for (b, blk) in row.chunks_exact(bs).enumerate() {
                scale[b] = f16_at(blk, 0);
                let qs = if t == GgmlType::Q4_0 {
                    &blk[2..18]
                } else {
                    min[b] = f16_at(blk, 2);
                    &blk[4..20]
                };
                let o = &mut q[b * QK..(b + 1) * QK];
                for j in 0..16 {
                    o[j] = qs[j] & 0xF;
                    o[j + 16] = qs[j] >> 4;
                }
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let bs = if t == GgmlType::Q5_0 { 22 } else { 24 };
            for (b, blk) in row.chunks_exact(bs).enumerate() {
                scale[b] = f16_at(blk, 0);
                let rest = if t == GgmlType::Q5_0 {
                    &blk[2..]
                } else {
                    min[b] = f16_at(blk, 2);
                    &blk[4..]
                };
                let qh = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                let qs = &rest[4..20];
                let o = &mut q[b * QK..(b + 1) * QK];
                for j in 0..16 {
                    o[j] = (qs[j] & 0xF) | (((qh >> j) & 1) << 4) as u8;
                    o[j + 16] = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4) as u8;
                }
            }
        }
        GgmlType::Q8_0 => {
            for (b, blk) in row.chunks_exact(34).enumerate() {
                scale[b] = f16_at(blk, 0);
                for j in 0..QK {
                    q[b * QK + j] = blk[2 + j] ^ 0x80;
                }
            }
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            let (bs, qs_at) = if t == GgmlType::Q4_K {
                (144, 16)
            } else {
                (176, 48)
            };
            for (sb, blk) in row.chunks_exact(bs).enumerate() {
                let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                let sc = &blk[4..16];
                for c in 0..4 {
                    let qs = &blk[qs_at + 32 * c..qs_at + 32 * c + 32];
                    for (h, sub) in [2 * c, 2 * c + 1].into_iter().enumerate() {
                        let (s, m) = k4_scale_min(sub, sc);
                        let i = sb * 8 + sub;
                        scale[i] = d * s as f32;
                        min[i] = -(dmin * m as f32);
                        let o = &mut q[i * QK..(i + 1) * QK];
                        for l in 0..32 {
                            let mut v = if h == 0 { qs[l] & 0xF } else { qs[l] >> 4 };
                            if t == GgmlType::Q5_K {
                                v |= ((blk[16 + l] >> sub) & 1) << 4;
                            }
                            o[l] = v;
                        }
                    }
                }
            }
        }
        GgmlType::Q6_K => {
            for (sb, blk) in row.chunks_exact(210).enumerate() {
                let d = f16_at(blk, 208);
                let o = &mut q[sb * QK_K..(sb + 1) * QK_K];
                for half in 0..2 {
                    let ql = &blk[64 * half..64 * half + 64];
                    let qh = &blk[128 + 32 * half..128 + 32 * half + 32];
                    let o = &mut o[128 * half..128 * half + 128];
                    for l in 0..32 {
                        o[l] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
                        o[l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
                        o[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                        o[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                    }
                }
                for i in 0..16 {
                    scale[sb * 16 + i] = d * (blk[192 + i] as i8 as f32);
                }
            }
        }
        _ => unreachable!("format() admits only the types above"),
    }
}

/// A matrix in the prefill layout.
pub struct Repacked {
    rows: usize,
    cols: usize,
    g: usize,
    off: i32,
    /// [group][sub-block][g / 4 lines]
    q: Vec<Line>,
    /// [group][sub-block][16]
    scale: Vec<f32>,
    /// [group][sub-block][16]; empty for types without mins.
    min: Vec<f32>,
}

impl Repacked {
    /// Whether this CPU runs the repacked kernels (and `PORTEIRO_REPACK=0` does not turn them off).
    pub fn available() -> bool {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| {
            if std::env::var("PORTEIRO_REPACK").is_ok_and(|v| v == "0")
                || crate::simd::isa() == crate::simd::Isa::Scalar
            {
                return false;
            }
            #[cfg(target_arch = "x86_64")]
            {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            false
        })
    }

    /// Repacks `rows` rows of `row_bytes` each; None for types or shapes this layout does not take.
    pub fn new(t: GgmlType, data: &[u8], rows: usize, cols: usize) -> Option<Self> {
        let (g, off, has_min) = format(t)?;
        let (bs, ts) = t.block_layout()?;
        let unit = if matches!(t, GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K) {
            QK_K
        } else {
            QK
        };
        if rows == 0 || !rows.is_multiple_of(ROWS) || !cols.is_multiple_of(unit) {
            return None;
        }
        let row_bytes = cols / bs * ts;
        if data.len() < rows * row_bytes {
            return None;
        }
        let nsb = cols / g;
        let lines_per_sb = g / 4;
        let mut q = vec![Line([0; 64]); rows / ROWS * nsb * lines_per_sb];
        let mut scale = vec![0f32; rows * nsb];
        let mut min = vec![0f32; if has_min { rows * nsb } else { 0 }];
        let (mut rq, mut rs, mut rm) = (vec![0u8; cols], vec![0f32; nsb], vec![0f32; nsb]);
        for r in 0..rows {
            row_ints(t, &data[r * row_bytes..(r + 1) * row_bytes], &mut rq, &mut rs, &mut rm);
            let (grp, lane) = (r / ROWS, r % ROWS);
            for s in 0..nsb {
                let at = grp * nsb + s;
                scale[at * ROWS + lane] = rs[s];
                if has_min {
                    min[at * ROWS + lane] = rm[s];
                }
                for j in 0..lines_per_sb {
                    let src = &rq[s * g + 4 * j..s * g + 4 * j + 4];
                    q[at * lines_per_sb + j].0[4 * lane..4 * lane + 4].copy_from_slice(src);
                }
            }
        }
        Some(Self {
            rows,
            cols,
            g,
            off,
            q,
            scale,
            min,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn groups(&self) -> usize {
        self.rows / ROWS
    }

    /// Resident bytes of the repacked copy.
    pub fn bytes(&self) -> usize {
        self.q.len() * 64 + (self.scale.len() + self.min.len()) * 4
    }

    /// out[t * ld + 16 * grp + r] = row (16 grp + r) · activation t, for t in t0..t1.
    ///
    /// # Safety
    /// `out` must be valid for writes at every such index; `acts` must hold tokens t0..t1 of
    /// `self.cols` elements.
    pub unsafe fn run(&self, grp: usize, acts: &Acts, t0: usize, t1: usize, out: *mut f32, ld: usize) {
        assert!(grp < self.groups() && acts.k == self.cols && t1 <= acts.n);
        #[cfg(target_arch = "x86_64")]
        if Self::available() {
            zmm::run(self, grp, acts, t0, t1, out, ld);
            return;
        }
        self.run_scalar(grp, acts, t0, t1, out, ld);
    }

    /// The reference: the same integer sums and the same float operations, one lane at a time.
    ///
    /// # Safety
    /// As `run`.
    pub unsafe fn run_scalar(
        &self,
        grp: usize,
        acts: &Acts,
        t0: usize,
        t1: usize,
        out: *mut f32,
        ld: usize,
    ) {
        let (g, nsb) = (self.g, self.cols / self.g);
        let lps = g / 4;
        for t in t0..t1 {
            let y = &acts.q[t * acts.k..(t + 1) * acts.k];
            for lane in 0..ROWS {
                let mut f = 0f32;
                for s in 0..nsb {
                    let at = grp * nsb + s;
                    let sum = acts.sum(t, s, g);
                    let mut acc = -self.off * sum;
                    for j in 0..lps {
                        let w = &self.q[at * lps + j].0[4 * lane..4 * lane + 4];
                        for e in 0..4 {
                            acc += w[e] as i32 * y[s * g + 4 * j + e] as i32;
                        }
                    }
                    let da = acts.d[t * acts.k / QK + s * g / QK];
                    f = (acc as f32).mul_add(self.scale[at * ROWS + lane] * da, f);
                    if !self.min.is_empty() {
                        f = self.min[at * ROWS + lane].mul_add(da * sum as f32, f);
                    }
                }
                *out.add(t * ld + grp * ROWS + lane) = f;
            }
        }
    }
}

/// Activations for the repacked kernels: per token, i8 values in 32-element blocks with an f32 scale
/// each, and the sums of every 16 values (they remove the weights' offsets and apply the mins).
#[derive(Default)]
pub struct Acts {
    k: usize,
    n: usize,
    q: Vec<i8>,
    d: Vec<f32>,
    s16: Vec<i32>,
}

impl Acts {
    /// Makes room for `n` tokens of `k` elements (k a multiple of 32).
    pub fn reset(&mut self, k: usize, n: usize) {
        self.k = k;
        self.n = n;
        if self.q.len() < k * n {
            self.q.resize(k * n, 0);
        }
        if self.d.len() < k / QK * n {
            self.d.resize(k / QK * n, 0.0);
        }
        if self.s16.len() < k / 16 * n {
            self.s16.resize(k / 16 * n, 0);
        }
    }

    /// Raw parts of token `t`, for quantizing tokens in parallel: (values, scales, sums).
    ///
    /// # Safety
    /// Callers must not hand the same token to two threads.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn token_mut(&self, t: usize) -> (&mut [i8], &mut [f32], &mut [i32]) {
        let k = self.k;
        (
            std::slice::from_raw_parts_mut(self.q.as_ptr().add(t * k) as *mut i8, k),
            std::slice::from_raw_parts_mut(self.d.as_ptr().add(t * k / QK) as *mut f32, k / QK),
            std::slice::from_raw_parts_mut(self.s16.as_ptr().add(t * k / 16) as *mut i32, k / 16),
        )
    }

    /// Sum of the activation values of sub-block `s` (of `g` elements) of token `t`.
    #[inline(always)]
    fn sum(&self, t: usize, s: usize, g: usize) -> i32 {
        let base = t * self.k / 16;
        if g == 16 {
            self.s16[base + s]
        } else {
            self.s16[base + 2 * s] + self.s16[base + 2 * s + 1]
        }
    }
}

/// Quantizes one token's `x` into 32-element blocks (scale = max |x| / 127, round half to even).
pub fn quantize(x: &[f32], q: &mut [i8], d: &mut [f32], s16: &mut [i32]) {
    assert!(x.len().is_multiple_of(QK) && q.len() >= x.len());
    assert!(d.len() >= x.len() / QK && s16.len() >= x.len() / 16);
    #[cfg(target_arch = "x86_64")]
    if crate::simd::isa() != crate::simd::Isa::Scalar {
        // SAFETY: lengths checked above; AVX2 detected by isa().
        unsafe { ymm::quantize(x, q, d, s16) };
        return;
    }
    quantize_scalar(x, q, d, s16);
}

/// The reference for `quantize`.
pub fn quantize_scalar(x: &[f32], q: &mut [i8], d: &mut [f32], s16: &mut [i32]) {
    for (b, xb) in x.chunks_exact(QK).enumerate() {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        d[b] = amax / 127.0;
        for h in 0..2 {
            let mut s = 0;
            for j in 16 * h..16 * h + 16 {
                let v = (xb[j] * id).round_ties_even() as i32;
                q[b * QK + j] = v as i8;
                s += v;
            }
            s16[2 * b + h] = s;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod ymm {
    use crate::quant::QK;
    use std::arch::x86_64::*;

    /// `quantize_scalar` eight lanes at a time: conversion rounds half to even (the default MXCSR
    /// mode), so the values are the same.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn quantize(x: &[f32], q: &mut [i8], d: &mut [f32], s16: &mut [i32]) {
        let sign = _mm256_set1_ps(-0.0);
        for b in 0..x.len() / QK {
            let p = x.as_ptr().add(b * QK);
            let v = [0, 8, 16, 24].map(|o| _mm256_loadu_ps(p.add(o)));
            let mut m = _mm256_andnot_ps(sign, v[0]);
            for u in &v[1..] {
                m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *u));
            }
            let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
            let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            d[b] = amax / 127.0;
            let idv = _mm256_set1_ps(id);
            let i = v.map(|u| _mm256_cvtps_epi32(_mm256_mul_ps(u, idv)));
            for h in 0..2 {
                let s = _mm256_add_epi32(i[2 * h], i[2 * h + 1]);
                let s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
                let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
                s16[2 * b + h] = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 1)));
            }
            // Packing interleaves 128-bit lanes; the permutation puts the bytes back in order.
            let w = _mm256_packs_epi16(
                _mm256_packs_epi32(i[0], i[1]),
                _mm256_packs_epi32(i[2], i[3]),
            );
            let w = _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(q.as_mut_ptr().add(b * QK) as *mut __m256i, w);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod zmm {
    use super::{Acts, Repacked, ROWS};
    use crate::quant::QK;
    use std::arch::x86_64::*;

    /// Tokens t0..t1 in tiles of 8, then 4 and 1.
    pub(super) unsafe fn run(
        p: &Repacked,
        grp: usize,
        a: &Acts,
        t0: usize,
        t1: usize,
        out: *mut f32,
        ld: usize,
    ) {
        macro_rules! go {
            ($t:expr, $g:expr, $m:expr, $at:expr) => {
                tile::<$t, $g, $m>(p, grp, a, $at, out, ld)
            };
        }
        macro_rules! pick {
            ($t:expr, $at:expr) => {
                match (p.g, p.min.is_empty()) {
                    (16, _) => go!($t, 4, false, $at),
                    (_, true) => go!($t, 8, false, $at),
                    (_, false) => go!($t, 8, true, $at),
                }
            };
        }
        let mut t = t0;
        while t + 8 <= t1 {
            pick!(8, t);
            t += 8;
        }
        if t + 4 <= t1 {
            pick!(4, t);
            t += 4;
        }
        while t < t1 {
            pick!(1, t);
            t += 1;
        }
    }

    /// 16 rows x T tokens. Lines of one sub-block stay in registers across the T tokens; each
    /// token's 4-byte activation groups are broadcast straight from memory.
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vnni")]
    unsafe fn tile<const T: usize, const L: usize, const MIN: bool>(
        p: &Repacked,
        grp: usize,
        a: &Acts,
        t0: usize,
        out: *mut f32,
        ld: usize,
    ) {
        let g = L * 4;
        let nsb = p.cols / g;
        let k = a.k;
        let mut f = [_mm512_setzero_ps(); T];
        for s in 0..nsb {
            let at = grp * nsb + s;
            let lines = p.q.as_ptr().add(at * L) as *const __m512i;
            let mut w = [_mm512_setzero_si512(); L];
            for j in 0..L {
                w[j] = _mm512_load_si512(lines.add(j));
            }
            let sc = _mm512_loadu_ps(p.scale.as_ptr().add(at * ROWS));
            let mn = if MIN {
                _mm512_loadu_ps(p.min.as_ptr().add(at * ROWS))
            } else {
                _mm512_setzero_ps()
            };
            // Token-inner order: T independent accumulation chains per weight line.
            let mut acc = [_mm512_setzero_si512(); T];
            let mut y = [std::ptr::null::<i32>(); T];
            for t in 0..T {
                let tok = t0 + t;
                y[t] = a.q.as_ptr().add(tok * k + s * g) as *const i32;
                acc[t] = _mm512_set1_epi32(-p.off * a.sum(tok, s, g));
            }
            for j in 0..L {
                for t in 0..T {
                    let b = _mm512_set1_epi32(y[t].add(j).read_unaligned());
                    acc[t] = _mm512_dpbusd_epi32(acc[t], w[j], b);
                }
            }
            for t in 0..T {
                let tok = t0 + t;
                let da = *a.d.get_unchecked(tok * k / QK + s * g / QK);
                f[t] = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(acc[t]),
                    _mm512_mul_ps(sc, _mm512_set1_ps(da)),
                    f[t],
                );
                if MIN {
                    let sum = a.sum(tok, s, g);
                    f[t] = _mm512_fmadd_ps(mn, _mm512_set1_ps(da * sum as f32), f[t]);
                }
            }
        }
        for (t, v) in f.iter().enumerate() {
            _mm512_storeu_ps(out.add((t0 + t) * ld + grp * ROWS), *v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{self, testutil::*};

    const TYPES: [GgmlType; 8] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];

    #[test]
    fn unpacked_rows_reproduce_dequantization() {
        let mut rng = Rng(7);
        for t in TYPES {
            let (g, off, _) = format(t).unwrap();
            let k = 512;
            let row = random_row(t, k, &mut rng);
            let mut want = vec![0f32; k];
            quant::dequantize_row(t, &row, &mut want);
            let (mut q, mut sc, mut mn) = (vec![0u8; k], vec![0f32; k / g], vec![0f32; k / g]);
            row_ints(t, &row, &mut q, &mut sc, &mut mn);
            for i in 0..k {
                let got = sc[i / g] * (q[i] as i32 - off) as f32 + mn[i / g];
                assert!(
                    (got - want[i]).abs() <= 1e-6 * want[i].abs().max(1.0),
                    "{t:?} element {i}: {got} vs {want}",
                    want = want[i]
                );
            }
        }
    }

    /// Every token count from 1 to 37 (tiles of 16, 8, 4 and the single tail) and both row groups;
    /// the SIMD kernel must equal the scalar reference bit for bit, and both the float dot product
    /// of the dequantized weights with the dequantized activations closely.
    #[test]
    fn kernels_match_the_reference_and_the_float_dot() {
        let mut rng = Rng(11);
        for t in TYPES {
            let (k, rows) = (512, 32);
            let data: Vec<u8> = (0..rows).flat_map(|_| random_row(t, k, &mut rng)).collect();
            let p = Repacked::new(t, &data, rows, k).unwrap();
            let row_bytes = data.len() / rows;
            for n in [1usize, 3, 4, 7, 8, 13, 16, 21, 37] {
                let x: Vec<f32> = (0..n * k).map(|_| rng.f32()).collect();
                let mut acts = Acts::default();
                acts.reset(k, n);
                for tk in 0..n {
                    // SAFETY: one token at a time.
                    let (q, d, s) = unsafe { acts.token_mut(tk) };
                    quantize(&x[tk * k..(tk + 1) * k], q, d, s);
                }
                let mut fast = vec![0f32; n * rows];
                let mut slow = vec![0f32; n * rows];
                for grp in 0..rows / ROWS {
                    // SAFETY: outputs sized n x rows.
                    unsafe {
                        p.run(grp, &acts, 0, n, fast.as_mut_ptr(), rows);
                        p.run_scalar(grp, &acts, 0, n, slow.as_mut_ptr(), rows);
                    }
                }
                assert_eq!(fast, slow, "{t:?} n={n}");
                let mut w = vec![0f32; k];
                for r in 0..rows {
                    quant::dequantize_row(t, &data[r * row_bytes..(r + 1) * row_bytes], &mut w);
                    for tk in 0..n {
                        let xq: Vec<f32> = (0..k)
                            .map(|i| acts.q[tk * k + i] as f32 * acts.d[tk * k / QK + i / QK])
                            .collect();
                        let want: f64 = w.iter().zip(&xq).map(|(a, b)| *a as f64 * *b as f64).sum();
                        let norm: f64 = w.iter().zip(&xq).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
                        let got = fast[tk * rows + r] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * norm.max(1e-3),
                            "{t:?} row {r} token {tk}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn simd_quantization_equals_the_scalar_one() {
        let mut rng = Rng(5);
        let k = 32 * 29;
        let mut x: Vec<f32> = (0..k).map(|_| rng.f32() * 3.0).collect();
        x[..32].fill(0.0); // an all-zero block
        x[40] = 2.5 / 127.0 * 3.0; // values that land on .5 exercise ties-to-even
        let (mut q1, mut d1, mut s1) = (vec![0i8; k], vec![0f32; k / 32], vec![0i32; k / 16]);
        let (mut q2, mut d2, mut s2) = (q1.clone(), d1.clone(), s1.clone());
        quantize(&x, &mut q1, &mut d1, &mut s1);
        quantize_scalar(&x, &mut q2, &mut d2, &mut s2);
        assert_eq!((q1, d1, s1), (q2, d2, s2));
    }

    #[test]
    fn refuses_shapes_it_cannot_tile() {
        let mut rng = Rng(3);
        let row = random_row(GgmlType::Q8_0, 64, &mut rng);
        assert!(Repacked::new(GgmlType::Q8_0, &row, 1, 64).is_none());
        assert!(Repacked::new(GgmlType::F32, &[0; 64 * 16 * 4], 16, 64).is_none());
    }
}
