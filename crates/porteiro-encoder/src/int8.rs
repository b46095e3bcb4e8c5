//! int8 products for the encoder's linear layers with AVX-512 VNNI (`vpdpbusd`: 64 multiply-adds of
//! u8 × i8 into 16 i32 lanes per instruction, twice `vdpbf16ps`'s work and four times an f32 FMA's).
//!
//! Weights are quantized once, symmetrically per output column (scale = max |w| / 127). Activations
//! are quantized as they arrive, per token and per group of 128 K values, asymmetrically over the
//! group's own range into u8 (the operand `vpdpbusd` takes unsigned): x ≈ lo + s·u with
//! s = (max − lo) / 255, which spends every level on the values present (GELU's outputs barely go
//! below zero), and keeps a token's few outlier channels from coarsening all its other values
//! (one scale per token cost 0.8% of cosine on a 3-token input). The offset comes back out through
//! each column's sum of weights over the group: Σx·w ≈ s_w·Σ_g (s_g·Σu·q + lo_g·Σq). A group's i32
//! sum is exact, and the f32 steps run in one fixed order, so the AVX-512 kernel and the scalar
//! reference agree bit for bit; only the rounding of the operands differs from f32, and routing
//! decisions are what that must not move (`porteiro router parity`). Attention's products stay in
//! bf16 or f32.
//!
//! On CPUs without AVX-512 the same quantized operands run through AVX2's `vpmaddwd` (pairs of u8
//! and i8 widened to i16: 16 multiply-adds per instruction, twice an AVX2 f32 FMA's), with the same
//! sums and the same bits. `PORTEIRO_INT8=0` turns the path off.

// A kernel module: AVX-512 VNNI and AVX2 intrinsics over buffers whose sizes the callers check.
#![allow(unsafe_code)]

use std::sync::OnceLock;

/// Output columns per block (one zmm of i32) and K values per quad (one i32 lane of bytes).
const NB: usize = 16;
const KG: usize = 4;
/// K values per activation scale.
pub const GROUP: usize = 128;
/// Rows and column blocks of C one call of the VNNI micro-kernel holds in registers (12 i32 sums of
/// the group in flight and 12 f32 totals); rows are padded to a multiple of MR for both kernels.
const MR: usize = 4;
const NR: usize = 3;

/// The instructions an int8 product runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int8Kernel {
    /// AVX-512 VNNI `vpdpbusd`.
    Vnni,
    /// AVX2 `vpmaddwd` on operands widened to i16.
    Avx2,
    /// Plain Rust: the reference.
    Scalar,
}

impl Int8Kernel {
    pub fn runs_here(self) -> bool {
        match self {
            Int8Kernel::Vnni => vnni(),
            Int8Kernel::Avx2 => avx2(),
            Int8Kernel::Scalar => true,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Int8Kernel::Vnni => "int8 VNNI",
            Int8Kernel::Avx2 => "int8 AVX2",
            Int8Kernel::Scalar => "int8 scalar",
        }
    }
}

/// The int8 kernel this process uses for the encoder's linear layers: VNNI where the CPU has it and
/// `PORTEIRO_ISA` leaves AVX-512, else AVX2; `None` with `PORTEIRO_INT8=0`, `PORTEIRO_ISA=scalar`
/// or neither instruction set.
pub fn kernel() -> Option<Int8Kernel> {
    static K: OnceLock<Option<Int8Kernel>> = OnceLock::new();
    *K.get_or_init(|| {
        let isa = std::env::var("PORTEIRO_ISA").unwrap_or_default();
        if std::env::var("PORTEIRO_INT8").as_deref() == Ok("0") || isa == "scalar" {
            None
        } else if crate::bf16::wide_allowed() && vnni() {
            Some(Int8Kernel::Vnni)
        } else if avx2() {
            Some(Int8Kernel::Avx2)
        } else {
            None
        }
    })
}

/// Whether the linear layers can run in int8 here (`kernel()` is some).
pub fn available() -> bool {
    kernel().is_some()
}

fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

fn vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

/// A weight matrix [n][k] (out × in) as i8 in the kernel's order: for each block of 16 columns and
/// each quad of K values, 16 × 4 bytes (one zmm). Padded with zeros to 48 columns and 4 K values.
#[derive(Default)]
pub struct PackedB8 {
    data: Vec<i8>,
    /// Per column: the dequantization scale.
    scale: Vec<f32>,
    /// Per activation group, per column: the sum of the column's quantized weights in the group.
    colsum: Vec<f32>,
    /// The AVX2 kernel's copy, widened to i16: per block of 8 columns and pair of K values, 8 × 2
    /// values (one ymm). Empty unless packed for that kernel.
    wide16: Vec<i16>,
    n: usize,
    n_pad: usize,
    k_pad: usize,
}

impl PackedB8 {
    /// Packs W(col, kk) = w[col * k + kk] for the kernel this process uses.
    pub fn pack(w: &[f32], k: usize, n: usize) -> Self {
        Self::pack_for(w, k, n, kernel().unwrap_or(Int8Kernel::Scalar))
    }

    /// Packs for `kernel` (the AVX2 one needs its widened copy).
    pub fn pack_for(w: &[f32], k: usize, n: usize, kernel: Int8Kernel) -> Self {
        assert!(w.len() >= n * k);
        let (n_pad, k_pad) = (round_up(n.max(1), NB * NR), round_up(k.max(1), KG));
        let quads = k_pad / KG;
        let mut data = vec![0i8; n_pad * k_pad];
        let mut scale = vec![0f32; n_pad];
        let mut colsum = vec![0f32; k_pad.div_ceil(GROUP) * n_pad];
        for col in 0..n {
            let row = &w[col * k..(col + 1) * k];
            let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = max / 127.0;
            let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
            scale[col] = s;
            let base = (col / NB) * quads * NB * KG + (col % NB) * KG;
            for (kk, v) in row.iter().enumerate() {
                let q = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
                data[base + (kk / KG) * NB * KG + kk % KG] = q;
                colsum[(kk / GROUP) * n_pad + col] += f32::from(q);
            }
        }
        let mut wide16 = Vec::new();
        if kernel == Int8Kernel::Avx2 {
            let pairs = k_pad / 2;
            wide16 = vec![0i16; n_pad * k_pad];
            for col in 0..n {
                let base = (col / NB) * quads * NB * KG + (col % NB) * KG;
                for kk in 0..k {
                    let q = data[base + (kk / KG) * NB * KG + kk % KG];
                    wide16[((col / 8) * pairs + kk / 2) * 16 + (col % 8) * 2 + kk % 2] =
                        i16::from(q);
                }
            }
        }
        Self {
            data,
            scale,
            colsum,
            wide16,
            n,
            n_pad,
            k_pad,
        }
    }
}

/// Activations [m][k] quantized per row and group into u8 (x ≈ lo + scale·u), rows padded to a
/// multiple of 4 and K to a multiple of 4 (padding meets zero weights, so its value does not
/// matter).
#[derive(Default)]
pub struct PackedA8 {
    data: Vec<u8>,
    /// For the AVX2 kernel: each pair of K values widened to two i16 in one u32, ready to broadcast.
    pairs: Vec<u32>,
    /// Per row, per group.
    scale: Vec<f32>,
    lo: Vec<f32>,
    m: usize,
    k_pad: usize,
    groups: usize,
}

impl PackedA8 {
    /// Quantizes A(r, c) = src[r * row_stride + c] for r < m, c < k. Reuses the buffers.
    pub fn pack(&mut self, src: &[f32], m: usize, k: usize, row_stride: usize) {
        assert!(m == 0 || (m - 1) * row_stride + k <= src.len());
        #[cfg(target_arch = "x86_64")]
        match kernel() {
            Some(Int8Kernel::Vnni) => {
                // SAFETY: the CPU has AVX-512 F/BW (the VNNI kernel is in use).
                unsafe { self.pack_wide(src, m, k, row_stride) };
                return;
            }
            Some(Int8Kernel::Avx2) => {
                // SAFETY: the CPU has AVX2 (the AVX2 kernel is in use).
                unsafe { self.pack_avx2(src, m, k, row_stride) };
                return;
            }
            _ => {}
        }
        self.pack_rows(src, m, k, row_stride, |_, _| None);
    }

