//! Writing a pixel-space video `(1, 3, F, H, W)` in [-1, 1] as an animated GIF, PNG
//! frames, a strip of all frames side by side (for pages that show no animation) and,
//! when ffmpeg is present, an H.264 MP4, next to a given path, upscaled (nearest
//! neighbour) to at least 128 pixels; each file is written atomically.

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use latte::io::write_atomically;
use std::path::{Path, PathBuf};

/// Smallest side of the written images, in pixels.
const MIN_SIDE_PX: usize = 128;

/// GIF frame delay, in hundredths of a second.
const FRAME_DELAY_CS: u16 = 12;

/// Width of the mid-grey gap between the frames of the strip, in pixels.
const STRIP_GAP_PX: usize = 4;

/// What [`write_video`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The animated GIF.
    pub gif: PathBuf,
    /// The MP4, when one was asked for and ffmpeg is present.
    pub mp4: Option<PathBuf>,
}

/// Writes `<stem>.gif`, `<stem>-frame-NNN.png`, `<stem>-strip.png` and, with `mp4_fps`
/// and ffmpeg present, `<stem>.mp4` beside `out`.
pub fn write_video(video: &Tensor, out: &Path, mp4_fps: Option<f64>) -> Result<Written> {
    let (_, c, f, h, w) = video.dims5()?;
    anyhow::ensure!(
        c == 3,
        "only 3-channel (RGB) videos can be written, got {c} channels"
    );
    let values = video
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let scale = MIN_SIDE_PX.div_ceil(h.min(w)).max(1);
    let (hs, ws) = (h * scale, w * scale);
    let frames: Vec<Vec<u8>> = (0..f)
        .map(|frame| {
            let mut rgb = vec![0u8; hs * ws * 3];
            for y in 0..hs {
                for x in 0..ws {
                    for ch in 0..3 {
                        let v = values[((ch * f + frame) * h + y / scale) * w + x / scale];
                        rgb[(y * ws + x) * 3 + ch] =
                            ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8;
                    }
                }
            }
            rgb
        })
        .collect();
    let stem = out.with_extension("");
    let beside = |suffix: &str| {
        let mut name = stem.clone().into_os_string();
        name.push(suffix);
        PathBuf::from(name)
    };
    let gif_path = beside(".gif");
    let mut gif_bytes = Vec::new();
    {
        let mut encoder = gif::Encoder::new(&mut gif_bytes, ws as u16, hs as u16, &[])?;
        encoder.set_repeat(gif::Repeat::Infinite)?;
        for rgb in &frames {
            let mut frame = gif::Frame::from_rgb_speed(ws as u16, hs as u16, rgb, 10);
            frame.delay = FRAME_DELAY_CS;
            encoder.write_frame(&frame)?;
        }
    }
    write_atomically(&gif_path, &gif_bytes)
        .with_context(|| format!("cannot write {}", gif_path.display()))?;
    for (i, rgb) in frames.iter().enumerate() {
        let path = beside(&format!("-frame-{i:03}.png"));
        write_atomically(&path, &png_bytes(rgb, ws as u32, hs as u32)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let (strip, strip_width) = strip(&frames, ws, hs);
    let path = beside("-strip.png");
    write_atomically(&path, &png_bytes(&strip, strip_width as u32, hs as u32)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    let mp4 = match mp4_fps {
        Some(fps) if crate::ffmpeg::available() => {
            let path = beside(".mp4");
            let frames = crate::ffmpeg::Frames {
                width: ws,
                height: hs,
                rgb: frames.concat(),
            };
            crate::ffmpeg::write_mp4(&frames, fps, &path)?;
            Some(path)
        }
        _ => None,
    };
    Ok(Written { gif: gif_path, mp4 })
}

/// The RGB frames (`width × height` each) side by side, [`STRIP_GAP_PX`] of mid-grey
/// between them, and the strip's width.
fn strip(frames: &[Vec<u8>], width: usize, height: usize) -> (Vec<u8>, usize) {
    let pitch = width + STRIP_GAP_PX;
    let strip_width = (frames.len() * pitch).saturating_sub(STRIP_GAP_PX);
    let mut strip = vec![128u8; strip_width * height * 3];
    for (i, rgb) in frames.iter().enumerate() {
        for y in 0..height {
            let to = (y * strip_width + i * pitch) * 3;
            strip[to..to + width * 3].copy_from_slice(&rgb[y * width * 3..(y + 1) * width * 3]);
        }
    }
    (strip, strip_width)
}

/// An 8-bit RGB image (`width × height × 3` bytes, row-major) encoded as PNG.
pub fn png_bytes(rgb: &[u8], width: u32, height: u32) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Best);
    encoder.set_adaptive_filter(png::AdaptiveFilterType::Adaptive);
    encoder.write_header()?.write_image_data(rgb)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn files_keep_every_dot_of_the_output_name() {
        let dir = std::env::temp_dir().join(format!("latte-video-out-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let video = Tensor::zeros((1, 3, 2, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let written = write_video(&video, &dir.join("scale-0.3.safetensors"), None).unwrap();
        assert_eq!(written.gif, dir.join("scale-0.3.gif"));
        assert_eq!(written.mp4, None);
        for name in [
            "scale-0.3.gif",
            "scale-0.3-frame-000.png",
            "scale-0.3-frame-001.png",
            "scale-0.3-strip.png",
        ] {
            assert!(dir.join(name).is_file(), "{name} not written");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_strip_puts_frames_side_by_side_with_grey_gaps() {
        // Two 2×1 frames: black and white.
        let frames = vec![vec![0u8; 6], vec![255u8; 6]];
        let (strip, width) = strip(&frames, 2, 1);
        assert_eq!(width, 2 + STRIP_GAP_PX + 2);
        let mut expected = vec![0u8; 6];
        expected.extend(vec![128u8; 3 * STRIP_GAP_PX]);
        expected.extend(vec![255u8; 6]);
        assert_eq!(strip, expected);
    }
}
