//! What the CLI tests share: running the `latte` binary, the fixtures, scratch
//! directories and the checks of a clean failure.

// Each test binary compiles this module and uses a part of it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

/// A command running the `latte` binary under test.
pub fn latte_command() -> Command {
    Command::new(env!("CARGO_BIN_EXE_latte"))
}

/// Runs `latte` with `args`.
pub fn latte(args: &[&str]) -> Output {
    latte_command()
        .args(args)
        .output()
        .expect("the latte binary runs")
}

/// Runs `latte` with `args`: whether it succeeded, and its stdout and stderr together.
pub fn latte_text(args: &[&str]) -> (bool, String) {
    outcome(&latte(args))
}

/// Whether a finished command succeeded, and its stdout and stderr together.
pub fn outcome(out: &Output) -> (bool, String) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Runs a command expected to fail: a non-zero exit, no panic, and every `needle` in its
/// stderr.
pub fn assert_fails(args: &[&str], needles: &[&str]) {
    let output = latte(args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{args:?} succeeded");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "{args:?}: `{needle}` not in: {stderr}"
        );
    }
}

/// The repository's test fixtures.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// A fresh, empty scratch directory for one test of this process.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("latte-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs a plan with `--json` and returns its report.
pub fn plan_json(args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    let output = latte(&all);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{all:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// The chosen candidate of a `latte plan --json` report.
pub fn chosen(report: &serde_json::Value) -> &serde_json::Value {
    let index = report["chosen"].as_u64().expect("a chosen candidate") as usize;
    &report["candidates"][index]
}

/// Whether the optional system tool `program` runs (`program version_flag` succeeds).
/// Without it the caller's tests skip, saying so — unless the environment variable
/// `required_by` is set (as `.ci/run` does after installing the tool), which makes its
/// absence a failure.
pub fn optional_tool_present(program: &str, version_flag: &str, required_by: &str) -> bool {
    let present = Command::new(program)
        .arg(version_flag)
        .output()
        .is_ok_and(|o| o.status.success());
    if !present {
        assert!(
            std::env::var_os(required_by).is_none(),
            "{required_by} is set but {program} is not on PATH"
        );
        eprintln!("{program} not found: skipping these tests");
    }
    present
}
