//! `latte sample`: DDIM text-to-video sampling with classifier-free guidance and optional
//! gradient guidance under a memory plan (`latte::sampling`). Writes the latents as
//! safetensors and the video as an animated GIF and PNG frames: pixel-space models
//! directly, latent models of a LattePipeline directory through its VAE
//! (`latte::pipeline`, which also encodes `--prompt`).

use crate::budget::{parse_budget, BudgetChoice};
use crate::cmd::video_out::{write_video, Written};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args as ClapArgs;
use indicatif::{ProgressBar, ProgressStyle};
use latte::config::LatteConfig;
use latte::data::synthetic::{Scene, SyntheticVideos, COLOURS, DIRECTIONS, SHAPES};
use latte::data::ClipShape;
use latte::guide::parse_objective;
use latte::lora::Adapter;
use latte::pipeline::PipelineDir;
use latte::plan::{plan_run, AnalyticCosts, RunMemory, Setting};
use latte::sampling::{guide_workload, initial_noise, sample, Guidance, SampleOptions};
use latte::scheduler::TimestepSpacing;
use latte::train::Precision;
use latte::weights::ModelDir;
use remat::meter::{format_bytes, meter_for, Recorder};
use remat::policy::Policy;
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Arguments of `latte sample`.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// A transformer directory (config.json + weights), a pipeline directory holding
    /// `transformer/`, a `latte train` output directory (its latest checkpoint), or a
    /// Hugging Face Hub id ORG/NAME[/SUBFOLDER][@REVISION] (e.g. maxin-cn/Latte-1).
    #[arg(long, value_name = "DIR|ID")]
    model: PathBuf,
    /// Text prompt, for a LattePipeline directory (text_encoder/, tokenizer/tokenizer.json,
    /// vae/): lower-cased, stripped and cut to 120 tokens as LattePipeline does (its
    /// bs4/ftfy `clean_caption` normalisation is not applied).
    #[arg(long, group = "cond")]
    prompt: Option<String>,
    /// Negative prompt (with --prompt; default "").
    #[arg(long, requires = "prompt")]
    negative_prompt: Option<String>,
    /// encoder_hidden_states as safetensors: `positive` (1, L, D) and optional `negative`,
    /// or one tensor of shape (2, L, D) = [negative, positive] or (1, L, D) = positive.
    #[arg(long, value_name = "FILE", group = "cond")]
    embeddings: Option<PathBuf>,
    /// A built-in synthetic caption for models trained on the built-in data:
    /// COLOUR,DIRECTION,SHAPE, e.g. red,east,disc.
    #[arg(long, value_name = "COLOUR,DIRECTION,SHAPE", group = "cond")]
    caption: Option<String>,
    /// The synthetic caption of scene INDEX (colour, direction, shape enumerated in order).
    #[arg(long, value_name = "INDEX", group = "cond")]
    synthetic_caption: Option<usize>,
    /// Tokens of synthetic captions (as trained: 4 by default).
    #[arg(long, default_value_t = 4)]
    caption_tokens: usize,
    /// Frames (default: the model's video_length).
    #[arg(long)]
    frames: Option<usize>,
    /// Height in latent pixels (default: sample_size).
    #[arg(long)]
    height: Option<usize>,
    /// Width in latent pixels (default: sample_size).
    #[arg(long)]
    width: Option<usize>,
    /// DDIM steps.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Classifier-free guidance scale (CFG is on above 1).
    #[arg(long, default_value_t = 7.5)]
    guidance_scale: f64,
    /// DDIM η (0 = deterministic).
    #[arg(long, default_value_t = 0.0)]
    eta: f64,
    /// DDIM timestep spacing: leading, trailing or linspace (default: the scheduler config
    /// of the pipeline or `latte train` checkpoint, else leading).
    #[arg(long)]
    timestep_spacing: Option<TimestepSpacing>,
    /// Clip the predicted clean video to [-1, 1] (default: as the scheduler config of the
    /// pipeline or `latte train` checkpoint says — checkpoints do not clip —, else clip as
    /// diffusers' DDIMScheduler does). Gradient guidance of pixel-space models wants it:
    /// the clip keeps each corrected x̂₀ in range.
    #[arg(long, conflicts_with = "no_clip")]
    clip: bool,
    /// Do not clip the predicted clean video (see --clip).
    #[arg(long)]
    no_clip: bool,
    /// Where to write the latents (safetensors, tensor `latents`); the GIF and PNG frames
    /// go next to it.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// A LoRA adapter in PEFT's format (a directory or a Hub id), merged into the weights
    /// before sampling (a `latte train --lora` output given as --model brings its own).
    #[arg(long, value_name = "DIR|ID")]
    lora: Option<PathBuf>,
    /// Scale of the adapter's update (PEFT's set_scale; 1 as trained).
    #[arg(long, value_name = "S", default_value_t = 1.0)]
    lora_scale: f64,
    /// Precision of the text encoder (T5-XXL is 19 GB in f32, 9.5 GB in bf16); it is loaded
    /// for the prompts only and freed before the transformer loads.
    #[arg(long, value_enum, default_value = "f32")]
    text_encoder_precision: crate::options::Precision,
    /// Precision of the VAE decoding the latents after sampling.
    #[arg(long, value_enum, default_value = "f32")]
    vae_precision: crate::options::Precision,
    /// Frames per second of the MP4 written beside the GIF (H.264, yuv420p; needs ffmpeg).
    #[arg(long, default_value_t = 8.0)]
    fps: f64,
    /// Do not write the MP4.
    #[arg(long)]
    no_mp4: bool,
    /// Initial noise (safetensors, one tensor (1, C, F, H, W)) instead of drawing it.
    #[arg(long, value_name = "FILE")]
    init_noise: Option<PathBuf>,
    /// Gradient guidance objective: reference:FILE[:MASK], smooth, color:R,G,B.
    #[arg(long, value_name = "OBJECTIVE")]
    guide: Option<String>,
    /// Scale s of the guidance: each guided step moves the predicted clean video by s
    /// times Polyak's step L/‖∇L‖² along the gradient through the model (1: halfway to
    /// a squared-error target; see latte::sampling).
    #[arg(long, default_value_t = 1.0)]
    guide_scale: f64,
    /// Steps A..B (0-based, B exclusive) where guidance applies (default: all).
    #[arg(long, value_name = "A..B")]
    guide_steps: Option<String>,
    /// Checkpoint policy of the guidance backward: none, every:K, sqrt, budget:SIZE.
    #[arg(long, value_name = "POLICY", conflicts_with = "budget")]
    checkpoint: Option<Policy>,
    /// Memory budget of a guided step — weights, latents, captions, guidance tensors and
    /// the backward's activations — as `latte plan --mode guide` accounts it, or `auto`:
    /// the device's available memory once the model is loaded, minus 10 %.
    #[arg(long, value_name = "SIZE|auto", value_parser = parse_budget)]
    budget: Option<BudgetChoice>,
    /// Skip the temporal blocks.
    #[arg(long)]
    no_temporal: bool,
    /// Write the memory report as JSON: the policy, the budget, the predicted and the
    /// measured peak (weights included), and the timeline of the sampling loop.
    #[arg(long, value_name = "FILE")]
    memory_report: Option<PathBuf>,
}

