"""Moving weights between input resolutions: absolute pos_embed, iRPE tables, SP-ViT spatial priors.

A checkpoint trained on one patch grid (224 px / 16 = 14 x 14) and loaded into a model built for
another (384 px: 24 x 24) is converted by the backbones' checkpoint filters, so timm's own loading
paths (release files, ``hf-hub:`` ids, ``model.pretrained`` in a recipe) all resize:

- absolute pos_embed: bicubic resample of the patch grid, prefix tokens kept (timm's
  ``resample_abs_pos_embed``);
- iRPE tables, by the model's ``rpe_config.resize``:
  ``keep``: tables as they are, buckets recomputed on the new grid from raw offsets (as released);
  ``scale``: tables as they are, offsets measured in units of ``rpe_config.trained_grid``;
  ``interpolate``: tables resampled so the new grid's offset range covers the trained one
  (:func:`interpolated_config`, :func:`resize_rpe_table`);
- SP-ViT priors, by the model's ``prior_resize``: ``keep`` (raw offsets) or ``scale`` (offsets in
  units of ``trained_grid``, :func:`prior_offset_scale`).

The strategy and the training grid are part of the model's configuration (``rpe_config`` for
iRPE-DeiT, the ``prior_resize`` / ``trained_grid`` arguments for SP-ViT), so exports and Hub configs
carry them. They are decided once, before the model is built, from the pretrained cfg
(:func:`source_grid`, :func:`rpe_config_for_source`); the checkpoint filters then only convert
tensors to the built model's shapes. docs/resolution.md explains the strategies and when
``interpolate`` applies.
"""

from __future__ import annotations

import argparse
import logging
import math
import pickle
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from timm.layers import resample_abs_pos_embed, to_2tuple
from torch import Tensor, nn

from .backbones.irpe import RESIZE_STRATEGIES, ImageRPE, RPEAttention, RPEConfig, num_buckets

__all__ = [
    "RESIZE_STRATEGIES",
    "PRIOR_RESIZE_STRATEGIES",
    "checkpoint_grid",
    "pretrained_image_size",
    "pretrained_grid",
    "checkpoint_shapes",
    "source_grid",
    "rpe_config_for_source",
    "resample_pos_embed",
    "interpolated_config",
    "resize_rpe_table",
    "set_rpe_config",
    "convert_rpe_tables",
    "resize_rpe_model",
    "prior_offset_scale",
    "resolution_args",
    "record_model_args",
    "record_input_size",
]

_logger = logging.getLogger(__name__)

PRIOR_RESIZE_STRATEGIES = ("keep", "scale")

Grid = tuple[int, int]


# --------------------------------------------------------------------------------------------------
# Absolute position embeddings
# --------------------------------------------------------------------------------------------------


def pretrained_image_size(pretrained_cfg: Mapping[str, Any], source_args: Mapping[str, Any]) -> Grid:
    """Image size the pretrained weights were trained at: the ``img_size`` a Hub/local-dir config records
    (``source_args``, timm's ``pretrained_model_args``), else the pretrained cfg's input size."""
    return to_2tuple(source_args.get("img_size") or pretrained_cfg["input_size"][-2:])


def _grid_of_tokens(num_tokens: int, expected: Grid | None) -> Grid | None:
    """``expected`` if it has ``num_tokens`` patches, else the square grid of that many, else None."""
    if expected is not None and expected[0] * expected[1] == num_tokens:
        return expected
    side = math.isqrt(max(num_tokens, 0))
    return (side, side) if side * side == num_tokens else None


