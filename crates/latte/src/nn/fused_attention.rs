//! Fused scaled dot-product attention with its own backward, on the CPU:
//! `O = softmax(s·Q·Kᵀ)·V` per (batch, head), computed one (batch, head) at a time so that
//! the score matrix only ever exists as a per-thread scratch buffer.
//!
//! The composed formulation keeps the `(b, h, s, l)` probabilities for the backward pass
//! (a score-sized tensor per attention, the largest thing a Latte block stores) and makes
//! score-sized temporaries in both passes. Here a stored graph keeps `Q`, `K` and `V` only
//! (what PyTorch's fused attention keeps, less its row statistics), and the backward pass
//! recomputes the probabilities, as FlashAttention does:
//!
//! ```text
//! P  = softmax(s·Q·Kᵀ)           dV = Pᵀ·dO
//! dP = dO·Vᵀ                     dS = P ∘ (dP − rowsum(P ∘ dP))
//! dQ = s·dS·K                    dK = s·dSᵀ·Q
//! ```
//!
//! `rowsum(P ∘ dP)` equals `rowsum(dO ∘ O)`; computing it from `P` means the backward pass
//! does not read `O`, so a stored graph need not keep the output either.
//!
//! Operands and results keep the projections' layout, heads side by side in the last
//! dimension (`(b, s, h·d)`): a head is a strided view, so no split into `(b, h, s, d)` and
//! merge back is ever copied. Self-attention takes the fused projection's output
//! `[q | k | v]` (`(b, s, 3·h·d)`, [`self_attention`]) and returns its gradient packed the
//! same way: one product and one gradient for the three projections.
//!
//! Products run on the `gemm` crate (candle's CPU matmul kernel), one single-threaded call
//! per (batch, head), runs of batch elements spread over rayon's threads
//! ([`ThreadGroups`]); every pair is computed the same way whatever the thread count, so
//! results are deterministic. Half precision inputs are widened to f32 and the results
//! narrowed back.

use super::matrix::{matmul, matmul_into_rows, Mat};
use super::ops::{cpu, narrowed, tensor_from_f32, widened, zeroed};
use super::simd;
use candle_core::backend::BackendStorage;
use candle_core::backprop::BackwardReads;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use multiversion::multiversion;
use rayon::prelude::*;

