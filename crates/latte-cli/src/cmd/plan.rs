//! `latte plan`: the cheapest configuration — checkpoint policy, batch size, precision —
//! whose predicted peak fits a memory budget.
//!
//! For every candidate precision (and batch size, with `--batch auto`), the costs of
//! every scheduled stage come from `latte::costs` (the analytic model) or, with
//! `--measure`, from profiling the real stages at the real shapes on this device (cached
//! under `$XDG_CACHE_HOME/latte-rs/` or `~/.cache/latte-rs/`). Each fixed policy is
//! simulated, the planner finds the fastest schedule within the budget, and the table
//! shows the predicted peak (weights + optimizer state + inputs + activations, gradients
//! and transients), the step time and the recomputation overhead. The chosen row is the
//! fastest that fits; with `--batch auto`, the largest batch that fits, then the fastest.

use crate::budget::{parse_budget, BudgetChoice, ResolvedBudget};
use crate::cmd::model_source::ModelSource;
use crate::options::{GlobalOptions, Precision};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Args as ClapArgs, ValueEnum};
use latte::config::{InputGeometry, LatteConfig};
use latte::costs::{analytic_costs, check_geometry, Kernels, Mode, StaticMemory, Throughput};
use latte::model::LatteInputs;
use latte::random::{randn, rng_for};
use latte::weights::{fresh_trainable, frozen};
use remat::costs::ChainCosts;
use remat::meter::format_bytes;
use remat::policy::ByteSize;
use remat::profile::{min_budget, plan_within};
use remat::schedule::Schedule;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Caption tokens when neither `--caption-tokens` nor a preset gives them (Latte-1's
/// T5 captions are 120 tokens).
const DEFAULT_CAPTION_TOKENS: usize = 120;

/// Largest batch `--batch auto` tries.
const MAX_AUTO_BATCH: usize = 4096;

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

impl From<ModeArg> for Mode {
    fn from(mode: ModeArg) -> Self {
        match mode {
            ModeArg::Train => Mode::Train,
            ModeArg::Guide => Mode::Guide,
        }
    }
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
    /// Videos per step, or `auto`: the largest batch that fits.
    #[arg(long, default_value = "1", value_parser = parse_batch)]
    pub batch: BatchChoice,
    /// Candidate precisions, comma-separated (f32, bf16, f16).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "f32,bf16")]
    pub precision: Vec<Precision>,
    /// Memory for the whole step (weights, optimizer state, inputs, activations), e.g.
    /// 24GiB, or `auto`: the device's available memory (MemAvailable on the CPU, free
    /// memory on a GPU) minus 10 %.
    #[arg(long, value_parser = parse_budget)]
    pub budget: BudgetChoice,
    /// Measure the stages' costs on this device (random weights, the real shapes) instead
    /// of the analytic model; results are cached per configuration.
    #[arg(long)]
    pub measure: bool,
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

/// `--batch N` or `--batch auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchChoice {
    /// A fixed number of videos.
    Fixed(usize),
    /// The largest batch that fits.
    Auto,
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

/// Lower-case name of a precision.
pub fn precision_name(precision: Precision) -> &'static str {
    match precision {
        Precision::F32 => "f32",
        Precision::F16 => "f16",
        Precision::Bf16 => "bf16",
    }
}

/// One candidate configuration and its prediction.
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    /// `none`, `every:K`, `sqrt`, or `budget:SIZE` (the planner's schedule for SIZE of
    /// activations: what `--checkpoint budget:SIZE` runs).
    pub policy: String,
    /// The schedule's ops.
    #[serde(skip)]
    pub schedule: Schedule,
    /// Videos per step.
    pub batch: usize,
    /// Videos the model sees (twice `batch` with --cfg).
    pub effective_batch: usize,
    /// Compute precision.
    pub precision: &'static str,
    /// Weights, optimizer state, inputs and head gradients.
    pub memory: StaticMemory,
    /// Predicted peak of the forward/backward above weights and inputs (activations,
    /// stage gradients, transients).
    pub activation_peak_bytes: u64,
    /// Predicted peak of the step: everything.
    pub total_peak_bytes: u64,
    /// Predicted seconds of the chain's forward and backward.
    pub step_s: f64,
    /// Recomputation over the no-recomputation time, in percent.
    pub overhead_pct: f64,
    /// Whether `total_peak_bytes` fits the budget.
    pub fits: bool,
    /// `analytic` or `measured`.
    pub costs: &'static str,
}