/// What `--memory-report` writes.
#[derive(Debug, serde::Serialize)]
struct SamplingMemory<'a> {
    /// The guidance backward's policy, when guiding.
    policy: Option<String>,
    /// The whole-step budget, when given.
    budget_bytes: Option<u64>,
    /// The plan's predicted peak of a guided step, when guiding.
    predicted_peak_bytes: Option<u64>,
    /// The measured peak of the sampling loop, above what was live before the weights
    /// were loaded.
    measured_peak_bytes: u64,
    /// The sampling loop's phases (bytes above its start).
    timeline: &'a remat::meter::MemoryReport,
}

/// What `--model` names: the transformer to load, the LoRA adapter of a `latte train
/// --lora` output, and the directory beside which `scheduler/` configures sampling.
struct ModelPaths {
    transformer: PathBuf,
    adapter: Option<PathBuf>,
    beside: PathBuf,
}

/// Reads what `dir` names (see [`ModelPaths`]).
fn model_paths(dir: &Path) -> Result<ModelPaths> {
    let plain = |transformer: PathBuf| ModelPaths {
        beside: transformer.clone(),
        transformer,
        adapter: None,
    };
    if dir.join("config.json").is_file() {
        return Ok(plain(dir.to_path_buf()));
    }
    if dir.join("transformer/config.json").is_file() {
        return Ok(plain(dir.join("transformer")));
    }
    if let Ok(checkpoint) = latte::train::find_checkpoint(dir) {
        let adapter = checkpoint.join(latte::train::ADAPTER_DIR);
        if !adapter.is_dir() {
            return Ok(plain(checkpoint.join("transformer")));
        }
        let state: latte::train::TrainState =
            latte::io::read_json(&checkpoint.join(latte::train::STATE_FILE))
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("cannot read {}", checkpoint.display()))?;
        let Some(latte::train::ModelSource::Directory(base)) = state.base_model else {
            bail!(
                "{} is a LoRA checkpoint on a fresh preset's weights, which no directory \
                 holds: sample a model directory with --lora {}",
                checkpoint.display(),
                adapter.display()
            );
        };
        return Ok(ModelPaths {
            transformer: base,
            beside: adapter.clone(),
            adapter: Some(adapter),
        });
    }
    bail!(
        "{} is not a model: expected config.json (a transformer directory), transformer/ (a \
         pipeline) or checkpoint-<step>/ (a `latte train` output)",
        dir.display()
    )
}

