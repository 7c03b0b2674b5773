//! The MLP's second half, `y = GELU(h)·Wᵀ + b`, as one CPU op with its own backward.
//!
//! Composed, the GELU output `g` (4·d per token, the MLP's widest tensor) is stored for
//! `∂W = ∂yᵀ·g`, and the backward holds `∂g` and `∂h` (4·d each) at once. Here `g` exists
//! only one block of rows at a time, in both passes:
//!
//! ```text
//! forward, per row block r:    g_r = GELU(h_r)          y_r = b + g_r·Wᵀ
//! backward, per row block r:   ∂h_r = (∂y_r·W) ∘ GELU'(h_r)
//!                              ∂W += ∂y_rᵀ·GELU(h_r)    (recomputed; only if W is tracked)
//!                              ∂b = Σ_rows ∂y            (only if b is tracked)
//! ```
//!
//! A stored graph keeps `h` (and the weight): [`CustomOp3::bwd_reads`]. The extra work is
//! one GELU per element in the backward of training. Blocks are processed in a fixed
//! order, so results are deterministic; they differ from the composed ops in rounding
//! only (the sum over rows of `∂W` is split by block).
//!
//! f32 on the CPU; [`gelu_linear`] composes [`gelu_tanh`] and [`Linear`] elsewhere.

use super::linear::Linear;
use super::matrix::{matmul_parallel, Mat};
use super::ops::{
    cpu, gelu_into, gelu_tanh, multiply_by_gelu_derivative, tensor_from_f32, widened,
};
use candle_core::backend::BackendStorage;
use candle_core::backprop::BackwardReads;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// Bytes of f32 GELU output a row block holds (the op's scratch).
pub const BLOCK_BYTES: usize = 8 << 20;

/// `linear(GELU(h))` over the last dimension of `h`.
pub fn gelu_linear(h: &Tensor, linear: &Linear) -> Result<Tensor> {
    let fused = h.device().is_cpu() && h.dtype() == DType::F32;
    match linear.bias() {
        Some(bias) if fused => {
            let mut dims = h.dims().to_vec();
            let inner = dims.pop().unwrap_or(1);
            let rows = h.elem_count() / inner.max(1);
            let y = h.reshape((rows, inner))?.contiguous()?.apply_op3(
                &linear.weight().contiguous()?,
                &bias.contiguous()?,
                GeluLinear,
            )?;
            dims.push(linear.weight().dim(0)?);
            y.reshape(dims)
        }
        _ => linear.forward(&gelu_tanh(h)?),
    }
}

/// Rows of `h` per block: [`BLOCK_BYTES`] of f32 GELU output, at least 16.
pub fn block_rows(inner: usize) -> usize {
    (BLOCK_BYTES / (4 * inner.max(1))).max(16)
}

/// Sizes of one call: `h` is `rows × inner`, `W` is `out × inner`.
#[derive(Debug, Clone, Copy)]
struct Dims {
    rows: usize,
    inner: usize,
    out: usize,
}

impl Dims {
    fn new(h: &Shape, w: &Shape, b: &Shape) -> Result<Self> {
        let (rows, inner) = h.dims2()?;
        let (out, w_inner) = w.dims2()?;
        if w_inner != inner || b.dims() != [out] {
            candle_core::bail!(
                "gelu-linear: h {h:?}, weight {w:?} and bias {b:?} do not fit \
                 (expected (rows, in), (out, in) and (out,))"
            );
        }
        Ok(Self { rows, inner, out })
    }

    /// `(first row, rows)` of each block.
    fn blocks(&self) -> impl Iterator<Item = (usize, usize)> {
        let (rows, step) = (self.rows, block_rows(self.inner));
        (0..rows)
            .step_by(step)
            .map(move |start| (start, step.min(rows - start)))
    }
}

/// The op on `(h, W, b)`.
struct GeluLinear;

fn f32_only(storages: [&CpuStorage; 3]) -> Result<()> {
    if let Some(other) = storages.iter().find(|s| s.dtype() != DType::F32) {
        candle_core::bail!("gelu-linear: f32 only, got {:?}", other.dtype());
    }
    Ok(())
}

