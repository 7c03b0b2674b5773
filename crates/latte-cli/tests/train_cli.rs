//! `latte train` end to end: the README's command (shortened) within its budget, `--resume`
//! equal to an uninterrupted run, the warning for changed settings, a loss mask from the
//! clip files, and f16 overflow skipping steps and backing off the loss scale.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{chosen, latte_text, plan_json, scratch};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;

/// Runs `latte train` and returns its output; fails the test when it fails.
fn train(args: &[&str]) -> String {
    let (ok, text) = latte_text(&[&["train"], args].concat());
    assert!(ok, "{args:?}: {text}");
    text
}

/// The lines of `metrics.jsonl` in `out`.
fn metrics(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The bytes of the newest checkpoint's transformer weights.
fn final_weights(out: &Path) -> Vec<u8> {
    let latest = std::fs::read_to_string(out.join("latest")).unwrap();
    let dir = out.join(latest.trim()).join("transformer");
    std::fs::read(dir.join("diffusion_pytorch_model.safetensors")).unwrap()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn the_readme_command_trains_within_its_budget() {
    let dir = scratch("readme-train");
    let out = dir.join("run");
    let budget = 96u64 << 20;
    let text = train(&[
        "--preset",
        "tiny",
        "--steps",
        "3",
        "--budget",
        "96MiB",
        "--out",
        path(&out),
    ]);
    assert!(text.contains("memory: budget 96.0 MiB; policy "), "{text}");
    assert!(text.contains("3 steps in"), "{text}");
    let lines = metrics(&out);
    assert_eq!(lines.len(), 3);
    for line in &lines {
        let peak =
            line["resident_bytes"].as_u64().unwrap() + line["step_peak_bytes"].as_u64().unwrap();
        assert!(
            peak <= budget,
            "step {}: peak {peak} over the budget",
            line["step"]
        );
        assert!(line["loss"].as_f64().unwrap().is_finite());
    }
    assert!(out.join("checkpoint-3").join("transformer").is_dir());
    // The policy it ran is the one `latte plan` chooses for the same flags (the preset's
    // batch of 4).
    let plan = plan_json(&[
        "plan",
        "--preset",
        "tiny",
        "--mode",
        "train",
        "--precision",
        "f32",
        "--batch",
        "4",
        "--budget",
        "96MiB",
    ]);
    let policy = chosen(&plan)["policy"].as_str().unwrap();
    assert!(
        text.contains(&format!("policy {policy} (")),
        "plan chose {policy}: {text}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn resume_through_the_cli_equals_an_uninterrupted_run() {
    let dir = scratch("resume-cli");
    let (whole, split) = (dir.join("whole"), dir.join("split"));
    let common = ["--preset", "tiny", "--batch", "2", "--save-every", "0"];
    train(&[&common[..], &["--steps", "4", "--out", path(&whole)]].concat());
    train(&[&common[..], &["--steps", "2", "--out", path(&split)]].concat());
    let resumed = train(&[
        "--resume",
        path(&split),
        "--steps",
        "4",
        "--out",
        path(&split),
    ]);
    assert!(!resumed.contains("warning"), "{resumed}");
    let losses = |out: &Path| -> Vec<u64> {
        metrics(out)
            .iter()
            .map(|l| l["loss"].as_f64().unwrap().to_bits())
            .collect()
    };
    assert_eq!(losses(&whole), losses(&split), "losses after resuming");
    assert!(
        final_weights(&whole) == final_weights(&split),
        "weights after resuming"
    );

    // A changed setting is continued with, and said.
    let changed = dir.join("changed");
    let (ok, text) = latte_text(&[
        "train",
        "--resume",
        path(&split),
        "--steps",
        "5",
        "--lr",
        "0.5",
        "--out",
        path(&changed),
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains("warning: --lr differ from the checkpoint's settings"),
        "{text}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Writes `count` clips of the tiny preset's shape, each with `mask` per frame if given.
fn write_clips(dir: &Path, count: usize, mask: Option<f32>) {
    std::fs::create_dir_all(dir).unwrap();
    let dev = Device::Cpu;
    for i in 0..count {
        let mut rng = latte::random::rng_for(i as u64, "train-cli-clip");
        let mut tensors = HashMap::new();
        tensors.insert(
            "latents".to_string(),
            (latte::random::randn(&mut rng, (3, 8, 16, 16), &dev).unwrap() * 0.5).unwrap(),
        );
        tensors.insert(
            "encoder_hidden_states".to_string(),
            latte::random::randn(&mut rng, (4, 16), &dev).unwrap(),
        );
        if let Some(value) = mask {
            tensors.insert(
                "mask".to_string(),
                Tensor::full(value, 8, &dev)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap(),
            );
        }
        candle_core::safetensors::save(&tensors, dir.join(format!("{i:04}.safetensors"))).unwrap();
    }
}

#[test]
fn the_clips_loss_mask_weights_the_loss() {
    let dir = scratch("mask-cli");
    let run = |name: &str, mask: Option<f32>| -> Vec<f64> {
        let clips = dir.join(format!("clips-{name}"));
        write_clips(&clips, 4, mask);
        let out = dir.join(name);
        train(&[
            "--preset",
            "tiny",
            "--data",
            path(&clips),
            "--batch",
            "2",
            "--steps",
            "2",
            "--save-every",
            "0",
            "--out",
            path(&out),
        ]);
        metrics(&out)
            .iter()
            .map(|l| l["loss"].as_f64().unwrap())
            .collect()
    };
    let plain = run("plain", None);
    let ones = run("ones", Some(1.0));
    let zeros = run("zeros", Some(0.0));
    // A mask of ones is the unmasked loss; a mask of zeros scores no position.
    assert_eq!(plain, ones);
    assert!(plain.iter().all(|l| *l > 0.0), "{plain:?}");
    assert!(zeros.iter().all(|l| *l == 0.0), "{zeros:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn f16_overflow_skips_the_step_and_halves_the_scale() {
    let dir = scratch("f16-overflow");
    let out = dir.join("run");
    // 2⁴⁰ times the loss gradient overflows f16 (largest finite 65504) in every step.
    let scale = (1u64 << 40).to_string();
    let text = train(&[
        "--preset",
        "tiny",
        "--precision",
        "f16",
        "--loss-scale",
        &scale,
        "--steps",
        "3",
        "--out",
        path(&out),
    ]);
    assert!(text.contains("3 steps skipped (f16 overflow)"), "{text}");
    let lines = metrics(&out);
    let scales: Vec<f64> = lines
        .iter()
        .map(|l| l["loss_scale"].as_f64().unwrap())
        .collect();
    assert_eq!(scales, [2f64.powi(40), 2f64.powi(39), 2f64.powi(38)]);
    assert!(lines.iter().all(|l| l["skipped"] == true));
    std::fs::remove_dir_all(&dir).unwrap();
}
