//! Model configuration: the file-shaped `config.json` of diffusers'
//! `LatteTransformer3DModel`, and the validated [`LatteConfig`] the code uses.
//!
//! Upstream: `diffusers/models/transformers/latte_transformer_3d.py` (diffusers 0.42.1),
//! `LatteTransformer3DModel.__init__`. Every key and default of that signature is mirrored
//! by [`LatteConfigFile`]; values that released Latte weights do not use are rejected with
//! an error naming the key, the value and what is supported.

use serde::{Deserialize, Serialize};
use std::path::Path;

/// Errors raised while reading or validating a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// The file is not valid JSON.
    #[error("malformed config {path}: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    /// A key holds a value of the wrong type.
    #[error("config {path}: key `{key}`: {source}")]
    KeyType {
        path: String,
        key: String,
        source: serde_json::Error,
    },
    /// A key holds a value latte-rs does not implement.
    #[error("config key `{key}` = {value} is not supported: {supported}")]
    Unsupported {
        key: &'static str,
        value: String,
        supported: String,
    },
    /// A required key is absent or null.
    #[error("config key `{key}` is required (diffusers' default is None): {hint}")]
    Missing {
        key: &'static str,
        hint: &'static str,
    },
}

/// `config.json` as diffusers writes it for `LatteTransformer3DModel`, with diffusers'
/// defaults for absent keys. Metadata keys (`_class_name`, `_diffusers_version`, …) are
/// kept verbatim so that a saved model round-trips.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LatteConfigFile {
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    pub in_channels: Option<usize>,
    pub out_channels: Option<usize>,
    pub num_layers: usize,
    pub dropout: f64,
    pub cross_attention_dim: Option<usize>,
    pub attention_bias: bool,
    pub sample_size: usize,
    pub patch_size: Option<usize>,
    pub activation_fn: String,
    pub num_embeds_ada_norm: Option<usize>,
    pub norm_type: String,
    pub norm_elementwise_affine: bool,
    pub norm_eps: f64,
    pub caption_channels: Option<usize>,
    pub video_length: usize,
    /// Keys that are not model hyper-parameters (`_class_name`, `_diffusers_version`, …).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for LatteConfigFile {
    fn default() -> Self {
        Self {
            num_attention_heads: 16,
            attention_head_dim: 88,
            in_channels: None,
            out_channels: None,
            num_layers: 1,
            dropout: 0.0,
            cross_attention_dim: None,
            attention_bias: false,
            sample_size: 64,
            patch_size: None,
            activation_fn: "geglu".into(),
            num_embeds_ada_norm: None,
            norm_type: "layer_norm".into(),
            norm_elementwise_affine: true,
            norm_eps: 1e-5,
            caption_channels: None,
            video_length: 16,
            extra: serde_json::Map::new(),
        }
    }
}

