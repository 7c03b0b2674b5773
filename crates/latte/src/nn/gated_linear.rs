//! A gated linear layer, `y = gate ⊙ (b + act(h)·Wᵀ)`, as one CPU op with its own backward:
//! the MLP's second half (`act` = GELU) and an attention's output projection (`act` = the
//! identity), each followed by adaLN's gate. `h` holds `n` sequences of `s` rows; `gate`
//! has one row per sequence (one per video).
//!
//! Composed, the activation's output `g` (4·d per token in the MLP, its widest tensor) is
//! stored for `∂W = ∂fᵀ·g`, the product `f = b + g·Wᵀ` is stored for the gate's gradient,
//! and the backward holds `∂g` and `∂h` at once. Here `g` exists only one block of rows at
//! a time, in both passes, and `f` is never stored:
//!
//! ```text
//! forward, per row block r of sequence i:   g_r = act(h_r)     y_r = gate_i ⊙ (b + g_r·Wᵀ)
//! backward, per sequence i:                 Wᵢ = diag(gate_i)·W
//!   per row block r:   ∂h_r = (∂y_r·Wᵢ) ∘ act'(h_r)
//!                      Mᵢ += ∂y_rᵀ·act(h_r)           (recomputed; only if W or the gate is tracked)
//!   then               ∂W += diag(gate_i)·Mᵢ           ∂b += gate_i ⊙ Σ_rows ∂y
//!                      ∂gate_i = rowsum(W ∘ Mᵢ) + b ⊙ Σ_rows ∂y
//! ```
//!
//! `∂gate_i = Σ_rows ∂y ∘ f` is read off `Mᵢ` (`Σ_r ∂y_r[c]·(g_r·Wᵀ)[c] = Σ_k W[c,k]·Mᵢ[c,k]`),
//! so the backward reads `h`, `W`, `b` and the gates, never the output. That lets the op
//! run **without values** ([`Output::GraphOnly`]): when the caller back-propagates through
//! the result at once and never reads it (a checkpointed stage recomputed right before
//! its own backward), the forward skips the product and returns zeros; the gradients are
//! those of the full op. Without an activation a block is a whole sequence (there is no
//! activation output to hold).
//!
//! Blocks are processed in a fixed order, so results are deterministic; they differ from
//! the composed ops in rounding only (sums over rows split by block, `∂h` through the
//! scaled weight). f32 with the fused kernels; with the generic ones the same graph from
//! tensor ops ([`super::generic_gated_linear`]); otherwise (the fused kernels in half
//! precision) [`gated_linear`] composes the activation, [`Linear`] and the gate.

use super::linear::{Linear, Output};
use super::matrix::{column_sums, matmul_parallel, repeat_rows, Mat};
use super::ops::{
    cpu, gelu_into, gelu_tanh, multiply_by_gelu_derivative, tensor_from_f32, widened, zeroed,
};
use candle_core::backend::BackendStorage;
use candle_core::backprop::BackwardReads;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::borrow::Cow;

/// Output rows gated by one rayon task.
const ROWS_PER_TASK: usize = 64;

/// Bytes of f32 activation output a row block holds (the op's scratch).
pub const BLOCK_BYTES: usize = 8 << 20;

/// What is applied to `h` before the product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Nothing: `y = gate ⊙ (b + h·Wᵀ)`.
    Identity,
    /// PyTorch's `gelu(approximate="tanh")`.
    GeluTanh,
}

impl Activation {
    /// Rows of `h` per block in a sequence of `sequence_rows` rows: for GELU,
    /// [`BLOCK_BYTES`] of f32 output (at least 16 rows); without an activation the whole
    /// sequence.
    pub fn block_rows(self, inner: usize, sequence_rows: usize) -> usize {
        match self {
            Self::Identity => sequence_rows,
            Self::GeluTanh => (BLOCK_BYTES / (4 * inner.max(1)))
                .max(16)
                .min(sequence_rows),
        }
        .max(1)
    }

    /// `act(h)` as a tensor (the composed path).
    fn apply(self, h: &Tensor) -> Result<Tensor> {
        match self {
            Self::Identity => Ok(h.clone()),
            Self::GeluTanh => gelu_tanh(h),
        }
    }

