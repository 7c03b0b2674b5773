//! The transformer MLP: `Linear → GELU(tanh) → Linear` (diffusers `FeedForward` with
//! `activation_fn="gelu-approximate"`, `mult=4`).

use super::gelu_linear::gelu_linear;
use super::linear::Linear;
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

    /// `(…, dim) → (…, dim)`; the GELU and the second projection are one op on the CPU
    /// in f32 ([`gelu_linear`]).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        gelu_linear(&self.proj_in.forward(x)?, &self.proj_out)
    }
}