/// Parses `A..B`.
fn parse_range(text: &str, steps: usize) -> Result<Range<usize>> {
    let (a, b) = text
        .split_once("..")
        .with_context(|| format!("--guide-steps {text:?}: expected A..B, e.g. 10..40"))?;
    let a: usize = if a.is_empty() { 0 } else { a.parse()? };
    let b: usize = if b.is_empty() { steps } else { b.parse()? };
    if a >= b || b > steps {
        bail!("--guide-steps {text:?}: need A < B <= --steps ({steps})");
    }
    Ok(a..b)
}

/// The synthetic caption of `colour,direction,shape`.
fn scene_from_words(text: &str) -> Result<Scene> {
    let parts: Vec<&str> = text.split(',').map(str::trim).collect();
    let find = |names: Vec<&str>, word: &str, what: &str| -> Result<usize> {
        names.iter().position(|n| *n == word).with_context(|| {
            format!(
                "unknown {what} {word:?} in --caption: use one of {}",
                names.join(", ")
            )
        })
    };
    let [colour, direction, shape] = parts.as_slice() else {
        bail!("--caption {text:?}: expected COLOUR,DIRECTION,SHAPE, e.g. red,east,disc");
    };
    Ok(Scene {
        colour: find(COLOURS.iter().map(|c| c.0).collect(), colour, "colour")?,
        direction: find(
            DIRECTIONS.iter().map(|d| d.0).collect(),
            direction,
            "direction",
        )?,
        shape: find(SHAPES.to_vec(), shape, "shape")?,
    })
}

/// `(negative, positive)` prompt embeddings `(1, k, D)` from the pipeline's T5, as
/// LattePipeline encodes them; warns about what truncation cut.
fn encode_prompt(
    prompt: &str,
    negative_prompt: &str,
    pipeline: Option<&PipelineDir>,
    model_dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let Some(pipeline) = pipeline else {
        let root = model_dir.parent().unwrap_or(model_dir);
        let missing: Vec<&str> = ["text_encoder", "tokenizer", "vae", "model_index.json"]
            .into_iter()
            .filter(|c| !root.join(c).exists())
            .collect();
        bail!(
            "--prompt needs a LattePipeline directory, and {} lacks {}; pass the pipeline \
             folder to --model, or encode the prompt elsewhere and pass --embeddings FILE",
            root.display(),
            missing.join(", ")
        );
    };
    // The text encoder lives for this phase only: it is freed before the transformer loads.
    let meter = meter_for(device)?;
    let before = meter.live_bytes();
    meter.reset_peak();
    let encoder = pipeline.text_encoder(dtype, device)?;
    let embeds = encoder.encode_prompt(prompt, negative_prompt)?;
    drop(encoder);
    println!(
        "text encoder ({dtype:?}): peak {}, {} kept after it was freed (the embeddings)",
        format_bytes(meter.peak_bytes().saturating_sub(before)),
        format_bytes(meter.live_bytes().saturating_sub(before))
    );
    for (which, cut) in [
        ("prompt", &embeds.truncated),
        ("negative prompt", &embeds.negative_truncated),
    ] {
        if let Some(cut) = cut {
            eprintln!(
                "warning: this part of the {which} was truncated, the text encoder taking at \
                 most {} tokens: {cut:?}",
                latte::text_encoder::MAX_SEQUENCE_LENGTH
            );
        }
    }
    Ok((embeds.negative, embeds.positive))
}

