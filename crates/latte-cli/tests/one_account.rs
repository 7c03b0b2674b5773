//! `latte plan` and `latte train` share one account: for the same flags, the policy that
//! `latte plan` chooses is the policy `latte train` prints and runs, and the plan lists the
//! EMA that training holds.

mod common;

use common::{chosen, latte_text, plan_json, scratch};
use serde_json::Value;

/// The chosen row of `latte plan --json` for a training workload of the tiny preset.
fn planned(precision: &str, batch: &str, grad_accum: &str, budget: &str) -> Value {
    let report = plan_json(&[
        "plan",
        "--preset",
        "tiny",
        "--mode",
        "train",
        "--precision",
        precision,
        "--batch",
        batch,
        "--grad-accum",
        grad_accum,
        "--budget",
        budget,
    ]);
    chosen(&report).clone()
}

/// The policy `latte train` prints for one step of the same workload.
fn trained_policy(precision: &str, batch: &str, grad_accum: &str, budget: &str) -> String {
    let out = scratch(&format!(
        "one-account-{precision}-{batch}-{grad_accum}-{budget}"
    ));
    let (ok, text) = latte_text(&[
        "train",
        "--preset",
        "tiny",
        "--steps",
        "1",
        "--precision",
        precision,
        "--batch",
        batch,
        "--grad-accum",
        grad_accum,
        "--budget",
        budget,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    let _ = std::fs::remove_dir_all(&out);
    let line = text
        .lines()
        .find(|l| l.starts_with("memory:"))
        .unwrap_or_else(|| panic!("no memory line in: {text}"));
    line.split("policy ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no policy in: {line}"))
        .to_string()
}

#[test]
fn train_runs_the_policy_that_plan_chooses() {
    for (precision, batch, grad_accum, budget) in [
        ("f32", "4", "1", "24MiB"),
        ("f32", "4", "1", "200MiB"),
        ("bf16", "2", "2", "20MiB"),
        ("f16", "3", "1", "24MiB"),
    ] {
        let row = planned(precision, batch, grad_accum, budget);
        let policy = row["policy"].as_str().unwrap();
        assert_eq!(
            trained_policy(precision, batch, grad_accum, budget),
            policy,
            "{precision} batch {batch} × {grad_accum} in {budget}"
        );
    }
}

#[test]
fn plan_lists_what_training_holds() {
    let row = planned("bf16", "2", "2", "40MiB");
    let account = &row["account"];
    for part in [
        "weights_bytes",
        "master_weights_bytes",
        "optimizer_moments_bytes",
        "ema_bytes",
        "grad_buffer_bytes",
    ] {
        assert!(account[part].as_u64().unwrap() > 0, "{part}: {account}");
    }
    // The EMA is an f32 copy of the weights: twice the bf16 weights.
    assert_eq!(
        account["ema_bytes"].as_u64().unwrap(),
        2 * account["weights_bytes"].as_u64().unwrap()
    );
    let (ok, table) = latte_text(&[
        "plan",
        "--preset",
        "tiny",
        "--mode",
        "train",
        "--precision",
        "bf16",
        "--batch",
        "2",
        "--budget",
        "40MiB",
    ]);
    assert!(ok, "{table}");
    assert!(table.contains("EMA"), "{table}");
}
