//! Checkpoint schedules for a chain, their exact memory/time simulator and
//! the fixed policies (`store_all`, `every`, `sqrt`).
//!
//! The op vocabulary follows rotor (Beaumont, Eyraud-Dubois, Herrmann, Joly,
//! Shilova, 2019, "Optimal checkpointing for heterogeneous chains: how to
//! train deep neural networks with limited memory"): a forward that keeps
//! only its output (`F_ck` / `F_∅` there, [`Op::CheckpointForward`] /
//! [`Op::Forward`] here), a forward that keeps its whole tape (`F_all`,
//! [`Op::ForwardKeep`]) and a backward ([`Op::Backward`]).
//!
//! # Execution model
//! Engine state: a set of kept activations `acts` (plain tensors `a_i`), a set
//! of stored stage graphs `graphs` (stage `i`'s tape, which holds its output
//! `a_{i+1}`), and the current gradient `δ_k`. `a_i` is *available* iff
//! `a_i ∈ acts`, or `i ≥ 1` and graph `i-1` is stored. At the start
//! `acts = {a_0}`; the memory of every instant is `reserved_bytes + Σ acts +
//! Σ graphs + |δ|`. Below, `cur` is the memory before the op and `act_i` is
//! `|a_i|` (which is also `|δ_i|`).
//!
//! | op | requires | transient peak | after |
//! |----|----------|----------------|-------|
//! | `CF i` | `a_i` available, `a_{i+1} ∉ acts` | `cur + graph_i + fwd_tmp_i` | `a_{i+1}` added to acts |
//! | `Fn i` | as `CF i`; not (`a_i ∈ acts` and graph `i` stored) | as `CF i` | as `CF i`, then `a_i` removed from acts |
//! | `Fe i` | `a_i` available, graph `i` not stored | `cur + graph_i + fwd_tmp_i` | graph `i` stored |
//! | `B i` | graph `i` stored, gradient is `δ_{i+1}` | `cur + act_i + bwd_tmp_i` | graph `i`, `δ_{i+1}` and (if kept) `a_i` freed; `δ_i` held |
//!
//! Before the first `B (n-1)` the gradient `δ_n` appears (`act_n` bytes); if
//! `a_n ∈ acts` the loss consumed it and it is freed at that moment. The peak
//! of an op is the larger of its transient peak and the memory after it.
//!
//! Further rules (they only forbid wasteful or physically wrong ops):
//! - `Fn i` may not drop `a_i` from acts while graph `i` is stored: the tape
//!   still references that tensor, so its memory would not really be freed.
//! - A forward op on a stage whose backward already ran is rejected (its
//!   result could never be used), as is a `CF`/`Fn` whose output is already
//!   in acts and an `Fe` whose graph is already stored.
//! - A complete schedule ends with every `B` run in order `n-1, …, 0`, no
//!   graph stored and no activation kept (only `δ_0` remains).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::costs::ChainCosts;

/// One step of a schedule; the payload is the stage index `i` (`a_i -> a_{i+1}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Op {
    /// `CF i`: run stage `i` without keeping its graph; add `a_{i+1}` to the kept activations.
    CheckpointForward(usize),
    /// `Fn i`: like `CF i`, then drop `a_i` from the kept activations.
    Forward(usize),
    /// `Fe i`: run stage `i` keeping its graph (which holds `a_{i+1}`).
    ForwardKeep(usize),
    /// `B i`: back-propagate through stage `i` (`δ_{i+1} -> δ_i`) and free its graph.
    Backward(usize),
}

impl Op {
    /// The stage the op runs.
    pub fn stage(&self) -> usize {
        match *self {
            Op::CheckpointForward(i) | Op::Forward(i) | Op::ForwardKeep(i) | Op::Backward(i) => i,
        }
    }

    /// Whether the op runs a stage forward.
    pub fn is_forward(&self) -> bool {
        !matches!(self, Op::Backward(_))
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::CheckpointForward(i) => write!(f, "CF{i}"),
            Op::Forward(i) => write!(f, "Fn{i}"),
            Op::ForwardKeep(i) => write!(f, "Fe{i}"),
            Op::Backward(i) => write!(f, "B{i}"),
        }
    }
}

/// A token that is not an op (`CF3`, `Fn3`, `Fe3` or `B3`).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("`{token}` is not an op: expected CF<i>, Fn<i>, Fe<i> or B<i>")]
pub struct ParseOpError {
    /// The offending token.
    pub token: String,
}

impl FromStr for Op {
    type Err = ParseOpError;

