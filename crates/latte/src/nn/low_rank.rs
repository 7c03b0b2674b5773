//! A low-rank update of a linear layer (LoRA; PEFT's `lora.Linear`):
//!
//! ```text
//! y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ        A: (r, in)   B: (out, r)   s = α/r  (α/√r with rsLoRA)
//! ```
//!
//! The update is never formed as a matrix while training: the two thin products cost
//! `2·r·(in + out)` FLOPs per row and keep `x` (for `∂A`) and `x·Aᵀ`, `r` values per row
//! (for `∂B`). The scale is folded into `B` (`(x·Aᵀ)·(s·B)ᵀ`, an `out × r` product).
//!
//! The factors are f32 (they are what an optimiser updates); on half-precision
//! activations they are cast to the activations' dtype for the products, so that `x` is
//! kept as it is rather than as an f32 copy, and their gradients flow back through the
//! cast to f32 — mixed precision, as autocast does. In f32 the products are PEFT's.

use candle_core::{DType, Result, Tensor};

/// `s·B·A` for a layer `in → out`: the factors `A` (down, `(r, in)`) and `B` (up,
/// `(out, r)`), and the scale `s`.
#[derive(Debug, Clone)]
pub struct LowRank {
    down: Tensor,
    up: Tensor,
    scale: f64,
}

impl LowRank {
    /// An update from `down` `(r, in)`, `up` `(out, r)` and `scale`.
    ///
    /// # Errors
    /// When the factors' shapes do not share a rank.
    pub fn new(down: Tensor, up: Tensor, scale: f64) -> Result<Self> {
        let (rank, _) = down.dims2()?;
        let (_, up_rank) = up.dims2()?;
        if rank != up_rank {
            candle_core::bail!(
                "low-rank update: down {:?} and up {:?} must share the rank (r, in) / (out, r)",
                down.dims(),
                up.dims()
            );
        }
        Ok(Self { down, up, scale })
    }

    /// `A`, `(r, in)`.
    pub fn down(&self) -> &Tensor {
        &self.down
    }

    /// `B`, `(out, r)`.
    pub fn up(&self) -> &Tensor {
        &self.up
    }

    /// `s`.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Output width of the layer it updates.
    pub fn out_dim(&self) -> usize {
        self.up.dims()[0]
    }

    /// `s·(x·Aᵀ)·Bᵀ` for `x` `(…, in)`: `(…, out)` in `x`'s dtype.
    pub fn delta(&self, x: &Tensor) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        let in_dim = dims.pop().unwrap_or(1);
        let rows = x.elem_count() / in_dim.max(1);
        let (down, up) = self.factors(x.dtype())?;
        let reduced = x.reshape((rows, in_dim))?.matmul(&down.t()?)?;
        dims.push(self.out_dim());
        reduced.matmul(&up.t()?)?.reshape(dims)
    }

    /// `gate ⊙ s·(x·Aᵀ)·Bᵀ` for `x` `(v, rows, in)` and one gate row per sequence,
    /// `gate` `(v, 1, out)`: the gate scales the columns of each sequence's `(s·B)ᵀ`
    /// (`(v, r, out)`), so nothing of the output's size is kept for its gradient.
    pub fn gated_delta(&self, x: &Tensor, gate: &Tensor) -> Result<Tensor> {
        let (v, rows, in_dim) = x.dims3()?;
        let (down, up) = self.factors(x.dtype())?;
        let reduced = x
            .reshape((v * rows, in_dim))?
            .matmul(&down.t()?)?
            .reshape((v, rows, ()))?;
        let gated_up = up.t()?.unsqueeze(0)?.broadcast_mul(gate)?;
        reduced.matmul(&gated_up)
    }

    /// `s·B·A` `(out, in)` in f32: the update merged into a weight.
    pub fn weight_delta(&self) -> Result<Tensor> {
        self.up
            .to_dtype(DType::F32)?
            .matmul(&self.down.to_dtype(DType::F32)?)?
            .affine(self.scale, 0.0)
    }

    /// `A` and `s·B` in `dtype` (the scale applied in f32, before the cast).
    fn factors(&self, dtype: DType) -> Result<(Tensor, Tensor)> {
        Ok((
            self.down.to_dtype(dtype)?,
            self.up.affine(self.scale, 0.0)?.to_dtype(dtype)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::max_relative_diff;
    use super::*;
    use candle_core::Device;

    fn values(len: usize, seed: usize, shape: &[usize]) -> Tensor {
        let v: Vec<f32> = (0..len)
            .map(|i| (((i * 31 + seed * 7) % 23) as f32 - 11.0) / 13.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The thin products equal the merged weight's product, and the gated form equals
    /// the gate applied to the output.
    #[test]
    fn thin_products_equal_the_merged_update() {
        let (r, inner, out) = (3, 10, 7);
        let update = LowRank::new(
            values(r * inner, 1, &[r, inner]),
            values(out * r, 2, &[out, r]),
            0.75,
        )
        .unwrap();
        let x = values(2 * 5 * inner, 3, &[2, 5, inner]);
        let merged = x
            .reshape((10, inner))
            .unwrap()
            .matmul(&update.weight_delta().unwrap().t().unwrap())
            .unwrap()
            .reshape((2, 5, out))
            .unwrap();
        let delta = update.delta(&x).unwrap();
        assert!(max_relative_diff(&delta, &merged) < 1e-6);
        let gate = values(2 * out, 4, &[2, 1, out]);
        let gated = update.gated_delta(&x, &gate).unwrap();
        let expected = merged.broadcast_mul(&gate).unwrap();
        assert!(max_relative_diff(&gated, &expected) < 1e-6);
    }

    #[test]
    fn factors_must_share_the_rank() {
        let error = LowRank::new(values(6, 0, &[2, 3]), values(12, 0, &[4, 3]), 1.0)
            .unwrap_err()
            .to_string();
        assert!(error.contains("share the rank"), "{error}");
    }
}
