//! LoRA parity with PEFT (`tests/fixtures/lora/`, made by `tools/make_lora_fixture.py`:
//! peft 0.21.2 on diffusers 0.42.1, reference in float64) on the `batch` case's model and
//! inputs, with each kernel set.
//!
//! Tolerances, relative to the largest magnitude of the reference tensor:
//! - output with the adapter attached or merged: 1e-5. Measured 1.8e-6, the base model's
//!   own distance from the reference (1.9e-6 on this case, 1.7e-6 even computing in f64:
//!   two of the 128 timestep frequencies, computed in f32 as diffusers does, round 1 ulp
//!   apart from PyTorch's `exp`);
//! - gradients of the latents and of every adapter factor: 1e-3, as for full parameter
//!   gradients (`tests/parity.rs`).

use candle_core::{DType, Device, Tensor};
use common::relative_error;
use latte::lora::Adapter;
use latte::model::{Latte, LatteInputs};
use latte::weights::{frozen_from, ModelDir};
use remat::grads::scheduled_stages;
use remat::meter::NoPhases;
use remat::schedule::Schedule;
use std::collections::HashMap;

mod common;

const OUTPUT_TOLERANCE: f64 = 1e-5;
const GRADIENT_TOLERANCE: f64 = 1e-3;

/// The `batch` case's model and inputs, and the LoRA references.
struct Case {
    base: ModelDir,
    inputs: HashMap<String, Tensor>,
    expected: HashMap<String, Tensor>,
}

impl Case {
    fn new() -> Self {
        Self {
            base: ModelDir::open(&common::fixture("batch").join("model")).unwrap(),
            inputs: common::load(common::fixture("batch").join("inputs.safetensors")),
            expected: common::load(common::fixture("lora").join("expected.safetensors")),
        }
    }

    /// The adapter in `tests/fixtures/lora/<name>`.
    fn adapter(&self, name: &str) -> Adapter {
        let dir = common::fixture("lora").join(name);
        Adapter::load(&dir, self.base.config(), &Device::Cpu).unwrap()
    }

    fn model_inputs(&self) -> LatteInputs {
        common::fixture_inputs(&self.inputs, DType::F32)
    }

    /// The base model, frozen, in f32.
    fn base_model(&self) -> Latte {
        self.base.load_frozen(DType::F32, &Device::Cpu).unwrap()
    }

    /// The output of the base with `adapter` attached.
    fn attached_output(&self, adapter: &Adapter) -> Tensor {
        let mut model = self.base_model();
        adapter.attach(&mut model, 1.0).unwrap();
        model.forward(&self.model_inputs(), true).unwrap()
    }

    /// The output of the base with `adapter` merged into its weights.
    fn merged_output(&self, adapter: &Adapter) -> Tensor {
        let mut weights = self.base.frozen_tensors(DType::F32, &Device::Cpu).unwrap();
        adapter.merge_into(&mut weights, 1.0).unwrap();
        let model = frozen_from(self.base.config(), weights, DType::F32, &Device::Cpu).unwrap();
        model.forward(&self.model_inputs(), true).unwrap()
    }

    /// How far the base model's own output is from `expected`: the adapter must move it
    /// well beyond the tolerance, or the checks could not fail.
    fn base_distance(&self, expected: &Tensor) -> f64 {
        let output = self
            .base_model()
            .forward(&self.model_inputs(), true)
            .unwrap();
        relative_error(&output, expected)
    }
}

