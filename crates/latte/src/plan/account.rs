//! The memory of a step outside the checkpointed chain, part by part, and the whole
//! step's peak for a chain peak.
//!
//! A step's memory is the resident state (weights; in training also AdamW's moments,
//! f32 master weights below f32 and the f32 EMA), what the step holds beside the chain
//! (the batch, its tensors, the loss or guidance transient around the model output) and
//! the chain's own peak (activations, stage gradients and transients, from
//! [`crate::costs`] or a measurement). After the backward come the phases without the
//! chain: accumulating the gradients in f32 and the optimiser step. The step's peak is
//! the largest of those phases ([`MemoryAccount::total_peak_bytes`]).
//!
//! With LoRA the trained parameters are the adapters' f32 factors: the base weights are
//! frozen in the compute precision, and the moments, the EMA, the gradients and their
//! sums are the factors' alone.
//!
//! Data parallelism plans one rank ([`crate::zero`]): ZeRO 1 keeps an `N`-th of the
//! moments, master weights and EMA; ZeRO 2 also an `N`-th of the gradient sums, and each
//! stage's gradients live only from its backward op to their reduce-scatter
//! ([`per_rank_chain_costs`]).
//!
//! Each part below mirrors what the code of [`crate::train`] and [`crate::sampling`]
//! allocates; `tests/memory_account.rs` measures whole steps against it.

use super::workload::{Setting, Task, Workload};
use crate::costs::Memory;
use crate::train::Precision;
use crate::weights::parameter_specs;
use remat::costs::ChainCosts;
use serde::Serialize;

/// f32 temporaries the size of the largest parameter that AdamW's update holds at once
/// (the decayed weight, the two new moments, the denominator, the update and its cast).
const OPTIMIZER_TEMPORARIES: u64 = 6;

/// f32 temporaries the size of one parameter while a micro-batch's gradients are added
/// to the f32 sums (the converted gradient and the new sum).
const ACCUMULATE_TEMPORARIES: u64 = 2;

/// Gradient elements a data-parallel collective moves at once (a larger tensor travels
/// alone).
const GRADIENT_BUCKET_ELEMENTS: u64 = crate::zero::BUCKET_ELEMENTS as u64;

/// Latent-sized f32 tensors (one video, `in_channels`) that a guided step holds through
/// the backward: ε̂ and ∂L/∂x̂₀ (`sampling::guided_eval`).
const GUIDANCE_LATENT_TENSORS: u64 = 2;

/// Heap bytes of one held tensor besides its elements (candle's `Tensor_` and storage
/// handles, shape and strides), as the counting allocator sees them; with
/// [`NAMES_BYTES`], calibrated by `tests/memory_account.rs` (241 bytes per weight of a
/// frozen model on the tiny and small presets).
const TENSOR_HANDLE_BYTES: u64 = 256;

/// Heap bytes per parameter of the training state's names (the variable map, the
/// sorted parameter list, the optimiser's and the EMA's entries): 1,694 bytes per
/// parameter measured for f32 training (four tensors), 1,923 below f32 (five).
const NAMES_BYTES: u64 = 640;