impl LatteConfigFile {
    /// Reads and parses a `config.json`; errors name the file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Parses the text of a `config.json` read from `path` (for messages); a value of the
    /// wrong type names its key.
    pub fn from_json(text: &str, path: &str) -> Result<Self, ConfigError> {
        let mut deserializer = serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
            let key = e.path().to_string();
            let source = e.into_inner();
            if source.is_data() && key != "." {
                ConfigError::KeyType {
                    path: path.to_string(),
                    key,
                    source,
                }
            } else {
                ConfigError::Parse {
                    path: path.to_string(),
                    source,
                }
            }
        })
    }

    /// The file-shaped config of a validated one, with diffusers' metadata keys.
    pub fn from_config(cfg: &LatteConfig) -> Self {
        let mut extra = serde_json::Map::new();
        extra.insert("_class_name".into(), "LatteTransformer3DModel".into());
        extra.insert("_diffusers_version".into(), "0.42.1".into());
        Self {
            num_attention_heads: cfg.num_heads,
            attention_head_dim: cfg.head_dim,
            in_channels: Some(cfg.in_channels),
            out_channels: Some(cfg.out_channels),
            num_layers: cfg.num_layers,
            dropout: 0.0,
            cross_attention_dim: Some(cfg.hidden_size()),
            attention_bias: cfg.attention_bias,
            sample_size: cfg.sample_size,
            patch_size: Some(cfg.patch_size),
            activation_fn: "gelu-approximate".into(),
            num_embeds_ada_norm: Some(cfg.num_embeds_ada_norm),
            norm_type: "ada_norm_single".into(),
            norm_elementwise_affine: false,
            norm_eps: cfg.norm_eps,
            caption_channels: Some(cfg.caption_channels),
            video_length: cfg.video_length,
            extra,
        }
    }

    /// Validates the file against what latte-rs implements (the Latte path of diffusers).
    pub fn resolve(&self) -> Result<LatteConfig, ConfigError> {
        let unsupported = |key, value: String, supported: &str| ConfigError::Unsupported {
            key,
            value,
            supported: supported.to_string(),
        };
        if self.norm_type != "ada_norm_single" {
            return Err(unsupported(
                "norm_type",
                format!("{:?}", self.norm_type),
                "Latte uses \"ada_norm_single\"",
            ));
        }
        if self.activation_fn != "gelu-approximate" {
            return Err(unsupported(
                "activation_fn",
                format!("{:?}", self.activation_fn),
                "Latte uses \"gelu-approximate\"",
            ));
        }
        if self.norm_elementwise_affine {
            return Err(unsupported(
                "norm_elementwise_affine",
                "true".into(),
                "Latte uses false (adaLN-single modulation replaces the affine norm)",
            ));
        }
        if self.dropout != 0.0 {
            return Err(unsupported(
                "dropout",
                self.dropout.to_string(),
                "only 0.0 (Latte-1 trains without dropout)",
            ));
        }
        let patch_size = self.patch_size.ok_or(ConfigError::Missing {
            key: "patch_size",
            hint: "Latte patchifies its input, e.g. 2",
        })?;
        let in_channels = self.in_channels.ok_or(ConfigError::Missing {
            key: "in_channels",
            hint: "the latent channels, e.g. 4",
        })?;
        let caption_channels = self.caption_channels.ok_or(ConfigError::Missing {
            key: "caption_channels",
            hint: "the text-encoder width, e.g. 4096 for T5-XXL",
        })?;
        let hidden = self.num_attention_heads * self.attention_head_dim;
        if hidden == 0 {
            return Err(unsupported(
                "num_attention_heads",
                self.num_attention_heads.to_string(),
                "heads and attention_head_dim must both be positive",
            ));
        }
        if let Some(cross) = self.cross_attention_dim {
            if cross != hidden {
                return Err(unsupported(
                    "cross_attention_dim",
                    cross.to_string(),
                    &format!(
                        "must equal num_attention_heads * attention_head_dim = {hidden}: \
                         captions are projected to the hidden width before cross-attention"
                    ),
                ));
            }
        } else {
            return Err(ConfigError::Missing {
                key: "cross_attention_dim",
                hint: "spatial blocks cross-attend to the captions",
            });
        }
        for (key, value) in [
            ("patch_size", patch_size),
            ("in_channels", in_channels),
            ("caption_channels", caption_channels),
            ("sample_size", self.sample_size),
            ("num_layers", self.num_layers),
            ("video_length", self.video_length),
        ] {
            if value == 0 {
                return Err(unsupported(key, "0".into(), "must be positive"));
            }
        }
        if !self.sample_size.is_multiple_of(patch_size) {
            return Err(unsupported(
                "sample_size",
                self.sample_size.to_string(),
                &format!("must be divisible by patch_size = {patch_size}"),
            ));
        }
        if !(self.norm_eps > 0.0 && self.norm_eps.is_finite()) {
            return Err(unsupported(
                "norm_eps",
                self.norm_eps.to_string(),
                "a positive finite number",
            ));
        }
        Ok(LatteConfig {
            num_heads: self.num_attention_heads,
            head_dim: self.attention_head_dim,
            in_channels,
            out_channels: self.out_channels.unwrap_or(in_channels),
            num_layers: self.num_layers,
            attention_bias: self.attention_bias,
            sample_size: self.sample_size,
            patch_size,
            num_embeds_ada_norm: self.num_embeds_ada_norm.unwrap_or(1000),
            norm_eps: self.norm_eps,
            caption_channels,
            video_length: self.video_length,
        })
    }
}

