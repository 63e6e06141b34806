"""Where the time of one attention layer goes: timm's fused attention beside iRPE's, op by op.

Profiles forward+backward of one DeiT-S attention layer (dim 384, 6 heads, 14x14 patches and a class
token) with ``torch.profiler`` and reports each aten op's self time per step, so the cost of the
relative position terms reads off directly: the gathers that spread per-bucket values over the
n x n pairs, the scatter-adds that sum the logit gradient back into buckets, the products with the
tables, and the recomputed attention that replaces the fused kernel's backward. One thread by
default: per-op times are then stable on a shared machine.

    python -m benchmarks.attention_profile            # batch 16, one thread
    python -m benchmarks.attention_profile --threads 2

Writes benchmarks/results/attention_profile.{csv,md,png}.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from timm.models.vision_transformer import Attention
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import write_results
from finetune.backbones.irpe import RPEAttention

DIM, HEADS, GRID = 384, 6, 14  # DeiT-S at 224


def layers() -> dict[str, torch.nn.Module]:
    def irpe(rpe_on: str) -> RPEAttention:
        config = dict(method="product", ratio=1.9, mode="ctx", rpe_on=rpe_on, shared_head=True)
        return RPEAttention(DIM, HEADS, qkv_bias=True, rpe_config=config, grid_size=(GRID, GRID))

    built = {"timm Attention (fused SDPA)": Attention(DIM, HEADS, qkv_bias=True), "irpe ctx K shared": irpe("k"),
             "irpe ctx QKV shared": irpe("qkv")}
    generator = torch.Generator().manual_seed(0)
    for layer in built.values():
        with torch.no_grad():
            for param in layer.parameters():  # non-zero RPE tables, as after training
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    return built


def step(layer: torch.nn.Module, x: torch.Tensor) -> None:
    layer(x).sum().backward()


def op_times(layer: torch.nn.Module, x: torch.Tensor, steps: int) -> tuple[dict[str, float], float]:
    """Self CPU milliseconds per step of every aten op, and the unprofiled wall milliseconds per step."""
    for _ in range(2):
        step(layer, x)
    start = time.perf_counter()
    for _ in range(steps):
        step(layer, x)
    wall = (time.perf_counter() - start) / steps * 1e3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(layer, x)
    times = {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages() if e.key.startswith("aten::")}
    return times, wall


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=14, help="ops listed by name; the rest are summed")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.threads < 1 or args.steps < 1:
        parser.error("--batch-size, --threads and --steps must be >= 1")

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        x = torch.randn(args.batch_size, 1 + GRID * GRID, DIM, requires_grad=True)
        measured = {label: op_times(layer, x, args.steps) for label, layer in layers().items()}
    finally:
        torch.set_num_threads(threads)
    labels = list(measured)
    totals: dict[str, float] = {}
    for times, _ in measured.values():
        for op, ms in times.items():
            totals[op] = max(totals.get(op, 0.0), ms)
    listed = sorted(totals, key=totals.get, reverse=True)[: args.top]

    rows: list[dict[str, Any]] = []
    for op in listed:
        rows.append({"op (self ms per step)": op, **{label: measured[label][0].get(op, 0.0) for label in labels}})
    rows.append({"op (self ms per step)": "other aten ops",
                 **{label: sum(ms for op, ms in measured[label][0].items() if op not in listed) for label in labels}})
    rows.append({"op (self ms per step)": "all aten ops", **{label: sum(measured[label][0].values()) for label in labels}})
    rows.append({"op (self ms per step)": "wall time per step (unprofiled)", **{label: measured[label][1] for label in labels}})

    def plot(ax: Any) -> None:
        left = [0.0] * len(labels)
        for row in rows[: len(listed) + 1]:
            widths = [row[label] for label in labels]
            ax.barh(labels, widths, left=left, label=row["op (self ms per step)"].removeprefix("aten::"))
            left = [a + b for a, b in zip(left, widths, strict=True)]
        ax.invert_yaxis()
        ax.set_xlabel(f"self CPU ms per forward+backward step (batch {args.batch_size}, {args.threads} thread(s))")
        ax.legend(fontsize=7, ncol=2, loc="lower right")

    notes = (
        f"One attention layer of DeiT-S (dim {DIM}, {HEADS} heads, {GRID}x{GRID} patches + class token), "
        f"forward+backward at batch {args.batch_size}, float32, {args.threads} thread(s), {args.steps} profiled steps. "
        "The qkv and output projections (mm, addmm) are the same in every column; the rest is attention."
    )
    write_results("attention_profile", rows, plot, notes)


if __name__ == "__main__":
    main()
