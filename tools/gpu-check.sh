#!/usr/bin/env bash
# tools/gpu-check.sh: the prepared GPU check of latte-rs, in one run of under 8 minutes.
#
#   1. parity on CUDA: `latte forward --device cuda` on every golden fixture, with the
#      device-generic kernels (chunked attention, generic norm and gated linear: the
#      default off the CPU; a CPU dry run passes `--kernels generic` to run them too)
#      (tests/fixtures/<case>), f32 with --vjp and bf16 forward, compared with diffusers'
#      float64 reference as the CPU tests do (max |a - e| / max(max |e|, 1)): sample
#      1e-4, gradients 1e-3 (f32); sample 5e-2 (bf16). Also: `every:1` must give the same
#      bits as `none`, and the CUDA memory meter writes a report;
#   2. side by side with the machine's PyTorch (tools/bench_torch.py, diffusers 0.42.1):
#      a Latte-1-sized model (1.06 B parameters, random weights, f32) at 256x256x16
#      (latents 32x32) and 512x512x16 (latents 64x64); a guidance step with classifier-free
#      guidance (batch 2, gradient w.r.t. the latents) and a training step (batch 1);
#      PyTorch without and with diffusers' per-block checkpointing, latte-rs with `none`,
#      `every:1` (per block) and planned `budget:` sizes, 1 warm-up + 2 timed steps each;
#   3. one markdown table: step times and peak GPU memory above weights and inputs
#      (latte-rs: the CUDA pool's high-water mark; PyTorch: max_memory_allocated).
#
# Prepare here (no GPU needed):
#   tools/build-cuda.sh                  # stages the binary as target/gpu/latte.gz
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1
#   (.whl/ and target/ are git-ignored; diffusers' own needs are on the GPU machine)
#
# Run with the device tool:
#   command:   bash tools/gpu-check.sh
#   carry:     ["target/gpu", ".whl"]
#   timeout_s: 540
# Results in $OUT: gpu-check.md (the tables), gpu-check.log (every command's output),
# bench.jsonl (the raw rows).
#
# Parts: `bash tools/gpu-check.sh parity bench256 bench512` (default: all three).
# GPU_CHECK_BUDGET_S (default 450) is the wall-clock budget: every step has its own
# `timeout`, capped by what is left, and steps that no longer fit are skipped and listed.
# LATTE_BIN overrides the binary, PYTHON the interpreter (python3, the one with PyTorch).
# For a dry run of this script without a GPU: GPU_CHECK_DEVICE=cpu GPU_CHECK_PRESET=tiny.

