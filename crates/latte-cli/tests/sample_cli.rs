//! `latte sample` end to end on the `video` fixture model, and its errors.

use std::path::PathBuf;
use std::process::Command;

fn latte(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_latte"))
        .args(args)
        .output()
        .expect("the latte binary runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn model() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/video/model")
        .display()
        .to_string()
}

#[test]
fn guided_sampling_under_a_budget_writes_latents() {
    let dir = std::env::temp_dir().join(format!("latte-sample-{}", std::process::id()));
    let out = dir.join("video.safetensors");
    let report = dir.join("memory.json");
    let (ok, text) = latte(&[
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
        "3MiB",
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
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_inputs_are_clear_errors() {
    let out = std::env::temp_dir().join("latte-sample-never.safetensors");
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
        let (ok, text) = latte(&args);
        assert!(!ok && text.contains(expected), "{extra:?}: {text}");
    }
    let (ok, text) = latte(&[
        "sample",
        "--model",
        "/nonexistent",
        "--synthetic-caption",
        "0",
        "--out",
        out,
    ]);
    assert!(!ok && text.contains("is not a model"), "{text}");
}
