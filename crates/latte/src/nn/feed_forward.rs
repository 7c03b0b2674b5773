//! The transformer MLP: `Linear → GELU(tanh) → Linear` (diffusers `FeedForward` with
//! `activation_fn="gelu-approximate"`, `mult=4`), with adaLN's gate on its output.

use super::gated_linear::{gated_linear, Activation};
use super::linear::{Linear, Output};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

/// Keys `net.0.proj.*` (the GELU's input projection) and `net.2.*`.
#[derive(Debug, Clone)]
pub struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    /// A `dim → 4·dim → dim` MLP.
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj_in: Linear::new(dim, inner, true, vb.pp("net.0.proj"))?,
            proj_out: Linear::new(inner, dim, true, vb.pp("net.2"))?,
        })
    }

    /// The projections under their diffusers names (`net.0.proj`, `net.2`).
    pub fn linears_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        vec![
            ("net.0.proj", &mut self.proj_in),
            ("net.2", &mut self.proj_out),
        ]
    }

    /// `gate ⊙ ff(x)` for `x`: `(n, s, dim)` and `gate`: `(n, 1, dim)`; the GELU, the
    /// second projection and the gate are one op on the CPU in f32 ([`gated_linear`]),
    /// which skips its work when `output` asks for the graph only.
    pub fn forward_gated(&self, x: &Tensor, gate: &Tensor, output: Output) -> Result<Tensor> {
        let h = self.proj_in.forward(x)?;
        gated_linear(&h, &self.proj_out, gate, Activation::GeluTanh, output)
    }
}
