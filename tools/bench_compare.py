"""Compare ``latte bench`` with its PyTorch twin ``tools/bench_torch.py``, side by side,
and write the ratio table (latte-rs / PyTorch) to ``docs/BENCHMARKS.md``.

Per mode, one round runs these invocations, each a fresh process, alternating the two
sides so that drift of the machine (other load, clocks) falls on both:

``fwd``
    latte ``--mode fwd``, torch ``--mode fwd``.
``train`` and ``guide``
    latte ``--policies none``, torch (no checkpointing); latte ``--policies every:1``,
    torch ``--checkpointing``; latte ``--policies budget:X`` where X is the
    ``peak_bytes`` that the torch ``--checkpointing`` run of the same round measured.

``every:1`` keeps the input of every spatial and temporal block and recomputes the
block in the backward (latte-rs schedules a block as two stages, its attention and
feed-forward halves; the fixed policies count blocks), so it is the same schedule as
diffusers' ``enable_gradient_checkpointing()``, which wraps each spatial and temporal
block in ``torch.utils.checkpoint``.

Each invocation reports the median of its ``--repeats`` timed steps after ``--warmup``
untimed ones, and its peak tensor memory. A row of the table compares the median over
rounds of each side's per-round median, and lists the ratio of every round. Both sides
get the same thread count: ``RAYON_NUM_THREADS`` (candle's matmuls and latte's kernels
run on rayon's global pool), ``CANDLE_NUM_THREADS`` (candle's quantized kernels),
``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` in the environment of every process, and
``--threads`` for ``torch.set_num_threads``.

The table goes between ``<!-- bench_compare:begin -->`` and ``<!-- bench_compare:end -->``
of the output file (appended when the markers are missing; the file is created when
missing), written atomically, with the machine, versions and exact commands.

Usage (from the repository root, after ``cargo build --release -p latte-cli``)::

    .venv/bin/python tools/bench_compare.py --dry-run
    .venv/bin/python tools/bench_compare.py --preset medium --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

MIB = 1 << 20
BEGIN = "<!-- bench_compare:begin -->"
END = "<!-- bench_compare:end -->"
HEADER = (
    "# Benchmarks\n\n"
    "latte-rs against diffusers' `LatteTransformer3DModel` in PyTorch "
    "(`tools/bench_torch.py`); see `tools/README.md` for how each side measures.\n"
)
MODES = ("fwd", "train", "guide")
BUDGET_PLACEHOLDER = "budget:<peak_bytes of torch --checkpointing>"


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class Config:
    """One configuration of one side: ``setup`` is ``fwd``, ``none``, ``per-block`` or ``budget``."""

    side: str
    mode: str
    setup: str


@dataclass
class Measurement:
    """What one invocation reported (``error`` set, numbers absent, when it failed)."""

    command: list[str]
    step_s_median: float | None = None
    step_s_min: float | None = None
    peak_bytes: int | None = None
    error: str | None = None
    extra: dict[str, object] = field(default_factory=dict)


def round_plan(mode: str) -> list[Config]:
    """The invocations of one round of `mode`, in the order they run."""
    if mode == "fwd":
        return [Config("latte", mode, "fwd"), Config("torch", mode, "fwd")]
    return [
        Config(side, mode, setup)
        for setup in ("none", "per-block")
        for side in ("latte", "torch")
    ] + [Config("latte", mode, "budget")]


def latte_command(args: argparse.Namespace, config: Config, budget_bytes: int | None) -> list[str]:
    """`latte bench` for one configuration; a budget of None is written as a placeholder."""
    command = [args.latte, "bench", "--preset", args.preset, "--mode", config.mode]
    policy = {
        "none": "none",
        "per-block": "every:1",
        "budget": BUDGET_PLACEHOLDER if budget_bytes is None else f"budget:{budget_bytes}",
    }.get(config.setup)
    if policy is not None:
        command += ["--policies", policy]
    return command + ["--repeats", str(args.repeats), "--warmup", str(args.warmup), "--json"]


def torch_command(args: argparse.Namespace, config: Config) -> list[str]:
    """`tools/bench_torch.py` for one configuration."""
    command = [args.python, "tools/bench_torch.py", "--preset", args.preset, "--mode", config.mode]
    if config.setup == "per-block":
        command.append("--checkpointing")
    steps = ["--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    return command + steps + ["--threads", str(args.threads), "--json", "--quiet"]


def thread_env(threads: int) -> dict[str, str]:
    """The thread-count variables set for both sides."""
    names = ("RAYON_NUM_THREADS", "CANDLE_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    return {name: str(threads) for name in names}


def export_line(threads: int) -> str:
    return "export " + " ".join(f"{k}={v}" for k, v in thread_env(threads).items())


def json_lines(stdout: str) -> list[dict]:
    """The JSON objects among a command's output lines (both tools also print prose)."""
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def execute(command: list[str], threads: int) -> Measurement:
    """Runs one benchmark process and reads its (last) JSON result."""
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **thread_env(threads)})
    rows = json_lines(done.stdout)
    row = rows[-1] if rows else {}
    if done.returncode != 0 or "step_s_median" not in row:
        last_lines = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:]
        error = row.get("error") or (last_lines[0] if last_lines else f"exit status {done.returncode}")
        return Measurement(command, error=error)
    known = ("step_s_median", "step_s_min", "peak_bytes")
    return Measurement(command, *(row[k] for k in known), extra={k: v for k, v in row.items() if k not in known})


