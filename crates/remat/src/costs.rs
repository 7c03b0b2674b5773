//! Per-stage cost model of a sequential chain: the only input of the
//! simulator ([`crate::schedule`]) and of the planner ([`crate::planner`]).
//!
//! A chain of `n` stages maps activation `a_0` (the chain input) through
//! `a_1, …, a_{n-1}` to `a_n` (the output); stage `i` maps `a_i -> a_{i+1}`.
//! The backward pass produces gradients `δ_i` (the size of `a_i`) from `δ_n`
//! down to `δ_0`. All numbers here are plain measurements or estimates: this
//! module knows nothing about tensors.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Costs of one stage `i` (mapping `a_i -> a_{i+1}`), measured or estimated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageCosts {
    /// Seconds one forward run of the stage takes (any of the three forward ops).
    pub fwd_s: f64,
    /// Seconds the backward of the stage takes.
    pub bwd_s: f64,
    /// Seconds of a `ForwardKeep` run for its graph only (right before the stage's own
    /// backward, when nothing reads its output: `ChainModel::stage_graph_only`), if the
    /// stage is cheaper then; `None` means `fwd_s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fwd_graph_only_s: Option<f64>,
    /// Bytes of the stage input `a_i` (`|a_i|`); also the size of `δ_i`.
    pub input_bytes: u64,
    /// Bytes `ForwardKeep` keeps: the stage's autograd tape as the executor stores it
    /// (only the values its backward reads; see `grads::release_unneeded`), including its
    /// output `a_{i+1}` (but not its input `a_i`).
    pub graph_bytes: u64,
    /// Transient bytes on top of `graph_bytes` while the stage runs forward.
    pub fwd_tmp_bytes: u64,
    /// Transient bytes on top of the new gradient `δ_i` while the stage runs backward.
    pub bwd_tmp_bytes: u64,
    /// Bytes of the gradients of the stage's parameters: allocated by its backward and
    /// kept to the end (0 when the parameters are frozen).
    #[serde(default)]
    pub param_grad_bytes: u64,
}

impl StageCosts {
    /// Seconds of a forward run for the graph only: `fwd_graph_only_s`, at most `fwd_s`
    /// (the same ops minus skipped ones; a larger measurement is noise).
    pub fn graph_only_s(&self) -> f64 {
        self.fwd_graph_only_s
            .map_or(self.fwd_s, |s| s.min(self.fwd_s))
    }
}

/// Costs of a whole chain: its stages in order, the size of the output and
/// the memory that is held throughout (parameters' gradients, context, …).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChainCosts {
    /// Stage costs, stage `i` mapping `a_i -> a_{i+1}`.
    pub stages: Vec<StageCosts>,
    /// Bytes of the chain output `a_n` (`|a_n|`), also the size of `δ_n`.
    pub output_bytes: u64,
    /// Bytes added to every instant of a schedule (held all along).
    pub reserved_bytes: u64,
    /// The stages that begin a block of the model, ascending from 0 (see
    /// [`ChainCosts::block_starts`]); empty when every stage is a block.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocks: Vec<usize>,
}

/// Why a [`ChainCosts`] cannot be planned for.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum CostsError {
    /// The chain has no stage.
    #[error("the chain has no stages")]
    Empty,
    /// A time is negative, infinite or NaN.
    #[error("stage {stage}: {field} = {value} is not a finite, non-negative number of seconds")]
    BadTime {
        /// Index of the offending stage.
        stage: usize,
        /// Name of the offending field (`fwd_s`, `bwd_s` or `fwd_graph_only_s`).
        field: &'static str,
        /// The offending value.
        value: f64,
    },
    /// The block starts are not ascending stage indices beginning at 0.
    #[error("block starts {starts:?} must ascend from stage 0 and stay below {stages} stages")]
    BadBlocks {
        /// The offending block starts.
        starts: Vec<usize>,
        /// Number of stages.
        stages: usize,
    },
}

impl ChainCosts {
    /// Builds chain costs from its parts.
    pub fn new(stages: Vec<StageCosts>, output_bytes: u64, reserved_bytes: u64) -> Self {
        Self {
            stages,
            output_bytes,
            reserved_bytes,
            blocks: Vec::new(),
        }
    }

    /// The same costs for a model whose blocks span several stages: `starts` are the
    /// stages that begin a block (see [`ChainCosts::block_starts`]).
    pub fn with_block_starts(mut self, starts: Vec<usize>) -> Self {
        let every_stage = starts.iter().copied().eq(0..self.stages.len());
        self.blocks = if every_stage { Vec::new() } else { starts };
        self
    }

    /// The stages that begin a block: the units that the fixed policies (`every:K`,
    /// `sqrt`) count and checkpoint. A model may split each block into several stages so
    /// that the planner can keep the graph of one part and recompute another; the fixed
    /// policies still checkpoint whole blocks, as PyTorch's per-block checkpointing does.
    /// Every stage when the model declared no blocks.
    pub fn block_starts(&self) -> Vec<usize> {
        if self.blocks.is_empty() {
            (0..self.stages.len()).collect()
        } else {
            self.blocks.clone()
        }
    }

    /// Number of stages `n`.
    pub fn num_stages(&self) -> usize {
        self.stages.len()
    }