/// A PEFT-written adapter, attached as trainable factors: the output and the gradients
/// of the latents and of every factor match PEFT's.
#[test]
fn adapter_forward_and_gradients_match_peft() {
    let case = Case::new();
    let adapter = case.adapter("adapter");
    // Every kind of layer the fixture adapts, rank_pattern and alpha_pattern included.
    assert_eq!(adapter.layers().len(), 35);
    let net2 = adapter
        .layers()
        .iter()
        .find(|l| l.module == "transformer_blocks.1.ff.net.2")
        .unwrap();
    assert_eq!((net2.rank, net2.scale), (2, 0.5));
    common::with_each_kernel_set(|kernels| {
        let mut model = case.base_model();
        let varmap = adapter.attach_trainable(&mut model).unwrap();
        let result = latte::vjp::vjp(
            &model,
            &varmap,
            &case.model_inputs(),
            &case.inputs["grad_sample"],
            true,
            &Schedule::store_all(scheduled_stages(&model.chain(true))),
            &mut NoPhases,
        )
        .unwrap();
        let err = relative_error(&result.sample, &case.expected["sample"]);
        eprintln!("{kernels:?}: output relative error {err:e}");
        assert!(err <= OUTPUT_TOLERANCE, "{kernels:?}: output error {err:e}");
        let err = relative_error(&result.hidden_states, &case.expected["grad.hidden_states"]);
        assert!(
            err <= GRADIENT_TOLERANCE,
            "{kernels:?}: ∂hidden_states {err:e}"
        );
        assert_eq!(result.params.len(), 70);
        for (name, grad) in &result.params {
            let err = relative_error(grad, &case.expected[&format!("grad.{name}")]);
            assert!(err <= GRADIENT_TOLERANCE, "{kernels:?}: ∂{name} {err:e}");
        }
    });
    assert!(case.base_distance(&case.expected["sample"]) > 100.0 * OUTPUT_TOLERANCE);
}

/// The adapter merged into the weights gives PEFT's `merge_and_unload()` output.
#[test]
fn merged_adapter_matches_peft() {
    let case = Case::new();
    let merged = case.merged_output(&case.adapter("adapter"));
    let err = relative_error(&merged, &case.expected["merged.sample"]);
    assert!(err <= OUTPUT_TOLERANCE, "merged output error {err:e}");
}

/// An adapter latte-rs trained (`latte train --lora`, 20 steps), loaded by PEFT: PEFT's
/// output equals latte-rs's, with the adapter attached and merged.
#[test]
fn adapter_trained_by_latte_gives_pefts_output() {
    let case = Case::new();
    let adapter = case.adapter("latte_adapter");
    let expected =
        &common::load(common::fixture("lora").join("latte_expected.safetensors"))["sample"];
    let err = relative_error(&case.attached_output(&adapter), expected);
    assert!(err <= OUTPUT_TOLERANCE, "attached: {err:e}");
    let err = relative_error(&case.merged_output(&adapter), expected);
    assert!(err <= OUTPUT_TOLERANCE, "merged: {err:e}");
    assert!(case.base_distance(expected) > 100.0 * OUTPUT_TOLERANCE);
}

/// Training through an adapter: every factor gets a non-zero gradient and no base weight
/// or bias gets one (they are plain tensors, outside the graph's parameters).
#[test]
fn only_the_factors_receive_gradients() {
    let case = Case::new();
    let adapter = case.adapter("adapter");
    let mut model = case.base_model();
    let varmap = adapter.attach_trainable(&mut model).unwrap();
    let chain = model.chain(true);
    let tape = remat::grads::forward(
        &chain,
        &case.model_inputs().to_vec(),
        &[true, false, true],
        &Schedule::store_all(scheduled_stages(&chain)),
        &mut NoPhases,
    )
    .unwrap();
    let grads = tape
        .backward(&case.inputs["grad_sample"], &mut NoPhases)
        .unwrap();
    for (name, var) in latte::optim::sorted_params(&varmap).unwrap() {
        let grad = grads.params.get(var.as_tensor()).expect(&name);
        let largest = common::max_abs(grad);
        assert!(largest > 0.0, "{name}: zero gradient");
    }
    let mut linears = 0;
    for (name, linear) in model.linears_mut() {
        assert!(grads.params.get(linear.weight()).is_none(), "{name}.weight");
        if let Some(bias) = linear.bias() {
            assert!(grads.params.get(bias).is_none(), "{name}.bias");
        }
        linears += 1;
    }
    assert!(linears > adapter.layers().len());
}
