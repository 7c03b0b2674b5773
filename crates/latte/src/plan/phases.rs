//! The phases of text-to-video sampling around the transformer's steps, each with only its
//! own model loaded (`latte sample` runs them in this order and frees each before the
//! next): the text encoder on the prompt and the negative prompt, the sampling steps (the
//! [`super::MemoryAccount`] and the chain), and the VAE decoding the latents frame by
//! frame. A phase holds its weights and its largest transient; the pipeline's peak is the
//! largest phase's.
//!
//! Weights are counted from the components' safetensors headers in the precision they are
//! loaded in. Transients are estimates from the shapes, stated per phase below; the
//! tokenizer's own host structures are not counted.

use crate::pipeline::{PipelineDir, PipelineError};
use crate::t5::T5ConfigFile;
use crate::text_encoder::MAX_SEQUENCE_LENGTH;
use crate::vae::VaeConfigFile;
use candle_core::DType;
use serde::Serialize;
use std::path::Path;

/// Memory of one phase, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PhaseMemory {
    /// The phase's name.
    pub name: &'static str,
    /// Its model's weights in the precision they are loaded in.
    pub weights_bytes: u64,
    /// Its largest transient (activations, and outputs it holds).
    pub transient_bytes: u64,
}

impl PhaseMemory {
    /// Weights and transient.
    pub fn peak_bytes(&self) -> u64 {
        self.weights_bytes + self.transient_bytes
    }
}

/// The text encoder's phase: T5's weights in `dtype`, and one padded sequence's layer
/// (hidden states, q/k/v, attention scores and probabilities, the shared position bias,
/// the gated feed-forward's three `d_ff`-wide tensors) in `dtype`, with the f32 output of
/// both prompts.
pub fn text_encoder_phase(
    pipeline: &PipelineDir,
    dtype: DType,
) -> Result<PhaseMemory, PipelineError> {
    text_encoder_batch_phase(pipeline, dtype, 2)
}

/// [`text_encoder_phase`] for `batch` sequences encoded at once (`latte encode`'s caption
/// batches): the layer's transient per sequence, and the f32 outputs of the batch.
pub fn text_encoder_batch_phase(
    pipeline: &PipelineDir,
    dtype: DType,
    batch: usize,
) -> Result<PhaseMemory, PipelineError> {
    let dir = pipeline.root().join("text_encoder");
    let config: T5ConfigFile = read_config(&dir)?;
    let elements = stored_elements(
        &dir,
        "model.safetensors",
        "model.safetensors.index.json",
        |_| true,
    )?;
    let elem = dtype.size_in_bytes() as u64;
    let l = MAX_SEQUENCE_LENGTH as u64;
    let (d, heads) = (config.d_model as u64, config.num_heads as u64);
    let inner = heads * config.d_kv as u64;
    let attention = 2 * l * d + 4 * l * inner + 3 * heads * l * l;
    let feed_forward = 2 * l * d + 3 * l * config.d_ff as u64 + heads * l * l;
    let batch = batch as u64;
    let outputs = batch * 4 * l * d;
    Ok(PhaseMemory {
        name: "text encoder",
        weights_bytes: elements * elem,
        transient_bytes: batch * attention.max(feed_forward) * elem + outputs,
    })
}

/// The VAE decode's phase for `frames` latents of `height × width`: the VAE's weights in
/// `dtype` (encoder and decoder: candle's `AutoEncoderKL` loads both), one frame's largest
/// level (a resnet's four feature maps, or an upsampling's input, upsampled copy and
/// convolution; the mid block's single-head attention scores at the latent size), and the
/// decoded frames held until the video is assembled (twice, f32).
pub fn vae_decode_phase(
    pipeline: &PipelineDir,
    dtype: DType,
    frames: usize,
    height: usize,
    width: usize,
) -> Result<PhaseMemory, PipelineError> {
    let dir = pipeline.root().join("vae");
    let config: VaeConfigFile = read_config(&dir)?;
    let elements = vae_elements(&dir, |_| true)?;
    let elem = dtype.size_in_bytes() as u64;
    let latent_pixels = (height * width) as u64;
    let channels: Vec<u64> = config
        .block_out_channels
        .iter()
        .rev()
        .map(|&c| c as u64)
        .collect();
    let mut largest = 2 * latent_pixels * latent_pixels + 4 * channels[0] * latent_pixels;
    for (level, &c) in channels.iter().enumerate() {
        let pixels = latent_pixels << (2 * level);
        largest = largest.max(4 * c * pixels);
        if level + 1 < channels.len() {
            largest = largest.max(c * pixels + 2 * c * 4 * pixels);
        }
    }
    let scale = 1u64 << (2 * (channels.len() as u64 - 1));
    let video = 2 * 4 * frames as u64 * config.out_channels as u64 * latent_pixels * scale;
    Ok(PhaseMemory {
        name: "VAE decode",
        weights_bytes: elements * elem,
        transient_bytes: largest * elem + video,
    })
}

/// The VAE encoder's phase for frames of `height × width` pixels: the encoder's weights
/// (`encoder.*`, `quant_conv.*`) in `dtype`, and one frame's largest level (a resnet's four
/// feature maps, or a downsampling's input and output; the mid block's attention scores
/// at the latent size), encoded one at a time.
pub fn vae_encode_phase(
    pipeline: &PipelineDir,
    dtype: DType,
    height: usize,
    width: usize,
) -> Result<PhaseMemory, PipelineError> {
    let dir = pipeline.root().join("vae");
    let config: VaeConfigFile = read_config(&dir)?;
    let elements = vae_elements(&dir, |name| {
        name.starts_with("encoder.") || name.starts_with("quant_conv.")
    })?;
    let elem = dtype.size_in_bytes() as u64;
    let pixels = (height * width) as u64;
    let mut largest = 0;
    for (level, &c) in config.block_out_channels.iter().enumerate() {
        let at_level = pixels >> (2 * level);
        largest = largest.max(4 * c as u64 * at_level);
    }
    let levels = config.block_out_channels.len().saturating_sub(1);
    let latent_pixels = pixels >> (2 * levels);
    let last = *config.block_out_channels.last().unwrap_or(&1) as u64;
    largest = largest.max(2 * latent_pixels * latent_pixels + 4 * last * latent_pixels);
    Ok(PhaseMemory {
        name: "VAE encode",
        weights_bytes: elements * elem,
        transient_bytes: largest * elem + 4 * 3 * pixels,
    })
}

fn read_config<T: serde::de::DeserializeOwned>(dir: &Path) -> Result<T, PipelineError> {
    let path = dir.join("config.json");
    crate::io::read_json(&path).map_err(|message| PipelineError::Json {
        path: path.display().to_string(),
        message,
    })
}

/// Elements of the tensors `wanted` by name in a component's weights (single file or
/// shards).
fn stored_elements(
    dir: &Path,
    single: &str,
    index: &str,
    wanted: impl Fn(&str) -> bool,
) -> Result<u64, PipelineError> {
    let (files, _) = crate::weights::weight_files(dir, single, index)?;
    let tensors = crate::weights::map_files(&files)?;
    Ok(tensors
        .tensors()
        .iter()
        .filter(|(name, _)| wanted(name))
        .map(|(_, view)| view.shape().iter().product::<usize>() as u64)
        .sum())
}

/// [`stored_elements`] of the VAE in `dir`.
fn vae_elements(dir: &Path, wanted: impl Fn(&str) -> bool) -> Result<u64, PipelineError> {
    stored_elements(
        dir,
        crate::weights::WEIGHTS_FILE,
        crate::weights::WEIGHTS_INDEX_FILE,
        wanted,
    )
}
