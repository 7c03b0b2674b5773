//! The DDPM forward process and the training loss Latte is trained with.
//!
//! The schedule and the loss follow DiT / ADM's `GaussianDiffusion` as Latte uses it
//! (`create_diffusion(timestep_respacing="")`): a linear β schedule from 1e-4 to 0.02 over
//! 1000 steps, ε prediction, and — when the model also outputs a variance
//! (`out_channels == 2·in_channels`, `LEARNED_RANGE`) — the variational-bound term
//! `_vb_terms_bpd` computed with the predicted ε frozen, in bits per dimension, with the
//! discretised decoder likelihood at t = 0 (`LossType.MSE`, so the bound is not rescaled).
//!
//! The loss is evaluated on the host in f64 (the model output is small next to the
//! activations) together with its gradient w.r.t. the model output, which is what the
//! memory-planned backward needs: `remat` back-propagates that gradient through the model.
//! `tools/make_train_fixture.py` checks both against DiT's formulas in torch.

use candle_core::{DType, Device, Result, Tensor};

/// `ln 2`: the loss's variational term is in bits.
const LN_2: f64 = std::f64::consts::LN_2;

/// Half-width of a pixel bin of 8-bit data scaled to [-1, 1].
const BIN_HALF_WIDTH: f64 = 1.0 / 255.0;

/// Floor of the probabilities in the decoder likelihood (`clamp(min=1e-12)`).
const MIN_PROBABILITY: f64 = 1e-12;

/// The variance-preserving noise schedule and the coefficients derived from it, in f64,
/// indexed by the integer timestep `t ∈ [0, T)`.
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    /// β_t.
    betas: Vec<f64>,
    /// ᾱ_t = Π_{s ≤ t} (1 − β_s).
    alphas_cumprod: Vec<f64>,
    /// log β̃_t, the log variance of the posterior q(x_{t−1} | x_t, x_0), with t = 0
    /// clipped to β̃_1 (β̃_0 = 0).
    posterior_log_variance_clipped: Vec<f64>,
    /// Coefficient of x_0 in the posterior mean: β_t √ᾱ_{t−1} / (1 − ᾱ_t).
    posterior_mean_coef1: Vec<f64>,
    /// Coefficient of x_t in the posterior mean: (1 − ᾱ_{t−1}) √α_t / (1 − ᾱ_t).
    posterior_mean_coef2: Vec<f64>,
}

impl NoiseSchedule {
    /// The schedule Latte and DiT train with: `linear(1000)`.
    pub fn latte() -> Self {
        Self::linear(1000)
    }

    /// DiT's `get_named_beta_schedule("linear", T)`: β evenly spaced from 1e-4·(1000/T)
    /// to 0.02·(1000/T) (`np.linspace` in f64).
    pub fn linear(num_timesteps: usize) -> Self {
        let t_count = num_timesteps.max(1);
        let scale = 1000.0 / t_count as f64;
        let (start, end) = (scale * 1e-4, scale * 0.02);
        let betas: Vec<f64> = if t_count == 1 {
            vec![start]
        } else {
            // np.linspace: start + i·step, with the last value exactly `end`.
            let step = (end - start) / (t_count - 1) as f64;
            (0..t_count)
                .map(|i| {
                    if i == t_count - 1 {
                        end
                    } else {
                        start + i as f64 * step
                    }
                })
                .collect()
        };
        Self::from_betas(betas)
    }

    /// The schedule of arbitrary β_t ∈ (0, 1).
    pub fn from_betas(betas: Vec<f64>) -> Self {
        let mut alphas_cumprod = Vec::with_capacity(betas.len());
        let mut product = 1.0;
        for beta in &betas {
            product *= 1.0 - beta;
            alphas_cumprod.push(product);
        }
        let prev = |t: usize| if t == 0 { 1.0 } else { alphas_cumprod[t - 1] };
        let posterior_variance: Vec<f64> = (0..betas.len())
            .map(|t| betas[t] * (1.0 - prev(t)) / (1.0 - alphas_cumprod[t]))
            .collect();
        let posterior_log_variance_clipped = (0..betas.len())
            .map(|t| {
                let v = if t == 0 && betas.len() > 1 {
                    posterior_variance[1]
                } else {
                    posterior_variance[t]
                };
                v.ln()
            })
            .collect();
        let posterior_mean_coef1 = (0..betas.len())
            .map(|t| betas[t] * prev(t).sqrt() / (1.0 - alphas_cumprod[t]))
            .collect();
        let posterior_mean_coef2 = (0..betas.len())
            .map(|t| (1.0 - prev(t)) * (1.0 - betas[t]).sqrt() / (1.0 - alphas_cumprod[t]))
            .collect();
        Self {
            betas,
            alphas_cumprod,
            posterior_log_variance_clipped,
            posterior_mean_coef1,
            posterior_mean_coef2,
        }
    }