/// A validated Latte configuration: what the model code reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatteConfig {
    /// Attention heads per block.
    pub num_heads: usize,
    /// Width of one head; hidden size = `num_heads · head_dim`.
    pub head_dim: usize,
    /// Channels of the input latents (4 for the SD VAE, 3 for pixel-space models).
    pub in_channels: usize,
    /// Channels of the output: `in_channels` (ε only) or `2·in_channels` (ε and learned variance).
    pub out_channels: usize,
    /// Number of spatial blocks, and of temporal blocks.
    pub num_layers: usize,
    /// Whether q/k/v projections carry a bias.
    pub attention_bias: bool,
    /// Latent height and width the model was trained at (sets the position-embedding grid).
    pub sample_size: usize,
    /// Side of the square patches.
    pub patch_size: usize,
    /// Number of diffusion timesteps of the training schedule (kept for the config file).
    pub num_embeds_ada_norm: usize,
    /// Epsilon of the blocks' layer norms.
    pub norm_eps: f64,
    /// Width of the text-encoder embeddings.
    pub caption_channels: usize,
    /// Frames of the temporal position embedding; multi-frame input must match it.
    pub video_length: usize,
}

impl LatteConfig {
    /// Hidden width of every block.
    pub fn hidden_size(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Whether the model predicts a learned variance besides ε.
    pub fn learns_variance(&self) -> bool {
        self.out_channels == 2 * self.in_channels
    }

    /// Scale of the 2-D position grid: `max(sample_size / 64, 1)` as in diffusers.
    pub fn interpolation_scale(&self) -> f64 {
        (self.sample_size / 64).max(1) as f64
    }

    /// Side of the patch grid at the training resolution.
    pub fn base_grid_size(&self) -> usize {
        self.sample_size / self.patch_size
    }
}

/// A built-in configuration with the input geometry its benchmarks use.
#[derive(Debug, Clone, PartialEq)]
pub struct Preset {
    /// Name used on the command line.
    pub name: &'static str,
    /// What the preset is for.
    pub description: &'static str,
    /// The model configuration.
    pub config: LatteConfig,
    /// The default input geometry.
    pub geometry: InputGeometry,
}

/// Shape of one model input: batch, frames, latent height and width, caption tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputGeometry {
    pub batch: usize,
    pub frames: usize,
    pub height: usize,
    pub width: usize,
    pub caption_tokens: usize,
}

impl Preset {
    /// All built-in presets.
    pub fn all() -> Vec<Preset> {
        vec![latte_1(), medium(), small(), tiny()]
    }

