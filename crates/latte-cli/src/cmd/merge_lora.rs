//! `latte merge-lora`: a diffusers model directory with a LoRA adapter merged into its
//! weights (`W + scale·s·B·A`, computed in f32), loadable wherever the base is.

use crate::options::Precision;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::Args as ClapArgs;
use latte::lora::Adapter;
use latte::weights::{save_model_dir, ModelDir};
use std::path::{Path, PathBuf};

/// Arguments of `latte merge-lora`.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// The base model: a diffusers transformer directory or Hub id.
    #[arg(long, value_name = "DIR|ID")]
    model: PathBuf,
    /// The adapter: a directory in PEFT's format (adapter_config.json +
    /// adapter_model.safetensors), e.g. `<run>/checkpoint-<step>/adapter`, or a Hub id.
    #[arg(long, value_name = "DIR|ID")]
    lora: PathBuf,
    /// Scale of the update (PEFT's set_scale; 1 as trained).
    #[arg(long, value_name = "S", default_value_t = 1.0)]
    lora_scale: f64,
    /// Dtype of the merged weights [default: the base's stored dtype].
    #[arg(long, value_enum)]
    dtype: Option<Precision>,
    /// The merged model's directory (must not exist).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

/// Runs `latte merge-lora`.
pub fn run(args: Args) -> Result<()> {
    if args.out.exists() {
        bail!(
            "--out {} exists: give a new directory for the merged model",
            args.out.display()
        );
    }
    let device = Device::Cpu;
    let model = crate::hub::resolve(&args.model, crate::hub::Needs::Transformer)?;
    let base = ModelDir::open(&model)
        .with_context(|| format!("cannot load model directory {}", model.display()))?;
    let lora = crate::hub::resolve(&args.lora, crate::hub::Needs::Adapter)?;
    let adapter = Adapter::load(&lora, base.config(), &device)?;
    let dtype = match args.dtype {
        Some(precision) => precision.dtype(),
        None => stored_dtype(&base),
    };
    let mut weights = base.frozen_tensors(DType::F32, &device)?;
    adapter.merge_into(&mut weights, args.lora_scale)?;
    let weights: Vec<_> = weights.into_iter().collect();
    // Written beside the target and renamed: no half-written model directory.
    let tmp = sibling(&args.out, "tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    let written = save_model_dir(&tmp, base.config_file(), &weights, dtype)
        .map_err(anyhow::Error::from)
        .and_then(|()| {
            std::fs::rename(&tmp, &args.out)
                .with_context(|| format!("cannot create {}", args.out.display()))
        });
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written?;
    println!(
        "merged {} ({} layers, rank {}, scale {}) into {} ({dtype:?}): {}",
        args.lora.display(),
        adapter.layers().len(),
        adapter.config().r,
        args.lora_scale,
        args.model.display(),
        args.out.display()
    );
    Ok(())
}

/// The dtype most of the base's bytes are stored in.
fn stored_dtype(base: &ModelDir) -> DType {
    let by_dtype = base.stored_dtypes();
    let most = by_dtype.iter().max_by_key(|(_, (bytes, _))| *bytes);
    match most.map(|(name, _)| name.as_str()) {
        Some("BF16") => DType::BF16,
        Some("F16") => DType::F16,
        _ => DType::F32,
    }
}

/// `dir/.name.suffix` beside `path`.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{suffix}"))
}
