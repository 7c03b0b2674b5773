//! Turning `--checkpoint POLICY` into a schedule for the Latte chain.

use anyhow::Result;
use latte::model::{LatteChain, LatteInputs};
use remat::meter::MemoryMeter;
use remat::policy::Policy;
use remat::profile::{resolve_policy, ResolvedPlan};

/// Resolves `policy` for a VJP w.r.t. latents, captions and parameters; `budget:`
/// profiles the chain on `inputs` first, measured by `meter` (the inputs' device's).
pub fn schedule_for(
    policy: &Policy,
    chain: &LatteChain<'_>,
    inputs: &LatteInputs,
    meter: &dyn MemoryMeter,
) -> Result<ResolvedPlan> {
    Ok(resolve_policy(
        policy,
        chain,
        &inputs.to_vec(),
        &[true, false, true],
        meter,
    )?)
}
