//! Pre-encoded clips: a directory of safetensors files, one clip per file.
//!
//! # Format
//!
//! Every `*.safetensors` file directly in the directory (sorted by name; other files and
//! subdirectories are ignored) holds one clip:
//!
//! | tensor | shape | meaning |
//! |---|---|---|
//! | `latents` | `(C, F, H, W)` | the video as the model sees it: VAE latents already multiplied by the VAE's scaling factor, or pixels in [-1, 1] for a pixel-space model. `C` = the model's `in_channels`; `F` = its `video_length` (or 1); `H`, `W` divisible by its `patch_size` |
//! | `encoder_hidden_states` | `(L, caption_channels)` | the text encoder's output for the clip's caption; `caption_channels` = the model's |
//! | `mask` (optional) | `(F,)` or `(F, H, W)` | loss weights per frame or per position (1 = scored, 0 = ignored, fractions allowed) |
//!
//! Any float dtype (f16, bf16, f32, f64) is accepted and converted to f32. All clips must
//! share one shape (`C, F, H, W` and `L`). Every file's header is checked when the
//! directory is opened; an error names the file, the tensor, the expected and the found
//! shape. Other tensors in a file are ignored.

use super::{Clip, ClipShape, DataError, Dataset};
use crate::config::LatteConfig;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Name of the video tensor.
pub const LATENTS: &str = "latents";
/// Name of the caption tensor.
pub const CAPTIONS: &str = "encoder_hidden_states";
/// Name of the optional loss-weight tensor.
pub const MASK: &str = "mask";

/// Largest safetensors header read (the format's own limit is 100 MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// A directory of clip files, checked against a model.
#[derive(Debug, Clone)]
pub struct ShardDirectory {
    dir: PathBuf,
    files: Vec<PathBuf>,
    shape: ClipShape,
    /// Per file: whether it has a mask, and the mask's rank (1 or 3).
    mask_ranks: Vec<Option<usize>>,
}

/// One tensor's header entry.
#[derive(Debug, Clone, serde::Deserialize)]
struct TensorHeader {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

impl ShardDirectory {
    /// Opens `dir` and checks every clip's header against `config` (and, with
    /// `temporal`, the frame count against the temporal position embedding).
    pub fn open(dir: &Path, config: &LatteConfig, temporal: bool) -> Result<Self, DataError> {
        if !dir.is_dir() {
            return Err(DataError::NotADirectory {
                dir: dir.display().to_string(),
            });
        }
        let io = |cause| DataError::Io {
            path: dir.display().to_string(),
            cause,
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            if path.is_file() && path.extension().is_some_and(|e| e == "safetensors") {
                files.push(path);
            }
        }
        files.sort();
        if files.is_empty() {
            return Err(DataError::Empty {
                dir: dir.display().to_string(),
            });
        }
        let mut shape: Option<(ClipShape, PathBuf)> = None;
        let mut mask_ranks = Vec::with_capacity(files.len());
        for file in &files {
            let headers = read_header(file)?;
            let (clip_shape, mask_rank) = check_clip(file, &headers, config, temporal)?;
            if let Some((first, first_file)) = &shape {
                let video = [first.channels, first.frames, first.height, first.width];
                let found = [
                    clip_shape.channels,
                    clip_shape.frames,
                    clip_shape.height,
                    clip_shape.width,
                ];
                if video != found {
                    return Err(shape_error(
                        file,
                        LATENTS,
                        format!(
                            "{video:?} like {} (all clips share one shape)",
                            first_file.display()
                        ),
                        found.to_vec(),
                    ));
                }
                if first.caption_tokens != clip_shape.caption_tokens {
                    return Err(shape_error(
                        file,
                        CAPTIONS,
                        format!(
                            "[{}, {}] like {} (all clips share one caption length)",
                            first.caption_tokens,
                            first.caption_channels,
                            first_file.display()
                        ),
                        vec![clip_shape.caption_tokens, clip_shape.caption_channels],
                    ));
                }
            } else {
                shape = Some((clip_shape, file.clone()));
            }
            mask_ranks.push(mask_rank);
        }
        let (shape, _) = shape.ok_or_else(|| DataError::Empty {
            dir: dir.display().to_string(),
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            shape,
            mask_ranks,
        })
    }

