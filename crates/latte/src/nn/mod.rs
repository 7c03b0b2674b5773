//! Building blocks of the Latte transformer, each differentiable end to end.

pub mod attention;
pub mod block;
pub mod embeddings;
pub mod feed_forward;
pub mod fused_attention;
pub mod fused_norm;
pub mod gated_linear;
pub mod linear;
pub mod matrix;
pub mod norm;
pub mod ops;
mod simd;
#[cfg(test)]
mod test_support;