    /// `pack_rows` compiled for AVX2 (the rounding becomes one instruction, not a libm call), plus
    /// the widened pairs the AVX2 kernel broadcasts.
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn pack_avx2(&mut self, src: &[f32], m: usize, k: usize, row_stride: usize) {
        self.pack_rows(src, m, k, row_stride, |_, _| None);
        self.widen_pairs();
    }

    /// Fills `pairs` from `data`.
    fn widen_pairs(&mut self) {
        self.pairs.clear();
        self.pairs.extend(
            self.data
                .chunks_exact(2)
                .map(|p| u32::from(p[0]) | (u32::from(p[1]) << 16)),
        );
    }

    /// `pack_rows` with each whole group's range and rounding done 16 lanes at a time (the same
    /// values: min and max are exact, and the conversion rounds to nearest even as the scalar
    /// code does).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and BW.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn pack_wide(&mut self, src: &[f32], m: usize, k: usize, row_stride: usize) {
        use std::arch::x86_64::*;
        self.pack_rows(src, m, k, row_stride, |part, dst| {
            if part.len() != GROUP {
                return None;
            }
            // SAFETY: `part` holds GROUP values and `dst` as many bytes; AVX-512 F/BW are enabled
            // in the enclosing function, which only runs where the CPU has them.
            unsafe {
                let p = part.as_ptr();
                let (mut lo, mut hi) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p));
                for i in 1..GROUP / 16 {
                    let v = _mm512_loadu_ps(p.add(16 * i));
                    (lo, hi) = (_mm512_min_ps(lo, v), _mm512_max_ps(hi, v));
                }
                let (lo, hi) = (_mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi));
                let s = (hi - lo) / 255.0;
                let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
                let (lov, invv) = (_mm512_set1_ps(lo), _mm512_set1_ps(inv));
                for i in 0..GROUP / 16 {
                    let v = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(p.add(16 * i)), lov), invv);
                    let q = _mm512_max_epi32(_mm512_cvtps_epi32(v), _mm512_setzero_si512());
                    _mm_storeu_si128(
                        dst.as_mut_ptr().add(16 * i).cast(),
                        _mm512_cvtusepi32_epi8(q),
                    );
                }
                Some((s, lo))
            }
        })
    }

    /// Quantizes every row group by group; `wide(group, dst)` may do a group itself (returning its
    /// scale and offset), else the scalar code does.
    #[inline(always)]
    fn pack_rows(
        &mut self,
        src: &[f32],
        m: usize,
        k: usize,
        row_stride: usize,
        wide: impl Fn(&[f32], &mut [u8]) -> Option<(f32, f32)>,
    ) {
        let (m_pad, k_pad) = (round_up(m.max(1), MR), round_up(k.max(1), KG));
        let groups = k_pad.div_ceil(GROUP);
        self.data.clear();
        self.data.resize(m_pad * k_pad, 0);
        for v in [&mut self.scale, &mut self.lo] {
            v.clear();
            v.resize(m_pad * groups, 0.0);
        }
        (self.m, self.k_pad, self.groups) = (m, k_pad, groups);
        for r in 0..m {
            let row = &src[r * row_stride..r * row_stride + k];
            for (g, part) in row.chunks(GROUP).enumerate() {
                let at = r * k_pad + g * GROUP;
                let dst = &mut self.data[at..at + part.len()];
                let (s, lo) = wide(part, dst).unwrap_or_else(|| {
                    let (lo, hi) = part
                        .iter()
                        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                            (a.min(v), b.max(v))
                        });
                    let s = (hi - lo) / 255.0;
                    let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
                    for (d, v) in dst.iter_mut().zip(part) {
                        *d = ((v - lo) * inv).round_ties_even().clamp(0.0, 255.0) as u8;
                    }
                    (s, lo)
                });
                (self.scale[r * groups + g], self.lo[r * groups + g]) = (s, lo);
            }
        }
    }
}

