//! bf16 matrix multiply for the sentence encoder: on Intel AMX tiles (Sapphire Rapids and later) or
//! with AVX-512 BF16 dot products (`vdpbf16ps`: AMD Zen 4 and later, Cooper Lake), chosen at run time.
//!
//! One `tdpbf16ps` multiplies a 16×32 bf16 tile by a 32×16 one into 16×16 f32 sums: 8192
//! multiply-adds per instruction, about 3.3 TFLOP/s per core measured on a Xeon, against ~0.1 TFLOP/s
//! for the f32 GEMM: it takes a 256-token MiniLM pass from ~32 ms to ~7 ms on two cores. Without AMX,
//! one `vdpbf16ps` does 32 multiply-adds (pairs of bf16 into 16 f32 lanes), twice a 512-bit f32 FMA's
//! work, from the same packed operands (the tiles' layout is the one it wants).
//!
//! Operands are packed into the layouts the tiles load, one contiguous 1 KB tile after another: A as
//! 16-row × 32-value bf16 tiles (K padded to a multiple of 32, rows to a multiple of 32); B as
//! 16×(16 pairs) tiles, each row holding two consecutive K values for 16 output columns ("VNNI"
//! order). Products of bf16 values are exact in f32; only the
//! rounding of the operands to bf16 (8 significant bits) differs from an f32 GEMM.
//!
//! Linux hands out AMX tile state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`); `available()`
//! asks once per process. `PORTEIRO_AMX=0` turns the AMX kernel off (AVX-512 BF16 is used where the
//! CPU has it), `PORTEIRO_BF16=0` both (the encoder then runs in f32).

// A kernel module: AMX tile instructions and AVX-512 BF16 packing through intrinsics and inline asm.
#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
use std::arch::asm;
use std::sync::OnceLock;

/// Rows of A (tokens) and columns of B handled by one tile.
pub const TILE: usize = 16;
/// K values per tile row (32 bf16 = 64 bytes).
pub const TILE_K: usize = 32;

/// The instructions a bf16 product runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// AMX tiles (`tdpbf16ps`).
    Amx,
    /// AVX-512 BF16 dot products (`vdpbf16ps`) into zmm accumulators.
    Avx512Bf16,
    /// Plain Rust over the packed operands: the reference the others are tested against.
    Scalar,
}

impl Kernel {
    /// The fastest kernel this process may use, or `None` where only the scalar one exists (the
    /// encoder then keeps f32, which is faster than a scalar bf16 product). Honours `PORTEIRO_BF16=0`,
    /// `PORTEIRO_AMX=0`, and `PORTEIRO_ISA` set to `avx2`, `avx2vnni` or `scalar` (the engine's cap,
    /// which stands for a CPU without AVX-512 or AMX: f32).
    pub fn best() -> Option<Kernel> {
        static BEST: OnceLock<Option<Kernel>> = OnceLock::new();
        *BEST.get_or_init(|| {
            if std::env::var("PORTEIRO_BF16").as_deref() == Ok("0") || !wide_allowed() {
                None
            } else if available() {
                Some(Kernel::Amx)
            } else if Kernel::Avx512Bf16.runs_here() {
                Some(Kernel::Avx512Bf16)
            } else {
                None
            }
        })
    }

    /// Whether this CPU (and, for AMX, the kernel's permission) can run it.
    pub fn runs_here(self) -> bool {
        match self {
            Kernel::Amx => available(),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Bf16 => hw_bf16(),
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::Avx512Bf16 => false,
            Kernel::Scalar => true,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Amx => "AMX bf16",
            Kernel::Avx512Bf16 => "AVX-512 bf16",
            Kernel::Scalar => "scalar bf16",
        }
    }
}

/// Whether `PORTEIRO_ISA` leaves AVX-512 (and AMX) to this process: unset, or none of the engine's
/// caps below AVX-512.
pub fn wide_allowed() -> bool {
    !matches!(
        std::env::var("PORTEIRO_ISA").as_deref(),
        Ok("avx2" | "avx2vnni" | "scalar")
    )
}

