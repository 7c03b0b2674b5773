//! One memory account: for a matrix of workloads — presets tiny and small, f32 / bf16 /
//! f16, batches 1–4, gradient accumulation 1–2, training, guidance and guidance with
//! classifier-free guidance, several frame and size geometries, budgets from the least
//! feasible to above the store-everything peak — the run takes the row that
//! `latte::plan::search` (what `latte plan` prints) chooses, and the measured peak of the
//! whole step stays within the budget and within 10 % of the predicted total.
//!
//! "The whole step" is everything the run allocates: for training, the bytes live above
//! what was live before the `Trainer` was made (weights, optimizer state, EMA, the data
//! set, the plan) plus the step's high-water mark; for guidance, everything above what was
//! live before the model was made. Alone in its binary: the counting allocator sees every
//! thread.

use candle_core::{DType, Device, Tensor};
use latte::config::{LatteConfig, Preset};
use latte::costs::Kernels;
use latte::data::ClipShape;
use latte::guide::Smooth;
use latte::lora::{LoraConfig, TargetModules};
use latte::plan::{search, BatchChoice, Candidate, Search, Setting, Task, Workload};
use latte::sampling::{guide_workload, initial_noise, sample, Guidance, SampleOptions};
use latte::train::{
    train_workload, DataSource, MemoryPlan, ModelSource, Precision, TrainConfig, Trainer,
};
use remat::meter::{format_bytes, live_bytes, peak_bytes, reset_peak, NoPhases};

mod common;

remat::install_counting_allocator!();

/// The tests measure the whole process: one at a time.
static ALONE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The measured peak may fall below the prediction by at most this share: the account
/// counts the loss's transient on top of the chain's peak, which it never is exactly.
const BELOW_PREDICTION: f64 = 0.10;

/// A workload of the matrix: preset, latent geometry, precision, batch, micro-batches.
#[derive(Debug, Clone, Copy)]
struct Case {
    preset: &'static str,
    frames: usize,
    size: usize,
    precision: Precision,
    batch: usize,
    grad_accum: usize,
    /// LoRA adapters of this rank on these layers, instead of training every weight.
    lora: Option<(usize, &'static [&'static str])>,
}

/// Where in [least feasible, store-everything peak] the budget lies: 0 is the least
/// feasible, 1 the store-everything peak; above 1, more than that.
const BUDGET_POINTS: [f64; 3] = [0.0, 0.5, 1.2];

fn config(case: &Case) -> LatteConfig {
    Preset::by_name(case.preset).unwrap().config
}

fn shape(case: &Case, config: &LatteConfig) -> ClipShape {
    ClipShape {
        channels: config.in_channels,
        frames: case.frames,
        height: case.size,
        width: case.size,
        caption_tokens: 4,
        caption_channels: config.caption_channels,
    }
}

fn train_config(case: &Case, memory: MemoryPlan) -> TrainConfig {
    TrainConfig {
        steps: 1,
        batch_size: case.batch,
        grad_accum: case.grad_accum,
        precision: case.precision,
        memory,
        save_every: 0,
        seed: 5,
        lora: case.lora.map(|(rank, targets)| {
            LoraConfig::new(
                rank,
                rank as f64,
                TargetModules::Names(targets.iter().map(|t| t.to_string()).collect()),
            )
        }),
        ..TrainConfig::default()
    }
}

/// The budgets of the matrix for a workload, from what `search` says is feasible.
fn budgets(workload: &Workload, setting: Setting) -> Vec<u64> {
    let plan = search(
        &Search {
            workload: workload.clone(),
            precisions: vec![setting.precision],
            batch: BatchChoice::Fixed(setting.batch),
            budget_bytes: u64::MAX / 4,
        },
        &latte::plan::AnalyticCosts,
    )
    .unwrap();
    let least = plan.smallest_feasible_bytes;
    let none = plan
        .candidates
        .iter()
        .find(|c| c.policy == "none")
        .unwrap()
        .total_peak_bytes;
    BUDGET_POINTS
        .iter()
        .map(|f| least + ((none as f64 - least as f64) * f).max(0.0) as u64)
        .collect()
}

/// What `latte plan` chooses for a workload, setting and budget.
fn chosen(workload: &Workload, setting: Setting, budget_bytes: u64) -> Candidate {
    let plan = search(
        &Search {
            workload: workload.clone(),
            precisions: vec![setting.precision],
            batch: BatchChoice::Fixed(setting.batch),
            budget_bytes,
        },
        &latte::plan::AnalyticCosts,
    )
    .unwrap();
    plan.chosen()
        .cloned()
        .expect("a feasible budget has a chosen row")
}

