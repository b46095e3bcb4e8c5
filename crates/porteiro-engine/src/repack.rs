//! The 16-row weight layout, used for every token on CPUs with AVX2 (AVX-512 VNNI: one register
//! per line; AVX2: two halves of 8 rows). The per-block kernels
//! in `simd` spend most of their instructions unpacking nibbles and scaling every 4-element partial
//! sum of every block. At load, each supported matrix is repacked into groups of 16 rows,
//! interleaved so that one VNNI instruction multiplies 4 consecutive weights of 16 rows by the same
//! 4 activation bytes. After g/4 such instructions each 32-bit lane holds one row's whole integer
//! sub-block sum, and one multiply-add per 16 rows applies the scales: prefill runs several times
//! fewer instructions, and decode becomes bound by memory rather than by unpacking.
//!
//! The packing keeps the GGUF's size: low nibbles two lines to a 64-byte line (2-bit levels four to
//! a line), fifth and sixth bits (Q3_K's third) as 64-bit planes applied with masked byte adds, and
//! the blocks' own scales (f16, or a K-quant's f16 super-block scale times its integer sub-block
//! scales). Each lane's arithmetic depends only on its row and token, so a token's logits do not
//! depend on what else shares its step.

// AVX-512 intrinsics, a typed view of an anonymous mapping (HugeVec), and pool threads writing
// disjoint parts of one output buffer through a raw pointer.
#![allow(unsafe_code)]

use crate::quant::{crumb, k4_scale_min, q3k_level, q3k_scale, QK, QK_K};
use porteiro_models::gguf::GgmlType;

/// Rows per group: one per 32-bit lane of a 512-bit register.
pub const ROWS: usize = 16;

/// One 64-byte line: four weights of each of the group's 16 rows.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct Line(pub [u8; 64]);

/// How a weight type is stored: sub-block length `g` (one scale each), the offset of the unsigned
/// values, their bits (2: crumbs; 3: crumbs plus a bit plane kept apart; 4: nibbles; 5, 6: nibbles
/// plus one or two bit planes; 8: bytes), whether the scales are f16 per sub-block (`half`) or a
/// K-quant's f16 per super-block times an integer per sub-block, and whether there are mins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Format {
    g: usize,
    off: i32,
    bits: usize,
    half: bool,
    min: bool,
}

fn format(t: GgmlType) -> Option<Format> {
    let f = |g, off, bits, half, min| Format {
        g,
        off,
        bits,
        half,
        min,
    };
    Some(match t {
        GgmlType::Q4_0 => f(32, 8, 4, true, false),
        GgmlType::Q4_1 => f(32, 0, 4, true, true),
        GgmlType::Q5_0 => f(32, 16, 5, true, false),
        GgmlType::Q5_1 => f(32, 0, 5, true, true),
        GgmlType::Q8_0 => f(32, 128, 8, true, false),
        GgmlType::Q2_K => f(16, 0, 2, false, true),
        GgmlType::Q3_K => f(16, 4, 3, false, false),
        GgmlType::Q4_K => f(32, 0, 4, false, true),
        GgmlType::Q5_K => f(32, 0, 5, false, true),
        GgmlType::Q6_K => f(16, 32, 6, false, false),
        _ => return None,
    })
}

impl Format {
    /// 4-byte lines per sub-block of one group.
    fn lines(self) -> usize {
        self.g / 4
    }
    /// 64-byte storage lines per (group, sub-block): nibble pairs then bit planes, crumb quads (a
    /// 3-bit format's plane lives in `Repacked::planes`: 32 bytes would waste half a line), or bytes.
    fn chunk(self) -> usize {
        if self.bits == 8 {
            self.lines()
        } else if self.bits < 4 {
            self.lines() / 4
        } else {
            self.lines() / 2 + ((self.bits - 4) * self.lines() * 8).div_ceil(64)
        }
    }
}

/// A zeroed fixed-size array in anonymous memory advised for transparent huge pages: decode
/// streams all of it once per token, and on 4 KiB pages the TLB misses cost about a fifth of the
/// speed here. Only whole aligned 2 MiB ranges inside the mapping become huge pages, so nothing
/// beyond the array is made resident.
pub struct HugeVec<T> {
    map: Option<memmap2::MmapMut>,
    len: usize,
    _t: std::marker::PhantomData<T>,
}

/// Types for which all-zero bytes are a valid value.
pub trait Zeroable: Copy {}
impl Zeroable for Line {}
impl Zeroable for u16 {}
impl Zeroable for i8 {}
impl Zeroable for u64 {}

impl<T: Zeroable> HugeVec<T> {
    fn zeroed(len: usize) -> std::io::Result<Self> {
        let bytes = len * std::mem::size_of::<T>();
        let map = if bytes == 0 {
            None
        } else {
            let m = memmap2::MmapOptions::new().len(bytes).map_anon()?;
            // Advice only: without THP the array still works, on small pages.
            let _ = m.advise(memmap2::Advice::HugePage);
            Some(m)
        };
        Ok(Self {
            map,
            len,
            _t: std::marker::PhantomData,
        })
    }
}

impl<T: Zeroable> std::ops::Deref for HugeVec<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match &self.map {
            // SAFETY: zeroed() mapped len * size_of::<T>() bytes, page-aligned (enough for any T),
            // zero-filled by the kernel, and all-zero bytes are a valid T (Zeroable is implemented only
            // for Line, u16 and i8). The slice borrows self, which owns the mapping.
            Some(m) => unsafe { std::slice::from_raw_parts(m.as_ptr() as *const T, self.len) },
            None => &[],
        }
    }
}

