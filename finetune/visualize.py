"""Pictures of position encodings, attention and training runs, written as PNG files.

    python cli.py visualize buckets --all-methods --grid 14 14 --out bucket_maps.png
    python cli.py visualize buckets --model deit_small_patch16_224_ctx_product_50_shared_k --reference 3,5
    python cli.py visualize priors --model spvit_small_patch16_224 --checkpoint spvit_s.pth.tar --layer 0
    python cli.py visualize attention --model NAME --checkpoint run.ckpt --image bird.jpg [--query-patch 7 7]
    python cli.py visualize curves --log-dir runs/cub200

- ``buckets``: the iRPE bucket of every key position for a reference (query) position, coloured by
  bucket, as in Figs. 6-9 of the iRPE supplementary (red star: the reference). One panel per table
  (cross has a row table and a column table) and per reference position; a bucket keeps its colour
  across panels of the same table.
- ``priors``: SP-ViT's learned spatial prior SP_h(dx, dy) of every head of one SP-SA layer, over all
  patch offsets of the model's grid (the factor that multiplies q.k/sqrt(d); 1 = plain attention).
- ``attention``: the attention of the class token (or of one patch) over the patches, per head, over
  the model's input crop of an image.
- ``curves``: loss, top-1/accuracy and learning rate from a Lightning CSVLogger ``metrics.csv``.

Weights come from ``--checkpoint``: a Lightning ``.ckpt`` of the fine-tuning module (the model is
rebuilt from its metadata), or any file timm loads for ``--model`` (official ``.pth`` releases,
``.safetensors``), or from the Hub with ``--model hf-hub:owner/name``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.colors import hsv_to_rgb
from matplotlib.figure import Figure
from PIL import Image
from timm.data import create_transform, resolve_data_config
from timm.layers.attention import Attention
from torch import Tensor, nn

from .backbones.irpe import METHODS, RPEConfig, bucket_ids
from .backbones.spvit import SPSAttention
from .errors import FinetuneError
from .weights import create_model, load_checkpoint_model

__all__ = [
    "VisualizeError",
    "BucketMap",
    "OFFICIAL_RATIOS",
    "bucket_colors",
    "bucket_maps",
    "plot_bucket_maps",
    "load_model",
    "spatial_priors",
    "plot_priors",
    "attention_maps",
    "plot_attention",
    "read_curves",
    "plot_curves",
    "main",
]

# The ratio each method uses in the official DeiT models (DESIGN.md section 3).
OFFICIAL_RATIOS = {"euc": 20.0, "quant": 33.0, "cross": 20.0, "product": 1.9}
PANEL_INCHES = 2.6
CURVE_PATTERNS = {
    "loss": re.compile(r"loss", re.IGNORECASE),
    "accuracy": re.compile(r"top\d|acc", re.IGNORECASE),
    "learning rate": re.compile(r"(^|[/_.-])lr($|[/_.-])|learning_rate", re.IGNORECASE),
}


class VisualizeError(FinetuneError, ValueError):
    """Bad input to a visualisation; the message is one line naming the value and what was expected."""


# --------------------------------------------------------------------------------------------------
# Bucket maps
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BucketMap:
    """The bucket of every key position of an h x w grid for one reference (query) position."""

    table: str  # euc, quant, product, cross_rows or cross_cols
    config: RPEConfig
    reference: tuple[int, int]
    ids: np.ndarray  # (h, w) int

    @property
    def title(self) -> str:
        name = self.table.replace("cross_", "cross, ")
        used = len(np.unique(self.ids))
        return f"{name} (ratio {self.config.ratio:g})\nreference {self.reference}: {used} buckets"


def bucket_colors(count: int) -> np.ndarray:
    """``count`` RGB colours (count, 3) in [0, 1], all distinct, neighbouring ids far apart: hues
    step by the golden ratio and saturation / brightness alternate."""
    ids = np.arange(count)
    hue = (ids * 0.6180339887498949) % 1.0
    saturation = np.where(ids % 2 == 0, 0.9, 0.55)
    value = np.where((ids // 2) % 2 == 0, 0.95, 0.72)
    return hsv_to_rgb(np.stack([hue, saturation, value], axis=1))


def _tables(method: str) -> tuple[str, ...]:
    return ("cross_rows", "cross_cols") if method == "cross" else (method,)


def bucket_maps(config: RPEConfig, grid: tuple[int, int], references: Sequence[tuple[int, int]]) -> list[BucketMap]:
    """Bucket maps of every table of ``config`` (two for cross) for each reference position, table-major."""
    height, width = grid
    for row, col in references:
        if not (0 <= row < height and 0 <= col < width):
            raise VisualizeError(f"reference position ({row}, {col}) lies outside the {height}x{width} grid")
    maps = []
    for table in _tables(config.method):
        ids = bucket_ids(table, height, width, config)[config.skip :, config.skip :]
        for row, col in references:
            query = row * width + col
            maps.append(BucketMap(table, config, (row, col), ids[query].view(height, width).numpy()))
    return maps


def plot_bucket_maps(maps: Sequence[BucketMap]) -> Figure:
    """One row per reference position, one column per table (method, and axis for cross)."""
    references = list(dict.fromkeys(m.reference for m in maps))
    tables = list(dict.fromkeys((m.table, m.config) for m in maps))
    height, width = maps[0].ids.shape
    rows, columns = len(references), len(tables)
    fig = Figure(figsize=(PANEL_INCHES * columns, PANEL_INCHES * rows * height / width + 0.6 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    used = set()
    for bucket_map in maps:
        position = (references.index(bucket_map.reference), tables.index((bucket_map.table, bucket_map.config)))
        used.add(position)
        ax = axes[position]
        colors = bucket_colors(int(bucket_map.ids.max()) + 1)
        ax.imshow(colors[bucket_map.ids], interpolation="nearest")
        row, col = bucket_map.reference
        ax.plot(col, row, marker="*", color="red", markeredgecolor="white", markersize=14, markeredgewidth=0.8)
        ax.set_title(bucket_map.title, fontsize=8)
        ax.set_xticks(range(0, width, max(1, width // 7)))
        ax.set_yticks(range(0, height, max(1, height // 7)))
        ax.tick_params(labelsize=6, length=2)
    for position, ax in np.ndenumerate(axes):
        if position not in used:
            ax.set_axis_off()
    return fig


def _parse_references(values: Sequence[str], grid: tuple[int, int]) -> list[tuple[int, int]]:
    references = []
    for value in values:
        if value == "corner":
            references.append((0, 0))
        elif value in ("centre", "center"):
            references.append((grid[0] // 2, grid[1] // 2))
        elif re.fullmatch(r"\d+,\d+", value):
            row, col = (int(v) for v in value.split(","))
            references.append((row, col))
        else:
            raise VisualizeError(f"--reference {value!r}: expected corner, centre or ROW,COL (e.g. 3,5)")
    return references


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def load_model(name: str | None, checkpoint: Path | None = None, model_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """A model in eval mode: from a Lightning ``.ckpt`` of the fine-tuning module, from a file timm
    loads for ``name`` (official releases), from the Hub (``hf-hub:`` names) or with fresh weights."""
    if checkpoint is not None and not checkpoint.is_file():
        raise VisualizeError(f"--checkpoint {checkpoint}: no such file")
    if checkpoint is not None and checkpoint.suffix == ".ckpt":
        model, record = load_checkpoint_model(checkpoint)
        if name is not None and name != record.model_name:
            raise VisualizeError(f"--model {name}: {checkpoint} holds a {record.model_name} model")
        if record.data_config:  # the preprocessing of the run, for load_image
            model.pretrained_cfg = {**model.pretrained_cfg, **record.data_config}
        return model
    if name is None:
        raise VisualizeError("--model NAME is needed (unless --checkpoint is a Lightning .ckpt)")
    pretrained: bool | Path = checkpoint if checkpoint is not None else name.startswith(("hf-hub:", "local-dir:"))
    try:
        model = create_model(name, pretrained=pretrained, **(model_kwargs or {}))
    except FinetuneError:
        raise
    except (TypeError, ValueError, KeyError) as err:
        raise VisualizeError(f"--model {name} {model_kwargs or {}}: {str(err).splitlines()[0]}") from err
    return model.eval()


def _needs_weights(args: argparse.Namespace) -> None:
    if args.checkpoint is None and not (args.model or "").startswith("hf-hub:"):
        raise VisualizeError(
            f"{args.command} shows learned weights: pass --checkpoint PATH (or an hf-hub: --model)"
        )


def _capture_attention_inputs(model: nn.Module, layer: int, images: Tensor) -> tuple[nn.Module, tuple, dict]:
    """Run ``model`` on ``images`` and return block ``layer``'s attention module with the arguments it got."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise VisualizeError(f"{type(model).__name__} has no transformer blocks (model.blocks) to read attention from")
    if not -len(blocks) <= layer < len(blocks):
        raise VisualizeError(f"--layer {layer}: the model has {len(blocks)} blocks (0-{len(blocks) - 1}, or negative)")
    attn = blocks[layer].attn
    captured: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.update(args=args, kwargs=kwargs)

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(images)
    finally:
        handle.remove()
    return attn, captured["args"], captured["kwargs"]