    /// Number of diffusion steps T.
    pub fn num_timesteps(&self) -> usize {
        self.betas.len()
    }

    /// β_t.
    pub fn beta(&self, t: usize) -> f64 {
        self.betas[t]
    }

    /// ᾱ_t.
    pub fn alpha_cumprod(&self, t: usize) -> f64 {
        self.alphas_cumprod[t]
    }

    /// `q_sample`: x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε, per video of the batch (dim 0).
    /// The coefficients are rounded to the tensors' dtype first, as DiT does (f32).
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        let batch = x0.dim(0)?;
        if timesteps.len() != batch || noise.shape() != x0.shape() {
            candle_core::bail!(
                "add_noise: x0 {:?}, noise {:?} and {} timesteps do not match",
                x0.dims(),
                noise.dims(),
                timesteps.len()
            );
        }
        self.check_timesteps(timesteps)?;
        let per_video = |values: Vec<f64>| -> Result<Tensor> {
            let mut dims = vec![1; x0.rank()];
            dims[0] = batch;
            Tensor::from_vec(values, dims, x0.device())?.to_dtype(x0.dtype())
        };
        let signal = per_video(
            timesteps
                .iter()
                .map(|&t| self.alphas_cumprod[t].sqrt())
                .collect(),
        )?;
        let noise_scale = per_video(
            timesteps
                .iter()
                .map(|&t| (1.0 - self.alphas_cumprod[t]).sqrt())
                .collect(),
        )?;
        x0.broadcast_mul(&signal)? + noise.broadcast_mul(&noise_scale)?
    }

    fn check_timesteps(&self, timesteps: &[usize]) -> Result<()> {
        if let Some(t) = timesteps.iter().find(|&&t| t >= self.num_timesteps()) {
            candle_core::bail!(
                "timestep {t} is outside the schedule's [0, {})",
                self.num_timesteps()
            );
        }
        Ok(())
    }

    /// The training loss of one batch and its gradient w.r.t. the model output.
    ///
    /// `output` is the model output `(b, C or 2C, f, h, w)` for the noisy input `x_t`;
    /// `target` holds `x_0`, `x_t`, `ε` (each `(b, C, f, h, w)`), the timesteps and an
    /// optional loss mask. The loss is `mean_b(mse_b + vb_b)` (see the module doc);
    /// `grad_output` is `grad_scale · ∂loss/∂output` as f32 on `output`'s device (pass the
    /// loss scale divided by the number of accumulated micro-batches).
    pub fn training_loss(
        &self,
        output: &Tensor,
        target: &LossTarget<'_>,
        grad_scale: f64,
    ) -> Result<TrainingLoss> {
        let (b, c, f, h, w) = target.x0.dims5()?;
        let out_channels = output.dim(1)?;
        let learns_variance = out_channels == 2 * c;
        if output.dims() != [b, out_channels, f, h, w] || !(learns_variance || out_channels == c) {
            candle_core::bail!(
                "model output {:?} does not fit the target {:?}: expected {c} or {} channels",
                output.dims(),
                target.x0.dims(),
                2 * c
            );
        }
        if target.timesteps.len() != b {
            candle_core::bail!("{} timesteps for a batch of {b}", target.timesteps.len());
        }
        self.check_timesteps(target.timesteps)?;
        let host = |t: &Tensor| -> Result<Vec<f64>> {
            t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
        };
        let out = host(output)?;
        let (x0, x_t, eps) = (host(target.x0)?, host(target.x_t)?, host(target.noise)?);
        let positions = f * h * w;
        let mask = match target.mask {
            Some(m) => {
                let values = host(m)?;
                if values.len() != b * positions {
                    candle_core::bail!(
                        "loss mask {:?} does not fit ({b}, 1, {f}, {h}, {w})",
                        m.dims()
                    );
                }
                Some(values)
            }
            None => None,
        };

        let mut grad = vec![0f64; out.len()];
        let mut mse = Vec::with_capacity(b);
        let mut vb = Vec::with_capacity(b);
        for (i, &t) in target.timesteps.iter().enumerate() {
            let weights = mask
                .as_ref()
                .map(|m| &m[i * positions..(i + 1) * positions]);
            let weight_sum: f64 = weights.map_or(positions as f64, |w| w.iter().sum());
            // mean_flat over (C, F, H, W), weighted by the mask.
            let denominator = weight_sum * c as f64;
            let per_element = if denominator > 0.0 {
                1.0 / denominator
            } else {
                0.0
            };
            let coefs = StepCoefficients::new(self, t);
            let (mut mse_sum, mut vb_sum) = (0.0, 0.0);
            for ch in 0..c {
                let x_base = (i * c + ch) * positions;
                let eps_base = (i * out_channels + ch) * positions;
                let var_base = (i * out_channels + c + ch) * positions;
                for p in 0..positions {
                    let weight = weights.map_or(1.0, |w| w[p]);
                    let xi = x_base + p;
                    let eps_hat = out[eps_base + p];
                    let diff = eps_hat - eps[xi];
                    mse_sum += weight * diff * diff;
                    grad[eps_base + p] = weight * 2.0 * diff * per_element;
                    if learns_variance {
                        let v = out[var_base + p];
                        let (term, d_term) = coefs.vb_term(x0[xi], x_t[xi], eps_hat, v);
                        vb_sum += weight * term;
                        grad[var_base + p] = weight * d_term * per_element / LN_2;
                    }
                }
            }
            mse.push(mse_sum * per_element);
            if learns_variance {
                vb.push(vb_sum * per_element / LN_2);
            }
        }
        let batch_scale = grad_scale / b as f64;
        let grad_f32: Vec<f32> = grad.iter().map(|g| (g * batch_scale) as f32).collect();
        let grad_output =
            Tensor::from_vec(grad_f32, output.dims(), &Device::Cpu)?.to_device(output.device())?;
        let total: f64 = mse.iter().sum::<f64>() + vb.iter().sum::<f64>();
        Ok(TrainingLoss {
            loss: total / b as f64,
            mse,
            vb: learns_variance.then_some(vb),
            grad_output,
        })
    }
}

