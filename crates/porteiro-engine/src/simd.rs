//! Integer-SIMD dot products (AVX2 + FMA, chosen at run time) for the weight types that dominate real
//! models. Each kernel computes exactly the same integer block sums as `quant::dot_scalar`; only the
//! order of the float accumulation differs. Other CPUs and types fall back to the scalar reference.

// std::arch intrinsics are unsafe to call: each kernel runs only once `isa()` or
// is_x86_feature_detected! has found the CPU features it is compiled for, and reads raw pointers
// into blocks whose lengths the safe entry points check.
#![allow(unsafe_code)]

use crate::quant::{self, Q8K_BYTES, Q8_BYTES};
use porteiro_models::gguf::GgmlType;
use std::sync::OnceLock;

/// A dot-product kernel: (weight row bytes, activation row bytes, elements) -> sum.
pub type DotFn = fn(&[u8], &[u8], usize) -> f32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
    /// AVX2 plus AVX-VNNI (vpdpbusd on 256-bit vectors).
    Avx2Vnni,
}

/// The instruction set used for this process. `PORTEIRO_ISA=scalar|avx2|avx2vnni` caps what is used
/// (`avx2vnni` keeps AVX-VNNI but not the AVX-512 tiles).
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let cap = std::env::var("PORTEIRO_ISA").unwrap_or_default();
        if cap == "scalar" {
            return Isa::Scalar;
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            if cap != "avx2" && is_x86_feature_detected!("avxvnni") {
                return Isa::Avx2Vnni;
            }
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
scalar_fn!(s_q2_k, GgmlType::Q2_K);
scalar_fn!(s_q3_k, GgmlType::Q3_K);
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
        GgmlType::Q2_K => s_q2_k,
        GgmlType::Q3_K => s_q3_k,
        GgmlType::Q4_K => s_q4_k,
        GgmlType::Q5_K => s_q5_k,
        GgmlType::Q6_K => s_q6_k,
        _ => return None,
    })
}

/// Four activation rows against one weight row: `a` holds the four rows `rb` bytes apart. Unpacking a
/// weight block once for several tokens is what makes prefill compute-bound instead of unpack-bound.
pub type Dot4Fn = fn(w: &[u8], a: &[u8], rb: usize, k: usize, out: &mut [f32; 4]);

/// The fastest single-row kernel for a type on this CPU.
pub fn kernel(t: GgmlType) -> Option<DotFn> {
    #[cfg(target_arch = "x86_64")]
    if let Some(k) = avx2::kernels(t, isa()) {
        return Some(k.0);
    }
    scalar_kernel(t)
}

/// The four-token kernel for a type, where one exists (otherwise callers loop over `kernel`).
pub fn kernel4(t: GgmlType) -> Option<Dot4Fn> {
    #[cfg(target_arch = "x86_64")]
    if let Some(k) = avx2::kernels(t, isa()) {
        return Some(k.1);
    }
    let _ = t;
    None
}

/// Four weight rows (`w` holds them `wrb` bytes apart) against four activation rows (`rb` apart):
/// `out[r][t]`. Each unpacked weight block serves four tokens and each activation block four rows; with
/// 32 vector registers (AVX-512VL encodings) all sixteen accumulators stay in registers.
pub type Tile4Fn = fn(w: &[u8], wrb: usize, a: &[u8], rb: usize, k: usize, out: &mut [[f32; 4]; 4]);

/// Four weight rows against eight activation rows: `out[r][t]` (AVX-512 VNNI only).
pub type Tile8Fn = fn(w: &[u8], wrb: usize, a: &[u8], rb: usize, k: usize, out: &mut [[f32; 8]; 4]);

/// The 4x8 tile kernel for a type, where one exists on this CPU.
pub fn tile8(t: GgmlType) -> Option<Tile8Fn> {
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx2Vnni
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512dq")
        && is_x86_feature_detected!("avx512vnni")
        && std::env::var("PORTEIRO_ISA").map_or(true, |v| v != "avx2vnni")
    {
        return avx2::tile8_zmm(t);
    }
    let _ = t;
    None
}

/// The 4x4 tile kernel for a type, where one exists on this CPU.
pub fn tile4(t: GgmlType) -> Option<Tile4Fn> {
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx2Vnni
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512f")
    {
        let zmm = is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx512vnni");
        if zmm && std::env::var("PORTEIRO_ISA").map_or(true, |v| v != "avx2vnni") {
            if let Some(k) = avx2::tile4_zmm(t) {
                return Some(k);
            }
        }
        return avx2::tile4(t);
    }
    let _ = t;
    None
}

/// Quantizes one activation row; byte-identical to `quant::quantize_act`, vectorised where possible.
pub fn quantize_act(t: quant::ActType, x: &[f32], out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if isa() != Isa::Scalar {
        match t {
            quant::ActType::Q8_0 | quant::ActType::Q8_1 => {
                assert!(out.len() >= x.len() / quant::QK * Q8_BYTES);
                // SAFETY: isa() != Scalar means avx2, fma and f16c were detected (quantize_q8's
                // features); the assert covers its stores, Q8_BYTES per whole 32-value block of x.
                return unsafe { avx2::quantize_q8(x, out) };
            }
            quant::ActType::Q8K => {
                assert!(out.len() >= x.len() / quant::QK_K * Q8K_BYTES);
                // SAFETY: isa() != Scalar means avx2, fma and f16c were detected (quantize_q8k's
                // features); the assert covers its stores, Q8K_BYTES per whole 256-value block of x.
                return unsafe { avx2::quantize_q8k(x, out) };
            }
            quant::ActType::F32 => {}
        }
    }
    quant::quantize_act(t, x, out)
}

/// f32 dot product (attention scores); vectorised where the CPU allows.
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa() != Isa::Scalar {
        // SAFETY: isa() != Scalar means avx2 and fma were detected; dot_raw reads only the first
        // min(a.len(), b.len()) values of each slice.
        return unsafe { avx2::dot_f32(a, b) };
    }
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// y += alpha * x, with x in f16 (bits).
#[inline]
pub fn axpy_f16(y: &mut [f32], alpha: f32, x: &[u16]) {
    #[cfg(target_arch = "x86_64")]
    if isa() != Isa::Scalar {
        // SAFETY: isa() != Scalar means avx2, fma and f16c were detected; axpy_f16 touches only the
        // first min(y.len(), x.len()) values of each slice.
        return unsafe { avx2::axpy_f16(y, alpha, x) };
    }
    for (o, v) in y.iter_mut().zip(x) {
        *o += alpha * half::f16::from_bits(*v).to_f32();
    }
}

