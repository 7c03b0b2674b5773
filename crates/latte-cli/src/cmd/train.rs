//! `latte train`: train a preset from scratch or fine-tune a diffusers model, on the
//! built-in synthetic videos or a directory of pre-encoded clips, within a checkpoint
//! policy or a memory budget for the whole step; checkpoints, exact resume, Ctrl-C saves.

use crate::budget::{parse_budget, BudgetChoice};
use crate::options::{GlobalOptions, LoraArgs, Precision};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Args as ClapArgs;
use indicatif::{ProgressBar, ProgressStyle};
use latte::config::Preset;
use latte::data::ClipShape;
use latte::dist::{Collective, SingleProcess};
use latte::train::{
    DataSource, MemoryPlan, ModelSource, RunOutcome, StepReport, TrainConfig, Trainer, METRICS_FILE,
};
use remat::meter::{format_bytes, meter_for};
use remat::policy::Policy;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Caption tokens of the synthetic captions when the geometry is not a preset's.
const DEFAULT_CAPTION_TOKENS: usize = 4;

/// Arguments of `latte train`. Unset hyper-parameters take the defaults shown (or, with
/// --resume, the checkpoint's values).
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// A diffusers model directory to fine-tune, or a Hugging Face Hub id
    /// ORG/NAME[/SUBFOLDER][@REVISION].
    #[arg(long, value_name = "DIR|ID", conflicts_with_all = ["preset", "resume"])]
    model: Option<PathBuf>,
    /// A built-in configuration to train from fresh weights (--seed): latte-1, medium,
    /// small, tiny.
    #[arg(long, value_name = "NAME", conflicts_with = "resume")]
    preset: Option<String>,
    /// Continue a run exactly: a checkpoint directory, or a run's output directory (its
    /// newest checkpoint).
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
    /// Pre-encoded clips (safetensors files, see docs/DATA.md). Default: the built-in
    /// synthetic videos at the preset's geometry.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Train until this many optimizer steps in total [default: 300].
    #[arg(long)]
    steps: Option<u64>,
    /// Clips per micro-batch [default: the preset's batch, 1 for --model].
    #[arg(long)]
    batch: Option<usize>,
    /// Peak learning rate of AdamW [default: 1e-3].
    #[arg(long)]
    lr: Option<f64>,
    /// Decoupled weight decay of AdamW [default: 0].
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Steps of linear learning-rate warm-up [default: 20].
    #[arg(long)]
    warmup: Option<u64>,
    /// Micro-batches accumulated per optimizer step [default: 1].
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Clip gradients to this global L2 norm; 0 disables [default: 1].
    #[arg(long)]
    clip: Option<f64>,
    /// Decay of the EMA of the weights (warmed up as diffusers' EMAModel) [default: 0.9999].
    #[arg(long)]
    ema_decay: Option<f64>,
    /// Probability of training a clip with the null caption [default: 0.1].
    #[arg(long)]
    caption_dropout: Option<f64>,
    /// Precision of the model; bf16/f16 keep f32 master weights, f16 scales the loss
    /// [default: f32].
    #[arg(long, value_enum)]
    precision: Option<Precision>,
    /// Checkpoint policy of the forward/backward: none, every:K, sqrt, budget:SIZE
    /// (activations only) [default: none].
    #[arg(long, value_name = "POLICY", conflicts_with = "budget")]
    checkpoint: Option<Policy>,
    /// Memory budget for the whole step (weights, optimizer state, EMA, gradients and
    /// activations), e.g. 512MiB, or `auto` (the device's available memory minus 10 %);
    /// the fastest schedule that fits is planned.
    #[arg(long, value_name = "SIZE|auto", value_parser = parse_budget)]
    budget: Option<BudgetChoice>,
    /// Write a checkpoint every N steps (0: only at the end) [default: 100].
    #[arg(long, value_name = "N")]
    save_every: Option<u64>,
    /// Output directory: checkpoint-<step>/, latest, metrics.jsonl.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Skip the temporal blocks (diffusers' `enable_temporal_attentions=False`).
    #[arg(long)]
    no_temporal: bool,
    /// Initial loss scale of f16 training, a power of two [default: 65536]: halved and the
    /// step skipped when gradients overflow, doubled after 2000 good steps.
    #[arg(long, value_name = "SCALE")]
    loss_scale: Option<f64>,
    #[command(flatten)]
    lora: LoraArgs,
    /// ZeRO stage under mpirun: 0, every rank holds AdamW's state; 1, each rank holds and
    /// updates an N-th of every parameter's state (moments, master weights, EMA); 2, also
    /// keeps only its N-th of the gradients, reduced stage by stage in the backward pass
    /// [default: 0].
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=2))]
    zero: Option<u8>,
}

