//! A fully connected layer, `y = x·Wᵀ + b`, over the last dimension of any-rank input.

use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// `torch.nn.Linear`: weight `(out, in)`, optional bias `(out,)`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
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
        Ok(Self { weight, bias })
    }

    /// A layer from an existing weight `(out, in)` and bias.
    pub fn from_parts(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
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
        let mut out_dims = x.dims().to_vec();
        let in_dim = out_dims.pop().unwrap_or(1);
        let rows = x.elem_count() / in_dim.max(1);
        let (out_dim, _) = self.weight.dims2()?;
        // (…, in) → (rows, in) · (in, out) → (…, out)
        let y = x.reshape((rows, in_dim))?.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        };
        out_dims.push(out_dim);
        y.reshape(out_dims)
    }
}
