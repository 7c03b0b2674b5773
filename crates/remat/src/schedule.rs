//! Temporary stand-in until the planner modules land.
use std::fmt;
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    CheckpointForward(usize),
    Forward(usize),
    ForwardKeep(usize),
    Backward(usize),
}
impl Op {
    pub fn stage(&self) -> usize {
        match *self {
            Op::CheckpointForward(i) | Op::Forward(i) | Op::ForwardKeep(i) | Op::Backward(i) => i,
        }
    }
}
impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}
#[derive(Debug, Clone)]
pub struct Schedule {
    ops: Vec<Op>,
}
impl Schedule {
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }
    pub fn store_all(n: usize) -> Self {
        let mut ops: Vec<Op> = (0..n).map(Op::ForwardKeep).collect();
        ops.extend((0..n).rev().map(Op::Backward));
        Self { ops }
    }
    pub fn every(n: usize, k: usize) -> Self {
        let mut ops = Vec::new();
        let starts: Vec<usize> = (0..n).step_by(k).collect();
        for &s in &starts {
            let e = (s + k).min(n);
            ops.push(Op::CheckpointForward(s));
            for i in s + 1..e {
                ops.push(Op::Forward(i));
            }
        }
        for &s in starts.iter().rev() {
            let e = (s + k).min(n);
            for i in s..e {
                ops.push(Op::ForwardKeep(i));
            }
            for i in (s..e).rev() {
                ops.push(Op::Backward(i));
            }
        }
        Self { ops }
    }
}
