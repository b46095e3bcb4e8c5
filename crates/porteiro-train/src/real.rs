//! The arithmetic training runs in: f32 for real runs, f64 for gradient checks against finite
//! differences (the same code, so the check covers what trains). Matrix products go through
//! the `gemm` crate (strided views, so transposes and column slices cost no copy); work is spread
//! over scoped threads by [`par_map`].

// The one unsafe use is the call into the gemm crate's raw-pointer GEMM; `gemm` checks every index
// the call can touch lies inside the slices before making it.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicUsize, Ordering};

/// A float training can run in.
pub trait Real:
    num_traits::Float
    + Default
    + Send
    + Sync
    + std::fmt::Debug
    + std::iter::Sum
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
    + 'static
{
    fn of(v: f32) -> Self;
    fn of64(v: f64) -> Self;
    fn f64(self) -> f64;
    /// # Safety
    /// Every element the strides reach must be inside its allocation; C aliases neither input.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );
}

impl Real for f32 {
    fn of(v: f32) -> Self {
        v
    }
    fn of64(v: f64) -> Self {
        v as f32
    }
    fn f64(self) -> f64 {
        self as f64
    }
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: f32,
        a: *const f32,
        rsa: isize,
        csa: isize,
        b: *const f32,
        rsb: isize,
        csb: isize,
        beta: f32,
        c: *mut f32,
        rsc: isize,
        csc: isize,
    ) {
        gemm_any(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
    }
}

impl Real for f64 {
    fn of(v: f32) -> Self {
        v as f64
    }
    fn of64(v: f64) -> Self {
        v
    }
    fn f64(self) -> f64 {
        self
    }
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: f64,
        a: *const f64,
        rsa: isize,
        csa: isize,
        b: *const f64,
        rsb: isize,
        csb: isize,
        beta: f64,
        c: *mut f64,
        rsc: isize,
        csc: isize,
    ) {
        gemm_any(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
    }
}

/// C = alpha·A·B + beta·C through the `gemm` crate (AVX-512 or AVX2 kernels picked at run time, on
/// the calling thread: training spreads its own work over threads).
///
/// # Safety
/// Every element the strides reach must be inside its allocation, and C alias neither input.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_any<R: Real>(
    m: usize,
    k: usize,
    n: usize,
    alpha: R,
    a: *const R,
    rsa: isize,
    csa: isize,
    b: *const R,
    rsb: isize,
    csb: isize,
    beta: R,
    c: *mut R,
    rsc: isize,
    csc: isize,
) {
    // `gemm` computes dst = alpha·dst + beta·lhs·rhs, and skips reading dst when told to (so a
    // zero beta never turns uninitialised NaNs into NaN outputs, as BLAS promises).
    let read = beta != R::zero();
    // SAFETY: the caller's contract is gemm's (in-bounds strides, no aliasing of C).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            csc,
            rsc,
            read,
            a,
            csa,
            rsa,
            b,
            csb,
            rsb,
            beta,
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// A strided matrix view: element (i, j) at `i * rs + j * cs`.
#[derive(Clone, Copy)]
pub struct View<'a, R> {
    pub data: &'a [R],
    pub rs: usize,
    pub cs: usize,
}

/// Row-major `rows x cols` view.
pub fn rm<R>(data: &[R], cols: usize) -> View<'_, R> {
    View {
        data,
        rs: cols,
        cs: 1,
    }
}

/// The transpose of a row-major matrix with `cols` columns.
pub fn tr<R>(data: &[R], cols: usize) -> View<'_, R> {
    View {
        data,
        rs: 1,
        cs: cols,
    }
}