    /// Bytes of activation `a_i` (and of gradient `δ_i`) for `i` in `0..=n`.
    ///
    /// # Panics
    /// If `i > n`.
    pub fn act_bytes(&self, i: usize) -> u64 {
        match self.stages.get(i) {
            Some(stage) => stage.input_bytes,
            None if i == self.stages.len() => self.output_bytes,
            None => panic!(
                "activation index {i} out of range for a chain of {} stages",
                self.stages.len()
            ),
        }
    }

    /// Bytes of every activation `a_0, …, a_n` (length `n + 1`).
    pub fn activation_bytes(&self) -> Vec<u64> {
        self.stages
            .iter()
            .map(|stage| stage.input_bytes)
            .chain(std::iter::once(self.output_bytes))
            .collect()
    }

    /// Seconds of one forward run of every stage (`Σ fwd_s`).
    pub fn forward_time_s(&self) -> f64 {
        self.stages.iter().map(|stage| stage.fwd_s).sum()
    }

    /// Seconds of one backward run of every stage (`Σ bwd_s`).
    pub fn backward_time_s(&self) -> f64 {
        self.stages.iter().map(|stage| stage.bwd_s).sum()
    }

    /// Seconds of a schedule without recomputation (`Σ fwd_s + Σ bwd_s`):
    /// a lower bound on the time of every valid schedule.
    pub fn baseline_time_s(&self) -> f64 {
        self.forward_time_s() + self.backward_time_s()
    }

    /// Checks that the chain is non-empty, that every time is a finite, non-negative
    /// number and that the block starts ascend from stage 0 within the chain.
    pub fn validate(&self) -> Result<(), CostsError> {
        if self.stages.is_empty() {
            return Err(CostsError::Empty);
        }
        for (stage, costs) in self.stages.iter().enumerate() {
            let graph_only = ("fwd_graph_only_s", costs.fwd_graph_only_s.unwrap_or(0.0));
            for (field, value) in [("fwd_s", costs.fwd_s), ("bwd_s", costs.bwd_s), graph_only] {
                if !(value.is_finite() && value >= 0.0) {
                    return Err(CostsError::BadTime {
                        stage,
                        field,
                        value,
                    });
                }
            }
        }
        let n = self.stages.len();
        let ascending = self.blocks.windows(2).all(|w| w[0] < w[1]);
        let in_range = self.blocks.first().is_none_or(|&first| first == 0)
            && self.blocks.last().is_none_or(|&last| last < n);
        if !(ascending && in_range) {
            return Err(CostsError::BadBlocks {
                starts: self.blocks.clone(),
                stages: n,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(input_bytes: u64, fwd_s: f64) -> StageCosts {
        StageCosts {
            param_grad_bytes: 0,
            fwd_s,
            bwd_s: 2.0 * fwd_s,
            fwd_graph_only_s: None,
            input_bytes,
            graph_bytes: 10,
            fwd_tmp_bytes: 0,
            bwd_tmp_bytes: 0,
        }
    }

    #[test]
    fn activation_bytes_cover_inputs_and_output() {
        let costs = ChainCosts::new(vec![stage(3, 1.0), stage(5, 0.5)], 7, 100);
        assert_eq!(costs.num_stages(), 2);
        assert_eq!(costs.activation_bytes(), vec![3, 5, 7]);
        assert_eq!(costs.act_bytes(0), 3);
        assert_eq!(costs.act_bytes(2), 7);
        assert_eq!(costs.baseline_time_s(), 4.5);
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn act_bytes_past_output_panics() {
        let costs = ChainCosts::new(vec![stage(3, 1.0)], 7, 0);
        costs.act_bytes(2);
    }

    #[test]
    fn validate_rejects_empty_and_bad_times() {
        assert_eq!(
            ChainCosts::new(vec![], 1, 0).validate(),
            Err(CostsError::Empty)
        );
        let mut costs = ChainCosts::new(vec![stage(3, 1.0), stage(5, 0.5)], 7, 0);
        assert_eq!(costs.validate(), Ok(()));
        costs.stages[1].bwd_s = f64::NAN;
        let err = costs.validate().unwrap_err();
        assert!(err.to_string().contains("stage 1: bwd_s"), "{err}");
        costs.stages[1].bwd_s = -1.0;
        assert!(costs.validate().is_err());
    }

    #[test]
    fn block_starts_default_to_every_stage_and_are_validated() {
        let stages = vec![stage(3, 1.0), stage(5, 0.5), stage(4, 0.5)];
        let costs = ChainCosts::new(stages, 7, 0);
        assert_eq!(costs.block_starts(), vec![0, 1, 2]);
        let same = costs.clone().with_block_starts(vec![0, 1, 2]);
        assert_eq!(same, costs, "every stage a block is the default");
        let halves = costs.clone().with_block_starts(vec![0, 2]);
        assert_eq!(halves.block_starts(), vec![0, 2]);
        assert_eq!(halves.validate(), Ok(()));
        for bad in [vec![1, 2], vec![0, 2, 1], vec![0, 3], vec![0, 0]] {
            let err = costs.clone().with_block_starts(bad.clone()).validate();
            assert!(
                matches!(err, Err(CostsError::BadBlocks { .. })),
                "{bad:?}: {err:?}"
            );
        }
    }
}
