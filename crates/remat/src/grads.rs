//! The executor: runs a [`ChainModel`] forward and backward under a [`Schedule`].
//!
//! Every stage is differentiated on its own: its input becomes a leaf variable, its output
//! receives the upstream gradient `g` through [`inject`] (the backward of `⟨out, g⟩`), and
//! candle's backward yields the gradients of the stage input, of the stage's parameters
//! and of the context leaves. The same per-stage arithmetic runs whatever the schedule,
//! so gradients are bitwise identical across policies; only *when* a stage's graph is
//! built (kept from the forward pass, or recomputed from a kept input) changes.
//!
//! This is the only module that calls `backward`.

use crate::chain::{ChainModel, StageContext};
use crate::meter::{PhaseSink, PhaseSinkExt};
use crate::schedule::{Op, Schedule};
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, Var};
use std::collections::BTreeMap;

/// Gradients produced by [`Tape::backward`].
#[derive(Debug)]
pub struct Gradients {
    /// Gradient of each model input that was requested (`None` otherwise).
    pub inputs: Vec<Option<Tensor>>,
    /// Gradients of the model's parameters that are candle [`Var`]s, looked up by the
    /// parameter (`params.get(var.as_tensor())`).
    pub params: GradStore,
}

/// Where [`Tape::backward_into`] hands parameter gradients as the backward pass produces
/// them: once after each stage's backward op (that stage's parameters), once at the end
/// (the head's). A parameter that several stages read arrives once per stage, each time
/// with that stage's part. Data-parallel training reduces each part over its ranks right
/// there and keeps only its shard (ZeRO stage 2); a [`GradStore`] adds them up.
pub trait GradSink {
    /// Takes the parameter gradients of one backward op. `store` holds nothing else (no
    /// input, activation or context gradient).
    ///
    /// # Errors
    /// Whatever the sink's own work (communication, conversion) fails with; the backward
    /// pass stops with it.
    fn take(&mut self, store: GradStore) -> Result<()>;
}

impl GradSink for GradStore {
    fn take(&mut self, store: GradStore) -> Result<()> {
        merge_params(self, store, &[])
    }
}

/// A stage whose autograd graph is alive: its leaf input and its output.
pub(crate) struct StageGraph {
    pub(crate) input: Var,
    pub(crate) output: Tensor,
}

/// The head's results: the (possibly leaf) inputs, the first activation with the head's
/// graph behind it, the context as computed and as the stages read it.
pub(crate) struct Head<C> {
    pub(crate) inputs: Vec<Tensor>,
    pub(crate) tokens: Tensor,
    pub(crate) outputs: Vec<Tensor>,
    pub(crate) context: C,
    pub(crate) context_leaves: Vec<Option<Var>>,
}

