//! Text-to-video sampling with DDIM, classifier-free guidance batched `[negative,
//! positive]` exactly as diffusers' `LattePipeline`, and gradient guidance through the
//! transformer under a memory plan.
//!
//! ## The guided step (universal-guidance style)
//!
//! With CFG scale w, the model runs on the batch `[x_t, x_t]` with captions
//! `[negative, positive]`; ε_u, ε_c are the first `in_channels` of each output (a
//! learned-variance model's second half is ignored, as the pipeline does for DDIM) and
//! ε̂ = ε_u + w (ε_c − ε_u). The predicted clean video is
//! x̂₀ = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t, and for an objective L(x̂₀) with g = ∂L/∂x̂₀:
//!
//! ∇_{x_t} L = g / √ᾱ_t + J_ε̂(x_t)ᵀ v,   v = −√(1−ᾱ_t)/√ᾱ_t · g,
//!
//! and J_ε̂ᵀ v = (1−w) J_{ε_u}ᵀ v + w J_{ε_c}ᵀ v. Both Jacobians are taken in one
//! backward pass through the batched model: the output's upstream gradient is
//! `[(1−w) v, w v]` on the ε channels (zero on the variance channels), and the two halves
//! of the input gradient (both copies of x_t) are summed. Without CFG (w ≤ 1) the batch is
//! `[x_t]` with weight 1. The backward runs under a `remat` schedule with gradients for
//! the latents only (the weights are frozen tensors).
//!
//! The correction is a step on the predicted clean video, x̂₀' = x̂₀ − s·η_t·d_t, with
//! ε̂ re-derived from it so that the DDIM step sees x̂₀':
//!
//! d_t = √ᾱ_t ∇_{x_t} L = (I − √(1−ᾱ_t) J_ε̂)ᵀ g,   η_t = L / ‖g‖²,
//! ε̂' = (x_t − √ᾱ_t x̂₀') / √(1−ᾱ_t) = ε̂ + s·η_t·√ᾱ_t/√(1−ᾱ_t) · d_t.
//!
//! d_t is the guidance gradient in x̂₀'s units: g pulled back through the denoiser (at low
//! noise d_t ≈ g; at high noise the model's Jacobian cancels most of it). η_t is Polyak's
//! step size for an objective whose minimum is 0 (all the built-ins): the step that would
//! bring L to 0 if it were linear in x̂₀, so the step shrinks as L falls and does not
//! depend on L's units; for a squared error, s = 1 moves x̂₀ halfway to the target and
//! s < 2 never overshoots. s = `--guide-scale`. This is universal guidance's forward step
//! ε̂ + λ_t √(1−ᾱ_t) ∇_{x_t} L (Bansal et al. 2023, arXiv 2302.07121) with the strength
//! λ_t = s·η_t·ᾱ_t/(1−ᾱ_t) set per step instead of a constant λ: with a constant, x̂₀ moves
//! by λ(1−ᾱ_t)/√ᾱ_t ∇_{x_t} L ≈ λ(1−ᾱ_t)/ᾱ_t g, some 10⁴ λ g at the noisiest steps of
//! the linear schedule; x̂₀ then leaves [−1, 1], is clipped, and only the ε̂ part of the
//! correction survives, which moves x_{t−1} up the objective. Like DPS (Chung et al. 2023,
//! arXiv 2209.14687), the step is normalised by the objective rather than tuned per
//! timestep.

use crate::config::{InputGeometry, LatteConfig};
use crate::costs::{Kernels, Memory};
use crate::guide::{value_and_grad, Objective};
use crate::model::{Latte, LatteInputs};
use crate::plan::{Task, Workload};
use crate::random::{randn, rng_for};
use crate::scheduler::{epsilon_channels, Ddim, DdimConfig};
use candle_core::{DType, Result, Tensor};
use remat::meter::{PhaseSink, PhaseSinkExt};
use remat::schedule::Schedule;
use std::ops::Range;

/// How to sample.
#[derive(Debug, Clone)]
pub struct SampleOptions {
    /// Number of DDIM steps (default 50).
    pub steps: usize,
    /// Classifier-free guidance scale w; CFG is on when w > 1 (default 7.5).
    pub guidance_scale: f64,
    /// DDIM η (0: deterministic; default 0).
    pub eta: f64,
    /// Seed of the η noise.
    pub seed: u64,
    /// The DDIM scheduler.
    pub ddim: DdimConfig,
    /// Run the temporal blocks (diffusers' `enable_temporal_attentions`).
    pub temporal: bool,
}

impl Default for SampleOptions {
    fn default() -> Self {
        Self {
            steps: 50,
            guidance_scale: 7.5,
            eta: 0.0,
            seed: 0,
            ddim: DdimConfig::default(),
            temporal: true,
        }
    }
}

