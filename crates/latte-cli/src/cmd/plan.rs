//! `latte plan`: the cheapest configuration — checkpoint policy, batch size, precision —
//! whose predicted peak fits a memory budget.
//!
//! This module parses the flags and prints; the account and the search are
//! `latte::plan`'s, the same that `latte train`, `latte sample` and `latte profile` run, so
//! the chosen row is what those commands run for the same flags. Costs come from the
//! analytic model or, with `--measure`, from profiling the real stages on this device
//! (cached under `$XDG_CACHE_HOME/latte-rs/` or `~/.cache/latte-rs/`).

use crate::budget::{parse_budget, BudgetChoice, ResolvedBudget};
use crate::cmd::model_source::ModelSource;
use crate::options::{GlobalOptions, LoraArgs, Precision};
use anyhow::{bail, Result};
use clap::{Args as ClapArgs, ValueEnum};
use latte::config::{InputGeometry, LatteConfig};
use latte::costs::{check_geometry, Kernels, Memory};
use latte::plan::measured::MeasuredCosts;
use latte::plan::phases::{text_encoder_phase, vae_decode_phase, PhaseMemory};
use latte::plan::{
    describe_parts, search, AnalyticCosts, BatchChoice, Candidate, CostModel, Plan, Search, Task,
    Workload,
};
use remat::meter::format_bytes;
use remat::policy::ByteSize;
use serde::Serialize;

/// Caption tokens when neither `--caption-tokens` nor a preset gives them (Latte-1's
/// T5 captions are 120 tokens).
const DEFAULT_CAPTION_TOKENS: usize = 120;

/// Downsampling of the latent VAE (models with 4 input channels work on SD-VAE latents).
const VAE_FACTOR: usize = 8;

/// What the step computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Gradients for every parameter, the latents and the captions (AdamW state counted).
    Train,
    /// Gradients for the latents only, weights frozen (gradient-guided sampling).
    Guide,
}

/// The workload and budget flags that `latte plan` and `latte profile` share.
#[derive(Debug, ClapArgs)]
pub struct PlanRequest {
    #[command(flatten)]
    pub source: ModelSource,
    /// Video frames: 1, or the model's video_length [default: the preset's, else video_length].
    #[arg(long)]
    pub frames: Option<usize>,
    /// Video height in PIXELS for latent models (in_channels 4: latents are 8× smaller, so
    /// a multiple of 8 × patch_size), in latents for pixel-space models [default: the
    /// preset's, else sample_size].
    #[arg(long)]
    pub height: Option<usize>,
    /// Video width, in the same units as --height.
    #[arg(long)]
    pub width: Option<usize>,
    /// Caption tokens per video [default: the preset's, else 120].
    #[arg(long)]
    pub caption_tokens: Option<usize>,
    /// train: gradients for all parameters, latents and captions, with AdamW state;
    /// guide: gradients for the latents only, frozen weights.
    #[arg(long, value_enum)]
    pub mode: ModeArg,
    /// Classifier-free guidance: every video runs as a [negative, positive] pair, doubling
    /// the batch the model sees (as LattePipeline does).
    #[arg(long)]
    pub cfg: bool,
    /// Micro-batches per optimizer step (train), as `latte train --grad-accum`.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub grad_accum: u64,
    /// Clips come from a directory of clip files, as `latte train --data`: the loader's
    /// prefetched batches are counted.
    #[arg(long)]
    pub data_files: bool,
    /// Skip the temporal blocks, as `latte train --no-temporal`.
    #[arg(long)]
    pub no_temporal: bool,
    /// Data-parallel ranks (`mpirun -n N latte train`): the plan is one rank's, --batch
    /// and --budget are per rank.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub ranks: u64,
    /// ZeRO stage under --ranks, as `latte train --zero`: 1 shards the optimizer state and
    /// EMA, 2 the gradients too.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub zero: u8,
    #[command(flatten)]
    pub lora: LoraArgs,
    /// Videos per step, or `auto`: the largest batch that fits.
    #[arg(long, default_value = "1", value_parser = parse_batch)]
    pub batch: BatchChoice,
    /// Candidate precisions, comma-separated (f32, bf16, f16).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "f32,bf16")]
    pub precision: Vec<Precision>,
    /// Memory for the whole step (weights, optimizer state, EMA, inputs, activations), e.g.
    /// 24GiB, or `auto`: the device's available memory (MemAvailable on the CPU, free
    /// memory on a GPU) minus 10 %.
    #[arg(long, value_parser = parse_budget)]
    pub budget: BudgetChoice,
    /// Measure the stages' costs on this device (random weights, the real shapes) instead
    /// of the analytic model; results are cached per configuration.
    #[arg(long)]
    pub measure: bool,
    /// Precision of the pipeline's text encoder (--model a pipeline directory, --mode
    /// guide: its phase is listed).
    #[arg(long, value_enum, default_value = "f32")]
    pub text_encoder_precision: Precision,
    /// Precision of the pipeline's VAE decoding the latents.
    #[arg(long, value_enum, default_value = "f32")]
    pub vae_precision: Precision,
}

