//! Prompt encoding as diffusers 0.42.1's `LattePipeline.encode_prompt`
//! (`diffusers/pipelines/latte/pipeline_latte.py`): the prompt is lower-cased and
//! stripped (the pipeline's `_text_preprocessing` without `clean_caption`, whose bs4/ftfy
//! normalisation is not replicated), tokenized to [`MAX_SEQUENCE_LENGTH`] tokens with
//! padding and truncation, and encoded by T5 under the attention mask. With
//! `mask_feature` (always on here, as in the pipeline's default) both the positive and
//! the negative embeddings keep only the first `k` positions, `k` being the positive
//! prompt's number of real tokens (`mask_text_embeddings`).

use crate::t5::{T5ConfigFile, T5Encoder};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::path::{Path, PathBuf};
use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

/// LattePipeline's `max_length`: prompts are padded or truncated to 120 tokens.
pub const MAX_SEQUENCE_LENGTH: usize = 120;

/// The file of the fast tokenizer in `tokenizer/`.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Errors raised while loading or running the text encoder.
#[derive(Debug, thiserror::Error)]
pub enum TextEncoderError {
    /// `tokenizer/` has no `tokenizer.json` (Latte-1 ships only the slow tokenizer's
    /// `spiece.model`).
    #[error(
        "{dir} has no {TOKENIZER_FILE}{found}: write it with \
         `python tools/convert_tokenizer.py {dir}` (transformers' fast-tokenizer conversion)"
    )]
    NoTokenizerJson { dir: String, found: String },
    /// The tokenizer file is unreadable or lacks a token the pipeline needs.
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: String, message: String },
    /// `config.json` is unreadable, malformed or unsupported.
    #[error("text encoder config {path}: {message}")]
    Config { path: String, message: String },
    /// The weights could not be opened.
    #[error(transparent)]
    Weights(#[from] crate::weights::WeightsError),
    /// A tensor operation failed (a missing or mis-shaped weight names the tensor).
    #[error("text encoder {dir}: {source}")]
    Candle {
        dir: String,
        source: candle_core::Error,
    },
}

/// A prompt's tokens, padded to [`MAX_SEQUENCE_LENGTH`].
#[derive(Debug, Clone, PartialEq)]
pub struct Tokens {
    /// Token ids, `</s>` after the (possibly truncated) prompt, then `<pad>`.
    pub ids: Vec<u32>,
    /// 1 for real tokens, 0 for padding.
    pub mask: Vec<u32>,
    /// What truncation cut, decoded as diffusers' warning shows it; `None` when nothing was.
    pub truncated: Option<String>,
}

impl Tokens {
    /// Number of real tokens (the sum of the mask).
    pub fn len(&self) -> usize {
        self.mask.iter().filter(|&&m| m != 0).count()
    }

    /// Whether no token is real.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The pipeline's `tokenizer/tokenizer.json` with LattePipeline's padding and truncation.
pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    path: PathBuf,
}

impl PromptTokenizer {
    /// Reads `dir/tokenizer.json`; its absence is an error that says how to write it.
    pub fn open(dir: &Path) -> Result<Self, TextEncoderError> {
        let path = dir.join(TOKENIZER_FILE);
        if !path.is_file() {
            let found = if dir.join("spiece.model").is_file() {
                " (only spiece.model, the slow T5Tokenizer's file)".to_string()
            } else {
                String::new()
            };
            return Err(TextEncoderError::NoTokenizerJson {
                dir: dir.display().to_string(),
                found,
            });
        }
        let err = |message: String| TextEncoderError::Tokenizer {
            path: path.display().to_string(),
            message,
        };
        let mut tokenizer = Tokenizer::from_file(&path).map_err(|e| err(e.to_string()))?;
        let pad_token = "<pad>";
        let pad_id = tokenizer
            .token_to_id(pad_token)
            .ok_or_else(|| err(format!("no {pad_token} token")))?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_SEQUENCE_LENGTH,
                strategy: TruncationStrategy::LongestFirst,
                direction: TruncationDirection::Right,
                stride: 0,
            }))
            .map_err(|e| err(e.to_string()))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(MAX_SEQUENCE_LENGTH),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token: pad_token.into(),
        }));
        Ok(Self { tokenizer, path })
    }

    fn err(&self, e: impl std::fmt::Display) -> TextEncoderError {
        TextEncoderError::Tokenizer {
            path: self.path.display().to_string(),
            message: e.to_string(),
        }
    }

    /// Tokenizes `prompt` as the pipeline does: lower-cased and stripped, `</s>` appended,
    /// truncated and padded to [`MAX_SEQUENCE_LENGTH`].
    pub fn tokenize(&self, prompt: &str) -> Result<Tokens, TextEncoderError> {
        let text = prompt.to_lowercase().trim().to_string();
        let encoding = self
            .tokenizer
            .encode(text.as_str(), true)
            .map_err(|e| self.err(e))?;
        let mut untruncated = self.tokenizer.clone();
        untruncated
            .with_truncation(None)
            .map_err(|e| self.err(e))?
            .with_padding(None);
        let full = untruncated
            .encode(text.as_str(), true)
            .map_err(|e| self.err(e))?;
        let full_ids = full.get_ids();
        // diffusers decodes `untruncated_ids[max_length - 1 : -1]`: what was cut, without
        // the final `</s>`.
        let truncated = if full_ids.len() > MAX_SEQUENCE_LENGTH {
            let cut = &full_ids[MAX_SEQUENCE_LENGTH - 1..full_ids.len() - 1];
            Some(self.tokenizer.decode(cut, false).map_err(|e| self.err(e))?)
        } else {
            None
        };
        Ok(Tokens {
            ids: encoding.get_ids().to_vec(),
            mask: encoding.get_attention_mask().to_vec(),
            truncated,
        })
    }
}

