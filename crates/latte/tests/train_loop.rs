//! The training loop on the built-in synthetic videos: the loss falls, and a resumed run
//! continues bitwise as if it had never stopped (CPU f32).

use candle_core::Device;
use latte::config::{latte_architecture, LatteConfig};
use latte::data::ClipShape;
use latte::train::{
    DataSource, ModelSource, Precision, RunOutcome, StepReport, TrainConfig, Trainer, METRICS_FILE,
};
use std::ops::ControlFlow;
use std::path::PathBuf;

mod common;

/// A two-layer pixel-space model with learned variance: fast enough for debug builds.
fn small_config() -> LatteConfig {
    LatteConfig {
        video_length: 4,
        ..latte_architecture(2, 8, 2, 8, 3, 8)
    }
}

fn synthetic() -> DataSource {
    DataSource::Synthetic(ClipShape {
        channels: 3,
        frames: 4,
        height: 8,
        width: 8,
        caption_tokens: 3,
        caption_channels: 8,
    })
}

fn out_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("latte-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn train_config(steps: u64) -> TrainConfig {
    TrainConfig {
        steps,
        batch_size: 4,
        save_every: 0,
        seed: 7,
        ..TrainConfig::default()
    }
}

fn fresh(config: TrainConfig, out: &std::path::Path) -> Trainer {
    Trainer::new(
        ModelSource::Fresh {
            config: small_config(),
            seed: 1,
        },
        synthetic(),
        config,
        out,
        &Device::Cpu,
    )
    .unwrap()
}

fn run(trainer: &mut Trainer) -> Vec<StepReport> {
    let mut reports = Vec::new();
    let outcome = trainer
        .run(|r| {
            reports.push(r.clone());
            ControlFlow::Continue(())
        })
        .unwrap();
    assert!(matches!(outcome, RunOutcome::Finished { .. }));
    reports
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = values.collect();
    v.iter().sum::<f64>() / v.len() as f64
}

/// 100 steps at lr 3e-3: the loss (ε-MSE + variational term) falls to about a third.
#[test]
fn loss_falls_on_builtin_videos() {
    let out = out_dir("falls");
    let steps = 100;
    let mut config = train_config(steps);
    config.optimizer.lr = 3e-3;
    config.warmup_steps = 10;
    let mut trainer = fresh(config, &out);
    let reports = run(&mut trainer);
    let fifth = (steps / 5) as usize;
    let first = mean(reports[..fifth].iter().map(|r| r.loss));
    let last = mean(reports[reports.len() - fifth..].iter().map(|r| r.loss));
    let first_mse = mean(reports[..fifth].iter().map(|r| r.mse));
    let last_mse = mean(reports[reports.len() - fifth..].iter().map(|r| r.mse));
    let step_s = mean(reports.iter().map(|r| r.step_s));
    eprintln!(
        "loss {first:.4} -> {last:.4} ({:.0} %), eps-MSE {first_mse:.4} -> {last_mse:.4}, \
         {step_s:.3} s/step",
        100.0 * last / first
    );
    assert!(
        last <= 0.5 * first,
        "mean loss of the last 20 % {last} > half the first 20 % {first}"
    );
    // metrics.jsonl has one line per step.
    let metrics = std::fs::read_to_string(out.join(METRICS_FILE)).unwrap();
    assert_eq!(metrics.lines().count(), steps as usize);
    let line: StepReport = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    assert_eq!(line, reports[reports.len() - 1]);
    // The final checkpoint is a diffusers model directory.
    let checkpoint = out.join(format!("checkpoint-{steps}"));
    latte::weights::ModelDir::open(&checkpoint.join("transformer")).unwrap();
    latte::weights::ModelDir::open(&checkpoint.join("ema")).unwrap();
    // Beside both sits the DDIM scheduler that samples them: the training noise schedule
    // (ᾱ_t in f32 as diffusers computes it against the trainer's f64: a cumulative product
    // of 1000 f32 factors, so 1e-4 relative), x̂₀ unclipped.
    let scheduler = latte::pipeline::scheduler_beside(&checkpoint.join("ema"))
        .unwrap()
        .expect("checkpoint has scheduler/scheduler_config.json");
    assert_eq!(scheduler, latte::train::sampling_scheduler());
    assert!(!scheduler.clip_sample);
    let trained = latte::diffusion::NoiseSchedule::latte();
    let alphas_cumprod = scheduler.betas.alphas_cumprod();
    assert_eq!(alphas_cumprod.len(), trained.num_timesteps());
    for (t, &a) in alphas_cumprod.iter().enumerate() {
        let expected = trained.alpha_cumprod(t);
        assert!(
            (a as f64 - expected).abs() <= 1e-4 * expected,
            "t = {t}: DDIM's alpha_cumprod {a} against training's {expected}"
        );
    }
    std::fs::remove_dir_all(&out).unwrap();
}

