//! A fully connected layer, `y = x·Wᵀ + b`, over the last dimension of any-rank input.
//!
//! On the CPU in f32 the bias is added by the matrix product itself: the output is filled
//! with the bias rows and gemm accumulates `x·Wᵀ` into it ([`BiasedProduct`]), where
//! candle's `matmul` then `broadcast_add` write the product and read it back into a second
//! activation-sized tensor. Its backward is candle's matmul rule, `∂x = ∂y·W`,
//! `∂W = ∂yᵀ·x`, and `∂b = Σ_rows ∂y` summed in f64 by row blocks in parallel, each only
//! for a tracked operand; a stored graph keeps `x` when `W` is
//! tracked and `W` when `x` is (as candle's `matmul` with latte-rs's patch 2).
//!
//! A layer may carry a low-rank update ([`LowRank`], LoRA): its output is then the base
//! layer's plus the update's thin products.

use super::low_rank::LowRank;
use super::matrix::{column_sums, matmul_parallel, repeat_rows, Mat};
use super::ops::{cpu, widened, zeroed};
use candle_core::backend::BackendStorage;
use candle_core::backprop::BackwardReads;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape};
use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// What the forward pass of an op must produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// The values (and the graph, if an operand is tracked).
    Values,
    /// The graph only: the result is back-propagated through and never read, so a fused
    /// op whose backward does not read its output returns zeros without computing them
    /// (composed fallbacks still compute).
    GraphOnly,
}

/// `torch.nn.Linear`: weight `(out, in)`, optional bias `(out,)`, and optionally a
/// low-rank update of the weight.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    adapter: Option<LowRank>,
}

impl Linear {
    /// Loads or initialises `{prefix}.weight` and, if `bias`, `{prefix}.bias`, with
    /// PyTorch's default initialisation for fresh weights (uniform in ±1/√in).
    pub fn new(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        let bound = 1.0 / (in_dim as f64).sqrt();
        let init = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
        let bias = if bias {
            Some(vb.get_with_hints(out_dim, "bias", init)?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            adapter: None,
        })
    }

    /// A layer from an existing weight `(out, in)` and bias.
    pub fn from_parts(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            adapter: None,
        }
    }

    /// The layer with `adapter` as its low-rank update (replacing any it had).
    ///
    /// # Errors
    /// When the update's shape does not fit the weight's.
    pub fn set_adapter(&mut self, adapter: LowRank) -> Result<()> {
        let (out, inner) = self.weight.dims2()?;
        if adapter.down().dims()[1] != inner || adapter.out_dim() != out {
            candle_core::bail!(
                "linear ({out}, {inner}): a low-rank update with down {:?} and up {:?} does not \
                 fit (expected (r, {inner}) and ({out}, r))",
                adapter.down().dims(),
                adapter.up().dims()
            );
        }
        self.adapter = Some(adapter);
        Ok(())
    }

    /// The low-rank update, if the layer has one.
    pub fn adapter(&self) -> Option<&LowRank> {
        self.adapter.as_ref()
    }

    /// The weight `(out, in)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias `(out,)`, if the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Applies the layer to the last dimension of `x` (`(…, in) → (…, out)`), as one
    /// matrix product over all leading dimensions.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, Output::Values)
    }

    /// [`Linear::forward`]; with [`Output::GraphOnly`] the biased product's result is zeros
    /// (its backward reads the operands only).
    pub fn forward_with(&self, x: &Tensor, output: Output) -> Result<Tensor> {
        let Some(adapter) = &self.adapter else {
            return self.forward_base(x, output);
        };
        // One `(rows, in)` view (or copy, of a strided `x`) for both products.
        let mut dims = x.dims().to_vec();
        let in_dim = dims.pop().unwrap_or(1);
        let rows = x.reshape((x.elem_count() / in_dim.max(1), in_dim))?;
        let y = (self.forward_base(&rows, output)? + adapter.delta(&rows)?)?;
        dims.push(y.dim(1)?);
        y.reshape(dims)
    }

    /// The base layer alone, `x·Wᵀ + b`, without the low-rank update.
    pub fn forward_base(&self, x: &Tensor, output: Output) -> Result<Tensor> {
        let mut out_dims = x.dims().to_vec();
        let in_dim = out_dims.pop().unwrap_or(1);
        let rows = x.elem_count() / in_dim.max(1);
        let (out_dim, _) = self.weight.dims2()?;
        let x = x.reshape((rows, in_dim))?;
        let fused = super::kernels::Kernels::fused_on(x.device()) && x.dtype() == DType::F32;
        // (…, in) → (rows, in) · (in, out) → (…, out)
        let y = match &self.bias {
            Some(bias) if fused => {
                let op = BiasedProduct {
                    reads_x: self.weight.track_op(),
                    reads_w: x.track_op(),
                    values: output == Output::Values,
                };
                x.contiguous()?
                    .apply_op3(&self.weight.contiguous()?, &bias.contiguous()?, op)?
            }
            Some(bias) => x.matmul(&self.weight.t()?)?.broadcast_add(bias)?,
            None => x.matmul(&self.weight.t()?)?,
        };
        out_dims.push(out_dim);
        y.reshape(out_dims)
    }
}

