"""Benchmark diffusers' ``LatteTransformer3DModel`` in PyTorch: the reference side of
latte-rs's side-by-side benchmarks.

One invocation measures one configuration: a preset (the same models and input
geometries as latte-rs's ``crates/latte/src/config.rs``), a mode, and whether
diffusers' per-block gradient checkpointing is enabled.

Modes
-----
``fwd``
    One forward pass under ``torch.no_grad()``.
``train``
    Forward, ``mse_loss(sample, target)`` and ``backward()`` over all
    parameters. Gradients are reset with ``zero_grad(set_to_none=True)``
    before every step (outside the timed region), so each step allocates its
    parameter gradients afresh and they count towards its peak.
``guide``
    The gradient of ``(sample * probe).sum()`` with respect to the input
    latents only (parameters ``requires_grad_(False)``, latents
    ``requires_grad_(True)``, ``objective.backward(inputs=[latents])`` with
    ``latents.grad`` reset to ``None`` before every step), as in classifier or
    reward guidance. ``probe`` is a fixed random tensor shaped like ``sample``.

``--checkpointing`` calls ``model.enable_gradient_checkpointing()``: every
spatial and temporal block runs under ``torch.utils.checkpoint.checkpoint``
(``use_reentrant=False``). In diffusers 0.42.1 the condition is
``torch.is_grad_enabled() and self.gradient_checkpointing``; it does not depend
on ``model.training``, so the model stays in ``eval()`` (dropout is 0 anyway)
and checkpointing has no effect in ``fwd`` mode.

What is measured
----------------
Step time
    ``time.perf_counter`` around each of ``--repeats`` steps after
    ``--warmup`` untimed steps (with ``torch.cuda.synchronize`` on CUDA);
    the median and the minimum are reported.
Peak tensor memory (``peak_bytes``)
    The high-water mark of bytes allocated during one step that are live at
    the same time, beyond what was live before the step: weights, buffers,
    inputs and the target/probe are excluded; activations, autograd-saved
    tensors, temporaries, parameter/latent gradients and the output count.

    * CPU: one extra step runs under ``torch.profiler.profile(
      profile_memory=True)``. With memory profiling on, c10's CPU allocator
      reports every allocation (+nbytes) and every free of a block allocated
      while profiling (-nbytes) as a ``[memory]`` event with a nanosecond
      timestamp. ``peak_from_memory_events`` sorts the raw events
      (``prof.profiler.kineto_results.events()``) by time and takes the
      maximum of their running sum. Frees of blocks allocated before the
      profiler started carry no size and are not reported, so the result is
      the high-water mark of the step's own allocations. (The per-operator
      ``cpu_memory_usage`` of ``key_averages()`` is a net sum per operator,
      not a high-water mark, and is not used.) Memory that libraries allocate
      outside c10's allocator (MKL or oneDNN internal workspaces) is not seen.
    * CUDA: ``torch.cuda.max_memory_allocated()`` minus
      ``torch.cuda.memory_allocated()`` after ``reset_peak_memory_stats()``;
      this counts the caching allocator's rounded block sizes.

    ``--validate-memory`` checks the CPU method: allocation sequences whose
    peak is known exactly, and an independent cross-check on the selected
    preset and mode that follows every storage an operator returns through a
    ``TorchDispatchMode`` and weak references (a lower bound, blind to
    allocations made inside a kernel).
GFLOP (``--flops``, optional)
    ``torch.utils.flop_counter.FlopCounterMode`` over one extra step: matmul,
    convolution and attention FLOPs (including checkpoint recomputation).

Usage (from the repository root, with ``tools/requirements.txt`` installed)::

    python tools/bench_torch.py --preset small --mode train --checkpointing --repeats 3 --json
    python tools/bench_torch.py --preset tiny --mode guide --validate-memory
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

# Keep the Kineto profiler quiet (it logs its start/stop and a CUDA probe to stderr).
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

import diffusers  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import LatteTransformer3DModel  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

MIB = 1 << 20


# --------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Geometry:
    """Default input of a preset: batch, frames, latent height and width, caption tokens."""

    batch: int
    frames: int
    height: int
    width: int
    caption_tokens: int


@dataclass(frozen=True)
class Preset:
    name: str
    config: dict
    geometry: Geometry


def latte_config(
    heads: int,
    head_dim: int,
    layers: int,
    caption_channels: int,
    in_channels: int = 4,
    sample_size: int = 32,
    video_length: int = 16,
) -> dict:
    """``LatteTransformer3DModel`` keyword arguments, mirroring latte-rs's ``transformer()``."""
    return {
        "num_attention_heads": heads,
        "attention_head_dim": head_dim,
        "in_channels": in_channels,
        "out_channels": 2 * in_channels,
        "num_layers": layers,
        "cross_attention_dim": heads * head_dim,
        "attention_bias": True,
        "sample_size": sample_size,
        "patch_size": 2,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": 1000,
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "caption_channels": caption_channels,
        "video_length": video_length,
    }


