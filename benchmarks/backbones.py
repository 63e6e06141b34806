"""Training and inference throughput and peak memory of the backbones, as ratios to a plain baseline.

Suites:
- ``irpe``: timm's DeiT-S without RPE beside iRPE-DeiT-S (product, 50 buckets) with bias and
  contextual RPE on K, QK, QKV, shared and per-head, on the fast path and on the plain reference path,
  and contextual K with FlexAttention in CPU inference (inference columns only).
- ``spvit``: SP-ViT-S beside the same LV-ViT body with plain attention (sp_layers=0).
- ``irpe_cuda`` / ``spvit_cuda``: the rows of the iRPE paper's Fig. 10 on a GPU (bf16, batch 128):
  DeiT-S with fused SDPA beside iRPE-DeiT-S contextual K and QKV; SP-ViT-S beside its plain body.

    python -m benchmarks.backbones --suite irpe --batch-size 16
    python -m benchmarks.backbones --suite irpe_cuda --device cuda --batch-size 128 --infer-batch-sizes 128
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
import torch.nn.functional as F

import finetune  # noqa: F401  (registers the models)
from benchmarks.common import (
    child_peak_mb,
    peak_memory_mb,
    round_ratios,
    rss_peak_mb,
    time_paired,
    write_results,
)
from finetune.backbones import flex


@dataclass(frozen=True)
class Target:
    """A target from the issues: ``column`` of the ``row`` (a ratio to the baseline in the same run)
    at least (``at_least``) or at most ``bound``; ``row`` None means the worst fast-path row."""

    source: str
    row: str | None
    column: str
    bound: float
    at_least: bool = True

    def measured(self, rows: list[dict[str, Any]]) -> float | None:
        if self.row is not None:
            return next((r[self.column] for r in rows if r["model"] == self.row and _number(r.get(self.column))), None)
        values = [r[self.column] for r in rows if "(reference)" not in r["model"] and _number(r.get(self.column))]
        return (min if self.at_least else max)(values) if values else None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


TARGETS = {
    "irpe": [
        Target("issue 8", "irpe ctx K shared", "train ratio", 0.95),
        Target("issue 8", "irpe ctx QKV shared", "train ratio", 0.80),
        Target("issue 8", None, "train memory ratio", 1.05, at_least=False),
        Target("issue 8", "irpe ctx QKV shared", "fast / reference training", 1.5),
        Target("issue 2", "irpe ctx K shared", "train ratio", 0.92),
        Target("issue 2", "irpe ctx QKV shared", "train ratio", 0.75),
        Target("issue 2", None, "train memory ratio", 1.10, at_least=False),
        Target("issue 17", "irpe ctx K shared", "train ratio", 0.95),
        Target("issue 17", "irpe ctx QKV shared", "train ratio", 0.85),
        Target("issue 17", None, "train memory ratio", 1.05, at_least=False),
        Target("issue 17", "irpe ctx QKV shared", "infer memory ratio", 1.02, at_least=False),
    ],
    "spvit": [
        Target("issue 3", "spvit_small (sp_layers=14)", "train ratio", 0.90),
        Target("issue 17", "spvit_small (sp_layers=14)", "train memory ratio", 1.05, at_least=False),
    ],
    "irpe_cuda": [
        Target("issue 17", "irpe ctx K shared", "train ratio", 0.95),
        Target("issue 17", "irpe ctx K shared", "train memory ratio", 1.05, at_least=False),
    ],
    "spvit_cuda": [
        Target("issue 17", "spvit_small (sp_layers=14)", "train ratio", 0.95),
        Target("issue 17", "spvit_small (sp_layers=14)", "train memory ratio", 1.05, at_least=False),
    ],
}


def target_table(targets: list[Target], rows: list[dict[str, Any]]) -> str:
    """A Markdown table of each target beside what this run measured."""
    lines = ["| target | required | measured | |", "|---|---|---|---|"]
    for target in targets:
        value = target.measured(rows)
        where = target.row or "every fast-path row"
        required = f"{'>=' if target.at_least else '<='} {target.bound}"
        if value is None:
            lines.append(f"| {target.source}: {where}, {target.column} | {required} | not measured | |")
            continue
        met = value >= target.bound if target.at_least else value <= target.bound
        lines.append(f"| {target.source}: {where}, {target.column} | {required} | {value:.3f} | {'met' if met else 'MISSED'} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Variant:
    label: str
    model: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    reference: bool = False
    flex_inference: bool = False  # FlexAttention in CPU inference; timed for inference only


def _irpe_variant(mode: str, on: str, shared: bool = True, reference: bool = False) -> Variant:
    rpe = dict(method="product", ratio=1.9, mode=mode, rpe_on=on, shared_head=shared)
    label = f"irpe {mode} {on.upper()} {'shared' if shared else 'per-head'}" + (" (reference)" if reference else "")
    return Variant(label, "irpe_deit_small_patch16_224", {"rpe_config": rpe}, reference)


def irpe_variants() -> list[Variant]:
    variants = [Variant("deit_small (no RPE)", "deit_small_patch16_224")]
    for reference in (False, True):
        for shared in (True, False):
            for mode, placements in (("bias", ("k", "qk")), ("ctx", ("k", "qk", "qkv"))):
                variants += [_irpe_variant(mode, on, shared, reference) for on in placements]
    flex_k = _irpe_variant("ctx", "k")
    variants.append(Variant(f"{flex_k.label} (flex inference)", flex_k.model, flex_k.kwargs, flex_inference=True))
    return variants


def spvit_variants() -> list[Variant]:
    return [
        Variant("lvvit body, plain attention (sp_layers=0)", "spvit_small_patch16_224", {"sp_layers": 0}),
        Variant("spvit_small (sp_layers=14)", "spvit_small_patch16_224"),
        Variant("spvit_small (sp_layers=14) (flex inference)", "spvit_small_patch16_224", flex_inference=True),
    ]


def irpe_cuda_variants() -> list[Variant]:
    return [Variant("deit_small (no RPE)", "deit_small_patch16_224"), _irpe_variant("ctx", "k"), _irpe_variant("ctx", "qkv")]


def spvit_cuda_variants() -> list[Variant]:
    return spvit_variants()[:2]


SUITES = {"irpe": irpe_variants, "spvit": spvit_variants, "irpe_cuda": irpe_cuda_variants, "spvit_cuda": spvit_cuda_variants}


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
    flex.set_cpu_inference(model, variant.flex_inference)
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
    parser.add_argument("--models", nargs="+", metavar="LABEL", default=None,
                        help="only these rows of the suite (the baseline, its first row, is always kept)")
    parser.add_argument("--batch-size", type=int, default=16, help="training batch")
    parser.add_argument("--infer-batch-sizes", type=int, nargs="*", default=[1, 32], help="inference batches")
    parser.add_argument("--depth", type=int, default=None, help="override the depth (quick runs)")
    parser.add_argument("--rounds", type=int, default=10, help="training rounds (ratios: median over rounds)")
    parser.add_argument("--infer-rounds", type=int, default=3)
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
        if args.models is not None:
            unknown = sorted(set(args.models) - {v.label for v in variants})
            if unknown:
                parser.error(f"--models {unknown}: not rows of suite {suite!r}; expected some of {[v.label for v in variants]}")
            variants = variants[:1] + [v for v in variants[1:] if v.label in args.models]
        run_suite(suite, variants, args, device, bf16)


def run_suite(suite: str, variants: list[Variant], args: argparse.Namespace, device: torch.device, bf16: bool) -> None:
    models = {v.label: build(v, device, args.depth) for v in variants}
    flex_rows = {v.label for v in variants if v.flex_inference}
    images, labels = _batch(args.batch_size, device)
    # single calls, each right after one of the baseline: a slow spell of the machine slows both
    train = time_paired(
        {label: (lambda m=m: train_step(m, images, labels, bf16)) for label, m in models.items() if label not in flex_rows},
        device, args.rounds,
    )
    infer = {}
    for batch_size in args.infer_batch_sizes:
        batch = _batch(batch_size, device)[0]
        infer[batch_size] = time_paired(
            {label: (lambda m=m, b=batch: infer_step(m, b, bf16)) for label, m in models.items()},
            device, args.infer_rounds,
        )
    del models

    baseline = variants[0].label
    rows = []
    infer_memory_batch = max(args.infer_batch_sizes, key=lambda b: (b <= 32, b), default=1)  # the largest up to 32
    for variant in variants:
        label = variant.label
        row: dict[str, Any] = {"model": label}
        timings = [("train", args.batch_size, train)] + [(f"infer b{b}", b, times) for b, times in infer.items()]
        for name, batch_size, times in timings:
            if label not in times:  # flex rows: inference only
                row.update({f"{name} img/s": "", f"{name} ratio": "", f"{name} spread": ""})
                continue
            baseline_seconds, seconds = times[label]
            ratio, low, high = round_ratios(baseline_seconds, seconds)
            row[f"{name} img/s"] = batch_size / statistics.median(seconds)
            row[f"{name} ratio"] = ratio
            row[f"{name} spread"] = f"{low:.3f}-{high:.3f}"
        if not args.no_memory:
            # a flex row's process also compiles the kernel: its resident set is not the model's
            spec = dict(variant=variant.__dict__, device=str(device), depth=args.depth, bf16=bf16)
            train_mb = "" if variant.flex_inference else peak_memory_mb(
                "benchmarks.backbones", {**spec, "mode": "train", "batch_size": args.batch_size}
            )
            infer_mb = "" if variant.flex_inference and device.type == "cpu" else peak_memory_mb(
                "benchmarks.backbones", {**spec, "mode": "infer", "batch_size": infer_memory_batch}
            )
            row["train peak MiB"], row[f"infer b{infer_memory_batch} peak MiB"] = train_mb, infer_mb
        rows.append(row)
    if not args.no_memory:
        for row in rows:
            for column, ratio in (("train peak MiB", "train memory ratio"), (f"infer b{infer_memory_batch} peak MiB", "infer memory ratio")):
                baseline_mb = rows[0][column]
                row[ratio] = "" if row[column] == "" else row[column] / baseline_mb if baseline_mb > 0 else float("nan")
    for row in rows:  # the fast path against the plain reference path of the same configuration
        reference = next((r for r in rows if r["model"] == f"{row['model']} (reference)"), None)
        row["fast / reference training"] = row["train img/s"] / reference["train img/s"] if reference else ""

    def plot(ax: Any) -> None:
        trained = [r for r in rows if _number(r["train ratio"])]
        labels = [r["model"] for r in trained]
        ax.barh(labels, [r["train ratio"] for r in trained], color="tab:blue", label="training throughput ratio (median)")
        for bound in sorted({t.bound for t in TARGETS.get(suite, []) if t.column == "train ratio"}):
            ax.axvline(bound, ls="--", color="tab:red", lw=1)
        ax.invert_yaxis()
        ax.set_xlabel(f"training images/s relative to {baseline} (batch {args.batch_size}, {device.type})")
        ax.set_xlim(0, max(1.1, max(r["train ratio"] for r in trained) + 0.05))
        ax.legend(loc="lower right")

    notes = (
        f"Training = forward+backward at batch {args.batch_size}{', bf16 autocast' if bf16 else ', float32'}; "
        f"ratios to `{baseline}` in the same run: every call of a row right after a call of `{baseline}`, in "
        f"{args.rounds} rounds (inference {args.infer_rounds}); the ratio is the median over the row's pairs of "
        "their ratio, `spread` the lowest and highest pair; img/s from the row's median call. `(flex inference)` rows: FlexAttention's compiled kernel in inference (compiled in the warm-up call), "
        "not timed in training. "
        + ("Peak memory: growth of the resident set of a fresh process over two steps, from before the model was built, "
           "with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_) so it follows the live tensors."
           if device.type == "cpu" else "Peak memory: torch.cuda.max_memory_allocated in a fresh process.")
    )
    if suite in TARGETS:
        notes += f"\n\nTargets ({device.type}):\n\n{target_table(TARGETS[suite], rows)}"
    write_results(f"backbones_{suite}", rows, plot, notes)


if __name__ == "__main__":
    main()
