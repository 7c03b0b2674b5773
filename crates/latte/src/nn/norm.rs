//! Layer normalisation without affine parameters, and the adaLN modulation that replaces
//! them in Latte: one fused op with its own backward with the fused kernels
//! ([`super::fused_norm`]), differentiable primitives with the generic ones (candle's
//! fused `layer_norm` records no backward).

use super::fused_norm;
use super::kernels::Kernels;
use candle_core::{DType, Result, Tensor, D};

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
        modulate(&layer_norm(x, eps)?, shift, scale)
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