/// Memory of one step outside the checkpointed chain, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct MemoryAccount {
    /// Parameters of the model.
    pub parameter_count: u64,
    /// Parameters the optimiser updates (training): every weight, or the LoRA factors.
    pub trained_parameter_count: u64,
    /// Weights in the compute precision (and the LoRA factors in f32).
    pub weights_bytes: u64,
    /// f32 master weights (training below f32).
    pub master_weights_bytes: u64,
    /// AdamW's two f32 moments (training).
    pub optimizer_moments_bytes: u64,
    /// The f32 moving average of the weights (training).
    pub ema_bytes: u64,
    /// Handles and names of the tensors held across steps (host heap only).
    pub handles_bytes: u64,
    /// Batches the data loader holds ahead of the step (host memory, f32).
    pub prefetch_bytes: u64,
    /// The step's inputs: the batch on the host and its tensors (clean, noisy and noise
    /// latents, captions, loss mask) in training; the latents and caption batch in
    /// guidance.
    pub step_inputs_bytes: u64,
    /// What is computed from the model output before the backward and still live at the
    /// forward's end: the loss and its gradient (training), or ε̂, x̂₀ and the objective's
    /// gradient (guidance).
    pub output_transient_bytes: u64,
    /// Parameter gradients in the compute precision held when the chain ends (training;
    /// none under ZeRO 2, whose stages reduce theirs at once). The stages' share is
    /// allocated inside the chain's backward and counted in its peak.
    pub param_grad_bytes: u64,
    /// Gradients of the parameters before the chain (patch, timestep and caption
    /// embeddings), allocated after the chain's backward (training).
    pub head_param_grad_bytes: u64,
    /// The f32 gradient sums: a buffer of their own when accumulating micro-batches or
    /// computing below f32 (training); under ZeRO 2 this rank's pieces.
    pub grad_buffer_bytes: u64,
    /// Whether the buffer holds sums while later micro-batches run through the chain.
    pub grad_buffer_during_chain: bool,
    /// Temporaries of accumulating, clipping and AdamW's update (the largest parameter's
    /// f32 copies).
    pub update_transient_bytes: u64,
    /// Data parallelism's transients after the chain: a bucket of gradients being summed
    /// over the ranks (its values and their new tensors); under ZeRO a bucket being
    /// reduce-scattered or all-gathered and one parameter's values in f32 and in the
    /// compute precision.
    pub communication_bytes: u64,
    /// The CPU matrix kernel's packing buffers: gemm packs up to a weight matrix (`kc × nc`
    /// of the right operand, in f32) per worker thread running a product, and products on
    /// several threads may hold theirs at once — a transient the chain's analytic costs do
    /// not see (measured: 0.3–0.6 MiB per stage of the small preset at 64 tokens, and up to
    /// one matrix per thread more as the threads happen to run). None on a GPU.
    pub kernel_workspace_bytes: u64,
}