fn check(label: &str, budget: u64, planned: &Candidate, measured: u64) {
    let predicted = planned.total_peak_bytes;
    eprintln!(
        "{label}: budget {} policy {} predicted {} measured {} ({:+.1} %)",
        format_bytes(budget),
        planned.policy,
        format_bytes(predicted),
        format_bytes(measured),
        100.0 * (measured as f64 - predicted as f64) / predicted as f64
    );
    assert!(
        measured <= budget,
        "{label}: measured {measured} > budget {budget} ({})",
        planned.policy
    );
    assert!(
        measured as f64 >= (1.0 - BELOW_PREDICTION) * predicted as f64
            && measured <= predicted + predicted / 10,
        "{label}: measured {measured} not within 10 % of the predicted {predicted} ({})",
        planned.policy
    );
}

/// One step of a fresh trainer for `case` (the preset's model from seed 1, the built-in
/// videos) under `memory`: the whole step's bytes — everything the trainer allocated
/// and the step's high-water mark — and what `inspect` reads of the trainer after it.
fn measure_step<R>(
    case: &Case,
    memory: MemoryPlan,
    inspect: impl FnOnce(&Trainer) -> R,
) -> (u64, R) {
    let config = config(case);
    let data = DataSource::Synthetic(shape(case, &config));
    let out = std::env::temp_dir().join(format!("latte-account-{}", std::process::id()));
    let before = live_bytes();
    let mut trainer = Trainer::new(
        ModelSource::Fresh { config, seed: 1 },
        data,
        train_config(case, memory),
        &out,
        &Device::Cpu,
    )
    .unwrap();
    let start = live_bytes();
    let report = trainer.train_step().unwrap();
    let seen = inspect(&trainer);
    drop(trainer);
    std::fs::remove_dir_all(&out).unwrap();
    (start - before + report.step_peak_bytes, seen)
}

fn run_training(case: Case) {
    let config = config(&case);
    let shape = shape(&case, &config);
    let data = DataSource::Synthetic(shape);
    let setting = Setting {
        precision: case.precision,
        batch: case.batch,
    };
    let workload = train_workload(
        &config,
        &train_config(&case, MemoryPlan::Budget(0)),
        &data,
        shape,
        &Device::Cpu,
        1,
    );
    for budget in budgets(&workload, setting) {
        let expected = chosen(&workload, setting, budget);
        let (measured, planned) =
            measure_step(&case, MemoryPlan::Budget(budget), |t| t.plan().clone());
        assert_eq!(
            planned.policy, expected.policy,
            "{case:?}: the run's policy"
        );
        assert_eq!(
            planned.schedule, expected.schedule,
            "{case:?}: the run's schedule"
        );
        check(&format!("{case:?}"), budget, &planned, measured);
    }
}

fn run_guidance(case: Case, cfg: bool) {
    let config = config(&case);
    let device = Device::Cpu;
    let guidance_scale = if cfg { 4.0 } else { 1.0 };
    let workload = guide_workload(
        &config,
        (case.frames, case.size, case.size),
        4,
        guidance_scale,
        true,
        &device,
    );
    assert_eq!(workload.task, Task::Guide { cfg });
    assert_eq!(workload.kernels, Kernels::Fused);
    let setting = Setting {
        precision: Precision::F32,
        batch: 1,
    };
    for budget in budgets(&workload, setting) {
        let planned = latte::plan::plan_run(
            &workload,
            setting,
            latte::plan::RunMemory::Budget(budget),
            &latte::plan::AnalyticCosts,
        )
        .unwrap();
        assert_eq!(planned.policy, chosen(&workload, setting, budget).policy);
        let before = live_bytes();
        let (_, varmap) = latte::weights::fresh_trainable(&config, 1, DType::F32, &device).unwrap();
        let model = latte::weights::frozen(&config, &varmap).unwrap();
        drop(varmap);
        let dims = (1, config.in_channels, case.frames, case.size, case.size);
        let noise = initial_noise(3, dims, &device).unwrap();
        let positive = Tensor::ones((1, 4, config.caption_channels), DType::F32, &device).unwrap();
        let negative = positive.zeros_like().unwrap();
        reset_peak();
        sample(
            &model,
            &noise,
            &negative,
            &positive,
            &SampleOptions {
                steps: 1,
                guidance_scale,
                ..SampleOptions::default()
            },
            Some(&Guidance {
                objective: &Smooth,
                scale: 1.0,
                steps: 0..1,
                schedule: &planned.schedule,
            }),
            &mut NoPhases,
            &mut |_| {},
        )
        .unwrap();
        let measured = peak_bytes() - before;
        check(&format!("{case:?} cfg {cfg}"), budget, &planned, measured);
    }
}

