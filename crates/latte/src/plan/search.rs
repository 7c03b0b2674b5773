//! Candidate configurations and the choice among them: for each precision and batch, the
//! fixed checkpoint policies and the planner's schedule for what the budget leaves the
//! chain, each with the whole step's predicted peak from the [`MemoryAccount`].

use super::account::{per_rank_chain_costs, MemoryAccount};
use super::workload::{Setting, Workload};
use super::{CostModel, PlanningError};
use crate::train::Precision;
use remat::costs::ChainCosts;
use remat::meter::format_bytes;
use remat::policy::{ByteSize, Policy};
use remat::profile::{min_budget, plan_within};
use remat::schedule::Schedule;
use serde::Serialize;

/// Largest batch `--batch auto` tries.
const MAX_AUTO_BATCH: usize = 4096;

/// One configuration and its prediction.
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    /// `none`, `every:K`, `sqrt`, or `budget:SIZE`: the planner's schedule for SIZE of
    /// chain memory, which `--checkpoint budget:SIZE` reproduces.
    pub policy: String,
    /// The schedule's ops.
    #[serde(skip)]
    pub schedule: Schedule,
    /// Compute precision.
    pub precision: Precision,
    /// Videos per (micro-)batch.
    pub batch: usize,
    /// Videos the model sees (twice `batch` with CFG).
    pub effective_batch: usize,
    /// Memory outside the chain.
    pub account: MemoryAccount,
    /// Predicted peak of the chain: activations, stage gradients, transients.
    pub chain_peak_bytes: u64,
    /// Predicted peak of the whole step.
    pub total_peak_bytes: u64,
    /// Predicted seconds of the chain's forward and backward.
    pub step_s: f64,
    /// Recomputation over the no-recomputation time, in percent.
    pub overhead_pct: f64,
    /// Whether `total_peak_bytes` fits the budget (always true without one).
    pub fits: bool,
    /// `analytic` or `measured`.
    pub costs: &'static str,
}

impl Candidate {
    /// `policy P (schedule of N ops); predicted peak T = parts + chain C`, as the commands
    /// that run a plan print it.
    pub fn summary(&self) -> String {
        format!(
            "policy {} (schedule of {} ops); predicted peak {} = {} + chain {}",
            self.policy,
            self.schedule.len(),
            format_bytes(self.total_peak_bytes),
            super::describe_parts(&self.account.parts()),
            format_bytes(self.chain_peak_bytes)
        )
    }
}

/// `--batch N` or `--batch auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchChoice {
    /// A fixed number of videos.
    Fixed(usize),
    /// The largest batch that fits.
    Auto,
}

/// What to search: a workload, candidate precisions, a batch and a whole-step budget.
#[derive(Debug, Clone)]
pub struct Search {
    /// The workload.
    pub workload: Workload,
    /// Candidate precisions.
    pub precisions: Vec<Precision>,
    /// The batch, or the largest that fits.
    pub batch: BatchChoice,
    /// Bytes for the whole step.
    pub budget_bytes: u64,
}

/// What a search found.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// The budget for the whole step.
    pub budget_bytes: u64,
    /// Every candidate, in the order evaluated.
    pub candidates: Vec<Candidate>,
    /// Index of the chosen candidate, if any fits.
    pub chosen: Option<usize>,
    /// The smallest budget for which a candidate fits (at batch 1 with `--batch auto`).
    pub smallest_feasible_bytes: u64,
}

impl Plan {
    /// The chosen candidate, if any fits.
    pub fn chosen(&self) -> Option<&Candidate> {
        self.chosen.and_then(|i| self.candidates.get(i))
    }
}

/// How a run manages its memory: a whole-step budget, or a checkpoint policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunMemory {
    /// Bytes for the whole step: the plan's chosen row runs.
    Budget(u64),
    /// A checkpoint policy for the chain (`budget:SIZE` budgets the chain alone).
    Policy(Policy),
}

/// The row a run executes: the chosen candidate for a budget (what `latte plan` prints
/// for the same flags), or the candidate of a checkpoint policy.
///
/// # Errors
/// [`PlanningError::NoFit`] when no schedule fits the budget; cost and schedule errors.
pub fn plan_run(
    workload: &Workload,
    setting: Setting,
    memory: RunMemory,
    model: &dyn CostModel,
) -> Result<Candidate, PlanningError> {
    let rows = Rows::new(workload, setting, model)?;
    match memory {
        RunMemory::Budget(budget_bytes) => {
            if budget_bytes < rows.account.resident_bytes() {
                return Err(PlanningError::BelowResident {
                    budget_bytes,
                    resident_bytes: rows.account.resident_bytes(),
                    parts: rows.account.resident_parts(),
                    smallest_feasible_bytes: rows.smallest_feasible_bytes(),
                });
            }
            let candidates = rows.all(budget_bytes)?;
            let chosen = choose(&candidates, false).ok_or_else(|| PlanningError::NoFit {
                budget_bytes,
                smallest_feasible_bytes: rows.smallest_feasible_bytes(),
                parts: rows.account.parts(),
            })?;
            Ok(candidates[chosen].clone())
        }
        RunMemory::Policy(Policy::Budget(chain_bytes)) => {
            let plan = plan_within(&rows.costs, chain_bytes)?;
            rows.row(Policy::Budget(chain_bytes).to_string(), plan.schedule, None)
        }
        RunMemory::Policy(policy) => {
            let blocks = rows.costs.block_starts();
            let schedule = policy
                .fixed_schedule(rows.costs.num_stages(), &blocks)
                .ok_or(PlanningError::Internal("a fixed policy without a schedule"))?;
            rows.row(policy.to_string(), schedule, None)
        }
    }
}

