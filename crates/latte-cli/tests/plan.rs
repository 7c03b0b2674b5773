//! `latte plan` end to end: impossible requests are clear errors, the Latte-1 plans the
//! README quotes, `--batch auto`, `--budget auto` and the cache of `--measure`.

mod common;

use common::{assert_fails, chosen, latte, latte_command, plan_json};
use serde_json::Value;
use std::path::PathBuf;

fn row<'a>(report: &'a Value, policy: &str) -> &'a Value {
    report["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["policy"] == policy)
        .unwrap_or_else(|| panic!("no `{policy}` row"))
}

const GIB: u64 = 1 << 30;

const LATTE_1: [&str; 14] = [
    "plan",
    "--preset",
    "latte-1",
    "--frames",
    "16",
    "--height",
    "512",
    "--width",
    "512",
    "--mode",
    "guide",
    "--cfg",
    "--precision",
    "bf16",
];

#[test]
fn latte_1_fits_24_gib_with_recomputation_and_80_gib_without_it() {
    let mut args = LATTE_1.to_vec();
    args.extend(["--budget", "24GiB"]);
    let report = plan_json(&args);
    let best = chosen(&report);
    assert_eq!(best["fits"], true);
    assert!(best["total_peak_bytes"].as_u64().unwrap() <= 24 * GIB);
    assert_eq!(best["effective_batch"], 2, "CFG doubles the batch");
    let overhead_24 = best["overhead_pct"].as_f64().unwrap();
    assert!(overhead_24 > 0.0);

    // The CPU kernels' fused attention stores no score-sized tensor: `none` (44.1 GiB in
    // the README's table) fits 80 GiB, and more memory never makes the chosen plan slower.
    let mut args = LATTE_1.to_vec();
    args.extend(["--budget", "80GiB"]);
    let report = plan_json(&args);
    let none = row(&report, "none");
    assert_eq!(none["fits"], true);
    let none_gib = none["total_peak_bytes"].as_u64().unwrap() as f64 / GIB as f64;
    assert!(
        (none_gib - 44.1).abs() < 0.05,
        "README says 44.1 GiB: {none_gib}"
    );
    assert!(chosen(&report)["overhead_pct"].as_f64().unwrap() < 1e-9);

    // The generic kernels (the CUDA default) store no score-sized tensor either: `none`
    // (47.1 GiB in the README's table) fits 80 GiB without recomputation; the least
    // feasible budget is the table's 3.7 GiB.
    args.extend(["--device", "cuda"]);
    let report = plan_json(&args);
    let none = row(&report, "none");
    assert_eq!(none["fits"], true);
    let none_gib = none["total_peak_bytes"].as_u64().unwrap() as f64 / GIB as f64;
    assert!(
        (none_gib - 47.1).abs() < 0.05,
        "README says 47.1 GiB: {none_gib}"
    );
    let least_gib = report["smallest_feasible_bytes"].as_u64().unwrap() as f64 / GIB as f64;
    assert!(
        (least_gib - 3.7).abs() < 0.05,
        "README says 3.7 GiB: {least_gib}"
    );
    // `--kernels fused` is for the CPU only.
    let mut fused_on_gpu = args.clone();
    fused_on_gpu.extend(["--kernels", "fused"]);
    let output = latte(&fused_on_gpu);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--kernels generic"));

    // The table names the chosen row.
    let mut args = LATTE_1.to_vec();
    args.extend(["--budget", "24GiB"]);
    let table = String::from_utf8_lossy(&latte(&args).stdout).to_string();
    assert!(table.contains("<- chosen"), "{table}");
    assert!(table.contains("512x512 px (latents 64x64)"), "{table}");
}