/// What the model output is scored against.
#[derive(Debug, Clone, Copy)]
pub struct LossTarget<'a> {
    /// Clean videos `(b, C, f, h, w)`.
    pub x0: &'a Tensor,
    /// Noisy videos fed to the model, `add_noise(x0, noise, timesteps)`.
    pub x_t: &'a Tensor,
    /// The noise ε that was added.
    pub noise: &'a Tensor,
    /// One timestep per video.
    pub timesteps: &'a [usize],
    /// Optional per-position weights `(b, 1, f, h, w)` (1 = scored, 0 = ignored); the
    /// per-video means become weighted means.
    pub mask: Option<&'a Tensor>,
}

/// The loss of one batch and its gradient.
#[derive(Debug, Clone)]
pub struct TrainingLoss {
    /// `mean_b(mse_b + vb_b)`.
    pub loss: f64,
    /// ε-prediction MSE per video.
    pub mse: Vec<f64>,
    /// Variational-bound term per video, in bits per dimension (learned variance only).
    pub vb: Option<Vec<f64>>,
    /// `grad_scale · ∂loss/∂output`, f32, the output's shape and device.
    pub grad_output: Tensor,
}

impl TrainingLoss {
    /// Mean ε-MSE over the batch.
    pub fn mean_mse(&self) -> f64 {
        self.mse.iter().sum::<f64>() / self.mse.len().max(1) as f64
    }

    /// Mean variational-bound term over the batch (bits per dimension).
    pub fn mean_vb(&self) -> Option<f64> {
        self.vb
            .as_ref()
            .map(|vb| vb.iter().sum::<f64>() / vb.len().max(1) as f64)
    }
}

/// The schedule's values at one timestep, for the variational-bound term.
struct StepCoefficients {
    t: usize,
    /// √(1/ᾱ_t) and √(1/ᾱ_t − 1): x̂_0 = √(1/ᾱ_t)·x_t − √(1/ᾱ_t − 1)·ε̂.
    recip_sqrt_alpha_cumprod: f64,
    recip_m1_sqrt_alpha_cumprod: f64,
    /// Posterior mean coefficients of x_0 and x_t.
    mean_coef1: f64,
    mean_coef2: f64,
    /// log β̃_t (clipped) and log β_t: the ends of the learned log-variance range.
    min_log: f64,
    max_log: f64,
}

impl StepCoefficients {
    fn new(schedule: &NoiseSchedule, t: usize) -> Self {
        let alpha_cumprod = schedule.alphas_cumprod[t];
        Self {
            t,
            recip_sqrt_alpha_cumprod: (1.0 / alpha_cumprod).sqrt(),
            recip_m1_sqrt_alpha_cumprod: (1.0 / alpha_cumprod - 1.0).sqrt(),
            mean_coef1: schedule.posterior_mean_coef1[t],
            mean_coef2: schedule.posterior_mean_coef2[t],
            min_log: schedule.posterior_log_variance_clipped[t],
            max_log: schedule.betas[t].ln(),
        }
    }