impl MemoryAccount {
    /// The account of `workload` at `setting`.
    ///
    /// # Errors
    /// When the model's parameters cannot be listed (an invalid configuration).
    pub fn of(workload: &Workload, setting: Setting) -> candle_core::Result<Self> {
        let specs = parameter_specs(&workload.config)?;
        let tensors = specs.len() as u64;
        let count: u64 = specs.iter().map(|s| s.numel() as u64).sum();
        let largest = specs.iter().map(|s| s.numel() as u64).max().unwrap_or(0);
        let head_count: u64 = specs
            .iter()
            .filter(|s| is_head_parameter(&s.name))
            .map(|s| s.numel() as u64)
            .sum();
        let elem = setting.precision.dtype().size_in_bytes() as u64;
        // Handles and names live on the host: they count where the host heap is measured.
        let host = u64::from(workload.memory == Memory::Host);
        let kernel_workspace_bytes = match workload.memory {
            Memory::Host => rayon::current_num_threads() as u64 * 4 * largest_matrix(&specs),
            Memory::Device => 0,
        };
        let sizes = Sizes::new(workload, setting.batch);
        let weights_bytes = count * elem;
        Ok(match workload.task {
            Task::Train {
                grad_accum,
                prefetch_batches,
                ranks,
                zero,
            } => {
                let low_precision = setting.precision != Precision::F32;
                let trained = match workload.adapted_layers() {
                    Ok(Some(layers)) => Trained {
                        frozen_tensors: tensors,
                        ..Trained::adapters(&layers)
                    },
                    Ok(None) => Trained {
                        count,
                        tensors,
                        largest,
                        head_count,
                        grad_elem: elem,
                        frozen_tensors: 0,
                    },
                    Err(e) => return Err(candle_core::Error::Msg(e.to_string())),
                };
                let lora = trained.frozen_tensors > 0;
                // Gradients below f32 are widened into sums of their own.
                let separate_sums = trained.grad_elem != 4 || grad_accum > 1;
                // Trained tensors: the variable, two moments, the EMA (and a master copy).
                let trained_handles =
                    TENSOR_HANDLE_BYTES * if low_precision && !lora { 5 } else { 4 } + NAMES_BYTES;
                // The prepared micro-batch: x₀, ε and x_t in f32, x_t again in the compute
                // precision below f32, the captions in it, the mask, the timesteps.
                let prepared = 4 * 3 * sizes.latents
                    + if low_precision {
                        elem * sizes.latents
                    } else {
                        0
                    }
                    + elem * sizes.captions
                    + 4 * sizes.positions
                    + 8 * sizes.videos;
                // The loss (`NoiseSchedule::training_loss`) reads the output, x₀, x_t, ε and
                // the mask as f64 on the host and writes the gradient in f64 and f32.
                let loss = 8 * sizes.outputs
                    + 8 * 3 * sizes.latents
                    + 8 * sizes.positions
                    + 8 * sizes.outputs
                    + 4 * sizes.outputs;
                let n = trained.count;
                let ranks = ranks.max(1) as u64;
                // ZeRO: this rank's piece of every parameter's state (an N-th of each).
                let share = |bytes: u64| {
                    if zero >= 1 {
                        bytes.div_ceil(ranks)
                    } else {
                        bytes
                    }
                };
                let bucket = n.min(GRADIENT_BUCKET_ELEMENTS.max(trained.largest));
                // A bucket's f32 values and the buffer built from them (or its copy on the
                // host, for MPI), and this rank's received block and its own copy.
                let bucket_bytes = 8 * bucket + 8 * bucket.div_ceil(ranks);
                // Under ZeRO an all-gathered parameter's values in f32 and in the compute
                // precision.
                let gathered = (4 + elem) * trained.largest;
                let communication_bytes = match (ranks, zero) {
                    (1, 0) => 0,
                    (_, 0) => bucket_bytes,
                    // ZeRO 1 reduce-scatters the whole sums after the chain: this rank's
                    // pieces arrive beside them.
                    (_, 1) => bucket_bytes + gathered + share(4 * n),
                    _ => bucket_bytes + gathered,
                };
                // ZeRO 2 keeps no whole gradient: each stage's are reduced into this
                // rank's f32 sums (kept stage by stage in the chain's costs,
                // `per_rank_chain_costs`).
                let reduced_per_stage = zero >= 2;
                MemoryAccount {
                    communication_bytes,
                    parameter_count: count,
                    trained_parameter_count: n,
                    weights_bytes: if lora {
                        weights_bytes + 4 * n
                    } else {
                        weights_bytes
                    },
                    master_weights_bytes: share(if low_precision && !lora { 4 * n } else { 0 }),
                    optimizer_moments_bytes: share(8 * n),
                    ema_bytes: share(4 * n),
                    handles_bytes: host
                        * (trained.tensors * trained_handles
                            + trained.frozen_tensors * TENSOR_HANDLE_BYTES),
                    prefetch_bytes: prefetch_batches as u64 * sizes.host_batch_bytes(),
                    step_inputs_bytes: sizes.host_batch_bytes() + prepared,
                    output_transient_bytes: loss,
                    param_grad_bytes: if reduced_per_stage {
                        0
                    } else {
                        n * trained.grad_elem
                    },
                    head_param_grad_bytes: trained.head_count * trained.grad_elem,
                    grad_buffer_bytes: if reduced_per_stage {
                        share(4 * n)
                    } else if separate_sums {
                        4 * n
                    } else {
                        0
                    },
                    grad_buffer_during_chain: grad_accum > 1,
                    update_transient_bytes: 4 * trained.largest * OPTIMIZER_TEMPORARIES,
                    kernel_workspace_bytes,
                }
            }
            Task::Guide { .. } => {
                // The f32 latents, the negative and positive captions and their batch,
                // and the latents repeated over the CFG batch.
                let model_videos = workload.model_batch(setting.batch) as u64;
                let per_video_latents = sizes.latents / sizes.videos;
                let caption_batch = elem * sizes.model_captions;
                let inputs = 4 * sizes.latents
                    + caption_batch
                    + if model_videos > 1 {
                        caption_batch + 4 * per_video_latents * model_videos
                    } else {
                        0
                    };
                let per_video_outputs = sizes.outputs / sizes.videos;
                MemoryAccount {
                    parameter_count: count,
                    weights_bytes,
                    handles_bytes: host * tensors * TENSOR_HANDLE_BYTES,
                    step_inputs_bytes: inputs,
                    // ε̂ and ∂L/∂x̂₀, and the upstream gradient over the model's batch.
                    output_transient_bytes: 4
                        * (GUIDANCE_LATENT_TENSORS * per_video_latents
                            + per_video_outputs * model_videos),
                    kernel_workspace_bytes,
                    ..MemoryAccount::default()
                }
            }
        })
    }

    /// Bytes live across steps: weights, master weights, AdamW's moments, EMA and their
    /// handles.
    pub fn resident_bytes(&self) -> u64 {
        self.weights_bytes
            + self.master_weights_bytes
            + self.optimizer_moments_bytes
            + self.ema_bytes
            + self.handles_bytes
    }

    /// Bytes live beside the chain at its peak.
    pub fn beside_chain_bytes(&self) -> u64 {
        self.resident_bytes()
            + self.prefetch_bytes
            + self.step_inputs_bytes
            + self.output_transient_bytes
            + self.head_param_grad_bytes
            + self.kernel_workspace_bytes
            + if self.grad_buffer_during_chain {
                self.grad_buffer_bytes
            } else {
                0
            }
    }