/// Whether AMX-BF16 can be used in this process (CPU support, kernel permission, not disabled).
pub fn available() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("PORTEIRO_AMX").as_deref() != Ok("0") && probe())
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn probe() -> bool {
    // CPUID.(EAX=7,ECX=0):EDX bit 22 = AMX-BF16, bit 24 = AMX-TILE.
    let id = std::arch::x86_64::__cpuid_count(7, 0);
    if id.edx & (1 << 22) == 0 || id.edx & (1 << 24) == 0 {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain syscall with integer arguments; it only changes this process's permissions.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn probe() -> bool {
    false
}

/// f32 → bf16, rounding to nearest even (inputs here are finite).
#[inline(always)]
pub fn bf16(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

#[inline]
pub fn f32_of(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

/// bf16 storage whose start is 64-byte aligned: a tile row that straddles two cache lines costs two
/// loads, which halved the kernel's speed (measured: 680 vs 1300 GFLOP/s on the same shape, depending
/// only on where the allocator put the buffer). Contents are stale between packs: the packing
/// functions write every element, padding included, so no pass clears the buffer first.
#[derive(Default)]
struct TileBuf {
    raw: Vec<u16>,
    off: usize,
}

impl TileBuf {
    /// Room for `len` values, aligned; contents unspecified.
    fn reset(&mut self, len: usize) -> &mut [u16] {
        const ALIGN_U16: usize = 32;
        if self.raw.len() < len + ALIGN_U16 {
            self.raw.resize(len + ALIGN_U16, 0);
        }
        self.off = self.raw.as_ptr().align_offset(64).min(ALIGN_U16);
        debug_assert_eq!((self.raw.as_ptr() as usize + 2 * self.off) % 64, 0);
        &mut self.raw[self.off..self.off + len]
    }

    fn slice(&self) -> &[u16] {
        &self.raw[self.off..]
    }
}

/// The left operand: `m` rows of `k` values in bf16, padded with zeros to a multiple of 32 rows (two
/// tiles) and of 32 columns, stored tile by tile (each 16 rows × 32 values contiguous, 1 KB) so that
/// the kernel's loads are sequential streams the hardware prefetcher follows.
#[derive(Default)]
pub struct PackedA {
    data: TileBuf,
    m_pad: usize,
    k_pad: usize,
}

impl PackedA {
    /// Packs A(r, c) = src[r * row_stride + c] for r < m, c < k. Reuses the buffer.
    #[inline(always)]
    pub fn pack(&mut self, src: &[f32], m: usize, k: usize, row_stride: usize) {
        self.pack_map(src, m, k, row_stride, |_, _, _| {})
    }

    /// `pack` with an elementwise step fused in (a bias and an activation, a row scale), so the f32
    /// values are read once and never written back: `map(r, c0, chunk)` rewrites the 32 values of
    /// row r from column c0 (past k they are zeros, and are zeroed again after `map`).
    #[inline(always)]
    pub fn pack_map(
        &mut self,
        src: &[f32],
        m: usize,
        k: usize,
        row_stride: usize,
        mut map: impl FnMut(usize, usize, &mut [f32; TILE_K]),
    ) {
        assert!(m == 0 || (m - 1) * row_stride + k <= src.len());
        self.m_pad = round_up(m.max(1), 2 * TILE);
        self.k_pad = round_up(k.max(1), TILE_K);
        let (m_pad, kc) = (self.m_pad, self.k_pad / TILE_K);
        let data = self.data.reset(self.m_pad * self.k_pad);
        let shape = Shape {
            m,
            m_pad,
            k,
            kc,
            row_stride,
        };
        #[cfg(target_arch = "x86_64")]
        if hw_bf16() {
            // SAFETY: the CPU has AVX512-F and BF16 (hw_bf16).
            unsafe { pack_rows_hw(data, src, &shape, map) };
            return;
        }
        pack_rows(data, src, &shape, &mut map, |vals, dst| {
            for (o, &v) in dst.iter_mut().zip(vals) {
                *o = bf16(v);
            }
        });
    }

    /// A(r, c) as packed, for tests.
    pub fn get(&self, r: usize, c: usize) -> f32 {
        let kc = self.k_pad / TILE_K;
        let at = (r / TILE) * kc * TILE * TILE_K + (c / TILE_K) * TILE * TILE_K;
        f32_of(self.data.slice()[at + (r % TILE) * TILE_K + c % TILE_K])
    }

    /// Rows the product will have (m rounded up to a multiple of 32).
    pub fn rows_padded(&self) -> usize {
        self.m_pad
    }
}

/// Whether the CPU converts f32 to bf16 itself (`vcvtne2ps2bf16`, 32 values per instruction, the
/// same rounding as `bf16`). BW is checked too because `pack_b_hw` permutes 16-bit lanes; every CPU
/// with AVX512-BF16 has it.
#[cfg(target_arch = "x86_64")]
fn hw_bf16() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512bf16")
    })
}

