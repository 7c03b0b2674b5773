//! Gradients through the remat executor are exact whatever the checkpoint policy: the
//! output and every gradient are bitwise identical on CPU f32 to the store-everything run,
//! with the fused CPU kernels and with the device-generic ones.

use candle_core::{DType, Device, Tensor};
use latte::vjp::{vjp, Vjp};
use latte::weights::{fresh_trainable, frozen, ModelDir};
use remat::costs::ChainCosts;
use remat::grads::{self, scheduled_stages};
use remat::meter::{CpuMeter, NoPhases};
use remat::planner::{min_feasible_budget, plan};
use remat::profile::profile;
use remat::schedule::Schedule;

mod common;

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

fn policies(n: usize) -> Vec<(String, Schedule)> {
    vec![
        ("every:1".into(), Schedule::every(n, 1)),
        ("every:3".into(), Schedule::every(n, 3)),
        ("sqrt".into(), Schedule::sqrt(n)),
    ]
}

/// The planner's schedules at `intervals + 1` budgets evenly spaced from the smallest
/// feasible to the store-all peak.
fn planned(costs: &ChainCosts, n: usize, intervals: u64) -> Vec<(String, Schedule)> {
    let lowest = min_feasible_budget(costs);
    let highest = Schedule::store_all(n).simulate(costs).unwrap().peak_bytes;
    (0..=intervals)
        .map(|step| {
            let budget = lowest + (highest - lowest) * step / intervals;
            let schedule = plan(costs, budget).unwrap().schedule;
            (format!("budget {budget}: {schedule}"), schedule)
        })
        .collect()
}

#[test]
fn every_policy_gives_bitwise_identical_gradients_on_a_16_stage_chain() {
    common::with_each_kernel_set(|_kernels| {
        let common::Workload {
            config,
            inputs,
            grad_sample: grad,
        } = common::eight_layer_video(8, 12, 7);
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
        for (label, schedule) in planned(&costs, n, 4) {
            assert_identical(&reference, &run(&schedule), &label);
        }
    });
}

/// Guidance: frozen weights, gradients of the latents only (the gated ops' backward reads
/// less), and the latents' gradient stays bitwise that of storing everything.
#[test]
fn every_policy_gives_bitwise_identical_latent_gradients_with_frozen_weights() {
    common::with_each_kernel_set(|_kernels| {
        let common::Workload {
            config,
            inputs,
            grad_sample,
        } = common::eight_layer_video(8, 12, 7);
        let (_, varmap) = fresh_trainable(&config, 11, DType::F32, &Device::Cpu).unwrap();
        let model = frozen(&config, &varmap).unwrap();
        let chain = model.chain(true);
        let wanted = [true, false, false];
        let run = |schedule: &Schedule| -> Vec<u32> {
            let tape =
                grads::forward(&chain, &inputs.to_vec(), &wanted, schedule, &mut NoPhases).unwrap();
            let grads = tape.backward(&grad_sample, &mut NoPhases).unwrap();
            bits(grads.inputs[0].as_ref().unwrap())
        };
        let n = scheduled_stages(&chain);
        let reference = run(&Schedule::store_all(n));
        let costs = profile(&chain, &inputs.to_vec(), &wanted, &CpuMeter).unwrap();
        for (label, schedule) in policies(n).into_iter().chain(planned(&costs, n, 2)) {
            assert!(reference == run(&schedule), "{label}: grad.hidden_states");
        }
    });
}

#[test]
fn every_policy_gives_bitwise_identical_gradients_on_the_fixtures() {
    common::with_each_kernel_set(|_kernels| {
        for case in ["video", "batch"] {
            let dir = ModelDir::open(&common::fixture(case).join("model")).unwrap();
            let ins = common::load(common::fixture(case).join("inputs.safetensors"));
            let inputs = common::fixture_inputs(&ins, DType::F32);
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
    });
}

/// What a [`grads::GradSink`] was handed: one store per backward op.
#[derive(Default)]
struct Parts(Vec<candle_core::backprop::GradStore>);

impl grads::GradSink for Parts {
    fn take(&mut self, store: candle_core::backprop::GradStore) -> candle_core::Result<()> {
        self.0.push(store);
        Ok(())
    }
}

/// ZeRO 2 reduces each stage's parameter gradients as its backward op ends: the sink gets
/// one store per scheduled stage and one for the head, and its parts, added in the order
/// they came, are bitwise the gradients `backward` returns (a block's modulation table,
/// read by each of its stages, arrives once per stage).
#[test]
fn a_gradient_sink_gets_each_stage_s_parameter_gradients_once() {
    let common::Workload {
        config,
        inputs,
        grad_sample,
    } = common::eight_layer_video(8, 12, 7);
    let (model, varmap) = fresh_trainable(&config, 11, DType::F32, &Device::Cpu).unwrap();
    let chain = model.chain(true);
    let n = scheduled_stages(&chain);
    let wanted = [true, false, true];
    let schedule = Schedule::sqrt(n);
    let run = || grads::forward(&chain, &inputs.to_vec(), &wanted, &schedule, &mut NoPhases);
    let whole = run()
        .unwrap()
        .backward(&grad_sample, &mut NoPhases)
        .unwrap();
    let mut parts = Parts::default();
    let input_grads = run()
        .unwrap()
        .backward_into(&grad_sample, &mut NoPhases, &mut parts)
        .unwrap();
    assert_eq!(parts.0.len(), n + 1, "one store per stage and the head's");
    assert_eq!(
        bits(input_grads[0].as_ref().unwrap()),
        bits(whole.inputs[0].as_ref().unwrap())
    );
    let params = latte::optim::sorted_params(&varmap).unwrap();
    let mut shared = 0;
    for (name, var) in &params {
        let mut holders = parts.0.iter().filter_map(|s| s.get(var));
        let first = holders
            .next()
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let mut sum = first.clone();
        for part in holders {
            sum = (sum + part).unwrap();
            shared += 1;
        }
        assert_eq!(
            bits(&sum),
            bits(whole.params.get(var).unwrap()),
            "grad.{name}"
        );
    }
    assert!(shared > 0, "no parameter is read by several stages");
    let handed: usize = parts.0.iter().map(|s| s.get_ids().count()).sum();
    assert_eq!(
        handed,
        params.len() + shared,
        "the sink got only parameter gradients"
    );
}
