//! Weight quantizers: f32 rows into the block types the engine computes on (Q8_0, Q4_0, Q5_0,
//! Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) and F16/BF16.
//!
//! Without importance weights these follow ggml's reference quantizers operation for operation
//! (same float operations in the same order, the same round-to-nearest trick, the same searches
//! over candidate scales), so that a file we write from the same input is byte-identical to
//! `llama-quantize`'s: a model quantized here is the model users already know, not a lookalike.
//! `tests/golden_quantize.rs` checks it against files `llama-quantize` wrote.

use half::{bf16, f16};
use porteiro_models::gguf::GgmlType;

const QK: usize = 32;
const QK_K: usize = 256;
/// Below this a group counts as all zeros (ggml's GROUP_MAX_EPS).
const GROUP_MAX_EPS: f32 = 1e-15;

/// The types [`quantize_row`] writes.
pub const WRITABLE: [GgmlType; 13] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Bytes of one row of `k` elements of type `t`, or None when `k` is not a whole number of blocks.
pub fn row_bytes(t: GgmlType, k: usize) -> Option<usize> {
    let (bs, ts) = t.block_layout()?;
    k.is_multiple_of(bs).then_some(k / bs * ts)
}

/// Quantizes `x` (a whole number of blocks) into `out` (exactly [`row_bytes`] long).
/// Panics on a type outside [`WRITABLE`] or mismatched lengths: callers check both up front.
pub fn quantize_row(t: GgmlType, x: &[f32], out: &mut [u8]) {
    assert_eq!(
        Some(out.len()),
        row_bytes(t, x.len()),
        "{t:?} row of {} elements",
        x.len()
    );
    match t {
        GgmlType::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
            }
        }
        GgmlType::BF16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&bf16::from_f32(*v).to_le_bytes());
            }
        }
        GgmlType::Q8_0 => blocks(x, out, QK, 34, q8_0),
        GgmlType::Q4_0 => blocks(x, out, QK, 18, q4_0),
        GgmlType::Q4_1 => blocks(x, out, QK, 20, q4_1),
        GgmlType::Q5_0 => blocks(x, out, QK, 22, q5_0),
        GgmlType::Q5_1 => blocks(x, out, QK, 24, q5_1),
        GgmlType::Q2_K => blocks(x, out, QK_K, 84, q2_k),
        GgmlType::Q3_K => blocks(x, out, QK_K, 110, q3_k),
        GgmlType::Q4_K => blocks(x, out, QK_K, 144, |x, y| qk_min(x, y, 15)),
        GgmlType::Q5_K => blocks(x, out, QK_K, 176, |x, y| qk_min(x, y, 31)),
        GgmlType::Q6_K => blocks(x, out, QK_K, 210, q6_k),
        t => panic!("no quantizer for {t:?}"),
    }
}

fn blocks(x: &[f32], out: &mut [u8], qk: usize, bytes: usize, f: impl Fn(&[f32], &mut [u8])) {
    for (x, y) in x.chunks_exact(qk).zip(out.chunks_exact_mut(bytes)) {
        f(x, y);
    }
}