/// Arguments of `latte plan`.
#[derive(Debug, ClapArgs)]
pub struct Args {
    #[command(flatten)]
    pub request: PlanRequest,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn parse_batch(text: &str) -> Result<BatchChoice, String> {
    if text == "auto" {
        return Ok(BatchChoice::Auto);
    }
    match text.parse::<usize>() {
        Ok(0) => Err("the batch must be at least 1 (or auto)".into()),
        Ok(n) => Ok(BatchChoice::Fixed(n)),
        Err(_) => Err(format!("`{text}`: expected a number of videos or auto")),
    }
}

/// What `latte plan` found: the plan and what it was made for.
#[derive(Debug, Clone, Serialize)]
pub struct PlanOutcome {
    /// The model, in words.
    pub model: String,
    /// The workload, in words.
    pub workload: String,
    /// Where the budget comes from, in words.
    pub budget_source: String,
    /// The candidates and the choice.
    #[serde(flatten)]
    pub plan: Plan,
    /// For a pipeline: the text encoder's, the chosen sampling row's and the VAE decode's
    /// peaks, in the order `latte sample` runs them, each with only its model loaded.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<PhaseMemory>,
}

impl PlanOutcome {
    /// The chosen candidate, if any fits.
    pub fn chosen(&self) -> Option<&Candidate> {
        self.plan.chosen()
    }
}

/// The workload of a request and how to describe it.
pub struct RequestWorkload {
    /// What the library plans.
    pub workload: Workload,
    /// The phases around the sampling steps, for a pipeline's guided sampling.
    pub phases: Option<(PhaseMemory, PhaseMemory)>,
    /// The model, in words.
    pub model: String,
    /// The `--device` text.
    pub device_name: String,
}

impl RequestWorkload {
    /// One line describing the workload.
    pub fn describe(&self) -> String {
        let g = &self.workload.geometry;
        let factor = latent_factor(&self.workload.config);
        let size = if factor > 1 {
            format!(
                "{}x{} px (latents {}x{})",
                g.width * factor,
                g.height * factor,
                g.width,
                g.height
            )
        } else {
            format!("{}x{}", g.width, g.height)
        };
        format!(
            "{} · {} frames × {size} · {} caption tokens · device {} ({} kernels)",
            self.workload,
            g.frames,
            g.caption_tokens,
            self.device_name,
            match self.workload.kernels {
                Kernels::Fused => "fused",
                Kernels::Generic => "generic",
            }
        )
    }
}

/// 8 for latent models (4 input channels: SD-VAE latents), 1 for pixel-space models.
fn latent_factor(config: &LatteConfig) -> usize {
    if config.in_channels == 4 {
        VAE_FACTOR
    } else {
        1
    }
}

impl PlanRequest {
    /// Reads the model and checks the workload; errors name the flag to fix.
    pub fn workload(&self, global: &GlobalOptions) -> Result<RequestWorkload> {
        let resolved = self.source.resolve()?;
        let config = resolved.config;
        let preset = resolved.geometry;
        let factor = latent_factor(&config);
        let frames = self
            .frames
            .or(preset.map(|g| g.frames))
            .unwrap_or(config.video_length);
        if frames == 0 {
            bail!("--frames 0: a video has at least one frame");
        }
        let unit = if factor > 1 { " px" } else { "" };
        let to_latent = |flag: &str, value: Option<usize>, preset_value: Option<usize>| {
            let Some(value) = value else {
                return Ok(preset_value.unwrap_or(config.sample_size));
            };
            let step = factor * config.patch_size;
            if value == 0 || !value.is_multiple_of(step) {
                bail!(
                    "{flag} {value}{unit}: must be a positive multiple of {step}{unit} \
                     ({}patch_size {})",
                    if factor > 1 {
                        format!("the VAE's factor {factor} × ")
                    } else {
                        String::new()
                    },
                    config.patch_size
                );
            }
            Ok(value / factor)
        };
        let height = to_latent("--height", self.height, preset.map(|g| g.height))?;
        let width = to_latent("--width", self.width, preset.map(|g| g.width))?;
        let caption_tokens = self
            .caption_tokens
            .or(preset.map(|g| g.caption_tokens))
            .unwrap_or(DEFAULT_CAPTION_TOKENS);
        let geometry = InputGeometry {
            batch: 1,
            frames,
            height,
            width,
            caption_tokens,
        };
        check_geometry(&config, &geometry).map_err(|e| match e {
            latte::costs::CostsError::Frames { .. } => {
                anyhow::anyhow!("--frames {frames}: {e}")
            }
            other => anyhow::anyhow!(other),
        })?;
        let task = match self.mode {
            ModeArg::Train if self.cfg => bail!(
                "--cfg doubles the batch for classifier-free guidance while sampling: use it \
                 with --mode guide"
            ),
            ModeArg::Train => Task::Train {
                ranks: self.ranks as usize,
                zero: self.zero,
                grad_accum: self.grad_accum as usize,
                prefetch_batches: if self.data_files {
                    latte::train::DataSource::Shards(Default::default()).prefetch()
                } else {
                    0
                },
            },
            ModeArg::Guide
                if self.grad_accum > 1
                    || self.data_files
                    || self.lora.lora.is_some()
                    || self.ranks > 1
                    || self.zero > 0 =>
            {
                bail!(
                    "--grad-accum, --data-files, --lora, --ranks and --zero describe training: \
                     use them with --mode train (sampling with an adapter merges it into the \
                     weights)"
                )
            }
            ModeArg::Guide => Task::Guide { cfg: self.cfg },
        };
        let phases = match (&resolved.pipeline, task) {
            (Some(pipeline), Task::Guide { .. }) => Some((
                text_encoder_phase(pipeline, self.text_encoder_precision.dtype())?,
                vae_decode_phase(pipeline, self.vae_precision.dtype(), frames, height, width)?,
            )),
            _ => None,
        };
        Ok(RequestWorkload {
            phases,
            workload: Workload {
                config,
                geometry,
                task,
                kernels: global.kernels()?,
                memory: Memory::of_device_name(&global.device),
                temporal: !self.no_temporal,
                lora: self.lora.config(),
            },
            model: resolved.description,
            device_name: global.device.clone(),
        })
    }