def checkpoint_grid(
    pos_embed: Tensor, num_prefix_tokens: int, model: nn.Module | None = None, patch_weight: Tensor | None = None
) -> Grid:
    """Patch grid of a checkpoint's (1, prefix + h*w, C) pos_embed.

    The source image size of ``model``'s pretrained cfg (with the checkpoint's patch kernel) decides
    when it accounts for every token, as in timm's ViT filter; otherwise the grid is square.
    """
    tokens = pos_embed.shape[1] - num_prefix_tokens
    expected = None
    if model is not None and patch_weight is not None and patch_weight.ndim == 4:
        size = pretrained_image_size(model.pretrained_cfg, getattr(model, "pretrained_model_args", {}))
        expected = (size[0] // patch_weight.shape[-2], size[1] // patch_weight.shape[-1])
    grid = _grid_of_tokens(tokens, expected)
    if grid is None:
        raise ValueError(
            f"checkpoint pos_embed has {tokens} patch tokens (after {num_prefix_tokens} prefix token(s)), "
            "which is no square grid; record the source img_size in the checkpoint's config"
        )
    return grid


def pretrained_grid(model: nn.Module) -> Grid:
    """Patch grid of the checkpoint ``model`` loads when its weights hold no pos_embed: the source
    ``img_size`` of a Hub/local-dir config, else the pretrained cfg's input size, over the patch size."""
    size = pretrained_image_size(model.pretrained_cfg, getattr(model, "pretrained_model_args", {}))
    patch = model.patch_embed.patch_size
    return size[0] // patch[0], size[1] // patch[1]


def _shapes(state_dict: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k.removeprefix("module."): tuple(v.shape) for k, v in state_dict.items() if isinstance(v, Tensor)}


def _file_shapes(path: str) -> dict[str, tuple[int, ...]] | None:
    """Tensor shapes of a checkpoint file, read lazily (the tensors stay on disk), where timm's loader
    looks: EMA weights, ``state_dict``, ``model`` or the top level. None if the file cannot be read so."""
    try:
        if path.endswith(".safetensors"):
            with safe_open(path, "pt") as weights:
                return {k.removeprefix("module."): tuple(weights.get_slice(k).get_shape()) for k in weights.keys()}  # noqa: SIM118
        with torch.serialization.safe_globals([argparse.Namespace]):  # timm's CheckpointSaver files keep args
            try:
                checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError:  # a legacy (not zip) file cannot be mapped
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, SafetensorError):
        return None
    if not isinstance(checkpoint, Mapping):
        return None
    for name in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(checkpoint.get(name), Mapping):
            return _shapes(checkpoint[name])
    return _shapes(checkpoint)


def checkpoint_shapes(pretrained_cfg: Mapping[str, Any]) -> dict[str, tuple[int, ...]] | None:
    """Tensor shapes (keys without a ``module.`` prefix) of the checkpoint a pretrained cfg holds in memory
    (``state_dict``) or names as a ``file``, read before the model is built; None for other sources (a
    URL, the Hub) and for a file that cannot be read (timm's loader, which reads it next, says why)."""
    if isinstance(pretrained_cfg.get("state_dict"), Mapping):
        return _shapes(pretrained_cfg["state_dict"])
    if pretrained_cfg.get("file"):
        return _file_shapes(str(pretrained_cfg["file"]))
    return None


def source_grid(
    pretrained_cfg: Mapping[str, Any],
    source_args: Mapping[str, Any],
    feat_size: Callable[[Grid], Grid],
    num_pos_prefix_tokens: int,
) -> Grid:
    """The patch grid pretrained weights were trained on, known before the model is built.

    A Hub/local-dir config records it (``source_args["img_size"]``, timm's ``pretrained_model_args``);
    a checkpoint file or in-memory state dict tells it by its pos_embed (``checkpoint_shapes``:
    ``num_pos_prefix_tokens`` leading slots, then the patches, square unless the cfg's size fits);
    otherwise (a release URL, Hub weights) it is the pretrained cfg's input size. ``feat_size`` maps
    an image size to the model's patch grid.
    """
    expected = feat_size(pretrained_image_size(pretrained_cfg, source_args))
    if source_args.get("img_size") is not None:
        return expected
    pos_embed = (checkpoint_shapes(pretrained_cfg) or {}).get("pos_embed")
    if pos_embed is None or len(pos_embed) != 3:
        return expected
    # no grid (another architecture's checkpoint): the filter's key check names the mismatch
    return _grid_of_tokens(pos_embed[1] - num_pos_prefix_tokens, expected) or expected


