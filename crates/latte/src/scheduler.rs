//! Samplers compatible with diffusers 0.42.1's `DDIMScheduler` and `DDPMScheduler`:
//! the same timestep grids (`leading`, `trailing`, `linspace` spacing, `steps_offset`) and
//! the same update rules (ε, sample and v prediction, clipping, η-noise, learned-range
//! variances). The coefficients are computed as diffusers does, from `alphas_cumprod` in
//! f32, then applied to the tensors in their dtype. `tools/make_sampler_fixtures.py`
//! writes the parity fixtures (`tests/fixtures/schedulers/`).

use candle_core::{Result, Tensor};
use std::fmt;
use std::str::FromStr;

/// How β_t grows with t.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BetaSchedule {
    /// β evenly spaced from `beta_start` to `beta_end` (diffusers' default; Latte's).
    #[default]
    Linear,
    /// √β evenly spaced (Stable Diffusion's `scaled_linear`).
    ScaledLinear,
}

/// Which inference timesteps `set_timesteps` picks (table 2 of arXiv 2305.08891).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimestepSpacing {
    /// `k · (T / n) + steps_offset` for k = n−1 … 0 (diffusers' default).
    #[default]
    Leading,
    /// `round(T − k · T/n) − 1` for k = 0 … n−1: always starts at T − 1.
    Trailing,
    /// `round(linspace(0, T − 1, n))`, reversed.
    Linspace,
}

impl FromStr for TimestepSpacing {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "leading" => Ok(Self::Leading),
            "trailing" => Ok(Self::Trailing),
            "linspace" => Ok(Self::Linspace),
            other => Err(format!(
                "unknown timestep spacing {other:?}: use leading, trailing or linspace"
            )),
        }
    }
}

impl fmt::Display for TimestepSpacing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Leading => "leading",
            Self::Trailing => "trailing",
            Self::Linspace => "linspace",
        })
    }
}

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PredictionType {
    /// The noise ε (Latte).
    #[default]
    Epsilon,
    /// The clean sample x₀.
    Sample,
    /// v = √ᾱ ε − √(1−ᾱ) x₀.
    VPrediction,
}

/// Variance of DDPM's reverse step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VarianceType {
    /// The posterior variance β̃_t (diffusers' default).
    #[default]
    FixedSmall,
    /// β_t.
    FixedLarge,
    /// The model's second half of channels v ∈ [−1, 1] interpolates the log variance
    /// between β̃_t and β_t (DiT/Latte's `LEARNED_RANGE`).
    LearnedRange,
}

/// The β schedule shared by both samplers.
#[derive(Debug, Clone, PartialEq)]
pub struct BetaConfig {
    /// Diffusion steps T of training (default 1000).
    pub num_train_timesteps: usize,
    /// β₀ (default 1e-4).
    pub beta_start: f64,
    /// β_{T−1} (default 0.02).
    pub beta_end: f64,
    /// The β schedule (default linear).
    pub beta_schedule: BetaSchedule,
}

impl Default for BetaConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 1e-4,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
        }
    }
}

impl BetaConfig {
    /// ᾱ_t as diffusers computes it: β in f32 (`torch.linspace`), cumulative product in f32.
    pub fn alphas_cumprod(&self) -> Vec<f32> {
        let n = self.num_train_timesteps;
        let (start, end) = match self.beta_schedule {
            BetaSchedule::Linear => (self.beta_start, self.beta_end),
            BetaSchedule::ScaledLinear => (self.beta_start.sqrt(), self.beta_end.sqrt()),
        };
        let mut product = 1f32;
        (0..n)
            .map(|i| {
                let v = if n == 1 {
                    start
                } else {
                    start + (end - start) * i as f64 / (n - 1) as f64
                };
                let beta = match self.beta_schedule {
                    BetaSchedule::Linear => v as f32,
                    BetaSchedule::ScaledLinear => (v as f32) * (v as f32),
                };
                product *= 1.0 - beta;
                product
            })
            .collect()
    }
}

