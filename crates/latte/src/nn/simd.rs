//! Element-wise loops at the CPU's full vector width.
//!
//! The crate is compiled for baseline x86-64, so a plain loop vectorises with SSE2 only
//! and `f32::exp` is a scalar libm call per element. The fused kernels' element-wise
//! functions are therefore compiled once per SIMD extension (AVX-512, AVX2 + FMA, …) with
//! `#[multiversion(targets = "simd")]` and the widest the CPU has is chosen at run time;
//! the `#[inline(always)]` helpers here are inlined into each version. [`exp`] is an
//! exponential written so that such loops vectorise (the softmax and the tanh-GELU spend
//! most of their time in it), and the row reductions ([`sum`], [`sum_pairs`], [`max`])
//! keep interleaved partial results, which a vector register holds.

/// `eˣ` in f32 within 2 ulp, branch-free and without float-to-integer conversions (which
/// Rust saturates, and which then do not vectorise), so that loops calling it vectorise.
///
/// Cephes' `expf`: `x = n·ln 2 + r` with `|r| ≤ ½ ln 2`, `eʳ` by a degree-7 polynomial,
/// `2ⁿ` by building the exponent bits. Inputs are clamped to `[−87.3, 88]`, where `2ⁿ`
/// stays a normal number: below, the result is `1.2·10⁻³⁸` instead of a denormal or 0;
/// above, `e⁸⁸` instead of overflowing (the GELU gate and the softmax never need more).
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5·2²³ rounds to an integer (to nearest, ties to even) that then sits in
    // the low mantissa bits.
    const ROUNDING: f32 = 12_582_912.0;
    const ROUNDING_BITS: u32 = 0x4B40_0000;
    let x = x.clamp(-87.3, 88.0);
    let shifted = x * std::f32::consts::LOG2_E + ROUNDING;
    let n = shifted - ROUNDING;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    // n + 127 in [1, 254], the biased exponent of 2ⁿ.
    let biased = shifted
        .to_bits()
        .wrapping_sub(ROUNDING_BITS)
        .wrapping_add(127);
    e_r * f32::from_bits(biased << 23)
}

/// Partial results kept by the row reductions: one AVX-512 register of f32.
const LANES: usize = 16;

/// Folds `f(a[k], b[k])` over two rows of equal length with `combine`, in [`LANES`]
/// interleaved partial results (combined in a fixed order at the end), so that the loop
/// vectorises: a single running result is one dependent operation per element, which no
/// compiler may reorder.
#[inline(always)]
fn fold_pairs(
    a: &[f32],
    b: &[f32],
    identity: f32,
    f: impl Fn(f32, f32) -> f32,
    combine: impl Fn(f32, f32) -> f32,
) -> f32 {
    assert_eq!(a.len(), b.len(), "row reduction: rows of different lengths");
    let mut partial = [identity; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .fold(identity, |acc, (&a, &b)| combine(acc, f(a, b)));
    for (a, b) in a_chunks.zip(b_chunks) {
        for lane in 0..LANES {
            partial[lane] = combine(partial[lane], f(a[lane], b[lane]));
        }
    }
    combine(partial.into_iter().fold(identity, &combine), tail)
}

/// `Σ f(a[k], b[k])` over two rows of equal length (see [`fold_pairs`]).
#[inline(always)]
pub(super) fn sum_pairs(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    fold_pairs(a, b, 0.0, f, |acc, v| acc + v)
}

/// `Σ f(row[k])` (see [`fold_pairs`]).
#[inline(always)]
pub(super) fn sum(row: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    sum_pairs(row, row, |v, _| f(v))
}

/// The largest element of `row` (−∞ for an empty row; NaNs are skipped as `f32::max`
/// skips them).
#[inline(always)]
pub(super) fn max(row: &[f32]) -> f32 {
    fold_pairs(row, row, f32::NEG_INFINITY, |v, _| v, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Relative error against f64's `exp`, in units of f32's epsilon.
    fn error_in_eps(x: f32) -> f64 {
        let exact = (x as f64).exp();
        ((exp(x) as f64 - exact) / exact).abs() / f32::EPSILON as f64
    }

    #[test]
    fn exp_is_within_two_ulp_over_its_range() {
        let worst = (0..=2_000_000)
            .map(|i| -87.3 + (88.0 + 87.3) * i as f32 / 2_000_000.0)
            .map(error_in_eps)
            .fold(0.0, f64::max);
        assert!(worst < 2.0, "worst error {worst} eps");
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn exp_saturates_outside_its_range() {
        assert_eq!(exp(-1000.0), exp(-87.3));
        assert!(exp(-1000.0) > 0.0 && exp(-1000.0) < 1.3e-38);
        assert_eq!(exp(f32::INFINITY), exp(88.0));
        assert!(exp(88.0).is_finite());
    }

    #[test]
    fn sums_agree_with_f64_sums_for_every_tail_length() {
        for len in [0, 1, 15, 16, 17, 512, 1000] {
            let a: Vec<f32> = (0..len)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 9.0)
                .collect();
            let b: Vec<f32> = (0..len)
                .map(|i| ((i * 11 % 23) as f32 - 11.0) / 5.0)
                .collect();
            let got = sum_pairs(&a, &b, |a, b| a * b);
            let want: f64 = a.iter().zip(&b).map(|(&a, &b)| a as f64 * b as f64).sum();
            let scale: f64 = a
                .iter()
                .zip(&b)
                .map(|(&a, &b)| (a as f64 * b as f64).abs())
                .sum();
            assert!(
                (got as f64 - want).abs() <= 1e-6 * scale.max(1.0),
                "length {len}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn max_finds_the_largest_element_anywhere_in_the_row() {
        for len in [1, 15, 16, 17, 100] {
            for at in [0, len / 2, len - 1] {
                let mut row: Vec<f32> = (0..len).map(|i| -(i as f32)).collect();
                row[at] = 5.0;
                assert_eq!(max(&row), 5.0, "length {len}, at {at}");
            }
        }
        assert_eq!(max(&[]), f32::NEG_INFINITY);
    }

    #[multiversion::multiversion(targets = "simd")]
    fn exp_all(y: &mut [f32], x: &[f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = exp(x);
        }
    }

    #[test]
    fn vectorized_loops_compute_what_scalar_ones_do() {
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) / 7.0).collect();
        let mut wide = vec![0f32; x.len()];
        exp_all(&mut wide, &x);
        let scalar: Vec<f32> = x.iter().map(|&x| exp(x)).collect();
        assert_eq!(wide, scalar);
    }
}
