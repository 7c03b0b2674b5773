//! Training and fine-tuning: the loop as a library, under a memory plan.
//!
//! One optimiser step (see [`Trainer::train_step`]):
//!
//! 1. for each of `grad_accum` micro-batches: draw the batch, its timesteps
//!    `t ~ U{0, …, T−1}`, the noise ε and the caption dropout (to the null, all-zero
//!    embedding, for classifier-free guidance) from a generator seeded by
//!    `(seed, step, micro-batch)`; run the model forward and backward through `remat`'s
//!    executor under the planned schedule with the gradient of the
//!    [diffusion loss](crate::diffusion) w.r.t. the output; accumulate the parameter
//!    gradients in f32;
//! 2. unscale (f16), clip by global norm, AdamW (f32 master weights in low precision),
//!    EMA of the weights.
//!
//! With [`TrainConfig::lora`] the trained parameters are low-rank adapters' f32 factors
//! ([`crate::lora`]): the base weights are frozen in the compute precision (no gradients,
//! no optimiser state, no master copy), and AdamW, clipping, accumulation and the EMA
//! apply to the factors.
//!
//! Because every random draw is a function of `(seed, step, micro-batch, clip)` and the
//! data order a function of `(seed, position)`, a run resumed from a checkpoint continues
//! bitwise as if it had never stopped (CPU f32).
//!
//! # Data parallelism
//!
//! With a [`Collective`] of `N` ranks ([`Trainer::new_distributed`]), every rank runs the
//! same step on its part of a global batch of `N × batch_size` clips (rank `r` reads clips
//! `r·batch_size …` of it, and draws their timesteps, noise and caption dropout by their
//! place in the global batch), scales its loss gradient by `1/N`, and the parameter
//! gradients are summed over the ranks in buckets before clipping: the step is that of one
//! process with the global batch, and AdamW and the EMA run identically everywhere. Rank 0
//! writes the metrics and the checkpoints. With ZeRO ([`TrainConfig::zero`], [`crate::zero`])
//! every parameter is cut into `N` pieces and each rank keeps AdamW's moments, master
//! weights and EMA of its pieces only: stage 1 reduce-scatters the summed gradients after
//! the micro-batches, stage 2 reduce-scatters each stage's gradients as its backward op
//! ends (keeping an `N`-th of the gradients too); the updated pieces are all-gathered into
//! every rank's model. Checkpoints hold whole tensors whatever the stage.
//!
//! The memory plan comes from [`crate::plan`], the account every command shares: with
//! [`MemoryPlan::Budget`], the budget covers the whole step — weights, optimiser state
//! (Adam moments, f32 master weights), the EMA, the f32 gradient sums, the batch, the
//! loss and the chain — and the run takes the row `latte plan` chooses for the same
//! settings (see [`train_workload`]).
//!
//! # Checkpoints
//!
//! `<out>/checkpoint-<step>/` holds `transformer/` (diffusers layout, the training
//! precision), `ema/` (diffusers layout, f32) — with LoRA, `adapter/` and `ema/` are
//! adapters in PEFT's format instead ([`crate::lora`]) and `state.json` names the base
//! model —, `scheduler/scheduler_config.json` (the DDIM
//! scheduler that samples them, [`sampling_scheduler`]), `optimizer.safetensors`
//! (`exp_avg.<name>`, `exp_avg_sq.<name>`, and `master.<name>` when training in bf16/f16)
//! and `state.json` ([`TrainState`]). It is written to a temporary directory and renamed;
//! `<out>/latest` names the newest. Every step appends one JSON object ([`StepReport`]) to
//! `<out>/metrics.jsonl`.

use crate::config::{InputGeometry, LatteConfig, LatteConfigFile};
use crate::costs::{Kernels, Memory};
use crate::data::shards::ShardDirectory;
use crate::data::synthetic::SyntheticVideos;
use crate::data::{Batch, ClipShape, DataError, Dataset, Loader, Shard};
use crate::diffusion::{LossTarget, NoiseSchedule};
use crate::dist::{Collective, DistError, SingleProcess};
use crate::init::Initialisation;
use crate::lora::{AdaptedLayer, Adapter, LoraConfig, LoraError};
use crate::model::{Latte, LatteInputs};
use crate::optim::{
    clip_to_norm, grad_sum_of_squares, sorted_params, warmup_lr, AdamW, AdamWConfig, Ema,
    GradAccumulator, LossScaler,
};
use crate::plan::{
    plan_run, AnalyticCosts, Candidate, PlanningError, RunMemory, Setting, Task, Workload,
};
use crate::random::{normal_values, rng_for};
use crate::weights::{frozen_from, trainable_from, ModelDir, WeightsError};
use crate::zero::{piece_of, Partition, ShardedGradients};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rand::Rng;
use remat::meter::{meter_for, MemoryMeter, MemoryReport, Recorder};
use remat::policy::Policy;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write as _;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// File of per-step metrics in the output directory.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// File naming the newest checkpoint in the output directory.
pub const LATEST_FILE: &str = "latest";
/// Training state file of a checkpoint.
pub const STATE_FILE: &str = "state.json";
/// Optimiser state file of a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The trained adapter's directory in a LoRA run's checkpoint (PEFT's format).
pub const ADAPTER_DIR: &str = "adapter";
/// Version of the checkpoint layout.
const STATE_FORMAT: u32 = 1;
/// Batches the background loader reads ahead (shard data).
const PREFETCH_BATCHES: usize = 2;

/// Errors that stop training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A setting is out of range.
    #[error("invalid training setting: {0}")]
    Config(String),
    /// The model could not be loaded or saved.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// The LoRA adapter could not be made, read or written.
    #[error(transparent)]
    Lora(#[from] LoraError),
    /// The data could not be read or does not fit the model.
    #[error(transparent)]
    Data(#[from] DataError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The output directory cannot be written.
    #[error("cannot write to output directory {path}: {cause}")]
    Output { path: String, cause: std::io::Error },
    /// The memory plan cannot be made (the budget does not fit, or the workload cannot
    /// be costed).
    #[error("memory plan: {0}")]
    Memory(#[from] PlanningError),
    /// The data-parallel group failed.
    #[error("data parallelism: {0}")]
    Dist(#[from] DistError),
    /// The loss is NaN or infinite; the weights were not updated.
    #[error(
        "non-finite loss ({loss}) at step {step} (samples: {samples}); training stopped \
         before updating the weights; last good checkpoint: {}",
        last_checkpoint.as_ref().map_or_else(|| "none written yet".to_string(), |p| p.display().to_string())
    )]
    NonFiniteLoss {
        step: u64,
        loss: f64,
        samples: String,
        last_checkpoint: Option<PathBuf>,
    },
    /// The gradients are NaN or infinite (outside f16 loss scaling).
    #[error(
        "non-finite gradient norm ({norm}) at step {step}; training stopped before updating \
         the weights; last good checkpoint: {}",
        last_checkpoint.as_ref().map_or_else(|| "none written yet".to_string(), |p| p.display().to_string())
    )]
    NonFiniteGradients {
        step: u64,
        norm: f64,
        last_checkpoint: Option<PathBuf>,
    },
    /// A checkpoint could not be read.
    #[error("cannot resume from {path}: {message}")]
    Resume { path: String, message: String },
}

/// Precision the model computes in. Optimiser state is always f32; with `bf16`/`f16`
/// the optimiser keeps f32 master weights, and `f16` uses dynamic loss scaling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    Bf16,
    F16,
}

impl Precision {
    /// The candle dtype of weights and activations.
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
            Precision::F16 => DType::F16,
        }
    }

    /// The lower-case name: `f32`, `bf16` or `f16`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }

    /// Whether f32 master weights are kept.
    pub fn uses_master_weights(self) -> bool {
        self != Precision::F32
    }
}