set -uo pipefail # no -e: a failing step is recorded and the next one runs

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
BUDGET=${GPU_CHECK_BUDGET_S:-450}
LATTE=${LATTE_BIN:-}
PY=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
PRESET=${GPU_CHECK_PRESET:-latte-1}
WORK=$(mktemp -d /tmp/gpu-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
STATUS=$WORK/status.tsv
: >"$STATUS"
exec > >(tee -a "$OUT/gpu-check.log") 2>&1
tee_pid=$!
parts=${*:-parity bench256 bench512}
export PYTHONUNBUFFERED=1 CUDA_CACHE_MAXSIZE=4294967296

echo "== gpu-check: parts [$parts], budget ${BUDGET}s, work dir $WORK"

# ---------------------------------------------------------------- environment

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$WORK/env.txt" 2>&1
if [[ -z $LATTE ]]; then
    LATTE=$WORK/latte
    gunzip -c target/gpu/latte.gz >"$LATTE" && chmod +x "$LATTE" ||
        { echo "error: no target/gpu/latte.gz (run tools/build-cuda.sh, carry target/gpu)"; exit 1; }
fi
if [[ $DEVICE == cpu ]]; then
    # A dry run exercises the kernels a GPU runs.
    generic=$WORK/latte-generic
    printf '#!/usr/bin/env bash\nexec "%s" --kernels generic "$@"\n' "$LATTE" >"$generic"
    chmod +x "$generic" && LATTE=$generic
fi
if ! "$PY" -c 'import diffusers' 2>/dev/null; then
    if compgen -G '.whl/*.whl' >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
fi
# cuBLAS and cuRAND for the binary (cudarc loads them; cudart is static): PyTorch's CUDA 13
# wheels first, then the system toolkit. The driver's libcuda.so.1 is on the default path.
libdirs=$("$PY" - <<'EOF'
import glob, os, sys
found = []
for root in sys.path:
    for name in ("libcublas.so*", "libcurand.so*"):
        for f in glob.glob(os.path.join(root, "nvidia", "**", name), recursive=True):
            d = os.path.dirname(f)
            if d not in found:
                found.append(d)
found.sort(key=lambda d: "cu13" not in d)
print(":".join(found))
EOF
)
export LD_LIBRARY_PATH=${libdirs:+$libdirs:}/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
{ "$PY" -c 'import torch, diffusers; print("torch", torch.__version__, "(CUDA", torch.version.cuda + ") | diffusers", diffusers.__version__)' ||
    echo "PyTorch or diffusers missing: the PyTorch side fails"; } >>"$WORK/env.txt" 2>&1
"$LATTE" --version >>"$WORK/env.txt" 2>&1
cat "$WORK/env.txt"

# ---------------------------------------------------------------- steps

# step NAME MAX_SECONDS COMMAND...: runs COMMAND under `timeout`, capped by the time left;
# its output goes to the log and to $WORK/NAME.out; the outcome to $STATUS.
step() {
    local name=$1 max=$2
    shift 2
    local left=$((BUDGET - SECONDS - 20))
    if ((left < 15)); then
        echo "== SKIP $name: out of time (${SECONDS}s of ${BUDGET}s used)"
        printf '%s\tskipped\t0\n' "$name" >>"$STATUS"
        return 0
    fi
    local limit=$((max < left ? max : left)) started=$SECONDS rc
    echo "== [${SECONDS}s] $name (timeout ${limit}s): $*"
    timeout --kill-after=5 "$limit" "$@" >"$WORK/$name.out" 2>&1
    rc=$?
    cat "$WORK/$name.out"
    local took=$((SECONDS - started))
    if ((rc == 124 || rc == 137)); then
        echo "== TIMEOUT $name after ${took}s"
        printf '%s\ttimeout\t%s\n' "$name" "$took" >>"$STATUS"
    else
        echo "== $name: exit $rc after ${took}s"
        printf '%s\t%s\t%s\n' "$name" "$rc" "$took" >>"$STATUS"
    fi
}

# ---------------------------------------------------------------- 1. parity

parity() {
    local case dir flags first=1
    for case in unit_config video resized no_temporal batch; do
        dir=tests/fixtures/$case
        flags=()
        grep -q '"enable_temporal_attentions": false' "$dir/meta.json" && flags+=(--no-temporal)
        # The first call loads (JIT-compiles) candle's PTX kernels: a longer timeout.
        step "parity-$case-f32" $((first ? 120 : 40)) "$LATTE" forward --device "$DEVICE" \
            --model "$dir/model" --inputs "$dir/inputs.safetensors" --vjp "${flags[@]}" \
            --out "$WORK/$case.f32.safetensors"
        first=0
        step "parity-$case-bf16" 40 "$LATTE" forward --device "$DEVICE" --dtype bf16 \
            --model "$dir/model" --inputs "$dir/inputs.safetensors" "${flags[@]}" \
            --out "$WORK/$case.bf16.safetensors"
    done
    dir=tests/fixtures/video
    step parity-video-every1 40 "$LATTE" forward --device "$DEVICE" --checkpoint every:1 \
        --model "$dir/model" --inputs "$dir/inputs.safetensors" --vjp \
        --memory-report "$WORK/video.every1.memory.json" --out "$WORK/video.every1.safetensors"
    step parity-compare 60 "$PY" - "$WORK" <<'EOF'
"""Compares the CUDA outputs with the fixtures' float64 references; writes parity.md."""
import json, os, sys
import numpy as np
from safetensors.numpy import load_file

work = sys.argv[1]
cases = ["unit_config", "video", "resized", "no_temporal", "batch"]

def rel(a, e):
    a, e = a.astype(np.float64), e.astype(np.float64)
    return float(np.abs(a - e).max() / max(float(np.abs(e).max()), 1.0))

lines = ["| case | run | sample error (tol) | worst gradient error (tol) | result |",
         "|---|---|---|---|---|"]
ok = True
for case in cases:
    expected = load_file(f"tests/fixtures/{case}/expected.safetensors")
    grads = [k for k in expected if k.startswith("grad.")]
    for run, tol_sample, tol_grad in (("f32 + vjp", 1e-4, 1e-3), ("bf16 forward", 5e-2, None)):
        path = f"{work}/{case}.{run.split()[0]}.safetensors"
        if not os.path.exists(path):
            lines.append(f"| {case} | {run} | no output | | FAIL |")
            ok = False
            continue
        got = load_file(path)
        sample = rel(got["sample"], expected["sample"])
        good = sample <= tol_sample
        grad_cell = "n/a"
        if tol_grad is not None:
            missing = [k for k in grads if k not in got]
            worst, worst_name = max((rel(got[k], expected[k]), k) for k in grads if k in got)
            good &= worst <= tol_grad and not missing
            grad_cell = f"{worst:.2e} ({tol_grad:.0e}) `{worst_name}`, {len(grads) - len(missing)}/{len(grads)} tensors"
        ok &= good
        lines.append(f"| {case} | {run} | {sample:.2e} ({tol_sample:.0e}) | {grad_cell} | {'ok' if good else 'FAIL'} |")

none_path, every_path = f"{work}/video.f32.safetensors", f"{work}/video.every1.safetensors"
if os.path.exists(none_path) and os.path.exists(every_path):
    a, b = load_file(none_path), load_file(every_path)
    same = a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    worst = max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a if k in b)
    lines.append(f"| video | every:1 vs none | {'identical bits' if same else f'max abs diff {worst:.2e}'} | | {'ok' if same else 'DIFFERS'} |")
else:
    lines.append("| video | every:1 vs none | no output | | FAIL |")
    ok = False
report = f"{work}/video.every1.memory.json"
if os.path.exists(report):
    r = json.load(open(report))
    total = r.get("device_total_bytes")
    lines.append("")
    lines.append(f"Memory report of `video --checkpoint every:1`: meter `{r['meter']}`, "
                 f"peak {r['peak_bytes']} B above a baseline of {r['baseline_bytes']} B, "
                 f"{len(r['timeline'])} phases, device total {total} B.")
text = "\n".join(lines)
print(text)
open(f"{work}/parity.md", "w").write(text + "\n")
sys.exit(0 if ok else 1)
EOF
}

