//! `latte encode`: a folder of videos and their captions → the clip files `latte train
//! --data` reads (docs/DATA.md), with the pipeline's own encoders.
//!
//! Two phases, each with only its encoder loaded: the captions through T5 (in batches),
//! then the videos — decoded by ffmpeg, `--frames` frames every `--frame-stride`, resized to
//! cover `--height × --width` and centre-cropped — through the VAE's encoder. Every clip is
//! written through a temporary file; clips already in `--out` are skipped, so a stopped run
//! continues where it was. A file that cannot be used (corrupt, empty, too short, no
//! caption) is reported and skipped, and the run ends with a summary.

use crate::options::Precision;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args as ClapArgs;
use indicatif::{ProgressBar, ProgressStyle};
use latte::pipeline::PipelineDir;
use latte::plan::phases::{text_encoder_batch_phase, vae_encode_phase};
use latte::vae_encoder::LatentDraw;
use rand::Rng;
use remat::meter::format_bytes;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Extensions read as videos.
const VIDEO_EXTENSIONS: [&str; 7] = ["mp4", "webm", "mov", "mkv", "avi", "m4v", "gif"];
/// Extensions read as single images (one-frame clips).
const IMAGE_EXTENSIONS: [&str; 5] = ["png", "jpg", "jpeg", "webp", "bmp"];

/// Arguments of `latte encode`.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// A diffusers LattePipeline directory or Hub id: its text_encoder/, tokenizer/ and vae/
    /// encode, its transformer/config.json gives the defaults.
    #[arg(long, value_name = "DIR|ID")]
    model: PathBuf,
    /// The videos (and images: one-frame clips), directly in this directory.
    #[arg(long, value_name = "DIR")]
    videos: PathBuf,
    /// Captions: a CSV file with a header row naming the columns `path` and `caption`, or
    /// JSON Lines with those keys (paths relative to --videos). Without it, each video's
    /// caption is the `.txt` file beside it (same name).
    #[arg(long, value_name = "FILE")]
    captions: Option<PathBuf>,
    /// Where the clip files go (created; clips already there are kept and skipped).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Frames per clip [default: the transformer's video_length].
    #[arg(long)]
    frames: Option<usize>,
    /// Take every N-th frame of the video.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    frame_stride: u64,
    /// Square frames of this many pixels (shorthand for --height and --width).
    #[arg(long, conflicts_with_all = ["height", "width"])]
    size: Option<usize>,
    /// Frame height in pixels [default: the transformer's sample_size × the VAE's factor].
    #[arg(long)]
    height: Option<usize>,
    /// Frame width in pixels [default: as --height].
    #[arg(long)]
    width: Option<usize>,
    /// Store the latent distribution's mean, or a draw from it (seeded by --seed and the
    /// file's name), as Latte's training scripts do.
    #[arg(long, value_enum, default_value = "sample")]
    latent: LatentArg,
    /// Precision of the text encoder (T5-XXL is 19 GB in f32, 9.5 GB in bf16).
    #[arg(long, value_enum, default_value = "f32")]
    text_encoder_precision: Precision,
    /// Precision of the VAE encoder.
    #[arg(long, value_enum, default_value = "f32")]
    vae_precision: Precision,
    /// Captions encoded per T5 batch (at most; a --budget may lower it).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    caption_batch: u64,
    /// Memory for the encoders, e.g. 24GiB, or `auto` (the device's available memory minus
    /// 10 %): the caption batch is the largest that fits beside T5's weights, and each
    /// phase is checked before it starts (estimates from the models' shapes,
    /// `latte::plan::phases`).
    #[arg(long, value_name = "SIZE|auto", value_parser = crate::budget::parse_budget)]
    budget: Option<crate::budget::BudgetChoice>,
}

/// Which latent a frame is stored as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LatentArg {
    Mean,
    Sample,
}

/// A file that was not made into a clip, and why.
struct Failure {
    file: String,
    reason: String,
}

/// One input to encode.
struct Item {
    /// The file name in --videos.
    name: String,
    path: PathBuf,
    image: bool,
    out: PathBuf,
}