/// How activation memory is managed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryPlan {
    /// A checkpoint policy for the forward/backward alone (`budget:SIZE` there budgets
    /// the activations and gradients, not the weights or optimiser).
    Checkpoint(Policy),
    /// A budget in bytes for the whole step: weights, optimiser state, EMA, gradients and
    /// activations.
    Budget(u64),
}

/// Hyper-parameters of a run; stored in every checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Train until this many optimiser steps have been taken (in total, across resumes).
    pub steps: u64,
    /// Clips per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimiser step.
    pub grad_accum: usize,
    /// AdamW hyper-parameters (`lr` is the peak learning rate).
    pub optimizer: AdamWConfig,
    /// Steps of linear learning-rate warm-up.
    pub warmup_steps: u64,
    /// Clip gradients to this global L2 norm.
    pub clip_grad_norm: Option<f64>,
    /// Decay of the weights' moving average.
    pub ema_decay: f64,
    /// Probability of replacing a clip's caption with the null (zero) embedding.
    pub caption_dropout: f64,
    /// Precision of the model's computation.
    pub precision: Precision,
    /// How activation memory is managed.
    pub memory: MemoryPlan,
    /// Write a checkpoint every this many steps (0: only at the end).
    pub save_every: u64,
    /// Seed of every random draw of the run (noise, timesteps, dropout, data order).
    pub seed: u64,
    /// Run the temporal blocks (false: diffusers' `enable_temporal_attentions=False`).
    pub temporal: bool,
    /// Initial loss scale of f16 training (a power of two; [`LossScaler::dynamic`]'s
    /// 2¹⁶ when absent).
    #[serde(default)]
    pub initial_loss_scale: Option<f64>,
    /// Train low-rank adapters of this configuration instead of the weights (LoRA).
    #[serde(default)]
    pub lora: Option<LoraConfig>,
    /// ZeRO stage of data parallelism: 0, every rank holds the optimizer state; 1, each
    /// rank holds (and updates) the state of its piece of every parameter; 2, also only its
    /// pieces of the gradients, reduced stage by stage during the backward pass.
    #[serde(default)]
    pub zero: u8,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 300,
            batch_size: 4,
            grad_accum: 1,
            optimizer: AdamWConfig {
                lr: 1e-3,
                weight_decay: 0.0,
                ..AdamWConfig::default()
            },
            warmup_steps: 20,
            clip_grad_norm: Some(1.0),
            ema_decay: 0.9999,
            caption_dropout: 0.1,
            precision: Precision::F32,
            memory: MemoryPlan::Checkpoint(Policy::None),
            save_every: 100,
            seed: 0,
            temporal: true,
            initial_loss_scale: None,
            lora: None,
            zero: 0,
        }
    }
}

impl TrainConfig {
    /// Whether the optimizer keeps f32 master weights: below f32, for every weight (LoRA's
    /// factors are f32 variables themselves).
    pub fn keeps_master_weights(&self) -> bool {
        self.precision.uses_master_weights() && self.lora.is_none()
    }

    /// Checks the ranges of the settings.
    pub fn validate(&self) -> Result<(), TrainError> {
        let fail = |m: String| Err(TrainError::Config(m));
        let o = &self.optimizer;
        if self.batch_size == 0 {
            return fail("batch size must be at least 1".into());
        }
        if self.grad_accum == 0 {
            return fail("gradient accumulation must be at least 1 micro-batch".into());
        }
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return fail(format!("learning rate {} must be positive", o.lr));
        }
        if !(0.0..1.0).contains(&o.beta1) || !(0.0..1.0).contains(&o.beta2) {
            return fail(format!(
                "betas ({}, {}) must lie in [0, 1)",
                o.beta1, o.beta2
            ));
        }
        if o.eps.is_nan() || o.eps <= 0.0 || o.weight_decay.is_nan() || o.weight_decay < 0.0 {
            return fail("eps must be positive and weight decay non-negative".into());
        }
        if let Some(clip) = self.clip_grad_norm {
            if clip.is_nan() || clip <= 0.0 {
                return fail(format!("gradient clipping norm {clip} must be positive"));
            }
        }
        if !(0.0..=1.0).contains(&self.ema_decay) {
            return fail(format!("EMA decay {} must lie in [0, 1]", self.ema_decay));
        }
        if let Some(scale) = self.initial_loss_scale {
            if self.precision != Precision::F16 {
                return fail("a loss scale applies to f16 training only".into());
            }
            if !(scale.is_finite() && scale >= 1.0 && scale.log2().fract() == 0.0) {
                return fail(format!(
                    "loss scale {scale} must be a power of two, at least 1"
                ));
            }
        }
        if self.zero > 2 {
            return fail(format!(
                "ZeRO stage {}: the stages are 0 (replicated), 1 (sharded optimizer state) \
                 and 2 (sharded gradients too)",
                self.zero
            ));
        }
        if let Some(lora) = &self.lora {
            lora.validate()
                .map_err(|m| TrainError::Config(format!("LoRA: {m}")))?;
        }
        if !(0.0..=1.0).contains(&self.caption_dropout) {
            return fail(format!(
                "caption dropout {} must lie in [0, 1]",
                self.caption_dropout
            ));
        }
        Ok(())
    }
}

/// Where the initial weights come from (with LoRA: the frozen base model, recorded in
/// every checkpoint).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelSource {
    /// Fresh weights for `config`, initialised from `seed` for training from scratch
    /// ([`Initialisation::FromScratch`]); as a LoRA run's base, with PyTorch's module
    /// defaults ([`Initialisation::ModuleDefaults`]).
    Fresh { config: LatteConfig, seed: u64 },
    /// A diffusers model directory (fine-tuning).
    Directory(PathBuf),
}

/// Where the clips come from; stored in every checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataSource {
    /// The built-in synthetic videos of this shape.
    Synthetic(ClipShape),
    /// A directory of clip files (see [`crate::data::shards`]).
    Shards(PathBuf),
}

impl DataSource {
    /// Opens the dataset for a model; checks that its clips fit.
    pub fn open(
        &self,
        config: &LatteConfig,
        temporal: bool,
        seed: u64,
    ) -> Result<Arc<dyn Dataset>, TrainError> {
        match self {
            DataSource::Shards(dir) => Ok(Arc::new(ShardDirectory::open(dir, config, temporal)?)),
            DataSource::Synthetic(shape) => {
                let p = config.patch_size;
                let frames_fit =
                    !temporal || shape.frames == 1 || shape.frames == config.video_length;
                if shape.channels != config.in_channels
                    || shape.caption_channels != config.caption_channels
                    || shape.height % p != 0
                    || shape.width % p != 0
                    || !frames_fit
                {
                    return Err(DataError::Unsupported(format!(
                        "synthetic clips {shape:?} do not fit the model: channels must be \
                         in_channels = {}, caption_channels {}, frames video_length = {} (or 1), \
                         height and width divisible by patch_size = {p}",
                        config.in_channels, config.caption_channels, config.video_length
                    ))
                    .into());
                }
                Ok(Arc::new(SyntheticVideos::new(*shape, seed)?))
            }
        }
    }

    /// Batches the loader reads ahead on a background thread for this source.
    pub fn prefetch(&self) -> usize {
        match self {
            DataSource::Synthetic(_) => 0,
            DataSource::Shards(_) => PREFETCH_BATCHES,
        }
    }
}

/// The state of a run at a checkpoint (`state.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Layout version.
    pub format: u32,
    /// Steps taken (including steps skipped by f16 overflow).
    pub step: u64,
    /// Optimiser steps taken (bias-correction count).
    pub optimizer_steps: u64,
    /// EMA updates taken.
    pub ema_updates: u64,
    /// Data cursor: clips drawn so far (the next draw position).
    pub samples_seen: u64,
    /// Loss-scaling state.
    pub loss_scaler: LossScaler,
    /// The run's settings.
    pub config: TrainConfig,
    /// The run's data.
    pub data: DataSource,
    /// The frozen base model of a LoRA run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model: Option<ModelSource>,
    /// Data-parallel ranks of the run (1 in one process): resumed on another number, the
    /// global batch changes and the run no longer continues exactly.
    #[serde(default = "one_rank")]
    pub ranks: usize,
    /// How randomness is derived: nothing else needs restoring.
    pub rng: String,
}

