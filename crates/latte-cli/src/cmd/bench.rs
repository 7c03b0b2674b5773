//! `latte bench`: step time and measured peak memory of one workload under several
//! checkpoint policies, side by side, on a preset with random weights and inputs.
//!
//! Modes: `fwd` (forward without gradients), `train` (VJP w.r.t. every parameter and the
//! latents), `guide` (VJP w.r.t. the latents only, frozen weights). Peaks are live bytes
//! above weights and inputs (the counting allocator on CPU, the device's memory pool on
//! CUDA), the same measure as `tools/bench_torch.py` takes from PyTorch's allocator. On
//! CUDA every step is timed between two device synchronisations.

use crate::cmd::model_source::ModelSource;
use crate::options::{GlobalOptions, Precision};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::{Args as ClapArgs, ValueEnum};
use latte::model::{Latte, LatteInputs};
use latte::random::{randn, rng_for};
use latte::weights::{fresh_trainable, frozen};
use remat::grads;
use remat::meter::{format_bytes, meter_for, MemoryMeter, NoPhases, Recorder};
use remat::policy::Policy;
use remat::profile::{resolve_policy, ResolvedPlan};
use serde::Serialize;
use std::collections::VecDeque;
use std::time::Instant;

/// What one benchmark step computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Forward only, no gradients.
    Fwd,
    /// Gradients for every parameter (and the latents).
    Train,
    /// Gradients for the latents only (frozen weights).
    Guide,
}

/// Arguments of `latte bench`.
#[derive(Debug, ClapArgs)]
pub struct Args {
    #[command(flatten)]
    source: ModelSource,
    /// Workload.
    #[arg(long, value_enum, default_value = "train")]
    mode: Mode,
    /// Policies to compare, comma-separated (none, every:K, sqrt, budget:SIZE); ignored by
    /// `--mode fwd`, which keeps no graph.
    #[arg(long, value_delimiter = ',', default_value = "none,every:1")]
    policies: Vec<Policy>,
    /// Also plan budgets at these fractions of the measured `none` peak.
    #[arg(long, value_delimiter = ',')]
    budget_fractions: Vec<f64>,
    /// Measured steps per policy.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Unmeasured warm-up steps per policy before the measured ones.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Precision of weights and activations.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: Precision,
    /// Batch size instead of the preset's (2 for a classifier-free guidance step).
    #[arg(long)]
    batch: Option<usize>,
    /// Latent height and width instead of the preset's (32 for 256×256 video, 64 for
    /// 512×512, with an 8× VAE).
    #[arg(long, value_name = "N")]
    latent_size: Option<usize>,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    json: bool,
}

/// One row of the result.
#[derive(Debug, Serialize)]
struct Row {
    mode: Mode,
    policy: String,
    step_s_median: f64,
    step_s_min: f64,
    peak_bytes: u64,
    predicted_peak_bytes: Option<u64>,
    /// The planner's predicted extra time over a step without recomputation (0.1 = +10 %),
    /// from the measured stage costs.
    predicted_recompute: Option<f64>,
    repeats: usize,
}

/// Runs `latte bench`.
pub fn run(args: Args, global: &GlobalOptions) -> Result<()> {
    let device = global.device()?;
    let dtype = args.dtype.dtype();
    let resolved = args.source.resolve()?;
    let mut geometry = resolved
        .geometry
        .context("latte bench needs --preset (it draws inputs of the preset's geometry)")?;
    if let Some(batch) = args.batch {
        geometry.batch = batch;
    }
    if let Some(size) = args.latent_size {
        (geometry.height, geometry.width) = (size, size);
    }
    if args.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    let config = &resolved.config;
    let (trainable, varmap) = fresh_trainable(config, global.seed, dtype, &device)?;
    let model = match args.mode {
        Mode::Train => trainable,
        Mode::Fwd | Mode::Guide => frozen(config, &varmap)?,
    };
    let mut rng = rng_for(global.seed, "bench-inputs");
    let g = geometry;
    let inputs = LatteInputs {
        hidden_states: randn(
            &mut rng,
            (g.batch, config.in_channels, g.frames, g.height, g.width),
            &device,
        )?
        .to_dtype(dtype)?,
        timestep: Tensor::new(vec![500i64; g.batch], &device)?,
        encoder_hidden_states: randn(
            &mut rng,
            (g.batch, g.caption_tokens, config.caption_channels),
            &device,
        )?
        .to_dtype(dtype)?,
    };
    let grad_sample = randn(
        &mut rng,
        (g.batch, config.out_channels, g.frames, g.height, g.width),
        &device,
    )?
    .to_dtype(dtype)?;
    println!(
        "{} · mode {:?} · {:?} · batch {} × {} frames × {}×{}",
        resolved.description, args.mode, dtype, g.batch, g.frames, g.height, g.width
    );

    let steps = Steps {
        warmup: args.warmup,
        repeats: args.repeats,
    };
    let (mut queue, mut fractions): (VecDeque<Policy>, Vec<f64>) = match args.mode {
        Mode::Fwd => (VecDeque::from([Policy::None]), Vec::new()),
        _ => (
            args.policies.iter().cloned().collect(),
            args.budget_fractions.clone(),
        ),
    };
    let meter = meter_for(&device)?;
    let bench = Bench {
        model: &model,
        inputs: &inputs,
        grad_sample: &grad_sample,
        mode: args.mode,
        device: &device,
        meter: meter.as_ref(),
    };
    let mut none_peak = None;
    let mut failed = 0;
    while let Some(policy) = queue.pop_front() {
        // A policy that fails (out of device memory, an infeasible budget) is reported
        // and the next one runs.
        match bench_policy(&bench, &policy, steps) {
            Ok(row) => {
                if policy == Policy::None {
                    none_peak = Some(row.peak_bytes);
                }
                report(&row, args.json)?;
            }
            Err(e) => {
                failed += 1;
                report_failure(&policy, &e, args.json)?;
            }
        }
        // Budgets relative to `none` join the queue once everything else has run.
        if queue.is_empty() && !fractions.is_empty() {
            let base = none_peak.context("--budget-fractions needs `none` among --policies")?;
            queue.extend(
                fractions
                    .drain(..)
                    .map(|fraction| Policy::Budget((base as f64 * fraction) as u64)),
            );
        }
    }
    if failed > 0 {
        bail!("{failed} of the policies failed");
    }
    Ok(())
}