/// C(r, col) = Σ A(r, ·)·W(col, ·) (+ bias[col]) for the rows of `a` and the columns of `b`, into
/// `c` (row stride `ldc` ≥ `b`'s columns); nothing outside those rows and columns is written. Runs on
/// `kernel()` (the scalar reference where there is none: the same bits).
pub fn gemm(a: &PackedA8, b: &PackedB8, bias: Option<&[f32]>, c: &mut [f32], ldc: usize) {
    let k = match kernel() {
        Some(Int8Kernel::Avx2) if b.wide16.is_empty() => Int8Kernel::Scalar,
        k => k.unwrap_or(Int8Kernel::Scalar),
    };
    gemm_on(k, a, b, bias, c, ldc)
}

/// `gemm` on a given kernel, which the CPU must run (and for AVX2, `b` packed for it).
pub fn gemm_on(
    kernel: Int8Kernel,
    a: &PackedA8,
    b: &PackedB8,
    bias: Option<&[f32]>,
    c: &mut [f32],
    ldc: usize,
) {
    assert_eq!(a.k_pad, b.k_pad, "A and B disagree on K");
    assert!(ldc >= b.n && (a.m == 0 || c.len() >= (a.m - 1) * ldc + b.n));
    assert!(bias.is_none_or(|v| v.len() >= b.n));
    assert!(kernel.runs_here(), "{} cannot run here", kernel.name());
    match kernel {
        // SAFETY: the CPU has AVX-512 F/BW/VNNI (checked); the shapes were just checked.
        #[cfg(target_arch = "x86_64")]
        Int8Kernel::Vnni => unsafe { gemm_vnni(a, b, bias, c, ldc) },
        #[cfg(target_arch = "x86_64")]
        Int8Kernel::Avx2 => {
            assert_eq!(
                b.wide16.len(),
                b.n_pad * b.k_pad,
                "B is not packed for AVX2"
            );
            assert_eq!(a.pairs.len(), a.data.len() / 2, "A is not packed for AVX2");
            // SAFETY: the CPU has AVX2 (checked); the shapes and the widened copy were checked.
            unsafe { gemm_avx2(a, b, bias, c, ldc) }
        }
        _ => gemm_scalar(a, b, bias, c, ldc),
    }
}

/// The bias of columns `c0..c0 + N` (zeros past `n` or without a bias), for a kernel's block.
fn bias_block<const N: usize>(bias: Option<&[f32]>, c0: usize, n: usize) -> [f32; N] {
    let mut t = [0f32; N];
    if let Some(v) = bias {
        for (t, i) in t.iter_mut().zip(c0..n) {
            *t = v[i];
        }
    }
    t
}

/// The reference, in the kernel's order of f32 steps: per group, total += sum·s_g, then
/// total += lo_g·colsum_g; at the end total·s_w + bias (no fused multiply-adds).
fn gemm_scalar(a: &PackedA8, b: &PackedB8, bias: Option<&[f32]>, c: &mut [f32], ldc: usize) {
    let quads = b.k_pad / KG;
    for r in 0..a.m {
        let ar = &a.data[r * a.k_pad..(r + 1) * a.k_pad];
        for col in 0..b.n {
            let base = (col / NB) * quads * NB * KG + (col % NB) * KG;
            let mut total = 0f32;
            for g in 0..a.groups {
                let mut sum = 0i32;
                for q in g * GROUP / KG..((g + 1) * GROUP / KG).min(quads) {
                    for j in 0..KG {
                        let w = b.data[base + q * NB * KG + j];
                        sum += i32::from(ar[q * KG + j]) * i32::from(w);
                    }
                }
                total += sum as f32 * a.scale[r * a.groups + g];
                total += a.lo[r * a.groups + g] * b.colsum[g * b.n_pad + col];
            }
            c[r * ldc + col] = total * b.scale[col] + bias.map_or(0.0, |v| v[col]);
        }
    }
}