impl Args {
    /// Applies the flags that were given to `config`; returns the names of those that
    /// change how the run computes (which breaks exact continuation on resume).
    /// `budget` is `--budget` resolved to bytes.
    fn apply(&self, config: &mut TrainConfig, budget: Option<u64>) -> Vec<&'static str> {
        let mut changed = Vec::new();
        if let Some(steps) = self.steps {
            config.steps = steps;
        }
        if let Some(every) = self.save_every {
            config.save_every = every;
        }
        let mut set = |name: &'static str, differs: bool| {
            if differs {
                changed.push(name);
            }
        };
        if let Some(v) = self.batch {
            set("--batch", config.batch_size != v);
            config.batch_size = v;
        }
        if let Some(v) = self.lr {
            set("--lr", config.optimizer.lr != v);
            config.optimizer.lr = v;
        }
        if let Some(v) = self.weight_decay {
            set("--weight-decay", config.optimizer.weight_decay != v);
            config.optimizer.weight_decay = v;
        }
        if let Some(v) = self.warmup {
            set("--warmup", config.warmup_steps != v);
            config.warmup_steps = v;
        }
        if let Some(v) = self.grad_accum {
            set("--grad-accum", config.grad_accum != v);
            config.grad_accum = v;
        }
        if let Some(v) = self.clip {
            let clip = (v > 0.0).then_some(v);
            set("--clip", config.clip_grad_norm != clip);
            config.clip_grad_norm = clip;
        }
        if let Some(v) = self.ema_decay {
            set("--ema-decay", config.ema_decay != v);
            config.ema_decay = v;
        }
        if let Some(v) = self.caption_dropout {
            set("--caption-dropout", config.caption_dropout != v);
            config.caption_dropout = v;
        }
        if let Some(v) = self.precision {
            let precision = v.training();
            set("--precision", config.precision != precision);
            config.precision = precision;
        }
        // The memory plan changes the schedule only: gradients are exact whatever it is.
        if let Some(policy) = self.checkpoint {
            config.memory = MemoryPlan::Checkpoint(policy);
        }
        if let Some(bytes) = budget {
            config.memory = MemoryPlan::Budget(bytes);
        }
        if let Some(v) = self.loss_scale {
            set("--loss-scale", config.initial_loss_scale != Some(v));
            config.initial_loss_scale = Some(v);
        }
        // How the optimizer state is spread over the ranks changes no result.
        if let Some(zero) = self.zero {
            config.zero = zero;
        }
        if self.no_temporal {
            set("--no-temporal", config.temporal);
            config.temporal = false;
        }
        changed
    }
}

