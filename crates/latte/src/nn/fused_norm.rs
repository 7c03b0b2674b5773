//! adaLN's normalisation and modulation as one op with its own backward, on the CPU:
//!
//! ```text
//! x̂ = (x − mean(x)) / √(var(x) + ε)        (over the last dimension)
//! y = x̂·(1 + scale) + shift                (scale, shift: one row per sequence)
//! ```
//!
//! The composed formulation keeps the centred and the normalised tensors in f32 for the
//! backward pass (and, when `scale` needs a gradient, the normalised tensor once more in
//! the model's dtype), and makes about ten activation-sized temporaries. Here a stored graph
//! keeps the input `x` and `scale` only — `x` is usually a stage's input, kept anyway — and
//! the backward pass recomputes the row statistics and `x̂` (one pass over `x`):
//!
//! ```text
//! d shift = Σ_tokens dy              d scale = Σ_tokens dy ∘ x̂
//! dx̂ = dy ∘ (1 + scale)              dx = (dx̂ − mean(dx̂) − x̂ ∘ mean(dx̂ ∘ x̂)) / √(var(x) + ε)
//! ```
//!
//! Both passes split every sequence into blocks of [`ROWS_PER_TASK`] rows spread over
//! rayon's threads (a feed-forward half normalises one long sequence per video). The
//! backward pass sums a block's modulation gradients into its own partial row and adds the
//! partial rows of a sequence in block order: deterministic whatever the thread count.
//!
//! The forward pass rounds where the composed formulation does (x̂, 1 + scale, the product
//! and the sum each to the model's dtype), so half precision matches PyTorch's LayerNorm
//! followed by the modulation in that dtype; arithmetic is f32 throughout.

use super::ops::{cpu, narrowed, tensor_from_f32, widened, zeroed};
use super::simd;
use candle_core::backend::BackendStorage;
use candle_core::backprop::BackwardReads;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};
use multiversion::multiversion;
use rayon::prelude::*;

/// `layer_norm(x)·(1 + scale) + shift` for `x`: `(n, s, d)` and `shift`, `scale`:
/// `(n, 1, d)`, on the CPU.
pub fn modulated_layer_norm(
    x: &Tensor,
    shift: &Tensor,
    scale: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &shift.contiguous()?,
        &scale.contiguous()?,
        ModulatedLayerNorm { eps: eps as f32 },
    )
}

/// Rows of one sequence handed to one rayon task.
const ROWS_PER_TASK: usize = 256;

/// Blocks of [`ROWS_PER_TASK`] rows in a sequence of `rows` rows.
pub fn row_blocks(rows: usize) -> usize {
    rows.div_ceil(ROWS_PER_TASK).max(1)
}

/// The op; `eps` is added to the variance.
struct ModulatedLayerNorm {
    eps: f32,
}

/// Sizes of one call: `n` sequences of `s` rows of width `d`.
#[derive(Debug, Clone, Copy)]
struct Dims {
    n: usize,
    s: usize,
    d: usize,
}

impl Dims {
    fn new(x: &Shape, shift: &Shape, scale: &Shape) -> Result<Self> {
        let (n, s, d) = x.dims3()?;
        if shift.dims() != [n, 1, d] || scale.dims() != [n, 1, d] {
            candle_core::bail!(
                "modulated layer norm: x {:?} takes shift and scale of shape [{n}, 1, {d}], \
                 got {:?} and {:?}",
                x.dims(),
                shift.dims(),
                scale.dims()
            );
        }
        Ok(Self { n, s, d })
    }
}

/// Mean and `1 / √(var + eps)` of one row (as `layer_norm` computes them).
#[inline(always)]
fn moments(row: &[f32], eps: f32) -> (f32, f32) {
    let d = row.len() as f32;
    let mean = simd::sum(row, |v| v) / d;
    let variance = simd::sum(row, |v| (v - mean) * (v - mean)) / d;
    (mean, 1.0 / (variance + eps).sqrt())
}