/// y += alpha * x
#[inline]
pub fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa() != Isa::Scalar {
        // SAFETY: isa() != Scalar means avx2 and fma were detected; axpy touches only the first
        // min(y.len(), x.len()) values of each slice.
        return unsafe { avx2::axpy(y, alpha, x) };
    }
    for (o, v) in y.iter_mut().zip(x) {
        *o += alpha * v;
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// Kernels are written once, generic over the number of tokens `N` and over `V` (use AVX-VNNI's
    /// vpdpbusd for u8·i8 sums), and instantiated below with the matching target features.
    macro_rules! instantiate {
        ($gen:ident, $bs:expr, $abs:expr, $one:ident, $one_v:ident, $four:ident, $four_v:ident) => {
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn $one(w: &[u8], a: &[u8], _k: usize) -> f32 {
                let mut o = [0f32; 1];
                $gen::<1, false>(w.as_ptr(), w.len() / $bs, a.as_ptr(), 0, &mut o);
                o[0]
            }
            #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
            unsafe fn $one_v(w: &[u8], a: &[u8], _k: usize) -> f32 {
                let mut o = [0f32; 1];
                $gen::<1, true>(w.as_ptr(), w.len() / $bs, a.as_ptr(), 0, &mut o);
                o[0]
            }
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn $four(w: &[u8], a: &[u8], rb: usize, _k: usize, out: &mut [f32; 4]) {
                $gen::<4, false>(w.as_ptr(), w.len() / $bs, a.as_ptr(), rb, out);
            }
            #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
            unsafe fn $four_v(w: &[u8], a: &[u8], rb: usize, _k: usize, out: &mut [f32; 4]) {
                $gen::<4, true>(w.as_ptr(), w.len() / $bs, a.as_ptr(), rb, out);
            }
        };
    }

    instantiate!(q4_0, 18, Q8_BYTES, q4_0_1, q4_0_1v, q4_0_4, q4_0_4v);
    instantiate!(q4_1, 20, Q8_BYTES, q4_1_1, q4_1_1v, q4_1_4, q4_1_4v);
    instantiate!(q5_0, 22, Q8_BYTES, q5_0_1, q5_0_1v, q5_0_4, q5_0_4v);
    instantiate!(q8_0, 34, Q8_BYTES, q8_0_1, q8_0_1v, q8_0_4, q8_0_4v);
    instantiate!(q2_k, 84, Q8K_BYTES, q2_k_1, q2_k_1v, q2_k_4, q2_k_4v);
    instantiate!(q3_k, 110, Q8K_BYTES, q3_k_1, q3_k_1v, q3_k_4, q3_k_4v);
    instantiate!(q4_k, 144, Q8K_BYTES, q4_k_1, q4_k_1v, q4_k_4, q4_k_4v);
    instantiate!(q5_k, 176, Q8K_BYTES, q5_k_1, q5_k_1v, q5_k_4, q5_k_4v);
    instantiate!(q6_k, 210, Q8K_BYTES, q6_k_1, q6_k_1v, q6_k_4, q6_k_4v);

    /// Safe entry points: the caller (the matmul) guarantees `w` holds whole blocks, `a` holds the
    /// matching activation blocks (for the four-token kernel: three strides plus one row), and the CPU
    /// features were detected by `isa()` before these are handed out.
    macro_rules! safe {
        ($one:ident, $four:ident, $abs:expr, $wbs:expr) => {
            (
                |w: &[u8], a: &[u8], k: usize| {
                    assert!(a.len() >= w.len() / $wbs * $abs);
                    // SAFETY: kernels() is given isa() (tests: an Isa they detected), so the CPU has
                    // the features $one is compiled for; it reads the w.len() / $wbs whole weight
                    // blocks of `w` and as many activation blocks, which the assert puts in `a`.
                    unsafe { $one(w, a, k) }
                },
                |w: &[u8], a: &[u8], rb: usize, k: usize, out: &mut [f32; 4]| {
                    assert!(a.len() >= 3 * rb + w.len() / $wbs * $abs);
                    // SAFETY: features as for $one; the four activation rows start 0, rb, 2 rb and
                    // 3 rb bytes in and each needs the blocks above, which the assert puts in `a`.
                    unsafe { $four(w, a, rb, k, out) }
                },
            )
        };
    }

    pub fn kernels(t: GgmlType, isa: Isa) -> Option<(DotFn, Dot4Fn)> {
        let v = isa == Isa::Avx2Vnni;
        if isa == Isa::Scalar {
            return None;
        }
        Some(match (t, v) {
            (GgmlType::Q4_0, false) => safe!(q4_0_1, q4_0_4, Q8_BYTES, 18),
            (GgmlType::Q4_0, true) => safe!(q4_0_1v, q4_0_4v, Q8_BYTES, 18),
            (GgmlType::Q4_1, false) => safe!(q4_1_1, q4_1_4, Q8_BYTES, 20),
            (GgmlType::Q4_1, true) => safe!(q4_1_1v, q4_1_4v, Q8_BYTES, 20),
            (GgmlType::Q5_0, false) => safe!(q5_0_1, q5_0_4, Q8_BYTES, 22),
            (GgmlType::Q5_0, true) => safe!(q5_0_1v, q5_0_4v, Q8_BYTES, 22),
            (GgmlType::Q8_0, false) => safe!(q8_0_1, q8_0_4, Q8_BYTES, 34),
            (GgmlType::Q8_0, true) => safe!(q8_0_1v, q8_0_4v, Q8_BYTES, 34),
            (GgmlType::Q2_K, false) => safe!(q2_k_1, q2_k_4, Q8K_BYTES, 84),
            (GgmlType::Q2_K, true) => safe!(q2_k_1v, q2_k_4v, Q8K_BYTES, 84),
            (GgmlType::Q3_K, false) => safe!(q3_k_1, q3_k_4, Q8K_BYTES, 110),
            (GgmlType::Q3_K, true) => safe!(q3_k_1v, q3_k_4v, Q8K_BYTES, 110),
            (GgmlType::Q4_K, false) => safe!(q4_k_1, q4_k_4, Q8K_BYTES, 144),
            (GgmlType::Q4_K, true) => safe!(q4_k_1v, q4_k_4v, Q8K_BYTES, 144),
            (GgmlType::Q5_K, false) => safe!(q5_k_1, q5_k_4, Q8K_BYTES, 176),
            (GgmlType::Q5_K, true) => safe!(q5_k_1v, q5_k_4v, Q8K_BYTES, 176),
            (GgmlType::Q6_K, false) => safe!(q6_k_1, q6_k_4, Q8K_BYTES, 210),
            (GgmlType::Q6_K, true) => safe!(q6_k_1v, q6_k_4v, Q8K_BYTES, 210),
            (GgmlType::F16, _) => (
                |w: &[u8], a: &[u8], k: usize| {
                    assert!(w.len() >= 2 * k && a.len() >= 4 * k);
                    // SAFETY: f16_dot reads k f16 weights and k f32 activations, which the assert
                    // guarantees; kernels() is handed a detected Isa (avx2, fma, f16c).
                    unsafe { f16_dot(w, a, k) }
                },
                |w: &[u8], a: &[u8], rb: usize, k: usize, out: &mut [f32; 4]| {
                    for (t, o) in out.iter_mut().enumerate() {
                        assert!(w.len() >= 2 * k && a.len() >= t * rb + 4 * k);
                        // SAFETY: as for one token: the assert leaves k f32 values after t * rb.
                        *o = unsafe { f16_dot(w, &a[t * rb..], k) };
                    }
                },
            ),
            (GgmlType::F32, _) => (
                |w: &[u8], a: &[u8], k: usize| {
                    assert!(w.len() >= 4 * k && a.len() >= 4 * k);
                    // SAFETY: f32_dot views k f32 values of each slice, which the assert guarantees
                    // (unaligned loads only); kernels() is handed a detected Isa (avx2, fma).
                    unsafe { f32_dot(w, a, k) }
                },
                |w: &[u8], a: &[u8], rb: usize, k: usize, out: &mut [f32; 4]| {
                    for (t, o) in out.iter_mut().enumerate() {
                        assert!(w.len() >= 4 * k && a.len() >= t * rb + 4 * k);
                        // SAFETY: as for one token: the assert leaves k f32 values after t * rb.
                        *o = unsafe { f32_dot(w, &a[t * rb..], k) };
                    }
                },
            ),
            _ => return None,
        })
    }

    /// Unpacks one 32-weight block to 32 bytes (a trait, not closures: closures do not inherit the
    /// caller's target features and would not inline into the kernels).
    trait Unpack: Copy {
        unsafe fn get(&self, wb: *const u8) -> __m256i;
    }

    macro_rules! unpacker {
        ($name:ident, $doc:literal, |$wb:ident| $body:expr) => {
            #[doc = $doc]
            #[derive(Clone, Copy)]
            struct $name;
            impl Unpack for $name {
                #[inline(always)]
                unsafe fn get(&self, $wb: *const u8) -> __m256i {
                    $body
                }
            }
        };
    }

    unpacker!(Q4_0Signed, "Q4_0 as signed values q - 8.", |wb| {
        _mm256_sub_epi8(nibbles(wb.add(2)), _mm256_set1_epi8(8))
    });
    unpacker!(Q5_0Signed, "Q5_0 as signed values: where the fifth bit is clear the value is q4 - 16, i.e. q4 with the top nibble set.", |wb| {
        let qh = (wb.add(2) as *const u32).read_unaligned();
        let hi = _mm256_andnot_si256(bits_to_bytes(qh), _mm256_set1_epi8(0xF0u8 as i8));
        _mm256_or_si256(nibbles(wb.add(6)), hi)
    });
    unpacker!(Q8_0Signed, "Q8_0 as stored.", |wb| load(wb.add(2)));
    unpacker!(
        Q4_0Unsigned,
        "Q4_0 as unsigned q (offset 8).",
        |wb| nibbles(wb.add(2))
    );
    unpacker!(
        Q4_1Unsigned,
        "Q4_1 as unsigned q (offset 0; min terms apart).",
        |wb| nibbles(wb.add(4))
    );
    unpacker!(Q5_0Unsigned, "Q5_0 as unsigned q (offset 16).", |wb| {
        let qh = (wb.add(2) as *const u32).read_unaligned();
        let hi = _mm256_and_si256(bits_to_bytes(qh), _mm256_set1_epi8(0x10));
        _mm256_or_si256(nibbles(wb.add(6)), hi)
    });
    unpacker!(Q8_0Unsigned, "Q8_0 as unsigned q (offset 128).", |wb| {
        _mm256_xor_si256(load(wb.add(2)), _mm256_set1_epi8(0x80u8 as i8))
    });

    /// Weight rows of a tile: base pointer, bytes between rows, bytes per block, blocks per row.
    #[derive(Clone, Copy)]
    struct Rows {
        p: *const u8,
        stride: usize,
        block: usize,
        n: usize,
    }

    /// Walks blocks `0..nb` in the shared order; `$step` (with `$b` bound to the block index) yields
    /// that block's (scales, products) per token. A macro, not a closure: closures do not inherit the
    /// caller's target features, so their intrinsics would not inline.
    macro_rules! pairwise {
        // R rows x N tokens of accumulators (the tiles).
        ($r:expr, $n:expr, $nb:expr, |$b:ident| $step:expr) => {{
            let mut acc = [[_mm256_setzero_ps(); $n]; $r];
            let mut b_ = 0;
            while b_ < $nb {
                let (s0, p0) = {
                    let $b = b_;
                    $step
                };
                if b_ + 1 < $nb {
                    let (s1, p1) = {
                        let $b = b_ + 1;
                        $step
                    };
                    for r in 0..$r {
                        for t in 0..$n {
                            acc[r][t] = pair_acc(acc[r][t], s0[r][t], p0[r][t], s1[r][t], p1[r][t]);
                        }
                    }
                } else {
                    for r in 0..$r {
                        for t in 0..$n {
                            acc[r][t] = last_acc(acc[r][t], s0[r][t], p0[r][t]);
                        }
                    }
                }
                b_ += 2;
            }
            acc
        }};
        // N tokens of accumulators (the one- and four-token kernels).
        ($n:expr, $nb:expr, |$b:ident| $step:expr) => {{
            let mut acc = [_mm256_setzero_ps(); $n];
            let mut b_ = 0;
            while b_ + 1 < $nb {
                let (s0, p0) = {
                    let $b = b_;
                    $step
                };
                let (s1, p1) = {
                    let $b = b_ + 1;
                    $step
                };
                for t in 0..$n {
                    acc[t] = pair_acc(acc[t], s0[t], p0[t], s1[t], p1[t]);
                }
                b_ += 2;
            }
            if b_ < $nb {
                let (s0, p0) = {
                    let $b = b_;
                    $step
                };
                for t in 0..$n {
                    acc[t] = last_acc(acc[t], s0[t], p0[t]);
                }
            }
            acc
        }};
    }

    /// Block `b` of R weight rows against N tokens: (scale, product) per row and token.
    #[inline(always)]
    unsafe fn signed_tile_step<const R: usize, const N: usize>(
        wr: Rows,
        a: *const u8,
        rb: usize,
        b: usize,
        unpack: &impl Unpack,
    ) -> ([[__m256; N]; R], [[__m256; N]; R]) {
        let mut q = [_mm256_setzero_si256(); R];
        let mut aq = [_mm256_setzero_si256(); R];
        let mut dw = [0f32; R];
        for r in 0..R {
            let wb = wr.p.add(r * wr.stride + b * wr.block);
            dw[r] = f16(wb);
            q[r] = unpack.get(wb);
            aq[r] = _mm256_sign_epi8(q[r], q[r]);
        }
        let (mut sv, mut pv) = ([[_mm256_setzero_ps(); N]; R], [[_mm256_setzero_ps(); N]; R]);
        for t in 0..N {
            let ab = a.add(t * rb + b * Q8_BYTES);
            let y = load(ab.add(8));
            let da = rd_f32(ab);
            for r in 0..R {
                let p = dot_u8i8::<true>(aq[r], _mm256_sign_epi8(y, q[r]));
                pv[r][t] = _mm256_cvtepi32_ps(p);
                sv[r][t] = _mm256_set1_ps(dw[r] * da);
            }
        }
        (sv, pv)
    }

    /// R weight rows x N tokens of blocks with one f16 scale and signed 32-value payloads, in the
    /// shared pairwise block order (see `pair_acc`).
    #[inline(always)]
    unsafe fn signed_tile<const R: usize, const N: usize>(
        wr: Rows,
        a: *const u8,
        rb: usize,
        out: &mut [[f32; 4]; 4],
        unpack: impl Unpack,
    ) {
        let acc = pairwise!(R, N, wr.n, |b| signed_tile_step::<R, N>(
            wr, a, rb, b, &unpack
        ));
        for r in 0..R {
            for t in 0..N {
                out[r][t] = hsum(acc[r][t]);
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avxvnni,avx512f,avx512vl")]
    unsafe fn q4_0_t(w: &[u8], wrb: usize, a: &[u8], rb: usize, k: usize, out: &mut [[f32; 4]; 4]) {
        signed_tile::<4, 4>(
            Rows {
                p: w.as_ptr(),
                stride: wrb,
                block: 18,
                n: k / 32,
            },
            a.as_ptr(),
            rb,
            out,
            Q4_0Signed,
        );
    }

    #[target_feature(enable = "avx2,fma,f16c,avxvnni,avx512f,avx512vl")]
    unsafe fn q5_0_t(w: &[u8], wrb: usize, a: &[u8], rb: usize, k: usize, out: &mut [[f32; 4]; 4]) {
        signed_tile::<4, 4>(
            Rows {
                p: w.as_ptr(),
                stride: wrb,
                block: 22,
                n: k / 32,
            },
            a.as_ptr(),
            rb,
            out,
            Q5_0Signed,
        );
    }

    #[target_feature(enable = "avx2,fma,f16c,avxvnni,avx512f,avx512vl")]
    unsafe fn q8_0_t(w: &[u8], wrb: usize, a: &[u8], rb: usize, k: usize, out: &mut [[f32; 4]; 4]) {
        signed_tile::<4, 4>(
            Rows {
                p: w.as_ptr(),
                stride: wrb,
                block: 34,
                n: k / 32,
            },
            a.as_ptr(),
            rb,
            out,
            Q8_0Signed,
        );
    }

    #[inline(always)]
    unsafe fn q4_1_tile_step(
        w: *const u8,
        wrb: usize,
        a: *const u8,
        rb: usize,
        b: usize,
    ) -> ([[__m256; 4]; 4], [[__m256; 4]; 4]) {
        let (mut sv, mut pv) = ([[_mm256_setzero_ps(); 4]; 4], [[_mm256_setzero_ps(); 4]; 4]);
        for r in 0..4 {
            let wb = w.add(r * wrb + b * 20);
            let dw = f16(wb);
            let q = nibbles(wb.add(4));
            for t in 0..4 {
                let ab = a.add(t * rb + b * Q8_BYTES);
                pv[r][t] = _mm256_cvtepi32_ps(dot_u8i8::<true>(q, load(ab.add(8))));
                sv[r][t] = _mm256_set1_ps(dw * rd_f32(ab));
            }
        }
        (sv, pv)
    }

    #[target_feature(enable = "avx2,fma,f16c,avxvnni,avx512f,avx512vl")]
    unsafe fn q4_1_t(w: &[u8], wrb: usize, a: &[u8], rb: usize, k: usize, out: &mut [[f32; 4]; 4]) {
        let (w, a) = (w.as_ptr(), a.as_ptr());
        let nb = k / 32;
        let acc = pairwise!(4, 4, nb, |b| q4_1_tile_step(w, wrb, a, rb, b));
        for r in 0..4 {
            for t in 0..4 {
                out[r][t] = hsum(acc[r][t]) + q4_1_mins(w.add(r * wrb), 20, nb, a.add(t * rb));
            }
        }
    }

    /// 4 rows x 4 tokens with 512-bit vectors: each zmm holds two tokens (one per 256-bit half) of one
    /// row. Weights are unpacked to unsigned bytes (q + OFF) so no sign juggling is needed; the offset is
    /// taken back exactly by seeding each dot with -OFF * (sums of four activations), so the integer sums
    /// equal the signed reference's.
    /// One token pair's activations for block b: values, scales (one per half) and the offset seed
    /// (-OFF times the sums of four activations).
    #[inline(always)]
    unsafe fn zmm_act<const OFF: i32>(
        a: *const u8,
        rb: usize,
        pair: usize,
        b: usize,
    ) -> (__m512i, __m512, __m512i) {
        let a0 = a.add(2 * pair * rb + b * Q8_BYTES);
        let a1 = a0.add(rb);
        let y = _mm512_inserti64x4(_mm512_castsi256_si512(load(a0.add(8))), load(a1.add(8)), 1);
        let da = _mm512_insertf32x8(
            _mm512_castps256_ps512(_mm256_set1_ps(rd_f32(a0))),
            _mm256_set1_ps(rd_f32(a1)),
            1,
        );
        let seed = if OFF != 0 {
            let off = _mm512_set1_epi8(OFF as i8);
            _mm512_sub_epi32(
                _mm512_setzero_si512(),
                _mm512_dpbusd_epi32(_mm512_setzero_si512(), off, y),
            )
        } else {
            _mm512_setzero_si512()
        };
        (y, da, seed)
    }

    /// Block b of four weight rows, unpacked to unsigned bytes and broadcast to both halves.
    #[inline(always)]
    unsafe fn zmm_weights(wr: Rows, b: usize, unpack: &impl Unpack) -> ([__m512i; 4], [f32; 4]) {
        let mut q = [_mm512_setzero_si512(); 4];
        let mut dw = [0f32; 4];
        for r in 0..4 {
            let wb = wr.p.add(r * wr.stride + b * wr.block);
            dw[r] = f16(wb);
            q[r] = _mm512_broadcast_i64x4(unpack.get(wb));
        }
        (q, dw)
    }

    /// `q4_1_mins` for 4 rows x 2P tokens at once, tokens in the lanes: lane for lane the same
    /// operations in the same order as the scalar function, so the sums are bit-identical.
    #[inline(always)]
    unsafe fn q4_1_mins_tile<const P: usize>(wr: Rows, a: *const u8, rb: usize) -> [__m256; 4] {
        // Offsets of the tokens' Q8_1 `s` fields; lanes past 2P repeat token 0 (ignored).
        let mut idx = [0i32; 8];
        for (t, v) in idx.iter_mut().enumerate().take(2 * P) {
            *v = (t * rb) as i32;
        }
        let vidx = _mm256_loadu_si256(idx.as_ptr() as *const __m256i);
        // Macros, not closures: closures would not inherit the target features (see `pairwise!`).
        macro_rules! s_of {
            ($b:expr) => {
                _mm256_i32gather_ps::<1>(a.add($b * Q8_BYTES + 4) as *const f32, vidx)
            };
        }
        macro_rules! m_of {
            ($r:expr, $b:expr) => {
                _mm256_set1_ps(f16(wr.p.add($r * wr.stride + $b * wr.block + 2)))
            };
        }
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut b = 0;
        while b + 1 < wr.n {
            let (s0, s1) = (s_of!(b), s_of!(b + 1));
            for r in 0..4 {
                acc[r] = pair_acc(acc[r], m_of!(r, b), s0, m_of!(r, b + 1), s1);
            }
            b += 2;
        }
        if b < wr.n {
            let s0 = s_of!(b);
            for r in 0..4 {
                acc[r] = last_acc(acc[r], m_of!(r, b), s0);
            }
        }
        acc
    }

    #[inline(always)]
    unsafe fn unsigned_tile_zmm<const OFF: i32, const MINS: bool, const P: usize>(
        wr: Rows,
        a: *const u8,
        rb: usize,
        out: &mut [[f32; 8]; 4],
        unpack: impl Unpack,
    ) {
        let mut acc = [[_mm512_setzero_ps(); P]; 4];
        let mut b = 0;
        while b + 1 < wr.n {
            let (q0, dw0) = zmm_weights(wr, b, &unpack);
            let (q1, dw1) = zmm_weights(wr, b + 1, &unpack);
            for pair in 0..P {
                let (y0, da0, seed0) = zmm_act::<OFF>(a, rb, pair, b);
                let (y1, da1, seed1) = zmm_act::<OFF>(a, rb, pair, b + 1);
                for r in 0..4 {
                    let p0 = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(seed0, q0[r], y0));
                    let p1 = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(seed1, q1[r], y1));
                    let s0 = _mm512_mul_ps(da0, _mm512_set1_ps(dw0[r]));
                    let s1 = _mm512_mul_ps(da1, _mm512_set1_ps(dw1[r]));
                    acc[r][pair] = pair_acc_z(acc[r][pair], s0, p0, s1, p1);
                }
            }
            b += 2;
        }
        if b < wr.n {
            let (q0, dw0) = zmm_weights(wr, b, &unpack);
            for pair in 0..P {
                let (y0, da0, seed0) = zmm_act::<OFF>(a, rb, pair, b);
                for r in 0..4 {
                    let p0 = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(seed0, q0[r], y0));
                    let s0 = _mm512_mul_ps(da0, _mm512_set1_ps(dw0[r]));
                    acc[r][pair] = last_acc_z(acc[r][pair], s0, p0);
                }
            }
        }
        let mins = if MINS {
            q4_1_mins_tile::<P>(wr, a, rb)
        } else {
            [_mm256_setzero_ps(); 4]
        };
        let mut m = [[0f32; 8]; 4];
        for r in 0..4 {
            _mm256_storeu_ps(m[r].as_mut_ptr(), mins[r]);
        }
        for r in 0..4 {
            for pair in 0..P {
                let v = acc[r][pair];
                let (t0, t1) = (2 * pair, 2 * pair + 1);
                out[r][t0] = hsum(_mm512_castps512_ps256(v)) + m[r][t0];
                out[r][t1] = hsum(_mm512_extractf32x8_ps(v, 1)) + m[r][t1];
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    unsafe fn q4_0_z(w: &[u8], wrb: usize, a: &[u8], rb: usize, k: usize, out: &mut [[f32; 4]; 4]) {
        let mut o = [[0f32; 8]; 4];
        unsigned_tile_zmm::<8, false, 2>(
            Rows {
                p: w.as_ptr(),
                stride: wrb,
                block: 18,
                n: k / 32,
            },
            a.as_ptr(),
            rb,
            &mut o,
            Q4_0Unsigned,
        );
        for r in 0..4 {
            out[r].copy_from_slice(&o[r][..4]);
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    unsafe fn q4_0_z8(
        w: &[u8],
        wrb: usize,
        a: &[u8],
        rb: usize,
        k: usize,
        out: &mut [[f32; 8]; 4],
    ) {
        unsigned_tile_zmm::<8, false, 4>(
            Rows {
                p: w.as_ptr(),
                stride: wrb,
                block: 18,
                n: k / 32,
            },
            a.as_ptr(),
            rb,
            out,
            Q4_0Unsigned,
        );
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    unsafe fn q4_1_z(w: &[u8], wrb: usize, a: &[u8], rb: usize, k: usize, out: &mut [[f32; 4]; 4]) {
        let mut o = [[0f32; 8]; 4];
        unsigned_tile_zmm::<0, true, 2>(
            Rows {
                p: w.as_ptr(),
                stride: wrb,
                block: 20,
                n: k / 32,
            },
            a.as_ptr(),
            rb,
            &mut o,
            Q4_1Unsigned,
        );
        for r in 0..4 {
            out[r].copy_from_slice(&o[r][..4]);
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    unsafe fn q4_1_z8(
        w: &[u8],
        wrb: usize,
        a: &[u8],
        rb: usize,
        k: usize,
        out: &mut [[f32; 8]; 4],
    ) {
        unsigned_tile_zmm::<0, true, 4>(
            Rows {
                p: w.as_ptr(),
                stride: wrb,
                block: 20,
                n: k / 32,
            },
            a.as_ptr(),
            rb,
            out,
            Q4_1Unsigned,
        );
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    unsafe fn q5_0_z(w: &[u8], wrb: usize, a: &[u8], rb: usize, k: usize, out: &mut [[f32; 4]; 4]) {
        let mut o = [[0f32; 8]; 4];
        unsigned_tile_zmm::<16, false, 2>(
            Rows {
                p: w.as_ptr(),
                stride: wrb,
                block: 22,
                n: k / 32,
            },
            a.as_ptr(),
            rb,
            &mut o,
            Q5_0Unsigned,
        );
        for r in 0..4 {
            out[r].copy_from_slice(&o[r][..4]);
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    unsafe fn q5_0_z8(
        w: &[u8],
        wrb: usize,
        a: &[u8],
        rb: usize,
        k: usize,
        out: &mut [[f32; 8]; 4],
    ) {
        unsigned_tile_zmm::<16, false, 4>(
            Rows {
                p: w.as_ptr(),
                stride: wrb,
                block: 22,
                n: k / 32,
            },
            a.as_ptr(),
            rb,
            out,
            Q5_0Unsigned,
        );
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    unsafe fn q8_0_z(w: &[u8], wrb: usize, a: &[u8], rb: usize, k: usize, out: &mut [[f32; 4]; 4]) {
        let mut o = [[0f32; 8]; 4];
        unsigned_tile_zmm::<128, false, 2>(
            Rows {
                p: w.as_ptr(),
                stride: wrb,
                block: 34,
                n: k / 32,
            },
            a.as_ptr(),
            rb,
            &mut o,
            Q8_0Unsigned,
        );
        for r in 0..4 {
            out[r].copy_from_slice(&o[r][..4]);
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    unsafe fn q8_0_z8(
        w: &[u8],
        wrb: usize,
        a: &[u8],
        rb: usize,
        k: usize,
        out: &mut [[f32; 8]; 4],
    ) {
        unsigned_tile_zmm::<128, false, 4>(
            Rows {
                p: w.as_ptr(),
                stride: wrb,
                block: 34,
                n: k / 32,
            },
            a.as_ptr(),
            rb,
            out,
            Q8_0Unsigned,
        );
    }

    /// One K-quant superblock of one weight row, unpacked for the zmm tiles: four registers of
    /// sub-block pairs (2c, 2c+1) as unsigned bytes, their i16 scales (one per 256-bit half), the
    /// weights' f32 scale, and what the per-token correction needs.
    struct KRow {
        q: [__m512i; 4],
        sc: [__m512i; 4],
        d: f32,
        /// Q4_K: dmin; Q6_K: unused.
        dmin: f32,
        /// Q4_K: mins as i16 pairs (m0,m0,m1,m1,..), dotted with the 16 activation group sums;
        /// Q6_K: the 16 group scales, dotted with the same sums for the -32 offset.
        corr: __m256i,
    }

    #[inline(always)]
    unsafe fn pair512(lo: __m256i, hi: __m256i) -> __m512i {
        _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)
    }

    #[inline(always)]
    unsafe fn q4_k_row(wb: *const u8) -> KRow {
        let low = _mm256_set1_epi8(0x0F);
        let (sc, mn) = k4_scales(&*(wb.add(4) as *const [u8; 12]));
        let mut q = [_mm512_setzero_si512(); 4];
        let mut scv = [_mm512_setzero_si512(); 4];
        for c in 0..4 {
            let bits = load(wb.add(16 + 32 * c));
            q[c] = pair512(
                _mm256_and_si256(bits, low),
                _mm256_and_si256(_mm256_srli_epi16(bits, 4), low),
            );
            scv[c] = pair512(
                _mm256_set1_epi16(sc[2 * c]),
                _mm256_set1_epi16(sc[2 * c + 1]),
            );
        }
        let mut pairs = [0i16; 16];
        for j in 0..8 {
            pairs[2 * j] = mn[j];
            pairs[2 * j + 1] = mn[j];
        }
        KRow {
            q,
            sc: scv,
            d: f16(wb),
            dmin: f16(wb.add(2)),
            corr: _mm256_loadu_si256(pairs.as_ptr() as *const __m256i),
        }
    }

    #[inline(always)]
    unsafe fn q6_k_row(wb: *const u8) -> KRow {
        let low = _mm256_set1_epi8(0x0F);
        let three = _mm256_set1_epi8(3);
        let scales = &*(wb.add(192) as *const [i8; 16]);
        let mut q8 = [_mm256_setzero_si256(); 8];
        let mut sc8 = [_mm256_setzero_si256(); 8];
        for half in 0..2 {
            let ql = wb.add(64 * half);
            let qh = load(wb.add(128 + 32 * half));
            let (l1, l2) = (load(ql), load(ql.add(32)));
            let h = |v: __m256i| _mm256_slli_epi16(_mm256_and_si256(v, three), 4);
            q8[4 * half] = _mm256_or_si256(_mm256_and_si256(l1, low), h(qh));
            q8[4 * half + 1] =
                _mm256_or_si256(_mm256_and_si256(l2, low), h(_mm256_srli_epi16(qh, 2)));
            q8[4 * half + 2] = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(l1, 4), low),
                h(_mm256_srli_epi16(qh, 4)),
            );
            q8[4 * half + 3] = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(l2, 4), low),
                h(_mm256_srli_epi16(qh, 6)),
            );
            for i in 0..4 {
                let (s0, s1) = (scales[8 * half + 2 * i], scales[8 * half + 2 * i + 1]);
                sc8[4 * half + i] =
                    _mm256_set_m128i(_mm_set1_epi16(s1 as i16), _mm_set1_epi16(s0 as i16));
            }
        }
        let mut q = [_mm512_setzero_si512(); 4];
        let mut sc = [_mm512_setzero_si512(); 4];
        for c in 0..4 {
            q[c] = pair512(q8[2 * c], q8[2 * c + 1]);
            sc[c] = pair512(sc8[2 * c], sc8[2 * c + 1]);
        }
        KRow {
            q,
            sc,
            d: f16(wb.add(208)),
            dmin: 0.0,
            corr: _mm256_cvtepi8_epi16(_mm_loadu_si128(scales.as_ptr() as *const __m128i)),
        }
    }

    /// Exact horizontal sums of up to eight i32x8 vectors, one per lane (lanes past `N` are 0).
    #[inline(always)]
    unsafe fn hsums_i32<const N: usize>(m: &[__m256i; 8]) -> __m256i {
        let h01 = _mm256_hadd_epi32(m[0], m[1]);
        let h23 = _mm256_hadd_epi32(m[2], m[3]);
        let lo = _mm256_hadd_epi32(h01, h23);
        let hi = if N > 4 {
            let h45 = _mm256_hadd_epi32(m[4], m[5]);
            let h67 = _mm256_hadd_epi32(m[6], m[7]);
            _mm256_hadd_epi32(h45, h67)
        } else {
            _mm256_setzero_si256()
        };
        // lo = [s0..s3 of halves 0..3 | s0..s3 of halves 4..7]: add the 128-bit halves.
        _mm256_add_epi32(
            _mm256_permute2x128_si256(lo, hi, 0x20),
            _mm256_permute2x128_si256(lo, hi, 0x31),
        )
    }

    /// 4 K-quant weight rows x N tokens. Per (row, token, superblock) the integer lane sums equal
    /// the one-token kernel's exactly (u8·i8 pairs via maddubs, then scaled and summed by dpwssd:
    /// the same i32 lanes as dpbusd then a multiply; the two 256-bit halves hold sub-blocks 2c and
    /// 2c+1 and are added at the end), and every float step is the same operation in the same order
    /// (lane-wise across tokens where vectorised), so results are bit-identical. Weight unpacking is
    /// paid once per row and superblock for N tokens.
    #[inline(always)]
    unsafe fn k_tile_zmm<const N: usize, const Q6: bool>(
        wr: Rows,
        a: *const u8,
        rb: usize,
        out: &mut [[f32; N]; 4],
    ) {
        let mut acc = [[_mm256_setzero_ps(); N]; 4];
        let mut acc_m = [_mm256_setzero_ps(); 4];
        for b in 0..wr.n {
            let mut ad = [0f32; 8];
            for t in 0..N {
                ad[t] = rd_f32(a.add(t * rb + b * Q8K_BYTES));
            }
            let adv = _mm256_loadu_ps(ad.as_ptr());
            for r in 0..4 {
                let wb = wr.p.add(r * wr.stride + b * wr.block);
                let kr = if Q6 { q6_k_row(wb) } else { q4_k_row(wb) };
                let mut m = [_mm256_setzero_si256(); 8];
                for t in 0..N {
                    m[t] = _mm256_madd_epi16(load(a.add(t * rb + b * Q8K_BYTES + 260)), kr.corr);
                }
                let corr = hsums_i32::<N>(&m);
                let mut corr_s = [0i32; 8];
                if Q6 {
                    _mm256_storeu_si256(corr_s.as_mut_ptr() as *mut __m256i, corr);
                } else {
                    // acc_m += (ad * dmin) * corr, lane by lane as the one-token kernel does it.
                    let f = _mm256_mul_ps(
                        _mm256_mul_ps(adv, _mm256_set1_ps(kr.dmin)),
                        _mm256_cvtepi32_ps(corr),
                    );
                    acc_m[r] = _mm256_add_ps(acc_m[r], f);
                }
                for t in 0..N {
                    let ab = a.add(t * rb + b * Q8K_BYTES);
                    let mut s = _mm512_setzero_si512();
                    for c in 0..4 {
                        let y = _mm512_loadu_si512(ab.add(4 + 64 * c) as *const _);
                        s = _mm512_dpwssd_epi32(s, _mm512_maddubs_epi16(kr.q[c], y), kr.sc[c]);
                    }
                    let mut sumi = _mm256_add_epi32(
                        _mm512_castsi512_si256(s),
                        _mm512_extracti64x4_epi64(s, 1),
                    );
                    if Q6 {
                        sumi = _mm256_sub_epi32(
                            sumi,
                            _mm256_setr_epi32(32 * corr_s[t], 0, 0, 0, 0, 0, 0, 0),
                        );
                    }
                    acc[r][t] = _mm256_fmadd_ps(
                        _mm256_set1_ps(ad[t] * kr.d),
                        _mm256_cvtepi32_ps(sumi),
                        acc[r][t],
                    );
                }
            }
        }
        for r in 0..4 {
            let mut mins = [0f32; 8];
            _mm256_storeu_ps(mins.as_mut_ptr(), acc_m[r]);
            for t in 0..N {
                out[r][t] = hsum(acc[r][t]) - mins[t];
            }
        }
    }

    macro_rules! k_tile {
        ($name:ident, $n:expr, $q6:expr, $block:expr) => {
            #[target_feature(
                enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni"
            )]
            unsafe fn $name(
                w: &[u8],
                wrb: usize,
                a: &[u8],
                rb: usize,
                k: usize,
                out: &mut [[f32; $n]; 4],
            ) {
                let rows = Rows {
                    p: w.as_ptr(),
                    stride: wrb,
                    block: $block,
                    n: k / 256,
                };
                k_tile_zmm::<$n, $q6>(rows, a.as_ptr(), rb, out);
            }
        };
    }
    k_tile!(q4_k_z, 4, false, 144);
    k_tile!(q4_k_z8, 8, false, 144);
    k_tile!(q6_k_z, 4, true, 210);
    k_tile!(q6_k_z8, 8, true, 210);

    /// A safe tile entry point: `$n` tokens, weight blocks of `$per` values and `$wbs` bytes,
    /// activation blocks of `$abs` bytes. The caller hands these out only after detecting the
    /// features `$f` needs.
    macro_rules! safe_tile {
        ($f:ident, $n:expr, $per:expr, $wbs:expr, $abs:expr) => {
            |w: &[u8], wrb: usize, a: &[u8], rb: usize, k: usize, out: &mut [[f32; $n]; 4]| {
                assert!(
                    k % $per == 0
                        && w.len() >= 3 * wrb + k / $per * $wbs
                        && a.len() >= ($n - 1) * rb + k / $per * $abs
                );
                // SAFETY: tile4()/tile8() hand these out only after is_x86_feature_detected! found
                // the AVX-512 features $f is compiled for; the assert gives `w` four rows and `a`
                // $n rows of k / $per whole blocks each, all that $f reads.
                unsafe { $f(w, wrb, a, rb, k, out) }
            }
        };
    }

    pub fn tile4_zmm(t: GgmlType) -> Option<Tile4Fn> {
        Some(match t {
            GgmlType::Q4_K => safe_tile!(q4_k_z, 4, 256, 144, Q8K_BYTES),
            GgmlType::Q6_K => safe_tile!(q6_k_z, 4, 256, 210, Q8K_BYTES),
            GgmlType::Q4_0 => safe_tile!(q4_0_z, 4, 32, 18, Q8_BYTES),
            GgmlType::Q4_1 => safe_tile!(q4_1_z, 4, 32, 20, Q8_BYTES),
            GgmlType::Q5_0 => safe_tile!(q5_0_z, 4, 32, 22, Q8_BYTES),
            GgmlType::Q8_0 => safe_tile!(q8_0_z, 4, 32, 34, Q8_BYTES),
            _ => return None,
        })
    }

    pub fn tile8_zmm(t: GgmlType) -> Option<Tile8Fn> {
        Some(match t {
            GgmlType::Q4_K => safe_tile!(q4_k_z8, 8, 256, 144, Q8K_BYTES),
            GgmlType::Q6_K => safe_tile!(q6_k_z8, 8, 256, 210, Q8K_BYTES),
            GgmlType::Q4_0 => safe_tile!(q4_0_z8, 8, 32, 18, Q8_BYTES),
            GgmlType::Q4_1 => safe_tile!(q4_1_z8, 8, 32, 20, Q8_BYTES),
            GgmlType::Q5_0 => safe_tile!(q5_0_z8, 8, 32, 22, Q8_BYTES),
            GgmlType::Q8_0 => safe_tile!(q8_0_z8, 8, 32, 34, Q8_BYTES),
            _ => return None,
        })
    }

    pub fn tile4(t: GgmlType) -> Option<Tile4Fn> {
        Some(match t {
            GgmlType::Q4_0 => safe_tile!(q4_0_t, 4, 32, 18, Q8_BYTES),
            GgmlType::Q4_1 => safe_tile!(q4_1_t, 4, 32, 20, Q8_BYTES),
            GgmlType::Q5_0 => safe_tile!(q5_0_t, 4, 32, 22, Q8_BYTES),
            GgmlType::Q8_0 => safe_tile!(q8_0_t, 4, 32, 34, Q8_BYTES),
            _ => return None,
        })
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[inline(always)]
    unsafe fn rd_f32(p: *const u8) -> f32 {
        (p as *const f32).read_unaligned()
    }

    #[inline(always)]
    unsafe fn f16(p: *const u8) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
            (p as *const u16).read_unaligned() as i32,
        )))
    }

    /// Bytes ahead of the current weight block to prefetch when decoding one token: weights stream
    /// from DRAM once per token and the hardware prefetcher stops at every 4 KiB page boundary.
    /// (4 KiB measured best on this machine: 1 KiB left decode ~10% slower, 8 KiB too.)
    const PREFETCH: usize = 4096;

    #[inline(always)]
    unsafe fn prefetch<const N: usize>(p: *const u8) {
        if N == 1 {
            _mm_prefetch(p.wrapping_add(PREFETCH) as *const i8, _MM_HINT_T0);
        }
    }

    #[inline(always)]
    unsafe fn load(p: *const u8) -> __m256i {
        _mm256_loadu_si256(p as *const __m256i)
    }

    /// Unsigned bytes (< 128) times signed bytes, summed in groups of four into 8 i32 lanes.
    #[inline(always)]
    unsafe fn dot_u8i8<const V: bool>(u: __m256i, s: __m256i) -> __m256i {
        if V {
            _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s)
        } else {
            _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
        }
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
    pub(crate) unsafe fn bits_to_bytes(bits: u32) -> __m256i {
        let x = _mm256_set1_epi32(bits as i32);
        let shuf = _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3,
            3, 3, 3,
        );
        let bytes = _mm256_shuffle_epi8(x, shuf);
        let sel = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe_u64 as i64));
        _mm256_cmpeq_epi8(sel, _mm256_set1_epi64x(-1))
    }

    /// Accumulation order shared by every kernel over 32-value blocks (one token, four tokens, tiles):
    /// blocks are taken in pairs, `acc += s1*p1 + s0*p0` (one rounding in the fma), and an odd last
    /// block adds `s0*p0`. Pairs halve the dependency chain on the accumulator, which bounds decode;
    /// one fixed order makes a token's logits the same whether it is decoded alone or in a tile.
    #[inline(always)]
    unsafe fn pair_acc(acc: __m256, s0: __m256, p0: __m256, s1: __m256, p1: __m256) -> __m256 {
        _mm256_add_ps(acc, _mm256_fmadd_ps(s1, p1, _mm256_mul_ps(s0, p0)))
    }

    #[inline(always)]
    unsafe fn last_acc(acc: __m256, s0: __m256, p0: __m256) -> __m256 {
        _mm256_add_ps(acc, _mm256_mul_ps(s0, p0))
    }

    /// `pair_acc` for 512-bit vectors (two tokens per register): lane for lane the same operations.
    #[inline(always)]
    unsafe fn pair_acc_z(acc: __m512, s0: __m512, p0: __m512, s1: __m512, p1: __m512) -> __m512 {
        _mm512_add_ps(acc, _mm512_fmadd_ps(s1, p1, _mm512_mul_ps(s0, p0)))
    }

    #[inline(always)]
    unsafe fn last_acc_z(acc: __m512, s0: __m512, p0: __m512) -> __m512 {
        _mm512_add_ps(acc, _mm512_mul_ps(s0, p0))
    }

    /// The scalar side of the same order (Q4_1's min terms).
    #[inline(always)]
    fn pair_acc_f(acc: f32, s0: f32, p0: f32, s1: f32, p1: f32) -> f32 {
        acc + s1.mul_add(p1, s0 * p0)
    }

    /// One block `wb` of signed weights against the matching activation block of N tokens (`ab`,
    /// tokens `rb` apart): the sign of the weight moves onto the activation so that the
    /// unsigned-by-signed multiply sees |q|.
    #[inline(always)]
    unsafe fn signed_step<const N: usize, const V: bool>(
        wb: *const u8,
        ab: *const u8,
        rb: usize,
        unpack: &impl Unpack,
    ) -> ([__m256; N], [__m256; N]) {
        prefetch::<N>(wb);
        let dw = f16(wb);
        let q = unpack.get(wb);
        let aq = _mm256_sign_epi8(q, q);
        let (mut sv, mut pv) = ([_mm256_setzero_ps(); N], [_mm256_setzero_ps(); N]);
        for t in 0..N {
            let ab = ab.add(t * rb);
            let y = _mm256_sign_epi8(load(ab.add(8)), q);
            pv[t] = _mm256_cvtepi32_ps(dot_u8i8::<V>(aq, y));
            sv[t] = _mm256_set1_ps(dw * rd_f32(ab));
        }
        (sv, pv)
    }

    /// Blocks of 32 signed weights with one f16 scale.
    #[inline(always)]
    unsafe fn signed_blocks<const N: usize, const V: bool>(
        nb: usize,
        wbs: usize,
        w: *const u8,
        a: *const u8,
        rb: usize,
        out: &mut [f32],
        unpack: impl Unpack,
    ) {
        let acc = pairwise!(N, nb, |b| signed_step::<N, V>(
            w.add(b * wbs),
            a.add(b * Q8_BYTES),
            rb,
            &unpack
        ));
        for t in 0..N {
            out[t] = hsum(acc[t]);
        }
    }

    #[inline(always)]
    unsafe fn q4_0<const N: usize, const V: bool>(
        w: *const u8,
        nb: usize,
        a: *const u8,
        rb: usize,
        out: &mut [f32],
    ) {
        signed_blocks::<N, V>(nb, 18, w, a, rb, out, Q4_0Signed);
    }

    #[inline(always)]
    unsafe fn q5_0<const N: usize, const V: bool>(
        w: *const u8,
        nb: usize,
        a: *const u8,
        rb: usize,
        out: &mut [f32],
    ) {
        signed_blocks::<N, V>(nb, 22, w, a, rb, out, Q5_0Signed);
    }

    #[inline(always)]
    unsafe fn q8_0<const N: usize, const V: bool>(
        w: *const u8,
        nb: usize,
        a: *const u8,
        rb: usize,
        out: &mut [f32],
    ) {
        signed_blocks::<N, V>(nb, 34, w, a, rb, out, Q8_0Signed);
    }

    /// One Q4_1 block against N tokens' Q8_1 blocks (the min terms are added by `q4_1_mins`).
    #[inline(always)]
    unsafe fn q4_1_step<const N: usize, const V: bool>(
        wb: *const u8,
        ab: *const u8,
        rb: usize,
    ) -> ([__m256; N], [__m256; N]) {
        prefetch::<N>(wb);
        let dw = f16(wb);
        let q = nibbles(wb.add(4));
        let (mut sv, mut pv) = ([_mm256_setzero_ps(); N], [_mm256_setzero_ps(); N]);
        for t in 0..N {
            let ab = ab.add(t * rb);
            pv[t] = _mm256_cvtepi32_ps(dot_u8i8::<V>(q, load(ab.add(8))));
            sv[t] = _mm256_set1_ps(dw * rd_f32(ab));
        }
        (sv, pv)
    }

    #[inline(always)]
    unsafe fn q4_1<const N: usize, const V: bool>(
        w: *const u8,
        nb: usize,
        a: *const u8,
        rb: usize,
        out: &mut [f32],
    ) {
        // The pairwise walk of `pairwise!`, with the min terms summed alongside in the same order as
        // `q4_1_mins` (scalar work that overlaps the vector work instead of a second pass).
        let mut acc = [_mm256_setzero_ps(); N];
        let mut mins = [0f32; N];
        let m = |b: usize, t: usize| {
            (
                f16(w.add(b * 20 + 2)),
                rd_f32(a.add(t * rb + b * Q8_BYTES + 4)),
            )
        };
        let mut b = 0;
        while b + 1 < nb {
            let (s0, p0) = q4_1_step::<N, V>(w.add(b * 20), a.add(b * Q8_BYTES), rb);
            let (s1, p1) = q4_1_step::<N, V>(w.add((b + 1) * 20), a.add((b + 1) * Q8_BYTES), rb);
            for t in 0..N {
                acc[t] = pair_acc(acc[t], s0[t], p0[t], s1[t], p1[t]);
                let ((m0, a0), (m1, a1)) = (m(b, t), m(b + 1, t));
                mins[t] = pair_acc_f(mins[t], m0, a0, m1, a1);
            }
            b += 2;
        }
        if b < nb {
            let (s0, p0) = q4_1_step::<N, V>(w.add(b * 20), a.add(b * Q8_BYTES), rb);
            for t in 0..N {
                acc[t] = last_acc(acc[t], s0[t], p0[t]);
                let (m0, a0) = m(b, t);
                mins[t] += m0 * a0;
            }
        }
        for t in 0..N {
            out[t] = hsum(acc[t]) + mins[t];
        }
    }

    /// Σ_b min_b · s_b for one weight row and one Q8_1 activation row (`s` = d · Σq), in the shared
    /// pairwise order; kept apart from the vector sums so every kernel variant adds it the same way.
    #[inline(always)]
    unsafe fn q4_1_mins(w: *const u8, wbs: usize, nb: usize, a: *const u8) -> f32 {
        let m = |b: usize| (f16(w.add(b * wbs + 2)), rd_f32(a.add(b * Q8_BYTES + 4)));
        let mut acc = 0f32;
        let mut b = 0;
        while b + 1 < nb {
            let ((m0, s0), (m1, s1)) = (m(b), m(b + 1));
            acc = pair_acc_f(acc, m0, s0, m1, s1);
            b += 2;
        }
        if b < nb {
            let (m0, s0) = m(b);
            acc += m0 * s0;
        }
        acc
    }

    #[inline(always)]
    fn k4_scales(sc: &[u8; 12]) -> ([i16; 8], [i16; 8]) {
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

    /// 32 unsigned weights times 32 activations, scaled by a per-sub-block integer scale.
    #[inline(always)]
    unsafe fn scaled<const V: bool>(q: __m256i, y: __m256i, sc: __m256i) -> __m256i {
        if V {
            _mm256_mullo_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), q, y), sc)
        } else {
            _mm256_madd_epi16(_mm256_maddubs_epi16(q, y), sc)
        }
    }

    #[inline(always)]
    unsafe fn q4_k<const N: usize, const V: bool>(
        w: *const u8,
        nb: usize,
        a: *const u8,
        rb: usize,
        out: &mut [f32],
    ) {
        k_min::<N, V, false>(w, nb, a, rb, out)
    }

    #[inline(always)]
    unsafe fn q5_k<const N: usize, const V: bool>(
        w: *const u8,
        nb: usize,
        a: *const u8,
        rb: usize,
        out: &mut [f32],
    ) {
        k_min::<N, V, true>(w, nb, a, rb, out)
    }

    /// Q4_K, and Q5_K (`FIVE`: the fifth bit of element 32 j + l is bit j of qh[l], added as 16).
    #[inline(always)]
    unsafe fn k_min<const N: usize, const V: bool, const FIVE: bool>(
        w: *const u8,
        nb: usize,
        a: *const u8,
        rb: usize,
        out: &mut [f32],
    ) {
        let mut acc = [_mm256_setzero_ps(); N];
        let mut acc_m = [0f32; N];
        let low = _mm256_set1_epi8(0x0F);
        let (bs, qs_at) = if FIVE { (176, 48) } else { (144, 16) };
        for b in 0..nb {
            let wb = w.add(b * bs);
            prefetch::<N>(wb);
            prefetch::<N>(wb.wrapping_add(64));
            if FIVE {
                prefetch::<N>(wb.wrapping_add(128));
            }
            let (dw, dmin) = (f16(wb), f16(wb.add(2)));
            let (sc, mn) = k4_scales(&*(wb.add(4) as *const [u8; 12]));
            // Sub-block by sub-block, every token: one unpacked vector and its scale live at a
            // time, so four tokens' sums stay in registers (AVX2 has 16).
            let mut sumi = [_mm256_setzero_si256(); N];
            let qh = if FIVE {
                load(wb.add(16))
            } else {
                _mm256_setzero_si256()
            };
            for j in 0..8 {
                let bits = load(wb.add(qs_at + 32 * (j / 2)));
                let mut q = if j % 2 == 0 {
                    _mm256_and_si256(bits, low)
                } else {
                    _mm256_and_si256(_mm256_srli_epi16(bits, 4), low)
                };
                if FIVE {
                    q = _mm256_or_si256(q, bit_value(qh, j, 16));
                }
                let scv = if V {
                    _mm256_set1_epi32(sc[j] as i32)
                } else {
                    _mm256_set1_epi16(sc[j])
                };
                add_products::<N, V>(&mut sumi, q, scv, a.add(b * Q8K_BYTES + 4 + 32 * j), rb);
            }
            // Each min weighs the sums of its sub-block's two 16-groups: one pmaddwd.
            let pairs: [i16; 16] = std::array::from_fn(|g| mn[g / 2]);
            let mp = _mm256_loadu_si256(pairs.as_ptr() as *const __m256i);
            let ab = a.add(b * Q8K_BYTES);
            add_scaled_min::<N>(&mut acc, &mut acc_m, &sumi, ab, rb, (dw, dmin), mp);
        }
        for t in 0..N {
            out[t] = hsum(acc[t]) - acc_m[t];
        }
    }

    /// Every token's `sumi += scaled(q, y, scv)` for one 32-value vector of weights; `y` is token 0's
    /// 32 activations, the others `rb` apart.
    #[inline(always)]
    unsafe fn add_products<const N: usize, const V: bool>(
        sumi: &mut [__m256i; N],
        q: __m256i,
        scv: __m256i,
        y: *const u8,
        rb: usize,
    ) {
        for t in 0..N {
            sumi[t] = _mm256_add_epi32(sumi[t], scaled::<V>(q, load(y.add(t * rb)), scv));
        }
    }

    /// `value` in the bytes whose bit `j` is set in `bits` (Q5_K's fifth bit, Q3_K's third), else 0.
    #[inline(always)]
    unsafe fn bit_value(bits: __m256i, j: usize, value: i8) -> __m256i {
        let m = _mm256_set1_epi8((1u8 << j) as i8);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(bits, m), m);
        _mm256_and_si256(set, _mm256_set1_epi8(value))
    }

    /// One super-block's contribution with mins, token by token: `acc += (ad d) sumi` and
    /// `acc_m += ad dmin (Σ_g min_g bsum_g)`, `mins` holding one i16 min per 16-group. `ab` is
    /// token 0's activation block, the others `rb` apart.
    #[inline(always)]
    unsafe fn add_scaled_min<const N: usize>(
        acc: &mut [__m256; N],
        acc_m: &mut [f32; N],
        sumi: &[__m256i; N],
        ab: *const u8,
        rb: usize,
        (dw, dmin): (f32, f32),
        mins: __m256i,
    ) {
        for t in 0..N {
            let ab = ab.add(t * rb);
            let summ = hsum_i32(_mm256_madd_epi16(load(ab.add(260)), mins));
            let ad = rd_f32(ab);
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(ad * dw), _mm256_cvtepi32_ps(sumi[t]), acc[t]);
            acc_m[t] += ad * dmin * summ as f32;
        }
    }

    /// One super-block's contribution with a level offset `OFF` (Q3_K 4, Q6_K 32): `acc += (ad d)
    /// (sumi - OFF Σ_g scale_g bsum_g)`, `scales` holding one i16 scale per 16-group.
    #[inline(always)]
    unsafe fn add_scaled_offset<const N: usize, const OFF: i32>(
        acc: &mut [__m256; N],
        sumi: &[__m256i; N],
        ab: *const u8,
        rb: usize,
        dw: f32,
        scales: __m256i,
    ) {
        for t in 0..N {
            let ab = ab.add(t * rb);
            let off = hsum_i32(_mm256_madd_epi16(load(ab.add(260)), scales));
            let total =
                _mm256_sub_epi32(sumi[t], _mm256_setr_epi32(OFF * off, 0, 0, 0, 0, 0, 0, 0));
            acc[t] = _mm256_fmadd_ps(
                _mm256_set1_ps(rd_f32(ab) * dw),
                _mm256_cvtepi32_ps(total),
                acc[t],
            );
        }
    }

    /// Exact sum of eight i32 lanes.
    #[inline(always)]
    unsafe fn hsum_i32(v: __m256i) -> i32 {
        let s4 = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
        _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 1)))
    }

    /// Q2_K's and Q3_K's 2-bit levels of elements 32 j .. 32 j + 32: bits 2 (j % 4) of the 32 bytes
    /// at `qs + 32 (j / 4)`.
    #[inline(always)]
    unsafe fn crumbs(qs: *const u8, j: usize) -> __m256i {
        let bits = load(qs.add(32 * (j / 4)));
        let v = match j % 4 {
            0 => bits,
            1 => _mm256_srli_epi16(bits, 2),
            2 => _mm256_srli_epi16(bits, 4),
            _ => _mm256_srli_epi16(bits, 6),
        };
        _mm256_and_si256(v, _mm256_set1_epi8(3))
    }

    /// Per-16 group scales as the multiplier of `scaled` for elements 32 j .. 32 j + 32: lanes 0..3
    /// cover elements 0..15 (group 2 j), lanes 4..7 elements 16..31 (group 2 j + 1).
    #[inline(always)]
    unsafe fn group_scale<const V: bool>(sc: &[i32; 16], j: usize) -> __m256i {
        let (s0, s1) = (sc[2 * j], sc[2 * j + 1]);
        if V {
            _mm256_set_m128i(_mm_set1_epi32(s1), _mm_set1_epi32(s0))
        } else {
            _mm256_set_m128i(_mm_set1_epi16(s1 as i16), _mm_set1_epi16(s0 as i16))
        }
    }

    /// Q2_K: levels 0..3 scaled per group of 16; the mins come from the activation group sums.
    #[inline(always)]
    unsafe fn q2_k<const N: usize, const V: bool>(
        w: *const u8,
        nb: usize,
        a: *const u8,
        rb: usize,
        out: &mut [f32],
    ) {
        let mut acc = [_mm256_setzero_ps(); N];
        let mut acc_m = [0f32; N];
        for b in 0..nb {
            let wb = w.add(b * 84);
            prefetch::<N>(wb);
            prefetch::<N>(wb.wrapping_add(64));
            let (dw, dmin) = (f16(wb.add(80)), f16(wb.add(82)));
            let sc: [i32; 16] = std::array::from_fn(|g| (*wb.add(g) & 0xF) as i32);
            let mut sumi = [_mm256_setzero_si256(); N];
            for j in 0..8 {
                let (q, scv) = (crumbs(wb.add(16), j), group_scale::<V>(&sc, j));
                add_products::<N, V>(&mut sumi, q, scv, a.add(b * Q8K_BYTES + 4 + 32 * j), rb);
            }
            let mins = _mm256_cvtepu8_epi16(_mm_srli_epi16(
                _mm_and_si128(
                    _mm_loadu_si128(wb as *const __m128i),
                    _mm_set1_epi8(0xF0u8 as i8),
                ),
                4,
            ));
            let ab = a.add(b * Q8K_BYTES);
            add_scaled_min::<N>(&mut acc, &mut acc_m, &sumi, ab, rb, (dw, dmin), mins);
        }
        for t in 0..N {
            out[t] = hsum(acc[t]) - acc_m[t];
        }
    }

    /// Q3_K: levels unpacked to unsigned 0..7 (two bits, plus the hmask bit as 4); the -4 offset is
    /// applied through the activation group sums, as Q6_K's -32.
    #[inline(always)]
    unsafe fn q3_k<const N: usize, const V: bool>(
        w: *const u8,
        nb: usize,
        a: *const u8,
        rb: usize,
        out: &mut [f32],
    ) {
        let mut acc = [_mm256_setzero_ps(); N];
        for b in 0..nb {
            let wb = w.add(b * 110);
            prefetch::<N>(wb);
            prefetch::<N>(wb.wrapping_add(64));
            let dw = f16(wb.add(108));
            let hm = load(wb);
            let sc12 = std::slice::from_raw_parts(wb.add(96), 12);
            let sc: [i32; 16] = std::array::from_fn(|g| quant::q3k_scale(sc12, g) as i32);
            let mut sumi = [_mm256_setzero_si256(); N];
            for j in 0..8 {
                let q = _mm256_or_si256(crumbs(wb.add(32), j), bit_value(hm, j, 4));
                let scv = group_scale::<V>(&sc, j);
                add_products::<N, V>(&mut sumi, q, scv, a.add(b * Q8K_BYTES + 4 + 32 * j), rb);
            }
            let sc16: [i16; 16] = std::array::from_fn(|g| sc[g] as i16);
            let scv16 = _mm256_loadu_si256(sc16.as_ptr() as *const __m256i);
            add_scaled_offset::<N, 4>(&mut acc, &sumi, a.add(b * Q8K_BYTES), rb, dw, scv16);
        }
        for t in 0..N {
            out[t] = hsum(acc[t]);
        }
    }

    /// Q6_K: weights are unpacked to unsigned 0..63; the -32 offset is applied through the activation
    /// block sums (32 * Σ scale_g * bsum_g) instead of a second multiply per vector.
    #[inline(always)]
    unsafe fn q6_k<const N: usize, const V: bool>(
        w: *const u8,
        nb: usize,
        a: *const u8,
        rb: usize,
        out: &mut [f32],
    ) {
        let mut acc = [_mm256_setzero_ps(); N];
        let low = _mm256_set1_epi8(0x0F);
        let three = _mm256_set1_epi8(3);
        for b in 0..nb {
            let wb = w.add(b * 210);
            prefetch::<N>(wb);
            prefetch::<N>(wb.wrapping_add(64));
            prefetch::<N>(wb.wrapping_add(128));
            let dw = f16(wb.add(208));
            let scales = &*(wb.add(192) as *const [i8; 16]);
            let sc: [i32; 16] = std::array::from_fn(|g| scales[g] as i32);
            let mut sumi = [_mm256_setzero_si256(); N];
            for j in 0..8 {
                let (half, i) = (j / 4, j % 4);
                let l = load(wb.add(64 * half + 32 * (i % 2)));
                let lo = if i < 2 {
                    _mm256_and_si256(l, low)
                } else {
                    _mm256_and_si256(_mm256_srli_epi16(l, 4), low)
                };
                let qh = load(wb.add(128 + 32 * half));
                let hi = match i {
                    0 => qh,
                    1 => _mm256_srli_epi16(qh, 2),
                    2 => _mm256_srli_epi16(qh, 4),
                    _ => _mm256_srli_epi16(qh, 6),
                };
                let q = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(hi, three), 4));
                let scv = group_scale::<V>(&sc, j);
                add_products::<N, V>(&mut sumi, q, scv, a.add(b * Q8K_BYTES + 4 + 32 * j), rb);
            }
            // Group g of 16 activations has scale scales[g]: the offset 32 * Σ scale_g * bsum_g.
            let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(scales.as_ptr() as *const __m128i));
            add_scaled_offset::<N, 32>(&mut acc, &sumi, a.add(b * Q8K_BYTES), rb, dw, sc16);
        }
        for t in 0..N {
            out[t] = hsum(acc[t]);
        }
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
            s += f16(w.as_ptr().add(2 * j)) * rd_f32(a.as_ptr().add(4 * j));
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

    /// # Safety
    /// The CPU must support avx2 and fma.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        dot_raw(a, b)
    }

    #[inline(always)]
    unsafe fn hmax(v: __m256) -> f32 {
        let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_movehdup_ps(m));
        _mm_cvtss_f32(m)
    }

    /// 8 i32 lanes holding values in -127..=127 -> 8 bytes written at `dst`.
    #[inline(always)]
    unsafe fn store_i8x8(v: __m256i, dst: *mut u8) {
        let w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let b = _mm_packs_epi16(w, w);
        (dst as *mut i64).write_unaligned(_mm_cvtsi128_si64(b));
    }

    /// # Safety
    /// The CPU must support avx2, fma and f16c; `out` must hold Q8_BYTES per whole 32-value block
    /// of `x`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn quantize_q8(x: &[f32], out: &mut [u8]) {
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        for (b, xb) in x.chunks_exact(quant::QK).enumerate() {
            let p = xb.as_ptr();
            let v = [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ];
            let m = _mm256_max_ps(
                _mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask)),
                _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask)),
            );
            let amax = hmax(m);
            let d = amax / 127.0;
            let id = _mm256_set1_ps(if d != 0.0 { 127.0 / amax } else { 0.0 });
            let ob = out.as_mut_ptr().add(b * Q8_BYTES);
            let mut sum = _mm256_setzero_si256();
            for (i, vi) in v.iter().enumerate() {
                let r = _mm256_round_ps(
                    _mm256_mul_ps(*vi, id),
                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
                );
                let q = _mm256_cvtps_epi32(r);
                sum = _mm256_add_epi32(sum, q);
                store_i8x8(q, ob.add(8 + 8 * i));
            }
            let s = _mm_add_epi32(
                _mm256_castsi256_si128(sum),
                _mm256_extracti128_si256(sum, 1),
            );
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
            let total = _mm_cvtsi128_si32(s);
            let d16 = half::f16::from_f32(d).to_f32();
            let s16 = half::f16::from_f32(d * total as f32).to_f32();
            (ob as *mut f32).write_unaligned(d16);
            (ob.add(4) as *mut f32).write_unaligned(s16);
        }
    }

    /// # Safety
    /// The CPU must support avx2, fma and f16c; `out` must hold Q8K_BYTES per whole 256-value block
    /// of `x`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn quantize_q8k(x: &[f32], out: &mut [u8]) {
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        for (b, xb) in x.chunks_exact(quant::QK_K).enumerate() {
            let p = xb.as_ptr();
            let mut m = _mm256_setzero_ps();
            for i in 0..32 {
                m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(p.add(8 * i)), abs_mask));
            }
            let amax = hmax(m);
            let ob = out.as_mut_ptr().add(b * Q8K_BYTES);
            if amax == 0.0 {
                std::ptr::write_bytes(ob, 0, Q8K_BYTES);
                continue;
            }
            // The signed value of largest magnitude (first one, as the scalar reference picks).
            let max = *xb.iter().find(|v| v.abs() == amax).unwrap_or(&amax);
            let iscale = -127.0 / max;
            let isv = _mm256_set1_ps(iscale);
            let top = _mm256_set1_epi32(127);
            for g in 0..16 {
                let mut gs = _mm256_setzero_si256();
                for h in 0..2 {
                    let i = 2 * g + h;
                    let r = _mm256_round_ps(
                        _mm256_mul_ps(isv, _mm256_loadu_ps(p.add(8 * i))),
                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
                    );
                    let q = _mm256_min_epi32(_mm256_cvtps_epi32(r), top);
                    gs = _mm256_add_epi32(gs, q);
                    store_i8x8(q, ob.add(4 + 8 * i));
                }
                let s = _mm_add_epi32(_mm256_castsi256_si128(gs), _mm256_extracti128_si256(gs, 1));
                let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
                let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
                (ob.add(260 + 2 * g) as *mut i16).write_unaligned(_mm_cvtsi128_si32(s) as i16);
            }
            (ob as *mut f32).write_unaligned(1.0 / iscale);
        }
    }

    /// # Safety
    /// The CPU must support avx2, fma and f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpy_f16(y: &mut [f32], alpha: f32, x: &[u16]) {
        let n = y.len().min(x.len());
        let n8 = n / 8 * 8;
        let av = _mm256_set1_ps(alpha);
        let mut i = 0;
        while i < n8 {
            let p = y.as_mut_ptr().add(i);
            let xv = _mm256_cvtph_ps(_mm_loadu_si128(x.as_ptr().add(i) as *const __m128i));
            _mm256_storeu_ps(p, _mm256_fmadd_ps(av, xv, _mm256_loadu_ps(p)));
            i += 8;
        }
        for j in n8..n {
            y[j] += alpha * f16(x.as_ptr().add(j) as *const u8);
        }
    }

    /// # Safety
    /// The CPU must support avx2 and fma.
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
// Tests: a failed unwrap is a failed test, and skipped checks say so on stderr.
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]
mod tests {
    use super::*;
    use crate::quant::testutil::{random_row, Rng};
    use crate::quant::{act_type, quantize_act};

