//! Guided sampling under a planned budget: the measured peak (counting allocator) stays
//! within 30 % of the `none` peak, and the latents are bitwise those of `none`. One test
//! per binary so that no other test allocates while memory is measured.

use candle_core::{DType, Device, Tensor};
use latte::guide::parse_objective;
use latte::plan::{plan_run, AnalyticCosts, RunMemory, Setting};
use latte::sampling::{guide_workload, initial_noise, sample, Guidance, SampleOptions};
use latte::train::Precision;
use latte::weights::{fresh_trainable, frozen};
use remat::meter::{format_bytes, CpuMeter, Recorder};
use remat::policy::Policy;

remat::install_counting_allocator!();

mod common;

#[test]
fn guided_sampling_fits_a_budget_with_identical_latents() {
    let config = common::eight_layer_video(16, 16, 5).config;
    let (_, varmap) = fresh_trainable(&config, 3, DType::F32, &Device::Cpu).unwrap();
    let model = frozen(&config, &varmap).unwrap();
    let dev = Device::Cpu;
    let noise = initial_noise(1, (1, 4, 16, 8, 8), &dev).unwrap();
    let positive =
        latte::random::randn(&mut latte::random::rng_for(2, "cap"), (1, 5, 16), &dev).unwrap();
    let negative = positive.zeros_like().unwrap();
    let options = SampleOptions {
        steps: 3,
        guidance_scale: 4.0,
        ..SampleOptions::default()
    };
    let objective = parse_objective("smooth", noise.dims(), &dev).unwrap();
    let run = |policy: &Policy| -> (Tensor, u64) {
        let workload = guide_workload(&config, (16, 8, 8), 5, options.guidance_scale, true, &dev);
        let setting = Setting {
            precision: Precision::F32,
            batch: 1,
        };
        let plan = plan_run(
            &workload,
            setting,
            RunMemory::Policy(*policy),
            &AnalyticCosts,
        )
        .unwrap();
        let guidance = Guidance {
            objective: objective.as_ref(),
            scale: 1.0,
            steps: 0..3,
            schedule: &plan.schedule,
        };
        let mut recorder = Recorder::start(CpuMeter);
        let latents = sample(
            &model,
            &noise,
            &negative,
            &positive,
            &options,
            Some(&guidance),
            &mut recorder,
            &mut |_| {},
        )
        .unwrap();
        (latents, recorder.finish().peak_bytes)
    };
    let (none_latents, none_peak) = run(&Policy::None);
    let budget = (none_peak as f64 * 0.3) as u64;
    let (budget_latents, budget_peak) = run(&Policy::Budget(budget));
    eprintln!(
        "guided sampling peak: none {}, budget {} -> {} ({:.1} % of none)",
        format_bytes(none_peak),
        format_bytes(budget),
        format_bytes(budget_peak),
        100.0 * budget_peak as f64 / none_peak as f64
    );
    assert!(
        budget_peak <= budget,
        "peak {budget_peak} over the budget {budget}"
    );
    let same = none_latents
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .zip(
            budget_latents
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        )
        .all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(same, "latents differ between none and the budget plan");
}