/// Inference timesteps, as diffusers' `set_timesteps`.
pub fn spaced_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: usize,
) -> Result<Vec<usize>> {
    let (t_train, n) = (num_train_timesteps, num_inference_steps);
    if n == 0 || n > t_train {
        candle_core::bail!(
            "the number of sampling steps must lie in 1..={t_train} (the training steps), got {n}"
        );
    }
    Ok(match spacing {
        TimestepSpacing::Leading => {
            let ratio = t_train / n;
            (0..n).rev().map(|k| k * ratio + steps_offset).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = t_train as f64 / n as f64;
            // np.arange(T, 0, -ratio): values T − k·ratio while > 0.
            let mut out = Vec::new();
            let mut k = 0usize;
            loop {
                let v = t_train as f64 - k as f64 * ratio;
                if v <= 0.0 {
                    break;
                }
                out.push(round_half_even(v) as usize - 1);
                k += 1;
            }
            out
        }
        TimestepSpacing::Linspace => {
            let last = (t_train - 1) as f64;
            (0..n)
                .rev()
                .map(|k| {
                    let v = if n == 1 {
                        0.0
                    } else if k == n - 1 {
                        last
                    } else {
                        k as f64 * (last / (n - 1) as f64)
                    };
                    round_half_even(v) as usize
                })
                .collect()
        }
    })
}

/// NumPy's `round` (half to even).
fn round_half_even(v: f64) -> f64 {
    let r = v.round();
    if (v - v.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - v.signum()
    } else {
        r
    }
}

/// One step's results.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// x_{t−1}.
    pub prev_sample: Tensor,
    /// The predicted clean sample x̂₀.
    pub pred_original_sample: Tensor,
}

/// `DDIMScheduler`'s configuration, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct DdimConfig {
    /// The training β schedule.
    pub betas: BetaConfig,
    /// Clip x̂₀ to ±`clip_sample_range` (default true).
    pub clip_sample: bool,
    /// Bound of the clipping (default 1.0).
    pub clip_sample_range: f64,
    /// ᾱ before the first step: 1 when true, else ᾱ₀ (default true).
    pub set_alpha_to_one: bool,
    /// Added to `leading` timesteps (default 0; Stable Diffusion uses 1).
    pub steps_offset: usize,
    /// What the model predicts (default ε).
    pub prediction_type: PredictionType,
    /// Timestep grid (default leading).
    pub timestep_spacing: TimestepSpacing,
}

impl Default for DdimConfig {
    fn default() -> Self {
        Self {
            betas: BetaConfig::default(),
            clip_sample: true,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Leading,
        }
    }
}

/// x̂₀ and ε from the model output, with ᾱ_t (diffusers' step, point 3).
fn predictions(
    prediction_type: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    alpha_prod_t: f64,
) -> Result<(Tensor, Tensor)> {
    let (a, b) = (alpha_prod_t.sqrt(), (1.0 - alpha_prod_t).sqrt());
    Ok(match prediction_type {
        PredictionType::Epsilon => (((sample - (model_output * b)?)? / a)?, model_output.clone()),
        PredictionType::Sample => (model_output.clone(), ((sample - (model_output * a)?)? / b)?),
        PredictionType::VPrediction => (
            ((sample * a)? - (model_output * b)?)?,
            ((model_output * a)? + (sample * b)?)?,
        ),
    })
}

fn check_output(model_output: &Tensor, sample: &Tensor) -> Result<()> {
    if model_output.shape() != sample.shape() {
        candle_core::bail!(
            "model output {:?} and sample {:?} differ in shape (take the first in_channels of \
             a learned-variance output with `epsilon_channels`)",
            model_output.dims(),
            sample.dims()
        );
    }
    Ok(())
}

/// Denoising diffusion implicit models (Song et al. 2021) as diffusers' `DDIMScheduler`.
#[derive(Debug, Clone)]
pub struct Ddim {
    config: DdimConfig,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    timesteps: Vec<usize>,
}

