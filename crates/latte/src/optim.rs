//! The optimiser side of training, written over candle tensors: AdamW with decoupled
//! weight decay exactly as `torch.optim.AdamW`, f32 master weights for low-precision
//! models, gradient accumulation, clipping by global norm as
//! `torch.nn.utils.clip_grad_norm_`, dynamic loss scaling for f16, linear warm-up and an
//! exponential moving average of the weights.
//!
//! Every state tensor is f32, whatever the precision the model computes in. Parameters
//! are handled in a fixed order (sorted by name), so sums and saved files are reproducible.

use crate::zero::{piece_of, write_piece};
use candle_core::{DType, Result, Shape, Tensor, Var};
use candle_nn::VarMap;
use remat::grads::Gradients;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::ops::Range;

/// The model's trainable parameters, sorted by diffusers name.
pub fn sorted_params(varmap: &VarMap) -> Result<Vec<(String, Var)>> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("parameter map poisoned".into()))?;
    let mut params: Vec<(String, Var)> = data
        .iter()
        .map(|(name, var)| (name.clone(), var.clone()))
        .collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(params)
}

/// Bytes held by a tensor's elements.
pub fn tensor_bytes(t: &Tensor) -> u64 {
    (t.elem_count() * t.dtype().size_in_bytes()) as u64
}

/// Hyper-parameters of [`AdamW`], named as `torch.optim.AdamW`'s.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// Peak learning rate (before warm-up scaling).
    pub lr: f64,
    /// Decay of the first moment.
    pub beta1: f64,
    /// Decay of the second moment.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay: each step multiplies the weights by `1 − lr·weight_decay`.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// torch's defaults.
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

/// One parameter's optimiser state.
#[derive(Debug)]
struct ParamState {
    name: String,
    /// The model's variable, in the compute dtype.
    var: Var,
    /// The flattened elements of `var` this state covers (ZeRO), or all of it (`None`).
    piece: Option<Range<usize>>,
    /// f32 master copy when the model computes in a lower precision.
    master: Option<Tensor>,
    /// First and second moments (f32).
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

impl ParamState {
    /// The f32 weights the optimiser updates.
    fn weights_f32(&self) -> Result<Tensor> {
        match (&self.master, &self.piece) {
            (Some(master), _) => Ok(master.clone()),
            (None, None) => self.var.as_detached_tensor().to_dtype(DType::F32),
            (None, Some(piece)) => piece_of(&self.var.as_detached_tensor(), piece),
        }
    }

    /// Sets the weights to `updated` (f32): the master copy, and the variable (or its
    /// piece, in place) in its dtype.
    fn set_weights(&mut self, updated: Tensor) -> Result<()> {
        match &self.piece {
            None => self.var.set(&updated.to_dtype(self.var.dtype())?)?,
            Some(piece) => write_piece(&self.var, piece, &updated)?,
        }
        if let Some(master) = &mut self.master {
            *master = updated;
        }
        Ok(())
    }
}

/// AdamW (Loshchilov & Hutter), step for step as `torch.optim.AdamW` (non-amsgrad,
/// single-tensor path):
///
/// ```text
/// θ ← θ·(1 − lr·λ)
/// m ← β₁·m + (1 − β₁)·g          v ← β₂·v + (1 − β₂)·g²
/// θ ← θ − lr/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)
/// ```
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    params: Vec<ParamState>,
    /// Steps taken (t of the bias corrections).
    steps: u64,
}

impl AdamW {
    /// An optimiser for `params` with zero moments. With `master_weights` (f32 values by
    /// parameter name), an f32 master copy of each weight is kept and updated, and the
    /// (low-precision) variable is set from it after each step.
    pub fn new(
        params: &[(String, Var)],
        config: AdamWConfig,
        master_weights: Option<&[(String, Tensor)]>,
    ) -> Result<Self> {
        let whole = vec![None; params.len()];
        Self::with_pieces(params, &whole, config, master_weights)
    }