Results = dict[tuple[int, Config], Measurement]


def command_for(args: argparse.Namespace, results: Results, r: int, config: Config) -> tuple[list[str], str | None]:
    """The command of `config` in round `r`, or why it cannot run (a budget without a torch peak)."""
    if config.side == "torch":
        return torch_command(args, config), None
    if config.setup != "budget":
        return latte_command(args, config, None), None
    reference = results.get((r, Config("torch", config.mode, "per-block")))
    if reference is None or reference.peak_bytes is None:
        return latte_command(args, config, None), "no torch per-block peak to use as the budget"
    return latte_command(args, config, reference.peak_bytes), None


def run_round(args: argparse.Namespace, r: int, results: Results) -> None:
    """Round `r` of every mode into `results`, alternating sides; progress on stderr."""
    for mode in args.modes:
        for config in round_plan(mode):
            command, problem = command_for(args, results, r, config)
            started = time.monotonic()
            m = Measurement(command, error=problem) if problem else execute(command, args.threads)
            results[r, config] = m
            outcome = f"failed: {m.error}" if m.error else f"median {m.step_s_median:.3f} s, {fmt_mib(m.peak_bytes)}"
            print(
                f"[round {r + 1}/{args.rounds}] {mode} {config.setup} {config.side}: {outcome} "
                f"({time.monotonic() - started:.0f} s wall)",
                file=sys.stderr,
            )


# --------------------------------------------------------------------------- comparisons


@dataclass(frozen=True)
class Comparison:
    """One row of the table: a metric of a latte configuration over one of torch."""

    mode: str
    label: str
    latte: str
    torch: str
    metric: str  # "step_s_median" or "peak_bytes"
    target: float | None  # None: shown for context, no target
    stretch: float | None = None


def comparisons(mode: str) -> list[Comparison]:
    """The rows the benchmark issue asks for, per mode, and the per-block peak for context."""
    time_, peak = "step_s_median", "peak_bytes"
    if mode == "fwd":
        return [Comparison(mode, "forward: time", "fwd", "fwd", time_, 1.0, stretch=0.8)]
    return [
        Comparison(mode, "no checkpointing: time", "none", "none", time_, 1.0),
        Comparison(mode, "no checkpointing: peak memory", "none", "none", peak, 1.0),
        Comparison(mode, "per-block checkpointing¹: time", "per-block", "per-block", time_, 1.0),
        Comparison(mode, "per-block checkpointing¹: peak memory", "per-block", "per-block", peak, None),
        Comparison(mode, "at PyTorch's per-block peak²: time", "budget", "per-block", time_, 0.85),
    ]


def rounds_done(results: Results) -> int:
    return 1 + max(r for r, _ in results)


def side_values(results: Results, rounds: int, config: Config, metric: str) -> list[float | None]:
    """The metric of one configuration, per round (None where the run failed)."""
    return [getattr(results[r, config], metric) if (r, config) in results else None for r in range(rounds)]


def median_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def min_or_none(values: list[float | None]) -> float | None:
    return min((v for v in values if v is not None), default=None)


def fastest_ratio(results: Results, c: Comparison) -> float | None:
    """For a time row, each side's fastest timed step over all rounds, divided. Other load on
    the machine only ever adds time, so the fastest steps are the two sides' least disturbed
    ones; shown next to the ratio of medians, which is what the targets are judged on."""
    if c.metric != "step_s_median":
        return None
    latte, torch = (
        min_or_none(side_values(results, rounds_done(results), Config(side, c.mode, setup), "step_s_min"))
        for side, setup in (("latte", c.latte), ("torch", c.torch))
    )
    return ratio(latte, torch)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# --------------------------------------------------------------------------- markdown


def fmt_mib(value: float | None) -> str:
    return "—" if value is None else f"{value / MIB:.1f} MiB"


