//! The gated linear layer `y = gate ⊙ (b + act(h)·Wᵀ)` from tensor ops, on any device (the
//! generic kernels; see [`super::gated_linear`] for the fused CPU op and the math). Its
//! graph keeps `h`, `W` and `[b; gates]` only: neither the activation's output (4·d wide
//! in the MLP) nor the product, which the backward recomputes:
//!
//! ```text
//! g = act(h)     f = b + g·Wᵀ     ∂gate_i = Σ_rows ∂y ∘ f     ∂f = ∂y ∘ gate
//! ∂b = Σ ∂f      ∂W = ∂fᵀ·g       ∂h = (∂f·W) ∘ act'(h)
//! ```
//!
//! Without values ([`Output::GraphOnly`]) the forward skips the product, as the fused op
//! does: the backward never reads the result. The backward runs over chunks of rows
//! ([`chunk_rows`]), so its activation-wide temporaries stay chunk-sized.

use super::gated_linear::Activation;
use super::linear::Output;
use candle_core::backprop::BackwardReads;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use std::f64::consts::PI;
use std::sync::Arc;

/// The tanh-GELU's cubic coefficient.
const GELU_CUBIC: f64 = 0.044_715;

/// Activation-width elements one chunk of the backward holds (64 MiB in f32): the bound of
/// its transients.
pub const CHUNK_ELEMENTS: usize = 1 << 24;

/// Rows per chunk of the backward for an activation `inner` wide.
pub fn chunk_rows(inner: usize) -> usize {
    (CHUNK_ELEMENTS / inner.max(1)).max(1)
}

/// `gate ⊙ (b + act(h)·Wᵀ)` for `h` `(n, s, inner)`, `w` `(out, inner)` and
/// `bias_and_gates` `(1 + n, out)` (the bias row, then one gate row per sequence).
pub fn gated_linear(
    h: &Tensor,
    w: &Tensor,
    bias_and_gates: &Tensor,
    activation: Activation,
    output: Output,
) -> Result<Tensor> {
    let rows = chunk_rows(h.dim(2)?);
    gated_linear_in_chunks(h, w, bias_and_gates, activation, output, rows)
}

/// [`gated_linear`] whose backward runs over chunks of `rows` rows.
fn gated_linear_in_chunks(
    h: &Tensor,
    w: &Tensor,
    bias_and_gates: &Tensor,
    activation: Activation,
    output: Output,
    rows: usize,
) -> Result<Tensor> {
    let (n, s, _) = h.dims3()?;
    let out = w.dim(0)?;
    let value = match output {
        Output::Values => {
            let (bias, gates) = bias_and_gates_parts(&bias_and_gates.detach(), n)?;
            product(&h.detach(), &w.detach(), &bias, activation)?.broadcast_mul(&gates)?
        }
        Output::GraphOnly => Tensor::zeros((n, s, out), h.dtype(), h.device())?,
    };
    let op = GenericGatedLinear {
        activation,
        wants_weights: w.track_op() || bias_and_gates.track_op(),
        chunk_rows: rows.max(1),
    };
    h.attach_op3_arc(w, bias_and_gates, &value, Arc::new(Box::new(op)))
}

/// The bias `(1, 1, out)` and the gates `(n, 1, out)`.
fn bias_and_gates_parts(bias_and_gates: &Tensor, n: usize) -> Result<(Tensor, Tensor)> {
    Ok((
        bias_and_gates.narrow(0, 0, 1)?.unsqueeze(0)?,
        bias_and_gates.narrow(0, 1, n)?.unsqueeze(1)?,
    ))
}

/// `b + act(h)·Wᵀ`, `(n, s, out)`.
fn product(h: &Tensor, w: &Tensor, bias: &Tensor, activation: Activation) -> Result<Tensor> {
    let (n, s, inner) = h.dims3()?;
    let activated = activate(h, activation)?.reshape((n * s, inner))?;
    activated
        .matmul(&w.t()?)?
        .reshape((n, s, ()))?
        .broadcast_add(bias)
}

