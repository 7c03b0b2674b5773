//! Multi-head scaled dot-product attention (diffusers `Attention` with `AttnProcessor2_0`):
//! `softmax(q·kᵀ/√d)·v` per head, q/k/v and output projections with bias.
//!
//! The attention proper stores no score-sized tensor for the backward pass: with the
//! fused kernels (the CPU's default) it is latte-rs's fused kernel with its own backward
//! ([`super::fused_attention`]), with the generic ones (every other device) the chunked
//! memory-efficient attention built from tensor ops ([`super::chunked_attention`]); see
//! [`super::kernels`]. (candle's fused `sdpa` and `softmax_last_dim` record no backward.)

use super::gated_linear::{gated_linear, Activation};
use super::kernels::Kernels;
use super::linear::{Linear, Output, StackedLinear};
use super::{chunked_attention, fused_attention};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

/// Keys `to_q`, `to_k`, `to_v`, `to_out.0`.
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl Attention {
    /// Attention over `dim`-wide queries; keys and values come from `context_dim`-wide
    /// tokens (`dim` for self-attention). `bias` applies to q/k/v; the output projection
    /// always has one.
    pub fn new(
        dim: usize,
        context_dim: usize,
        num_heads: usize,
        head_dim: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let inner = num_heads * head_dim;
        Ok(Self {
            to_q: Linear::new(dim, inner, bias, vb.pp("to_q"))?,
            to_k: Linear::new(context_dim, inner, bias, vb.pp("to_k"))?,
            to_v: Linear::new(context_dim, inner, bias, vb.pp("to_v"))?,
            to_out: Linear::new(inner, dim, true, vb.pp("to_out.0"))?,
            num_heads,
            head_dim,
        })
    }

    /// `x`: `(b, s, dim)`; `context`: `(b, l, context_dim)` for cross-attention, `None`
    /// for self-attention. Returns `(b, s, dim)`; with [`Output::GraphOnly`], the output
    /// projection's graph without its values ([`Linear::forward_with`]).
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>, output: Output) -> Result<Tensor> {
        self.to_out.forward_with(&self.attend(x, context)?, output)
    }

    /// Self-attention scaled by adaLN's gate, `gate ⊙ attn(x)`: `x` `(n, s, dim)` holds the
    /// sequences of `v` videos one video after another and `gate` `(v, 1, dim)` one row per
    /// video. The output projection and the gate are one op ([`gated_linear`]) whose
    /// backward does not read its result, so [`Output::GraphOnly`] skips the projection
    /// whether or not the gate is tracked.
    pub fn forward_gated(&self, x: &Tensor, gate: &Tensor, output: Output) -> Result<Tensor> {
        let heads = self.attend(x, None)?;
        let (n, s, inner) = heads.dims3()?;
        let videos = gate.dim(0)?;
        if videos == 0 || !n.is_multiple_of(videos) {
            candle_core::bail!("attention: {n} sequences do not split into {videos} videos");
        }
        // Token-wise from here: one sequence of rows per video, with its gate.
        let per_video = heads.reshape((videos, n / videos * s, inner))?;
        let gated = gated_linear(&per_video, &self.to_out, gate, Activation::Identity, output)?;
        gated.reshape((n, s, ()))
    }

    /// The heads' outputs before the output projection, `(b, s, h·d)`.
    fn attend(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let fused = Kernels::fused_on(x.device());
        if fused && context.is_none() {
            // One product for q, k and v: `[q | k | v]` rows, which the kernel reads in
            // place and whose gradient it returns packed the same way.
            let qkv = StackedLinear::new(&[&self.to_q, &self.to_k, &self.to_v])?.forward(x)?;
            return fused_attention::self_attention(&qkv, self.num_heads, scale);
        }
        let context = context.unwrap_or(x);
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        // (b, s, h·d): the fused kernel reads each head in place.
        if fused {
            return fused_attention::attention(&q, &k, &v, self.num_heads, scale);
        }
        let (q, k, v) = (
            self.split_heads(&q)?,
            self.split_heads(&k)?,
            self.split_heads(&v)?,
        );
        chunked_attention::attention(&q, &k, &v, scale)
    }

    /// The projections under their diffusers names (`to_q`, `to_k`, `to_v`, `to_out.0`).
    pub fn linears_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        vec![
            ("to_q", &mut self.to_q),
            ("to_k", &mut self.to_k),
            ("to_v", &mut self.to_v),
            ("to_out.0", &mut self.to_out),
        ]
    }

    /// `(b, s, h·d) → (b, h, s, d)`.
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        x.reshape((b, s, self.num_heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }
}
