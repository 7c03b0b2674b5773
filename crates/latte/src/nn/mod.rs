//! Building blocks of the Latte transformer, each differentiable end to end. Ops whose
//! memory matters have two implementations, chosen per thread ([`kernels::Kernels`]):
//! fused CPU kernels, and device-generic tensor ops.

pub mod attention;
pub mod block;
pub mod chunked_attention;
pub mod embeddings;
pub mod feed_forward;
pub mod fused_attention;
pub mod fused_norm;
pub mod gated_linear;
pub mod generic_gated_linear;
pub mod kernels;
pub mod linear;
pub mod low_rank;
pub mod matrix;
pub mod norm;
pub mod ops;
mod simd;
#[cfg(test)]
mod test_support;