/// The extent of one packing of A.
struct Shape {
    m: usize,
    m_pad: usize,
    k: usize,
    kc: usize,
    row_stride: usize,
}

/// Writes rows 0..m_pad of A in tile order: each 32-value chunk of a row is mapped into a stack
/// buffer and handed to `convert`; padding is zeros.
#[inline(always)]
fn pack_rows(
    data: &mut [u16],
    src: &[f32],
    sh: &Shape,
    map: &mut impl FnMut(usize, usize, &mut [f32; TILE_K]),
    convert: impl Fn(&[f32; TILE_K], &mut [u16]),
) {
    let mut vals = [0f32; TILE_K];
    for r in 0..sh.m_pad {
        let base = (r / TILE) * sh.kc * TILE * TILE_K + (r % TILE) * TILE_K;
        let row: &[f32] = if r < sh.m {
            &src[r * sh.row_stride..r * sh.row_stride + sh.k]
        } else {
            &[]
        };
        for c in 0..sh.kc {
            let dst = &mut data[base + c * TILE * TILE_K..][..TILE_K];
            let c0 = c * TILE_K;
            let part = row.get(c0..).unwrap_or(&[]);
            if part.len() >= TILE_K {
                vals.copy_from_slice(&part[..TILE_K]);
                map(r, c0, &mut vals);
            } else {
                let n = part.len();
                vals[..n].copy_from_slice(part);
                vals[n..].fill(0.0);
                if n > 0 {
                    map(r, c0, &mut vals);
                    vals[n..].fill(0.0);
                }
            }
            convert(&vals, dst);
        }
    }
}

/// `pack_rows` with the CPU's f32 → bf16 conversion (32 values per instruction).
///
/// # Safety
/// The CPU must have AVX512-F and AVX512-BF16 (`hw_bf16`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_rows_hw(
    data: &mut [u16],
    src: &[f32],
    sh: &Shape,
    mut map: impl FnMut(usize, usize, &mut [f32; TILE_K]),
) {
    use std::arch::x86_64::*;
    pack_rows(data, src, sh, &mut map, |vals, dst| {
        // SAFETY: vals holds 32 values and dst 32 slots; the enclosing function runs only where
        // AVX512-BF16 exists.
        unsafe {
            let lo = _mm512_loadu_ps(vals.as_ptr());
            let hi = _mm512_loadu_ps(vals.as_ptr().add(16));
            let packed: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(dst.as_mut_ptr().cast(), packed);
        }
    });
}

/// The extent of one packing of B.
struct ShapeB {
    k: usize,
    n: usize,
    k_pad: usize,
    n_pad: usize,
    col_stride: usize,
    k_stride: usize,
}

