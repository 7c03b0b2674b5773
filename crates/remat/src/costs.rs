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
        /// Name of the offending field (`fwd_s` or `bwd_s`).
        field: &'static str,
        /// The offending value.
        value: f64,
    },
}

impl ChainCosts {
    /// Builds chain costs from its parts.
    pub fn new(stages: Vec<StageCosts>, output_bytes: u64, reserved_bytes: u64) -> Self {
        Self {
            stages,
            output_bytes,
            reserved_bytes,
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

    /// Checks that the chain is non-empty and that every time is a finite,
    /// non-negative number.
    pub fn validate(&self) -> Result<(), CostsError> {
        if self.stages.is_empty() {
            return Err(CostsError::Empty);
        }
        for (stage, costs) in self.stages.iter().enumerate() {
            for (field, value) in [("fwd_s", costs.fwd_s), ("bwd_s", costs.bwd_s)] {
                if !(value.is_finite() && value >= 0.0) {
                    return Err(CostsError::BadTime {
                        stage,
                        field,
                        value,
                    });
                }
            }
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
}
