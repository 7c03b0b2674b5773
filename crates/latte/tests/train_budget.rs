//! Training within `--budget`: at 40 % of the peak of the store-everything run, the same
//! losses and weights come out bitwise (CPU f32), and every step's measured peak — the
//! resident weights, optimizer state and EMA plus what the step allocates — stays within
//! the budget. Alone in its binary: the counting allocator sees every thread.

use candle_core::Device;
use latte::config::{latte_architecture, LatteConfig};
use latte::data::ClipShape;
use latte::train::{DataSource, MemoryPlan, ModelSource, StepReport, TrainConfig, Trainer};
use remat::meter::format_bytes;
use remat::policy::Policy;
use std::ops::ControlFlow;

remat::install_counting_allocator!();

/// Activation-heavy: 8 frames of 16×16 pixels through 4+4 narrow blocks.
fn config() -> LatteConfig {
    LatteConfig {
        video_length: 8,
        ..latte_architecture(2, 8, 4, 8, 3, 16)
    }
}

/// Every weight's bits, by name.
type WeightBits = Vec<(String, Vec<u32>)>;

fn train(memory: MemoryPlan, name: &str) -> (Vec<StepReport>, WeightBits, Trainer) {
    let out = std::env::temp_dir().join(format!("latte-budget-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let mut trainer = Trainer::new(
        ModelSource::Fresh {
            config: config(),
            seed: 2,
        },
        DataSource::Synthetic(ClipShape {
            channels: 3,
            frames: 8,
            height: 16,
            width: 16,
            caption_tokens: 3,
            caption_channels: 8,
        }),
        TrainConfig {
            steps: 4,
            batch_size: 2,
            save_every: 0,
            memory,
            seed: 3,
            ..TrainConfig::default()
        },
        &out,
        &Device::Cpu,
    )
    .unwrap();
    let mut reports = Vec::new();
    trainer
        .run(|r| {
            reports.push(r.clone());
            ControlFlow::Continue(())
        })
        .unwrap();
    let weights = trainer
        .weights_f32()
        .unwrap()
        .into_iter()
        .map(|(n, t)| {
            let bits = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (n, bits.into_iter().map(f32::to_bits).collect())
        })
        .collect();
    std::fs::remove_dir_all(&out).unwrap();
    (reports, weights, trainer)
}

fn total_peak(reports: &[StepReport]) -> u64 {
    reports
        .iter()
        .map(|r| r.resident_bytes + r.step_peak_bytes)
        .max()
        .unwrap()
}

#[test]
fn budget_at_40_percent_trains_identically_within_the_budget() {
    let (none, none_weights, _) = train(MemoryPlan::Checkpoint(Policy::None), "none");
    let none_peak = total_peak(&none);
    let budget = none_peak * 2 / 5;
    let (planned, planned_weights, trainer) = train(MemoryPlan::Budget(budget), "planned");
    let plan = trainer.plan();
    eprintln!(
        "none: peak {}; budget {}: policy {}, predicted {} ({} + chain {}), measured peak {}",
        format_bytes(none_peak),
        format_bytes(budget),
        plan.policy,
        format_bytes(plan.total_peak_bytes),
        latte::plan::describe_parts(&plan.account.parts()),
        format_bytes(plan.chain_peak_bytes),
        format_bytes(total_peak(&planned)),
    );
    for r in &planned {
        let peak = r.resident_bytes + r.step_peak_bytes;
        assert!(
            peak <= budget,
            "step {}: peak {peak} > budget {budget}",
            r.step
        );
    }
    let bits = |r: &[StepReport]| r.iter().map(|r| r.loss.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&none),
        bits(&planned),
        "losses differ under the budget"
    );
    assert!(
        none_weights == planned_weights,
        "weights differ under the budget"
    );
}