def fmt_value(value: float | None, metric: str) -> str:
    if value is None:
        return "—"
    return fmt_mib(value) if metric == "peak_bytes" else f"{value:.3f} s"


def fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def fmt_target(c: Comparison) -> str:
    if c.target is None:
        return "—"
    return f"≤ {c.target:g}" + (f" (stretch ≤ {c.stretch:g})" if c.stretch is not None else "")


def verdict(value: float | None, c: Comparison, latte_failed: bool) -> str:
    """Met or not; a latte-rs side that never ran (an infeasible budget) does not meet its target."""
    if c.target is None:
        return "—"
    if value is None:
        return "not met (latte-rs failed)" if latte_failed else "no data"
    if value > c.target:
        return "not met"
    return "met (stretch met)" if c.stretch is not None and value <= c.stretch else "met"


def ratio_table(results: Results, args: argparse.Namespace) -> list[str]:
    lines = [
        "| mode | comparison | latte-rs | PyTorch | ratio | per round | fastest steps | target | met |",
        "|---|---|---:|---:|---:|---|---:|---|---|",
    ]
    for mode in args.modes:
        for c in comparisons(mode):
            latte = side_values(results, rounds_done(results), Config("latte", mode, c.latte), c.metric)
            torch = side_values(results, rounds_done(results), Config("torch", mode, c.torch), c.metric)
            latte_median, torch_median = median_or_none(latte), median_or_none(torch)
            overall = ratio(latte_median, torch_median)
            rounds = ", ".join(fmt_ratio(ratio(a, b)) for a, b in zip(latte, torch))
            fastest = fmt_ratio(fastest_ratio(results, c))
            latte_cell = fmt_value(latte_median, c.metric) if latte_median is not None else "failed"
            lines.append(
                f"| {mode} | {c.label} | {latte_cell} | {fmt_value(torch_median, c.metric)} | "
                f"{fmt_ratio(overall)} | {rounds} | {fastest} | {fmt_target(c)} | "
                f"{verdict(overall, c, latte_median is None)} |"
            )
    return lines


def failures(results: Results) -> list[str]:
    """One line per failed run, with its error."""
    return [
        f"- Failed: round {r + 1}, {config.mode} {config.setup} {config.side}: {m.error}"
        for (r, config), m in results.items()
        if m.error
    ]


def raw_table(results: Results) -> list[str]:
    lines = [
        "| round | mode | setup | side | median | min | peak | note |",
        "|---:|---|---|---|---:|---:|---:|---|",
    ]
    for (r, config), m in results.items():
        note = "failed" if m.error else (m.extra.get("policy", "") if config.side == "latte" else "")
        lines.append(
            f"| {r + 1} | {config.mode} | {config.setup} | {config.side} | "
            f"{fmt_value(m.step_s_median, 'step_s_median')} | {fmt_value(m.step_s_min, 'step_s_min')} | "
            f"{fmt_mib(m.peak_bytes)} | {note} |"
        )
    return lines


