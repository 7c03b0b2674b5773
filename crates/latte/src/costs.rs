//! Analytic cost model of the Latte chain: what `remat::profile::profile` would measure
//! for every scheduled stage (the attention and feed-forward halves of the spatial and
//! temporal blocks, the tail) and for the head,
//! computed from shapes and dtypes alone, without allocating a tensor.
//!
//! # How the bytes are derived
//! The model code is replayed on *virtual tensors* ([`vt`]): values with a shape, strides,
//! a dtype and a reference-counted storage, but no data. Every virtual op allocates and
//! frees exactly what the candle op it stands for does on the CPU backend (a new storage
//! for a binary op, a matmul, a reduction, a dtype conversion or a copy; none for a view;
//! a copy for `reshape` and `contiguous` of a strided input), and records its inputs when
//! one of them takes part in the graph, as candle's `BackpropOp` does. A kept graph is then
//! pruned as `remat` prunes it with the vendored candle's
//! `release_unneeded_for_backward` ([`vt::release_unneeded`], the same per-op table of what
//! each backward rule reads): what a stage's graph keeps alive is what its backward reads —
//! a matrix product's operands (only the one the other's gradient needs when one is a
//! constant), `layer_norm`'s centred and normalised tensors (and small per-row
//! statistics), the fused attention's `q`, `k` and `v`, the fused GELU's input, a product's
//! factors —, besides the stage input (a leaf sharing its storage) and output. The backward pass is replayed with the vendored candle's reverse-mode
//! loop (`vendor/candle-core/src/backprop.rs`: node order, gradient accumulation without
//! zero-filled accumulators, no gradients for constants, and gradients that hold on to
//! the graph nodes they were computed from), which gives the transient peak of every
//! stage's backward. The replay functions below mirror `nn/*.rs` and `model.rs` line by
//! line; a change there must be mirrored here (`tests/costs_grid.rs` compares both).
//!
//! Two kernel sets exist: the CPU build uses latte-rs's fused attention and GELU
//! ([`Kernels::Fused`]); other devices use candle's composed operations
//! ([`Kernels::Generic`]), which keep more for the backward pass.
//!
//! # Time
//! Every virtual op also counts its work: `2·m·n·k` FLOPs for a matrix product, and the
//! bytes read and written for everything else. [`Throughput`] turns work into seconds;
//! its constants can be calibrated against measured costs ([`Throughput::calibrate`]).
//!
//! # What is reported separately
//! The chain costs cover activations and transients (and the parameter gradients each
//! stage's backward allocates). What a step holds besides the chain — weights, optimizer
//! state, EMA, inputs, the loss — is the [`crate::plan::MemoryAccount`].

use crate::config::{InputGeometry, LatteConfig};
use candle_core::DType;
use remat::costs::{ChainCosts, StageCosts};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// What a step differentiates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Training: gradients for every parameter (trainable `Var`s), the latents and the
    /// captions.
    Train,
    /// Guidance: gradients for the latents only, weights frozen.
    Guide,
}

impl Mode {
    /// Gradient flags for the inputs `[hidden_states, timestep, encoder_hidden_states]`.
    pub fn wants_input_grad(self) -> [bool; 3] {
        match self {
            Mode::Train => [true, false, true],
            Mode::Guide => [true, false, false],
        }
    }

    /// Whether the parameters are trainable `Var`s.
    pub fn trains_parameters(self) -> bool {
        self == Mode::Train
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Train => "train",
            Mode::Guide => "guide",
        })
    }
}

impl FromStr for Mode {
    type Err = CostsError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "train" => Ok(Mode::Train),
            "guide" => Ok(Mode::Guide),
            other => Err(CostsError::Unsupported(format!(
                "mode `{other}`: expected train or guide"
            ))),
        }
    }
}

/// The model's kernel set (see [`crate::nn::kernels`]).
pub use crate::nn::kernels::Kernels;

/// Where a workload's memory lives, which decides what is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Memory {
    /// The host heap (the CPU), as the counting allocator sees it: tensor handles and the
    /// autograd's node lists count, and bf16 matrix products widen their operands to f32.
    Host,
    /// A GPU's memory: tensor elements only.
    Device,
}

impl Memory {
    /// Where `device`'s tensors live.
    pub fn of(device: &candle_core::Device) -> Self {
        if device.is_cpu() {
            Memory::Host
        } else {
            Memory::Device
        }
    }

    /// Where the tensors of a device named on the command line live.
    pub fn of_device_name(device: &str) -> Self {
        if device == "cpu" {
            Memory::Host
        } else {
            Memory::Device
        }
    }
}

/// Why costs cannot be computed for a request; each message names what to change.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CostsError {
    /// A dimension of the input is zero.
    #[error("{what} is 0: every input dimension must be at least 1")]
    ZeroSize {
        /// The offending dimension.
        what: &'static str,
    },
    /// The latent height or width is not a multiple of the patch size.
    #[error(
        "latent size {height}x{width} is not divisible by the model's patch_size {patch}: \
         use a height and width that are multiples of {patch} latents"
    )]
    NotDivisible {
        /// Latent height.
        height: usize,
        /// Latent width.
        width: usize,
        /// The model's patch size.
        patch: usize,
    },
    /// Several frames, but not as many as the temporal position embedding covers.
    #[error(
        "{frames} frames, but the model's temporal position embedding covers \
         video_length = {video_length}: use {video_length} frames or a single frame"
    )]
    Frames {
        /// Frames asked for.
        frames: usize,
        /// The model's `video_length`.
        video_length: usize,
    },
    /// A dtype or mode the model does not compute in.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A replay rule is missing (a bug of this module).
    #[error("cost model bug: {0}")]
    Internal(String),
}

/// Checks an input geometry against a model: no empty dimension, latents divisible by the
/// patch size, and a single frame or exactly `video_length` frames.
pub fn check_geometry(config: &LatteConfig, geometry: &InputGeometry) -> Result<(), CostsError> {
    for (what, value) in [
        ("batch", geometry.batch),
        ("frames", geometry.frames),
        ("height", geometry.height),
        ("width", geometry.width),
        ("caption tokens", geometry.caption_tokens),
    ] {
        if value == 0 {
            return Err(CostsError::ZeroSize { what });
        }
    }
    let patch = config.patch_size;
    if !geometry.height.is_multiple_of(patch) || !geometry.width.is_multiple_of(patch) {
        return Err(CostsError::NotDivisible {
            height: geometry.height,
            width: geometry.width,
            patch,
        });
    }
    if geometry.frames > 1 && geometry.frames != config.video_length {
        return Err(CostsError::Frames {
            frames: geometry.frames,
            video_length: config.video_length,
        });
    }
    Ok(())
}

/// Work of one pass of a stage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Work {
    /// Floating-point operations of matrix products (`2·m·n·k` each).
    pub matmul_flops: f64,
    /// Bytes read and written by every other operation.
    pub moved_bytes: f64,
}

/// Work of a scheduled stage's forward and backward passes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StageWork {
    /// One forward run.
    pub forward: Work,
    /// One backward run.
    pub backward: Work,
    /// One forward run for the graph only (`ChainModel::stage_graph_only`; model stages,
    /// not the tail).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graph_only: Option<Work>,
}

impl StageWork {
    /// Sets `stage`'s times from this work at `throughput`.
    fn time(&self, stage: &mut StageCosts, throughput: &Throughput) {
        stage.fwd_s = throughput.time_s(&self.forward);
        stage.bwd_s = throughput.time_s(&self.backward);
        stage.fwd_graph_only_s = self.graph_only.map(|work| throughput.time_s(&work));
    }
}

/// Converts work into seconds: matrix products at `matmul_flop_per_s`, everything else at
/// `memory_bytes_per_s`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Throughput {
    /// FLOP/s of matrix products.
    pub matmul_flop_per_s: f64,
    /// Bytes/s of the memory-bound operations.
    pub memory_bytes_per_s: f64,
}

impl Throughput {
    /// Rough defaults: two CPU cores with AVX-512 running the fused kernels (f32:
    /// calibrated with `latte plan --measure` on the `medium` preset, guide mode, which
    /// measured 312 GFLOP/s and 13.8 GB/s; half precision on the `small` preset with older
    /// kernels), or an H100-class GPU (dense tensor-core rates in half precision; not
    /// calibrated).
    pub fn default_for(memory: Memory, dtype: DType) -> Self {
        let half = dtype != DType::F32;
        match (memory, half) {
            (Memory::Host, false) => Self {
                matmul_flop_per_s: 300e9,
                memory_bytes_per_s: 14e9,
            },
            (Memory::Host, true) => Self {
                matmul_flop_per_s: 40e9,
                memory_bytes_per_s: 1.8e9,
            },
            (Memory::Device, false) => Self {
                matmul_flop_per_s: 50e12,
                memory_bytes_per_s: 2.5e12,
            },
            (Memory::Device, true) => Self {
                matmul_flop_per_s: 400e12,
                memory_bytes_per_s: 2.5e12,
            },
        }
    }

    /// Seconds `work` takes.
    pub fn time_s(&self, work: &Work) -> f64 {
        work.matmul_flops / self.matmul_flop_per_s + work.moved_bytes / self.memory_bytes_per_s
    }

    /// The throughput that best explains measured stage times (least squares over every
    /// stage's forward and backward time), or `None` when the measurements cannot
    /// determine it (no positive time, or a mismatched number of stages).
    pub fn calibrate(work: &[StageWork], measured: &ChainCosts) -> Option<Self> {
        if work.len() != measured.stages.len() {
            return None;
        }
        let samples: Vec<(Work, f64)> = work
            .iter()
            .zip(&measured.stages)
            .flat_map(|(w, m)| [(w.forward, m.fwd_s), (w.backward, m.bwd_s)])
            .filter(|(_, t)| t.is_finite() && *t > 0.0)
            .collect();
        // time = a·flops + b·bytes, solved by the 2×2 normal equations.
        let (mut ff, mut fb, mut bb, mut ft, mut bt) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for (w, t) in &samples {
            ff += w.matmul_flops * w.matmul_flops;
            fb += w.matmul_flops * w.moved_bytes;
            bb += w.moved_bytes * w.moved_bytes;
            ft += w.matmul_flops * t;
            bt += w.moved_bytes * t;
        }
        let det = ff * bb - fb * fb;
        if det.abs() > 1e-12 * ff * bb {
            let a = (ft * bb - bt * fb) / det;
            let b = (bt * ff - ft * fb) / det;
            if a > 0.0 && b > 0.0 {
                return Some(Self {
                    matmul_flop_per_s: 1.0 / a,
                    memory_bytes_per_s: 1.0 / b,
                });
            }
        }
        // Degenerate fit: keep the default ratio and scale both rates.
        let base = Self::default_for(Memory::Host, DType::F32);
        let predicted: f64 = samples.iter().map(|(w, _)| base.time_s(w)).sum();
        let actual: f64 = samples.iter().map(|(_, t)| t).sum();
        (predicted > 0.0 && actual > 0.0).then(|| Self {
            matmul_flop_per_s: base.matmul_flop_per_s * predicted / actual,
            memory_bytes_per_s: base.memory_bytes_per_s * predicted / actual,
        })
    }
}

/// The analytic costs of one workload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatteCosts {
    /// Per scheduled stage (block halves in order, the tail last); the
    /// head's graph (without its tokens, `a_0`), context and context gradients are
    /// `reserved_bytes`.
    pub chain: ChainCosts,
    /// The work behind each stage's `fwd_s` and `bwd_s`.
    pub work: Vec<StageWork>,
}

impl LatteCosts {
    /// Recomputes every stage's times with another throughput.
    pub fn retime(&mut self, throughput: &Throughput) {
        for (stage, work) in self.chain.stages.iter_mut().zip(&self.work) {
            work.time(stage, throughput);
        }
    }
}

/// The analytic costs of running `config` on inputs of `geometry` (latent sizes) in
/// `dtype`, differentiated as `mode` says, with the kernels of a device, timed with
/// `throughput`.
pub fn analytic_costs(
    config: &LatteConfig,
    geometry: &InputGeometry,
    dtype: DType,
    mode: Mode,
    kernels: Kernels,
    throughput: &Throughput,
) -> Result<LatteCosts, CostsError> {
    analytic_chain_costs(
        config,
        geometry,
        dtype,
        mode,
        kernels,
        throughput,
        true,
        Memory::Host,
        None,
    )
}

/// [`analytic_costs`] of the chain with temporal attention on or off
/// (`Latte::chain(temporal)`; off, the chain holds the spatial blocks only), its memory
/// counted where it lives, and with low-rank updates on `adapters` (LoRA: in training
/// they are the trained parameters and the base weights are frozen).
#[allow(clippy::too_many_arguments)]
pub fn analytic_chain_costs(
    config: &LatteConfig,
    geometry: &InputGeometry,
    dtype: DType,
    mode: Mode,
    kernels: Kernels,
    throughput: &Throughput,
    temporal: bool,
    memory: Memory,
    adapters: Option<&[crate::lora::AdaptedLayer]>,
) -> Result<LatteCosts, CostsError> {
    check_geometry(config, geometry)?;
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(CostsError::Unsupported(format!(
            "dtype {dtype:?}: the model computes in f32, f16 or bf16"
        )));
    }
    let replay = replay::Replay::new(
        config, geometry, dtype, mode, kernels, temporal, memory, adapters,
    );
    let (stages, work, output_bytes, reserved_bytes) = replay.run()?;
    let stages = stages
        .into_iter()
        .zip(&work)
        .map(|(mut stage, work)| {
            work.time(&mut stage, throughput);
            stage
        })
        .collect();
    // Blocks begin at every attention half and at the tail (`LatteChain::starts_block`).
    let blocks = if temporal { 2 } else { 1 } * config.num_layers;
    let block_starts = (0..=2 * blocks).step_by(2).collect();
    Ok(LatteCosts {
        chain: ChainCosts::new(stages, output_bytes, reserved_bytes)
            .with_block_starts(block_starts),
        work,
    })
}

/// Virtual tensors: shapes, strides, dtypes and reference-counted storages without data,
/// with candle's allocation, view and autograd-retention rules.
mod vt {
    use super::{CostsError, Kernels, Memory, Work};
    use crate::nn::fused_attention::ThreadGroups;
    use crate::nn::gated_linear::{self, Activation};
    use candle_core::DType;
    use std::cell::Cell;
    use std::collections::{HashMap, HashSet};
    use std::rc::Rc;

    /// Heap bytes of one tensor handle besides its elements (candle's `Tensor_` in its
    /// `Arc`, the shape and stride vectors, the storage's `Arc<RwLock<…>>`), as the
    /// counting allocator sees them; calibrated against `remat::profile` on small models.
    const NODE_OVERHEAD_BYTES: u64 = 232;