/// Plans a search: every candidate and the chosen one.
///
/// # Errors
/// [`PlanningError::BelowResident`] when the budget does not hold the weights and optimiser
/// state of any precision; cost and schedule errors.
pub fn search(search: &Search, model: &dyn CostModel) -> Result<Plan, PlanningError> {
    let Search {
        workload,
        precisions,
        batch,
        budget_bytes,
    } = search;
    let budget_bytes = *budget_bytes;
    let base_batch = match *batch {
        BatchChoice::Fixed(n) => n,
        BatchChoice::Auto => 1,
    };
    let mut smallest_feasible_bytes = u64::MAX;
    let mut least_resident: Option<MemoryAccount> = None;
    for &precision in precisions {
        let setting = Setting {
            precision,
            batch: base_batch,
        };
        let rows = Rows::new(workload, setting, &super::AnalyticCosts)?;
        let account = rows.account;
        smallest_feasible_bytes = smallest_feasible_bytes.min(rows.smallest_feasible_bytes());
        if least_resident.is_none_or(|m| account.resident_bytes() < m.resident_bytes()) {
            least_resident = Some(account);
        }
    }
    let mut candidates = Vec::new();
    for &precision in precisions {
        let mut batch = match *batch {
            BatchChoice::Fixed(n) => n,
            BatchChoice::Auto => match largest_batch(workload, precision, budget_bytes)? {
                Some(batch) => batch,
                None => continue,
            },
        };
        let mut rows = Rows::new(workload, Setting { precision, batch }, model)?;
        if search.batch == BatchChoice::Auto {
            // The analytic search may overshoot what measured costs allow.
            while batch > 1 && rows.smallest_feasible_bytes() > budget_bytes {
                batch -= 1;
                rows = Rows::new(workload, Setting { precision, batch }, model)?;
            }
        }
        candidates.extend(rows.all(budget_bytes)?);
    }
    let chosen = choose(&candidates, search.batch == BatchChoice::Auto);
    if chosen.is_none() {
        if let Some(account) = least_resident {
            if budget_bytes < account.resident_bytes() {
                return Err(PlanningError::BelowResident {
                    budget_bytes,
                    parts: account.resident_parts(),
                    resident_bytes: account.resident_bytes(),
                    smallest_feasible_bytes,
                });
            }
        }
    }
    Ok(Plan {
        budget_bytes,
        candidates,
        chosen,
        smallest_feasible_bytes,
    })
}

/// The costs and account of one setting.
struct Rows<'a> {
    workload: &'a Workload,
    setting: Setting,
    costs: ChainCosts,
    account: MemoryAccount,
    source: &'static str,
}

impl<'a> Rows<'a> {
    fn new(
        workload: &'a Workload,
        setting: Setting,
        model: &dyn CostModel,
    ) -> Result<Self, PlanningError> {
        Ok(Self {
            workload,
            setting,
            costs: per_rank_chain_costs(workload, setting, model.costs(workload, setting)?),
            account: MemoryAccount::of(workload, setting)?,
            source: model.name(),
        })
    }
}

