//! The pipeline's `vae/`: diffusers' `AutoencoderKL`, run by candle-transformers'
//! `stable_diffusion::vae::AutoEncoderKL` (its weight names are diffusers' layout, old
//! `query/key/value` and new `to_q/to_k/to_v` attention keys alike). Decoding follows
//! LattePipeline's `decode_latents` (diffusers 0.42.1): latents / `scaling_factor`, every
//! frame decoded on its own, then `postprocess_video` to [0, 1]. Encoding is
//! [`crate::vae_encoder`].
//!
//! One image at a time: candle-transformers 0.11.1's single-head `AttentionBlock` is wrong
//! for batches above 1 (its value tensor keeps a layout with a unit head dimension that
//! candle's batched matmul mishandles, the `force_contiguous` TODO in its source; measured
//! here: relative error 0.5 on a batch of 6, 1e-7 image by image). The VAE is 2-D, so
//! decoding frame by frame gives what any `decode_chunk_size` gives, at the least memory.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};
use serde::Deserialize;
use std::path::Path;

/// Errors raised while loading or running the VAE.
#[derive(Debug, thiserror::Error)]
pub enum VaeError {
    /// `config.json` is unreadable or malformed.
    #[error("VAE config {path}: {message}")]
    Config { path: String, message: String },
    /// A config key holds a value the candle VAE does not implement.
    #[error("VAE config {path}: key `{key}` = {value} is not supported: {supported}")]
    Unsupported {
        path: String,
        key: &'static str,
        value: String,
        supported: &'static str,
    },
    /// The weights could not be opened.
    #[error(transparent)]
    Weights(#[from] crate::weights::WeightsError),
    /// A tensor operation failed (a missing or mis-shaped weight names the tensor).
    #[error("VAE {dir}: {source}")]
    Candle {
        dir: String,
        source: candle_core::Error,
    },
}

/// `vae/config.json` of diffusers' `AutoencoderKL`, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct VaeConfigFile {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub act_fn: String,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    /// Latents are divided by it before decoding (Latte-1: 0.18215).
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    pub latents_mean: Option<Vec<f64>>,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

impl Default for VaeConfigFile {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            latents_mean: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl VaeConfigFile {
    /// Checks the keys the candle VAE fixes, and returns its config.
    fn resolve(&self, path: &Path) -> Result<AutoEncoderKLConfig, VaeError> {
        let unsupported = |key, value: String, supported| VaeError::Unsupported {
            path: path.display().to_string(),
            key,
            value,
            supported,
        };
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(unsupported(
                "block_out_channels",
                "[]".into(),
                "at least one block",
            ));
        }
        if self.down_block_types.len() != n
            || self
                .down_block_types
                .iter()
                .any(|t| t != "DownEncoderBlock2D")
        {
            return Err(unsupported(
                "down_block_types",
                format!("{:?}", self.down_block_types),
                "one \"DownEncoderBlock2D\" per block_out_channels entry",
            ));
        }
        if self.up_block_types.len() != n
            || self.up_block_types.iter().any(|t| t != "UpDecoderBlock2D")
        {
            return Err(unsupported(
                "up_block_types",
                format!("{:?}", self.up_block_types),
                "one \"UpDecoderBlock2D\" per block_out_channels entry",
            ));
        }
        if self.act_fn != "silu" {
            return Err(unsupported(
                "act_fn",
                format!("{:?}", self.act_fn),
                "\"silu\"",
            ));
        }
        if !self.mid_block_add_attention {
            return Err(unsupported(
                "mid_block_add_attention",
                "false".into(),
                "true",
            ));
        }
        if let Some(shift) = self.shift_factor {
            return Err(unsupported("shift_factor", shift.to_string(), "null"));
        }
        if self.latents_mean.is_some() {
            return Err(unsupported("latents_mean", "a list".into(), "null"));
        }
        Ok(AutoEncoderKLConfig {
            block_out_channels: self.block_out_channels.clone(),
            layers_per_block: self.layers_per_block,
            latent_channels: self.latent_channels,
            norm_num_groups: self.norm_num_groups,
            use_quant_conv: self.use_quant_conv,
            use_post_quant_conv: self.use_post_quant_conv,
        })
    }
}

/// The VAE in `dir`: its config file, the config the candle blocks take (checked), and
/// its mapped weights in `dtype` on `device`.
pub(crate) fn open_weights(
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(VaeConfigFile, AutoEncoderKLConfig, VarBuilder<'static>), VaeError> {
    let path = dir.join("config.json");
    let config: VaeConfigFile =
        crate::io::read_json(&path).map_err(|message| VaeError::Config {
            path: path.display().to_string(),
            message,
        })?;
    let resolved = config.resolve(&path)?;
    let (files, _) = crate::weights::weight_files(dir, VAE_WEIGHTS_FILE, VAE_WEIGHTS_INDEX_FILE)?;
    let tensors = crate::weights::map_files(&files)?;
    let vb = VarBuilder::from_backend(Box::new(tensors), dtype, device.clone());
    Ok((config, resolved, vb))
}

/// File names of diffusers' single-file and sharded weights.
const VAE_WEIGHTS_FILE: &str = crate::weights::WEIGHTS_FILE;
const VAE_WEIGHTS_INDEX_FILE: &str = crate::weights::WEIGHTS_INDEX_FILE;

/// The pipeline's VAE.
pub struct Vae {
    model: AutoEncoderKL,
    config: VaeConfigFile,
    dtype: DType,
    dir: String,
}

impl Vae {
    /// Opens `dir` (`config.json` + diffusers weights), with weights in `dtype`.
    pub fn open(dir: &Path, dtype: DType, device: &Device) -> Result<Self, VaeError> {
        let (config, resolved, vb) = open_weights(dir, dtype, device)?;
        let dir = dir.display().to_string();
        let model = AutoEncoderKL::new(vb, config.in_channels, config.out_channels, resolved)
            .map_err(|source| VaeError::Candle {
                dir: dir.clone(),
                source,
            })?;
        Ok(Self {
            model,
            config,
            dtype,
            dir,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &VaeConfigFile {
        &self.config
    }

    /// Pixels per latent pixel: 2^(number of blocks − 1) (LattePipeline's
    /// `vae_scale_factor`; 8 for Latte-1).
    pub fn scale_factor(&self) -> usize {
        1 << (self.config.block_out_channels.len() - 1)
    }

    /// `AutoencoderKL.decode` of latents (n, latent_channels, h, w) as stored (no
    /// scaling), image by image: images (n, out_channels, h·s, w·s), roughly in [-1, 1],
    /// in f32.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor, VaeError> {
        let candle = |source| VaeError::Candle {
            dir: self.dir.clone(),
            source,
        };
        let mut images = Vec::new();
        for i in 0..latents.dim(0).map_err(candle)? {
            let image = latents
                .narrow(0, i, 1)
                .and_then(|t| t.to_dtype(self.dtype))
                .and_then(|t| self.model.decode(&t))
                .and_then(|t| t.to_dtype(DType::F32))
                .map_err(candle)?;
            images.push(image);
        }
        Tensor::cat(&images, 0).map_err(candle)
    }

    /// LattePipeline's `decode_latents` + `postprocess_video`: sampled latents
    /// (b, c, f, h, w) → video (b, 3, f, h·s, w·s) in [0, 1].
    pub fn decode_video(&self, latents: &Tensor) -> Result<Tensor, VaeError> {
        let candle = |source| VaeError::Candle {
            dir: self.dir.clone(),
            source,
        };
        let (b, c, f, h, w) = latents.dims5().map_err(candle)?;
        // (b, c, f, h, w) → (b·f, c, h, w), divided by the scaling factor
        let flat = (latents
            .permute((0, 2, 1, 3, 4))
            .and_then(|t| t.reshape((b * f, c, h, w)))
            .map_err(candle)?
            / self.config.scaling_factor)
            .map_err(candle)?;
        let images = self.decode(&flat)?;
        let (_, ch, hp, wp) = images.dims4().map_err(candle)?;
        // (b·f, ch, H, W) → (b, ch, f, H, W), then [-1, 1] → [0, 1] clamped
        images
            .reshape((b, f, ch, hp, wp))
            .and_then(|t| t.permute((0, 2, 1, 3, 4)))
            .and_then(|t| ((t / 2.0)? + 0.5)?.clamp(0.0, 1.0))
            .map_err(candle)
    }
}
