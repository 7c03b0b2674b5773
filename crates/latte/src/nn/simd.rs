//! Element-wise loops at the CPU's full vector width.
//!
//! The crate is compiled for baseline x86-64, so a plain loop vectorises with SSE2 only
//! and `f32::exp` is a scalar libm call per element. [`vectorized`] runs a kernel compiled
//! for the widest extension the CPU has (AVX-512 or AVX2 + FMA on x86-64, detected at run
//! time by `pulp`, as gemm does for its kernels), and [`exp`] is an exponential written so
//! that such loops vectorise: the softmax and the tanh-GELU spend most of their time in it.
//! Row sums ([`sum`], [`sum_pairs`]) keep interleaved partial sums, which a vector register holds.

/// Runs `kernel` compiled for the widest SIMD extension the CPU has; plain loops inside
/// it (and the `#[inline(always)]` functions they call, like [`exp`]) vectorise.
#[inline(always)]
pub(super) fn vectorized<R>(kernel: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(kernel)
}

/// `eˣ` in f32 within 2 ulp, branch-free so that loops calling it vectorise.
///
/// Cephes' `expf`: `x = n·ln 2 + r` with `|r| ≤ ½ ln 2`, `eʳ` by a degree-7 polynomial,
/// `2ⁿ` by building the exponent bits. Inputs are clamped to `[−87.3, 88]`, where `2ⁿ`
/// stays a normal number: below, the result is `1.2·10⁻³⁸` instead of a denormal or 0;
/// above, `e⁸⁸` instead of overflowing (the GELU gate and the softmax never need more).
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.0);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    e_r * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Partial sums kept by [`sum_pairs`]: one AVX-512 register of f32.
const LANES: usize = 16;

/// `Σ f(a[k], b[k])` over two rows of equal length, in [`LANES`] interleaved partial sums
/// (added in a fixed order at the end), so that the loop vectorises: a single running
/// sum is one dependent addition per element, which no compiler may reorder.
#[inline(always)]
pub(super) fn sum_pairs(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    assert_eq!(a.len(), b.len(), "sum_pairs: rows of different lengths");
    let mut partial = [0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(&a, &b)| f(a, b))
        .sum();
    for (a, b) in a_chunks.zip(b_chunks) {
        for lane in 0..LANES {
            partial[lane] += f(a[lane], b[lane]);
        }
    }
    partial.iter().sum::<f32>() + tail
}

/// `Σ f(row[k])`, as [`sum_pairs`] adds.
#[inline(always)]
pub(super) fn sum(row: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    sum_pairs(row, row, |v, _| f(v))
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
            let got = vectorized(|| sum_pairs(&a, &b, |a, b| a * b));
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
    fn vectorized_loops_compute_what_scalar_ones_do() {
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) / 7.0).collect();
        let mut wide = vec![0f32; x.len()];
        vectorized(|| {
            for (y, &x) in wide.iter_mut().zip(&x) {
                *y = exp(x);
            }
        });
        let scalar: Vec<f32> = x.iter().map(|&x| exp(x)).collect();
        assert_eq!(wide, scalar);
    }
}