/// Writes B in tile order. `column(values, dst)` converts one column's 32-deep K slice into its 16
/// pairs, `dst[p * TILE_K]` and the value after (columns contiguous in K: a weight matrix's rows, K in
/// attention); `pair_rows(r0, r1, dst)` interleaves 16 columns of two consecutive K rows (rows
/// contiguous in columns: V in attention). Anything else, and every tail, goes element by element.
// The `expect`s turn slices of a constant length into arrays: they cannot fail.
#[allow(clippy::expect_used)]
#[inline(always)]
fn pack_b(
    data: &mut [u16],
    src: &[f32],
    sh: &ShapeB,
    column: impl Fn(&[f32; TILE_K], &mut [u16]),
    pair_rows: impl Fn(&[f32; TILE], &[f32; TILE], &mut [u16; 2 * TILE]),
) {
    let (k, n) = (sh.k, sh.n);
    if sh.k_stride == 1 && k == sh.k_pad {
        let kc = sh.k_pad / TILE_K;
        let zeros = [0f32; TILE_K];
        for col in 0..sh.n_pad {
            let base = (col / TILE) * kc * TILE * TILE_K + (col % TILE) * 2;
            for c in 0..kc {
                let slice: &[f32; TILE_K] = if col < n {
                    let at = col * sh.col_stride + c * TILE_K;
                    // Cannot fail: the slice is TILE_K long.
                    src[at..at + TILE_K].try_into().expect("a 32-value slice")
                } else {
                    &zeros
                };
                column(slice, &mut data[base + c * TILE * TILE_K..]);
            }
        }
        return;
    }
    // Destination in tile order (block of 16 columns, K slice, pair row, column, pair member), so it
    // is written sequentially.
    let mut at = 0;
    for nb in 0..sh.n_pad / TILE {
        let c0 = nb * TILE;
        for k0 in (0..sh.k_pad).step_by(2) {
            // Cannot fail (nor can the two below): the slices are 2 * TILE and TILE long.
            let dst: &mut [u16; 2 * TILE] = (&mut data[at..at + 2 * TILE])
                .try_into()
                .expect("a 32-value row");
            at += 2 * TILE;
            if sh.col_stride == 1 && c0 + TILE <= n && k0 + 2 <= k {
                let r0 = &src[k0 * sh.k_stride + c0..][..TILE];
                let r1 = &src[(k0 + 1) * sh.k_stride + c0..][..TILE];
                pair_rows(
                    r0.try_into().expect("16 values"),
                    r1.try_into().expect("16 values"),
                    dst,
                );
                continue;
            }
            for (j, d) in dst.chunks_exact_mut(2).enumerate() {
                let col = c0 + j;
                for (p, o) in d.iter_mut().enumerate() {
                    let kk = k0 + p;
                    *o = if col < n && kk < k {
                        bf16(src[col * sh.col_stride + kk * sh.k_stride])
                    } else {
                        0
                    };
                }
            }
        }
    }
}

/// `pack_b` with the CPU's conversion: a column's 32 K values convert in one instruction and are
/// scattered to their 16 pair rows; two K rows convert together and interleave in one permute.
///
/// # Safety
/// The CPU must have AVX512-F, AVX512-BW and AVX512-BF16 (`hw_bf16`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_b_hw(data: &mut [u16], src: &[f32], sh: &ShapeB) {
    use std::arch::x86_64::*;
    // Pair p of a K slice is one tile row (TILE_K u16 = TILE_K / 2 u32) below pair p - 1.
    let rows = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let scatter_at = _mm512_mullo_epi32(rows, _mm512_set1_epi32(TILE_K as i32 / 2));
    // From (r0[0..16], r1[0..16]) to (r0[0], r1[0], r0[1], r1[1], ...).
    let mut order = [0i16; 2 * TILE];
    for (j, o) in order.chunks_exact_mut(2).enumerate() {
        o[0] = j as i16;
        o[1] = (TILE + j) as i16;
    }
    let interleave = _mm512_loadu_si512(order.as_ptr().cast());
    pack_b(
        data,
        src,
        sh,
        |column, dst| {
            assert!(dst.len() > (TILE - 1) * TILE_K + 1);
            // SAFETY: 32 values are read from `column`; the 16 pairs written are inside `dst` (the
            // last one starts at 15 * TILE_K, checked above); the CPU has AVX512-BF16.
            unsafe {
                let lo = _mm512_loadu_ps(column.as_ptr());
                let hi = _mm512_loadu_ps(column.as_ptr().add(16));
                let pairs: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_i32scatter_epi32::<4>(dst.as_mut_ptr().cast(), scatter_at, pairs);
            }
        },
        |r0, r1, dst| {
            // SAFETY: 16 values are read from each row and 32 written to `dst`; the CPU has
            // AVX512-BF16 and AVX512-BW.
            unsafe {
                let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(
                    _mm512_loadu_ps(r1.as_ptr()),
                    _mm512_loadu_ps(r0.as_ptr()),
                ));
                let pairs = _mm512_permutexvar_epi16(interleave, both);
                _mm512_storeu_si512(dst.as_mut_ptr().cast(), pairs);
            }
        },
    );
}