    /// An optimiser for pieces of `params` (ZeRO, [`crate::zero::Partition`]): the state of
    /// each parameter covers the flattened elements `pieces[i]` (`None`: all of them), a
    /// step writes those elements of the variable in place, and the state tensors are
    /// one-dimensional, the piece's length. `master_weights` are whole parameters; the
    /// optimiser keeps its pieces.
    pub fn with_pieces(
        params: &[(String, Var)],
        pieces: &[Option<Range<usize>>],
        config: AdamWConfig,
        master_weights: Option<&[(String, Tensor)]>,
    ) -> Result<Self> {
        if pieces.len() != params.len() {
            candle_core::bail!("{} pieces for {} parameters", pieces.len(), params.len());
        }
        let masters: Option<HashMap<&str, &Tensor>> =
            master_weights.map(|m| m.iter().map(|(n, t)| (n.as_str(), t)).collect());
        let params = params
            .iter()
            .zip(pieces)
            .map(|((name, var), piece)| {
                let t = var.as_tensor();
                let master = match &masters {
                    Some(masters) => {
                        let m = masters.get(name.as_str()).ok_or_else(|| {
                            candle_core::Error::Msg(format!("no master weight for `{name}`"))
                        })?;
                        if m.shape() != t.shape() {
                            candle_core::bail!(
                                "master weight `{name}` has shape {:?}, the parameter {:?}",
                                m.dims(),
                                t.dims()
                            );
                        }
                        let m = m.to_device(t.device())?;
                        Some(match piece {
                            Some(piece) => piece_of(&m, piece)?,
                            None => m.to_dtype(DType::F32)?.copy()?,
                        })
                    }
                    None => None,
                };
                let shape = match piece {
                    Some(piece) => Shape::from(piece.len()),
                    None => t.shape().clone(),
                };
                Ok(ParamState {
                    name: name.clone(),
                    var: var.clone(),
                    piece: piece.clone(),
                    master,
                    exp_avg: Tensor::zeros(&shape, DType::F32, t.device())?,
                    exp_avg_sq: Tensor::zeros(&shape, DType::F32, t.device())?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config,
            params,
            steps: 0,
        })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Parameter names, in the order gradients are expected.
    pub fn names(&self) -> Vec<&str> {
        self.params.iter().map(|p| p.name.as_str()).collect()
    }

    /// Whether f32 master weights are kept.
    pub fn has_master_weights(&self) -> bool {
        self.params.iter().any(|p| p.master.is_some())
    }

    /// The f32 weights (the master copies, or the variables themselves when f32), by name.
    pub fn weights_f32(&self) -> Result<Vec<(String, Tensor)>> {
        self.params
            .iter()
            .map(|p| Ok((p.name.clone(), p.weights_f32()?)))
            .collect()
    }

    /// Bytes of the optimiser's own state: moments and master weights.
    pub fn state_bytes(&self) -> u64 {
        self.params
            .iter()
            .map(|p| {
                tensor_bytes(&p.exp_avg)
                    + tensor_bytes(&p.exp_avg_sq)
                    + p.master.as_ref().map_or(0, tensor_bytes)
            })
            .sum()
    }

    /// Bytes of the model's weights (in the compute dtype).
    pub fn weight_bytes(&self) -> u64 {
        self.params
            .iter()
            .map(|p| tensor_bytes(p.var.as_tensor()))
            .sum()
    }

    /// Number of scalar parameters.
    pub fn num_scalars(&self) -> usize {
        self.params
            .iter()
            .map(|p| p.var.as_tensor().elem_count())
            .sum()
    }

    /// One AdamW step with learning rate `lr`; `grads` are f32, in [`AdamW::names`] order.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        if grads.len() != self.params.len() {
            candle_core::bail!(
                "{} gradients for {} parameters",
                grads.len(),
                self.params.len()
            );
        }
        self.steps += 1;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
            ..
        } = self.config;
        let t = self.steps as i32;
        let bias_correction1 = 1.0 - beta1.powi(t);
        let bias_correction2_sqrt = (1.0 - beta2.powi(t)).sqrt();
        let step_size = lr / bias_correction1;
        for (p, g) in self.params.iter_mut().zip(grads) {
            let g = g.to_dtype(DType::F32)?;
            let decayed = p.weights_f32()?.affine(1.0 - lr * weight_decay, 0.0)?;
            p.exp_avg = (p.exp_avg.affine(beta1, 0.0)? + g.affine(1.0 - beta1, 0.0)?)?;
            p.exp_avg_sq =
                (p.exp_avg_sq.affine(beta2, 0.0)? + g.sqr()?.affine(1.0 - beta2, 0.0)?)?;
            let denom = (p.exp_avg_sq.sqrt()? / bias_correction2_sqrt)?.affine(1.0, eps)?;
            let updated = (decayed - (p.exp_avg.div(&denom)? * step_size)?)?;
            p.set_weights(updated)?;
        }
        Ok(())
    }

