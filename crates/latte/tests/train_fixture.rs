//! One training step against `tests/fixtures/train_step/` (made by
//! `tools/make_train_fixture.py`: DiT's learned-sigma loss, `clip_grad_norm_` and
//! `torch.optim.AdamW` in float64 on diffusers' model).
//!
//! Tolerances, relative to the largest magnitude of the reference (as in `parity.rs`):
//! 1e-5 for `x_t` (one f32 rounding), 1e-4 for the loss and its gradient w.r.t. the output
//! (an f32 forward pass), 1e-3 for parameter gradients (f32 backward), 1e-5 for the weights
//! after the step (the step moves them by about lr = 1e-2).

use candle_core::{DType, Device, Tensor};
use latte::diffusion::{LossTarget, NoiseSchedule};
use latte::model::LatteInputs;
use latte::optim::{clip_grad_norm, sorted_params, AdamW, AdamWConfig, GradAccumulator};
use latte::weights::ModelDir;
use remat::meter::NoPhases;
use remat::schedule::Schedule;
use std::collections::HashMap;
use std::path::PathBuf;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/train_step")
}

fn load(name: &str) -> HashMap<String, Tensor> {
    let path = fixture().join(name);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// max |a − e| / max |e|: the error relative to the reference's own scale (the output
/// gradient's largest entry is 1.9e-2, a parameter's can be smaller still).
fn relative_error(actual: &Tensor, expected: &Tensor) -> f64 {
    assert_eq!(actual.dims(), expected.dims());
    let a = actual.to_dtype(DType::F64).unwrap();
    let e = expected.to_dtype(DType::F64).unwrap();
    let err = (a - &e).unwrap().abs().unwrap().flatten_all().unwrap();
    let err = err.max(0).unwrap().to_scalar::<f64>().unwrap();
    let scale = e.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    let scale = scale.to_scalar::<f64>().unwrap();
    assert!(scale > 0.0, "an all-zero reference checks nothing");
    err / scale
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0]
}

#[test]
fn loss_gradients_and_one_adamw_step_match_torch() {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("meta.json")).unwrap())
            .unwrap();
    let batch = load("batch.safetensors");
    let expected = load("expected.safetensors");
    let dir = ModelDir::open(&fixture().join("model")).unwrap();
    let (model, varmap) = dir.load_trainable(DType::F32, &Device::Cpu).unwrap();

    let schedule = NoiseSchedule::latte();
    let timesteps: Vec<usize> = batch["timestep"]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|t| t as usize)
        .collect();
    let x_t = schedule
        .add_noise(&batch["x0"], &batch["noise"], &timesteps)
        .unwrap();
    let err = relative_error(&x_t, &expected["x_t"]);
    assert!(err <= 1e-5, "x_t: {err:e}");

    // Forward and backward through the remat executor, as training does.
    let chain = model.chain(true);
    let inputs = LatteInputs {
        hidden_states: x_t.clone(),
        timestep: batch["timestep"].clone(),
        encoder_hidden_states: batch["encoder_hidden_states"].clone(),
    };
    let n = remat::grads::scheduled_stages(&chain);
    let tape = remat::grads::forward(
        &chain,
        &inputs.to_vec(),
        &[false, false, false],
        &Schedule::store_all(n),
        &mut NoPhases,
    )
    .unwrap();
    let target = LossTarget {
        x0: &batch["x0"],
        x_t: &x_t,
        noise: &batch["noise"],
        timesteps: &timesteps,
        mask: None,
    };
    let loss = schedule.training_loss(tape.output(), &target, 1.0).unwrap();
    let expected_loss = scalar(&expected["loss"]);
    eprintln!("loss {} vs torch {expected_loss}", loss.loss);
    assert!((loss.loss - expected_loss).abs() <= 1e-4 * expected_loss.abs());
    let mse = Tensor::new(loss.mse.as_slice(), &Device::Cpu).unwrap();
    let vb = Tensor::new(loss.vb.clone().unwrap().as_slice(), &Device::Cpu).unwrap();
    assert!(relative_error(&mse, &expected["mse"]) <= 1e-4);
    // The decoder NLL at t = 0 and the KL at t > 0 both enter the variational term.
    assert!(
        relative_error(&vb, &expected["vb"]) <= 1e-4,
        "vb {:?}",
        loss.vb
    );
    let err = relative_error(&loss.grad_output, &expected["grad.output"]);
    eprintln!("grad.output relative error {err:e}");
    assert!(err <= 1e-4, "grad.output: {err:e}");

    let grads = tape.backward(&loss.grad_output, &mut NoPhases).unwrap();
    let params = sorted_params(&varmap).unwrap();
    let mut checked = 0;
    for (name, var) in &params {
        let Some(reference) = expected.get(&format!("grad.{name}")) else {
            continue;
        };
        let grad = grads.params.get(var.as_tensor()).unwrap();
        let err = relative_error(grad, reference);
        eprintln!("grad.{name}: relative error {err:e}");
        assert!(err <= 1e-3, "grad.{name}: {err:e}");
        checked += 1;
    }
    assert_eq!(checked, 9, "every checked parameter has a gradient");

    // Clipping by global norm, then one AdamW step.
    let mut accumulator = GradAccumulator::new();
    accumulator.add(&params, &grads).unwrap();
    let mut flat = accumulator.finish(&params).unwrap();
    let max_norm = meta["max_grad_norm"].as_f64().unwrap();
    let norm = clip_grad_norm(&mut flat, max_norm).unwrap();
    let expected_norm = scalar(&expected["grad_norm"]);
    assert!(
        (norm - expected_norm).abs() <= 1e-4 * expected_norm,
        "grad norm {norm} vs {expected_norm}"
    );
    let o = &meta["optimizer"];
    let config = AdamWConfig {
        lr: o["lr"].as_f64().unwrap(),
        beta1: o["betas"][0].as_f64().unwrap(),
        beta2: o["betas"][1].as_f64().unwrap(),
        eps: o["eps"].as_f64().unwrap(),
        weight_decay: o["weight_decay"].as_f64().unwrap(),
    };
    let mut optimizer = AdamW::new(&params, config, None).unwrap();
    optimizer.step(&flat, config.lr).unwrap();
    let mut worst = 0f64;
    for (name, var) in &params {
        let err = relative_error(var.as_tensor(), &expected[&format!("param.{name}")]);
        worst = worst.max(err);
        assert!(err <= 1e-5, "param.{name} after the step: {err:e}");
    }
    eprintln!("parameters after one AdamW step: worst relative error {worst:e}");
}