const fn case(
    preset: &'static str,
    frames: usize,
    size: usize,
    precision: Precision,
    batch: usize,
    grad_accum: usize,
) -> Case {
    Case {
        preset,
        frames,
        size,
        precision,
        batch,
        grad_accum,
        lora: None,
    }
}

/// `case` training LoRA adapters of `rank` on `targets`.
const fn lora(case: Case, rank: usize, targets: &'static [&'static str]) -> Case {
    Case {
        lora: Some((rank, targets)),
        ..case
    }
}

/// The attention projections (the default), and every linear layer of the blocks.
const ATTENTION: &[&str] = &latte::lora::DEFAULT_TARGETS;
const BLOCKS: &[&str] = &common::BLOCK_LINEARS;

#[test]
fn training_runs_the_plan_and_keeps_its_prediction() {
    let _alone = ALONE.lock().unwrap_or_else(|e| e.into_inner());
    use Precision::*;
    for c in [
        case("tiny", 8, 16, F32, 4, 1),
        case("tiny", 8, 16, Bf16, 2, 2),
        case("tiny", 1, 16, F16, 3, 1),
        case("tiny", 8, 8, F32, 1, 2),
        case("small", 16, 8, Bf16, 1, 1),
        case("small", 1, 16, F32, 2, 1),
        case("small", 16, 8, F16, 2, 2),
    ] {
        run_training(c);
    }
}

#[test]
fn lora_training_runs_the_plan_and_keeps_its_prediction() {
    let _alone = ALONE.lock().unwrap_or_else(|e| e.into_inner());
    use Precision::*;
    for c in [
        lora(case("tiny", 8, 16, F32, 2, 1), 4, ATTENTION),
        lora(case("tiny", 8, 16, Bf16, 1, 2), 8, BLOCKS),
        lora(case("small", 16, 8, Bf16, 1, 1), 4, ATTENTION),
        lora(case("small", 1, 16, F16, 2, 1), 2, BLOCKS),
    ] {
        run_training(c);
    }
}

/// LoRA holds no state for the base weights: at the same batch and schedule, the whole
/// step is smaller than full fine-tuning's by at least the base's AdamW moments and EMA
/// (12 bytes per weight) and its f32 gradient sums, and the optimiser steps the adapters'
/// factors only.
#[test]
fn lora_holds_no_optimizer_state_for_the_base() {
    let _alone = ALONE.lock().unwrap_or_else(|e| e.into_inner());
    let full = case("small", 16, 8, Precision::Bf16, 1, 1);
    let adapted = lora(full, 4, ATTENTION);
    let config = config(&full);
    let measure = |case: Case| {
        let none = MemoryPlan::Checkpoint(remat::policy::Policy::None);
        measure_step(&case, none, |trainer| {
            let trained = trainer.weights_f32().unwrap();
            trained
                .into_iter()
                .map(|(name, _)| name)
                .collect::<Vec<_>>()
        })
    };
    let (full_bytes, full_trained) = measure(full);
    let (lora_bytes, lora_trained) = measure(adapted);
    let base: u64 = latte::weights::parameter_specs(&config)
        .unwrap()
        .iter()
        .map(|s| s.numel() as u64)
        .sum();
    eprintln!(
        "small bf16 batch 1, policy none: full {} LoRA {} ({} base weights)",
        format_bytes(full_bytes),
        format_bytes(lora_bytes),
        base
    );
    assert!(
        lora_bytes + 16 * base <= full_bytes,
        "LoRA {lora_bytes} is not 16 bytes per base weight below full fine-tuning {full_bytes}"
    );
    assert_eq!(
        full_trained.len(),
        latte::weights::parameter_specs(&config).unwrap().len()
    );
    assert!(!lora_trained.is_empty());
    assert!(lora_trained
        .iter()
        .all(|n| n.ends_with(".lora_A.weight") || n.ends_with(".lora_B.weight")));
}

#[test]
fn guidance_runs_the_plan_and_keeps_its_prediction() {
    let _alone = ALONE.lock().unwrap_or_else(|e| e.into_inner());
    use Precision::*;
    for (c, cfg) in [
        (case("tiny", 8, 16, F32, 1, 1), false),
        (case("tiny", 8, 16, F32, 1, 1), true),
        (case("small", 16, 8, F32, 1, 1), true),
        (case("small", 1, 16, F32, 1, 1), false),
    ] {
        run_guidance(c, cfg);
    }
}
