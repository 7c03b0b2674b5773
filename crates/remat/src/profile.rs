//! Measuring a chain's costs — per-stage forward (with values and for the graph only)
//! and backward time, input size, stored graph size and transient peaks — by running each
//! stage forward with its graph and backward, under a [`MemoryMeter`]. The numbers feed the [`planner`](crate::planner).

use crate::chain::ChainModel;
use crate::costs::{ChainCosts, StageCosts};
use crate::grads::{self, GradSink, StageGraph};
use crate::meter::MemoryMeter;
use crate::planner::{self, Plan, PlanError};
use crate::policy::Policy;
use crate::schedule::Schedule;
use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor};
use std::time::Instant;

/// Bytes held by a tensor's own elements.
pub fn tensor_bytes(t: &Tensor) -> u64 {
    (t.elem_count() * t.dtype().size_in_bytes()) as u64
}

/// Live bytes of every gradient in `store`.
fn store_bytes(store: &GradStore) -> u64 {
    store
        .get_ids()
        .filter_map(|id| store.get_id(*id))
        .map(tensor_bytes)
        .sum()
}

/// Measures the costs of `model` on `inputs` (gradient flags as for
/// [`grads::forward`]). `meter` must observe the allocations the model makes (the
/// counting allocator on CPU). Runs every stage forward and backward twice (a warm-up,
/// then the measurement), and every model stage once more for its graph only.
pub fn profile<M: ChainModel>(
    model: &M,
    inputs: &[Tensor],
    wants_input_grad: &[bool],
    meter: &dyn MemoryMeter,
) -> Result<ChainCosts> {
    let start_bytes = meter.live_bytes();
    let head = grads::run_head(model, inputs, wants_input_grad)?;
    let head_bytes = meter.live_bytes().saturating_sub(start_bytes);

    let mut x = head.tokens.detach();
    let n = grads::scheduled_stages(model);
    let mut stages = Vec::with_capacity(n);
    let mut params = GradStore::default();
    let mut context_grads = vec![None; head.context_leaves.len()];
    for i in 0..n {
        // A first run warms the kernels' one-off buffers (thread pools, packing space)
        // so that they are not mistaken for the stage's graph.
        let mut scratch = GradStore::default();
        let mut scratch_context = vec![None; head.context_leaves.len()];
        measure_stage(
            model,
            &head,
            i,
            &x,
            &mut scratch,
            &mut scratch_context,
            meter,
        )?;
        drop((scratch, scratch_context));
        let (mut costs, next) =
            measure_stage(model, &head, i, &x, &mut params, &mut context_grads, meter)?;
        if i < model.num_stages() {
            costs.fwd_graph_only_s = Some(time_graph_only(model, &head, i, &x)?);
        }
        stages.push(costs);
        x = next;
    }
    let output_bytes = tensor_bytes(&x);
    let context_grad_bytes: u64 = context_grads.iter().flatten().map(tensor_bytes).sum();
    // The head's tokens are `a_0`, which the schedule's simulation counts itself.
    let head_graph_bytes = head_bytes.saturating_sub(tensor_bytes(&head.tokens));
    let reserved_bytes = head_graph_bytes + context_grad_bytes;
    Ok(ChainCosts::new(stages, output_bytes, reserved_bytes)
        .with_block_starts(grads::block_starts(model)))
}

/// Runs scheduled stage `i` forward with its graph and backward once, measuring its
/// costs; returns them and the stage output.
fn measure_stage<M: ChainModel>(
    model: &M,
    head: &grads::Head<M::Context>,
    i: usize,
    x: &Tensor,
    params: &mut GradStore,
    context_grads: &mut [Option<Tensor>],
    meter: &dyn MemoryMeter,
) -> Result<(StageCosts, Tensor)> {
    let input_bytes = tensor_bytes(x);

    let before = meter.live_bytes();
    meter.reset_peak();
    let started = Instant::now();
    let input = grads::leaf_var(x)?;
    let output = if i < model.num_stages() {
        model.stage_forward(i, input.as_tensor(), &head.context)?
    } else {
        model.tail(input.as_tensor(), &head.context)?
    };
    grads::release_unneeded(&[&output])?;
    let fwd_s = started.elapsed().as_secs_f64();
    let after = meter.live_bytes();
    let graph_bytes = after.saturating_sub(before);
    let fwd_tmp_bytes = meter.peak_bytes().saturating_sub(after);

    let next = output.detach();
    let grad_output = next.ones_like()?;
    let params_before = store_bytes(params);
    let before = meter.live_bytes();
    meter.reset_peak();
    let started = Instant::now();
    let (grad_input, stage_params) = grads::differentiate(
        StageGraph { input, output },
        &grad_output,
        &head.context_leaves,
        context_grads,
    )?;
    params.take(stage_params)?;
    let bwd_s = started.elapsed().as_secs_f64();
    let new_param_bytes = store_bytes(params).saturating_sub(params_before);
    let bwd_tmp_bytes = meter
        .peak_bytes()
        .saturating_sub(before + input_bytes + new_param_bytes);
    drop(grad_input);
    let costs = StageCosts {
        fwd_s,
        bwd_s,
        fwd_graph_only_s: None,
        input_bytes,
        graph_bytes,
        fwd_tmp_bytes,
        bwd_tmp_bytes,
        param_grad_bytes: new_param_bytes,
    };
    Ok((costs, next))
}