    /// Peak of the phases after the chain's backward: the gradients converted and added
    /// to the f32 sums, then clipping and AdamW's update over them.
    pub fn after_chain_bytes(&self) -> u64 {
        if self.trained_parameter_count == 0 {
            return 0;
        }
        let accumulate = self.step_inputs_bytes
            + self.param_grad_bytes
            + self.grad_buffer_bytes
            + self.update_transient_bytes / OPTIMIZER_TEMPORARIES * ACCUMULATE_TEMPORARIES;
        let f32_grads = self.grad_buffer_bytes.max(self.param_grad_bytes);
        let update = f32_grads + self.update_transient_bytes;
        self.resident_bytes()
            + self.prefetch_bytes
            + accumulate.max(update)
            + self.communication_bytes
    }

    /// The whole step's peak when the chain's own peak is `chain_peak_bytes`.
    pub fn total_peak_bytes(&self, chain_peak_bytes: u64) -> u64 {
        (self.beside_chain_bytes() + chain_peak_bytes).max(self.after_chain_bytes())
    }

    /// The smallest budget for the chain that a whole-step budget leaves, or `None` when
    /// what lies outside the chain alone exceeds it.
    pub fn chain_budget(&self, budget_bytes: u64) -> Option<u64> {
        if self.after_chain_bytes() > budget_bytes {
            return None;
        }
        budget_bytes.checked_sub(self.beside_chain_bytes())
    }

    /// The non-zero parts held across steps, by name.
    pub fn resident_parts(&self) -> Vec<(&'static str, u64)> {
        let mut parts = self.parts();
        parts.truncate(
            [
                self.weights_bytes,
                self.master_weights_bytes,
                self.optimizer_moments_bytes,
                self.ema_bytes,
                self.handles_bytes,
            ]
            .iter()
            .filter(|b| **b > 0)
            .count(),
        );
        parts
    }

    /// The non-zero parts by name, for listings.
    pub fn parts(&self) -> Vec<(&'static str, u64)> {
        [
            ("weights", self.weights_bytes),
            ("master weights", self.master_weights_bytes),
            ("optimizer moments", self.optimizer_moments_bytes),
            ("EMA", self.ema_bytes),
            ("tensor handles", self.handles_bytes),
            ("prefetch", self.prefetch_bytes),
            ("step inputs", self.step_inputs_bytes),
            (
                if self.trained_parameter_count > 0 {
                    "loss"
                } else {
                    "guidance tensors"
                },
                self.output_transient_bytes,
            ),
            ("gradient sums", self.grad_buffer_bytes),
            ("data-parallel transients", self.communication_bytes),
            ("kernel workspace", self.kernel_workspace_bytes),
        ]
        .into_iter()
        .filter(|(_, bytes)| *bytes > 0)
        .collect()
    }
}

/// The chain's costs as one data-parallel rank runs them: under ZeRO 2 a stage's parameter
/// gradients are not kept to the end but reduce-scattered as its backward op ends, so
/// they join that op's transients together with the collective's buffers (one bucket's
/// f32 values and the buffer sent, and this rank's received pieces and their sums). What stays is this rank's f32 piece: kept from that op on when the step has one
/// micro-batch, added into the sums of the earlier micro-batches (which the account holds
/// beside the chain) otherwise. Other tasks run the costs as they are.
pub fn per_rank_chain_costs(
    workload: &Workload,
    setting: Setting,
    mut costs: ChainCosts,
) -> ChainCosts {
    let Task::Train {
        ranks,
        zero,
        grad_accum,
        ..
    } = workload.task
    else {
        return costs;
    };
    if zero < 2 {
        return costs;
    }
    let grad_elem = if workload.lora.is_some() {
        4
    } else {
        setting.precision.dtype().size_in_bytes() as u64
    };
    let ranks = ranks.max(1) as u64;
    // A parameter larger than a bucket travels alone.
    let largest = parameter_specs(&workload.config)
        .map(|specs| specs.iter().map(|s| s.numel() as u64).max().unwrap_or(0))
        .unwrap_or(0);
    let bucket = GRADIENT_BUCKET_ELEMENTS.max(largest);
    for stage in &mut costs.stages {
        let elements = stage.param_grad_bytes / grad_elem;
        stage.bwd_tmp_bytes +=
            stage.param_grad_bytes + 8 * elements.min(bucket) + 8 * elements.div_ceil(ranks);
        stage.param_grad_bytes = if grad_accum == 1 {
            4 * elements.div_ceil(ranks)
        } else {
            0
        };
    }
    costs
}