/// The right operand, `k`×`n`, as tiles: for each block of 16 columns and each 32-deep slice of K, 16
/// rows of 16 (even, odd) K pairs. Padded with zeros to a multiple of 32 columns and 32 K values.
#[derive(Default)]
pub struct PackedB {
    data: TileBuf,
    n_pad: usize,
    k_pad: usize,
}

impl PackedB {
    /// Packs B(kk, col) = src[col * col_stride + kk * k_stride] for kk < k, col < n. A weight matrix
    /// stored [out][in] is `col_stride = in, k_stride = 1`. Reuses the buffer.
    #[inline(always)]
    pub fn pack(&mut self, src: &[f32], k: usize, n: usize, col_stride: usize, k_stride: usize) {
        assert!(k == 0 || n == 0 || (n - 1) * col_stride + (k - 1) * k_stride < src.len());
        self.n_pad = round_up(n.max(1), 2 * TILE);
        self.k_pad = round_up(k.max(1), TILE_K);
        let sh = ShapeB {
            k,
            n,
            k_pad: self.k_pad,
            n_pad: self.n_pad,
            col_stride,
            k_stride,
        };
        let data = self.data.reset(self.n_pad * self.k_pad);
        #[cfg(target_arch = "x86_64")]
        if hw_bf16() {
            // SAFETY: the CPU has AVX512-F, BW and BF16 (hw_bf16).
            unsafe { pack_b_hw(data, src, &sh) };
            return;
        }
        pack_b(
            data,
            src,
            &sh,
            |column, dst| {
                for (p, v) in column.chunks_exact(2).enumerate() {
                    dst[p * TILE_K] = bf16(v[0]);
                    dst[p * TILE_K + 1] = bf16(v[1]);
                }
            },
            |r0, r1, dst| {
                for (j, d) in dst.chunks_exact_mut(2).enumerate() {
                    d[0] = bf16(r0[j]);
                    d[1] = bf16(r1[j]);
                }
            },
        );
    }

    pub fn cols_padded(&self) -> usize {
        self.n_pad
    }

    /// B(kk, col), for tests.
    pub fn get(&self, kk: usize, col: usize) -> f32 {
        let kc = self.k_pad / TILE_K;
        let (nb, j) = (col / TILE, col % TILE);
        let (c, r, p) = (kk / TILE_K, (kk % TILE_K) / 2, kk % 2);
        f32_of(
            self.data.slice()[nb * kc * TILE * TILE_K + c * TILE * TILE_K + r * TILE_K + j * 2 + p],
        )
    }
}

/// The tile configuration `ldtilecfg` reads: palette 1, eight 16-row × 64-byte tiles.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
    reserved2: [u8; 16],
}

/// C = A·B on `kernel`, written into `c` (row stride `ldc` ≥ `b.cols_padded()`, at least
/// `a.rows_padded()` rows). Padding rows and columns of C receive zeros-times-whatever, i.e. zeros.
///
/// Panics if the shapes disagree or the CPU cannot run `kernel`.
pub fn gemm_with(kernel: Kernel, a: &PackedA, b: &PackedB, c: &mut [f32], ldc: usize) {
    assert!(kernel.runs_here(), "{} cannot run here", kernel.name());
    assert_eq!(a.k_pad, b.k_pad, "A and B disagree on K");
    assert!(ldc >= b.n_pad && c.len() >= (a.m_pad - 1) * ldc + b.n_pad);
    match kernel {
        // SAFETY: AMX permission was granted (runs_here); every tile load and store stays inside
        // the padded buffers, whose sizes were just checked.
        #[cfg(target_arch = "x86_64")]
        Kernel::Amx => unsafe { gemm_tiles(a, b, c, ldc) },
        // SAFETY: the CPU has AVX512-F/BW/BF16 (runs_here); the sizes were just checked.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Bf16 => unsafe { gemm_avx512(a, b, c, ldc) },
        _ => gemm_scalar(a, b, c, ldc),
    }
}

