"""torch.compile speedup: eager against compiled, for inference and for a training step.

Models: timm's DeiT-S without RPE, iRPE-DeiT-S with contextual product RPE on K and on QKV (the
official ``*_ctx_product_50_shared_{k,qkv}``), and SP-ViT-S. Each row gives both throughputs, their
ratio, the time of the first compiled call (compilation included) and the number of graphs Dynamo
made of the forward (1 = no graph break).

    python -m benchmarks.compile                        # full depth, CPU unless CUDA is present
    python -m benchmarks.compile --depth 2 --batch-size 4 --infer-batch-size 8   # a quick look

Writes benchmarks/results/compile.{csv,md,png}.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.backbones import Variant, _batch, build, infer_step, train_step
from benchmarks.common import round_ratios, synchronize, time_interleaved, write_results

VARIANTS = [
    Variant("deit_small (no RPE)", "deit_small_patch16_224"),
    Variant("irpe ctx product K", "deit_small_patch16_224_ctx_product_50_shared_k"),
    Variant("irpe ctx product QKV", "deit_small_patch16_224_ctx_product_50_shared_qkv"),
    Variant("spvit_small", "spvit_small_patch16_224"),
]


def graph_count(model: torch.nn.Module, images: torch.Tensor) -> int:
    """Graphs Dynamo makes of one inference forward (graph breaks + 1): a custom backend (torch.compile's
    public hook) counts the graphs it is handed and runs them as they are; nothing is compiled."""
    graphs: list[torch.fx.GraphModule] = []

    def count(graph: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., Any]:
        graphs.append(graph)
        return graph.forward

    torch.compiler.reset()
    with torch.no_grad():
        torch.compile(model.eval(), backend=count)(images)
    torch.compiler.reset()
    return len(graphs)


def first_call_seconds(step: Callable[[], Any], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def measure(variant: Variant, args: argparse.Namespace, device: torch.device, bf16: bool) -> list[dict[str, Any]]:
    model = build(variant, device, args.depth)
    compiled = torch.compile(model, mode=args.mode, backend=args.backend)
    train_images, labels = _batch(args.batch_size, device)
    infer_images = _batch(args.infer_batch_size, device)[0]
    graphs = graph_count(model, infer_images)
    torch.compiler.reset()
    rows = []
    for step_name, batch, step in (
        (f"inference b{args.infer_batch_size}", args.infer_batch_size, lambda m: infer_step(m, infer_images, bf16)),
        (f"training b{args.batch_size}", args.batch_size, lambda m: train_step(m, train_images, labels, bf16)),
    ):
        compile_s = first_call_seconds(lambda s=step: s(compiled), device)
        times = time_interleaved(
            {"eager": lambda s=step: s(model), "compiled": lambda s=step: s(compiled)}, device, args.rounds
        )
        rows.append(
            {
                "model": variant.label,
                "step": step_name,
                "eager img/s": batch / statistics.median(times["eager"]),
                "compiled img/s": batch / statistics.median(times["compiled"]),
                "speedup": round_ratios(times["eager"], times["compiled"])[0],
                "first compiled call s": compile_s,
                "graphs": graphs,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=[v.label for v in VARIANTS], default=None, metavar="LABEL",
                        help="a subset of: " + "; ".join(v.label for v in VARIANTS))
    parser.add_argument("--batch-size", type=int, default=16, help="training batch")
    parser.add_argument("--infer-batch-size", type=int, default=32)
    parser.add_argument("--depth", type=int, default=None, help="override the depth (quick runs)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mode", default=None, help="torch.compile mode (default, reduce-overhead, max-autotune)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.infer_batch_size < 1:
        parser.error(f"--batch-size {args.batch_size} / --infer-batch-size {args.infer_batch_size}: expected >= 1")

    device = torch.device(args.device)
    bf16 = device.type == "cuda"
    variants = [v for v in VARIANTS if args.models is None or v.label in args.models]
    rows = [row for variant in variants for row in measure(variant, args, device, bf16)]

    def plot(ax: Any) -> None:
        labels = [v.label for v in variants]
        steps = list(dict.fromkeys(r["step"] for r in rows))
        width = 0.8 / len(steps)
        for i, step in enumerate(steps):
            speedups = [next(r["speedup"] for r in rows if r["model"] == label and r["step"] == step) for label in labels]
            ax.bar([x + i * width for x in range(len(labels))], speedups, width=width, label=step)
        ax.axhline(1.0, color="grey", lw=1, ls="--")
        ax.set_xticks([x + width * (len(steps) - 1) / 2 for x in range(len(labels))], labels)
        ax.set_ylabel(f"compiled / eager throughput ({device.type}, {args.backend})")
        ax.legend()

    depth = f"depth {args.depth}" if args.depth else "full depth"
    notes = (
        f"torch.compile(backend={args.backend!r}, mode={args.mode!r}) against eager, {depth}, "
        f"{'bf16 autocast' if bf16 else 'float32'}; medians of {args.rounds} interleaved rounds. "
        "`first compiled call s` includes compilation; `graphs` is the number of FX graphs Dynamo makes of the "
        "forward (1: no graph break)."
    )
    write_results("compile", rows, plot, notes)


if __name__ == "__main__":
    main()
