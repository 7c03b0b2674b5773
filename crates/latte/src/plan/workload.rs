//! What a run computes: the model, the geometry of one video, the task and the kernels —
//! everything besides the precision, the batch and the checkpoint schedule that decides
//! its memory.

use crate::config::{InputGeometry, LatteConfig};
use crate::costs::{Kernels, Memory, Mode};
use crate::lora::{AdaptedLayer, LoraConfig};
use crate::train::Precision;
use std::fmt;

/// A step of training or of gradient-guided sampling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// One optimiser step of [`crate::train::Trainer`]: `grad_accum` micro-batches,
    /// AdamW with f32 moments (and f32 master weights below f32), an f32 EMA of the
    /// weights, and `prefetch_batches` batches read ahead by the data loader.
    Train {
        /// Micro-batches per optimiser step.
        grad_accum: usize,
        /// Batches the loader holds ahead of the step (0 for the built-in videos).
        prefetch_batches: usize,
        /// Data-parallel ranks (1: one process); the account is one rank's, at the
        /// setting's batch per rank.
        ranks: usize,
        /// ZeRO stage (1: each rank holds AdamW's state of its share of the parameters).
        zero: u8,
    },
    /// One guided DDIM step of [`crate::sampling::sample`]: frozen weights, gradients for
    /// the latents only; with classifier-free guidance the model sees every video twice.
    Guide {
        /// Classifier-free guidance (batch `[negative, positive]`).
        cfg: bool,
    },
}

impl Task {
    /// What the chain differentiates.
    pub fn mode(self) -> Mode {
        match self {
            Task::Train { .. } => Mode::Train,
            Task::Guide { .. } => Mode::Guide,
        }
    }
}

/// The precision and batch of one candidate configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    /// Compute precision of the weights and activations.
    pub precision: Precision,
    /// Videos per (micro-)batch, before classifier-free guidance doubles it.
    pub batch: usize,
}

/// A model, the geometry of one video and the task: what [`super::MemoryAccount`] and
/// the planner need besides a [`Setting`].
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    /// The model configuration.
    pub config: LatteConfig,
    /// Latent geometry of ONE video (its `batch` is ignored).
    pub geometry: InputGeometry,
    /// Training or guided sampling.
    pub task: Task,
    /// The kernel set the model runs.
    pub kernels: Kernels,
    /// Where the memory lives (the host heap, or a GPU's memory).
    pub memory: Memory,
    /// Temporal attention on (off: diffusers' `enable_temporal_attentions=False`).
    pub temporal: bool,
    /// Low-rank adapters trained instead of the weights (LoRA, training only): the base
    /// weights are then frozen in the compute precision, and the optimiser holds state for
    /// the adapters' f32 factors alone.
    pub lora: Option<LoraConfig>,
}

impl Workload {
    /// Videos the model sees for `batch` videos (doubled by classifier-free guidance).
    pub fn model_batch(&self, batch: usize) -> usize {
        match self.task {
            Task::Guide { cfg: true } => 2 * batch,
            _ => batch,
        }
    }

    /// The layers the LoRA adapters cover (with their ranks), if the workload trains any.
    ///
    /// # Errors
    /// When the adapter configuration is invalid or matches no layer of the model.
    pub fn adapted_layers(&self) -> Result<Option<Vec<AdaptedLayer>>, super::PlanningError> {
        self.lora
            .as_ref()
            .map(|lora| {
                lora.targets(&self.config)
                    .map_err(super::PlanningError::Adapter)
            })
            .transpose()
    }

    /// The model's input geometry at `batch` videos.
    pub fn at_batch(&self, batch: usize) -> InputGeometry {
        InputGeometry {
            batch: self.model_batch(batch),
            ..self.geometry
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.task {
            Task::Train {
                grad_accum,
                prefetch_batches,
                ranks,
                zero,
            } => {
                write!(f, "train")?;
                if ranks > 1 {
                    write!(f, " on {ranks} ranks (ZeRO {zero}, per rank)")?;
                }
                if let Some(lora) = &self.lora {
                    write!(f, " LoRA rank {} on {}", lora.r, lora.target_modules)?;
                }
                if grad_accum > 1 {
                    write!(f, " ({grad_accum} micro-batches per step)")?;
                }
                if prefetch_batches > 0 {
                    write!(f, " ({prefetch_batches} batches prefetched)")?;
                }
                Ok(())
            }
            Task::Guide { cfg } => {
                write!(f, "guide{}", if cfg { " with CFG (batch ×2)" } else { "" })
            }
        }
    }
}
