//! Weights in diffusers' layout: a model directory holding `config.json` and either one
//! `diffusion_pytorch_model.safetensors` or shards listed by
//! `diffusion_pytorch_model.safetensors.index.json`, in any stored float dtype.
//!
//! Before any tensor is read, the files' headers are checked against the parameters the
//! model declares ([`parameter_specs`]); every missing, unexpected or mis-shaped tensor
//! is reported in one error. The only `unsafe` memory map of the crate lives here.

use crate::config::{ConfigError, LatteConfig, LatteConfigFile};
use crate::init::Initialisation;
use crate::model::Latte;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// File name of single-file weights.
pub const WEIGHTS_FILE: &str = "diffusion_pytorch_model.safetensors";
/// File name of the shard index of sharded weights.
pub const WEIGHTS_INDEX_FILE: &str = "diffusion_pytorch_model.safetensors.index.json";
/// File name of the configuration.
pub const CONFIG_FILE: &str = "config.json";

/// Errors raised while reading or writing weights.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The configuration is unreadable or unsupported.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// The directory holds no weights file.
    #[error("no weights in {dir}: expected {single} or {index}")]
    NoWeights {
        dir: String,
        single: String,
        index: String,
    },
    /// A weights or index file is malformed or truncated.
    #[error("malformed weights file {path}: {message}")]
    Malformed { path: String, message: String },
    /// The stored tensors do not match the model the config describes.
    #[error("weights in {dir} do not match config.json:\n{details}")]
    Mismatch { dir: String, details: String },
    /// A stored tensor is not a floating-point tensor.
    #[error("tensor `{name}` in {path} has dtype {dtype}; expected a float dtype")]
    NotFloat {
        name: String,
        path: String,
        dtype: String,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// A parameter the model declares: its diffusers name, shape and fresh initialisation.
#[derive(Debug, Clone)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

impl ParamSpec {
    /// Number of scalars.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Every parameter of a model with `config`, in construction order, obtained by building
/// the model against a backend that records requests and allocates nothing.
pub fn parameter_specs(config: &LatteConfig) -> candle_core::Result<Vec<ParamSpec>> {
    let recorder = std::sync::Arc::new(SpecRecorder::default());
    let vb = VarBuilder::from_backend(
        Box::new(SharedRecorder(recorder.clone())),
        DType::F32,
        Device::Cpu,
    );
    Latte::new(config, vb)?;
    let specs = recorder
        .specs
        .lock()
        .map_err(|_| candle_core::Error::Msg("parameter recorder poisoned".into()))?
        .clone();
    Ok(specs)
}

#[derive(Default)]
struct SpecRecorder {
    specs: Mutex<Vec<ParamSpec>>,
}

struct SharedRecorder(std::sync::Arc<SpecRecorder>);

impl SimpleBackend for SharedRecorder {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Ok(mut specs) = self.0.specs.lock() {
            specs.push(ParamSpec {
                name: name.to_string(),
                shape: shape.dims().to_vec(),
                init,
            });
        }
        // A zero-stride view: the model is built without allocating its weights.
        Tensor::zeros((), dtype, dev)?.broadcast_as(shape)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("parameter {name} requested without a shape")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// A diffusers model directory, opened and checked.
pub struct ModelDir {
    path: PathBuf,
    config_file: LatteConfigFile,
    config: LatteConfig,
    weight_files: Vec<PathBuf>,
    sharded: bool,
    tensors: MmapedSafetensors,
}

impl std::fmt::Debug for ModelDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelDir")
            .field("path", &self.path)
            .field("weight_files", &self.weight_files)
            .finish()
    }
}

impl ModelDir {
    /// Opens `dir`: parses and validates `config.json`, maps the weights and checks every
    /// stored name and shape against the model the config describes.
    pub fn open(dir: &Path) -> Result<Self, WeightsError> {
        let config_file = LatteConfigFile::from_file(&dir.join(CONFIG_FILE))?;
        let config = config_file.resolve()?;
        let (weight_files, sharded) = weight_files(dir, WEIGHTS_FILE, WEIGHTS_INDEX_FILE)?;
        let tensors = map_files(&weight_files)?;
        let opened = Self {
            path: dir.to_path_buf(),
            config_file,
            config,
            weight_files,
            sharded,
            tensors,
        };
        opened.check_tensors()?;
        Ok(opened)
    }

    /// The validated configuration.
    pub fn config(&self) -> &LatteConfig {
        &self.config
    }

    /// The configuration as stored, with its metadata keys.
    pub fn config_file(&self) -> &LatteConfigFile {
        &self.config_file
    }

    /// Number of weight files (1 for single-file weights).
    pub fn shard_count(&self) -> usize {
        if self.sharded {
            self.weight_files.len()
        } else {
            1
        }
    }

    /// Every stored parameter converted to `dtype`, by name (for saving back).
    pub fn tensors(&self, dtype: DType) -> Result<Vec<(String, Tensor)>, WeightsError> {
        let mut out = Vec::new();
        for spec in parameter_specs(&self.config)? {
            let t = self
                .tensors
                .load(&spec.name, &Device::Cpu)?
                .to_dtype(dtype)?;
            out.push((spec.name, t));
        }
        Ok(out)
    }

    /// Bytes and tensor count per stored dtype.
    pub fn stored_dtypes(&self) -> BTreeMap<String, (usize, usize)> {
        let mut by_dtype = BTreeMap::new();
        for (_, view) in self.tensors.tensors() {
            let entry = by_dtype
                .entry(format!("{:?}", view.dtype()))
                .or_insert((0, 0));
            entry.0 += view.data().len();
            entry.1 += 1;
        }
        by_dtype
    }

    fn check_tensors(&self) -> Result<(), WeightsError> {
        let expected = parameter_specs(&self.config)?;
        let mut stored: HashMap<String, Vec<usize>> = HashMap::new();
        for (name, view) in self.tensors.tensors() {
            if !matches!(
                view.dtype(),
                safetensors::Dtype::F16
                    | safetensors::Dtype::BF16
                    | safetensors::Dtype::F32
                    | safetensors::Dtype::F64
            ) {
                return Err(WeightsError::NotFloat {
                    path: self.path.display().to_string(),
                    dtype: format!("{:?}", view.dtype()),
                    name,
                });
            }
            stored.insert(name, view.shape().to_vec());
        }
        let details = mismatch_report(&expected, &stored);
        if details.is_empty() {
            Ok(())
        } else {
            Err(WeightsError::Mismatch {
                dir: self.path.display().to_string(),
                details,
            })
        }
    }

    /// The model with frozen weights (plain tensors: no parameter gradients), converted to
    /// `dtype` on `device`.
    pub fn load_frozen(&self, dtype: DType, device: &Device) -> Result<Latte, WeightsError> {
        Ok(frozen_from(
            &self.config,
            self.frozen_tensors(dtype, device)?,
            dtype,
            device,
        )?)
    }

    /// Every parameter by diffusers name, converted to `dtype` on `device`.
    pub fn frozen_tensors(
        &self,
        dtype: DType,
        device: &Device,
    ) -> Result<HashMap<String, Tensor>, WeightsError> {
        let mut tensors = HashMap::new();
        for spec in parameter_specs(&self.config)? {
            let t = self.tensors.load(&spec.name, device)?.to_dtype(dtype)?;
            tensors.insert(spec.name, t);
        }
        Ok(tensors)
    }

    /// The model with trainable weights: every parameter a [`Var`] in the returned map.
    pub fn load_trainable(
        &self,
        dtype: DType,
        device: &Device,
    ) -> Result<(Latte, VarMap), WeightsError> {
        let weights = parameter_specs(&self.config)?.into_iter().map(|spec| {
            let tensor = self.tensors.load(&spec.name, device)?;
            Ok((spec.name, tensor))
        });
        Ok(trainable_from(&self.config, weights, dtype, device)?)
    }
}

/// A fresh trainable model and its parameters, initialised as PyTorch does from a seeded
/// generator: each parameter's values depend only on `seed` and its name.
pub fn fresh_trainable(
    config: &LatteConfig,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<(Latte, VarMap)> {
    fresh_trainable_with(config, Initialisation::ModuleDefaults, seed, dtype, device)
}

/// A fresh trainable model initialised by `scheme` from a seeded generator: each
/// parameter's values depend only on the scheme, `seed` and its name.
pub fn fresh_trainable_with(
    config: &LatteConfig,
    scheme: Initialisation,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<(Latte, VarMap)> {
    let weights = parameter_specs(config)?.into_iter().map(|mut spec| {
        spec.init = scheme.of(&spec);
        let values = crate::random::init_values(&spec, seed)?;
        Ok((
            spec.name,
            Tensor::from_vec(values, spec.shape.as_slice(), device)?,
        ))
    });
    trainable_from(config, weights, dtype, device)
}

/// A trainable model whose variables hold copies of `weights` (name, tensor) in `dtype`
/// on `device`.
pub fn trainable_from(
    config: &LatteConfig,
    weights: impl IntoIterator<Item = candle_core::Result<(String, Tensor)>>,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<(Latte, VarMap)> {
    let varmap = VarMap::new();
    {
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("parameter map poisoned".into()))?;
        for weight in weights {
            let (name, w) = weight?;
            let t = w.to_dtype(dtype)?.to_device(device)?.copy()?;
            data.insert(name, Var::from_tensor(&t)?);
        }
    }
    let model = Latte::new(config, VarBuilder::from_varmap(&varmap, dtype, device))?;
    Ok((model, varmap))
}

/// A model with frozen weights (plain tensors: no parameter gradients) from `tensors` by
/// diffusers name, in `dtype` on `device`.
pub fn frozen_from(
    config: &LatteConfig,
    tensors: HashMap<String, Tensor>,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Latte> {
    Latte::new(config, VarBuilder::from_tensors(tensors, dtype, device))
}

/// The same model with frozen weights: plain tensors sharing the variables' storage, so
/// that no autograd graph is built (inference, or guidance w.r.t. the latents only).
pub fn frozen(config: &LatteConfig, varmap: &VarMap) -> candle_core::Result<Latte> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("parameter map poisoned".into()))?;
    let mut tensors = HashMap::new();
    let mut device_and_dtype = None;
    for (name, var) in data.iter() {
        let t = var.as_detached_tensor();
        device_and_dtype = Some((t.device().clone(), t.dtype()));
        tensors.insert(name.clone(), t);
    }
    let (device, dtype) = device_and_dtype.unwrap_or((Device::Cpu, DType::F32));
    Latte::new(config, VarBuilder::from_tensors(tensors, dtype, &device))
}

/// Lists missing, unexpected and mis-shaped tensors, one per line; empty when all match.
fn mismatch_report(expected: &[ParamSpec], stored: &HashMap<String, Vec<usize>>) -> String {
    let mut report = String::new();
    let expected_names: HashMap<&str, &ParamSpec> =
        expected.iter().map(|s| (s.name.as_str(), s)).collect();
    for spec in expected {
        match stored.get(&spec.name) {
            None => {
                let _ = writeln!(report, "  missing:     {} {:?}", spec.name, spec.shape);
            }
            Some(shape) if *shape != spec.shape => {
                let _ = writeln!(
                    report,
                    "  mis-shaped:  {} expected {:?}, found {:?}",
                    spec.name, spec.shape, shape
                );
            }
            Some(_) => {}
        }
    }
    let mut unexpected: Vec<_> = stored
        .iter()
        .filter(|(name, _)| !expected_names.contains_key(name.as_str()))
        .collect();
    unexpected.sort();
    for (name, shape) in unexpected {
        let _ = writeln!(report, "  unexpected:  {name} {shape:?}");
    }
    report
}

/// The weight files of `dir` and whether they are shards: the shards listed by the
/// `index_name` file if it exists, else the `single_name` file.
pub(crate) fn weight_files(
    dir: &Path,
    single_name: &str,
    index_name: &str,
) -> Result<(Vec<PathBuf>, bool), WeightsError> {
    let single = dir.join(single_name);
    let index = dir.join(index_name);
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|source| WeightsError::Io {
            path: index.display().to_string(),
            source,
        })?;
        let malformed = |message: String| WeightsError::Malformed {
            path: index.display().to_string(),
            message,
        };
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| malformed(e.to_string()))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| malformed("no `weight_map` object".into()))?;
        let mut files: Vec<PathBuf> = Vec::new();
        for (name, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| malformed(format!("`weight_map.{name}` is not a file name")))?;
            let path = dir.join(file);
            if !files.contains(&path) {
                files.push(path);
            }
        }
        files.sort();
        Ok((files, true))
    } else if single.exists() {
        Ok((vec![single], false))
    } else {
        Err(WeightsError::NoWeights {
            dir: dir.display().to_string(),
            single: single_name.to_string(),
            index: index_name.to_string(),
        })
    }
}