/// What `latte plan` found.
#[derive(Debug, Clone, Serialize)]
pub struct PlanOutcome {
    /// The model, in words.
    pub model: String,
    /// The workload, in words.
    pub workload: String,
    /// The budget for the whole step.
    pub budget_bytes: u64,
    /// Where the budget comes from, in words.
    pub budget_source: String,
    /// Every candidate, in the order evaluated.
    pub candidates: Vec<Candidate>,
    /// Index of the chosen candidate, if any fits.
    pub chosen: Option<usize>,
    /// The smallest budget for which a candidate fits (at batch 1 with --batch auto).
    pub smallest_feasible_bytes: u64,
}

impl PlanOutcome {
    /// The chosen candidate, if any fits.
    pub fn chosen(&self) -> Option<&Candidate> {
        self.chosen.and_then(|i| self.candidates.get(i))
    }
}

/// The model and workload of a request, resolved.
pub struct Workload {
    /// The model configuration.
    pub config: LatteConfig,
    /// The model, in words.
    pub model: String,
    /// Latent geometry of ONE video (batch 1): frames, latent height and width, tokens.
    pub geometry: InputGeometry,
    /// What is differentiated.
    pub mode: Mode,
    /// Classifier-free guidance doubles the batch.
    pub cfg: bool,
    /// The device's kernels (from `--device`).
    pub kernels: Kernels,
    /// The `--device` text.
    pub device_name: String,
}

impl Workload {
    /// The geometry at `batch` videos (doubled with CFG).
    pub fn at_batch(&self, batch: usize) -> InputGeometry {
        InputGeometry {
            batch: if self.cfg { 2 * batch } else { batch },
            ..self.geometry
        }
    }

