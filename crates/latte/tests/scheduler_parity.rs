//! The samplers against diffusers 0.42.1 (`tools/make_sampler_fixtures.py`): timestep
//! grids exactly, step results within 2e-5 relative to the largest magnitude (ᾱ in f32 as diffusers, arithmetic order
//! differs slightly).

use candle_core::{Device, Tensor};
use latte::scheduler::{
    spaced_timesteps, Ddim, DdimConfig, Ddpm, DdpmConfig, TimestepSpacing, VarianceType,
};
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/schedulers")
}

fn json(name: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(dir().join(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Largest difference relative to the reference's largest magnitude (at least 1).
fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let max = |t: &Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    let diff = max(&(a - b).unwrap()).to_scalar::<f32>().unwrap();
    diff / max(b).to_scalar::<f32>().unwrap().max(1.0)
}

#[test]
fn timestep_grids_match_diffusers() {
    for grid in json("timesteps.json") {
        let spacing: TimestepSpacing = grid["spacing"].as_str().unwrap().parse().unwrap();
        let steps = grid["steps"].as_u64().unwrap() as usize;
        let offset = grid["steps_offset"].as_u64().unwrap() as usize;
        let expected: Vec<usize> = grid["timesteps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let got = spaced_timesteps(spacing, 1000, steps, offset).unwrap();
        assert_eq!(got, expected, "{grid:?}");
    }
}

#[test]
fn steps_match_diffusers() {
    let tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir().join("steps.safetensors"), &Device::Cpu).unwrap();
    let mut worst = 0f32;
    for case in json("steps.json") {
        let k = case["id"].as_u64().unwrap();
        let get =
            |name: &str| tensors[&format!("{}.{k}.{name}", case["kind"].as_str().unwrap())].clone();
        let (out, sample, noise) = (get("model_output"), get("sample"), get("noise"));
        let t = case["t"].as_u64().unwrap() as usize;
        let steps = case["steps"].as_u64().unwrap() as usize;
        let clip_sample = case["clip_sample"].as_bool().unwrap();
        let result = if case["kind"] == "ddim" {
            let mut ddim = Ddim::new(DdimConfig {
                timestep_spacing: case["spacing"].as_str().unwrap().parse().unwrap(),
                steps_offset: case["steps_offset"].as_u64().unwrap() as usize,
                set_alpha_to_one: case["set_alpha_to_one"].as_bool().unwrap(),
                clip_sample,
                ..DdimConfig::default()
            });
            ddim.set_timesteps(steps).unwrap();
            let eta = case["eta"].as_f64().unwrap();
            ddim.step(&out, t, &sample, eta, Some(&noise)).unwrap()
        } else {
            let variance_type = match case["variance_type"].as_str().unwrap() {
                "fixed_small" => VarianceType::FixedSmall,
                "fixed_large" => VarianceType::FixedLarge,
                _ => VarianceType::LearnedRange,
            };
            let mut ddpm = Ddpm::new(DdpmConfig {
                variance_type,
                clip_sample,
                ..DdpmConfig::default()
            });
            ddpm.set_timesteps(steps).unwrap();
            ddpm.step(&out, t, &sample, Some(&noise)).unwrap()
        };
        let d_prev = max_abs_diff(&result.prev_sample, &get("prev_sample"));
        let d_x0 = max_abs_diff(&result.pred_original_sample, &get("pred_original_sample"));
        worst = worst.max(d_prev).max(d_x0);
        assert!(
            d_prev < 2e-5 && d_x0 < 2e-5,
            "{case:?}: prev {d_prev:e}, x0 {d_x0:e}"
        );
    }
    eprintln!("worst step difference {worst:e}");
}