/// Runs the head; context tensors that carry a graph get leaf copies for the stages, so
/// their gradients can be accumulated across stages and handed to the head at the end.
pub(crate) fn run_head<M: ChainModel>(
    model: &M,
    inputs: &[Tensor],
    wants_input_grad: &[bool],
) -> Result<Head<M::Context>> {
    let inputs = inputs
        .iter()
        .zip(wants_input_grad)
        .map(|(x, &wanted)| leaf_if(x, wanted))
        .collect::<Result<Vec<_>>>()?;
    let (tokens, context) = model.head(&inputs)?;
    let outputs = context.tensors();
    let context_leaves = outputs
        .iter()
        .map(|t| {
            if t.track_op() {
                leaf_var(t).map(Some)
            } else {
                Ok(None)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let leaf_tensors = outputs
        .iter()
        .zip(&context_leaves)
        .map(|(t, leaf)| {
            leaf.as_ref()
                .map_or_else(|| t.clone(), |v| v.as_tensor().clone())
        })
        .collect();
    let context = context.with_tensors(leaf_tensors)?;
    // The head's graph waits for the end of the backward pass.
    let roots: Vec<&Tensor> = std::iter::once(&tokens)
        .chain(outputs.iter())
        .filter(|t| t.track_op())
        .collect();
    release_unneeded(&roots)?;
    Ok(Head {
        inputs,
        tokens,
        outputs,
        context,
        context_leaves,
    })
}

/// What the forward pass left for the backward pass.
pub struct Tape<'a, M: ChainModel> {
    model: &'a M,
    schedule: Schedule,
    /// Index of the first backward-phase op of `schedule`.
    next_op: usize,
    inputs: Vec<Tensor>,
    wants_input_grad: Vec<bool>,
    head_tokens: Tensor,
    head_context: Vec<Tensor>,
    /// The context the stages read: leaves for the tensors that need gradients.
    context: M::Context,
    context_leaves: Vec<Option<Var>>,
    acts: BTreeMap<usize, Tensor>,
    graphs: BTreeMap<usize, StageGraph>,
    output: Tensor,
}

/// Number of scheduled stages of `model`: its stages, then the tail as the last one.
pub fn scheduled_stages<M: ChainModel>(model: &M) -> usize {
    model.num_stages() + 1
}

/// The scheduled stages that begin a block of `model` (see [`ChainModel::starts_block`]):
/// stage 0, the stages the model marks, and the tail.
pub fn block_starts<M: ChainModel>(model: &M) -> Vec<usize> {
    let stages = model.num_stages();
    (0..=stages)
        .filter(|&i| i == 0 || i == stages || model.starts_block(i))
        .collect()
}

/// Runs the forward pass of `model` under `schedule`: the ops before the first backward.
///
/// The schedule covers [`scheduled_stages`] stages: the model's stages and, last, its tail
/// (so that the tail's graph is planned like any other).
///
/// `wants_input_grad[j]` makes input `j` a leaf whose gradient [`Tape::backward`] returns.
/// Parameters get gradients when the model holds them as [`Var`]s.
pub fn forward<'a, M: ChainModel>(
    model: &'a M,
    inputs: &[Tensor],
    wants_input_grad: &[bool],
    schedule: &Schedule,
    phases: &mut dyn PhaseSink,
) -> Result<Tape<'a, M>> {
    let n = scheduled_stages(model);
    if let Some(op) = schedule.ops().iter().find(|op| op.stage() >= n) {
        candle_core::bail!(
            "schedule error: {op} names a stage beyond the chain's {n} (stages and tail)"
        );
    }
    if wants_input_grad.len() != inputs.len() {
        candle_core::bail!(
            "{} inputs but {} gradient flags",
            inputs.len(),
            wants_input_grad.len()
        );
    }
    phases.phase("head");
    let Head {
        inputs,
        tokens: head_tokens,
        outputs: head_context,
        context,
        context_leaves,
    } = run_head(model, inputs, wants_input_grad)?;

    let mut acts = BTreeMap::new();
    acts.insert(0, head_tokens.detach());
    let schedule = schedule.clone();
    let ops = schedule.ops();
    let first_backward = ops
        .iter()
        .position(|op| matches!(op, Op::Backward(_)))
        .unwrap_or(ops.len());
    let mut tape_state = Executor {
        model,
        context: &context,
        acts,
        graphs: BTreeMap::new(),
    };
    phases.phase("forward");
    for op in &ops[..first_backward] {
        tape_state.run_forward_op(*op, false)?;
    }
    let output = tape_state.activation(n)?;
    let Executor { acts, graphs, .. } = tape_state;
    Ok(Tape {
        model,
        schedule,
        next_op: first_backward,
        inputs,
        wants_input_grad: wants_input_grad.to_vec(),
        head_tokens,
        head_context,
        context,
        context_leaves,
        acts,
        graphs,
        output,
    })
}

/// The mutable state the schedule's ops act on.
struct Executor<'a, 'c, M: ChainModel> {
    model: &'a M,
    context: &'c M::Context,
    acts: BTreeMap<usize, Tensor>,
    graphs: BTreeMap<usize, StageGraph>,
}

impl<M: ChainModel> Executor<'_, '_, M> {
    /// Activation `a_i`: kept as a checkpoint, or the output of stage `i-1`'s live graph.
    fn activation(&self, i: usize) -> Result<Tensor> {
        if let Some(a) = self.acts.get(&i) {
            return Ok(a.clone());
        }
        match i.checked_sub(1).and_then(|p| self.graphs.get(&p)) {
            Some(graph) => Ok(graph.output.detach()),
            None => candle_core::bail!("schedule error: activation {i} is not available"),
        }
    }

    /// Stage `i` of the schedule: a model stage (for its graph only if `graph_only`), or
    /// the tail after the last one.
    fn run_stage(&self, i: usize, x: &Tensor, graph_only: bool) -> Result<Tensor> {
        if i >= self.model.num_stages() {
            self.model.tail(x, self.context)
        } else if graph_only {
            self.model.stage_graph_only(i, x, self.context)
        } else {
            self.model.stage_forward(i, x, self.context)
        }
    }