    /// `act(h)` of a block of rows: `h` itself, or GELU written into `scratch`.
    fn block<'a>(self, h: &'a [f32], scratch: &'a mut [f32]) -> &'a [f32] {
        match self {
            Self::Identity => h,
            Self::GeluTanh => {
                let g = &mut scratch[..h.len()];
                gelu_into(g, h);
                g
            }
        }
    }

    /// `grad ∘= act'(h)`.
    fn multiply_by_derivative(self, grad: &mut [f32], h: &[f32]) {
        if self == Self::GeluTanh {
            multiply_by_gelu_derivative(grad, h);
        }
    }

    /// Elements of activation output one block of `block_rows` rows holds as scratch.
    pub fn scratch_len(self, block_rows: usize, inner: usize) -> usize {
        match self {
            Self::Identity => 0,
            Self::GeluTanh => block_rows * inner,
        }
    }
}

/// `gate ⊙ linear(act(h))` for `h`: `(n, s, inner)` and `gate`: `(n, 1, out)`. A layer's
/// low-rank update is added as `gate ⊙ Δ(act(h))` ([`LowRank::gated_delta`]) beside the
/// base layer's op (without values when `output` asks for the graph only, as the
/// result's values are then never read).
///
/// [`LowRank::gated_delta`]: super::low_rank::LowRank::gated_delta
pub fn gated_linear(
    h: &Tensor,
    linear: &Linear,
    gate: &Tensor,
    activation: Activation,
    output: Output,
) -> Result<Tensor> {
    let Some(adapter) = linear.adapter() else {
        return gated_base(h, linear, gate, activation, output);
    };
    let base = gated_base(h, linear, gate, activation, output)?;
    base + adapter.gated_delta(&activation.apply(h)?, gate)?
}

/// `gate ⊙ (b + act(h)·Wᵀ)` of the base layer.
fn gated_base(
    h: &Tensor,
    linear: &Linear,
    gate: &Tensor,
    activation: Activation,
    output: Output,
) -> Result<Tensor> {
    let fused_kernels = super::kernels::Kernels::fused_on(h.device());
    let fused = fused_kernels && h.dtype() == DType::F32 && gate.dtype() == DType::F32;
    match linear.bias() {
        Some(bias) if !fused_kernels => {
            let (n, _, _) = h.dims3()?;
            let out = linear.weight().dim(0)?;
            let bias_and_gates = Tensor::cat(&[bias.unsqueeze(0)?, gate.reshape((n, out))?], 0)?;
            super::generic_gated_linear::gated_linear(
                h,
                linear.weight(),
                &bias_and_gates,
                activation,
                output,
            )
        }
        Some(bias) if fused => {
            let (n, s, inner) = h.dims3()?;
            let out = linear.weight().dim(0)?;
            // The bias and the gates travel as one `(1 + n, out)` operand.
            let bias_and_gates = Tensor::cat(&[bias.unsqueeze(0)?, gate.reshape((n, out))?], 0)?;
            let op = GatedLinear::new(
                activation,
                [
                    h.track_op(),
                    linear.weight().track_op(),
                    gate.track_op() || bias.track_op(),
                ],
                output,
            );
            h.reshape((n * s, inner))?
                .contiguous()?
                .apply_op3(&linear.weight().contiguous()?, &bias_and_gates, op)?
                .reshape((n, s, out))
        }
        _ => linear
            .forward_base(&activation.apply(h)?, Output::Values)?
            .broadcast_mul(gate),
    }
}

/// Sizes of one call: `h` is `sequences · rows_per_sequence × inner`, `W` is `out × inner`.
#[derive(Debug, Clone, Copy)]
struct Dims {
    sequences: usize,
    rows_per_sequence: usize,
    inner: usize,
    out: usize,
}

impl Dims {
    fn new(h: &Shape, w: &Shape, bias_and_gates: &Shape) -> Result<Self> {
        let (rows, inner) = h.dims2()?;
        let (out, w_inner) = w.dims2()?;
        let (gate_rows, gate_width) = bias_and_gates.dims2()?;
        let sequences = gate_rows.saturating_sub(1);
        if w_inner != inner
            || gate_width != out
            || sequences == 0
            || !rows.is_multiple_of(sequences)
        {
            candle_core::bail!(
                "gated linear: h {h:?}, weight {w:?} and bias with gates \
                 {bias_and_gates:?} do not fit (expected (n·s, in), (out, in) and (1 + n, out))"
            );
        }
        Ok(Self {
            sequences,
            rows_per_sequence: rows / sequences,
            inner,
            out,
        })
    }