impl Ddim {
    /// The scheduler of `config`, with no timesteps set.
    pub fn new(config: DdimConfig) -> Self {
        let alphas_cumprod = config.betas.alphas_cumprod();
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Self {
            config,
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps: Vec::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &DdimConfig {
        &self.config
    }

    /// ᾱ_t (f32, as diffusers stores it).
    pub fn alpha_cumprod(&self, t: usize) -> f64 {
        self.alphas_cumprod[t] as f64
    }

    /// Sets and returns the inference timesteps (descending).
    pub fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<&[usize]> {
        self.timesteps = spaced_timesteps(
            self.config.timestep_spacing,
            self.config.betas.num_train_timesteps,
            num_inference_steps,
            self.config.steps_offset,
        )?;
        Ok(&self.timesteps)
    }

    /// The inference timesteps last set.
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// ᾱ of the step after `t` (`final_alpha_cumprod` past the start).
    fn alpha_prev(&self, t: usize) -> f64 {
        let stride = self.config.betas.num_train_timesteps / self.timesteps.len().max(1);
        match t.checked_sub(stride) {
            Some(p) => self.alphas_cumprod[p] as f64,
            None => self.final_alpha_cumprod as f64,
        }
    }

    /// One DDIM step from `sample` = x_t. With `eta > 0`, `variance_noise` (standard normal,
    /// the sample's shape, drawn by the caller from a seeded generator) is required.
    pub fn step(
        &self,
        model_output: &Tensor,
        t: usize,
        sample: &Tensor,
        eta: f64,
        variance_noise: Option<&Tensor>,
    ) -> Result<StepOutput> {
        check_output(model_output, sample)?;
        if self.timesteps.is_empty() {
            candle_core::bail!("call set_timesteps before step");
        }
        if t >= self.alphas_cumprod.len() {
            candle_core::bail!("timestep {t} is outside [0, {})", self.alphas_cumprod.len());
        }
        let alpha_t = self.alphas_cumprod[t] as f64;
        let alpha_prev = self.alpha_prev(t);
        let (mut x0, eps) =
            predictions(self.config.prediction_type, model_output, sample, alpha_t)?;
        if self.config.clip_sample {
            let r = self.config.clip_sample_range;
            x0 = x0.clamp(-r, r)?;
        }
        let variance = (1.0 - alpha_prev) / (1.0 - alpha_t) * (1.0 - alpha_t / alpha_prev);
        let std_dev = eta * variance.sqrt();
        let direction = (eps * (1.0 - alpha_prev - std_dev * std_dev).sqrt())?;
        let mut prev = ((&x0 * alpha_prev.sqrt())? + direction)?;
        if eta > 0.0 {
            let noise = variance_noise.ok_or_else(|| {
                candle_core::Error::Msg("DDIM with eta > 0 needs variance noise".into())
            })?;
            prev = (prev + (noise * std_dev)?)?;
        }
        Ok(StepOutput {
            prev_sample: prev,
            pred_original_sample: x0,
        })
    }
}

/// `DDPMScheduler`'s configuration, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct DdpmConfig {
    /// The training β schedule.
    pub betas: BetaConfig,
    /// Variance of the reverse step (default fixed_small).
    pub variance_type: VarianceType,
    /// Clip x̂₀ to ±`clip_sample_range` (default true).
    pub clip_sample: bool,
    /// Bound of the clipping (default 1.0).
    pub clip_sample_range: f64,
    /// Added to `leading` timesteps (default 0).
    pub steps_offset: usize,
    /// What the model predicts (default ε).
    pub prediction_type: PredictionType,
    /// Timestep grid (default leading).
    pub timestep_spacing: TimestepSpacing,
}

impl Default for DdpmConfig {
    fn default() -> Self {
        Self {
            betas: BetaConfig::default(),
            variance_type: VarianceType::FixedSmall,
            clip_sample: true,
            clip_sample_range: 1.0,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Leading,
        }
    }
}

/// Ancestral DDPM sampling (Ho et al. 2020) as diffusers' `DDPMScheduler`.
#[derive(Debug, Clone)]
pub struct Ddpm {
    config: DdpmConfig,
    alphas_cumprod: Vec<f32>,
    timesteps: Vec<usize>,
}

impl Ddpm {
    /// The scheduler of `config`, with no timesteps set.
    pub fn new(config: DdpmConfig) -> Self {
        Self {
            alphas_cumprod: config.betas.alphas_cumprod(),
            config,
            timesteps: Vec::new(),
        }
    }

    /// Sets and returns the inference timesteps (descending).
    pub fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<&[usize]> {
        self.timesteps = spaced_timesteps(
            self.config.timestep_spacing,
            self.config.betas.num_train_timesteps,
            num_inference_steps,
            self.config.steps_offset,
        )?;
        Ok(&self.timesteps)
    }

