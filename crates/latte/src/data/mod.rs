//! Training data: clips of `(C, F, H, W)` videos (pixels or pre-encoded latents) with
//! their caption embeddings, and a loader that batches them in a seeded order.
//!
//! - [`synthetic`]: built-in procedurally generated videos (coloured shapes bouncing
//!   around), fully determined by (seed, index) — training works with no data at all.
//! - [`shards`]: a directory of safetensors files, one pre-encoded clip each (the format is
//!   documented there and in `docs/DATA.md`).
//!
//! The order in which clips are drawn is a pure function of (seed, position): position
//! `p` of a finite dataset of `n` clips is clip `perm_e[p mod n]` of epoch `e = p / n`,
//! where `perm_e` is a shuffle seeded by (seed, e). A run that resumes at position `p`
//! therefore sees exactly the clips an uninterrupted run would.

pub mod shards;
pub mod synthetic;

use crate::random::rng_for;
use rand::Rng;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Errors raised while opening or reading training data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The data path is missing or not a directory.
    #[error("data directory {dir} does not exist or is not a directory")]
    NotADirectory { dir: String },
    /// The directory holds no clip files.
    #[error(
        "data directory {dir} holds no .safetensors clips (each file holds `latents` \
         (C, F, H, W) and `encoder_hidden_states` (L, caption_channels); see docs/DATA.md)"
    )]
    Empty { dir: String },
    /// A file is not a readable safetensors file.
    #[error("malformed clip file {file}: {message}")]
    Malformed { file: String, message: String },
    /// A required tensor is absent.
    #[error("clip file {file} has no `{tensor}` tensor (expected {expected})")]
    MissingTensor {
        file: String,
        tensor: &'static str,
        expected: String,
    },
    /// A tensor's shape does not fit the model or the other clips.
    #[error("clip file {file}: `{tensor}` has shape {found:?}, expected {expected}")]
    Shape {
        file: String,
        tensor: String,
        expected: String,
        found: Vec<usize>,
    },
    /// A tensor is not floating point.
    #[error("clip file {file}: `{tensor}` has dtype {dtype}, expected a float dtype")]
    NotFloat {
        file: String,
        tensor: String,
        dtype: String,
    },
    /// A file or directory could not be read.
    #[error("cannot read {path}: {cause}")]
    Io { path: String, cause: std::io::Error },
    /// The background loader thread died.
    #[error("the data loader thread stopped: {0}")]
    LoaderStopped(String),
    /// The dataset cannot produce clips of the requested shape.
    #[error("{0}")]
    Unsupported(String),
}

/// Shape of every clip of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClipShape {
    /// Channels C (3 for pixels, the VAE's latent channels for latents).
    pub channels: usize,
    /// Frames F.
    pub frames: usize,
    /// Height H and width W (pixels or latent cells).
    pub height: usize,
    pub width: usize,
    /// Caption tokens L.
    pub caption_tokens: usize,
    /// Width of a caption token.
    pub caption_channels: usize,
}

impl ClipShape {
    /// Values of one video, `C·F·H·W`.
    pub fn video_len(&self) -> usize {
        self.channels * self.positions()
    }

    /// Positions of one video, `F·H·W`.
    pub fn positions(&self) -> usize {
        self.frames * self.height * self.width
    }

    /// Values of one caption, `L·caption_channels`.
    pub fn caption_len(&self) -> usize {
        self.caption_tokens * self.caption_channels
    }
}

/// One training clip, on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Clip {
    /// The video `(C, F, H, W)`, row-major.
    pub video: Vec<f32>,
    /// The caption embedding `(L, caption_channels)`, row-major.
    pub caption: Vec<f32>,
    /// Optional loss weights `(F, H, W)`.
    pub mask: Option<Vec<f32>>,
    /// Where the clip comes from, for messages (a file name, `synthetic #12`).
    pub label: String,
}

/// A source of clips. Implementations must be deterministic: `clip(i)` always returns
/// the same values.
pub trait Dataset: Send + Sync {
    /// Number of clips, or `None` for an unbounded generator.
    fn len(&self) -> Option<usize>;

    /// Whether the dataset has no clips.
    fn is_empty(&self) -> bool {
        self.len() == Some(0)
    }

    /// The shape of every clip.
    fn shape(&self) -> ClipShape;

    /// Clip number `index`.
    fn clip(&self, index: usize) -> Result<Clip, DataError>;

    /// One line describing the dataset.
    fn describe(&self) -> String;
}

/// The clip index at draw position `position` (see the module doc).
pub fn clip_index(len: Option<usize>, seed: u64, position: u64) -> usize {
    match len {
        None => position as usize,
        Some(n) => {
            let n64 = n as u64;
            epoch_order(n, seed, position / n64)[(position % n64) as usize]
        }
    }
}

/// The shuffled order of epoch `epoch` (Fisher–Yates, seeded by (seed, epoch)).
pub fn epoch_order(len: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    let mut rng = rng_for(seed, &format!("data-order/epoch-{epoch}"));
    for i in (1..len).rev() {
        let j = rng.random_range(0..=i);
        order.swap(i, j);
    }
    order
}

/// A batch of clips, on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Shape of each clip.
    pub shape: ClipShape,
    /// Videos `(B, C, F, H, W)`.
    pub videos: Vec<f32>,
    /// Captions `(B, L, caption_channels)`.
    pub captions: Vec<f32>,
    /// Loss weights `(B, 1, F, H, W)` when any clip has a mask (ones for the others).
    pub mask: Option<Vec<f32>>,
    /// Each clip's label.
    pub labels: Vec<String>,
    /// Draw position of the first clip.
    pub position: u64,
}