    fn from_str(token: &str) -> Result<Self, Self::Err> {
        let err = || ParseOpError {
            token: token.to_string(),
        };
        let (make, digits): (fn(usize) -> Op, &str) = if let Some(d) = token.strip_prefix("CF") {
            (Op::CheckpointForward, d)
        } else if let Some(d) = token.strip_prefix("Fn") {
            (Op::Forward, d)
        } else if let Some(d) = token.strip_prefix("Fe") {
            (Op::ForwardKeep, d)
        } else if let Some(d) = token.strip_prefix('B') {
            (Op::Backward, d)
        } else {
            return Err(err());
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        digits.parse().map(make).map_err(|_| err())
    }
}

impl From<Op> for String {
    fn from(op: Op) -> Self {
        op.to_string()
    }
}

impl TryFrom<String> for Op {
    type Error = ParseOpError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

/// A sequence of ops; its text form is the ops joined by spaces
/// (`"CF0 Fe1 B1 Fe0 B0"`), which [`FromStr`] parses back.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Schedule {
    ops: Vec<Op>,
}

/// Memory of one op of a simulated schedule (reserved bytes included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpMemory {
    /// Highest memory while the op runs (transients included).
    pub during_bytes: u64,
    /// Memory once the op has returned.
    pub after_bytes: u64,
}

/// What a schedule costs on a chain, as predicted by [`Schedule::simulate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Simulation {
    /// Highest memory at any instant, `reserved_bytes` included.
    pub peak_bytes: u64,
    /// Total seconds: every forward op costs its stage's `fwd_s` (the graph-only ones,
    /// [`Schedule::is_graph_only`]: [`crate::costs::StageCosts::graph_only_s`]), every backward its
    /// `bwd_s`.
    pub time_s: f64,
    /// Number of forward ops (`CF`, `Fn` and `Fe`).
    pub forward_count: usize,
    /// Index of the first op at which `peak_bytes` is reached.
    pub peak_op: usize,
}

impl Simulation {
    /// Seconds spent recomputing: `time_s − (Σ fwd_s + Σ bwd_s)`.
    pub fn recompute_overhead_s(&self, costs: &ChainCosts) -> f64 {
        self.time_s - costs.baseline_time_s()
    }
}

/// Why a schedule is not valid for a chain. `op_index` is the position of the
/// offending op in the schedule.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ScheduleError {
    /// The chain has no stages.
    #[error("the chain has no stages")]
    EmptyChain,
    /// The op names a stage the chain does not have.
    #[error("op {op_index} ({op}): the chain has only {num_stages} stages")]
    StageOutOfRange {
        /// Position of the op.
        op_index: usize,
        /// The op.
        op: Op,
        /// Number of stages of the chain.
        num_stages: usize,
    },
    /// A forward op whose input activation is neither kept nor held by a graph.
    #[error("op {op_index} ({op}): input a{stage} is not available ({})", unavailable_reason(*.stage))]
    InputUnavailable {
        /// Position of the op.
        op_index: usize,
        /// The op.
        op: Op,
        /// The stage whose input is missing.
        stage: usize,
    },
    /// A `CF`/`Fn` whose output activation is already kept.
    #[error("op {op_index} ({op}): a{} is already kept", op.stage() + 1)]
    OutputAlreadyKept {
        /// Position of the op.
        op_index: usize,
        /// The op.
        op: Op,
    },
    /// An `Fe` whose graph is already stored.
    #[error("op {op_index} ({op}): graph {} is already stored", op.stage())]
    GraphAlreadyStored {
        /// Position of the op.
        op_index: usize,
        /// The op.
        op: Op,
    },
    /// An `Fn` that would drop an activation still referenced by its stored graph.
    #[error("op {op_index} ({op}): cannot drop a{stage} while graph {stage} still holds it", stage = op.stage())]
    InputHeldByGraph {
        /// Position of the op.
        op_index: usize,
        /// The op.
        op: Op,
    },
    /// A forward op on a stage whose backward already ran.
    #[error("op {op_index} ({op}): stage {} was already back-propagated", op.stage())]
    StageFinished {
        /// Position of the op.
        op_index: usize,
        /// The op.
        op: Op,
    },
    /// A backward out of the order `n-1, …, 0` (or one too many).
    #[error("op {op_index} ({op}): expected {}", match expected { Some(k) => format!("B{k} next"), None => "no more backward ops".to_string() })]
    BackwardOutOfOrder {
        /// Position of the op.
        op_index: usize,
        /// The op.
        op: Op,
        /// The backward that is due, if any.
        expected: Option<usize>,
    },
    /// A backward whose graph is not stored.
    #[error("op {op_index} ({op}): graph {} is not stored (run Fe{} first)", op.stage(), op.stage())]
    GraphMissing {
        /// Position of the op.
        op_index: usize,
        /// The op.
        op: Op,
    },
    /// The schedule ends before `B0`.
    #[error("the schedule ends before B{next_backward} (every B from B{} down to B0 must run)", .num_stages - 1)]
    Incomplete {
        /// The backward that is due.
        next_backward: usize,
        /// Number of stages of the chain.
        num_stages: usize,
    },
    /// The schedule ends with graphs or activations still held.
    #[error("the schedule ends with graphs {graphs:?} and activations {activations:?} still held")]
    Leftover {
        /// Stages whose graph is still stored.
        graphs: Vec<usize>,
        /// Indices of activations still kept.
        activations: Vec<usize>,
    },
}