# ---------------------------------------------------------------- 2. benchmarks

# The PyTorch side: tools/bench_torch.py with the latte-1 preset's latents resized.
cat >"$WORK/torch_bench.py" <<'EOF'
import dataclasses, sys
sys.path.insert(0, "tools")
import bench_torch as b
size, preset, argv = int(sys.argv[1]), sys.argv[3], sys.argv[2:]
p = b.PRESETS[preset]
b.PRESETS[preset] = dataclasses.replace(
    p, geometry=dataclasses.replace(p.geometry, height=size, width=size))
sys.exit(b.main(argv))
EOF

# rust NAME TIMEOUT LATENT MODE BATCH POLICIES [BUDGET_FRACTIONS]
rust() {
    local extra=()
    [[ -n ${7:-} ]] && extra=(--budget-fractions "$7")
    step "$1" "$2" "$LATTE" bench --device "$DEVICE" --preset "$PRESET" --latent-size "$3" \
        --mode "$4" --batch "$5" --policies "$6" "${extra[@]}" --warmup 1 --repeats 2 --json
}
# torch NAME TIMEOUT LATENT MODE BATCH [--checkpointing]
torch() {
    step "$1" "$2" "$PY" "$WORK/torch_bench.py" "$3" --preset "$PRESET" --mode "$4" \
        --batch "$5" ${6:+"$6"} --device "$DEVICE" --warmup 1 --repeats 2 --json --quiet
}

# Budgets are absolute sizes (not fractions of `none`, which may not fit). `none` runs
# last: if it runs out of memory, the other rows are already measured.
bench256() {
    rust rust-256-guide 100 32 guide 2 every:1,budget:10GiB,budget:20GiB,budget:40GiB,none
    torch torch-256-guide-none 50 32 guide 2
    torch torch-256-guide-ckpt 50 32 guide 2 --checkpointing
    rust rust-256-train 100 32 train 1 every:1,budget:10GiB,budget:20GiB,budget:40GiB,none
    torch torch-256-train-none 50 32 train 1
    torch torch-256-train-ckpt 50 32 train 1 --checkpointing
}

bench512() {
    # `none` at 512x512 keeps every block's graph: for latte-rs (unfused attention: f32
    # score tensors of 2 GiB, several per spatial block) far above 80 GB, so it is not
    # run; PyTorch's is tried last, when time is left.
    rust rust-512-guide 130 64 guide 2 every:1,budget:40GiB,budget:64GiB
    torch torch-512-guide-ckpt 70 64 guide 2 --checkpointing
    rust rust-512-train 110 64 train 1 every:1,budget:32GiB,budget:56GiB
    torch torch-512-train-ckpt 60 64 train 1 --checkpointing
    torch torch-512-guide-none 45 64 guide 2
    torch torch-512-train-none 45 64 train 1
}

for part in $parts; do
    case $part in
    parity | bench256 | bench512) "$part" ;;
    *) echo "unknown part $part (parity, bench256, bench512)" ;;
    esac
done

# ---------------------------------------------------------------- 3. the table

"$PY" - "$WORK" "$OUT" "$BUDGET" "$SECONDS" "$PRESET" <<'EOF'
"""Collects the steps' outputs into $OUT/gpu-check.md and $OUT/bench.jsonl."""
import json, os, re, sys

work, out, budget, used, preset = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
GIB = 1 << 30
status = {}
for line in open(f"{work}/status.tsv"):
    name, rc, took = line.rstrip("\n").split("\t")
    status[name] = (rc, int(took))