@torch.no_grad()
def _attention_weights(attn: nn.Module, args: tuple, kwargs: dict) -> Tensor:
    """Attention probabilities (B, H, n, n) of one attention module for the inputs it was called with."""
    if hasattr(attn, "attention_weights"):  # RPEAttention, SPSAttention
        return attn.attention_weights(*args, **kwargs)
    if isinstance(attn, Attention):  # timm's plain attention (SP-ViT blocks after the SP-SA ones)
        x = args[0]
        batch, tokens, _ = x.shape
        q, k, _ = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(q), attn.k_norm(k)
        return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    raise VisualizeError(f"{type(attn).__name__} exposes no attention weights")


# --------------------------------------------------------------------------------------------------
# SP-ViT priors
# --------------------------------------------------------------------------------------------------


def spatial_priors(model: nn.Module, layer: int) -> Tensor:
    """SP_h(dx, dy) of every head of SP-SA layer ``layer`` over every offset of the model's grid:
    (heads, 2h-1, 2w-1), rows dy = 1-h .. h-1, columns dx = 1-w .. w-1 (key minus query, patches)."""
    blocks = getattr(model, "blocks", [])
    sp_layers = [i for i, block in enumerate(blocks) if isinstance(getattr(block, "attn", None), SPSAttention)]
    if not sp_layers:
        raise VisualizeError(f"{type(model).__name__} has no SP-SA layers (priors exist in SP-ViT models only)")
    if layer not in sp_layers:
        raise VisualizeError(f"--layer {layer}: SP-SA layers of this model are {sp_layers[0]}-{sp_layers[-1]}")
    image_size = model.patch_embed.img_size
    attn, args, kwargs = _capture_attention_inputs(model, layer, torch.zeros(1, 3, *image_size))
    with torch.no_grad():
        prior = attn.spatial_prior(*args[1:], **kwargs)  # (H, n, n), the grid (and scale) of the forward
    height, width = args[1]
    dy, dx = torch.meshgrid(torch.arange(1 - height, height), torch.arange(1 - width, width), indexing="ij")
    # For each offset, one (query, key) pair that has it: the query as far up-left as the offset allows.
    query_row, query_col = (-dy).clamp(min=0), (-dx).clamp(min=0)
    query = query_row * width + query_col
    key = (query_row + dy) * width + (query_col + dx)
    return prior[:, query, key]


