//! A diffusers `LattePipeline` directory: `model_index.json`, `transformer/`,
//! `text_encoder/` (T5), `tokenizer/` (`tokenizer.json`), `vae/` (AutoencoderKL) and
//! `scheduler/scheduler_config.json` (DDIM). Each component is opened on demand, and a
//! missing one is an error naming the folder or file and what it should hold.
//!
//! Sampling then runs as LattePipeline (diffusers 0.42.1) does: prompts through
//! [`crate::text_encoder`], DDIM with classifier-free guidance batched
//! `[negative, positive]` ([`crate::sampling::sample`]), latents decoded by
//! [`crate::vae`]. DDIM's `init_noise_sigma` is 1, so the initial latents are the noise
//! itself.

use crate::scheduler::{BetaSchedule, DdimConfig, PredictionType, TimestepSpacing};
use crate::text_encoder::{TextEncoder, TextEncoderError};
use crate::vae::{Vae, VaeError};
use crate::vae_encoder::VaeEncoder;
use crate::weights::{ModelDir, WeightsError};
use candle_core::{DType, Device};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// File of the pipeline's component list.
pub const MODEL_INDEX_FILE: &str = "model_index.json";

/// The scheduler's configuration, relative to the pipeline's root.
pub const SCHEDULER_CONFIG_FILE: &str = "scheduler/scheduler_config.json";

