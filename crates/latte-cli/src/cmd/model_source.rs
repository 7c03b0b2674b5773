//! Where a command's model comes from: a diffusers directory, a config file, or a preset.

use anyhow::{Context, Result};
use clap::Args;
use latte::config::{InputGeometry, LatteConfig, LatteConfigFile, Preset};
use latte::pipeline::PipelineDir;
use latte::weights::ModelDir;
use std::path::PathBuf;

/// Exactly one of `--model`, `--config`, `--preset`.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct ModelSource {
    /// A diffusers model directory (config.json + safetensors weights), or a Hugging Face
    /// Hub id ORG/NAME[/SUBFOLDER][@REVISION] (a pipeline's transformer/ is found).
    #[arg(long, value_name = "DIR|ID")]
    pub model: Option<PathBuf>,
    /// A diffusers transformer config.json (no weights).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A built-in configuration: latte-1, medium, small, tiny.
    #[arg(long, value_name = "NAME")]
    pub preset: Option<String>,
}

/// A model source, read and validated.
pub struct ResolvedSource {
    pub config: LatteConfig,
    /// The pipeline, when `--model` is a local LattePipeline directory (its
    /// `transformer/` is the model).
    pub pipeline: Option<PipelineDir>,
    /// The opened directory, for `--model`.
    pub dir: Option<ModelDir>,
    /// The preset's input geometry, for `--preset`.
    pub geometry: Option<InputGeometry>,
    pub description: String,
}

impl ModelSource {
    /// Reads the config (and opens the weights for `--model`).
    pub fn resolve(&self) -> Result<ResolvedSource> {
        if let Some(model) = &self.model {
            let pipeline = if PipelineDir::is_pipeline(model) {
                Some(PipelineDir::open(model)?)
            } else {
                None
            };
            let dir = &match &pipeline {
                Some(p) => p.root().join("transformer"),
                None => crate::hub::resolve(model, crate::hub::Needs::Transformer)?,
            };
            let opened = ModelDir::open(dir)
                .with_context(|| format!("cannot load model directory {}", dir.display()))?;
            return Ok(ResolvedSource {
                config: opened.config().clone(),
                description: format!("model {}", model.display()),
                dir: Some(opened),
                pipeline,
                geometry: None,
            });
        }
        if let Some(file) = &self.config {
            let config = LatteConfigFile::from_file(file)?.resolve()?;
            return Ok(ResolvedSource {
                config,
                pipeline: None,
                dir: None,
                geometry: None,
                description: format!("config {}", file.display()),
            });
        }
        let name = self.preset.as_deref().unwrap_or("tiny");
        let preset = Preset::by_name(name)?;
        Ok(ResolvedSource {
            config: preset.config,
            pipeline: None,
            dir: None,
            geometry: Some(preset.geometry),
            description: format!("preset {} — {}", preset.name, preset.description),
        })
    }
}
