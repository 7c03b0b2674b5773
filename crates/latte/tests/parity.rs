//! Parity with diffusers on the golden fixtures of `tests/fixtures/` (made by
//! `tools/make_fixtures.py`: torch 2.15.0, diffusers 0.42.1, reference in float64), with
//! each kernel set: the fused CPU kernels and the device-generic ones.
//!
//! Tolerances, relative to the largest magnitude of the reference tensor:
//! - f32 output: 1e-4. f32 arithmetic over a few layers gives ~1e-6 (diffusers itself in
//!   f32 differs from the f64 reference by 2.1e-6); 1e-4 leaves room for summation order.
//! - f32 gradients: 1e-3 (diffusers f32 vs f64: 3.4e-5; backward doubles the depth and
//!   candle's GELU derivative uses 6-digit constants).
//! - f16 output: 1e-2; bf16 output: 5e-2 (10 and 7 mantissa bits through ~10 roundings).

use candle_core::{DType, Device};
use latte::weights::ModelDir;
use remat::grads::scheduled_stages;
use remat::meter::NoPhases;
use remat::schedule::Schedule;

mod common;

const CASES: [&str; 5] = ["unit_config", "video", "resized", "no_temporal", "batch"];

fn temporal(case: &str) -> bool {
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixture(case).join("meta.json")).unwrap(),
    )
    .unwrap();
    meta["enable_temporal_attentions"].as_bool().unwrap()
}

#[test]
fn forward_matches_diffusers_in_f32_f16_bf16() {
    common::with_each_kernel_set(|_kernels| {
        for case in CASES {
            let dir = ModelDir::open(&common::fixture(case).join("model")).unwrap();
            let ins = common::load(common::fixture(case).join("inputs.safetensors"));
            let expected =
                &common::load(common::fixture(case).join("expected.safetensors"))["sample"];
            for (dtype, tolerance) in [(DType::F32, 1e-4), (DType::F16, 1e-2), (DType::BF16, 5e-2)]
            {
                let model = dir.load_frozen(dtype, &Device::Cpu).unwrap();
                let inputs = common::fixture_inputs(&ins, dtype);
                model.check_inputs(&inputs, temporal(case)).unwrap();
                let sample = model.forward(&inputs, temporal(case)).unwrap();
                let err = common::relative_error(&sample, expected);
                eprintln!("{case} {dtype:?} forward: relative error {err:e}");
                assert!(
                    err <= tolerance,
                    "{case} {dtype:?}: error {err:e} > {tolerance:e}"
                );
            }
        }
    });
}

#[test]
fn vjp_matches_diffusers_for_inputs_and_every_parameter() {
    common::with_each_kernel_set(|_kernels| {
        for case in CASES {
            let dir = ModelDir::open(&common::fixture(case).join("model")).unwrap();
            let ins = common::load(common::fixture(case).join("inputs.safetensors"));
            let expected = common::load(common::fixture(case).join("expected.safetensors"));
            let (model, varmap) = dir.load_trainable(DType::F32, &Device::Cpu).unwrap();
            let chain_len = scheduled_stages(&model.chain(temporal(case)));
            let vjp = latte::vjp::vjp(
                &model,
                &varmap,
                &common::fixture_inputs(&ins, DType::F32),
                &ins["grad_sample"],
                temporal(case),
                &Schedule::store_all(chain_len),
                &mut NoPhases,
            )
            .unwrap();
            assert!(
                common::relative_error(&vjp.sample, &expected["sample"]) <= 1e-4,
                "{case}"
            );
            let mut checked = vec![
                ("hidden_states".to_string(), vjp.hidden_states),
                (
                    "encoder_hidden_states".to_string(),
                    vjp.encoder_hidden_states,
                ),
            ];
            checked.extend(vjp.params);
            let expected_grads = expected.keys().filter(|k| k.starts_with("grad.")).count();
            assert_eq!(checked.len(), expected_grads, "{case}: gradient count");
            let mut worst = 0f64;
            for (name, grad) in checked {
                let reference = &expected[&format!("grad.{name}")];
                let err = common::relative_error(&grad, reference);
                worst = worst.max(err);
                assert!(err <= 1e-3, "{case}: grad.{name} error {err:e}");
            }
            eprintln!("{case} f32 gradients: worst relative error {worst:e}");
        }
    });
}

/// candle's fused kernels silently cut gradients; this catches any parameter that stops
/// receiving one. Key biases are the exception: adding a constant to every score of a
/// query leaves its softmax unchanged, so `to_k.bias` has a zero gradient in exact
/// arithmetic (diffusers' float64 reference stores ≤ 3e-15 there).
#[test]
fn every_parameter_receives_a_nonzero_gradient() {
    common::with_each_kernel_set(|_kernels| {
        let case = "video";
        let dir = ModelDir::open(&common::fixture(case).join("model")).unwrap();
        let ins = common::load(common::fixture(case).join("inputs.safetensors"));
        let (model, varmap) = dir.load_trainable(DType::F32, &Device::Cpu).unwrap();
        let vjp = latte::vjp::vjp(
            &model,
            &varmap,
            &common::fixture_inputs(&ins, DType::F32),
            &ins["grad_sample"],
            true,
            &Schedule::store_all(scheduled_stages(&model.chain(true))),
            &mut NoPhases,
        )
        .unwrap();
        assert!(!vjp.params.is_empty());
        for (name, grad) in &vjp.params {
            let norm = grad
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let scale = varmap.data().lock().unwrap()[name]
                .as_tensor()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            if name.ends_with("to_k.bias") {
                assert!(norm.sqrt() <= 1e-5 * scale.max(1.0), "{name}: {norm}");
            } else {
                assert!(norm > 1e-12, "{name} receives no gradient");
            }
        }
    });
}
