#!/usr/bin/env bash
# Checks that the CUDA build (`--features cuda`, and `--features nccl` where OpenMPI is
# installed; every target of latte-cli) compiles and passes clippy, on a
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
echo "== cargo clippy --features cuda -p latte-cli --all-targets (target dir $CARGO_TARGET_DIR)"
started=$SECONDS
cargo clippy --features cuda -p latte-cli --all-targets -- -D warnings
echo "== the cuda feature compiles ($((SECONDS - started)) s)"
# NCCL's data parallelism builds on MPI: check it where OpenMPI's headers are installed.
if command -v mpicc >/dev/null; then
    echo "== cargo clippy --features nccl -p latte-cli --all-targets"
    started=$SECONDS
    cargo clippy --features nccl -p latte-cli --all-targets -- -D warnings
    echo "== the nccl feature compiles ($((SECONDS - started)) s)"
else
    echo "== no mpicc (OpenMPI's headers): the nccl feature is not checked"
fi
