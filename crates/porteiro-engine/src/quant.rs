//! GGUF block formats: dequantization, activation quantization and the scalar reference dot products.
//!
//! Weights are dotted against activations quantized to 8-bit blocks (integer multiply-accumulate, one
//! float multiply per block), the same pairing llama.cpp uses, so results agree with it closely:
//! Q4_0/Q5_0/Q8_0 pair with Q8_0, Q4_1 with Q8_1, the K-quants with Q8_K. The SIMD kernels in
//! `simd` must produce the same integer sums as these functions; tests check them against each other.

use half::f16;
use porteiro_models::gguf::GgmlType;

pub const QK: usize = 32;
pub const QK_K: usize = 256;

#[inline]
pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// The activation format a weight type is dotted against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActType {
    F32,
    Q8_0,
    Q8_1,
    Q8K,
}

impl ActType {
    /// Bytes needed for one activation row of `k` elements.
    pub fn row_bytes(self, k: usize) -> usize {
        match self {
            ActType::F32 => k * 4,
            ActType::Q8_0 | ActType::Q8_1 => k / QK * Q8_BYTES,
            ActType::Q8K => k / QK_K * Q8K_BYTES,
        }
    }
}

/// Q8_0 and Q8_1 activation blocks share one 40-byte layout: f32 d, f32 s (= d * sum q), i8 q[32].
/// Keeping d and s as f16-rounded f32 values reproduces llama.cpp's numbers without f16 conversions
/// in the inner loop.
pub const Q8_BYTES: usize = 40;
/// Q8_K activation block: f32 d, i8 q[256], i16 bsums[16].
pub const Q8K_BYTES: usize = 4 + 256 + 32;

/// Which weight types we can compute with, and what their activations look like.
pub fn act_type(t: GgmlType) -> Option<ActType> {
    Some(match t {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => ActType::F32,
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => ActType::Q8_0,
        GgmlType::Q4_1 | GgmlType::Q5_1 => ActType::Q8_1,
        GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => {
            ActType::Q8K
        }
        _ => return None,
    })
}

pub const SUPPORTED_TYPES: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K";

// ---------------------------------------------------------------------------------------------
// Activation quantization

/// Quantizes `x` (len multiple of 32) into Q8_0/Q8_1 blocks (`out.len() == x.len()/32*36`).
pub fn quantize_q8(x: &[f32], out: &mut [u8]) {
    for (xb, ob) in x.chunks_exact(QK).zip(out.chunks_exact_mut(Q8_BYTES)) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (j, &v) in xb.iter().enumerate() {
            let q = (v * id).round_ties_even() as i32;
            sum += q;
            ob[8 + j] = q as i8 as u8;
        }
        let d16 = f16::from_f32(d).to_f32();
        let s16 = f16::from_f32(d * sum as f32).to_f32();
        ob[0..4].copy_from_slice(&d16.to_le_bytes());
        ob[4..8].copy_from_slice(&s16.to_le_bytes());
    }
}

/// Quantizes `x` (len multiple of 256) into Q8_K blocks.
pub fn quantize_q8k(x: &[f32], out: &mut [u8]) {
    for (xb, ob) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(Q8K_BYTES)) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in xb {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            ob.fill(0);
            continue;
        }
        let iscale = -127.0 / max;
        for (j, &v) in xb.iter().enumerate() {
            let q = ((iscale * v).round_ties_even() as i32).min(127);
            ob[4 + j] = q as i8 as u8;
        }
        for g in 0..16 {
            let s: i32 = (0..16).map(|l| ob[4 + g * 16 + l] as i8 as i32).sum();
            ob[260 + 2 * g..262 + 2 * g].copy_from_slice(&(s as i16).to_le_bytes());
        }
        ob[0..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
    }
}

pub fn quantize_act(t: ActType, x: &[f32], out: &mut [u8]) {
    match t {
        ActType::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        ActType::Q8_0 | ActType::Q8_1 => quantize_q8(x, out),
        ActType::Q8K => quantize_q8k(x, out),
    }
}

