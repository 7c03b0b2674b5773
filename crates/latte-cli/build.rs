//! With the `cuda` feature: lets the link find `-lcudart` as the static CUDA runtime.
//!
//! candle-kernels builds a static `libmoe.a` and asks for `-lcudart`; the toolkit from
//! the PyPI wheels (tools/build-cuda.sh, ../shared/CUDA-BUILD.md) ships
//! `lib/libcudart_static.a`. Linking it statically keeps the binary free of a
//! `libcudart.so` dependency: at run time it needs only the driver (`libcuda.so.1`) and
//! the libraries cudarc loads itself (cuBLAS, cuRAND, NVRTC). Without the feature this
//! does nothing.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn main() -> ExitCode {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CUDA_ROOT");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return ExitCode::SUCCESS;
    }
    match link_static_cudart() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: latte-cli with --features cuda: {message}");
            ExitCode::FAILURE
        }
    }
}

fn link_static_cudart() -> Result<(), String> {
    let root = std::env::var_os("CUDA_ROOT").ok_or(
        "CUDA_ROOT is not set. Point it at a CUDA 13.0 toolkit (the directory holding \
         bin/nvcc and lib/libcudart_static.a), or build with tools/build-cuda.sh, \
         which installs one and sets it",
    )?;
    let source = Path::new(&root).join("lib").join("libcudart_static.a");
    if !source.is_file() {
        return Err(format!(
            "CUDA_ROOT={} has no lib/libcudart_static.a (install nvidia-cuda-runtime==13.0.96, \
             see tools/build-cuda.sh)",
            Path::new(&root).display()
        ));
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);
    let link = out.join("libcudart.a");
    // A stale link from an earlier CUDA_ROOT may be there; it is replaced.
    match std::fs::remove_file(&link) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot remove {}: {e}", link.display())),
    }
    place(&source, &link).map_err(|e| {
        format!(
            "cannot link {} to {}: {e}",
            link.display(),
            source.display()
        )
    })?;
    println!("cargo:rerun-if-changed={}", source.display());
    println!("cargo:rustc-link-search=native={}", out.display());
    Ok(())
}

#[cfg(unix)]
fn place(source: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(source, link)
}

#[cfg(not(unix))]
fn place(source: &Path, link: &Path) -> std::io::Result<()> {
    std::fs::copy(source, link).map(|_| ())
}