def resample_pos_embed(pos_embed: Tensor, new_grid: Grid, old_grid: Grid, num_prefix_tokens: int) -> Tensor:
    """Bicubic resample of the patch part of ``pos_embed`` from ``old_grid`` to ``new_grid``; the
    ``num_prefix_tokens`` leading slots (class token) are kept. Returned unchanged at equal grids."""
    return resample_abs_pos_embed(
        pos_embed, new_size=list(new_grid), old_size=list(old_grid), num_prefix_tokens=num_prefix_tokens
    )


# --------------------------------------------------------------------------------------------------
# iRPE tables
# --------------------------------------------------------------------------------------------------


def _index_extents(method: str, grid: Grid) -> tuple[int, ...]:
    """Largest index-function argument on ``grid``, per table axis: |dr| and |dc| (product), one
    axis (cross_rows, cross_cols), the rounded Euclidean distance (euc)."""
    height, width = grid
    if method == "product":
        return height - 1, width - 1
    if method == "cross_rows":
        return (height - 1,)
    if method == "cross_cols":
        return (width - 1,)
    if method == "euc":
        return (round(math.hypot(height - 1, width - 1)),)
    raise ValueError(
        f"rpe_config.resize='interpolate' does not apply to method {method!r}: quant indexes the squared "
        "distance, whose buckets are not linear in the offset; use resize 'scale' or 'keep'"
    )


def _table_methods(config: RPEConfig) -> tuple[str, ...]:
    return ("cross_rows", "cross_cols") if config.method == "cross" else (config.method,)


def interpolated_config(config: RPEConfig, old_grid: Grid, new_grid: Grid) -> RPEConfig:
    """Bucket parameters for ``config``'s tables resampled from ``old_grid`` to ``new_grid``.

    Interpolation needs buckets linear in the offset: the index function must be the identity on
    every argument ``old_grid`` produces (piecewise: alpha = ratio >= the largest one; clip: beta =
    2 ratio >= it), so a bucket is an offset and the table a sampled function of it. The linear
    range then grows by as much as the largest argument does, which keeps the table's untrained
    margin and makes the round trip back to ``old_grid`` restore the original ratio.
    """
    old = max(max(_index_extents(m, old_grid)) for m in _table_methods(config))
    new = max(max(_index_extents(m, new_grid)) for m in _table_methods(config))
    linear_up_to = config.alpha if config.index == "piecewise" else config.beta
    if old > linear_up_to:
        what = "alpha = ratio" if config.index == "piecewise" else "beta = 2 * ratio"
        raise ValueError(
            f"rpe_config.resize='interpolate' needs buckets linear in the offset: on the {old_grid[0]}x"
            f"{old_grid[1]} grid the {config.method} index reaches {old}, but the {config.index} index with "
            f"ratio {config.ratio:g} is linear only up to {what} = {linear_up_to:g}; use resize 'scale' or 'keep'"
        )
    per_unit = 1.0 if config.index == "piecewise" else 2.0
    return replace(config, ratio=round(config.ratio + (new - old) / per_unit, 6))


def _interpolation_matrix(n_in: int, n_out: int) -> Tensor:
    """(n_out, n_in) float64 weights of piecewise-linear interpolation with aligned end points."""
    if n_in == 1:
        return torch.ones(n_out, 1, dtype=torch.float64)
    position = torch.arange(n_out, dtype=torch.float64) * (n_in - 1) / max(n_out - 1, 1)
    low = position.floor().long().clamp(max=n_in - 2)
    frac = position - low
    rows = torch.arange(n_out)
    matrix = torch.zeros(n_out, n_in, dtype=torch.float64)
    matrix[rows, low] = 1 - frac
    matrix[rows, low + 1] += frac
    return matrix