/// Why `a_stage` can be missing, for [`ScheduleError::InputUnavailable`].
fn unavailable_reason(stage: usize) -> String {
    match stage.checked_sub(1) {
        Some(previous) => format!("not kept, and graph {previous} is not stored"),
        None => "a0 was dropped".to_string(),
    }
}

/// The engine's state while a schedule runs (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Engine {
    /// `acts[i]`: whether `a_i` is kept (`i` in `0..=n`).
    acts: Vec<bool>,
    /// `graphs[i]`: whether the graph of stage `i` is stored.
    graphs: Vec<bool>,
    /// The backward that is due (`None` once `B0` ran).
    next_backward: Option<usize>,
    /// Memory now, reserved bytes included.
    current_bytes: u64,
}

impl Engine {
    /// The state before the first op: `acts = {a_0}`, nothing else.
    pub(crate) fn new(costs: &ChainCosts) -> Result<Self, ScheduleError> {
        let n = costs.num_stages();
        if n == 0 {
            return Err(ScheduleError::EmptyChain);
        }
        let mut acts = vec![false; n + 1];
        acts[0] = true;
        Ok(Self {
            acts,
            graphs: vec![false; n],
            next_backward: Some(n - 1),
            current_bytes: costs.reserved_bytes.saturating_add(costs.act_bytes(0)),
        })
    }

    /// Memory now, reserved bytes included.
    pub(crate) fn current_bytes(&self) -> u64 {
        self.current_bytes
    }

    /// Runs `op` (at position `op_index`), returning its memory.
    pub(crate) fn apply(
        &mut self,
        costs: &ChainCosts,
        op_index: usize,
        op: Op,
    ) -> Result<OpMemory, ScheduleError> {
        let n = self.graphs.len();
        let i = op.stage();
        if i >= n {
            return Err(ScheduleError::StageOutOfRange {
                op_index,
                op,
                num_stages: n,
            });
        }
        match op {
            Op::Backward(_) => self.backward(costs, op_index, op),
            _ => self.forward(costs, op_index, op),
        }
    }

    /// Whether `a_i` is kept or held by graph `i-1`.
    fn available(&self, i: usize) -> bool {
        self.acts[i] || (i >= 1 && self.graphs[i - 1])
    }

    fn forward(
        &mut self,
        costs: &ChainCosts,
        op_index: usize,
        op: Op,
    ) -> Result<OpMemory, ScheduleError> {
        let i = op.stage();
        if self.next_backward.is_none_or(|k| i > k) {
            return Err(ScheduleError::StageFinished { op_index, op });
        }
        if !self.available(i) {
            return Err(ScheduleError::InputUnavailable {
                op_index,
                op,
                stage: i,
            });
        }
        let stage = &costs.stages[i];
        let during_bytes = self
            .current_bytes
            .saturating_add(stage.graph_bytes)
            .saturating_add(stage.fwd_tmp_bytes);
        match op {
            Op::ForwardKeep(_) => {
                if self.graphs[i] {
                    return Err(ScheduleError::GraphAlreadyStored { op_index, op });
                }
                self.graphs[i] = true;
                self.current_bytes = self.current_bytes.saturating_add(stage.graph_bytes);
            }
            _ => {
                if self.acts[i + 1] {
                    return Err(ScheduleError::OutputAlreadyKept { op_index, op });
                }
                let drop_input = matches!(op, Op::Forward(_)) && self.acts[i];
                if drop_input && self.graphs[i] {
                    return Err(ScheduleError::InputHeldByGraph { op_index, op });
                }
                self.acts[i + 1] = true;
                self.current_bytes = self.current_bytes.saturating_add(costs.act_bytes(i + 1));
                if drop_input {
                    self.acts[i] = false;
                    self.current_bytes = self.current_bytes.saturating_sub(costs.act_bytes(i));
                }
            }
        }
        Ok(OpMemory {
            during_bytes,
            after_bytes: self.current_bytes,
        })
    }