impl CustomOp3 for ModulatedLayerNorm {
    fn name(&self) -> &'static str {
        "modulated-layer-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        shift: &CpuStorage,
        shift_layout: &Layout,
        scale: &CpuStorage,
        scale_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = Dims::new(x_layout.shape(), shift_layout.shape(), scale_layout.shape())?;
        let dtype = x.dtype();
        let (x, shift, scale) = (
            widened(x, x_layout)?,
            widened(shift, shift_layout)?,
            widened(scale, scale_layout)?,
        );
        // Rounding of an f32 value to the model's dtype and back (the identity for f32).
        let out = match dtype {
            DType::F16 => forward(&x, &shift, &scale, dims, self.eps, |v| {
                f16::from_f32(v).to_f32()
            }),
            DType::BF16 => forward(&x, &shift, &scale, dims, self.eps, |v| {
                bf16::from_f32(v).to_f32()
            }),
            _ => forward(&x, &shift, &scale, dims, self.eps, |v| v),
        };
        Ok((narrowed(out, dtype)?, x_layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        shift: &Tensor,
        scale: &Tensor,
        _out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad_out = grad_out.contiguous()?;
        let dims = Dims::new(x.shape(), shift.shape(), scale.shape())?;
        let (x_storage, x_layout) = x.storage_and_layout();
        let (scale_storage, scale_layout) = scale.storage_and_layout();
        let (g_storage, g_layout) = grad_out.storage_and_layout();
        let grads = backward(
            &widened(cpu(&x_storage)?, x_layout)?,
            &widened(cpu(&scale_storage)?, scale_layout)?,
            &widened(cpu(&g_storage)?, g_layout)?,
            dims,
            self.eps,
            Wanted {
                shift: shift.track_op(),
                scale: scale.track_op(),
            },
        );
        let modulation = |values: Option<Vec<f32>>| {
            values
                .map(|v| tensor_from_f32(v, scale.dtype(), scale.shape()))
                .transpose()
        };
        Ok((
            Some(tensor_from_f32(grads.x, x.dtype(), x.shape())?),
            modulation(grads.shift)?,
            modulation(grads.scale)?,
        ))
    }

    /// The backward pass recomputes `x̂` from `x` and reads `scale`; it reads neither
    /// `shift` nor the output.
    fn bwd_reads(&self) -> BackwardReads {
        BackwardReads {
            args: [true, false, true],
            res: false,
        }
    }
}

/// `y` for every row, row blocks in parallel.
fn forward(
    x: &[f32],
    shift: &[f32],
    scale: &[f32],
    dims: Dims,
    eps: f32,
    round: impl Fn(f32) -> f32 + Copy + Sync,
) -> Vec<f32> {
    let Dims { s, d, .. } = dims;
    let mut out = zeroed(x.len());
    out.par_chunks_mut(s * d)
        .zip(x.par_chunks(s * d))
        .zip(shift.par_chunks(d).zip(scale.par_chunks(d)))
        .for_each(|((out, x), (shift, scale))| {
            let one_plus_scale: Vec<f32> = scale.iter().map(|c| round(1.0 + c)).collect();
            out.par_chunks_mut(ROWS_PER_TASK * d)
                .zip(x.par_chunks(ROWS_PER_TASK * d))
                .for_each(|(out, x)| modulate_rows(out, x, &one_plus_scale, shift, eps, round));
        });
    out
}

/// `y` for the rows of one sequence.
#[multiversion(targets = "simd")]
fn modulate_rows(
    out: &mut [f32],
    x: &[f32],
    one_plus_scale: &[f32],
    shift: &[f32],
    eps: f32,
    round: impl Fn(f32) -> f32,
) {
    let d = shift.len();
    for (out, x) in out.chunks_mut(d).zip(x.chunks(d)) {
        let (mean, inv_std) = moments(x, eps);
        for (((y, &x), &a), &b) in out.iter_mut().zip(x).zip(one_plus_scale).zip(shift) {
            let normalised = round((x - mean) * inv_std);
            *y = round(round(normalised * a) + b);
        }
    }
}

/// Which modulation gradients the backward pass computes (constants get none).
#[derive(Debug, Clone, Copy)]
struct Wanted {
    shift: bool,
    scale: bool,
}

/// Gradients of `x` and, when wanted, of `shift` and `scale` (f32, in their shapes).
struct Gradients {
    x: Vec<f32>,
    shift: Option<Vec<f32>>,
    scale: Option<Vec<f32>>,
}

/// `count` rows of `d` values, or `count` empty rows for a gradient not wanted.
fn rows_of(values: &mut [f32], count: usize, d: usize) -> Vec<&mut [f32]> {
    if values.is_empty() {
        (0..count).map(|_| <&mut [f32]>::default()).collect()
    } else {
        values.chunks_mut(d).collect()
    }
}

/// The backward pass, row blocks in parallel. Each block sums its modulation gradients
/// into its own row; with more than one block per sequence those partial rows are added
/// in block order afterwards.
fn backward(
    x: &[f32],
    scale: &[f32],
    grad: &[f32],
    dims: Dims,
    eps: f32,
    wanted: Wanted,
) -> Gradients {
    let Dims { n, s, d } = dims;
    let blocks = row_blocks(s);
    let mut dx = zeroed(x.len());
    let sums_len = |wanted: bool| if wanted { n * blocks * d } else { 0 };
    let mut shift_sums = vec![0f32; sums_len(wanted.shift)];
    let mut scale_sums = vec![0f32; sums_len(wanted.scale)];
    let mut shift_rows = rows_of(&mut shift_sums, n * blocks, d);
    let mut scale_rows = rows_of(&mut scale_sums, n * blocks, d);
    dx.par_chunks_mut(s * d)
        .zip(x.par_chunks(s * d))
        .zip(grad.par_chunks(s * d))
        .zip(scale.par_chunks(d))
        .zip(
            shift_rows
                .par_chunks_mut(blocks)
                .zip(scale_rows.par_chunks_mut(blocks)),
        )
        .for_each(|((((dx, x), grad), scale), (shift_rows, scale_rows))| {
            let rows = ROWS_PER_TASK * d;
            dx.par_chunks_mut(rows)
                .zip(x.par_chunks(rows))
                .zip(grad.par_chunks(rows))
                .zip(shift_rows.par_iter_mut().zip(scale_rows.par_iter_mut()))
                .for_each(|(((dx, x), grad), (d_shift, d_scale))| {
                    backward_rows(dx, x, grad, scale, d_shift, d_scale, eps)
                });
        });
    let per_sequence = |sums: Vec<f32>| sum_blocks(sums, blocks, d);
    Gradients {
        x: dx,
        shift: wanted.shift.then(|| per_sequence(shift_sums)),
        scale: wanted.scale.then(|| per_sequence(scale_sums)),
    }
}

/// Rows of `d` values, `blocks` per sequence, added up per sequence in block order.
fn sum_blocks(sums: Vec<f32>, blocks: usize, d: usize) -> Vec<f32> {
    if blocks == 1 {
        return sums;
    }
    sums.chunks(blocks * d)
        .flat_map(|sequence| {
            let mut total = sequence[..d].to_vec();
            for block in sequence.chunks(d).skip(1) {
                total.iter_mut().zip(block).for_each(|(t, v)| *t += v);
            }
            total
        })
        .collect()
}

/// The backward pass over a block of rows of one sequence: `dx`, and the sums over its
/// tokens of the modulation gradients (`d_shift`, `d_scale`: empty when not wanted).
#[multiversion(targets = "simd")]
fn backward_rows(
    dx: &mut [f32],
    x: &[f32],
    grad: &[f32],
    scale: &[f32],
    d_shift: &mut [f32],
    d_scale: &mut [f32],
    eps: f32,
) {
    let d = scale.len();
    let (mut normalised, mut grad_normalised) = (vec![0f32; d], vec![0f32; d]);
    for ((dx, x), grad) in dx.chunks_mut(d).zip(x.chunks(d)).zip(grad.chunks(d)) {
        let (mean, inv_std) = moments(x, eps);
        for (xn, &x) in normalised.iter_mut().zip(x) {
            *xn = (x - mean) * inv_std;
        }
        for ((dxn, &g), &c) in grad_normalised.iter_mut().zip(grad).zip(scale) {
            *dxn = g * (1.0 + c);
        }
        let mean_dxn = simd::sum(&grad_normalised, |g| g) / d as f32;
        let mean_dxn_xn = simd::sum_pairs(&grad_normalised, &normalised, |g, xn| g * xn) / d as f32;
        for ((dx, &dxn), &xn) in dx.iter_mut().zip(&grad_normalised).zip(&normalised) {
            *dx = inv_std * (dxn - mean_dxn - xn * mean_dxn_xn);
        }
        for (acc, &g) in d_shift.iter_mut().zip(grad) {
            *acc += g;
        }
        for ((acc, &g), &xn) in d_scale.iter_mut().zip(grad).zip(&normalised) {
            *acc += g * xn;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{grads_of_weighted_sum, max_abs, max_relative_diff};
    use super::*;
    use crate::nn::norm::{layer_norm, modulate};
    use candle_core::{Device, Var};

    fn values(n: usize, seed: u64) -> Vec<f32> {
        (0..n as u64)
            .map(|i| ((i * 2654435761 + seed * 97) % 1000) as f32 / 250.0 - 2.0)
            .collect()
    }

    fn var(dims: (usize, usize, usize), seed: u64) -> Var {
        Var::from_vec(values(dims.0 * dims.1 * dims.2, seed), dims, &Device::Cpu).unwrap()
    }

    /// `(n, 1, d)` shift and scale as the model takes them: strided views into a
    /// `(n, 3, d)` modulation.
    fn modulation(n: usize, d: usize) -> (Var, Tensor, Tensor) {
        let table = var((n, 3, d), 7);
        let shift = table.narrow(1, 0, 1).unwrap();
        let scale = table.narrow(1, 1, 1).unwrap();
        (table, shift, scale)
    }

    /// Output and the gradients of `x` and of the modulation against the composed ops
    /// (`layer_norm` then `modulate`), for spatial-like (few sequences, many tokens),
    /// temporal-like (many short sequences) and feed-forward-like (sequences of several
    /// row blocks, the last one partial) shapes. Both sides compute in f32 with different
    /// summation orders: agreement to a few f32 ulps of the largest value (1e-5).
    #[test]
    fn matches_the_composed_norm_and_modulation_and_their_gradients() {
        let long = 2 * ROWS_PER_TASK + 7;
        for (n, s, d) in [(2, 9, 16), (12, 3, 8), (1, 1, 5), (2, long, 8)] {
            let x = var((n, s, d), 1);
            let (table, shift, scale) = modulation(n, d);
            let weights = var((n, s, d), 4);
            let eps = 1e-6;
            let fused = modulated_layer_norm(&x, &shift, &scale, eps).unwrap();
            let composed = modulate(&layer_norm(&x, eps).unwrap(), &shift, &scale).unwrap();
            assert!(max_relative_diff(&fused, &composed) < 1e-5);
            let fused_grads = grads_of_weighted_sum(&fused, &weights);
            let composed_grads = grads_of_weighted_sum(&composed, &weights);
            for (name, t) in [("x", x.as_tensor()), ("modulation", table.as_tensor())] {
                let (a, b) = (fused_grads.get(t).unwrap(), composed_grads.get(t).unwrap());
                let diff = max_relative_diff(a, b);
                assert!(diff < 1e-5, "({n}, {s}, {d}) d{name}: {diff}");
            }
        }
    }

    /// In bf16 the output rounds where the composed ops do: equal to them up to one bf16
    /// step of the largest value (the f32 statistics may differ in their last bit).
    #[test]
    fn half_precision_rounds_like_the_composed_ops() {
        let x = var((3, 5, 16), 1).to_dtype(DType::BF16).unwrap();
        let table = var((3, 3, 16), 7).to_dtype(DType::BF16).unwrap();
        let (shift, scale) = (
            table.narrow(1, 0, 1).unwrap(),
            table.narrow(1, 1, 1).unwrap(),
        );
        let fused = modulated_layer_norm(&x, &shift, &scale, 1e-6).unwrap();
        let composed = modulate(&layer_norm(&x, 1e-6).unwrap(), &shift, &scale).unwrap();
        assert_eq!(fused.dtype(), DType::BF16);
        assert!(max_relative_diff(&fused, &composed) <= 1.0 / 128.0);
    }

    /// Constant modulation (frozen weights in guidance) gets no gradient, and `x`'s is
    /// unchanged by it.
    #[test]
    fn constant_modulation_gets_no_gradient() {
        let x = var((2, 4, 8), 1);
        let (table, shift, scale) = modulation(2, 8);
        let (shift, scale) = (shift.detach(), scale.detach());
        let out = modulated_layer_norm(&x, &shift, &scale, 1e-6).unwrap();
        let grads = out.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(table.as_tensor()).is_none());
        assert!(grads.get(&shift).is_none() && grads.get(&scale).is_none());
        let dx = grads.get(x.as_tensor()).unwrap();
        assert!(max_abs(dx) > 0.0);
    }

    #[test]
    fn mismatched_modulation_is_an_error_naming_the_shapes() {
        let x = var((2, 4, 8), 1);
        let (_, shift, _) = modulation(2, 8);
        let wrong = var((2, 1, 7), 3);
        let err = modulated_layer_norm(&x, &shift, &wrong, 1e-6).unwrap_err();
        assert!(err.to_string().contains("[2, 1, 8]"), "{err}");
    }
}