    fn isas() -> Vec<Isa> {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                v.push(Isa::Avx2);
                if is_x86_feature_detected!("avxvnni") {
                    v.push(Isa::Avx2Vnni);
                }
            }
        }
        v
    }

    /// Every SIMD kernel (one-token and four-token, with and without VNNI) against the scalar reference
    /// on random blocks, for odd block counts too.
    #[test]
    fn simd_kernels_match_scalar_reference() {
        let isas = isas();
        if isas.is_empty() {
            eprintln!("no AVX2 on this CPU: only the scalar kernels are in use");
            return;
        }
        let mut rng = Rng(12345);
        for isa in isas {
            for t in [
                GgmlType::F32,
                GgmlType::F16,
                GgmlType::Q4_0,
                GgmlType::Q4_1,
                GgmlType::Q5_0,
                GgmlType::Q8_0,
                GgmlType::Q2_K,
                GgmlType::Q3_K,
                GgmlType::Q4_K,
                GgmlType::Q5_K,
                GgmlType::Q6_K,
            ] {
                #[cfg(target_arch = "x86_64")]
                let (one, four) = avx2::kernels(t, isa).unwrap();
                // Odd block counts (288 = 9 blocks of 32) exercise the unpaired last block.
                for k in [256usize, 288, 768, 1280, 2304, 2336] {
                    let (per_block, _) = t.block_layout().unwrap();
                    if k % per_block != 0 {
                        continue;
                    }
                    let at = act_type(t).unwrap();
                    let rb = at.row_bytes(k) + 40; // a stride wider than a row, as a tile may have
                    for _ in 0..10 {
                        let w = random_row(t, k, &mut rng);
                        let mut a = vec![0u8; 4 * rb];
                        let mut want = [0f32; 4];
                        for (i, wv) in want.iter_mut().enumerate() {
                            let x: Vec<f32> = (0..k).map(|_| rng.f32() * 4.0).collect();
                            quantize_act(at, &x, &mut a[i * rb..i * rb + at.row_bytes(k)]);
                            *wv = scalar_kernel(t).unwrap()(&w, &a[i * rb..], k);
                        }
                        let close = |v: f32, s: f32| (s - v).abs() <= 1e-4 * s.abs().max(1.0);
                        let v = one(&w, &a[rb..], k);
                        assert!(
                            close(v, want[1]),
                            "{isa:?} {t:?} k={k}: simd {v} scalar {}",
                            want[1]
                        );
                        let mut got = [0f32; 4];
                        four(&w, &a, rb, k, &mut got);
                        for i in 0..4 {
                            assert!(
                                close(got[i], want[i]),
                                "{isa:?} {t:?} x4 k={k} row {i}: {} vs {}",
                                got[i],
                                want[i]
                            );
                            // Bit for bit what the one-token kernel gives: a token's logits must not
                            // depend on whether it was computed alone or with others.
                            let alone = one(&w, &a[i * rb..], k);
                            assert_eq!(got[i].to_bits(), alone.to_bits(), "{isa:?} {t:?} x4 vs x1");
                        }
                    }
                }
            }
        }
    }

    /// Checks one tile kernel (4 weight rows x N tokens) against the scalar reference for several row
    /// lengths, with rows and tokens at non-contiguous strides.
    fn check_tile<const N: usize>(
        t: GgmlType,
        rng: &mut Rng,
        tile: impl Fn(&[u8], usize, &[u8], usize, usize, &mut [[f32; N]; 4]),
    ) {
        let (per, ts) = t.block_layout().unwrap();
        for k in [32usize, 64, 96, 896, 256, 768, 1536] {
            if k % per != 0 {
                continue;
            }
            let at = act_type(t).unwrap();
            let rb = at.row_bytes(k) + 40;
            let wrb = k / per * ts + 6;
            let mut w = vec![0u8; 4 * wrb];
            for r in 0..4 {
                w[r * wrb..r * wrb + k / per * ts].copy_from_slice(&random_row(t, k, rng));
            }
            let mut a = vec![0u8; N * rb];
            for i in 0..N {
                let x: Vec<f32> = (0..k).map(|_| rng.f32() * 3.0).collect();
                quantize_act(at, &x, &mut a[i * rb..i * rb + at.row_bytes(k)]);
            }
            let mut got = [[0f32; N]; 4];
            tile(&w, wrb, &a, rb, k, &mut got);
            for r in 0..4 {
                for i in 0..N {
                    let want = scalar_kernel(t).unwrap()(
                        &w[r * wrb..r * wrb + k / per * ts],
                        &a[i * rb..i * rb + at.row_bytes(k)],
                        k,
                    );
                    assert!(
                        (got[r][i] - want).abs() <= 1e-4 * want.abs().max(1.0),
                        "{t:?} x{N} k={k} r={r} t={i}: {} vs {want}",
                        got[r][i]
                    );
                    // Bit for bit the one-token kernel's result (same summation order).
                    let alone = kernel(t).unwrap()(
                        &w[r * wrb..r * wrb + k / per * ts],
                        &a[i * rb..i * rb + at.row_bytes(k)],
                        k,
                    );
                    assert_eq!(
                        got[r][i].to_bits(),
                        alone.to_bits(),
                        "{t:?} x{N} tile vs x1"
                    );
                }
            }
        }
    }

    const TILE_TYPES: [GgmlType; 6] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ];

    /// The 4x4 tile kernels (the selected one and the AVX-VNNI one) against the scalar reference.
    #[test]
    fn tile_kernels_match_scalar_reference() {
        let mut rng = Rng(4242);
        for t in TILE_TYPES {
            let Some(tile) = tile4(t) else {
                eprintln!("no 4x4 tile kernel for {t:?} on this CPU");
                continue;
            };
            check_tile(t, &mut rng, tile);
            #[cfg(target_arch = "x86_64")]
            if let Some(vnni) = avx2::tile4(t) {
                check_tile(t, &mut rng, vnni);
            }
        }
    }

    #[test]
    fn tile8_kernels_match_scalar_reference() {
        let mut rng = Rng(777);
        for t in TILE_TYPES {
            let Some(tile) = tile8(t) else {
                eprintln!("no 4x8 tile kernel for {t:?} on this CPU");
                continue;
            };
            check_tile(t, &mut rng, tile);
        }
    }

    #[test]
    fn simd_quantization_is_byte_identical_to_scalar() {
        let mut rng = Rng(99);
        for t in [
            crate::quant::ActType::Q8_0,
            crate::quant::ActType::Q8_1,
            crate::quant::ActType::Q8K,
        ] {
            for k in [256usize, 768] {
                for scale in [0.0f32, 1e-3, 1.0, 300.0] {
                    let x: Vec<f32> = (0..k).map(|_| rng.f32() * scale).collect();
                    let mut a = vec![0u8; t.row_bytes(k)];
                    let mut b = vec![0u8; t.row_bytes(k)];
                    crate::quant::quantize_act(t, &x, &mut a);
                    quantize_act(t, &x, &mut b);
                    assert_eq!(a, b, "{t:?} k={k} scale={scale}");
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
            let a16: Vec<u16> = a
                .iter()
                .map(|v| half::f16::from_f32(*v).to_bits())
                .collect();
            axpy_f16(&mut y, 0.5, &a16);
            for i in 0..n {
                let want = b[i] + 0.5 * half::f16::from_bits(a16[i]).to_f32();
                assert!((y[i] - want).abs() < 1e-6);
            }
            let mut y = b.clone();
            axpy(&mut y, 0.5, &a);
            for i in 0..n {
                assert!((y[i] - (b[i] + 0.5 * a[i])).abs() < 1e-6);
            }
        }
    }
}
