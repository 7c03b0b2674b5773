//! The vector-Jacobian product of the transformer: the output `sample` and the gradients
//! of `⟨sample, grad_sample⟩` w.r.t. the latents, the caption embeddings and every
//! parameter — the contract `latte forward --vjp` exposes to check against PyTorch.

use crate::model::{Latte, LatteInputs};
use candle_core::{Result, Tensor};
use candle_nn::VarMap;
use remat::grads;
use remat::meter::PhaseSink;
use remat::schedule::Schedule;

/// Output and gradients of one VJP.
#[derive(Debug)]
pub struct Vjp {
    /// The model output `(b, out_channels, f, h, w)`.
    pub sample: Tensor,
    /// Gradient w.r.t. `hidden_states`.
    pub hidden_states: Tensor,
    /// Gradient w.r.t. `encoder_hidden_states`.
    pub encoder_hidden_states: Tensor,
    /// Gradient w.r.t. every parameter, by diffusers name, sorted by name.
    pub params: Vec<(String, Tensor)>,
}

/// Runs the model forward and backward under `schedule`, with the parameters of
/// `varmap` (the [`Var`](candle_core::Var)s `model` was built from).
pub fn vjp(
    model: &Latte,
    varmap: &VarMap,
    inputs: &LatteInputs,
    grad_sample: &Tensor,
    temporal: bool,
    schedule: &Schedule,
    phases: &mut dyn PhaseSink,
) -> Result<Vjp> {
    let chain = model.chain(temporal);
    let tape = grads::forward(
        &chain,
        &inputs.to_vec(),
        &[true, false, true],
        schedule,
        phases,
    )?;
    let sample = tape.output().detach();
    let grads = tape.backward(grad_sample, phases)?;
    let missing = |what: &str| candle_core::Error::Msg(format!("no gradient for {what}"));
    let hidden_states = grads.inputs[0]
        .clone()
        .ok_or_else(|| missing("hidden_states"))?;
    let encoder_hidden_states = grads.inputs[2]
        .clone()
        .ok_or_else(|| missing("encoder_hidden_states"))?;
    let data = varmap
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("parameter map poisoned".into()))?;
    let mut params = Vec::with_capacity(data.len());
    for (name, var) in data.iter() {
        let grad = match grads.params.get(var.as_tensor()) {
            Some(g) => g.clone(),
            // A parameter the output does not depend on (e.g. temporal blocks when
            // temporal attention is off) has a zero gradient.
            None => var.as_tensor().zeros_like()?,
        };
        params.push((name.clone(), grad));
    }
    params.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Vjp {
        sample,
        hidden_states,
        encoder_hidden_states,
        params,
    })
}