    /// Live bytes, their high-water mark and the work done, of one replay.
    #[derive(Debug)]
    pub(super) struct Meter {
        live: Cell<u64>,
        peak: Cell<u64>,
        next_id: Cell<usize>,
        matmul_flops: Cell<f64>,
        moved_bytes: Cell<f64>,
        /// The memory measured is the host heap (CPU): tensor handles and the autograd's
        /// node lists count, and bf16 matrix products widen their operands to f32.
        host: bool,
        /// The kernel set the replayed model runs.
        kernels: Kernels,
    }

    impl Meter {
        /// A meter for `kernels` allocating from `memory`.
        pub(super) fn new(kernels: Kernels, memory: Memory) -> Self {
            Self {
                live: Cell::new(0),
                peak: Cell::new(0),
                next_id: Cell::new(0),
                matmul_flops: Cell::new(0.0),
                moved_bytes: Cell::new(0.0),
                host: memory == Memory::Host,
                kernels,
            }
        }

        /// Bytes of host bookkeeping, counted only when the host heap is measured.
        fn host_bytes(&self, bytes: u64) -> u64 {
            if self.host {
                bytes
            } else {
                0
            }
        }

        pub(super) fn alloc(&self, bytes: u64) {
            let live = self.live.get() + bytes;
            self.live.set(live);
            if live > self.peak.get() {
                self.peak.set(live);
            }
        }

        pub(super) fn free(&self, bytes: u64) {
            self.live.set(self.live.get().saturating_sub(bytes));
        }

        /// Bytes live now.
        pub(super) fn live(&self) -> u64 {
            self.live.get()
        }

        /// Highest live bytes since the last reset.
        pub(super) fn peak(&self) -> u64 {
            self.peak.get()
        }

        /// Starts a new high-water mark at the live bytes.
        pub(super) fn reset_peak(&self) {
            self.peak.set(self.live.get());
        }

        /// The work counted since the last call.
        pub(super) fn take_work(&self) -> Work {
            Work {
                matmul_flops: self.matmul_flops.replace(0.0),
                moved_bytes: self.moved_bytes.replace(0.0),
            }
        }

        fn next_id(&self) -> usize {
            let id = self.next_id.get();
            self.next_id.set(id + 1);
            id
        }

        fn count_matmul(&self, flops: f64) {
            self.matmul_flops.set(self.matmul_flops.get() + flops);
        }

        fn count_moved(&self, bytes: u64) {
            self.moved_bytes.set(self.moved_bytes.get() + bytes as f64);
        }
    }

    /// A storage: its bytes are freed when the last handle goes, or when it is released
    /// ([`release_unneeded`]).
    #[derive(Debug)]
    struct Storage {
        /// Counted bytes (0 for what existed before the measurement, or once released).
        bytes: Cell<u64>,
        /// Elements, counted or not.
        elems: usize,
        meter: Rc<Meter>,
    }

    impl Drop for Storage {
        fn drop(&mut self) {
            self.meter.free(self.bytes.get());
        }
    }

    /// The operation that made a tracked tensor, holding its inputs (candle's `Op`).
    #[derive(Debug)]
    enum Op {
        Add(V, V),
        Sub(V, V),
        Mul(V, V),
        Div(V, V),
        Matmul(V, V),
        Broadcast(V),
        Reshape(V),
        Transpose(V, usize, usize),
        Permute(V, Vec<usize>),
        Copy(V),
        Narrow(V, usize, usize, usize),
        Cat(Vec<V>, usize),
        Affine(V, f64),
        Sum(V),
        Unary(V, Unary),
        ToDType(V),
        Fused(V, Fused),
        /// `nn/fused_attention.rs`: `(q, k, v, heads)`.
        Attention(V, V, V, usize),
        /// `nn/fused_attention.rs`'s self-attention: `(qkv, heads)`.
        SelfAttention(V, usize),
        /// `nn/chunked_attention.rs`: `(q, k, v)`, the row log-sum-exp its backward reads,
        /// and the rows per chunk.
        ChunkedAttention(V, V, V, V, usize),
        /// `nn/linear.rs`'s biased product: `(x, W, b)`.
        BiasedProduct(V, V, V),
        /// `nn/gated_linear.rs`: `(h, W, [b; gates], activation)`.
        GatedLinear(V, V, V, Activation),
        /// `nn/fused_norm.rs`: `(x, shift, scale)`.
        ModulatedNorm(V, V, V),
        /// `nn/norm.rs`'s generic modulated norm: `(x, shift, scale)`.
        GenericNorm(V, V, V),
        /// `nn/generic_gated_linear.rs`: `(h, W, [b; gates], activation)`.
        GenericGatedLinear(V, V, V, Activation),
    }

