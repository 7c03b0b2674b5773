//! Costs measured on the device: the real stages at the real shapes on random weights
//! and inputs, profiled by `remat::profile`, cached per configuration under
//! `$XDG_CACHE_HOME/latte-rs/` or `~/.cache/latte-rs/`.

use super::{CostModel, PlanningError, Setting, Workload};
use crate::config::{InputGeometry, LatteConfig};
use crate::costs::Mode;
use crate::io::write_atomically;
use crate::lora::{Adapter, LoraConfig};
use crate::model::{Latte, LatteInputs};
use crate::random::{randn, rng_for};
use crate::weights::{fresh_trainable, frozen};
use candle_core::{DType, Device, Tensor};
use remat::costs::ChainCosts;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Version of the cache entries; a change of what is measured bumps it.
const CACHE_FORMAT: u32 = 2;

/// Costs profiled on a device, with a cache.
pub struct MeasuredCosts {
    /// The device to measure on.
    pub device: Device,
    /// Its command-line name (part of the cache key).
    pub device_name: String,
    /// Seed of the random weights and inputs.
    pub seed: u64,
    /// Told what is about to be measured (measuring takes a while; cached costs are not
    /// announced).
    pub announce: fn(&str),
}

impl CostModel for MeasuredCosts {
    fn costs(&self, workload: &Workload, setting: Setting) -> Result<ChainCosts, PlanningError> {
        let geometry = workload.at_batch(setting.batch);
        let dtype = setting.precision.dtype();
        let key = CacheKey {
            format: CACHE_FORMAT,
            config: workload.config.clone(),
            geometry,
            dtype: setting.precision.name().to_string(),
            mode: workload.task.mode(),
            temporal: workload.temporal,
            device: self.device_name.clone(),
            lora: workload.lora.clone(),
        };
        let dir = cache_dir()?;
        let path = cache_path(&dir, &key)?;
        if let Ok(text) = std::fs::read_to_string(&path) {
            if let Ok(entry) = serde_json::from_str::<CacheEntry>(&text) {
                if entry.key == key {
                    return Ok(entry.costs);
                }
            }
        }
        (self.announce)(&format!(
            "measuring the stages of batch {} in {} on {} (cached in {})",
            geometry.batch,
            key.dtype,
            self.device_name,
            dir.display()
        ));
        let mode = workload.task.mode();
        let model = random_model(
            &workload.config,
            mode,
            workload.lora.as_ref(),
            dtype,
            &self.device,
            self.seed,
        )?;
        let (inputs, _) =
            random_inputs(&workload.config, &geometry, dtype, &self.device, self.seed)?;
        let meter = remat::meter::meter_for(&self.device)?;
        let costs = remat::profile::profile(
            &model.chain(workload.temporal),
            &inputs.to_vec(),
            &mode.wants_input_grad(),
            meter.as_ref(),
        )?;
        let entry = CacheEntry { key, costs };
        let cache_error = |e: std::io::Error| {
            PlanningError::Cache(format!(
                "cannot write the cost cache {}: {e}",
                path.display()
            ))
        };
        std::fs::create_dir_all(&dir).map_err(cache_error)?;
        let text = serde_json::to_string_pretty(&entry)
            .map_err(|e| PlanningError::Cache(e.to_string()))?;
        write_atomically(&path, text.as_bytes()).map_err(cache_error)?;
        Ok(entry.costs)
    }

    fn name(&self) -> &'static str {
        "measured"
    }
}

/// What identifies a measurement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CacheKey {
    format: u32,
    config: LatteConfig,
    geometry: InputGeometry,
    dtype: String,
    mode: Mode,
    temporal: bool,
    device: String,
    /// Trained adapters (absent in entries of full training or guidance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lora: Option<LoraConfig>,
}

#[derive(Debug, Serialize, Deserialize)]
struct CacheEntry {
    key: CacheKey,
    costs: ChainCosts,
}

/// The cache directory: `$XDG_CACHE_HOME/latte-rs`, else `~/.cache/latte-rs`.
///
/// # Errors
/// When neither variable is set.
pub fn cache_dir() -> Result<PathBuf, PlanningError> {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("latte-rs"));
    }
    let home = std::env::var_os("HOME")
        .filter(|d| !d.is_empty())
        .ok_or_else(|| {
            PlanningError::Cache(
                "no cache directory for measured costs: set XDG_CACHE_HOME or HOME".into(),
            )
        })?;
    Ok(PathBuf::from(home).join(".cache").join("latte-rs"))
}

fn cache_path(dir: &Path, key: &CacheKey) -> Result<PathBuf, PlanningError> {
    let text = serde_json::to_string(key).map_err(|e| PlanningError::Cache(e.to_string()))?;
    // FNV-1a: a stable file name for a key.
    let hash = crate::random::fnv1a(crate::random::FNV_OFFSET, text.as_bytes());
    Ok(dir.join(format!("costs-{hash:016x}.json")))
}

/// Random inputs of `geometry` and an upstream gradient for the output.
///
/// # Errors
/// When a tensor cannot be made on `device`.
pub fn random_inputs(
    config: &LatteConfig,
    geometry: &InputGeometry,
    dtype: DType,
    device: &Device,
    seed: u64,
) -> candle_core::Result<(LatteInputs, Tensor)> {
    let g = geometry;
    let mut rng = rng_for(seed, "plan-inputs");
    let inputs = LatteInputs {
        hidden_states: randn(
            &mut rng,
            (g.batch, config.in_channels, g.frames, g.height, g.width),
            device,
        )?
        .to_dtype(dtype)?,
        timestep: Tensor::new(vec![500i64; g.batch], device)?,
        encoder_hidden_states: randn(
            &mut rng,
            (g.batch, g.caption_tokens, config.caption_channels),
            device,
        )?
        .to_dtype(dtype)?,
    };
    let grad = randn(
        &mut rng,
        (g.batch, config.out_channels, g.frames, g.height, g.width),
        device,
    )?
    .to_dtype(dtype)?;
    Ok((inputs, grad))
}

/// The model with random weights: trainable variables for training, frozen tensors for
/// guidance; with `lora`, frozen weights and trainable adapters of that configuration
/// (in training).
///
/// # Errors
/// When the weights cannot be made on `device`, or the adapter does not fit the model.
pub fn random_model(
    config: &LatteConfig,
    mode: Mode,
    lora: Option<&LoraConfig>,
    dtype: DType,
    device: &Device,
    seed: u64,
) -> candle_core::Result<Latte> {
    let (trainable, varmap) = fresh_trainable(config, seed, dtype, device)?;
    Ok(match (mode, lora) {
        (Mode::Train, None) => trainable,
        (Mode::Guide, _) => frozen(config, &varmap)?,
        (Mode::Train, Some(lora)) => {
            let mut model = frozen(config, &varmap)?;
            drop(varmap);
            Adapter::fresh(lora.clone(), config, seed, device)
                .and_then(|adapter| adapter.attach_trainable(&mut model).map(drop))
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            model
        }
    })
}
