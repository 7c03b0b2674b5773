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
//! merge back is ever copied.
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
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
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

    /// Width of a token: every head's `d` columns.
    fn width(&self) -> usize {
        self.heads * self.d
    }

    /// Head `head` of the `rows × width` matrix `x` of one batch element: a strided view.
    fn head<'a>(&self, x: &'a [f32], rows: usize, head: usize) -> Mat<'a> {
        Mat::strided(&x[head * self.d..], rows, self.d, self.width())
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
        let out = forward(&q, &k, &v, dims, self.scale);
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
        let (dq, dk, dv) = backward(
            &widened(cpu(&q_storage)?, q_layout)?,
            &widened(cpu(&k_storage)?, k_layout)?,
            &widened(cpu(&v_storage)?, v_layout)?,
            &widened(cpu(&g_storage)?, g_layout)?,
            dims,
            self.scale,
        );
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

/// `O` for every (batch, head) pair.
fn forward(q: &[f32], k: &[f32], v: &[f32], dims: Dims, scale: f32) -> Vec<f32> {
    let Dims { batch, s, l, .. } = dims;
    let width = dims.width();
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
                let q = &q[element * s * width..][..s * width];
                let k = &k[element * l * width..][..l * width];
                let v = &v[element * l * width..][..l * width];
                for head in 0..dims.heads {
                    probabilities(probs, dims.head(q, s, head), dims.head(k, l, head), scale);
                    let out = &mut out[head * dims.d..];
                    let probs = Mat::row_major(probs, s, l);
                    matmul_into_rows(out, width, probs, dims.head(v, l, head), 1.0);
                }
            }
        });
    out
}

/// `(dQ, dK, dV)` for every (batch, head) pair.
fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    grad_out: &[f32],
    dims: Dims,
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Dims { batch, s, l, d, .. } = dims;
    let width = dims.width();
    let mut dq = zeroed(batch * s * width);
    let mut dk = zeroed(batch * l * width);
    let mut dv = zeroed(batch * l * width);
    if dq.is_empty() || dk.is_empty() {
        return (dq, dk, dv);
    }
    let split = ThreadGroups::for_batch(batch);
    let mut scratch: Vec<(Vec<f32>, Vec<f32>)> = (0..split.groups)
        .map(|_| (vec![0f32; s * l], vec![0f32; s * l]))
        .collect();
    let per = split.per_group;
    dq.par_chunks_mut(per * s * width)
        .zip(dk.par_chunks_mut(per * l * width))
        .zip(dv.par_chunks_mut(per * l * width))
        .zip(scratch.par_iter_mut())
        .enumerate()
        .for_each(|(group, (((dq, dk), dv), (probs, grad_scores)))| {
            let outputs = dq
                .chunks_mut(s * width)
                .zip(dk.chunks_mut(l * width))
                .zip(dv.chunks_mut(l * width));
            for (i, ((dq, dk), dv)) in outputs.enumerate() {
                let element = group * per + i;
                let q = &q[element * s * width..][..s * width];
                let k = &k[element * l * width..][..l * width];
                let v = &v[element * l * width..][..l * width];
                let grad_out = &grad_out[element * s * width..][..s * width];
                for head in 0..dims.heads {
                    let (q, k) = (dims.head(q, s, head), dims.head(k, l, head));
                    let (v, grad_out) = (dims.head(v, l, head), dims.head(grad_out, s, head));
                    probabilities(probs, q, k, scale);
                    let p = Mat::row_major(probs, s, l);
                    matmul_into_rows(&mut dv[head * d..], width, p.t(), grad_out, 1.0);
                    matmul(grad_scores, grad_out, v.t(), 1.0);
                    softmax_backward(grad_scores, probs, l);
                    let grad_scores = Mat::row_major(grad_scores, s, l);
                    matmul_into_rows(&mut dq[head * d..], width, grad_scores, k, scale);
                    matmul_into_rows(&mut dk[head * d..], width, grad_scores.t(), q, scale);
                }
            }
        });
    (dq, dk, dv)
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
    use super::super::test_support::max_relative_diff;
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
            let loss = |out: &Tensor| (out * weights.as_tensor()).unwrap().sum_all().unwrap();
            let fused_grads = loss(&fused).backward().unwrap();
            let reference_grads = loss(&reference).backward().unwrap();
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