/// Errors raised while opening a pipeline directory.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A component folder or file is absent.
    #[error("pipeline {dir} has no {component}: expected {expected}")]
    Missing {
        dir: String,
        component: &'static str,
        expected: &'static str,
    },
    /// A JSON file is unreadable or malformed.
    #[error("{path}: {message}")]
    Json { path: String, message: String },
    /// A scheduler key is unknown or holds an unsupported value.
    #[error("{path}: key `{key}` = {value} is not supported: {supported}")]
    Unsupported {
        path: String,
        key: String,
        value: String,
        supported: String,
    },
    /// The transformer could not be opened.
    #[error(transparent)]
    Transformer(#[from] WeightsError),
    /// The tokenizer or text encoder could not be opened.
    #[error(transparent)]
    TextEncoder(#[from] TextEncoderError),
    /// The VAE could not be opened.
    #[error(transparent)]
    Vae(#[from] VaeError),
}

/// An opened pipeline directory.
#[derive(Debug, Clone)]
pub struct PipelineDir {
    root: PathBuf,
    index: Map<String, Value>,
}

fn read_json(path: &Path) -> Result<Map<String, Value>, PipelineError> {
    let err = |message: String| PipelineError::Json {
        path: path.display().to_string(),
        message,
    };
    match crate::io::read_json(path).map_err(err)? {
        Value::Object(map) => Ok(map),
        _ => Err(err("expected a JSON object".into())),
    }
}

impl PipelineDir {
    /// Whether `dir` looks like a pipeline (it holds `model_index.json`).
    pub fn is_pipeline(dir: &Path) -> bool {
        dir.join(MODEL_INDEX_FILE).is_file()
    }

    /// Opens `dir` and reads its `model_index.json`.
    pub fn open(dir: &Path) -> Result<Self, PipelineError> {
        let index_path = dir.join(MODEL_INDEX_FILE);
        if !index_path.is_file() {
            return Err(PipelineError::Missing {
                dir: dir.display().to_string(),
                component: MODEL_INDEX_FILE,
                expected: "diffusers' component list, written by LattePipeline.save_pretrained",
            });
        }
        Ok(Self {
            root: dir.to_path_buf(),
            index: read_json(&index_path)?,
        })
    }

    /// The pipeline's root folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The `(library, class)` `model_index.json` lists for `component`, if any.
    pub fn component_class(&self, component: &str) -> Option<(String, String)> {
        match self.index.get(component)?.as_array()?.as_slice() {
            [Value::String(library), Value::String(class)] => {
                Some((library.clone(), class.clone()))
            }
            _ => None,
        }
    }

    /// `root/component`, which must be a folder holding `file`.
    fn component(
        &self,
        component: &'static str,
        file: &str,
        expected: &'static str,
    ) -> Result<PathBuf, PipelineError> {
        let dir = self.root.join(component);
        if !dir.join(file).is_file() {
            return Err(PipelineError::Missing {
                dir: self.root.display().to_string(),
                component,
                expected,
            });
        }
        Ok(dir)
    }

    /// Opens `transformer/` and checks its weights.
    pub fn transformer(&self) -> Result<ModelDir, PipelineError> {
        let dir = self.component(
            "transformer/",
            crate::weights::CONFIG_FILE,
            "transformer/config.json and diffusers weights (a LatteTransformer3DModel)",
        )?;
        Ok(ModelDir::open(&dir)?)
    }

    /// Opens `tokenizer/` and `text_encoder/`, the T5 encoder's weights in `dtype`.
    pub fn text_encoder(
        &self,
        dtype: DType,
        device: &Device,
    ) -> Result<TextEncoder, PipelineError> {
        let encoder = self.component(
            "text_encoder/",
            "config.json",
            "text_encoder/config.json and model.safetensors (or its sharded index): a T5 \
             encoder as transformers' T5EncoderModel saves it",
        )?;
        if !self.root.join("tokenizer").is_dir() {
            return Err(PipelineError::Missing {
                dir: self.root.display().to_string(),
                component: "tokenizer/",
                expected: "tokenizer/tokenizer.json (T5's fast tokenizer)",
            });
        }
        Ok(TextEncoder::open(
            &self.root.join("tokenizer"),
            &encoder,
            dtype,
            device,
        )?)
    }

    /// Opens `vae/`, its weights in `dtype`.
    pub fn vae(&self, dtype: DType, device: &Device) -> Result<Vae, PipelineError> {
        let dir = self.component(
            "vae/",
            "config.json",
            "vae/config.json and diffusion_pytorch_model.safetensors (an AutoencoderKL)",
        )?;
        Ok(Vae::open(&dir, dtype, device)?)
    }

    /// The VAE's encoder alone (`vae/`), with weights in `dtype`.
    pub fn vae_encoder(&self, dtype: DType, device: &Device) -> Result<VaeEncoder, PipelineError> {
        let dir = self.component(
            "vae/",
            "config.json",
            "vae/config.json and diffusion_pytorch_model.safetensors (an AutoencoderKL)",
        )?;
        Ok(VaeEncoder::open(&dir, dtype, device)?)
    }

    /// The DDIM configuration of `scheduler/scheduler_config.json`.
    pub fn ddim_config(&self) -> Result<DdimConfig, PipelineError> {
        let dir = self.component(
            "scheduler/",
            "scheduler_config.json",
            "scheduler/scheduler_config.json (a DDIMScheduler config)",
        )?;
        let path = dir.join("scheduler_config.json");
        ddim_config_from_json(&read_json(&path)?, &path)
    }
}

/// The DDIM configuration stored beside a transformer directory, in
/// `<parent>/scheduler/scheduler_config.json`, if there is one: a pipeline's `transformer/`
/// and a `latte train` checkpoint's `transformer/` and `ema/` both have their scheduler
/// there.
pub fn scheduler_beside(transformer_dir: &Path) -> Result<Option<DdimConfig>, PipelineError> {
    let Some(parent) = transformer_dir.parent() else {
        return Ok(None);
    };
    let path = parent.join(SCHEDULER_CONFIG_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    ddim_config_from_json(&read_json(&path)?, &path).map(Some)
}

/// `config` as diffusers' `DDIMScheduler` config JSON (every key
/// [`ddim_config_from_json`] maps, so that reading it back gives `config`).
pub fn ddim_config_to_json(config: &DdimConfig) -> Value {
    let prediction_type = match config.prediction_type {
        PredictionType::Epsilon => "epsilon",
        PredictionType::Sample => "sample",
        PredictionType::VPrediction => "v_prediction",
    };
    let beta_schedule = match config.betas.beta_schedule {
        BetaSchedule::Linear => "linear",
        BetaSchedule::ScaledLinear => "scaled_linear",
    };
    serde_json::json!({
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": config.betas.num_train_timesteps,
        "beta_start": config.betas.beta_start,
        "beta_end": config.betas.beta_end,
        "beta_schedule": beta_schedule,
        "trained_betas": null,
        "clip_sample": config.clip_sample,
        "clip_sample_range": config.clip_sample_range,
        "set_alpha_to_one": config.set_alpha_to_one,
        "steps_offset": config.steps_offset,
        "prediction_type": prediction_type,
        "timestep_spacing": config.timestep_spacing.to_string(),
        "thresholding": false,
        "rescale_betas_zero_snr": false,
    })
}

/// Maps a diffusers `DDIMScheduler` config to [`DdimConfig`]; an unknown key, another
/// scheduler class or a value DDIM here does not implement is an error naming the key.
pub fn ddim_config_from_json(
    json: &Map<String, Value>,
    path: &Path,
) -> Result<DdimConfig, PipelineError> {
    let unsupported = |key: &str, value: &Value, supported: &str| PipelineError::Unsupported {
        path: path.display().to_string(),
        key: key.to_string(),
        value: value.to_string(),
        supported: supported.to_string(),
    };
    let mut config = DdimConfig::default();
    for (key, value) in json {
        let number = || {
            value
                .as_f64()
                .ok_or_else(|| unsupported(key, value, "a number"))
        };
        let count = || {
            value
                .as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| unsupported(key, value, "a non-negative integer"))
        };
        let flag = || {
            value
                .as_bool()
                .ok_or_else(|| unsupported(key, value, "true or false"))
        };
        match key.as_str() {
            "_class_name" if value.as_str() == Some("DDIMScheduler") => {}
            "_class_name" => return Err(unsupported(key, value, "\"DDIMScheduler\"")),
            // Metadata, and keys DDIM does not read: the thresholding bounds (thresholding
            // must be off) and `variance_type`, which DDIMScheduler does not take
            // (LattePipeline then keeps the ε half of a learned-sigma output, as here).
            "_diffusers_version"
            | "_use_default_values"
            | "sample_max_value"
            | "dynamic_thresholding_ratio"
            | "variance_type" => {}
            "num_train_timesteps" => config.betas.num_train_timesteps = count()?,
            "beta_start" => config.betas.beta_start = number()?,
            "beta_end" => config.betas.beta_end = number()?,
            "beta_schedule" => {
                config.betas.beta_schedule = match value.as_str() {
                    Some("linear") => BetaSchedule::Linear,
                    Some("scaled_linear") => BetaSchedule::ScaledLinear,
                    _ => return Err(unsupported(key, value, "\"linear\" or \"scaled_linear\"")),
                }
            }
            "trained_betas" if value.is_null() => {}
            "trained_betas" => return Err(unsupported(key, value, "null")),
            "clip_sample" => config.clip_sample = flag()?,
            "clip_sample_range" => config.clip_sample_range = number()?,
            "set_alpha_to_one" => config.set_alpha_to_one = flag()?,
            "steps_offset" => config.steps_offset = count()?,
            "prediction_type" => {
                config.prediction_type = match value.as_str() {
                    Some("epsilon") => PredictionType::Epsilon,
                    Some("sample") => PredictionType::Sample,
                    Some("v_prediction") => PredictionType::VPrediction,
                    _ => {
                        return Err(unsupported(
                            key,
                            value,
                            "\"epsilon\", \"sample\" or \"v_prediction\"",
                        ))
                    }
                }
            }
            "timestep_spacing" => {
                config.timestep_spacing = value
                    .as_str()
                    .and_then(|s| s.parse::<TimestepSpacing>().ok())
                    .ok_or_else(|| {
                        unsupported(key, value, "\"leading\", \"trailing\" or \"linspace\"")
                    })?
            }
            "thresholding" | "rescale_betas_zero_snr" if value.as_bool() == Some(false) => {}
            "thresholding" | "rescale_betas_zero_snr" => {
                return Err(unsupported(key, value, "false"))
            }
            _ => return Err(unsupported(key, value, "an unknown DDIMScheduler key")),
        }
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<DdimConfig, PipelineError> {
        let json: Value = serde_json::from_str(text).unwrap();
        ddim_config_from_json(json.as_object().unwrap(), Path::new("s.json"))
    }

    #[test]
    fn ddim_config_json_round_trips() {
        let config = DdimConfig {
            betas: crate::scheduler::BetaConfig {
                num_train_timesteps: 500,
                beta_start: 2e-4,
                beta_end: 0.03,
                beta_schedule: BetaSchedule::ScaledLinear,
            },
            clip_sample: false,
            clip_sample_range: 1.5,
            set_alpha_to_one: false,
            steps_offset: 1,
            prediction_type: PredictionType::VPrediction,
            timestep_spacing: TimestepSpacing::Trailing,
        };
        let json = ddim_config_to_json(&config);
        let back = ddim_config_from_json(json.as_object().unwrap(), Path::new("s.json")).unwrap();
        assert_eq!(back, config);
    }

    #[test]
    fn ddim_keys_map_and_bad_ones_are_named() {
        let c = parse(
            r#"{"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear",
                "clip_sample": false, "timestep_spacing": "trailing", "steps_offset": 1,
                "trained_betas": null, "thresholding": false, "variance_type": "learned_range"}"#,
        )
        .unwrap();
        assert_eq!(c.betas.beta_schedule, BetaSchedule::ScaledLinear);
        assert!(!c.clip_sample);
        assert_eq!(c.timestep_spacing, TimestepSpacing::Trailing);
        assert_eq!(c.steps_offset, 1);
        for (text, needle) in [
            (r#"{"_class_name": "PNDMScheduler"}"#, "key `_class_name`"),
            (r#"{"thresholding": true}"#, "key `thresholding` = true"),
            (
                r#"{"timestep_spacing": "karras"}"#,
                "key `timestep_spacing`",
            ),
            (r#"{"use_karras_sigmas": true}"#, "key `use_karras_sigmas`"),
            (
                r#"{"beta_schedule": "squaredcos_cap_v2"}"#,
                "key `beta_schedule`",
            ),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
    }
}
