#!/usr/bin/env bash
# Checks that the CUDA build (`--features cuda`, every target of latte-cli) compiles, on a
# machine with or without a GPU: CI runs it so that no change breaks the GPU build
# unnoticed. Uses the toolkit of tools/cuda-toolkit.sh and a target directory of its own
# (target/cuda-check, or $LATTE_CUDA_TARGET_DIR) so that CPU builds stay valid.
#
# From an empty target directory this takes ~7 minutes on 2 cores, mostly nvcc compiling
# candle's kernels (its build script runs under `cargo check` too).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/cuda-toolkit.sh"
cd "$repo"
export CARGO_TARGET_DIR=${LATTE_CUDA_TARGET_DIR:-$repo/target/cuda-check}
echo "== cargo check --features cuda -p latte-cli --all-targets (target dir $CARGO_TARGET_DIR)"
started=$SECONDS
cargo check --features cuda -p latte-cli --all-targets
echo "== the cuda feature compiles ($((SECONDS - started)) s)"
