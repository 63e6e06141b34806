"""iRPE added to any timm VisionTransformer checkpoint (ViT augreg, DeiT, DeiT III, ...): ``irpe_vit``.

iRPE tables start at zero (iRPE supplementary, section 2), so a pretrained ViT with iRPE added
computes exactly what it computed before; fine-tuning starts from the pretrained model and learns the
relative encodings on top. ``irpe_vit`` builds the body that timm builds for ``base_model`` (any
registered name, with or without a pretrained tag), puts ``RPEAttention`` in every block around the
block's own qkv and proj layers (the parameter names stay timm's), and loads the weights through
timm's own path with a filter that adds the zero tables and checks every other key::

    timm.create_model("irpe_vit", pretrained=True, base_model="vit_small_patch16_224.augreg_in21k_ft_in1k",
                      rpe_config={"method": "product", "rpe_on": "k"}, num_classes=200)

A checkpoint that already has tables (a fine-tuned ``irpe_vit``, e.g. a Hub export) loads them, and
moves them to another grid by ``rpe_config.resize`` as iRPE-DeiT does (``finetune.resize``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import timm
import torch
from timm.layers import Attention
from timm.models import load_pretrained, register_model
from timm.models.vision_transformer import Block, VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn
from torch import nn

from ..resize import checkpoint_shapes, rpe_config_for_source, source_grid
from .checkpoint import check_state_dict
from .irpe import RPEAttention, RPEConfig
from .irpe_deit import IRPEVisionTransformer, RPEBlock
from .irpe_deit import checkpoint_filter_fn as irpe_checkpoint_filter_fn

__all__ = ["add_irpe", "checkpoint_filter_fn", "irpe_vit"]


def _check_plain_attention(model: nn.Module, base_model: str) -> None:
    """Raise a one-line error unless ``model`` is timm's VisionTransformer with plain ``Attention`` blocks."""
    if type(model) is not VisionTransformer:
        raise ValueError(
            f"irpe_vit base_model={base_model!r} builds {type(model).__name__}; expected a timm VisionTransformer "
            "(ViT, DeiT, DeiT III, ...) whose blocks use timm's Attention"
        )
    for index, block in enumerate(model.blocks):
        attn = block.attn
        plain = type(block) is Block and type(attn) is Attention
        if not plain or getattr(attn, "gate", None) is not None or attn.head_dim * attn.num_heads != attn.qkv.in_features or not all(
            isinstance(norm, nn.Identity) for norm in (attn.q_norm, attn.k_norm, attn.norm)
        ):
            raise ValueError(
                f"irpe_vit base_model={base_model!r}: block {index} ({type(block).__name__} with "
                f"{type(attn).__name__}) has attention options iRPE does not take (qk_norm, scale_norm, gated, "
                "attn_head_dim); expected timm's plain Attention"
            )


def add_irpe(model: VisionTransformer, rpe_config: RPEConfig | dict[str, Any] | str | None) -> IRPEVisionTransformer:
    """Give every block of a timm VisionTransformer iRPE attention, in place, and return the model.

    Each block's ``Attention`` becomes an ``RPEAttention`` that holds the block's own ``qkv`` and
    ``proj`` layers (not copies), so the state dict keeps every key and value and gains only the
    zero-initialised tables. ``skip`` follows the body's prefix tokens (class, register, distillation).
    The model and its blocks become ``IRPEVisionTransformer`` and ``RPEBlock``, which add only the
    methods that pass the patch grid to the attention (as ``torch.nn.utils.parametrize`` retypes the
    modules it wraps); the body's construction is timm's own.
    """
    config = replace(RPEConfig.from_any(rpe_config), skip=model.num_prefix_tokens)
    grid = tuple(model.patch_embed.grid_size)
    for block in model.blocks:
        attn = block.attn
        rpe_attn = RPEAttention(
            attn.qkv.in_features,
            attn.num_heads,
            attn_drop=attn.attn_drop.p,
            proj_drop=attn.proj_drop.p,
            rpe_config=config,
            grid_size=grid,
        ).to(attn.qkv.weight.device)
        rpe_attn.qkv, rpe_attn.proj = attn.qkv, attn.proj
        block.attn = rpe_attn
        block.__class__ = RPEBlock
    model.__class__ = IRPEVisionTransformer
    model.rpe_config = config
    return model