/// What the optimiser trains.
struct Trained {
    /// Scalars.
    count: u64,
    /// Tensors.
    tensors: u64,
    /// Scalars of the largest tensor.
    largest: u64,
    /// Scalars of those that get their gradient after the chain (the head's).
    head_count: u64,
    /// Bytes of one gradient element.
    grad_elem: u64,
    /// Frozen weight tensors beside them (LoRA's base model).
    frozen_tensors: u64,
}

impl Trained {
    /// LoRA factors on `layers` (f32, with f32 gradients); no frozen tensors counted.
    fn adapters(layers: &[crate::lora::AdaptedLayer]) -> Self {
        let numel = |l: &crate::lora::AdaptedLayer| l.numel() as u64;
        Self {
            count: layers.iter().map(numel).sum(),
            tensors: 2 * layers.len() as u64,
            largest: layers
                .iter()
                .map(|l| (l.rank * l.in_dim.max(l.out_dim)) as u64)
                .max()
                .unwrap_or(0),
            head_count: layers
                .iter()
                .filter(|l| is_head_parameter(&l.module))
                .map(numel)
                .sum(),
            grad_elem: 4,
            frozen_tensors: 0,
        }
    }
}

/// Elements of the largest two-dimensional parameter (a linear layer's weight).
fn largest_matrix(specs: &[crate::weights::ParamSpec]) -> u64 {
    specs
        .iter()
        .filter(|s| s.shape.len() == 2)
        .map(|s| s.numel() as u64)
        .max()
        .unwrap_or(0)
}

/// Whether a parameter belongs to the head (it gets its gradient after the chain).
fn is_head_parameter(name: &str) -> bool {
    ["pos_embed.", "adaln_single.", "caption_projection."]
        .iter()
        .any(|prefix| name.starts_with(prefix))
}

/// Element counts of a step's tensors.
struct Sizes {
    /// Videos in the batch (before CFG).
    videos: u64,
    /// Latent elements of the batch, `b·c·f·h·w`.
    latents: u64,
    /// Model-output elements of the batch, `b·c_out·f·h·w`.
    outputs: u64,
    /// Latent positions of the batch, `b·f·h·w`.
    positions: u64,
    /// Caption elements of the batch, `b·l·d`.
    captions: u64,
    /// Caption elements of the model's batch (doubled by CFG).
    model_captions: u64,
}

impl Sizes {
    fn new(workload: &Workload, batch: usize) -> Self {
        let g = &workload.geometry;
        let c = &workload.config;
        let b = batch as u64;
        let positions = b * (g.frames * g.height * g.width) as u64;
        let caption = (g.caption_tokens * c.caption_channels) as u64;
        Self {
            videos: b,
            latents: positions * c.in_channels as u64,
            outputs: positions * c.out_channels as u64,
            positions,
            captions: b * caption,
            model_captions: workload.model_batch(batch) as u64 * caption,
        }
    }

