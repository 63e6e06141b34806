"""Training and inference throughput and peak memory of the backbones, as ratios to a plain baseline.

Suites:
- ``irpe``: timm's DeiT-S without RPE beside iRPE-DeiT-S (product, 50 buckets) with bias and
  contextual RPE on K, QK, QKV, shared and per-head, on the fast path and on the plain reference path.
- ``spvit``: SP-ViT-S beside the same LV-ViT body with plain attention (sp_layers=0).

    python -m benchmarks.backbones --suite irpe --batch-size 16
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
import torch.nn.functional as F

import finetune  # noqa: F401  (registers the models)
from benchmarks.common import child_peak_mb, peak_memory_mb, rss_peak_mb, time_interleaved, write_results

# Targets from the issues, as ratios to the baseline in the same run (CPU).
TRAIN_TARGETS = {"irpe ctx K shared": 0.92, "irpe ctx QKV shared": 0.75, "spvit": 0.90}
MEMORY_TARGET = 1.10


@dataclass(frozen=True)
class Variant:
    label: str
    model: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    reference: bool = False


def irpe_variants() -> list[Variant]:
    variants = [Variant("deit_small (no RPE)", "deit_small_patch16_224")]
    for reference in (False, True):
        for shared in (True, False):
            for mode, placements in (("bias", ("k", "qk")), ("ctx", ("k", "qk", "qkv"))):
                for on in placements:
                    rpe = dict(method="product", ratio=1.9, mode=mode, rpe_on=on, shared_head=shared)
                    label = f"irpe {mode} {on.upper()} {'shared' if shared else 'per-head'}"
                    label += " (reference)" if reference else ""
                    variants.append(Variant(label, "irpe_deit_small_patch16_224", {"rpe_config": rpe}, reference))
    return variants


def spvit_variants() -> list[Variant]:
    return [
        Variant("lvvit body, plain attention (sp_layers=0)", "spvit_small_patch16_224", {"sp_layers": 0}),
        Variant("spvit_small (sp_layers=14)", "spvit_small_patch16_224"),
    ]


SUITES = {"irpe": irpe_variants, "spvit": spvit_variants}


def build(variant: Variant, device: torch.device, depth: int | None) -> torch.nn.Module:
    kwargs = dict(variant.kwargs)
    if depth is not None:
        kwargs["depth"] = depth
        if "sp_layers" not in kwargs and variant.model.startswith("spvit"):
            # keep S's share of SP-SA blocks (14 of 16); the class token must join before the last block
            kwargs["sp_layers"] = min(depth - 1, max(1, round(depth * 14 / 16)))
    model = timm.create_model(variant.model, **kwargs).to(device)
    if variant.reference:
        for module in model.modules():
            if hasattr(module, "reference"):
                module.reference = True
    return model


def _batch(batch_size: int, device: torch.device, img_size: int = 224) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, img_size, img_size, generator=generator).to(device)
    return images, torch.randint(0, 1000, (batch_size,), generator=generator).to(device)


def train_step(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, bf16: bool) -> None:
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(model(images), labels)
    loss.backward()


@torch.inference_mode()
def infer_step(model: torch.nn.Module, images: torch.Tensor, bf16: bool) -> None:
    model.eval()
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
        model(images)


def run_child(spec: dict[str, Any]) -> None:
    """Child process of ``peak_memory_mb``: build one variant, run two steps, print the peak in MiB."""
    device = torch.device(spec["device"])
    rss_before = rss_peak_mb()
    model = build(Variant(**spec["variant"]), device, spec["depth"])
    images, labels = _batch(spec["batch_size"], device)
    for _ in range(2):
        if spec["mode"] == "train":
            train_step(model, images, labels, spec["bf16"])
        else:
            infer_step(model, images, spec["bf16"])
    print(child_peak_mb(device, rss_before))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=[*SUITES, "all"], default="all")
    parser.add_argument("--batch-size", type=int, default=16, help="training batch")
    parser.add_argument("--infer-batch-sizes", type=int, nargs="*", default=[1, 32], help="inference batches")
    parser.add_argument("--depth", type=int, default=None, help="override the depth (quick runs)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference-path rows")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child runs")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child(json.loads(args.child))
        return

    device = torch.device(args.device)
    bf16 = device.type == "cuda"
    for suite in SUITES if args.suite == "all" else [args.suite]:
        variants = [v for v in SUITES[suite]() if not (args.no_reference and v.reference)]
        run_suite(suite, variants, args, device, bf16)


def run_suite(suite: str, variants: list[Variant], args: argparse.Namespace, device: torch.device, bf16: bool) -> None:
    models = {v.label: build(v, device, args.depth) for v in variants}
    images, labels = _batch(args.batch_size, device)
    train = time_interleaved(
        {label: (lambda m=m: train_step(m, images, labels, bf16)) for label, m in models.items()}, device, args.rounds
    )
    infer = {}
    for batch_size in args.infer_batch_sizes:
        batch = _batch(batch_size, device)[0]
        infer[batch_size] = time_interleaved(
            {label: (lambda m=m, b=batch: infer_step(m, b, bf16)) for label, m in models.items()}, device, args.rounds
        )
    del models

    baseline = variants[0].label
    rows = []
    for variant in variants:
        label = variant.label
        row: dict[str, Any] = {"model": label}
        row["train img/s"] = args.batch_size / train[label]
        row["train ratio"] = train[baseline] / train[label]
        for batch_size, times in infer.items():
            row[f"infer b{batch_size} img/s"] = batch_size / times[label]
            row[f"infer b{batch_size} ratio"] = times[baseline] / times[label]
        if not args.no_memory:
            spec = dict(variant=variant.__dict__, device=str(device), depth=args.depth, bf16=bf16)
            row["train peak MiB"] = peak_memory_mb("benchmarks.backbones", {**spec, "mode": "train", "batch_size": args.batch_size})
        rows.append(row)
    if not args.no_memory:
        for row in rows:
            baseline_mb = rows[0]["train peak MiB"]
            row["memory ratio"] = row["train peak MiB"] / baseline_mb if baseline_mb > 0 else float("nan")

    def plot(ax: Any) -> None:
        labels = [r["model"] for r in rows]
        ax.barh(labels, [r["train ratio"] for r in rows], color="tab:blue", label="training throughput ratio")
        for target_label, target in TRAIN_TARGETS.items():
            if any(target_label in lbl for lbl in labels) or (suite == "spvit" and target_label == "spvit"):
                ax.axvline(target, ls="--", color="tab:red", lw=1)
        ax.invert_yaxis()
        ax.set_xlabel(f"training images/s relative to {baseline} (batch {args.batch_size}, {device.type})")
        ax.set_xlim(0, max(1.1, max(r["train ratio"] for r in rows) + 0.05))
        ax.legend(loc="lower right")

    notes = (
        f"Training = forward+backward at batch {args.batch_size}{', bf16 autocast' if bf16 else ', float32'}; "
        f"ratios to `{baseline}` in the same run (best of {args.rounds} interleaved rounds). "
        f"Targets: {', '.join(f'{k} >= {v}x' for k, v in TRAIN_TARGETS.items())}, peak memory <= {MEMORY_TARGET}x. "
        + ("Peak memory: growth of the resident set of a fresh process over two steps, from before the model was built." if device.type == "cpu" else
           "Peak memory: torch.cuda.max_memory_allocated in a fresh process.")
    )
    write_results(f"backbones_{suite}", rows, plot, notes)


if __name__ == "__main__":
    main()