/// `softmax(scale·q·kᵀ)·v` over `heads` heads, on the CPU: `q` `(b, s, h·d)`, `k` and `v`
/// `(b, l, h·d)`, each head's `d` columns side by side; the result is `(b, s, h·d)`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    super::matrix::allocate_packing_buffers();
    let op = FusedAttention {
        heads,
        scale: scale as f32,
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// `softmax(scale·q·kᵀ)·v` over `heads` heads of the packed `qkv` `(b, s, 3·h·d)`, each
/// row `[q | k | v]` (a fused projection's output), on the CPU; the result is `(b, s, h·d)`
/// and the gradient is packed as `qkv` is.
pub fn self_attention(qkv: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    super::matrix::allocate_packing_buffers();
    let op = FusedSelfAttention {
        heads,
        scale: scale as f32,
    };
    qkv.contiguous()?.apply_op1(op)
}

/// The op over `heads` heads; `scale` multiplies the scores.
struct FusedAttention {
    heads: usize,
    scale: f32,
}

/// Sizes of one call: `batch` elements of `heads` heads, `s` queries and `l` keys of
/// width `d` each.
#[derive(Debug, Clone, Copy)]
struct Dims {
    batch: usize,
    heads: usize,
    s: usize,
    l: usize,
    d: usize,
}

impl Dims {
    fn new(q: &Shape, k: &Shape, v: &Shape, heads: usize) -> Result<Self> {
        let (b, s, width) = q.dims3()?;
        let (kb, l, k_width) = k.dims3()?;
        if (kb, k_width) != (b, width) || v.dims() != k.dims() || heads == 0 || width % heads != 0 {
            candle_core::bail!(
                "fused attention: q {:?}, k {:?} and v {:?} do not fit {heads} heads \
                 (expected (b, s, h·d), (b, l, h·d), (b, l, h·d))",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        Ok(Self {
            batch: b,
            heads,
            s,
            l,
            d: width / heads,
        })
    }

    /// `qkv` `(b, s, 3·h·d)` of a self-attention.
    fn packed(qkv: &Shape, heads: usize) -> Result<Self> {
        let (b, s, packed) = qkv.dims3()?;
        if heads == 0 || packed % (3 * heads) != 0 {
            candle_core::bail!(
                "fused self-attention: qkv {:?} does not fit {heads} heads (expected \
                 (b, s, 3·h·d))",
                qkv.dims()
            );
        }
        Ok(Self {
            batch: b,
            heads,
            s,
            l: s,
            d: packed / (3 * heads),
        })
    }

    /// Width of a token: every head's `d` columns.
    fn width(&self) -> usize {
        self.heads * self.d
    }
}

/// Where the rows of one operand lie in its buffer: row `r` of batch element `e` starts at
/// `offset + (e·rows + r)·row_stride`, and head `h` is the `d` columns from `h·d` on.
#[derive(Debug, Clone, Copy)]
struct Placement {
    offset: usize,
    row_stride: usize,
}

impl Placement {
    /// A `(b, rows, h·d)` tensor of its own.
    fn alone(dims: &Dims) -> Self {
        Self {
            offset: 0,
            row_stride: dims.width(),
        }
    }

    /// Part `part` (0: q, 1: k, 2: v) of packed `[q | k | v]` rows.
    fn packed(dims: &Dims, part: usize) -> Self {
        Self {
            offset: part * dims.width(),
            row_stride: 3 * dims.width(),
        }
    }
}

/// An operand: its buffer and where its rows lie.
#[derive(Debug, Clone, Copy)]
struct Operand<'a> {
    data: &'a [f32],
    at: Placement,
}

impl<'a> Operand<'a> {
    /// A `(b, rows, h·d)` tensor of its own.
    fn alone(data: &'a [f32], dims: &Dims) -> Self {
        let at = Placement::alone(dims);
        Self { data, at }
    }

    /// `[q, k, v]` read from packed `[q | k | v]` rows.
    fn packed_parts(qkv: &'a [f32], dims: &Dims) -> [Self; 3] {
        [0, 1, 2].map(|part| Self {
            data: qkv,
            at: Placement::packed(dims, part),
        })
    }

    /// Head `head` of batch element `element`, `rows × d`: a strided view.
    fn head(&self, dims: &Dims, element: usize, rows: usize, head: usize) -> Mat<'a> {
        let start = self.at.offset + element * rows * self.at.row_stride + head * dims.d;
        Mat::strided(&self.data[start..], rows, dims.d, self.at.row_stride)
    }
}

/// One batch element's gradient rows: three buffers of their own, or one buffer of packed
/// `[dq | dk | dv]` rows.
enum ElementGrads<'a> {
    Alone([&'a mut [f32]; 3]),
    Packed(&'a mut [f32]),
}

impl ElementGrads<'_> {
    /// Where head `head` of gradient `part` (0: q, 1: k, 2: v) starts, and its row stride.
    fn head(&mut self, dims: &Dims, part: usize, head: usize) -> (&mut [f32], usize) {
        let (rows, at) = match self {
            Self::Alone(grads) => (&mut *grads[part], Placement::alone(dims)),
            Self::Packed(rows) => (&mut **rows, Placement::packed(dims, part)),
        };
        (&mut rows[at.offset + head * dims.d..], at.row_stride)
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = Dims::new(
            q_layout.shape(),
            k_layout.shape(),
            v_layout.shape(),
            self.heads,
        )?;
        let dtype = q.dtype();
        let (q, k, v) = (
            widened(q, q_layout)?,
            widened(k, k_layout)?,
            widened(v, v_layout)?,
        );
        let operands = [&q, &k, &v].map(|data| Operand::alone(data, &dims));
        let out = forward(operands, dims, self.scale);
        Ok((narrowed(out, dtype)?, q_layout.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad_out = grad_out.contiguous()?;
        let dims = Dims::new(q.shape(), k.shape(), v.shape(), self.heads)?;
        let (q_storage, q_layout) = q.storage_and_layout();
        let (k_storage, k_layout) = k.storage_and_layout();
        let (v_storage, v_layout) = v.storage_and_layout();
        let (g_storage, g_layout) = grad_out.storage_and_layout();
        let values = [
            widened(cpu(&q_storage)?, q_layout)?,
            widened(cpu(&k_storage)?, k_layout)?,
            widened(cpu(&v_storage)?, v_layout)?,
        ];
        let grad_values = widened(cpu(&g_storage)?, g_layout)?;
        let operands = [0, 1, 2].map(|i| Operand::alone(&values[i], &dims));
        let [dq, dk, dv] = backward_alone(operands, &grad_values, dims, self.scale);
        let tensor = |values, shape| tensor_from_f32(values, q.dtype(), shape);
        Ok((
            Some(tensor(dq, q.shape())?),
            Some(tensor(dk, k.shape())?),
            Some(tensor(dv, v.shape())?),
        ))
    }

    /// The backward pass recomputes the probabilities from `q` and `k` and reads `v`; it
    /// never reads the output.
    fn bwd_reads(&self) -> BackwardReads {
        BackwardReads {
            args: [true; 3],
            res: false,
        }
    }
}

/// The self-attention op on packed `[q | k | v]` rows.
struct FusedSelfAttention {
    heads: usize,
    scale: f32,
}

impl CustomOp1 for FusedSelfAttention {
    fn name(&self) -> &'static str {
        "fused-self-attention"
    }

    fn cpu_fwd(&self, qkv: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = Dims::packed(layout.shape(), self.heads)?;
        let dtype = qkv.dtype();
        let qkv = widened(qkv, layout)?;
        let operands = Operand::packed_parts(&qkv, &dims);
        let out = forward(operands, dims, self.scale);
        let shape = Shape::from((dims.batch, dims.s, dims.width()));
        Ok((narrowed(out, dtype)?, shape))
    }

    fn bwd(&self, qkv: &Tensor, _out: &Tensor, grad_out: &Tensor) -> Result<Option<Tensor>> {
        let grad_out = grad_out.contiguous()?;
        let dims = Dims::packed(qkv.shape(), self.heads)?;
        let (qkv_storage, qkv_layout) = qkv.storage_and_layout();
        let (g_storage, g_layout) = grad_out.storage_and_layout();
        let grads = backward_packed(
            &widened(cpu(&qkv_storage)?, qkv_layout)?,
            &widened(cpu(&g_storage)?, g_layout)?,
            dims,
            self.scale,
        );
        Ok(Some(tensor_from_f32(grads, qkv.dtype(), qkv.shape())?))
    }

    /// The backward pass recomputes the probabilities from `q` and `k` and reads `v`; it
    /// never reads the output.
    fn bwd_reads(&self) -> BackwardReads {
        BackwardReads {
            args: [true, false, false],
            res: false,
        }
    }
}

/// How [`attention`] spreads `batch` elements over rayon's threads: `groups` runs of
/// `per_group` consecutive elements (the last may be shorter), each with its own scratch
/// buffers, all allocated before the parallel loop (so the peak does not depend on how the
/// threads are scheduled).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadGroups {
    /// Number of groups (one scratch set each).
    pub groups: usize,
    /// Batch elements per group.
    pub per_group: usize,
}

impl ThreadGroups {
    /// The split for `batch` elements on the current rayon pool.
    pub fn for_batch(batch: usize) -> Self {
        let threads = rayon::current_num_threads().clamp(1, batch.max(1));
        let per_group = batch.div_ceil(threads).max(1);
        Self {
            groups: batch.div_ceil(per_group),
            per_group,
        }
    }
}

/// `O` `(b, s, h·d)` for every (batch, head) pair of `[q, k, v]`.
fn forward(operands: [Operand<'_>; 3], dims: Dims, scale: f32) -> Vec<f32> {
    let Dims { batch, s, l, .. } = dims;
    let width = dims.width();
    let [q, k, v] = operands;
    let mut out = zeroed(batch * s * width);
    if out.is_empty() {
        return out;
    }
    let split = ThreadGroups::for_batch(batch);
    let mut scratch: Vec<Vec<f32>> = (0..split.groups).map(|_| vec![0f32; s * l]).collect();
    out.par_chunks_mut(split.per_group * s * width)
        .zip(scratch.par_iter_mut())
        .enumerate()
        .for_each(|(group, (out, probs))| {
            for (i, out) in out.chunks_mut(s * width).enumerate() {
                let element = group * split.per_group + i;
                for head in 0..dims.heads {
                    let (q, k) = (
                        q.head(&dims, element, s, head),
                        k.head(&dims, element, l, head),
                    );
                    probabilities(probs, q, k, scale);
                    let probs = Mat::row_major(probs, s, l);
                    let v = v.head(&dims, element, l, head);
                    matmul_into_rows(&mut out[head * dims.d..], width, probs, v, 1.0);
                }
            }
        });
    out
}

/// `[dQ, dK, dV]`, each `(b, rows, h·d)` of its own.
fn backward_alone(
    operands: [Operand<'_>; 3],
    grad_out: &[f32],
    dims: Dims,
    scale: f32,
) -> [Vec<f32>; 3] {
    let Dims { batch, s, l, .. } = dims;
    let width = dims.width();
    let mut grads = [s, l, l].map(|rows| zeroed(batch * rows * width));
    if grads.iter().any(Vec::is_empty) {
        return grads;
    }
    let (per, mut scratch) = backward_scratch(dims);
    let [dq, dk, dv] = &mut grads;
    dq.par_chunks_mut(per * s * width)
        .zip(dk.par_chunks_mut(per * l * width))
        .zip(dv.par_chunks_mut(per * l * width))
        .zip(scratch.par_iter_mut())
        .enumerate()
        .for_each(|(group, (((dq, dk), dv), scratch))| {
            let elements = dq
                .chunks_mut(s * width)
                .zip(dk.chunks_mut(l * width))
                .zip(dv.chunks_mut(l * width))
                .map(|((dq, dk), dv)| ElementGrads::Alone([dq, dk, dv]));
            let first = group * per;
            backward_group(first, elements, operands, grad_out, dims, scale, scratch);
        });
    grads
}

/// The gradient of packed `[q | k | v]` rows, packed the same way `(b, s, 3·h·d)`.
fn backward_packed(qkv: &[f32], grad_out: &[f32], dims: Dims, scale: f32) -> Vec<f32> {
    let Dims { batch, s, .. } = dims;
    let packed = 3 * dims.width();
    let mut grads = zeroed(batch * s * packed);
    if grads.is_empty() {
        return grads;
    }
    let operands = Operand::packed_parts(qkv, &dims);
    let (per, mut scratch) = backward_scratch(dims);
    grads
        .par_chunks_mut(per * s * packed)
        .zip(scratch.par_iter_mut())
        .enumerate()
        .for_each(|(group, (rows, scratch))| {
            let elements = rows.chunks_mut(s * packed).map(ElementGrads::Packed);
            let first = group * per;
            backward_group(first, elements, operands, grad_out, dims, scale, scratch);
        });
    grads
}

/// A thread group's two `s × l` buffers: probabilities and their gradient.
type Scratch = (Vec<f32>, Vec<f32>);

/// Batch elements per thread group, and every group's scratch, allocated before the
/// parallel loop.
fn backward_scratch(dims: Dims) -> (usize, Vec<Scratch>) {
    let split = ThreadGroups::for_batch(dims.batch);
    let buffer = || vec![0f32; dims.s * dims.l];
    let scratch = (0..split.groups).map(|_| (buffer(), buffer())).collect();
    (split.per_group, scratch)
}

/// The backward pass of the module doc for consecutive batch elements from `first`, each
/// with its gradient rows, on one thread with its group's scratch.
fn backward_group<'a>(
    first: usize,
    elements: impl Iterator<Item = ElementGrads<'a>>,
    [q, k, v]: [Operand<'_>; 3],
    grad_out: &[f32],
    dims: Dims,
    scale: f32,
    (probs, grad_scores): &mut Scratch,
) {
    let Dims { s, l, .. } = dims;
    let grad_out = Operand::alone(grad_out, &dims);
    for (i, mut grads) in elements.enumerate() {
        let element = first + i;
        for head in 0..dims.heads {
            let (q, k) = (
                q.head(&dims, element, s, head),
                k.head(&dims, element, l, head),
            );
            let v = v.head(&dims, element, l, head);
            let grad_out = grad_out.head(&dims, element, s, head);
            probabilities(probs, q, k, scale);
            let p = Mat::row_major(probs, s, l);
            let (dv, stride) = grads.head(&dims, 2, head);
            matmul_into_rows(dv, stride, p.t(), grad_out, 1.0);
            matmul(grad_scores, grad_out, v.t(), 1.0);
            softmax_backward(grad_scores, probs, l);
            let grad_scores = Mat::row_major(grad_scores, s, l);
            let (dq, stride) = grads.head(&dims, 0, head);
            matmul_into_rows(dq, stride, grad_scores, k, scale);
            let (dk, stride) = grads.head(&dims, 1, head);
            matmul_into_rows(dk, stride, grad_scores.t(), q, scale);
        }
    }
}

/// `probs = softmax(scale·q·kᵀ)`, row by row (`s × l`, row-major).
fn probabilities(probs: &mut [f32], q: Mat<'_>, k: Mat<'_>, scale: f32) {
    matmul(probs, q, k.t(), scale);
    softmax(probs, k.rows);
}

/// Every row of `scores` (rows of `cols`) replaced by its softmax.
#[multiversion(targets = "simd")]
fn softmax(scores: &mut [f32], cols: usize) {
    for row in scores.chunks_mut(cols) {
        let max = simd::max(row);
        for x in row.iter_mut() {
            *x = simd::exp(*x - max);
        }
        let inv = 1.0 / simd::sum(row, |x| x);
        for x in row.iter_mut() {
            *x *= inv;
        }
    }
}

/// `dS = P ∘ (dP − rowsum(P ∘ dP))` in place of `dP` (`grad`), rows of `cols`.
#[multiversion(targets = "simd")]
fn softmax_backward(grad: &mut [f32], probs: &[f32], cols: usize) {
    for (dp, p) in grad.chunks_mut(cols).zip(probs.chunks(cols)) {
        let dot = simd::sum_pairs(dp, p, |dp, p| dp * p);
        for (dp, &p) in dp.iter_mut().zip(p) {
            *dp = p * (*dp - dot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{grads_of_weighted_sum, max_abs, max_relative_diff};
    use super::*;
    use candle_core::{DType, Device, Var, D};

    /// The composed reference: `softmax(scale·q·kᵀ)·v` with candle's differentiable ops,
    /// per head of `(b, s, h·d)` operands.
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Tensor {
        let split = |x: &Tensor| {
            let (b, s, width) = x.dims3().unwrap();
            x.reshape((b, s, heads, width / heads))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (q, k, v) = (split(q), split(k), split(v));
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        let max = scores.max_keepdim(D::Minus1).unwrap().detach();
        let exp = scores.broadcast_sub(&max).unwrap().exp().unwrap();
        let sum = exp.sum_keepdim(D::Minus1).unwrap();
        let out = exp.broadcast_div(&sum).unwrap().matmul(&v).unwrap();
        let (b, h, s, d) = out.dims4().unwrap();
        out.transpose(1, 2).unwrap().reshape((b, s, h * d)).unwrap()
    }

    fn var(dims: (usize, usize, usize), seed: u64) -> Var {
        let n = dims.0 * dims.1 * dims.2;
        let values: Vec<f32> = (0..n as u64)
            .map(|i| ((i * 2654435761 + seed * 97) % 1000) as f32 / 250.0 - 2.0)
            .collect();
        Var::from_vec(values, dims, &Device::Cpu).unwrap()
    }

    /// Output and the gradients of q, k and v against the composed ops, self-attention
    /// (`s = l`) and cross-attention (`s ≠ l`), three heads of width 4 side by side, three
    /// batch elements (more than one thread group). Both sides run in f32 with different
    /// summation orders: agreement to a few f32 ulps of the largest value (1e-5).
    #[test]
    fn matches_the_composed_attention_and_its_gradients() {
        let heads = 3;
        for (s, l) in [(7, 7), (5, 3), (1, 9)] {
            let q = var((3, s, heads * 4), 1);
            let k = var((3, l, heads * 4), 2);
            let v = var((3, l, heads * 4), 3);
            let weights = var((3, s, heads * 4), 4);
            let scale = 0.5;
            let fused = attention(&q, &k, &v, heads, scale).unwrap();
            let reference = composed(&q, &k, &v, heads, scale);
            assert!(max_relative_diff(&fused, &reference) < 1e-5);
            let fused_grads = grads_of_weighted_sum(&fused, &weights);
            let reference_grads = grads_of_weighted_sum(&reference, &weights);
            for x in [&q, &k, &v] {
                let (a, b) = (fused_grads.get(x).unwrap(), reference_grads.get(x).unwrap());
                assert!(
                    max_relative_diff(a, b) < 1e-5,
                    "s {s}, l {l}: {}",
                    max_relative_diff(a, b)
                );
            }
        }
    }

    /// Self-attention on packed `[q | k | v]` rows against the op on the three parts:
    /// output and gradient (the packed one against the parts' gradients of `narrow`s).
    /// The same products on differently strided views: equal to 1e-6 relative.
    #[test]
    fn packed_self_attention_matches_the_parts() {
        let (heads, width) = (3, 12);
        let qkv = var((3, 7, 3 * width), 8);
        let weights = var((3, 7, width), 9);
        let part = |i: usize| qkv.narrow(2, i * width, width).unwrap();
        let packed = self_attention(&qkv, heads, 0.5).unwrap();
        let parts = attention(&part(0), &part(1), &part(2), heads, 0.5).unwrap();
        assert!(max_relative_diff(&packed, &parts) < 1e-6);
        let (a, b) = (
            grads_of_weighted_sum(&packed, &weights),
            grads_of_weighted_sum(&parts, &weights),
        );
        let (a, b) = (a.get(&qkv).unwrap(), b.get(&qkv).unwrap());
        assert!(max_abs(a) > 0.0);
        assert!(max_relative_diff(a, b) < 1e-6);
        let err = self_attention(&qkv, 5, 0.5).unwrap_err().to_string();
        assert!(err.contains("does not fit"), "{err}");
    }

    /// Half precision computes in f32 and rounds once: within bf16's rounding of the f32
    /// result (2⁻⁸ relative).
    #[test]
    fn half_precision_rounds_the_f32_result() {
        let (q, k, v) = (var((1, 6, 8), 5), var((1, 6, 8), 6), var((1, 6, 8), 7));
        let f32_out = attention(&q, &k, &v, 2, 0.5).unwrap();
        let half = |t: &Var| t.as_tensor().to_dtype(DType::BF16).unwrap();
        let bf16_out = attention(&half(&q), &half(&k), &half(&v), 2, 0.5)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_eq!(bf16_out.dtype(), DType::F32);
        // Inputs rounded to bf16 as well: a few bf16 ulps.
        assert!(max_relative_diff(&bf16_out, &f32_out) < 4.0 / 256.0);
    }

    #[test]
    fn rejects_mismatched_shapes() {
        let q = var((1, 3, 8), 1);
        let k = var((1, 5, 12), 2);
        let err = attention(&q, &k, &k, 2, 1.0).unwrap_err().to_string();
        assert!(err.contains("do not fit"), "{err}");
        // A width that the heads do not divide.
        let err = attention(&q, &q, &q, 3, 1.0).unwrap_err().to_string();
        assert!(err.contains("do not fit"), "{err}");
    }
}
