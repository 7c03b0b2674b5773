//! The analytic cost model (`latte::costs`) against measurements: the peak it predicts
//! (`Schedule::simulate` on the analytic costs) against the peak the counting allocator
//! measures while `remat::grads` runs the schedule, over a grid of workloads (frames,
//! resolution, batch, policy, mode, precision, LoRA); and its per-stage numbers against
//! `remat::profile::profile`. One test in this binary, so that nothing else allocates
//! while memory is measured.

use candle_core::{DType, Device, Tensor};
use latte::config::{latte_architecture, InputGeometry, LatteConfig};
use latte::costs::{analytic_chain_costs, Kernels, LatteCosts, Memory, Mode, Throughput};
use latte::lora::LoraConfig;
use latte::model::{Latte, LatteInputs};
use latte::random::{randn, rng_for};
use remat::grads::{self, scheduled_stages};
use remat::meter::{format_bytes, CpuMeter, NoPhases, Recorder};
use remat::profile::{min_budget, plan_within, profile};
use remat::schedule::Schedule;

mod common;

remat::install_counting_allocator!();

/// How far a whole-step prediction may be from the measurement (the README's claim, for
/// both kernel sets).
const WHOLE_STEP_TOLERANCE: f64 = 0.03;

/// How much a stage's backward transient may be over-predicted.
const STAGE_OVER_PREDICTION: f64 = 0.05;

/// How much a stage's backward transient may be over-predicted with LoRA on the fused
/// kernels (see `check_against_profile`).
const LORA_FUSED_STAGE_OVER_PREDICTION: f64 = 0.30;

/// What the replay does not model and may measure on top: gemm's packing buffers, which
/// every worker thread running a product allocates for the call (the right operand packed
/// `kc × nc`, at most a weight matrix, in f32). Products on several threads pack at once or
/// one after the other as the threads happen to run, so a peak may hold one buffer or one
/// per thread: up to one weight matrix in f32 per worker thread. (On 2 cores the 248 KiB
/// guide workload measured 15 or 32 KiB more in 10 runs of 40, never more with one
/// thread; its largest matrix, 32 × 128, is 16 KiB in f32.)
fn kernel_scratch_bound(config: &LatteConfig) -> u64 {
    let largest_matrix = latte::weights::parameter_specs(config)
        .unwrap()
        .iter()
        .filter(|s| s.shape.len() == 2)
        .map(|s| s.numel() as u64)
        .max()
        .unwrap();
    rayon::current_num_threads() as u64 * 4 * largest_matrix
}

/// A small model: 2 heads of `head_dim`, `layers` spatial and temporal blocks.
fn config(layers: usize, head_dim: usize, video_length: usize) -> LatteConfig {
    LatteConfig {
        video_length,
        ..latte_architecture(2, head_dim, layers, 16, 4, 8)
    }
}

/// How a case chooses its schedule.
#[derive(Debug, Clone, Copy)]
enum Policy {
    None,
    Every(usize),
    Sqrt,
    /// A planned budget at this fraction of the way from the smallest feasible budget to
    /// the `none` peak.
    Budget(f64),
}

struct Case {
    mode: Mode,
    /// Train LoRA adapters ([`lora`]) instead of every weight.
    lora: bool,
    dtype: DType,
    layers: usize,
    batch: usize,
    frames: usize,
    height: usize,
    width: usize,
    policy: Policy,
}