    /// A batch of clips on the host (`data::Batch`: videos, captions, mask in f32).
    fn host_batch_bytes(&self) -> u64 {
        4 * (self.latents + self.captions + self.positions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::latte_1;
    use crate::costs::Kernels;

    fn latte_1_workload(task: Task) -> Workload {
        let preset = latte_1();
        Workload {
            config: preset.config,
            geometry: preset.geometry,
            task,
            kernels: Kernels::Generic,
            memory: Memory::Device,
            temporal: true,
            lora: None,
        }
    }

    #[test]
    fn latte_1_state_is_counted_per_parameter() {
        let params = 1_057_246_880u64;
        let bf16 = |batch| Setting {
            precision: Precision::Bf16,
            batch,
        };
        let guide =
            MemoryAccount::of(&latte_1_workload(Task::Guide { cfg: true }), bf16(1)).unwrap();
        assert_eq!(guide.parameter_count, params);
        assert_eq!(guide.weights_bytes, 2 * params);
        assert_eq!(guide.optimizer_moments_bytes + guide.ema_bytes, 0);
        assert_eq!(guide.after_chain_bytes(), 0);
        let train = Task::Train {
            grad_accum: 1,
            prefetch_batches: 0,
            ranks: 1,
            zero: 0,
        };
        let train = MemoryAccount::of(&latte_1_workload(train), bf16(1)).unwrap();
        // Two f32 moments, an f32 master copy, an f32 EMA and f32 gradient sums.
        assert_eq!(train.optimizer_moments_bytes, 8 * params);
        assert_eq!(train.master_weights_bytes, 4 * params);
        assert_eq!(train.ema_bytes, 4 * params);
        assert_eq!(train.grad_buffer_bytes, 4 * params);
        assert_eq!(train.param_grad_bytes, 2 * params);
        assert!(train.head_param_grad_bytes > 0 && train.head_param_grad_bytes < 2 * params);
        assert!(train.after_chain_bytes() > train.resident_bytes() + 4 * params);
        assert_eq!(train.communication_bytes, 0);
        // ZeRO 1 on 8 ranks: an eighth of the moments, master weights and EMA per rank;
        // after the chain the whole sums, a bucket, one parameter's values and the
        // received pieces.
        let on_8 = |zero| Task::Train {
            grad_accum: 1,
            prefetch_batches: 0,
            ranks: 8,
            zero,
        };
        let largest = parameter_specs(&latte_1_workload(on_8(1)).config)
            .unwrap()
            .iter()
            .map(|s| s.numel() as u64)
            .max()
            .unwrap();
        let sharded = MemoryAccount::of(&latte_1_workload(on_8(1)), bf16(1)).unwrap();
        assert_eq!(sharded.optimizer_moments_bytes, params);
        assert_eq!(sharded.master_weights_bytes, (4 * params).div_ceil(8));
        assert_eq!(sharded.ema_bytes, (4 * params).div_ceil(8));
        assert_eq!(sharded.grad_buffer_bytes, 4 * params);
        assert_eq!(sharded.param_grad_bytes, 2 * params);
        let bucket = (4u64 << 20).max(largest);
        assert_eq!(
            sharded.communication_bytes,
            8 * bucket + 8 * bucket.div_ceil(8) + 6 * largest + (4 * params).div_ceil(8)
        );
        // ZeRO 2: no whole gradient is kept; this rank's f32 sums are an eighth, and after
        // the chain the step holds far less than ZeRO 1's.
        let zero2 = MemoryAccount::of(&latte_1_workload(on_8(2)), bf16(1)).unwrap();
        assert_eq!(zero2.param_grad_bytes, 0);
        assert_eq!(zero2.grad_buffer_bytes, (4 * params).div_ceil(8));
        assert!(!zero2.grad_buffer_during_chain);
        assert!(zero2.after_chain_bytes() + 4 * params < sharded.after_chain_bytes());
    }

    /// ZeRO 2 moves each stage's parameter gradients from the kept bytes into its
    /// backward's transients, with the reduce-scatter's buffers; other runs keep the costs.
    #[test]
    fn zero_two_reduces_each_stage_s_gradients_at_its_backward() {
        let stage = |param_grad_bytes| remat::costs::StageCosts {
            fwd_s: 1.0,
            bwd_s: 2.0,
            fwd_graph_only_s: None,
            input_bytes: 100,
            graph_bytes: 1000,
            fwd_tmp_bytes: 10,
            bwd_tmp_bytes: 20,
            param_grad_bytes,
        };
        let costs = ChainCosts::new(vec![stage(800), stage(0)], 100, 0);
        let task = |zero, grad_accum| Task::Train {
            grad_accum,
            prefetch_batches: 0,
            ranks: 4,
            zero,
        };
        let bf16 = Setting {
            precision: Precision::Bf16,
            batch: 1,
        };
        let one = per_rank_chain_costs(&latte_1_workload(task(1, 1)), bf16, costs.clone());
        assert_eq!(one, costs);
        let two = per_rank_chain_costs(&latte_1_workload(task(2, 1)), bf16, costs.clone());
        // 400 bf16 elements: the gradients (800 B), the bucket and one parameter's f32
        // values (8 B each), the received piece and its sum (8 B per 100); this rank's
        // f32 piece of 100 elements stays.
        assert_eq!(two.stages[0].param_grad_bytes, 4 * 100);
        assert_eq!(two.stages[0].bwd_tmp_bytes, 20 + 800 + 8 * 400 + 8 * 100);
        assert_eq!(two.stages[1].bwd_tmp_bytes, 20);
        // With micro-batches the piece joins the sums the account holds beside the chain.
        let accumulating = per_rank_chain_costs(&latte_1_workload(task(2, 2)), bf16, costs);
        assert_eq!(accumulating.stages[0].param_grad_bytes, 0);
    }
}