fn activate(h: &Tensor, activation: Activation) -> Result<Tensor> {
    match activation {
        Activation::Identity => Ok(h.clone()),
        Activation::GeluTanh => h.gelu(),
    }
}

/// The tanh-GELU's derivative in f32:
/// `½(1 + t) + ½·x·(1 − t²)·√(2/π)·(1 + 3·0.044715·x²)` with `t = tanh(√(2/π)(x + 0.044715·x³))`.
fn gelu_derivative(x: &Tensor) -> Result<Tensor> {
    let c = (2.0 / PI).sqrt();
    let x = x.to_dtype(DType::F32)?;
    let x2 = x.sqr()?;
    let t = (&x * ((&x2 * GELU_CUBIC)? + 1.0)?)?
        .affine(c, 0.0)?
        .tanh()?;
    let slope = ((&x2 * (3.0 * GELU_CUBIC))? + 1.0)?.affine(c, 0.0)?;
    drop(x2);
    let one_minus_t2 = t.sqr()?.affine(-1.0, 1.0)?;
    let half_x = x.affine(0.5, 0.0)?;
    let tail = ((half_x * one_minus_t2)? * slope)?;
    t.affine(0.5, 0.5)? + tail
}

/// The backward rule (what the graph keeps: `h`, `W`, `[b; gates]`).
struct GenericGatedLinear {
    activation: Activation,
    /// Whether `W` or `[b; gates]` take gradients (fixed when the op is built): without,
    /// the backward neither recomputes the product nor forms `∂W`, `∂b`, `∂gate`.
    wants_weights: bool,
    /// Rows per chunk of the backward.
    chunk_rows: usize,
}

