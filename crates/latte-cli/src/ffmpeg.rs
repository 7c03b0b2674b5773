//! Video files through ffmpeg's command line: decoding any format it reads to RGB frames
//! at a given size (resized to cover it, then centre-cropped, as Latte's training
//! transforms do), and writing H.264 MP4. ffmpeg is optional: commands that need it say
//! how to install it.

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

/// How to get ffmpeg, for error messages.
const INSTALL_HINT: &str = "install ffmpeg (Debian/Ubuntu: `apt install ffmpeg`, macOS: \
                            `brew install ffmpeg`, conda: `conda install -c conda-forge ffmpeg`) \
                            or put it on PATH";

/// Whether `ffmpeg` runs.
pub fn available() -> bool {
    Command::new("ffmpeg")
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// An error unless `ffmpeg` runs.
pub fn require(purpose: &str) -> Result<()> {
    if available() {
        Ok(())
    } else {
        bail!("{purpose} needs ffmpeg, which was not found: {INSTALL_HINT}")
    }
}

/// RGB frames of one video, `width × height` each, row-major, 3 bytes a pixel.
#[derive(Debug, Clone)]
pub struct Frames {
    pub width: usize,
    pub height: usize,
    /// Every frame's bytes, one after another.
    pub rgb: Vec<u8>,
}

impl Frames {
    /// Number of frames.
    pub fn len(&self) -> usize {
        self.rgb.len() / (3 * self.width * self.height).max(1)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Frame `i`'s bytes.
    pub fn frame(&self, i: usize) -> &[u8] {
        let size = 3 * self.width * self.height;
        &self.rgb[i * size..(i + 1) * size]
    }
}

/// Decodes up to `max_frames` frames of `path` (a video, or an image: one frame), each
/// resized so that it covers `width × height` (bilinear) and centre-cropped to it. The
/// error carries ffmpeg's own message (a corrupt or empty file).
pub fn decode(path: &Path, width: usize, height: usize, max_frames: usize) -> Result<Frames> {
    let filter = format!(
        "scale={width}:{height}:force_original_aspect_ratio=increase:flags=bilinear,\
         crop={width}:{height}"
    );
    let output = Command::new("ffmpeg")
        .args(["-nostdin", "-v", "error", "-i"])
        .arg(path)
        .args(["-vf", &filter, "-frames:v", &max_frames.to_string()])
        .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run ffmpeg: {INSTALL_HINT}"))?;
    if !output.status.success() {
        let message = String::from_utf8_lossy(&output.stderr);
        let first = message.lines().last().unwrap_or("no message").trim();
        bail!("ffmpeg cannot decode it: {first}");
    }
    let frames = Frames {
        width,
        height,
        rgb: output.stdout,
    };
    if frames.is_empty() {
        bail!("ffmpeg decoded no frame");
    }
    Ok(frames)
}

/// Writes `frames` as H.264 MP4 (yuv420p, `fps` frames a second) at `path`, through a
/// temporary file renamed over it. Odd sizes are padded by one pixel (yuv420p needs even).
pub fn write_mp4(frames: &Frames, fps: f64, path: &Path) -> Result<()> {
    let tmp = latte::io::temporary_path(path);
    let mut child = Command::new("ffmpeg")
        .args([
            "-nostdin", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
        ])
        .args(["-s", &format!("{}x{}", frames.width, frames.height)])
        .args(["-r", &fps.to_string(), "-i", "pipe:0"])
        .args(["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2"])
        .args(["-c:v", "libx264", "-pix_fmt", "yuv420p", "-f", "mp4"])
        .arg(&tmp)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run ffmpeg: {INSTALL_HINT}"))?;
    let written = child
        .stdin
        .take()
        .context("ffmpeg's input")?
        .write_all(&frames.rgb);
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    let status = child.wait()?;
    if written.is_err() || !status.success() {
        let _ = std::fs::remove_file(&tmp);
        bail!(
            "ffmpeg could not write {}: {}",
            path.display(),
            stderr.lines().last().unwrap_or("no message")
        );
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}
