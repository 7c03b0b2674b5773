//! Bad inputs to training, each a clear error that names what is wrong: empty or
//! malformed data directories, clips whose shapes do not fit the model, a non-finite
//! loss (training stops and the last good checkpoint is kept), an unwritable output
//! directory, and a budget below the weights and optimizer state.

use candle_core::{Device, Tensor};
use latte::config::{latte_architecture, LatteConfig};
use latte::data::{epoch_order, ClipShape};
use latte::train::{
    DataSource, MemoryPlan, ModelSource, TrainConfig, TrainError, Trainer, STATE_FILE,
};
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

fn config() -> LatteConfig {
    LatteConfig {
        video_length: 2,
        ..latte_architecture(2, 4, 1, 8, 3, 8)
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("latte-train-err-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn settings() -> TrainConfig {
    TrainConfig {
        steps: 6,
        batch_size: 1,
        save_every: 1,
        seed: 4,
        ..TrainConfig::default()
    }
}

fn start(data: DataSource, train: TrainConfig, out: &Path) -> Result<Trainer, TrainError> {
    Trainer::new(
        ModelSource::Fresh {
            config: config(),
            seed: 0,
        },
        data,
        train,
        out,
        &Device::Cpu,
    )
}

fn start_err(data: DataSource, train: TrainConfig, out: &Path) -> String {
    match start(data, train, out) {
        Ok(_) => panic!("training started"),
        Err(e) => e.to_string(),
    }
}

/// A clip's tensors: name, shape and the value of every element.
type ClipTensors<'a> = Vec<(&'a str, Vec<usize>, f32)>;

/// Writes one clip file with the given tensors.
fn write_clip(path: &Path, tensors: &[(&str, Vec<usize>, f32)]) {
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(name, shape, value)| {
            let t = (Tensor::ones(shape.as_slice(), candle_core::DType::F32, &Device::Cpu)
                .unwrap()
                * f64::from(*value))
            .unwrap();
            (name.to_string(), t)
        })
        .collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

fn good_clip(path: &Path, value: f32) {
    write_clip(
        path,
        &[
            ("latents", vec![3, 2, 8, 8], value),
            ("encoder_hidden_states", vec![5, 8], 0.5),
        ],
    );
}

fn assert_contains(message: &str, needles: &[&str]) {
    for needle in needles {
        assert!(message.contains(needle), "`{needle}` not in: {message}");
    }
}

#[test]
fn empty_missing_and_malformed_data_directories() {
    let dir = scratch("empty");
    let out = dir.join("out");
    let data = dir.join("clips");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("notes.txt"), "not a clip").unwrap();
    let message = start_err(DataSource::Shards(data.clone()), settings(), &out);
    assert_contains(
        &message,
        &[data.to_str().unwrap(), "holds no .safetensors clips"],
    );

    let missing = dir.join("nowhere");
    let message = start_err(DataSource::Shards(missing.clone()), settings(), &out);
    assert_contains(&message, &[missing.to_str().unwrap(), "not a directory"]);

    std::fs::write(data.join("broken.safetensors"), b"\x10\x00\x00\x00garbage").unwrap();
    let message = start_err(DataSource::Shards(data.clone()), settings(), &out);
    assert_contains(&message, &["malformed clip file", "broken.safetensors"]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn clips_that_do_not_fit_the_model_name_file_tensor_and_shapes() {
    let dir = scratch("shapes");
    let out = dir.join("out");
    let cases: [(&str, ClipTensors, &[&str]); 5] = [
        (
            "channels.safetensors",
            vec![
                ("latents", vec![4, 2, 8, 8], 0.0),
                ("encoder_hidden_states", vec![5, 8], 0.0),
            ],
            &["`latents`", "[4, 2, 8, 8]", "in_channels = 3"],
        ),
        (
            "frames.safetensors",
            vec![
                ("latents", vec![3, 5, 8, 8], 0.0),
                ("encoder_hidden_states", vec![5, 8], 0.0),
            ],
            &["`latents`", "[3, 5, 8, 8]", "video_length = 2"],
        ),
        (
            "patch.safetensors",
            vec![
                ("latents", vec![3, 2, 7, 8], 0.0),
                ("encoder_hidden_states", vec![5, 8], 0.0),
            ],
            &["[3, 2, 7, 8]", "patch_size = 2"],
        ),
        (
            "captions.safetensors",
            vec![
                ("latents", vec![3, 2, 8, 8], 0.0),
                ("encoder_hidden_states", vec![5, 16], 0.0),
            ],
            &["`encoder_hidden_states`", "[5, 16]", "caption_channels = 8"],
        ),
        (
            "missing.safetensors",
            vec![("latents", vec![3, 2, 8, 8], 0.0)],
            &["no `encoder_hidden_states` tensor"],
        ),
    ];
    for (file, tensors, needles) in cases {
        let data = dir.join(file.trim_end_matches(".safetensors"));
        std::fs::create_dir_all(&data).unwrap();
        write_clip(&data.join(file), &tensors);
        let message = start_err(DataSource::Shards(data), settings(), &out);
        assert_contains(&message, &[file]);
        assert_contains(&message, needles);
    }
    // Clips of different shapes cannot share a batch.
    let data = dir.join("mixed");
    std::fs::create_dir_all(&data).unwrap();
    good_clip(&data.join("a.safetensors"), 0.0);
    write_clip(
        &data.join("b.safetensors"),
        &[
            ("latents", vec![3, 2, 8, 8], 0.0),
            ("encoder_hidden_states", vec![7, 8], 0.0),
        ],
    );
    let message = start_err(DataSource::Shards(data), settings(), &out);
    assert_contains(&message, &["b.safetensors", "[7, 8]", "a.safetensors"]);
    // Synthetic videos of the wrong geometry.
    let message = start_err(
        DataSource::Synthetic(ClipShape {
            channels: 4,
            frames: 2,
            height: 8,
            width: 8,
            caption_tokens: 2,
            caption_channels: 8,
        }),
        settings(),
        &out,
    );
    assert_contains(&message, &["in_channels = 3"]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn non_finite_loss_stops_and_keeps_the_last_good_checkpoint() {
    let dir = scratch("nan");
    let data = dir.join("clips");
    std::fs::create_dir_all(&data).unwrap();
    // The clip drawn third (step 3 with batch 1) holds NaN.
    let poisoned = epoch_order(4, settings().seed, 0)[2];
    for i in 0..4 {
        let value = if i == poisoned { f32::NAN } else { 0.25 };
        good_clip(&data.join(format!("clip-{i}.safetensors")), value);
    }
    let out = dir.join("out");
    let mut trainer = start(DataSource::Shards(data), settings(), &out).unwrap();
    let error = trainer
        .run(|_| ControlFlow::Continue(()))
        .expect_err("a NaN clip must stop training");
    let message = error.to_string();
    let good = out.join("checkpoint-2");
    assert_contains(
        &message,
        &[
            "non-finite loss",
            "step 3",
            &format!("clip-{poisoned}.safetensors"),
            good.to_str().unwrap(),
        ],
    );
    assert!(matches!(error, TrainError::NonFiniteLoss { step: 3, .. }));
    assert!(
        good.join(STATE_FILE).is_file(),
        "the last good checkpoint is kept"
    );
    assert!(
        !out.join("checkpoint-3").exists(),
        "no checkpoint of the bad step"
    );
    drop(trainer);
    // The kept checkpoint resumes.
    let resumed = Trainer::resume(&out, &out, &Device::Cpu, |_, _| {}).unwrap();
    assert_eq!(resumed.step(), 2);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn unwritable_output_directory() {
    let dir = scratch("unwritable");
    let file = dir.join("a-file");
    std::fs::write(&file, "").unwrap();
    let out = file.join("run");
    let data = DataSource::Synthetic(ClipShape {
        channels: 3,
        frames: 2,
        height: 8,
        width: 8,
        caption_tokens: 2,
        caption_channels: 8,
    });
    let message = start_err(data, settings(), &out);
    assert_contains(
        &message,
        &["cannot write to output directory", out.to_str().unwrap()],
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn budget_below_weights_and_optimizer_state() {
    let dir = scratch("budget");
    let data = DataSource::Synthetic(ClipShape {
        channels: 3,
        frames: 2,
        height: 8,
        width: 8,
        caption_tokens: 2,
        caption_channels: 8,
    });
    let message = start_err(
        data,
        TrainConfig {
            memory: MemoryPlan::Budget(10_000),
            ..settings()
        },
        &dir.join("out"),
    );
    assert_contains(
        &message,
        &[
            "memory plan: budget",
            "is below the weights and optimizer state held across steps",
            "weights",
            "optimizer moments",
            "EMA",
            "smallest feasible budget",
        ],
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn settings_out_of_range() {
    let dir = scratch("settings");
    let data = DataSource::Synthetic(ClipShape {
        channels: 3,
        frames: 2,
        height: 8,
        width: 8,
        caption_tokens: 2,
        caption_channels: 8,
    });
    let mut bad = settings();
    bad.caption_dropout = 1.5;
    let message = start_err(data.clone(), bad, &dir.join("out"));
    assert_contains(&message, &["caption dropout 1.5"]);
    let mut bad = settings();
    bad.zero = 3;
    let message = start_err(data, bad, &dir.join("out"));
    assert_contains(&message, &["ZeRO stage 3", "2 (sharded gradients too)"]);
    std::fs::remove_dir_all(dir).unwrap();
}