    fn backward(
        &mut self,
        costs: &ChainCosts,
        op_index: usize,
        op: Op,
    ) -> Result<OpMemory, ScheduleError> {
        let i = op.stage();
        let n = self.graphs.len();
        if self.next_backward != Some(i) {
            return Err(ScheduleError::BackwardOutOfOrder {
                op_index,
                op,
                expected: self.next_backward,
            });
        }
        if !self.graphs[i] {
            return Err(ScheduleError::GraphMissing { op_index, op });
        }
        if i == n - 1 {
            // The loss consumes a_n (if kept) and δ_n appears.
            if self.acts[n] {
                self.acts[n] = false;
                self.current_bytes = self.current_bytes.saturating_sub(costs.act_bytes(n));
            }
            self.current_bytes = self.current_bytes.saturating_add(costs.act_bytes(n));
        }
        let input_bytes = costs.act_bytes(i);
        let param_grad_bytes = costs.stages[i].param_grad_bytes;
        let during_bytes = self
            .current_bytes
            .saturating_add(input_bytes)
            .saturating_add(param_grad_bytes)
            .saturating_add(costs.stages[i].bwd_tmp_bytes);
        // Frees graph i and δ_{i+1}; δ_i (|a_i| bytes) replaces them; the stage's
        // parameter gradients stay.
        self.graphs[i] = false;
        self.current_bytes = self
            .current_bytes
            .saturating_sub(costs.stages[i].graph_bytes)
            .saturating_sub(costs.act_bytes(i + 1))
            .saturating_add(input_bytes)
            .saturating_add(param_grad_bytes);
        if self.acts[i] {
            self.acts[i] = false;
            self.current_bytes = self.current_bytes.saturating_sub(input_bytes);
        }
        self.next_backward = i.checked_sub(1);
        Ok(OpMemory {
            during_bytes,
            after_bytes: self.current_bytes,
        })
    }

    /// Checks that the schedule is complete: `B0` ran, nothing else is held.
    pub(crate) fn finish(&self) -> Result<(), ScheduleError> {
        if let Some(next_backward) = self.next_backward {
            return Err(ScheduleError::Incomplete {
                next_backward,
                num_stages: self.graphs.len(),
            });
        }
        let held = |flags: &[bool]| -> Vec<usize> {
            flags
                .iter()
                .enumerate()
                .filter_map(|(i, &held)| held.then_some(i))
                .collect()
        };
        let (graphs, activations) = (held(&self.graphs), held(&self.acts));
        if graphs.is_empty() && activations.is_empty() {
            Ok(())
        } else {
            Err(ScheduleError::Leftover {
                graphs,
                activations,
            })
        }
    }
}

/// Whether stage `stage` of a chain of `num_stages` may run for its graph only when it is
/// recomputed right before its own backward: any stage but the last, whose output the
/// loss reads.
pub(crate) fn may_run_graph_only(stage: usize, num_stages: usize) -> bool {
    stage + 1 < num_stages
}

impl Schedule {
    /// A schedule running `ops` in order.
    pub fn new(ops: Vec<Op>) -> Self {
        Self { ops }
    }

    /// The ops, in order.
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    /// Number of ops.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether the schedule has no op.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Runs the schedule on the engine model (module doc) and returns its peak
    /// memory and time, or the first violated precondition.
    pub fn simulate(&self, costs: &ChainCosts) -> Result<Simulation, ScheduleError> {
        self.simulate_with_trace(costs)
            .map(|(simulation, _)| simulation)
    }

    /// Like [`Schedule::simulate`], also returning the memory of every op (for plotting).
    pub fn simulate_with_trace(
        &self,
        costs: &ChainCosts,
    ) -> Result<(Simulation, Vec<OpMemory>), ScheduleError> {
        let mut engine = Engine::new(costs)?;
        let mut trace = Vec::with_capacity(self.ops.len());
        let mut simulation = Simulation {
            peak_bytes: engine.current_bytes(),
            time_s: 0.0,
            forward_count: 0,
            peak_op: 0,
        };
        for (op_index, &op) in self.ops.iter().enumerate() {
            let memory = engine.apply(costs, op_index, op)?;
            let stage = &costs.stages[op.stage()];
            if op.is_forward() {
                simulation.forward_count += 1;
                simulation.time_s += if self.is_graph_only(op_index, costs.num_stages()) {
                    stage.graph_only_s()
                } else {
                    stage.fwd_s
                };
            } else {
                simulation.time_s += stage.bwd_s;
            }
            let op_peak_bytes = memory.during_bytes.max(memory.after_bytes);
            if op_peak_bytes > simulation.peak_bytes {
                simulation.peak_bytes = op_peak_bytes;
                simulation.peak_op = op_index;
            }
            trace.push(memory);
        }
        engine.finish()?;
        Ok((simulation, trace))
    }

