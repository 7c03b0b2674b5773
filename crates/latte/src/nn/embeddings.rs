//! Input embeddings: patches with their 2-D sin-cos positions, the frame positions, the
//! diffusion timestep (adaLN-single) and the caption projection.
//!
//! Upstream: `diffusers/models/embeddings.py` (diffusers 0.42.1): `PatchEmbed`,
//! `get_2d_sincos_pos_embed`, `get_1d_sincos_pos_embed_from_grid`, `get_timestep_embedding`,
//! `PixArtAlphaCombinedTimestepSizeEmbeddings`, `PixArtAlphaTextProjection`, and
//! `normalization.py`: `AdaLayerNormSingle`. Position tables are constants computed here,
//! not weights.

use super::linear::Linear;
use super::ops::gelu_tanh;
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// 1-D sin-cos embedding of positions: `[sin(p·ω), cos(p·ω)]` with
/// `ω_k = 10000^(-k/(dim/2))`, computed in f64. Returns `positions.len() × dim` values.
pub fn sincos_1d(dim: usize, positions: &[f64]) -> Vec<f64> {
    let half = dim / 2;
    let omega: Vec<f64> = (0..half)
        .map(|k| 1.0 / 10000f64.powf(k as f64 / half as f64))
        .collect();
    let mut table = Vec::with_capacity(positions.len() * dim);
    for &p in positions {
        table.extend(omega.iter().map(|w| (p * w).sin()));
        table.extend(omega.iter().map(|w| (p * w).cos()));
    }
    table
}

/// 2-D sin-cos embedding of a `grid_h × grid_w` patch grid, tokens in row-major order:
/// `[emb(column coordinate), emb(row coordinate)]`, each half of `dim`. Coordinates are
/// `index / (grid_len / base_size) / interpolation_scale`, in f32 as diffusers computes them.
pub fn sincos_2d(
    dim: usize,
    grid_h: usize,
    grid_w: usize,
    base_size: usize,
    interpolation_scale: f64,
) -> Vec<f64> {
    let coordinate = |index: usize, len: usize| -> f64 {
        (index as f32 / (len as f32 / base_size as f32) / interpolation_scale as f32) as f64
    };
    let mut cols = Vec::with_capacity(grid_h * grid_w);
    let mut rows = Vec::with_capacity(grid_h * grid_w);
    for r in 0..grid_h {
        for c in 0..grid_w {
            cols.push(coordinate(c, grid_w));
            rows.push(coordinate(r, grid_h));
        }
    }
    let half = dim / 2;
    let (emb_cols, emb_rows) = (sincos_1d(half, &cols), sincos_1d(half, &rows));
    let mut table = Vec::with_capacity(grid_h * grid_w * dim);
    for token in 0..grid_h * grid_w {
        table.extend_from_slice(&emb_cols[token * half..(token + 1) * half]);
        table.extend_from_slice(&emb_rows[token * half..(token + 1) * half]);
    }
    table
}

/// A constant `(1, rows, dim)` table, rounded to f32 as diffusers stores its buffers, then
/// cast to `dtype`.
fn constant_table(
    values: Vec<f64>,
    rows: usize,
    dim: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let values: Vec<f32> = values.into_iter().map(|v| v as f32).collect();
    Tensor::from_vec(values, (1, rows, dim), device)?.to_dtype(dtype)
}

/// Patch embedding: a `patch × patch` convolution with stride `patch` (written as
/// reshape + matmul), plus the 2-D position table. Keys `proj.weight`, `proj.bias`.
#[derive(Debug, Clone)]
pub struct PatchEmbed {
    proj: Linear,
    patch: usize,
    in_channels: usize,
    dim: usize,
    base_size: usize,
    interpolation_scale: f64,
}

impl PatchEmbed {
    /// Loads `proj` (stored as the convolution's `(dim, in_channels, patch, patch)` kernel).
    pub fn new(
        in_channels: usize,
        dim: usize,
        patch: usize,
        base_size: usize,
        interpolation_scale: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let vb = vb.pp("proj");
        let fan_in = in_channels * patch * patch;
        let bound = 1.0 / (fan_in as f64).sqrt();
        let init = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let kernel = vb.get_with_hints((dim, in_channels, patch, patch), "weight", init)?;
        let bias = vb.get_with_hints(dim, "bias", init)?;
        Ok(Self {
            proj: Linear::from_parts(kernel.reshape((dim, fan_in))?, Some(bias)),
            patch,
            in_channels,
            dim,
            base_size,
            interpolation_scale,
        })
    }

    /// `(n, c, h, w)` images → `(n, h/p · w/p, dim)` tokens with positions added.
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = images.dims4()?;
        let p = self.patch;
        let (gh, gw) = (h / p, w / p);
        // (n, c, gh, p, gw, p) → (n, gh, gw, c, p, p) → (n·gh·gw, c·p·p)
        let patches = images
            .reshape(vec![n, c, gh, p, gw, p])?
            .permute(vec![0, 2, 4, 1, 3, 5])?
            .reshape((n, gh * gw, c * p * p))?;
        let tokens = self.proj.forward(&patches)?;
        let table = sincos_2d(self.dim, gh, gw, self.base_size, self.interpolation_scale);
        let positions = constant_table(table, gh * gw, self.dim, DType::F32, tokens.device())?;
        // Positions are added in f32, then cast back, as diffusers adds its f32 buffer.
        tokens
            .to_dtype(DType::F32)?
            .broadcast_add(&positions)?
            .to_dtype(tokens.dtype())
    }

    /// Channels the embedding expects.
    pub fn in_channels(&self) -> usize {
        self.in_channels
    }
}

