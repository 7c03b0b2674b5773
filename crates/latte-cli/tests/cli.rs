//! The `latte` binary end to end: the forward/VJP file contract against the diffusers
//! fixtures, `inspect`, and bad input — each a clear error, a non-zero exit, no panic and
//! no partial output file.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_fails, fixtures, latte, scratch};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs a command expected to fail: non-zero exit, no panic, stderr containing every
/// `needle`, and neither `out` nor a temporary file beside it created.
fn assert_fails_cleanly(args: &[&str], needles: &[&str], out: &Path) {
    assert_fails(args, needles);
    assert!(!out.exists(), "{args:?} left {}", out.display());
    let leftovers: Vec<_> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{args:?} left temporary files");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn load(p: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn forward_vjp_file_contract_matches_diffusers() {
    // Both kernel sets: the fused CPU kernels and the device-generic ones a GPU runs.
    for kernels in ["fused", "generic"] {
        forward_vjp_matches_diffusers_with(kernels);
    }
}

fn forward_vjp_matches_diffusers_with(kernels: &str) {
    let dir = scratch(&format!("contract-{kernels}"));
    let out = dir.join("out.safetensors");
    let case = fixtures().join("video");
    let output = latte(&[
        "--kernels",
        kernels,
        "forward",
        "--model",
        path(&case.join("model")),
        "--inputs",
        path(&case.join("inputs.safetensors")),
        "--out",
        path(&out),
        "--vjp",
        "--checkpoint",
        "every:1",
        "--memory-report",
        path(&dir.join("memory.json")),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let actual = load(&out);
    let expected = load(&case.join("expected.safetensors"));
    assert_eq!(
        actual.keys().filter(|k| k.starts_with("grad.")).count(),
        expected.keys().filter(|k| k.starts_with("grad.")).count()
    );
    for (name, reference) in &expected {
        let got = &actual[name];
        assert_eq!(got.dtype(), DType::F32, "{name}");
        let scale = reference
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        let scale = scale.to_scalar::<f32>().unwrap().max(1.0);
        let tolerance = if name == "sample" { 1e-4 } else { 1e-3 };
        assert!(
            max_abs_diff(got, reference) / scale <= tolerance,
            "{kernels}: {name}"
        );
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("memory.json")).unwrap()).unwrap();
    assert!(report["peak_bytes"].as_u64().unwrap() > 0);
    assert!(!report["timeline"].as_array().unwrap().is_empty());
}

#[test]
fn inspect_prints_the_latte_1_parameter_count() {
    let output = latte(&["inspect", "--preset", "latte-1"]);
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("1,057,246,880"));
}

#[test]
fn truncated_weights_name_the_file() {
    let dir = scratch("truncated");
    let model = dir.join("model");
    copy_dir(&fixtures().join("unit_config/model"), &model);
    let weights = model.join("diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let out = dir.join("out.safetensors");
    let inputs = fixtures().join("unit_config/inputs.safetensors");
    assert_fails_cleanly(
        &[
            "forward",
            "--model",
            path(&model),
            "--inputs",
            path(&inputs),
            "--out",
            path(&out),
        ],
        &["diffusion_pytorch_model.safetensors"],
        &out,
    );
}

#[test]
fn missing_unexpected_and_misshaped_tensors_are_listed_together() {
    let dir = scratch("mismatch");
    let model = dir.join("model");
    copy_dir(&fixtures().join("unit_config/model"), &model);
    let weights = model.join("diffusion_pytorch_model.safetensors");
    let mut tensors = load(&weights);
    tensors.remove("proj_out.bias").unwrap();
    tensors.insert(
        "transformer_blocks.0.attn1.to_q.weight".into(),
        Tensor::zeros((3, 8), DType::F32, &Device::Cpu).unwrap(),
    );
    tensors.insert(
        "extra.weight".into(),
        Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let out = dir.join("out.safetensors");
    let inputs = fixtures().join("unit_config/inputs.safetensors");
    assert_fails_cleanly(
        &[
            "forward",
            "--model",
            path(&model),
            "--inputs",
            path(&inputs),
            "--out",
            path(&out),
        ],
        &[
            "missing:     proj_out.bias [32]",
            "mis-shaped:  transformer_blocks.0.attn1.to_q.weight expected [8, 8], found [3, 8]",
            "unexpected:  extra.weight [2]",
        ],
        &out,
    );
}

#[test]
fn unsupported_config_values_are_named() {
    let dir = scratch("config");
    let model = dir.join("model");
    copy_dir(&fixtures().join("unit_config/model"), &model);
    let config = model.join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("ada_norm_single", "ada_norm_zero")).unwrap();
    let out = dir.join("out.safetensors");
    let inputs = fixtures().join("unit_config/inputs.safetensors");
    assert_fails_cleanly(
        &[
            "forward",
            "--model",
            path(&model),
            "--inputs",
            path(&inputs),
            "--out",
            path(&out),
        ],
        &["norm_type", "ada_norm_zero", "ada_norm_single"],
        &out,
    );
}

/// Writes the `video` fixture's inputs with `edit` applied.
fn edited_inputs(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> PathBuf {
    let mut tensors = load(&fixtures().join("video/inputs.safetensors"));
    edit(&mut tensors);
    let file = dir.join("inputs.safetensors");
    candle_core::safetensors::save(&tensors, &file).unwrap();
    file
}

#[test]
fn bad_inputs_are_reported() {
    let dir = scratch("inputs");
    let model = fixtures().join("video/model");
    let out = dir.join("out.safetensors");
    let run = |inputs: &Path, extra: &[&str], needles: &[&str]| {
        let mut args = vec![
            "forward",
            "--model",
            path(&model),
            "--inputs",
            path(inputs),
            "--out",
            path(&out),
        ];
        args.extend_from_slice(extra);
        assert_fails_cleanly(&args, needles, &out);
    };

    let inputs = edited_inputs(&dir, |t| {
        t.remove("timestep");
    });
    run(&inputs, &[], &["timestep"]);

    let inputs = edited_inputs(&dir, |t| {
        let h = t["hidden_states"].narrow(2, 0, 2).unwrap();
        t.insert("hidden_states".into(), h);
    });
    run(&inputs, &[], &["2 frames", "video_length = 3"]);
    // Without temporal attention diffusers accepts any number of frames.
    let output = latte(&[
        "forward",
        "--model",
        path(&model),
        "--inputs",
        path(&inputs),
        "--no-temporal",
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let inputs = edited_inputs(&dir, |t| {
        let h = &t["hidden_states"];
        let mut values = h.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        values[3] = f32::NAN;
        values[9] = f32::INFINITY;
        let h = Tensor::from_vec(values, h.shape(), &Device::Cpu).unwrap();
        t.insert("hidden_states".into(), h);
    });
    run(&inputs, &[], &["hidden_states", "2 NaN or infinite"]);

    let inputs = edited_inputs(&dir, |t| {
        let c = t["encoder_hidden_states"].narrow(2, 0, 3).unwrap();
        t.insert("encoder_hidden_states".into(), c);
    });
    run(
        &inputs,
        &[],
        &["encoder_hidden_states", "got shape [1, 5, 3]"],
    );

    let inputs = fixtures().join("video/inputs.safetensors");
    run(
        &inputs,
        &["--vjp", "--checkpoint", "budget:1KiB"],
        &["smallest feasible budget"],
    );

    let truncated = dir.join("short.safetensors");
    let bytes = std::fs::read(&inputs).unwrap();
    std::fs::write(&truncated, &bytes[..100]).unwrap();
    run(&truncated, &[], &["short.safetensors"]);
}
