//! `latte forward`: the transformer's output, and with `--vjp` its vector-Jacobian
//! product, under a checkpoint policy, with an exact memory report.
//!
//! Contract (kept stable for checking against PyTorch): IN holds `hidden_states`
//! `(B,C,F,H,W)`, `timestep` `(B,)` (int64 or float) and `encoder_hidden_states`
//! `(B,L,caption_channels)`, plus `grad_sample` with `--vjp`; OUT gets `sample` as f32 and,
//! with `--vjp`, `grad.hidden_states`, `grad.encoder_hidden_states` and
//! `grad.<diffusers parameter name>` for every parameter — or, with `--lora DIR`, for every
//! factor of the adapter (`grad.<module>.lora_A.weight`, `….lora_B.weight`; the base frozen,
//! as PEFT trains).

use crate::cmd::model_source::ModelSource;
use crate::options::{GlobalOptions, Precision};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args as ClapArgs;
use latte::config::InputGeometry;
use latte::lora::Adapter;
use latte::model::{Latte, LatteInputs};
use latte::random::{randn, rng_for};
use latte::vjp::vjp;
use remat::meter::{format_bytes, meter_for, Recorder};
use remat::policy::Policy;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

/// Arguments of `latte forward`.
#[derive(Debug, ClapArgs)]
pub struct Args {
    #[command(flatten)]
    source: ModelSource,
    /// Inputs (safetensors). Required with --model/--config; with --preset, random inputs
    /// of the preset's geometry are drawn from --seed when absent.
    #[arg(long, value_name = "IN.safetensors")]
    inputs: Option<PathBuf>,
    /// Where to write `sample` (and the gradients with --vjp), as f32 safetensors.
    #[arg(long, value_name = "OUT.safetensors")]
    out: Option<PathBuf>,
    /// Precision of weights and activations.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: Precision,
    /// Skip the temporal blocks (diffusers' `enable_temporal_attentions=False`).
    #[arg(long)]
    no_temporal: bool,
    /// Also compute the gradients of `sum(sample * grad_sample)`.
    #[arg(long)]
    vjp: bool,
    /// Checkpoint policy for --vjp: none, every:K, sqrt, budget:SIZE (e.g. budget:512MiB).
    #[arg(long, default_value = "none", value_name = "POLICY")]
    checkpoint: Policy,
    /// Write the memory report (peak above weights and inputs, timeline) as JSON.
    #[arg(long, value_name = "FILE")]
    memory_report: Option<PathBuf>,
    /// A LoRA adapter in PEFT's format (adapter_config.json + adapter_model.safetensors;
    /// a directory or a Hub id) applied to the model; with --vjp the gradients are the
    /// adapter's.
    #[arg(long, value_name = "DIR|ID")]
    lora: Option<PathBuf>,
    /// Scale of the adapter's update (PEFT's set_scale; 1 as trained).
    #[arg(long, value_name = "S", default_value_t = 1.0, requires = "lora")]
    lora_scale: f64,
}

/// Runs `latte forward`.
pub fn run(args: Args, global: &GlobalOptions) -> Result<()> {
    let device = global.device()?;
    let dtype = args.dtype.dtype();
    let resolved = args.source.resolve()?;
    let temporal = !args.no_temporal;
    if args.memory_report.is_some() && !args.vjp {
        bail!("--memory-report measures the gradient computation: add --vjp");
    }
    let mut tensors = match (&args.inputs, resolved.geometry) {
        (Some(path), _) => read_inputs(path, &device)?,
        (None, Some(geometry)) => random_inputs(&resolved.config, geometry, global.seed, &device)?,
        (None, None) => bail!("--inputs is required with --model or --config"),
    };
    let inputs = model_inputs(&mut tensors, dtype)?;
    let grad_sample = if args.vjp {
        let g = tensors
            .remove("grad_sample")
            .with_context(|| "--vjp needs `grad_sample` (the output's shape) in the inputs file")?;
        Some(g.to_dtype(dtype)?)
    } else {
        None
    };

    let adapter = args
        .lora
        .as_ref()
        .map(|lora| -> Result<Adapter> {
            let dir = crate::hub::resolve(lora, crate::hub::Needs::Adapter)?;
            Ok(Adapter::load(&dir, &resolved.config, &device)?)
        })
        .transpose()?;
    // With an adapter the base stays frozen and the gradients are the adapter's.
    let train_base = args.vjp && adapter.is_none();
    let (mut model, mut varmap) = match (&resolved.dir, train_base) {
        (Some(dir), true) => {
            let (model, varmap) = dir.load_trainable(dtype, &device)?;
            (model, Some(varmap))
        }
        (Some(dir), false) => (dir.load_frozen(dtype, &device)?, None),
        (None, train_base) => {
            let (model, varmap) =
                latte::weights::fresh_trainable(&resolved.config, global.seed, dtype, &device)?;
            if train_base {
                (model, Some(varmap))
            } else {
                (latte::weights::frozen(&resolved.config, &varmap)?, None)
            }
        }
    };
    if let Some(adapter) = &adapter {
        if args.vjp {
            varmap = Some(adapter.attach_trainable_scaled(&mut model, args.lora_scale)?);
        } else {
            adapter.attach(&mut model, args.lora_scale)?;
        }
    }
    model.check_inputs(&inputs, temporal)?;
    if let Some(g) = &grad_sample {
        let expected = expected_output_dims(&model, &inputs);
        if g.dims() != expected.as_slice() {
            bail!(
                "grad_sample has shape {:?}; the output has shape {expected:?}",
                g.dims()
            );
        }
    }

    let mut out = HashMap::new();
    let started = Instant::now();
    match (grad_sample, varmap) {
        (Some(grad_sample), Some(varmap)) => {
            let chain = model.chain(temporal);
            let meter = meter_for(&device)?;
            let plan = crate::cmd::plan_support::schedule_for(
                &args.checkpoint,
                &chain,
                &inputs,
                meter.as_ref(),
            )?;
            let mut recorder = Recorder::start(meter.as_ref());
            let result = vjp(
                &model,
                &varmap,
                &inputs,
                &grad_sample,
                temporal,
                &plan.schedule,
                &mut recorder,
            )?;
            device.synchronize()?;
            let report = recorder.finish();
            let elapsed = started.elapsed().as_secs_f64();
            println!(
                "forward + vjp ({}, schedule {} ops): {elapsed:.3} s, peak {} above weights and inputs",
                args.checkpoint,
                plan.schedule.len(),
                format_bytes(report.peak_bytes)
            );
            if let Some(predicted) = plan.predicted_peak_bytes {
                println!("planner predicted peak: {}", format_bytes(predicted));
            }
            if let Some(path) = &args.memory_report {
                report.write_json(path)?;
            }
            insert_f32(&mut out, "sample", &result.sample)?;
            insert_f32(&mut out, "grad.hidden_states", &result.hidden_states)?;
            insert_f32(
                &mut out,
                "grad.encoder_hidden_states",
                &result.encoder_hidden_states,
            )?;
            for (name, grad) in &result.params {
                insert_f32(&mut out, &format!("grad.{name}"), grad)?;
            }
        }
        _ => {
            let sample = model.forward(&inputs, temporal)?;
            device.synchronize()?;
            let elapsed = started.elapsed().as_secs_f64();
            println!("forward: {elapsed:.3} s, output {:?}", sample.dims());
            insert_f32(&mut out, "sample", &sample)?;
        }
    }
    for (name, t) in &out {
        ensure_finite(name, t).context("the model produced non-finite values")?;
    }
    if let Some(path) = &args.out {
        latte::io::save_safetensors(&out, path)?;
        println!("wrote {} tensors to {}", out.len(), path.display());
    }
    Ok(())
}

