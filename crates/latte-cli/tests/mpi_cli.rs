//! Data parallelism over MPI (feature `mpi`): `mpirun -n 2 latte train` with batch 1 takes
//! the steps of one process with batch 2, and resumes exactly. Without `mpirun` on PATH
//! the test says so and passes, unless `LATTE_REQUIRE_MPI` is set (as `.ci/run` does
//! when it could install OpenMPI).
#![cfg(feature = "mpi")]

mod common;

use common::{latte_text, scratch};
use std::path::Path;
use std::process::Command;

fn mpirun_present() -> bool {
    let present = Command::new("mpirun")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !present {
        assert!(
            std::env::var_os("LATTE_REQUIRE_MPI").is_none(),
            "LATTE_REQUIRE_MPI is set but mpirun is not on PATH"
        );
        eprintln!("mpirun not found: skipping the MPI tests");
    }
    present
}

/// `mpirun -n ranks latte args…`: success, and the output.
fn mpirun(ranks: usize, args: &[&str]) -> (bool, String) {
    let out = Command::new("mpirun")
        .args([
            "--allow-run-as-root",
            "--oversubscribe",
            "-n",
            &ranks.to_string(),
        ])
        .arg(env!("CARGO_BIN_EXE_latte"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

fn as_str(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The largest weight difference relative to the largest weight.
fn weight_error(a: &Path, b: &Path) -> f32 {
    let file = "transformer/diffusion_pytorch_model.safetensors";
    let load = |run: &Path| {
        candle_core::safetensors::load(run.join(file), &candle_core::Device::Cpu).unwrap()
    };
    let (a, b) = (load(a), load(b));
    let (mut diff, mut scale) = (0f32, 0f32);
    for (name, x) in &a {
        let y = &b[name];
        let d = (x - y).unwrap().abs().unwrap().max_all().unwrap();
        diff = diff.max(d.to_scalar::<f32>().unwrap());
        scale = scale.max(
            y.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
        );
    }
    diff / scale
}

#[test]
fn two_ranks_equal_one_process_with_the_global_batch_and_resume_exactly() {
    if !mpirun_present() {
        return;
    }
    let dir = scratch("mpi");
    let train = |batch: &str, steps: &str, out: &Path| {
        vec![
            "train".to_string(),
            "--preset".into(),
            "tiny".into(),
            "--batch".into(),
            batch.into(),
            "--steps".into(),
            steps.into(),
            "--save-every".into(),
            "2".into(),
            "--out".into(),
            out.display().to_string(),
        ]
    };
    let single = dir.join("single");
    let (ok, text) = latte_text(&as_str(&train("2", "3", &single)));
    assert!(ok, "{text}");
    let ranks = dir.join("ranks");
    let (ok, text) = mpirun(2, &as_str(&train("1", "3", &ranks)));
    assert!(ok, "{text}");
    assert!(text.contains("data parallel: 2 ranks"), "{text}");
    for (a, b) in losses(&ranks).iter().zip(losses(&single)) {
        assert!((a - b).abs() <= 1e-6 * b.abs(), "{a} vs {b}");
    }
    let error = weight_error(&ranks.join("checkpoint-3"), &single.join("checkpoint-3"));
    assert!(error < 1e-6, "weights: {error:e}");

    // Stopped after 2 steps and resumed on 2 ranks: the same losses and weights, bitwise.
    let split = dir.join("split");
    let (ok, text) = mpirun(2, &as_str(&train("1", "2", &split)));
    assert!(ok, "{text}");
    let mut resume = vec!["train", "--resume", split.to_str().unwrap(), "--steps", "3"];
    resume.extend(["--out", split.to_str().unwrap()]);
    let (ok, text) = mpirun(2, &resume);
    assert!(ok, "{text}");
    assert_eq!(losses(&split), losses(&ranks));
    assert_eq!(
        weight_error(&split.join("checkpoint-3"), &ranks.join("checkpoint-3")),
        0.0
    );
    let _ = std::fs::remove_dir_all(&dir);
}