def outcome(name):
    rc, took = status.get(name, ("not run", 0))
    return {"0": f"ok, {took} s", "timeout": f"timeout after {took} s",
            "skipped": "skipped (time budget)", "not run": "not run"}.get(rc, f"exit {rc}, {took} s")

def json_rows(name):
    path = f"{work}/{name}.out"
    if not os.path.exists(path):
        return [], ""
    text = open(path, errors="replace").read()
    rows = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows, text

def policy_name(policy):
    budget = re.fullmatch(r"budget:(\d+)", policy)
    return f"budget:{int(budget.group(1)) / GIB:.2f}GiB" if budget else policy

def gib(b):
    return "" if b is None else f"{b / GIB:.2f}"

def short_error(text):
    smallest = re.search(r"smallest feasible budget for this chain is ([0-9.]+ \w+)", text)
    if smallest:
        return f"infeasible, smallest feasible budget {smallest.group(1)}"
    for needle in ("out of memory", "OutOfMemory", "OUT_OF_MEMORY"):
        if needle in text:
            return "out of memory"
    lines = [l for l in text.splitlines() if l.strip()]
    return (lines[-1][:120] if lines else "no output").replace("|", "/")

runs = []
for size, latent in (("256x256x16", 32), ("512x512x16", 64)):
    for mode, batch, what in (("guide", 2, "guide, CFG batch 2"), ("train", 1, "train, batch 1")):
        tag = 256 if latent == 32 else 512
        runs.append((size, latent, what, f"rust-{tag}-{mode}", "latte-rs", None))
        runs.append((size, latent, what, f"torch-{tag}-{mode}-none", "PyTorch", "none"))
        runs.append((size, latent, what, f"torch-{tag}-{mode}-ckpt", "PyTorch", "per-block"))

table = ["| video (latents) | step | impl | policy | median s | min s | peak GiB | predicted GiB | outcome |",
         "|---|---|---|---|---|---|---|---|---|"]
raw = open(f"{out}/bench.jsonl", "w")
for size, latent, what, name, impl, policy in runs:
    if name not in status:
        continue
    rows, text = json_rows(name)
    video = f"{size} ({latent}x{latent})"
    rc = status[name][0]
    for r in rows:
        r = {**r, "run": name, "impl": impl, "latent": latent}
        raw.write(json.dumps(r) + "\n")
        if "error" in r:
            table.append(f"| {video} | {what} | {impl} | {policy_name(r['policy'])} | | | | | failed: {short_error(r['error'])} |")
        else:
            table.append(
                f"| {video} | {what} | {impl} | {policy or policy_name(r['policy'])} | {r['step_s_median']:.3f} | "
                f"{r['step_s_min']:.3f} | {gib(r['peak_bytes'])} | {gib(r.get('predicted_peak_bytes'))} | ok |")
    # The process's own outcome when its rows do not tell it: skipped, timed out, failed
    # before any row (latte-rs exits 1 after reporting a failed policy as a row).
    reported_failure = any("error" in r for r in rows)
    if rc != "0" and not (rc == "1" and reported_failure):
        label = outcome(name)
        if rc not in ("skipped", "timeout") and text:
            label += ": " + short_error(text)
        table.append(f"| {video} | {what} | {impl} | {policy or '(rest)'} | | | | | {label} |")
raw.close()

env = open(f"{work}/env.txt").read().strip().replace("\n", "; ")
parts = ["# latte-rs GPU check", "", f"{env}; wall clock {used} s of a {budget} s budget.", ""]
if os.path.exists(f"{work}/parity.md"):
    parts += ["## Parity on CUDA (vs diffusers float64 fixtures)", "", open(f"{work}/parity.md").read(), ""]
elif any(n.startswith("parity") for n in status):
    parts += ["## Parity on CUDA", "", "no comparison was written (see gpu-check.log)", ""]
title = "Latte-1-sized model (1.06 B parameters" if preset == "latte-1" else f"preset `{preset}` ("
parts += [f"## {title}, f32, random weights), batch of 16-frame videos",
          "",
          "Peak: GPU memory live at once during a step, above weights and inputs "
          "(latte-rs: CUDA pool used-memory high-water mark; PyTorch: max_memory_allocated "
          "minus memory_allocated). Times: 1 warm-up + 2 timed steps, synchronised. "
          "latte-rs `none` at 512x512 is not run (its graph does not fit in 80 GB).",
          "", *table, ""]
steps = ["| step | outcome |", "|---|---|"] + [f"| {n} | {outcome(n)} |" for n in status]
parts += ["## Steps", "", *steps, ""]
open(f"{out}/gpu-check.md", "w").write("\n".join(parts))
print("\n".join(parts))
EOF
echo "== done in ${SECONDS}s: $OUT/gpu-check.md"
exec >&- 2>&-
wait "$tee_pid" 2>/dev/null