    /// The state to save: `exp_avg.<name>`, `exp_avg_sq.<name>` and, with master weights,
    /// `master.<name>` (all f32).
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for p in &self.params {
            out.insert(format!("exp_avg.{}", p.name), p.exp_avg.clone());
            out.insert(format!("exp_avg_sq.{}", p.name), p.exp_avg_sq.clone());
            if let Some(master) = &p.master {
                out.insert(format!("master.{}", p.name), master.clone());
            }
        }
        out
    }

    /// Restores saved state ([`AdamW::state_tensors`] of whole parameters; an optimiser of
    /// pieces takes its pieces) after `steps` steps; master weights, when kept and saved,
    /// are restored too and the variables set from them (a state saved without them, by
    /// an f32 run, keeps the current ones). Errors name the missing or mis-shaped tensor.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, steps: u64) -> Result<()> {
        for p in &mut self.params {
            let shape = p.var.shape().clone();
            let device = p.var.device().clone();
            let piece = p.piece.clone();
            let get = |key: String| -> Result<Tensor> {
                let t = tensors.get(&key).ok_or_else(|| {
                    candle_core::Error::Msg(format!("optimizer state has no `{key}`"))
                })?;
                if t.shape() != &shape {
                    candle_core::bail!(
                        "optimizer state `{key}` has shape {:?}, the parameter {:?}",
                        t.dims(),
                        shape.dims()
                    );
                }
                let t = t.to_device(&device)?;
                match &piece {
                    Some(piece) => piece_of(&t, piece),
                    None => t.to_dtype(DType::F32),
                }
            };
            p.exp_avg = get(format!("exp_avg.{}", p.name))?;
            p.exp_avg_sq = get(format!("exp_avg_sq.{}", p.name))?;
            let master_key = format!("master.{}", p.name);
            if p.master.is_some() && tensors.contains_key(&master_key) {
                let master = get(master_key)?;
                p.set_weights(master)?;
            }
        }
        self.steps = steps;
        Ok(())
    }
}

/// Sums gradients over micro-batches, in f32, in parameter order.
#[derive(Debug, Default)]
pub struct GradAccumulator {
    sums: Vec<Option<Tensor>>,
}

impl GradAccumulator {
    /// An empty accumulator.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the parameter gradients of one backward pass. A parameter the loss does not
    /// reach (e.g. temporal blocks with temporal attention off) adds nothing.
    pub fn add(&mut self, params: &[(String, Var)], grads: &Gradients) -> Result<()> {
        if self.sums.is_empty() {
            self.sums = vec![None; params.len()];
        }
        for ((_, var), sum) in params.iter().zip(self.sums.iter_mut()) {
            let Some(g) = grads.params.get(var.as_tensor()) else {
                continue;
            };
            let g = g.to_dtype(DType::F32)?;
            *sum = Some(match sum.take() {
                Some(s) => (s + g)?,
                None => g,
            });
        }
        Ok(())
    }

    /// The sums, zeros for parameters that got no gradient.
    pub fn finish(self, params: &[(String, Var)]) -> Result<Vec<Tensor>> {
        let mut sums = self.sums;
        sums.resize(params.len(), None);
        params
            .iter()
            .zip(sums)
            .map(|((_, var), sum)| match sum {
                Some(s) => Ok(s),
                None => Tensor::zeros(var.shape(), DType::F32, var.device()),
            })
            .collect()
    }
}

