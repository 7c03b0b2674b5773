//! The fused tanh-GELU of the MLP, with its own backward: candle's composed GELU backward
//! materialises a dozen activation-sized temporaries. It declares what its backward reads
//! (`CustomOp1::bwd_reads`: the input), so a stored graph keeps only that
//! (`Tensor::release_unneeded_for_backward`). The attention has its own fused kernel
//! ([`super::fused_attention`]).
//!
//! The kernel runs on CPU in f32 (half-precision inputs are widened per element). On other
//! devices [`gelu_tanh`] falls back to candle's differentiable GELU.

use super::simd;
use candle_core::backend::BackendStorage;
use candle_core::backprop::BackwardReads;
use candle_core::op::BackpropOp;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Error, Layout, Result, Shape, Storage, Tensor,
};
use half::{bf16, f16};
use multiversion::multiversion;
use rayon::prelude::*;
use std::borrow::Cow;

/// √(2/π), the tanh-GELU's inner scale.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// The tanh-GELU's cubic coefficient.
const GELU_CUBIC: f32 = 0.044_715;

/// Rows handed to one rayon task by the element-wise kernels.
const CHUNK: usize = 4096;

/// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, PyTorch's `gelu(approximate="tanh")`.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if super::kernels::Kernels::fused_on(x.device()) {
        x.contiguous()?.apply_op1(GeluTanh)
    } else {
        x.gelu()
    }
}

// With u = √(2/π)·(x + 0.044715·x³) and s = σ(2u) = 1 / (1 + e^(−2u)):
// ½(1 + tanh u) = s and 1 − tanh² u = 4·s·(1 − s), so
//   gelu(x)  = x·s,
//   gelu'(x) = s + 2·x·s·(1 − s)·√(2/π)·(1 + 3·0.044715·x²).
// One `exp` instead of libm's `tanh` (which goes through `expm1`, and took a fifth of a
// small model's training step), and no cancellation in 1 + tanh u near u = −∞.

/// σ(2u) for the tanh-GELU's inner argument u of `x`.
#[inline(always)]
fn gelu_gate(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x);
    1.0 / (1.0 + simd::exp(-2.0 * u))
}

#[inline(always)]
fn gelu_value(x: f32) -> f32 {
    x * gelu_gate(x)
}

#[inline(always)]
fn gelu_derivative(x: f32) -> f32 {
    let s = gelu_gate(x);
    s + 2.0 * x * s * (1.0 - s) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * x * x)
}

/// `kernel(dst chunk, x chunk)` over matching [`CHUNK`]s of `dst` and `x`, in parallel.
fn chunks_in_parallel(dst: &mut [f32], x: &[f32], kernel: impl Fn(&mut [f32], &[f32]) + Sync) {
    dst.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(dst, x)| kernel(dst, x));
}

/// `len` zeros, written on rayon's threads (an output a kernel then fills).
pub(super) fn zeroed(len: usize) -> Vec<f32> {
    let mut values = Vec::with_capacity(len);
    values.spare_capacity_mut()[..len]
        .par_chunks_mut(CHUNK)
        .for_each(|chunk| {
            chunk.fill(std::mem::MaybeUninit::new(0.0));
        });
    // SAFETY: every one of the `len` elements was written above.
    unsafe { values.set_len(len) };
    values
}

/// `dst[i] = GELU(x[i])`, in parallel.
pub(super) fn gelu_into(dst: &mut [f32], x: &[f32]) {
    chunks_in_parallel(dst, x, gelu_run);
}

/// One chunk of [`gelu_into`], compiled per SIMD extension (as are the two below).
#[multiversion(targets = "simd")]
fn gelu_run(dst: &mut [f32], x: &[f32]) {
    for (d, &x) in dst.iter_mut().zip(x) {
        *d = gelu_value(x);
    }
}

/// `v = GELU(v)`: the forward of [`gelu_tanh`]'s op, on its own copy of the input.
#[multiversion(targets = "simd")]
fn gelu_in_place(values: &mut [f32]) {
    for v in values.iter_mut() {
        *v = gelu_value(*v);
    }
}

/// `grad[i] *= GELU'(x[i])`, in parallel: the GELU's backward in place.
pub(super) fn multiply_by_gelu_derivative(grad: &mut [f32], x: &[f32]) {
    chunks_in_parallel(grad, x, gelu_backward_run);
}

/// One chunk of [`multiply_by_gelu_derivative`].
#[multiversion(targets = "simd")]
fn gelu_backward_run(grad: &mut [f32], x: &[f32]) {
    for (g, &x) in grad.iter_mut().zip(x) {
        *g *= gelu_derivative(x);
    }
}

/// The contiguous elements of a storage as f32: borrowed when already f32, else widened.
pub(super) fn widened<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<Cow<'a, [f32]>> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| Error::Msg("fused kernel expects a contiguous input".into()))?;
    Ok(match storage {
        CpuStorage::F32(v) => Cow::Borrowed(&v[start..end]),
        CpuStorage::F16(v) => Cow::Owned(v[start..end].iter().map(|x| x.to_f32()).collect()),
        CpuStorage::BF16(v) => Cow::Owned(v[start..end].iter().map(|x| x.to_f32()).collect()),
        other => candle_core::bail!("fused kernel: unsupported dtype {:?}", other.dtype()),
    })
}