def plot_priors(priors: Tensor, title: str = "") -> Figure:
    """A heat map per head on a shared colour scale; + marks offset (0, 0)."""
    heads, rows, cols = priors.shape
    height, width = (rows + 1) // 2, (cols + 1) // 2
    columns = min(heads, 6)
    grid_rows = math.ceil(heads / columns)
    fig = Figure(figsize=(PANEL_INCHES * columns + 1.0, PANEL_INCHES * grid_rows * rows / cols + 0.8), layout="constrained")
    axes = fig.subplots(grid_rows, columns, squeeze=False)
    values = priors.float().numpy()
    vmin, vmax = float(values.min()), float(values.max())
    extent = (-width + 0.5, width - 0.5, height - 0.5, -height + 0.5)
    image = None
    for head, ax in enumerate(axes.flat):
        if head >= heads:
            ax.set_axis_off()
            continue
        image = ax.imshow(values[head], cmap="viridis", vmin=vmin, vmax=vmax, extent=extent, interpolation="nearest")
        ax.plot(0, 0, marker="+", color="white", markersize=8)
        ax.set_title(f"head {head}", fontsize=9)
        ax.set_xlabel("dx (key - query column)", fontsize=7)
        ax.set_ylabel("dy (key - query row)", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="prior (multiplies q.k / sqrt(d))")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