/// 4 rows × 48 columns per call: per group, 12 zmm of i32 sums (per quad of K, three weight
/// vectors loaded and each row's 4 bytes broadcast), folded into 12 zmm of f32 totals with the
/// group's scales. Columns outer: a 48-column weight panel (K·48 bytes, 72 KB at K = 1536) stays
/// in L2 while the rows stream past it.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and VNNI, and the shapes must agree as `gemm_on` checks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn gemm_vnni(a: &PackedA8, b: &PackedB8, bias: Option<&[f32]>, c: &mut [f32], ldc: usize) {
    use std::arch::x86_64::*;
    let quads = b.k_pad / KG;
    let (ap, bp, cp) = (a.data.as_ptr(), b.data.as_ptr(), c.as_mut_ptr());
    for nb in (0..b.n_pad / NB).step_by(NR) {
        let c0 = nb * NB;
        let bias_t: [f32; NB * NR] = bias_block(bias, c0, b.n);
        let bias_v: [__m512; NR] =
            std::array::from_fn(|j| _mm512_loadu_ps(bias_t.as_ptr().add(j * NB)));
        let sw: [__m512; NR] =
            std::array::from_fn(|j| _mm512_loadu_ps(b.scale.as_ptr().add(c0 + j * NB)));
        let masks: [__mmask16; NR] = std::array::from_fn(|j| {
            let valid = b.n.saturating_sub(c0 + j * NB).min(NB);
            ((1u32 << valid) - 1) as __mmask16
        });
        let b0 = bp.add(nb * quads * NB * KG);
        for r0 in (0..a.m).step_by(MR) {
            let mut total = [[_mm512_setzero_ps(); NR]; MR];
            let a0 = ap.add(r0 * a.k_pad);
            for g in 0..a.groups {
                let mut acc = [[_mm512_setzero_si512(); NR]; MR];
                for q in g * GROUP / KG..((g + 1) * GROUP / KG).min(quads) {
                    let bv: [__m512i; NR] = std::array::from_fn(|j| {
                        _mm512_loadu_si512(b0.add((j * quads + q) * NB * KG).cast())
                    });
                    for (i, row) in acc.iter_mut().enumerate() {
                        let quad = a0.add(i * a.k_pad + q * KG).cast::<i32>().read_unaligned();
                        let av = _mm512_set1_epi32(quad);
                        for (o, w) in row.iter_mut().zip(&bv) {
                            *o = _mm512_dpbusd_epi32(*o, av, *w);
                        }
                    }
                }
                let cs: [__m512; NR] = std::array::from_fn(|j| {
                    _mm512_loadu_ps(b.colsum.as_ptr().add(g * b.n_pad + c0 + j * NB))
                });
                for (i, (t_row, a_row)) in total.iter_mut().zip(&acc).enumerate() {
                    // Rows past m hold padding; their scales are zeros.
                    let at = (r0 + i) * a.groups + g;
                    let s = _mm512_set1_ps(a.scale[at]);
                    let lo = _mm512_set1_ps(a.lo[at]);
                    for j in 0..NR {
                        let t =
                            _mm512_add_ps(t_row[j], _mm512_mul_ps(_mm512_cvtepi32_ps(a_row[j]), s));
                        t_row[j] = _mm512_add_ps(t, _mm512_mul_ps(lo, cs[j]));
                    }
                }
            }
            for (i, row) in total.iter().enumerate().take(a.m - r0) {
                let r = r0 + i;
                for j in 0..NR {
                    let v = _mm512_add_ps(_mm512_mul_ps(row[j], sw[j]), bias_v[j]);
                    _mm512_mask_storeu_ps(cp.add(r * ldc + c0 + j * NB), masks[j], v);
                }
            }
        }
    }
}