    /// Element-wise functions with a backward rule.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(super) enum Unary {
        Sqr,
        Sqrt,
        Recip,
        Exp,
        Neg,
        Tanh,
        Silu,
        Gelu,
        /// `cos`, `sin`, `powf`, `max`: only on constants or inside backward rules.
        NoBackward,
    }

    /// latte-rs's fused element-wise kernels (`nn/ops.rs`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(super) enum Fused {
        Gelu,
    }

    /// The sizes of a fused attention call: `batch` elements of `heads` heads, `s`
    /// queries and `l` keys of width `d` each.
    struct AttentionShape {
        batch: usize,
        heads: usize,
        s: usize,
        l: usize,
        d: usize,
    }

    impl AttentionShape {
        /// From `q` `(b, s, h·d)` and `k` `(b, l, h·d)`.
        fn of(q: &V, k: &V, heads: usize) -> Self {
            let dims = q.dims();
            Self {
                batch: dims[0],
                heads,
                s: dims[1],
                l: k.dims()[1],
                d: dims[2] / heads,
            }
        }

        /// From the packed `qkv` `(b, s, 3·h·d)` of a self-attention.
        fn packed(qkv: &V, heads: usize) -> Self {
            let dims = qkv.dims();
            Self {
                batch: dims[0],
                heads,
                s: dims[1],
                l: dims[1],
                d: dims[2] / (3 * heads),
            }
        }

        /// FLOPs of one `s × l × d` product for every pair.
        fn product_flops(&self) -> f64 {
            2.0 * (self.batch * self.heads * self.s * self.l * self.d) as f64
        }

        /// Bytes of every pair's f32 scores.
        fn scores_bytes(&self) -> u64 {
            (4 * self.batch * self.heads * self.s * self.l) as u64
        }

        /// `buffers` f32 `s × l` scratch buffers for each of the kernel's thread groups.
        fn scratch_bytes(&self, buffers: usize) -> u64 {
            let groups = ThreadGroups::for_batch(self.batch).groups;
            (groups * buffers * 4 * self.s * self.l) as u64
        }
    }

    /// A virtual tensor handle (candle's `Tensor`: cheap to clone).
    #[derive(Debug, Clone)]
    pub(super) struct V(Rc<Node>);

    #[derive(Debug)]
    struct Node {
        id: usize,
        dims: Vec<usize>,
        strides: Vec<usize>,
        dtype: DType,
        storage: Rc<Storage>,
        op: Option<Op>,
        var: bool,
        meter: Rc<Meter>,
    }

    impl Drop for Node {
        fn drop(&mut self) {
            self.meter.free(self.meter.host_bytes(NODE_OVERHEAD_BYTES));
        }
    }

    fn contiguous_strides(dims: &[usize]) -> Vec<usize> {
        let mut strides = vec![1; dims.len()];
        for i in (0..dims.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * dims[i + 1];
        }
        strides
    }

    fn numel(dims: &[usize]) -> usize {
        dims.iter().product()
    }

    fn bytes_of(dims: &[usize], dtype: DType) -> u64 {
        (numel(dims) * dtype.size_in_bytes()) as u64
    }

    /// Bytes of `t`'s elements in f32.
    fn f32_bytes(t: &V) -> u64 {
        (4 * t.numel()) as u64
    }

    /// Bytes of `nn/gated_linear.rs`'s activation scratch: one row block of a
    /// `rows`-row sequence, `inner` wide (none without an activation).
    fn activation_scratch_bytes(activation: Activation, rows: usize, inner: usize) -> u64 {
        (4 * activation.scratch_len(activation.block_rows(inner, rows), inner)) as u64
    }

    /// What `ops::widened` allocates for `operands`: nothing for f32 (read in place), an
    /// f32 copy of each in half precision.
    fn widened_copy_bytes(operands: &[&V]) -> u64 {
        operands
            .iter()
            .filter(|t| t.dtype() != DType::F32)
            .map(|t| f32_bytes(t))
            .sum()
    }

    /// Numpy broadcasting of two shapes.
    fn broadcast_shape(a: &[usize], b: &[usize]) -> Vec<usize> {
        let rank = a.len().max(b.len());
        (0..rank)
            .map(|i| {
                let da = (i + a.len()).checked_sub(rank).map_or(1, |j| a[j]);
                let db = (i + b.len()).checked_sub(rank).map_or(1, |j| b[j]);
                da.max(db)
            })
            .collect()
    }

    impl V {
        /// A tensor that exists before the measurement (weights, inputs): its storage is not
        /// counted. `var` makes it a trainable leaf.
        pub(super) fn existing(meter: &Rc<Meter>, dims: &[usize], dtype: DType, var: bool) -> V {
            let storage = Rc::new(Storage {
                bytes: Cell::new(0),
                elems: numel(dims),
                meter: meter.clone(),
            });
            V::node(meter, dims.to_vec(), None, dtype, storage, None, var)
        }

        /// A new counted storage of `dims` in `dtype`, without graph (`Tensor::zeros`,
        /// `Tensor::from_vec`).
        pub(super) fn zeros(meter: &Rc<Meter>, dims: &[usize], dtype: DType) -> V {
            let storage = V::storage(meter, numel(dims), dtype);
            V::node(meter, dims.to_vec(), None, dtype, storage, None, false)
        }

        fn storage(meter: &Rc<Meter>, elems: usize, dtype: DType) -> Rc<Storage> {
            let bytes = (elems * dtype.size_in_bytes()) as u64;
            meter.alloc(bytes);
            Rc::new(Storage {
                bytes: Cell::new(bytes),
                elems,
                meter: meter.clone(),
            })
        }

        fn node(
            meter: &Rc<Meter>,
            dims: Vec<usize>,
            strides: Option<Vec<usize>>,
            dtype: DType,
            storage: Rc<Storage>,
            op: Option<Op>,
            var: bool,
        ) -> V {
            meter.alloc(meter.host_bytes(NODE_OVERHEAD_BYTES));
            let strides = strides.unwrap_or_else(|| contiguous_strides(&dims));
            V(Rc::new(Node {
                id: meter.next_id(),
                dims,
                strides,
                dtype,
                storage,
                op,
                var,
                meter: meter.clone(),
            }))
        }

        fn meter(&self) -> &Rc<Meter> {
            &self.0.meter
        }

        /// Whether the replay is of the CPU build, with latte-rs's fused kernels.
        pub(super) fn fused_kernels(&self) -> bool {
            self.meter().kernels == Kernels::Fused
        }

        pub(super) fn id(&self) -> usize {
            self.0.id
        }

        pub(super) fn dims(&self) -> &[usize] {
            &self.0.dims
        }

        pub(super) fn dtype(&self) -> DType {
            self.0.dtype
        }

        pub(super) fn numel(&self) -> usize {
            numel(&self.0.dims)
        }

        /// Bytes of the elements (candle's `elem_count · size_in_bytes`).
        pub(super) fn bytes(&self) -> u64 {
            bytes_of(&self.0.dims, self.0.dtype)
        }

        /// candle's `track_op`: a variable, or made by an op on tracked inputs.
        pub(super) fn tracked(&self) -> bool {
            self.0.var || self.0.op.is_some()
        }

        pub(super) fn is_var(&self) -> bool {
            self.0.var
        }

        pub(super) fn is_contiguous(&self) -> bool {
            let mut acc = 1;
            for (&stride, &dim) in self.0.strides.iter().zip(&self.0.dims).rev() {
                if dim > 1 && stride != acc {
                    return false;
                }
                acc *= dim;
            }
            true
        }

        /// A result in a new storage; the op is recorded when an input is tracked.
        fn fresh(
            &self,
            dims: Vec<usize>,
            dtype: DType,
            inputs: &[&V],
            op: impl FnOnce() -> Op,
        ) -> V {
            let meter = self.meter().clone();
            let read: u64 = inputs.iter().map(|v| v.bytes()).sum();
            meter.count_moved(bytes_of(&dims, dtype) + read);
            let storage = V::storage(&meter, numel(&dims), dtype);
            let op = inputs.iter().any(|v| v.tracked()).then(op);
            V::node(&meter, dims, None, dtype, storage, op, false)
        }

        /// A view sharing the storage.
        fn view(&self, dims: Vec<usize>, strides: Vec<usize>, op: impl FnOnce() -> Op) -> V {
            let op = self.tracked().then(op);
            V::node(
                self.meter(),
                dims,
                Some(strides),
                self.dtype(),
                self.0.storage.clone(),
                op,
                false,
            )
        }

        // ---- views and copies ----

        /// `Tensor::reshape`: a view of a contiguous tensor, else a copy.
        pub(super) fn reshape(&self, dims: &[usize]) -> V {
            let me = self.clone();
            if self.is_contiguous() {
                self.view(dims.to_vec(), contiguous_strides(dims), || Op::Reshape(me))
            } else {
                self.fresh(dims.to_vec(), self.dtype(), &[self], || Op::Reshape(me))
            }
        }

        /// `Tensor::transpose`.
        pub(super) fn transpose(&self, a: usize, b: usize) -> V {
            if a == b {
                return self.clone();
            }
            let (mut dims, mut strides) = (self.0.dims.clone(), self.0.strides.clone());
            dims.swap(a, b);
            strides.swap(a, b);
            let me = self.clone();
            self.view(dims, strides, || Op::Transpose(me, a, b))
        }

        /// `Tensor::t`: the last two dimensions swapped.
        pub(super) fn t(&self) -> V {
            let rank = self.dims().len();
            self.transpose(rank - 2, rank - 1)
        }

        /// `Tensor::permute`.
        pub(super) fn permute(&self, perm: &[usize]) -> V {
            let dims = perm.iter().map(|&p| self.0.dims[p]).collect();
            let strides = perm.iter().map(|&p| self.0.strides[p]).collect();
            let me = self.clone();
            let perm = perm.to_vec();
            self.view(dims, strides, || Op::Permute(me, perm))
        }

        /// `Tensor::broadcast_as`.
        pub(super) fn broadcast_as(&self, dims: &[usize]) -> V {
            let added = dims.len() - self.dims().len();
            let mut strides = vec![0; added];
            for (i, (&src, &stride)) in self.0.dims.iter().zip(&self.0.strides).enumerate() {
                strides.push(if dims[added + i] == src { stride } else { 0 });
            }
            let me = self.clone();
            self.view(dims.to_vec(), strides, || Op::Broadcast(me))
        }

        /// `Tensor::narrow`.
        pub(super) fn narrow(&self, dim: usize, start: usize, len: usize) -> V {
            if start == 0 && len == self.0.dims[dim] {
                return self.clone();
            }
            let mut dims = self.0.dims.clone();
            dims[dim] = len;
            let me = self.clone();
            self.view(dims, self.0.strides.clone(), || {
                Op::Narrow(me, dim, start, len)
            })
        }

        /// `Tensor::unsqueeze` (a reshape node).
        pub(super) fn unsqueeze(&self, dim: usize) -> V {
            let (mut dims, mut strides) = (self.0.dims.clone(), self.0.strides.clone());
            let stride = strides.get(dim).map_or(1, |&s| s * dims[dim]);
            dims.insert(dim, 1);
            strides.insert(dim, stride);
            let me = self.clone();
            self.view(dims, strides, || Op::Reshape(me))
        }

        /// `Tensor::squeeze` of a size-1 dimension (a reshape node).
        pub(super) fn squeeze(&self, dim: usize) -> V {
            if self.0.dims[dim] != 1 {
                return self.clone();
            }
            let (mut dims, mut strides) = (self.0.dims.clone(), self.0.strides.clone());
            dims.remove(dim);
            strides.remove(dim);
            let me = self.clone();
            self.view(dims, strides, || Op::Reshape(me))
        }

        /// `Tensor::contiguous`: itself when contiguous, else a copy.
        pub(super) fn contiguous(&self) -> V {
            if self.is_contiguous() {
                return self.clone();
            }
            let me = self.clone();
            self.fresh(self.dims().to_vec(), self.dtype(), &[self], || Op::Copy(me))
        }

        /// `Tensor::detach`: the same storage without the graph.
        pub(super) fn detach(&self) -> V {
            if !self.tracked() {
                return self.clone();
            }
            V::node(
                self.meter(),
                self.0.dims.clone(),
                Some(self.0.strides.clone()),
                self.dtype(),
                self.0.storage.clone(),
                None,
                false,
            )
        }

        /// `remat::grads::leaf_var`: a leaf variable sharing the storage.
        pub(super) fn leaf(&self) -> V {
            V::node(
                self.meter(),
                self.0.dims.clone(),
                Some(self.0.strides.clone()),
                self.dtype(),
                self.0.storage.clone(),
                None,
                true,
            )
        }

        // ---- allocating ops ----

        /// `Tensor::matmul` (batched over leading dimensions).
        pub(super) fn matmul(&self, rhs: &V) -> V {
            let a = self.dims();
            let rank = a.len();
            let (m, k, n) = (a[rank - 2], a[rank - 1], rhs.dims()[rank - 1]);
            let batch: usize = a[..rank - 2].iter().product();
            let mut dims = a[..rank - 2].to_vec();
            dims.extend([m, n]);
            let meter = self.meter();
            meter.count_matmul(2.0 * (batch * m * n * k) as f64);
            let out = numel(&dims);
            meter.count_moved(bytes_of(&dims, self.dtype()) + self.bytes() + rhs.bytes());
            // The CPU backend has no bf16 kernel: both storages are widened to f32, multiplied
            // into an f32 result and narrowed back.
            let widened = if meter.host && self.dtype() == DType::BF16 {
                4 * (self.0.storage.elems + rhs.0.storage.elems + out) as u64
            } else {
                0
            };
            meter.alloc(widened);
            let storage = V::storage(meter, out, self.dtype());
            meter.free(widened);
            let op =
                (self.tracked() || rhs.tracked()).then(|| Op::Matmul(self.clone(), rhs.clone()));
            V::node(meter, dims, None, self.dtype(), storage, op, false)
        }

        fn binary(&self, rhs: &V, make: fn(V, V) -> Op) -> V {
            let (l, r) = (self.clone(), rhs.clone());
            self.fresh(self.dims().to_vec(), self.dtype(), &[self, rhs], || {
                make(l, r)
            })
        }

        /// `Tensor::add` (same shapes).
        pub(super) fn add(&self, rhs: &V) -> V {
            self.binary(rhs, Op::Add)
        }

        /// `Tensor::mul` (same shapes).
        pub(super) fn mul(&self, rhs: &V) -> V {
            self.binary(rhs, Op::Mul)
        }

        /// `Tensor::div` (same shapes).
        pub(super) fn div(&self, rhs: &V) -> V {
            self.binary(rhs, Op::Div)
        }

        fn broadcast_binary(&self, rhs: &V, make: fn(V, V) -> Op) -> V {
            let shape = broadcast_shape(self.dims(), rhs.dims());
            let lhs = if shape != self.dims() {
                self.broadcast_as(&shape)
            } else {
                self.clone()
            };
            let rhs = if shape != rhs.dims() {
                rhs.broadcast_as(&shape)
            } else {
                rhs.clone()
            };
            lhs.binary(&rhs, make)
        }

        /// `Tensor::broadcast_add`.
        pub(super) fn broadcast_add(&self, rhs: &V) -> V {
            self.broadcast_binary(rhs, Op::Add)
        }

        /// `Tensor::broadcast_sub`.
        pub(super) fn broadcast_sub(&self, rhs: &V) -> V {
            self.broadcast_binary(rhs, Op::Sub)
        }

        /// `Tensor::broadcast_mul`.
        pub(super) fn broadcast_mul(&self, rhs: &V) -> V {
            self.broadcast_binary(rhs, Op::Mul)
        }

        /// `Tensor::broadcast_div`.
        pub(super) fn broadcast_div(&self, rhs: &V) -> V {
            self.broadcast_binary(rhs, Op::Div)
        }

        /// `Tensor::affine` (also `t * s`, `t + s`, `s - t`).
        pub(super) fn affine(&self, mul: f64) -> V {
            let me = self.clone();
            self.fresh(self.dims().to_vec(), self.dtype(), &[self], || {
                Op::Affine(me, mul)
            })
        }

        /// An element-wise function.
        pub(super) fn unary(&self, f: Unary) -> V {
            let me = self.clone();
            self.fresh(self.dims().to_vec(), self.dtype(), &[self], || {
                Op::Unary(me, f)
            })
        }

        /// `Tensor::sum_keepdim` over `dims`.
        pub(super) fn sum_keepdim(&self, dims: &[usize]) -> V {
            let mut out = self.dims().to_vec();
            for &d in dims {
                out[d] = 1;
            }
            let me = self.clone();
            self.fresh(out, self.dtype(), &[self], || Op::Sum(me))
        }

        /// `Tensor::mean_keepdim` over the last dimension: a sum, then a scale.
        pub(super) fn mean_keepdim_last(&self) -> V {
            let last = self.dims().len() - 1;
            self.sum_keepdim(&[last]).affine(1.0)
        }

        /// `max_keepdim` over the last dimension (no backward rule is needed: the composed
        /// softmax detaches it).
        pub(super) fn max_keepdim_last(&self) -> V {
            let mut out = self.dims().to_vec();
            if let Some(last) = out.last_mut() {
                *last = 1;
            }
            let me = self.clone();
            self.fresh(out, self.dtype(), &[self], || {
                Op::Unary(me, Unary::NoBackward)
            })
        }

        /// `Tensor::to_dtype`: itself when the dtype is the same.
        pub(super) fn to_dtype(&self, dtype: DType) -> V {
            if dtype == self.dtype() {
                return self.clone();
            }
            let me = self.clone();
            self.fresh(self.dims().to_vec(), dtype, &[self], || Op::ToDType(me))
        }

        /// `Tensor::cat` of contiguous pieces.
        pub(super) fn cat(args: &[&V], dim: usize) -> V {
            let first = args[0];
            if args.len() == 1 {
                return first.clone();
            }
            let mut dims = first.dims().to_vec();
            dims[dim] = args.iter().map(|a| a.dims()[dim]).sum();
            let owned: Vec<V> = args.iter().map(|&a| a.clone()).collect();
            first.fresh(dims, first.dtype(), args, || Op::Cat(owned, dim))
        }

        /// A fused kernel of `nn/ops.rs` (forward): the input widened to f32 (which becomes
        /// the output in f32; in half precision a narrowed copy is made and the f32 buffer
        /// freed).
        pub(super) fn fused(&self, kind: Fused) -> V {
            let x = self.contiguous();
            let meter = self.meter().clone();
            let widened = (x.numel() * 4) as u64;
            meter.count_moved(widened + x.bytes());
            if x.dtype() == DType::F32 {
                let storage = V::storage(&meter, x.numel(), DType::F32);
                let op = x.tracked().then(|| Op::Fused(x.clone(), kind));
                return V::node(
                    &meter,
                    x.dims().to_vec(),
                    None,
                    DType::F32,
                    storage,
                    op,
                    false,
                );
            }
            meter.alloc(widened);
            let storage = V::storage(&meter, x.numel(), x.dtype());
            meter.free(widened);
            let op = x.tracked().then(|| Op::Fused(x.clone(), kind));
            V::node(
                &meter,
                x.dims().to_vec(),
                None,
                x.dtype(),
                storage,
                op,
                false,
            )
        }

        /// `nn/fused_attention.rs` forward over `heads` heads on contiguous `q`
        /// `(b, s, h·d)`, `k` and `v` `(b, l, h·d)`, with one `s × l` probability buffer
        /// per busy thread.
        pub(super) fn fused_attention(q: &V, k: &V, v: &V, heads: usize) -> V {
            let (q, k, v) = (q.contiguous(), k.contiguous(), v.contiguous());
            let meter = q.meter().clone();
            let shape = AttentionShape::of(&q, &k, heads);
            meter.count_matmul(2.0 * shape.product_flops());
            meter.count_moved(q.bytes() + k.bytes() + v.bytes() + q.bytes());
            meter.count_moved(2 * shape.scores_bytes());
            V::fused3([q, k, v], shape.scratch_bytes(1), |q, k, v| {
                Op::Attention(q, k, v, heads)
            })
        }

        /// `nn/fused_attention.rs`'s self-attention over `heads` heads on the contiguous
        /// packed `qkv` `(b, s, 3·h·d)`: the `(b, s, h·d)` output (f32, narrowed in half
        /// precision), one `s × s` probability buffer per busy thread.
        pub(super) fn fused_self_attention(qkv: &V, heads: usize) -> V {
            let qkv = qkv.contiguous();
            let meter = qkv.meter().clone();
            let shape = AttentionShape::packed(&qkv, heads);
            let dims = vec![shape.batch, shape.s, shape.heads * shape.d];
            let out_f32 = (4 * numel(&dims)) as u64;
            meter.count_matmul(2.0 * shape.product_flops());
            meter.count_moved(qkv.bytes() + out_f32 + 2 * shape.scores_bytes());
            let widened = widened_copy_bytes(&[&qkv]);
            meter.alloc(widened);
            meter.alloc(out_f32);
            meter.alloc(shape.scratch_bytes(1));
            meter.free(shape.scratch_bytes(1));
            let op = qkv.tracked().then(|| Op::SelfAttention(qkv.clone(), heads));
            let dtype = qkv.dtype();
            let storage = if dtype == DType::F32 {
                meter.free(out_f32);
                V::storage(&meter, numel(&dims), DType::F32)
            } else {
                let narrowed = V::storage(&meter, numel(&dims), dtype);
                meter.free(out_f32);
                narrowed
            };
            meter.free(widened);
            V::node(&meter, dims, None, dtype, storage, op, false)
        }

        /// The self-attention's `bwd`: `qkv` and the upstream gradient widened in half
        /// precision, the packed gradient in f32, two `s × s` buffers per busy thread,
        /// then the gradient narrowed in half precision.
        fn fused_self_attention_backward(qkv: &V, heads: usize, grad: &V) -> V {
            let meter = qkv.meter().clone();
            let shape = AttentionShape::packed(qkv, heads);
            meter.count_matmul(5.0 * shape.product_flops());
            meter.count_moved(2 * qkv.bytes() + grad.bytes() + 4 * shape.scores_bytes());
            let widened = widened_copy_bytes(&[qkv, grad]);
            meter.alloc(widened);
            meter.alloc(f32_bytes(qkv));
            meter.alloc(shape.scratch_bytes(2));
            meter.free(shape.scratch_bytes(2));
            meter.free(widened);
            V::from_f32_buffer(&meter, qkv.dims(), qkv.dtype())
        }

        /// `ops::tensor_from_f32` on an f32 buffer of `dims` already counted as live: the
        /// buffer becomes the tensor in f32; in half precision a narrowed copy is made and
        /// the buffer freed.
        fn from_f32_buffer(meter: &Rc<Meter>, dims: &[usize], dtype: DType) -> V {
            let buffer = (4 * numel(dims)) as u64;
            if dtype == DType::F32 {
                meter.free(buffer);
                V::zeros(meter, dims, dtype)
            } else {
                let result = V::zeros(meter, dims, dtype);
                meter.free(buffer);
                result
            }
        }

        /// The forward of a fused three-operand CPU kernel (the attention, the modulated
        /// norm) on contiguous operands: half-precision operands widened to f32, the f32
        /// output (the first operand's shape), `scratch_bytes` allocated and freed, and in
        /// half precision the narrowed output (the f32 buffers then freed).
        fn fused3(operands: [V; 3], scratch_bytes: u64, make: impl FnOnce(V, V, V) -> Op) -> V {
            let [a, b, c] = operands;
            let meter = a.meter().clone();
            let half = a.dtype() != DType::F32;
            let widened = widened_copy_bytes(&[&a, &b, &c]);
            meter.alloc(widened);
            let out_f32 = f32_bytes(&a);
            meter.alloc(out_f32);
            meter.alloc(scratch_bytes);
            meter.free(scratch_bytes);
            let op = (a.tracked() || b.tracked() || c.tracked())
                .then(|| make(a.clone(), b.clone(), c.clone()));
            let storage = if half {
                let narrowed = V::storage(&meter, a.numel(), a.dtype());
                meter.free(out_f32);
                narrowed
            } else {
                meter.free(out_f32);
                V::storage(&meter, a.numel(), DType::F32)
            };
            meter.free(widened);
            V::node(
                &meter,
                a.dims().to_vec(),
                None,
                a.dtype(),
                storage,
                op,
                false,
            )
        }

        /// The fused attention's `bwd`: the operands and the (contiguous) upstream
        /// gradient widened in half precision, `dQ`, `dK`, `dV` in f32, two `s × l` buffers
        /// per busy thread, then each gradient narrowed in half precision.
        fn fused_attention_backward(q: &V, k: &V, v: &V, heads: usize, grad: &V) -> (V, V, V) {
            let meter = q.meter().clone();
            let shape = AttentionShape::of(q, k, heads);
            meter.count_matmul(5.0 * shape.product_flops());
            meter.count_moved(2 * (q.bytes() + k.bytes() + v.bytes()) + grad.bytes());
            meter.count_moved(4 * shape.scores_bytes());
            let widened = widened_copy_bytes(&[q, k, v, grad]);
            meter.alloc(widened);
            for t in [q, k, v] {
                meter.alloc(f32_bytes(t));
            }
            meter.alloc(shape.scratch_bytes(2));
            meter.free(shape.scratch_bytes(2));
            meter.free(widened);
            let gradient = |t: &V| V::from_f32_buffer(&meter, t.dims(), q.dtype());
            (gradient(q), gradient(k), gradient(v))
        }

        /// `Tensor::attach_op3_arc`: `value`'s storage and shape as the result of `op`.
        fn attached(value: &V, op: Option<Op>) -> V {
            V::node(
                value.meter(),
                value.dims().to_vec(),
                None,
                value.dtype(),
                value.0.storage.clone(),
                op,
                false,
            )
        }

        /// `nn/chunked_attention.rs` forward on `q` `(b, h, s, d)`, `k` and `v`
        /// `(b, h, l, d)`: on detached operands, the zeroed output and row log-sum-exp, and
        /// per chunk of `rows` query rows the scaled scores, their softmax in f32 and the
        /// product with `v` (written into the output); the result then takes the op.
        pub(super) fn chunked_attention(q: &V, k: &V, v: &V, rows: usize) -> V {
            let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
            let meter = q.meter().clone();
            let (b, h, s, d) = (q.dims()[0], q.dims()[1], q.dims()[2], q.dims()[3]);
            let output = V::zeros(&meter, &[b, s, h, d], q.dtype());
            let lse = V::zeros(&meter, &[b, h, s, 1], DType::F32);
            let keys_t = kd.t();
            for start in (0..s).step_by(rows) {
                let q_c = qd.narrow(2, start, rows.min(s - start));
                let scores = q_c.affine(1.0).matmul(&keys_t).to_dtype(DType::F32);
                let max = scores.max_keepdim_last();
                let exp = scores.broadcast_sub(&max).unary(Unary::Exp);
                drop(scores);
                let last = exp.dims().len() - 1;
                let sum = exp.sum_keepdim(&[last]);
                let weights = exp.broadcast_div(&sum).to_dtype(q.dtype());
                drop(exp);
                let heads = weights.matmul(&vd);
                drop(heads.transpose(1, 2).contiguous());
                drop(max.add(&sum.unary(Unary::NoBackward)));
            }
            let op = (q.tracked() || k.tracked() || v.tracked())
                .then(|| Op::ChunkedAttention(q.clone(), k.clone(), v.clone(), lse, rows));
            V::attached(&output, op).reshape(&[b, s, h * d])
        }

        /// The chunked attention's `bwd`, op by op (`nn/chunked_attention.rs`).
        fn chunked_attention_backward(
            q: &V,
            k: &V,
            v: &V,
            lse: &V,
            rows: usize,
            grad: &V,
        ) -> (V, V, V) {
            let (q, k, v) = (&q.detach(), &k.detach(), &v.detach());
            let s = q.dims()[2];
            let dtype = q.dtype();
            let f32 = DType::F32;
            let grad = grad.detach().contiguous();
            let (keys_t, values_t) = (k.t(), v.t());
            let grad_q = V::zeros(q.meter(), q.dims(), dtype);
            let mut grad_k: Option<V> = None;
            let mut grad_v: Option<V> = None;
            let add = |sum: Option<V>, term: V| -> V {
                let term = term.to_dtype(f32);
                match sum {
                    Some(sum) => sum.add(&term),
                    None => term,
                }
            };
            for start in (0..s).step_by(rows) {
                let len = rows.min(s - start);
                let chunk = |t: &V| t.narrow(2, start, len).contiguous();
                let chunk_merged = |t: &V| t.narrow(1, start, len).transpose(1, 2).contiguous();
                let (q_c, grad_c) = (chunk(q), chunk_merged(&grad));
                let probs = q_c
                    .affine(1.0)
                    .matmul(&keys_t)
                    .to_dtype(f32)
                    .broadcast_sub(&lse.narrow(2, start, len))
                    .unary(Unary::Exp);
                grad_v = Some(add(grad_v, probs.to_dtype(dtype).t().matmul(&grad_c)));
                // Owned operands of candle's arithmetic operators are freed as soon as the
                // op has run, borrowed temporaries at the end of the statement.
                let last = grad_c.dims().len() - 1;
                let grad_probs = grad_c.matmul(&values_t).to_dtype(f32);
                let row_dot = probs.mul(&grad_probs).sum_keepdim(&[last]);
                let difference = grad_probs.broadcast_sub(&row_dot);
                let product = probs.mul(&difference);
                drop((probs, difference));
                let grad_scores = product.to_dtype(dtype);
                drop(product);
                let dq = grad_scores.matmul(k);
                drop((dq.affine(1.0), dq));
                let dk = grad_scores.t().matmul(&q_c);
                let term = dk.affine(1.0);
                drop(dk);
                grad_k = Some(add(grad_k, term));
            }
            let narrowed = |g: Option<V>| match g {
                Some(g) => g.to_dtype(dtype),
                None => V::zeros(q.meter(), k.dims(), dtype),
            };
            (grad_q, narrowed(grad_k), narrowed(grad_v))
        }

        /// `nn/fused_norm.rs` forward on contiguous `x` `(n, s, d)`, `shift` and `scale`
        /// `(n, 1, d)`.
        pub(super) fn modulated_norm(x: &V, shift: &V, scale: &V) -> V {
            let (x, shift, scale) = (x.contiguous(), shift.contiguous(), scale.contiguous());
            x.meter().count_moved(2 * x.bytes() + f32_bytes(&x));
            V::fused3([x, shift, scale], 0, Op::ModulatedNorm)
        }

        /// The modulated norm's `bwd`: `x`, `scale` and the upstream gradient widened in
        /// half precision, `dx` and the wanted modulation gradients (those of tracked
        /// operands) in f32, the widened copies freed, then each gradient narrowed in half
        /// precision.
        fn modulated_norm_backward(
            x: &V,
            shift: &V,
            scale: &V,
            grad: &V,
        ) -> (V, Option<V>, Option<V>) {
            let meter = x.meter().clone();
            meter.count_moved(3 * x.bytes() + grad.bytes());
            let widened = widened_copy_bytes(&[x, scale, grad]);
            meter.alloc(widened);
            meter.alloc(f32_bytes(x));
            // One partial row per block of a sequence's rows, then added up per sequence.
            let blocks = crate::nn::fused_norm::row_blocks(x.dims()[1]) as u64;
            let wanted: Vec<&V> = [shift, scale].into_iter().filter(|t| t.tracked()).collect();
            for t in &wanted {
                meter.alloc(blocks * f32_bytes(t));
            }
            if blocks > 1 {
                for t in &wanted {
                    meter.alloc(f32_bytes(t));
                    meter.free(blocks * f32_bytes(t));
                }
            }
            meter.free(widened);
            let gradient = |t: &V| V::from_f32_buffer(&meter, t.dims(), t.dtype());
            let dx = gradient(x);
            let d_shift = shift.tracked().then(|| gradient(shift));
            let d_scale = scale.tracked().then(|| gradient(scale));
            (dx, d_shift, d_scale)
        }

        /// `nn/generic_gated_linear.rs` forward: with values, `gate ⊙ (b + act(h)·Wᵀ)` on
        /// detached operands; without, zeros; then the op.
        pub(super) fn generic_gated_linear(
            h: &V,
            w: &V,
            bias_and_gates: &V,
            activation: Activation,
            values: bool,
        ) -> V {
            let (n, s) = (h.dims()[0], h.dims()[1]);
            let out = w.dims()[0];
            let value = if values {
                let (bias, gates) = Self::bias_and_gates_parts(&bias_and_gates.detach(), n);
                Self::gated_product(&h.detach(), &w.detach(), &bias, activation)
                    .broadcast_mul(&gates)
            } else {
                V::zeros(h.meter(), &[n, s, out], h.dtype())
            };
            let op = (h.tracked() || w.tracked() || bias_and_gates.tracked()).then(|| {
                Op::GenericGatedLinear(h.clone(), w.clone(), bias_and_gates.clone(), activation)
            });
            V::attached(&value, op)
        }

        fn bias_and_gates_parts(bias_and_gates: &V, n: usize) -> (V, V) {
            (
                bias_and_gates.narrow(0, 0, 1).unsqueeze(0),
                bias_and_gates.narrow(0, 1, n).unsqueeze(1),
            )
        }

        /// `b + act(h)·Wᵀ`.
        fn gated_product(h: &V, w: &V, bias: &V, activation: Activation) -> V {
            let (n, s, inner) = (h.dims()[0], h.dims()[1], h.dims()[2]);
            let activated = Self::activate(h, activation).reshape(&[n * s, inner]);
            let out = w.dims()[0];
            activated
                .matmul(&w.t())
                .reshape(&[n, s, out])
                .broadcast_add(bias)
        }

        fn activate(h: &V, activation: Activation) -> V {
            match activation {
                Activation::Identity => h.clone(),
                Activation::GeluTanh => h.unary(Unary::Gelu),
            }
        }

        /// `generic_gated_linear::gelu_derivative`, op by op (owned operands of candle's
        /// arithmetic operators freed as soon as the op has run).
        fn gelu_derivative(x: &V) -> V {
            let x = x.to_dtype(DType::F32);
            let x2 = x.unary(Unary::Sqr);
            let scaled = x2.affine(1.0);
            let shifted = scaled.affine(1.0);
            drop(scaled);
            let cubic = x.mul(&shifted);
            drop(shifted);
            let inner = cubic.affine(1.0);
            let t = inner.unary(Unary::Tanh);
            drop((inner, cubic));
            let scaled = x2.affine(1.0);
            let shifted = scaled.affine(1.0);
            drop(scaled);
            let slope = shifted.affine(1.0);
            drop((shifted, x2));
            let one_minus_t2 = t.unary(Unary::Sqr).affine(1.0);
            let half_x = x.affine(1.0);
            let product = half_x.mul(&one_minus_t2);
            drop((half_x, one_minus_t2));
            let tail = product.mul(&slope);
            drop((product, slope));
            let half = t.affine(1.0);
            let derivative = half.add(&tail);
            drop((half, tail));
            derivative
        }

        /// The generic gated linear layer's `bwd`, op by op, over chunks of rows
        /// (`generic_gated_linear::chunk_rows`); owned operands of candle's arithmetic
        /// operators are freed as soon as the op has run.
        fn generic_gated_linear_backward(
            h: &V,
            w: &V,
            bias_and_gates: &V,
            activation: Activation,
            grad: &V,
        ) -> (V, Option<V>, Option<V>) {
            let wants_weights = w.tracked() || bias_and_gates.tracked();
            let (h, w) = (&h.detach(), &w.detach());
            let (n, s, inner) = (h.dims()[0], h.dims()[1], h.dims()[2]);
            let out = w.dims()[0];
            let chunk = crate::nn::generic_gated_linear::chunk_rows(inner);
            let (bias, gates) = Self::bias_and_gates_parts(&bias_and_gates.detach(), n);
            let grad = grad.detach();
            let rows = n * s;
            let h_rows = h.reshape(&[rows, inner]);
            let grad_f = grad.broadcast_mul(&gates).reshape(&[rows, out]);
            let grad_weights = wants_weights.then(|| {
                let bias_row = bias.reshape(&[1, out]);
                let grad_rows = grad.reshape(&[rows, out]);
                let grad_f_times_f = V::zeros(grad.meter(), &[rows, out], grad.dtype());
                let mut grad_w: Option<V> = None;
                for start in (0..rows).step_by(chunk) {
                    let len = chunk.min(rows - start);
                    let activated = Self::activate(&h_rows.narrow(0, start, len), activation);
                    let f = activated.matmul(&w.t()).broadcast_add(&bias_row);
                    let product = grad_rows.narrow(0, start, len).mul(&f);
                    drop(f);
                    drop(product);
                    let term = grad_f.narrow(0, start, len).t().matmul(&activated);
                    let term_f32 = term.to_dtype(DType::F32);
                    grad_w = Some(match grad_w {
                        Some(sum) => {
                            let total = sum.add(&term_f32);
                            drop((sum, term_f32));
                            total
                        }
                        None => term_f32,
                    });
                    drop((term, activated));
                }
                let grad_gates = grad_f_times_f.reshape(&[n, s, out]).sum_keepdim(&[1]);
                drop(grad_f_times_f);
                let grad_bias = grad_f.sum_keepdim(&[0]);
                let grad_bias_and_gates = V::cat(&[&grad_bias, &grad_gates.reshape(&[n, out])], 0);
                drop((grad_bias, grad_gates));
                let grad_w = match grad_w {
                    Some(g) => g.to_dtype(w.dtype()),
                    None => V::zeros(w.meter(), w.dims(), w.dtype()),
                };
                (grad_w, grad_bias_and_gates)
            });
            drop(grad);
            let grad_activated = grad_f.matmul(w);
            drop(grad_f);
            let grad_h = match activation {
                Activation::Identity => grad_activated.reshape(&[n, s, inner]),
                Activation::GeluTanh => {
                    let grad_h = V::zeros(h.meter(), &[rows, inner], h.dtype());
                    for start in (0..rows).step_by(chunk) {
                        let len = chunk.min(rows - start);
                        let derivative = Self::gelu_derivative(&h_rows.narrow(0, start, len));
                        let piece = grad_activated.narrow(0, start, len).to_dtype(DType::F32);
                        let product = piece.mul(&derivative);
                        drop((piece, derivative));
                        drop(product.to_dtype(h.dtype()));
                    }
                    grad_h.reshape(&[n, s, inner])
                }
            };
            let (grad_w, grad_bias_and_gates) = grad_weights.unzip();
            (grad_h, grad_w, grad_bias_and_gates)
        }

        /// `nn/norm.rs`'s generic modulated norm: the composed norm and modulation on
        /// detached operands, then the op.
        pub(super) fn generic_norm(x: &V, shift: &V, scale: &V, normed: V) -> V {
            let op = (x.tracked() || shift.tracked() || scale.tracked())
                .then(|| Op::GenericNorm(x.clone(), shift.clone(), scale.clone()));
            V::attached(&normed, op)
        }

        /// The generic modulated norm's `bwd`, op by op (`nn/norm.rs`).
        fn generic_norm_backward(x: &V, shift: &V, scale: &V, grad: &V) -> (V, V, V) {
            let f32 = DType::F32;
            let x32 = x.detach().to_dtype(f32);
            let mean = x32.mean_keepdim_last();
            let centred = x32.broadcast_sub(&mean);
            drop((x32, mean));
            let inv_std = centred
                .unary(Unary::Sqr)
                .mean_keepdim_last()
                .affine(1.0)
                .unary(Unary::Sqrt)
                .unary(Unary::Recip);
            let normed = centred.broadcast_mul(&inv_std);
            drop(centred);
            let g = grad.detach().to_dtype(f32);
            let d_shift = g.sum_keepdim(&[1]).to_dtype(shift.dtype());
            let d_scale = g.mul(&normed).sum_keepdim(&[1]).to_dtype(scale.dtype());
            let d_normed = g.broadcast_mul(&scale.detach().to_dtype(f32).affine(1.0));
            drop(g);
            let mean_d = d_normed.mean_keepdim_last();
            let mean_d_normed = d_normed.mul(&normed).mean_keepdim_last();
            let dx = d_normed
                .broadcast_sub(&mean_d)
                .broadcast_sub(&normed.broadcast_mul(&mean_d_normed))
                .broadcast_mul(&inv_std)
                .to_dtype(x.dtype());
            (dx, d_shift, d_scale)
        }

        /// `nn/linear.rs`'s biased product on contiguous f32 `x` `(rows, in)`, `W`
        /// `(out, in)` and `b` `(out,)`: the output, filled with the bias rows, then
        /// accumulated into by gemm.
        pub(super) fn biased_product(x: &V, w: &V, b: &V, values: bool) -> V {
            let (w, b) = (w.contiguous(), b.contiguous());
            let meter = x.meter().clone();
            let (rows, inner, out) = (x.dims()[0], x.dims()[1], w.dims()[0]);
            if values {
                meter.count_matmul(2.0 * (rows * inner * out) as f64);
                meter.count_moved(x.bytes() + w.bytes() + (8 * rows * out) as u64);
            } else {
                meter.count_moved((4 * rows * out) as u64);
            }
            let storage = V::storage(&meter, rows * out, DType::F32);
            V::f32_result(
                &meter,
                vec![rows, out],
                storage,
                [x, &w, &b],
                Op::BiasedProduct,
            )
        }

        /// `nn/linear.rs`'s bias gradient: f64 partial sums of `x` `(rows, cols)` per block
        /// of rows, added into the first (the others freed), then the f32 sums `(cols,)`.
        fn column_sums(x: &V) -> V {
            let meter = x.meter().clone();
            let (rows, cols) = (x.dims()[0], x.dims()[1]);
            meter.count_moved(x.bytes());
            let row = (8 * cols) as u64;
            let blocks = crate::nn::matrix::column_sum_blocks(rows) as u64;
            meter.alloc(blocks * row);
            meter.free((blocks - 1) * row);
            let sums = V::zeros(&meter, &[cols], DType::F32);
            meter.free(row);
            sums
        }

        /// The f32 result of a three-operand custom op, a graph node when an operand is
        /// tracked.
        fn f32_result(
            meter: &Rc<Meter>,
            dims: Vec<usize>,
            storage: Rc<Storage>,
            [a, b, c]: [&V; 3],
            make: impl FnOnce(V, V, V) -> Op,
        ) -> V {
            let op = (a.tracked() || b.tracked() || c.tracked())
                .then(|| make(a.clone(), b.clone(), c.clone()));
            V::node(meter, dims, None, DType::F32, storage, op, false)
        }

        /// `nn/gated_linear.rs` forward on contiguous f32 `h` `(rows, inner)`, `W`
        /// `(out, inner)` and the bias with the gates `(1 + n, out)`: the output, then (with
        /// values) one row block of activation output as scratch and gemm's packed copy of
        /// it (the left operand of each product); for the graph only, zeros.
        pub(super) fn gated_linear(
            h: &V,
            w: &V,
            bias_and_gates: &V,
            activation: Activation,
            values: bool,
        ) -> V {
            let (h, w) = (h.contiguous(), w.contiguous());
            let meter = h.meter().clone();
            let (rows, inner, out) = (h.dims()[0], h.dims()[1], w.dims()[0]);
            let output_bytes = (4 * rows * out) as u64;
            let storage = V::storage(&meter, rows * out, DType::F32);
            if values {
                let sequences = bias_and_gates.dims()[0].saturating_sub(1).max(1);
                meter.count_matmul(2.0 * (rows * inner * out) as f64);
                // h read by the product (and the activation), W, the output written and
                // gated.
                let h_reads = 1 + u64::from(activation != Activation::Identity);
                meter.count_moved(h_reads * h.bytes() + w.bytes() + 3 * output_bytes);
                let scratch = activation_scratch_bytes(activation, rows / sequences, inner);
                meter.alloc(2 * scratch);
                meter.free(2 * scratch);
            } else {
                meter.count_moved(output_bytes);
            }
            V::f32_result(
                &meter,
                vec![rows, out],
                storage,
                [&h, &w, bias_and_gates],
                |h, w, bg| Op::GatedLinear(h, w, bg, activation),
            )
        }

        /// Its `bwd`: the wanted gradients (`∂h`, `∂W`, the bias's and gates'), the weight
        /// scaled by a sequence's gates, `Mᵢ` and one row block of recomputed activation
        /// output (when `W` or the gates are tracked), each product's left operand (a row block of
        /// `∂y`, or its transpose) packed by gemm, and the f64 column sums of `∂y`.
        fn gated_linear_backward(
            h: &V,
            w: &V,
            bias_and_gates: &V,
            activation: Activation,
            grad: &V,
        ) -> (Option<V>, Option<V>, Option<V>) {
            let meter = h.meter().clone();
            let (rows, inner, out) = (h.dims()[0], h.dims()[1], w.dims()[0]);
            let sequences = bias_and_gates.dims()[0].saturating_sub(1).max(1);
            let (want_h, want_w, want_bg) = (h.tracked(), w.tracked(), bias_and_gates.tracked());
            let needs_m = want_w || want_bg;
            let products = f64::from(u8::from(want_h) + u8::from(needs_m));
            meter.count_matmul(products * 2.0 * (rows * inner * out) as f64);
            // h read for act' and act (or by the product), ∂h written, ∂y read; per
            // sequence the scaled weight and the folds of Mᵢ.
            let folds = u64::from(want_h) + 2 * u64::from(needs_m);
            let h_passes = if activation == Activation::Identity {
                2
            } else {
                3
            };
            meter.count_moved(
                h_passes * h.bytes() + grad.bytes() + sequences as u64 * folds * w.bytes(),
            );
            let block_rows = activation.block_rows(inner, rows / sequences);
            let weight_sized = f32_bytes(w);
            let mut scratch = 0;
            if want_h {
                meter.alloc(f32_bytes(h));
                scratch += weight_sized;
            }
            if want_w {
                meter.alloc(weight_sized);
            }
            if want_bg {
                meter.alloc(f32_bytes(bias_and_gates));
            }
            if needs_m {
                scratch +=
                    weight_sized + activation_scratch_bytes(activation, rows / sequences, inner);
            }
            meter.alloc(scratch);
            // gemm's packed block of ∂y; the f64 column sums of ∂y by blocks of rows.
            let column_sums = 8 * crate::nn::matrix::column_sum_blocks(rows / sequences) * out;
            let transient =
                (4 * block_rows * out) as u64 + if want_bg { column_sums as u64 } else { 0 };
            meter.alloc(transient);
            meter.free(transient);
            meter.free(scratch);
            let gradient = |t: &V| V::from_f32_buffer(&meter, t.dims(), DType::F32);
            (
                want_h.then(|| gradient(h)),
                want_w.then(|| gradient(w)),
                want_bg.then(|| gradient(bias_and_gates)),
            )
        }

        /// The backward kernel of a fused op (`apply_op2_no_bwd`): the input read in place
        /// when f32 (widened to a copy in half precision) and the gradient copied to f32,
        /// that copy becoming the result.
        fn fused_backward(&self, grad: &V) -> V {
            let meter = self.meter().clone();
            let widened = f32_bytes(grad);
            meter.count_moved(3 * widened);
            let input_copy = widened_copy_bytes(&[self]);
            meter.alloc(input_copy);
            let result = if grad.dtype() == DType::F32 {
                let storage = V::storage(&meter, grad.numel(), DType::F32);
                V::node(
                    &meter,
                    grad.dims().to_vec(),
                    None,
                    DType::F32,
                    storage,
                    None,
                    false,
                )
            } else {
                meter.alloc(widened);
                let storage = V::storage(&meter, grad.numel(), grad.dtype());
                meter.free(widened);
                V::node(
                    &meter,
                    grad.dims().to_vec(),
                    None,
                    grad.dtype(),
                    storage,
                    None,
                    false,
                )
            };
            meter.free(input_copy);
            result
        }
    }

    /// Gradients by tensor id (candle's `GradStore`).
    #[derive(Debug, Default)]
    pub(super) struct Grads(HashMap<usize, V>);

    impl Grads {
        /// Removes and returns the gradient of `t`.
        pub(super) fn remove(&mut self, t: &V) -> Option<V> {
            self.0.remove(&t.id())
        }

        /// Bytes of every gradient held.
        pub(super) fn total_bytes(&self) -> u64 {
            self.0.values().map(V::bytes).sum()
        }

        /// `remat::grads::merge_params`: adds `other`'s gradients into these (a new sum
        /// where one is present: a parameter shared by several stages, such as a block's
        /// modulation table, holds one gradient).
        pub(super) fn merge(&mut self, other: &Grads) {
            for (id, grad) in &other.0 {
                let merged = match self.0.get(id) {
                    Some(existing) => existing.add(grad),
                    None => grad.clone(),
                };
                self.0.insert(*id, merged);
            }
        }

        /// The patched `GradStore::accumulate`.
        fn accumulate(&mut self, t: &V, grad: &V) {
            if !t.tracked() {
                return;
            }
            match self.0.get_mut(&t.id()) {
                Some(existing) => {
                    let sum = existing.add(grad);
                    *existing = sum;
                }
                None => {
                    self.0.insert(t.id(), grad.contiguous());
                }
            }
        }
    }

    /// candle's `sorted_nodes`: a depth-first post-order from `root`, reversed.
    fn sorted_nodes(root: &V) -> Vec<V> {
        fn walk(node: &V, nodes: &mut Vec<V>, seen: &mut HashMap<usize, bool>) -> bool {
            if let Some(&tracked) = seen.get(&node.id()) {
                return tracked;
            }
            let mut tracked = false;
            if node.is_var() {
                tracked = true;
            } else if let Some(op) = &node.0.op {
                for input in op_inputs(op) {
                    tracked |= walk(input, nodes, seen);
                }
            }
            seen.insert(node.id(), tracked);
            if tracked {
                nodes.push(node.clone());
            }
            tracked
        }
        let mut nodes = Vec::new();
        walk(root, &mut nodes, &mut HashMap::new());
        nodes.reverse();
        nodes
    }

    fn op_inputs(op: &Op) -> Vec<&V> {
        match op {
            Op::Add(a, b) | Op::Sub(a, b) | Op::Mul(a, b) | Op::Div(a, b) | Op::Matmul(a, b) => {
                vec![a, b]
            }
            Op::Cat(args, _) => args.iter().collect(),
            Op::Broadcast(a)
            | Op::Reshape(a)
            | Op::Transpose(a, _, _)
            | Op::Permute(a, _)
            | Op::Copy(a)
            | Op::Narrow(a, _, _, _)
            | Op::Affine(a, _)
            | Op::Sum(a)
            | Op::Unary(a, _)
            | Op::ToDType(a)
            | Op::Fused(a, _)
            | Op::SelfAttention(a, _) => vec![a],
            Op::Attention(q, k, v, _)
            | Op::ChunkedAttention(q, k, v, _, _)
            | Op::ModulatedNorm(q, k, v)
            | Op::GenericNorm(q, k, v)
            | Op::BiasedProduct(q, k, v)
            | Op::GatedLinear(q, k, v, _)
            | Op::GenericGatedLinear(q, k, v, _) => {
                vec![q, k, v]
            }
        }
    }

    /// What the backward rule of `op` reads besides the upstream gradient: each operand
    /// (in `op_inputs` order) and the op's result — the vendored candle's
    /// `backprop::backward_reads`, with the fused kernels' `bwd_reads` (`nn/ops.rs`).
    fn backward_reads(op: &Op) -> (Vec<bool>, bool) {
        match op {
            Op::Add(..) | Op::Sub(..) => (vec![false, false], false),
            Op::Mul(a, b) | Op::Matmul(a, b) => (vec![b.tracked(), a.tracked()], false),
            Op::Div(..) => (vec![true, true], false),
            Op::Cat(args, _) => (vec![false; args.len()], false),
            Op::Broadcast(_)
            | Op::Reshape(_)
            | Op::Transpose(..)
            | Op::Permute(..)
            | Op::Copy(_)
            | Op::Narrow(..)
            | Op::Affine(..)
            | Op::Sum(_)
            | Op::ToDType(_) => (vec![false], false),
            Op::Unary(_, f) => match f {
                Unary::Sqrt | Unary::Exp | Unary::Tanh => (vec![false], true),
                Unary::Neg => (vec![false], false),
                Unary::Sqr | Unary::Recip | Unary::Gelu => (vec![true], false),
                Unary::Silu | Unary::NoBackward => (vec![true], true),
            },
            Op::Fused(_, Fused::Gelu) => (vec![true], false),
            Op::SelfAttention(..) => (vec![true], false),
            Op::Attention(..) => (vec![true, true, true], false),
            Op::ChunkedAttention(..) => (vec![true, true, true], false),
            Op::ModulatedNorm(..) | Op::GenericNorm(..) => (vec![true, false, true], false),
            Op::GenericGatedLinear(..) => (vec![true, true, true], false),
            Op::GatedLinear(h, w, bg, activation) => {
                let tracked = [h.tracked(), w.tracked(), bg.tracked()];
                (
                    gated_linear::backward_reads(*activation, tracked).to_vec(),
                    false,
                )
            }
            Op::BiasedProduct(x, w, _) => (vec![w.tracked(), x.tracked(), false], false),
        }
    }

    /// The vendored candle's `backprop::release_unneeded_for_backward`: frees every storage
    /// of the graph behind `roots` that belongs to its op nodes only (no root, variable,
    /// constant or outside handle shares it) and that no backward rule of a node the
    /// backward pass runs through reads.
    pub(super) fn release_unneeded(roots: &[&V]) {
        let mut visited: HashMap<usize, V> = HashMap::new();
        let mut op_handles: HashMap<usize, usize> = HashMap::new();
        let mut stack: Vec<V> = Vec::new();
        for &root in roots {
            if visited.insert(root.id(), root.clone()).is_none() {
                stack.push(root.clone());
            }
        }
        while let Some(t) = stack.pop() {
            if let Some(op) = &t.0.op {
                for arg in op_inputs(op) {
                    *op_handles.entry(arg.id()).or_default() += 1;
                    if let std::collections::hash_map::Entry::Vacant(entry) =
                        visited.entry(arg.id())
                    {
                        entry.insert(arg.clone());
                        stack.push(arg.clone());
                    }
                }
            }
        }
        let storage_key = |v: &V| Rc::as_ptr(&v.0.storage) as usize;
        let mut keep: HashSet<usize> = HashSet::new();
        for &root in roots {
            for node in sorted_nodes(root) {
                if node.is_var() {
                    continue;
                }
                if let Some(op) = &node.0.op {
                    let (args, res) = backward_reads(op);
                    if res {
                        keep.insert(storage_key(&node));
                    }
                    for (arg, read) in op_inputs(op).into_iter().zip(args) {
                        if read {
                            keep.insert(storage_key(arg));
                        }
                    }
                }
            }
        }
        let root_ids: HashSet<usize> = roots.iter().map(|r| r.id()).collect();
        // This function's own handles: one per visited tensor (in `visited`), one more for
        // each tensor still on the stack (none at this point).
        let mut per_storage: HashMap<usize, (V, usize)> = HashMap::new();
        for t in visited.values() {
            let outside = Rc::strong_count(&t.0) - 1;
            let owned = t.0.op.is_some()
                && !t.is_var()
                && !root_ids.contains(&t.id())
                && outside <= op_handles.get(&t.id()).copied().unwrap_or(0);
            if !owned {
                keep.insert(storage_key(t));
            }
            per_storage
                .entry(storage_key(t))
                .or_insert((t.clone(), 0))
                .1 += 1;
        }
        for (key, (t, tensors)) in per_storage {
            // `per_storage` holds one more handle on the storage's node, not on the storage.
            if keep.contains(&key) || Rc::strong_count(&t.0.storage) > tensors {
                continue;
            }
            let storage = &t.0.storage;
            t.meter().free(storage.bytes.replace(0));
        }
    }

    /// candle's `Tensor::backward` from `output`, whose gradient is `grad` (as remat's
    /// `inject` hands it over), with the patched accumulation.
    pub(super) fn backward(output: &V, grad: &V) -> Result<Grads, CostsError> {
        let sorted = sorted_nodes(output);
        let meter = output.meter().clone();
        // The node list of the walk.
        let bookkeeping = meter.host_bytes(8 * sorted.len() as u64);
        meter.alloc(bookkeeping);
        let mut grads = Grads::default();
        grads.accumulate(output, grad);
        for node in &sorted {
            if node.is_var() {
                continue;
            }
            let stored = grads.remove(node).ok_or_else(|| {
                CostsError::Internal(format!("no gradient for node {:?}", node.dims()))
            })?;
            let grad = stored.detach();
            if let Some(op) = &node.0.op {
                backward_op(&mut grads, node, op, &grad)?;
            }
        }
        meter.free(bookkeeping);
        Ok(grads)
    }

    /// One node's rule, as written in candle's `backprop.rs`.
    fn backward_op(grads: &mut Grads, node: &V, op: &Op, grad: &V) -> Result<(), CostsError> {
        match op {
            Op::Add(lhs, rhs) => {
                grads.accumulate(lhs, grad);
                grads.accumulate(rhs, grad);
            }
            Op::Sub(lhs, rhs) => {
                grads.accumulate(lhs, grad);
                grads.accumulate(rhs, &grad.unary(Unary::Neg));
            }
            Op::Mul(lhs, rhs) => {
                if lhs.tracked() {
                    let lhs_grad = grad.mul(rhs);
                    grads.accumulate(lhs, &lhs_grad);
                }
                if rhs.tracked() {
                    let rhs_grad = grad.mul(lhs);
                    grads.accumulate(rhs, &rhs_grad);
                }
            }
            Op::Div(lhs, rhs) => {
                let lhs_grad = grad.div(rhs);
                grads.accumulate(lhs, &lhs_grad);
                let rhs_grad = grad.mul(lhs).div(&rhs.unary(Unary::Sqr));
                grads.accumulate(rhs, &rhs_grad.unary(Unary::Neg));
            }
            Op::Matmul(lhs, rhs) => {
                if lhs.tracked() {
                    let lhs_grad = grad.matmul(&rhs.t());
                    grads.accumulate(lhs, &lhs_grad);
                }
                if rhs.tracked() {
                    let rhs_grad = lhs.t().matmul(grad);
                    grads.accumulate(rhs, &rhs_grad);
                }
            }
            Op::Broadcast(arg) => {
                let (arg_dims, node_dims) = (arg.dims(), node.dims());
                let left = node_dims.len() - arg_dims.len();
                let mut sum_dims: Vec<usize> = (0..left).collect();
                for (i, (n, a)) in node_dims[left..].iter().zip(arg_dims).enumerate() {
                    if n != a {
                        sum_dims.push(i + left);
                    }
                }
                let mut arg_grad = grad.sum_keepdim(&sum_dims);
                for _ in 0..left {
                    arg_grad = arg_grad.squeeze(0);
                }
                grads.accumulate(arg, &arg_grad.broadcast_as(arg_dims));
            }
            Op::Sum(arg) => {
                grads.accumulate(arg, &grad.broadcast_as(arg.dims()));
            }
            Op::ToDType(arg) => grads.accumulate(arg, &grad.to_dtype(arg.dtype())),
            Op::Copy(arg) => grads.accumulate(arg, grad),
            Op::Affine(arg, mul) => grads.accumulate(arg, &grad.affine(*mul)),
            Op::Reshape(arg) => grads.accumulate(arg, &grad.reshape(arg.dims())),
            Op::Transpose(arg, a, b) => grads.accumulate(arg, &grad.transpose(*a, *b)),
            Op::Permute(arg, perm) => {
                let mut inverse = vec![0; perm.len()];
                for (i, &p) in perm.iter().enumerate() {
                    inverse[p] = i;
                }
                grads.accumulate(arg, &grad.permute(&inverse));
            }
            &Op::Narrow(ref arg, dim, start, len) => {
                let arg_dims = arg.dims();
                let meter = grad.meter();
                let pad = |size: usize| {
                    let mut dims = arg_dims.to_vec();
                    dims[dim] = size;
                    V::zeros(meter, &dims, grad.dtype())
                };
                let left = (start > 0).then(|| pad(start));
                let right_len = arg_dims[dim] - start - len;
                let right = (right_len > 0).then(|| pad(right_len));
                let arg_grad = match (&left, &right) {
                    (None, None) => grad.clone(),
                    (Some(l), None) => V::cat(&[l, grad], dim),
                    (None, Some(r)) => V::cat(&[grad, r], dim),
                    (Some(l), Some(r)) => V::cat(&[l, grad, r], dim),
                };
                grads.accumulate(arg, &arg_grad);
            }
            Op::Cat(args, dim) => {
                let mut start = 0;
                for arg in args {
                    let len = arg.dims()[*dim];
                    grads.accumulate(arg, &grad.narrow(*dim, start, len));
                    start += len;
                }
            }
            Op::Unary(arg, f) => unary_backward(grads, node, arg, *f, grad)?,
            Op::Fused(arg, Fused::Gelu) => {
                let grad = grad.contiguous();
                let arg_grad = arg.fused_backward(&grad);
                grads.accumulate(arg, &arg_grad);
            }
            Op::SelfAttention(qkv, heads) => {
                let dqkv = V::fused_self_attention_backward(qkv, *heads, &grad.contiguous());
                grads.accumulate(qkv, &dqkv);
            }
            Op::Attention(q, k, v, heads) => {
                let (dq, dk, dv) = V::fused_attention_backward(q, k, v, *heads, &grad.contiguous());
                grads.accumulate(q, &dq);
                grads.accumulate(k, &dk);
                grads.accumulate(v, &dv);
            }
            Op::ChunkedAttention(q, k, v, lse, rows) => {
                let (dq, dk, dv) = V::chunked_attention_backward(q, k, v, lse, *rows, grad);
                grads.accumulate(q, &dq);
                grads.accumulate(k, &dk);
                grads.accumulate(v, &dv);
            }
            Op::BiasedProduct(x, w, b) => {
                // `bwd` multiplies by detached operands: the gradients hold no graph.
                let dx = x.tracked().then(|| grad.matmul(&w.detach()));
                let dw = w.tracked().then(|| grad.t().matmul(&x.detach()));
                let db = b.tracked().then(|| V::column_sums(&grad.contiguous()));
                for (t, g) in [(x, dx), (w, dw), (b, db)] {
                    if let Some(g) = g {
                        grads.accumulate(t, &g);
                    }
                }
            }
            Op::GatedLinear(h, w, bg, activation) => {
                let (dh, dw, dbg) =
                    V::gated_linear_backward(h, w, bg, *activation, &grad.contiguous());
                for (t, g) in [(h, dh), (w, dw), (bg, dbg)] {
                    if let Some(g) = g {
                        grads.accumulate(t, &g);
                    }
                }
            }
            Op::GenericGatedLinear(h, w, bg, activation) => {
                let (dh, dw, dbg) = V::generic_gated_linear_backward(h, w, bg, *activation, grad);
                grads.accumulate(h, &dh);
                for (t, g) in [(w, dw), (bg, dbg)] {
                    if let Some(g) = g {
                        grads.accumulate(t, &g);
                    }
                }
            }
            Op::GenericNorm(x, shift, scale) => {
                let (dx, d_shift, d_scale) = V::generic_norm_backward(x, shift, scale, grad);
                grads.accumulate(x, &dx);
                grads.accumulate(shift, &d_shift);
                grads.accumulate(scale, &d_scale);
            }
            Op::ModulatedNorm(x, shift, scale) => {
                let (dx, d_shift, d_scale) =
                    V::modulated_norm_backward(x, shift, scale, &grad.contiguous());
                grads.accumulate(x, &dx);
                for (t, g) in [(shift, d_shift), (scale, d_scale)] {
                    if let Some(g) = g {
                        grads.accumulate(t, &g);
                    }
                }
            }
        }
        Ok(())
    }

    fn unary_backward(
        grads: &mut Grads,
        node: &V,
        arg: &V,
        f: Unary,
        grad: &V,
    ) -> Result<(), CostsError> {
        match f {
            Unary::Sqr => {
                let arg_grad = arg.mul(grad).affine(2.0);
                grads.accumulate(arg, &arg_grad);
            }
            Unary::Sqrt => {
                let arg_grad = grad.div(node).affine(0.5);
                grads.accumulate(arg, &arg_grad);
            }
            Unary::Recip => {
                let grad = grad.div(&arg.unary(Unary::Sqr));
                grads.accumulate(arg, &grad.unary(Unary::Neg));
            }
            Unary::Exp => grads.accumulate(arg, &grad.mul(node)),
            Unary::Neg => grads.accumulate(arg, &grad.unary(Unary::Neg)),
            Unary::Tanh => {
                let minus_dtanh = node.unary(Unary::Sqr).affine(1.0);
                grads.accumulate(arg, &grad.mul(&minus_dtanh).unary(Unary::Neg));
            }
            Unary::Silu => {
                let sigmoid_arg = arg
                    .unary(Unary::Neg)
                    .unary(Unary::Exp)
                    .affine(1.0)
                    .unary(Unary::Recip);
                let silu_grad = sigmoid_arg.mul(&node.affine(-1.0)).add(node);
                grads.accumulate(arg, &grad.mul(&silu_grad));
            }
            Unary::Gelu => {
                // candle's rule for `gelu` (tanh approximation).
                let cube = arg.unary(Unary::NoBackward);
                let tanh = cube
                    .affine(0.0356774)
                    .add(&arg.affine(0.797885))
                    .unary(Unary::Tanh);
                let gelu_grad = tanh
                    .affine(0.5)
                    .add(
                        &cube
                            .affine(0.0535161)
                            .add(&arg.affine(0.398942))
                            .mul(&tanh.unary(Unary::NoBackward).affine(-1.0)),
                    )
                    .affine(1.0);
                grads.accumulate(arg, &grad.mul(&gelu_grad));
            }
            Unary::NoBackward => {
                return Err(CostsError::Internal(
                    "backward through an op without a modelled rule".into(),
                ))
            }
        }
        Ok(())
    }
}