/// Prompt embeddings ready for the transformer, after `mask_feature`.
#[derive(Debug, Clone)]
pub struct PromptEmbeddings {
    /// (1, k, d_model): the positive prompt's real tokens.
    pub positive: Tensor,
    /// (1, k, d_model): the negative prompt's first k positions.
    pub negative: Tensor,
    /// What truncation cut from the positive prompt.
    pub truncated: Option<String>,
    /// What truncation cut from the negative prompt.
    pub negative_truncated: Option<String>,
}

/// Tokenizer and T5 encoder of a pipeline.
pub struct TextEncoder {
    tokenizer: PromptTokenizer,
    t5: T5Encoder,
    device: Device,
    dir: PathBuf,
}

/// File names of transformers' single-file and sharded weights.
const T5_WEIGHTS_FILE: &str = "model.safetensors";
const T5_WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";

impl TextEncoder {
    /// Opens `tokenizer_dir/tokenizer.json` and the T5 encoder in `encoder_dir`
    /// (`config.json`, `model.safetensors` or its sharded index), with weights in `dtype`.
    pub fn open(
        tokenizer_dir: &Path,
        encoder_dir: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, TextEncoderError> {
        let tokenizer = PromptTokenizer::open(tokenizer_dir)?;
        let config_path = encoder_dir.join("config.json");
        let config_err = |message: String| TextEncoderError::Config {
            path: config_path.display().to_string(),
            message,
        };
        let config: T5ConfigFile = crate::io::read_json(&config_path).map_err(config_err)?;
        let (files, _) =
            crate::weights::weight_files(encoder_dir, T5_WEIGHTS_FILE, T5_WEIGHTS_INDEX_FILE)?;
        let tensors = crate::weights::map_files(&files)?;
        let vb = VarBuilder::from_backend(Box::new(tensors), dtype, device.clone());
        let t5 = T5Encoder::new(&config, vb).map_err(|source| TextEncoderError::Candle {
            dir: encoder_dir.display().to_string(),
            source,
        })?;
        Ok(Self {
            tokenizer,
            t5,
            device: device.clone(),
            dir: encoder_dir.to_path_buf(),
        })
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &PromptTokenizer {
        &self.tokenizer
    }

    /// T5's hidden states (1, 120, d_model) of `tokens`, in f32.
    pub fn encode_tokens(&self, tokens: &Tokens) -> candle_core::Result<Tensor> {
        let l = tokens.ids.len();
        let ids = Tensor::from_slice(&tokens.ids, (1, l), &self.device)?;
        let mask = Tensor::from_slice(&tokens.mask, (1, l), &self.device)?;
        self.t5.forward(&ids, &mask)?.to_dtype(DType::F32)
    }

    /// T5's hidden states (n, 120, d_model) of `n` tokenized prompts at once, in f32:
    /// the padded sequences under their attention masks, as training clips store them.
    pub fn encode_batch(&self, batch: &[Tokens]) -> candle_core::Result<Tensor> {
        let l = batch.first().map_or(0, |t| t.ids.len());
        if batch.iter().any(|t| t.ids.len() != l) {
            candle_core::bail!("text encoder: a batch of token sequences of different lengths");
        }
        let ids: Vec<u32> = batch.iter().flat_map(|t| t.ids.iter().copied()).collect();
        let mask: Vec<u32> = batch.iter().flat_map(|t| t.mask.iter().copied()).collect();
        let ids = Tensor::from_vec(ids, (batch.len(), l), &self.device)?;
        let mask = Tensor::from_vec(mask, (batch.len(), l), &self.device)?;
        self.t5.forward(&ids, &mask)?.to_dtype(DType::F32)
    }

    /// `encode_prompt(prompt, negative_prompt, mask_feature=True)`: both prompts encoded
    /// with their masks, then cut to the positive prompt's real tokens.
    pub fn encode_prompt(
        &self,
        prompt: &str,
        negative_prompt: &str,
    ) -> Result<PromptEmbeddings, TextEncoderError> {
        let positive = self.tokenizer.tokenize(prompt)?;
        let negative = self.tokenizer.tokenize(negative_prompt)?;
        let keep = positive.len();
        let embed = |tokens: &Tokens| {
            self.encode_tokens(tokens)
                .and_then(|t| t.narrow(1, 0, keep))
                .map_err(|source| TextEncoderError::Candle {
                    dir: self.dir.display().to_string(),
                    source,
                })
        };
        Ok(PromptEmbeddings {
            positive: embed(&positive)?,
            negative: embed(&negative)?,
            truncated: positive.truncated,
            negative_truncated: negative.truncated,
        })
    }
}