/// Seconds of model stage `i` run for its graph only (`ChainModel::stage_graph_only`).
fn time_graph_only<M: ChainModel>(
    model: &M,
    head: &grads::Head<M::Context>,
    i: usize,
    x: &Tensor,
) -> Result<f64> {
    let started = Instant::now();
    let input = grads::leaf_var(x)?;
    let output = model.stage_graph_only(i, input.as_tensor(), &head.context)?;
    grads::release_unneeded(&[&output])?;
    Ok(started.elapsed().as_secs_f64())
}

/// Share of a budget kept free for what the cost model does not see: the executor's and
/// autograd's bookkeeping (node lists, gradient maps, phase names) and allocator rounding.
pub const BUDGET_MARGIN: f64 = 0.01;

/// Bytes kept free on top of [`BUDGET_MARGIN`]: the bookkeeping is a few KiB per stage
/// whatever the budget, which a share alone does not cover for small models.
pub const BUDGET_MARGIN_BYTES: u64 = 256 * 1024;

/// The bytes of `budget_bytes` the planner may fill.
fn usable_bytes(budget_bytes: u64) -> u64 {
    ((budget_bytes as f64 * (1.0 - BUDGET_MARGIN)) as u64).saturating_sub(BUDGET_MARGIN_BYTES)
}

/// The smallest budget [`plan_within`] accepts for `costs`.
pub fn min_budget(costs: &ChainCosts) -> u64 {
    let needed = planner::min_feasible_budget(costs) + BUDGET_MARGIN_BYTES;
    (needed as f64 / (1.0 - BUDGET_MARGIN)).ceil() as u64
}

/// The fastest schedule whose predicted peak stays [`BUDGET_MARGIN`] and
/// [`BUDGET_MARGIN_BYTES`] below `budget_bytes`.
pub fn plan_within(costs: &ChainCosts, budget_bytes: u64) -> std::result::Result<Plan, PlanError> {
    planner::plan(costs, usable_bytes(budget_bytes)).map_err(|e| match e {
        PlanError::Infeasible { .. } => PlanError::Infeasible {
            budget_bytes,
            min_bytes: min_budget(costs),
        },
        other => other,
    })
}

/// A schedule chosen for a policy, with the prediction when costs were measured.
#[derive(Debug, Clone)]
pub struct ResolvedPlan {
    /// The ops to run.
    pub schedule: Schedule,
    /// The planner's predicted peak (reserved bytes included), when costs were measured.
    pub predicted_peak_bytes: Option<u64>,
    /// The measured costs, when the policy needed them.
    pub costs: Option<ChainCosts>,
}

/// Turns a policy into a schedule for `model`: fixed policies directly, `budget:` by
/// profiling the model on `inputs` and planning.
pub fn resolve_policy<M: ChainModel>(
    policy: &Policy,
    model: &M,
    inputs: &[Tensor],
    wants_input_grad: &[bool],
    meter: &dyn MemoryMeter,
) -> std::result::Result<ResolvedPlan, ResolveError> {
    let n = grads::scheduled_stages(model);
    if let Some(schedule) = policy.fixed_schedule(n, &grads::block_starts(model)) {
        return Ok(ResolvedPlan {
            schedule,
            predicted_peak_bytes: None,
            costs: None,
        });
    }
    let costs = profile(model, inputs, wants_input_grad, meter)?;
    let Plan {
        schedule,
        predicted,
    } = match *policy {
        Policy::Budget(budget_bytes) => plan_within(&costs, budget_bytes)?,
        _ => planner::schedule_for(policy, &costs)?,
    };
    Ok(ResolvedPlan {
        schedule,
        predicted_peak_bytes: Some(predicted.peak_bytes),
        costs: Some(costs),
    })
}

/// Why a policy could not be turned into a schedule.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// Profiling the model failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// No schedule fits.
    #[error(transparent)]
    Plan(#[from] PlanError),
}
