//! Turning `--checkpoint POLICY` into a schedule for the Latte chain.

use anyhow::Result;
use latte::model::{LatteChain, LatteInputs};
use remat::meter::CpuMeter;
use remat::policy::Policy;
use remat::profile::{resolve_policy, ResolvedPlan};

/// Resolves `policy` for a VJP w.r.t. latents, captions and parameters; `budget:`
/// profiles the chain on `inputs` first.
pub fn schedule_for(
    policy: &Policy,
    chain: &LatteChain<'_>,
    inputs: &LatteInputs,
) -> Result<ResolvedPlan> {
    Ok(resolve_policy(
        policy,
        chain,
        &inputs.to_vec(),
        &[true, false, true],
        &CpuMeter,
    )?)
}
