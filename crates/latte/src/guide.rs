//! Objectives for gradient-guided sampling: differentiable scalar functions of the
//! predicted clean video x̂₀ `(b, c, f, h, w)` that sampling pushes down.
//!
//! Built-ins (parsed by [`parse_objective`]):
//! - `reference:FILE[:MASK]` — mean squared error to the frames/latents in FILE (a
//!   safetensors file with one tensor, `(c, f, h, w)` or `(1, c, f, h, w)`) over the
//!   elements where MASK (one tensor broadcastable to the video, 1 = counted) is set;
//! - `smooth` — temporal smoothness: mean squared difference of consecutive frames;
//! - `color:R,G,B` — pixel-space models: the colour of what is drawn on the dark
//!   background: mean squared distance of the pixels to the colour (components in
//!   [−1, 1]), each pixel weighted by its brightest channel
//!   `w = clamp(2 max_c x + 1, 0, 1)` (0 on the black background and wherever no
//!   channel is above −½, 1 where a channel reaches mid-grey, so that a pixel stays
//!   counted on its way between two saturated colours: red → green passes through
//!   (0, 0, −1)), the weights held constant so the gradient recolours what is drawn
//!   instead of dimming it or painting the background.

use candle_core::{DType, Device, Tensor, Var};
use std::path::Path;

/// A differentiable objective on the predicted clean video.
pub trait Objective: Send + Sync {
    /// A short name for reports (`smooth`, `color:1,0,0`, …).
    fn name(&self) -> &str;
    /// The scalar loss of `x0` `(b, c, f, h, w)`, built from differentiable candle ops.
    fn loss(&self, x0: &Tensor) -> candle_core::Result<Tensor>;
}

/// The objective's value and its gradient w.r.t. `x0`.
pub fn value_and_grad(
    objective: &dyn Objective,
    x0: &Tensor,
) -> candle_core::Result<(f64, Tensor)> {
    let leaf = Var::from_tensor(&x0.detach())?;
    let loss = objective.loss(leaf.as_tensor())?;
    let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let grads = loss.backward()?;
    let grad = match grads.get(leaf.as_tensor()) {
        Some(g) => g.clone(),
        None => leaf.as_tensor().zeros_like()?,
    };
    Ok((value, grad))
}

/// Why an objective could not be built.
#[derive(Debug, thiserror::Error)]
pub enum GuideError {
    /// Not one of the built-ins.
    #[error("unknown objective {0:?}: use reference:FILE[:MASK], smooth or color:R,G,B")]
    Unknown(String),
    /// Malformed arguments.
    #[error("objective {spec:?}: {reason}")]
    Invalid {
        /// The objective as given.
        spec: String,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// Reading a file failed.
    #[error("objective {spec:?}: cannot read {path}: {cause}")]
    Read {
        /// The objective as given.
        spec: String,
        /// The file.
        path: String,
        /// The cause.
        cause: String,
    },
}

/// Builds the objective of `spec` for videos of `video_dims` `(1, c, f, h, w)`.
pub fn parse_objective(
    spec: &str,
    video_dims: &[usize],
    device: &Device,
) -> Result<Box<dyn Objective>, GuideError> {
    let invalid = |reason: String| GuideError::Invalid {
        spec: spec.to_string(),
        reason,
    };
    let (kind, args) = spec.split_once(':').unwrap_or((spec, ""));
    match kind {
        "smooth" => {
            if !args.is_empty() {
                return Err(invalid("`smooth` takes no arguments".into()));
            }
            if video_dims.get(2).copied().unwrap_or(0) < 2 {
                return Err(invalid("`smooth` needs at least 2 frames".into()));
            }
            Ok(Box::new(Smooth))
        }
        "color" | "colour" => {
            let values: Vec<f64> = args
                .split(',')
                .map(|v| v.trim().parse::<f64>())
                .collect::<Result<_, _>>()
                .map_err(|_| invalid("expected color:R,G,B with numbers in [-1, 1]".into()))?;
            if values.len() != 3 || values.iter().any(|v| !(-1.0..=1.0).contains(v)) {
                return Err(invalid(
                    "expected color:R,G,B with three numbers in [-1, 1]".into(),
                ));
            }
            if video_dims.get(1) != Some(&3) {
                return Err(invalid(format!(
                    "`color` needs a pixel-space model with 3 channels; this one has {:?}",
                    video_dims.get(1)
                )));
            }
            let colour = Tensor::from_vec(
                values.iter().map(|&v| v as f32).collect(),
                (1, 3, 1, 1, 1),
                device,
            )
            .map_err(|e| invalid(e.to_string()))?;
            Ok(Box::new(Colour {
                name: spec.to_string(),
                colour,
            }))
        }
        "reference" => {
            if args.is_empty() {
                return Err(invalid("expected reference:FILE[:MASK]".into()));
            }
            let (file, mask_file) = match args.split_once(':') {
                Some((f, m)) => (f, Some(m)),
                None => (args, None),
            };
            let read = |path: &str| -> Result<Tensor, GuideError> {
                let tensors =
                    candle_core::safetensors::load(Path::new(path), device).map_err(|e| {
                        GuideError::Read {
                            spec: spec.to_string(),
                            path: path.to_string(),
                            cause: e.to_string(),
                        }
                    })?;
                if tensors.len() != 1 {
                    return Err(invalid(format!(
                        "{path} must hold exactly one tensor, it holds {}",
                        tensors.len()
                    )));
                }
                let t = tensors
                    .into_values()
                    .next()
                    .unwrap_or_else(|| unreachable!());
                t.to_dtype(DType::F32).map_err(|e| invalid(e.to_string()))
            };
            let mut target = read(file)?;
            let stored_dims = target.dims().to_vec();
            if target.rank() + 1 == video_dims.len() {
                target = target.unsqueeze(0).map_err(|e| invalid(e.to_string()))?;
            }
            if target.dims() != video_dims {
                return Err(invalid(format!(
                    "the reference in {file} has shape {:?}; the sampled video is {:?} \
                     (channels, frames, height, width with an optional batch of 1)",
                    stored_dims,
                    &video_dims[1..]
                )));
            }
            let mask = match mask_file {
                None => target.ones_like().map_err(|e| invalid(e.to_string()))?,
                Some(m) => {
                    let mut mask = read(m)?;
                    while mask.rank() < video_dims.len() {
                        mask = mask.unsqueeze(0).map_err(|e| invalid(e.to_string()))?;
                    }
                    mask.broadcast_as(video_dims)
                        .and_then(|t| t.contiguous())
                        .map_err(|_| {
                            invalid(format!(
                                "the mask in {m} has shape {:?}, not broadcastable to the video {:?}",
                                mask.dims(),
                                video_dims
                            ))
                        })?
                }
            };
            let count = mask
                .sum_all()
                .and_then(|s| s.to_scalar::<f32>())
                .map_err(|e| invalid(e.to_string()))?;
            if count <= 0.0 {
                return Err(invalid("the mask selects no element".into()));
            }
            Ok(Box::new(Reference {
                name: spec.to_string(),
                target,
                mask,
                count: count as f64,
            }))
        }
        _ => Err(GuideError::Unknown(spec.to_string())),
    }
}

/// Mean squared difference of consecutive frames.
#[derive(Debug, Clone, Copy)]
pub struct Smooth;

impl Objective for Smooth {
    fn name(&self) -> &str {
        "smooth"
    }

