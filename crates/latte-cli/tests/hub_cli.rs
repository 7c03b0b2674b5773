//! Models by Hugging Face Hub id, with no network: a synthetic cache laid out as
//! huggingface_hub writes it (`models--ORG--NAME/refs/<revision>`, `snapshots/<commit>/…`
//! as relative links into `blobs/`) under a temporary `HF_HOME`, with `HF_HUB_OFFLINE=1`.

mod common;

use common::{fixtures, latte_command, scratch};
use std::path::{Path, PathBuf};

/// Two commits of `org/tiny-latte`: the tiny pipeline fixture (`main`), and the same with
/// the `batch` case's transformer (`v2`).
const MAIN_COMMIT: &str = "1111111111111111111111111111111111111111";
const V2_COMMIT: &str = "2222222222222222222222222222222222222222";

/// Adds `source`'s files to `snapshots/<commit>/` of the repository folder `repo` as
/// links into `blobs/`, as huggingface_hub stores them.
fn add_snapshot(repo: &Path, commit: &str, source: &Path, into: &str) {
    let mut pending = vec![source.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            let relative = Path::new(into).join(path.strip_prefix(source).unwrap());
            let bytes = std::fs::read(&path).unwrap();
            let blob = format!("{:016x}{:08x}", fnv1a(&bytes), bytes.len());
            std::fs::create_dir_all(repo.join("blobs")).unwrap();
            std::fs::write(repo.join("blobs").join(&blob), &bytes).unwrap();
            let link = repo.join("snapshots").join(commit).join(&relative);
            std::fs::create_dir_all(link.parent().unwrap()).unwrap();
            let depth = relative.components().count() + 1;
            let target: PathBuf = std::iter::repeat_n("..", depth)
                .collect::<PathBuf>()
                .join("blobs")
                .join(&blob);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(target, &link).unwrap();
        }
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn set_ref(repo: &Path, name: &str, commit: &str) {
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join(name), commit).unwrap();
}

/// `HF_HOME` with `org/tiny-latte` (main and v2) and `org/broken` (main: the pipeline
/// without its transformer's weights).
fn synthetic_home(name: &str) -> PathBuf {
    let home = scratch(name);
    let hub = home.join("hub");
    let pipeline = fixtures().join("pipeline");
    let tiny = hub.join("models--org--tiny-latte");
    add_snapshot(&tiny, MAIN_COMMIT, &pipeline, "");
    set_ref(&tiny, "main", MAIN_COMMIT);
    add_snapshot(&tiny, V2_COMMIT, &pipeline, "");
    add_snapshot(
        &tiny,
        V2_COMMIT,
        &fixtures().join("batch/model"),
        "transformer",
    );
    set_ref(&tiny, "v2", V2_COMMIT);
    let broken = hub.join("models--org--broken");
    add_snapshot(&broken, MAIN_COMMIT, &pipeline, "");
    set_ref(&broken, "main", MAIN_COMMIT);
    std::fs::remove_file(
        broken
            .join("snapshots")
            .join(MAIN_COMMIT)
            .join("transformer/diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    home
}

/// Runs `latte` offline against `home`: success, and stdout with stderr.
fn latte_offline(home: &Path, args: &[&str]) -> (bool, String) {
    let out = latte_command()
        .args(args)
        .env("HF_HOME", home)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_TOKEN")
        .output()
        .unwrap();
    let (ok, text) = common::outcome(&out);
    assert!(!text.contains("panicked"), "{args:?} panicked: {text}");
    (ok, text)
}

/// The `total` line of `latte inspect`.
fn total_line(text: &str) -> String {
    text.lines()
        .find(|l| l.starts_with("total"))
        .unwrap_or_else(|| panic!("no total in: {text}"))
        .to_string()
}

#[test]
fn ids_resolve_through_the_cache() {
    let home = synthetic_home("hub-ok");
    let (ok, main) = latte_offline(&home, &["inspect", "--model", "org/tiny-latte/transformer"]);
    assert!(ok, "{main}");
    let (ok, local) = latte_offline(
        &home,
        &[
            "inspect",
            "--model",
            fixtures().join("pipeline/transformer").to_str().unwrap(),
        ],
    );
    assert!(ok, "{local}");
    assert_eq!(total_line(&main), total_line(&local));
    // A revision by tag, and by commit, picks the second snapshot.
    let (ok, v2) = latte_offline(
        &home,
        &["inspect", "--model", "org/tiny-latte/transformer@v2"],
    );
    assert!(ok, "{v2}");
    let (ok, batch) = latte_offline(
        &home,
        &[
            "inspect",
            "--model",
            fixtures().join("batch/model").to_str().unwrap(),
        ],
    );
    assert!(ok, "{batch}");
    assert_eq!(total_line(&v2), total_line(&batch));
    assert_ne!(total_line(&v2), total_line(&main));
    let by_commit = format!("org/tiny-latte/transformer@{V2_COMMIT}");
    let (ok, commit) = latte_offline(&home, &["inspect", "--model", &by_commit]);
    assert!(ok, "{commit}");
    assert_eq!(total_line(&commit), total_line(&batch));

    // The pipeline by its id: prompt to video.
    let out = home.join("samples/cactus.safetensors");
    let (ok, text) = latte_offline(
        &home,
        &[
            "sample",
            "--model",
            "org/tiny-latte",
            "--prompt",
            "A small cactus",
            "--steps",
            "2",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(ok, "{text}");
    assert!(out.is_file() && home.join("samples/cactus.gif").is_file());
    let _ = std::fs::remove_dir_all(&home);
}

#[test]
fn missing_files_and_unknown_repos_fail_clearly() {
    let home = synthetic_home("hub-bad");
    let (ok, text) = latte_offline(&home, &["inspect", "--model", "org/broken/transformer"]);
    assert!(!ok);
    for needle in [
        "org/broken/transformer@main",
        "transformer/diffusion_pytorch_model.safetensors",
        "HF_HUB_OFFLINE",
    ] {
        assert!(text.contains(needle), "`{needle}` not in: {text}");
    }
    let (ok, text) = latte_offline(&home, &["inspect", "--model", "org/none"]);
    assert!(!ok);
    assert!(
        text.contains("org/none@main") && text.contains("not in the Hugging Face cache"),
        "{text}"
    );
    let (ok, text) = latte_offline(&home, &["inspect", "--model", "org/tiny-latte@v9"]);
    assert!(!ok);
    assert!(text.contains("revision `v9`"), "{text}");
    let (ok, text) = latte_offline(&home, &["inspect", "--model", "no/such/dir/../x"]);
    assert!(!ok);
    assert!(text.contains("not a Hugging Face Hub id"), "{text}");
    let _ = std::fs::remove_dir_all(&home);
}
