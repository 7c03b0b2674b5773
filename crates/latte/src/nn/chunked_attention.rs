//! Memory-efficient attention from tensor ops, on every device: `softmax(scale·q·kᵀ)·v`
//! over chunks of query rows, keeping for the backward pass only `q`, `k`, `v` and the
//! f32 row log-sum-exp, and recomputing each chunk's probabilities in the
//! backward — FlashAttention's backward (Dao et al. 2022) in candle ops, which run as
//! cuBLAS products and candle's kernels on CUDA.
//!
//! Forward, per chunk of query rows: `S = scale·q·kᵀ` (f32), `m = rowmax S`,
//! `P = exp(S − m)`, `ℓ = rowsum P`, `O = (P / ℓ)·v`, `lse = m + ln ℓ`.
//!
//! Backward, per chunk: `P = exp(S − lse)`, `dV += Pᵀ·dO`, `dP = dO·vᵀ`,
//! `D = rowsum(P ⊙ dP)` (= rowsum(dO ⊙ O), without reading O), `dS = P ⊙ (dP − D)`,
//! `dQ = scale·dS·k`, `dK += scale·dSᵀ·q`.
//!
//! A chunk holds at most [`CHUNK_SCORE_ELEMENTS`] scores, which bounds the transient of
//! both passes; the products and the softmax round as the composed form does (products in
//! the operands' dtype, the softmax in f32).

use candle_core::backprop::BackwardReads;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use std::sync::Arc;

/// Scores one chunk holds at most (64 MiB in f32): the transient bound of both passes.
pub const CHUNK_SCORE_ELEMENTS: usize = 1 << 24;

/// Query rows per chunk for `batch_heads` sequences of `keys` keys.
pub fn chunk_rows(batch_heads: usize, keys: usize) -> usize {
    (CHUNK_SCORE_ELEMENTS / (batch_heads * keys).max(1)).max(1)
}

/// `softmax(scale·q·kᵀ)·v` for `q` `(b, h, s, d)`, `k` and `v` `(b, h, l, d)`, in chunks
/// of [`chunk_rows`] query rows; the result is in the merged layout `(b, s, h·d)` that the
/// output projection reads, so that the graph keeps one copy of it.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, h, _, _) = q.dims4()?;
    let rows = chunk_rows(b * h, k.dim(2)?);
    attention_in_chunks(q, k, v, scale, rows)
}

/// [`attention`] in chunks of `rows` query rows.
pub fn attention_in_chunks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    rows: usize,
) -> Result<Tensor> {
    if rows == 0 {
        candle_core::bail!("chunked attention: chunks of 0 rows");
    }
    let (b, h, s, d) = q.dims4()?;
    let (output, lse) = forward(&q.detach(), &k.detach(), &v.detach(), scale, rows)?;
    let op = ChunkedAttention { scale, rows, lse };
    q.attach_op3_arc(k, v, &output, Arc::new(Box::new(op)))?
        .reshape((b, s, h * d))
}

/// The output `(b, s, h, d)` and the row log-sum-exp `(b, h, s, 1)` in f32.
fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    rows: usize,
) -> Result<(Tensor, Tensor)> {
    let (b, h, s, d) = q.dims4()?;
    let output = Tensor::zeros((b, s, h, d), q.dtype(), q.device())?;
    let lse = Tensor::zeros((b, h, s, 1), DType::F32, q.device())?;
    let keys_t = k.t()?;
    for start in (0..s).step_by(rows) {
        let q_c = q.narrow(2, start, rows.min(s - start))?;
        let scores = (q_c * scale)?.matmul(&keys_t)?.to_dtype(DType::F32)?;
        let max = scores.max_keepdim(D::Minus1)?;
        let exp = scores.broadcast_sub(&max)?.exp()?;
        drop(scores);
        let sum = exp.sum_keepdim(D::Minus1)?;
        let weights = exp.broadcast_div(&sum)?.to_dtype(q.dtype())?;
        drop(exp);
        let heads = weights.matmul(v)?;
        output.slice_set(&heads.transpose(1, 2)?.contiguous()?, 1, start)?;
        lse.slice_set(&(max + sum.log()?)?, 2, start)?;
    }
    Ok((output, lse))
}

/// The backward rule: the row log-sum-exp of the forward and its chunking.
struct ChunkedAttention {
    scale: f64,
    rows: usize,
    /// `(b, h, s, 1)` in f32.
    lse: Tensor,
}