/// Gradient guidance: an objective, its scale s and the steps (indices into the timestep
/// list, 0 = first, noisiest) where it applies.
pub struct Guidance<'a> {
    /// The objective on x̂₀.
    pub objective: &'a dyn Objective,
    /// The scale s of the correction: the fraction of Polyak's step x̂₀ moves per guided
    /// step (1: halfway to a squared-error objective's target; see the module doc).
    pub scale: f64,
    /// Step indices where guidance applies.
    pub steps: Range<usize>,
    /// The memory plan for the backward pass (see [`guide_workload`] and [`crate::plan::plan_run`]).
    pub schedule: &'a Schedule,
}

/// What one step did, for progress reports.
#[derive(Debug, Clone, Copy)]
pub struct StepReport {
    /// Step index (0 = first).
    pub index: usize,
    /// The diffusion timestep.
    pub timestep: usize,
    /// The objective on x̂₀ at a guided step.
    pub objective: Option<f64>,
}

/// Classifier-free guidance batch: captions `[negative, positive]` (or `[positive]`).
fn caption_batch(negative: &Tensor, positive: &Tensor, cfg: bool) -> Result<Tensor> {
    if cfg {
        Tensor::cat(&[negative, positive], 0)
    } else {
        Ok(positive.clone())
    }
}

/// The model inputs for `latents` `(1, c, f, h, w)` at timestep `t`, batched for CFG.
fn batch_inputs(latents: &Tensor, t: usize, captions: &Tensor) -> Result<LatteInputs> {
    let b = captions.dim(0)?;
    let hidden_states = if b == 1 {
        latents.clone()
    } else {
        Tensor::cat(&vec![latents; b], 0)?
    };
    Ok(LatteInputs {
        hidden_states,
        timestep: Tensor::new(vec![t as i64; b], latents.device())?,
        encoder_hidden_states: captions.clone(),
    })
}

/// ε̂ from a batched model output: ε_u + w (ε_c − ε_u), or ε for a single batch.
fn combine(output: &Tensor, in_channels: usize, guidance_scale: f64) -> Result<Tensor> {
    let eps = epsilon_channels(output, in_channels)?;
    if eps.dim(0)? == 1 {
        return Ok(eps);
    }
    let (u, c) = (eps.narrow(0, 0, 1)?, eps.narrow(0, 1, 1)?);
    &u + ((c - &u)? * guidance_scale)?
}

/// The workload of a guided step for [`crate::plan`]: one video of `frames` ×
/// `height` × `width` latents, captions of `caption_tokens` tokens, classifier-free
/// guidance when `guidance_scale` > 1.
pub fn guide_workload(
    config: &LatteConfig,
    (frames, height, width): (usize, usize, usize),
    caption_tokens: usize,
    guidance_scale: f64,
    temporal: bool,
    device: &candle_core::Device,
) -> Workload {
    Workload {
        config: config.clone(),
        geometry: InputGeometry {
            batch: 1,
            frames,
            height,
            width,
            caption_tokens,
        },
        task: Task::Guide {
            cfg: guidance_scale > 1.0,
        },
        kernels: Kernels::active(device),
        memory: Memory::of(device),
        temporal,
        lora: None,
    }
}

/// One guided evaluation at `x_t`: ε̂ (CFG-combined), the objective on x̂₀ and
/// ∇_{x_t} L through the transformer (see the module doc for the math).
#[derive(Debug, Clone)]
pub struct GuidedEval {
    /// ε̂ before the correction.
    pub eps: Tensor,
    /// L(x̂₀).
    pub objective: f64,
    /// ∇_{x_t} L.
    pub grad_latents: Tensor,
    /// g = ∂L/∂x̂₀.
    pub grad_x0: Tensor,
}

/// Evaluates ε̂, L(x̂₀) and ∇_{x_t} L at `latents` = x_t, timestep `t` with ᾱ_t.
#[allow(clippy::too_many_arguments)]
pub fn guided_eval(
    model: &Latte,
    latents: &Tensor,
    t: usize,
    alpha_cumprod: f64,
    captions: &Tensor,
    guidance_scale: f64,
    objective: &dyn Objective,
    schedule: &Schedule,
    temporal: bool,
    phases: &mut dyn PhaseSink,
) -> Result<GuidedEval> {
    let c = model.config().in_channels;
    let inputs = batch_inputs(latents, t, captions)?;
    let chain = model.chain(temporal);
    let tape = remat::grads::forward(
        &chain,
        &inputs.to_vec(),
        &[true, false, false],
        schedule,
        phases,
    )?;
    let output = tape.output().clone();
    let eps = combine(&output, c, guidance_scale)?;
    let (sa, sb) = (alpha_cumprod.sqrt(), (1.0 - alpha_cumprod).sqrt());
    let x0 = ((latents - (&eps * sb)?)? / sa)?;
    let (value, g) = value_and_grad(objective, &x0)?;
    let v = (&g * (-sb / sa))?;
    let b = output.dim(0)?;
    let weights: Vec<f64> = if b == 1 {
        vec![1.0]
    } else {
        vec![1.0 - guidance_scale, guidance_scale]
    };
    let mut pieces = Vec::with_capacity(b);
    for w in &weights {
        let eps_part = (&v * *w)?;
        let rest = output.dim(1)? - c;
        pieces.push(if rest > 0 {
            let mut dims = eps_part.dims().to_vec();
            dims[1] = rest;
            Tensor::cat(
                &[
                    &eps_part,
                    &Tensor::zeros(dims, eps_part.dtype(), eps_part.device())?,
                ],
                1,
            )?
        } else {
            eps_part
        });
    }
    let grad_output = Tensor::cat(&pieces, 0)?.to_dtype(output.dtype())?;
    // Through the backward only ε̂, ∂L/∂x̂₀ and the upstream gradient stay alive (what
    // `plan::MemoryAccount` counts for a guided step).
    drop((pieces, v, x0, output));
    let grads = tape.backward(&grad_output, phases)?;
    let grad_inputs = grads.inputs[0]
        .clone()
        .ok_or_else(|| candle_core::Error::Msg("no gradient for the latents".into()))?;
    let mut through_model = grad_inputs.narrow(0, 0, 1)?;
    for k in 1..b {
        through_model = (through_model + grad_inputs.narrow(0, k, 1)?)?;
    }
    let grad_latents = ((&g / sa)? + through_model.to_dtype(g.dtype())?)?;
    Ok(GuidedEval {
        eps,
        objective: value,
        grad_latents,
        grad_x0: g,
    })
}

