//! `latte sample --prompt` on the tiny random LattePipeline of
//! `tests/fixtures/pipeline` (`tools/make_pipeline_fixture.py`): the video is written,
//! missing components and a missing tokenizer.json are clear errors, and an over-long
//! prompt warns with what was cut. Numerical parity with diffusers is tested in
//! `crates/latte/tests/pipeline_parity.rs`.

mod common;

use common::{fixtures, latte_text, scratch};
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    fixtures().join("pipeline")
}

/// A copy of the fixture pipeline without `skip` (a top-level entry).
fn copy_without(skip: &str, to: &Path) -> PathBuf {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }
    let dir = to.join("pipeline");
    copy(&fixture(), &dir);
    let removed = dir.join(skip);
    if removed.is_dir() {
        std::fs::remove_dir_all(removed).unwrap();
    } else {
        std::fs::remove_file(removed).unwrap();
    }
    dir
}

fn sample_args<'a>(model: &'a str, prompt: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "sample", "--model", model, "--prompt", prompt, "--steps", "2", "--out", out,
    ]
}

#[test]
fn prompt_to_gif() {
    let dir = scratch("gif");
    let out = dir.join("cactus.safetensors");
    let model = fixture().display().to_string();
    let mut args = sample_args(&model, "A small cactus", out.to_str().unwrap());
    args.extend(["--negative-prompt", "blurry"]);
    let (ok, text) = latte_text(&args);
    assert!(ok, "{text}");
    assert!(!text.contains("truncated"), "{text}");
    assert!(out.is_file() && dir.join("cactus.gif").is_file(), "{text}");
    assert!(dir.join("cactus-frame-002.png").is_file(), "{text}");
    let tensors = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    assert_eq!(tensors["latents"].dims(), &[1, 4, 3, 4, 4]);
    // the VAE doubles the side (two blocks); the video is in [0, 1]
    let video = &tensors["video"];
    assert_eq!(video.dims(), &[1, 3, 3, 8, 8]);
    let values = video.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(values.iter().all(|v| (0.0..=1.0).contains(v)));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn overlong_prompt_warns_with_what_was_cut() {
    let dir = scratch("long");
    let out = dir.join("long.safetensors");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("expected.json")).unwrap())
            .unwrap();
    let case = &meta["prompts"][2];
    let model = fixture().display().to_string();
    let args = sample_args(
        &model,
        case["prompt"].as_str().unwrap(),
        out.to_str().unwrap(),
    );
    let (ok, text) = latte_text(&args);
    assert!(ok, "{text}");
    let cut = case["truncated"].as_str().unwrap();
    assert!(
        text.contains("truncated") && text.contains(cut),
        "expected a warning quoting {cut:?}:\n{text}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn missing_components_are_named() {
    for (skip, needle) in [
        ("vae", "has no vae/"),
        ("text_encoder", "has no text_encoder/"),
        ("tokenizer/tokenizer.json", "tools/convert_tokenizer.py"),
    ] {
        let dir = scratch(&skip.replace('/', "-"));
        let model = copy_without(skip, &dir);
        let out = dir.join("x.safetensors");
        let model = model.display().to_string();
        let (ok, text) = latte_text(&sample_args(&model, "a cat", out.to_str().unwrap()));
        assert!(!ok, "{skip}: {text}");
        assert!(
            text.contains(needle),
            "{skip}: expected {needle:?} in\n{text}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