    /// `(first row, rows)` of each block of sequence `i`.
    fn blocks(&self, i: usize, activation: Activation) -> impl Iterator<Item = (usize, usize)> {
        let (first, rows) = (i * self.rows_per_sequence, self.rows_per_sequence);
        let step = activation.block_rows(self.inner, rows);
        (0..rows)
            .step_by(step)
            .map(move |start| (first + start, step.min(rows - start)))
    }

    fn rows(&self) -> usize {
        self.sequences * self.rows_per_sequence
    }
}

/// Which of the operands `(h, W, [b; gates])` the backward reads when `tracked` say which
/// take gradients: `h` for `Mᵢ` (`∂W`, the gates') and for `act'(h)`, `W` for `∂h` and
/// the gates', the bias and the gates always; never the output.
pub fn backward_reads(activation: Activation, tracked: [bool; 3]) -> [bool; 3] {
    let [h, w, bias_and_gates] = tracked;
    [
        w || bias_and_gates || (h && activation != Activation::Identity),
        h || bias_and_gates,
        true,
    ]
}

/// The op on `(h, W, [b; gates])`; without `values` it returns zeros. What its backward
/// reads is fixed when the op is built ([`backward_reads`]).
struct GatedLinear {
    activation: Activation,
    values: bool,
    reads: [bool; 3],
}

impl GatedLinear {
    /// For operands `(h, W, [b; gates])` of which `tracked` take gradients.
    fn new(activation: Activation, tracked: [bool; 3], output: Output) -> Self {
        Self {
            activation,
            values: output == Output::Values,
            reads: backward_reads(activation, tracked),
        }
    }
}

fn f32_only(storages: [&CpuStorage; 3]) -> Result<()> {
    if let Some(other) = storages.iter().find(|s| s.dtype() != DType::F32) {
        candle_core::bail!("gated linear: f32 only, got {:?}", other.dtype());
    }
    Ok(())
}

impl CustomOp3 for GatedLinear {
    fn name(&self) -> &'static str {
        "gated-linear"
    }

    fn cpu_fwd(
        &self,
        h: &CpuStorage,
        h_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
        bias_and_gates: &CpuStorage,
        bg_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        f32_only([h, w, bias_and_gates])?;
        let dims = Dims::new(h_layout.shape(), w_layout.shape(), bg_layout.shape())?;
        let Dims { inner, out, .. } = dims;
        let shape = Shape::from((dims.rows(), out));
        if !self.values {
            return Ok((CpuStorage::F32(zeroed(dims.rows() * out)), shape));
        }
        let (h, w, bg) = (
            widened(h, h_layout)?,
            widened(w, w_layout)?,
            widened(bias_and_gates, bg_layout)?,
        );
        let (bias, gates) = bg.split_at(out);
        let mut y = repeat_rows(bias, dims.rows());
        let activation = self.activation;
        let block = activation.block_rows(inner, dims.rows_per_sequence);
        let mut scratch = zeroed(activation.scratch_len(block, inner));
        let w_t = Mat::row_major(&w, out, inner).t();
        for i in 0..dims.sequences {
            let gate = &gates[i * out..(i + 1) * out];
            for (start, len) in dims.blocks(i, activation) {
                let g = activation.block(&h[start * inner..(start + len) * inner], &mut scratch);
                let y = &mut y[start * out..(start + len) * out];
                matmul_parallel(y, Mat::row_major(g, len, inner), w_t, true);
                y.par_chunks_exact_mut(out)
                    .with_min_len(ROWS_PER_TASK)
                    .for_each(|row| row.iter_mut().zip(gate).for_each(|(v, g)| *v *= g));
            }
        }
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        bias_and_gates: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad_y = grad_y.contiguous()?;
        let dims = Dims::new(h.shape(), w.shape(), bias_and_gates.shape())?;
        let want = Wanted {
            h: h.track_op(),
            w: w.track_op(),
            bias_and_gates: bias_and_gates.track_op(),
        };
        let (h_storage, h_layout) = h.storage_and_layout();
        let (w_storage, w_layout) = w.storage_and_layout();
        let (bg_storage, bg_layout) = bias_and_gates.storage_and_layout();
        let (g_storage, g_layout) = grad_y.storage_and_layout();
        // An operand the backward does not read may have been released: not touched.
        let read = |storage, layout, reads: bool| -> Result<Cow<'_, [f32]>> {
            if reads {
                widened(cpu(storage)?, layout)
            } else {
                Ok(Cow::Borrowed(&[]))
            }
        };
        let grads = backward(
            &read(&h_storage, h_layout, self.reads[0])?,
            &read(&w_storage, w_layout, self.reads[1])?,
            &widened(cpu(&bg_storage)?, bg_layout)?,
            &widened(cpu(&g_storage)?, g_layout)?,
            dims,
            want,
            self.activation,
        );
        let tensor = |values: Option<Vec<f32>>, shape: &Shape| {
            values
                .map(|v| tensor_from_f32(v, DType::F32, shape))
                .transpose()
        };
        Ok((
            tensor(grads.h, h_layout.shape())?,
            tensor(grads.w, w_layout.shape())?,
            tensor(grads.bias_and_gates, bg_layout.shape())?,
        ))
    }

    /// [`backward_reads`].
    fn bwd_reads(&self) -> BackwardReads {
        BackwardReads {
            args: self.reads,
            res: false,
        }
    }
}

