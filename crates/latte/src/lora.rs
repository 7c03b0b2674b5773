//! LoRA adapters in PEFT's format.
//!
//! An adapter directory holds `adapter_config.json` (PEFT's `LoraConfig`: rank `r`,
//! `lora_alpha`, `target_modules`, …) and `adapter_model.safetensors` with two f32 factors
//! per adapted linear layer, under PEFT's names for a diffusers model:
//! `base_model.model.<module>.lora_A.weight` `(r, in)` and `….lora_B.weight` `(out, r)`,
//! where `<module>` is the layer's name in `LatteTransformer3DModel`
//! (`transformer_blocks.0.attn1.to_q`). `peft.PeftModel.from_pretrained(transformer, dir)`
//! loads what [`Adapter::save`] writes, and [`Adapter::load`] reads what PEFT writes.
//!
//! Layers are chosen as PEFT chooses them ([`LoraConfig::targets`]): a list of names
//! matches a module whose name equals one or ends with `.<name>`; a string is a regular
//! expression the whole name must match. Each layer's update is `s·B·A` with
//! `s = lora_alpha / r` (`/ √r` with `use_rslora`), per-layer ranks and alphas from
//! `rank_pattern` and `alpha_pattern`. The update attaches to the model's layers
//! ([`Adapter::attach`]; see [`crate::nn::low_rank`]) or merges into the weights
//! ([`Adapter::merge_into`]).

use crate::config::LatteConfig;
use crate::model::Latte;
use crate::nn::low_rank::LowRank;
use crate::weights::parameter_specs;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Init, VarMap};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::Path;

/// The adapter's configuration file.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
/// The adapter's weights file.
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// PEFT's prefix of every key (`PeftModel.base_model.model`).
const KEY_PREFIX: &str = "base_model.model.";
/// The layers diffusers' LoRA training scripts adapt: the attention projections.
pub const DEFAULT_TARGETS: [&str; 4] = ["to_k", "to_q", "to_v", "to_out.0"];

/// Errors of reading, writing and applying adapters; each names the file or key.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// A file could not be read or written.
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    /// The configuration is malformed, or asks for something latte-rs does not do.
    #[error("{path}: {message}")]
    Config { path: String, message: String },
    /// The adapter's tensors do not fit its configuration or the model.
    #[error("adapter in {dir} does not fit the model:\n{details}")]
    Mismatch { dir: String, details: String },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Which modules an adapter covers: names (a module matches one it equals or ends with
/// as `.<name>`) or one regular expression matching whole names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Module names or name suffixes.
    Names(Vec<String>),
    /// A regular expression a whole module name must match.
    Pattern(String),
}

impl TargetModules {
    /// The default targets ([`DEFAULT_TARGETS`]).
    pub fn default_targets() -> Self {
        Self::Names(DEFAULT_TARGETS.iter().map(|s| s.to_string()).collect())
    }

    fn matcher(&self) -> Result<Matcher, String> {
        Ok(match self {
            Self::Names(names) => Matcher::Names(names.clone()),
            Self::Pattern(pattern) => Matcher::Pattern(
                regex::Regex::new(&format!("^(?:{pattern})$"))
                    .map_err(|e| format!("target_modules `{pattern}`: {e}"))?,
            ),
        })
    }
}

impl std::fmt::Display for TargetModules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Names(names) => f.write_str(&names.join(",")),
            Self::Pattern(pattern) => write!(f, "/{pattern}/"),
        }
    }
}

enum Matcher {
    Names(Vec<String>),
    Pattern(regex::Regex),
}