/// `(negative, positive)` caption embeddings, each `(1, L, D)`.
fn conditioning(
    args: &Args,
    pipeline: Option<&PipelineDir>,
    model_dir: &Path,
    config: &LatteConfig,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let d = config.caption_channels;
    if let Some(prompt) = &args.prompt {
        let negative = args.negative_prompt.as_deref().unwrap_or("");
        let dtype = args.text_encoder_precision.dtype();
        return encode_prompt(prompt, negative, pipeline, model_dir, dtype, device);
    }
    let scene = match (&args.caption, args.synthetic_caption) {
        (Some(words), _) => Some(scene_from_words(words)?),
        (None, Some(index)) => {
            let count = COLOURS.len() * DIRECTIONS.len() * SHAPES.len();
            if index >= count {
                bail!("--synthetic-caption {index}: there are {count} scenes (0..{count})");
            }
            Some(Scene {
                colour: index / (DIRECTIONS.len() * SHAPES.len()),
                direction: (index / SHAPES.len()) % DIRECTIONS.len(),
                shape: index % SHAPES.len(),
            })
        }
        _ => None,
    };
    if let Some(scene) = scene {
        let cfg = config;
        let shape = ClipShape {
            channels: cfg.in_channels,
            frames: cfg.video_length,
            height: cfg.sample_size.max(4),
            width: cfg.sample_size.max(4),
            caption_tokens: args.caption_tokens,
            caption_channels: d,
        };
        let data = SyntheticVideos::new(shape, 0)?;
        println!("caption: {}", scene.describe());
        let positive = Tensor::from_vec(data.caption(&scene), (1, args.caption_tokens, d), device)?;
        return Ok((positive.zeros_like()?, positive));
    }
    let Some(path) = &args.embeddings else {
        bail!("give --embeddings FILE, --caption COLOUR,DIRECTION,SHAPE, --synthetic-caption INDEX or --prompt TEXT");
    };
    let mut tensors: HashMap<String, Tensor> = candle_core::safetensors::load(path, device)
        .with_context(|| format!("cannot read embeddings {}", path.display()))?;
    let (negative, positive) = if let Some(p) = tensors.remove("positive") {
        let n = match tensors.remove("negative") {
            Some(n) => n,
            None => p.zeros_like()?,
        };
        (n, p)
    } else if tensors.len() == 1 {
        let t = tensors
            .into_values()
            .next()
            .context("empty embeddings file")?;
        match t.dim(0)? {
            2 => (t.narrow(0, 0, 1)?, t.narrow(0, 1, 1)?),
            1 => (t.zeros_like()?, t),
            b => {
                bail!("embeddings of batch {b}: expected 1 (positive) or 2 ([negative, positive])")
            }
        }
    } else {
        bail!(
            "{}: expected tensors `positive` (and `negative`), or a single tensor",
            path.display()
        );
    };
    for (name, t) in [("negative", &negative), ("positive", &positive)] {
        match t.dims() {
            [1, l, c] if *l > 0 && *c == d => {}
            dims => {
                bail!("{name} embeddings have shape {dims:?}; the model expects (1, tokens, {d})")
            }
        }
    }
    Ok((
        negative.to_dtype(DType::F32)?,
        positive.to_dtype(DType::F32)?,
    ))
}

