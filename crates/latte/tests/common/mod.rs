//! Helpers shared by the integration tests: the golden fixtures and a synthetic workload.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use latte::config::{latte_architecture, LatteConfig};
use latte::model::LatteInputs;
use latte::random::{randn, rng_for};
use std::collections::HashMap;
use std::path::PathBuf;

/// The directory of one golden fixture case (made by `tools/make_fixtures.py`).
pub fn fixture(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(case)
}

/// All tensors of a safetensors file.
pub fn load(path: PathBuf) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// max |actual − expected| / max |expected| (or the absolute error where the reference is
/// below 1 in magnitude): the measure of the parity tolerances.
pub fn relative_error(actual: &Tensor, expected: &Tensor) -> f64 {
    assert_eq!(actual.dims(), expected.dims());
    let a = actual.to_dtype(DType::F64).unwrap();
    let e = expected.to_dtype(DType::F64).unwrap();
    let err = (a - &e).unwrap().abs().unwrap().max_all().unwrap();
    let scale = e.abs().unwrap().max_all().unwrap();
    err.to_scalar::<f64>().unwrap() / scale.to_scalar::<f64>().unwrap().max(1.0)
}

/// The largest magnitude in `t` (f32).
pub fn max_abs(t: &Tensor) -> f32 {
    let t = t.to_dtype(DType::F32).unwrap();
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The model inputs of a fixture's `inputs.safetensors`, floats converted to `dtype`.
pub fn fixture_inputs(tensors: &HashMap<String, Tensor>, dtype: DType) -> LatteInputs {
    LatteInputs {
        hidden_states: tensors["hidden_states"].to_dtype(dtype).unwrap(),
        timestep: tensors["timestep"].clone(),
        encoder_hidden_states: tensors["encoder_hidden_states"].to_dtype(dtype).unwrap(),
    }
}

/// A model configuration, its inputs and an upstream gradient for the output.
pub struct Workload {
    pub config: LatteConfig,
    pub inputs: LatteInputs,
    pub grad_sample: Tensor,
}

/// An 8-layer model (16 block stages and the tail) on 2 videos of 16 frames of 8×8
/// latents: long enough for multi-level schedules, small enough for debug builds.
pub fn eight_layer_video(head_dim: usize, caption_channels: usize, seed: u64) -> Workload {
    let config = latte_architecture(2, head_dim, 8, caption_channels, 4, 8);
    let mut rng = rng_for(seed, "eight-layer-video");
    let dev = Device::Cpu;
    let inputs = LatteInputs {
        hidden_states: randn(&mut rng, (2, 4, 16, 8, 8), &dev).unwrap(),
        timestep: Tensor::new(&[3i64, 871], &dev).unwrap(),
        encoder_hidden_states: randn(&mut rng, (2, 5, caption_channels), &dev).unwrap(),
    };
    let grad_sample = randn(&mut rng, (2, 8, 16, 8, 8), &dev).unwrap();
    Workload {
        config,
        inputs,
        grad_sample,
    }
}

/// Runs `check` once with each kernel set chosen on this thread: the fused CPU kernels and
/// the device-generic ones (what CUDA runs), so that both match the same references.
pub fn with_each_kernel_set(mut check: impl FnMut(latte::costs::Kernels)) {
    use latte::costs::Kernels;
    for kernels in [Kernels::Fused, Kernels::Generic] {
        let _choice = Kernels::choose(Some(kernels));
        check(kernels);
    }
}

/// Every linear layer of the transformer blocks (PEFT's `target_modules` names).
pub const BLOCK_LINEARS: [&str; 6] = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
];

/// LoRA of `rank` and `alpha` on [`BLOCK_LINEARS`].
pub fn lora_on_blocks(rank: usize, alpha: f64) -> latte::lora::LoraConfig {
    latte::lora::LoraConfig::new(
        rank,
        alpha,
        latte::lora::TargetModules::Names(BLOCK_LINEARS.iter().map(|t| t.to_string()).collect()),
    )
}