impl Matcher {
    fn matches(&self, module: &str) -> bool {
        match self {
            Self::Names(names) => names
                .iter()
                .any(|n| module == n || module.ends_with(&format!(".{n}"))),
            Self::Pattern(re) => re.is_match(module),
        }
    }
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// PEFT's `LoraConfig`, the fields `adapter_config.json` needs (others PEFT writes are
/// read and ignored when they hold their defaults; those that change the computation and
/// that latte-rs does not implement are refused by [`LoraConfig::validate`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// `"LORA"`.
    #[serde(default = "lora_type")]
    pub peft_type: String,
    /// Rank of every update (unless `rank_pattern` says otherwise).
    pub r: usize,
    /// Scale numerator: `s = lora_alpha / r`.
    #[serde(serialize_with = "integral_as_integer")]
    pub lora_alpha: f64,
    /// The layers to adapt.
    pub target_modules: TargetModules,
    /// Layers excluded from `target_modules`.
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    /// Ranks by pattern (a module matches a key it ends with, as PEFT's `get_pattern_key`).
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Alphas by pattern.
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// `s = lora_alpha / √r` (rank-stabilised LoRA).
    #[serde(default)]
    pub use_rslora: bool,
    /// Dropout on the update's input in training (PEFT's); latte-rs trains without.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub lora_dropout: f64,
    /// `"none"`: no bias is trained.
    #[serde(default = "no_bias")]
    pub bias: String,
    /// How PEFT initialises fresh factors (`true`: `A` Kaiming-uniform, `B` zero).
    #[serde(default = "init_true")]
    pub init_lora_weights: serde_json::Value,
    /// The base model the adapter was trained on.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// PEFT's task type (none for a diffusers model).
    #[serde(default)]
    pub task_type: Option<String>,
    /// Whether PEFT loads the adapter for inference only.
    #[serde(default)]
    pub inference_mode: bool,
    /// Weight-decomposed LoRA (not supported).
    #[serde(default, skip_serializing_if = "is_false")]
    pub use_dora: bool,
    /// A bias on `B` (not supported).
    #[serde(default, skip_serializing_if = "is_false")]
    pub lora_bias: bool,
    /// Transposed weights (Conv1D layers; not supported).
    #[serde(default, skip_serializing_if = "is_false")]
    pub fan_in_fan_out: bool,
    /// Modules trained in full beside the adapter (not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules_to_save: Option<Vec<String>>,
    /// Only some layer indices (not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers_to_transform: Option<serde_json::Value>,
    /// Parameters rather than modules (not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_parameters: Option<serde_json::Value>,
}

fn lora_type() -> String {
    "LORA".into()
}

fn no_bias() -> String {
    "none".into()
}

fn init_true() -> serde_json::Value {
    serde_json::Value::Bool(true)
}

/// Writes a whole alpha as an integer, as PEFT's configs hold it.
fn integral_as_integer<S: serde::Serializer>(value: &f64, s: S) -> Result<S::Ok, S::Error> {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        s.serialize_i64(*value as i64)
    } else {
        s.serialize_f64(*value)
    }
}

/// An adapted linear layer: its module name, widths, rank and scale.
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptedLayer {
    /// The module name (`transformer_blocks.0.attn1.to_q`).
    pub module: String,
    /// Input width.
    pub in_dim: usize,
    /// Output width.
    pub out_dim: usize,
    /// Rank of the update.
    pub rank: usize,
    /// `s` of the update.
    pub scale: f64,
}

impl AdaptedLayer {
    /// Scalars of the two factors.
    pub fn numel(&self) -> usize {
        self.rank * (self.in_dim + self.out_dim)
    }

    /// The name of the down factor `A` in latte-rs (`<module>.lora_A.weight`).
    pub fn down_name(&self) -> String {
        format!("{}.lora_A.weight", self.module)
    }

    /// The name of the up factor `B` (`<module>.lora_B.weight`).
    pub fn up_name(&self) -> String {
        format!("{}.lora_B.weight", self.module)
    }
}

