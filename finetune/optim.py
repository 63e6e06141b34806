"""Optimisation pieces of the fine-tuning module: parameter groups, the lr of the global batch, the schedule.

- Parameter groups come from timm (``param_groups_layer_decay`` / ``param_groups_weight_decay``) with
  the layer scale kept as timm's ``lr_scale`` and also folded into each group's ``lr``. Weight decay is
  decided by module and name, never by shape: FSDP flattens every parameter to 1-D, so timm's
  ``ndim <= 1`` rule would take weight decay off all of them. The groups are planned once on the
  unwrapped model and keep the parameter objects, which DDP, FSDP (``use_orig_params``) and
  ``torch.compile`` preserve, so the plan holds whatever wraps the model later.
- The learning rate of a run is ``lr * global_batch / base_batch_size`` (DeiT's and timm's linear
  rule, ``--lr-base``), with ``global_batch = devices x nodes x batch size x accumulation``.
- The schedule is timm's ``CosineLRScheduler`` stepped per optimizer step; it is sized from the
  training loader the run really uses and re-sized when a tuner (Lightning's ``BatchSizeFinder`` /
  ``LearningRateFinder``) changed the batch or the lr.
"""

from __future__ import annotations

import fnmatch
from typing import Any

from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

__all__ = [
    "DECAYED_LAYERS",
    "build_schedule",
    "global_batch_size",
    "loader_batch_size",
    "no_weight_decay_names",
    "plan_param_groups",
]

# Layers whose ``weight`` is a matrix / kernel that weight decay is meant for. Every other parameter
# (biases, norm scales, layer-scale gammas, tokens, position and RPE tables) gets none.
DECAYED_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Embedding,
)


def no_weight_decay_names(model: nn.Module) -> list[str]:
    """Parameter names without weight decay: all but the ``weight`` of :data:`DECAYED_LAYERS`, plus
    ``model.no_weight_decay()`` (names or fnmatch patterns, timm's convention)."""
    decayed = {
        f"{prefix}.weight" if prefix else "weight"
        for prefix, module in model.named_modules()
        if isinstance(module, DECAYED_LAYERS) and isinstance(getattr(module, "weight", None), nn.Parameter)
    }
    patterns = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    return [
        name
        for name, _ in model.named_parameters()
        if name not in decayed or any(fnmatch.fnmatch(name, pattern) for pattern in patterns)
    ]


def plan_param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float | None,
    is_head: Any,
    backbone_lr_scale: float,
) -> list[dict[str, Any]]:
    """Named parameter groups of ``model`` with ``lr_scale`` and ``weight_decay`` (no ``lr`` yet).

    ``layer_decay`` uses timm's layer grouping (``group_matcher``); ``is_head(name)`` says which
    parameters form the classification head, the others get ``backbone_lr_scale`` on top. Each group
    has ``name`` (for ``LearningRateMonitor``), ``params`` and ``param_names``; parameters frozen at
    planning time are left out, as timm does (plan before freezing what is unfrozen later).
    """
    no_decay = no_weight_decay_names(model)
    if layer_decay is None:
        timm_groups = param_groups_weight_decay(
            model, weight_decay, weight_decay_exclude_1d=False, no_weight_decay_list=no_decay
        )
    else:
        timm_groups = param_groups_layer_decay(
            model,
            weight_decay,
            no_weight_decay_list=no_decay,
            weight_decay_exclude_1d=False,
            layer_decay=layer_decay,
        )
    names = {id(p): name for name, p in model.named_parameters()}
    scales = sorted({g.get("lr_scale", 1.0) for g in timm_groups}, reverse=True)
    groups: list[dict[str, Any]] = []
    for group in timm_groups:
        scale = group.get("lr_scale", 1.0)
        depth = f"_depth{scales.index(scale)}" if layer_decay is not None else ""  # layers below the top
        decay = "" if group["weight_decay"] else "_no_decay"
        for head in (True, False):
            params = [p for p in group["params"] if is_head(names[id(p)]) == head]
            if params:
                groups.append(
                    {
                        "name": f"{'head' if head else 'backbone'}{depth}{decay}",
                        "params": params,
                        "param_names": [names[id(p)] for p in params],
                        "weight_decay": group["weight_decay"],
                        "lr_scale": scale * (1.0 if head else backbone_lr_scale),
                    }
                )
    return groups


def loader_batch_size(loader: DataLoader) -> int:
    """Images per batch of a training loader (its ``batch_size``, else its batch sampler's)."""
    size = (
        loader.batch_size
        if loader.batch_size is not None
        else getattr(loader.batch_sampler, "batch_size", None)
    )
    if size is None:
        raise ValueError(
            "the training loader states no batch_size; give base_batch_size null to use lr as is"
        )
    return int(size)


def global_batch_size(batch_size: int, world_size: int, accumulate_grad_batches: int) -> int:
    """Images per optimizer step over all processes."""
    return batch_size * world_size * accumulate_grad_batches


def build_schedule(
    optimizer: Optimizer,
    lr: float,
    min_lr: float,
    warmup_lr: float,
    warmup_steps: int,
    total_steps: int,
) -> CosineLRScheduler:
    """timm's cosine schedule over optimizer steps, with a linear warmup from ``warmup_lr``.

    Each group's peak is ``lr * group['lr_scale']`` (timm applies ``lr_scale``); the schedule ends at
    ``min_lr`` (times ``lr_scale``). Step it with ``step_update(num_updates)``.
    """
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
    return CosineLRScheduler(
        optimizer,
        # the cosine spans the steps after the warmup; t_initial 1 would trigger timm's "no effect" warning
        # and gives the same (peak) lr as 2 on a single step
        t_initial=max(2, total_steps - warmup_steps),
        lr_min=min_lr,
        warmup_t=warmup_steps,
        warmup_lr_init=warmup_lr,
        warmup_prefix=True,
        t_in_epochs=False,
    )