/// Which operands take gradients.
#[derive(Debug, Clone, Copy)]
struct Wanted {
    h: bool,
    w: bool,
    bias_and_gates: bool,
}

/// The gradients of the wanted operands.
struct Grads {
    h: Option<Vec<f32>>,
    w: Option<Vec<f32>>,
    bias_and_gates: Option<Vec<f32>>,
}

/// The backward pass of the module doc, sequence by sequence.
fn backward(
    h: &[f32],
    w: &[f32],
    bias_and_gates: &[f32],
    grad_y: &[f32],
    dims: Dims,
    want: Wanted,
    activation: Activation,
) -> Grads {
    let Dims { inner, out, .. } = dims;
    let (bias, gates) = bias_and_gates.split_at(out);
    let needs_m = want.w || want.bias_and_gates;
    let mut grad_h = want.h.then(|| zeroed(dims.rows() * inner));
    let mut grad_w = want.w.then(|| vec![0f32; out * inner]);
    let mut grad_bg = want
        .bias_and_gates
        .then(|| vec![0f32; bias_and_gates.len()]);
    let mut scaled_w = vec![0f32; if want.h { out * inner } else { 0 }];
    let mut m = vec![0f32; if needs_m { out * inner } else { 0 }];
    let block = activation.block_rows(inner, dims.rows_per_sequence);
    let mut scratch = zeroed(if needs_m {
        activation.scratch_len(block, inner)
    } else {
        0
    });
    for i in 0..dims.sequences {
        let gate = &gates[i * out..(i + 1) * out];
        if want.h {
            scale_rows(&mut scaled_w, w, gate, false);
        }
        for (k, (start, len)) in dims.blocks(i, activation).enumerate() {
            // Empty when nothing below reads it ([`backward_reads`]).
            let h = h
                .get(start * inner..(start + len) * inner)
                .unwrap_or_default();
            let grad_y = Mat::row_major(&grad_y[start * out..(start + len) * out], len, out);
            if let Some(grad_h) = &mut grad_h {
                let grad_h = &mut grad_h[start * inner..(start + len) * inner];
                matmul_parallel(grad_h, grad_y, Mat::row_major(&scaled_w, out, inner), false);
                activation.multiply_by_derivative(grad_h, h);
            }
            if needs_m {
                let g = activation.block(h, &mut scratch);
                matmul_parallel(&mut m, grad_y.t(), Mat::row_major(g, len, inner), k > 0);
            }
        }
        if let Some(grad_w) = &mut grad_w {
            scale_rows(grad_w, &m, gate, i > 0);
        }
        if let Some(grad_bg) = &mut grad_bg {
            let rows = &grad_y[i * dims.rows_per_sequence * out..][..dims.rows_per_sequence * out];
            // Long sums in f64: `∂gate` adds `rows · inner` products.
            let sums = column_sums(rows, out);
            let (grad_bias, grad_gates) = grad_bg.split_at_mut(out);
            let grad_gate = &mut grad_gates[i * out..(i + 1) * out];
            for c in 0..out {
                grad_bias[c] += (f64::from(gate[c]) * sums[c]) as f32;
            }
            grad_gate
                .par_iter_mut()
                .zip(w.par_chunks(inner).zip(m.par_chunks(inner)))
                .zip(sums.par_iter().zip(bias))
                .for_each(|((grad_gate, (w, m)), (sum, bias))| {
                    let dot: f64 = w
                        .iter()
                        .zip(m)
                        .map(|(&w, &m)| f64::from(w) * f64::from(m))
                        .sum();
                    *grad_gate = (dot + f64::from(*bias) * sum) as f32;
                });
        }
    }
    Grads {
        h: grad_h,
        w: grad_w,
        bias_and_gates: grad_bg,
    }
}

