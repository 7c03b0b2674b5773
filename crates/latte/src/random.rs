//! Seeded randomness. candle cannot seed its CPU generator, so everything latte-rs draws
//! (fresh weights, synthetic inputs, diffusion noise) comes from here: a `StdRng` per
//! purpose, derived from the user's seed and a label, so results do not depend on the
//! order in which things are drawn.

use crate::weights::ParamSpec;
use candle_core::{Device, Result, Shape, Tensor};
use candle_nn::Init;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

/// FNV-1a's starting value.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a: `hash` (start from [`FNV_OFFSET`]) continued over `bytes`.
pub fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// A generator for `label` under `seed` (FNV-1a of the label mixed into the seed).
pub fn rng_for(seed: u64, label: &str) -> StdRng {
    let hash = fnv1a(FNV_OFFSET, label.as_bytes());
    StdRng::seed_from_u64(seed ^ hash.rotate_left(17))
}

/// Standard-normal f32 values.
pub fn normal_values(rng: &mut StdRng, count: usize) -> Vec<f32> {
    (0..count).map(|_| StandardNormal.sample(rng)).collect()
}

/// A standard-normal f32 tensor of `shape`.
pub fn randn(rng: &mut StdRng, shape: impl Into<Shape>, device: &Device) -> Result<Tensor> {
    let shape = shape.into();
    Tensor::from_vec(normal_values(rng, shape.elem_count()), shape, device)
}

/// Fresh values for a parameter, following its initialisation hint.
pub fn init_values(spec: &ParamSpec, seed: u64) -> Result<Vec<f32>> {
    let mut rng = rng_for(seed, &spec.name);
    let count = spec.numel();
    Ok(match spec.init {
        Init::Const(value) => vec![value as f32; count],
        Init::Uniform { lo, up } => (0..count)
            .map(|_| rng.random_range(lo as f32..up as f32))
            .collect(),
        Init::Randn { mean, stdev } => normal_values(&mut rng, count)
            .into_iter()
            .map(|z| mean as f32 + stdev as f32 * z)
            .collect(),
        Init::Kaiming { .. } => {
            candle_core::bail!("{}: Kaiming initialisation is not used by Latte", spec.name)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// FNV-1a names the measured-costs cache files and derives every generator: its
    /// values must not change between builds.
    #[test]
    fn fnv1a_gives_the_published_values() {
        assert_eq!(fnv1a(FNV_OFFSET, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(
            fnv1a(fnv1a(FNV_OFFSET, b"a"), b"b"),
            fnv1a(FNV_OFFSET, b"ab")
        );
    }
}