/// Maps the files, each checked on its own so that an error names the broken one.
pub(crate) fn map_files(files: &[PathBuf]) -> Result<MmapedSafetensors, WeightsError> {
    for file in files {
        // SAFETY: the file is mapped read-only; latte-rs never writes a weights file it
        // has mapped (saves go to a temporary file that is renamed over the target).
        unsafe { MmapedSafetensors::new(file) }.map_err(|e| WeightsError::Malformed {
            path: file.display().to_string(),
            message: e.to_string(),
        })?;
    }
    // SAFETY: as above.
    unsafe { MmapedSafetensors::multi(files) }.map_err(|e| WeightsError::Malformed {
        path: files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        message: e.to_string(),
    })
}

/// Writes a model directory in diffusers' layout: `config.json` and single-file weights
/// in `dtype`. Each file is written to a temporary name and renamed, so a failure never
/// leaves a half-written file.
pub fn save_model_dir(
    dir: &Path,
    config: &LatteConfigFile,
    params: &[(String, Tensor)],
    dtype: DType,
) -> Result<(), WeightsError> {
    save_model_dir_sharded(dir, config, params, dtype, 1)
}

/// Like [`save_model_dir`], split into `shards` files (`diffusion_pytorch_model-0000i-of-0000n
/// .safetensors`, parameters in name order, sizes balanced) listed by
/// `diffusion_pytorch_model.safetensors.index.json` as diffusers writes them; `shards = 1`
/// writes the single file.
pub fn save_model_dir_sharded(
    dir: &Path,
    config: &LatteConfigFile,
    params: &[(String, Tensor)],
    dtype: DType,
    shards: usize,
) -> Result<(), WeightsError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| WeightsError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut sorted: Vec<(String, Tensor)> = Vec::with_capacity(params.len());
    for (name, t) in params {
        sorted.push((name.clone(), t.to_dtype(dtype)?.to_device(&Device::Cpu)?));
    }
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    if shards <= 1 {
        let tensors: HashMap<String, Tensor> = sorted.into_iter().collect();
        crate::io::save_safetensors(&tensors, &dir.join(WEIGHTS_FILE))?;
    } else {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let total: usize = sorted.iter().map(|(_, t)| bytes(t)).sum();
        let per_shard = total.div_ceil(shards);
        let mut files: Vec<HashMap<String, Tensor>> = vec![HashMap::new(); shards];
        let mut weight_map = serde_json::Map::new();
        let mut filled = 0usize;
        for (name, t) in sorted {
            let shard = (filled / per_shard.max(1)).min(shards - 1);
            filled += bytes(&t);
            let file = format!(
                "diffusion_pytorch_model-{:05}-of-{shards:05}.safetensors",
                shard + 1
            );
            weight_map.insert(name.clone(), file.into());
            files[shard].insert(name, t);
        }
        for (shard, tensors) in files.iter().enumerate() {
            let file = format!(
                "diffusion_pytorch_model-{:05}-of-{shards:05}.safetensors",
                shard + 1
            );
            crate::io::save_safetensors(tensors, &dir.join(file))?;
        }
        let index = serde_json::json!({
            "metadata": { "total_size": total },
            "weight_map": weight_map,
        });
        let index_path = dir.join(WEIGHTS_INDEX_FILE);
        crate::io::write_atomically(&index_path, index.to_string().as_bytes())
            .map_err(io(&index_path))?;
    }
    let json = serde_json::to_string_pretty(config).map_err(|e| WeightsError::Malformed {
        path: dir.join(CONFIG_FILE).display().to_string(),
        message: e.to_string(),
    })?;
    crate::io::write_atomically(&dir.join(CONFIG_FILE), json.as_bytes()).map_err(io(dir))?;
    Ok(())
}
