#!/usr/bin/env bash
# Builds `latte` with CUDA (`--features cuda`) on a machine with or without a GPU, from
# scratch and idempotently. Recipe and reasons: ../shared/CUDA-BUILD.md.
#
#   tools/build-cuda.sh            # release build; prints where the binary is
#   LATTE_CUDA_FEATURES=nccl tools/build-cuda.sh   # with NCCL data parallelism (needs
#                                                  # OpenMPI's headers and libclang)
#
# What it does:
#   1. a venv under $LATTE_CUDA_CACHE (default ~/.cache/latte-rs/cuda-13.0) with the
#      CUDA 13.0 toolkit from PyPI, every wheel pinned (nvcc's own dependencies are
#      unpinned and would pull a newer toolkit, whose PTX driver 580 cannot JIT);
#      reused when the pins match;
#   2. CUDA_ROOT, PATH and CUDA_COMPUTE_CAP (default 90: sm_90a, H100/H200 only; without
#      it candle-kernels runs nvidia-smi, absent here);
#   3. cargo build --release --features ${LATTE_CUDA_FEATURES:-cuda} -p latte-cli
#      (CARGO_TARGET_DIR is honoured;
#      a separate one keeps CPU builds from being invalidated);
#   4. stages the binary for the GPU machine as target/gpu/latte.gz (in the repository,
#      ignored by git; without debug info and gzipped: ~15 MB instead of ~150, so that
#      the device tool's `carry` can take it, see tools/gpu-check.sh), and prints the
#      sizes and `ldd`.
#
# The first run takes 12+ minutes (nvcc on candle's kernels); later runs only relink.
# The binary needs at run time: libcuda.so.1 (the driver) and cuBLAS, cuRAND, NVRTC
# 13.0 (or 12.x) on the loader path; cudart is linked statically.
set -euo pipefail

# 1–2. The toolkit and its environment.
source "$(dirname "${BASH_SOURCE[0]}")/cuda-toolkit.sh"

# 3. The build.
cd "$repo"
target_dir=${CARGO_TARGET_DIR:-$repo/target}
features=${LATTE_CUDA_FEATURES:-cuda}
echo "== cargo build --release --features $features -p latte-cli (target dir $target_dir)"
started=$SECONDS
cargo build --release --features "$features" -p latte-cli
echo "== built in $((SECONDS - started)) s"

# 4. Where it is.
binary=$target_dir/release/latte
staged=$repo/target/gpu/latte.gz
mkdir -p "$(dirname "$staged")"
stripped=$(mktemp)
# Without the release profile's debug info (line tables, ~90 MB); symbols stay.
strip --strip-debug -o "$stripped" "$binary" 2>/dev/null || cp -f "$binary" "$stripped"
gzip -6 -c "$stripped" >"$staged.tmp" && mv -f "$staged.tmp" "$staged"
echo "== binary: $binary ($(du -h "$binary" | cut -f1); $(du -h "$stripped" | cut -f1) without debug info)"
echo "== staged for the GPU machine: $staged ($(du -h "$staged" | cut -f1))"
rm -f "$stripped" "$repo/target/gpu/latte"
ldd "$binary" || true