#[test]
fn impossible_requests_are_errors_that_name_the_fix() {
    let small = [
        "plan",
        "--preset",
        "small",
        "--mode",
        "train",
        "--precision",
        "f32",
    ];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        let mut args = small.to_vec();
        args.extend_from_slice(extra);
        args
    };
    // Weights 58.8 MiB + AdamW moments 117.7 MiB + EMA 58.8 MiB do not fit 100 MiB.
    assert_fails(
        &with(&["--budget", "100MiB"]),
        &[
            "below the weights",
            "optimizer moments 117.7 MiB",
            "EMA 58.8 MiB",
            "smallest feasible budget",
        ],
    );
    // Above weights, optimizer state and EMA, below anything the planner can do.
    assert_fails(
        &with(&["--budget", "300MiB"]),
        &["no configuration fits", "smallest feasible budget"],
    );
    assert_fails(
        &with(&["--budget", "1GiB", "--frames", "0"]),
        &["--frames 0"],
    );
    assert_fails(
        &with(&["--budget", "1GiB", "--frames", "8"]),
        &["--frames 8", "video_length = 16"],
    );
    assert_fails(
        &with(&["--budget", "1GiB", "--height", "500"]),
        &["--height 500 px", "multiple of 16 px", "VAE"],
    );
    assert_fails(
        &with(&["--budget", "1GiB", "--cfg"]),
        &["--cfg", "--mode guide"],
    );
    assert_fails(&with(&["--budget", "lots"]), &["--budget"]);
    assert_fails(
        &with(&["--budget", "1GiB", "--batch", "0"]),
        &["at least 1"],
    );
    // `auto` on a GPU reads its free memory: this CPU-only build cannot open one.
    assert_fails(
        &with(&["--budget", "auto", "--device", "cuda"]),
        &["--device cuda", "without CUDA"],
    );
    // A pixel-space model takes latent sizes: 16 is fine, 15 is not a multiple of 2.
    assert_fails(
        &[
            "plan", "--preset", "tiny", "--mode", "guide", "--budget", "1GiB", "--width", "15",
        ],
        &["--width 15", "multiple of 2"],
    );
}

#[test]
fn batch_auto_takes_the_largest_batch_that_fits() {
    let args = [
        "plan",
        "--preset",
        "tiny",
        "--mode",
        "train",
        "--precision",
        "f32",
        "--batch",
        "auto",
        "--budget",
        "64MiB",
    ];
    let report = plan_json(&args);
    let best = chosen(&report);
    let batch = best["batch"].as_u64().unwrap();
    assert!(batch > 1, "{best}");
    // One more video does not fit.
    let more = (batch + 1).to_string();
    let fixed = [
        "plan",
        "--preset",
        "tiny",
        "--mode",
        "train",
        "--precision",
        "f32",
        "--batch",
        &more,
        "--budget",
        "64MiB",
    ];
    let output = latte(&fixed);
    assert!(!output.status.success(), "batch {more} fits 64 MiB too");
}

#[test]
fn budget_auto_states_the_available_memory_and_margin() {
    let output = latte(&[
        "plan", "--preset", "tiny", "--mode", "guide", "--budget", "auto",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("(auto: "), "{stdout}");
    assert!(stdout.contains("available on cpu-heap"), "{stdout}");
    assert!(stdout.contains("10 % margin"), "{stdout}");
}

#[test]
fn measured_costs_are_cached() {
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("plan-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let run = || {
        latte_command()
            .args([
                "plan",
                "--preset",
                "tiny",
                "--mode",
                "train",
                "--precision",
                "f32",
                "--budget",
                "64MiB",
                "--measure",
                "--json",
            ])
            .env("XDG_CACHE_HOME", &cache)
            .output()
            .expect("run latte")
    };
    let first = run();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(String::from_utf8_lossy(&first.stderr).contains("measuring the stages"));
    let files: Vec<_> = std::fs::read_dir(cache.join("latte-rs")).unwrap().collect();
    assert_eq!(files.len(), 1);
    let second = run();
    assert!(!String::from_utf8_lossy(&second.stderr).contains("measuring the stages"));
    let report: Value = serde_json::from_slice(&second.stdout).unwrap();
    assert_eq!(chosen(&report)["costs"], "measured");
    let _ = std::fs::remove_dir_all(&cache);
}

/// Runs `latte profile` into a fresh directory and checks the whole step: measured within
/// `budget_bytes` and within 10 % of the plan's prediction. Returns the output directory.
fn profile_keeps_its_prediction(args: &[&str], budget_bytes: u64, name: &str) -> PathBuf {
    let out =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let mut all = vec!["profile"];
    all.extend_from_slice(args);
    all.extend(["--steps", "1", "--out", out.to_str().unwrap()]);
    let output = latte(&all);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("profile.json")).unwrap()).unwrap();
    let predicted = summary["predicted_peak_bytes"].as_f64().unwrap();
    let measured = summary["measured_peak_bytes"].as_f64().unwrap();
    assert!(
        (predicted - measured).abs() <= 0.1 * predicted && measured <= budget_bytes as f64,
        "{predicted} vs {measured}"
    );
    out
}

