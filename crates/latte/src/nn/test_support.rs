//! Helpers shared by the fused kernels' unit tests.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};

/// The gradients of `Σ y ⊙ weights`: back-propagation from `y` with `weights` as its
/// cotangent.
pub(super) fn grads_of_weighted_sum(y: &Tensor, weights: &Tensor) -> GradStore {
    (y * weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap()
}

/// `max |a − b| / max |b|` in f32: the largest difference relative to the reference's
/// scale.
pub(super) fn max_relative_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap();
    let b = &b.to_dtype(DType::F32).unwrap();
    max_abs(&(a - b).unwrap()) / max_abs(b).max(1e-30)
}

/// `max |t|` in f32.
pub(super) fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