/// Layers computed side by side on one input (`(…, in) → (…, Σ out)`), as one product
/// with their weights and biases stacked along the output dimension (a copy,
/// differentiable: each layer's parameters get their part of the gradient), plus each
/// layer's low-rank update in its columns.
#[derive(Debug, Clone)]
pub struct StackedLinear {
    base: Linear,
    /// Each layer's output width and update.
    adapters: Vec<(usize, Option<LowRank>)>,
}

impl StackedLinear {
    /// Stacks `layers`.
    ///
    /// # Errors
    /// When some layers have a bias and others none, or their input widths differ.
    pub fn new(layers: &[&Linear]) -> Result<Self> {
        let weights: Vec<&Tensor> = layers.iter().map(|l| &l.weight).collect();
        let biases: Option<Vec<&Tensor>> = layers.iter().map(|l| l.bias.as_ref()).collect();
        if biases.is_none() && layers.iter().any(|l| l.bias.is_some()) {
            candle_core::bail!("linear: stacked layers must all have a bias or none");
        }
        Ok(Self {
            base: Linear::from_parts(
                Tensor::cat(&weights, 0)?,
                biases.map(|b| Tensor::cat(&b, 0)).transpose()?,
            ),
            adapters: layers
                .iter()
                .map(|l| Ok((l.weight.dim(0)?, l.adapter.clone())))
                .collect::<Result<_>>()?,
        })
    }

    /// Every layer's output, concatenated along the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.adapters.iter().all(|(_, a)| a.is_none()) {
            return self.base.forward(x);
        }
        // One `(rows, in)` view for every product.
        let mut dims = x.dims().to_vec();
        let in_dim = dims.pop().unwrap_or(1);
        let rows = x.reshape((x.elem_count() / in_dim.max(1), in_dim))?;
        let y = self.base.forward(&rows)?;
        // The updates side by side, zeros in the columns of layers without one.
        let parts = self
            .adapters
            .iter()
            .map(|(out, adapter)| match adapter {
                Some(adapter) => adapter.delta(&rows),
                None => Tensor::zeros((rows.dim(0)?, *out), x.dtype(), x.device()),
            })
            .collect::<Result<Vec<_>>>()?;
        let y = (y + Tensor::cat(&parts, 1)?)?;
        dims.push(y.dim(1)?);
        y.reshape(dims)
    }
}

/// `b + x·Wᵀ` on `(x, W, b)`: `x` `(rows, in)`, `W` `(out, in)`, `b` `(out,)`, f32. What
/// its backward reads is fixed when the op is built, from which operands are tracked;
/// without `values` the result is zeros (the graph only).
struct BiasedProduct {
    reads_x: bool,
    reads_w: bool,
    values: bool,
}

impl CustomOp3 for BiasedProduct {
    fn name(&self) -> &'static str {
        "biased-product"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, inner) = x_layout.shape().dims2()?;
        let (out, w_inner) = w_layout.shape().dims2()?;
        if w_inner != inner || b_layout.shape().dims() != [out] {
            candle_core::bail!(
                "linear: x {:?}, weight {:?} and bias {:?} do not fit",
                x_layout.shape(),
                w_layout.shape(),
                b_layout.shape()
            );
        }
        if [x.dtype(), w.dtype(), b.dtype()] != [DType::F32; 3] {
            candle_core::bail!("linear: the biased product takes f32 operands");
        }
        let shape = Shape::from((rows, out));
        if !self.values {
            return Ok((CpuStorage::F32(zeroed(rows * out)), shape));
        }
        let (x, w, b) = (
            widened(x, x_layout)?,
            widened(w, w_layout)?,
            widened(b, b_layout)?,
        );
        let mut y = repeat_rows(&b, rows);
        let w_t = Mat::row_major(&w, out, inner).t();
        matmul_parallel(&mut y, Mat::row_major(&x, rows, inner), w_t, true);
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Detached operands: the gradients hold no graph (nothing differentiates them).
        let grad_x = x
            .track_op()
            .then(|| grad_y.matmul(&w.detach()))
            .transpose()?;
        let grad_w = w
            .track_op()
            .then(|| grad_y.t()?.matmul(&x.detach()))
            .transpose()?;
        let grad_b = b.track_op().then(|| bias_gradient(grad_y)).transpose()?;
        Ok((grad_x, grad_w, grad_b))
    }

    /// `x` for `∂W`, `W` for `∂x`; never the bias or the output.
    fn bwd_reads(&self) -> BackwardReads {
        BackwardReads {
            args: [self.reads_x, self.reads_w, false],
            res: false,
        }
    }
}