impl CustomOp3 for ChunkedAttention {
    fn name(&self) -> &'static str {
        "chunked-attention"
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
        candle_core::bail!("chunked attention runs as tensor ops (attention_in_chunks)")
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // On detached operands: the gradients hold no graph (the operands are the graph's
        // own tensors, and products of them would keep every chunk's intermediates alive).
        let (q, k, v) = (&q.detach(), &k.detach(), &v.detach());
        let (_, _, s, _) = q.dims4()?;
        let dtype = q.dtype();
        let grad = grad.detach().contiguous()?;
        let (keys_t, values_t) = (k.t()?, v.t()?);
        let grad_q = Tensor::zeros(q.shape(), dtype, q.device())?;
        let mut grad_k: Option<Tensor> = None;
        let mut grad_v: Option<Tensor> = None;
        let add = |sum: Option<Tensor>, term: Tensor| -> Result<Tensor> {
            let term = term.to_dtype(DType::F32)?;
            match sum {
                Some(sum) => sum + term,
                None => Ok(term),
            }
        };
        for start in (0..s).step_by(self.rows) {
            let rows = self.rows.min(s - start);
            // `q` in the heads' layout `(b, h, s, d)`; the output and its gradient in the
            // merged one `(b, s, h, d)`.
            let chunk = |t: &Tensor| t.narrow(2, start, rows)?.contiguous();
            let chunk_merged = |t: &Tensor| t.narrow(1, start, rows)?.transpose(1, 2)?.contiguous();
            let (q_c, grad_c) = (chunk(q)?, chunk_merged(&grad)?);
            let probs = (&q_c * self.scale)?
                .matmul(&keys_t)?
                .to_dtype(DType::F32)?
                .broadcast_sub(&self.lse.narrow(2, start, rows)?)?
                .exp()?;
            grad_v = Some(add(grad_v, probs.to_dtype(dtype)?.t()?.matmul(&grad_c)?)?);
            let grad_probs = grad_c.matmul(&values_t)?.to_dtype(DType::F32)?;
            // D = rowsum(P ⊙ dP) in f32.
            let row_dot = (&probs * &grad_probs)?.sum_keepdim(D::Minus1)?;
            let grad_scores = (probs * grad_probs.broadcast_sub(&row_dot)?)?.to_dtype(dtype)?;
            grad_q.slice_set(&(grad_scores.matmul(k)? * self.scale)?, 2, start)?;
            grad_k = Some(add(grad_k, (grad_scores.t()?.matmul(&q_c)? * self.scale)?)?);
        }
        let narrowed = |g: Option<Tensor>| g.map(|g| g.to_dtype(dtype)).transpose();
        Ok((Some(grad_q), narrowed(grad_k)?, narrowed(grad_v)?))
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

    /// The composed form (`nn::attention`'s before this kernel): candle's autograd
    /// differentiates it.
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
        let scores = (q * scale).unwrap().matmul(&k.t().unwrap()).unwrap();
        let dtype = scores.dtype();
        let scores = scores.to_dtype(DType::F32).unwrap();
        let max = scores.max_keepdim(D::Minus1).unwrap().detach();
        let exp = scores.broadcast_sub(&max).unwrap().exp().unwrap();
        let sum = exp.sum_keepdim(D::Minus1).unwrap();
        let weights = exp.broadcast_div(&sum).unwrap().to_dtype(dtype).unwrap();
        weights.matmul(v).unwrap()
    }

    /// Output and every gradient against the composed form, for chunks of one row, of a
    /// number of rows that does not divide the sequence, and of the whole sequence; with
    /// fewer keys than queries (cross-attention). f32 tolerance 1e-5 of each tensor's
    /// scale: the same products, a softmax normalised through ln ℓ instead of 1/ℓ
    /// (a few ulps); bf16 2⁻⁶: one bf16 rounding of the probabilities and of each product
    /// (2⁻⁸ relative each), accumulated over a handful of terms.
    #[test]
    fn matches_the_composed_form_and_its_gradients() {
        let dev = Device::Cpu;
        for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::BF16, 1.0 / 64.0)] {
            for (s, l, rows) in [(7, 7, 1), (7, 7, 3), (7, 7, 7), (9, 4, 2)] {
                let mut rng = rng_for(s as u64 * 31 + rows as u64, "chunked-attention");
                let mut var = |len: usize| {
                    let t = randn(&mut rng, (2, 3, len, 8), &dev).unwrap();
                    Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()
                };
                let (q, k, v) = (var(s), var(l), var(l));
                let upstream = randn(&mut rng, (2, s, 24), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let scale = 1.0 / 8f64.sqrt();
                let ours = attention_in_chunks(&q, &k, &v, scale, rows).unwrap();
                let reference = composed(&q, &k, &v, scale)
                    .transpose(1, 2)
                    .unwrap()
                    .reshape((2, s, 24))
                    .unwrap();
                let label = format!("{dtype:?} s {s} l {l} rows {rows}");
                assert!(
                    max_relative_diff(&ours, &reference) <= tolerance,
                    "{label}: output"
                );
                let ours_grads = grads_of_weighted_sum(&ours, &upstream);
                let reference_grads = grads_of_weighted_sum(&reference, &upstream);
                for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                    let a = ours_grads.get(x).expect("a gradient");
                    let b = reference_grads.get(x).unwrap();
                    let error = max_relative_diff(a, b);
                    assert!(error <= tolerance, "{label}: d{name} {error:e}");
                }
            }
        }
    }

    /// Without tracked operands no graph is kept.
    #[test]
    fn constants_keep_no_graph() {
        let dev = Device::Cpu;
        let t = Tensor::ones((1, 1, 4, 2), DType::F32, &dev).unwrap();
        let out = attention(&t, &t, &t, 0.5).unwrap();
        assert!(!out.track_op());
        // Uniform scores: every row averages the (all-one) values.
        assert_eq!(
            out.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![1.0; 8]
        );
    }
}