impl CustomOp3 for GenericGatedLinear {
    fn name(&self) -> &'static str {
        "generic-gated-linear"
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
        candle_core::bail!("the generic gated linear layer runs as tensor ops")
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        bias_and_gates: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // On detached operands: the gradients hold no graph.
        let (h, w) = (&h.detach(), &w.detach());
        let (n, s, inner) = h.dims3()?;
        let out = w.dim(0)?;
        let (bias, gates) = bias_and_gates_parts(&bias_and_gates.detach(), n)?;
        let grad = grad.detach();
        let rows = n * s;
        let h_rows = h.reshape((rows, inner))?;
        let grad_f = grad.broadcast_mul(&gates)?.reshape((rows, out))?;
        let grad_weights = if self.wants_weights {
            // Per chunk of rows: the activation and the product recomputed, ∂y ∘ f for the
            // gates' gradient, ∂W accumulated in f32.
            let bias_row = bias.reshape((1, out))?;
            let grad_rows = grad.reshape((rows, out))?;
            let grad_f_times_f = Tensor::zeros((rows, out), grad.dtype(), grad.device())?;
            let mut grad_w: Option<Tensor> = None;
            for start in (0..rows).step_by(self.chunk_rows) {
                let len = self.chunk_rows.min(rows - start);
                let activated = activate(&h_rows.narrow(0, start, len)?, self.activation)?;
                let f = activated.matmul(&w.t()?)?.broadcast_add(&bias_row)?;
                grad_f_times_f.slice_set(&(grad_rows.narrow(0, start, len)? * f)?, 0, start)?;
                let term = grad_f.narrow(0, start, len)?.t()?.matmul(&activated)?;
                let term = term.to_dtype(DType::F32)?;
                grad_w = Some(match grad_w {
                    Some(sum) => (sum + term)?,
                    None => term,
                });
            }
            let grad_gates = grad_f_times_f.reshape((n, s, out))?.sum_keepdim(1)?;
            drop(grad_f_times_f);
            let grad_bias = grad_f.sum_keepdim(0)?;
            let grad_bias_and_gates = Tensor::cat(&[grad_bias, grad_gates.reshape((n, out))?], 0)?;
            let grad_w = match grad_w {
                Some(g) => g.to_dtype(w.dtype())?,
                None => Tensor::zeros(w.shape(), w.dtype(), w.device())?,
            };
            Some((grad_w, grad_bias_and_gates))
        } else {
            None
        };
        drop(grad);
        let grad_activated = grad_f.matmul(w)?;
        drop(grad_f);
        let grad_h = match self.activation {
            Activation::Identity => grad_activated.reshape((n, s, inner))?,
            Activation::GeluTanh => {
                // Per chunk of rows: the derivative's f32 temporaries stay chunk-sized.
                let grad_h = Tensor::zeros((rows, inner), h.dtype(), h.device())?;
                for start in (0..rows).step_by(self.chunk_rows) {
                    let len = self.chunk_rows.min(rows - start);
                    let derivative = gelu_derivative(&h_rows.narrow(0, start, len)?)?;
                    let piece = grad_activated.narrow(0, start, len)?.to_dtype(DType::F32)?;
                    grad_h.slice_set(&(piece * derivative)?.to_dtype(h.dtype())?, 0, start)?;
                }
                grad_h.reshape((n, s, inner))?
            }
        };
        let (grad_w, grad_bias_and_gates) = grad_weights.unzip();
        Ok((Some(grad_h), grad_w, grad_bias_and_gates))
    }

    fn bwd_reads(&self) -> BackwardReads {
        BackwardReads {
            args: [true, true, true],
            res: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{grads_of_weighted_sum, max_relative_diff};
    use super::*;
    use crate::random::{randn, rng_for};
    use candle_core::{Device, Var};

    /// Value and gradients against candle's autograd through the composed form, with and
    /// without GELU, with values and graph-only. f32: 1e-5 of each tensor's scale (the same
    /// products; GELU's derivative written out); bf16: 2⁻⁶ (bf16 roundings of the
    /// intermediates, 2⁻⁸ each, in a different order).
    #[test]
    fn matches_the_composed_form() {
        let dev = Device::Cpu;
        for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::BF16, 1.0 / 64.0)] {
            for activation in [Activation::Identity, Activation::GeluTanh] {
                let mut rng = rng_for(7, "generic-gated-linear");
                let mut var = |dims: &[usize]| {
                    let t = randn(&mut rng, dims, &dev)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap();
                    Var::from_tensor(&t).unwrap()
                };
                let (n, s, inner, out) = (3, 5, 8, 6);
                let (h, w, bg) = (var(&[n, s, inner]), var(&[out, inner]), var(&[1 + n, out]));
                let upstream = randn(&mut rng, (n, s, out), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let (bias, gates) = bias_and_gates_parts(&bg, n).unwrap();
                let reference = product(&h, &w, &bias, activation)
                    .unwrap()
                    .broadcast_mul(&gates)
                    .unwrap();
                let error = |a: &Tensor, b: &Tensor| max_relative_diff(a, b);
                let loss = |t: &Tensor| grads_of_weighted_sum(t, &upstream);
                let expected = loss(&reference);
                for (output, rows) in [
                    (Output::Values, 4),
                    (Output::GraphOnly, 15),
                    (Output::Values, 1),
                ] {
                    let ours =
                        gated_linear_in_chunks(&h, &w, &bg, activation, output, rows).unwrap();
                    let label = format!("{dtype:?} {activation:?} {output:?} rows {rows}");
                    if output == Output::Values {
                        assert!(error(&ours, &reference) <= tolerance, "{label}: value");
                    }
                    let grads = loss(&ours);
                    for (name, t) in [("h", &h), ("w", &w), ("bias and gates", &bg)] {
                        let e = error(grads.get(t).unwrap(), expected.get(t).unwrap());
                        assert!(e <= tolerance, "{label}: d{name} {e:e}");
                    }
                    // Frozen weights (guidance): only ∂h, the same.
                    let (w_frozen, bg_frozen) = (w.as_tensor().detach(), bg.as_tensor().detach());
                    let frozen =
                        gated_linear_in_chunks(&h, &w_frozen, &bg_frozen, activation, output, rows);
                    let grads = loss(&frozen.unwrap());
                    assert!(grads.get(&w_frozen).is_none() && grads.get(&bg_frozen).is_none());
                    let e = error(grads.get(&h).unwrap(), expected.get(&h).unwrap());
                    assert!(e <= tolerance, "{label} frozen: dh {e:e}");
                }
            }
        }
    }
}