#[test]
fn profile_writes_the_timeline_and_both_plots() {
    // The whole training step — weights, AdamW state, EMA, batch, chain and update — as
    // `latte train` runs it, against the plan's account.
    let args = [
        "--preset",
        "tiny",
        "--mode",
        "train",
        "--precision",
        "f32",
        "--batch",
        "2",
        "--budget",
        "40MiB",
    ];
    let out = profile_keeps_its_prediction(&args, 40 << 20, "profile");
    let timeline: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("timeline.json")).unwrap()).unwrap();
    let names: Vec<&str> = timeline["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"step 1/forward"), "{names:?}");
    assert!(names.contains(&"step 1/update"), "{names:?}");
    assert!(
        names
            .iter()
            .any(|n| n.starts_with("step 1/backward spatial")),
        "{names:?}"
    );
    let png = std::fs::read(out.join("profile.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let svg = std::fs::read_to_string(out.join("profile.svg")).unwrap();
    assert!(
        svg.contains("predicted peak") && svg.contains("measured"),
        "SVG without labels"
    );
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn profile_of_guided_sampling_keeps_the_prediction() {
    let args = [
        "--preset",
        "tiny",
        "--mode",
        "guide",
        "--cfg",
        "--precision",
        "f32",
        "--budget",
        "12MiB",
    ];
    let out = profile_keeps_its_prediction(&args, 12 << 20, "profile-guide");
    let _ = std::fs::remove_dir_all(&out);
}

/// A pipeline's guided sampling lists its three phases: the text encoder's weights are
/// its stored tensors at the asked precision, and the sampling phase is the chosen row.
#[test]
fn pipeline_plans_list_their_phases() {
    let pipeline = common::fixtures().join("pipeline");
    let plan = |precision: &str| {
        common::plan_json(&[
            "plan",
            "--model",
            pipeline.to_str().unwrap(),
            "--mode",
            "guide",
            "--cfg",
            "--budget",
            "64MiB",
            "--text-encoder-precision",
            precision,
        ])
    };
    let report = plan("f32");
    let phases = report["phases"].as_array().expect("phases");
    let names: Vec<&str> = phases.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["text encoder", "sampling", "VAE decode"]);
    // The fixture's T5 is stored in f32: its weights are the shards' tensor bytes.
    let shards: u64 = std::fs::read_dir(pipeline.join("text_encoder"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        .map(|e| {
            let tensors =
                candle_core::safetensors::load(e.path(), &candle_core::Device::Cpu).unwrap();
            tensors
                .values()
                .map(|t| 4 * t.elem_count() as u64)
                .sum::<u64>()
        })
        .sum();
    assert_eq!(phases[0]["weights_bytes"].as_u64().unwrap(), shards);
    let sampling = &phases[1];
    let chosen = common::chosen(&report);
    assert_eq!(
        sampling["weights_bytes"].as_u64().unwrap() + sampling["transient_bytes"].as_u64().unwrap(),
        chosen["total_peak_bytes"].as_u64().unwrap()
    );
    let half = plan("bf16");
    assert_eq!(
        2 * half["phases"][0]["weights_bytes"].as_u64().unwrap(),
        shards
    );
}

/// `--ranks N --zero 1` plans one rank: an N-th of AdamW's moments and master weights, the
/// same weights and EMA, and data parallelism's transients listed.
#[test]
fn ranks_and_zero_plan_one_rank() {
    let plan = |ranks: &str, zero: &str| {
        let report = plan_json(&[
            "--device",
            "cuda",
            "plan",
            "--preset",
            "latte-1",
            "--mode",
            "train",
            "--precision",
            "bf16",
            "--budget",
            "80GiB",
            "--ranks",
            ranks,
            "--zero",
            zero,
        ]);
        chosen(&report)["account"].clone()
    };
    let (one, sharded) = (plan("1", "0"), plan("8", "1"));
    let bytes = |a: &Value, key: &str| a[key].as_u64().unwrap();
    assert_eq!(
        bytes(&sharded, "optimizer_moments_bytes"),
        bytes(&one, "optimizer_moments_bytes").div_ceil(8)
    );
    assert_eq!(
        bytes(&sharded, "master_weights_bytes"),
        bytes(&one, "master_weights_bytes").div_ceil(8)
    );
    assert_eq!(
        bytes(&sharded, "ema_bytes"),
        bytes(&one, "ema_bytes").div_ceil(8)
    );
    assert_eq!(bytes(&one, "communication_bytes"), 0);
    assert!(bytes(&sharded, "communication_bytes") > 0);
    // ZeRO 2: an eighth of the gradient sums, and no whole gradients after the chain.
    let zero2 = plan("8", "2");
    assert_eq!(
        bytes(&zero2, "grad_buffer_bytes"),
        bytes(&one, "grad_buffer_bytes").div_ceil(8)
    );
    assert_eq!(bytes(&zero2, "param_grad_bytes"), 0);
    assert_fails(
        &[
            "plan", "--preset", "tiny", "--mode", "guide", "--ranks", "2", "--budget", "1GiB",
        ],
        &["--ranks", "--mode train"],
    );
}