    /// Whether op `op_index` runs its stage for the graph only: an `Fe i` right before its
    /// `B i`, except for the last of the chain's `num_stages` (whose output the loss
    /// reads). Nothing reads the
    /// output of such a run — the gradient `δ_{i+1}` is already there — so the model may
    /// skip the work that only the values need (`ChainModel::stage_graph_only`).
    pub fn is_graph_only(&self, op_index: usize, num_stages: usize) -> bool {
        let Some(&Op::ForwardKeep(i)) = self.ops.get(op_index) else {
            return false;
        };
        may_run_graph_only(i, num_stages) && self.ops.get(op_index + 1) == Some(&Op::Backward(i))
    }

    /// No recomputation: `Fe0 … Fe(n-1)`, then `B(n-1) … B0`.
    pub fn store_all(n: usize) -> Self {
        let forward = (0..n).map(Op::ForwardKeep);
        let backward = (0..n).rev().map(Op::Backward);
        Self::new(forward.chain(backward).collect())
    }

    /// Checkpoints `a_0, a_k, a_2k, …` (`k = 0` is taken as 1; `k ≥ n` is
    /// [`Schedule::store_all`]): [`Schedule::segments`] of `k` stages each.
    /// `every(n, 1)` checkpoints every stage input.
    pub fn every(n: usize, k: usize) -> Self {
        let starts: Vec<usize> = (0..n).step_by(k.max(1)).collect();
        Self::segments(n, &starts)
    }

    /// [`Schedule::every`] with `k = ⌈√n⌉`.
    pub fn sqrt(n: usize) -> Self {
        Self::every(n, ceil_sqrt(n))
    }

    /// `every:K` over blocks: checkpoints the input of every `k`-th block (`k = 0` is
    /// taken as 1), a block being the stages from one of `block_starts` to the next
    /// (see [`ChainCosts::block_starts`]).
    pub fn every_block(n: usize, block_starts: &[usize], k: usize) -> Self {
        let starts: Vec<usize> = block_starts.iter().copied().step_by(k.max(1)).collect();
        Self::segments(n, &starts)
    }

    /// `sqrt` over blocks: [`Schedule::every_block`] with `k = ⌈√blocks⌉`.
    pub fn sqrt_blocks(n: usize, block_starts: &[usize]) -> Self {
        Self::every_block(n, block_starts, ceil_sqrt(block_starts.len()))
    }

    /// Checkpoints the inputs of the segments that begin at stage 0 and at each of
    /// `starts` (ascending; 0 and starts `≥ n` add nothing), each ending where the next
    /// begins.
    ///
    /// Forward: every segment but the last runs `CF` on its first stage and
    /// `Fn` on the others, so only segment inputs stay kept. The last segment
    /// is run with `Fe` straight away, then back-propagated: recomputing it
    /// after reaching `a_n` would cost its forwards twice and hold the same
    /// graphs, now next to `δ_n`, so doing it directly saves work without
    /// raising the peak. Each earlier segment, from last to first, is then
    /// recomputed with `Fe` from its kept input and back-propagated.
    pub fn segments(n: usize, starts: &[usize]) -> Self {
        let bounds: Vec<usize> = std::iter::once(0)
            .chain(
                starts
                    .iter()
                    .copied()
                    .filter(|&start| start > 0 && start < n),
            )
            .chain(std::iter::once(n))
            .collect();
        let segments: Vec<(usize, usize)> = bounds.windows(2).map(|w| (w[0], w[1])).collect();
        let mut ops = Vec::with_capacity(3 * n);
        let Some((&(last_start, _), earlier)) = segments.split_last() else {
            return Self::new(ops);
        };
        for &(start, end) in earlier {
            ops.push(Op::CheckpointForward(start));
            ops.extend((start + 1..end).map(Op::Forward));
        }
        let mut push_segment = |start: usize, end: usize| {
            ops.extend((start..end).map(Op::ForwardKeep));
            ops.extend((start..end).rev().map(Op::Backward));
        };
        push_segment(last_start, n);
        for &(start, end) in earlier.iter().rev() {
            push_segment(start, end);
        }
        Self::new(ops)
    }
}

/// `⌈√n⌉` in integers.
fn ceil_sqrt(n: usize) -> usize {
    let mut k = (n as f64).sqrt() as usize;
    while k * k < n {
        k += 1;
    }
    while k > 1 && (k - 1) * (k - 1) >= n {
        k -= 1;
    }
    k
}