    /// The budget in bytes and where it comes from; `auto` opens the `--device` to read
    /// its available memory.
    pub fn budget(&self, global: &GlobalOptions) -> Result<ResolvedBudget> {
        self.budget
            .resolve(|| Ok(remat::meter::meter_for(&global.device()?)?))
    }
}

/// Plans a request: the table of candidates and the chosen one.
pub fn make_plan(
    request: &PlanRequest,
    global: &GlobalOptions,
) -> Result<(RequestWorkload, PlanOutcome)> {
    let workload = request.workload(global)?;
    let ResolvedBudget {
        bytes: budget_bytes,
        source: budget_source,
    } = request.budget(global)?;
    let mut precisions: Vec<latte::train::Precision> =
        request.precision.iter().map(|p| p.training()).collect();
    precisions.dedup();
    if precisions.is_empty() {
        bail!("--precision: give at least one of f32, bf16, f16");
    }
    let measured;
    let costs: &dyn CostModel = if request.measure {
        measured = MeasuredCosts {
            device: global.device()?,
            device_name: global.device.clone(),
            seed: global.seed,
            announce: |message| eprintln!("{message}"),
        };
        &measured
    } else {
        &AnalyticCosts
    };
    let plan = search(
        &Search {
            workload: workload.workload.clone(),
            precisions,
            batch: request.batch,
            budget_bytes,
        },
        costs,
    )?;
    let phases = match (&workload.phases, plan.chosen()) {
        (Some((text, decode)), Some(chosen)) => vec![
            *text,
            PhaseMemory {
                name: "sampling",
                weights_bytes: chosen.account.weights_bytes,
                transient_bytes: chosen.total_peak_bytes - chosen.account.weights_bytes,
            },
            *decode,
        ],
        _ => Vec::new(),
    };
    let outcome = PlanOutcome {
        model: workload.model.clone(),
        workload: workload.describe(),
        budget_source,
        plan,
        phases,
    };
    Ok((workload, outcome))
}

/// Runs `latte plan`.
pub fn run(args: Args, global: &GlobalOptions) -> Result<()> {
    let (_, outcome) = make_plan(&args.request, global)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
    } else {
        print!("{}", render_table(&outcome));
    }
    if outcome.chosen().is_none() {
        bail!(
            "no configuration fits the budget {}: the smallest feasible budget is {} ({})",
            format_bytes(outcome.plan.budget_bytes),
            format_bytes(outcome.plan.smallest_feasible_bytes),
            ByteSize(outcome.plan.smallest_feasible_bytes).to_exact_string()
        );
    }
    Ok(())
}