/// The reference: every output from the packed operands, summed pair by pair in f32 as
/// `vdpbf16ps` does (its lanes fold each pair's two products into the running sum).
fn gemm_scalar(a: &PackedA, b: &PackedB, c: &mut [f32], ldc: usize) {
    let kc = a.k_pad / TILE_K;
    let tile = TILE * TILE_K;
    let (ad, bd) = (a.data.slice(), b.data.slice());
    for r in 0..a.m_pad {
        let at = (r / TILE) * kc * tile + (r % TILE) * TILE_K;
        for col in 0..b.n_pad {
            let bt = (col / TILE) * kc * tile + (col % TILE) * 2;
            let mut sum = 0f32;
            for t in 0..kc {
                let (ar, bc) = (&ad[at + t * tile..], &bd[bt + t * tile..]);
                for p in 0..TILE {
                    let x0 = f32_of(ar[2 * p]) * f32_of(bc[p * TILE_K]);
                    let x1 = f32_of(ar[2 * p + 1]) * f32_of(bc[p * TILE_K + 1]);
                    sum += x0 + x1;
                }
            }
            c[r * ldc + col] = sum;
        }
    }
}

/// Rows of C one call of the AVX-512 micro-kernel computes (half an A tile) and its column tiles.
const MR: usize = 8;
const NR: usize = 2;

/// The `vdpbf16ps` product: for each pair of 16-column blocks and each half of a 16-row A tile, an
/// 8×32 block of C held in 16 zmm accumulators over the whole of K; per K pair, two B rows are
/// loaded and each A row's pair is broadcast (an embedded-broadcast operand of the dot product).
/// Block order as on the tiles: for a deep K the columns are outer, so a B panel stays in cache
/// while A streams past it.
///
/// # Safety
/// The CPU must have AVX512-F, BW and BF16, and the shapes must agree as `gemm_with` checks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn gemm_avx512(a: &PackedA, b: &PackedB, c: &mut [f32], ldc: usize) {
    use std::arch::x86_64::*;
    let kc = a.k_pad / TILE_K;
    let tile = TILE * TILE_K;
    let (ap, bp, cp) = (
        a.data.slice().as_ptr(),
        b.data.slice().as_ptr(),
        c.as_mut_ptr(),
    );
    let block = |r0: usize, nb: usize| {
        // Rows r0..r0 + MR lie in one A tile (MR divides TILE).
        let a0 = ap.add((r0 / TILE) * kc * tile + (r0 % TILE) * TILE_K);
        let b0 = bp.add(nb * kc * tile);
        let mut acc = [[_mm512_setzero_ps(); NR]; MR];
        for t in 0..kc {
            let at = a0.add(t * tile);
            let bt = b0.add(t * tile);
            for p in 0..TILE {
                let mut bv = [_mm512_setzero_si512(); NR];
                for (j, v) in bv.iter_mut().enumerate() {
                    *v = _mm512_loadu_si512(bt.add(j * kc * tile + p * TILE_K).cast());
                }
                for (i, row) in acc.iter_mut().enumerate() {
                    let pair = at.add(i * TILE_K + 2 * p).cast::<i32>().read_unaligned();
                    let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                    for (j, o) in row.iter_mut().enumerate() {
                        *o = _mm512_dpbf16_ps(
                            *o,
                            av,
                            std::mem::transmute::<__m512i, __m512bh>(bv[j]),
                        );
                    }
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                _mm512_storeu_ps(cp.add((r0 + i) * ldc + (nb + j) * TILE), *v);
            }
        }
    };
    let (rows, n_blocks) = (a.m_pad, b.n_pad / TILE);
    if kc >= 16 {
        for nb in (0..n_blocks).step_by(NR) {
            for r0 in (0..rows).step_by(MR) {
                block(r0, nb);
            }
        }
    } else {
        for r0 in (0..rows).step_by(MR) {
            for nb in (0..n_blocks).step_by(NR) {
                block(r0, nb);
            }
        }
    }
}