/// The frame-position table `(1, frames, dim)` added before the first temporal block.
pub fn temporal_positions(
    dim: usize,
    frames: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let positions: Vec<f64> = (0..frames).map(|f| f as f64).collect();
    constant_table(sincos_1d(dim, &positions), frames, dim, dtype, device)
}

/// Sinusoidal timestep features (`get_timestep_embedding` with `flip_sin_to_cos=True`,
/// shift 0): `[cos(t·ω), sin(t·ω)]`, `ω_k = exp(-ln(10⁴)·k/half)`, computed in f32.
pub fn timestep_features(timesteps: &Tensor, channels: usize) -> Result<Tensor> {
    let half = channels / 2;
    let log_period = -(10000f32).ln();
    let freqs: Vec<f32> = (0..half)
        .map(|k| (log_period * k as f32 / half as f32).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), timesteps.device())?;
    let t = timesteps.to_dtype(DType::F32)?.unsqueeze(1)?;
    let angles = t.broadcast_mul(&freqs)?;
    Tensor::cat(&[angles.cos()?, angles.sin()?], 1)
}

/// adaLN-single (PixArt-α): timestep → embedding `e` (keys `emb.timestep_embedder.linear_{1,2}`)
/// and the six modulation vectors `linear(silu(e))` shared by all blocks (key `linear`).
#[derive(Debug, Clone)]
pub struct AdaLayerNormSingle {
    linear_1: Linear,
    linear_2: Linear,
    linear: Linear,
}

/// Width of the sinusoidal timestep features.
const TIMESTEP_CHANNELS: usize = 256;

impl AdaLayerNormSingle {
    /// Loads the timestep MLP and the modulation projection for width `dim`.
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let embedder = vb.pp("emb.timestep_embedder");
        Ok(Self {
            linear_1: Linear::new(TIMESTEP_CHANNELS, dim, true, embedder.pp("linear_1"))?,
            linear_2: Linear::new(dim, dim, true, embedder.pp("linear_2"))?,
            linear: Linear::new(dim, 6 * dim, true, vb.pp("linear"))?,
        })
    }

    /// The linear layers under their diffusers names.
    pub fn linears_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        vec![
            ("emb.timestep_embedder.linear_1", &mut self.linear_1),
            ("emb.timestep_embedder.linear_2", &mut self.linear_2),
            ("linear", &mut self.linear),
        ]
    }

    /// Timesteps `(b,)` → (modulation `(b, 6·dim)`, embedded timestep `(b, dim)`) in `dtype`.
    pub fn forward(&self, timesteps: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        let features = timestep_features(timesteps, TIMESTEP_CHANNELS)?.to_dtype(dtype)?;
        let embedded = self
            .linear_2
            .forward(&self.linear_1.forward(&features)?.silu()?)?;
        let modulation = self.linear.forward(&embedded.silu()?)?;
        Ok((modulation, embedded))
    }
}

/// Caption projection (PixArt-α): `Linear → GELU(tanh) → Linear` from the text-encoder
/// width to the hidden width. Keys `linear_1`, `linear_2`.
#[derive(Debug, Clone)]
pub struct CaptionProjection {
    linear_1: Linear,
    linear_2: Linear,
}

impl CaptionProjection {
    /// Loads the projection `caption_channels → dim → dim`.
    pub fn new(caption_channels: usize, dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::new(caption_channels, dim, true, vb.pp("linear_1"))?,
            linear_2: Linear::new(dim, dim, true, vb.pp("linear_2"))?,
        })
    }

    /// The linear layers under their diffusers names.
    pub fn linears_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        vec![
            ("linear_1", &mut self.linear_1),
            ("linear_2", &mut self.linear_2),
        ]
    }

    /// `(b, l, caption_channels) → (b, l, dim)`.
    pub fn forward(&self, captions: &Tensor) -> Result<Tensor> {
        self.linear_2
            .forward(&gelu_tanh(&self.linear_1.forward(captions)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sincos_1d_starts_with_sines_then_cosines() {
        let table = sincos_1d(4, &[0.0, 1.0]);
        assert_eq!(&table[..4], &[0.0, 0.0, 1.0, 1.0]);
        let omega1 = 1.0 / 10000f64.powf(0.5);
        assert!((table[4] - 1f64.sin()).abs() < 1e-15);
        assert!((table[5] - omega1.sin()).abs() < 1e-15);
        assert!((table[7] - omega1.cos()).abs() < 1e-15);
    }

    #[test]
    fn sincos_2d_puts_the_column_coordinate_first() {
        // A 1×2 grid: token 1 sits in column 1, row 0.
        let table = sincos_2d(8, 1, 2, 2, 1.0);
        let column = sincos_1d(4, &[1.0]);
        let row = sincos_1d(4, &[0.0]);
        assert_eq!(&table[8..12], column.as_slice());
        assert_eq!(&table[12..16], row.as_slice());
    }

    #[test]
    fn timestep_features_are_cos_then_sin() -> Result<()> {
        let t = Tensor::new(&[0f32, 2.0], &Device::Cpu)?;
        let f = timestep_features(&t, 4)?.to_vec2::<f32>()?;
        assert_eq!(f[0], vec![1.0, 1.0, 0.0, 0.0]);
        let w1 = (-(10000f32).ln() / 2.0).exp();
        assert!((f[1][1] - (2.0 * w1).cos()).abs() < 1e-6);
        assert!((f[1][3] - (2.0 * w1).sin()).abs() < 1e-6);
        Ok(())
    }
}
