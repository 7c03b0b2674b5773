//! # latte — the Latte video diffusion transformer on candle
//!
//! Weight-compatible with diffusers' `LatteTransformer3DModel` (Latte-1 loads as-is) and
//! differentiable end to end, so that training and gradient-guided sampling can run
//! through `remat`'s memory-planned backward.
//!
//! - [`config`]: diffusers' `config.json` → validated [`config::LatteConfig`]; presets.
//! - [`weights`]: model directories (single or sharded safetensors), checked loading, saving;
//!   [`init`]: fresh weights (PyTorch's defaults, or PixArt-α's for training from scratch).
//! - [`lora`]: low-rank adapters in PEFT's format, attached or merged.
//! - [`nn`]: the building blocks; [`model`]: the transformer as a remat chain.
//! - [`diffusion`]: the noise schedule and the training loss; [`optim`]: AdamW, clipping,
//!   loss scaling, EMA; [`data`]: synthetic videos and pre-encoded clips; [`train`]: the
//!   training loop under a memory plan, with exact resume; [`dist`]: data parallelism's
//!   collectives.
//! - [`plan`]: one account of a step's memory and the choice of precision, batch and
//!   checkpoint schedule for a budget, shared by every command.
//! - [`scheduler`]: diffusers-compatible DDIM and DDPM samplers; [`guide`]: objectives on
//!   the predicted clean video; [`sampling`]: guided, memory-planned text-to-video sampling.
//! - [`pipeline`]: a diffusers LattePipeline directory; [`text_encoder`] (tokenizer and
//!   [`t5`]) encodes prompts as the pipeline does, [`vae`] decodes latents to video and
//!   [`vae_encoder`] encodes videos to training latents.

pub mod config;
pub mod costs;
pub mod data;
pub mod diffusion;
pub mod dist;
pub mod guide;
pub mod init;
pub mod io;
pub mod lora;
pub mod model;
pub mod nn;
pub mod optim;
pub mod pipeline;
pub mod plan;
pub mod random;
pub mod sampling;
pub mod scheduler;
pub mod t5;
pub mod text_encoder;
pub mod train;
pub mod vae;
pub mod vae_encoder;
pub mod vjp;
pub mod weights;
pub mod zero;