    /// The clip files, sorted by name.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }
}

fn shape_error(file: &Path, tensor: &str, expected: String, found: Vec<usize>) -> DataError {
    DataError::Shape {
        file: file.display().to_string(),
        tensor: tensor.to_string(),
        expected,
        found,
    }
}

/// Reads and parses a safetensors header, checking it against the file's length.
fn read_header(file: &Path) -> Result<HashMap<String, TensorHeader>, DataError> {
    let malformed = |message: String| DataError::Malformed {
        file: file.display().to_string(),
        message,
    };
    let io = |cause| DataError::Io {
        path: file.display().to_string(),
        cause,
    };
    let mut f = std::fs::File::open(file).map_err(io)?;
    let file_len = f.metadata().map_err(io)?.len();
    let mut len_bytes = [0u8; 8];
    f.read_exact(&mut len_bytes).map_err(|_| {
        malformed(format!(
            "{file_len} bytes is too short for a safetensors file"
        ))
    })?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES || 8 + header_len > file_len {
        return Err(malformed(format!(
            "header length {header_len} does not fit the file's {file_len} bytes"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header).map_err(io)?;
    let json: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| malformed(format!("header is not a JSON object: {e}")))?;
    let data_len = file_len - 8 - header_len;
    let mut tensors = HashMap::new();
    for (name, value) in json {
        if name == "__metadata__" {
            continue;
        }
        let entry: TensorHeader = serde_json::from_value(value)
            .map_err(|e| malformed(format!("tensor `{name}`: {e}")))?;
        let (start, end) = entry.data_offsets;
        if start > end || end > data_len {
            return Err(malformed(format!(
                "tensor `{name}`: data [{start}, {end}) lies outside the {data_len} data bytes"
            )));
        }
        tensors.insert(name, entry);
    }
    Ok(tensors)
}

fn is_float(dtype: &str) -> bool {
    matches!(dtype, "F16" | "BF16" | "F32" | "F64")
}

/// Checks one clip's tensors against the model; returns its shape and mask rank.
fn check_clip(
    file: &Path,
    tensors: &HashMap<String, TensorHeader>,
    config: &LatteConfig,
    temporal: bool,
) -> Result<(ClipShape, Option<usize>), DataError> {
    let name = file.display().to_string();
    let get = |tensor: &'static str, expected: &str| {
        let header = tensors
            .get(tensor)
            .ok_or_else(|| DataError::MissingTensor {
                file: name.clone(),
                tensor,
                expected: expected.to_string(),
            })?;
        if !is_float(&header.dtype) {
            return Err(DataError::NotFloat {
                file: name.clone(),
                tensor: tensor.to_string(),
                dtype: header.dtype.clone(),
            });
        }
        Ok(header)
    };
    let latents = get(LATENTS, "(C, F, H, W)")?;
    let p = config.patch_size;
    let found = latents.shape.clone();
    let video_fits = match found.as_slice() {
        [c, f, h, w] => {
            *c == config.in_channels
                && *f > 0
                && (!temporal || *f == 1 || *f == config.video_length)
                && *h > 0
                && *w > 0
                && h % p == 0
                && w % p == 0
        }
        _ => false,
    };
    if !video_fits {
        return Err(shape_error(
            file,
            LATENTS,
            format!(
                "(C = in_channels = {}, F = video_length = {} or 1, H and W divisible by \
                 patch_size = {p})",
                config.in_channels, config.video_length
            ),
            found,
        ));
    }
    let [channels, frames, height, width] = [found[0], found[1], found[2], found[3]];
    let captions = get(CAPTIONS, "(L, caption_channels)")?;
    let caption_tokens = match captions.shape.as_slice() {
        [l, cc] if *l > 0 && *cc == config.caption_channels => *l,
        _ => {
            return Err(shape_error(
                file,
                CAPTIONS,
                format!("(L, caption_channels = {})", config.caption_channels),
                captions.shape.clone(),
            ))
        }
    };
    let mask_rank = match tensors.get(MASK) {
        None => None,
        Some(mask) => {
            if !is_float(&mask.dtype) {
                return Err(DataError::NotFloat {
                    file: name.clone(),
                    tensor: MASK.to_string(),
                    dtype: mask.dtype.clone(),
                });
            }
            if mask.shape == [frames] {
                Some(1)
            } else if mask.shape == [frames, height, width] {
                Some(3)
            } else {
                return Err(shape_error(
                    file,
                    MASK,
                    format!("[{frames}] or [{frames}, {height}, {width}] (F or F, H, W)"),
                    mask.shape.clone(),
                ));
            }
        }
    };
    Ok((
        ClipShape {
            channels,
            frames,
            height,
            width,
            caption_tokens,
            caption_channels: config.caption_channels,
        },
        mask_rank,
    ))
}

impl Dataset for ShardDirectory {
    fn len(&self) -> Option<usize> {
        Some(self.files.len())
    }

    fn shape(&self) -> ClipShape {
        self.shape
    }

    fn clip(&self, index: usize) -> Result<Clip, DataError> {
        let file = &self.files[index];
        let name = file.display().to_string();
        let malformed = |message: String| DataError::Malformed {
            file: name.clone(),
            message,
        };
        let tensors = candle_core::safetensors::load(file, &Device::Cpu)
            .map_err(|e| malformed(e.to_string()))?;
        let host = |tensor: &str, expected: &[usize]| -> Result<Vec<f32>, DataError> {
            let t: &Tensor = tensors.get(tensor).ok_or_else(|| {
                malformed(format!(
                    "`{tensor}` disappeared since the directory was opened"
                ))
            })?;
            if t.dims() != expected {
                return Err(shape_error(
                    file,
                    tensor,
                    format!("{expected:?} (as when the directory was opened)"),
                    t.dims().to_vec(),
                ));
            }
            t.to_dtype(DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| malformed(format!("`{tensor}`: {e}")))
        };
        let s = self.shape;
        let video = host(LATENTS, &[s.channels, s.frames, s.height, s.width])?;
        let caption = host(CAPTIONS, &[s.caption_tokens, s.caption_channels])?;
        let mask = match self.mask_ranks[index] {
            None => None,
            Some(1) => {
                let per_frame = host(MASK, &[s.frames])?;
                let plane = s.height * s.width;
                Some(
                    per_frame
                        .iter()
                        .flat_map(|&w| std::iter::repeat_n(w, plane))
                        .collect(),
                )
            }
            Some(_) => Some(host(MASK, &[s.frames, s.height, s.width])?),
        };
        Ok(Clip {
            video,
            caption,
            mask,
            label: file
                .file_name()
                .map_or_else(|| name.clone(), |n| n.to_string_lossy().into_owned()),
        })
    }

    fn describe(&self) -> String {
        let s = self.shape;
        format!(
            "{} clips from {}: latents ({}, {}, {}, {}), captions ({}, {})",
            self.files.len(),
            self.dir.display(),
            s.channels,
            s.frames,
            s.height,
            s.width,
            s.caption_tokens,
            s.caption_channels
        )
    }
}