fn insert_f32(out: &mut HashMap<String, Tensor>, name: &str, t: &Tensor) -> Result<()> {
    out.insert(name.to_string(), t.to_dtype(DType::F32)?);
    Ok(())
}

fn expected_output_dims(model: &Latte, inputs: &LatteInputs) -> Vec<usize> {
    let mut dims = inputs.hidden_states.dims().to_vec();
    dims[1] = model.config().out_channels;
    dims
}

/// Reads an inputs file; errors name the file.
fn read_inputs(path: &PathBuf, device: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device)
        .with_context(|| format!("cannot read inputs {}", path.display()))
}

/// Takes the three model inputs out of `tensors`, checks them, converts floats to `dtype`.
fn model_inputs(tensors: &mut HashMap<String, Tensor>, dtype: DType) -> Result<LatteInputs> {
    let mut take = |name: &str| {
        tensors
            .remove(name)
            .with_context(|| format!("the inputs have no `{name}` tensor"))
    };
    let hidden_states = take("hidden_states")?;
    let timestep = take("timestep")?;
    let encoder_hidden_states = take("encoder_hidden_states")?;
    for (name, t) in [
        ("hidden_states", &hidden_states),
        ("timestep", &timestep),
        ("encoder_hidden_states", &encoder_hidden_states),
    ] {
        ensure_finite(name, t)?;
    }
    Ok(LatteInputs {
        hidden_states: hidden_states.to_dtype(dtype)?,
        timestep,
        encoder_hidden_states: encoder_hidden_states.to_dtype(dtype)?,
    })
}

/// Fails on NaN or infinite values, naming the tensor and counting them.
fn ensure_finite(name: &str, t: &Tensor) -> Result<()> {
    if !t.dtype().is_float() {
        return Ok(());
    }
    let values = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let bad = values.iter().filter(|v| !v.is_finite()).count();
    if bad > 0 {
        bail!(
            "`{name}` has {bad} NaN or infinite values out of {}",
            values.len()
        );
    }
    Ok(())
}

/// Standard-normal inputs of a preset's geometry, timesteps spread over the schedule.
fn random_inputs(
    config: &latte::config::LatteConfig,
    g: InputGeometry,
    seed: u64,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut rng = rng_for(seed, "forward-inputs");
    let video = (g.batch, config.in_channels, g.frames, g.height, g.width);
    let out = (g.batch, config.out_channels, g.frames, g.height, g.width);
    let timesteps: Vec<i64> = (0..g.batch)
        .map(|b| ((b * 997 + 500) % 1000) as i64)
        .collect();
    let mut tensors = HashMap::new();
    tensors.insert("hidden_states".into(), randn(&mut rng, video, device)?);
    tensors.insert("timestep".into(), Tensor::new(timesteps, device)?);
    tensors.insert(
        "encoder_hidden_states".into(),
        randn(
            &mut rng,
            (g.batch, g.caption_tokens, config.caption_channels),
            device,
        )?,
    );
    tensors.insert("grad_sample".into(), randn(&mut rng, out, device)?);
    Ok(tensors)
}