/// The model code replayed on virtual tensors, mirroring `nn/*.rs` and `model.rs`.
mod replay {
    use super::vt::{backward, release_unneeded, Fused, Grads, Meter, Unary, V};
    use super::{CostsError, Kernels, Memory, Mode, StageCosts, StageWork};
    use crate::config::{InputGeometry, LatteConfig};
    use crate::lora::AdaptedLayer;
    use crate::nn::gated_linear::Activation;
    use candle_core::DType;
    use std::collections::HashMap;
    use std::rc::Rc;

    /// Width of the sinusoidal timestep features (`embeddings.rs`).
    const TIMESTEP_CHANNELS: usize = 256;

    /// `nn::linear::Linear`.
    struct Linear {
        weight: V,
        bias: Option<V>,
        adapter: Option<LowRank>,
    }

    /// `nn::low_rank::LowRank`: `A` `(r, in)` and `B` `(out, r)`, f32 variables.
    struct LowRank {
        down: V,
        up: V,
    }

    impl LowRank {
        /// `A` and `s·B` in `dtype`.
        fn factors(&self, dtype: DType) -> (V, V) {
            (
                self.down.to_dtype(dtype),
                self.up.affine(1.0).to_dtype(dtype),
            )
        }

        /// `LowRank::delta` of a `(rows, in)` input.
        fn delta(&self, x: &V) -> V {
            let (down, up) = self.factors(x.dtype());
            x.matmul(&down.t()).matmul(&up.t())
        }