fn inputs(config: &LatteConfig, g: &InputGeometry, dtype: DType) -> (LatteInputs, Tensor) {
    let dev = Device::Cpu;
    let mut rng = rng_for(7, "costs-grid");
    let (c, oc) = (config.in_channels, config.out_channels);
    let inputs = LatteInputs {
        hidden_states: randn(&mut rng, (g.batch, c, g.frames, g.height, g.width), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
        timestep: Tensor::new(
            (0..g.batch as i64)
                .map(|i| 17 + 300 * i)
                .collect::<Vec<_>>(),
            &dev,
        )
        .unwrap(),
        encoder_hidden_states: randn(&mut rng, (g.batch, g.caption_tokens, 16), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
    };
    let grad = randn(&mut rng, (g.batch, oc, g.frames, g.height, g.width), &dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    (inputs, grad)
}

/// The peak live bytes above weights and inputs while one VJP runs under `schedule`.
fn measure(
    model: &Latte,
    inputs: &LatteInputs,
    grad: &Tensor,
    mode: Mode,
    schedule: &Schedule,
) -> u64 {
    let chain = model.chain(true);
    let recorder = Recorder::start(CpuMeter);
    let tape = grads::forward(
        &chain,
        &inputs.to_vec(),
        &mode.wants_input_grad(),
        schedule,
        &mut NoPhases,
    )
    .unwrap();
    let gradients = tape.backward(grad, &mut NoPhases).unwrap();
    let report = recorder.finish();
    drop(gradients);
    report.peak_bytes
}

/// Rank-3 adapters on every kind of linear layer of the blocks.
fn lora() -> LoraConfig {
    common::lora_on_blocks(3, 3.0)
}

fn model_for(config: &LatteConfig, mode: Mode, lora: Option<&LoraConfig>, dtype: DType) -> Latte {
    latte::plan::measured::random_model(config, mode, lora, dtype, &Device::Cpu, 3).unwrap()
}

/// The analytic costs with the kernels this thread runs.
fn analytic(
    config: &LatteConfig,
    g: &InputGeometry,
    dtype: DType,
    mode: Mode,
    lora: Option<&LoraConfig>,
) -> LatteCosts {
    let kernels = Kernels::active(&Device::Cpu);
    let throughput = Throughput::default_for(Memory::Host, dtype);
    let layers = lora.map(|l| l.targets(config).unwrap());
    analytic_chain_costs(
        config,
        g,
        dtype,
        mode,
        kernels,
        &throughput,
        true,
        Memory::Host,
        layers.as_deref(),
    )
    .unwrap()
}

/// Per-stage numbers against `remat::profile` (the measured cost model).
fn check_against_profile(
    label: &str,
    config: &LatteConfig,
    g: &InputGeometry,
    dtype: DType,
    mode: Mode,
    lora: Option<&LoraConfig>,
) {
    let kernels = Kernels::active(&Device::Cpu);
    let model = model_for(config, mode, lora, dtype);
    let (inputs, _) = inputs(config, g, dtype);
    let chain = model.chain(true);
    let measured = profile(
        &chain,
        &inputs.to_vec(),
        &mode.wants_input_grad(),
        &CpuMeter,
    )
    .unwrap();
    let predicted = analytic(config, g, dtype, mode, lora).chain;
    assert_eq!(measured.stages.len(), predicted.stages.len());
    assert_eq!(measured.output_bytes, predicted.output_bytes);
    for (i, (m, p)) in measured.stages.iter().zip(&predicted.stages).enumerate() {
        let rel = |a: u64, b: u64| (a as f64 - b as f64).abs() / (b.max(1) as f64);
        eprintln!(
            "{label} stage {i}: graph {} / {} ({:.1} %), bwd_tmp {} / {} ({:.1} %), fwd_tmp {} / {}",
            p.graph_bytes,
            m.graph_bytes,
            100.0 * rel(p.graph_bytes, m.graph_bytes),
            p.bwd_tmp_bytes,
            m.bwd_tmp_bytes,
            100.0 * rel(p.bwd_tmp_bytes, m.bwd_tmp_bytes),
            p.fwd_tmp_bytes,
            m.fwd_tmp_bytes,
        );
        assert_eq!(p.input_bytes, m.input_bytes, "{label} stage {i}");
        assert_eq!(p.param_grad_bytes, m.param_grad_bytes, "{label} stage {i}");
        assert!(
            rel(p.graph_bytes, m.graph_bytes) < 0.03,
            "{label} stage {i} graph"
        );
        // At most 5 % over the measurement, and under it by no more than gemm's packing
        // buffers, which the replay does not model (see `kernel_scratch_bound`): these
        // backward passes are small (20–190 KiB), so one packed matrix is a large share.
        let (predicted, measured) = (p.bwd_tmp_bytes, m.bwd_tmp_bytes);
        // The fused kernels' LoRA stages in bf16 over-predict some backward transients
        // (up to 24 % on these small stages; the cause is not isolated yet): the safe side.
        // The whole-step cases below hold to 0.4 %, as with the generic kernels, which
        // match per stage.
        let over_prediction = if lora.is_some() && kernels == Kernels::Fused {
            LORA_FUSED_STAGE_OVER_PREDICTION
        } else {
            STAGE_OVER_PREDICTION
        };
        assert!(
            predicted as f64 <= (1.0 + over_prediction) * measured as f64
                && measured <= predicted + kernel_scratch_bound(config),
            "{label} stage {i} backward: predicted {predicted}, measured {measured}"
        );
    }
}

/// Both kernel sets: the fused CPU kernels, and the device-generic ones run on the CPU.
#[test]
fn predicted_peaks_match_measured_peaks() {
    check_grid();
    let _generic = Kernels::choose(Some(Kernels::Generic));
    check_grid();
}

fn check_grid() {
    let kernels = Kernels::active(&Device::Cpu);
    let f32 = DType::F32;
    let bf16 = DType::BF16;
    let (train, guide) = (Mode::Train, Mode::Guide);
    let case = |mode, dtype, layers, batch, frames, (height, width), policy| Case {
        mode,
        lora: false,
        dtype,
        layers,
        batch,
        frames,
        height,
        width,
        policy,
    };
    let cases = [
        case(train, f32, 2, 2, 4, (8, 8), Policy::None),
        case(train, f32, 2, 2, 4, (8, 8), Policy::Every(1)),
        case(train, f32, 3, 2, 4, (8, 8), Policy::Every(2)),
        case(train, f32, 3, 2, 4, (8, 8), Policy::Budget(0.5)),
        case(guide, f32, 2, 2, 4, (8, 8), Policy::None),
        case(guide, f32, 3, 2, 4, (8, 8), Policy::Every(1)),
        case(guide, f32, 2, 1, 1, (16, 16), Policy::None),
        case(guide, f32, 3, 1, 1, (16, 16), Policy::Budget(0.3)),
        case(train, f32, 2, 3, 8, (8, 16), Policy::Every(2)),
        case(train, f32, 4, 1, 8, (16, 16), Policy::Budget(0.15)),
        case(guide, bf16, 2, 2, 4, (16, 16), Policy::None),
        case(train, bf16, 2, 2, 4, (8, 8), Policy::Every(1)),
        case(guide, f32, 3, 2, 8, (16, 16), Policy::Sqrt),
        case(train, f32, 3, 2, 4, (16, 16), Policy::Budget(0.0)),
        case(guide, f32, 2, 4, 4, (8, 8), Policy::Every(2)),
        case(train, bf16, 3, 1, 8, (16, 16), Policy::Budget(0.6)),
        Case {
            lora: true,
            ..case(train, f32, 2, 2, 4, (8, 8), Policy::None)
        },
        Case {
            lora: true,
            ..case(train, bf16, 3, 1, 8, (16, 16), Policy::Budget(0.5))
        },
    ];

    check_against_profile(
        &format!("{kernels} train f32"),
        &config(1, 16, 4),
        &geometry(2, 4, 8, 8),
        f32,
        train,
        None,
    );
    check_against_profile(
        &format!("{kernels} guide bf16"),
        &config(1, 16, 4),
        &geometry(1, 4, 16, 8),
        bf16,
        guide,
        None,
    );
    for dtype in [f32, bf16] {
        check_against_profile(
            &format!("{kernels} train LoRA {dtype:?}"),
            &config(1, 16, 4),
            &geometry(2, 4, 8, 8),
            dtype,
            train,
            Some(&lora()),
        );
    }

    let mut worst: f64 = 0.0;
    eprintln!(
        "mode  dtype layers batch frames   size  policy          predicted    measured  error"
    );
    for c in &cases {
        let cfg = config(c.layers, 16, c.frames.max(2));
        let g = geometry(c.batch, c.frames, c.height, c.width);
        let adapters = c.lora.then(lora);
        let model = model_for(&cfg, c.mode, adapters.as_ref(), c.dtype);
        let (inputs, grad) = inputs(&cfg, &g, c.dtype);
        let costs = analytic(&cfg, &g, c.dtype, c.mode, adapters.as_ref()).chain;
        let n = scheduled_stages(&model.chain(true));
        assert_eq!(n, costs.num_stages());
        let blocks = costs.block_starts();
        let (label, schedule, predicted) = match c.policy {
            Policy::None => ("none".to_string(), Schedule::store_all(n), None),
            Policy::Every(k) => (
                format!("every:{k}"),
                Schedule::every_block(n, &blocks, k),
                None,
            ),
            Policy::Sqrt => ("sqrt".to_string(), Schedule::sqrt_blocks(n, &blocks), None),
            Policy::Budget(fraction) => {
                let low = min_budget(&costs);
                let high = Schedule::store_all(n).simulate(&costs).unwrap().peak_bytes;
                let budget = low + ((high.saturating_sub(low)) as f64 * fraction) as u64;
                let plan = plan_within(&costs, budget).unwrap();
                (
                    format!("budget:{}", format_bytes(budget)),
                    plan.schedule,
                    Some(plan.predicted.peak_bytes),
                )
            }
        };
        let predicted = predicted.unwrap_or_else(|| schedule.simulate(&costs).unwrap().peak_bytes);
        // A first run absorbs one-off allocations (thread pools, kernel buffers).
        measure(&model, &inputs, &grad, c.mode, &schedule);
        let measured = measure(&model, &inputs, &grad, c.mode, &schedule);
        let error = (predicted as f64 - measured as f64) / measured as f64;
        worst = worst.max(error.abs());
        eprintln!(
            "{:<5} {:<5} {:>6} {:>5} {:>6} {:>6}  {:<14} {:>10} {:>10} {:>+6.1} %",
            if c.lora {
                "lora".to_string()
            } else {
                c.mode.to_string()
            },
            format!("{:?}", c.dtype),
            c.layers,
            c.batch,
            c.frames,
            format!("{}x{}", c.height, c.width),
            label,
            format_bytes(predicted),
            format_bytes(measured),
            100.0 * error
        );
        let over_by_kernel_scratch =
            measured > predicted && measured - predicted <= kernel_scratch_bound(&cfg);
        assert!(
            error.abs() <= WHOLE_STEP_TOLERANCE || over_by_kernel_scratch,
            "{label}: predicted {predicted} vs measured {measured}"
        );
    }
    eprintln!(
        "{kernels} kernels: largest error {:.1} % over {} workloads",
        100.0 * worst,
        cases.len()
    );
}

fn geometry(batch: usize, frames: usize, height: usize, width: usize) -> InputGeometry {
    InputGeometry {
        batch,
        frames,
        height,
        width,
        caption_tokens: 5,
    }
}
