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
use rayon::prelude::*;
use std::sync::Once;

/// Rows copied by one rayon task in [`repeat_rows`].
const ROWS_PER_TASK: usize = 64;

/// Rows summed by one rayon task in [`column_sums`].
const SUM_BLOCK_ROWS: usize = 256;

/// The widest right operand with strided columns that [`matmul_parallel`] splits by rows.
/// gemm packs such an operand on the calling thread before its parallel loop when the
/// product is at most two of its row blocks wide (2·mc ≤ 1024 columns for f32): the other
/// threads wait. One single-threaded product per thread over a share of the rows packs a
/// copy on every thread at once instead (a gemm micro-probe on this project's 2-core
/// AVX-512 host, 4096 × 512 outputs: 8–15 % faster).
const SPLIT_MAX_COLS: usize = 1024;

/// Blocks of [`column_sums`] (one f64 partial row each) for `rows` rows.
pub fn column_sum_blocks(rows: usize) -> usize {
    rows.div_ceil(SUM_BLOCK_ROWS).max(1)
}

/// The sum of every column of the row-major matrix `values` (`cols` wide), in f64: blocks
/// of [`SUM_BLOCK_ROWS`] rows summed on rayon's threads, the block sums then added in block
/// order (deterministic whatever the thread count).
pub(super) fn column_sums(values: &[f32], cols: usize) -> Vec<f64> {
    if cols == 0 {
        return Vec::new();
    }
    let partials: Vec<Vec<f64>> = values
        .par_chunks(SUM_BLOCK_ROWS * cols)
        .map(|block| {
            let mut sums = vec![0f64; cols];
            for row in block.chunks_exact(cols) {
                sums.iter_mut()
                    .zip(row)
                    .for_each(|(s, &v)| *s += f64::from(v));
            }
            sums
        })
        .collect();
    partials
        .into_iter()
        .reduce(|mut total, block| {
            total.iter_mut().zip(&block).for_each(|(t, b)| *t += b);
            total
        })
        .unwrap_or_else(|| vec![0f64; cols])
}

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
        Self::strided(data, rows, cols, cols)
    }

    /// `rows × cols` whose rows start `row_stride` elements apart in `data` (a block of
    /// columns of a wider row-major matrix).
    pub(super) fn strided(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride,
            col_stride: 1,
        }
    }

    /// Rows `first..first + rows` (a view).
    fn row_range(self, first: usize, rows: usize) -> Self {
        Self {
            data: &self.data[(first * self.row_stride).min(self.data.len())..],
            rows,
            ..self
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
    product(dst, b.cols, a, b, scale, false, Parallelism::None);
}

/// [`matmul`] into rows that start `dst_row_stride` elements apart in `dst` (a block of
/// columns of a wider row-major matrix; the elements between are left alone).
pub(super) fn matmul_into_rows(
    dst: &mut [f32],
    dst_row_stride: usize,
    a: Mat<'_>,
    b: Mat<'_>,
    scale: f32,
) {
    product(dst, dst_row_stride, a, b, scale, false, Parallelism::None);
}

/// `dst = a · b`, or `dst += a · b` when `accumulate`, `dst` row-major `a.rows × b.cols`,
/// split over candle's thread count on rayon's pool: by gemm itself, or, for a narrow `b`
/// with strided columns ([`SPLIT_MAX_COLS`]), by rows.
pub(super) fn matmul_parallel(dst: &mut [f32], a: Mat<'_>, b: Mat<'_>, accumulate: bool) {
    let threads = candle_core::utils::get_num_threads();
    if threads <= 1 {
        return product(dst, b.cols, a, b, 1.0, accumulate, Parallelism::None);
    }
    let (rows, cols) = (a.rows, b.cols);
    if b.col_stride == 1 || cols > SPLIT_MAX_COLS || rows < threads || cols == 0 {
        return product(
            dst,
            cols,
            a,
            b,
            1.0,
            accumulate,
            Parallelism::Rayon(threads),
        );
    }
    assert!(
        dst.len() >= rows * cols,
        "matrix product: destination too small"
    );
    let share = rows.div_ceil(threads);
    dst[..rows * cols]
        .par_chunks_mut(share * cols)
        .enumerate()
        .for_each(|(i, dst)| {
            let a = a.row_range(i * share, dst.len() / cols);
            product(dst, cols, a, b, 1.0, accumulate, Parallelism::None);
        });
}

/// `dst = scale · a · b + (dst if accumulate)`, `dst`'s rows `dst_row_stride` apart.
fn product(
    dst: &mut [f32],
    dst_row_stride: usize,
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
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        dst_row_stride >= n && dst.len() >= (m - 1) * dst_row_stride + n,
        "matrix product: destination too small"
    );
    // SAFETY: the views lie inside their slices (checked above), `dst` holds `m` rows of
    // `n` elements `dst_row_stride` apart, and no operand aliases `dst` (it is borrowed
    // mutably).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_row_stride as isize,
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

/// `rows` copies of `row`, one after another (a product's bias prefill), written on rayon's
/// threads into memory that is never zeroed first.
pub(super) fn repeat_rows(row: &[f32], rows: usize) -> Vec<f32> {
    let len = rows * row.len();
    let mut out = Vec::with_capacity(len);
    if len == 0 {
        return out;
    }
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(row.len())
        .with_min_len(ROWS_PER_TASK)
        .for_each(|dst| {
            dst.write_copy_of_slice(row);
        });
    // SAFETY: every one of the `len` elements was written above.
    unsafe { out.set_len(len) };
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Enough rows for several rayon tasks: every row is the bias row.
    #[test]
    fn repeat_rows_copies_the_row_into_every_row() {
        let row = [1.5f32, -2.0, 0.25];
        let rows = 5 * ROWS_PER_TASK + 3;
        let out = repeat_rows(&row, rows);
        assert_eq!(out.len(), rows * row.len());
        assert!(out.chunks(row.len()).all(|r| r == row));
        assert!(repeat_rows(&row, 0).is_empty());
    }

    /// Several row blocks, the last partial: the sums of a plain loop (exact here: small
    /// integers in f64).
    #[test]
    fn column_sums_add_every_row() {
        let (rows, cols) = (2 * SUM_BLOCK_ROWS + 5, 3);
        let values: Vec<f32> = (0..rows * cols).map(|i| (i % 17) as f32 - 8.0).collect();
        let mut expected = vec![0f64; cols];
        for row in values.chunks(cols) {
            for (e, &v) in expected.iter_mut().zip(row) {
                *e += f64::from(v);
            }
        }
        assert_eq!(column_sums(&values, cols), expected);
        assert_eq!(column_sums(&[], 2), vec![0.0; 2]);
    }

    /// A narrow product with a strided right operand (split by rows) and a wide one (split
    /// by gemm) equal the single-threaded product, with and without accumulation.
    #[test]
    fn parallel_products_equal_the_single_threaded_one() {
        let (rows, inner) = (37, 9);
        let a: Vec<f32> = (0..rows * inner).map(|i| (i % 13) as f32 - 6.0).collect();
        for cols in [5, SPLIT_MAX_COLS + 3] {
            let w: Vec<f32> = (0..cols * inner).map(|i| (i % 7) as f32 - 3.0).collect();
            // b = Wᵀ, a view with strided columns (a linear layer's weight).
            let (a, b) = (
                Mat::row_major(&a, rows, inner),
                Mat::row_major(&w, cols, inner).t(),
            );
            let mut expected = vec![1.0f32; rows * cols];
            matmul(&mut expected, a, b, 1.0);
            let mut fresh = vec![f32::NAN; rows * cols];
            matmul_parallel(&mut fresh, a, b, false);
            assert_eq!(fresh, expected, "{cols} columns");
            let mut accumulated = vec![1.0f32; rows * cols];
            matmul_parallel(&mut accumulated, a, b, true);
            let plus_one: Vec<f32> = expected.iter().map(|v| v + 1.0).collect();
            assert_eq!(accumulated, plus_one, "{cols} columns, accumulated");
        }
    }

    /// A product into a block of columns leaves the other columns alone.
    #[test]
    fn matmul_into_rows_writes_only_its_columns() {
        let a = [1.0f32, 2.0, 3.0, 4.0]; // 2 × 2
        let b = [1.0f32, 0.0, 1.0, 1.0]; // 2 × 2
        let mut dst = [9.0f32; 2 * 5];
        matmul_into_rows(
            &mut dst[1..],
            5,
            Mat::row_major(&a, 2, 2),
            Mat::row_major(&b, 2, 2),
            2.0,
        );
        assert_eq!(dst, [9.0, 6.0, 4.0, 9.0, 9.0, 9.0, 14.0, 8.0, 9.0, 9.0]);
    }
}