impl From<Vec<Op>> for Schedule {
    fn from(ops: Vec<Op>) -> Self {
        Self::new(ops)
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, op) in self.ops.iter().enumerate() {
            if index > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{op}")?;
        }
        Ok(())
    }
}

impl FromStr for Schedule {
    type Err = ParseOpError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        text.split_whitespace()
            .map(str::parse)
            .collect::<Result<Vec<Op>, _>>()
            .map(Self::new)
    }
}

impl From<Schedule> for String {
    fn from(schedule: Schedule) -> Self {
        schedule.to_string()
    }
}

impl TryFrom<String> for Schedule {
    type Error = ParseOpError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::costs::StageCosts;

    /// Three stages with distinct sizes, so every term of the accounting shows.
    fn tiny_chain() -> ChainCosts {
        let stage =
            |input_bytes, graph_bytes, fwd_tmp_bytes, bwd_tmp_bytes, fwd_s, bwd_s| StageCosts {
                param_grad_bytes: 0,
                fwd_s,
                bwd_s,
                fwd_graph_only_s: None,
                input_bytes,
                graph_bytes,
                fwd_tmp_bytes,
                bwd_tmp_bytes,
            };
        ChainCosts::new(
            vec![
                stage(10, 100, 1, 2, 1.0, 2.0),
                stage(20, 200, 3, 4, 1.5, 3.0),
                stage(30, 300, 5, 6, 2.0, 4.0),
            ],
            7,
            1000,
        )
    }

    fn parse(text: &str) -> Schedule {
        text.parse().unwrap()
    }

    fn trace_of(schedule: &Schedule) -> Vec<(u64, u64)> {
        let (_, trace) = schedule.simulate_with_trace(&tiny_chain()).unwrap();
        trace
            .iter()
            .map(|m| (m.during_bytes, m.after_bytes))
            .collect()
    }

    #[test]
    fn store_all_matches_hand_computation() {
        let schedule = Schedule::store_all(3);
        assert_eq!(schedule.to_string(), "Fe0 Fe1 Fe2 B2 B1 B0");
        let sim = schedule.simulate(&tiny_chain()).unwrap();
        // Start 1010; Fe0 1111/1110; Fe1 1313/1310; Fe2 1615/1610;
        // δ3 appears: 1617; B2 1617+30+6 = 1653, after 1617-300-7+30 = 1340;
        // B1 1364/1130; B0 1142/1010.
        assert_eq!(
            trace_of(&schedule),
            vec![
                (1111, 1110),
                (1313, 1310),
                (1615, 1610),
                (1653, 1340),
                (1364, 1130),
                (1142, 1010)
            ]
        );
        assert_eq!(sim.peak_bytes, 1653);
        assert_eq!(sim.peak_op, 3);
        assert_eq!(sim.time_s, 13.5);
        assert_eq!(sim.forward_count, 3);
        assert_eq!(sim.recompute_overhead_s(&tiny_chain()), 0.0);
    }

    /// `every:1` recomputes stages 1 and 0 right before their backward: those two
    /// forwards are graph-only; the last stage's `Fe2 B2` is not (the loss reads `a_3`).
    #[test]
    fn a_keep_right_before_its_backward_is_graph_only() {
        let schedule = Schedule::every(3, 1);
        let graph_only: Vec<usize> = (0..schedule.len())
            .filter(|&k| schedule.is_graph_only(k, 3))
            .collect();
        assert_eq!(graph_only, [4, 6]);
        // Fe1 and Fe0 of store-all's forward are followed by another forward.
        assert!((0..6).all(|k| !Schedule::store_all(3).is_graph_only(k, 3)));
        let mut costs = tiny_chain();
        let full_s = schedule.simulate(&costs).unwrap().time_s;
        for stage in &mut costs.stages {
            stage.fwd_graph_only_s = Some(0.25 * stage.fwd_s);
        }
        let simulated = schedule.simulate(&costs).unwrap();
        // Fe1 saves 0.75 · 1.5 s, Fe0 0.75 · 1.0 s; Fe2 keeps its 2.0 s.
        assert_eq!(simulated.time_s, full_s - 0.75 * 1.5 - 0.75 * 1.0);
        // A measurement above fwd_s counts as fwd_s.
        costs.stages[0].fwd_graph_only_s = Some(10.0);
        assert_eq!(costs.stages[0].graph_only_s(), 1.0);
    }