fn put_f16(y: &mut [u8], at: usize, v: f32) {
    y[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

fn get_f16(y: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([y[at], y[at + 1]]).to_f32()
}

/// Round to nearest (ties to even) by adding 1.5·2^23, as ggml does; exact for |v| < 2^22, and for
/// larger values the same garbage ggml would produce.
fn nearest_int(v: f32) -> i32 {
    let bits = (v + 12_582_912.0f32).to_bits() as i32;
    (bits & 0x007f_ffff) - 0x0040_0000
}

/// The value of largest magnitude (the first of equals), with its sign.
fn signed_max(x: &[f32]) -> (f32, f32) {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    (amax, max)
}

fn q8_0(x: &[f32], y: &mut [u8]) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(y, 0, d);
    for (q, v) in y[2..34].iter_mut().zip(x) {
        *q = (v * id).round() as i8 as u8;
    }
}

fn q4_0(x: &[f32], y: &mut [u8]) {
    let (_, max) = signed_max(x);
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(y, 0, d);
    for j in 0..16 {
        // Truncation after +8.5 is ggml's rounding here (values are ≥ 0.5).
        let a = ((x[j] * id + 8.5) as i8).min(15) as u8;
        let b = ((x[j + 16] * id + 8.5) as i8).min(15) as u8;
        y[2 + j] = a | (b << 4);
    }
}

/// The block's smallest and largest value (ggml's scan, from ±FLT_MAX).
fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

fn q4_1(x: &[f32], y: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(y, 0, d);
    put_f16(y, 2, min);
    for j in 0..16 {
        let a = (((x[j] - min) * id + 0.5) as i8).min(15) as u8;
        let b = (((x[j + 16] - min) * id + 0.5) as i8).min(15) as u8;
        y[4 + j] = a | (b << 4);
    }
}

fn q5_0(x: &[f32], y: &mut [u8]) {
    let (_, max) = signed_max(x);
    let d = max / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(y, 0, d);
    let l: [u8; 32] = std::array::from_fn(|j| ((x[j] * id + 16.5) as i8).min(31) as u8);
    pack_q5(&l, &mut y[2..]);
}

fn q5_1(x: &[f32], y: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(y, 0, d);
    put_f16(y, 2, min);
    let l: [u8; 32] = std::array::from_fn(|j| ((x[j] - min) * id + 0.5) as u8);
    pack_q5(&l, &mut y[4..]);
}

/// Scale and min for one group of a K-quant with a minimum (Q4_K, Q5_K): start from the min–max
/// fit, then try `nstep + 1` scales around it, each refit by weighted least squares, keeping the one
/// with the least weighted squared error (absolute error with `mad`, as Q2_K asks). Returns
/// (scale, -min); `l` gets the levels.
#[allow(clippy::too_many_arguments)]
fn fit_scale_min(
    x: &[f32],
    w: &[f32],
    nmax: i32,
    l: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    mad: bool,
) -> (f32, f32) {
    let err = |diff: f32| if mad { diff.abs() } else { diff * diff };
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = w[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best = 0.0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        best += w[i] * err(diff);
    }
    let mut aux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            aux[i] = q as u8;
            let lf = q as f32;
            sum_l += w[i] * lf;
            sum_l2 += w[i] * lf * lf;
            sum_xl += w[i] * lf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur = 0.0f32;
            for i in 0..n {
                let diff = this_scale * aux[i] as f32 + this_min - x[i];
                cur += w[i] * err(diff);
            }
            if cur < best {
                l[..n].copy_from_slice(&aux[..n]);
                best = cur;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Q4_K (`nmax` 15) and Q5_K (`nmax` 31): eight groups of 32 with 6-bit scales and mins under two
/// f16 super-block factors.
fn qk_min(x: &[f32], y: &mut [u8], nmax: i32) {
    let (rmin, nstep) = if nmax == 15 { (-1.0, 20) } else { (-0.5, 15) };
    let mut l = [0u8; QK_K];
    let (mut scales, mut mins) = ([0.0f32; 8], [0.0f32; 8]);
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for j in 0..8 {
        let g = &x[32 * j..32 * j + 32];
        let av_x = (sum_sq(g) / 32.0).sqrt();
        let mut w = [0.0f32; 32];
        for (w, v) in w.iter_mut().zip(g) {
            *w = av_x + v.abs();
        }
        (scales[j], mins[j]) = fit_scale_min(
            g,
            &w,
            nmax,
            &mut l[32 * j..32 * j + 32],
            rmin,
            0.1,
            nstep,
            false,
        );
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let sc = &mut [0u8; 12];
    for j in 0..8 {
        // ggml stores the rounded int into a u8 first (wrapping), then caps at 63.
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            sc[j - 4] |= (ls >> 4) << 6;
            sc[j] |= (lm >> 4) << 6;
        }
    }
    put_f16(y, 0, max_scale / 63.0);
    put_f16(y, 2, max_min / 63.0);
    y[4..16].copy_from_slice(sc);
    finish_qk_min(x, y, &mut l, nmax, sc);
}

/// The levels against the stored (rounded) scales and mins, packed: shared by both fits.
fn finish_qk_min(x: &[f32], y: &mut [u8], l: &mut [u8; QK_K], nmax: i32, sc: &[u8; 12]) {
    let (d_all, m_all) = (get_f16(y, 0), get_f16(y, 2));
    for j in 0..8 {
        let (s, m) = crate::quant::k4_scale_min(j, sc);
        let d = d_all * s as f32;
        if d == 0.0 {
            continue;
        }
        let dm = m_all * m as f32;
        for i in 0..32 {
            l[32 * j + i] = nearest_int((x[32 * j + i] + dm) / d).clamp(0, nmax) as u8;
        }
    }
    if nmax == 15 {
        let qs = &mut y[16..144];
        for c in 0..4 {
            for i in 0..32 {
                qs[32 * c + i] = l[64 * c + i] | (l[64 * c + 32 + i] << 4);
            }
        }
    } else {
        let (qh, qs) = y[16..176].split_at_mut(32);
        qh.fill(0);
        for c in 0..4 {
            for i in 0..32 {
                let (mut a, mut b) = (l[64 * c + i], l[64 * c + 32 + i]);
                if a > 15 {
                    a -= 16;
                    qh[i] |= 1 << (2 * c);
                }
                if b > 15 {
                    b -= 16;
                    qh[i] |= 2 << (2 * c);
                }
                qs[32 * c + i] = a | (b << 4);
            }
        }
    }
}

/// Symmetric levels in [-nmax, nmax) for one group, weighted by x² (ggml's rmse_type 1): the
/// max-magnitude fit, then 18 nearby scales, keeping the best weighted least-squares fit. Returns
/// the scale; `l` gets levels offset by `nmax`.
fn fit_symmetric(x: &[f32], nmax: i32, l: &mut [i8], qw: Option<&[f32]>) -> f32 {
    let weight = |i: usize, v: f32| qw.map_or(v * v, |q| q[i]);
    let (amax, max) = signed_max(x);
    if amax < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let mut iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for (i, &v) in x.iter().enumerate() {
        let q = level(iscale, v);
        l[i] = (q + nmax) as i8;
        let w = weight(i, v);
        sumlx += w * v * q as f32;
        suml2 += w * q as f32 * q as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (mut slx, mut sl2) = (0.0f32, 0.0f32);
        for (i, &v) in x.iter().enumerate() {
            let q = level(iscale, v) as f32;
            let w = weight(i, v);
            slx += w * v * q;
            sl2 += w * q * q;
        }
        if sl2 > 0.0 && slx * slx > best * sl2 {
            for (i, &v) in x.iter().enumerate() {
                l[i] = (level(iscale, v) + nmax) as i8;
            }
            scale = slx / sl2;
            best = scale * slx;
        }
    }
    scale
}

fn q6_k(x: &[f32], y: &mut [u8]) {
    q6_k_weighted(x, y, None);
}

/// Q6_K: sixteen groups of 16 with signed 8-bit scales under one f16 factor; with importance
/// weights (`qw`, one per value of the block) each group's fit weighs its values by them.
fn q6_k_weighted(x: &[f32], y: &mut [u8], qw: Option<&[f32]>) {
    let mut l = [0i8; QK_K];
    let mut scales = [0.0f32; 16];
    let (mut max_scale, mut max_abs) = (0.0f32, 0.0f32);
    for ib in 0..16 {
        let g = 16 * ib..16 * ib + 16;
        let s = fit_symmetric(&x[g.clone()], 32, &mut l[g.clone()], qw.map(|q| &q[g]));
        scales[ib] = s;
        if s.abs() > max_abs {
            max_abs = s.abs();
            max_scale = s;
        }
    }
    if max_abs < GROUP_MAX_EPS {
        y.fill(0);
        return;
    }
    let iscale = -128.0 / max_scale;
    put_f16(y, 208, 1.0 / iscale);
    for ib in 0..16 {
        y[192 + ib] = nearest_int(iscale * scales[ib]).min(127) as i8 as u8;
    }
    let d_all = get_f16(y, 208);
    for j in 0..16 {
        let d = d_all * (y[192 + j] as i8) as f32;
        if d == 0.0 {
            continue;
        }
        for i in 0..16 {
            l[16 * j + i] = (nearest_int(x[16 * j + i] / d).clamp(-32, 31) + 32) as i8;
        }
    }
    let l = l.map(|v| v as u8);
    for h in 0..2 {
        let (j, ql, qh) = (128 * h, 64 * h, 128 + 32 * h);
        for i in 0..32 {
            let (q1, q2, q3, q4) = (l[j + i], l[j + i + 32], l[j + i + 64], l[j + i + 96]);
            y[ql + i] = (q1 & 0xF) | ((q3 & 0xF) << 4);
            y[ql + i + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4);
            y[qh + i] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
}

/// Symmetric levels in [-nmax, nmax) for one group by coordinate descent (ggml's make_q3_quants):
/// the max-magnitude fit, then up to five passes moving single levels while the x²-weighted
/// least-squares fit improves. Returns the scale; `l` gets levels offset by `nmax`.
fn fit_q3(x: &[f32], nmax: i32, l: &mut [i8]) -> f32 {
    let (amax, max) = signed_max(x);
    if amax < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for (i, &v) in x.iter().enumerate() {
        let q = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        l[i] = q as i8;
        let w = v * v;
        sumlx += w * v * q as f32;
        suml2 += w * q as f32 * q as f32;
    }
    for _ in 0..5 {
        let mut changed = false;
        for (i, &v) in x.iter().enumerate() {
            let w = v * v;
            let li = l[i] as f32;
            let mut slx = sumlx - w * v * li;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * li * li;
                let new_l = nearest_int(v * sl2 / slx).clamp(-nmax, nmax - 1);
                if new_l != l[i] as i32 {
                    let nf = new_l as f32;
                    slx += w * v * nf;
                    sl2 += w * nf * nf;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        l[i] = new_l as i8;
                        sumlx = slx;
                        suml2 = sl2;
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    for v in l.iter_mut() {
        *v += nmax as i8;
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// Q3_K: sixteen groups of 16 three-bit levels (value = level - 4) with 6-bit signed scales under
/// one f16 factor.
fn q3_k(x: &[f32], y: &mut [u8]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0.0f32; 16];
    let (mut amax, mut max_scale) = (0.0f32, 0.0f32);
    for j in 0..16 {
        scales[j] = fit_q3(&x[16 * j..16 * j + 16], 4, &mut l[16 * j..16 * j + 16]);
        if scales[j].abs() > amax {
            amax = scales[j].abs();
            max_scale = scales[j];
        }
    }
    let mut ls = [0u8; 16];
    if max_scale != 0.0 {
        let iscale = -32.0 / max_scale;
        for j in 0..16 {
            // ggml stores the rounded int in an int8_t before clamping: the same wrap here.
            ls[j] = ((nearest_int(iscale * scales[j]) as i8 as i32).clamp(-32, 31) + 32) as u8;
        }
        put_f16(y, 108, 1.0 / iscale);
    } else {
        put_f16(y, 108, 0.0);
    }
    finish_q3_k(x, y, &mut l, &ls);
}

/// Stores Q3_K's scales (`ls`, offset by 32), then the levels against the stored scales, packed.
fn finish_q3_k(x: &[f32], y: &mut [u8], l: &mut [i8; QK_K], ls: &[u8; 16]) {
    let sc = &mut y[96..108];
    sc.fill(0);
    for (j, &v) in ls.iter().enumerate() {
        if j < 8 {
            sc[j] = v & 0xF;
        } else {
            sc[j - 8] |= (v & 0xF) << 4;
        }
        sc[8 + j % 4] |= (v >> 4) << (2 * (j / 4));
    }
    let d_all = get_f16(y, 108);
    for j in 0..16 {
        let d = d_all * crate::quant::q3k_scale(&y[96..108], j) as f32;
        if d == 0.0 {
            continue;
        }
        for i in 16 * j..16 * j + 16 {
            l[i] = (nearest_int(x[i] / d).clamp(-4, 3) + 4) as i8;
        }
    }
    y[..32].fill(0);
    for (e, v) in l.iter_mut().enumerate() {
        if *v > 3 {
            y[e % 32] |= 1 << (e / 32);
            *v -= 4;
        }
    }
    pack_crumbs(&l.map(|v| v as u8), &mut y[32..96]);
}

/// Two-bit levels four to a byte, in the order of `quant::crumb`.
fn pack_crumbs(l: &[u8; QK_K], qs: &mut [u8]) {
    for h in 0..2 {
        let (j, q) = (128 * h, 32 * h);
        for i in 0..32 {
            qs[q + i] =
                l[j + i] | (l[j + i + 32] << 2) | (l[j + i + 64] << 4) | (l[j + i + 96] << 6);
        }
    }
}

/// Q2_K: sixteen groups of 16 two-bit levels, each group with a 4-bit scale and a 4-bit min under
/// two f16 factors; each group fitted by least absolute error weighted by |x|.
fn q2_k(x: &[f32], y: &mut [u8]) {
    let mut l = [0u8; QK_K];
    let (mut scales, mut mins) = ([0.0f32; 16], [0.0f32; 16]);
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for j in 0..16 {
        let g = &x[16 * j..16 * j + 16];
        let w: [f32; 16] = std::array::from_fn(|i| g[i].abs());
        (scales[j], mins[j]) =
            fit_scale_min(g, &w, 3, &mut l[16 * j..16 * j + 16], -0.5, 0.1, 15, true);
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    if max_scale > 0.0 {
        let iscale = 15.0 / max_scale;
        for j in 0..16 {
            y[j] = nearest_int(iscale * scales[j]) as u8;
        }
        put_f16(y, 80, max_scale / 15.0);
    } else {
        y[..16].fill(0);
        put_f16(y, 80, 0.0);
    }
    if max_min > 0.0 {
        let iscale = 15.0 / max_min;
        for j in 0..16 {
            y[j] |= (nearest_int(iscale * mins[j]) << 4) as u8;
        }
        put_f16(y, 82, max_min / 15.0);
    } else {
        put_f16(y, 82, 0.0);
    }
    finish_q2_k(x, y, &mut l);
}

/// The levels against Q2_K's stored scales and mins, packed.
fn finish_q2_k(x: &[f32], y: &mut [u8], l: &mut [u8; QK_K]) {
    let (d_all, m_all) = (get_f16(y, 80), get_f16(y, 82));
    for j in 0..16 {
        let d = d_all * (y[j] & 0xF) as f32;
        if d == 0.0 {
            continue;
        }
        let dm = m_all * (y[j] >> 4) as f32;
        for i in 16 * j..16 * j + 16 {
            l[i] = nearest_int((x[i] + dm) / d).clamp(0, 3) as u8;
        }
    }
    pack_crumbs(l, &mut y[16..80]);
}

// ---------------------------------------------------------------------------------------------
// With importance weights (an imatrix: mean squared activation per input column), as ggml's
// `quantize_row_*_impl`: each value's error counts by how much its column matters.

/// Σ x², summed in order (the σ² of ggml's importance weights is a multiple of it over the length).
fn sum_sq(x: &[f32]) -> f32 {
    let mut s = 0.0f32;
    for v in x {
        s += v * v;
    }
    s
}

/// Importance weights of one group (`x` its values, `qw` their columns' importances):
/// qw · sqrt(σ² + x²) per value, and their sum (in order, as ggml adds them).
fn group_weights<const G: usize>(x: &[f32], qw: &[f32], sigma2: f32) -> ([f32; G], f32) {
    let w: [f32; G] = std::array::from_fn(|i| qw[i] * (sigma2 + x[i] * x[i]).sqrt());
    let mut sum = 0.0f32;
    for wi in &w {
        sum += wi;
    }
    (w, sum)
}

/// Quantizes one row with importance weights `qw` (one per column); None as [`quantize_row`].
/// Types without a weighted form (Q8_0, F16, …) ignore them, as ggml does.
pub fn quantize_row_weighted(t: GgmlType, x: &[f32], out: &mut [u8], qw: Option<&[f32]>) {
    let Some(qw) = qw.filter(|q| q.len() == x.len()) else {
        return quantize_row(t, x, out);
    };
    assert_eq!(Some(out.len()), row_bytes(t, x.len()), "{t:?} row");
    let sigma2 = || sum_sq(x) / x.len() as f32;
    match t {
        GgmlType::Q4_0 | GgmlType::Q5_0 => {
            let (nmax, bytes) = if t == GgmlType::Q4_0 {
                (8, 18)
            } else {
                (16, 22)
            };
            let s2 = sigma2();
            for ((xb, qb), y) in x
                .chunks_exact(QK)
                .zip(qw.chunks_exact(QK))
                .zip(out.chunks_exact_mut(bytes))
            {
                let (w, _) = group_weights::<32>(xb, qb, s2);
                let mut l = [0i8; 32];
                let d = fit_symmetric(xb, nmax, &mut l, Some(&w));
                put_f16(y, 0, d);
                let l = l.map(|v| v as u8);
                if t == GgmlType::Q4_0 {
                    for j in 0..16 {
                        y[2 + j] = l[j] | (l[j + 16] << 4);
                    }
                } else {
                    pack_q5(&l, &mut y[2..]);
                }
            }
        }
        GgmlType::Q4_1 | GgmlType::Q5_1 => {
            let (nmax, bytes) = if t == GgmlType::Q4_1 {
                (15, 20)
            } else {
                (31, 24)
            };
            let s2 = sigma2();
            for ((xb, qb), y) in x
                .chunks_exact(QK)
                .zip(qw.chunks_exact(QK))
                .zip(out.chunks_exact_mut(bytes))
            {
                let (w, _) = group_weights::<32>(xb, qb, s2);
                let mut l = [0u8; 32];
                let (d, min) = fit_scale_min_weighted(xb, &w, nmax, &mut l);
                put_f16(y, 0, d);
                put_f16(y, 2, -min);
                if t == GgmlType::Q4_1 {
                    for j in 0..16 {
                        y[4 + j] = l[j] | (l[j + 16] << 4);
                    }
                } else {
                    pack_q5(&l, &mut y[4..]);
                }
            }
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            let (nmax, bytes) = if t == GgmlType::Q4_K {
                (15, 144)
            } else {
                (31, 176)
            };
            for ((xb, qb), y) in x
                .chunks_exact(QK_K)
                .zip(qw.chunks_exact(QK_K))
                .zip(out.chunks_exact_mut(bytes))
            {
                qk_min_weighted(xb, qb, y, nmax);
            }
        }
        GgmlType::Q2_K | GgmlType::Q3_K => {
            type Weighted = fn(&[f32], &[f32], &mut [u8]);
            let (bytes, f): (usize, Weighted) = if t == GgmlType::Q2_K {
                (84, q2_k_weighted)
            } else {
                (110, q3_k_weighted)
            };
            for ((xb, qb), y) in x
                .chunks_exact(QK_K)
                .zip(qw.chunks_exact(QK_K))
                .zip(out.chunks_exact_mut(bytes))
            {
                f(xb, qb, y);
            }
        }
        GgmlType::Q6_K => {
            for ((xb, qb), y) in x
                .chunks_exact(QK_K)
                .zip(qw.chunks_exact(QK_K))
                .zip(out.chunks_exact_mut(210))
            {
                q6_k_weighted(xb, y, Some(qb));
            }
        }
        _ => quantize_row(t, x, out),
    }
}

/// Q5_0/Q5_1's layout: 32 five-bit levels as four high bits (a u32) then 16 bytes of low nibbles.
fn pack_q5(l: &[u8; 32], y: &mut [u8]) {
    let mut qh = 0u32;
    for j in 0..16 {
        let (a, b) = (l[j], l[j + 16]);
        y[4 + j] = (a & 0xF) | ((b & 0xF) << 4);
        qh |= (((a & 0x10) >> 4) as u32) << j;
        qh |= (((b & 0x10) >> 4) as u32) << (j + 16);
    }
    y[..4].copy_from_slice(&qh.to_le_bytes());
}

/// [`fit_scale_min`] with ggml's imatrix search (make_qkx3_quants: 37 scales from nmax − 0.9 in
/// steps of 0.05; its `max <= min` test is qkx2's `max == min`, as min ≤ max after the clamp).
fn fit_scale_min_weighted(x: &[f32], w: &[f32], nmax: i32, l: &mut [u8]) -> (f32, f32) {
    fit_scale_min(x, w, nmax, l, -0.9, 0.05, 36, false)
}

/// A super-block's integer scales (or mins) for its groups (at most 16), fitted by weighted least
/// squares (make_qp_quants): levels in [0, nmax], the weights each group's summed weight.
fn fit_positive(x: &[f32], nmax: i32, l: &mut [u8], qw: &[f32]) -> f32 {
    let n = x.len();
    let mut max = 0.0f32;
    for &v in x {
        max = max.max(v);
    }
    if max < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let mut iscale = nmax as f32 / max;
    for i in 0..n {
        l[i] = nearest_int(iscale * x[i]) as u8;
    }
    let scale = 1.0 / iscale;
    let mut best = 0.0f32;
    for i in 0..n {
        let diff = x[i] - scale * l[i] as f32;
        best += qw[i] * diff * diff;
    }
    for is in -4..=4 {
        if is == 0 {
            continue;
        }
        let iscale_is = (0.1 * is as f32 + nmax as f32) / max;
        let scale_is = 1.0 / iscale_is;
        let mut mse = 0.0f32;
        for i in 0..n {
            let q = nearest_int(iscale_is * x[i]).min(nmax);
            let diff = x[i] - scale_is * q as f32;
            mse += qw[i] * diff * diff;
        }
        if mse < best {
            best = mse;
            iscale = iscale_is;
        }
    }
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    let mut li = [0i32; 16];
    for i in 0..n {
        li[i] = nearest_int(iscale * x[i]).min(nmax);
        let lf = li[i] as f32;
        sumlx += qw[i] * x[i] * lf;
        suml2 += qw[i] * lf * lf;
    }
    for _ in 0..5 {
        let mut changed = 0;
        for i in 0..n {
            let w = qw[i];
            let lf = li[i] as f32;
            let mut slx = sumlx - w * x[i] * lf;
            let mut sl2 = suml2 - w * lf * lf;
            if slx > 0.0 && sl2 > 0.0 {
                let new_l = nearest_int(x[i] * sl2 / slx).min(nmax);
                if new_l != li[i] {
                    let nf = new_l as f32;
                    slx += w * x[i] * nf;
                    sl2 += w * nf * nf;
                    if slx * slx * suml2 > sumlx * sumlx * sl2 {
                        li[i] = new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        changed += 1;
                    }
                }
            }
        }
        if changed == 0 {
            break;
        }
    }
    for i in 0..n {
        l[i] = li[i] as u8;
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// Q4_K/Q5_K with importance weights.
fn qk_min_weighted(x: &[f32], qw: &[f32], y: &mut [u8], nmax: i32) {
    let sigma2 = 2.0 * sum_sq(x) / QK_K as f32;
    let mut l = [0u8; QK_K];
    let (mut scales, mut mins, mut sw) = ([0.0f32; 8], [0.0f32; 8], [0.0f32; 8]);
    for j in 0..8 {
        let g = 32 * j..32 * j + 32;
        let (w, sum) = group_weights::<32>(&x[g.clone()], &qw[g.clone()], sigma2);
        sw[j] = sum;
        (scales[j], mins[j]) = fit_scale_min_weighted(&x[g.clone()], &w, nmax, &mut l[g]);
    }
    let (mut ls, mut lm) = ([0u8; 8], [0u8; 8]);
    let d_block = fit_positive(&scales, 63, &mut ls, &sw);
    let m_block = fit_positive(&mins, 63, &mut lm, &sw);
    let mut sc = [0u8; 12];
    for j in 0..8 {
        let (a, b) = (ls[j], lm[j]);
        if j < 4 {
            sc[j] = a;
            sc[j + 4] = b;
        } else {
            sc[j + 4] = (a & 0xF) | ((b & 0xF) << 4);
            sc[j - 4] |= (a >> 4) << 6;
            sc[j] |= (b >> 4) << 6;
        }
    }
    put_f16(y, 0, d_block);
    put_f16(y, 2, m_block);
    y[4..16].copy_from_slice(&sc);
    finish_qk_min(x, y, &mut l, nmax, &sc);
}

/// Q2_K with importance weights: each group's scale and min by weighted least squares, then the
/// sixteen scales and mins themselves fitted to 4 bits, weighted by their groups' total weight.
fn q2_k_weighted(x: &[f32], qw: &[f32], y: &mut [u8]) {
    let sigma2 = sum_sq(x) / QK_K as f32;
    let mut l = [0u8; QK_K];
    let (mut scales, mut mins, mut sw) = ([0.0f32; 16], [0.0f32; 16], [0.0f32; 16]);
    for j in 0..16 {
        let g = 16 * j..16 * j + 16;
        let (w, sum) = group_weights::<16>(&x[g.clone()], &qw[g.clone()], sigma2);
        sw[j] = sum;
        (scales[j], mins[j]) = fit_scale_min_weighted(&x[g.clone()], &w, 3, &mut l[g]);
    }
    let (mut ls, mut lm) = ([0u8; 16], [0u8; 16]);
    let dm = fit_positive(&scales, 15, &mut ls, &sw);
    let mm = fit_positive(&mins, 15, &mut lm, &sw);
    put_f16(y, 80, dm);
    put_f16(y, 82, mm);
    for j in 0..16 {
        y[j] = ls[j] | (lm[j] << 4);
    }
    finish_q2_k(x, y, &mut l);
}

/// Q3_K with importance weights: groups fitted by weighted least squares, then the sixteen scales
/// themselves fitted to 6 bits, weighted by their groups' total weight.
fn q3_k_weighted(x: &[f32], qw: &[f32], y: &mut [u8]) {
    let sigma2 = 2.0 * sum_sq(x) / QK_K as f32;
    let mut l = [0i8; QK_K];
    let (mut scales, mut sw) = ([0.0f32; 16], [0.0f32; 16]);
    for j in 0..16 {
        let g = 16 * j..16 * j + 16;
        let (w, sum) = group_weights::<16>(&x[g.clone()], &qw[g.clone()], sigma2);
        sw[j] = sum;
        scales[j] = fit_symmetric(&x[g.clone()], 4, &mut l[g], Some(&w));
    }
    let mut ls = [0i8; 16];
    let d_block = fit_symmetric(&scales, 32, &mut ls, Some(&sw));
    put_f16(y, 108, d_block);
    finish_q3_k(x, y, &mut l, &ls.map(|v| v as u8));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::dequantize_row;

    fn row(k: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::quant::testutil::Rng(seed);
        // Weights look roughly Gaussian with a few outliers; the outliers are what the scale
        // searches are for.
        (0..k)
            .map(|i| {
                let u = (0..4).map(|_| rng.f32()).sum::<f32>();
                if i % 97 == 3 {
                    u * 0.2
                } else {
                    u * 0.05
                }
            })
            .collect()
    }

    fn rmse(a: &[f32], b: &[f32]) -> f32 {
        (a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f32>() / a.len() as f32).sqrt()
    }

    #[test]
    fn nearest_int_rounds_ties_to_even() {
        assert_eq!(
            [0.5, 1.5, 2.5, -0.5, -1.5, 3.49, -3.51].map(nearest_int),
            [0, 2, 2, 0, -2, 3, -4]
        );
    }

    /// Each type's round trip is as close as its bits allow, and more bits are closer.
    #[test]
    fn round_trip_error_falls_with_bits() {
        let x = row(4 * QK_K, 7);
        let mut errs = Vec::new();
        for t in [
            GgmlType::Q2_K,
            GgmlType::Q3_K,
            GgmlType::Q4_0,
            GgmlType::Q4_K,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
            GgmlType::Q8_0,
            GgmlType::F16,
        ] {
            let mut q = vec![0u8; row_bytes(t, x.len()).unwrap()];
            quantize_row(t, &x, &mut q);
            let mut back = vec![0.0; x.len()];
            dequantize_row(t, &q, &mut back);
            errs.push((t, rmse(&x, &back)));
        }
        let e = |t| errs.iter().find(|(u, _)| *u == t).unwrap().1;
        assert!(e(GgmlType::Q3_K) < e(GgmlType::Q2_K), "{errs:?}");
        assert!(e(GgmlType::Q4_K) < e(GgmlType::Q3_K), "{errs:?}");
        assert!(e(GgmlType::Q4_K) < e(GgmlType::Q4_0), "{errs:?}");
        assert!(e(GgmlType::Q5_K) < e(GgmlType::Q4_K), "{errs:?}");
        assert!(e(GgmlType::Q6_K) < e(GgmlType::Q5_K), "{errs:?}");
        assert!(e(GgmlType::Q8_0) < e(GgmlType::Q6_K), "{errs:?}");
        assert!(e(GgmlType::F16) < e(GgmlType::Q8_0), "{errs:?}");
        assert!(e(GgmlType::Q4_0) < 0.05, "{errs:?}");
    }

    /// Values exactly on a type's grid come back exactly.
    #[test]
    fn grid_values_are_exact() {
        let x: Vec<f32> = (0..QK).map(|i| (i as f32 - 8.0) * 0.25).collect();
        let mut q = vec![0u8; 34];
        quantize_row(GgmlType::Q8_0, &x, &mut q);
        let mut back = vec![0.0; QK];
        dequantize_row(GgmlType::Q8_0, &q, &mut back);
        let scale = 23.0 * 0.25 / 127.0; // amax / 127, as an f16
        for (a, b) in x.iter().zip(&back) {
            assert!((a - b).abs() <= scale, "{a} vs {b}");
        }
    }

    #[test]
    fn zeros_stay_zeros() {
        for t in WRITABLE {
            let Some(n) = row_bytes(t, QK_K) else {
                continue;
            };
            let mut q = vec![0xAAu8; n];
            quantize_row(t, &[0.0; QK_K], &mut q);
            let mut back = vec![1.0; QK_K];
            dequantize_row(t, &q, &mut back);
            assert!(back.iter().all(|v| *v == 0.0), "{t:?}");
        }
    }

    #[test]
    fn partial_blocks_are_refused() {
        assert_eq!(row_bytes(GgmlType::Q4_K, 896), None);
        assert_eq!(row_bytes(GgmlType::Q5_0, 896), Some(28 * 22));
    }
}
