//! `latte sample` end to end on the `video` fixture model, and its errors.

mod common;

use common::{fixtures, latte_text, scratch};

fn model() -> String {
    fixtures().join("video/model").display().to_string()
}

#[test]
fn guided_sampling_under_a_budget_writes_latents() {
    let dir = scratch("sample");
    let out = dir.join("video.safetensors");
    let report = dir.join("memory.json");
    let (ok, text) = latte_text(&[
        "sample",
        "--model",
        &model(),
        "--synthetic-caption",
        "3",
        "--caption-tokens",
        "5",
        "--steps",
        "4",
        "--guide",
        "smooth",
        "--guide-steps",
        "1..3",
        "--budget",
        "300KiB",
        "--out",
        out.to_str().unwrap(),
        "--memory-report",
        report.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains("objective smooth on the final video"),
        "{text}"
    );
    assert!(out.is_file() && report.is_file());
    // The whole guided step — weights, latents, captions, guidance tensors and the
    // backward's activations — stays within the budget and near the plan's prediction.
    let memory: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let measured = memory["measured_peak_bytes"].as_u64().unwrap();
    let predicted = memory["predicted_peak_bytes"].as_u64().unwrap();
    assert_eq!(memory["budget_bytes"].as_u64(), Some(300 << 10));
    assert!(measured <= 300 << 10, "measured {measured} over 300 KiB");
    assert!(
        measured.abs_diff(predicted) <= predicted / 10,
        "measured {measured}, predicted {predicted}"
    );
    // Storing everything needs more than the budget: the plan checkpoints.
    assert_ne!(memory["policy"], "none", "{memory}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_inputs_are_clear_errors() {
    let out = scratch("never").join("video.safetensors");
    let out = out.to_str().unwrap();
    let m = model();
    let cases: [(&[&str], &str); 5] = [
        (&["--prompt", "a cat"], "lacks text_encoder, tokenizer, vae"),
        (
            &[
                "--synthetic-caption",
                "0",
                "--caption-tokens",
                "5",
                "--guide",
                "sharp",
            ],
            "unknown objective \"sharp\"",
        ),
        (
            &[
                "--synthetic-caption",
                "0",
                "--caption-tokens",
                "5",
                "--guide",
                "color:1,0,0",
            ],
            "needs a pixel-space model with 3 channels",
        ),
        (&["--caption", "red,up,disc"], "unknown direction \"up\""),
        (
            &[
                "--synthetic-caption",
                "0",
                "--caption-tokens",
                "5",
                "--guide",
                "smooth",
                "--guide-steps",
                "3..2",
            ],
            "need A < B",
        ),
    ];
    for (extra, expected) in cases {
        let mut args = vec!["sample", "--model", &m, "--steps", "2", "--out", out];
        args.extend_from_slice(extra);
        let (ok, text) = latte_text(&args);
        assert!(!ok && text.contains(expected), "{extra:?}: {text}");
    }
    let not_a_model = |model: &str, expected: &str| {
        let args = [
            "sample",
            "--model",
            model,
            "--synthetic-caption",
            "0",
            "--out",
            out,
        ];
        let (ok, text) = latte_text(&args);
        assert!(!ok && text.contains(expected), "{text}");
    };
    not_a_model("/nonexistent", "no such file or directory");
    let empty = scratch("not-a-model");
    not_a_model(empty.to_str().unwrap(), "is not a model");
}

/// The scheduler config beside a transformer (a `latte train` checkpoint's
/// `scheduler/scheduler_config.json`) sets the sampler; `--clip` and `--no-clip` override
/// it. Without one, DDIM clips x̂₀ as diffusers' defaults do.
#[test]
fn the_scheduler_beside_the_transformer_sets_clipping() {
    let dir = scratch("scheduler-beside");
    let transformer = dir.join("checkpoint-1/transformer");
    std::fs::create_dir_all(&transformer).unwrap();
    for file in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(
            fixtures().join("video/model").join(file),
            transformer.join(file),
        )
        .unwrap();
    }
    let scheduler = dir.join("checkpoint-1/scheduler");
    std::fs::create_dir_all(&scheduler).unwrap();
    std::fs::write(
        scheduler.join("scheduler_config.json"),
        r#"{"_class_name": "DDIMScheduler", "clip_sample": false}"#,
    )
    .unwrap();
    let latents = |name: &str, model: &str, extra: &[&str]| -> Vec<u8> {
        let out = dir.join(format!("{name}.safetensors"));
        let mut args = vec![
            "sample",
            "--model",
            model,
            "--synthetic-caption",
            "3",
            "--caption-tokens",
            "5",
            "--steps",
            "3",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let (ok, text) = latte_text(&args);
        assert!(ok, "{name}: {text}");
        std::fs::read(&out).unwrap()
    };
    let bare = model();
    let checkpoint = dir.join("checkpoint-1").display().to_string();
    let clipped = latents("clipped", &bare, &[]);
    let unclipped = latents("unclipped", &bare, &["--no-clip"]);
    assert_ne!(
        clipped, unclipped,
        "x̂₀ of the fixture model never left [-1, 1]"
    );
    assert_eq!(latents("checkpoint", &checkpoint, &[]), unclipped);
    assert_eq!(latents("forced", &checkpoint, &["--clip"]), clipped);
    std::fs::remove_dir_all(&dir).ok();
}
