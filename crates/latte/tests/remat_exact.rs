//! Gradients through the remat executor are exact whatever the checkpoint policy: the
//! output and every gradient are bitwise identical on CPU f32 to the store-everything run.

use candle_core::{DType, Device, Tensor};
use latte::config::LatteConfig;
use latte::model::LatteInputs;
use latte::random::{randn, rng_for};
use latte::vjp::{vjp, Vjp};
use latte::weights::{fresh_trainable, ModelDir};
use remat::grads::scheduled_stages;
use remat::meter::{CpuMeter, NoPhases};
use remat::planner::{min_feasible_budget, plan};
use remat::profile::profile;
use remat::schedule::Schedule;
use std::path::PathBuf;

// Profiling for the planned schedules measures sizes with the counting allocator.
remat::install_counting_allocator!();

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

fn assert_identical(reference: &Vjp, other: &Vjp, label: &str) {
    assert_eq!(
        bits(&reference.sample),
        bits(&other.sample),
        "{label}: sample"
    );
    assert_eq!(
        bits(&reference.hidden_states),
        bits(&other.hidden_states),
        "{label}: grad.hidden_states"
    );
    assert_eq!(
        bits(&reference.encoder_hidden_states),
        bits(&other.encoder_hidden_states),
        "{label}: grad.encoder_hidden_states"
    );
    assert_eq!(reference.params.len(), other.params.len());
    for ((name, a), (_, b)) in reference.params.iter().zip(&other.params) {
        assert_eq!(bits(a), bits(b), "{label}: grad.{name}");
    }
}

/// An 8-layer model (16 stages) on 16 frames: long enough for multi-level schedules.
fn larger_chain() -> (LatteConfig, LatteInputs, Tensor) {
    let config = LatteConfig {
        num_heads: 2,
        head_dim: 8,
        in_channels: 4,
        out_channels: 8,
        num_layers: 8,
        attention_bias: true,
        sample_size: 8,
        patch_size: 2,
        num_embeds_ada_norm: 1000,
        norm_eps: 1e-6,
        caption_channels: 12,
        video_length: 16,
    };
    let mut rng = rng_for(7, "remat-exact");
    let dev = Device::Cpu;
    let inputs = LatteInputs {
        hidden_states: randn(&mut rng, (2, 4, 16, 8, 8), &dev).unwrap(),
        timestep: Tensor::new(&[3i64, 871], &dev).unwrap(),
        encoder_hidden_states: randn(&mut rng, (2, 5, 12), &dev).unwrap(),
    };
    let grad = randn(&mut rng, (2, 8, 16, 8, 8), &dev).unwrap();
    (config, inputs, grad)
}

fn policies(n: usize) -> Vec<(String, Schedule)> {
    vec![
        ("every:1".into(), Schedule::every(n, 1)),
        ("every:3".into(), Schedule::every(n, 3)),
        ("sqrt".into(), Schedule::sqrt(n)),
    ]
}

#[test]
fn every_policy_gives_bitwise_identical_gradients_on_a_16_stage_chain() {
    let (config, inputs, grad) = larger_chain();
    let (model, varmap) = fresh_trainable(&config, 11, DType::F32, &Device::Cpu).unwrap();
    let n = scheduled_stages(&model.chain(true));
    let run = |schedule: &Schedule| {
        vjp(
            &model,
            &varmap,
            &inputs,
            &grad,
            true,
            schedule,
            &mut NoPhases,
        )
        .unwrap()
    };
    let reference = run(&Schedule::store_all(n));
    for (label, schedule) in policies(n) {
        assert_identical(&reference, &run(&schedule), &label);
    }
    // Planned schedules at budgets from the smallest feasible to the store-all peak.
    let costs = profile(
        &model.chain(true),
        &inputs.to_vec(),
        &[true, false, true],
        &CpuMeter,
    )
    .unwrap();
    let lowest = min_feasible_budget(&costs);
    let highest = Schedule::store_all(n).simulate(&costs).unwrap().peak_bytes;
    for step in 0..=4 {
        let budget = lowest + (highest - lowest) * step / 4;
        let planned = plan(&costs, budget).unwrap();
        let label = format!("budget {budget}: {}", planned.schedule);
        assert_identical(&reference, &run(&planned.schedule), &label);
    }
}

#[test]
fn every_policy_gives_bitwise_identical_gradients_on_the_fixtures() {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    for case in ["video", "batch"] {
        let dir = ModelDir::open(&fixtures.join(case).join("model")).unwrap();
        let ins = candle_core::safetensors::load(
            fixtures.join(case).join("inputs.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let inputs = LatteInputs {
            hidden_states: ins["hidden_states"].clone(),
            timestep: ins["timestep"].clone(),
            encoder_hidden_states: ins["encoder_hidden_states"].clone(),
        };
        let (model, varmap) = dir.load_trainable(DType::F32, &Device::Cpu).unwrap();
        let n = scheduled_stages(&model.chain(true));
        let run = |schedule: &Schedule| {
            vjp(
                &model,
                &varmap,
                &inputs,
                &ins["grad_sample"],
                true,
                schedule,
                &mut NoPhases,
            )
            .unwrap()
        };
        let reference = run(&Schedule::store_all(n));
        for (label, schedule) in policies(n) {
            assert_identical(&reference, &run(&schedule), &format!("{case} {label}"));
        }
    }
}
