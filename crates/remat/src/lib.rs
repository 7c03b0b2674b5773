//! # remat — memory-planned reverse mode on candle
//!
//! Runs any model written as a chain (`head → stages → tail` with a shared context, see
//! [`chain`]) forward and backward under a checkpoint [`schedule`]: each stage keeps its
//! whole autograd graph, keeps only its input, or keeps nothing and is recomputed from an
//! earlier checkpoint. Gradients are exact whatever the schedule. The [`planner`] finds
//! the cheapest schedule whose peak fits a memory budget (rotor's dynamic program over
//! measured per-stage costs), and the [`meter`] measures live memory exactly.
//!
//! remat knows nothing about any particular model.

pub mod chain;
pub mod costs;
pub mod grads;
pub mod host_heap;
pub mod meter;
pub mod planner;
pub mod policy;
pub mod profile;
pub mod schedule;