def _resample(values: Tensor, size: int) -> Tensor:
    """Resample the last axis of float64 ``values`` to ``size`` samples (aligned end points).

    Upsampling interpolates linearly. Downsampling is the least-squares inverse of that upsampling,
    so a table taken to a larger grid and back is restored exactly.
    """
    n = values.shape[-1]
    if size == n:
        return values
    if size > n:
        return values @ _interpolation_matrix(n, size).T
    flat = values.reshape(-1, n).T
    solution = torch.linalg.lstsq(_interpolation_matrix(size, n), flat).solution
    return solution.T.reshape(*values.shape[:-1], size)


def resize_rpe_table(
    table: Tensor,
    method: str,
    bucket_dim: int,
    old_config: RPEConfig,
    new_config: RPEConfig,
    old_grid: Grid,
    new_grid: Grid,
) -> Tensor:
    """Resample one iRPE table (buckets along ``bucket_dim``) from ``old_grid`` to ``new_grid``.

    ``method`` is euc, product, cross_rows or cross_cols; ``new_config`` is
    ``interpolated_config(old_config, old_grid, new_grid)``. The entries the old grid reaches
    (offsets -m..m per axis, distances 0..D for euc) are stretched linearly onto the ones the new
    grid reaches; entries no offset reaches stay zero, and the class-token bucket is copied.
    """
    old_b, new_b = int(old_config.beta), int(new_config.beta)
    values = table.movedim(bucket_dim, -1).double()
    extra = values[..., -1:] if old_config.skip > 0 else values[..., :0]
    body = values[..., : values.shape[-1] - extra.shape[-1]]
    old_ext, new_ext = _index_extents(method, old_grid), _index_extents(method, new_grid)
    side = 2 * new_b + 1
    if method == "product":
        (old_r, old_c), (new_r, new_c) = old_ext, new_ext
        body = body.reshape(*body.shape[:-1], 2 * old_b + 1, 2 * old_b + 1)
        segment = body[..., old_b - old_r : old_b + old_r + 1, old_b - old_c : old_b + old_c + 1]
        segment = _resample(segment.transpose(-1, -2), 2 * new_r + 1).transpose(-1, -2)
        segment = _resample(segment, 2 * new_c + 1)
        out = body.new_zeros(*body.shape[:-2], side, side)
        out[..., new_b - new_r : new_b + new_r + 1, new_b - new_c : new_b + new_c + 1] = segment
        out = out.flatten(-2)
    else:
        (old_e,), (new_e,) = old_ext, new_ext
        first, new_first = (old_b, new_b) if method == "euc" else (old_b - old_e, new_b - new_e)
        count, new_count = (old_e + 1, new_e + 1) if method == "euc" else (2 * old_e + 1, 2 * new_e + 1)
        out = body.new_zeros(*body.shape[:-1], side)
        out[..., new_first : new_first + new_count] = _resample(body[..., first : first + count], new_count)
    out = torch.cat([out, extra], dim=-1)
    return out.to(table.dtype).movedim(-1, bucket_dim)


def _bucket_dim(rpe: ImageRPE) -> int:
    """Axis of the buckets in an ImageRPE table: (H, K) bias, (H, d, K) q/k, (H, K, d) v."""
    return 1 if rpe.mode == "ctx" and rpe.on == "v" else -1


def _table_name(rpe: ImageRPE) -> str:
    return "lookup_table_bias" if rpe.mode == "bias" else "lookup_table_weight"