/// Runs `latte train`.
pub fn run(args: Args, global: &GlobalOptions) -> Result<()> {
    let device = global.device()?;
    let budget = match args.budget {
        Some(choice) => {
            let budget = choice.resolve(|| Ok(meter_for(&device)?))?;
            eprintln!(
                "memory budget {} ({})",
                format_bytes(budget.bytes),
                budget.source
            );
            Some(budget.bytes)
        }
        None => None,
    };
    if args.resume.is_some() && args.lora.lora.is_some() {
        bail!(
            "--lora with --resume: a resumed run keeps its checkpoint's LoRA settings; drop \
             --lora (and start a new run to train another adapter)"
        );
    }
    let group = data_parallel_group(&device)?;
    let leader = group.rank() == 0;
    if group.size() > 1 && leader {
        eprintln!(
            "data parallel: {} ranks × batch per rank (the global batch is their sum)",
            group.size()
        );
    }
    let mut trainer = if let Some(resume) = &args.resume {
        let mut changed = Vec::new();
        let adjust = |config: &mut TrainConfig, data: &mut DataSource| {
            changed = args.apply(config, budget);
            if let Some(dir) = &args.data {
                *data = DataSource::Shards(dir.clone());
            }
        };
        let trainer =
            Trainer::resume_distributed(resume, &args.out, &device, adjust, group.clone())
                .with_context(|| format!("cannot resume from {}", resume.display()))?;
        let mut changed: Vec<String> = changed.iter().map(|s| s.to_string()).collect();
        match trainer.resumed_ranks() {
            Some(ranks) if ranks != group.size() => changed.push(format!(
                "the number of ranks ({ranks} -> {}, and so the global batch)",
                group.size()
            )),
            _ => {}
        }
        if !changed.is_empty() {
            eprintln!(
                "warning: {} differ from the checkpoint's settings: the run no longer \
                 continues exactly",
                changed.join(", ")
            );
        }
        trainer
    } else {
        new_trainer(&args, global, &device, budget, group.clone())?
    };
    if leader {
        describe(&trainer, group.size());
    }

    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        ctrlc::set_handler(move || {
            if flag.swap(true, Ordering::SeqCst) {
                eprintln!("\nsecond Ctrl-C: exiting without saving");
                std::process::exit(130);
            }
            eprintln!("\nCtrl-C: saving a checkpoint after this step (again to abort)");
        })
        .context("cannot install the Ctrl-C handler")?;
    }

    let total = trainer.config().steps;
    let bar = if leader {
        ProgressBar::new(total)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {per_sec} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(trainer.step());
    let mut summary = Summary::default();
    let outcome = trainer.run(|report| {
        summary.add(report);
        bar.set_position(report.step);
        bar.set_message(format!(
            "loss {:.4} | peak {}",
            report.loss,
            format_bytes(report.resident_bytes + report.step_peak_bytes)
        ));
        // Every rank stops at the same step when any of them was interrupted.
        let mut stop = [f64::from(u8::from(interrupted.load(Ordering::SeqCst)))];
        if group.all_reduce_sum_f64(&mut stop).is_err() || stop[0] > 0.0 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    bar.finish_and_clear();
    let outcome = outcome?;
    // Each rank says what it holds: under ZeRO an N-th of the state and the gradients.
    let held = trainer.state_memory();
    tracing::info!(
        rank = group.rank(),
        optimizer_bytes = held.optimizer_bytes,
        ema_bytes = held.ema_bytes,
        gradient_bytes = summary.gradient_bytes,
        step_peak_bytes = summary.step_peak_bytes,
        "memory held (measured)"
    );
    tracing::info!(
        rank = group.rank(),
        digest = format!("{:016x}", trainer.weights_digest()?),
        "weights at the end"
    );
    let mut line = format!(
        "held (measured): optimizer state {}, EMA {}, gradients after the backward {}",
        format_bytes(held.optimizer_bytes),
        format_bytes(held.ema_bytes),
        format_bytes(summary.gradient_bytes)
    );
    if group.size() > 1 {
        line = format!("rank {}/{}: {line}", group.rank(), group.size());
    }
    if !leader {
        println!("{line}");
        return Ok(());
    }
    summary.print();
    println!("{line}");
    match outcome {
        RunOutcome::Finished { step, checkpoint } => {
            println!("finished at step {step}: {}", checkpoint.display());
        }
        RunOutcome::Interrupted { step, checkpoint } => {
            println!(
                "interrupted at step {step}: saved {} (continue with --resume {})",
                checkpoint.display(),
                args.out.display()
            );
        }
    }
    println!("metrics: {}", args.out.join(METRICS_FILE).display());
    Ok(())
}

/// A new run from --model or --preset.
fn new_trainer(
    args: &Args,
    global: &GlobalOptions,
    device: &Device,
    budget: Option<u64>,
    group: Arc<dyn Collective>,
) -> Result<Trainer> {
    let mut config = TrainConfig {
        seed: global.seed,
        ..TrainConfig::default()
    };
    let (model, config_for_data, geometry) = match (&args.model, &args.preset) {
        (Some(model), _) => {
            let dir = &crate::hub::resolve(model, crate::hub::Needs::Transformer)?;
            let opened = latte::weights::ModelDir::open(dir)
                .with_context(|| format!("cannot load model directory {}", dir.display()))?;
            let model_config = opened.config().clone();
            config.batch_size = 1;
            (ModelSource::Directory(dir.clone()), model_config, None)
        }
        (None, Some(name)) => {
            let preset = Preset::by_name(name)?;
            config.batch_size = preset.geometry.batch;
            (
                ModelSource::Fresh {
                    config: preset.config.clone(),
                    seed: global.seed,
                },
                preset.config,
                Some(preset.geometry),
            )
        }
        (None, None) => bail!("give --preset NAME, --model DIR or --resume DIR"),
    };
    args.apply(&mut config, budget);
    config.lora = args.lora.config();
    let data = match &args.data {
        Some(dir) => DataSource::Shards(dir.clone()),
        None => DataSource::Synthetic(match geometry {
            Some(g) => ClipShape {
                channels: config_for_data.in_channels,
                frames: g.frames,
                height: g.height,
                width: g.width,
                caption_tokens: g.caption_tokens,
                caption_channels: config_for_data.caption_channels,
            },
            None => ClipShape {
                channels: config_for_data.in_channels,
                frames: config_for_data.video_length,
                height: config_for_data.sample_size,
                width: config_for_data.sample_size,
                caption_tokens: DEFAULT_CAPTION_TOKENS,
                caption_channels: config_for_data.caption_channels,
            },
        }),
    };
    Ok(Trainer::new_distributed(
        model, data, config, &args.out, device, group,
    )?)
}

/// The data-parallel group this process belongs to: the MPI job's ranks under `mpirun`
/// (feature `mpi`), joined over NCCL when they train on GPUs (feature `nccl`), else one
/// process.
fn data_parallel_group(device: &Device) -> Result<Arc<dyn Collective>> {
    #[cfg(feature = "mpi")]
    if let Some(group) = crate::mpi_group::MpiGroup::init() {
        #[cfg(feature = "nccl")]
        if device.is_cuda() {
            let group = crate::nccl_group::NcclGroup::new(group, device)?;
            return Ok(Arc::new(group));
        }
        return Ok(Arc::new(group));
    }
    let _ = device;
    Ok(Arc::new(SingleProcess))
}

/// Prints what is trained, on what, and the memory plan.
fn describe(trainer: &Trainer, ranks: usize) {
    let c = trainer.config();
    let params: usize = latte::optim::sorted_params(trainer.varmap())
        .map(|p| p.iter().map(|(_, v)| v.elem_count()).sum())
        .unwrap_or(0);
    let what = match &c.lora {
        Some(lora) => format!(
            "LoRA adapters: {params} parameters (f32, rank {}, alpha {}, on {}; base frozen in \
             {:?})",
            lora.r, lora.lora_alpha, lora.target_modules, c.precision
        ),
        None => format!("{params} parameters ({:?})", c.precision),
    };
    println!(
        "training {what} from step {} to {}",
        trainer.step(),
        c.steps
    );
    println!("data: {}", trainer.dataset().describe());
    println!(
        "batch {} x {} micro-batches, lr {:e} (warm-up {}), weight decay {}, clip {}, \
         EMA {}, caption dropout {}",
        c.batch_size,
        c.grad_accum,
        c.optimizer.lr,
        c.warmup_steps,
        c.optimizer.weight_decay,
        c.clip_grad_norm
            .map_or_else(|| "off".to_string(), |v| v.to_string()),
        c.ema_decay,
        c.caption_dropout
    );
    if ranks > 1 {
        let zero = match c.zero {
            0 => "ZeRO 0: every rank holds the whole optimizer state",
            1 => "ZeRO 1: each rank holds an N-th of the optimizer state and EMA",
            _ => "ZeRO 2: each rank holds an N-th of the optimizer state, EMA and gradients",
        };
        println!("{zero} (N = {ranks}); the memory below is one rank's");
    }
    let plan = trainer.plan();
    let budget = match c.memory {
        MemoryPlan::Checkpoint(_) => String::new(),
        MemoryPlan::Budget(bytes) => format!("budget {}; ", format_bytes(bytes)),
    };
    println!("memory: {budget}{}", plan.summary());
}

/// Running totals for the end-of-run summary.
#[derive(Debug, Default)]
struct Summary {
    losses: Vec<f64>,
    seconds: f64,
    peak_bytes: u64,
    /// The largest step peak above what was live at the step's start (measured).
    step_peak_bytes: u64,
    gradient_bytes: u64,
    skipped: u64,
}

impl Summary {
    fn add(&mut self, r: &StepReport) {
        self.losses.push(r.loss);
        self.seconds += r.step_s;
        self.peak_bytes = self.peak_bytes.max(r.resident_bytes + r.step_peak_bytes);
        self.gradient_bytes = self.gradient_bytes.max(r.gradient_bytes);
        self.step_peak_bytes = self.step_peak_bytes.max(r.step_peak_bytes);
        self.skipped += u64::from(r.skipped);
    }

    fn print(&self) {
        let n = self.losses.len();
        if n == 0 {
            return;
        }
        let window = (n / 10).max(1);
        let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
        println!(
            "{n} steps in {:.1} s ({:.3} s/step); loss {:.4} (first {window}) -> {:.4} (last \
             {window}); peak memory {} (weights, optimizer, EMA and step){}",
            self.seconds,
            self.seconds / n as f64,
            mean(&self.losses[..window]),
            mean(&self.losses[n - window..]),
            format_bytes(self.peak_bytes),
            if self.skipped > 0 {
                format!("; {} steps skipped (f16 overflow)", self.skipped)
            } else {
                String::new()
            }
        );
    }
}