    /// One DDPM step from `sample` = x_t. `model_output` holds ε (or x₀ / v) and, with
    /// `LearnedRange` and twice the sample's channels, the variance interpolation in its
    /// second half. `variance_noise` (standard normal, the sample's shape) is needed for
    /// t > 0.
    pub fn step(
        &self,
        model_output: &Tensor,
        t: usize,
        sample: &Tensor,
        variance_noise: Option<&Tensor>,
    ) -> Result<StepOutput> {
        let c = sample.dim(1)?;
        let (output, predicted_variance) = if model_output.dim(1)? == 2 * c
            && self.config.variance_type == VarianceType::LearnedRange
        {
            (
                model_output.narrow(1, 0, c)?,
                Some(model_output.narrow(1, c, c)?),
            )
        } else {
            (model_output.clone(), None)
        };
        check_output(&output, sample)?;
        if self.timesteps.is_empty() {
            candle_core::bail!("call set_timesteps before step");
        }
        let stride = self.config.betas.num_train_timesteps / self.timesteps.len();
        let alpha_t = self.alphas_cumprod[t] as f64;
        let alpha_prev = t
            .checked_sub(stride)
            .map_or(1.0, |p| self.alphas_cumprod[p] as f64);
        let current_alpha = alpha_t / alpha_prev;
        let current_beta = 1.0 - current_alpha;
        let (mut x0, _) = predictions(self.config.prediction_type, &output, sample, alpha_t)?;
        if self.config.clip_sample {
            let r = self.config.clip_sample_range;
            x0 = x0.clamp(-r, r)?;
        }
        let x0_coeff = alpha_prev.sqrt() * current_beta / (1.0 - alpha_t);
        let xt_coeff = current_alpha.sqrt() * (1.0 - alpha_prev) / (1.0 - alpha_t);
        let mut prev = ((&x0 * x0_coeff)? + (sample * xt_coeff)?)?;
        if t > 0 {
            let noise = variance_noise.ok_or_else(|| {
                candle_core::Error::Msg("a DDPM step with t > 0 needs variance noise".into())
            })?;
            let small = ((1.0 - alpha_prev) / (1.0 - alpha_t) * current_beta).max(1e-20);
            let scaled = match (self.config.variance_type, &predicted_variance) {
                (VarianceType::FixedSmall, _) => (noise * small.sqrt())?,
                (VarianceType::FixedLarge, _) => (noise * current_beta.sqrt())?,
                (VarianceType::LearnedRange, Some(v)) => {
                    let (min_log, max_log) = (small.ln(), current_beta.ln());
                    let frac = ((v + 1.0)? / 2.0)?;
                    let log_var = ((&frac * max_log)? + ((1.0 - frac)? * min_log)?)?;
                    ((log_var * 0.5)?.exp()? * noise)?
                }
                (VarianceType::LearnedRange, None) => candle_core::bail!(
                    "learned_range needs a model output with twice the sample's {c} channels"
                ),
            };
            prev = (prev + scaled)?;
        }
        Ok(StepOutput {
            prev_sample: prev,
            pred_original_sample: x0,
        })
    }
}

/// The ε part of a Latte output: its first `in_channels` channels (a learned-variance
/// model outputs `2·in_channels`; LattePipeline keeps the first half for DDIM).
pub fn epsilon_channels(output: &Tensor, in_channels: usize) -> Result<Tensor> {
    output.narrow(1, 0, in_channels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::NoiseSchedule;

    /// The samplers' default ᾱ_t (diffusers' f32 computation) is the schedule `latte train`
    /// trains with (DiT's f64 `linear(1000)`), to f32 rounding: a sampler on another
    /// schedule would denoise at the wrong noise levels.
    #[test]
    fn default_schedule_is_the_training_schedule() {
        let sampler = BetaConfig::default().alphas_cumprod();
        let training = NoiseSchedule::latte();
        assert_eq!(sampler.len(), training.num_timesteps());
        for (t, &a) in sampler.iter().enumerate() {
            let expected = training.alpha_cumprod(t);
            assert!(
                (a as f64 - expected).abs() <= 1e-5 * expected.max(1e-3),
                "t {t}: sampler {a}, training {expected}"
            );
        }
        let ddim = Ddim::new(DdimConfig::default());
        assert_eq!(ddim.alpha_cumprod(999) as f32, sampler[999]);
    }
}