    /// The preset called `name`; the error lists the known names.
    pub fn by_name(name: &str) -> Result<Preset, ConfigError> {
        Self::all()
            .into_iter()
            .find(|p| p.name == name)
            .ok_or_else(|| ConfigError::Unsupported {
                key: "preset",
                value: format!("{name:?}"),
                supported: format!(
                    "one of {}",
                    Self::all()
                        .iter()
                        .map(|p| p.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
    }
}

/// Latte-1's architecture (patch 2, learned variance: `out_channels = 2 · in_channels`,
/// attention bias, adaLN-single, 16 frames) at another size: the presets, and the small
/// models of tests.
pub fn latte_architecture(
    heads: usize,
    head_dim: usize,
    layers: usize,
    caption_channels: usize,
    in_channels: usize,
    sample_size: usize,
) -> LatteConfig {
    LatteConfig {
        num_heads: heads,
        head_dim,
        in_channels,
        out_channels: 2 * in_channels,
        num_layers: layers,
        attention_bias: true,
        sample_size,
        patch_size: 2,
        num_embeds_ada_norm: 1000,
        norm_eps: 1e-6,
        caption_channels,
        video_length: 16,
    }
}

/// Latte-1 as published (`transformer/config.json`): 1,057,246,880 parameters.
pub fn latte_1() -> Preset {
    Preset {
        name: "latte-1",
        description: "Latte-1 as published: 28+28 blocks, hidden 1152, T5-XXL captions",
        config: latte_architecture(16, 72, 28, 4096, 4, 64),
        geometry: InputGeometry {
            batch: 1,
            frames: 16,
            height: 64,
            width: 64,
            caption_tokens: 120,
        },
    }
}

/// The `medium` benchmark model: 12 layers, 8 heads × 64, captions of width 256.
pub fn medium() -> Preset {
    Preset {
        name: "medium",
        description: "benchmark model: 12+12 blocks, hidden 512, 16 frames of 32x32 latents",
        config: latte_architecture(8, 64, 12, 256, 4, 32),
        geometry: InputGeometry {
            batch: 1,
            frames: 16,
            height: 32,
            width: 32,
            caption_tokens: 32,
        },
    }
}

/// The `small` benchmark model: 8 layers, 4 heads × 64, captions of width 256.
pub fn small() -> Preset {
    Preset {
        name: "small",
        description: "benchmark model: 8+8 blocks, hidden 256, 16 frames of 32x32 latents",
        config: latte_architecture(4, 64, 8, 256, 4, 32),
        geometry: InputGeometry {
            batch: 1,
            frames: 16,
            height: 32,
            width: 32,
            caption_tokens: 32,
        },
    }
}

/// A pixel-space model small enough to train on a CPU in minutes.
pub fn tiny() -> Preset {
    Preset {
        name: "tiny",
        description:
            "pixel-space model for CPU training: 4+4 blocks, hidden 64, 8 frames of 16x16 RGB",
        config: LatteConfig {
            video_length: 8,
            ..latte_architecture(4, 16, 4, 16, 3, 16)
        },
        geometry: InputGeometry {
            batch: 4,
            frames: 8,
            height: 16,
            width: 16,
            caption_tokens: 4,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LATTE_1_JSON: &str = r#"{"activation_fn":"gelu-approximate","attention_bias":true,
        "attention_head_dim":72,"caption_channels":4096,"cross_attention_dim":1152,"dropout":0.0,
        "in_channels":4,"norm_elementwise_affine":false,"norm_eps":1e-06,
        "norm_type":"ada_norm_single","num_attention_heads":16,"num_embeds_ada_norm":1000,
        "num_layers":28,"out_channels":8,"patch_size":2,"sample_size":64,
        "_class_name":"LatteTransformer3DModel"}"#;

    #[test]
    fn a_value_of_the_wrong_type_names_its_key() {
        let text = LATTE_1_JSON.replace(
            r#""num_attention_heads":16"#,
            r#""num_attention_heads":"16""#,
        );
        let err = LatteConfigFile::from_json(&text, "dir/config.json").unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("dir/config.json") && message.contains("`num_attention_heads`"),
            "{message}"
        );
        let truncated = &LATTE_1_JSON[..40];
        let err = LatteConfigFile::from_json(truncated, "dir/config.json").unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
    }

    #[test]
    fn published_latte_1_config_resolves_to_the_preset() {
        let file: LatteConfigFile = serde_json::from_str(LATTE_1_JSON).unwrap();
        assert_eq!(file.resolve().unwrap(), latte_1().config);
        assert_eq!(file.extra["_class_name"], "LatteTransformer3DModel");
    }

    #[test]
    fn file_round_trip_preserves_the_resolved_config() {
        for preset in Preset::all() {
            let file = LatteConfigFile::from_config(&preset.config);
            let text = serde_json::to_string(&file).unwrap();
            let back: LatteConfigFile = serde_json::from_str(&text).unwrap();
            assert_eq!(back.resolve().unwrap(), preset.config, "{}", preset.name);
        }
    }

    #[test]
    fn unsupported_values_name_key_value_and_alternative() {
        let cases = [
            ("norm_type", "\"layer_norm\"", "ada_norm_single"),
            ("activation_fn", "\"geglu\"", "gelu-approximate"),
            ("norm_elementwise_affine", "true", "false"),
            ("dropout", "0.1", "0.0"),
            ("cross_attention_dim", "64", "1152"),
            ("sample_size", "63", "divisible"),
        ];
        for (key, value, hint) in cases {
            let mut json: serde_json::Value = serde_json::from_str(LATTE_1_JSON).unwrap();
            json[key] = serde_json::from_str(value).unwrap();
            let file: LatteConfigFile = serde_json::from_value(json).unwrap();
            let message = file.resolve().unwrap_err().to_string();
            assert!(message.contains(key), "{message}");
            assert!(message.contains(hint), "{message}");
        }
    }

    #[test]
    fn missing_required_keys_are_reported() {
        let file: LatteConfigFile = serde_json::from_str("{}").unwrap();
        let message = file.resolve().unwrap_err().to_string();
        assert!(message.contains("norm_type"), "{message}");
        let file: LatteConfigFile = serde_json::from_str(
            r#"{"norm_type":"ada_norm_single","activation_fn":"gelu-approximate",
                "norm_elementwise_affine":false,"in_channels":4,"caption_channels":8}"#,
        )
        .unwrap();
        assert!(file
            .resolve()
            .unwrap_err()
            .to_string()
            .contains("patch_size"));
    }

    #[test]
    fn malformed_json_names_the_file() {
        let dir = std::env::temp_dir().join(format!("latte-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        std::fs::write(&path, "{\"num_layers\": \"many\"}").unwrap();
        let message = LatteConfigFile::from_file(&path).unwrap_err().to_string();
        assert!(message.contains("config.json"), "{message}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
