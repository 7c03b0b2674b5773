//! From video files to a fine-tuned model to an MP4: `latte encode` on three short
//! ffmpeg `testsrc` videos, an image, a corrupt file and a caption file, with the tiny
//! pipeline fixture; `latte train` on the clips; `latte sample` to MP4, read back by
//! ffprobe. ffmpeg is optional for the test suite: without it these tests say so and pass,
//! unless `LATTE_REQUIRE_FFMPEG` is set (as `.ci/run` does after installing it).

mod common;

use common::{fixtures, latte_text, scratch};
use std::path::Path;
use std::process::Command;

fn ffmpeg_present() -> bool {
    common::optional_tool_present("ffmpeg", "-version", "LATTE_REQUIRE_FFMPEG")
}

/// `ffmpeg -f lavfi -i testsrc…` into `path`.
fn test_video(path: &Path, seconds: &str, size: &str) {
    let status = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-f", "lavfi", "-i"])
        .arg(format!("testsrc=duration={seconds}:size={size}:rate=10"))
        .args(["-pix_fmt", "yuv420p"])
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
}

fn clip_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn videos_to_clips_to_training_to_mp4() {
    if !ffmpeg_present() {
        return;
    }
    let dir = scratch("encode");
    let videos = dir.join("videos");
    std::fs::create_dir_all(&videos).unwrap();
    test_video(&videos.join("a.mp4"), "1", "64x48");
    test_video(&videos.join("b.webm"), "1", "40x40");
    test_video(&videos.join("c.mov"), "1", "32x64");
    test_video(&videos.join("short.mp4"), "0.2", "32x32");
    std::fs::write(videos.join("corrupt.mp4"), b"not a video").unwrap();
    std::fs::write(
        dir.join("captions.csv"),
        "path,caption\n\
         a.mp4,\"a test pattern, moving\"\n\
         b.webm,colour bars\n\
         ./c.mov,a counter\n\
         short.mp4,too short\n\
         corrupt.mp4,broken\n",
    )
    .unwrap();
    let pipeline = fixtures().join("pipeline");
    let clips = dir.join("clips");
    let captions = dir.join("captions.csv");
    let encode = [
        "encode",
        "--model",
        pipeline.to_str().unwrap(),
        "--videos",
        videos.to_str().unwrap(),
        "--captions",
        captions.to_str().unwrap(),
        "--out",
        clips.to_str().unwrap(),
        "--frame-stride",
        "2",
    ];
    let (ok, text) = latte_text(&encode);
    assert!(ok, "{text}");
    assert!(text.contains("encoded 3 clips"), "{text}");
    assert!(
        text.contains("skipped corrupt.mp4: ffmpeg cannot decode it"),
        "{text}"
    );
    assert!(
        text.contains("skipped short.mp4: 2 frames, fewer than the 5"),
        "{text}"
    );
    assert_eq!(
        clip_files(&clips),
        [
            "a.mp4.safetensors",
            "b.webm.safetensors",
            "c.mov.safetensors"
        ]
    );
    let clip =
        candle_core::safetensors::load(clips.join("a.mp4.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    // (C = 4 latent channels, F = video_length 3, 8x8 px / the VAE's 2 = 4x4), 120 tokens of T5.
    assert_eq!(clip["latents"].dims(), [4, 3, 4, 4]);
    assert_eq!(clip["encoder_hidden_states"].dims(), [120, 32]);

    // Resumable: a second run skips what is there and writes nothing new.
    let (ok, text) = latte_text(&encode);
    assert!(ok, "{text}");
    assert!(
        text.contains("encoded 0 clips") && text.contains("3 already there"),
        "{text}"
    );

    // Train 3 steps on the clips, then sample the trained transformer in the pipeline.
    let run = dir.join("run");
    let transformer = pipeline.join("transformer");
    let (ok, text) = latte_text(&[
        "train",
        "--model",
        transformer.to_str().unwrap(),
        "--data",
        clips.to_str().unwrap(),
        "--steps",
        "3",
        "--batch",
        "2",
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    let tuned = dir.join("tuned");
    copy_dir(&pipeline, &tuned);
    std::fs::remove_dir_all(tuned.join("transformer")).unwrap();
    copy_dir(
        &run.join("checkpoint-3/transformer"),
        &tuned.join("transformer"),
    );
    let out = dir.join("samples/car.safetensors");
    let (ok, text) = latte_text(&[
        "sample",
        "--model",
        tuned.to_str().unwrap(),
        "--prompt",
        "a red car",
        "--steps",
        "2",
        "--fps",
        "4",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    // The text encoder is freed before sampling: what it leaves is the embeddings only.
    let line = text
        .lines()
        .find(|l| l.starts_with("text encoder"))
        .unwrap_or_else(|| panic!("{text}"));
    let (peak, kept) = text_encoder_bytes(line);
    assert!(
        kept * 10.0 < peak,
        "the text encoder's memory was not released: {line}"
    );
    let mp4 = dir.join("samples/car.mp4");
    let probe = Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0", "-count_frames"])
        .args([
            "-show_entries",
            "stream=nb_read_frames,width,height,codec_name,pix_fmt",
        ])
        .args(["-of", "csv=p=0"])
        .arg(&mp4)
        .output()
        .unwrap();
    let probed = String::from_utf8_lossy(&probe.stdout).trim().to_string();
    // 3 frames of 8x8 px upscaled to 128x128, H.264 in yuv420p.
    assert_eq!(probed, "h264,128,128,yuv420p,3");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn captions_come_from_jsonl_or_text_files() {
    if !ffmpeg_present() {
        return;
    }
    let dir = scratch("encode-captions");
    let videos = dir.join("videos");
    std::fs::create_dir_all(&videos).unwrap();
    test_video(&videos.join("a.mp4"), "1", "32x32");
    test_video(&videos.join("b.mp4"), "1", "32x32");
    std::fs::write(videos.join("a.txt"), "a pattern\n").unwrap();
    let pipeline = fixtures().join("pipeline");
    let run = |captions: Option<&Path>, out: &str| {
        let out = dir.join(out);
        let mut args = vec![
            "encode".to_string(),
            "--model".into(),
            pipeline.display().to_string(),
            "--videos".into(),
            videos.display().to_string(),
            "--out".into(),
            out.display().to_string(),
        ];
        if let Some(file) = captions {
            args.extend(["--captions".into(), file.display().to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, text) = latte_text(&args);
        assert!(ok, "{text}");
        (clip_files(&out), text)
    };
    // `.txt` beside the video: b.mp4 has none.
    let (files, text) = run(None, "txt");
    assert_eq!(files, ["a.mp4.safetensors"]);
    assert!(text.contains("skipped b.mp4: no caption"), "{text}");
    let jsonl = dir.join("captions.jsonl");
    std::fs::write(
        &jsonl,
        "{\"path\": \"a.mp4\", \"caption\": \"first\"}\n{\"path\": \"b.mp4\", \"caption\": \"second\"}\n",
    )
    .unwrap();
    let (files, _) = run(Some(&jsonl), "jsonl");
    assert_eq!(files, ["a.mp4.safetensors", "b.mp4.safetensors"]);
    // A budget below T5's weights and one caption's activations is refused up front.
    let (ok, text) = latte_text(&[
        "encode",
        "--model",
        pipeline.to_str().unwrap(),
        "--videos",
        videos.to_str().unwrap(),
        "--out",
        dir.join("budget").to_str().unwrap(),
        "--budget",
        "100KiB",
    ]);
    assert!(
        !ok && text.contains("the text encoder needs about"),
        "{text}"
    );
    assert!(!dir.join("budget").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `(peak, kept)` bytes of `text encoder (F32): peak 1.7 MiB, 30.6 KiB kept after…`.
fn text_encoder_bytes(line: &str) -> (f64, f64) {
    let bytes = |text: &str| -> f64 {
        let mut words = text.split_whitespace();
        let value: f64 = words.next().unwrap().parse().unwrap();
        let unit = match words.next().unwrap() {
            "B" => 1.0,
            "KiB" => 1024.0,
            "MiB" => 1024.0 * 1024.0,
            "GiB" => 1024.0 * 1024.0 * 1024.0,
            other => panic!("unit {other} in {line}"),
        };
        value * unit
    };
    let after_peak = line.split("peak ").nth(1).unwrap();
    let (peak, rest) = after_peak.split_once(", ").unwrap();
    (bytes(peak), bytes(rest))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}