fn reach(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// C (m x n, row stride `ldc`) = alpha · A (m x k) · B (k x n) + beta · C.
///
/// Panics if a view is too short for the shape: a bug in the caller, never input-dependent.
#[allow(clippy::too_many_arguments)]
pub fn gemm<R: Real>(
    m: usize,
    k: usize,
    n: usize,
    alpha: R,
    a: View<R>,
    b: View<R>,
    beta: R,
    c: &mut [R],
    ldc: usize,
) {
    assert!(a.data.len() >= reach(m, k, a.rs, a.cs), "gemm: A too short");
    assert!(b.data.len() >= reach(k, n, b.rs, b.cs), "gemm: B too short");
    assert!(c.len() >= reach(m, n, ldc, 1), "gemm: C too short");
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the asserts above keep every index the strides reach inside the three slices; `c` is
    // borrowed mutably, so it aliases neither input.
    unsafe {
        R::gemm_raw(
            m,
            k,
            n,
            alpha,
            a.data.as_ptr(),
            a.rs as isize,
            a.cs as isize,
            b.data.as_ptr(),
            b.rs as isize,
            b.cs as isize,
            beta,
            c.as_mut_ptr(),
            ldc as isize,
            1,
        )
    }
}

/// [`gemm`] with C's rows split over up to `threads` scoped threads when the product is big enough
/// to pay for them (the LoRA products of a training step: skinny, but hundreds per step).
#[allow(clippy::too_many_arguments)]
pub fn par_gemm<R: Real>(
    threads: usize,
    m: usize,
    k: usize,
    n: usize,
    alpha: R,
    a: View<R>,
    b: View<R>,
    beta: R,
    c: &mut [R],
    ldc: usize,
) {
    let parts = threads.min(m / 4).max(1);
    if parts == 1 || m * k * n < 1 << 20 {
        return gemm(m, k, n, alpha, a, b, beta, c, ldc);
    }
    assert!(c.len() >= reach(m, n, ldc, 1), "gemm: C too short");
    let mut chunks = Vec::with_capacity(parts);
    let mut rest = &mut c[..];
    let mut at = 0;
    for p in 0..parts {
        let rows = part(m, p, parts);
        let (mine, tail) = if p + 1 == parts {
            (std::mem::take(&mut rest), &mut [][..])
        } else {
            std::mem::take(&mut rest).split_at_mut((rows.end - at) * ldc)
        };
        at = rows.end;
        rest = tail;
        chunks.push((rows, mine));
    }
    std::thread::scope(|s| {
        for (rows, mine) in chunks {
            let a = View {
                data: &a.data[(rows.start * a.rs).min(a.data.len())..],
                rs: a.rs,
                cs: a.cs,
            };
            s.spawn(move || gemm(rows.len(), k, n, alpha, a, b, beta, mine, ldc));
        }
    });
}

/// `f(i)` for i in 0..n on up to `threads` scoped threads, results in order. Work is handed out one
/// item at a time, so uneven items balance.
pub fn par_map<T: Send>(threads: usize, n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let threads = threads.clamp(1, n.max(1));
    if threads == 1 {
        return (0..n).map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let mut parts: Vec<Vec<(usize, T)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            break mine;
                        }
                        mine.push((i, f(i)));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    for (i, v) in parts.drain(..).flatten() {
        out[i] = Some(v);
    }
    out.into_iter().flatten().collect()
}

/// Item range of part `i` of `parts` over `n` items.
pub fn part(n: usize, i: usize, parts: usize) -> std::ops::Range<usize> {
    (n * i / parts)..(n * (i + 1) / parts)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn gemm_matches_a_naive_product_with_transposes() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
        let b: Vec<f64> = (0..n * k).map(|i| (i as f64 * 0.11).cos()).collect(); // n x k
        let mut c = vec![1.0; m * n];
        gemm(m, k, n, 2.0, rm(&a, k), tr(&b, k), 0.5, &mut c, n);
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k).map(|t| a[i * k + t] * b[j * k + t]).sum();
                assert!((c[i * n + j] - (2.0 * dot + 0.5)).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn par_gemm_matches_gemm() {
        let (m, k, n) = (67, 130, 150);
        let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
        let b: Vec<f64> = (0..n * k).map(|i| (i as f64 * 0.11).cos()).collect();
        let c0: Vec<f64> = (0..m * (n + 3)).map(|i| (i as f64 * 0.05).sin()).collect();
        for (av, bv) in [(rm(&a, k), tr(&b, k)), (tr(&a, m), rm(&b, n))] {
            let (mut c1, mut c2) = (c0.clone(), c0.clone());
            gemm(m, k, n, 0.5, av, bv, 2.0, &mut c1, n + 3);
            par_gemm(3, m, k, n, 0.5, av, bv, 2.0, &mut c2, n + 3);
            assert_eq!(c1, c2);
        }
    }

    #[test]
    fn par_map_keeps_order() {
        let v = par_map(3, 50, |i| i * i);
        assert_eq!(v, (0..50).map(|i| i * i).collect::<Vec<_>>());
    }
}
