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
carry them. docs/resolution.md explains the strategies and when ``interpolate`` applies.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed, to_2tuple
from timm.models._input import get_pretrained_grid_size, update_model_args
from torch import Tensor, nn

from .backbones.irpe import RESIZE_STRATEGIES, ImageRPE, RPEAttention, RPEConfig, num_buckets

__all__ = [
    "RESIZE_STRATEGIES",
    "PRIOR_RESIZE_STRATEGIES",
    "checkpoint_grid",
    "pretrained_grid",
    "resample_pos_embed",
    "interpolated_config",
    "resize_rpe_table",
    "set_rpe_config",
    "convert_rpe_tables",
    "resize_rpe_model",
    "prior_offset_scale",
    "resolution_args",
]

_logger = logging.getLogger(__name__)

PRIOR_RESIZE_STRATEGIES = ("keep", "scale")

Grid = tuple[int, int]


# --------------------------------------------------------------------------------------------------
# Absolute position embeddings
# --------------------------------------------------------------------------------------------------


def checkpoint_grid(
    pos_embed: Tensor, num_prefix_tokens: int, model: nn.Module | None = None, patch_weight: Tensor | None = None
) -> Grid:
    """Patch grid of a checkpoint's (1, prefix + h*w, C) pos_embed.

    The source image size timm records for Hub and local-dir checkpoints (with the patch kernel)
    decides when it accounts for every token, as in timm's ViT filter; otherwise the grid is square.
    """
    tokens = pos_embed.shape[1] - num_prefix_tokens
    if model is not None:
        grid = get_pretrained_grid_size(model, patch_weight, tokens)
        if grid is not None:
            return grid
    side = math.isqrt(max(tokens, 0))
    if side * side != tokens:
        raise ValueError(
            f"checkpoint pos_embed has {tokens} patch tokens (after {num_prefix_tokens} prefix token(s)), "
            "which is no square grid; record the source img_size in the checkpoint's config"
        )
    return side, side


def pretrained_grid(model: nn.Module) -> Grid:
    """Patch grid of the checkpoint ``model`` loads when its weights hold no pos_embed: the source
    ``img_size`` of a Hub/local-dir config, else the pretrained cfg's input size, over the patch size."""
    size = getattr(model, "pretrained_model_args", {}).get("img_size") or model.pretrained_cfg["input_size"][-2:]
    size, patch = to_2tuple(size), model.patch_embed.patch_size
    return size[0] // patch[0], size[1] // patch[1]


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


def _config_for_grid(config: RPEConfig, old_grid: Grid, new_grid: Grid) -> tuple[RPEConfig, str]:
    """The config of tables trained on ``old_grid`` serving ``new_grid`` under ``config.resize``, and
    a few words saying what that does (for the log)."""
    new_config = replace(config, trained_grid=config.trained_grid or old_grid)
    if config.resize == "interpolate":
        new_config = interpolated_config(new_config, old_grid, new_grid)
        return new_config, f"interpolated (ratio {config.ratio:g} -> {new_config.ratio:g})"
    if config.resize == "scale":
        rows, cols = new_config.trained_grid
        return new_config, f"kept (scale: offsets in units of the {rows}x{cols} grid)"
    return new_config, "kept (keep: buckets recomputed from raw offsets)"


def resize_rpe_model(model: nn.Module, old_grid: Grid, new_grid: Grid) -> None:
    """Move a built iRPE model's tables from ``old_grid`` to ``new_grid`` by its ``rpe_config.resize``
    (what ``set_input_size`` needs): ``scale`` records ``old_grid`` as ``trained_grid``,
    ``interpolate`` resamples the tables; the model's recorded arguments follow."""
    config: RPEConfig = model.rpe_config
    if old_grid == new_grid:
        return
    new_config, how = _config_for_grid(config, old_grid, new_grid)
    tables = {name: p.detach() for name, p in model.named_parameters() if ".rpe_" in name}
    if config.resize == "interpolate":
        tables = _resized_tables(tables, model, config, new_config, old_grid, new_grid)
    set_rpe_config(model, new_config)
    if config.resize == "interpolate":
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in tables:
                    param.copy_(tables[name])
    update_model_args(model, rpe_config=new_config.to_dict())
    _logger.info("model grid %dx%d -> %dx%d: %s iRPE tables %s", *old_grid, *new_grid, config.method, how)


def convert_rpe_tables(state_dict: dict[str, Tensor], model: nn.Module, old_grid: Grid) -> dict[str, Tensor]:
    """Move the iRPE tables of ``state_dict`` (from a ``old_grid`` checkpoint) to ``model``'s grid.

    Applies the model's ``rpe_config.resize`` strategy, records the checkpoint's grid as
    ``trained_grid`` (unless the model already names one) and, for ``interpolate``, resamples the
    tables and gives the model the new bucket parameters. Logs one line saying what was done.
    """
    new_grid = tuple(model.patch_embed.grid_size)
    config: RPEConfig = model.rpe_config
    if old_grid == new_grid:
        return state_dict
    new_config, how = _config_for_grid(config, old_grid, new_grid)
    if config.resize == "interpolate":
        state_dict = _resized_tables(state_dict, model, config, new_config, old_grid, new_grid)
    set_rpe_config(model, new_config)
    update_model_args(model, rpe_config=new_config.to_dict())  # for save_for_hf (kwargs given to create_model win)
    _logger.info(
        "checkpoint grid %dx%d -> model grid %dx%d: %s%s iRPE tables %s",
        *old_grid, *new_grid, "pos_embed resampled (bicubic), " if getattr(model, "pos_embed", None) is not None else "",
        config.method, how,
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
    if prior_resize not in PRIOR_RESIZE_STRATEGIES:
        raise ValueError(f"prior_resize={prior_resize!r}: expected one of {', '.join(PRIOR_RESIZE_STRATEGIES)}")
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