    #[test]
    fn every_one_matches_hand_computation() {
        let schedule = Schedule::every(3, 1);
        assert_eq!(schedule.to_string(), "CF0 CF1 Fe2 B2 Fe1 B1 Fe0 B0");
        // Start 1010; CF0 1111/1030; CF1 1233/1060; Fe2 1365/1360; δ3: 1367,
        // B2 1403, after 1367-300-7+30-30 = 1060; Fe1 1263/1260; B1 1284/1030;
        // Fe0 1131/1130; B0 1142/1010.
        assert_eq!(
            trace_of(&schedule),
            vec![
                (1111, 1030),
                (1233, 1060),
                (1365, 1360),
                (1403, 1060),
                (1263, 1260),
                (1284, 1030),
                (1131, 1130),
                (1142, 1010)
            ]
        );
        let sim = schedule.simulate(&tiny_chain()).unwrap();
        assert_eq!(sim.peak_bytes, 1403);
        assert_eq!(sim.peak_op, 3);
        assert_eq!(sim.time_s, 16.0);
        assert_eq!(sim.forward_count, 5);
        assert_eq!(sim.recompute_overhead_s(&tiny_chain()), 2.5);
    }

    #[test]
    fn every_two_matches_hand_computation() {
        let schedule = Schedule::every(3, 2);
        assert_eq!(schedule.to_string(), "CF0 Fn1 Fe2 B2 Fe0 Fe1 B1 B0");
        // Fn1 drops a1 (1030+30-20 = 1040); B2 after keeps a0 and δ2: 1040;
        // Fe0 1141/1140; Fe1 1343/1340; B1 frees graph 1 and δ2 but a1 lives
        // in graph 0: 1340-200-30+20 = 1130.
        assert_eq!(
            trace_of(&schedule),
            vec![
                (1111, 1030),
                (1233, 1040),
                (1345, 1340),
                (1383, 1040),
                (1141, 1140),
                (1343, 1340),
                (1364, 1130),
                (1142, 1010)
            ]
        );
        let sim = schedule.simulate(&tiny_chain()).unwrap();
        assert_eq!((sim.peak_bytes, sim.peak_op), (1383, 3));
        assert_eq!(sim.time_s, 16.0);
        assert_eq!(sim.forward_count, 5);
    }

    #[test]
    fn kept_output_is_consumed_by_the_loss() {
        // a3 kept by CF2 is freed when δ3 appears: after B2 only a0, δ2 and
        // graphs 0, 1 remain.
        let (sim, trace) = parse("Fe0 Fe1 CF2 Fe2 B2 B1 B0")
            .simulate_with_trace(&tiny_chain())
            .unwrap();
        assert_eq!(
            trace[2],
            OpMemory {
                during_bytes: 1615,
                after_bytes: 1317
            }
        );
        assert_eq!(trace[4].after_bytes, 1000 + 10 + 100 + 200 + 30);
        assert_eq!(sim.time_s, 15.5);
        assert_eq!(sim.forward_count, 4);
    }

    #[test]
    fn policies_have_the_documented_shape() {
        assert_eq!(
            Schedule::every(5, 2).to_string(),
            "CF0 Fn1 CF2 Fn3 Fe4 B4 Fe2 Fe3 B3 B2 Fe0 Fe1 B1 B0"
        );
        assert_eq!(Schedule::every(3, 3), Schedule::store_all(3));
        assert_eq!(Schedule::every(3, 7), Schedule::store_all(3));
        assert_eq!(Schedule::every(3, 0), Schedule::every(3, 1));
        assert_eq!(Schedule::sqrt(10), Schedule::every(10, 4));
        assert_eq!(Schedule::sqrt(9), Schedule::every(9, 3));
        assert!(Schedule::every(0, 2).is_empty());
        // Two blocks of two stages, then the tail as a block of its own.
        let blocks = [0, 2, 4];
        assert_eq!(Schedule::every_block(5, &blocks, 1), Schedule::every(5, 2));
        assert_eq!(
            Schedule::every_block(5, &blocks, 2).to_string(),
            "CF0 Fn1 Fn2 Fn3 Fe4 B4 Fe0 Fe1 Fe2 Fe3 B3 B2 B1 B0"
        );
        assert_eq!(
            Schedule::sqrt_blocks(5, &blocks),
            Schedule::every_block(5, &blocks, 2)
        );
        assert_eq!(
            Schedule::segments(6, &[0, 1, 4]).to_string(),
            "CF0 CF1 Fn2 Fn3 Fe4 Fe5 B5 B4 Fe1 Fe2 Fe3 B3 B2 B1 Fe0 B0"
        );
        assert_eq!(Schedule::segments(4, &[]), Schedule::store_all(4));
        assert_eq!(
            (0..20).map(ceil_sqrt).collect::<Vec<_>>(),
            vec![0, 1, 2, 2, 2, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5]
        );
    }

