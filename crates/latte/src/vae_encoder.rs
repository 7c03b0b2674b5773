//! The encoder half of the pipeline's `AutoencoderKL` (diffusers 0.42.1), for making
//! training clips: images in [-1, 1] → the latent distribution `N(mean, std²)` → its mean
//! or a draw, times `scaling_factor`, as Latte's training scripts store latents
//! (`vae.encode(x).latent_dist.sample().mul_(0.18215)`).
//!
//! Built from candle-transformers' public blocks (`DownEncoderBlock2D`, `UNetMidBlock2D`)
//! in diffusers' `Encoder` layout, plus `quant_conv`: candle's own `AutoEncoderKL` keeps
//! the distribution's mean and standard deviation private, and loads the decoder too.
//! Images are encoded one at a time (the mid block's attention is wrong for batches
//! above 1 in candle-transformers 0.11.1; see [`crate::vae`]).

use crate::vae::VaeError;
use candle_core::{DType, Device, Module, Tensor};
use candle_transformers::models::stable_diffusion::unet_2d_blocks::{
    DownEncoderBlock2D, DownEncoderBlock2DConfig, UNetMidBlock2D, UNetMidBlock2DConfig,
};
use std::path::Path;

/// Which latent an image encodes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatentDraw {
    /// The distribution's mean (deterministic).
    Mean,
    /// `mean + std·ε`, ε from a generator seeded by `(seed, image index)` — Latte's
    /// training scripts draw (`latent_dist.sample()`).
    Sample(u64),
}

/// diffusers' `Encoder` (`conv_in`, down blocks, mid block, norm, SiLU, `conv_out`) and
/// `quant_conv`.
pub struct VaeEncoder {
    conv_in: candle_nn::Conv2d,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: UNetMidBlock2D,
    conv_norm_out: candle_nn::GroupNorm,
    conv_out: candle_nn::Conv2d,
    quant_conv: Option<candle_nn::Conv2d>,
    scaling_factor: f64,
    dtype: DType,
    dir: String,
}

/// diffusers' group-norm epsilon in the VAE.
const NORM_EPS: f64 = 1e-6;

impl VaeEncoder {
    /// Opens the encoder of the VAE in `dir` (`config.json` + diffusers weights; the
    /// decoder's weights are not read), with weights in `dtype`.
    pub fn open(dir: &Path, dtype: DType, device: &Device) -> Result<Self, VaeError> {
        let (config, resolved, vb) = crate::vae::open_weights(dir, dtype, device)?;
        let name = dir.display().to_string();
        let candle = |source| VaeError::Candle {
            dir: name.clone(),
            source,
        };
        let channels = &resolved.block_out_channels;
        let groups = resolved.norm_num_groups;
        let padded = candle_nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let encoder = vb.pp("encoder");
        let conv_in = candle_nn::conv2d(
            config.in_channels,
            channels[0],
            3,
            padded,
            encoder.pp("conv_in"),
        )
        .map_err(candle)?;
        let mut down_blocks = Vec::with_capacity(channels.len());
        for (i, &out) in channels.iter().enumerate() {
            let block = DownEncoderBlock2DConfig {
                num_layers: resolved.layers_per_block,
                resnet_eps: NORM_EPS,
                resnet_groups: groups,
                add_downsample: i + 1 < channels.len(),
                downsample_padding: 0,
                ..Default::default()
            };
            let input = channels[i.saturating_sub(1)];
            down_blocks.push(
                DownEncoderBlock2D::new(encoder.pp("down_blocks").pp(i), input, out, block)
                    .map_err(candle)?,
            );
        }
        let last = *channels.last().unwrap_or(&channels[0]);
        let mid = UNetMidBlock2DConfig {
            resnet_eps: NORM_EPS,
            output_scale_factor: 1.0,
            attn_num_head_channels: None,
            resnet_groups: Some(groups),
            ..Default::default()
        };
        let mid_block =
            UNetMidBlock2D::new(encoder.pp("mid_block"), last, None, mid).map_err(candle)?;
        let conv_norm_out =
            candle_nn::group_norm(groups, last, NORM_EPS, encoder.pp("conv_norm_out"))
                .map_err(candle)?;
        let moments = 2 * resolved.latent_channels;
        let conv_out =
            candle_nn::conv2d(last, moments, 3, padded, encoder.pp("conv_out")).map_err(candle)?;
        let quant_conv = resolved
            .use_quant_conv
            .then(|| {
                candle_nn::conv2d(moments, moments, 1, Default::default(), vb.pp("quant_conv"))
            })
            .transpose()
            .map_err(candle)?;
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block,
            conv_norm_out,
            conv_out,
            quant_conv,
            scaling_factor: config.scaling_factor,
            dtype,
            dir: name,
        })
    }

    /// The latent distribution of one image `(1, in_channels, H, W)`: `(mean, std)`.
    pub fn distribution(&self, image: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let mut xs = image.to_dtype(self.dtype)?.apply(&self.conv_in)?;
        for block in &self.down_blocks {
            xs = xs.apply(block)?;
        }
        let xs = self
            .mid_block
            .forward(&xs, None)?
            .apply(&self.conv_norm_out)?;
        let mut moments = candle_nn::ops::silu(&xs)?.apply(&self.conv_out)?;
        if let Some(quant_conv) = &self.quant_conv {
            moments = quant_conv.forward(&moments)?;
        }
        let latent_channels = moments.dim(1)? / 2;
        let mean = moments.narrow(1, 0, latent_channels)?;
        // diffusers clamps the log-variance to [-30, 20].
        let logvar = moments
            .narrow(1, latent_channels, latent_channels)?
            .clamp(-30.0, 20.0)?;
        let std = (logvar * 0.5)?.exp()?;
        Ok((mean, std))
    }

    /// `AutoencoderKL.encode` of images `(n, in_channels, H, W)` in [-1, 1], image by
    /// image: latents `(n, latent_channels, H/s, W/s)` times `scaling_factor`, in f32.
    pub fn encode(&self, images: &Tensor, draw: LatentDraw) -> Result<Tensor, VaeError> {
        let candle = |source| VaeError::Candle {
            dir: self.dir.clone(),
            source,
        };
        let mut latents = Vec::new();
        for i in 0..images.dim(0).map_err(candle)? {
            let image = images.narrow(0, i, 1).map_err(candle)?;
            let (mean, std) = self.distribution(&image).map_err(candle)?;
            let latent = match draw {
                LatentDraw::Mean => Ok(mean),
                LatentDraw::Sample(seed) => {
                    let mut rng = crate::random::rng_for(seed, &format!("vae-sample-{i}"));
                    let noise = crate::random::normal_values(&mut rng, mean.elem_count());
                    Tensor::from_vec(noise, mean.shape(), mean.device())
                        .and_then(|e| e.to_dtype(mean.dtype()))
                        .and_then(|e| mean + (std * e)?)
                }
            };
            let latent = latent
                .and_then(|t| t.to_dtype(DType::F32))
                .and_then(|t| t * self.scaling_factor)
                .map_err(candle)?;
            latents.push(latent);
        }
        Tensor::cat(&latents, 0).map_err(candle)
    }
}
