//! Matrix products on f32 slices, through the `gemm` crate (the kernel candle's CPU
//! matmul uses), for the fused kernels: bounds-checked strided views ([`Mat`]), products
//! on the calling thread ([`matmul`]) or on rayon's threads ([`matmul_parallel`]), and
//! gemm's per-thread packing buffers, allocated before anything is measured.
//!
//! gemm packs the left operand into a thread-local buffer the size of the L2 cache,
//! allocated on a thread's first product and kept for the life of the thread: 1 MiB per
//! thread on a 1 MiB-L2 CPU. Left to itself it appears in whichever step first runs a
//! product on that thread, inside a measured peak that no cost model can attribute.
//! [`allocate_packing_buffers`] allocates it on every rayon worker (where parallel
//! products run) and on the calling thread (where single-threaded ones run).

use gemm::Parallelism;
use std::sync::Once;

/// A strided read-only f32 matrix.
#[derive(Debug, Clone, Copy)]
pub(super) struct Mat<'a> {
    data: &'a [f32],
    pub(super) rows: usize,
    pub(super) cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Mat<'a> {
    /// `rows × cols` stored row by row in `data`.
    pub(super) fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose (a view).
    pub(super) fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Whether every element lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
                < self.data.len()
    }
}

/// `dst = scale · a · b`, `dst` row-major `a.rows × b.cols`, on the calling thread.
pub(super) fn matmul(dst: &mut [f32], a: Mat<'_>, b: Mat<'_>, scale: f32) {
    product(dst, a, b, scale, false, Parallelism::None);
}

/// `dst = a · b`, or `dst += a · b` when `accumulate`, `dst` row-major `a.rows × b.cols`,
/// split over candle's thread count on rayon's pool.
pub(super) fn matmul_parallel(dst: &mut [f32], a: Mat<'_>, b: Mat<'_>, accumulate: bool) {
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    product(dst, a, b, 1.0, accumulate, parallelism);
}

/// `dst = scale · a · b + (dst if accumulate)`.
fn product(
    dst: &mut [f32],
    a: Mat<'_>,
    b: Mat<'_>,
    scale: f32,
    accumulate: bool,
    parallelism: Parallelism,
) {
    assert_eq!(a.cols, b.rows, "matrix product: inner dimensions differ");
    assert!(
        a.in_bounds() && b.in_bounds(),
        "matrix product: view out of bounds"
    );
    let (m, n, k) = (a.rows, b.cols, a.cols);
    assert!(dst.len() >= m * n, "matrix product: destination too small");
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the views lie inside their slices (checked above), `dst` holds `m × n`
    // row-major elements, and no operand aliases `dst` (it is borrowed mutably).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            if accumulate { 1.0 } else { 0.0 },
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Allocates gemm's packing buffer on every rayon worker and on this thread; only the
/// first call does anything.
pub fn allocate_packing_buffers() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let touch = || gemm_common::gemm::L2_SLAB.with(|_| ());
        rayon::broadcast(|_| touch());
        touch();
    });
}