/// `∂b = Σ_rows ∂y`, summed in f64 by blocks of rows on rayon's threads.
fn bias_gradient(grad_y: &Tensor) -> Result<Tensor> {
    let grad_y = grad_y.contiguous()?;
    let (_, out) = grad_y.dims2()?;
    let sums = {
        let (storage, layout) = grad_y.storage_and_layout();
        column_sums(&widened(cpu(&storage)?, layout)?, out)
    };
    let sums: Vec<f32> = sums.into_iter().map(|s| s as f32).collect();
    Tensor::from_vec(sums, out, grad_y.device())
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{grads_of_weighted_sum, max_abs, max_relative_diff};
    use super::*;
    use candle_core::{Device, Var};

    fn var(len: usize, seed: usize, shape: &[usize]) -> Var {
        let values: Vec<f32> = (0..len)
            .map(|i| (((i * 37 + seed * 11) % 29) as f32 - 14.0) / 9.0)
            .collect();
        Var::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    /// `x` `(n, s, inner)`, `W` `(out, inner)`, `b` `(out,)` and a cotangent `(n, s, out)`.
    fn operands(n: usize, s: usize, inner: usize, out: usize) -> (Var, Var, Var, Tensor) {
        (
            var(n * s * inner, 1, &[n, s, inner]),
            var(out * inner, 2, &[out, inner]),
            var(out, 3, &[out]),
            var(n * s * out, 4, &[n, s, out]).as_tensor().detach(),
        )
    }

    /// The biased product against candle's `matmul` + `broadcast_add`, for every tracked
    /// subset of `x`, `W` and `b`: output, gradients, and which operands get one.
    #[test]
    fn matches_matmul_and_broadcast_add() {
        let (x, w, b, cotangent) = operands(2, 7, 12, 5);
        for mask in 1..8u8 {
            let pick = |bit: u8, v: &Var| {
                if mask & bit != 0 {
                    v.as_tensor().clone()
                } else {
                    v.as_tensor().detach()
                }
            };
            let (x, w, b) = (pick(1, &x), pick(2, &w), pick(4, &b));
            let fused = Linear::from_parts(w.clone(), Some(b.clone()))
                .forward(&x)
                .unwrap();
            let composed = x
                .reshape((14, 12))
                .unwrap()
                .matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&b)
                .unwrap()
                .reshape((2, 7, 5))
                .unwrap();
            assert!(max_relative_diff(&fused, &composed) < 1e-6);
            let (gf, gc) = (
                grads_of_weighted_sum(&fused, &cotangent),
                grads_of_weighted_sum(&composed, &cotangent),
            );
            for (bit, t) in [(1, &x), (2, &w), (4, &b)] {
                match (gf.get(t), gc.get(t)) {
                    (Some(a), Some(c)) => assert!(max_relative_diff(a, c) < 1e-6, "mask {mask}"),
                    (None, None) => assert_eq!(mask & bit, 0, "mask {mask}"),
                    _ => panic!("mask {mask}: one side has a gradient the other lacks"),
                }
            }
        }
    }

    /// The graph only: zeros, and gradients bitwise those of the full product (the
    /// backward never reads the output).
    #[test]
    fn graph_only_gives_zeros_and_the_same_gradients() {
        let (x, w, b, cotangent) = operands(3, 300, 8, 6);
        let linear = Linear::from_parts(w.as_tensor().clone(), Some(b.as_tensor().clone()));
        let run = |output| {
            let y = linear.forward_with(x.as_tensor(), output).unwrap();
            let grads = grads_of_weighted_sum(&y, &cotangent);
            let grad = |v: &Var| grads.get(v.as_tensor()).unwrap().flatten_all().unwrap();
            let grads: Vec<Vec<f32>> = [&x, &w, &b].map(|v| grad(v).to_vec1().unwrap()).to_vec();
            (y, grads)
        };
        let (values, full) = run(Output::Values);
        let (zeros, graph_only) = run(Output::GraphOnly);
        assert!(max_abs(&values) > 0.0);
        assert_eq!(max_abs(&zeros), 0.0);
        assert_eq!(full, graph_only);
    }
}