#[inline]
fn rd_f32(b: &[u8], i: usize) -> f32 {
    f32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

// ---------------------------------------------------------------------------------------------
// Dequantization (embedding rows, tests, tools)

#[inline]
pub(crate) fn k4_scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q2_K and Q3_K store element `e` of a super-block as 2 bits of `qs[32 * (e / 128) + e % 32]` at
/// shift `2 * ((e / 32) % 4)`.
#[inline]
pub(crate) fn crumb(qs: &[u8], e: usize) -> u8 {
    (qs[32 * (e / 128) + e % 32] >> (2 * ((e / 32) % 4))) & 3
}

/// Q3_K's unsigned level of element `e` (0..=7; the value is level - 4): two low bits, and the third
/// in bit `e / 32` of `hmask[e % 32]`.
#[inline]
pub(crate) fn q3k_level(b: &[u8], e: usize) -> u8 {
    crumb(&b[32..96], e) | (((b[e % 32] >> (e / 32)) & 1) << 2)
}

/// Q3_K's signed scale of group `j` (of 16 elements): 6 bits, stored offset by 32, low nibbles in
/// the first eight bytes, high pairs in the last four.
#[inline]
pub(crate) fn q3k_scale(sc: &[u8], j: usize) -> i8 {
    let lo = if j < 8 { sc[j] & 0xF } else { sc[j - 8] >> 4 };
    let hi = (sc[8 + j % 4] >> (2 * (j / 4))) & 3;
    (lo | (hi << 4)) as i8 - 32
}

/// Dequantizes one row (`out.len()` elements) of a tensor of type `t`.
pub fn dequantize_row(t: GgmlType, row: &[u8], out: &mut [f32]) {
    match t {
        GgmlType::F32 => {
            for (o, b) in out.iter_mut().zip(row.chunks_exact(4)) {
                *o = rd_f32(b, 0);
            }
        }
        GgmlType::F16 => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = f16_at(row, 2 * i);
            }
        }
        GgmlType::BF16 => {
            for (i, o) in out.iter_mut().enumerate() {
                *o =
                    f32::from_bits((u16::from_le_bytes([row[2 * i], row[2 * i + 1]]) as u32) << 16);
            }
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let bs = if t == GgmlType::Q4_0 { 18 } else { 20 };
            for (b, o) in row.chunks_exact(bs).zip(out.chunks_exact_mut(QK)) {
                let d = f16_at(b, 0);
                // Q4_0 as ggml computes it, (q - 8)·d, not q·d - 8d: the same value except
                // that a zero keeps d's sign, which a byte-exact F16 conversion must reproduce.
                if t == GgmlType::Q4_0 {
                    for j in 0..16 {
                        o[j] = ((b[2 + j] & 0xF) as i32 - 8) as f32 * d;
                        o[j + 16] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
                    }
                    continue;
                }
                let (m, qs) = (f16_at(b, 2), &b[4..20]);
                for j in 0..16 {
                    o[j] = (qs[j] & 0xF) as f32 * d + m;
                    o[j + 16] = (qs[j] >> 4) as f32 * d + m;
                }
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let bs = if t == GgmlType::Q5_0 { 22 } else { 24 };
            for (b, o) in row.chunks_exact(bs).zip(out.chunks_exact_mut(QK)) {
                let d = f16_at(b, 0);
                let q5 = t == GgmlType::Q5_0;
                let (m, rest) = if q5 {
                    (0.0, &b[2..])
                } else {
                    (f16_at(b, 2), &b[4..])
                };
                let qh = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                let qs = &rest[4..20];
                for j in 0..16 {
                    let lo = (qs[j] & 0xF) as u32 | ((qh >> j) & 1) << 4;
                    let hi = (qs[j] >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
                    if q5 {
                        // (q - 16)·d as ggml computes it (see Q4_0).
                        o[j] = (lo as i32 - 16) as f32 * d;
                        o[j + 16] = (hi as i32 - 16) as f32 * d;
                    } else {
                        o[j] = lo as f32 * d + m;
                        o[j + 16] = hi as f32 * d + m;
                    }
                }
            }
        }
        GgmlType::Q8_0 => {
            for (b, o) in row.chunks_exact(34).zip(out.chunks_exact_mut(QK)) {
                let d = f16_at(b, 0);
                for j in 0..32 {
                    o[j] = b[2 + j] as i8 as f32 * d;
                }
            }
        }
        GgmlType::Q2_K => {
            // scales[16] (scale | min << 4), qs[64], d, dmin.
            for (b, o) in row.chunks_exact(84).zip(out.chunks_exact_mut(QK_K)) {
                let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
                for (e, v) in o.iter_mut().enumerate() {
                    let sc = b[e / 16];
                    let (dl, ml) = (d * (sc & 0xF) as f32, dmin * (sc >> 4) as f32);
                    *v = dl * crumb(&b[16..80], e) as f32 - ml;
                }
            }
        }
        GgmlType::Q3_K => {
            // hmask[32], qs[64], scales[12], d.
            for (b, o) in row.chunks_exact(110).zip(out.chunks_exact_mut(QK_K)) {
                let d = f16_at(b, 108);
                for (e, v) in o.iter_mut().enumerate() {
                    let dl = d * q3k_scale(&b[96..108], e / 16) as f32;
                    *v = dl * (q3k_level(b, e) as i32 - 4) as f32;
                }
            }
        }
        GgmlType::Q4_K => {
            for (b, o) in row.chunks_exact(144).zip(out.chunks_exact_mut(QK_K)) {
                let d = f16_at(b, 0);
                let dmin = f16_at(b, 2);
                let sc = &b[4..16];
                let qs = &b[16..144];
                for c in 0..4 {
                    let (s1, m1) = k4_scale_min(2 * c, sc);
                    let (s2, m2) = k4_scale_min(2 * c + 1, sc);
                    let q = &qs[32 * c..32 * c + 32];
                    for l in 0..32 {
                        o[64 * c + l] = d * s1 as f32 * (q[l] & 0xF) as f32 - dmin * m1 as f32;
                        o[64 * c + 32 + l] = d * s2 as f32 * (q[l] >> 4) as f32 - dmin * m2 as f32;
                    }
                }
            }
        }
        GgmlType::Q5_K => {
            for (b, o) in row.chunks_exact(176).zip(out.chunks_exact_mut(QK_K)) {
                let d = f16_at(b, 0);
                let dmin = f16_at(b, 2);
                let sc = &b[4..16];
                let qh = &b[16..48];
                let qs = &b[48..176];
                for c in 0..4 {
                    let (s1, m1) = k4_scale_min(2 * c, sc);
                    let (s2, m2) = k4_scale_min(2 * c + 1, sc);
                    let q = &qs[32 * c..32 * c + 32];
                    for l in 0..32 {
                        let h1 = ((qh[l] >> (2 * c)) & 1) << 4;
                        let h2 = ((qh[l] >> (2 * c + 1)) & 1) << 4;
                        o[64 * c + l] =
                            d * s1 as f32 * ((q[l] & 0xF) | h1) as f32 - dmin * m1 as f32;
                        o[64 * c + 32 + l] =
                            d * s2 as f32 * ((q[l] >> 4) | h2) as f32 - dmin * m2 as f32;
                    }
                }
            }
        }
        GgmlType::Q6_K => {
            for (b, o) in row.chunks_exact(210).zip(out.chunks_exact_mut(QK_K)) {
                let d = f16_at(b, 208);
                for half in 0..2 {
                    let ql = &b[64 * half..64 * half + 64];
                    let qh = &b[128 + 32 * half..128 + 32 * half + 32];
                    let sc = &b[192 + 8 * half..192 + 8 * half + 8];
                    let o = &mut o[128 * half..128 * half + 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        o[l] = d * (sc[is] as i8 as f32) * q1 as f32;
                        o[l + 32] = d * (sc[is + 2] as i8 as f32) * q2 as f32;
                        o[l + 64] = d * (sc[is + 4] as i8 as f32) * q3 as f32;
                        o[l + 96] = d * (sc[is + 6] as i8 as f32) * q4 as f32;
                    }
                }
            }
        }
        // The loader refuses other types before any row is read.
        _ => out.fill(f32::NAN),
    }
}

// ---------------------------------------------------------------------------------------------
// Scalar reference dot products: weight row (`w`, k elements of type t) · activation row (`a`).

pub fn dot_scalar(t: GgmlType, w: &[u8], a: &[u8], k: usize) -> f32 {
    match t {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            let mut row = vec![0f32; k];
            dequantize_row(t, w, &mut row);
            row.iter()
                .zip(a.chunks_exact(4))
                .map(|(x, b)| x * rd_f32(b, 0))
                .sum()
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
            let (_, bs) = t.block_layout().unwrap_or((32, 34));
            let mut sum = 0f32;
            for (wb, ab) in w.chunks_exact(bs).zip(a.chunks_exact(Q8_BYTES)) {
                let ad = rd_f32(ab, 0);
                let aq = |j: usize| ab[8 + j] as i8 as i32;
                let d = f16_at(wb, 0);
                match t {
                    GgmlType::Q8_0 => {
                        let s: i32 = (0..32).map(|j| wb[2 + j] as i8 as i32 * aq(j)).sum();
                        sum += d * ad * s as f32;
                    }
                    GgmlType::Q4_0 | GgmlType::Q4_1 => {
                        let off = if t == GgmlType::Q4_0 { 2 } else { 4 };
                        let bias = if t == GgmlType::Q4_0 { 8 } else { 0 };
                        let mut s = 0i32;
                        for j in 0..16 {
                            let q = wb[off + j];
                            s += ((q & 0xF) as i32 - bias) * aq(j)
                                + ((q >> 4) as i32 - bias) * aq(j + 16);
                        }
                        sum += d * ad * s as f32;
                        if t == GgmlType::Q4_1 {
                            sum += f16_at(wb, 2) * rd_f32(ab, 4);
                        }
                    }
                    _ => {
                        let off = if t == GgmlType::Q5_0 { 2 } else { 4 };
                        let bias = if t == GgmlType::Q5_0 { 16 } else { 0 };
                        let qh =
                            u32::from_le_bytes([wb[off], wb[off + 1], wb[off + 2], wb[off + 3]]);
                        let qs = &wb[off + 4..off + 20];
                        let mut s = 0i32;
                        for j in 0..16 {
                            let lo = ((qs[j] & 0xF) as u32 | ((qh >> j) & 1) << 4) as i32 - bias;
                            let hi =
                                ((qs[j] >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4) as i32 - bias;
                            s += lo * aq(j) + hi * aq(j + 16);
                        }
                        sum += d * ad * s as f32;
                        if t == GgmlType::Q5_1 {
                            sum += f16_at(wb, 2) * rd_f32(ab, 4);
                        }
                    }
                }
            }
            sum
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            let bs = if t == GgmlType::Q4_K { 144 } else { 176 };
            let mut sum = 0f32;
            for (wb, ab) in w.chunks_exact(bs).zip(a.chunks_exact(Q8K_BYTES)) {
                let ad = rd_f32(ab, 0);
                let aq = &ab[4..260];
                let bsum = |g: usize| i16::from_le_bytes([ab[260 + 2 * g], ab[261 + 2 * g]]) as i32;
                let sc = &wb[4..16];
                let (qh, qs) = if t == GgmlType::Q4_K {
                    (&wb[0..0], &wb[16..144])
                } else {
                    (&wb[16..48], &wb[48..176])
                };
                let (mut sumi, mut summ) = (0i32, 0i32);
                for j in 0..8 {
                    let (s, m) = k4_scale_min(j, sc);
                    summ += m as i32 * (bsum(2 * j) + bsum(2 * j + 1));
                    let c = j / 2;
                    let mut dot = 0i32;
                    for l in 0..32 {
                        let mut q = if j % 2 == 0 {
                            qs[32 * c + l] & 0xF
                        } else {
                            qs[32 * c + l] >> 4
                        } as i32;
                        if !qh.is_empty() {
                            q |= (((qh[l] >> j) & 1) as i32) << 4;
                        }
                        dot += q * aq[32 * j + l] as i8 as i32;
                    }
                    sumi += s as i32 * dot;
                }
                sum += ad * f16_at(wb, 0) * sumi as f32 - ad * f16_at(wb, 2) * summ as f32;
            }
            sum
        }
        GgmlType::Q2_K | GgmlType::Q3_K => {
            // Unsigned levels against the activations; Q3_K's offset of 4 and Q2_K's mins come
            // from the activation sums of each 16-element group.
            let q2 = t == GgmlType::Q2_K;
            let bs = if q2 { 84 } else { 110 };
            let mut sum = 0f32;
            for (wb, ab) in w.chunks_exact(bs).zip(a.chunks_exact(Q8K_BYTES)) {
                let ad = rd_f32(ab, 0);
                let bsum = |g: usize| i16::from_le_bytes([ab[260 + 2 * g], ab[261 + 2 * g]]) as i32;
                let (mut sumi, mut summ) = (0i32, 0i32);
                for g in 0..16 {
                    let mut dot = 0i32;
                    for e in 16 * g..16 * g + 16 {
                        let q = if q2 {
                            crumb(&wb[16..80], e)
                        } else {
                            q3k_level(wb, e)
                        };
                        dot += q as i32 * ab[4 + e] as i8 as i32;
                    }
                    if q2 {
                        sumi += (wb[g] & 0xF) as i32 * dot;
                        summ += (wb[g] >> 4) as i32 * bsum(g);
                    } else {
                        sumi += q3k_scale(&wb[96..108], g) as i32 * (dot - 4 * bsum(g));
                    }
                }
                if q2 {
                    sum += ad * f16_at(wb, 80) * sumi as f32 - ad * f16_at(wb, 82) * summ as f32;
                } else {
                    sum += ad * f16_at(wb, 108) * sumi as f32;
                }
            }
            sum
        }
        GgmlType::Q6_K => {
            let mut sum = 0f32;
            for (wb, ab) in w.chunks_exact(210).zip(a.chunks_exact(Q8K_BYTES)) {
                let ad = rd_f32(ab, 0);
                let aq = &ab[4..260];
                let mut sumi = 0i32;
                for half in 0..2 {
                    let ql = &wb[64 * half..64 * half + 64];
                    let qh = &wb[128 + 32 * half..160 + 32 * half];
                    let sc = &wb[192 + 8 * half..200 + 8 * half];
                    let a = &aq[128 * half..128 * half + 128];
                    let mut part = [0i32; 8];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        part[is] += q1 * a[l] as i8 as i32;
                        part[is + 2] += q2 * a[l + 32] as i8 as i32;
                        part[is + 4] += q3 * a[l + 64] as i8 as i32;
                        part[is + 6] += q4 * a[l + 96] as i8 as i32;
                    }
                    for (i, p) in part.iter().enumerate() {
                        sumi += sc[i] as i8 as i32 * p;
                    }
                }
                sum += ad * f16_at(wb, 208) * sumi as f32;
            }
            sum
        }
        _ => f32::NAN,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test
pub(crate) mod testutil {
    use super::*;

    /// The block-quantized types the engine computes with.
    pub const QUANTIZED: [GgmlType; 10] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];

    /// A small deterministic generator so that tests need no crate and stay reproducible.
    pub struct Rng(pub u64);
    impl Rng {
        pub fn next_u32(&mut self) -> u32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 16) as u32
        }
        pub fn f32(&mut self) -> f32 {
            (self.next_u32() as f32 / u32::MAX as f32) * 2.0 - 1.0
        }
    }

    /// Random but well-formed weight blocks: f16 scales are kept finite and small.
    pub fn random_row(t: GgmlType, k: usize, rng: &mut Rng) -> Vec<u8> {
        let (bs, ts) = t.block_layout().unwrap();
        let mut v: Vec<u8> = (0..k / bs * ts).map(|_| rng.next_u32() as u8).collect();
        let put = |v: &mut Vec<u8>, at: usize, x: f32| {
            v[at..at + 2].copy_from_slice(&f16::from_f32(x).to_bits().to_le_bytes());
        };
        for b in 0..k / bs {
            let o = b * ts;
            match t {
                GgmlType::F16 => put(&mut v, o, rng.f32()),
                GgmlType::F32 => v[o..o + 4].copy_from_slice(&rng.f32().to_le_bytes()),
                GgmlType::BF16 => {
                    let bits = (rng.f32().to_bits() >> 16) as u16;
                    v[o..o + 2].copy_from_slice(&bits.to_le_bytes());
                }
                GgmlType::Q6_K => put(&mut v, o + 208, rng.f32() * 0.01),
                GgmlType::Q3_K => put(&mut v, o + 108, rng.f32() * 0.01),
                GgmlType::Q2_K => {
                    put(&mut v, o + 80, rng.f32() * 0.01);
                    put(&mut v, o + 82, rng.f32() * 0.01);
                }
                GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => {
                    put(&mut v, o, rng.f32() * 0.01);
                    put(&mut v, o + 2, rng.f32() * 0.01);
                }
                _ => put(&mut v, o, rng.f32() * 0.01),
            }
        }
        v
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test
mod tests {
    use super::testutil::*;
    use super::*;

    fn types() -> impl Iterator<Item = GgmlType> {
        [GgmlType::F32, GgmlType::F16, GgmlType::BF16]
            .into_iter()
            .chain(QUANTIZED)
    }

    /// The quantized dot must approximate the float dot of the dequantized weights with the activations:
    /// this checks the block layouts of dequantize_row and dot_scalar against each other.
    #[test]
    fn scalar_dot_matches_dequantized_float_dot() {
        let mut rng = Rng(0x9e3779b97f4a7c15);
        for t in types() {
            let k = 512;
            let w = random_row(t, k, &mut rng);
            let x: Vec<f32> = (0..k).map(|_| rng.f32()).collect();
            let mut wf = vec![0f32; k];
            dequantize_row(t, &w, &mut wf);
            let exact: f32 = wf.iter().zip(&x).map(|(a, b)| a * b).sum();
            let at = act_type(t).unwrap();
            let mut a = vec![0u8; at.row_bytes(k)];
            quantize_act(at, &x, &mut a);
            let got = dot_scalar(t, &w, &a, k);
            let scale: f32 = wf
                .iter()
                .zip(&x)
                .map(|(a, b)| (a * b).abs())
                .sum::<f32>()
                .max(1e-6);
            assert!(
                (got - exact).abs() / scale < 0.02,
                "{t:?}: {got} vs {exact} (scale {scale})"
            );
        }
    }

    #[test]
    fn q8k_roundtrip_error_is_small() {
        let mut rng = Rng(7);
        let x: Vec<f32> = (0..256).map(|_| rng.f32() * 3.0).collect();
        let mut q = vec![0u8; Q8K_BYTES];
        quantize_q8k(&x, &mut q);
        let d = rd_f32(&q, 0);
        for (j, &v) in x.iter().enumerate() {
            assert!((q[4 + j] as i8 as f32 * d - v).abs() <= d.abs() * 0.51 + 1e-6);
        }
    }
}