    /// One line describing the workload.
    pub fn describe(&self) -> String {
        let g = &self.geometry;
        let factor = latent_factor(&self.config);
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
            "{}{} · {} frames × {size} · {} caption tokens · device {} ({} kernels)",
            self.mode,
            if self.cfg {
                " with CFG (batch ×2)"
            } else {
                ""
            },
            g.frames,
            g.caption_tokens,
            self.device_name,
            match self.kernels {
                Kernels::Fused => "fused CPU",
                Kernels::Composed => "composed",
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
    pub fn workload(&self, global: &GlobalOptions) -> Result<Workload> {
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
        if self.cfg && self.mode == ModeArg::Train {
            bail!("--cfg doubles the batch for classifier-free guidance while sampling: use it with --mode guide");
        }
        Ok(Workload {
            config,
            model: resolved.description,
            geometry,
            mode: self.mode.into(),
            cfg: self.cfg,
            kernels: Kernels::for_device_name(&global.device),
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

/// The costs of one (precision, batch) pair.
struct Evaluated {
    costs: ChainCosts,
    memory: StaticMemory,
    work: Vec<latte::costs::StageWork>,
    source: &'static str,
}

/// Evaluates workloads, measuring on `device` when asked.
pub struct Evaluator<'a> {
    workload: &'a Workload,
    measure: Option<Measure>,
}

struct Measure {
    device: Device,
    seed: u64,
}

impl<'a> Evaluator<'a> {
    /// Analytic costs, or measured ones on the device of `global` when `measure`.
    pub fn new(workload: &'a Workload, measure: bool, global: &GlobalOptions) -> Result<Self> {
        let measure = if measure {
            Some(Measure {
                device: global.device()?,
                seed: global.seed,
            })
        } else {
            None
        };
        Ok(Self { workload, measure })
    }

    fn analytic(&self, dtype: DType, batch: usize) -> Result<Evaluated> {
        let w = self.workload;
        let geometry = w.at_batch(batch);
        let throughput = Throughput::default_for(w.kernels, dtype);
        let costs = analytic_costs(&w.config, &geometry, dtype, w.mode, w.kernels, &throughput)?;
        Ok(Evaluated {
            costs: costs.chain,
            memory: costs.memory,
            work: costs.work,
            source: "analytic",
        })
    }

    fn evaluate(&self, dtype: DType, batch: usize) -> Result<Evaluated> {
        let mut evaluated = self.analytic(dtype, batch)?;
        if let Some(measure) = &self.measure {
            evaluated.costs = measured_costs(self.workload, batch, dtype, measure)?;
            evaluated.source = "measured";
            if let Some(t) = Throughput::calibrate(&evaluated.work, &evaluated.costs) {
                eprintln!(
                    "measured {dtype:?} throughput on {}: matrix products {:.1} GFLOP/s, \
                     other ops {:.2} GB/s",
                    self.workload.device_name,
                    t.matmul_flop_per_s / 1e9,
                    t.memory_bytes_per_s / 1e9
                );
            }
        }
        Ok(evaluated)
    }
}

/// Plans a request: the table of candidates and the chosen one.
pub fn make_plan(request: &PlanRequest, global: &GlobalOptions) -> Result<(Workload, PlanOutcome)> {
    let workload = request.workload(global)?;
    let ResolvedBudget {
        bytes: budget_bytes,
        source: budget_source,
    } = request.budget(global)?;
    let evaluator = Evaluator::new(&workload, request.measure, global)?;
    let mut precisions = request.precision.clone();
    precisions.dedup();
    if precisions.is_empty() {
        bail!("--precision: give at least one of f32, bf16, f16");
    }

    // The smallest budget anything fits in (batch 1 with --batch auto).
    let mut smallest_feasible_bytes = u64::MAX;
    let mut least_static: Option<(Precision, StaticMemory)> = None;
    let base_batch = match request.batch {
        BatchChoice::Fixed(n) => n,
        BatchChoice::Auto => 1,
    };
    for &precision in &precisions {
        let e = evaluator.analytic(precision.dtype(), base_batch)?;
        let needed = e.memory.outside_chain_bytes() + min_budget(&e.costs);
        smallest_feasible_bytes = smallest_feasible_bytes.min(needed);
        let static_bytes = e.memory.weights_bytes + e.memory.optimizer_bytes;
        if least_static.is_none_or(|(_, m)| static_bytes < m.weights_bytes + m.optimizer_bytes) {
            least_static = Some((precision, e.memory));
        }
    }

    let mut candidates = Vec::new();
    for &precision in &precisions {
        let dtype = precision.dtype();
        let batch = match request.batch {
            BatchChoice::Fixed(n) => n,
            BatchChoice::Auto => match largest_batch(&evaluator, dtype, budget_bytes)? {
                Some(batch) => batch,
                None => continue,
            },
        };
        let mut batch = batch;
        let mut evaluated = evaluator.evaluate(dtype, batch)?;
        if request.batch == BatchChoice::Auto && evaluator.measure.is_some() {
            // The analytic search may overshoot what the measured costs allow.
            while batch > 1 && !fits_at_all(&evaluated, budget_bytes) {
                batch -= 1;
                evaluated = evaluator.evaluate(dtype, batch)?;
            }
        }
        candidates.extend(candidates_for(
            &workload,
            &evaluated,
            precision,
            batch,
            budget_bytes,
        )?);
    }
    let chosen = choose(&candidates, request.batch == BatchChoice::Auto);
    let outcome = PlanOutcome {
        model: workload.model.clone(),
        workload: workload.describe(),
        budget_bytes,
        budget_source,
        candidates,
        chosen,
        smallest_feasible_bytes,
    };
    if outcome.chosen.is_none() {
        if let Some((precision, memory)) = least_static {
            let fixed = memory.weights_bytes + memory.optimizer_bytes;
            if budget_bytes < fixed {
                let optimizer = if memory.optimizer_bytes > 0 {
                    format!(
                        " + optimizer state {}",
                        format_bytes(memory.optimizer_bytes)
                    )
                } else {
                    String::new()
                };
                bail!(
                    "budget {} is below the weights {}{optimizer} of this model in {}: \
                     the smallest feasible budget is {}",
                    format_bytes(budget_bytes),
                    format_bytes(memory.weights_bytes),
                    precision_name(precision),
                    format_bytes(smallest_feasible_bytes)
                );
            }
        }
    }
    Ok((workload, outcome))
}

/// Whether some schedule of `evaluated` fits `budget_bytes`.
fn fits_at_all(evaluated: &Evaluated, budget_bytes: u64) -> bool {
    evaluated.memory.outside_chain_bytes() + min_budget(&evaluated.costs) <= budget_bytes
}

/// The largest batch whose least-memory schedule fits, by doubling then bisection on the
/// analytic costs; `None` when not even one video fits.
fn largest_batch(
    evaluator: &Evaluator<'_>,
    dtype: DType,
    budget_bytes: u64,
) -> Result<Option<usize>> {
    let fits = |batch: usize| -> Result<bool> {
        Ok(fits_at_all(
            &evaluator.analytic(dtype, batch)?,
            budget_bytes,
        ))
    };
    if !fits(1)? {
        return Ok(None);
    }
    let (mut low, mut high) = (1, 2);
    while high <= MAX_AUTO_BATCH && fits(high)? {
        low = high;
        high *= 2;
    }
    if high > MAX_AUTO_BATCH {
        return Ok(Some(low));
    }
    while high - low > 1 {
        let mid = (low + high) / 2;
        if fits(mid)? {
            low = mid;
        } else {
            high = mid;
        }
    }
    Ok(Some(low))
}

/// The fixed policies and the planner's schedule for one (precision, batch).
fn candidates_for(
    workload: &Workload,
    evaluated: &Evaluated,
    precision: Precision,
    batch: usize,
    budget_bytes: u64,
) -> Result<Vec<Candidate>> {
    let costs = &evaluated.costs;
    let n = costs.num_stages();
    let outside = evaluated.memory.outside_chain_bytes();
    let baseline_s = costs.baseline_time_s();
    let make = |policy: String, schedule: Schedule| -> Result<Candidate> {
        let simulation = schedule.simulate(costs)?;
        let total = outside + simulation.peak_bytes;
        Ok(Candidate {
            policy,
            schedule,
            batch,
            effective_batch: workload.at_batch(batch).batch,
            precision: precision_name(precision),
            memory: evaluated.memory,
            activation_peak_bytes: simulation.peak_bytes,
            total_peak_bytes: total,
            step_s: simulation.time_s,
            overhead_pct: if baseline_s > 0.0 {
                (100.0 * (simulation.time_s - baseline_s) / baseline_s).max(0.0)
            } else {
                0.0
            },
            fits: total <= budget_bytes,
            costs: evaluated.source,
        })
    };
    let blocks = costs.block_starts();
    let mut rows = vec![
        make("none".into(), Schedule::store_all(n))?,
        make("every:1".into(), Schedule::every_block(n, &blocks, 1))?,
        make("every:2".into(), Schedule::every_block(n, &blocks, 2))?,
        make("sqrt".into(), Schedule::sqrt_blocks(n, &blocks))?,
    ];
    let activation_budget = budget_bytes.saturating_sub(outside);
    if let Ok(plan) = plan_within(costs, activation_budget) {
        rows.push(make(budget_policy(activation_budget), plan.schedule)?);
    }
    Ok(rows)
}

/// `budget:SIZE` with SIZE rounded down to 3 significant digits in binary units, so that
/// the policy text is short and never promises more than the budget.
fn budget_policy(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (suffix, unit) in UNITS {
        if bytes >= unit {
            let value = bytes as f64 / unit as f64;
            let decimals = if value >= 100.0 {
                0
            } else if value >= 10.0 {
                1
            } else {
                2
            };
            let scale = 10f64.powi(decimals);
            let floored = (value * scale).floor() / scale;
            return format!("budget:{floored:.prec$}{suffix}", prec = decimals as usize);
        }
    }
    format!("budget:{bytes}")
}

/// The fastest fitting candidate; with `largest_batch_first`, among those of the largest
/// fitting batch.
fn choose(candidates: &[Candidate], largest_batch_first: bool) -> Option<usize> {
    let fitting = candidates.iter().enumerate().filter(|(_, c)| c.fits);
    let largest = if largest_batch_first {
        fitting.clone().map(|(_, c)| c.batch).max()
    } else {
        None
    };
    fitting
        .filter(|(_, c)| largest.is_none_or(|b| c.batch == b))
        .min_by(|(_, a), (_, b)| a.step_s.total_cmp(&b.step_s))
        .map(|(i, _)| i)
}

/// Runs `latte plan`.
pub fn run(args: Args, global: &GlobalOptions) -> Result<()> {
    let (_, outcome) = make_plan(&args.request, global)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
    } else {
        print!("{}", render_table(&outcome));
    }
    if outcome.chosen.is_none() {
        bail!(
            "no configuration fits the budget {}: the smallest feasible budget is {} ({})",
            format_bytes(outcome.budget_bytes),
            format_bytes(outcome.smallest_feasible_bytes),
            ByteSize(outcome.smallest_feasible_bytes).to_exact_string()
        );
    }
    Ok(())
}

/// The human-readable table.
pub fn render_table(outcome: &PlanOutcome) -> String {
    let mut out = String::new();
    out.push_str(&format!("{}\n{}\n", outcome.model, outcome.workload));
    out.push_str(&format!(
        "budget {} ({})\n",
        format_bytes(outcome.budget_bytes),
        outcome.budget_source
    ));
    let mut seen: Vec<(&str, usize)> = Vec::new();
    for c in &outcome.candidates {
        if seen.contains(&(c.precision, c.batch)) {
            continue;
        }
        seen.push((c.precision, c.batch));
        let m = &c.memory;
        out.push_str(&format!(
            "  {} batch {}: weights {}, optimizer state {}, inputs {}; parameter gradients {} \
             (allocated during the backward, inside the activations) ({} costs)\n",
            c.precision,
            c.effective_batch,
            format_bytes(m.weights_bytes),
            format_bytes(m.optimizer_bytes),
            format_bytes(m.input_bytes),
            format_bytes(m.param_grad_bytes),
            c.costs
        ));
    }
    out.push_str(&format!(
        "\n{:<20} {:>4} {:>5} {:>12} {:>12} {:>10} {:>10}  {}\n",
        "policy", "prec", "batch", "activations", "peak", "step", "recompute", "fits"
    ));
    for (i, c) in outcome.candidates.iter().enumerate() {
        let chosen = if outcome.chosen == Some(i) {
            "  <- chosen"
        } else {
            ""
        };
        out.push_str(&format!(
            "{:<20} {:>4} {:>5} {:>12} {:>12} {:>10} {:>9.1}%  {}{chosen}\n",
            c.policy,
            c.precision,
            c.effective_batch,
            format_bytes(c.activation_peak_bytes),
            format_bytes(c.total_peak_bytes),
            format_seconds(c.step_s),
            c.overhead_pct,
            if c.fits { "yes" } else { "no" }
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

// ---- measured costs and their cache ----

/// What identifies a measurement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CacheKey {
    format: u32,
    config: LatteConfig,
    geometry: InputGeometry,
    dtype: String,
    mode: Mode,
    device: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct CacheEntry {
    key: CacheKey,
    costs: ChainCosts,
}

/// The cache directory: `$XDG_CACHE_HOME/latte-rs`, else `~/.cache/latte-rs`.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("latte-rs"));
    }
    let home = std::env::var_os("HOME")
        .filter(|d| !d.is_empty())
        .context("no cache directory for --measure: set XDG_CACHE_HOME or HOME")?;
    Ok(PathBuf::from(home).join(".cache").join("latte-rs"))
}

/// FNV-1a, 64 bits: a stable file name for a key.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn cache_path(dir: &Path, key: &CacheKey) -> Result<PathBuf> {
    let text = serde_json::to_string(key)?;
    Ok(dir.join(format!("costs-{:016x}.json", fnv1a(text.as_bytes()))))
}

/// Profiles the real stages (random weights and inputs) at `batch`, or reads the cache.
fn measured_costs(
    workload: &Workload,
    batch: usize,
    dtype: DType,
    measure: &Measure,
) -> Result<ChainCosts> {
    let geometry = workload.at_batch(batch);
    let key = CacheKey {
        format: 1,
        config: workload.config.clone(),
        geometry,
        dtype: format!("{dtype:?}").to_lowercase(),
        mode: workload.mode,
        device: workload.device_name.clone(),
    };
    let dir = cache_dir()?;
    let path = cache_path(&dir, &key)?;
    if let Ok(text) = std::fs::read_to_string(&path) {
        if let Ok(entry) = serde_json::from_str::<CacheEntry>(&text) {
            if entry.key == key {
                return Ok(entry.costs);
            }
        }
    }
    eprintln!(
        "measuring the stages of batch {} in {} on {} (cached in {})",
        geometry.batch,
        key.dtype,
        workload.device_name,
        dir.display()
    );
    let costs = profile_workload(workload, &geometry, dtype, &measure.device, measure.seed)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = path.with_extension("json.tmp");
    let entry = CacheEntry { key, costs };
    std::fs::write(&tmp, serde_json::to_string_pretty(&entry)?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(entry.costs)
}

/// Random inputs of `geometry` and an upstream gradient for the output.
pub fn random_inputs(
    config: &LatteConfig,
    geometry: &InputGeometry,
    dtype: DType,
    device: &Device,
    seed: u64,
) -> Result<(LatteInputs, Tensor)> {
    let g = geometry;
    let mut rng = rng_for(seed, "plan-inputs");
    let inputs = LatteInputs {
        hidden_states: randn(
            &mut rng,
            (g.batch, config.in_channels, g.frames, g.height, g.width),
            device,
        )?
        .to_dtype(dtype)?,
        timestep: Tensor::new(vec![500i64; g.batch], device)?,
        encoder_hidden_states: randn(
            &mut rng,
            (g.batch, g.caption_tokens, config.caption_channels),
            device,
        )?
        .to_dtype(dtype)?,
    };
    let grad = randn(
        &mut rng,
        (g.batch, config.out_channels, g.frames, g.height, g.width),
        device,
    )?
    .to_dtype(dtype)?;
    Ok((inputs, grad))
}

/// The model with random weights, trainable for train mode and frozen for guide mode.
pub fn random_model(
    workload: &Workload,
    dtype: DType,
    device: &Device,
    seed: u64,
) -> Result<latte::model::Latte> {
    let (trainable, varmap) = fresh_trainable(&workload.config, seed, dtype, device)?;
    Ok(match workload.mode {
        Mode::Train => trainable,
        Mode::Guide => frozen(&workload.config, &varmap)?,
    })
}

fn profile_workload(
    workload: &Workload,
    geometry: &InputGeometry,
    dtype: DType,
    device: &Device,
    seed: u64,
) -> Result<ChainCosts> {
    let model = random_model(workload, dtype, device, seed)?;
    let (inputs, _) = random_inputs(&workload.config, geometry, dtype, device, seed)?;
    let meter = remat::meter::meter_for(device)?;
    let chain = model.chain(true);
    Ok(remat::profile::profile(
        &chain,
        &inputs.to_vec(),
        &workload.mode.wants_input_grad(),
        meter.as_ref(),
    )?)
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

    #[test]
    fn budget_policies_round_down_and_parse_back() {
        assert_eq!(budget_policy(83_781_837_488), "budget:78.0GiB");
        assert_eq!(budget_policy(3 << 29), "budget:1.50GiB");
        assert_eq!(budget_policy(999), "budget:999");
        for bytes in [83_781_837_488u64, 123_456_789, 5 << 40] {
            let text = budget_policy(bytes);
            let policy: remat::policy::Policy = text.parse().unwrap();
            let remat::policy::Policy::Budget(parsed) = policy else {
                panic!("{text}")
            };
            assert!(parsed <= bytes, "{text}");
        }
    }

    #[test]
    fn cache_names_are_stable() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