/// The tile loop of `gemm_with`.
///
/// # Safety
/// AMX must be `available()` (CPU support and the kernel's permission), and the shapes must agree:
/// `a.k_pad == b.k_pad`, `ldc >= b.n_pad` and `c` holds `(a.m_pad - 1) * ldc + b.n_pad` values. Then
/// every tile load reads inside the packed buffers (`m_pad × k_pad` and `n_pad × k_pad` values) and
/// every store writes inside `c`.
#[cfg(target_arch = "x86_64")]
unsafe fn gemm_tiles(a: &PackedA, b: &PackedB, c: &mut [f32], ldc: usize) {
    let mut cfg = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [0; 16],
        rows: [0; 16],
        reserved2: [0; 16],
    };
    for t in 0..8 {
        cfg.rows[t] = TILE as u8;
        cfg.colsb[t] = 64;
    }
    let kc = a.k_pad / TILE_K;
    let c_stride = ldc * 4;
    let tile = TILE * TILE_K; // u16 per tile of A or B
    asm!("ldtilecfg [{c}]", c = in(reg) &cfg, options(nostack, readonly));
    // Two row blocks × two column blocks per pass: tmm0..3 accumulate, tmm4/5 hold A, tmm6/7 hold B.
    let c_ptr = c.as_mut_ptr();
    let block = |mb: usize, nb: usize| {
        let b0 = b.data.slice().as_ptr().add(nb * kc * tile);
        let b1 = b0.add(kc * tile);
        let a0 = a.data.slice().as_ptr().add(mb * kc * tile);
        let a1 = a0.add(kc * tile);
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
        for k in 0..kc {
            asm!(
                "tileloadd tmm4, [{a0} + {s}*1]",
                "tileloadd tmm5, [{a1} + {s}*1]",
                "tileloadd tmm6, [{b0} + {s}*1]",
                "tileloadd tmm7, [{b1} + {s}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0.add(k * tile),
                a1 = in(reg) a1.add(k * tile),
                b0 = in(reg) b0.add(k * tile),
                b1 = in(reg) b1.add(k * tile),
                s = in(reg) TILE_K * 2,
                options(nostack, readonly)
            );
        }
        let c00 = c_ptr.add(mb * TILE * ldc + nb * TILE);
        let c10 = c00.add(TILE * ldc);
        asm!(
            "tilestored [{c00} + {sc}*1], tmm0",
            "tilestored [{c01} + {sc}*1], tmm1",
            "tilestored [{c10} + {sc}*1], tmm2",
            "tilestored [{c11} + {sc}*1], tmm3",
            c00 = in(reg) c00,
            c01 = in(reg) c00.add(TILE),
            c10 = in(reg) c10,
            c11 = in(reg) c10.add(TILE),
            sc = in(reg) c_stride,
            options(nostack)
        );
    };
    let (m_blocks, n_blocks) = (a.m_pad / TILE, b.n_pad / TILE);
    // Deep K (a large B, e.g. the FFN's down projection): columns outer, so each B panel is read
    // from memory once and stays in L1 while A's rows (small, in L2) stream past it. Otherwise rows
    // outer: A's panel stays in L1 and B streams from L2. Measured on 128-token halves: 1191 vs 1007
    // GFLOP/s for K = 1536, and 379 vs 209 for attention's K = 32.
    if kc >= 16 {
        for nb in (0..n_blocks).step_by(2) {
            for mb in (0..m_blocks).step_by(2) {
                block(mb, nb);
            }
        }
    } else {
        for mb in (0..m_blocks).step_by(2) {
            for nb in (0..n_blocks).step_by(2) {
                block(mb, nb);
            }
        }
    }
    asm!("tilerelease", options(nostack, nomem));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rand as rand;

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0).
        assert_eq!(bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(f32_of(bf16(-2.5)), -2.5);
    }

    /// The packing (the CPU's own conversion where it has AVX512-BF16) rounds exactly as `bf16`,
    /// ties included, applies the row scales, and zeroes the padding even over a stale buffer.
    #[test]
    fn packed_a_rounds_like_bf16_and_pads_with_zeros() {
        let (m, k) = (37, 70);
        let mut seed = 3;
        let mut x: Vec<f32> = (0..m * k).map(|_| rand(&mut seed) * 100.0).collect();
        // Exact ties between two bf16 values, both ways.
        x[0] = 1.0 + 1.0 / 256.0;
        x[1] = 1.0 + 3.0 / 256.0;
        x[2] = -(1.0 + 1.0 / 256.0);
        let scales: Vec<f32> = (0..m).map(|r| 1.0 + r as f32 * 0.125).collect();
        let mut a = PackedA::default();
        // A stale buffer first: a pack of all ones over more rows and columns.
        a.pack(&vec![1.0; 64 * 96], 64, 96, 96);
        a.pack_map(&x, m, k, k, |r, _, vals| {
            vals.iter_mut().for_each(|v| *v *= scales[r])
        });
        assert_eq!(a.rows_padded(), 64);
        for r in 0..64 {
            for c in 0..96 {
                let want = if r < m && c < k {
                    f32_of(bf16(x[r * k + c] * scales[r]))
                } else {
                    0.0
                };
                assert_eq!(a.get(r, c).to_bits(), want.to_bits(), "({r}, {c})");
            }
        }
        assert_eq!(a.get(0, 0), 1.0);
        assert_eq!(a.get(0, 1), 1.0 + 4.0 / 256.0);
    }

    /// Every layout of B (columns contiguous in K with K a multiple of 32, rows contiguous in columns
    /// with full 16-column blocks and a tail, and a K tail) reads back as `bf16` of its source, with
    /// zero padding over a stale buffer.
    #[test]
    fn packed_b_reads_back_every_element() {
        let mut seed = 7;
        for &(k, n, column_major) in &[
            (70, 19, true),
            (64, 40, true),
            (37, 40, false),
            (64, 16, false),
        ] {
            let w: Vec<f32> = (0..k * n).map(|_| rand(&mut seed) * 10.0).collect();
            let (col_stride, k_stride) = if column_major { (k, 1) } else { (1, n) };
            let mut b = PackedB::default();
            b.pack(&vec![1.0; 96 * 96], 96, 96, 96, 1);
            b.pack(&w, k, n, col_stride, k_stride);
            for col in 0..b.cols_padded() {
                for kk in 0..round_up(k, TILE_K) {
                    let want = if col < n && kk < k {
                        f32_of(bf16(w[col * col_stride + kk * k_stride]))
                    } else {
                        0.0
                    };
                    assert_eq!(
                        b.get(kk, col).to_bits(),
                        want.to_bits(),
                        "{k}x{n} ({kk}, {col})"
                    );
                }
            }
        }
    }

    /// The tiles against a plain f64 product of the same bf16-rounded operands, over shapes with
    /// tails in every dimension and both strided layouts of B.
    #[test]
    fn gemm_matches_reference_on_odd_shapes() {
        let kernels: Vec<Kernel> = [Kernel::Amx, Kernel::Avx512Bf16, Kernel::Scalar]
            .into_iter()
            .filter(|k| {
                let ok = k.runs_here();
                if !ok {
                    eprintln!("{} cannot run on this CPU: not exercised", k.name());
                }
                ok
            })
            .collect();
        for kernel in kernels {
            gemm_matches_reference(kernel);
        }
    }

    fn gemm_matches_reference(kernel: Kernel) {
        let mut seed = 42;
        for &(m, k, n) in &[
            (1, 32, 16),
            (17, 20, 33),
            (33, 384, 48),
            (5, 70, 1),
            (64, 1536, 384),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| rand(&mut seed)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rand(&mut seed)).collect();
            let mut a = PackedA::default();
            a.pack(&x, m, k, k);
            for transposed in [false, true] {
                let mut b = PackedB::default();
                let wt: Vec<f32>;
                if transposed {
                    // B given k-major: B(kk, col) = wt[kk * n + col].
                    wt = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
                    b.pack(&wt, k, n, 1, n);
                } else {
                    b.pack(&w, k, n, k, 1);
                }
                let ldc = b.cols_padded();
                let mut c = vec![f32::NAN; a.rows_padded() * ldc];
                gemm_with(kernel, &a, &b, &mut c, ldc);
                for r in 0..m {
                    for col in 0..n {
                        let want: f64 = (0..k)
                            .map(|kk| {
                                f32_of(bf16(x[r * k + kk])) as f64
                                    * f32_of(bf16(w[col * k + kk])) as f64
                            })
                            .sum();
                        let got = c[r * ldc + col] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + want.abs()) * (k as f64).sqrt(),
                            "{} m {m} k {k} n {n} at ({r},{col}): {got} vs {want}",
                            kernel.name()
                        );
                    }
                }
                // Padding rows come out as zeros.
                for r in m..a.rows_padded() {
                    assert!(c[r * ldc..r * ldc + n].iter().all(|&v| v == 0.0));
                }
            }
        }
    }
}