fn weight_bits(trainer: &Trainer) -> Vec<(String, Vec<u32>)> {
    let to_bits = |t: &candle_core::Tensor| -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f32::to_bits)
            .collect()
    };
    let mut all: Vec<(String, Vec<u32>)> = trainer
        .weights_f32()
        .unwrap()
        .iter()
        .map(|(n, t)| (n.clone(), to_bits(t)))
        .collect();
    all.extend(
        trainer
            .ema_weights()
            .unwrap()
            .iter()
            .map(|(n, t)| (format!("ema.{n}"), to_bits(t))),
    );
    all
}

#[test]
fn resumed_run_is_bitwise_identical() {
    let n = 4;
    // Gradient accumulation, warm-up, clipping, caption dropout and weight decay all on.
    let config = TrainConfig {
        grad_accum: 2,
        warmup_steps: 3,
        caption_dropout: 0.5,
        optimizer: latte::optim::AdamWConfig {
            weight_decay: 0.01,
            ..TrainConfig::default().optimizer
        },
        ..train_config(2 * n)
    };
    let whole_dir = out_dir("whole");
    let mut whole = fresh(config.clone(), &whole_dir);
    let whole_reports = run(&mut whole);

    let split_dir = out_dir("split");
    let mut first = fresh(
        TrainConfig {
            steps: n,
            ..config.clone()
        },
        &split_dir,
    );
    let mut split_reports = run(&mut first);
    drop(first);
    let mut second = Trainer::resume(&split_dir, &split_dir, &Device::Cpu, |c, _| {
        c.steps = 2 * n;
    })
    .unwrap();
    assert_eq!(second.step(), n);
    split_reports.extend(run(&mut second));

    let losses = |r: &[StepReport]| r.iter().map(|r| r.loss.to_bits()).collect::<Vec<_>>();
    assert_eq!(losses(&whole_reports), losses(&split_reports), "losses");
    let (a, b) = (weight_bits(&whole), weight_bits(&second));
    assert_eq!(a.len(), b.len());
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert!(x == y, "{name} differs after resume");
    }
    // The resumed run's metrics continue the first run's.
    let metrics = std::fs::read_to_string(split_dir.join(METRICS_FILE)).unwrap();
    assert_eq!(metrics.lines().count(), 2 * n as usize);
    std::fs::remove_dir_all(&whole_dir).unwrap();
    std::fs::remove_dir_all(&split_dir).unwrap();
}

/// A run of `config` (4 steps) whole, and the same run stopped after 2 steps and resumed
/// from its checkpoint; the losses and the trained weights (and their EMA) must be
/// bitwise equal. Returns the resumed trainer, all the step reports and the resumed run's
/// directory (for the caller to inspect and remove).
fn resumed_equals_whole(config: &TrainConfig, label: &str) -> (Trainer, Vec<StepReport>, PathBuf) {
    let whole_dir = out_dir(&format!("whole-{label}"));
    let mut whole = fresh(config.clone(), &whole_dir);
    let whole_reports = run(&mut whole);
    let split_dir = out_dir(&format!("split-{label}"));
    let mut first = fresh(
        TrainConfig {
            steps: 2,
            ..config.clone()
        },
        &split_dir,
    );
    let mut reports = run(&mut first);
    drop(first);
    let mut second =
        Trainer::resume(&split_dir, &split_dir, &Device::Cpu, |c, _| c.steps = 4).unwrap();
    reports.extend(run(&mut second));
    let losses = |r: &[StepReport]| r.iter().map(|r| r.loss.to_bits()).collect::<Vec<_>>();
    assert_eq!(losses(&whole_reports), losses(&reports), "{label}");
    assert!(
        weight_bits(&whole) == weight_bits(&second),
        "{label}: weights differ after resume"
    );
    std::fs::remove_dir_all(&whole_dir).unwrap();
    (second, reports, split_dir)
}

/// Low precision: the f32 master weights, the loss scale (f16) and the moments are
/// restored exactly, so bf16 and f16 runs also resume bitwise.
#[test]
fn low_precision_runs_resume_bitwise() {
    for precision in [Precision::Bf16, Precision::F16] {
        let config = TrainConfig {
            precision,
            ..train_config(4)
        };
        let (_, reports, dir) = resumed_equals_whole(&config, &format!("{precision:?}"));
        std::fs::remove_dir_all(&dir).unwrap();
        let expected_scale = if precision == Precision::F16 {
            65536.0
        } else {
            1.0
        };
        assert!(reports
            .iter()
            .all(|r| r.loss_scale == expected_scale && !r.skipped));
    }
}

