//! Measured peaks (counting allocator: exact and deterministic) of the Latte VJP under
//! checkpoint policies, on an 8-layer model with 16 frames. One test per binary so that
//! no other test allocates while memory is measured.

use candle_core::{DType, Device};
use latte::vjp::vjp;
use latte::weights::fresh_trainable;
use remat::grads::scheduled_stages;
use remat::meter::{format_bytes, CpuMeter, Recorder};
use remat::profile::profile;
use remat::profile::{min_budget, plan_within};
use remat::schedule::Schedule;

remat::install_counting_allocator!();

mod common;

#[test]
fn measured_peaks_respect_policies_budgets_and_predictions() {
    let common::Workload {
        config,
        inputs,
        grad_sample: grad,
    } = common::eight_layer_video(16, 16, 5);
    let (model, varmap) = fresh_trainable(&config, 3, DType::F32, &Device::Cpu).unwrap();
    let chain = model.chain(true);
    let n = scheduled_stages(&chain);
    let measure = |schedule: &Schedule| -> u64 {
        let mut recorder = Recorder::start(CpuMeter);
        let result = vjp(
            &model,
            &varmap,
            &inputs,
            &grad,
            true,
            schedule,
            &mut recorder,
        )
        .unwrap();
        let report = recorder.finish();
        drop(result);
        report.peak_bytes
    };
    let costs = profile(&chain, &inputs.to_vec(), &[true, false, true], &CpuMeter).unwrap();

    let none = measure(&Schedule::store_all(n));
    let every_1 = measure(&Schedule::every(n, 1));
    eprintln!(
        "none {} every:1 {} ({:.1} %)",
        format_bytes(none),
        format_bytes(every_1),
        100.0 * every_1 as f64 / none as f64
    );
    assert!(
        every_1 * 4 <= none,
        "every:1 peak {every_1} > 25 % of none {none}"
    );

    for (label, schedule) in [
        ("none", Schedule::store_all(n)),
        ("every:1", Schedule::every(n, 1)),
    ] {
        let predicted = schedule.simulate(&costs).unwrap().peak_bytes;
        let measured = measure(&schedule);
        let error = (predicted as f64 - measured as f64).abs() / measured as f64;
        eprintln!(
            "{label}: predicted {predicted} measured {measured} ({:.1} %)",
            100.0 * error
        );
        assert!(
            error <= 0.10,
            "{label}: predicted {predicted} vs measured {measured}"
        );
    }

    let lowest = min_budget(&costs);
    let highest = Schedule::store_all(n).simulate(&costs).unwrap().peak_bytes;
    for step in 0..=8 {
        let budget = lowest + (highest - lowest) * step / 8;
        let planned = plan_within(&costs, budget).unwrap();
        let measured = measure(&planned.schedule);
        let predicted = planned.predicted.peak_bytes;
        let error = (predicted as f64 - measured as f64).abs() / measured as f64;
        eprintln!(
            "budget {}: predicted {} measured {} ({:.1} %) time x{:.2}",
            format_bytes(budget),
            format_bytes(predicted),
            format_bytes(measured),
            100.0 * error,
            planned.predicted.time_s / costs.baseline_time_s()
        );
        assert!(
            measured <= budget,
            "budget {budget}: measured peak {measured}"
        );
        assert!(
            error <= 0.10,
            "budget {budget}: predicted {predicted} vs measured {measured}"
        );
    }
}
