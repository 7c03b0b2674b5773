#!/usr/bin/env bash
# Sourced by tools/build-cuda.sh and tools/check-cuda.sh: installs (once) the CUDA 13.0
# toolkit wheels from PyPI into a venv and exports what candle-kernels' build reads:
# CUDA_ROOT, PATH (nvcc) and CUDA_COMPUTE_CAP. Recipe and reasons: ../shared/CUDA-BUILD.md.
#
#   source tools/cuda-toolkit.sh    # sets $repo and the variables above
#
# Every wheel is pinned: nvcc's own dependencies are unpinned and would pull a newer
# toolkit, whose PTX driver 580 cannot JIT. The venv lives under $LATTE_CUDA_CACHE
# (default ~/.cache/latte-rs/cuda-13.0) and is reused when the pins match.

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${LATTE_CUDA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/latte-rs/cuda-13.0}
venv=$cache/venv
pins=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-cccl==13.0.85
)
stamp=$venv/.latte-cuda-pins

if [[ ! -f $stamp || "$(cat "$stamp")" != "${pins[*]}" ]]; then
    echo "== installing the CUDA 13.0 toolkit wheels into $venv"
    mkdir -p "$cache"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --disable-pip-version-check -q "${pins[@]}"
    echo "${pins[*]}" >"$stamp"
else
    echo "== CUDA 13.0 toolkit wheels already in $venv"
fi
CUDA_ROOT=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')
for needed in bin/nvcc lib/libcudart_static.a include/cuda_runtime.h; do
    [[ -e $CUDA_ROOT/$needed ]] || { echo "error: $CUDA_ROOT/$needed is missing" >&2; exit 1; }
done

export CUDA_ROOT
export PATH=$CUDA_ROOT/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
nvcc --version | tail -n 2

