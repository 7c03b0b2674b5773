//! Data parallelism over MPI (feature `mpi`): `mpirun -n 2 latte train` with batch 1 takes
//! the steps of one process with batch 2, and resumes exactly. Without `mpirun` on PATH
//! the test says so and passes, unless `LATTE_REQUIRE_MPI` is set (as `.ci/run` does
//! when it could install OpenMPI).
#![cfg(feature = "mpi")]

mod common;

use common::{chosen, latte_text, plan_json, scratch};
use std::path::Path;
use std::process::Command;

fn mpirun_present() -> bool {
    common::optional_tool_present("mpirun", "--version", "LATTE_REQUIRE_MPI")
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
    common::outcome(&out)
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

/// The measured memory rank `rank` logged at the end of a run (`latte -v train`): its
/// `optimizer_bytes`, `ema_bytes` and `gradient_bytes`.
fn held(log: &str, rank: usize) -> std::collections::HashMap<String, u64> {
    let line = log
        .lines()
        .find(|l| l.contains("memory held (measured)") && l.contains(&format!("rank={rank} ")))
        .unwrap_or_else(|| panic!("no measured memory of rank {rank} in\n{log}"));
    line.split_whitespace()
        .filter_map(|field| {
            let (key, value) = field.split_once('=')?;
            Some((key.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// Every rank logged the same fingerprint of its final weights (`latte -v train`).
fn assert_same_weights_on_every_rank(log: &str, label: &str) {
    let digests: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("weights at the end"))
        .filter_map(|l| l.split_whitespace().find_map(|f| f.strip_prefix("digest=")))
        .collect();
    assert_eq!(digests.len(), 2, "{label}: one digest per rank\n{log}");
    assert_eq!(digests[0], digests[1], "{label}: the ranks' weights differ");
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
    let mut args = vec!["-v".to_string()];
    args.extend(train("2", "3", &single));
    let (ok, text_single) = latte_text(&as_str(&args));
    assert!(ok, "{text_single}");
    let ranks = dir.join("ranks");
    let mut args = vec!["-v".to_string()];
    args.extend(train("1", "3", &ranks));
    let (ok, text) = mpirun(2, &as_str(&args));
    assert!(ok, "{text}");
    assert!(text.contains("data parallel: 2 ranks"), "{text}");
    assert_same_weights_on_every_rank(&text, "ZeRO 0");
    for (a, b) in losses(&ranks).iter().zip(losses(&single)) {
        assert!((a - b).abs() <= 1e-6 * b.abs(), "{a} vs {b}");
    }
    let error = weight_error(&ranks.join("checkpoint-3"), &single.join("checkpoint-3"));
    assert!(error < 1e-6, "weights: {error:e}");
    // ZeRO 1 and 2 shard AdamW's state (and the gradients) over the ranks and change the
    // results by rounding at most (ZeRO 1 by none: the same sums in the same order).
    let single_held = held(&text_single, 0);
    for zero in ["1", "2"] {
        let sharded = dir.join(format!("zero{zero}"));
        let mut args = vec!["-v".to_string()];
        args.extend(train("1", "3", &sharded));
        args.extend(["--zero".to_string(), zero.to_string()]);
        let (ok, text) = mpirun(2, &as_str(&args));
        assert!(ok, "{text}");
        assert_same_weights_on_every_rank(&text, &format!("ZeRO {zero}"));
        for (a, b) in losses(&sharded).iter().zip(losses(&ranks)) {
            assert!((a - b).abs() <= 1e-6 * b.abs(), "ZeRO {zero}: {a} vs {b}");
        }
        let error = weight_error(&sharded.join("checkpoint-3"), &ranks.join("checkpoint-3"));
        assert!(error < 1e-6, "ZeRO {zero}: weights {error:e}");
        if zero == "1" {
            assert_eq!(error, 0.0);
        }
        // Each rank's state (and with ZeRO 2 its gradients), measured by the counting
        // allocator: half of one process's, within 5 %; and each rank's step within what
        // `latte plan --ranks 2 --zero K` predicts for it.
        let plan = plan_json(&[
            "plan", "--preset", "tiny", "--mode", "train", "--batch", "1", "--ranks", "2",
            "--zero", zero, "--budget", "1GiB",
        ]);
        let row = chosen(&plan);
        let resident: u64 = [
            "weights_bytes",
            "master_weights_bytes",
            "optimizer_moments_bytes",
        ]
        .iter()
        .chain(&["ema_bytes", "handles_bytes"])
        .map(|part| row["account"][part].as_u64().unwrap())
        .sum();
        let predicted_step = row["total_peak_bytes"].as_u64().unwrap() - resident;
        for rank in 0..2 {
            let rank_held = held(&text, rank);
            let step = rank_held["step_peak_bytes"];
            assert!(
                step <= predicted_step && step * 5 >= predicted_step * 4,
                "ZeRO {zero}, rank {rank}: step peak {step} against {predicted_step} planned"
            );
            let mut measured = vec!["optimizer_bytes", "ema_bytes"];
            if zero == "2" {
                measured.push("gradient_bytes");
            }
            for field in measured {
                let share = rank_held[field] as f64 / single_held[field] as f64;
                assert!(
                    (share - 0.5).abs() <= 0.05 * 0.5,
                    "ZeRO {zero}, rank {rank}: {field} is {share} of one process's\n{text}"
                );
            }
        }
    }

    // Stopped after 2 steps and resumed on 2 ranks: the same losses and weights, bitwise,
    // replicated and with ZeRO 2.
    for (zero, whole) in [("0", ranks.clone()), ("2", dir.join("zero2"))] {
        let split = dir.join(format!("split{zero}"));
        let mut args = train("1", "2", &split);
        args.extend(["--zero".to_string(), zero.to_string()]);
        let (ok, text) = mpirun(2, &as_str(&args));
        assert!(ok, "{text}");
        let mut resume = vec!["train", "--resume", split.to_str().unwrap(), "--steps", "3"];
        resume.extend(["--out", split.to_str().unwrap()]);
        let (ok, text) = mpirun(2, &resume);
        assert!(ok, "{text}");
        assert_eq!(losses(&split), losses(&whole), "ZeRO {zero}");
        assert_eq!(
            weight_error(&split.join("checkpoint-3"), &whole.join("checkpoint-3")),
            0.0,
            "ZeRO {zero}"
        );
    }
    // Resumed by one process, a run of 2 ranks continues with half the global batch: said.
    let alone = dir.join("alone");
    let split = dir.join("split0").join("checkpoint-2");
    let (ok, text) = latte_text(&[
        "train",
        "--resume",
        split.to_str().unwrap(),
        "--steps",
        "3",
        "--out",
        alone.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains("the number of ranks (2 -> 1")
            && text.contains("no longer continues exactly"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The processes whose command line holds `needle` (from /proc).
fn processes_with(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) && !cmdline.contains("mpirun") {
            found.push(pid);
        }
    }
    found
}

/// A rank killed mid-run ends the whole run with an error within 60 s: no rank waits
/// forever for the dead one.
#[test]
fn a_killed_rank_ends_the_run() {
    if !mpirun_present() {
        return;
    }
    let dir = scratch("mpi-kill");
    let out = dir.join("run-that-loses-a-rank");
    let mut child = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-n", "2"])
        .arg(env!("CARGO_BIN_EXE_latte"))
        .args([
            "train", "--preset", "tiny", "--batch", "1", "--steps", "100000",
        ])
        .args(["--save-every", "0", "--out"])
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the ranks train, then kill one.
    let started = std::time::Instant::now();
    while std::fs::read_to_string(out.join("metrics.jsonl")).map_or(true, |m| m.is_empty()) {
        assert!(started.elapsed().as_secs() < 120, "the run did not start");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let needle = out.to_string_lossy().into_owned();
    let ranks = processes_with(&needle);
    assert_eq!(ranks.len(), 2, "{ranks:?}");
    let killed = Command::new("kill")
        .args(["-9", &ranks[1].to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let killed_at = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            killed_at.elapsed().as_secs() < 60,
            "the run still runs 60 s after a rank died"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("rank 1"), "{stderr}");
    assert!(
        processes_with(&needle).is_empty(),
        "a rank outlived the run"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