    /// Runs a forward op; `graph_only` as [`Schedule::is_graph_only`] says of it.
    fn run_forward_op(&mut self, op: Op, graph_only: bool) -> Result<()> {
        match op {
            Op::CheckpointForward(i) | Op::Forward(i) => {
                let x = self.activation(i)?;
                let y = self.run_stage(i, &x, false)?.detach();
                if matches!(op, Op::Forward(_)) {
                    self.acts.remove(&i);
                }
                self.acts.insert(i + 1, y);
            }
            Op::ForwardKeep(i) => {
                let input = leaf_var(&self.activation(i)?)?;
                let output = self.run_stage(i, input.as_tensor(), graph_only)?;
                release_unneeded(&[&output])?;
                self.graphs.insert(i, StageGraph { input, output });
            }
            Op::Backward(i) => {
                candle_core::bail!("schedule error: backward {i} in the forward phase")
            }
        }
        Ok(())
    }
}

impl<M: ChainModel> Tape<'_, M> {
    /// The model output.
    pub fn output(&self) -> &Tensor {
        &self.output
    }

    /// Back-propagates `grad_output` (the gradient of the objective w.r.t. the output),
    /// running the schedule's remaining ops.
    pub fn backward(self, grad_output: &Tensor, phases: &mut dyn PhaseSink) -> Result<Gradients> {
        let mut params = GradStore::default();
        let inputs = self.backward_into(grad_output, phases, &mut params)?;
        Ok(Gradients { inputs, params })
    }

    /// [`Tape::backward`], handing the parameter gradients to `sink` as each backward op
    /// finalises them instead of keeping them all to the end. Returns the gradients of the
    /// requested inputs.
    pub fn backward_into(
        self,
        grad_output: &Tensor,
        phases: &mut dyn PhaseSink,
        sink: &mut dyn GradSink,
    ) -> Result<Vec<Option<Tensor>>> {
        let Tape {
            model,
            schedule,
            next_op,
            inputs,
            wants_input_grad,
            head_tokens,
            head_context,
            context,
            context_leaves,
            acts,
            graphs,
            output,
        } = self;
        drop(output);
        let n = scheduled_stages(model);
        let mut context_grads: Vec<Option<Tensor>> = vec![None; context_leaves.len()];

        let mut grad = grad_output.clone();
        let mut state = Executor {
            model,
            context: &context,
            acts,
            graphs,
        };
        state.acts.remove(&n);
        let mut expected = n;
        for (op_index, op) in schedule.ops().iter().enumerate().skip(next_op) {
            match *op {
                Op::Backward(i) => {
                    if i + 1 != expected {
                        candle_core::bail!(
                            "schedule error: backward {i} while the gradient is at {expected}"
                        );
                    }
                    phases.phase_with(|| format!("backward {}", stage_name(model, i)));
                    let graph = state.graphs.remove(&i).ok_or_else(|| {
                        candle_core::Error::Msg(format!(
                            "schedule error: backward {i} without its graph"
                        ))
                    })?;
                    state.acts.remove(&i);
                    let stage_params;
                    (grad, stage_params) =
                        differentiate(graph, &grad, &context_leaves, &mut context_grads)?;
                    sink.take(stage_params)?;
                    expected = i;
                }
                forward_op => {
                    phases.phase_with(|| {
                        format!("recompute {}", stage_name(model, forward_op.stage()))
                    });
                    state.run_forward_op(forward_op, schedule.is_graph_only(op_index, n))?;
                }
            }
        }
        if expected != 0 {
            candle_core::bail!("schedule error: backward stopped at stage {expected}");
        }
        drop(state);

        phases.phase("backward head");
        let mut pieces = Vec::new();
        if head_tokens.track_op() {
            pieces.push((head_tokens, grad));
        }
        for (t, g) in head_context.into_iter().zip(context_grads) {
            if let Some(g) = g {
                pieces.push((t, g));
            }
        }
        let mut input_grads = vec![None; inputs.len()];
        if !pieces.is_empty() {
            let store = inject_all(&pieces)?.backward()?;
            drop(pieces);
            for (j, x) in inputs.iter().enumerate() {
                if wants_input_grad[j] {
                    input_grads[j] = store.get(x).cloned();
                }
            }
            let mut head_params = GradStore::default();
            merge_params(&mut head_params, store, &inputs)?;
            sink.take(head_params)?;
        }
        Ok(input_grads)
    }
}

/// The report name of scheduled stage `i` (the tail after the model's stages).
pub fn stage_name<M: ChainModel>(model: &M, i: usize) -> String {
    if i < model.num_stages() {
        model.stage_name(i)
    } else {
        "tail".to_string()
    }
}

