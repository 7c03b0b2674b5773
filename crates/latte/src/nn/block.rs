//! The Latte transformer block (diffusers `BasicTransformerBlock` with
//! `norm_type="ada_norm_single"`), as PixArt-α defines it:
//!
//! ```text
//! shift₁ scale₁ gate₁ shift₂ scale₂ gate₂ = scale_shift_table + t        (6 × d)
//! h += gate₁ · attn1(norm(h)·(1 + scale₁) + shift₁)
//! h += attn2(h, captions)                                 (spatial blocks only)
//! h += gate₂ · ff(norm(h)·(1 + scale₂) + shift₂)
//! ```

use super::attention::Attention;
use super::feed_forward::FeedForward;
use super::norm::{layer_norm, modulate};
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

    /// `h`: `(n, s, d)` token sequences; `timestep`: `(n, 6·d)` modulation, one row per
    /// sequence; `captions`: `(n, l, d)`, required by spatial blocks.
    pub fn forward(
        &self,
        h: &Tensor,
        timestep: &Tensor,
        captions: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (n, _, d) = h.dims3()?;
        // (6, d) + (n, 6, d) → six (n, 1, d) modulation vectors
        let modulation = timestep
            .reshape((n, 6, d))?
            .broadcast_add(&self.scale_shift_table.unsqueeze(0)?)?;
        let part = |i: usize| modulation.narrow(1, i, 1);
        let (shift_msa, scale_msa, gate_msa) = (part(0)?, part(1)?, part(2)?);
        let (shift_mlp, scale_mlp, gate_mlp) = (part(3)?, part(4)?, part(5)?);

        let x = modulate(&layer_norm(h, self.norm_eps)?, &shift_msa, &scale_msa)?;
        let h = (h + self.attn1.forward(&x, None)?.broadcast_mul(&gate_msa)?)?;
        let h = match &self.attn2 {
            Some(attn2) => {
                let captions = captions.ok_or_else(|| {
                    candle_core::Error::Msg("a spatial block needs the caption tokens".into())
                })?;
                (&h + attn2.forward(&h, Some(captions))?)?
            }
            None => h,
        };
        let x = modulate(&layer_norm(&h, self.norm_eps)?, &shift_mlp, &scale_mlp)?;
        h + self.ff.forward(&x)?.broadcast_mul(&gate_mlp)?
    }
}