impl LoraConfig {
    /// A configuration of rank `rank`, scale numerator `alpha`, for `targets`.
    pub fn new(rank: usize, alpha: f64, targets: TargetModules) -> Self {
        Self {
            peft_type: lora_type(),
            r: rank,
            lora_alpha: alpha,
            target_modules: targets,
            exclude_modules: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            use_rslora: false,
            lora_dropout: 0.0,
            bias: no_bias(),
            init_lora_weights: init_true(),
            base_model_name_or_path: None,
            task_type: None,
            inference_mode: false,
            use_dora: false,
            lora_bias: false,
            fan_in_fan_out: false,
            modules_to_save: None,
            layers_to_transform: None,
            target_parameters: None,
        }
    }

    /// Checks the values, and refuses the variants latte-rs does not compute.
    pub fn validate(&self) -> Result<(), String> {
        let refuse = |what: &str| Err(format!("{what} is not supported (plain LoRA only)"));
        if self.peft_type != "LORA" {
            return Err(format!("peft_type `{}`: expected LORA", self.peft_type));
        }
        if self.r == 0 || self.rank_pattern.values().any(|r| *r == 0) {
            return Err("the rank r must be at least 1".into());
        }
        let alphas = std::iter::once(&self.lora_alpha).chain(self.alpha_pattern.values());
        for alpha in alphas {
            if !alpha.is_finite() {
                return Err(format!("lora_alpha {alpha} must be finite"));
            }
        }
        if self.use_dora {
            return refuse("use_dora (DoRA)");
        }
        if self.lora_bias || self.bias != "none" {
            return refuse("a trained bias (bias / lora_bias)");
        }
        if self.fan_in_fan_out {
            return refuse("fan_in_fan_out");
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return refuse("modules_to_save");
        }
        if self
            .layers_to_transform
            .as_ref()
            .is_some_and(|v| !v.is_null())
        {
            return refuse("layers_to_transform");
        }
        if self
            .target_parameters
            .as_ref()
            .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
        {
            return refuse("target_parameters");
        }
        self.target_modules.matcher()?;
        if let Some(exclude) = &self.exclude_modules {
            exclude.matcher()?;
        }
        for key in self.rank_pattern.keys().chain(self.alpha_pattern.keys()) {
            pattern_regex(key)?;
        }
        Ok(())
    }

    /// The rank and scale of `module`'s update.
    fn rank_and_scale(&self, module: &str) -> Result<(usize, f64), String> {
        let rank = match pattern_key(self.rank_pattern.keys(), module)? {
            Some(key) => self.rank_pattern[key],
            None => self.r,
        };
        let alpha = match pattern_key(self.alpha_pattern.keys(), module)? {
            Some(key) => self.alpha_pattern[key],
            None => self.lora_alpha,
        };
        let denominator = if self.use_rslora {
            (rank as f64).sqrt()
        } else {
            rank as f64
        };
        Ok((rank, alpha / denominator))
    }

    /// The layers of a model with `config` that the adapter covers, in module order, with
    /// their ranks and scales.
    ///
    /// # Errors
    /// When the targets match no linear layer, or match the patch embedding (a
    /// convolution in diffusers).
    pub fn targets(&self, config: &LatteConfig) -> Result<Vec<AdaptedLayer>, String> {
        self.validate()?;
        let targets = self.target_modules.matcher()?;
        let exclude = self
            .exclude_modules
            .as_ref()
            .map(|e| e.matcher())
            .transpose()?;
        let wanted = |module: &str| {
            targets.matches(module) && !exclude.as_ref().is_some_and(|e| e.matches(module))
        };
        let specs = parameter_specs(config).map_err(|e| e.to_string())?;
        let mut layers = Vec::new();
        for spec in &specs {
            let Some(module) = spec.name.strip_suffix(".weight") else {
                continue;
            };
            if !wanted(module) {
                continue;
            }
            let [out_dim, in_dim] = spec.shape[..] else {
                return Err(format!(
                    "target_modules `{}` match `{module}`, the patch embedding (a convolution \
                     in diffusers); LoRA applies to linear layers only",
                    self.target_modules
                ));
            };
            let (rank, scale) = self.rank_and_scale(module)?;
            layers.push(AdaptedLayer {
                module: module.to_string(),
                in_dim,
                out_dim,
                rank,
                scale,
            });
        }
        if layers.is_empty() {
            return Err(format!(
                "target_modules `{}` match no linear layer of the model (its layers are named \
                 like transformer_blocks.0.attn1.to_q, transformer_blocks.0.ff.net.2, proj_out)",
                self.target_modules
            ));
        }
        Ok(layers)
    }
}