/// Runs `latte encode`.
pub fn run(args: Args, global: &crate::options::GlobalOptions) -> Result<()> {
    crate::ffmpeg::require("latte encode")?;
    let device = global.device()?;
    let root = crate::hub::resolve(&args.model, crate::hub::Needs::PipelineOrTransformer)?;
    let pipeline = PipelineDir::open(&root)?;
    let transformer = pipeline.transformer()?;
    let config = transformer.config().clone();
    let vae_dtype = args.vae_precision.dtype();
    let frames = args.frames.unwrap_or(config.video_length);
    let stride = args.frame_stride as usize;
    let vae_factor = vae_factor(&root)?;
    let height = args
        .size
        .or(args.height)
        .unwrap_or(config.sample_size * vae_factor);
    let width = args.size.or(args.width).unwrap_or(height);
    let step = vae_factor * config.patch_size;
    if !height.is_multiple_of(step) || !width.is_multiple_of(step) {
        bail!(
            "frames of {width}x{height} px: height and width must be multiples of {step} (the \
             VAE's factor {vae_factor} × patch_size {})",
            config.patch_size
        );
    }
    let budget = match args.budget {
        Some(choice) => Some(
            choice
                .resolve(|| Ok(remat::meter::meter_for(&device)?))?
                .bytes,
        ),
        None => None,
    };
    let text_dtype = args.text_encoder_precision.dtype();
    let caption_batch = caption_batch(&pipeline, args.caption_batch as usize, budget, text_dtype)?;
    if let Some(budget) = budget {
        let phase = vae_encode_phase(&pipeline, vae_dtype, height, width)?;
        if phase.peak_bytes() > budget {
            bail!(
                "--budget {}: the VAE encoder needs about {} (weights {} + one frame {}) at \
                 {width}x{height} px; give more memory or smaller frames",
                format_bytes(budget),
                format_bytes(phase.peak_bytes()),
                format_bytes(phase.weights_bytes),
                format_bytes(phase.transient_bytes)
            );
        }
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;

    let mut failures = Vec::new();
    let items = list_inputs(&args.videos, &args.out)?;
    if items.is_empty() {
        bail!(
            "{}: no videos ({}) or images ({})",
            args.videos.display(),
            VIDEO_EXTENSIONS.join(", "),
            IMAGE_EXTENSIONS.join(", ")
        );
    }
    let (todo, done): (Vec<Item>, Vec<Item>) = items.into_iter().partition(|i| !i.out.exists());
    let captions = read_captions(args.captions.as_deref(), &args.videos, &todo)?;
    let mut todo_with_captions = Vec::new();
    for item in todo {
        match captions.get(&item.name) {
            Some(caption) => todo_with_captions.push((item, caption.clone())),
            None => failures.push(Failure {
                file: item.name.clone(),
                reason: "no caption".into(),
            }),
        }
    }
    println!(
        "{} files: {} to encode, {} already encoded in {}",
        todo_with_captions.len() + done.len() + failures.len(),
        todo_with_captions.len(),
        done.len(),
        args.out.display()
    );

    // Phase 1: the captions, with only T5 in memory.
    let embeddings = {
        let encoder = pipeline.text_encoder(text_dtype, &device)?;
        let bar = progress(todo_with_captions.len(), "captions");
        let mut embeddings = Vec::with_capacity(todo_with_captions.len());
        for chunk in todo_with_captions.chunks(caption_batch) {
            let tokens = chunk
                .iter()
                .map(|(_, caption)| encoder.tokenizer().tokenize(caption))
                .collect::<Result<Vec<_>, _>>()?;
            let encoded = encoder.encode_batch(&tokens)?;
            for i in 0..chunk.len() {
                embeddings.push(encoded.get(i)?);
            }
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        embeddings
    };

    // Phase 2: the videos, with only the VAE's encoder in memory.
    let vae = pipeline.vae_encoder(vae_dtype, &device)?;
    let bar = progress(todo_with_captions.len(), "videos");
    let mut written = 0;
    for ((item, _), captions) in todo_with_captions.iter().zip(embeddings) {
        bar.set_message(item.name.clone());
        let clip_frames = if item.image { 1 } else { frames };
        let needed = (clip_frames - 1) * stride + 1;
        let result = crate::ffmpeg::decode(&item.path, width, height, needed).and_then(|decoded| {
            if decoded.len() < needed {
                bail!(
                    "{} frames, fewer than the {needed} that {clip_frames} frames every \
                         {stride} need",
                    decoded.len()
                );
            }
            let video = to_tensor(&decoded, clip_frames, stride, &device)?;
            let draw = match args.latent {
                LatentArg::Mean => LatentDraw::Mean,
                LatentArg::Sample => LatentDraw::Sample(seed_of(global.seed, &item.name)),
            };
            // (F, 3, H, W) → latents (F, C, h, w) → (C, F, h, w)
            let latents = vae
                .encode(&video, draw)?
                .permute((1, 0, 2, 3))?
                .contiguous()?;
            let mut clip = HashMap::new();
            clip.insert(latte::data::shards::LATENTS.to_string(), latents);
            clip.insert(latte::data::shards::CAPTIONS.to_string(), captions.clone());
            latte::io::save_safetensors(&clip, &item.out)?;
            Ok(())
        });
        match result {
            Ok(()) => written += 1,
            Err(e) => failures.push(Failure {
                file: item.name.clone(),
                reason: format!("{e:#}"),
            }),
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    println!(
        "encoded {written} clips of {frames} frames (images: 1) at {width}x{height} px into {}; \
         {} already there, {} failed",
        args.out.display(),
        done.len(),
        failures.len()
    );
    for failure in &failures {
        println!("  skipped {}: {}", failure.file, failure.reason);
    }
    if written == 0 && done.is_empty() {
        bail!("no clip could be encoded");
    }
    Ok(())
}

/// The caption batch: `--caption-batch`, or less so that T5's phase fits `--budget`.
fn caption_batch(
    pipeline: &PipelineDir,
    most: usize,
    budget: Option<u64>,
    dtype: DType,
) -> Result<usize> {
    let Some(budget) = budget else {
        return Ok(most);
    };
    let fits = |batch| -> Result<bool> {
        Ok(text_encoder_batch_phase(pipeline, dtype, batch)?.peak_bytes() <= budget)
    };
    match (1..=most).rev().find(|&b| fits(b).unwrap_or(false)) {
        Some(batch) => Ok(batch),
        None => {
            let one = text_encoder_batch_phase(pipeline, dtype, 1)?;
            bail!(
                "--budget {}: the text encoder needs about {} for one caption (weights {}); \
                 give more memory or --text-encoder-precision bf16",
                format_bytes(budget),
                format_bytes(one.peak_bytes()),
                format_bytes(one.weights_bytes)
            )
        }
    }
}

/// The VAE's downsampling factor, from `vae/config.json`'s blocks.
fn vae_factor(root: &Path) -> Result<usize> {
    let path = root.join("vae/config.json");
    let config: latte::vae::VaeConfigFile =
        latte::io::read_json(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(1 << config.block_out_channels.len().saturating_sub(1))
}

/// The inputs in `videos`, by name, with their clip paths in `out`.
fn list_inputs(videos: &Path, out: &Path) -> Result<Vec<Item>> {
    let entries = std::fs::read_dir(videos)
        .with_context(|| format!("cannot read the videos directory {}", videos.display()))?;
    let mut items = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let extension = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        let image = IMAGE_EXTENSIONS.contains(&extension.as_str());
        if !path.is_file() || !(image || VIDEO_EXTENSIONS.contains(&extension.as_str())) {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        items.push(Item {
            out: out.join(format!("{stem}.{extension}.safetensors")),
            name,
            path,
            image,
        });
    }
    items.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(items)
}

/// Captions by file name: from the CSV or JSON Lines file, or the `.txt` beside each input.
fn read_captions(
    file: Option<&Path>,
    videos: &Path,
    items: &[Item],
) -> Result<BTreeMap<String, String>> {
    let Some(file) = file else {
        let mut captions = BTreeMap::new();
        for item in items {
            let txt = item.path.with_extension("txt");
            if let Ok(text) = std::fs::read_to_string(&txt) {
                captions.insert(item.name.clone(), text.trim().to_string());
            }
        }
        return Ok(captions);
    };
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read the caption file {}", file.display()))?;
    let normalise = |path: &str| -> String {
        let path = Path::new(path.trim());
        path.strip_prefix(videos)
            .unwrap_or(path)
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string()
    };
    let jsonl = file
        .extension()
        .is_some_and(|e| e == "jsonl" || e == "json");
    let mut captions = BTreeMap::new();
    if jsonl {
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let row: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{} line {}: not JSON", file.display(), i + 1))?;
            let (Some(path), Some(caption)) = (row["path"].as_str(), row["caption"].as_str())
            else {
                bail!(
                    "{} line {}: expected the keys `path` and `caption` (strings)",
                    file.display(),
                    i + 1
                );
            };
            captions.insert(normalise(path), caption.to_string());
        }
        return Ok(captions);
    }
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let headers = reader
        .headers()
        .with_context(|| format!("{}: no header row", file.display()))?
        .clone();
    let column = |name: &str| {
        headers
            .iter()
            .position(|h| h.trim() == name)
            .with_context(|| {
                format!(
                "{}: the header row {:?} has no `{name}` column (expected `path` and `caption`)",
                file.display(),
                headers.iter().collect::<Vec<_>>()
            )
            })
    };
    let (path_column, caption_column) = (column("path")?, column("caption")?);
    for (i, record) in reader.records().enumerate() {
        let record = record.with_context(|| format!("{} row {}", file.display(), i + 2))?;
        let (Some(path), Some(caption)) = (record.get(path_column), record.get(caption_column))
        else {
            bail!("{} row {}: missing fields", file.display(), i + 2);
        };
        captions.insert(normalise(path), caption.to_string());
    }
    Ok(captions)
}

/// Frames `0, s, 2s, …` of `decoded` as images `(F, 3, H, W)` in [-1, 1].
fn to_tensor(
    decoded: &crate::ffmpeg::Frames,
    frames: usize,
    stride: usize,
    device: &Device,
) -> Result<Tensor> {
    let (h, w) = (decoded.height, decoded.width);
    let mut values = Vec::with_capacity(frames * 3 * h * w);
    for f in 0..frames {
        let rgb = decoded.frame(f * stride);
        for channel in 0..3 {
            values.extend((0..h * w).map(|p| f32::from(rgb[3 * p + channel]) / 127.5 - 1.0));
        }
    }
    Ok(Tensor::from_vec(values, (frames, 3, h, w), device)?)
}

/// A seed for one file's latent draw: the run's seed and the file's name.
fn seed_of(seed: u64, name: &str) -> u64 {
    latte::random::rng_for(seed, &format!("encode/{name}")).random()
}

fn progress(len: usize, what: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} {what} [{{elapsed_precise}}] {{bar:30}} {{pos}}/{{len}} {{msg}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}