/// [`TrainState::ranks`] of checkpoints written before it was recorded.
fn one_rank() -> usize {
    1
}

/// What one step did; one line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// Steps taken after this one (1 for the first step).
    pub step: u64,
    /// Mean loss over the micro-batches (ε-MSE + variational term).
    pub loss: f64,
    /// Mean ε-prediction MSE.
    pub mse: f64,
    /// Mean variational-bound term (bits/dim), for learned-variance models.
    pub vb: Option<f64>,
    /// Learning rate of the step.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Loss scale used (1 unless f16).
    pub loss_scale: f64,
    /// Whether the update was skipped (f16 overflow).
    pub skipped: bool,
    /// Peak bytes allocated during the step above what was live at its start.
    pub step_peak_bytes: u64,
    /// Bytes of weights, optimiser state and EMA (live across steps), as the memory
    /// account counts them.
    pub resident_bytes: u64,
    /// Bytes the step held when its backward passes had ended, above what was live at its
    /// start, as the meter measured them: the parameter gradients and their f32 sums (under
    /// ZeRO 2 this rank's pieces only).
    #[serde(default)]
    pub gradient_bytes: u64,
    /// Wall-clock seconds of the step.
    pub step_s: f64,
    /// Of which summing the gradients over the ranks and sharing ZeRO's updated weights
    /// (0 in one process).
    #[serde(default)]
    pub communication_s: f64,
    /// Clips drawn so far.
    pub samples_seen: u64,
}

/// The memory of the state a trainer keeps across steps, as its device's meter measured it
/// when the state was built (the counting allocator on the CPU; 0 where the meter sees
/// nothing, such as a CPU process without that allocator).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct StateMemory {
    /// AdamW's moments and f32 master weights (under ZeRO, this rank's pieces).
    pub optimizer_bytes: u64,
    /// The f32 moving average of the weights (under ZeRO, this rank's pieces).
    pub ema_bytes: u64,
}

/// How a call to [`Trainer::run`] ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RunOutcome {
    /// All steps were taken; the final checkpoint.
    Finished { step: u64, checkpoint: PathBuf },
    /// The callback asked to stop; the checkpoint written then.
    Interrupted { step: u64, checkpoint: PathBuf },
}

/// The workload of a training run for [`crate::plan`]: the model, one clip's geometry,
/// the micro-batches per step, the loader's prefetch, the kernels this thread runs on
/// `device`, and the data-parallel ranks (one rank's memory is planned).
pub fn train_workload(
    model_config: &LatteConfig,
    config: &TrainConfig,
    data: &DataSource,
    shape: ClipShape,
    device: &Device,
    ranks: usize,
) -> Workload {
    Workload {
        config: model_config.clone(),
        geometry: InputGeometry {
            batch: 1,
            frames: shape.frames,
            height: shape.height,
            width: shape.width,
            caption_tokens: shape.caption_tokens,
        },
        task: Task::Train {
            grad_accum: config.grad_accum,
            prefetch_batches: data.prefetch(),
            ranks,
            zero: config.zero,
        },
        kernels: Kernels::active(device),
        memory: Memory::of(device),
        temporal: config.temporal,
        lora: config.lora.clone(),
    }
}

/// The DDIM configuration that samples what [`Trainer`] trains, written to every
/// checkpoint as `scheduler/scheduler_config.json`: the training β schedule
/// ([`NoiseSchedule::latte`], which is diffusers' default linear one), ε-prediction, and
/// x̂₀ left unclipped, as Latte's sampling scripts set `clip_sample=False`. Clipping
/// (diffusers' default) is what models trained here suffer from most: early x̂₀, amplified
/// by 1/√ᾱ_t, clip to a ±1 pattern that the model then keeps as ragged shapes on a noisy
/// background.
pub fn sampling_scheduler() -> crate::scheduler::DdimConfig {
    crate::scheduler::DdimConfig {
        clip_sample: false,
        ..Default::default()
    }
}

/// A training run in progress.
pub struct Trainer {
    config: TrainConfig,
    model_config: LatteConfig,
    config_file: LatteConfigFile,
    model: Latte,
    varmap: VarMap,
    params: Vec<(String, Var)>,
    optimizer: AdamW,
    ema: Ema,
    scaler: LossScaler,
    noise_schedule: NoiseSchedule,
    /// The memory plan: the account and the schedule every micro-batch runs.
    plan: Candidate,
    data: DataSource,
    loader: Loader,
    device: Device,
    /// The meter of `device`'s memory: plans budgets and records every step's peak.
    meter: Arc<dyn MemoryMeter>,
    /// What the optimizer and the EMA took when they were built, as the meter saw it.
    state_memory: StateMemory,
    steps_done: u64,
    out_dir: PathBuf,
    /// `metrics.jsonl` (rank 0 only).
    metrics: Option<std::fs::File>,
    last_checkpoint: Option<PathBuf>,
    /// The frozen base and the adapter's layout of a LoRA run.
    lora: Option<LoraRun>,
    /// The data-parallel group (one process by default).
    collective: Arc<dyn Collective>,
    /// The pieces of every parameter each rank keeps (ZeRO ≥ 1).
    partition: Option<Partition>,
    /// The parameters (indices into `params`) the optimizer and the EMA hold, in order:
    /// all of them, or under ZeRO those this rank keeps a piece of.
    owned: Vec<usize>,
    /// The ranks of the run this one resumed.
    resumed_ranks: Option<usize>,
}

/// What a LoRA run trains on: its base model and the adapter's configuration and layers
/// (the factors are the trainer's variables).
struct LoraRun {
    base: ModelSource,
    config: LoraConfig,
    layers: Vec<AdaptedLayer>,
}

impl LoraRun {
    /// The adapter with `factors` (by name).
    fn adapter(&self, factors: &[(String, Tensor)]) -> Result<Adapter, LoraError> {
        let factors: HashMap<String, Tensor> = factors.iter().cloned().collect();
        Adapter::from_factors(self.config.clone(), self.layers.clone(), &factors)
    }

    /// PEFT's `base_model_name_or_path`: the base model's directory, if it has one.
    fn base_name(&self) -> Option<String> {
        match &self.base {
            ModelSource::Directory(dir) => Some(dir.display().to_string()),
            ModelSource::Fresh { .. } => None,
        }
    }
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("config", &self.config)
            .field("step", &self.steps_done)
            .field("out_dir", &self.out_dir)
            .finish()
    }
}

/// f32 weights, by name, sorted.
type NamedTensors = Vec<(String, Tensor)>;

fn named_tensors(varmap: &VarMap) -> candle_core::Result<NamedTensors> {
    Ok(sorted_params(varmap)?
        .into_iter()
        .map(|(name, var)| (name, var.as_detached_tensor()))
        .collect())
}

fn output_error(path: &Path) -> impl Fn(std::io::Error) -> TrainError + '_ {
    move |cause| TrainError::Output {
        path: path.display().to_string(),
        cause,
    }
}