    /// One element's variational-bound term (in nats, before the mean) and its derivative
    /// w.r.t. the variance output `v`; ε̂ is frozen (no gradient through it).
    ///
    /// p(x_{t−1} | x_t) has mean μ_θ = c₁·x̂_0 + c₂·x_t and log variance
    /// ℓ = frac·log β_t + (1 − frac)·log β̃_t with frac = (v + 1)/2. For t > 0 the term is
    /// KL(q(x_{t−1} | x_t, x_0) ‖ p); for t = 0 it is the decoder's −log p(x_0).
    fn vb_term(&self, x0: f64, x_t: f64, eps_hat: f64, v: f64) -> (f64, f64) {
        let x0_hat =
            self.recip_sqrt_alpha_cumprod * x_t - self.recip_m1_sqrt_alpha_cumprod * eps_hat;
        let model_mean = self.mean_coef1 * x0_hat + self.mean_coef2 * x_t;
        let frac = (v + 1.0) / 2.0;
        let log_variance = frac * self.max_log + (1.0 - frac) * self.min_log;
        let d_log_variance_dv = (self.max_log - self.min_log) / 2.0;
        let (term, d_term_d_log_variance) = if self.t == 0 {
            decoder_nll(x0, model_mean, log_variance)
        } else {
            let true_mean = self.mean_coef1 * x0 + self.mean_coef2 * x_t;
            normal_kl(true_mean, self.min_log, model_mean, log_variance)
        };
        (term, d_term_d_log_variance * d_log_variance_dv)
    }
}

/// KL(N(μ₁, e^{ℓ₁}) ‖ N(μ₂, e^{ℓ₂})) and its derivative w.r.t. ℓ₂.
fn normal_kl(mean1: f64, log_var1: f64, mean2: f64, log_var2: f64) -> (f64, f64) {
    let ratio = (log_var1 - log_var2).exp();
    let scaled_sq = (mean1 - mean2).powi(2) * (-log_var2).exp();
    let kl = 0.5 * (-1.0 + log_var2 - log_var1 + ratio + scaled_sq);
    let d_kl = 0.5 * (1.0 - ratio - scaled_sq);
    (kl, d_kl)
}

/// `approx_standard_normal_cdf` (the tanh approximation) and its derivative.
fn approx_normal_cdf(x: f64) -> (f64, f64) {
    let k = (2.0 / std::f64::consts::PI).sqrt();
    let tanh = (k * (x + 0.044715 * x.powi(3))).tanh();
    let cdf = 0.5 * (1.0 + tanh);
    let d_cdf = 0.5 * (1.0 - tanh * tanh) * k * (1.0 + 3.0 * 0.044715 * x * x);
    (cdf, d_cdf)
}