impl Batch {
    /// Number of clips.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Assembles clips drawn from `position` on.
    pub fn from_clips(shape: ClipShape, clips: Vec<Clip>, position: u64) -> Self {
        let any_mask = clips.iter().any(|c| c.mask.is_some());
        let mut videos = Vec::with_capacity(clips.len() * shape.video_len());
        let mut captions = Vec::with_capacity(clips.len() * shape.caption_len());
        let mut mask = any_mask.then(|| Vec::with_capacity(clips.len() * shape.positions()));
        let mut labels = Vec::with_capacity(clips.len());
        for clip in clips {
            videos.extend_from_slice(&clip.video);
            captions.extend_from_slice(&clip.caption);
            if let Some(mask) = mask.as_mut() {
                match &clip.mask {
                    Some(m) => mask.extend_from_slice(m),
                    None => mask.extend(std::iter::repeat_n(1.0, shape.positions())),
                }
            }
            labels.push(clip.label);
        }
        Self {
            shape,
            videos,
            captions,
            mask,
            labels,
            position,
        }
    }
}

/// Reads the batch of `batch_size` clips that starts at draw position `position`.
pub fn read_batch(
    dataset: &dyn Dataset,
    seed: u64,
    batch_size: usize,
    position: u64,
) -> Result<Batch, DataError> {
    let len = dataset.len();
    let clips = (0..batch_size as u64)
        .map(|i| dataset.clip(clip_index(len, seed, position + i)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Batch::from_clips(dataset.shape(), clips, position))
}

/// Hands out consecutive batches, either read on the caller's thread or prefetched by a
/// background thread (through a bounded channel, `prefetch` batches ahead).
pub struct Loader {
    dataset: Arc<dyn Dataset>,
    seed: u64,
    batch_size: usize,
    /// Draw position of the next global batch (all ranks' clips).
    position: u64,
    shard: Shard,
    background: Option<Background>,
}

/// Which part of every global batch a data-parallel rank reads: `world` ranks of
/// `batch_size` clips each make a global batch, and rank `r` reads its clips
/// `r·batch_size …` of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This rank.
    pub rank: usize,
    /// Ranks in the group.
    pub world: usize,
}

impl Shard {
    /// The whole batch (one process).
    pub const WHOLE: Shard = Shard { rank: 0, world: 1 };

    /// Draw position of this rank's first clip in the global batch at `position`.
    fn first(self, position: u64, batch_size: usize) -> u64 {
        position + (self.rank * batch_size) as u64
    }

    /// Clips per global batch.
    fn global(self, batch_size: usize) -> u64 {
        (self.world * batch_size) as u64
    }
}

struct Background {
    receiver: Receiver<Result<Batch, DataError>>,
    handle: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("dataset", &self.dataset.describe())
            .field("batch_size", &self.batch_size)
            .field("position", &self.position)
            .field("background", &self.background.is_some())
            .finish()
    }
}

impl Loader {
    /// A loader whose first batch starts at draw position `position`. With `prefetch`
    /// of 0 batches are read on demand on the caller's thread (best for cheap synthetic
    /// data, and keeps memory measurements free of another thread's allocations);
    /// otherwise a thread reads ahead.
    pub fn new(
        dataset: Arc<dyn Dataset>,
        seed: u64,
        batch_size: usize,
        position: u64,
        prefetch: usize,
    ) -> Self {
        Self::sharded(dataset, seed, batch_size, position, prefetch, Shard::WHOLE)
    }

    /// [`Loader::new`] for one rank of a data-parallel group: every batch is this rank's
    /// part of the global batch at the loader's position, which advances by the global
    /// batch ([`Shard`]).
    pub fn sharded(
        dataset: Arc<dyn Dataset>,
        seed: u64,
        batch_size: usize,
        position: u64,
        prefetch: usize,
        shard: Shard,
    ) -> Self {
        let background = (prefetch > 0).then(|| {
            let (sender, receiver) = sync_channel(prefetch);
            let dataset = dataset.clone();
            let handle = std::thread::Builder::new()
                .name("latte-data".into())
                .spawn(move || {
                    let mut next = position;
                    loop {
                        let first = shard.first(next, batch_size);
                        let batch = read_batch(dataset.as_ref(), seed, batch_size, first);
                        let failed = batch.is_err();
                        if sender.send(batch).is_err() || failed {
                            return;
                        }
                        next += shard.global(batch_size);
                    }
                })
                .ok();
            Background { receiver, handle }
        });
        Self {
            dataset,
            seed,
            batch_size,
            position,
            shard,
            background,
        }
    }

    /// Draw position of the next (global) batch.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// The dataset read.
    pub fn dataset(&self) -> &dyn Dataset {
        self.dataset.as_ref()
    }

    /// The next batch.
    pub fn next_batch(&mut self) -> Result<Batch, DataError> {
        let batch = match &self.background {
            Some(bg) if bg.handle.is_some() => bg.receiver.recv().map_err(|_| {
                DataError::LoaderStopped("it exited without an error message".into())
            })??,
            _ => read_batch(
                self.dataset.as_ref(),
                self.seed,
                self.batch_size,
                self.shard.first(self.position, self.batch_size),
            )?,
        };
        self.position += self.shard.global(self.batch_size);
        Ok(batch)
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        if let Some(mut bg) = self.background.take() {
            // Dropping the receiver makes the thread's next send fail, so it exits.
            let handle = bg.handle.take();
            drop(bg);
            if let Some(handle) = handle {
                let _ = handle.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_are_permutations_and_differ() {
        let a = epoch_order(10, 1, 0);
        let b = epoch_order(10, 1, 1);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_ne!(a, b);
        assert_eq!(clip_index(Some(10), 1, 13), b[3]);
        assert_eq!(clip_index(None, 1, 13), 13);
    }
}
