//! Integer-SIMD dot products (AVX2 + FMA, chosen at run time) for the weight types that dominate real
//! models. Each kernel computes exactly the same integer block sums as `quant::dot_scalar`; only the
//! order of the float accumulation differs. Other CPUs and types fall back to the scalar reference.

use crate::quant::{self, Q8K_BYTES, Q8_BYTES};
use porteiro_models::gguf::GgmlType;
use std::sync::OnceLock;

/// A dot-product kernel: (weight row bytes, activation row bytes, elements) -> sum.
pub type DotFn = fn(&[u8], &[u8], usize) -> f32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
}

/// The instruction set used for this process. `PORTEIRO_ISA=scalar` forces the reference kernels.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        if std::env::var("PORTEIRO_ISA").is_ok_and(|v| v == "scalar") {
            return Isa::Scalar;
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            return Isa::Avx2;
        }
        Isa::Scalar
    })
}

macro_rules! scalar_fn {
    ($name:ident, $t:expr) => {
        fn $name(w: &[u8], a: &[u8], k: usize) -> f32 {
            quant::dot_scalar($t, w, a, k)
        }
    };
}
scalar_fn!(s_f32, GgmlType::F32);
scalar_fn!(s_f16, GgmlType::F16);
scalar_fn!(s_bf16, GgmlType::BF16);
scalar_fn!(s_q4_0, GgmlType::Q4_0);
scalar_fn!(s_q4_1, GgmlType::Q4_1);
scalar_fn!(s_q5_0, GgmlType::Q5_0);
scalar_fn!(s_q5_1, GgmlType::Q5_1);
scalar_fn!(s_q8_0, GgmlType::Q8_0);
scalar_fn!(s_q4_k, GgmlType::Q4_K);
scalar_fn!(s_q5_k, GgmlType::Q5_K);
scalar_fn!(s_q6_k, GgmlType::Q6_K);

/// The scalar reference kernel for a type (None if unsupported).
pub fn scalar_kernel(t: GgmlType) -> Option<DotFn> {
    Some(match t {
        GgmlType::F32 => s_f32,
        GgmlType::F16 => s_f16,
        GgmlType::BF16 => s_bf16,
        GgmlType::Q4_0 => s_q4_0,
        GgmlType::Q4_1 => s_q4_1,
        GgmlType::Q5_0 => s_q5_0,
        GgmlType::Q5_1 => s_q5_1,
        GgmlType::Q8_0 => s_q8_0,
        GgmlType::Q4_K => s_q4_k,
        GgmlType::Q5_K => s_q5_k,
        GgmlType::Q6_K => s_q6_k,
        _ => return None,
    })
}

/// The fastest kernel for a type on this CPU.
pub fn kernel(t: GgmlType) -> Option<DotFn> {
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx2 {
        let k: Option<DotFn> = match t {
            GgmlType::F32 => Some(avx2::f32_safe),
            GgmlType::F16 => Some(avx2::f16_safe),
            GgmlType::Q4_0 => Some(avx2::q4_0_safe),
            GgmlType::Q4_1 => Some(avx2::q4_1_safe),
            GgmlType::Q5_0 => Some(avx2::q5_0_safe),
            GgmlType::Q8_0 => Some(avx2::q8_0_safe),
            GgmlType::Q4_K => Some(avx2::q4_k_safe),
            GgmlType::Q6_K => Some(avx2::q6_k_safe),
            _ => None,
        };
        if k.is_some() {
            return k;
        }
    }
    scalar_kernel(t)
}