/// `dst[c, :] = gate[c] · src[c, :]` for every row `c` of `src`, or `dst[c, :] += …` when
/// `accumulate`.
fn scale_rows(dst: &mut [f32], src: &[f32], gate: &[f32], accumulate: bool) {
    let inner = src.len() / gate.len().max(1);
    dst.par_chunks_mut(inner)
        .zip(src.par_chunks(inner))
        .zip(gate.par_iter())
        .for_each(|((dst, src), g)| {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = if accumulate { *d + g * s } else { g * s };
            }
        });
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{grads_of_weighted_sum, max_abs, max_relative_diff};
    use super::*;
    use candle_core::backprop::GradStore;
    use candle_core::{Device, Var};

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 37 + seed * 11) % 29) as f32 - 14.0) / 9.0)
            .collect()
    }

    /// Sequences of `h` with every operand a variable, and the activation.
    struct Case {
        activation: Activation,
        h: Var,
        w: Var,
        b: Var,
        gate: Var,
        cotangent: Tensor,
    }

    impl Case {
        fn new(activation: Activation, n: usize, s: usize, inner: usize, out: usize) -> Self {
            let dev = &Device::Cpu;
            let var = |len: usize, seed: usize, shape: &[usize]| {
                Var::from_vec(values(len, seed), shape, dev).unwrap()
            };
            Self {
                activation,
                h: var(n * s * inner, 1, &[n, s, inner]),
                w: var(out * inner, 2, &[out, inner]),
                b: var(out, 3, &[out]),
                gate: var(n * out, 5, &[n, 1, out]),
                cotangent: Tensor::from_vec(values(n * s * out, 4), (n, s, out), dev).unwrap(),
            }
        }

        fn linear(&self) -> Linear {
            Linear::from_parts(self.w.as_tensor().clone(), Some(self.b.as_tensor().clone()))
        }

        fn fused(&self, output: Output) -> Tensor {
            gated_linear(
                self.h.as_tensor(),
                &self.linear(),
                self.gate.as_tensor(),
                self.activation,
                output,
            )
            .unwrap()
        }

        fn composed(&self) -> Tensor {
            self.linear()
                .forward(&self.activation.apply(self.h.as_tensor()).unwrap())
                .unwrap()
                .broadcast_mul(self.gate.as_tensor())
                .unwrap()
        }

        fn vars(&self) -> [(&'static str, &Var); 4] {
            [
                ("h", &self.h),
                ("W", &self.w),
                ("b", &self.b),
                ("gate", &self.gate),
            ]
        }

        /// `∂h` in `grads` is the composed ops' (f32 sums in another order: ~1e-6 relative).
        fn assert_input_gradient_is_the_composed_ones(&self, grads: &GradStore) {
            let expected = self.grads(&self.composed());
            let (got, expected) = (grads.get(&self.h).unwrap(), expected.get(&self.h).unwrap());
            let diff = max_relative_diff(got, expected);
            assert!(diff < 1e-5, "{:?}: {diff}", self.activation);
        }

        fn grads(&self, y: &Tensor) -> GradStore {
            grads_of_weighted_sum(y, &self.cotangent)
        }
    }

    const ACTIVATIONS: [Activation; 2] = [Activation::GeluTanh, Activation::Identity];

    /// Two sequences of more rows than one GELU block (sums cross blocks, the last block
    /// is ragged).
    #[test]
    fn matches_the_composed_activation_linear_and_gate() {
        let (inner, out) = (BLOCK_BYTES / 4 / 40, 24);
        let rows = 2 * Activation::GeluTanh.block_rows(inner, usize::MAX) + 5;
        for activation in ACTIVATIONS {
            let case = Case::new(activation, 2, rows, inner, out);
            let (fused, composed) = (case.fused(Output::Values), case.composed());
            // f32 sums of `inner` products in another order: ~1e-6 relative.
            let diff = max_relative_diff(&fused, &composed);
            assert!(diff < 1e-5, "{activation:?}: {diff}");
            let (gf, gc) = (case.grads(&fused), case.grads(&composed));
            for (name, var) in case.vars() {
                let (a, c) = (gf.get(var).unwrap(), gc.get(var).unwrap());
                let diff = max_relative_diff(a, c);
                assert!(diff < 1e-5, "{activation:?} ∂{name}: {diff}");
            }
        }
    }

    /// Without values the output is zeros and every gradient is bitwise the same.
    #[test]
    fn graph_only_gives_the_same_gradients() {
        for activation in ACTIVATIONS {
            let case = Case::new(activation, 3, 40, 32, 8);
            let (full, graph_only) = (case.fused(Output::Values), case.fused(Output::GraphOnly));
            assert_eq!(max_abs(&graph_only), 0.0);
            assert!(max_abs(&full) > 0.0);
            let (a, b) = (case.grads(&full), case.grads(&graph_only));
            for (name, var) in case.vars() {
                let (a, b) = (a.get(var).unwrap(), b.get(var).unwrap());
                assert_eq!(max_abs(&(a - b).unwrap()), 0.0, "{activation:?} ∂{name}");
            }
        }
    }

    /// Guidance: frozen weights and gates get no gradient; the input's is unchanged.
    #[test]
    fn constants_get_no_gradient() {
        for activation in ACTIVATIONS {
            let case = Case::new(activation, 2, 10, 12, 5);
            let (w, b, gate) = (
                case.w.as_tensor().detach(),
                case.b.as_tensor().detach(),
                case.gate.as_tensor().detach(),
            );
            let linear = Linear::from_parts(w.clone(), Some(b.clone()));
            let y = gated_linear(
                case.h.as_tensor(),
                &linear,
                &gate,
                activation,
                Output::Values,
            )
            .unwrap();
            let grads = case.grads(&y);
            assert!(
                grads.get(&w).is_none() && grads.get(&b).is_none() && grads.get(&gate).is_none()
            );
            case.assert_input_gradient_is_the_composed_ones(&grads);
        }
    }

    /// Guidance releases what its backward does not read: `h` without an activation (only
    /// `W` and the gates are needed for `∂h`), not with GELU (`GELU'(h)`); the input's
    /// gradient is the same either way.
    #[test]
    fn guidance_keeps_h_only_for_the_activation_derivative() {
        for (activation, releases_h) in [(Activation::Identity, 1), (Activation::GeluTanh, 0)] {
            let case = Case::new(activation, 2, 10, 12, 5);
            let linear = Linear::from_parts(case.w.as_tensor().detach(), Some(case.b.detach()));
            let gate = case.gate.as_tensor().detach();
            // `h` as an op node whose own backward reads nothing (so only this op holds it).
            let h = case.h.as_tensor().affine(1.0, 0.0).unwrap();
            let y = gated_linear(&h, &linear, &gate, activation, Output::Values).unwrap();
            drop(h);
            let released = candle_core::backprop::release_unneeded_for_backward(&[&y]).unwrap();
            assert_eq!(released, releases_h, "{activation:?}");
            case.assert_input_gradient_is_the_composed_ones(&case.grads(&y));
        }
    }

    #[test]
    fn mismatched_shapes_are_an_error() {
        let dev = &Device::Cpu;
        let op = || GatedLinear::new(Activation::GeluTanh, [true; 3], Output::Values);
        let h = Tensor::zeros((4, 6), DType::F32, dev).unwrap();
        let w = Tensor::zeros((3, 5), DType::F32, dev).unwrap();
        let bg = Tensor::zeros((2, 3), DType::F32, dev).unwrap();
        let error = h.apply_op3(&w, &bg, op()).unwrap_err().to_string();
        assert!(error.contains("do not fit"), "{error}");
        // 4 rows are not 3 sequences.
        let w = Tensor::zeros((3, 6), DType::F32, dev).unwrap();
        let bg = Tensor::zeros((4, 3), DType::F32, dev).unwrap();
        let error = h.apply_op3(&w, &bg, op()).unwrap_err().to_string();
        assert!(error.contains("do not fit"), "{error}");
    }
}