# Must match crates/latte/src/config.rs.
PRESETS = {
    p.name: p
    for p in (
        Preset("latte-1", latte_config(16, 72, 28, 4096, sample_size=64), Geometry(1, 16, 64, 64, 120)),
        Preset("medium", latte_config(8, 64, 12, 256), Geometry(1, 16, 32, 32, 32)),
        Preset("small", latte_config(4, 64, 8, 256), Geometry(1, 16, 32, 32, 32)),
        Preset(
            "tiny",
            latte_config(4, 16, 4, 16, in_channels=3, sample_size=16, video_length=8),
            Geometry(4, 8, 16, 16, 4),
        ),
    )
}

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------- model and inputs


def build_model(preset: Preset, device: torch.device, dtype: torch.dtype, seed: int) -> LatteTransformer3DModel:
    """The preset's model with diffusers' default (seeded random) initialisation."""
    torch.manual_seed(seed)
    model = LatteTransformer3DModel(**preset.config).to(device)
    if dtype != torch.float32:
        model = model.to(dtype)
    return model.eval()


def make_inputs(
    preset: Preset, batch: int, device: torch.device, dtype: torch.dtype, seed: int
) -> dict[str, torch.Tensor]:
    """Seeded random latents, captions, training target and guidance probe; timestep 500."""
    cfg, geo = preset.config, preset.geometry
    gen = torch.Generator().manual_seed(seed + 1)
    video = (geo.frames, geo.height, geo.width)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    return {
        "hidden_states": randn(batch, cfg["in_channels"], *video),
        "timestep": torch.full((batch,), 500, dtype=torch.int64, device=device),
        "encoder_hidden_states": randn(batch, geo.caption_tokens, cfg["caption_channels"]),
        "target": randn(batch, cfg["out_channels"], *video),
        "probe": randn(batch, cfg["out_channels"], *video),
    }


# --------------------------------------------------------------------------- steps


@dataclass
class Step:
    """One benchmark step: ``prepare`` runs untimed before every ``run``."""

    prepare: Callable[[], None]
    run: Callable[[], None]