/// f32 dot product (attention scores); vectorised where the CPU allows.
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx2 {
        // SAFETY: AVX2/FMA presence checked by isa().
        return unsafe { avx2::dot_f32(a, b) };
    }
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// y += alpha * x
#[inline]
pub fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx2 {
        // SAFETY: AVX2/FMA presence checked by isa().
        return unsafe { avx2::axpy(y, alpha, x) };
    }
    for (o, v) in y.iter_mut().zip(x) {
        *o += alpha * v;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    macro_rules! safe {
        ($safe:ident, $inner:ident) => {
            pub fn $safe(w: &[u8], a: &[u8], k: usize) -> f32 {
                // SAFETY: only handed out by `kernel()` after the CPU features were detected; the
                // slices are at least as long as k elements of their formats (checked in the kernels
                // by chunked iteration).
                unsafe { $inner(w, a, k) }
            }
        };
    }
    safe!(f32_safe, f32_dot);
    safe!(f16_safe, f16_dot);
    safe!(q4_0_safe, q4_0);
    safe!(q4_1_safe, q4_1);
    safe!(q5_0_safe, q5_0);
    safe!(q8_0_safe, q8_0);
    safe!(q4_k_safe, q4_k);
    safe!(q6_k_safe, q6_k);

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[inline(always)]
    unsafe fn rd_f32(b: &[u8], i: usize) -> f32 {
        f32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
    }

    #[inline(always)]
    unsafe fn f16(b: &[u8], i: usize) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
            u16::from_le_bytes([b[i], b[i + 1]]) as i32,
        )))
    }

    /// 32 unsigned bytes (<128) times 32 signed bytes, summed pairwise to 8 i32 lanes.
    #[inline(always)]
    unsafe fn mul_u8_i8(u: __m256i, s: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
    }

    /// Signed by signed bytes: move the sign of x onto y so that maddubs sees |x| unsigned.
    #[inline(always)]
    unsafe fn mul_i8_i8(x: __m256i, y: __m256i) -> __m256i {
        mul_u8_i8(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
    }

    /// 16 bytes of packed nibbles -> 32 bytes: low nibbles first, then high nibbles.
    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let t = _mm_loadu_si128(p as *const __m128i);
        let both = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
        _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
    }

    /// 32 bits -> 32 bytes, 0xFF where the bit is set.
    #[inline(always)]
    unsafe fn bits_to_bytes(bits: u32) -> __m256i {
        let x = _mm256_set1_epi32(bits as i32);
        let shuf = _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3,
            3, 3, 3,
        );
        let bytes = _mm256_shuffle_epi8(x, shuf);
        let sel = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe_u64 as i64));
        _mm256_cmpeq_epi8(sel, _mm256_set1_epi64x(-1))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_0(w: &[u8], a: &[u8], _k: usize) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (wb, ab) in w.chunks_exact(18).zip(a.chunks_exact(Q8_BYTES)) {
            let d = _mm256_set1_ps(f16(wb, 0) * rd_f32(ab, 0));
            let q = _mm256_sub_epi8(nibbles(wb.as_ptr().add(2)), _mm256_set1_epi8(8));
            let y = _mm256_loadu_si256(ab.as_ptr().add(8) as *const __m256i);
            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(mul_i8_i8(q, y)), acc);
        }
        hsum(acc)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_1(w: &[u8], a: &[u8], _k: usize) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut mins = 0f32;
        for (wb, ab) in w.chunks_exact(20).zip(a.chunks_exact(Q8_BYTES)) {
            let d = _mm256_set1_ps(f16(wb, 0) * rd_f32(ab, 0));
            mins += f16(wb, 2) * rd_f32(ab, 4);
            let q = nibbles(wb.as_ptr().add(4));
            let y = _mm256_loadu_si256(ab.as_ptr().add(8) as *const __m256i);
            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(mul_u8_i8(q, y)), acc);
        }
        hsum(acc) + mins
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q5_0(w: &[u8], a: &[u8], _k: usize) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (wb, ab) in w.chunks_exact(22).zip(a.chunks_exact(Q8_BYTES)) {
            let d = _mm256_set1_ps(f16(wb, 0) * rd_f32(ab, 0));
            let qh = u32::from_le_bytes([wb[2], wb[3], wb[4], wb[5]]);
            // Where the fifth bit is clear the value is q4 - 16, i.e. q4 with the top nibble set.
            let hi = _mm256_andnot_si256(bits_to_bytes(qh), _mm256_set1_epi8(0xF0u8 as i8));
            let q = _mm256_or_si256(nibbles(wb.as_ptr().add(6)), hi);
            let y = _mm256_loadu_si256(ab.as_ptr().add(8) as *const __m256i);
            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(mul_i8_i8(q, y)), acc);
        }
        hsum(acc)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_0(w: &[u8], a: &[u8], _k: usize) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (wb, ab) in w.chunks_exact(34).zip(a.chunks_exact(Q8_BYTES)) {
            let d = _mm256_set1_ps(f16(wb, 0) * rd_f32(ab, 0));
            let q = _mm256_loadu_si256(wb.as_ptr().add(2) as *const __m256i);
            let y = _mm256_loadu_si256(ab.as_ptr().add(8) as *const __m256i);
            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(mul_i8_i8(q, y)), acc);
        }
        hsum(acc)
    }

    #[inline(always)]
    fn k4_scales(sc: &[u8]) -> ([i16; 8], [i16; 8]) {
        let (mut s, mut m) = ([0i16; 8], [0i16; 8]);
        for j in 0..8 {
            let (a, b) = if j < 4 {
                (sc[j] & 63, sc[j + 4] & 63)
            } else {
                (
                    (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4),
                    (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4),
                )
            };
            s[j] = a as i16;
            m[j] = b as i16;
        }
        (s, m)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_k(w: &[u8], a: &[u8], _k: usize) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut acc_m = 0f32;
        let low = _mm256_set1_epi8(0x0F);
        for (wb, ab) in w.chunks_exact(144).zip(a.chunks_exact(Q8K_BYTES)) {
            let ad = rd_f32(ab, 0);
            let (sc, mn) = k4_scales(&wb[4..16]);
            let mut summ = 0i32;
            for j in 0..8 {
                let bs = i16::from_le_bytes([ab[260 + 4 * j], ab[261 + 4 * j]]) as i32
                    + i16::from_le_bytes([ab[262 + 4 * j], ab[263 + 4 * j]]) as i32;
                summ += mn[j] as i32 * bs;
            }
            acc_m += ad * f16(wb, 2) * summ as f32;
            let qs = wb.as_ptr().add(16);
            let y = ab.as_ptr().add(4);
            let mut sumi = _mm256_setzero_si256();
            for c in 0..4 {
                let bits = _mm256_loadu_si256(qs.add(32 * c) as *const __m256i);
                let ql = _mm256_and_si256(bits, low);
                let qh = _mm256_and_si256(_mm256_srli_epi16(bits, 4), low);
                let yl = _mm256_loadu_si256(y.add(64 * c) as *const __m256i);
                let yh = _mm256_loadu_si256(y.add(64 * c + 32) as *const __m256i);
                let pl =
                    _mm256_madd_epi16(_mm256_maddubs_epi16(ql, yl), _mm256_set1_epi16(sc[2 * c]));
                let ph = _mm256_madd_epi16(
                    _mm256_maddubs_epi16(qh, yh),
                    _mm256_set1_epi16(sc[2 * c + 1]),
                );
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(pl, ph));
            }
            acc = _mm256_fmadd_ps(
                _mm256_set1_ps(ad * f16(wb, 0)),
                _mm256_cvtepi32_ps(sumi),
                acc,
            );
        }
        hsum(acc) - acc_m
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q6_k(w: &[u8], a: &[u8], _k: usize) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let low = _mm256_set1_epi8(0x0F);
        let three = _mm256_set1_epi8(3);
        let m32 = _mm256_set1_epi8(32);
        for (wb, ab) in w.chunks_exact(210).zip(a.chunks_exact(Q8K_BYTES)) {
            let d = rd_f32(ab, 0) * f16(wb, 208);
            let mut sumi = _mm256_setzero_si256();
            for half in 0..2 {
                let ql = wb.as_ptr().add(64 * half);
                let qh = _mm256_loadu_si256(wb.as_ptr().add(128 + 32 * half) as *const __m256i);
                let sc = &wb[192 + 8 * half..200 + 8 * half];
                let l1 = _mm256_loadu_si256(ql as *const __m256i);
                let l2 = _mm256_loadu_si256(ql.add(32) as *const __m256i);
                let h = |s: i32| -> __m256i {
                    let v = match s {
                        0 => qh,
                        2 => _mm256_srli_epi16(qh, 2),
                        4 => _mm256_srli_epi16(qh, 4),
                        _ => _mm256_srli_epi16(qh, 6),
                    };
                    _mm256_slli_epi16(_mm256_and_si256(v, three), 4)
                };
                let q = [
                    _mm256_or_si256(_mm256_and_si256(l1, low), h(0)),
                    _mm256_or_si256(_mm256_and_si256(l2, low), h(2)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low), h(4)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l2, 4), low), h(6)),
                ];
                let y = ab.as_ptr().add(4 + 128 * half);
                for (i, qi) in q.iter().enumerate() {
                    let yv = _mm256_loadu_si256(y.add(32 * i) as *const __m256i);
                    let p = _mm256_sub_epi16(
                        _mm256_maddubs_epi16(*qi, yv),
                        _mm256_maddubs_epi16(m32, yv),
                    );
                    let s = _mm256_set_m128i(
                        _mm_set1_epi16(sc[2 * i + 1] as i8 as i16),
                        _mm_set1_epi16(sc[2 * i] as i8 as i16),
                    );
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, s));
                }
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        }
        hsum(acc)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16_dot(w: &[u8], a: &[u8], k: usize) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let n8 = k / 8 * 8;
        let mut i = 0;
        while i < n8 {
            let wv = _mm256_cvtph_ps(_mm_loadu_si128(w.as_ptr().add(2 * i) as *const __m128i));
            let av = _mm256_loadu_ps(a.as_ptr().add(4 * i) as *const f32);
            acc = _mm256_fmadd_ps(wv, av, acc);
            i += 8;
        }
        let mut s = hsum(acc);
        for j in n8..k {
            s += f16(w, 2 * j) * rd_f32(a, 4 * j);
        }
        s
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f32_dot(w: &[u8], a: &[u8], k: usize) -> f32 {
        let (wf, af) = (w.as_ptr() as *const f32, a.as_ptr() as *const f32);
        dot_raw(
            std::slice::from_raw_parts(wf, k),
            std::slice::from_raw_parts(af, k),
        )
    }

    #[inline(always)]
    unsafe fn dot_raw(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let n16 = n / 16 * 16;
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i < n16 {
            s0 = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
                s0,
            );
            s1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i + 8)),
                _mm256_loadu_ps(b.as_ptr().add(i + 8)),
                s1,
            );
            i += 16;
        }
        let mut s = hsum(_mm256_add_ps(s0, s1));
        for j in n16..n {
            s += a[j] * b[j];
        }
        s
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        dot_raw(a, b)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
        let n = y.len().min(x.len());
        let n8 = n / 8 * 8;
        let av = _mm256_set1_ps(alpha);
        let mut i = 0;
        while i < n8 {
            let p = y.as_mut_ptr().add(i);
            _mm256_storeu_ps(
                p,
                _mm256_fmadd_ps(av, _mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(p)),
            );
            i += 8;
        }
        for j in n8..n {
            y[j] += alpha * x[j];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::testutil::{random_row, Rng};
    use crate::quant::{act_type, quantize_act};

    /// Every SIMD kernel against the scalar reference on random blocks, several lengths.
    #[test]
    fn simd_kernels_match_scalar_reference() {
        if isa() == Isa::Scalar {
            eprintln!("no AVX2 on this CPU: only the scalar kernels are in use");
            return;
        }
        let mut rng = Rng(12345);
        for t in [
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q8_0,
            GgmlType::Q4_K,
            GgmlType::Q6_K,
        ] {
            for k in [256usize, 512, 768, 2304] {
                for _ in 0..20 {
                    let w = random_row(t, k, &mut rng);
                    let x: Vec<f32> = (0..k).map(|_| rng.f32() * 4.0).collect();
                    let at = act_type(t).unwrap();
                    let mut a = vec![0u8; at.row_bytes(k)];
                    quantize_act(at, &x, &mut a);
                    let s = scalar_kernel(t).unwrap()(&w, &a, k);
                    let v = kernel(t).unwrap()(&w, &a, k);
                    assert!(
                        (s - v).abs() <= 1e-4 * s.abs().max(1.0),
                        "{t:?} k={k}: simd {v} scalar {s}"
                    );
                }
            }
        }
    }

    #[test]
    fn f32_helpers_handle_tails() {
        let mut rng = Rng(3);
        for n in [1usize, 7, 8, 15, 16, 17, 64, 100] {
            let a: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
            let b: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
            let r: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot_f32(&a, &b) - r).abs() < 1e-5);
            let mut y = b.clone();
            axpy(&mut y, 0.5, &a);
            for i in 0..n {
                assert!((y[i] - (b[i] + 0.5 * a[i])).abs() < 1e-6);
            }
        }
    }
}