impl Rows<'_> {
    /// The smallest whole-step budget some schedule fits.
    fn smallest_feasible_bytes(&self) -> u64 {
        self.account.total_peak_bytes(min_budget(&self.costs))
    }

    /// A candidate running `schedule`; `budget_bytes` decides whether it fits.
    fn row(
        &self,
        policy: String,
        schedule: Schedule,
        budget_bytes: Option<u64>,
    ) -> Result<Candidate, PlanningError> {
        let simulation = schedule.simulate(&self.costs)?;
        let total = self.account.total_peak_bytes(simulation.peak_bytes);
        let baseline_s = self.costs.baseline_time_s();
        Ok(Candidate {
            policy,
            schedule,
            precision: self.setting.precision,
            batch: self.setting.batch,
            effective_batch: self.workload.model_batch(self.setting.batch),
            account: self.account,
            chain_peak_bytes: simulation.peak_bytes,
            total_peak_bytes: total,
            step_s: simulation.time_s,
            overhead_pct: if baseline_s > 0.0 {
                (100.0 * (simulation.time_s - baseline_s) / baseline_s).max(0.0)
            } else {
                0.0
            },
            fits: budget_bytes.is_none_or(|b| total <= b),
            costs: self.source,
        })
    }

    /// The fixed policies and, when the budget leaves the chain enough, the planner's
    /// schedule for it.
    fn all(&self, budget_bytes: u64) -> Result<Vec<Candidate>, PlanningError> {
        let n = self.costs.num_stages();
        let blocks = self.costs.block_starts();
        let mut rows = Vec::new();
        for policy in [
            Policy::None,
            Policy::Every(1),
            Policy::Every(2),
            Policy::Sqrt,
        ] {
            let schedule = policy
                .fixed_schedule(n, &blocks)
                .ok_or(PlanningError::Internal("a fixed policy without a schedule"))?;
            rows.push(self.row(policy.to_string(), schedule, Some(budget_bytes))?);
        }
        if let Some(chain_budget) = self.account.chain_budget(budget_bytes) {
            // The short spelling when it still fits, else the exact one.
            let (short, short_bytes) = budget_policy(chain_budget);
            let planned = plan_within(&self.costs, short_bytes)
                .map(|plan| (short, plan))
                .or_else(|_| {
                    plan_within(&self.costs, chain_budget)
                        .map(|plan| (Policy::Budget(chain_budget).to_string(), plan))
                });
            if let Ok((policy, plan)) = planned {
                rows.push(self.row(policy, plan.schedule, Some(budget_bytes))?);
            }
        }
        Ok(rows)
    }
}

/// The largest batch whose least-memory schedule fits, by doubling then bisection on the
/// analytic costs; `None` when not even one video fits.
fn largest_batch(
    workload: &Workload,
    precision: Precision,
    budget_bytes: u64,
) -> Result<Option<usize>, PlanningError> {
    let fits = |batch: usize| -> Result<bool, PlanningError> {
        let rows = Rows::new(
            workload,
            Setting { precision, batch },
            &super::AnalyticCosts,
        )?;
        Ok(rows.smallest_feasible_bytes() <= budget_bytes)
    };
    if !fits(1)? {
        return Ok(None);
    }
    let (mut low, mut high) = (1, 2);
    while high <= MAX_AUTO_BATCH && fits(high)? {
        low = high;
        high *= 2;
    }
    if high > MAX_AUTO_BATCH {
        return Ok(Some(low));
    }
    while high - low > 1 {
        let mid = (low + high) / 2;
        if fits(mid)? {
            low = mid;
        } else {
            high = mid;
        }
    }
    Ok(Some(low))
}

/// `budget:SIZE` with SIZE rounded down to 3 significant digits in binary units (short,
/// never above `bytes`), and the bytes that text parses back to.
pub fn budget_policy(bytes: u64) -> (String, u64) {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    let size = UNITS
        .iter()
        .find(|(_, unit)| bytes >= *unit)
        .map(|&(suffix, unit)| {
            let value = bytes as f64 / unit as f64;
            let decimals = if value >= 100.0 {
                0
            } else if value >= 10.0 {
                1
            } else {
                2
            };
            let scale = 10f64.powi(decimals);
            let floored = (value * scale).floor() / scale;
            format!("{floored:.prec$}{suffix}", prec = decimals as usize)
        })
        .unwrap_or_else(|| bytes.to_string());
    let parsed = size.parse::<ByteSize>().map_or(bytes, |s| s.0.min(bytes));
    (format!("budget:{size}"), parsed)
}

/// The fastest fitting candidate; with `largest_batch_first`, among those of the largest
/// fitting batch. Ties go to the earlier row (a fixed policy before the planner's).
pub fn choose(candidates: &[Candidate], largest_batch_first: bool) -> Option<usize> {
    let fitting = candidates.iter().enumerate().filter(|(_, c)| c.fits);
    let largest = if largest_batch_first {
        fitting.clone().map(|(_, c)| c.batch).max()
    } else {
        None
    };
    fitting
        .filter(|(_, c)| largest.is_none_or(|b| c.batch == b))
        .min_by(|(_, a), (_, b)| a.step_s.total_cmp(&b.step_s))
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_policies_round_down_and_parse_back() {
        assert_eq!(budget_policy(83_781_837_488).0, "budget:78.0GiB");
        assert_eq!(budget_policy(3 << 29).0, "budget:1.50GiB");
        assert_eq!(budget_policy(999), ("budget:999".to_string(), 999));
        for bytes in [83_781_837_488u64, 123_456_789, 5 << 40] {
            let (text, parsed) = budget_policy(bytes);
            let policy: Policy = text.parse().unwrap();
            assert_eq!(policy, Policy::Budget(parsed), "{text}");
            assert!(parsed <= bytes, "{text}");
        }
    }
}