/// The human-readable table: the memory outside the chain of every (precision, batch),
/// part by part, then every candidate.
pub fn render_table(outcome: &PlanOutcome) -> String {
    let plan = &outcome.plan;
    let mut out = String::new();
    out.push_str(&format!("{}\n{}\n", outcome.model, outcome.workload));
    out.push_str(&format!(
        "budget {} ({})\n",
        format_bytes(plan.budget_bytes),
        outcome.budget_source
    ));
    let mut seen = Vec::new();
    for c in &plan.candidates {
        if seen.contains(&(c.precision, c.batch)) {
            continue;
        }
        seen.push((c.precision, c.batch));
        out.push_str(&format!(
            "  {} batch {}: {} ({} costs)\n",
            c.precision.name(),
            c.effective_batch,
            describe_parts(&c.account.parts()),
            c.costs
        ));
    }
    out.push_str(&format!(
        "\n{:<20} {:>4} {:>5} {:>12} {:>12} {:>10} {:>10}  {}\n",
        "policy", "prec", "batch", "chain", "peak", "step", "recompute", "fits"
    ));
    for (i, c) in plan.candidates.iter().enumerate() {
        let chosen = if plan.chosen == Some(i) {
            "  <- chosen"
        } else {
            ""
        };
        out.push_str(&format!(
            "{:<20} {:>4} {:>5} {:>12} {:>12} {:>10} {:>9.1}%  {}{chosen}\n",
            c.policy,
            c.precision.name(),
            c.effective_batch,
            format_bytes(c.chain_peak_bytes),
            format_bytes(c.total_peak_bytes),
            format_seconds(c.step_s),
            c.overhead_pct,
            if c.fits { "yes" } else { "no" }
        ));
    }
    if !outcome.phases.is_empty() {
        out.push_str(
            "
pipeline phases (each with only its model loaded):
",
        );
        for phase in &outcome.phases {
            out.push_str(&format!(
                "  {:<14} {:>12} = weights {} + {}
",
                phase.name,
                format_bytes(phase.peak_bytes()),
                format_bytes(phase.weights_bytes),
                format_bytes(phase.transient_bytes)
            ));
        }
        let peak = outcome.phases.iter().map(PhaseMemory::peak_bytes).max();
        out.push_str(&format!(
            "  the pipeline's peak: {}
",
            format_bytes(peak.unwrap_or(0))
        ));
    }
    out
}

fn format_seconds(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2} s")
    } else {
        format!("{:.1} ms", 1e3 * s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_parses() {
        assert_eq!(parse_batch("auto"), Ok(BatchChoice::Auto));
        assert_eq!(parse_batch("3"), Ok(BatchChoice::Fixed(3)));
        assert!(parse_batch("0").is_err());
    }
}