/// Back-propagates `grad` through one live graph: returns the gradient of its input and
/// those of the parameters it read, and accumulates context gradients (in stage order, so
/// the sums are reproducible).
pub(crate) fn differentiate(
    graph: StageGraph,
    grad: &Tensor,
    context_leaves: &[Option<Var>],
    context_grads: &mut [Option<Tensor>],
) -> Result<(Tensor, GradStore)> {
    let StageGraph { input, output } = graph;
    let mut store = inject(&output, grad)?.backward()?;
    drop(output);
    let input_grad = store.remove(input.as_tensor()).ok_or_else(|| {
        candle_core::Error::Msg("a stage's output does not depend on its input".into())
    })?;
    for (leaf, sum) in context_leaves.iter().zip(context_grads.iter_mut()) {
        let Some(leaf) = leaf else { continue };
        if let Some(g) = store.remove(leaf.as_tensor()) {
            *sum = Some(match sum.take() {
                Some(s) => (s + g)?,
                None => g,
            });
        }
    }
    Ok((input_grad, store))
}

/// Moves every gradient of `store` into `params` (adding where present), except those of
/// `exclude`.
fn merge_params(params: &mut GradStore, store: GradStore, exclude: &[Tensor]) -> Result<()> {
    let excluded: Vec<_> = exclude.iter().map(|t| t.id()).collect();
    for id in store.get_ids() {
        if excluded.contains(id) {
            continue;
        }
        let Some(g) = store.get_id(*id) else { continue };
        let merged = match params.get_id(*id) {
            Some(existing) => (existing + g)?,
            None => g.clone(),
        };
        params.insert_id(*id, merged);
    }
    Ok(())
}

/// Frees what the graph behind `roots` keeps alive but its backward pass will not read
/// (candle keeps every intermediate of a graph; see the vendored candle-core's patch 3).
/// Called on every graph kept for a later backward pass, right after it is built. The
/// roots stay readable (stage outputs are passed on as detached views of them), and so do
/// leaves, constants and anything held from outside the graph.
pub(crate) fn release_unneeded(roots: &[&Tensor]) -> Result<()> {
    candle_core::backprop::release_unneeded_for_backward(roots)?;
    Ok(())
}

/// A leaf variable holding `x`'s values (no graph behind it), sharing `x`'s storage:
/// a stored stage costs no copy of its input.
pub(crate) fn leaf_var(x: &Tensor) -> Result<Var> {
    Var::from_tensor(&x.detach_as_variable())
}

/// `x` as a leaf variable when `wanted`, else `x` unchanged.
fn leaf_if(x: &Tensor, wanted: bool) -> Result<Tensor> {
    if wanted {
        Ok(leaf_var(x)?.into_inner())
    } else {
        Ok(x.clone())
    }
}

/// A scalar whose backward hands `grad` to `x`: the backward of `⟨x, grad⟩` without
/// materialising the product.
pub fn inject(x: &Tensor, grad: &Tensor) -> Result<Tensor> {
    if x.shape() != grad.shape() {
        candle_core::bail!(
            "gradient of shape {:?} for an output of shape {:?}",
            grad.dims(),
            x.dims()
        );
    }
    x.apply_op1(InjectGrad {
        grad: grad.to_dtype(x.dtype())?,
    })
}

/// The sum of [`inject`] over several `(tensor, gradient)` pairs.
fn inject_all(pieces: &[(Tensor, Tensor)]) -> Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for (x, g) in pieces {
        let scalar = inject(x, g)?;
        total = Some(match total {
            Some(t) => (t + scalar)?,
            None => scalar,
        });
    }
    total.ok_or_else(|| candle_core::Error::Msg("nothing to differentiate".into()))
}

/// The custom op behind [`inject`]: forward yields a scalar zero, backward yields `grad`.
struct InjectGrad {
    grad: Tensor,
}

impl CustomOp1 for InjectGrad {
    fn name(&self) -> &'static str {
        "inject-grad"
    }

    fn bwd_reads(&self) -> candle_core::backprop::BackwardReads {
        candle_core::backprop::BackwardReads::NOTHING
    }

    fn cpu_fwd(&self, _storage: &CpuStorage, _layout: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        _layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let device = storage.device().clone();
        let zero = device.alloc_zeros::<f32>(1)?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(zero, device),
            Shape::from(()),
        ))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, _grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.grad.clone()))
    }
}