def set_rpe_config(model: nn.Module, config: RPEConfig) -> None:
    """Give ``model`` (and every RPE layer in it) ``config``, e.g. after a resolution change.

    Only ``resize``, ``trained_grid`` and ``ratio`` may differ from the current config. Tables whose
    bucket count changes are replaced by zero tables of the new size: load resized weights next.
    """
    current = getattr(model, "rpe_config", None)
    if isinstance(current, RPEConfig):
        fixed = replace(config, resize=current.resize, trained_grid=current.trained_grid, ratio=current.ratio)
        if fixed != current:
            raise ValueError(f"set_rpe_config: {config} changes more than resize, trained_grid and ratio of {current}")
        model.rpe_config = config
    for module in model.modules():
        if isinstance(module, RPEAttention):
            module.rpe_config = config
        elif isinstance(module, ImageRPE):
            module.config = config
            size = num_buckets(module.method, config)
            if size != module.num_buckets:
                name = _table_name(module)
                old = getattr(module, name)
                shape = list(old.shape)
                shape[_bucket_dim(module)] = size
                setattr(module, name, nn.Parameter(old.new_zeros(shape), requires_grad=old.requires_grad))
                module.num_buckets = size
            if module.grid_size is not None:  # the ids of the built grid follow the new config
                module.set_grid_size(module.grid_size)


def _resized_tables(
    tables: dict[str, Tensor], model: nn.Module, config: RPEConfig, new_config: RPEConfig, old_grid: Grid, new_grid: Grid
) -> dict[str, Tensor]:
    """``tables`` (state-dict keys of ``model``'s iRPE tables, others passed through) resampled from
    ``config`` on ``old_grid`` to ``new_config`` on ``new_grid``."""
    tables = dict(tables)
    for name, module in model.named_modules():
        if isinstance(module, ImageRPE):
            key = f"{name}.{_table_name(module)}"
            if key in tables:
                tables[key] = resize_rpe_table(
                    tables[key], module.method, _bucket_dim(module), config, new_config, old_grid, new_grid
                )
    return tables


def rpe_config_for_source(config: RPEConfig, source: Grid, grid: Grid) -> RPEConfig:
    """The config of a model on ``grid`` whose tables were trained on ``source`` under ``config.resize``:
    ``source`` recorded as ``trained_grid`` (unless one is named) and, for ``interpolate``, the bucket
    parameters of the resampled tables. ``config`` itself at equal grids. Decided before the model is
    built (or resized), so the checkpoint filter only converts tensors."""
    if source == grid:
        return config
    new_config = replace(config, trained_grid=config.trained_grid or source)
    if config.resize == "interpolate":
        return interpolated_config(new_config, source, grid)
    return new_config


def _strategy_note(old_config: RPEConfig, new_config: RPEConfig) -> str:
    """A few words saying what ``rpe_config_for_source`` did to the tables (for the log)."""
    if new_config.resize == "interpolate":
        return f"interpolated (ratio {old_config.ratio:g} -> {new_config.ratio:g})"
    if new_config.resize == "scale":
        rows, cols = new_config.trained_grid
        return f"kept (scale: offsets in units of the {rows}x{cols} grid)"
    return "kept (keep: buckets recomputed from raw offsets)"


def resize_rpe_model(model: nn.Module, old_grid: Grid, new_grid: Grid) -> None:
    """Move a built iRPE model's tables from ``old_grid`` to ``new_grid`` by its ``rpe_config.resize``
    (what ``set_input_size`` needs): ``scale`` records ``old_grid`` as ``trained_grid``,
    ``interpolate`` resamples the tables; the model's recorded arguments follow."""
    config: RPEConfig = model.rpe_config
    if old_grid == new_grid:
        return
    new_config = rpe_config_for_source(config, old_grid, new_grid)
    tables = {name: p.detach() for name, p in model.named_parameters() if ".rpe_" in name}
    if config.resize == "interpolate":
        tables = _resized_tables(tables, model, config, new_config, old_grid, new_grid)
    set_rpe_config(model, new_config)
    if config.resize == "interpolate":
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in tables:
                    param.copy_(tables[name])
    record_model_args(model, rpe_config=new_config.to_dict())
    _logger.info(
        "model grid %dx%d -> %dx%d: %s iRPE tables %s", *old_grid, *new_grid, config.method,
        _strategy_note(config, new_config),
    )