impl CustomOp3 for GeluLinear {
    fn name(&self) -> &'static str {
        "gelu-linear"
    }

    fn cpu_fwd(
        &self,
        h: &CpuStorage,
        h_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        f32_only([h, w, b])?;
        let dims = Dims::new(h_layout.shape(), w_layout.shape(), b_layout.shape())?;
        let (h, w, b) = (
            widened(h, h_layout)?,
            widened(w, w_layout)?,
            widened(b, b_layout)?,
        );
        let Dims { rows, inner, out } = dims;
        let mut y = Vec::with_capacity(rows * out);
        for _ in 0..rows {
            y.extend_from_slice(&b);
        }
        let mut g = vec![0f32; block_rows(inner).min(rows) * inner];
        let w_t = Mat::row_major(&w, out, inner).t();
        for (start, len) in dims.blocks() {
            let g = &mut g[..len * inner];
            gelu_into(g, &h[start * inner..(start + len) * inner]);
            let y = &mut y[start * out..(start + len) * out];
            matmul_parallel(y, Mat::row_major(&*g, len, inner), w_t, true);
        }
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad_y = grad_y.contiguous()?;
        let dims = Dims::new(h.shape(), w.shape(), b.shape())?;
        let grad_b = if b.track_op() {
            Some(grad_y.sum(0)?)
        } else {
            None
        };
        let (h_storage, h_layout) = h.storage_and_layout();
        let (w_storage, w_layout) = w.storage_and_layout();
        let (g_storage, g_layout) = grad_y.storage_and_layout();
        let (h, w_values, grad_y) = (
            widened(cpu(&h_storage)?, h_layout)?,
            widened(cpu(&w_storage)?, w_layout)?,
            widened(cpu(&g_storage)?, g_layout)?,
        );
        let Dims { rows, inner, out } = dims;
        let want_w = w.track_op();
        let mut grad_h = vec![0f32; rows * inner];
        let mut grad_w = if want_w {
            vec![0f32; out * inner]
        } else {
            Vec::new()
        };
        let mut g = if want_w {
            vec![0f32; block_rows(inner).min(rows) * inner]
        } else {
            Vec::new()
        };
        let weight = Mat::row_major(&w_values, out, inner);
        for (i, (start, len)) in dims.blocks().enumerate() {
            let h = &h[start * inner..(start + len) * inner];
            let grad_y = Mat::row_major(&grad_y[start * out..(start + len) * out], len, out);
            let grad_h = &mut grad_h[start * inner..(start + len) * inner];
            matmul_parallel(grad_h, grad_y, weight, false);
            multiply_by_gelu_derivative(grad_h, h);
            if want_w {
                let g = &mut g[..len * inner];
                gelu_into(g, h);
                let g = Mat::row_major(&*g, len, inner);
                matmul_parallel(&mut grad_w, grad_y.t(), g, i > 0);
            }
        }
        drop(g);
        let grad_w = want_w
            .then(|| tensor_from_f32(grad_w, DType::F32, w.shape()))
            .transpose()?;
        Ok((
            Some(tensor_from_f32(grad_h, DType::F32, h_layout.shape())?),
            grad_w,
            grad_b,
        ))
    }

    /// The backward pass recomputes `GELU(h)` and reads `W`; not `b`, not the output.
    fn bwd_reads(&self) -> BackwardReads {
        BackwardReads {
            args: [true, true, false],
            res: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::max_relative_diff;
    use super::*;
    use candle_core::{Device, Var};

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 37 + seed * 11) % 29) as f32 - 14.0) / 9.0)
            .collect()
    }

    /// Output and every gradient against the composed ops, with more rows than one block
    /// (the `∂W` sum crosses blocks) and a ragged last block.
    #[test]
    fn matches_the_composed_gelu_and_linear() {
        let (inner, out) = (BLOCK_BYTES / 4 / 40, 24);
        let rows = 2 * block_rows(inner) + 5;
        let dev = &Device::Cpu;
        let h = Var::from_vec(values(rows * inner, 1), (rows, inner), dev).unwrap();
        let w = Var::from_vec(values(out * inner, 2), (out, inner), dev).unwrap();
        let b = Var::from_vec(values(out, 3), out, dev).unwrap();
        let cotangent = Tensor::from_vec(values(rows * out, 4), (rows, out), dev).unwrap();
        let linear = Linear::from_parts(w.as_tensor().clone(), Some(b.as_tensor().clone()));
        let fused = gelu_linear(h.as_tensor(), &linear).unwrap();
        let composed = linear.forward(&gelu_tanh(h.as_tensor()).unwrap()).unwrap();
        // f32 sums of `inner` products in another order: ~1e-6 relative.
        assert!(max_relative_diff(&fused, &composed) < 1e-5);
        let grads = |y: Tensor| {
            (y * &cotangent)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        };
        let (gf, gc) = (grads(fused), grads(composed));
        for (name, var) in [("h", &h), ("W", &w), ("b", &b)] {
            let (a, c) = (gf.get(var).unwrap(), gc.get(var).unwrap());
            let diff = max_relative_diff(a, c);
            assert!(diff < 1e-5, "∂{name}: {diff}");
        }
    }

    /// Guidance: frozen weights get no gradient; the input's is unchanged.
    #[test]
    fn constant_weights_get_no_gradient() {
        let (rows, inner, out) = (20, 12, 5);
        let dev = &Device::Cpu;
        let h = Var::from_vec(values(rows * inner, 1), (rows, inner), dev).unwrap();
        let w = Tensor::from_vec(values(out * inner, 2), (out, inner), dev).unwrap();
        let b = Tensor::from_vec(values(out, 3), out, dev).unwrap();
        let linear = Linear::from_parts(w.clone(), Some(b.clone()));
        let y = gelu_linear(h.as_tensor(), &linear).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&w).is_none() && grads.get(&b).is_none());
        let composed = linear.forward(&gelu_tanh(h.as_tensor()).unwrap()).unwrap();
        let expected = composed.sum_all().unwrap().backward().unwrap();
        let diff = max_relative_diff(grads.get(&h).unwrap(), expected.get(&h).unwrap());
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn mismatched_shapes_are_an_error() {
        let dev = &Device::Cpu;
        let h = Tensor::zeros((4, 6), DType::F32, dev).unwrap();
        let w = Tensor::zeros((3, 5), DType::F32, dev).unwrap();
        let b = Tensor::zeros(3, DType::F32, dev).unwrap();
        let error = h.apply_op3(&w, &b, GeluLinear).unwrap_err().to_string();
        assert!(error.contains("do not fit"), "{error}");
    }
}