def command_lines(results: Results, args: argparse.Namespace) -> list[str]:
    """The commands of round 1 (later rounds differ only in the budgets)."""
    commands = [shlex.join(m.command) for (r, _), m in results.items() if r == 0]
    return ["```sh", export_line(args.threads), *commands, "```"]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def output_of(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def git_commit() -> str:
    commit = output_of(["git", "rev-parse", "--short=12", "HEAD"])
    dirty = output_of(["git", "status", "--porcelain", "--untracked-files=no"])
    return commit + (" (with uncommitted changes)" if dirty not in ("", "unknown") else "")


def torch_versions(results: Results) -> str:
    for (_, config), m in results.items():
        if config.side == "torch" and "torch" in m.extra:
            return f"torch {m.extra['torch']}, diffusers {m.extra['diffusers']}"
    return "torch/diffusers unknown (no torch run succeeded)"


def rounds_text(done: int, planned: int) -> str:
    plural = "round" if done == 1 else "rounds"
    return f"{done} {plural}" if done == planned else f"{done} {plural} of {planned} planned"


def section(results: Results, args: argparse.Namespace, started: datetime, wall_s: float, load: str) -> str:
    """The markdown between the markers."""
    env = ", ".join(f"`{k}={v}`" for k, v in thread_env(args.threads).items())
    lines = [
        BEGIN,
        f"## latte-rs vs PyTorch: `{args.preset}` preset, CPU, {args.threads} threads",
        "",
        "Ratio = latte-rs / PyTorch (below 1: latte-rs is faster or smaller). Each side's value is the "
        f"median over {rounds_text(rounds_done(results), args.rounds)} of its runs' medians of "
        f"{args.repeats} timed step(s) after {args.warmup} warm-up step(s); the ratio column divides the "
        "two, the per-round column divides the two runs of each round, and the fastest-steps column "
        "divides each side's fastest timed step over all rounds (load from elsewhere only adds time; "
        "the targets are judged on the ratio of medians). Peaks are tensor bytes live above "
        "weights and inputs.",
        "",
        *ratio_table(results, args),
        "",
        "¹ latte-rs `--policies every:1` keeps the input of every spatial and temporal block "
        "(the fixed policies count blocks; the planner sees each block's two halves): one "
        "checkpoint per block, as diffusers' "
        "`enable_gradient_checkpointing()` (`bench_torch.py --checkpointing`).  ",
        "² latte-rs `--policies budget:X`, X = the `peak_bytes` of the PyTorch per-block run of the "
        "same round, against that run's time.",
        "",
        *failures(results),
        f"- Date: {started:%Y-%m-%d %H:%M} UTC; total wall time {wall_s / 60:.1f} min; load average "
        f"{load}.",
        f"- Machine: {cpu_model()}, {os.cpu_count()} logical CPUs; {args.threads} threads per side: {env} "
        f"in both environments and `--threads {args.threads}` (`torch.set_num_threads`) for PyTorch.",
        f"- Versions: {output_of(['rustc', '-V'])}; {output_of([args.latte, '--version'])}; "
        f"{torch_versions(results)}; Python {platform.python_version()} (this script); "
        f"git {git_commit()}.",
        f"- Produced by `{shlex.join(['tools/bench_compare.py', *sys.argv[1:]])}`; within each configuration "
        "of each round latte-rs runs first, then PyTorch. Commands of round 1:",
        "",
        *command_lines(results, args),
        "",
        "<details><summary>Every run</summary>",
        "",
        *raw_table(results),
        "",
        "</details>",
        END,
    ]
    return "\n".join(lines) + "\n"


def merged(existing: str | None, block: str) -> str:
    """`existing` with its marked section replaced by `block` (appended if absent)."""
    if existing is None:
        return f"{HEADER}\n{block}"
    start, end = existing.find(BEGIN), existing.find(END)
    if start != -1 and end > start:
        return existing[:start] + block + existing[end + len(END) :].removeprefix("\n")
    return existing.rstrip("\n") + "\n\n" + block


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(text)
    os.chmod(tmp.name, mode)
    os.replace(tmp.name, path)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--latte", default="target/release/latte", help="the latte binary (cargo build --release -p latte-cli)")
    parser.add_argument("--python", default=".venv/bin/python", help="Python with torch and diffusers")
    parser.add_argument("--preset", default="medium", help="preset for both sides (default medium)")
    parser.add_argument(
        "--modes", default="fwd,train,guide", help="comma-separated subset of fwd,train,guide (default all)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="A/B rounds (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per run (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per run first (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="threads for each side (default 2)")
    parser.add_argument("--out", type=Path, default=Path("docs/BENCHMARKS.md"), help="markdown file to update")
    parser.add_argument("--dry-run", action="store_true", help="print the commands of one round and exit")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or any(m not in MODES for m in args.modes):
        parser.error(f"--modes: expected a comma-separated subset of {','.join(MODES)}")
    if args.rounds < 1 or args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--rounds, --repeats and --threads must be positive, --warmup non-negative")
    return args


def dry_run(args: argparse.Namespace) -> None:
    print(export_line(args.threads))
    for mode in args.modes:
        for config in round_plan(mode):
            command = torch_command(args, config) if config.side == "torch" else latte_command(args, config, None)
            print(shlex.join(command))
    print(f"# × {args.rounds} round(s); table to {args.out}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        dry_run(args)
        return 0
    if not Path(args.latte).is_file():
        print(f"{args.latte} not found: build it with `cargo build --release -p latte-cli`", file=sys.stderr)
        return 2
    started, clock = datetime.now(timezone.utc), time.monotonic()
    load_before = os.getloadavg()[0]
    results: Results = {}
    for r in range(args.rounds):
        run_round(args, r, results)
        # Written after every round, so that an interrupted run keeps the finished rounds.
        load = f"{load_before:.2f} at start, {os.getloadavg()[0]:.2f} at end (1 min)"
        block = section(results, args, started, time.monotonic() - clock, load)
        existing = args.out.read_text() if args.out.exists() else None
        write_atomically(args.out, merged(existing, block))
        print(f"wrote {args.out} ({rounds_text(r + 1, args.rounds)})", file=sys.stderr)
    return 1 if any(m.error for m in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