def make_step(mode: str, model: LatteTransformer3DModel, inputs: dict[str, torch.Tensor]) -> Step:
    """The step function of a mode. Every step drops its outputs before returning."""

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        return model(
            hidden_states,
            timestep=inputs["timestep"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
        ).sample

    def nothing() -> None:
        pass

    if mode == "fwd":
        model.requires_grad_(False)

        def run() -> None:
            with torch.no_grad():
                forward(inputs["hidden_states"])

        return Step(nothing, run)

    if mode == "train":
        model.requires_grad_(True)

        def prepare() -> None:
            model.zero_grad(set_to_none=True)

        def run() -> None:
            loss = F.mse_loss(forward(inputs["hidden_states"]), inputs["target"])
            loss.backward()

        return Step(prepare, run)

    if mode == "guide":
        model.requires_grad_(False)
        latents = inputs["hidden_states"].requires_grad_(True)  # a leaf: gradient target

        def prepare() -> None:
            latents.grad = None

        def run() -> None:
            objective = (forward(latents) * inputs["probe"]).sum()
            # Equivalent to torch.autograd.grad(objective, latents), which FlopCounterMode's
            # module hooks do not support; the gradient lands in latents.grad.
            objective.backward(inputs=[latents])

        return Step(prepare, run)

    raise ValueError(f"unknown mode {mode!r}")


# --------------------------------------------------------------------------- measurement


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Step, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` steps after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step.prepare()
        step.run()
    times = []
    for _ in range(repeats):
        step.prepare()
        gc.collect()
        synchronize(device)
        start = time.perf_counter()
        step.run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


# Device types whose allocations the profiler attributes to host memory.
_CPU_MEMORY_DEVICES = ("CPU", "MKLDNN", "IDEEP")


def peak_from_memory_events(prof: profile) -> int:
    """High-water mark of the running sum of the profiler's host ``[memory]`` events.

    Each event is an allocation (+nbytes) or a free (-nbytes) with a nanosecond
    timestamp; the running sum, in time order, is the number of bytes allocated
    since profiling started that are still live.
    """
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type().name in _CPU_MEMORY_DEVICES
    ]
    events.sort(key=lambda ev: ev[0])
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def profile_cpu_peak(fn: Callable[[], None]) -> int:
    """Peak bytes that ``fn`` allocates on the host, live at the same time."""
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
        gc.collect()
    return peak_from_memory_events(prof)


def measure_peak(step: Step, device: torch.device) -> int:
    """Peak tensor bytes of one step beyond what was live before it."""
    step.prepare()
    if device.type == "cuda":
        gc.collect()
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step.run()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    return profile_cpu_peak(step.run)


def measure_gflop(step: Step) -> float:
    """GFLOP of one step, as counted by ``FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    step.prepare()
    with FlopCounterMode(display=False) as counter:
        step.run()
    return counter.get_total_flops() / 1e9


# --------------------------------------------------------------------------- validation


class LiveStorageTracker:
    """Independent high-water mark of storages returned by operators (a lower bound).

    A ``TorchDispatchMode`` sees every ATen operator, including those of the
    backward pass and of checkpoint recomputation. A storage an operator
    returns is counted once, from the operator's return until a weak reference
    to it expires; storages live before tracking (weights, inputs) are ignored.
    Allocations made inside one kernel and freed before it returns are not
    seen, so the profiler's peak should be at least this, and close to it.
    """

    def __init__(self, preexisting: list[torch.Tensor]):
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self
        self.ignored = {StorageWeakRef(t.untyped_storage()).cdata for t in preexisting}
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                tracker._sweep()
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        tracker._add(StorageWeakRef(t.untyped_storage()), t.untyped_storage().nbytes())
                tracker.peak = max(tracker.peak, tracker.current)
                return out

        self.mode = Mode()

    def _sweep(self) -> None:
        for key, (ref, nbytes) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= nbytes

    def _add(self, ref, nbytes: int) -> None:
        if ref.cdata in self.ignored or ref.cdata in self.live:
            return
        self.live[ref.cdata] = (ref, nbytes)
        self.current += nbytes

    def measure(self, fn: Callable[[], None]) -> int:
        with self.mode:
            fn()
        return self.peak


def validate_memory_method(args: argparse.Namespace) -> bool:
    """Checks ``profile_cpu_peak`` on known answers and against ``LiveStorageTracker``."""
    ok = True

    def check(name: str, measured: int, expected: int) -> None:
        nonlocal ok
        good = measured == expected
        ok &= good
        print(f"[{'ok' if good else 'FAIL'}] {name}: measured {measured} B, expected {expected} B")

    # 1. Explicit allocations: 1 MiB, 2 MiB, free the 1 MiB, 4 MiB -> 6 MiB live at the peak.
    #    A block allocated before profiling and freed during it must not lower the peak.
    before = torch.empty(MIB // 4)

    def explicit() -> None:
        nonlocal before
        a = torch.empty(MIB // 4)
        b = torch.empty(MIB // 2)
        del a
        before = None
        c = torch.empty(MIB)
        del b, c

    check("alloc 1, alloc 2, free 1, free pre-existing, alloc 4 MiB", profile_cpu_peak(explicit), 6 * MIB)

    # 2. An operator chain: x (pre-existing), y = x + x, z = y + y, del y, z.sum().
    #    y and z are live together: 2 * 4n bytes. (sum's 4-byte output and its 8-byte
    #    internal accumulator come after y is freed.)
    n = 3 * MIB
    x = torch.randn(n)

    def chain() -> None:
        y = x + x
        z = y + y
        del y
        z.sum()

    check("add -> add -> free -> sum over 12 MiB input", profile_cpu_peak(chain), 2 * 4 * n)

    # 3. Autograd: loss = w.exp().sum() with w (n,) requiring grad. ExpBackward saves
    #    its result (4n). In backward the engine allocates the seed gradient
    #    ones_like(loss) (4) and ExpBackward computes grad * result (4n) while the
    #    saved result and the loss (4) are still live: 8n + 8 bytes at the peak.
    w = torch.randn(n, requires_grad=True)

    def autograd_step() -> None:
        loss = w.exp().sum()
        loss.backward()

    w.grad = None
    check("w.exp().sum().backward() over 12 MiB", profile_cpu_peak(autograd_step), 2 * 4 * n + 8)
    w.grad = None

    if args.preset is not None:
        # 4. Model-level cross-check with the independent tracker.
        preset, device, dtype = PRESETS[args.preset], torch.device("cpu"), DTYPES[args.dtype]
        model = build_model(preset, device, dtype, args.seed)
        if args.checkpointing:
            model.enable_gradient_checkpointing()
        inputs = make_inputs(preset, args.batch or preset.geometry.batch, device, dtype, args.seed)
        step = make_step(args.mode, model, inputs)
        step.prepare()
        step.run()  # warm-up: lazy initialisation
        prof_peak = measure_peak(step, device)
        step.prepare()
        gc.collect()
        tracked = [*model.parameters(), *model.buffers(), *inputs.values()]
        tracker_peak = LiveStorageTracker(tracked).measure(step.run)
        ratio = prof_peak / tracker_peak if tracker_peak else float("nan")
        good = tracker_peak <= prof_peak <= 1.10 * tracker_peak
        ok &= good
        print(
            f"[{'ok' if good else 'FAIL'}] {args.preset} {args.mode} "
            f"checkpointing={args.checkpointing}: profiler {prof_peak} B "
            f"({prof_peak / MIB:.1f} MiB), dispatch tracker {tracker_peak} B "
            f"({tracker_peak / MIB:.1f} MiB), ratio {ratio:.4f} (want 1.00..1.10)"
        )
    return ok


# --------------------------------------------------------------------------- reporting


def versions() -> dict[str, str]:
    return {"torch": torch.__version__, "diffusers": diffusers.__version__}


def human_line(r: dict) -> str:
    ckpt = "per-block" if r["checkpointing"] else "none"
    gflop = f", {r['gflop']:.1f} GFLOP" if r.get("gflop") is not None else ""
    return (
        f"{r['preset']} {r['mode']} checkpointing={ckpt} {r['device']} {r['dtype']} "
        f"threads={r['threads']} batch={r['batch']}: median {r['step_s_median']:.3f} s, "
        f"min {r['step_s_min']:.3f} s over {r['repeats']} (warm-up {r['warmup']}), "
        f"peak {r['peak_bytes'] / MIB:.1f} MiB ({r['peak_bytes']} B){gflop}"
    )


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), help="model and input geometry (as in latte-rs)")
    parser.add_argument("--mode", choices=("fwd", "train", "guide"), default="fwd")
    parser.add_argument("--checkpointing", action="store_true", help="diffusers' per-block gradient checkpointing")
    parser.add_argument("--batch", type=int, help="batch size (default: the preset's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="f32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flops", action="store_true", help="also count GFLOP per step (one extra step)")
    parser.add_argument("--json", action="store_true", help="also print the result as one JSON object")
    parser.add_argument(
        "--validate-memory",
        action="store_true",
        help="check the CPU peak-memory method (and, with --preset, cross-check it on that model) and exit",
    )
    parser.add_argument("--quiet", action="store_true", help="do not print torch's parallel info")
    args = parser.parse_args(argv)
    if args.preset is None and not args.validate_memory:
        parser.error("--preset is required")
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1 or (args.batch is not None and args.batch < 1):
        parser.error("--repeats, --threads and --batch must be positive, --warmup non-negative")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    return args


def benchmark(args: argparse.Namespace) -> dict:
    """Builds the model and inputs, times the step and measures its peak memory."""
    preset, device, dtype = PRESETS[args.preset], torch.device(args.device), DTYPES[args.dtype]
    batch = args.batch or preset.geometry.batch
    model = build_model(preset, device, dtype, args.seed)
    if args.checkpointing:
        model.enable_gradient_checkpointing()
    inputs = make_inputs(preset, batch, device, dtype, args.seed)
    step = make_step(args.mode, model, inputs)

    times = time_steps(step, device, args.warmup, args.repeats)
    peak = measure_peak(step, device)
    gflop = measure_gflop(step) if args.flops else None
    return {
        "preset": args.preset,
        "mode": args.mode,
        "checkpointing": args.checkpointing,
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "batch": batch,
        "step_s_median": statistics.median(times),
        "step_s_min": min(times),
        "peak_bytes": peak,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "step_s_all": times,
        "gflop": gflop,
        **versions(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.quiet:
        print(torch.__config__.parallel_info().rstrip(), file=sys.stderr)
    if args.validate_memory:
        return 0 if validate_memory_method(args) else 1
    result = benchmark(args)
    print(human_line(result))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