/// −log of the probability of x's 8-bit bin under N(mean, e^ℓ)
/// (`discretized_gaussian_log_likelihood` with log_scales = ℓ/2; the edge bins extend to
/// ±∞), and its derivative w.r.t. ℓ.
fn decoder_nll(x: f64, mean: f64, log_variance: f64) -> (f64, f64) {
    let centered = x - mean;
    let inv_stdv = (-0.5 * log_variance).exp();
    let plus_in = inv_stdv * (centered + BIN_HALF_WIDTH);
    let min_in = inv_stdv * (centered - BIN_HALF_WIDTH);
    let (cdf_plus, d_cdf_plus) = approx_normal_cdf(plus_in);
    let (cdf_min, d_cdf_min) = approx_normal_cdf(min_in);
    // ∂plus_in/∂ℓ = −plus_in/2, ∂min_in/∂ℓ = −min_in/2.
    let d_plus = d_cdf_plus * (-0.5 * plus_in);
    let d_min = d_cdf_min * (-0.5 * min_in);
    // log max(p, 1e-12) and its derivative (0 where the floor holds, as clamp's).
    let log_floored = |p: f64, d_p: f64| {
        if p >= MIN_PROBABILITY {
            (p.ln(), d_p / p)
        } else {
            (MIN_PROBABILITY.ln(), 0.0)
        }
    };
    let (log_prob, d_log_prob) = if x < -0.999 {
        log_floored(cdf_plus, d_plus)
    } else if x > 0.999 {
        log_floored(1.0 - cdf_min, -d_min)
    } else {
        log_floored(cdf_plus - cdf_min, d_plus - d_min)
    };
    (-log_prob, -d_log_prob)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_schedule_matches_dit() {
        let s = NoiseSchedule::latte();
        assert_eq!(s.num_timesteps(), 1000);
        assert_eq!(s.beta(0), 1e-4);
        assert_eq!(s.beta(999), 0.02);
        // numpy float64: cumprod(1 - linspace(1e-4, 0.02, 1000)).
        assert!((s.alpha_cumprod(999) / 4.035_829_765_375_676e-5 - 1.0).abs() < 1e-12);
        assert!((s.alpha_cumprod(500) / 0.077_796_658_365_023_89 - 1.0).abs() < 1e-12);
        assert_eq!(
            s.posterior_log_variance_clipped[0],
            s.posterior_log_variance_clipped[1]
        );
    }

    /// The loss mask of docs/DATA.md, by hand: an ε-only output of 2 channels × 2
    /// positions against ε = 0, positions weighted 1 and ½. Weighted MSE
    /// Σ w·d² / (c·Σ w) = (1·1 + ½·9 + 1·4 + ½·25) / (2 · 1.5) = 22/3 and its gradient
    /// w·2d / (c·Σ w); without the mask (39/4) every position counts.
    #[test]
    fn masked_loss_is_the_weighted_mean() {
        let dev = Device::Cpu;
        let schedule = NoiseSchedule::latte();
        let zeros = Tensor::zeros((1, 2, 1, 1, 2), DType::F32, &dev).unwrap();
        let output = Tensor::new(&[1f32, 3., 2., 5.], &dev)
            .unwrap()
            .reshape((1, 2, 1, 1, 2))
            .unwrap();
        let mask = Tensor::new(&[1f32, 0.5], &dev)
            .unwrap()
            .reshape((1, 1, 1, 1, 2))
            .unwrap();
        let target = |mask| LossTarget {
            x0: &zeros,
            x_t: &zeros,
            noise: &zeros,
            timesteps: &[10],
            mask,
        };
        let masked = schedule
            .training_loss(&output, &target(Some(&mask)), 1.0)
            .unwrap();
        assert!((masked.loss - 22.0 / 3.0).abs() < 1e-12, "{}", masked.loss);
        let grad = masked
            .grad_output
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let expected = [2.0 / 3.0, 1.0, 4.0 / 3.0, 5.0 / 3.0];
        for (g, e) in grad.iter().zip(expected) {
            // f32 rounding of values near 1.
            assert!((f64::from(*g) - e).abs() < 1e-6, "{grad:?}");
        }
        let unmasked = schedule.training_loss(&output, &target(None), 1.0).unwrap();
        assert!(
            (unmasked.loss - 39.0 / 4.0).abs() < 1e-12,
            "{}",
            unmasked.loss
        );
    }

    /// Central differences of the loss w.r.t. every output element.
    #[test]
    fn gradient_matches_finite_differences() {
        let dev = Device::Cpu;
        let schedule = NoiseSchedule::latte();
        let shape = (2, 2, 1, 2, 2);
        let mut rng = crate::random::rng_for(3, "diffusion-test");
        let x0 = crate::random::randn(&mut rng, shape, &dev)
            .unwrap()
            .clamp(-1f32, 1f32)
            .unwrap();
        let noise = crate::random::randn(&mut rng, shape, &dev).unwrap();
        let output = (crate::random::randn(&mut rng, (2, 4, 1, 2, 2), &dev).unwrap() * 0.5)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        for timesteps in [[0usize, 1], [10, 999]] {
            let x_t = schedule.add_noise(&x0, &noise, &timesteps).unwrap();
            let target = LossTarget {
                x0: &x0,
                x_t: &x_t,
                noise: &noise,
                timesteps: &timesteps,
                mask: None,
            };
            let base = schedule.training_loss(&output, &target, 1.0).unwrap();
            let grad = base
                .grad_output
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let values = output.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            for i in 0..values.len() {
                // ε̂ is frozen in the variational term: its gradient is the MSE's alone.
                let is_eps = (i / 4) % 4 < 2;
                let at = |delta: f64| {
                    let mut v = values.clone();
                    v[i] += delta;
                    let o = Tensor::from_vec(v, output.dims(), &dev).unwrap();
                    let l = schedule.training_loss(&o, &target, 1.0).unwrap();
                    if is_eps {
                        l.mean_mse()
                    } else {
                        l.loss
                    }
                };
                let h = 1e-6;
                let numeric = (at(h) - at(-h)) / (2.0 * h);
                assert!(
                    (numeric - f64::from(grad[i])).abs() <= 1e-4 * (1.0 + numeric.abs()),
                    "t {timesteps:?} element {i}: numeric {numeric}, analytic {}",
                    grad[i]
                );
            }
        }
    }
}
