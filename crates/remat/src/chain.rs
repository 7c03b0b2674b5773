//! What `remat` runs: a model seen as `head → stage₀ → … → stageₙ₋₁ → tail`, where the
//! head also produces a **context** (tensors every stage reads, such as timestep
//! modulation or text embeddings). The executor decides per stage what to keep; the
//! model only says how to compute.

use candle_core::{Result, Tensor};

/// The tensors shared by all stages, which the executor may swap for tracked leaves so
/// that their gradients accumulate across stages.
pub trait StageContext: Sized {
    /// The context's tensors, in a fixed order.
    fn tensors(&self) -> Vec<Tensor>;

    /// The same context with its tensors replaced (same order and shapes).
    fn with_tensors(&self, tensors: Vec<Tensor>) -> Result<Self>;
}

/// A model as a chain of stages. Implementations must be deterministic: running a stage
/// twice on the same input gives the same bits (recomputation relies on it).
pub trait ChainModel {
    /// What the head computes once for all stages.
    type Context: StageContext;

    /// Model inputs → the first stage's input and the shared context.
    fn head(&self, inputs: &[Tensor]) -> Result<(Tensor, Self::Context)>;

    /// Number of stages between head and tail.
    fn num_stages(&self) -> usize;

    /// Runs stage `index` on its input.
    fn stage_forward(&self, index: usize, x: &Tensor, ctx: &Self::Context) -> Result<Tensor>;

    /// Runs stage `index` for its graph only: the executor back-propagates through the
    /// result at once and never reads its values (a stage recomputed right before its own
    /// backward, whose output the rest of the chain already has). A model may skip work
    /// that only the values need — for example a last product whose backward does not read
    /// its result — as long as the gradients equal those of [`ChainModel::stage_forward`].
    /// By default it is `stage_forward`.
    fn stage_graph_only(&self, index: usize, x: &Tensor, ctx: &Self::Context) -> Result<Tensor> {
        self.stage_forward(index, x, ctx)
    }

    /// The last stage's output → the model output.
    fn tail(&self, x: &Tensor, ctx: &Self::Context) -> Result<Tensor>;

    /// Whether stage `index` begins one of the model's blocks: the units that the fixed
    /// policies (`every:K`, `sqrt`) count and checkpoint. A model splits a block into
    /// several stages so that the planner may keep one part's graph and recompute another.
    /// Stage 0 always begins a block, and so does the tail. By default every stage does.
    fn starts_block(&self, index: usize) -> bool {
        let _ = index;
        true
    }

    /// A short name for reports (`spatial.3`).
    fn stage_name(&self, index: usize) -> String {
        format!("stage.{index}")
    }
}
