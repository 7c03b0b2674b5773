//! One account of memory for every command: what a step holds outside the checkpointed
//! chain ([`MemoryAccount`]), the chain's costs ([`CostModel`]: analytic, or measured on
//! the device), and the choice of precision, batch and checkpoint schedule for a budget
//! ([`search`]). `latte plan` prints a [`Plan`]; `latte train`, `latte sample` and
//! `latte profile` run the row [`plan_run`] returns for the same flags — the same policy
//! text and the same schedule.

mod account;
pub mod measured;
pub mod phases;
mod search;
mod workload;

pub use account::{per_rank_chain_costs, MemoryAccount};
pub use search::{
    budget_policy, choose, plan_run, search, BatchChoice, Candidate, Plan, RunMemory, Search,
};
pub use workload::{Setting, Task, Workload};

use crate::costs::{analytic_chain_costs, CostsError, Throughput};
use remat::costs::ChainCosts;
use remat::meter::format_bytes;

/// Where the chain's per-stage costs come from.
pub trait CostModel {
    /// The chain's costs for `workload` at `setting`.
    ///
    /// # Errors
    /// When the workload cannot be costed (an unsupported geometry or precision) or a
    /// measurement fails.
    fn costs(&self, workload: &Workload, setting: Setting) -> Result<ChainCosts, PlanningError>;

    /// `analytic` or `measured`.
    fn name(&self) -> &'static str;
}

/// The analytic cost model of [`crate::costs`], timed with the default throughput of the
/// workload's kernels.
#[derive(Debug, Clone, Copy, Default)]
pub struct AnalyticCosts;

impl CostModel for AnalyticCosts {
    fn costs(&self, workload: &Workload, setting: Setting) -> Result<ChainCosts, PlanningError> {
        let dtype = setting.precision.dtype();
        let throughput = Throughput::default_for(workload.memory, dtype);
        Ok(analytic_chain_costs(
            &workload.config,
            &workload.at_batch(setting.batch),
            dtype,
            workload.task.mode(),
            workload.kernels,
            &throughput,
            workload.temporal,
            workload.memory,
            workload.adapted_layers()?.as_deref(),
        )?
        .chain)
    }

    fn name(&self) -> &'static str {
        "analytic"
    }
}

/// Why no plan could be made; messages say what to change.
#[derive(Debug, thiserror::Error)]
pub enum PlanningError {
    /// The workload cannot be costed.
    #[error(transparent)]
    Costs(#[from] CostsError),
    /// A tensor operation failed (measuring, or listing the parameters).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A schedule could not be simulated.
    #[error(transparent)]
    Schedule(#[from] remat::schedule::ScheduleError),
    /// The planner failed.
    #[error(transparent)]
    Planner(#[from] remat::planner::PlanError),
    /// The LoRA configuration does not fit the model.
    #[error("LoRA: {0}")]
    Adapter(String),
    /// The measurement cache could not be used.
    #[error("{0}")]
    Cache(String),
    /// The budget is below what the weights and optimiser state alone need.
    #[error(
        "budget {} is below the weights and optimizer state held across steps, {} ({}): the \
         smallest feasible budget is {}",
        format_bytes(*budget_bytes),
        format_bytes(*resident_bytes),
        describe_parts(parts),
        format_bytes(*smallest_feasible_bytes)
    )]
    BelowResident {
        budget_bytes: u64,
        resident_bytes: u64,
        parts: Vec<(&'static str, u64)>,
        smallest_feasible_bytes: u64,
    },
    /// No schedule fits the budget.
    #[error(
        "no checkpoint schedule fits the budget {}: besides the chain the step holds {}; \
         use a budget of at least {} ({} bytes)",
        format_bytes(*budget_bytes),
        describe_parts(parts),
        format_bytes(*smallest_feasible_bytes),
        smallest_feasible_bytes
    )]
    NoFit {
        budget_bytes: u64,
        smallest_feasible_bytes: u64,
        parts: Vec<(&'static str, u64)>,
    },
    /// A broken invariant of the planner.
    #[error("internal planning error: {0}")]
    Internal(&'static str),
}

/// `weights 2.0 MiB + EMA 2.0 MiB + …`.
pub fn describe_parts(parts: &[(&'static str, u64)]) -> String {
    parts
        .iter()
        .map(|(name, bytes)| format!("{name} {}", format_bytes(*bytes)))
        .collect::<Vec<_>>()
        .join(" + ")
}