    fn loss(&self, x0: &Tensor) -> candle_core::Result<Tensor> {
        let f = x0.dim(2)?;
        let d = (x0.narrow(2, 1, f - 1)? - x0.narrow(2, 0, f - 1)?)?;
        d.sqr()?.mean_all()
    }
}

/// Brightness-weighted mean squared distance of the pixels to a colour (see the module
/// doc): Σ w‖x − c‖² / (3 Σ w) with w = clamp(2 max_c x + 1, 0, 1) detached.
#[derive(Debug, Clone)]
pub struct Colour {
    name: String,
    /// `(1, 3, 1, 1, 1)`.
    colour: Tensor,
}

impl Objective for Colour {
    fn name(&self) -> &str {
        &self.name
    }

    fn loss(&self, x0: &Tensor) -> candle_core::Result<Tensor> {
        // (b, 1, f, h, w): 0 on the black background, 1 from mid-grey up.
        let weight = x0
            .detach()
            .max_keepdim(1)?
            .affine(2.0, 1.0)?
            .clamp(0.0, 1.0)?;
        let total = weight.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let distance = x0
            .broadcast_sub(&self.colour.to_dtype(x0.dtype())?)?
            .sqr()?
            .sum_keepdim(1)?;
        (distance * weight)?.sum_all()? / (3.0 * total.max(1e-6))
    }
}

/// Masked mean squared error to a reference video.
#[derive(Debug, Clone)]
pub struct Reference {
    name: String,
    target: Tensor,
    mask: Tensor,
    count: f64,
}

impl Objective for Reference {
    fn name(&self) -> &str {
        &self.name
    }

    fn loss(&self, x0: &Tensor) -> candle_core::Result<Tensor> {
        let d = (x0 - self.target.to_dtype(x0.dtype())?)?;
        (d.sqr()? * self.mask.to_dtype(x0.dtype())?)?.sum_all()? / self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `color:` recolours the drawn pixels and leaves the black background alone.
    #[test]
    fn colour_objective_weights_the_foreground() {
        let dev = Device::Cpu;
        // Two pixels: background (−1, −1, −1) and red (1, −1, −1).
        let x0 =
            Tensor::from_vec(vec![-1f32, 1., -1., -1., -1., -1.], (1, 3, 1, 1, 2), &dev).unwrap();
        let green = parse_objective("color:-1,1,-1", x0.dims(), &dev).unwrap();
        let (value, grad) = value_and_grad(green.as_ref(), &x0).unwrap();
        // Only the red pixel counts: ((1+1)² + (−1−1)² + 0) / 3.
        assert!((value - 8.0 / 3.0).abs() < 1e-6, "{value}");
        let g = grad.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Layout (c, pixel): background gradients are zero, the red pixel's point to green.
        assert_eq!([g[0], g[2], g[4]], [0.0, 0.0, 0.0]);
        assert!(g[1] > 0.0 && g[3] < 0.0 && g[5] == 0.0, "{g:?}");
        // Halfway from red to green, (0, 0, −1), the pixel still counts in full; a dim
        // background pixel, (−0.8, −0.8, −0.8), does not.
        let x0 =
            Tensor::from_vec(vec![0f32, -0.8, 0., -0.8, -1., -0.8], (1, 3, 1, 1, 2), &dev).unwrap();
        let (value, grad) = value_and_grad(green.as_ref(), &x0).unwrap();
        assert!((value - 2.0 / 3.0).abs() < 1e-6, "{value}");
        let g = grad.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!([g[1], g[3], g[5]], [0.0, 0.0, 0.0]);
    }
}