        /// `LowRank::gated_delta`.
        fn gated_delta(&self, x: &V, gate: &V) -> V {
            let (v, rows, in_dim) = (x.dims()[0], x.dims()[1], x.dims()[2]);
            let (down, up) = self.factors(x.dtype());
            let rank = down.dims()[0];
            let reduced = x
                .reshape(&[v * rows, in_dim])
                .matmul(&down.t())
                .reshape(&[v, rows, rank]);
            let gated_up = up.t().unsqueeze(0).broadcast_mul(gate);
            reduced.matmul(&gated_up)
        }
    }

    /// `nn::linear::StackedLinear`: weights and biases concatenated (copies), and each
    /// layer's update.
    struct StackedLinear<'a> {
        base: Linear,
        layers: Vec<&'a Linear>,
        meter: Rc<Meter>,
    }

    impl<'a> StackedLinear<'a> {
        fn new(layers: &[&'a Linear], meter: &Rc<Meter>) -> Self {
            let weights: Vec<&V> = layers.iter().map(|l| &l.weight).collect();
            let biases: Option<Vec<&V>> = layers.iter().map(|l| l.bias.as_ref()).collect();
            StackedLinear {
                base: Linear {
                    weight: V::cat(&weights, 0),
                    bias: biases.map(|b| V::cat(&b, 0)),
                    adapter: None,
                },
                layers: layers.to_vec(),
                meter: meter.clone(),
            }
        }

        fn forward(&self, x: &V) -> V {
            if self.layers.iter().all(|l| l.adapter.is_none()) {
                return self.base.forward(x);
            }
            let mut dims = x.dims().to_vec();
            let in_dim = dims.pop().unwrap_or(1);
            let rows = x.reshape(&[x.numel() / in_dim.max(1), in_dim]);
            let y = self.base.forward(&rows);
            let parts: Vec<V> = self
                .layers
                .iter()
                .map(|l| match &l.adapter {
                    Some(adapter) => adapter.delta(&rows),
                    None => V::zeros(
                        &self.meter,
                        &[rows.dims()[0], l.weight.dims()[0]],
                        x.dtype(),
                    ),
                })
                .collect();
            let y = y.add(&V::cat(&parts.iter().collect::<Vec<_>>(), 1));
            dims.push(y.dims()[1]);
            y.reshape(&dims)
        }
    }

    impl Linear {
        fn forward(&self, x: &V) -> V {
            self.forward_with(x, true)
        }

        /// `values: false` is `Output::GraphOnly`.
        fn forward_with(&self, x: &V, values: bool) -> V {
            let Some(adapter) = &self.adapter else {
                return self.forward_base(x, values);
            };
            let mut dims = x.dims().to_vec();
            let in_dim = dims.pop().unwrap_or(1);
            let rows = x.reshape(&[x.numel() / in_dim.max(1), in_dim]);
            let y = self.forward_base(&rows, values).add(&adapter.delta(&rows));
            dims.push(y.dims()[1]);
            y.reshape(&dims)
        }

        /// `Linear::forward_base`.
        fn forward_base(&self, x: &V, values: bool) -> V {
            let mut out_dims = x.dims().to_vec();
            let in_dim = out_dims.pop().unwrap_or(1);
            let rows = x.numel() / in_dim.max(1);
            let out_dim = self.weight.dims()[0];
            let x = x.reshape(&[rows, in_dim]);
            let fused = x.fused_kernels() && x.dtype() == DType::F32;
            let y = match &self.bias {
                Some(bias) if fused => {
                    V::biased_product(&x.contiguous(), &self.weight, bias, values)
                }
                Some(bias) => x.matmul(&self.weight.t()).broadcast_add(bias),
                None => x.matmul(&self.weight.t()),
            };
            out_dims.push(out_dim);
            y.reshape(&out_dims)
        }
    }

    /// `nn::attention::Attention`.
    struct Attention {
        to_q: Linear,
        to_k: Linear,
        to_v: Linear,
        to_out: Linear,
        heads: usize,
        head_dim: usize,
    }

    /// `nn::block::TransformerBlock`.
    struct Block {
        attn1: Attention,
        attn2: Option<Attention>,
        ff_in: Linear,
        ff_out: Linear,
        table: V,
    }

    /// The replay of one workload.
    pub(super) struct Replay {
        meter: Rc<Meter>,
        config: LatteConfig,
        geometry: InputGeometry,
        dtype: DType,
        mode: Mode,
        kernels: Kernels,
        /// Temporal attention on: blocks alternate spatial and temporal.
        temporal: bool,
        /// Layers with a trained low-rank update, by module name (LoRA: the base weights
        /// are then frozen).
        adapters: Option<HashMap<String, AdaptedLayer>>,
    }

    /// The head's results as `remat::grads::run_head` keeps them.
    struct Head {
        tokens: V,
        /// What the stages read: `[captions, embedded_timestep, timestep_video]` (leaf
        /// copies when tracked).
        context: Vec<V>,
        /// Whether each context tensor is a leaf collecting gradients.
        leaves: Vec<bool>,
        /// The context as computed (the head graph's roots besides the tokens), then the
        /// inputs.
        kept: Vec<V>,
    }

    /// Results of the chain: stage costs (times zero), work, output bytes, reserved bytes.
    type ChainReplay = (Vec<StageCosts>, Vec<StageWork>, u64, u64);

    impl Replay {
        #[allow(clippy::too_many_arguments)]
        pub(super) fn new(
            config: &LatteConfig,
            geometry: &InputGeometry,
            dtype: DType,
            mode: Mode,
            kernels: Kernels,
            temporal: bool,
            memory: Memory,
            adapters: Option<&[AdaptedLayer]>,
        ) -> Self {
            Self {
                meter: Rc::new(Meter::new(kernels, memory)),
                config: config.clone(),
                geometry: *geometry,
                dtype,
                mode,
                kernels,
                temporal,
                adapters: adapters.map(|layers| {
                    layers
                        .iter()
                        .map(|l| (l.module.clone(), l.clone()))
                        .collect()
                }),
            }
        }

        /// A base parameter: trainable in training without adapters.
        fn param(&self, dims: &[usize]) -> V {
            let trained = self.mode.trains_parameters() && self.adapters.is_none();
            V::existing(&self.meter, dims, self.dtype, trained)
        }

        /// The linear layer `module`, with its update if it has one.
        fn linear(&self, module: &str, in_dim: usize, out_dim: usize, bias: bool) -> Linear {
            let adapter = self
                .adapters
                .as_ref()
                .and_then(|a| a.get(module))
                .map(|layer| {
                    let trained = self.mode.trains_parameters();
                    LowRank {
                        down: V::existing(&self.meter, &[layer.rank, in_dim], DType::F32, trained),
                        up: V::existing(&self.meter, &[out_dim, layer.rank], DType::F32, trained),
                    }
                });
            Linear {
                weight: self.param(&[out_dim, in_dim]),
                bias: bias.then(|| self.param(&[out_dim])),
                adapter,
            }
        }

        fn new_attention(&self, prefix: &str) -> Attention {
            let c = &self.config;
            let (d, bias) = (c.hidden_size(), c.attention_bias);
            Attention {
                to_q: self.linear(&format!("{prefix}.to_q"), d, d, bias),
                to_k: self.linear(&format!("{prefix}.to_k"), d, d, bias),
                to_v: self.linear(&format!("{prefix}.to_v"), d, d, bias),
                to_out: self.linear(&format!("{prefix}.to_out.0"), d, d, true),
                heads: c.num_heads,
                head_dim: c.head_dim,
            }
        }

        /// The block `prefix` (`transformer_blocks.3`).
        fn block(&self, prefix: &str, cross_attention: bool) -> Block {
            let d = self.config.hidden_size();
            Block {
                attn1: self.new_attention(&format!("{prefix}.attn1")),
                attn2: cross_attention.then(|| self.new_attention(&format!("{prefix}.attn2"))),
                ff_in: self.linear(&format!("{prefix}.ff.net.0.proj"), d, 4 * d, true),
                ff_out: self.linear(&format!("{prefix}.ff.net.2"), 4 * d, d, true),
                table: self.param(&[6, d]),
            }
        }

        /// Runs the head and every scheduled stage as `remat::profile::profile` does.
        pub(super) fn run(&self) -> Result<ChainReplay, CostsError> {
            let head_start = self.meter.live();
            let head = self.run_head();
            // `remat::grads::run_head` releases what the head's graph keeps but its backward
            // pass does not read.
            let roots: Vec<&V> = std::iter::once(&head.tokens)
                .chain(head.kept.iter().take(head.context.len()))
                .filter(|t| t.tracked())
                .collect();
            release_unneeded(&roots);
            let head_bytes = self.meter.live() - head_start;

            let layers = self.config.num_layers;
            // Weights of their own per layer, as gradients accumulate per parameter.
            let blocks: Vec<[Block; 2]> = (0..layers)
                .map(|i| {
                    [
                        self.block(&format!("transformer_blocks.{i}"), true),
                        self.block(&format!("temporal_transformer_blocks.{i}"), false),
                    ]
                })
                .collect();
            let d = self.config.hidden_size();
            let tail_table = self.param(&[2, d]);
            let p = self.config.patch_size;
            let proj_out = self.linear("proj_out", d, p * p * self.config.out_channels, true);

            // Each block runs as two stages, its attention and its feed-forward half, and
            // blocks alternate spatial and temporal (`LatteChain`) when temporal attention
            // is on.
            let halves = if self.temporal { 4 } else { 2 } * layers;
            let mut x = head.tokens.detach();
            let mut stages = Vec::with_capacity(halves + 1);
            let mut work = Vec::with_capacity(halves + 1);
            let mut context_grads: Vec<Option<V>> = vec![None; head.context.len()];
            let mut param_grads = Grads::default();
            for i in 0..=halves {
                let (block, attention_half) = (i / 2, i.is_multiple_of(2));
                let (layer, temporal) = if self.temporal {
                    (block / 2, block % 2 == 1)
                } else {
                    (block, false)
                };
                // `values: false` is `ChainModel::stage_graph_only`.
                let run = |input: &V, values: bool| -> V {
                    if i == halves {
                        return self.tail(input, &head.context, &tail_table, &proj_out);
                    }
                    let b = &blocks[layer][usize::from(temporal)];
                    if !attention_half {
                        self.feed_forward_stage(b, input, &head, values)
                    } else if !temporal {
                        let captions = Some(&head.context[0]);
                        self.attention_half(b, input, &head.context[2], captions, values)
                    } else {
                        self.temporal_attention(b, layer, input, &head.context, values)
                    }
                };
                let (costs, mut stage_work, next) =
                    self.measure_stage(&x, run, &head, &mut context_grads, &mut param_grads)?;
                if i < halves {
                    // `remat::profile`'s graph-only timing: one more forward, dropped. Its
                    // seconds come from this work, as every time does (`StageWork::time`).
                    drop(run(&x.leaf(), false));
                    stage_work.graph_only = Some(self.meter.take_work());
                }
                stages.push(costs);
                work.push(stage_work);
                x = next;
            }
            let output_bytes = x.bytes();
            let context_grad_bytes: u64 = context_grads.iter().flatten().map(V::bytes).sum();
            // The head's tokens are `a_0`, which the schedule's simulation counts itself.
            let head_graph_bytes = head_bytes - head.tokens.bytes();
            Ok((
                stages,
                work,
                output_bytes,
                head_graph_bytes + context_grad_bytes,
            ))
        }

        /// `remat::profile`'s `measure_stage`.
        fn measure_stage(
            &self,
            x: &V,
            run: impl Fn(&V, bool) -> V,
            head: &Head,
            context_grads: &mut [Option<V>],
            param_grads: &mut Grads,
        ) -> Result<(StageCosts, StageWork, V), CostsError> {
            let meter = &self.meter;
            let input_bytes = x.bytes();
            meter.take_work();
            let before = meter.live();
            meter.reset_peak();
            let input = x.leaf();
            let output = run(&input, true);
            release_unneeded(&[&output]);
            let forward = meter.take_work();
            let after = meter.live();
            let graph_bytes = after - before;
            let fwd_tmp_bytes = meter.peak() - after;

            let next = output.detach();
            let grad_output = V::zeros(meter, next.dims(), next.dtype());
            let before = meter.live();
            meter.reset_peak();
            let mut store = backward(&output, &grad_output)?;
            let backward_work = meter.take_work();
            drop(output);
            let input_grad = store.remove(&input);
            for (leaf, (context, sum)) in head
                .leaves
                .iter()
                .zip(head.context.iter().zip(context_grads.iter_mut()))
            {
                if !leaf {
                    continue;
                }
                if let Some(g) = store.remove(context) {
                    *sum = Some(match sum.take() {
                        Some(s) => s.add(&g),
                        None => g,
                    });
                }
            }
            // What is left are the parameters' gradients.
            let params_before = param_grads.total_bytes();
            param_grads.merge(&store);
            drop(store);
            let param_grad_bytes = param_grads.total_bytes() - params_before;
            let peak = meter.peak();
            drop(input_grad);
            let bwd_tmp_bytes = peak.saturating_sub(before + input_bytes + param_grad_bytes);
            meter.take_work();
            Ok((
                StageCosts {
                    fwd_s: 0.0,
                    bwd_s: 0.0,
                    fwd_graph_only_s: None,
                    input_bytes,
                    graph_bytes,
                    fwd_tmp_bytes,
                    bwd_tmp_bytes,
                    param_grad_bytes,
                },
                StageWork {
                    forward,
                    backward: backward_work,
                    graph_only: None,
                },
                next,
            ))
        }

        // ---- nn/norm.rs ----

        fn layer_norm(&self, x: &V) -> V {
            let dtype = x.dtype();
            let x = x.to_dtype(DType::F32);
            let mean = x.mean_keepdim_last();
            let centred = x.broadcast_sub(&mean);
            let variance = centred.unary(Unary::Sqr).mean_keepdim_last();
            let inv_std = variance.affine(1.0).unary(Unary::Sqrt).unary(Unary::Recip);
            centred.broadcast_mul(&inv_std).to_dtype(dtype)
        }

        fn modulate(&self, x: &V, shift: &V, scale: &V) -> V {
            x.broadcast_mul(&scale.affine(1.0)).broadcast_add(shift)
        }

        fn modulated_layer_norm(&self, x: &V, shift: &V, scale: &V) -> V {
            match self.kernels {
                Kernels::Fused => V::modulated_norm(x, shift, scale),
                Kernels::Generic => {
                    let (xd, shift_d, scale_d) = (x.detach(), shift.detach(), scale.detach());
                    let value = self.modulate(&self.layer_norm(&xd), &shift_d, &scale_d);
                    V::generic_norm(x, shift, scale, value)
                }
            }
        }

        // ---- nn/ops.rs ----

        fn gelu_tanh(&self, x: &V) -> V {
            match self.kernels {
                Kernels::Fused => x.contiguous().fused(Fused::Gelu),
                Kernels::Generic => x.unary(Unary::Gelu),
            }
        }

        // ---- nn/gated_linear.rs ----

        fn gated_linear(
            &self,
            h: &V,
            linear: &Linear,
            gate: &V,
            activation: Activation,
            values: bool,
        ) -> V {
            let base = self.gated_base(h, linear, gate, activation, values);
            match &linear.adapter {
                Some(adapter) => {
                    base.add(&adapter.gated_delta(&self.activate(h, activation), gate))
                }
                None => base,
            }
        }

        /// `Activation::apply`.
        fn activate(&self, h: &V, activation: Activation) -> V {
            match activation {
                Activation::Identity => h.clone(),
                Activation::GeluTanh => self.gelu_tanh(h),
            }
        }

        /// `gated_linear::gated_base`.
        fn gated_base(
            &self,
            h: &V,
            linear: &Linear,
            gate: &V,
            activation: Activation,
            values: bool,
        ) -> V {
            match &linear.bias {
                Some(bias) if self.kernels == Kernels::Fused && h.dtype() == DType::F32 => {
                    let (n, s, inner) = (h.dims()[0], h.dims()[1], h.dims()[2]);
                    let out = linear.weight.dims()[0];
                    let bias_and_gates = V::cat(&[&bias.unsqueeze(0), &gate.reshape(&[n, out])], 0);
                    V::gated_linear(
                        &h.reshape(&[n * s, inner]),
                        &linear.weight,
                        &bias_and_gates,
                        activation,
                        values,
                    )
                    .reshape(&[n, s, out])
                }
                Some(bias) if self.kernels == Kernels::Generic => {
                    let (n, out) = (h.dims()[0], linear.weight.dims()[0]);
                    let bias_and_gates = V::cat(&[&bias.unsqueeze(0), &gate.reshape(&[n, out])], 0);
                    V::generic_gated_linear(h, &linear.weight, &bias_and_gates, activation, values)
                }
                _ => linear
                    .forward_base(&self.activate(h, activation), true)
                    .broadcast_mul(gate),
            }
        }

        // ---- nn/attention.rs ----

        fn attention(&self, a: &Attention, x: &V, context: Option<&V>, values: bool) -> V {
            a.to_out.forward_with(&self.attend(a, x, context), values)
        }

        fn gated_self_attention(&self, a: &Attention, x: &V, gate: &V, values: bool) -> V {
            let heads = self.attend(a, x, None);
            let (n, s, inner) = (heads.dims()[0], heads.dims()[1], heads.dims()[2]);
            let videos = gate.dims()[0];
            let per_video = heads.reshape(&[videos, n / videos * s, inner]);
            let out = a.to_out.weight.dims()[0];
            self.gated_linear(&per_video, &a.to_out, gate, Activation::Identity, values)
                .reshape(&[n, s, out])
        }

        fn attend(&self, a: &Attention, x: &V, context: Option<&V>) -> V {
            if self.kernels == Kernels::Fused && context.is_none() {
                let qkv = StackedLinear::new(&[&a.to_q, &a.to_k, &a.to_v], &self.meter).forward(x);
                return V::fused_self_attention(&qkv, a.heads);
            }
            let context = context.unwrap_or(x);
            let q = a.to_q.forward(x);
            let k = a.to_k.forward(context);
            let v = a.to_v.forward(context);
            match self.kernels {
                Kernels::Fused => V::fused_attention(&q, &k, &v, a.heads),
                Kernels::Generic => {
                    let (q, k, v) = (split_heads(a, &q), split_heads(a, &k), split_heads(a, &v));
                    let (b, h, l) = (q.dims()[0], q.dims()[1], k.dims()[2]);
                    let rows = crate::nn::chunked_attention::chunk_rows(b * h, l);
                    V::chunked_attention(&q, &k, &v, rows)
                }
            }
        }

        // ---- nn/feed_forward.rs, nn/block.rs ----

        fn attention_half(
            &self,
            b: &Block,
            h: &V,
            timestep: &V,
            captions: Option<&V>,
            values: bool,
        ) -> V {
            let [shift_msa, scale_msa, gate_msa] = self.modulation(b, timestep, 0);
            let (n, s, d) = (h.dims()[0], h.dims()[1], h.dims()[2]);
            let per_video = h.reshape(&[timestep.dims()[0], n * s / timestep.dims()[0], d]);
            let x = self
                .modulated_layer_norm(&per_video, &shift_msa, &scale_msa)
                .reshape(&[n, s, d]);
            let attn1_values = values || b.attn2.is_some();
            let attn1 = self.gated_self_attention(&b.attn1, &x, &gate_msa, attn1_values);
            let h = h.add(&attn1);
            match (&b.attn2, captions) {
                (Some(attn2), Some(captions)) => {
                    h.add(&self.attention(attn2, &h, Some(captions), values))
                }
                _ => h,
            }
        }

        fn feed_forward_half(&self, b: &Block, h: &V, timestep: &V, values: bool) -> V {
            let [shift_mlp, scale_mlp, gate_mlp] = self.modulation(b, timestep, 3);
            let x = self.modulated_layer_norm(h, &shift_mlp, &scale_mlp);
            let ff_in = b.ff_in.forward(&x);
            h.add(&self.gated_linear(&ff_in, &b.ff_out, &gate_mlp, Activation::GeluTanh, values))
        }

        /// `model::LatteChain::run_stage` of a feed-forward half: one sequence per video.
        fn feed_forward_stage(&self, b: &Block, x: &V, head: &Head, values: bool) -> V {
            let dims = x.dims().to_vec();
            let videos = x.reshape(&[
                self.geometry.batch,
                dims[0] * dims[1] / self.geometry.batch,
                dims[2],
            ]);
            self.feed_forward_half(b, &videos, &head.context[2], values)
                .reshape(&dims)
        }

        fn modulation(&self, b: &Block, timestep: &V, first: usize) -> [V; 3] {
            let (n, d) = (timestep.dims()[0], timestep.dims()[1] / 6);
            let table = b.table.narrow(0, first, 3).unsqueeze(0);
            let rows = timestep
                .reshape(&[n, 6, d])
                .narrow(1, first, 3)
                .broadcast_add(&table);
            [
                rows.narrow(1, 0, 1),
                rows.narrow(1, 1, 1),
                rows.narrow(1, 2, 1),
            ]
        }

        // ---- model.rs ----

        fn temporal_attention(
            &self,
            b: &Block,
            layer: usize,
            x: &V,
            context: &[V],
            values: bool,
        ) -> V {
            let batch = self.geometry.batch;
            let mut sequences = swap_sequence_axes(x, batch);
            if layer == 0 && self.geometry.frames > 1 {
                let d = self.config.hidden_size();
                let positions = self.constant_table(self.geometry.frames, d, x.dtype());
                sequences = sequences.broadcast_add(&positions);
            }
            let out = self.attention_half(b, &sequences, &context[2], None, values);
            swap_sequence_axes(&out, batch)
        }

        fn tail(&self, x: &V, context: &[V], table: &V, proj_out: &Linear) -> V {
            let g = self.geometry;
            let c = &self.config;
            let (rows, d) = (x.dims()[0], x.dims()[2]);
            let modulation = context[1]
                .reshape(&[rows, 1, d])
                .broadcast_add(&table.unsqueeze(0));
            let (shift, scale) = (modulation.narrow(1, 0, 1), modulation.narrow(1, 1, 1));
            let x = self.modulated_layer_norm(x, &shift, &scale);
            let patches = proj_out.forward(&x);
            let (p, oc) = (c.patch_size, c.out_channels);
            let (gh, gw) = (g.height / p, g.width / p);
            patches
                .reshape(&[g.batch, g.frames, gh, gw, p, p, oc])
                .permute(&[0, 6, 1, 2, 4, 3, 5])
                .reshape(&[g.batch, oc, g.frames, gh * p, gw * p])
        }

        /// `embeddings::constant_table`: an f64 table rounded to an f32 tensor, cast.
        fn constant_table(&self, rows: usize, dim: usize, dtype: DType) -> V {
            let f64_bytes = (rows * dim * 8) as u64;
            self.meter.alloc(f64_bytes);
            let table = V::zeros(&self.meter, &[1, rows, dim], DType::F32);
            self.meter.free(f64_bytes);
            table.to_dtype(dtype)
        }

        /// `LatteChain::head` and `remat::grads::run_head`.
        fn run_head(&self) -> Head {
            let (g, c) = (self.geometry, &self.config);
            let wants = self.mode.wants_input_grad();
            let hidden = V::existing(
                &self.meter,
                &[g.batch, c.in_channels, g.frames, g.height, g.width],
                self.dtype,
                false,
            );
            let captions = V::existing(
                &self.meter,
                &[g.batch, g.caption_tokens, c.caption_channels],
                self.dtype,
                false,
            );
            let timestep = V::existing(&self.meter, &[g.batch], DType::I64, false);
            let hidden = if wants[0] { hidden.leaf() } else { hidden };
            let captions = if wants[2] { captions.leaf() } else { captions };

            let d = c.hidden_size();
            let p = c.patch_size;
            let fan_in = c.in_channels * p * p;
            let patch_proj = Linear {
                weight: self.param(&[d, c.in_channels, p, p]).reshape(&[d, fan_in]),
                bias: Some(self.param(&[d])),
                adapter: None,
            };
            let embedder = "adaln_single.emb.timestep_embedder";
            let t_linear_1 =
                self.linear(&format!("{embedder}.linear_1"), TIMESTEP_CHANNELS, d, true);
            let t_linear_2 = self.linear(&format!("{embedder}.linear_2"), d, d, true);
            let t_linear = self.linear("adaln_single.linear", d, 6 * d, true);
            let cap_1 = self.linear("caption_projection.linear_1", c.caption_channels, d, true);
            let cap_2 = self.linear("caption_projection.linear_2", d, d, true);

            let (b, f, h, w) = (g.batch, g.frames, g.height, g.width);
            let frames = hidden
                .permute(&[0, 2, 1, 3, 4])
                .reshape(&[b * f, c.in_channels, h, w]);
            // PatchEmbed::forward
            let (gh, gw) = (h / p, w / p);
            let n = b * f;
            let patches = frames
                .reshape(&[n, c.in_channels, gh, p, gw, p])
                .permute(&[0, 2, 4, 1, 3, 5])
                .reshape(&[n, gh * gw, fan_in]);
            let tokens = patch_proj.forward(&patches);
            // sincos_2d's f64 working tables, then the f32 table.
            let positions = self.constant_table(gh * gw, d, DType::F32);
            let tokens = tokens
                .to_dtype(DType::F32)
                .broadcast_add(&positions)
                .to_dtype(self.dtype);
            drop((patches, positions, frames));
            // AdaLayerNormSingle::forward
            let half = TIMESTEP_CHANNELS / 2;
            let freqs = V::zeros(&self.meter, &[1, half], DType::F32);
            let angles = timestep
                .to_dtype(DType::F32)
                .unsqueeze(1)
                .broadcast_mul(&freqs);
            let features = V::cat(
                &[
                    &angles.unary(Unary::NoBackward),
                    &angles.unary(Unary::NoBackward),
                ],
                1,
            )
            .to_dtype(self.dtype);
            drop((freqs, angles));
            let embedded = t_linear_2.forward(&t_linear_1.forward(&features).unary(Unary::Silu));
            let modulation = t_linear.forward(&embedded.unary(Unary::Silu));
            drop(features);
            let projected = cap_2.forward(&self.gelu_tanh(&cap_1.forward(&captions)));
            let context = vec![
                repeat_rows(&projected, f),
                repeat_rows(&embedded, f),
                modulation.clone(),
            ];
            drop((modulation, embedded, projected));
            let leaves: Vec<bool> = context.iter().map(V::tracked).collect();
            let stage_context: Vec<V> = context
                .iter()
                .map(|t| if t.tracked() { t.leaf() } else { t.clone() })
                .collect();
            let mut kept = context;
            kept.extend([hidden, captions]);
            Head {
                tokens,
                context: stage_context,
                leaves,
                kept,
            }
        }
    }

    /// `Attention::split_heads`: `(b, s, h·d) → (b, h, s, d)`.
    fn split_heads(a: &Attention, x: &V) -> V {
        let (b, s) = (x.dims()[0], x.dims()[1]);
        x.reshape(&[b, s, a.heads, a.head_dim])
            .transpose(1, 2)
            .contiguous()
    }

    /// `model::repeat_rows`.
    fn repeat_rows(x: &V, times: usize) -> V {
        let mut dims = x.dims().to_vec();
        let mut expanded = vec![dims[0], times];
        expanded.extend_from_slice(&dims[1..]);
        dims[0] *= times;
        x.unsqueeze(1)
            .broadcast_as(&expanded)
            .contiguous()
            .reshape(&dims)
    }

    /// `model::swap_sequence_axes`.
    fn swap_sequence_axes(x: &V, batch: usize) -> V {
        let (rows, len, d) = (x.dims()[0], x.dims()[1], x.dims()[2]);
        let per_batch = rows / batch;
        x.reshape(&[batch, per_batch, len, d])
            .transpose(1, 2)
            .contiguous()
            .reshape(&[batch * len, per_batch, d])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::latte_1;

    fn latte_1_geometry(batch: usize) -> InputGeometry {
        InputGeometry {
            batch,
            frames: 16,
            height: 64,
            width: 64,
            caption_tokens: 120,
        }
    }

    #[test]
    fn geometry_errors_name_the_fix() {
        let config = latte_1().config;
        let mut g = latte_1_geometry(1);
        g.frames = 0;
        assert_eq!(
            check_geometry(&config, &g),
            Err(CostsError::ZeroSize { what: "frames" })
        );
        g.frames = 8;
        let e = check_geometry(&config, &g).unwrap_err().to_string();
        assert!(e.contains("video_length = 16"), "{e}");
        g.frames = 1;
        g.height = 63;
        let e = check_geometry(&config, &g).unwrap_err().to_string();
        assert!(e.contains("patch_size 2"), "{e}");
    }

    #[test]
    fn latte_1_costs_have_the_chain_shape_and_scale_with_the_batch() {
        let preset = latte_1();
        let t = Throughput::default_for(Memory::Device, DType::BF16);
        let costs = |batch| {
            analytic_chain_costs(
                &preset.config,
                &latte_1_geometry(batch),
                DType::BF16,
                Mode::Guide,
                Kernels::Generic,
                &t,
                true,
                Memory::Device,
                None,
            )
            .unwrap()
        };
        let (one, two) = (costs(1), costs(2));
        assert_eq!(one.chain.num_stages(), 4 * 28 + 1);
        // Stage inputs: b·f·n·d activations in bf16.
        assert_eq!(one.chain.stages[0].input_bytes, 16 * 32 * 32 * 1152 * 2);
        // Output: (b, 8, f, 64, 64) in bf16.
        assert_eq!(one.chain.output_bytes, 8 * 16 * 64 * 64 * 2);
        for (a, b) in one.chain.stages.iter().zip(&two.chain.stages) {
            assert_eq!(2 * a.input_bytes, b.input_bytes);
            assert!(b.graph_bytes > a.graph_bytes * 19 / 10);
            assert_eq!(a.param_grad_bytes, 0, "frozen weights get no gradient");
        }
        assert!(one.chain.baseline_time_s() > 0.0);
    }

    #[test]
    fn calibration_recovers_known_rates() {
        let truth = Throughput {
            matmul_flop_per_s: 3e10,
            memory_bytes_per_s: 5e9,
        };
        let work: Vec<StageWork> = (1..6)
            .map(|i| StageWork {
                forward: Work {
                    matmul_flops: 1e9 * i as f64,
                    moved_bytes: 1e8 * (7 - i) as f64,
                },
                backward: Work {
                    matmul_flops: 2e9 * i as f64,
                    moved_bytes: 3e8,
                },
                graph_only: None,
            })
            .collect();
        let stages = work
            .iter()
            .map(|w| remat::costs::StageCosts {
                fwd_s: truth.time_s(&w.forward),
                bwd_s: truth.time_s(&w.backward),
                fwd_graph_only_s: None,
                input_bytes: 1,
                graph_bytes: 1,
                fwd_tmp_bytes: 0,
                bwd_tmp_bytes: 0,
                param_grad_bytes: 0,
            })
            .collect();
        let measured = ChainCosts::new(stages, 1, 0);
        let fitted = Throughput::calibrate(&work, &measured).unwrap();
        assert!((fitted.matmul_flop_per_s / truth.matmul_flop_per_s - 1.0).abs() < 1e-6);
        assert!((fitted.memory_bytes_per_s / truth.memory_bytes_per_s - 1.0).abs() < 1e-6);
        assert!(Throughput::calibrate(&work[..2], &measured).is_none());
    }

    #[test]
    fn modes_parse_and_print() {
        assert_eq!("train".parse::<Mode>().unwrap(), Mode::Train);
        assert_eq!(Mode::Guide.to_string(), "guide");
        assert!("sample".parse::<Mode>().is_err());
        assert_eq!(Mode::Train.wants_input_grad(), [true, false, true]);
        assert_eq!(Mode::Guide.wants_input_grad(), [true, false, false]);
        assert_eq!(Kernels::for_device_name("cpu"), Kernels::Fused);
        assert_eq!(Kernels::for_device_name("cuda:1"), Kernels::Generic);
    }
}