/// f32 results narrowed back to `dtype`.
pub(super) fn narrowed(values: Vec<f32>, dtype: DType) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(values),
        DType::F16 => CpuStorage::F16(values.into_iter().map(f16::from_f32).collect()),
        DType::BF16 => CpuStorage::BF16(values.into_iter().map(bf16::from_f32).collect()),
        other => candle_core::bail!("fused kernel: unsupported dtype {other:?}"),
    })
}

/// f32 results as a constant tensor of `dtype` and `shape` (a custom op's gradient).
pub(super) fn tensor_from_f32(values: Vec<f32>, dtype: DType, shape: &Shape) -> Result<Tensor> {
    let storage = Storage::Cpu(narrowed(values, dtype)?);
    Ok(Tensor::from_storage(
        storage,
        shape,
        BackpropOp::none(),
        false,
    ))
}

/// The CPU storage behind a tensor a fused op received.
pub(super) fn cpu(storage: &Storage) -> Result<&CpuStorage> {
    match storage {
        Storage::Cpu(storage) => Ok(storage),
        _ => candle_core::bail!("the fused kernels run on the CPU only"),
    }
}

/// Forward of [`gelu_tanh`].
struct GeluTanh;

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "gelu-tanh"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut values = widened(storage, layout)?.into_owned();
        values.par_chunks_mut(CHUNK).for_each(gelu_in_place);
        Ok((narrowed(values, storage.dtype())?, layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad_res.contiguous()?;
        Ok(Some(arg.apply_op2_no_bwd(&grad, &GeluTanhBackward)?))
    }

    /// The derivative is computed from the input: a stored graph keeps the input only.
    fn bwd_reads(&self) -> BackwardReads {
        BackwardReads::FIRST_ARG
    }
}

/// `grad · gelu'(x)` in one pass.
struct GeluTanhBackward;

impl CustomOp2 for GeluTanhBackward {
    fn name(&self) -> &'static str {
        "gelu-tanh-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = widened(x, x_layout)?;
        let mut values = widened(grad, grad_layout)?.into_owned();
        multiply_by_gelu_derivative(&mut values, &x);
        Ok((narrowed(values, grad.dtype())?, grad_layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{grads_of_weighted_sum, max_abs};
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn input() -> Var {
        let values: Vec<f32> = (0..96)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 3.0)
            .collect();
        Var::from_vec(values, (4, 24), &Device::Cpu).unwrap()
    }

    #[test]
    fn gelu_matches_candles_composed_gelu_and_its_gradient() {
        let x = input();
        let weights = Tensor::arange(0f32, 96.0, &Device::Cpu)
            .unwrap()
            .reshape((4, 24))
            .unwrap();
        let fused = gelu_tanh(x.as_tensor()).unwrap();
        let composed = x.as_tensor().gelu().unwrap();
        assert!(max_diff(&fused, &composed) < 1e-6);
        let g_fused = grads_of_weighted_sum(&fused, &weights);
        let g_composed = grads_of_weighted_sum(&composed, &weights);
        let (a, b) = (g_fused.get(&x).unwrap(), g_composed.get(&x).unwrap());
        // candle's composed derivative uses 6-digit constants (√(2/π) ≈ 0.797885,
        // 0.044715·3 = 0.134145): agreement to 1e-5 of the gradient's largest entry, a few
        // units in the sixth digit.
        let scale = max_abs(b);
        assert!(
            max_diff(a, b) <= 1e-5 * scale,
            "{} of {scale}",
            max_diff(a, b)
        );
    }

    /// The kernels against PyTorch's formula in f64, from the far left tail (where
    /// e^(−2u) overflows f32) to the linear regime. The reference writes 1 + tanh u as
    /// 2 / (1 + e^(−2u)) and 1 − tanh² u as (1 + tanh u)(1 − tanh u): in f64 the plain
    /// form cancels to 0 below u ≈ −19, where the kernel is still accurate.
    #[test]
    fn gelu_kernels_match_the_tanh_formula() {
        let c = (2.0 / std::f64::consts::PI).sqrt();
        for i in -2400..=2400 {
            let x = i as f32 / 200.0;
            let xd = f64::from(x);
            let u = c * (xd + 0.044715 * xd.powi(3));
            let one_plus_tanh = 2.0 / (1.0 + (-2.0 * u).exp());
            let one_minus_tanh_squared = one_plus_tanh * (2.0 - one_plus_tanh);
            let value = 0.5 * xd * one_plus_tanh;
            let derivative = 0.5 * one_plus_tanh
                + 0.5 * xd * one_minus_tanh_squared * c * (1.0 + 3.0 * 0.044715 * xd * xd);
            let (v, d) = (f64::from(gelu_value(x)), f64::from(gelu_derivative(x)));
            // A few f32 ulps relative, growing with |u| in the tail, where e^(−2u) turns
            // u's rounding into a relative error of 2|u| ulps; the derivative crosses zero
            // near x = −0.75, where its terms are O(1): there an absolute f32-sized error.
            let ulps = 8.0 * f64::from(f32::EPSILON) * (1.0 + 2.0 * u.abs());
            assert!(
                (v - value).abs() <= ulps * value.abs() + 1e-37,
                "gelu({x}) = {v}, not {value}"
            );
            assert!(
                (d - derivative).abs() <= 1e-5 * derivative.abs() + 1e-6,
                "gelu'({x}) = {d}, not {derivative}"
            );
        }
    }
}
