//! Layer normalisation without affine parameters, and the adaLN modulation that replaces
//! them in Latte: one op with its own backward either way, keeping only `x` and `scale`
//! for the backward pass — the fused CPU kernel ([`super::fused_norm`]), or with the
//! generic kernels tensor ops on any device ([`GenericModulatedNorm`]), whose backward
//! recomputes the row statistics. (candle's fused `layer_norm` records no backward; the
//! composed form keeps the centred and normalised tensors in f32.)
//!
//! ```text
//! x̂ = (x − mean(x)) / √(var(x) + ε)        y = x̂·(1 + scale) + shift
//! d shift = Σ_tokens dy                     d scale = Σ_tokens dy ∘ x̂
//! dx̂ = dy ∘ (1 + scale)                     dx = (dx̂ − mean(dx̂) − x̂ ∘ mean(dx̂ ∘ x̂)) / √(var(x) + ε)
//! ```

use super::fused_norm;
use super::kernels::Kernels;
use candle_core::backprop::BackwardReads;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use std::sync::Arc;

/// adaLN: `layer_norm(x)·(1 + scale) + shift` for `x`: `(n, s, d)` and `shift`, `scale`:
/// `(n, 1, d)` (one row per sequence, broadcast over its tokens).
pub fn modulated_layer_norm(
    x: &Tensor,
    shift: &Tensor,
    scale: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    if Kernels::fused_on(x.device()) {
        fused_norm::modulated_layer_norm(x, shift, scale, eps)
    } else {
        let value = modulate(
            &layer_norm(&x.detach(), eps)?,
            &shift.detach(),
            &scale.detach(),
        )?;
        let op = GenericModulatedNorm { eps };
        x.attach_op3_arc(shift, scale, &value, Arc::new(Box::new(op)))
    }
}

/// adaLN's backward from tensor ops (the generic kernels): `x` and `scale` are read, the
/// row statistics and `x̂` recomputed in f32, on detached operands (the gradients hold no
/// graph).
struct GenericModulatedNorm {
    eps: f64,
}

impl CustomOp3 for GenericModulatedNorm {
    fn name(&self) -> &'static str {
        "generic-modulated-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("the generic modulated norm runs as tensor ops")
    }

    fn bwd(
        &self,
        x: &Tensor,
        shift: &Tensor,
        scale: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let f32 = DType::F32;
        let x32 = x.detach().to_dtype(f32)?;
        let mean = x32.mean_keepdim(D::Minus1)?;
        let centred = x32.broadcast_sub(&mean)?;
        drop((x32, mean));
        let inv_std = (centred.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        let normed = centred.broadcast_mul(&inv_std)?;
        drop(centred);
        let g = grad.detach().to_dtype(f32)?;
        let d_shift = g.sum_keepdim(1)?.to_dtype(shift.dtype())?;
        let d_scale = (&g * &normed)?.sum_keepdim(1)?.to_dtype(scale.dtype())?;
        let d_normed = g.broadcast_mul(&(scale.detach().to_dtype(f32)? + 1.0)?)?;
        drop(g);
        let mean_d = d_normed.mean_keepdim(D::Minus1)?;
        let mean_d_normed = (&d_normed * &normed)?.mean_keepdim(D::Minus1)?;
        let dx = d_normed
            .broadcast_sub(&mean_d)?
            .broadcast_sub(&normed.broadcast_mul(&mean_d_normed)?)?
            .broadcast_mul(&inv_std)?
            .to_dtype(x.dtype())?;
        Ok((Some(dx), Some(d_shift), Some(d_scale)))
    }

    fn bwd_reads(&self) -> BackwardReads {
        BackwardReads {
            args: [true, false, true],
            res: false,
        }
    }
}

/// `LayerNorm(elementwise_affine=False)` over the last dimension, computed in f32 for
/// half-precision inputs (as PyTorch's kernels accumulate) and returned in `x`'s dtype.
pub fn layer_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let variance = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let inv_std = (variance + eps)?.sqrt()?.recip()?;
    centred.broadcast_mul(&inv_std)?.to_dtype(dtype)
}

/// adaLN modulation `x·(1 + scale) + shift`, with `scale` and `shift` broadcast over tokens.
pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{grads_of_weighted_sum, max_relative_diff};
    use super::*;
    use crate::random::{randn, rng_for};
    use candle_core::{Device, Var};

    /// The generic kernel's value and gradients against candle's autograd through the
    /// composed form. f32: 1e-5 of each tensor's scale (the same formulas, summed in
    /// another order); bf16: 2⁻⁶ (the composed backward rounds its intermediates to bf16,
    /// 2⁻⁸ each, where this one stays in f32).
    #[test]
    fn generic_norm_matches_the_composed_form() {
        let dev = Device::Cpu;
        for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::BF16, 1.0 / 64.0)] {
            let _generic = Kernels::choose(Some(Kernels::Generic));
            let mut rng = rng_for(5, "generic-norm");
            let mut var = |dims: (usize, usize, usize)| {
                let t = randn(&mut rng, dims, &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                Var::from_tensor(&t).unwrap()
            };
            let (x, shift, scale) = (var((3, 5, 8)), var((3, 1, 8)), var((3, 1, 8)));
            let upstream = randn(&mut rng, (3, 5, 8), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let ours = modulated_layer_norm(&x, &shift, &scale, 1e-6).unwrap();
            let reference = modulate(&layer_norm(&x, 1e-6).unwrap(), &shift, &scale).unwrap();
            assert!(
                max_relative_diff(&ours, &reference) <= tolerance,
                "{dtype:?} value"
            );
            let (ours, reference) = (
                grads_of_weighted_sum(&ours, &upstream),
                grads_of_weighted_sum(&reference, &upstream),
            );
            for (name, t) in [("x", &x), ("shift", &shift), ("scale", &scale)] {
                let e = max_relative_diff(ours.get(t).unwrap(), reference.get(t).unwrap());
                assert!(e <= tolerance, "{dtype:?} d{name}: {e:e}");
            }
        }
    }
}