/// 4 rows × 16 columns per call: per group, 8 ymm of i32 sums (per pair of K values, two widened
/// weight vectors loaded and each row's two activations broadcast as i16, `vpmaddwd` then `vpaddd`),
/// folded into f32 totals kept in L1 with the group's scales, in the scalar reference's order.
///
/// # Safety
/// The CPU must have AVX2, `b.wide16` must be packed, and the shapes must agree as `gemm_on`
/// checks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn gemm_avx2(a: &PackedA8, b: &PackedB8, bias: Option<&[f32]>, c: &mut [f32], ldc: usize) {
    use std::arch::x86_64::*;
    const W: usize = 8;
    const R: usize = 4;
    const J: usize = 2;
    let pairs = b.k_pad / 2;
    let (ap, bp, cp) = (a.pairs.as_ptr(), b.wide16.as_ptr(), c.as_mut_ptr());
    for cb in (0..b.n_pad / W).step_by(J) {
        let c0 = cb * W;
        let bias_t: [f32; W * J] = bias_block(bias, c0, b.n);
        for r0 in (0..a.m).step_by(R) {
            let mut total = [[0f32; W * J]; R];
            for g in 0..a.groups {
                let mut acc = [[_mm256_setzero_si256(); J]; R];
                for p in g * GROUP / 2..((g + 1) * GROUP / 2).min(pairs) {
                    let bv: [__m256i; J] = std::array::from_fn(|j| {
                        _mm256_loadu_si256(bp.add(((cb + j) * pairs + p) * 16).cast())
                    });
                    for (i, row) in acc.iter_mut().enumerate() {
                        let av = _mm256_set1_epi32(*ap.add((r0 + i) * pairs + p) as i32);
                        for (o, w) in row.iter_mut().zip(&bv) {
                            *o = _mm256_add_epi32(*o, _mm256_madd_epi16(av, *w));
                        }
                    }
                }
                for (i, (t_row, a_row)) in total.iter_mut().zip(&acc).enumerate() {
                    // Rows past m are padding; their scales are zeros.
                    let at = (r0 + i) * a.groups + g;
                    let (s, lo) = (_mm256_set1_ps(a.scale[at]), _mm256_set1_ps(a.lo[at]));
                    for j in 0..J {
                        let cs = _mm256_loadu_ps(b.colsum.as_ptr().add(g * b.n_pad + c0 + j * W));
                        let tp = t_row.as_mut_ptr().add(j * W);
                        let t = _mm256_add_ps(
                            _mm256_loadu_ps(tp),
                            _mm256_mul_ps(_mm256_cvtepi32_ps(a_row[j]), s),
                        );
                        _mm256_storeu_ps(tp, _mm256_add_ps(t, _mm256_mul_ps(lo, cs)));
                    }
                }
            }
            for (i, row) in total.iter().enumerate().take(a.m - r0) {
                let mut out = [0f32; W * J];
                for j in 0..J {
                    let v = _mm256_add_ps(
                        _mm256_mul_ps(
                            _mm256_loadu_ps(row.as_ptr().add(j * W)),
                            _mm256_loadu_ps(b.scale.as_ptr().add(c0 + j * W)),
                        ),
                        _mm256_loadu_ps(bias_t.as_ptr().add(j * W)),
                    );
                    _mm256_storeu_ps(out.as_mut_ptr().add(j * W), v);
                }
                let valid = b.n.saturating_sub(c0).min(W * J);
                std::ptr::copy_nonoverlapping(out.as_ptr(), cp.add((r0 + i) * ldc + c0), valid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rand as rand;

    /// The VNNI kernel gives the scalar reference's bits, and both stay within the quantization error
    /// of an f64 product, over shapes with row, column and K tails, with and without a bias.
    #[test]
    fn gemm_matches_reference_on_odd_shapes() {
        let mut seed = 9;
        for &(m, k, n) in &[
            (1, 4, 1),
            (13, 70, 37),
            (8, 384, 32),
            (33, 1536, 384),
            (5, 3, 48),
            (6, 200, 50),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| rand(&mut seed) * 3.0).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rand(&mut seed) * 0.2).collect();
            let bias: Vec<f32> = (0..n).map(|_| rand(&mut seed)).collect();
            let b = PackedB8::pack_for(&w, k, n, Int8Kernel::Avx2);
            let mut a = PackedA8::default();
            a.pack(&vec![7.0; 64 * 2000], 64, 2000, 2000); // a stale, larger buffer first
            a.pack(&x, m, k, k);
            a.widen_pairs(); // the AVX2 kernel's operand, whichever kernel `pack` prepared for
            for bias in [None, Some(&bias[..])] {
                let mut want = vec![f32::NAN; m * n + 3];
                gemm_on(Int8Kernel::Scalar, &a, &b, bias, &mut want, n);
                assert!(want[m * n..].iter().all(|v| v.is_nan()), "wrote past C");
                for r in 0..m {
                    for col in 0..n {
                        let exact: f64 = (0..k)
                            .map(|kk| x[r * k + kk] as f64 * w[col * k + kk] as f64)
                            .sum::<f64>()
                            + bias.map_or(0.0, |v| v[col] as f64);
                        // Each operand is off by at most half a step; the errors add like a random walk.
                        let xs = (0..k).fold(0f32, |s, kk| s.max(x[r * k + kk].abs())) as f64 * 2.0;
                        let ws = (0..k).fold(0f32, |s, kk| s.max(w[col * k + kk].abs())) as f64;
                        let tol = 2.0 * (xs * ws / 127.0) * (k as f64).sqrt() + 1e-5;
                        let got = want[r * n + col] as f64;
                        assert!(
                            (got - exact).abs() <= tol,
                            "{m}x{k}x{n} ({r},{col}): {got} vs {exact}"
                        );
                    }
                }
                for kernel in [Int8Kernel::Vnni, Int8Kernel::Avx2] {
                    if !kernel.runs_here() {
                        eprintln!("{} cannot run here: not checked", kernel.name());
                        continue;
                    }
                    let mut got = vec![f32::NAN; m * n + 3];
                    gemm_on(kernel, &a, &b, bias, &mut got, n);
                    for i in 0..m * n {
                        assert_eq!(
                            got[i].to_bits(),
                            want[i].to_bits(),
                            "{} {m}x{k}x{n} at {i}",
                            kernel.name()
                        );
                    }
                    assert!(got[m * n..].iter().all(|v| v.is_nan()), "wrote past C");
                }
            }
        }
    }

    /// The AVX-512 quantization of whole groups gives the scalar code's bytes, scales and offsets.
    #[test]
    fn wide_packing_matches_scalar() {
        let mut seed = 5;
        let (m, k) = (7, 3 * GROUP + 40);
        let x: Vec<f32> = (0..m * k).map(|_| rand(&mut seed) * 4.0 - 0.5).collect();
        let mut want = PackedA8::default();
        want.pack_rows(&x, m, k, k, |_, _| None);
        if kernel() != Some(Int8Kernel::Vnni) {
            eprintln!("the AVX-512 group quantizer is not in use here: not checked");
            return;
        }
        let mut got = PackedA8::default();
        got.pack(&x, m, k, k);
        assert_eq!(got.data, want.data);
        assert_eq!(got.scale, want.scale);
        assert_eq!(got.lo, want.lo);
    }

    #[test]
    fn zero_rows_and_columns_quantize_to_zero() {
        let b = PackedB8::pack(&[0.0; 8], 4, 2);
        let mut a = PackedA8::default();
        a.pack(&[0.0, 0.0, 0.0, 0.0, 1.0, -2.0, 0.5, 0.0], 2, 4, 4);
        let mut c = [f32::NAN; 4];
        gemm(&a, &b, Some(&[0.25, -1.0]), &mut c, 2);
        assert_eq!(c, [0.25, -1.0, 0.25, -1.0]);
    }
}