fn report_failure(policy: &Policy, error: &anyhow::Error, json: bool) -> Result<()> {
    if json {
        let row = serde_json::json!({"policy": policy.to_string(), "error": format!("{error:#}")});
        println!("{row}");
    } else {
        println!("{:<18} failed: {error:#}", policy.to_string());
    }
    Ok(())
}

fn report(row: &Row, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(row)?);
    } else {
        let predicted = match (row.predicted_peak_bytes, row.predicted_recompute) {
            (Some(bytes), Some(recompute)) => format!(
                " (predicted {}, +{:.1} % time)",
                format_bytes(bytes),
                100.0 * recompute
            ),
            (Some(bytes), None) => format!(" (predicted {})", format_bytes(bytes)),
            _ => String::new(),
        };
        println!(
            "{:<18} median {:>8.3} s  min {:>8.3} s  peak {:>10}{predicted}",
            row.policy,
            row.step_s_median,
            row.step_s_min,
            format_bytes(row.peak_bytes)
        );
    }
    Ok(())
}

/// Gradient flags per input for a mode: `[hidden_states, timestep, captions]`.
fn wanted(mode: Mode) -> [bool; 3] {
    match mode {
        Mode::Train => [true, false, true],
        Mode::Guide => [true, false, false],
        Mode::Fwd => [false, false, false],
    }
}

/// How many steps a policy runs.
#[derive(Debug, Clone, Copy)]
struct Steps {
    warmup: usize,
    repeats: usize,
}

/// One workload on one device, measured under any policy.
struct Bench<'a> {
    model: &'a Latte,
    inputs: &'a LatteInputs,
    grad_sample: &'a Tensor,
    mode: Mode,
    device: &'a Device,
    meter: &'a dyn MemoryMeter,
}

fn bench_policy(bench: &Bench<'_>, policy: &Policy, steps: Steps) -> Result<Row> {
    let Bench {
        model,
        inputs,
        grad_sample,
        mode,
        device,
        meter,
    } = *bench;
    let chain = model.chain(true);
    let plan = match mode {
        Mode::Fwd => None,
        _ => Some(resolve_policy(
            policy,
            &chain,
            &inputs.to_vec(),
            &wanted(mode),
            meter,
        )?),
    };
    let mut times = Vec::with_capacity(steps.repeats);
    let mut peak_bytes = 0;
    for step in 0..steps.warmup + steps.repeats {
        device.synchronize()?;
        let recorder = Recorder::start(meter);
        let started = Instant::now();
        step_once(model, inputs, grad_sample, mode, plan.as_ref())?;
        device.synchronize()?;
        let elapsed = started.elapsed().as_secs_f64();
        let report = recorder.finish();
        if step >= steps.warmup {
            times.push(elapsed);
            peak_bytes = peak_bytes.max(report.peak_bytes);
        }
    }
    times.sort_by(f64::total_cmp);
    let predicted_recompute = plan.as_ref().and_then(|plan| {
        let costs = plan.costs.as_ref()?;
        let predicted = plan.schedule.simulate(costs).ok()?;
        Some(predicted.time_s / costs.baseline_time_s() - 1.0)
    });
    Ok(Row {
        mode,
        policy: match mode {
            Mode::Fwd => "forward".to_string(),
            _ => policy.to_string(),
        },
        step_s_median: times[times.len() / 2],
        step_s_min: times[0],
        peak_bytes,
        predicted_peak_bytes: plan.and_then(|p| p.predicted_peak_bytes),
        predicted_recompute,
        repeats: steps.repeats,
    })
}

fn step_once(
    model: &Latte,
    inputs: &LatteInputs,
    grad_sample: &Tensor,
    mode: Mode,
    plan: Option<&ResolvedPlan>,
) -> Result<()> {
    let chain = model.chain(true);
    match plan {
        None => {
            model.forward(inputs, true)?;
        }
        Some(plan) => {
            let tape = grads::forward(
                &chain,
                &inputs.to_vec(),
                &wanted(mode),
                &plan.schedule,
                &mut NoPhases,
            )?;
            tape.backward(grad_sample, &mut NoPhases)?;
        }
    }
    Ok(())
}
