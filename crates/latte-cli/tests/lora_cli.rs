//! LoRA from the command line: `latte plan --lora` and `latte train --lora` share the
//! account, a trained adapter is sampled, evaluated and merged, and bad adapters fail
//! with errors that name the file, key or flag.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_fails, chosen, fixtures, latte_text, plan_json, scratch};

const LORA_PLAN: [&str; 12] = [
    "plan",
    "--preset",
    "tiny",
    "--mode",
    "train",
    "--lora",
    "4",
    "--precision",
    "bf16",
    "--batch",
    "2",
    "--budget",
];

#[test]
fn plan_and_train_run_the_same_lora_row() {
    for budget in ["10MiB", "40MiB"] {
        let mut args = LORA_PLAN.to_vec();
        args.push(budget);
        let report = plan_json(&args);
        let row = chosen(&report);
        let account = &row["account"];
        let trained = account["trained_parameter_count"].as_u64().unwrap();
        assert!(trained > 0 && trained * 10 < account["parameter_count"].as_u64().unwrap());
        // State for the f32 factors only: no master copy, moments and EMA of the factors.
        assert_eq!(account["master_weights_bytes"], 0);
        assert_eq!(
            account["optimizer_moments_bytes"].as_u64().unwrap(),
            8 * trained
        );
        assert_eq!(account["ema_bytes"].as_u64().unwrap(), 4 * trained);

        let out = scratch(&format!("lora-plan-{budget}"));
        let (ok, text) = latte_text(&[
            "train",
            "--preset",
            "tiny",
            "--lora",
            "4",
            "--steps",
            "1",
            "--precision",
            "bf16",
            "--batch",
            "2",
            "--budget",
            budget,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "{text}");
        assert!(text.contains("LoRA adapters"), "{text}");
        let policy = row["policy"].as_str().unwrap();
        assert!(
            text.contains(&format!("policy {policy} ")),
            "plan chose {policy}: {text}"
        );
        let _ = std::fs::remove_dir_all(&out);
    }
}

fn sample_of(path: &std::path::Path) -> Tensor {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()["sample"]
        .to_dtype(DType::F64)
        .unwrap()
}

/// A trained adapter: `forward --lora` (attached) and `merge-lora` then `forward` (merged)
/// agree, the adapter changes the output, and `sample` takes the run directory itself.
#[test]
fn trained_adapter_is_evaluated_merged_and_sampled() {
    let dir = scratch("lora-trained");
    let run = dir.join("run");
    let base = fixtures().join("batch/model");
    let inputs = fixtures().join("batch/inputs.safetensors");
    let (ok, text) = latte_text(&[
        "train",
        "--model",
        base.to_str().unwrap(),
        "--lora",
        "2",
        "--lora-targets",
        "to_q,to_v,ff.net.2,proj_out",
        "--steps",
        "3",
        "--warmup",
        "0",
        "--lr",
        "0.01",
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    let adapter = run.join("checkpoint-3/adapter");
    assert!(adapter.join("adapter_model.safetensors").is_file());

    let forward = |model: &std::path::Path, lora: Option<&std::path::Path>, out: &str| {
        let out = dir.join(out);
        let mut args = vec![
            "forward",
            "--model",
            model.to_str().unwrap(),
            "--inputs",
            inputs.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        if let Some(lora) = lora {
            args.extend(["--lora", lora.to_str().unwrap()]);
        }
        let (ok, text) = latte_text(&args);
        assert!(ok, "{text}");
        sample_of(&out)
    };
    let attached = forward(&base, Some(&adapter), "attached.safetensors");
    let merged_dir = dir.join("merged");
    let (ok, text) = latte_text(&[
        "merge-lora",
        "--model",
        base.to_str().unwrap(),
        "--lora",
        adapter.to_str().unwrap(),
        "--out",
        merged_dir.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    let merged = forward(&merged_dir, None, "merged.safetensors");
    let plain = forward(&base, None, "base.safetensors");
    let max = |t: Tensor| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let scale = max(plain.clone());
    // Merging is the same update in another order of operations: f32 rounding apart.
    assert!(max((&attached - &merged).unwrap()) <= 1e-5 * scale);
    assert!(max((&attached - &plain).unwrap()) > 1e-4 * scale);

    // The run directory names its base and brings its adapter and scheduler.
    let latents = dir.join("sample/latents.safetensors");
    let (ok, text) = latte_text(&[
        "sample",
        "--model",
        run.to_str().unwrap(),
        "--caption",
        "red,east,disc",
        "--steps",
        "2",
        "--out",
        latents.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("LoRA") && text.contains("merged"), "{text}");
    assert!(latents.is_file());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_adapters_and_flags_fail_clearly() {
    let dir = scratch("lora-bad");
    let base = fixtures().join("batch/model");
    let base = base.to_str().unwrap();
    let inputs = fixtures().join("batch/inputs.safetensors");
    let inputs = inputs.to_str().unwrap();
    let out = dir.join("out");
    let out = out.to_str().unwrap();
    assert_fails(
        &[
            "train",
            "--model",
            base,
            "--lora",
            "2",
            "--lora-targets",
            "to_x",
            "--out",
            out,
        ],
        &["to_x", "match no linear layer"],
    );
    assert_fails(
        &["train", "--model", base, "--lora", "0", "--out", out],
        &["--lora"],
    );
    assert_fails(
        &[
            "plan", "--preset", "tiny", "--mode", "guide", "--lora", "4", "--budget", "1GiB",
        ],
        &["--lora", "--mode train"],
    );
    let forward_fails = |adapter: &std::path::Path, needles: &[&str]| {
        let adapter = adapter.to_str().unwrap();
        let args = [
            "forward", "--model", base, "--inputs", inputs, "--lora", adapter,
        ];
        assert_fails(&args, needles);
    };
    forward_fails(&dir.join("none"), &["none", "no such file or directory"]);
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    forward_fails(&empty, &["adapter_config.json"]);
    // A truncated weights file, and a rank the factors do not have.
    let source = fixtures().join("lora/adapter");
    let (config_file, weights_file) = ("adapter_config.json", "adapter_model.safetensors");
    let broken = |name: &str, config: &str, weights: &[u8]| {
        let adapter = dir.join(name);
        std::fs::create_dir_all(&adapter).unwrap();
        std::fs::write(adapter.join(config_file), config).unwrap();
        std::fs::write(adapter.join(weights_file), weights).unwrap();
        adapter
    };
    let config = std::fs::read_to_string(source.join(config_file)).unwrap();
    let weights = std::fs::read(source.join(weights_file)).unwrap();
    let truncated = broken("truncated", &config, &weights[..weights.len() / 2]);
    forward_fails(&truncated, &[weights_file]);
    let mut rank_3: serde_json::Value = serde_json::from_str(&config).unwrap();
    rank_3["r"] = 3.into();
    rank_3["rank_pattern"] = serde_json::json!({});
    let reshaped = broken("reshaped", &rank_3.to_string(), &weights);
    forward_fails(
        &reshaped,
        &[
            "mis-shaped",
            "base_model.model.transformer_blocks.0.attn1.to_q.lora_A.weight",
            "expected [3, 8], found [4, 8]",
        ],
    );
    // merge-lora never writes over an existing directory.
    assert_fails(
        &[
            "merge-lora",
            "--model",
            base,
            "--lora",
            source.to_str().unwrap(),
            "--out",
            base,
        ],
        &["exists"],
    );
    let _ = std::fs::remove_dir_all(&dir);
}
