"""Shared pieces of the benchmarks: interleaved timing, peak memory in a child process, result files.

Speed is compared as ratios inside one run, timed close together so that a noisy machine slows both
sides of a ratio alike: in interleaved rounds (``time_interleaved``) or, against a baseline, each
call right after one of the baseline (``time_paired``). A ratio is the median over rounds or pairs,
reported with the lowest and highest as its spread.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def environment() -> dict[str, str]:
    """The machine, torch version and device a result was measured on."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"
    return {
        "machine": platform.node() or "unknown",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "threads": str(torch.get_num_threads()),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    candidates: dict[str, Callable[[], Any]], device: torch.device, rounds: int = 3, calls: int = 2
) -> dict[str, list[float]]:
    """Seconds per call of each candidate in each of ``rounds`` interleaved rounds of ``calls`` calls."""
    for run in candidates.values():  # warm-up: caches, allocator, lazy init, compilation
        run()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, run in candidates.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(calls):
                run()
            synchronize(device)
            times[name].append((time.perf_counter() - start) / calls)
    return times


def time_paired(
    candidates: dict[str, Callable[[], Any]], device: torch.device, rounds: int = 3
) -> dict[str, tuple[list[float], list[float]]]:
    """Seconds of single calls, every call of a candidate right after one of the baseline (the first of
    ``candidates``), in ``rounds`` rounds of all candidates: per candidate, (baseline seconds, candidate
    seconds) pair by pair; the baseline's own entry pairs its calls with themselves.

    The two calls of a pair are seconds apart, so this machine's slow spells (up to 1.6x for tens of
    seconds) slow both alike; a round of every candidate in turn put the baseline tens of seconds from
    the last candidates, and single rounds' ratios spread from 0.58 to 0.96.
    """
    for run in candidates.values():  # warm-up: caches, allocator, lazy init, compilation
        run()
    baseline, *others = candidates
    pairs: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in others}
    for _ in range(rounds):
        for name in others:
            for slot, run in enumerate((candidates[baseline], candidates[name])):
                synchronize(device)
                start = time.perf_counter()
                run()
                synchronize(device)
                pairs[name][slot].append(time.perf_counter() - start)
    baseline_times = [seconds for times, _ in pairs.values() for seconds in times]
    return {baseline: (baseline_times, baseline_times), **pairs}


def round_ratios(baseline: list[float], candidate: list[float]) -> tuple[float, float, float]:
    """Median, lowest and highest over rounds of baseline time / candidate time in the same round."""
    ratios = [b / c for b, c in zip(baseline, candidate, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def peak_memory_mb(module: str, spec: dict[str, Any]) -> float:
    """Peak memory of one measurement run in a fresh child process (``python -m module --child JSON``).

    On CUDA the child reports torch.cuda.max_memory_allocated; on the CPU the growth of its peak
    resident set size from before the model was built.
    """
    # glibc otherwise raises its mmap threshold as blocks are freed and keeps freed blocks in its heap,
    # so the CPU resident set would depend on allocation order (+-5% between identical runs); with a
    # fixed threshold every tensor block is mapped and unmapped with the tensor and the peak follows
    # the live tensor bytes
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**16)}
    out = subprocess.run(
        [sys.executable, "-m", module, "--child", json.dumps(spec)], capture_output=True, text=True, env=env
    )
    if out.returncode != 0:
        tail = " | ".join(out.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"memory child run of {spec.get('variant', spec)} failed ({out.returncode}): {tail}")
    return float(out.stdout.strip().splitlines()[-1])


def rss_peak_mb() -> float:
    """Peak resident set of this process in MiB.

    Linux's VmHWM belongs to the address space, which exec replaces; getrusage's ru_maxrss is
    inherited from the parent across fork and exec, so a child of a large parent would report the
    parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child_peak_mb(device: torch.device, rss_before_mb: float) -> float:
    """Peak tensor memory of the child: CUDA allocator peak, or the CPU resident-set peak above the
    process's footprint before the model was built (torch's own libraries weigh over 1 GB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return rss_peak_mb() - rss_before_mb


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row[c]) for c in columns) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def write_results(
    name: str,
    rows: Sequence[dict[str, Any]],
    plot: Callable[[Any], None] | None = None,
    notes: str = "",
) -> Path:
    """Write ``results/NAME.csv``, ``results/NAME.md`` (table + environment) and ``results/NAME.png``."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    with open(RESULTS_DIR / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    env = ", ".join(f"{k} {v}" for k, v in environment().items())
    text = f"{markdown_table(rows)}\n\n{notes}\n\nMeasured on: {env}.\n" if notes else f"{markdown_table(rows)}\n\nMeasured on: {env}.\n"
    (RESULTS_DIR / f"{name}.md").write_text(text)
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(10, 5))
        plot(ax)
        fig.tight_layout()
        fig.savefig(RESULTS_DIR / f"{name}.png", dpi=120)
        plt.close(fig)
    print(text)
    return RESULTS_DIR / f"{name}.md"
