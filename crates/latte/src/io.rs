//! Writing files so that a failure never leaves a half-written output: write a temporary
//! file beside the target, then rename it over the target. And reading JSON files.

use candle_core::Tensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The temporary sibling of `path` (`dir/.name.tmp`) that atomic writes rename.
pub fn temporary_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

/// Reads and parses the JSON file at `path`; the error is the read's or the parse's
/// message, for the caller to wrap with the file's name.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    serde_json::from_str(&text).map_err(|e| e.to_string())
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = temporary_path(path);
    let result = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Saves `tensors` as a safetensors file at `path` atomically; errors name the path.
pub fn save_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> candle_core::Result<()> {
    let tmp = temporary_path(path);
    let result = candle_core::safetensors::save(tensors, &tmp)
        .and_then(|()| std::fs::rename(&tmp, path).map_err(candle_core::Error::from));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(candle_core::Error::Msg(format!(
            "cannot write {}: {e}",
            path.display()
        )));
    }
    Ok(())
}