/// ε̂' of a guided step with scale s: x̂₀ moves by −s·η·d with d = √ᾱ ∇_{x_t} L and
/// Polyak's η = L/‖g‖² (see the module doc). A zero g or a zero L leaves ε̂ unchanged.
pub fn guided_epsilon(eval: &GuidedEval, alpha_cumprod: f64, scale: f64) -> Result<Tensor> {
    let g_norm_sq = eval
        .grad_x0
        .sqr()?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    if scale == 0.0 || eval.objective <= 0.0 || g_norm_sq <= 0.0 || !g_norm_sq.is_finite() {
        return Ok(eval.eps.clone());
    }
    let eta = eval.objective / g_norm_sq;
    let (sa, sb) = (alpha_cumprod.sqrt(), (1.0 - alpha_cumprod).sqrt());
    // ε̂ + s·η·√ᾱ/√(1−ᾱ) · d with d = √ᾱ ∇_{x_t} L.
    &eval.eps + (&eval.grad_latents * (scale * eta * sa * sa / sb))?
}

/// Standard-normal initial latents `(1, c, f, h, w)` from `seed`.
pub fn initial_noise(
    seed: u64,
    dims: (usize, usize, usize, usize, usize),
    device: &candle_core::Device,
) -> Result<Tensor> {
    randn(&mut rng_for(seed, "sample/init-noise"), dims, device)
}

/// Runs DDIM from `init_noise` `(1, c, f, h, w)` with captions `(1, l, d)`; returns the
/// final latents. `on_step` is called after every step.
#[allow(clippy::too_many_arguments)]
pub fn sample(
    model: &Latte,
    init_noise: &Tensor,
    negative: &Tensor,
    positive: &Tensor,
    options: &SampleOptions,
    guidance: Option<&Guidance<'_>>,
    phases: &mut dyn PhaseSink,
    on_step: &mut dyn FnMut(StepReport),
) -> Result<Tensor> {
    let cfg = options.guidance_scale > 1.0;
    let captions = caption_batch(negative, positive, cfg)?;
    let mut ddim = Ddim::new(options.ddim.clone());
    let timesteps = ddim.set_timesteps(options.steps)?.to_vec();
    let c = model.config().in_channels;
    let mut latents = init_noise.to_dtype(DType::F32)?;
    for (index, &t) in timesteps.iter().enumerate() {
        phases.phase_with(|| format!("step {index}"));
        let alpha = ddim.alpha_cumprod(t);
        let guided = guidance.filter(|g| g.steps.contains(&index) && g.scale != 0.0);
        let (eps, objective) = match guided {
            Some(g) => {
                let eval = guided_eval(
                    model,
                    &latents,
                    t,
                    alpha,
                    &captions,
                    options.guidance_scale,
                    g.objective,
                    g.schedule,
                    options.temporal,
                    phases,
                )?;
                let eps = guided_epsilon(&eval, alpha, g.scale)?;
                (eps, Some(eval.objective))
            }
            None => {
                let inputs = batch_inputs(&latents, t, &captions)?;
                let output = model.forward(&inputs, options.temporal)?;
                (combine(&output, c, options.guidance_scale)?, None)
            }
        };
        let noise = if options.eta > 0.0 {
            let mut rng = rng_for(options.seed, &format!("sample/eta/{index}"));
            Some(randn(&mut rng, latents.dims(), latents.device())?)
        } else {
            None
        };
        latents = ddim
            .step(&eps, t, &latents, options.eta, noise.as_ref())?
            .prev_sample;
        on_step(StepReport {
            index,
            timestep: t,
            objective,
        });
    }
    Ok(latents)
}