/// Runs `latte sample`.
pub fn run(args: Args, global: &crate::options::GlobalOptions) -> Result<()> {
    let device = global.device()?;
    let location = crate::hub::resolve(&args.model, crate::hub::Needs::PipelineOrTransformer)?;
    let paths = model_paths(&location)?;
    let dir = paths.transformer.clone();
    for path in [Some(&args.out), args.memory_report.as_ref()]
        .into_iter()
        .flatten()
    {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
    }
    let opened = ModelDir::open(&dir)
        .with_context(|| format!("cannot load model directory {}", dir.display()))?;
    let pipeline = if PipelineDir::is_pipeline(&location) {
        Some(PipelineDir::open(&location)?)
    } else {
        None
    };
    // Phase 1, the prompts: the text encoder is loaded, used and freed before the
    // transformer exists.
    let (negative, positive) =
        conditioning(&args, pipeline.as_ref(), &dir, opened.config(), &device)?;
    // The plan counts the weights: memory is measured from before they are loaded.
    let live_before_model = meter_for(&device)?.live_bytes();
    let adapter_dir = match &args.lora {
        Some(lora) => Some(crate::hub::resolve(lora, crate::hub::Needs::Adapter)?),
        None => paths.adapter.clone(),
    };
    let model = match &adapter_dir {
        None => opened.load_frozen(DType::F32, &device)?,
        Some(adapter_dir) => {
            // The update merged into the weights: sampling costs what the base costs.
            let adapter = Adapter::load(adapter_dir, opened.config(), &device)?;
            let mut weights = opened.frozen_tensors(DType::F32, &device)?;
            adapter.merge_into(&mut weights, args.lora_scale)?;
            eprintln!(
                "LoRA {} merged (rank {}, {} layers, scale {})",
                adapter_dir.display(),
                adapter.config().r,
                adapter.layers().len(),
                args.lora_scale
            );
            latte::weights::frozen_from(opened.config(), weights, DType::F32, &device)?
        }
    };
    let cfg = model.config().clone();
    // Latent models of a pipeline decode through its VAE (required with --prompt), loaded
    // once sampling is done and the transformer is freed: the sampling steps hold only
    // what the plan counts.
    let decoder = pipeline.as_ref().filter(|p| {
        cfg.in_channels != 3 && (args.prompt.is_some() || p.root().join("vae").is_dir())
    });
    let dims = (
        1,
        cfg.in_channels,
        args.frames.unwrap_or(cfg.video_length),
        args.height.unwrap_or(cfg.sample_size),
        args.width.unwrap_or(cfg.sample_size),
    );
    let noise = match &args.init_noise {
        Some(path) => {
            let tensors = candle_core::safetensors::load(path, &device)
                .with_context(|| format!("cannot read initial noise {}", path.display()))?;
            let t = tensors
                .into_values()
                .next()
                .context("the initial-noise file is empty")?;
            let expected = [dims.0, dims.1, dims.2, dims.3, dims.4];
            if t.dims() != expected {
                bail!(
                    "initial noise has shape {:?}; expected {expected:?}",
                    t.dims()
                );
            }
            t.to_dtype(DType::F32)?
        }
        None => initial_noise(global.seed, dims, &device)?,
    };
    let temporal = !args.no_temporal;
    model.check_inputs(
        &latte::model::LatteInputs {
            hidden_states: noise.clone(),
            timestep: Tensor::new(&[0i64], &device)?,
            encoder_hidden_states: positive.clone(),
        },
        temporal,
    )?;
    let options = SampleOptions {
        steps: args.steps,
        guidance_scale: args.guidance_scale,
        eta: args.eta,
        seed: global.seed,
        ddim: {
            // A pipeline's scheduler, else the one beside the transformer (a `latte
            // train` checkpoint's), else diffusers' DDIMScheduler defaults.
            let mut ddim = match &pipeline {
                Some(p) if p.root().join("scheduler").is_dir() => p.ddim_config()?,
                _ => latte::pipeline::scheduler_beside(&paths.beside)?.unwrap_or_default(),
            };
            if let Some(spacing) = args.timestep_spacing {
                ddim.timestep_spacing = spacing;
            }
            ddim.clip_sample = (ddim.clip_sample || args.clip) && !args.no_clip;
            ddim
        },
        temporal,
    };
    let objective = match &args.guide {
        Some(spec) => Some(parse_objective(spec, noise.dims(), &device)?),
        None => None,
    };
    let meter = meter_for(&device)?;
    let memory = match (&args.checkpoint, args.budget) {
        (Some(p), _) => RunMemory::Policy(*p),
        (None, Some(choice)) => {
            let budget = choice.resolve(|| Ok(meter.as_ref()))?;
            if choice == BudgetChoice::Auto {
                eprintln!(
                    "guidance budget {} ({})",
                    format_bytes(budget.bytes),
                    budget.source
                );
            }
            RunMemory::Budget(budget.bytes)
        }
        (None, None) => RunMemory::Policy(Policy::None),
    };
    let guide_steps = match &args.guide_steps {
        Some(text) => parse_range(text, args.steps)?,
        None => 0..args.steps,
    };
    let plan = match &objective {
        Some(_) => {
            let workload = guide_workload(
                &cfg,
                (dims.2, dims.3, dims.4),
                positive.dim(1)?,
                args.guidance_scale,
                temporal,
                &device,
            );
            let setting = Setting {
                precision: Precision::F32,
                batch: 1,
            };
            Some(plan_run(&workload, setting, memory, &AnalyticCosts)?)
        }
        None => None,
    };
    if let Some(plan) = &plan {
        println!("guidance step: {}", plan.summary());
    }
    let guidance = match (&objective, &plan) {
        (Some(o), Some(plan)) => Some(Guidance {
            objective: o.as_ref(),
            scale: args.guide_scale,
            steps: guide_steps,
            schedule: &plan.schedule,
        }),
        _ => None,
    };
    let bar = ProgressBar::new(args.steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} steps {elapsed} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let mut recorder = Recorder::start(meter.as_ref());
    let latents = sample(
        &model,
        &noise,
        &negative,
        &positive,
        &options,
        guidance.as_ref(),
        &mut recorder,
        &mut |report| {
            if let Some(v) = report.objective {
                bar.set_message(format!("objective {v:.4}"));
            }
            bar.inc(1);
        },
    )?;
    let report = recorder.finish();
    bar.finish();
    let measured_peak_bytes =
        report.baseline_bytes.saturating_sub(live_before_model) + report.peak_bytes;
    println!(
        "{} steps in {:.1} s; peak {} (weights, latents, captions, guidance and chain){}",
        args.steps,
        started.elapsed().as_secs_f64(),
        format_bytes(measured_peak_bytes),
        plan.as_ref()
            .map(|p| format!(", predicted {}", format_bytes(p.total_peak_bytes)))
            .unwrap_or_default()
    );
    if let Some(o) = &objective {
        let value = o.loss(&latents)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        println!("objective {} on the final video: {value:.4}", o.name());
    }
    if let Some(path) = &args.memory_report {
        let summary = SamplingMemory {
            policy: plan.as_ref().map(|p| p.policy.clone()),
            budget_bytes: match memory {
                RunMemory::Budget(bytes) => Some(bytes),
                RunMemory::Policy(_) => None,
            },
            predicted_peak_bytes: plan.as_ref().map(|p| p.total_peak_bytes),
            measured_peak_bytes,
            timeline: &report,
        };
        let text = serde_json::to_string_pretty(&summary)?;
        latte::io::write_atomically(path, text.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    drop(model);
    let mut out = HashMap::new();
    out.insert("latents".to_string(), latents.clone());
    let video = match decoder {
        Some(p) => Some(
            p.vae(args.vae_precision.dtype(), &device)?
                .decode_video(&latents)?,
        ),
        None => None,
    };
    if let Some(video) = &video {
        out.insert("video".to_string(), video.clone());
    }
    latte::io::save_safetensors(&out, &args.out)?;
    println!("wrote latents to {}", args.out.display());
    let mp4_fps = (!args.no_mp4).then_some(args.fps);
    let report = |written: Written, how: &str| {
        println!("wrote {}{how}", written.gif.display());
        match written.mp4 {
            Some(mp4) => println!("wrote {}", mp4.display()),
            None if mp4_fps.is_some() => {
                println!("no MP4: ffmpeg was not found (install it to get one)")
            }
            None => {}
        }
    };
    if let Some(video) = &video {
        // The VAE's video is in [0, 1]; write_video takes [-1, 1].
        let written = write_video(&((video * 2.0)? - 1.0)?, &args.out, mp4_fps)?;
        report(written, " (decoded by the pipeline's VAE)");
    } else if cfg.in_channels == 3 {
        report(write_video(&latents, &args.out, mp4_fps)?, "");
    } else {
        println!(
            "latent model ({} channels) without a pipeline vae/ to decode it: the latents are \
             in {}",
            cfg.in_channels,
            args.out.display()
        );
    }
    Ok(())
}
