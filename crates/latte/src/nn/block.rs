//! The Latte transformer block (diffusers `BasicTransformerBlock` with
//! `norm_type="ada_norm_single"`), as PixArt-α defines it:
//!
//! ```text
//! shift₁ scale₁ gate₁ shift₂ scale₂ gate₂ = scale_shift_table + t        (6 × d)
//! h += gate₁ · attn1(norm(h)·(1 + scale₁) + shift₁)
//! h += attn2(h, captions)                                 (spatial blocks only)
//! h += gate₂ · ff(norm(h)·(1 + scale₂) + shift₂)
//! ```
//!
//! The block runs as two halves, attention and feed-forward, which the model schedules as
//! separate stages so that the checkpoint planner may keep one half's graph and recompute
//! the other.

use super::attention::Attention;
use super::feed_forward::FeedForward;
use super::linear::{Linear, Output};
use super::norm::modulated_layer_norm;
use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// One spatial (with cross-attention) or temporal (without) block.
#[derive(Debug, Clone)]
pub struct TransformerBlock {
    attn1: Attention,
    attn2: Option<Attention>,
    ff: FeedForward,
    scale_shift_table: Tensor,
    norm_eps: f64,
}

/// Shape of a block.
#[derive(Debug, Clone, Copy)]
pub struct BlockSpec {
    pub num_heads: usize,
    pub head_dim: usize,
    pub attention_bias: bool,
    pub norm_eps: f64,
    /// Whether the block cross-attends to captions (spatial blocks).
    pub cross_attention: bool,
}

impl TransformerBlock {
    /// Loads a block's weights (`attn1.*`, `attn2.*`, `ff.*`, `scale_shift_table`).
    pub fn new(spec: BlockSpec, vb: VarBuilder) -> Result<Self> {
        let dim = spec.num_heads * spec.head_dim;
        let attention = |name: &str| {
            Attention::new(
                dim,
                dim,
                spec.num_heads,
                spec.head_dim,
                spec.attention_bias,
                vb.pp(name),
            )
        };
        let table_init = Init::Randn {
            mean: 0.0,
            stdev: 1.0 / (dim as f64).sqrt(),
        };
        Ok(Self {
            attn1: attention("attn1")?,
            attn2: if spec.cross_attention {
                Some(attention("attn2")?)
            } else {
                None
            },
            ff: FeedForward::new(dim, vb.pp("ff"))?,
            scale_shift_table: vb.get_with_hints((6, dim), "scale_shift_table", table_init)?,
            norm_eps: spec.norm_eps,
        })
    }

    /// The attention half: `h += gate₁ · attn1(norm(h)·(1 + scale₁) + shift₁)`, then the
    /// cross-attention of spatial blocks. `h`: `(n, s, d)` token sequences, those of each
    /// video one after another; `timestep`: `(v, 6·d)` modulation, one row per video;
    /// `captions`: `(n, l, d)`, required by spatial blocks. With [`Output::GraphOnly`] the
    /// last output projection computes no values (its backward reads none): the
    /// cross-attention's, or the gated self-attention's of a temporal block.
    pub fn attention_half(
        &self,
        h: &Tensor,
        timestep: &Tensor,
        captions: Option<&Tensor>,
        output: Output,
    ) -> Result<Tensor> {
        let [shift_msa, scale_msa, gate_msa] = self.modulation(timestep, 0)?;
        // The norm is token-wise: one sequence of rows per video, with its modulation.
        let (n, s, d) = h.dims3()?;
        let per_video = h.reshape((timestep.dim(0)?, (), d))?;
        let x = modulated_layer_norm(&per_video, &shift_msa, &scale_msa, self.norm_eps)?
            .reshape((n, s, d))?;
        let attn1_output = match self.attn2 {
            None => output,
            Some(_) => Output::Values,
        };
        let h = (h + self.attn1.forward_gated(&x, &gate_msa, attn1_output)?)?;
        match &self.attn2 {
            Some(attn2) => {
                let captions = captions.ok_or_else(|| {
                    candle_core::Error::Msg("a spatial block needs the caption tokens".into())
                })?;
                &h + attn2.forward(&h, Some(captions), output)?
            }
            None => Ok(h),
        }
    }

    /// The feed-forward half: `h += gate₂ · ff(norm(h)·(1 + scale₂) + shift₂)`. Token-wise,
    /// so any layout of the tokens into `(n, s, d)` sequences gives the same result, as
    /// long as `timestep` has the `(n, 6·d)` modulation of each sequence's video. With
    /// [`Output::GraphOnly`] the result's values are not computed (the gated product is
    /// zeros), only its graph: for a recomputation right before the half's backward.
    pub fn feed_forward_half(
        &self,
        h: &Tensor,
        timestep: &Tensor,
        output: Output,
    ) -> Result<Tensor> {
        let [shift_mlp, scale_mlp, gate_mlp] = self.modulation(timestep, 3)?;
        let x = modulated_layer_norm(h, &shift_mlp, &scale_mlp, self.norm_eps)?;
        h + self.ff.forward_gated(&x, &gate_mlp, output)?
    }

    /// The linear layers under their names in the block (`attn1.to_q`, …, `ff.net.2`).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut layers = Vec::new();
        let attentions = [Some(&mut self.attn1), self.attn2.as_mut()];
        for (name, attention) in ["attn1", "attn2"].into_iter().zip(attentions) {
            if let Some(attention) = attention {
                layers.extend(
                    attention
                        .linears_mut()
                        .into_iter()
                        .map(|(layer, l)| (format!("{name}.{layer}"), l)),
                );
            }
        }
        layers.extend(
            self.ff
                .linears_mut()
                .into_iter()
                .map(|(layer, l)| (format!("ff.{layer}"), l)),
        );
        layers
    }

    /// Rows `first..first + 3` of `scale_shift_table + t`: three `(v, 1, d)` vectors
    /// (shift, scale, gate) from the `(v, 6·d)` modulation.
    fn modulation(&self, timestep: &Tensor, first: usize) -> Result<[Tensor; 3]> {
        let (n, six_d) = timestep.dims2()?;
        let d = six_d / 6;
        let table = self.scale_shift_table.narrow(0, first, 3)?.unsqueeze(0)?;
        let rows = timestep
            .reshape((n, 6, d))?
            .narrow(1, first, 3)?
            .broadcast_add(&table)?;
        Ok([
            rows.narrow(1, 0, 1)?,
            rows.narrow(1, 1, 1)?,
            rows.narrow(1, 2, 1)?,
        ])
    }
}