    #[test]
    fn every_policy_is_valid_on_many_lengths() {
        for n in 1..12 {
            let costs = ChainCosts::new(
                (0..n)
                    .map(|i| StageCosts {
                        param_grad_bytes: 0,
                        fwd_s: 1.0,
                        bwd_s: 2.0,
                        fwd_graph_only_s: None,
                        input_bytes: 1 + i as u64,
                        graph_bytes: 5,
                        fwd_tmp_bytes: 1,
                        bwd_tmp_bytes: 1,
                    })
                    .collect(),
                3,
                0,
            );
            for k in 1..=n + 1 {
                let sim = Schedule::every(n, k).simulate(&costs).unwrap();
                // Every stage but the last segment's runs twice.
                let last_segment = n - (n - 1) / k * k;
                assert_eq!(sim.forward_count, 2 * n - last_segment, "n={n} k={k}");
            }
        }
    }

    #[test]
    fn text_round_trips_and_rejects_garbage() {
        let schedule = Schedule::every(7, 3);
        assert_eq!(parse(&schedule.to_string()), schedule);
        assert_eq!(
            parse("  CF0\tFn12  B3 "),
            Schedule::new(vec![
                Op::CheckpointForward(0),
                Op::Forward(12),
                Op::Backward(3)
            ])
        );
        assert!(parse("").is_empty());
        for bad in ["F0", "CF", "Fe-1", "B1x", "cf0", "Fe+1", "B 1x"] {
            let err = bad.parse::<Schedule>().unwrap_err();
            assert!(err.to_string().contains("is not an op"), "{bad}: {err}");
        }
    }

    fn error_of(text: &str) -> ScheduleError {
        parse(text).simulate(&tiny_chain()).unwrap_err()
    }

    #[test]
    fn invalid_schedules_are_rejected_with_the_op_index() {
        assert_eq!(
            error_of("B2"),
            ScheduleError::GraphMissing {
                op_index: 0,
                op: Op::Backward(2)
            }
        );
        assert_eq!(
            error_of("Fe0 Fe1 Fe2 B1"),
            ScheduleError::BackwardOutOfOrder {
                op_index: 3,
                op: Op::Backward(1),
                expected: Some(2)
            }
        );
        assert_eq!(
            error_of("CF0 Fn1 Fe1"),
            ScheduleError::InputUnavailable {
                op_index: 2,
                op: Op::ForwardKeep(1),
                stage: 1
            }
        );
        assert_eq!(
            error_of("Fe1"),
            ScheduleError::InputUnavailable {
                op_index: 0,
                op: Op::ForwardKeep(1),
                stage: 1
            }
        );
        assert_eq!(
            error_of("Fe0 Fe0"),
            ScheduleError::GraphAlreadyStored {
                op_index: 1,
                op: Op::ForwardKeep(0)
            }
        );
        assert_eq!(
            error_of("CF0 CF0"),
            ScheduleError::OutputAlreadyKept {
                op_index: 1,
                op: Op::CheckpointForward(0)
            }
        );
        assert_eq!(
            error_of("Fe0 Fn0"),
            ScheduleError::InputHeldByGraph {
                op_index: 1,
                op: Op::Forward(0)
            }
        );
        assert_eq!(
            error_of("Fe0 Fe1 Fe2 B2 Fe2"),
            ScheduleError::StageFinished {
                op_index: 4,
                op: Op::ForwardKeep(2)
            }
        );
        assert_eq!(
            error_of("Fe3"),
            ScheduleError::StageOutOfRange {
                op_index: 0,
                op: Op::ForwardKeep(3),
                num_stages: 3
            }
        );
        assert_eq!(
            error_of("Fe0 Fe1 Fe2 B2 B1"),
            ScheduleError::Incomplete {
                next_backward: 0,
                num_stages: 3
            }
        );
        assert_eq!(
            error_of("Fe0 Fe1 Fe2 B2 B1 B0 B0"),
            ScheduleError::BackwardOutOfOrder {
                op_index: 6,
                op: Op::Backward(0),
                expected: None
            }
        );
        assert_eq!(
            error_of("Fe0 Fe1 Fe2 B2 CF1 B1 B0"),
            ScheduleError::Leftover {
                graphs: vec![],
                activations: vec![2]
            }
        );
        let message = error_of("CF0 Fn1 Fe1").to_string();
        assert_eq!(
            message,
            "op 2 (Fe1): input a1 is not available (not kept, and graph 0 is not stored)"
        );
        assert!(error_of("Fn0 Fe0").to_string().contains("a0 was dropped"));
        let empty = ChainCosts::new(vec![], 1, 0);
        assert_eq!(
            Schedule::default().simulate(&empty),
            Err(ScheduleError::EmptyChain)
        );
    }
}