/// The square of the global L2 norm of `grads`: the per-tensor norms (in f32), squared and
/// added in f64. Data-parallel ranks holding pieces of the gradients add theirs.
pub fn grad_sum_of_squares(grads: &[Tensor]) -> Result<f64> {
    let mut sum_sq = 0f64;
    for g in grads {
        let norm = f64::from(
            g.to_dtype(DType::F32)?
                .sqr()?
                .sum_all()?
                .sqrt()?
                .to_scalar::<f32>()?,
        );
        sum_sq += norm * norm;
    }
    Ok(sum_sq)
}

/// The global L2 norm of `grads` (torch's `clip_grad_norm_` norm): the norm of the
/// per-tensor norms, accumulated in f64.
pub fn global_grad_norm(grads: &[Tensor]) -> Result<f64> {
    Ok(grad_sum_of_squares(grads)?.sqrt())
}

/// `torch.nn.utils.clip_grad_norm_`: scales `grads` by `max_norm / (norm + 1e-6)` when
/// that is below 1. Returns the norm before clipping (non-finite norms are returned
/// unchanged and nothing is scaled).
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = global_grad_norm(grads)?;
    clip_to_norm(grads, norm, max_norm)?;
    Ok(norm)
}

/// [`clip_grad_norm`] with the norm known (computed over every rank's pieces): scales
/// `grads` by `max_norm / (norm + 1e-6)` when that is below 1 and `norm` is finite.
pub fn clip_to_norm(grads: &mut [Tensor], norm: f64, max_norm: f64) -> Result<()> {
    if !norm.is_finite() {
        return Ok(());
    }
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            *g = g.affine(coef, 0.0)?;
        }
    }
    Ok(())
}

/// The learning rate at optimiser step `step` (0-based): linear warm-up from
/// `base_lr / warmup_steps` to `base_lr` over `warmup_steps` steps, then constant.
pub fn warmup_lr(base_lr: f64, step: u64, warmup_steps: u64) -> f64 {
    if warmup_steps == 0 {
        base_lr
    } else {
        base_lr * ((step + 1) as f64 / warmup_steps as f64).min(1.0)
    }
}

/// An exponential moving average of the weights, in f32, with diffusers' `EMAModel`
/// warm-up: update `k` (1-based) uses decay `min(decay, (1 + k)/(10 + k))`, so that a
/// short run's average is not stuck at the initial weights.
#[derive(Debug)]
pub struct Ema {
    decay: f64,
    weights: Vec<(String, Tensor)>,
    updates: u64,
}

impl Ema {
    /// An average starting at `weights` (f32 copies are taken).
    pub fn new(weights: &[(String, Tensor)], decay: f64) -> Result<Self> {
        let weights = weights
            .iter()
            .map(|(name, w)| Ok((name.clone(), w.to_dtype(DType::F32)?.copy()?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            decay,
            weights,
            updates: 0,
        })
    }

    /// The decay used by update number `update` (1-based).
    pub fn decay_at(&self, update: u64) -> f64 {
        self.decay
            .min((1.0 + update as f64) / (10.0 + update as f64))
    }

    /// `ema ← d·ema + (1 − d)·w` for the current weights (same order as at creation).
    pub fn update(&mut self, weights: &[(String, Tensor)]) -> Result<()> {
        self.updates += 1;
        let decay = self.decay_at(self.updates);
        for ((_, ema), (_, w)) in self.weights.iter_mut().zip(weights) {
            *ema = (ema.affine(decay, 0.0)? + w.to_dtype(DType::F32)?.affine(1.0 - decay, 0.0)?)?;
        }
        Ok(())
    }

    /// The averaged weights, by name.
    pub fn weights(&self) -> &[(String, Tensor)] {
        &self.weights
    }

    /// Updates taken.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.weights.iter().map(|(_, w)| tensor_bytes(w)).sum()
    }