# --------------------------------------------------------------------------------------------------
# Attention over an image
# --------------------------------------------------------------------------------------------------


def load_image(model: nn.Module, path: Path) -> tuple[Tensor, np.ndarray]:
    """The model's eval input for the image at ``path`` (1, 3, H, W) and that crop as RGB in [0, 1]."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (FileNotFoundError, IsADirectoryError) as err:
        raise VisualizeError(f"--image {path}: no such file") from err
    except OSError as err:
        raise VisualizeError(f"--image {path}: not an image PIL can read ({err})") from err
    config = resolve_data_config(model=model)
    config["input_size"] = (3, *model.patch_embed.img_size)  # the size it was built for (cfgs say 224)
    tensor = create_transform(**config)(rgb).unsqueeze(0)
    mean = torch.tensor(config["mean"]).view(3, 1, 1)
    std = torch.tensor(config["std"]).view(3, 1, 1)
    shown = (tensor[0] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    return tensor, shown


def attention_maps(
    model: nn.Module, images: Tensor, layer: int = -1, query_patch: tuple[int, int] | None = None
) -> Tensor:
    """Attention of the class token (or of patch ``query_patch`` = (row, col)) over the patch grid in
    block ``layer``, per head: (heads, grid_h, grid_w), for the first image of ``images``."""
    attn, args, kwargs = _capture_attention_inputs(model, layer, images)
    weights = _attention_weights(attn, args, kwargs)[0]  # (H, n, n)
    if not torch.isfinite(weights).all():
        raise VisualizeError(f"block {layer}: the attention weights are not finite (NaN or inf): check the weights")
    grid_size_of = getattr(model, "grid_size_of", None)  # ours; timm's plain ViTs have a fixed grid
    height, width = grid_size_of(images) if grid_size_of else model.patch_embed.grid_size
    prefix = weights.shape[-1] - height * width
    if query_patch is None:
        if prefix == 0:
            raise VisualizeError(
                f"--layer {layer}: this block sees patch tokens only (no class token): pass --query-patch ROW COL"
            )
        query = 0
    else:
        row, col = query_patch
        if not (0 <= row < height and 0 <= col < width):
            raise VisualizeError(f"--query-patch {row} {col}: outside the {height}x{width} patch grid")
        query = prefix + row * width + col
    return weights[:, query, prefix:].reshape(-1, height, width)


def plot_attention(maps: Tensor, image: np.ndarray, query_patch: tuple[int, int] | None = None, title: str = "") -> Figure:
    """The input crop, then one panel per head: the attention map (each head scaled to its maximum)
    upsampled to the crop, over the image. A star marks a query patch."""
    heads, height, width = maps.shape
    columns = min(heads + 1, 6)
    rows = math.ceil((heads + 1) / columns)
    fig = Figure(figsize=(PANEL_INCHES * columns, PANEL_INCHES * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    size = image.shape[:2]
    upsampled = F.interpolate(maps[:, None].float(), size=size, mode="nearest")[:, 0]
    upsampled = upsampled / upsampled.amax(dim=(1, 2), keepdim=True).clamp(min=1e-12)
    for k, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if k == 0:
            ax.imshow(image)
            ax.set_title("input", fontsize=9)
        elif k <= heads:
            ax.imshow(image)
            ax.imshow(upsampled[k - 1].numpy(), cmap="inferno", alpha=0.65, vmin=0, vmax=1)
            ax.set_title(f"head {k - 1}", fontsize=9)
        else:
            continue
        if query_patch is not None:
            patch_h, patch_w = size[0] / height, size[1] / width
            ax.plot((query_patch[1] + 0.5) * patch_w, (query_patch[0] + 0.5) * patch_h, marker="*", color="cyan",
                    markeredgecolor="black", markersize=12)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


# --------------------------------------------------------------------------------------------------
# Training curves
# --------------------------------------------------------------------------------------------------


def find_metrics_file(path: Path) -> Path:
    """``path`` itself if it is a file; for a run folder its training history ``path/metrics.csv``;
    else the newest ``metrics.csv`` under the folder ``path`` (e.g. ``validate/version_N/``)."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise VisualizeError(f"--log-dir {path}: no such file or folder")
    if (path / "metrics.csv").is_file():
        return path / "metrics.csv"
    found = sorted(path.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise VisualizeError(f"--log-dir {path}: no metrics.csv (written by Lightning's CSVLogger) under it")
    return found[-1]


def read_curves(path: Path) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """The curves of a CSVLogger file grouped by panel (loss, accuracy, learning rate):
    ``{panel: {column: (steps, values)}}``; x is the ``step`` column (the row number if absent)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = list(rows[0]) if rows else []
    curves: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for column in columns:
        if column in ("step", "epoch"):
            continue
        panel = next((name for name, pattern in CURVE_PATTERNS.items() if pattern.search(column)), None)
        if panel is None:
            continue
        xs, ys = [], []
        for index, row in enumerate(rows):
            value = row.get(column) or ""
            if value.strip():
                xs.append(float(row["step"]) if row.get("step") else float(index))
                ys.append(float(value))
        if ys:
            curves.setdefault(panel, {})[column] = (xs, ys)
    if not curves:
        raise VisualizeError(
            f"{path}: no loss, top-1/accuracy or lr column with values (columns: {', '.join(columns) or 'none'})"
        )
    return curves


def plot_curves(curves: dict[str, dict[str, tuple[list[float], list[float]]]], title: str = "") -> Figure:
    fig = Figure(figsize=(4.2 * len(curves), 3.4), layout="constrained")
    axes = fig.subplots(1, len(curves), squeeze=False)[0]
    for ax, (panel, columns) in zip(axes, curves.items(), strict=True):
        for column, (xs, ys) in columns.items():
            ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, label=column)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _model_kwargs(value: str) -> dict[str, Any]:
    try:
        kwargs = json.loads(value)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"{value!r}: expected a JSON object such as '{{\"num_classes\": 200}}'") from err
    if not isinstance(kwargs, dict):
        raise argparse.ArgumentTypeError(f"{value!r}: expected a JSON object such as '{{\"num_classes\": 200}}'")
    return kwargs


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected a positive integer")
    return number


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visualize", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def model_args(sub: argparse.ArgumentParser, required: bool = False) -> None:
        sub.add_argument("--model", required=required, help="timm model name (or hf-hub:owner/name)")
        sub.add_argument("--checkpoint", type=Path, help="a Lightning .ckpt or a file timm loads for --model")
        sub.add_argument("--model-kwargs", type=_model_kwargs, default={}, metavar="JSON",
                         help='model arguments, e.g. \'{"num_classes": 200, "img_size": 384}\'')

    def common(sub: argparse.ArgumentParser, default_out: str) -> None:
        sub.add_argument("--out", type=Path, default=Path(default_out), help=f"PNG file (default {default_out})")
        sub.add_argument("--dpi", type=_positive, default=120)

    buckets = commands.add_parser("buckets", help="iRPE bucket maps (Figs. 6-9 of the supplementary)")
    buckets.add_argument("--grid", type=_positive, nargs=2, metavar=("H", "W"),
                         help="patch grid (default 14 14, or the model's)")
    source = buckets.add_mutually_exclusive_group()
    source.add_argument("--method", choices=METHODS, help="one method (default product)")
    source.add_argument("--all-methods", action="store_true", help="euc, quant, cross and product, official ratios")
    buckets.add_argument("--ratio", type=float, help="alpha = ratio, beta = 2 ratio, gamma = 8 ratio "
                         "(default: the method's official ratio)")
    buckets.add_argument("--index", choices=["piecewise", "clip"], default="piecewise", help="index function")
    buckets.add_argument("--reference", nargs="+", default=["corner", "centre"], metavar="POS",
                         help="reference positions: corner, centre or ROW,COL (default corner centre)")
    model_args(buckets)
    common(buckets, "bucket_maps.png")

    priors = commands.add_parser("priors", help="SP-ViT spatial priors of one layer, per head")
    model_args(priors, required=True)
    priors.add_argument("--layer", type=int, default=0, help="SP-SA layer index (default 0)")
    common(priors, "priors.png")

    attention = commands.add_parser("attention", help="attention of the class token or a patch over an image")
    model_args(attention)
    attention.add_argument("--image", type=Path, required=True)
    attention.add_argument("--layer", type=int, default=-1, help="block index (default -1, the last)")
    attention.add_argument("--query-patch", type=int, nargs=2, metavar=("ROW", "COL"),
                           help="a patch as the query (default: the class token)")
    common(attention, "attention.png")

    curves = commands.add_parser("curves", help="training curves from a CSVLogger metrics.csv")
    curves.add_argument("--log-dir", type=Path, required=True, help="a run folder (searched for metrics.csv) or the file")
    common(curves, "curves.png")
    return parser


def _bucket_configs(args: argparse.Namespace) -> tuple[list[RPEConfig], tuple[int, int]]:
    if args.model is not None or args.checkpoint is not None:
        if args.method or args.all_methods or args.ratio is not None:
            raise VisualizeError("--model/--checkpoint take the RPE settings from the model: drop --method/--all-methods/--ratio")
        model = load_model(args.model, args.checkpoint, args.model_kwargs)
        config = getattr(model, "rpe_config", None)
        if not isinstance(config, RPEConfig):
            raise VisualizeError(f"{type(model).__name__} has no rpe_config (bucket maps are for iRPE models)")
        return [config], tuple(args.grid or model.patch_embed.grid_size)
    methods = METHODS if args.all_methods else [args.method or "product"]
    if args.ratio is not None and args.ratio <= 0:
        raise VisualizeError(f"--ratio {args.ratio}: expected a positive number")
    configs = [RPEConfig(method=m, ratio=args.ratio or OFFICIAL_RATIOS[m], index=args.index) for m in methods]
    return configs, tuple(args.grid or (14, 14))


def _render(args: argparse.Namespace) -> Figure:
    if args.command == "buckets":
        configs, grid = _bucket_configs(args)
        references = _parse_references(args.reference, grid)
        maps = [m for config in configs for m in bucket_maps(config, grid, references)]
        return plot_bucket_maps(maps)
    if args.command == "curves":
        path = find_metrics_file(args.log_dir)
        return plot_curves(read_curves(path), title=str(path))
    _needs_weights(args)
    model = load_model(args.model, args.checkpoint, args.model_kwargs)
    name = args.model or getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
    if args.command == "priors":
        return plot_priors(spatial_priors(model, args.layer), title=f"{name}: spatial priors of layer {args.layer}")
    images, shown = load_image(model, args.image)
    query = tuple(args.query_patch) if args.query_patch else None
    maps = attention_maps(model, images, args.layer, query)
    what = "class token" if query is None else f"patch {query}"
    return plot_attention(maps, shown, query, title=f"{name}: attention of the {what}, block {args.layer}")


def main(argv: list[str] | None = None) -> int:
    """``python cli.py visualize SUBCOMMAND ...``: render one PNG; 0 on success, 2 with a one-line error."""
    args = _build_parser().parse_args(argv)
    try:
        fig = _render(args)
    except FinetuneError as err:
        print(f"error: visualize {args.command}: {err}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=args.dpi)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