impl<T: Zeroable> std::ops::DerefMut for HugeVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match &mut self.map {
            // SAFETY: as in deref; &mut self makes this the only reference into the mapping.
            Some(m) => unsafe {
                std::slice::from_raw_parts_mut(m.as_mut_ptr() as *mut T, self.len)
            },
            None => &mut [],
        }
    }
}

/// One row taken apart: unsigned values, and the parts of the scales. Element i of sub-block s is
/// `scale(s) * (q[i] - off) + min(s)` exactly as `quant::dequantize_row` computes it, where for f16
/// formats scale(s) = dh[s] and min(s) = mh[s], and for K-quants scale(s) = d[sb] * sc[s] and
/// min(s) = -dmin[sb] * m[s] (sb the super-block of s).
#[derive(Default)]
struct RowParts {
    q: Vec<u8>,
    dh: Vec<u16>,
    mh: Vec<u16>,
    d: Vec<u16>,
    ndmin: Vec<u16>,
    sc: Vec<i8>,
    m: Vec<i8>,
}

fn f16_bits(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

fn row_parts(t: GgmlType, row: &[u8], cols: usize, p: &mut RowParts) {
    p.q.clear();
    p.q.resize(cols, 0);
    for v in [&mut p.dh, &mut p.mh] {
        v.clear();
    }
    for v in [&mut p.d, &mut p.ndmin] {
        v.clear();
    }
    p.sc.clear();
    p.m.clear();
    let q = &mut p.q;
    match t {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 => {
            // d, [m], [qh: the fifth bits], 16 bytes of nibble pairs; Q4 is Q5 with qh = 0.
            let min = matches!(t, GgmlType::Q4_1 | GgmlType::Q5_1);
            let five = matches!(t, GgmlType::Q5_0 | GgmlType::Q5_1);
            let qs_at = 2 + 2 * usize::from(min) + 4 * usize::from(five);
            for (b, blk) in row.chunks_exact(qs_at + 16).enumerate() {
                p.dh.push(f16_bits(blk, 0));
                if min {
                    p.mh.push(f16_bits(blk, 2));
                }
                let qh = if five {
                    let h = &blk[qs_at - 4..qs_at];
                    u32::from_le_bytes([h[0], h[1], h[2], h[3]])
                } else {
                    0
                };
                let qs = &blk[qs_at..qs_at + 16];
                let o = &mut q[b * QK..(b + 1) * QK];
                for j in 0..16 {
                    o[j] = (qs[j] & 0xF) | (((qh >> j) & 1) << 4) as u8;
                    o[j + 16] = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4) as u8;
                }
            }
        }
        GgmlType::Q8_0 => {
            for (b, blk) in row.chunks_exact(34).enumerate() {
                p.dh.push(f16_bits(blk, 0));
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
                p.d.push(f16_bits(blk, 0));
                // Negating an f16 flips its sign bit: exact.
                p.ndmin.push(f16_bits(blk, 2) ^ 0x8000);
                let scales = &blk[4..16];
                for c in 0..4 {
                    let qs = &blk[qs_at + 32 * c..qs_at + 32 * c + 32];
                    for (h, sub) in [2 * c, 2 * c + 1].into_iter().enumerate() {
                        let (s, m) = k4_scale_min(sub, scales);
                        p.sc.push(s as i8);
                        p.m.push(m as i8);
                        let o = &mut q[(sb * 8 + sub) * QK..(sb * 8 + sub + 1) * QK];
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
        GgmlType::Q2_K => {
            for (sb, blk) in row.chunks_exact(84).enumerate() {
                p.d.push(f16_bits(blk, 80));
                p.ndmin.push(f16_bits(blk, 82) ^ 0x8000);
                p.sc.extend(blk[..16].iter().map(|&v| (v & 0xF) as i8));
                p.m.extend(blk[..16].iter().map(|&v| (v >> 4) as i8));
                for e in 0..QK_K {
                    q[sb * QK_K + e] = crumb(&blk[16..80], e);
                }
            }
        }
        GgmlType::Q3_K => {
            for (sb, blk) in row.chunks_exact(110).enumerate() {
                p.d.push(f16_bits(blk, 108));
                p.sc.extend((0..16).map(|j| q3k_scale(&blk[96..108], j)));
                for e in 0..QK_K {
                    q[sb * QK_K + e] = q3k_level(blk, e);
                }
            }
        }
        GgmlType::Q6_K => {
            for (sb, blk) in row.chunks_exact(210).enumerate() {
                p.d.push(f16_bits(blk, 208));
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
                p.sc.extend(blk[192..208].iter().map(|&v| v as i8));
            }
        }
        _ => unreachable!("format() admits only the types above"),
    }
}

/// Bit `bit` of each of the 64 bytes, as a 64-bit mask (bit i from byte i).
fn bit_mask(v: &[u8; 64], bit: usize) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if Kernel::supported().contains(&Kernel::Avx512Vnni) {
        // SAFETY: supported() lists Avx512Vnni only once is_x86_feature_detected! found avx512f and
        // avx512bw, what zmm::bit_mask is compiled for; its one 64-byte load reads exactly `v`.
        return unsafe { zmm::bit_mask(v, bit) };
    }
    v.iter()
        .enumerate()
        .fold(0, |m, (i, x)| m | ((((x >> bit) & 1) as u64) << i))
}

/// A matrix in the 16-row layout.
pub struct Repacked {
    rows: usize,
    cols: usize,
    f: Format,
    /// [group][sub-block][f.chunk() lines]
    q: HugeVec<Line>,
    /// 3-bit formats: [group][sub-block][line] the third bits of a line's 64 values.
    planes: HugeVec<u64>,
    /// f16 formats: [group][sub-block][16] scale bits, and min bits (empty without mins).
    dh: HugeVec<u16>,
    mh: HugeVec<u16>,
    /// K-quants: [group][super-block][16] d and -dmin as f16 bits, as stored in the blocks
    /// (empty without mins).
    d: HugeVec<u16>,
    ndmin: HugeVec<u16>,
    /// K-quants: [group][sub-block][16] integer scales and mins (empty without mins).
    sc: HugeVec<i8>,
    m: HugeVec<i8>,
}

/// The SIMD kernels of the layout, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// One `vpdpbusd` per 16 rows and 4 weights.
    Avx512Vnni,
    /// Each 64-byte line as two 8-row halves, `vpmaddubsw` + `vpmaddwd` (AVX2, FMA, F16C).
    Avx2,
}

impl Kernel {
    /// The kernels this CPU can run, whatever the environment asks.
    pub fn supported() -> &'static [Kernel] {
        static S: std::sync::OnceLock<Vec<Kernel>> = std::sync::OnceLock::new();
        S.get_or_init(|| {
            let mut v = Vec::new();
            #[cfg(target_arch = "x86_64")]
            {
                let avx2 = is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c");
                if avx2
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
                {
                    v.push(Kernel::Avx512Vnni);
                }
                if avx2 {
                    v.push(Kernel::Avx2);
                }
            }
            v
        })
    }
}

impl Repacked {
    /// The kernel this process runs the layout with: the best the CPU has, `Avx2` under an ISA cap
    /// below AVX-512 (`PORTEIRO_ISA=avx2|avx2vnni`), none under `PORTEIRO_ISA=scalar` or
    /// `PORTEIRO_REPACK=0` (the weights then stay in their GGUF blocks).
    pub fn kernel() -> Option<Kernel> {
        static K: std::sync::OnceLock<Option<Kernel>> = std::sync::OnceLock::new();
        *K.get_or_init(|| {
            if std::env::var("PORTEIRO_REPACK").is_ok_and(|v| v == "0")
                || crate::simd::isa() == crate::simd::Isa::Scalar
            {
                return None;
            }
            let capped = std::env::var("PORTEIRO_ISA").is_ok_and(|v| !v.is_empty());
            Kernel::supported()
                .iter()
                .copied()
                .find(|k| !capped || *k == Kernel::Avx2)
        })
    }

    /// Whether matrices are repacked at all ([`Repacked::kernel`] is some).
    pub fn available() -> bool {
        Self::kernel().is_some()
    }

    /// Repacks `rows` rows of type `t`; None for types or shapes this layout does not take.
    pub fn new(t: GgmlType, data: &[u8], rows: usize, cols: usize) -> Option<Self> {
        let f = format(t)?;
        let (bs, ts) = t.block_layout()?;
        if rows == 0 || !rows.is_multiple_of(ROWS) || !cols.is_multiple_of(bs) {
            return None;
        }
        let row_bytes = cols / bs * ts;
        if data.len() < rows * row_bytes {
            return None;
        }
        let (nsb, lines, chunk) = (cols / f.g, f.lines(), f.chunk());
        let groups = rows / ROWS;
        let per_sub = if f.half { rows * nsb } else { 0 };
        let per_super = if f.half { 0 } else { rows * cols / QK_K };
        let per_k = if f.half { 0 } else { rows * nsb };
        let with_min = |n: usize| if f.min { n } else { 0 };
        // An allocation failure leaves the matrix on the per-block kernels.
        let mut out = Self {
            rows,
            cols,
            f,
            q: HugeVec::zeroed(groups * nsb * chunk).ok()?,
            planes: HugeVec::zeroed(if f.bits == 3 { groups * nsb * lines } else { 0 }).ok()?,
            dh: HugeVec::zeroed(per_sub).ok()?,
            mh: HugeVec::zeroed(with_min(per_sub)).ok()?,
            d: HugeVec::zeroed(per_super).ok()?,
            ndmin: HugeVec::zeroed(with_min(per_super)).ok()?,
            sc: HugeVec::zeroed(per_k).ok()?,
            m: HugeVec::zeroed(with_min(per_k)).ok()?,
        };
        let nsuper = cols / QK_K;
        let mut parts: Vec<RowParts> = (0..ROWS).map(|_| RowParts::default()).collect();
        for grp in 0..groups {
            for (lane, p) in parts.iter_mut().enumerate() {
                let r = grp * ROWS + lane;
                row_parts(t, &data[r * row_bytes..(r + 1) * row_bytes], cols, p);
            }
            for s in 0..nsb {
                let at = (grp * nsb + s) * ROWS;
                for (lane, p) in parts.iter().enumerate() {
                    if f.half {
                        out.dh[at + lane] = p.dh[s];
                        if f.min {
                            out.mh[at + lane] = p.mh[s];
                        }
                    } else {
                        out.sc[at + lane] = p.sc[s];
                        if f.min {
                            out.m[at + lane] = p.m[s];
                        }
                    }
                }
                let chunk_at = (grp * nsb + s) * chunk;
                let lines_out = &mut out.q[chunk_at..chunk_at + chunk];
                for j in 0..lines {
                    // The 64 values of line j: 4 consecutive weights of each of the 16 rows.
                    let mut v = [0u8; 64];
                    for (lane, p) in parts.iter().enumerate() {
                        let src = s * f.g + 4 * j;
                        v[4 * lane..4 * lane + 4].copy_from_slice(&p.q[src..src + 4]);
                    }
                    if f.bits == 8 {
                        lines_out[j].0 = v;
                        continue;
                    }
                    if f.bits < 4 {
                        let quad = &mut lines_out[j / 4].0;
                        for i in 0..64 {
                            quad[i] |= (v[i] & 3) << (2 * (j % 4));
                        }
                        if f.bits == 3 {
                            out.planes[(grp * nsb + s) * lines + j] = bit_mask(&v, 2);
                        }
                        continue;
                    }
                    let pair = &mut lines_out[j / 2].0;
                    let shift = 4 * (j % 2);
                    for i in 0..64 {
                        pair[i] |= (v[i] & 0xF) << shift;
                    }
                    for plane in 0..f.bits - 4 {
                        let mask = bit_mask(&v, 4 + plane);
                        let word = lines / 2 * 64 + (plane * lines + j) * 8;
                        lines_out[word / 64].0[word % 64..word % 64 + 8]
                            .copy_from_slice(&mask.to_le_bytes());
                    }
                }
            }
            for (lane, p) in parts.iter().enumerate() {
                for sb in 0..nsuper.min(p.d.len()) {
                    let at = (grp * nsuper + sb) * ROWS + lane;
                    out.d[at] = p.d[sb];
                    if f.min {
                        out.ndmin[at] = p.ndmin[sb];
                    }
                }
            }
        }
        Some(out)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn groups(&self) -> usize {
        self.rows / ROWS
    }

    /// Resident bytes of the repacked matrix.
    pub fn bytes(&self) -> usize {
        self.q.len() * 64
            + self.planes.len() * 8
            + (self.dh.len() + self.mh.len() + self.d.len() + self.ndmin.len()) * 2
            + self.sc.len()
            + self.m.len()
    }

    /// The kernels' view of sub-block `at` (= group * sub-blocks + s): its chunk of lines and, for
    /// a 3-bit format, its bit planes (null otherwise).
    #[inline(always)]
    fn sub_block<const L: usize, const BITS: usize>(&self, at: usize) -> (*const u8, *const u64) {
        let c = self.q[at * self.f.chunk()..].as_ptr() as *const u8;
        let planes = if BITS == 3 {
            self.planes[at * L..].as_ptr()
        } else {
            std::ptr::null()
        };
        (c, planes)
    }

    /// Stored value of element `e` (0..g) of sub-block `s` of row `lane` of group `grp`.
    fn value(&self, grp: usize, s: usize, lane: usize, e: usize) -> u8 {
        let (lines, chunk) = (self.f.lines(), self.f.chunk());
        let nsb = self.cols / self.f.g;
        let base = (grp * nsb + s) * chunk;
        let (j, i) = (e / 4, 4 * lane + e % 4);
        let line = |n: usize| &self.q[base + n].0;
        if self.f.bits == 8 {
            return line(j)[i];
        }
        if self.f.bits < 4 {
            let mut v = (line(j / 4)[i] >> (2 * (j % 4))) & 3;
            if self.f.bits == 3 {
                let plane = self.planes[(grp * nsb + s) * lines + j];
                v |= (((plane >> i) & 1) as u8) << 2;
            }
            return v;
        }
        let mut v = (line(j / 2)[i] >> (4 * (j % 2))) & 0xF;
        for plane in 0..self.f.bits - 4 {
            let word = lines / 2 * 64 + (plane * lines + j) * 8 + i / 8;
            let byte = line(word / 64)[word % 64];
            v |= ((byte >> (i % 8)) & 1) << (4 + plane);
        }
        v
    }

    /// (scale, min) of sub-block `s` of row `lane` of group `grp`, as the kernels compute them.
    fn scale_min(&self, grp: usize, s: usize, lane: usize) -> (f32, f32) {
        let nsb = self.cols / self.f.g;
        let at = (grp * nsb + s) * ROWS + lane;
        let half = |b: u16| half::f16::from_bits(b).to_f32();
        if self.f.half {
            let m = if self.f.min { half(self.mh[at]) } else { 0.0 };
            (half(self.dh[at]), m)
        } else {
            let sb = s * self.f.g / QK_K;
            let sat = (grp * (self.cols / QK_K) + sb) * ROWS + lane;
            let m = if self.f.min {
                half(self.ndmin[sat]) * self.m[at] as f32
            } else {
                0.0
            };
            (half(self.d[sat]) * self.sc[at] as f32, m)
        }
    }

    /// out[t * ld + 16 * grp + r] = row (16 grp + r) · activation t, for t in t0..t1.
    ///
    /// # Safety
    /// `out` must be valid for writes at every such index, and no other thread may read or write
    /// those positions during the call.
    pub unsafe fn run(
        &self,
        grp: usize,
        acts: &Acts,
        t0: usize,
        t1: usize,
        out: *mut f32,
        ld: usize,
    ) {
        match Self::kernel() {
            Some(k) => self.run_on(k, grp, acts, t0, t1, out, ld),
            None => self.run_scalar(grp, acts, t0, t1, out, ld),
        }
    }

    /// `run` with kernel `k`, which must be one of [`Kernel::supported`] (else the scalar reference
    /// runs).
    ///
    /// # Safety
    /// As `run`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run_on(
        &self,
        k: Kernel,
        grp: usize,
        acts: &Acts,
        t0: usize,
        t1: usize,
        out: *mut f32,
        ld: usize,
    ) {
        assert!(grp < self.groups() && acts.k == self.cols && t1 <= acts.n);
        #[cfg(target_arch = "x86_64")]
        if Kernel::supported().contains(&k) {
            match k {
                Kernel::Avx512Vnni => zmm::run(self, grp, acts, t0, t1, out, ld),
                Kernel::Avx2 => ymm::run(self, grp, acts, t0, t1, out, ld),
            }
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
        assert!(grp < self.groups() && acts.k == self.cols && t1 <= acts.n);
        let (g, nsb) = (self.f.g, self.cols / self.f.g);
        for t in t0..t1 {
            let y = &acts.q[t * acts.k..(t + 1) * acts.k];
            for lane in 0..ROWS {
                let mut f = 0f32;
                for s in 0..nsb {
                    let sum = acts.sum(t, s, g);
                    let mut acc = -self.f.off * sum;
                    for e in 0..g {
                        acc += self.value(grp, s, lane, e) as i32 * y[s * g + e] as i32;
                    }
                    let (scale, min) = self.scale_min(grp, s, lane);
                    let da = acts.d[t * acts.k / QK + s * g / QK];
                    f = (acc as f32).mul_add(scale * da, f);
                    if self.f.min {
                        f = min.mul_add(da * sum as f32, f);
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
    /// `t` must be below the `n` of the last `reset` (nothing checks it), callers must not hand the
    /// same token to two threads, and no `run` may read these activations meanwhile.
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
        // SAFETY: isa() != Scalar means avx2 and fma were detected (ymm::quantize's features); the
        // asserts above bound every store it makes for blocks b < x.len() / 32 (q, d and s16).
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

/// Calls `$tile::<T, L, BITS, HALF, MIN>` for the format of `$p` (a kernel is instantiated per
/// format: lines per sub-block, bits, f16 or K-quant scales, mins).
macro_rules! per_format {
    ($tile:ident, $t:expr, $p:expr, $($arg:expr),*) => {{
        let f = $p.f;
        match (f.g, f.bits, f.half, f.min) {
            (32, 4, true, false) => $tile::<$t, 8, 4, true, false>($p, $($arg),*),
            (32, 4, true, true) => $tile::<$t, 8, 4, true, true>($p, $($arg),*),
            (32, 5, true, false) => $tile::<$t, 8, 5, true, false>($p, $($arg),*),
            (32, 5, true, true) => $tile::<$t, 8, 5, true, true>($p, $($arg),*),
            (32, 8, true, false) => $tile::<$t, 8, 8, true, false>($p, $($arg),*),
            (32, 4, false, true) => $tile::<$t, 8, 4, false, true>($p, $($arg),*),
            (32, 5, false, true) => $tile::<$t, 8, 5, false, true>($p, $($arg),*),
            (16, 6, false, false) => $tile::<$t, 4, 6, false, false>($p, $($arg),*),
            (16, 3, false, false) => $tile::<$t, 4, 3, false, false>($p, $($arg),*),
            (16, 2, false, true) => $tile::<$t, 4, 2, false, true>($p, $($arg),*),
            _ => unreachable!("format() admits only the formats above"),
        }
    }};
}

#[cfg(target_arch = "x86_64")]
mod ymm {
    use super::{Acts, Repacked, ROWS};
    use crate::quant::{QK, QK_K};
    use std::arch::x86_64::*;

    /// Tokens t0..t1 in tiles of 4, then 1, with the kernel instantiated for the format.
    pub(super) unsafe fn run(
        p: &Repacked,
        grp: usize,
        a: &Acts,
        t0: usize,
        t1: usize,
        out: *mut f32,
        ld: usize,
    ) {
        let mut t = t0;
        while t + 4 <= t1 {
            per_format!(tile, 4, p, grp, a, t, out, ld);
            t += 4;
        }
        while t < t1 {
            per_format!(tile, 1, p, grp, a, t, out, ld);
            t += 1;
        }
    }

    /// Half `h` (rows 8h..8h+8) of line `j` of a sub-block's chunk, as `zmm::line` builds the whole.
    #[inline(always)]
    unsafe fn line<const L: usize, const BITS: usize>(
        c: *const u8,
        planes: *const u64,
        j: usize,
        h: usize,
    ) -> __m256i {
        let load = |at: usize| _mm256_load_si256(c.add(at + 32 * h) as *const __m256i);
        if BITS == 8 {
            return load(64 * j);
        }
        if BITS < 4 {
            let quad = load(64 * (j / 4));
            let shifted = match j % 4 {
                0 => quad,
                1 => _mm256_srli_epi16(quad, 2),
                2 => _mm256_srli_epi16(quad, 4),
                _ => _mm256_srli_epi16(quad, 6),
            };
            let v = _mm256_and_si256(shifted, _mm256_set1_epi8(3));
            if BITS == 3 {
                let m = crate::simd::avx2::bits_to_bytes((planes.add(j).read() >> (32 * h)) as u32);
                return _mm256_add_epi8(v, _mm256_and_si256(m, _mm256_set1_epi8(4)));
            }
            return v;
        }
        let pair = load(64 * (j / 2));
        let lo = _mm256_set1_epi8(0x0F);
        let mut v = if j.is_multiple_of(2) {
            _mm256_and_si256(pair, lo)
        } else {
            _mm256_and_si256(_mm256_srli_epi16(pair, 4), lo)
        };
        for plane in 0..BITS - 4 {
            let word = c.add(L / 2 * 64 + (plane * L + j) * 8) as *const u64;
            let m = crate::simd::avx2::bits_to_bytes((word.read_unaligned() >> (32 * h)) as u32);
            v = _mm256_add_epi8(v, _mm256_and_si256(m, _mm256_set1_epi8(16 << plane)));
        }
        v
    }

    /// 16 rows x T tokens, as two halves of 8 rows (one per 32-bit lane of a 256-bit register):
    /// the same integer sums as `zmm::tile` (`vpmaddubsw` pairs cannot saturate: values below 64
    /// times activations within ±127; Q8_0's bytes are multiplied signed, by their magnitude and
    /// the activation's sign moved onto them), then the same float operations.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<
        const T: usize,
        const L: usize,
        const BITS: usize,
        const HALF: bool,
        const MIN: bool,
    >(
        p: &Repacked,
        grp: usize,
        a: &Acts,
        t0: usize,
        out: *mut f32,
        ld: usize,
    ) {
        let g = L * 4;
        let nsb = p.cols / g;
        let per_super = QK_K / g;
        let k = a.k;
        // Q8_0 is multiplied as signed bytes: no offset to take back.
        let off = if BITS == 8 { 0 } else { p.f.off };
        let ones = _mm256_set1_epi16(1);
        let h16 = |v: *const u16| _mm256_cvtph_ps(_mm_loadu_si128(v as *const __m128i));
        let ints = |v: *const i8| {
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(v as *const __m128i)))
        };
        // One token: both halves per sub-block, so memory is walked once and the token's scalar
        // work is shared. Several tokens: one half at a time, so that T accumulators and T totals
        // fit in AVX2's 16 registers.
        let passes: &[(usize, usize)] = if T == 1 { &[(0, 2)] } else { &[(0, 1), (1, 2)] };
        let per = if BITS <= 5 {
            4
        } else if BITS == 6 {
            2
        } else {
            1
        };
        for &(h0, h1) in passes {
            let mut f = [[_mm256_setzero_ps(); 2]; T];
            let (mut dv, mut ndv) = ([_mm256_setzero_ps(); 2], [_mm256_setzero_ps(); 2]);
            for s in 0..nsb {
                let at = grp * nsb + s;
                let (c, planes) = p.sub_block::<L, BITS>(at);
                let mut y = [std::ptr::null::<i32>(); T];
                let (mut da, mut sum) = ([0f32; T], [0i32; T]);
                for t in 0..T {
                    let tok = t0 + t;
                    y[t] = a.q.as_ptr().add(tok * k + s * g) as *const i32;
                    da[t] = *a.d.get_unchecked(tok * k / QK + s * g / QK);
                    sum[t] = a.sum(tok, s, g);
                }
                for h in h0..h1 {
                    let lane = at * ROWS + 8 * h;
                    let (sc, mn) = if HALF {
                        let mn = if MIN {
                            h16(p.mh.as_ptr().add(lane))
                        } else {
                            _mm256_setzero_ps()
                        };
                        (h16(p.dh.as_ptr().add(lane)), mn)
                    } else {
                        if s % per_super == 0 {
                            let sat = (grp * (p.cols / QK_K) + s / per_super) * ROWS + 8 * h;
                            dv[h] = h16(p.d.as_ptr().add(sat));
                            if MIN {
                                ndv[h] = h16(p.ndmin.as_ptr().add(sat));
                            }
                        }
                        let mn = if MIN {
                            _mm256_mul_ps(ndv[h], ints(p.m.as_ptr().add(lane)))
                        } else {
                            _mm256_setzero_ps()
                        };
                        (_mm256_mul_ps(dv[h], ints(p.sc.as_ptr().add(lane))), mn)
                    };
                    let mut acc: [__m256i; T] =
                        std::array::from_fn(|t| _mm256_set1_epi32(-off * sum[t]));
                    // Lines whose i16 pair sums can add up before widening: |pair| <= 2 * max
                    // value * 127, so four lines below 6 bits, two at 6, one for Q8_0's signed
                    // bytes.
                    for j0 in (0..L).step_by(per) {
                        let mut part = [_mm256_setzero_si256(); T];
                        for j in j0..j0 + per {
                            let w = line::<L, BITS>(c, planes, j, h);
                            let (wu, ws) = if BITS == 8 {
                                let ws = _mm256_xor_si256(w, _mm256_set1_epi8(-128));
                                (_mm256_abs_epi8(ws), ws)
                            } else {
                                (w, w)
                            };
                            for t in 0..T {
                                let b = _mm256_set1_epi32(y[t].add(j).read_unaligned());
                                let b = if BITS == 8 {
                                    _mm256_sign_epi8(b, ws)
                                } else {
                                    b
                                };
                                let pairs = _mm256_maddubs_epi16(wu, b);
                                part[t] = if j == j0 {
                                    pairs
                                } else {
                                    _mm256_add_epi16(part[t], pairs)
                                };
                            }
                        }
                        for t in 0..T {
                            acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(part[t], ones));
                        }
                    }
                    for t in 0..T {
                        f[t][h] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(acc[t]),
                            _mm256_mul_ps(sc, _mm256_set1_ps(da[t])),
                            f[t][h],
                        );
                        if MIN {
                            f[t][h] =
                                _mm256_fmadd_ps(mn, _mm256_set1_ps(da[t] * sum[t] as f32), f[t][h]);
                        }
                    }
                }
            }
            for (t, v) in f.iter().enumerate() {
                for h in h0..h1 {
                    _mm256_storeu_ps(out.add((t0 + t) * ld + grp * ROWS + 8 * h), v[h]);
                }
            }
        }
    }

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
    use crate::quant::{QK, QK_K};
    use std::arch::x86_64::*;

    /// Tokens t0..t1 in tiles of 8, then 4 and 1, with the kernel instantiated for the format.
    pub(super) unsafe fn run(
        p: &Repacked,
        grp: usize,
        a: &Acts,
        t0: usize,
        t1: usize,
        out: *mut f32,
        ld: usize,
    ) {
        let mut t = t0;
        while t + 8 <= t1 {
            per_format!(tile, 8, p, grp, a, t, out, ld);
            t += 8;
        }
        if t + 4 <= t1 {
            per_format!(tile, 4, p, grp, a, t, out, ld);
            t += 4;
        }
        while t < t1 {
            per_format!(tile, 1, p, grp, a, t, out, ld);
            t += 1;
        }
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn bit_mask(v: &[u8; 64], bit: usize) -> u64 {
        let x = _mm512_loadu_si512(v.as_ptr() as *const __m512i);
        _mm512_test_epi8_mask(x, _mm512_set1_epi8((1u8 << bit) as i8))
    }

    /// Line `j` of a sub-block's chunk: a nibble from the pair line (a crumb from the quad line),
    /// plus the bit planes (`planes`: a 3-bit format's, apart from the chunk).
    #[inline(always)]
    unsafe fn line<const L: usize, const BITS: usize>(
        c: *const u8,
        planes: *const u64,
        j: usize,
    ) -> __m512i {
        if BITS == 8 {
            return _mm512_load_si512(c.add(64 * j) as *const __m512i);
        }
        if BITS < 4 {
            let quad = _mm512_load_si512(c.add(64 * (j / 4)) as *const __m512i);
            let shifted = match j % 4 {
                0 => quad,
                1 => _mm512_srli_epi16(quad, 2),
                2 => _mm512_srli_epi16(quad, 4),
                _ => _mm512_srli_epi16(quad, 6),
            };
            let v = _mm512_and_si512(shifted, _mm512_set1_epi8(3));
            if BITS == 3 {
                let k: __mmask64 = planes.add(j).read();
                return _mm512_mask_add_epi8(v, k, v, _mm512_set1_epi8(4));
            }
            return v;
        }
        let pair = _mm512_load_si512(c.add(64 * (j / 2)) as *const __m512i);
        let lo = _mm512_set1_epi8(0x0F);
        let mut v = if j.is_multiple_of(2) {
            _mm512_and_si512(pair, lo)
        } else {
            _mm512_and_si512(_mm512_srli_epi16(pair, 4), lo)
        };
        for plane in 0..BITS - 4 {
            let word = c.add(L / 2 * 64 + (plane * L + j) * 8) as *const u64;
            let k: __mmask64 = word.read_unaligned();
            v = _mm512_mask_add_epi8(v, k, v, _mm512_set1_epi8(16 << plane));
        }
        v
    }

    /// 16 rows x T tokens. Lines of one sub-block are unpacked once into registers and serve the T
    /// tokens; each token's 4-byte activation groups are broadcast straight from memory.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
    unsafe fn tile<
        const T: usize,
        const L: usize,
        const BITS: usize,
        const HALF: bool,
        const MIN: bool,
    >(
        p: &Repacked,
        grp: usize,
        a: &Acts,
        t0: usize,
        out: *mut f32,
        ld: usize,
    ) {
        let g = L * 4;
        let nsb = p.cols / g;
        let per_super = QK_K / g;
        let k = a.k;
        let mut f = [_mm512_setzero_ps(); T];
        let (mut dv, mut ndv) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for s in 0..nsb {
            let at = grp * nsb + s;
            let (c, planes) = p.sub_block::<L, BITS>(at);
            let mut w = [_mm512_setzero_si512(); L];
            for j in 0..L {
                w[j] = line::<L, BITS>(c, planes, j);
            }
            let (sc, mn) = if HALF {
                let sc = _mm512_cvtph_ps(_mm256_loadu_si256(
                    p.dh.as_ptr().add(at * ROWS) as *const __m256i
                ));
                let mn = if MIN {
                    _mm512_cvtph_ps(_mm256_loadu_si256(
                        p.mh.as_ptr().add(at * ROWS) as *const __m256i
                    ))
                } else {
                    _mm512_setzero_ps()
                };
                (sc, mn)
            } else {
                if s % per_super == 0 {
                    let sat = (grp * (p.cols / QK_K) + s / per_super) * ROWS;
                    let h =
                        |v: *const u16| _mm512_cvtph_ps(_mm256_loadu_si256(v as *const __m256i));
                    dv = h(p.d.as_ptr().add(sat));
                    if MIN {
                        ndv = h(p.ndmin.as_ptr().add(sat));
                    }
                }
                let ints = |v: *const i8| {
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(v as *const __m128i)))
                };
                let sc = _mm512_mul_ps(dv, ints(p.sc.as_ptr().add(at * ROWS)));
                let mn = if MIN {
                    _mm512_mul_ps(ndv, ints(p.m.as_ptr().add(at * ROWS)))
                } else {
                    _mm512_setzero_ps()
                };
                (sc, mn)
            };
            // Token-inner order: T independent accumulation chains per weight line.
            let mut acc = [_mm512_setzero_si512(); T];
            let mut y = [std::ptr::null::<i32>(); T];
            for t in 0..T {
                let tok = t0 + t;
                y[t] = a.q.as_ptr().add(tok * k + s * g) as *const i32;
                acc[t] = _mm512_set1_epi32(-p.f.off * a.sum(tok, s, g));
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
#[allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::quant::{self, testutil::*};

    #[test]
    fn repacked_weights_reproduce_dequantization() {
        let mut rng = Rng(7);
        for t in QUANTIZED {
            let (k, rows) = (512, 32);
            let f = format(t).unwrap();
            let data: Vec<u8> = (0..rows).flat_map(|_| random_row(t, k, &mut rng)).collect();
            let p = Repacked::new(t, &data, rows, k).unwrap();
            let row_bytes = data.len() / rows;
            let mut want = vec![0f32; k];
            for r in 0..rows {
                quant::dequantize_row(t, &data[r * row_bytes..(r + 1) * row_bytes], &mut want);
                for i in 0..k {
                    let (s, e) = (i / f.g, i % f.g);
                    let (scale, min) = p.scale_min(r / ROWS, s, r % ROWS);
                    let q = p.value(r / ROWS, s, r % ROWS, e) as i32 - f.off;
                    let got = scale * q as f32 + min;
                    assert!(
                        (got - want[i]).abs() <= 1e-6 * want[i].abs().max(1.0),
                        "{t:?} row {r} element {i}: {got} vs {want}",
                        want = want[i]
                    );
                }
            }
            // The repacked matrix is no larger than its GGUF blocks, but for the K-quants' integer
            // scales and mins (a byte each instead of 6 bits, or of Q2_K's 4).
            let extra = match t {
                GgmlType::Q4_K | GgmlType::Q5_K => rows * k / QK / 2,
                GgmlType::Q2_K => rows * k / 16,
                GgmlType::Q3_K => rows * k / 64,
                _ => 0,
            };
            assert!(
                p.bytes() <= data.len() + extra,
                "{t:?} {} vs {}",
                p.bytes(),
                data.len()
            );
        }
    }

    /// Token counts that exercise the tiles of 8 and 4 and the single-token tail, row lengths with an
    /// odd number of blocks or super-blocks, and two row groups: the SIMD kernel must equal the
    /// scalar reference bit for bit, and both the float dot product of the dequantized weights with
    /// the dequantized activations closely.
    #[test]
    fn kernels_match_the_reference_and_the_float_dot() {
        let mut rng = Rng(11);
        let cases = QUANTIZED.iter().flat_map(|&t| {
            let ks: &[usize] = if format(t).unwrap().half {
                &[32, 288, 512]
            } else {
                &[256, 768]
            };
            ks.iter().map(move |&k| (t, k))
        });
        for (t, k) in cases {
            let rows = 32;
            let data: Vec<u8> = (0..rows).flat_map(|_| random_row(t, k, &mut rng)).collect();
            let p = Repacked::new(t, &data, rows, k).unwrap();
            let row_bytes = data.len() / rows;
            for n in [1usize, 3, 4, 7, 8, 13, 21] {
                let x: Vec<f32> = (0..n * k).map(|_| rng.f32()).collect();
                let mut acts = Acts::default();
                acts.reset(k, n);
                for tk in 0..n {
                    // SAFETY: tk < n, the count of the reset above, and one token at a time.
                    let (q, d, s) = unsafe { acts.token_mut(tk) };
                    quantize(&x[tk * k..(tk + 1) * k], q, d, s);
                }
                let mut fast = vec![0f32; n * rows];
                let mut slow = vec![0f32; n * rows];
                for grp in 0..rows / ROWS {
                    // SAFETY: the output holds n x rows floats, the most `run_scalar` writes for
                    // t < n and grp < rows / 16; this thread is the only one.
                    unsafe { p.run_scalar(grp, &acts, 0, n, slow.as_mut_ptr(), rows) };
                }
                // Every kernel this CPU can run, whichever the environment picks.
                for &kern in Kernel::supported() {
                    fast.fill(f32::NAN);
                    for grp in 0..rows / ROWS {
                        // SAFETY: as above, for `run_on`.
                        unsafe { p.run_on(kern, grp, &acts, 0, n, fast.as_mut_ptr(), rows) };
                    }
                    assert_eq!(fast, slow, "{kern:?} {t:?} k={k} n={n}");
                }
                if Kernel::supported().is_empty() {
                    fast.copy_from_slice(&slow);
                }
                let mut w = vec![0f32; k];
                for r in 0..rows {
                    quant::dequantize_row(t, &data[r * row_bytes..(r + 1) * row_bytes], &mut w);
                    for tk in 0..n {
                        let xq: Vec<f32> = (0..k)
                            .map(|i| acts.q[tk * k + i] as f32 * acts.d[tk * k / QK + i / QK])
                            .collect();
                        let want: f64 = w.iter().zip(&xq).map(|(a, b)| *a as f64 * *b as f64).sum();
                        let norm: f64 = w
                            .iter()
                            .zip(&xq)
                            .map(|(a, b)| (*a as f64 * *b as f64).abs())
                            .sum();
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