def convert_rpe_tables(state_dict: dict[str, Tensor], model: nn.Module, old_grid: Grid) -> dict[str, Tensor]:
    """The iRPE tables of ``state_dict`` (from an ``old_grid`` checkpoint) for ``model``'s grid.

    Pure: the model was built for this checkpoint (``rpe_config_for_source``), so its ``rpe_config``
    holds the strategy, ``trained_grid`` and the bucket parameters; ``interpolate`` resamples the
    tables from the checkpoint's parameters (``interpolated_config`` of the model's config back to
    ``old_grid``) to the model's. Logs one line saying what was done.
    """
    new_grid = tuple(model.patch_embed.grid_size)
    config: RPEConfig = model.rpe_config
    if old_grid == new_grid:
        return state_dict
    if config.trained_grid is None:
        raise ValueError(
            f"checkpoint grid {old_grid[0]}x{old_grid[1]} differs from the model's {new_grid[0]}x{new_grid[1]}, but "
            "the model was not built for it (rpe_config.trained_grid is unset): create it with timm.create_model(..., "
            "pretrained=True) so the checkpoint's grid is read from its pretrained cfg, or set rpe_config.trained_grid"
        )
    source_config = config
    if config.resize == "interpolate":
        source_config = interpolated_config(config, new_grid, old_grid)
        state_dict = _resized_tables(state_dict, model, source_config, config, old_grid, new_grid)
    _logger.info(
        "checkpoint grid %dx%d -> model grid %dx%d: %s%s iRPE tables %s",
        *old_grid, *new_grid, "pos_embed resampled (bicubic), " if getattr(model, "pos_embed", None) is not None else "",
        config.method, _strategy_note(source_config, config),
    )
    return state_dict


# --------------------------------------------------------------------------------------------------
# SP-ViT priors and the recorded arguments
# --------------------------------------------------------------------------------------------------


def prior_offset_scale(prior_resize: str, trained_grid: Grid | None, grid: Grid) -> tuple[float, float]:
    """(x, y) factors on the patch offsets (dx, dy) fed to SP-ViT priors on ``grid``.

    ``keep``: 1 (raw offsets, as released); ``scale``: trained/current per axis, so an offset is
    measured in patches of ``trained_grid`` (1 while it is None or equal to ``grid``).
    """
    if prior_resize != "keep" and prior_resize != "scale":  # PRIOR_RESIZE_STRATEGIES, spelled out for TorchScript
        raise ValueError(f"prior_resize='{prior_resize}': expected one of keep, scale")
    if prior_resize == "keep" or trained_grid is None:
        return 1.0, 1.0
    return trained_grid[1] / grid[1], trained_grid[0] / grid[0]


def resolution_args(model: nn.Module) -> dict[str, Any]:
    """The model arguments a resolution change set after construction, JSON-ready.

    Merge them into the arguments a checkpoint records (``model_kwargs``) so the model rebuilds
    with the same strategy, training grid and bucket parameters.
    """
    config = getattr(model, "rpe_config", None)
    if isinstance(config, RPEConfig):
        return {"rpe_config": config.to_dict()}
    if hasattr(model, "prior_resize"):
        grid = model.trained_grid
        return {"prior_resize": model.prior_resize, "trained_grid": list(grid) if grid else None}
    return {}


def record_model_args(model: nn.Module, **args: Any) -> None:
    """Record arguments changed after construction where ``timm.models.get_model_args`` and
    ``save_for_hf`` read them.

    ``timm.create_model`` keeps the factory arguments in ``model._model_args``; timm's own models update
    them through a helper timm does not export, so this small twin does the same for ours.
    """
    model._model_args = {**getattr(model, "_model_args", {}), **args}


def record_input_size(model: nn.Module, img_size: Grid) -> None:
    """Record a new input size as timm's own ``set_input_size`` does: in the model's input traits
    (``timm.models.get_model_input_config``) and its recorded ``img_size`` argument."""
    model._traits = {**getattr(model, "_traits", {}), "img_size": tuple(img_size)}
    record_model_args(model, img_size=tuple(img_size))