    /// Restores saved averages after `updates` updates; errors name what is missing.
    pub fn load(&mut self, tensors: &HashMap<String, Tensor>, updates: u64) -> Result<()> {
        for (name, ema) in &mut self.weights {
            let t = tensors
                .get(name)
                .ok_or_else(|| candle_core::Error::Msg(format!("EMA weights have no `{name}`")))?;
            if t.shape() != ema.shape() {
                candle_core::bail!(
                    "EMA weight `{name}` has shape {:?}, expected {:?}",
                    t.dims(),
                    ema.dims()
                );
            }
            *ema = t.to_dtype(DType::F32)?.to_device(ema.device())?;
        }
        self.updates = updates;
        Ok(())
    }
}

/// Loss scaling for f16 training (as torch's `GradScaler`): the loss gradient is
/// multiplied by `scale` so that small gradients survive f16; a step whose gradients
/// overflow is skipped and the scale halved; after `growth_interval` good steps in a row
/// the scale doubles. Disabled, the scale is 1 and nothing is ever skipped.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    /// Current scale (a power of two).
    pub scale: f64,
    /// Whether scaling is dynamic (f16) or fixed at 1.
    pub dynamic: bool,
    /// Good steps since the last overflow or growth.
    pub good_steps: u64,
    /// Steps skipped because of overflow, in total.
    pub skipped_steps: u64,
    /// Good steps between doublings.
    pub growth_interval: u64,
}

impl LossScaler {
    /// No scaling (f32, bf16).
    pub fn disabled() -> Self {
        Self {
            scale: 1.0,
            dynamic: false,
            good_steps: 0,
            skipped_steps: 0,
            growth_interval: 2000,
        }
    }

    /// Dynamic scaling from 2¹⁶, doubling after 2000 good steps (f16).
    pub fn dynamic() -> Self {
        Self {
            scale: 65536.0,
            dynamic: true,
            ..Self::disabled()
        }
    }

    /// Records the outcome of a step: on overflow the step is skipped (returns false) and
    /// the scale halved; otherwise counts a good step and grows the scale when due.
    pub fn update(&mut self, overflow: bool) -> bool {
        if !self.dynamic {
            return !overflow;
        }
        if overflow {
            self.scale /= 2.0;
            self.good_steps = 0;
            self.skipped_steps += 1;
            return false;
        }
        self.good_steps += 1;
        if self.good_steps >= self.growth_interval {
            self.scale *= 2.0;
            self.good_steps = 0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn warmup_is_linear_then_constant() {
        assert_eq!(warmup_lr(1.0, 0, 4), 0.25);
        assert_eq!(warmup_lr(1.0, 3, 4), 1.0);
        assert_eq!(warmup_lr(1.0, 10, 4), 1.0);
        assert_eq!(warmup_lr(2.0, 0, 0), 2.0);
    }

    #[test]
    fn loss_scaler_halves_on_overflow_and_doubles_after_good_steps() {
        let mut s = LossScaler::dynamic();
        s.growth_interval = 3;
        assert!(!s.update(true));
        assert_eq!((s.scale, s.skipped_steps), (32768.0, 1));
        for _ in 0..3 {
            assert!(s.update(false));
        }
        assert_eq!(s.scale, 65536.0);
        let mut fixed = LossScaler::disabled();
        assert!(fixed.update(false));
        assert_eq!(fixed.scale, 1.0);
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let dev = Device::Cpu;
        let mut grads = vec![
            Tensor::new(&[3f32, 0.0], &dev).unwrap(),
            Tensor::new(&[4f32], &dev).unwrap(),
        ];
        let norm = clip_grad_norm(&mut grads, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        let clipped = global_grad_norm(&grads).unwrap();
        assert!((clipped - 1.0).abs() < 1e-5, "{clipped}");
    }

    #[test]
    fn ema_warms_up_like_diffusers() {
        let dev = Device::Cpu;
        let w = vec![("w".to_string(), Tensor::new(&[0f32], &dev).unwrap())];
        let mut ema = Ema::new(&w, 0.9999).unwrap();
        assert!((ema.decay_at(1) - 2.0 / 11.0).abs() < 1e-12);
        let one = vec![("w".to_string(), Tensor::new(&[1f32], &dev).unwrap())];
        ema.update(&one).unwrap();
        let v = ema.weights()[0].1.to_vec1::<f32>().unwrap()[0];
        assert!((f64::from(v) - 9.0 / 11.0).abs() < 1e-6);
    }
}