/// `(.*\.)?(key)$` as a regular expression (PEFT's `get_pattern_key`).
fn pattern_regex(key: &str) -> Result<regex::Regex, String> {
    regex::Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
        .map_err(|e| format!("pattern `{key}`: {e}"))
}

/// The first of `keys` that `module` matches as PEFT's `get_pattern_key` does.
fn pattern_key<'a>(
    keys: impl Iterator<Item = &'a String>,
    module: &str,
) -> Result<Option<&'a String>, String> {
    for key in keys {
        if pattern_regex(key)?.is_match(module) {
            return Ok(Some(key));
        }
    }
    Ok(None)
}

/// An adapter: its configuration and, for every adapted layer, `A` and `B` (f32).
#[derive(Debug, Clone)]
pub struct Adapter {
    config: LoraConfig,
    layers: Vec<AdaptedLayer>,
    /// `(A, B)` of each layer, in `layers`' order.
    factors: Vec<(Tensor, Tensor)>,
}

impl Adapter {
    /// A fresh adapter for a model with `model_config`, initialised as PEFT does: `A`
    /// uniform in ±1/√in (`init_lora_weights=True`, Kaiming-uniform with a = √5) or normal
    /// with standard deviation 1/r (`"gaussian"`, what diffusers' training scripts ask
    /// for), from a generator seeded by `seed` and the layer's name; `B` zero, so that the
    /// adapted model starts as the base model.
    pub fn fresh(
        config: LoraConfig,
        model_config: &LatteConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Self, LoraError> {
        let settings_error = |message: String| LoraError::Config {
            path: "LoRA settings".into(),
            message,
        };
        let init = &config.init_lora_weights;
        if !(*init == true || *init == "gaussian") {
            return Err(settings_error(format!(
                "init_lora_weights {init}: fresh adapters start as true (Kaiming-uniform) or \
                 \"gaussian\""
            )));
        }
        let layers = config.targets(model_config).map_err(settings_error)?;
        let factors = layers
            .iter()
            .map(|layer| {
                let init = if config.init_lora_weights == "gaussian" {
                    Init::Randn {
                        mean: 0.0,
                        stdev: 1.0 / layer.rank as f64,
                    }
                } else {
                    let bound = 1.0 / (layer.in_dim as f64).sqrt();
                    Init::Uniform {
                        lo: -bound,
                        up: bound,
                    }
                };
                let spec = crate::weights::ParamSpec {
                    name: layer.down_name(),
                    shape: vec![layer.rank, layer.in_dim],
                    init,
                };
                let down = Tensor::from_vec(
                    crate::random::init_values(&spec, seed)?,
                    (layer.rank, layer.in_dim),
                    device,
                )?;
                let up = Tensor::zeros((layer.out_dim, layer.rank), DType::F32, device)?;
                Ok((down, up))
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            config,
            layers,
            factors,
        })
    }

    /// Reads the adapter in `dir` for a model with `model_config`: the configuration is
    /// checked, and every factor the targets call for must be present with its shape
    /// (all problems are listed in one error).
    pub fn load(
        dir: &Path,
        model_config: &LatteConfig,
        device: &Device,
    ) -> Result<Self, LoraError> {
        let config_path = dir.join(ADAPTER_CONFIG_FILE);
        let config: LoraConfig =
            crate::io::read_json(&config_path).map_err(|message| LoraError::Config {
                path: config_path.display().to_string(),
                message,
            })?;
        let config_error = |message: String| LoraError::Config {
            path: config_path.display().to_string(),
            message,
        };
        let layers = config.targets(model_config).map_err(config_error)?;
        let weights_path = dir.join(ADAPTER_WEIGHTS_FILE);
        let io_error = |message: String| LoraError::Io {
            path: weights_path.display().to_string(),
            message,
        };
        let bytes = std::fs::read(&weights_path).map_err(|e| io_error(e.to_string()))?;
        let stored = candle_core::safetensors::load_buffer(&bytes, device)
            .map_err(|e| io_error(format!("not a readable safetensors file: {e}")))?;
        let mut remaining: BTreeMap<String, Tensor> = stored.into_iter().collect();
        let mut details = String::new();
        let mut factors = Vec::with_capacity(layers.len());
        for layer in &layers {
            let mut take = |name: String, shape: [usize; 2]| {
                let key = format!("{KEY_PREFIX}{name}");
                match remaining.remove(&key) {
                    None => {
                        let _ = writeln!(details, "  missing:     {key} {shape:?}");
                        None
                    }
                    Some(t) if t.dims() != shape => {
                        let _ = writeln!(
                            details,
                            "  mis-shaped:  {key} expected {shape:?}, found {:?}",
                            t.dims()
                        );
                        None
                    }
                    Some(t) => Some(t),
                }
            };
            let down = take(layer.down_name(), [layer.rank, layer.in_dim]);
            let up = take(layer.up_name(), [layer.out_dim, layer.rank]);
            if let (Some(down), Some(up)) = (down, up) {
                factors.push((down.to_dtype(DType::F32)?, up.to_dtype(DType::F32)?));
            }
        }
        for (key, t) in &remaining {
            let _ = writeln!(details, "  unexpected:  {key} {:?}", t.dims());
        }
        if !details.is_empty() {
            return Err(LoraError::Mismatch {
                dir: dir.display().to_string(),
                details: format!(
                    "{details}  (target_modules {}, r = {}: the layers and ranks of \
                     {ADAPTER_CONFIG_FILE})",
                    config.target_modules, config.r
                ),
            });
        }
        for ((down, up), layer) in factors.iter().zip(&layers) {
            for (t, name) in [(down, layer.down_name()), (up, layer.up_name())] {
                if !t
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .all(|v| v.is_finite())
                {
                    return Err(io_error(format!(
                        "{KEY_PREFIX}{name} holds NaN or infinite values"
                    )));
                }
            }
        }
        Ok(Self {
            config,
            layers,
            factors,
        })
    }

    /// An adapter of `config` on `layers` (from [`LoraConfig::targets`]) with the factors
    /// `named` by [`Adapter::named_factors`]' names (an optimiser's variables, or their
    /// moving average).
    ///
    /// # Errors
    /// When a factor is missing or mis-shaped.
    pub fn from_factors(
        config: LoraConfig,
        layers: Vec<AdaptedLayer>,
        named: &HashMap<String, Tensor>,
    ) -> Result<Self, LoraError> {
        let get = |name: String, shape: [usize; 2]| match named.get(&name) {
            Some(t) if t.dims() == shape => Ok(t.clone()),
            Some(t) => Err(LoraError::Mismatch {
                dir: "LoRA factors".into(),
                details: format!("  {name}: expected {shape:?}, found {:?}", t.dims()),
            }),
            None => Err(LoraError::Mismatch {
                dir: "LoRA factors".into(),
                details: format!("  missing: {name}"),
            }),
        };
        let factors = layers
            .iter()
            .map(|l| {
                Ok((
                    get(l.down_name(), [l.rank, l.in_dim])?,
                    get(l.up_name(), [l.out_dim, l.rank])?,
                ))
            })
            .collect::<Result<_, LoraError>>()?;
        Ok(Self {
            config,
            layers,
            factors,
        })
    }

    /// The same adapter with other factors of the same layers ([`Adapter::from_factors`]).
    pub fn with_factors(&self, named: &HashMap<String, Tensor>) -> Result<Self, LoraError> {
        Self::from_factors(self.config.clone(), self.layers.clone(), named)
    }

    /// The configuration.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// The adapted layers.
    pub fn layers(&self) -> &[AdaptedLayer] {
        &self.layers
    }

    /// The factors by latte-rs name (`<module>.lora_A.weight`, `<module>.lora_B.weight`).
    pub fn named_factors(&self) -> Vec<(String, Tensor)> {
        self.layers
            .iter()
            .zip(&self.factors)
            .flat_map(|(layer, (down, up))| {
                [
                    (layer.down_name(), down.clone()),
                    (layer.up_name(), up.clone()),
                ]
            })
            .collect()
    }

    /// Scalars of all factors.
    pub fn numel(&self) -> usize {
        self.layers.iter().map(AdaptedLayer::numel).sum()
    }

    /// Attaches the updates, scaled by `multiplier` (PEFT's `set_scale`; 1 as trained), to
    /// `model`'s layers; the factors are used as they are (variables stay tracked).
    pub fn attach(&self, model: &mut Latte, multiplier: f64) -> Result<(), LoraError> {
        let mut linears: HashMap<String, &mut crate::nn::linear::Linear> =
            model.linears_mut().into_iter().collect();
        for (layer, (down, up)) in self.layers.iter().zip(&self.factors) {
            let linear = linears
                .get_mut(&layer.module)
                .ok_or_else(|| LoraError::Mismatch {
                    dir: "model".into(),
                    details: format!("  no linear layer {}", layer.module),
                })?;
            linear.set_adapter(LowRank::new(
                down.clone(),
                up.clone(),
                layer.scale * multiplier,
            )?)?;
        }
        Ok(())
    }

    /// Attaches the adapter to `model` as trainable variables (f32 copies of the
    /// factors), returned by name ([`Adapter::named_factors`]' names).
    pub fn attach_trainable(&self, model: &mut Latte) -> Result<VarMap, LoraError> {
        self.attach_trainable_scaled(model, 1.0)
    }

    /// [`Adapter::attach_trainable`] with the updates scaled by `multiplier`.
    pub fn attach_trainable_scaled(
        &self,
        model: &mut Latte,
        multiplier: f64,
    ) -> Result<VarMap, LoraError> {
        let varmap = VarMap::new();
        let mut tensors = HashMap::new();
        {
            let mut data = varmap
                .data()
                .lock()
                .map_err(|_| candle_core::Error::Msg("parameter map poisoned".into()))?;
            for (name, t) in self.named_factors() {
                let var = Var::from_tensor(&t.to_dtype(DType::F32)?.copy()?)?;
                tensors.insert(name.clone(), var.as_tensor().clone());
                data.insert(name, var);
            }
        }
        self.with_factors(&tensors)?.attach(model, multiplier)?;
        Ok(varmap)
    }

    /// Merges the updates, scaled by `multiplier`, into `weights` (diffusers names):
    /// `W ← W + multiplier·s·B·A`, computed in f32 and stored in `W`'s dtype.
    pub fn merge_into(
        &self,
        weights: &mut HashMap<String, Tensor>,
        multiplier: f64,
    ) -> Result<(), LoraError> {
        for (layer, (down, up)) in self.layers.iter().zip(&self.factors) {
            let name = format!("{}.weight", layer.module);
            let weight = weights.get_mut(&name).ok_or_else(|| LoraError::Mismatch {
                dir: "model".into(),
                details: format!("  missing: {name}"),
            })?;
            let delta =
                LowRank::new(down.clone(), up.clone(), layer.scale * multiplier)?.weight_delta()?;
            let merged = (weight.to_dtype(DType::F32)? + delta.to_device(weight.device())?)?;
            *weight = merged.to_dtype(weight.dtype())?;
        }
        Ok(())
    }

    /// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors` (f32, PEFT's
    /// key names), each through a temporary file; `base_model` is recorded as
    /// `base_model_name_or_path`.
    pub fn save(&self, dir: &Path, base_model: Option<&str>) -> Result<(), LoraError> {
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |e: std::io::Error| LoraError::Io {
                path: path.clone(),
                message: e.to_string(),
            }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut tensors = HashMap::new();
        for (name, t) in self.named_factors() {
            tensors.insert(
                format!("{KEY_PREFIX}{name}"),
                t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
            );
        }
        crate::io::save_safetensors(&tensors, &dir.join(ADAPTER_WEIGHTS_FILE))?;
        let config = LoraConfig {
            base_model_name_or_path: base_model.map(str::to_string),
            ..self.config.clone()
        };
        let path = dir.join(ADAPTER_CONFIG_FILE);
        let json = serde_json::to_string_pretty(&config).map_err(|e| LoraError::Config {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        crate::io::write_atomically(&path, json.as_bytes()).map_err(io(&path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    fn tiny() -> LatteConfig {
        crate::config::tiny().config
    }

    #[test]
    fn names_match_whole_modules_or_dotted_suffixes() {
        let config = LoraConfig::new(2, 4.0, TargetModules::default_targets());
        let layers = config.targets(&tiny()).unwrap();
        let blocks = 2 * tiny().num_layers;
        // Spatial blocks have two attentions, temporal ones one: 3 attentions per layer.
        assert_eq!(layers.len(), 4 * 3 * blocks / 2);
        assert!(layers.iter().all(|l| l.scale == 2.0 && l.rank == 2));
        assert!(layers
            .iter()
            .any(|l| l.module == "temporal_transformer_blocks.0.attn1.to_out.0"));
        // `to_out` alone is no module of a linear layer; `q` is no suffix after a dot.
        let none = LoraConfig::new(
            2,
            2.0,
            TargetModules::Names(vec!["to_out".into(), "q".into()]),
        );
        let error = none.targets(&tiny()).unwrap_err();
        assert!(error.contains("match no linear layer"), "{error}");
    }

    #[test]
    fn patterns_ranks_and_exclusions_follow_peft() {
        let mut config = LoraConfig::new(
            4,
            8.0,
            TargetModules::Pattern(r".*blocks\.0\.(attn1\.to_q|ff\.net\.2)".into()),
        );
        config.rank_pattern.insert("ff.net.2".into(), 2);
        config.alpha_pattern.insert("ff.net.2".into(), 1.0);
        config.exclude_modules = Some(TargetModules::Names(vec![
            "temporal_transformer_blocks.0.attn1.to_q".into(),
        ]));
        let layers = config.targets(&tiny()).unwrap();
        let names: Vec<&str> = layers.iter().map(|l| l.module.as_str()).collect();
        assert_eq!(
            names,
            [
                "transformer_blocks.0.attn1.to_q",
                "transformer_blocks.0.ff.net.2",
                "temporal_transformer_blocks.0.ff.net.2"
            ]
        );
        assert_eq!((layers[0].rank, layers[0].scale), (4, 2.0));
        assert_eq!((layers[1].rank, layers[1].scale), (2, 0.5));
        config.use_rslora = true;
        assert_eq!(config.targets(&tiny()).unwrap()[0].scale, 4.0);
    }

    #[test]
    fn unsupported_variants_and_convolutions_are_refused() {
        let mut dora = LoraConfig::new(2, 2.0, TargetModules::default_targets());
        dora.use_dora = true;
        assert!(dora.validate().unwrap_err().contains("use_dora"));
        let conv = LoraConfig::new(2, 2.0, TargetModules::Names(vec!["pos_embed.proj".into()]));
        assert!(conv
            .targets(&tiny())
            .unwrap_err()
            .contains("patch embedding"));
    }
}