/// A LoRA run (adapters on every linear layer of the blocks, the base frozen) resumes
/// bitwise too, in f32 and bf16: its checkpoint holds the adapter, its EMA and AdamW's
/// moments, and names the base model it was trained on.
#[test]
fn lora_runs_resume_bitwise() {
    for precision in [Precision::F32, Precision::Bf16] {
        let config = TrainConfig {
            precision,
            grad_accum: 2,
            lora: Some(common::lora_on_blocks(2, 4.0)),
            ..train_config(4)
        };
        let (second, _, dir) = resumed_equals_whole(&config, &format!("lora-{precision:?}"));
        let checkpoint = second.last_checkpoint().unwrap();
        assert!(checkpoint
            .join("adapter/adapter_model.safetensors")
            .is_file());
        assert!(checkpoint.join("ema/adapter_config.json").is_file());
        assert!(!checkpoint.join("transformer").exists());
        // Only the factors are trained (and averaged): A and B of 16 layers per model layer
        // (spatial: two attentions and the MLP; temporal: one attention and the MLP), and
        // they moved from B = 0.
        let bits = weight_bits(&second);
        assert_eq!(bits.len(), 2 * 2 * 16 * small_config().num_layers);
        let adapter = second.adapter().unwrap().unwrap();
        let up = &adapter.named_factors()[1].1;
        let largest = common::max_abs(up);
        assert!(largest > 0.0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// One rank's run: its step reports, its final weights and the optimizer state it held.
struct RankRun {
    reports: Vec<StepReport>,
    weights: Vec<(String, candle_core::Tensor)>,
    optimizer_state_bytes: u64,
}

/// `config` on `ranks` ranks (threads of one process), writing to `dir`.
fn run_ranks(config: &TrainConfig, ranks: usize, dir: &std::path::Path) -> Vec<RankRun> {
    run_ranks_with(ranks, |collective| {
        let model = ModelSource::Fresh {
            config: small_config(),
            seed: 1,
        };
        Trainer::new_distributed(
            model,
            synthetic(),
            config.clone(),
            dir,
            &Device::Cpu,
            collective,
        )
        .unwrap()
    })
}

/// Runs the trainer `start` makes for each of `ranks` ranks (threads of one process).
fn run_ranks_with(
    ranks: usize,
    start: impl Fn(std::sync::Arc<dyn latte::dist::Collective>) -> Trainer + Sync,
) -> Vec<RankRun> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = latte::dist::ThreadGroup::new(ranks)
            .into_iter()
            .map(|member| {
                let start = &start;
                scope.spawn(move || {
                    let mut trainer = start(std::sync::Arc::new(member));
                    let reports = run(&mut trainer);
                    RankRun {
                        reports,
                        weights: trainer.weights_f32().unwrap(),
                        optimizer_state_bytes: trainer.optimizer_state_bytes(),
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The weights of a run, bitwise.
fn bits(weights: &[(String, candle_core::Tensor)]) -> Vec<Vec<u32>> {
    weights
        .iter()
        .map(|(_, t)| {
            let values = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            values.into_iter().map(f32::to_bits).collect()
        })
        .collect()
}

/// Data parallelism: two ranks (threads of one process) with batch 1 take the steps of one
/// process with batch 2 — the same losses and weights within 1e-6 (the gradients are summed
/// over the ranks instead of over the batch's rows, a different rounding) — and the ranks'
/// weights are bitwise identical after every step. AdamW's ε is 1e-3 here, so that the
/// update is a smooth function of the gradient: with 1e-8, an element whose gradient
/// cancels to rounding noise moves by ±lr whichever sign the noise has, in any two
/// summation orders.
#[test]
fn two_ranks_of_batch_one_equal_one_process_of_batch_two() {
    let config = |batch| TrainConfig {
        batch_size: batch,
        warmup_steps: 0,
        optimizer: latte::optim::AdamWConfig {
            lr: 1e-3,
            eps: 1e-3,
            ..TrainConfig::default().optimizer
        },
        ..train_config(3)
    };
    let single_dir = out_dir("dp-single");
    let mut single = fresh(config(2), &single_dir);
    let single_reports = run(&mut single);
    let single_weights = single.weights_f32().unwrap();

    let dp_dir = out_dir("dp-ranks");
    let results = run_ranks(&config(1), 2, &dp_dir);
    let relative = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-12);
    for (single, rank0) in single_reports.iter().zip(&results[0].reports) {
        assert!(
            relative(rank0.loss, single.loss) < 1e-6,
            "{} vs {}",
            rank0.loss,
            single.loss
        );
        assert_eq!(rank0.samples_seen, single.samples_seen);
    }
    assert_eq!(
        bits(&results[0].weights),
        bits(&results[1].weights),
        "ranks differ"
    );
    // Relative to the model's largest weight: some tensors' gradients are rounding noise
    // around zero (a key bias shifts every logit of a query alike, which the softmax
    // ignores), so their own scale is noise too.
    let (mut diff, mut scale) = (0f32, 0f32);
    for ((_, dp), (_, one)) in results[0].weights.iter().zip(&single_weights) {
        diff = diff.max(common::max_abs(&(dp - one).unwrap()));
        scale = scale.max(common::max_abs(one));
    }
    assert!(diff / scale < 1e-6, "weights: {:e}", diff / scale);
    // Rank 0 alone wrote the run's files.
    let metrics = std::fs::read_to_string(dp_dir.join(METRICS_FILE)).unwrap();
    assert_eq!(metrics.lines().count(), 3);
    assert!(dp_dir.join("checkpoint-3").is_dir());
    std::fs::remove_dir_all(&single_dir).unwrap();
    std::fs::remove_dir_all(&dp_dir).unwrap();
}

/// The largest difference between two runs' weights, relative to the largest weight.
fn weight_error(a: &[(String, candle_core::Tensor)], b: &[(String, candle_core::Tensor)]) -> f32 {
    let (mut diff, mut scale) = (0f32, 0f32);
    for ((name_a, x), (name_b, y)) in a.iter().zip(b) {
        assert_eq!(name_a, name_b);
        diff = diff.max(common::max_abs(&(x - y).unwrap()));
        scale = scale.max(common::max_abs(y));
    }
    diff / scale
}

/// ZeRO 1 and 2: each of two ranks holds half the optimizer state (±5 %), in f32 and with
/// bf16's master weights, the ranks' weights are bitwise identical, and the run equals
/// ZeRO 0's within 1e-6 (each rank updates its piece of every parameter with the same
/// arithmetic; the gradient norm adds the ranks' pieces in f64, and ZeRO 2 sums each
/// micro-batch over the ranks before adding the micro-batches); its checkpoint resumes
/// exactly. Two micro-batches per step, so that ZeRO 2 accumulates its reduced pieces.
#[test]
fn zero_shards_the_optimizer_state_and_gradients_and_changes_nothing_else() {
    for precision in [Precision::F32, Precision::Bf16] {
        let config = |zero| TrainConfig {
            batch_size: 1,
            grad_accum: 2,
            precision,
            zero,
            ..train_config(3)
        };
        let replicated_dir = out_dir(&format!("zero0-{precision:?}"));
        let replicated = run_ranks(&config(0), 2, &replicated_dir);
        for zero in [1, 2] {
            let label = format!("{precision:?}, ZeRO {zero}");
            let sharded_dir = out_dir(&format!("zero{zero}-{precision:?}"));
            let sharded = run_ranks(&config(zero), 2, &sharded_dir);
            for (a, b) in sharded[0].reports.iter().zip(&replicated[0].reports) {
                assert!(
                    (a.loss - b.loss).abs() <= 1e-6 * b.loss.abs(),
                    "{label}: loss {} vs {}",
                    a.loss,
                    b.loss
                );
            }
            assert_eq!(
                bits(&sharded[0].weights),
                bits(&sharded[1].weights),
                "{label}: ranks differ"
            );
            let error = weight_error(&sharded[0].weights, &replicated[0].weights);
            assert!(error < 1e-6, "{label}: weights {error:e}");
            let whole = replicated[0].optimizer_state_bytes as f64;
            for rank in &sharded {
                let share = rank.optimizer_state_bytes as f64 / whole;
                assert!((share - 0.5).abs() <= 0.05 * 0.5, "{label}: share {share}");
            }
            // The checkpoint holds every parameter's whole state: resuming from step 2 on
            // 2 ranks continues exactly.
            let split_dir = out_dir(&format!("zero{zero}-split-{precision:?}"));
            run_ranks(
                &TrainConfig {
                    steps: 2,
                    save_every: 2,
                    ..config(zero)
                },
                2,
                &split_dir,
            );
            let resumed = run_ranks_with(2, |collective| {
                let more = |c: &mut TrainConfig, _: &mut DataSource| c.steps = 3;
                Trainer::resume_distributed(&split_dir, &split_dir, &Device::Cpu, more, collective)
                    .unwrap()
            });
            assert_eq!(
                bits(&resumed[0].weights),
                bits(&sharded[0].weights),
                "{label}: resume"
            );
            for dir in [sharded_dir, split_dir] {
                std::fs::remove_dir_all(&dir).unwrap();
            }
        }
        std::fs::remove_dir_all(&replicated_dir).unwrap();
    }
}