/// The checkpoint a `--resume` path means: a checkpoint directory itself, or a run's
/// output directory (its `latest` checkpoint, else the highest-numbered one).
pub fn find_checkpoint(path: &Path) -> Result<PathBuf, TrainError> {
    let fail = |message: String| TrainError::Resume {
        path: path.display().to_string(),
        message,
    };
    if path.join(STATE_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    if !path.is_dir() {
        return Err(fail("no such directory".into()));
    }
    if let Ok(name) = std::fs::read_to_string(path.join(LATEST_FILE)) {
        let candidate = path.join(name.trim());
        if candidate.join(STATE_FILE).is_file() {
            return Ok(candidate);
        }
    }
    let mut best: Option<(u64, PathBuf)> = None;
    let entries = std::fs::read_dir(path).map_err(|e| fail(e.to_string()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(step) = name
            .strip_prefix("checkpoint-")
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        if entry.path().join(STATE_FILE).is_file() && best.as_ref().is_none_or(|(s, _)| step > *s) {
            best = Some((step, entry.path()));
        }
    }
    best.map(|(_, p)| p).ok_or_else(|| {
        fail(format!(
            "neither a checkpoint (no {STATE_FILE}) nor a run directory holding checkpoint-<step>/"
        ))
    })
}

/// What a run starts from.
struct Start {
    /// The trained parameters (f32, sorted by name): the model's weights, or the
    /// adapter's factors.
    weights: NamedTensors,
    config_file: LatteConfigFile,
    config: TrainConfig,
    data: DataSource,
    resumed: Option<Resumed>,
    lora: Option<LoraStart>,
}

/// A LoRA run's frozen base weights (f32, by name) and adapter.
struct LoraStart {
    run: LoraRun,
    base_weights: HashMap<String, Tensor>,
}

/// The f32 weights and the configuration file of a model source. Fresh weights are
/// initialised for training from scratch, or, as the frozen base of LoRA (`for_lora`),
/// with PyTorch's module defaults: a stand-in for pretrained weights, whose output
/// depends on every layer (training from scratch zeroes the output projection).
fn source_weights(
    source: &ModelSource,
    for_lora: bool,
    device: &Device,
) -> Result<(NamedTensors, LatteConfigFile), TrainError> {
    Ok(match source {
        ModelSource::Fresh { config, seed } => {
            let (_, varmap) = crate::weights::fresh_trainable_with(
                config,
                if for_lora {
                    Initialisation::ModuleDefaults
                } else {
                    Initialisation::FromScratch
                },
                *seed,
                DType::F32,
                device,
            )?;
            (
                named_tensors(&varmap)?,
                LatteConfigFile::from_config(config),
            )
        }
        ModelSource::Directory(dir) => {
            let opened = ModelDir::open(dir)?;
            let mut weights: NamedTensors = opened
                .frozen_tensors(DType::F32, device)?
                .into_iter()
                .collect();
            weights.sort_by(|a, b| a.0.cmp(&b.0));
            (weights, opened.config_file().clone())
        }
    })
}

/// A LoRA run on `base` with `adapter` (fresh, or read from a checkpoint).
fn lora_start(
    base: ModelSource,
    base_weights: NamedTensors,
    adapter: Adapter,
) -> (NamedTensors, LoraStart) {
    let mut factors = adapter.named_factors();
    factors.sort_by(|a, b| a.0.cmp(&b.0));
    let start = LoraStart {
        run: LoraRun {
            base,
            config: adapter.config().clone(),
            layers: adapter.layers().to_vec(),
        },
        base_weights: base_weights.into_iter().collect(),
    };
    (factors, start)
}

/// Saved optimiser state to restore.
struct Resumed {
    dir: PathBuf,
    state: TrainState,
    optimizer: HashMap<String, Tensor>,
    ema: HashMap<String, Tensor>,
}

impl Trainer {
    /// Starts a new run writing to `out_dir` (created; an existing `metrics.jsonl` there
    /// is replaced).
    pub fn new(
        model: ModelSource,
        data: DataSource,
        config: TrainConfig,
        out_dir: &Path,
        device: &Device,
    ) -> Result<Self, TrainError> {
        Self::new_distributed(
            model,
            data,
            config,
            out_dir,
            device,
            Arc::new(SingleProcess),
        )
    }

    /// [`Trainer::new`] for one rank of a data-parallel group (see the module doc): every
    /// rank calls it with the same arguments.
    pub fn new_distributed(
        model: ModelSource,
        data: DataSource,
        config: TrainConfig,
        out_dir: &Path,
        device: &Device,
        collective: Arc<dyn Collective>,
    ) -> Result<Self, TrainError> {
        config.validate()?;
        // A LoRA checkpoint names its base: by absolute path, to resume from anywhere.
        let model = match model {
            ModelSource::Directory(dir) if config.lora.is_some() => {
                ModelSource::Directory(std::path::absolute(&dir).unwrap_or(dir))
            }
            other => other,
        };
        let (weights, config_file) = source_weights(&model, config.lora.is_some(), device)?;
        let (weights, lora) = match &config.lora {
            None => (weights, None),
            Some(lora) => {
                let model_config = config_file.resolve().map_err(WeightsError::from)?;
                let adapter = Adapter::fresh(lora.clone(), &model_config, config.seed, device)?;
                let (factors, start) = lora_start(model, weights, adapter);
                (factors, Some(start))
            }
        };
        Self::assemble(
            Start {
                weights,
                config_file,
                config,
                data,
                resumed: None,
                lora,
            },
            out_dir,
            device,
            collective,
        )
    }

    /// Continues the run saved in `checkpoint` (a checkpoint, or a run directory: see
    /// [`find_checkpoint`]), writing to `out_dir`. `adjust` may change the settings (more
    /// steps, another save interval; anything else breaks exact continuation) and the
    /// data location. Lines of `out_dir/metrics.jsonl` after the checkpoint's step are
    /// dropped.
    pub fn resume(
        checkpoint: &Path,
        out_dir: &Path,
        device: &Device,
        adjust: impl FnOnce(&mut TrainConfig, &mut DataSource),
    ) -> Result<Self, TrainError> {
        Self::resume_distributed(checkpoint, out_dir, device, adjust, Arc::new(SingleProcess))
    }

    /// [`Trainer::resume`] for one rank of a data-parallel group of the size the run had.
    pub fn resume_distributed(
        checkpoint: &Path,
        out_dir: &Path,
        device: &Device,
        adjust: impl FnOnce(&mut TrainConfig, &mut DataSource),
        collective: Arc<dyn Collective>,
    ) -> Result<Self, TrainError> {
        let dir = find_checkpoint(checkpoint)?;
        let fail = |message: String| TrainError::Resume {
            path: dir.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(dir.join(STATE_FILE))
            .map_err(|e| fail(format!("{STATE_FILE}: {e}")))?;
        let state: TrainState =
            serde_json::from_str(&text).map_err(|e| fail(format!("{STATE_FILE}: {e}")))?;
        if state.format != STATE_FORMAT {
            return Err(fail(format!(
                "checkpoint format {} is not supported (expected {STATE_FORMAT})",
                state.format
            )));
        }
        let optimizer = candle_core::safetensors::load(dir.join(OPTIMIZER_FILE), device)
            .map_err(|e| fail(format!("{OPTIMIZER_FILE}: {e}")))?;
        let (weights, config_file, ema, lora) = match &state.config.lora {
            None => {
                let transformer = ModelSource::Directory(dir.join("transformer"));
                let (mut weights, config_file) = source_weights(&transformer, false, device)?;
                // Master weights are the exact f32 values of a low-precision run.
                for (name, w) in &mut weights {
                    if let Some(master) = optimizer.get(&format!("master.{name}")) {
                        *w = master.clone();
                    }
                }
                let ema_file = dir.join("ema").join(crate::weights::WEIGHTS_FILE);
                let ema = candle_core::safetensors::load(&ema_file, device)
                    .map_err(|e| fail(format!("{}: {e}", ema_file.display())))?;
                (weights, config_file, ema, None)
            }
            Some(_) => {
                let base = state.base_model.clone().ok_or_else(|| {
                    fail(format!("{STATE_FILE} of a LoRA run names no base_model"))
                })?;
                let (base_weights, config_file) = source_weights(&base, true, device)?;
                let model_config = config_file.resolve().map_err(WeightsError::from)?;
                let adapter = Adapter::load(&dir.join(ADAPTER_DIR), &model_config, device)?;
                let ema = Adapter::load(&dir.join("ema"), &model_config, device)?
                    .named_factors()
                    .into_iter()
                    .collect();
                let (factors, start) = lora_start(base, base_weights, adapter);
                (factors, config_file, ema, Some(start))
            }
        };
        let mut config = state.config.clone();
        let mut data = state.data.clone();
        adjust(&mut config, &mut data);
        config.validate()?;
        if config.lora != state.config.lora {
            return Err(fail(
                "the LoRA settings of a run cannot change when it is resumed".into(),
            ));
        }
        Self::assemble(
            Start {
                weights,
                config_file,
                config,
                data,
                lora,
                resumed: Some(Resumed {
                    dir: dir.clone(),
                    state,
                    optimizer,
                    ema,
                }),
            },
            out_dir,
            device,
            collective,
        )
    }

    fn assemble(
        start: Start,
        out_dir: &Path,
        device: &Device,
        collective: Arc<dyn Collective>,
    ) -> Result<Self, TrainError> {
        let Start {
            weights,
            config_file,
            config,
            data,
            resumed,
            lora,
        } = start;
        let model_config = config_file.resolve().map_err(WeightsError::from)?;
        let steps_done = resumed.as_ref().map_or(0, |r| r.state.step);
        std::fs::create_dir_all(out_dir).map_err(output_error(out_dir))?;

        let dtype = config.precision.dtype();
        let (model, varmap, lora) = match lora {
            None => {
                let (model, varmap) = trainable_from(
                    &model_config,
                    weights
                        .iter()
                        .map(|(name, w)| Ok((name.clone(), w.clone()))),
                    dtype,
                    device,
                )?;
                (model, varmap, None)
            }
            Some(LoraStart { run, base_weights }) => {
                // The base frozen in the compute precision; the factors f32 variables.
                let mut model = frozen_from(&model_config, base_weights, dtype, device)?;
                let varmap = run.adapter(&weights)?.attach_trainable(&mut model)?;
                (model, varmap, Some(run))
            }
        };
        let params = sorted_params(&varmap)?;
        let masters = config.keeps_master_weights();
        let partition = (config.zero >= 1)
            .then(|| Partition::new(&params, collective.rank(), collective.size()));
        let (owned, pieces): (Vec<usize>, Vec<_>) = match &partition {
            Some(partition) => partition
                .owned()
                .into_iter()
                .map(|p| (p, Some(partition.own(p))))
                .unzip(),
            None => (0..params.len()).map(|p| (p, None)).unzip(),
        };
        let owned_params: Vec<(String, Var)> = owned.iter().map(|&p| params[p].clone()).collect();
        let meter: Arc<dyn MemoryMeter> = Arc::from(meter_for(device)?);
        let live_before = meter.live_bytes();
        let mut optimizer = AdamW::with_pieces(
            &owned_params,
            &pieces,
            config.optimizer,
            masters.then_some(weights.as_slice()),
        )?;
        let optimizer_bytes = meter.live_bytes().saturating_sub(live_before);
        // The optimizer's f32 weights (this rank's pieces under ZeRO) start the EMA.
        let ema_start = optimizer.weights_f32()?;
        drop(weights);
        let live_before = meter.live_bytes();
        let mut ema = Ema::new(&ema_start, config.ema_decay)?;
        let state_memory = StateMemory {
            optimizer_bytes,
            ema_bytes: meter.live_bytes().saturating_sub(live_before),
        };
        drop(ema_start);
        let mut scaler = if config.precision == Precision::F16 {
            LossScaler {
                scale: config
                    .initial_loss_scale
                    .unwrap_or(LossScaler::dynamic().scale),
                ..LossScaler::dynamic()
            }
        } else {
            LossScaler::disabled()
        };
        let mut samples_seen = 0;
        let mut last_checkpoint = None;
        if let Some(r) = &resumed {
            optimizer.load_state(&r.optimizer, r.state.optimizer_steps)?;
            let ema_state = match &partition {
                Some(partition) => own_pieces(&r.ema, &params, &owned, partition)?,
                None => r.ema.clone(),
            };
            ema.load(&ema_state, r.state.ema_updates)?;
            if r.state.config.precision == config.precision {
                scaler = r.state.loss_scaler;
            }
            samples_seen = r.state.samples_seen;
            last_checkpoint = Some(r.dir.clone());
        }
        let resumed_ranks = resumed.as_ref().map(|r| r.state.ranks);

        let dataset = data.open(&model_config, config.temporal, config.seed)?;
        let workload = train_workload(
            &model_config,
            &config,
            &data,
            dataset.shape(),
            device,
            collective.size(),
        );
        let plan = plan_run(
            &workload,
            Setting {
                precision: config.precision,
                batch: config.batch_size,
            },
            match config.memory {
                MemoryPlan::Checkpoint(policy) => RunMemory::Policy(policy),
                MemoryPlan::Budget(bytes) => RunMemory::Budget(bytes),
            },
            &AnalyticCosts,
        )?;
        tracing::info!(
            policy = plan.policy,
            schedule_ops = plan.schedule.len(),
            predicted_peak = plan.total_peak_bytes,
            "memory planned"
        );
        // Only now that the model, the data and the plan are good is the metrics file
        // touched.
        let first = collective.rank() == 0;
        let metrics = first
            .then(|| open_metrics(out_dir, steps_done, resumed.is_some()))
            .transpose()?;
        let loader = Loader::sharded(
            dataset.clone(),
            config.seed,
            config.batch_size,
            samples_seen,
            data.prefetch(),
            Shard {
                rank: collective.rank(),
                world: collective.size(),
            },
        );
        let trainer = Self {
            model_config,
            config_file,
            model,
            varmap,
            params,
            optimizer,
            ema,
            scaler,
            noise_schedule: NoiseSchedule::latte(),
            plan,
            data,
            loader,
            device: device.clone(),
            meter,
            state_memory,
            steps_done,
            out_dir: out_dir.to_path_buf(),
            metrics,
            last_checkpoint,
            config,
            lora,
            collective,
            partition,
            owned,
            resumed_ranks,
        };
        trainer.check_data_fits(dataset.as_ref())?;
        Ok(trainer)
    }

    /// Checks that the data's batches fit the model.
    fn check_data_fits(&self, dataset: &dyn Dataset) -> Result<(), TrainError> {
        let example = self.example_batch(dataset.shape());
        let prepared = self.prepare(&example, 0, 0)?;
        self.model
            .check_inputs(&prepared.inputs, self.config.temporal)?;
        Ok(())
    }

    /// A zero batch of the data's shape (with a mask, to account for the largest case).
    fn example_batch(&self, shape: ClipShape) -> Batch {
        let b = self.config.batch_size;
        Batch {
            shape,
            videos: vec![0.0; b * shape.video_len()],
            captions: vec![0.0; b * shape.caption_len()],
            mask: Some(vec![1.0; b * shape.positions()]),
            labels: vec![String::new(); b],
            position: 0,
        }
    }

    /// Tensors for micro-batch `micro` of step `step`: timesteps, noise and caption
    /// dropout from the generator of `(seed, step, micro)`.
    fn prepare(&self, batch: &Batch, step: u64, micro: usize) -> Result<Prepared, TrainError> {
        let shape = batch.shape;
        let b = batch.len();
        // Every clip's draws come from its place in the global batch.
        let first = self.collective.rank() * b;
        let (mut timesteps, mut dropped, mut noise) = (Vec::new(), Vec::new(), Vec::new());
        for clip in first..first + b {
            let mut rng = rng_for(
                self.config.seed,
                &format!("train/step-{step}/micro-{micro}/clip-{clip}"),
            );
            timesteps.push(rng.random_range(0..self.noise_schedule.num_timesteps()));
            dropped.push(rng.random::<f64>() < self.config.caption_dropout);
            noise.extend(normal_values(&mut rng, shape.video_len()));
        }
        let video_dims = (b, shape.channels, shape.frames, shape.height, shape.width);
        let dev = &self.device;
        let x0 = Tensor::from_slice(&batch.videos, video_dims, dev)?;
        let noise = Tensor::from_vec(noise, video_dims, dev)?;
        let x_t = self.noise_schedule.add_noise(&x0, &noise, &timesteps)?;
        let mut captions = batch.captions.clone();
        for (i, _) in dropped.iter().enumerate().filter(|(_, d)| **d) {
            let len = shape.caption_len();
            captions[i * len..(i + 1) * len].fill(0.0);
        }
        let dtype = self.config.precision.dtype();
        let captions = Tensor::from_vec(
            captions,
            (b, shape.caption_tokens, shape.caption_channels),
            dev,
        )?
        .to_dtype(dtype)?;
        let mask = match &batch.mask {
            Some(m) => Some(Tensor::from_slice(
                m,
                (b, 1, shape.frames, shape.height, shape.width),
                dev,
            )?),
            None => None,
        };
        let t_model: Vec<i64> = timesteps.iter().map(|&t| t as i64).collect();
        Ok(Prepared {
            inputs: LatteInputs {
                hidden_states: x_t.to_dtype(dtype)?,
                timestep: Tensor::new(t_model, dev)?,
                encoder_hidden_states: captions,
            },
            x0,
            x_t,
            noise,
            timesteps,
            mask,
        })
    }

    /// Takes one optimiser step (see the module doc) and appends its line to
    /// `metrics.jsonl`. On a non-finite loss or gradient nothing is updated.
    pub fn train_step(&mut self) -> Result<StepReport, TrainError> {
        Ok(self.train_step_recorded()?.0)
    }

    /// [`Trainer::train_step`], with the step's memory timeline: the executor's phases
    /// (`head`, `forward`, `recompute X`, `backward X`) of every micro-batch, `loss`
    /// after each forward, and `update` for clipping, AdamW and the EMA.
    pub fn train_step_recorded(&mut self) -> Result<(StepReport, MemoryReport), TrainError> {
        let started = Instant::now();
        let mut recorder = Recorder::start(self.meter.clone());
        let step = self.steps_done;
        let accum = self.config.grad_accum;
        let world = self.collective.size();
        let grad_scale = self.scaler.scale / (accum * world) as f64;
        let chain = self.model.chain(self.config.temporal);
        let mut accumulator = GradAccumulator::new();
        // ZeRO 2: each stage's gradients are reduce-scattered as its backward op ends.
        let mut sharded = match (&self.partition, self.config.zero) {
            (Some(partition), 2) => Some(ShardedGradients::new(
                self.collective.as_ref(),
                partition,
                &self.params,
            )),
            _ => None,
        };
        let (mut loss_sum, mut mse_sum, mut vb_sum) = (0.0, 0.0, None::<f64>);
        for micro in 0..accum {
            let batch = self.loader.next_batch()?;
            let prepared = self.prepare(&batch, step, micro)?;
            let tape = remat::grads::forward(
                &chain,
                &prepared.inputs.to_vec(),
                &[false, false, false],
                &self.plan.schedule,
                &mut recorder,
            )?;
            recorder.phase("loss");
            let loss =
                self.noise_schedule
                    .training_loss(tape.output(), &prepared.target(), grad_scale)?;
            // Every rank stops together when any rank's loss is not finite.
            let mut non_finite = [f64::from(u8::from(!loss.loss.is_finite()))];
            self.collective.all_reduce_sum_f64(&mut non_finite)?;
            if non_finite[0] > 0.0 {
                return Err(TrainError::NonFiniteLoss {
                    step: step + 1,
                    loss: loss.loss,
                    samples: batch.labels.join(", "),
                    last_checkpoint: self.last_checkpoint.clone(),
                });
            }
            loss_sum += loss.loss;
            mse_sum += loss.mean_mse();
            if let Some(vb) = loss.mean_vb() {
                vb_sum = Some(vb_sum.unwrap_or(0.0) + vb);
            }
            match &mut sharded {
                Some(sink) => {
                    tape.backward_into(&loss.grad_output, &mut recorder, sink)?;
                    drop(loss);
                }
                None => {
                    let grads = tape.backward(&loss.grad_output, &mut recorder)?;
                    drop(loss);
                    accumulator.add(&self.params, &grads)?;
                }
            }
        }
        recorder.phase("update");
        let (mut grads, mut communication_s) = self.reduced_gradients(sharded, accumulator)?;
        if world > 1 {
            let vb_count = f64::from(u8::from(vb_sum.is_some()));
            let mut sums = [loss_sum, mse_sum, vb_sum.unwrap_or(0.0), vb_count];
            self.collective.all_reduce_sum_f64(&mut sums)?;
            let w = world as f64;
            (loss_sum, mse_sum) = (sums[0] / w, sums[1] / w);
            vb_sum = (sums[3] > 0.0).then_some(sums[2] / w);
        }
        if self.scaler.scale != 1.0 {
            let unscale = 1.0 / self.scaler.scale;
            for g in grads.iter_mut() {
                *g = g.affine(unscale, 0.0)?;
            }
        }
        let mut sum_of_squares = [grad_sum_of_squares(&grads)?];
        if self.partition.is_some() {
            // Each rank holds pieces: the norm is that of all of them.
            self.collective.all_reduce_sum_f64(&mut sum_of_squares)?;
        }
        let grad_norm = sum_of_squares[0].sqrt();
        if let Some(max_norm) = self.config.clip_grad_norm {
            clip_to_norm(&mut grads, grad_norm, max_norm)?;
        }
        let overflow = !grad_norm.is_finite();
        if overflow && !self.scaler.dynamic {
            return Err(TrainError::NonFiniteGradients {
                step: step + 1,
                norm: grad_norm,
                last_checkpoint: self.last_checkpoint.clone(),
            });
        }
        let loss_scale = self.scaler.scale;
        let stepped = self.scaler.update(overflow);
        let lr = warmup_lr(self.config.optimizer.lr, step, self.config.warmup_steps);
        if stepped {
            self.optimizer.step(&grads, lr)?;
            drop(grads);
            if self.partition.is_some() {
                let gathering = Instant::now();
                self.gather_weights_into_model()?;
                communication_s += gathering.elapsed().as_secs_f64();
            }
            self.ema.update(&self.optimizer.weights_f32()?)?;
        } else {
            drop(grads);
        }
        let memory = recorder.finish();
        let gradient_bytes = memory
            .timeline
            .iter()
            .rfind(|phase| phase.name == "update")
            .map_or(0, |phase| phase.start_bytes);
        self.steps_done += 1;
        let report = StepReport {
            step: self.steps_done,
            loss: loss_sum / accum as f64,
            mse: mse_sum / accum as f64,
            vb: vb_sum.map(|v| v / accum as f64),
            lr,
            grad_norm,
            loss_scale,
            skipped: !stepped,
            step_peak_bytes: memory.peak_bytes,
            resident_bytes: self.plan.account.resident_bytes(),
            gradient_bytes,
            step_s: started.elapsed().as_secs_f64(),
            communication_s,
            samples_seen: self.loader.position(),
        };
        if let Some(metrics) = &mut self.metrics {
            let mut line = serde_json::to_string(&report)
                .map_err(|e| TrainError::Config(format!("cannot encode metrics: {e}")))?;
            line.push('\n');
            let path = self.out_dir.join(METRICS_FILE);
            metrics
                .write_all(line.as_bytes())
                .and_then(|()| metrics.flush())
                .map_err(output_error(&path))?;
        }
        Ok((report, memory))
    }

    /// The step's gradients of the parameters the optimizer holds, in its order — whole
    /// and summed over the ranks, or under ZeRO this rank's pieces of the sums — and the
    /// seconds spent communicating them.
    fn reduced_gradients(
        &self,
        sharded: Option<ShardedGradients<'_>>,
        accumulator: GradAccumulator,
    ) -> Result<(Vec<Tensor>, f64), TrainError> {
        if let Some(sink) = sharded {
            // ZeRO 2: reduced stage by stage during the backward passes.
            let seconds = sink.communication_s();
            return Ok((sink.finish(&self.owned, &self.device)?, seconds));
        }
        let mut whole = accumulator.finish(&self.params)?;
        let started = Instant::now();
        let grads = match &self.partition {
            Some(partition) => crate::zero::reduce_scatter(
                self.collective.as_ref(),
                partition,
                whole.into_iter().enumerate().collect(),
            )?
            .into_iter()
            .flatten()
            .collect(),
            None => {
                if self.collective.size() > 1 {
                    sum_over_ranks(self.collective.as_ref(), &mut whole)?;
                }
                whole
            }
        };
        let seconds = if self.collective.size() > 1 {
            started.elapsed().as_secs_f64()
        } else {
            0.0
        };
        Ok((grads, seconds))
    }

    /// Trains until `config.steps` steps are done, checkpointing every `save_every` steps
    /// and at the end. `on_step` sees each step's report; returning `Break` saves a
    /// checkpoint and stops (Ctrl-C).
    pub fn run(
        &mut self,
        mut on_step: impl FnMut(&StepReport) -> ControlFlow<()>,
    ) -> Result<RunOutcome, TrainError> {
        while self.steps_done < self.config.steps {
            let report = self.train_step()?;
            let every = self.config.save_every;
            if every > 0 && self.steps_done.is_multiple_of(every) {
                self.save_checkpoint()?;
            }
            if on_step(&report).is_break() {
                let checkpoint = self.checkpoint_now()?;
                return Ok(RunOutcome::Interrupted {
                    step: self.steps_done,
                    checkpoint,
                });
            }
        }
        let checkpoint = self.checkpoint_now()?;
        Ok(RunOutcome::Finished {
            step: self.steps_done,
            checkpoint,
        })
    }

    /// The checkpoint of the current step, written unless it already exists.
    fn checkpoint_now(&mut self) -> Result<PathBuf, TrainError> {
        let current = self.out_dir.join(checkpoint_name(self.steps_done));
        if self.last_checkpoint.as_ref() == Some(&current) {
            return Ok(current);
        }
        self.save_checkpoint()
    }

    /// Writes `<out>/checkpoint-<step>/` (through a temporary directory) and points
    /// `<out>/latest` at it.
    pub fn save_checkpoint(&mut self) -> Result<PathBuf, TrainError> {
        let name = checkpoint_name(self.steps_done);
        let target = self.out_dir.join(&name);
        let optimizer_state = self.whole_optimizer_state()?;
        let ema = self.ema_weights()?;
        if self.collective.rank() != 0 {
            // Rank 0 writes it; the others wait until it is there.
            self.collective.barrier()?;
            self.last_checkpoint = Some(target.clone());
            return Ok(target);
        }
        let tmp = self.out_dir.join(format!(".{name}.tmp"));
        let result = self
            .write_checkpoint(&tmp, &optimizer_state, &ema)
            .and_then(|()| {
                if target.exists() {
                    std::fs::remove_dir_all(&target).map_err(output_error(&target))?;
                }
                std::fs::rename(&tmp, &target).map_err(output_error(&target))?;
                crate::io::write_atomically(&self.out_dir.join(LATEST_FILE), name.as_bytes())
                    .map_err(output_error(&self.out_dir))
            });
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        // The other ranks wait here whether or not it was written.
        self.collective.barrier()?;
        result?;
        tracing::info!(checkpoint = %target.display(), "checkpoint written");
        self.last_checkpoint = Some(target.clone());
        Ok(target)
    }

    /// ZeRO: every rank's updated pieces into every rank's model variables (a collective
    /// call). This rank's own pieces are in place already.
    fn gather_weights_into_model(&self) -> Result<(), TrainError> {
        let Some(partition) = &self.partition else {
            return Ok(());
        };
        let params = &self.params;
        crate::zero::all_gather(
            self.collective.as_ref(),
            partition,
            &self.device,
            |p| {
                let own = partition.own(p);
                if own.is_empty() {
                    return Ok(None);
                }
                piece_of(&params[p].1.as_detached_tensor(), &own).map(Some)
            },
            |p, whole| {
                let var = &params[p].1;
                var.set(&whole.reshape(var.shape())?.to_dtype(var.dtype())?)
            },
        )?;
        Ok(())
    }

    /// Whole tensors of a state kept per parameter, `(key(name), tensor)` in parameter
    /// order: `held` has this rank's pieces under those keys, and every parameter's pieces
    /// are all-gathered (ZeRO; a collective call: every rank makes it).
    fn gathered(
        &self,
        partition: &Partition,
        held: &HashMap<String, Tensor>,
        key: impl Fn(&str) -> String,
    ) -> Result<Vec<(String, Tensor)>, TrainError> {
        let mut whole = Vec::with_capacity(self.params.len());
        crate::zero::all_gather(
            self.collective.as_ref(),
            partition,
            &self.device,
            |p| Ok(held.get(&key(&self.params[p].0)).cloned()),
            |p, values| {
                let (name, var) = &self.params[p];
                whole.push((key(name), values.reshape(var.shape())?));
                Ok(())
            },
        )?;
        Ok(whole)
    }

    /// Whole tensors by parameter name, in order, of a state held per parameter (`own`:
    /// the optimizer's f32 weights or the EMA; under ZeRO this rank's pieces, gathered: a
    /// collective call).
    fn whole_by_name(
        &self,
        own: Vec<(String, Tensor)>,
    ) -> Result<Vec<(String, Tensor)>, TrainError> {
        match &self.partition {
            None => Ok(own),
            Some(partition) => self.gathered(partition, &own.into_iter().collect(), str::to_string),
        }
    }

    /// The optimizer's state of every parameter, whole (under ZeRO gathered from the
    /// ranks: a collective call).
    fn whole_optimizer_state(&self) -> Result<HashMap<String, Tensor>, TrainError> {
        let held = self.optimizer.state_tensors();
        let Some(partition) = &self.partition else {
            return Ok(held);
        };
        let mut kinds = vec!["exp_avg", "exp_avg_sq"];
        if self.config.keeps_master_weights() {
            kinds.push("master");
        }
        let mut whole = HashMap::new();
        for kind in kinds {
            whole.extend(self.gathered(partition, &held, |name| format!("{kind}.{name}"))?);
        }
        Ok(whole)
    }

    fn write_checkpoint(
        &self,
        dir: &Path,
        optimizer_state: &HashMap<String, Tensor>,
        ema: &[(String, Tensor)],
    ) -> Result<(), TrainError> {
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(output_error(dir))?;
        }
        std::fs::create_dir_all(dir).map_err(output_error(dir))?;
        let weights = named_tensors(&self.varmap)?;
        match &self.lora {
            None => {
                crate::weights::save_model_dir(
                    &dir.join("transformer"),
                    &self.config_file,
                    &weights,
                    self.config.precision.dtype(),
                )?;
                crate::weights::save_model_dir(
                    &dir.join("ema"),
                    &self.config_file,
                    ema,
                    DType::F32,
                )?;
            }
            Some(lora) => {
                let base = lora.base_name();
                lora.adapter(&weights)?
                    .save(&dir.join(ADAPTER_DIR), base.as_deref())?;
                lora.adapter(ema)?.save(&dir.join("ema"), base.as_deref())?;
            }
        }
        let scheduler = dir.join(crate::pipeline::SCHEDULER_CONFIG_FILE);
        std::fs::create_dir_all(scheduler.parent().unwrap_or(dir)).map_err(output_error(dir))?;
        let json = crate::pipeline::ddim_config_to_json(&sampling_scheduler());
        crate::io::write_atomically(&scheduler, format!("{json:#}\n").as_bytes())
            .map_err(output_error(&scheduler))?;
        crate::io::save_safetensors(optimizer_state, &dir.join(OPTIMIZER_FILE))?;
        let state = TrainState {
            format: STATE_FORMAT,
            step: self.steps_done,
            optimizer_steps: self.optimizer.steps(),
            ema_updates: self.ema.updates(),
            samples_seen: self.loader.position(),
            loss_scaler: self.scaler,
            config: self.config.clone(),
            data: self.data.clone(),
            base_model: self.lora.as_ref().map(|l| l.base.clone()),
            ranks: self.collective.size(),
            rng: "each micro-batch's timesteps, noise and caption dropout come from a \
                  generator seeded by (config.seed, step, micro-batch); the data order \
                  from (config.seed, epoch)"
                .into(),
        };
        let json = serde_json::to_string_pretty(&state)
            .map_err(|e| TrainError::Config(format!("cannot encode {STATE_FILE}: {e}")))?;
        let path = dir.join(STATE_FILE);
        crate::io::write_atomically(&path, json.as_bytes()).map_err(output_error(&path))
    }

    /// The run's settings.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// The model's configuration.
    pub fn model_config(&self) -> &LatteConfig {
        &self.model_config
    }

    /// The model being trained (its weights are the variables of [`Trainer::varmap`]).
    pub fn model(&self) -> &Latte {
        &self.model
    }

    /// The trained variables: the model's weights, or the LoRA adapter's factors.
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// The adapter with its current factors, in a LoRA run.
    pub fn adapter(&self) -> Result<Option<Adapter>, TrainError> {
        let Some(lora) = &self.lora else {
            return Ok(None);
        };
        Ok(Some(lora.adapter(&named_tensors(&self.varmap)?)?))
    }

    /// The number of data-parallel ranks of the run this one resumed (`None` for a new
    /// run): on another number the global batch has changed.
    pub fn resumed_ranks(&self) -> Option<usize> {
        self.resumed_ranks
    }

    /// Steps taken so far.
    pub fn step(&self) -> u64 {
        self.steps_done
    }

    /// The f32 weights the optimiser updates, by name (sorted). Under ZeRO this is a
    /// collective call (the master pieces are gathered): every rank makes it.
    pub fn weights_f32(&self) -> Result<Vec<(String, Tensor)>, TrainError> {
        self.whole_by_name(self.optimizer.weights_f32()?)
    }

    /// Bytes of the optimizer state this rank holds (moments and master weights).
    pub fn optimizer_state_bytes(&self) -> u64 {
        self.optimizer.state_bytes()
    }

    /// A fingerprint of the trained variables' values (FNV-1a of their bits, in name
    /// order): data-parallel ranks compare theirs to show they hold the same weights.
    pub fn weights_digest(&self) -> Result<u64, TrainError> {
        let mut hash = crate::random::FNV_OFFSET;
        for (name, var) in &self.params {
            hash = crate::random::fnv1a(hash, name.as_bytes());
            let values = var
                .as_detached_tensor()
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?;
            for v in values {
                hash = crate::random::fnv1a(hash, &v.to_bits().to_le_bytes());
            }
        }
        Ok(hash)
    }

    /// The optimizer's and the EMA's memory on this rank, measured as they were built.
    pub fn state_memory(&self) -> StateMemory {
        self.state_memory
    }

    /// The EMA weights, by name (sorted). Under ZeRO this is a collective call (the
    /// pieces are gathered): every rank makes it.
    pub fn ema_weights(&self) -> Result<Vec<(String, Tensor)>, TrainError> {
        self.whole_by_name(self.ema.weights().to_vec())
    }

    /// The memory plan of a step: its account, policy, schedule and predicted peak (the
    /// row `latte plan` prints for the same settings).
    pub fn plan(&self) -> &Candidate {
        &self.plan
    }

    /// The loss-scaling state.
    pub fn loss_scaler(&self) -> &LossScaler {
        &self.scaler
    }

    /// The data being read.
    pub fn dataset(&self) -> &dyn Dataset {
        self.loader.dataset()
    }

    /// The newest checkpoint written by this trainer.
    pub fn last_checkpoint(&self) -> Option<&Path> {
        self.last_checkpoint.as_deref()
    }

    /// The output directory.
    pub fn out_dir(&self) -> &Path {
        &self.out_dir
    }
}

/// This rank's pieces (ZeRO) of whole tensors keyed by parameter name (the saved EMA), for
/// the parameters `owned`; errors name a tensor whose shape is not its parameter's.
fn own_pieces(
    tensors: &HashMap<String, Tensor>,
    params: &[(String, Var)],
    owned: &[usize],
    partition: &Partition,
) -> Result<HashMap<String, Tensor>, TrainError> {
    let mut pieces = HashMap::new();
    for &p in owned {
        let (name, var) = &params[p];
        let Some(t) = tensors.get(name) else { continue };
        if t.shape() != var.shape() {
            return Err(TrainError::Config(format!(
                "saved EMA weight `{name}` has shape {:?}, the parameter {:?}",
                t.dims(),
                var.dims()
            )));
        }
        pieces.insert(name.clone(), piece_of(t, &partition.own(p))?);
    }
    Ok(pieces)
}

/// Sums every rank's gradients in place, in buckets of whole tensors in parameter order
/// ([`crate::zero::buckets`]).
fn sum_over_ranks(collective: &dyn Collective, grads: &mut [Tensor]) -> Result<(), TrainError> {
    let sizes: Vec<usize> = grads.iter().map(Tensor::elem_count).collect();
    for run in crate::zero::buckets(&sizes) {
        let flat = grads[run.clone()]
            .iter()
            .map(|g| g.flatten_all()?.to_dtype(DType::F32))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let bucket = Tensor::cat(&flat, 0)?;
        drop(flat);
        let summed = collective.all_reduce_sum_tensor(&bucket)?;
        drop(bucket);
        let mut offset = 0;
        for g in &mut grads[run] {
            let n = g.elem_count();
            *g = summed.narrow(0, offset, n)?.reshape(g.shape())?;
            offset += n;
        }
    }
    Ok(())
}

/// `checkpoint-<step>`.
pub fn checkpoint_name(step: u64) -> String {
    format!("checkpoint-{step}")
}

/// Opens `metrics.jsonl` in `out_dir` for appending: replaced for a new run, cut after
/// `step` for a resumed one.
fn open_metrics(out_dir: &Path, step: u64, resumed: bool) -> Result<std::fs::File, TrainError> {
    let path = out_dir.join(METRICS_FILE);
    let kept = if resumed {
        std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter(|line| {
                serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                    .is_some_and(|s| s <= step)
            })
            .map(|line| format!("{line}\n"))
            .collect::<String>()
    } else {
        String::new()
    };
    crate::io::write_atomically(&path, kept.as_bytes()).map_err(output_error(out_dir))?;
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(output_error(out_dir))
}

/// One micro-batch's tensors.
struct Prepared {
    inputs: LatteInputs,
    x0: Tensor,
    x_t: Tensor,
    noise: Tensor,
    timesteps: Vec<usize>,
    mask: Option<Tensor>,
}

impl Prepared {
    fn target(&self) -> LossTarget<'_> {
        LossTarget {
            x0: &self.x0,
            x_t: &self.x_t,
            noise: &self.noise,
            timesteps: &self.timesteps,
            mask: self.mask.as_ref(),
        }
    }
}