def _source_has_tables(model: VisionTransformer) -> bool:
    """Whether the pretrained weights of ``model`` hold iRPE tables: a Hub/local-dir export of an
    ``irpe_vit`` (its config records ``rpe_config``), or a checkpoint file with table keys."""
    if "rpe_config" in model.pretrained_model_args:
        return True
    return any(".rpe_" in key for key in checkpoint_shapes(model.pretrained_cfg) or {})


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: IRPEVisionTransformer) -> dict[str, torch.Tensor]:
    """A timm ViT checkpoint gets the model's zero tables (pos_embed resampled as timm's ViT filter
    does) and must hold every other key; a checkpoint with tables is converted as iRPE-DeiT's are."""
    state_dict = state_dict.get("model", state_dict)
    if any(".rpe_" in key for key in state_dict):
        return irpe_checkpoint_filter_fn(state_dict, model)
    tables = {key: torch.zeros_like(value) for key, value in model.state_dict().items() if ".rpe_" in key}
    return check_state_dict({**vit_checkpoint_filter_fn(state_dict, model), **tables}, model)


@register_model
def irpe_vit(
    pretrained: bool = False,
    base_model: str = "vit_small_patch16_224",
    rpe_config: RPEConfig | dict[str, Any] | str | None = None,
    pretrained_cfg: Any = None,
    pretrained_cfg_overlay: dict[str, Any] | None = None,
    cache_dir: str | None = None,
    **kwargs: Any,
) -> IRPEVisionTransformer:
    """The timm VisionTransformer ``base_model`` (keyword arguments as for that name) with iRPE of any
    configuration (a dict, an ``RPEConfig`` or a preset name; default: contextual product on keys).

    ``pretrained`` loads the base model's weights (its tag, or ``pretrained_cfg_overlay=dict(file=...)``)
    or, for a Hub/local export of an ``irpe_vit``, that export's weights, tables included.
    """
    if isinstance(rpe_config, dict):
        # A dict overrides key by key the settings of the source (a Hub/local export), so a recipe can
        # give ``rpe_config: {resize: scale}`` alone.
        source = kwargs.get("pretrained_model_args", {}).get("rpe_config")
        rpe_config = {**RPEConfig.from_any(source).to_dict(), **rpe_config} if source is not None else rpe_config
    model = timm.create_model(
        base_model, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=pretrained_cfg_overlay, **kwargs
    )
    _check_plain_attention(model, base_model)
    config = RPEConfig.from_any(rpe_config)
    if pretrained and _source_has_tables(model):
        # an irpe_vit export or file, tables included: they meet this model's grid by config.resize, decided
        # here, before the weights load, from the source's grid (the filter then converts tensors only)
        patch = model.patch_embed.patch_size
        source = source_grid(
            model.pretrained_cfg, model.pretrained_model_args, lambda size: (size[0] // patch[0], size[1] // patch[1]),
            0 if model.no_embed_class else model.num_prefix_tokens,
        )
        config = rpe_config_for_source(config, source, tuple(model.patch_embed.grid_size))
    model = add_irpe(model, config)
    if pretrained:
        load_pretrained(
            model,
            pretrained_cfg=model.pretrained_cfg,
            num_classes=model.num_classes,
            in_chans=kwargs.get("in_chans", 3),
            filter_fn=checkpoint_filter_fn,
            cache_dir=cache_dir,
        )
    model.pretrained_cfg = {**model.pretrained_cfg, "architecture": "irpe_vit"}
    model.default_cfg = model.pretrained_cfg
    return model
