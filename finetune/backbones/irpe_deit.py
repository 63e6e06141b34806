"""DeiT with image relative position encoding (iRPE-DeiT), registered with timm.

The body is timm's VisionTransformer with every attention layer replaced by ``RPEAttention``; the
patch grid is passed to the blocks so grids of any shape (and ``dynamic_img_size``) work. The key
layout is the released one, so official ``{'model': state_dict}`` files load without remapping.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import to_2tuple
from timm.models import (
    build_model_with_cfg,
    checkpoint,
    generate_default_cfgs,
    register_model,
    resolve_pretrained_cfg,
)
from timm.models.vision_transformer import Block, VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn

from ..resize import (
    checkpoint_grid,
    convert_rpe_tables,
    pretrained_grid,
    resize_rpe_model,
    rpe_config_for_source,
    source_grid,
)
from .checkpoint import check_state_dict
from .features import take_indices
from .irpe import RPEConfig, rpe_attention_layer

__all__ = ["IRPEVisionTransformer", "RPEBlock", "checkpoint_filter_fn", "OFFICIAL_MODELS"]

RELEASE_URL = "https://github.com/wkcn/iRPE-model-zoo/releases/download/1.0/{name}.pth"


class RPEBlock(Block):
    """timm's pre-norm transformer block whose attention also takes the patch grid (as eva's blocks
    take ``rope``); the attention is timm's ``attn_layer``, here ``rpe_attention_layer(...)``."""

    def forward(
        self,
        x: torch.Tensor,
        grid_size: tuple[int, int] | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), grid_size, attn_mask=attn_mask, is_causal=is_causal)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class IRPEVisionTransformer(VisionTransformer):
    """VisionTransformer whose attention layers carry iRPE, configured by ``rpe_config``.

    The blocks are ``RPEBlock`` with ``attn_layer=rpe_attention_layer(rpe_config)``, so every timm
    ``Attention`` argument (``qk_norm``, ``proj_bias``, ``scale_attn_norm``, ...) reaches the
    attention. Every path that runs the blocks (``forward_features``, ``forward_intermediates``,
    ``features_only``) passes them the patch grid of its input, so non-square and dynamic sizes work.
    """

    def __init__(self, rpe_config: RPEConfig | dict[str, Any] | None = None, **kwargs: Any) -> None:
        for fixed in ("block_fn", "attn_layer"):
            if fixed in kwargs:
                raise ValueError(
                    f"IRPEVisionTransformer: {fixed}={kwargs[fixed]!r} cannot be set (the blocks are RPEBlock "
                    "with RPEAttention); build timm's VisionTransformer with attn_layer=rpe_attention_layer(...) instead"
                )
        self.rpe_config = RPEConfig.from_any(rpe_config)
        super().__init__(block_fn=RPEBlock, attn_layer=rpe_attention_layer(self.rpe_config), **kwargs)
        self.set_grid_size(self.patch_embed.grid_size)

    def set_grid_size(self, grid_size: tuple[int, int]) -> None:
        """Build every attention layer's bucket ids for ``grid_size`` (as timm's Swin ``set_window_size``)."""
        for block in self.blocks:
            block.attn.set_grid_size(grid_size)

    def set_input_size(
        self, img_size: tuple[int, int] | None = None, patch_size: tuple[int, int] | None = None
    ) -> None:
        """timm's ``set_input_size`` (pos_embed resampled), then the iRPE tables follow
        ``rpe_config.resize`` to the new grid and the bucket ids are rebuilt (``finetune.resize.resize_rpe_model``)."""
        old_grid = tuple(self.patch_embed.grid_size)
        super().set_input_size(img_size=img_size, patch_size=patch_size)
        resize_rpe_model(self, old_grid, tuple(self.patch_embed.grid_size))
        self.set_grid_size(self.patch_embed.grid_size)

    def grid_size_of(self, x: torch.Tensor) -> tuple[int, int]:
        """Patch grid of an input image batch."""
        if self.dynamic_img_size:
            height, width = self.patch_embed.dynamic_feat_size((x.shape[-2], x.shape[-1]))
            return height, width
        return self.patch_embed.grid_size

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        return self.norm_pre(x)

    def forward_features(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        grid_size = self.grid_size_of(x)
        x = self._embed(x)
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, grid_size, attn_mask, is_causal)
            else:
                x = block(x, grid_size, attn_mask=attn_mask, is_causal=is_causal)
        return self.norm(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]] | dict[str, Any]:
        """timm's ``VisionTransformer.forward_intermediates``, with the patch grid passed to every block."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt={output_fmt!r}: expected 'NCHW' or 'NLC'")
        taken, max_index = take_indices(len(self.blocks), indices)
        grid_size = self.grid_size_of(x)
        batch = x.shape[0]
        x = self._embed(x)
        blocks = self.blocks if torch.jit.is_scripting() or not stop_early else self.blocks[: max_index + 1]
        intermediates = []
        for i, block in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, grid_size, attn_mask, is_causal)
            else:
                x = block(x, grid_size, attn_mask=attn_mask, is_causal=is_causal)
            if i in taken:
                intermediates.append(self.norm(x) if norm else x)
        prefix_tokens = [y[:, : self.num_prefix_tokens] for y in intermediates] if self.num_prefix_tokens else None
        intermediates = [y[:, self.num_prefix_tokens :] for y in intermediates]
        if output_fmt == "NCHW":
            height, width = grid_size
            intermediates = [y.reshape(batch, height, width, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if output_dict:
            result: dict[str, Any] = {"image_intermediates": intermediates}
            if prefix_tokens is not None and return_prefix_tokens:
                result["image_intermediates_prefix"] = prefix_tokens
            if not intermediates_only:
                result["image_features"] = self.norm(x)
            return result
        if not torch.jit.is_scripting() and return_prefix_tokens and prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens, strict=True))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """pos_embed, the prefix tokens and every RPE table (the paper puts no weight decay on them)."""
        rpe_tables = {name for name, _ in self.named_parameters() if ".rpe_" in name}
        return super().no_weight_decay() | rpe_tables


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: IRPEVisionTransformer) -> dict[str, torch.Tensor]:
    """An official ``{'model': ...}`` file (or a plain state dict) moved to the model's grid, every key checked.

    State dict in, state dict out; the model is only read. pos_embed is resampled by timm's ViT
    filter; the iRPE tables are converted for the model's ``rpe_config``, which ``_create_irpe_deit``
    chose for this checkpoint's grid before building the model (``finetune.resize.convert_rpe_tables``).
    """
    state_dict = state_dict.get("model", state_dict)
    if "pos_embed" in state_dict:
        embedded_prefix = 0 if model.no_embed_class else model.num_prefix_tokens  # DeiT III: patch slots only
        old_grid = checkpoint_grid(
            state_dict["pos_embed"], embedded_prefix, model, state_dict.get("patch_embed.proj.weight")
        )
    else:  # no absolute position embedding (pos_embed='none')
        old_grid = pretrained_grid(model)
    state_dict = vit_checkpoint_filter_fn(state_dict, model)
    state_dict = convert_rpe_tables(state_dict, model, old_grid)
    return check_state_dict(state_dict, model)


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "mit",
        "paper_ids": "arXiv:2107.14222",
        "paper_name": "Rethinking and Improving Relative Position Encoding for Vision Transformer",
        "origin_url": "https://github.com/microsoft/Cream/tree/main/iRPE",
        **kwargs,
    }


# DeiT bodies (Touvron et al., 2021), as the iRPE release builds them.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "tiny": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "small": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "base": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
}

# The eight released models: name -> (body, RPE settings, published ImageNet-1k top-1 at 224 or None).
OFFICIAL_MODELS: dict[str, tuple[str, RPEConfig, float | None]] = {
    "deit_tiny_patch16_224_ctx_product_50_shared_k": ("tiny", RPEConfig("product", "ctx", 1.9, "k"), 73.7),
    "deit_small_patch16_224_ctx_euc_20_shared_k": ("small", RPEConfig("euc", "ctx", 20, "k"), None),
    "deit_small_patch16_224_ctx_quant_51_shared_k": ("small", RPEConfig("quant", "ctx", 33, "k"), None),
    "deit_small_patch16_224_ctx_cross_56_shared_k": ("small", RPEConfig("cross", "ctx", 20, "k"), None),
    "deit_small_patch16_224_ctx_product_50_shared_k": ("small", RPEConfig("product", "ctx", 1.9, "k"), 80.9),
    "deit_small_patch16_224_ctx_product_50_shared_qk": ("small", RPEConfig("product", "ctx", 1.9, "qk"), 81.0),
    "deit_small_patch16_224_ctx_product_50_shared_qkv": ("small", RPEConfig("product", "ctx", 1.9, "qkv"), 81.2),
    "deit_base_patch16_224_ctx_product_50_shared_k": ("base", RPEConfig("product", "ctx", 1.9, "k"), 82.3),
    "deit_base_patch16_224_ctx_product_50_shared_qkv": ("base", RPEConfig("product", "ctx", 1.9, "qkv"), 82.8),
}

GENERIC_MODELS = {f"irpe_deit_{size}_patch16_224": size for size in ARCHITECTURES}

default_cfgs = generate_default_cfgs(
    {
        **{name: _cfg(RELEASE_URL.format(name=name)) for name in OFFICIAL_MODELS},
        **{name: _cfg() for name in GENERIC_MODELS},
    }
)


def _model_grid(kwargs: dict[str, Any], pretrained_cfg: dict[str, Any]) -> tuple[int, int]:
    """Patch grid of the model the keyword arguments build (timm's PatchEmbed: img_size over patch_size,
    rounded up with dynamic_img_pad; img_size defaults to the cfg's input size, as timm's builder sets it)."""
    height, width = to_2tuple(kwargs.get("img_size") or pretrained_cfg["input_size"][-2:])
    rows, cols = to_2tuple(kwargs.get("patch_size", 16))
    if kwargs.get("dynamic_img_pad"):
        return -(-height // rows), -(-width // cols)
    return height // rows, width // cols


def _rpe_config_for_pretrained(variant: str, kwargs: dict[str, Any]) -> RPEConfig:
    """The ``rpe_config`` of a model that loads the pretrained weights of ``kwargs``: the resolution
    decision made once, before the model is built, from the pretrained cfg (``finetune.resize.source_grid``)."""
    cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay")).to_dict()
    patch = to_2tuple(kwargs.get("patch_size", 16))
    embedded_prefix = 0 if kwargs.get("no_embed_class") else int(kwargs.get("class_token", True)) + kwargs.get("reg_tokens", 0)
    source = source_grid(
        cfg, kwargs.get("pretrained_model_args") or {}, lambda size: (size[0] // patch[0], size[1] // patch[1]),
        embedded_prefix,
    )
    return rpe_config_for_source(RPEConfig.from_any(kwargs.get("rpe_config")), source, _model_grid(kwargs, cfg))


def _create_irpe_deit(variant: str, pretrained: bool = False, **kwargs: Any) -> IRPEVisionTransformer:
    if pretrained:
        kwargs["rpe_config"] = _rpe_config_for_pretrained(variant, kwargs)
    return build_model_with_cfg(
        IRPEVisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=3, feature_cls="getter"),
        **kwargs,
    )


def _entrypoint(name: str, size: str, rpe_config: RPEConfig) -> Any:
    """A timm entry point that only sets architecture arguments; keyword arguments override them."""

    def create(pretrained: bool = False, **kwargs: Any) -> IRPEVisionTransformer:
        if isinstance(kwargs.get("rpe_config"), dict):
            # A dict overrides key by key the settings of the source (a Hub config) or of this name,
            # so a recipe can give ``rpe_config: {resize: scale}`` alone.
            source = kwargs.get("pretrained_model_args", {}).get("rpe_config")
            base = RPEConfig.from_any(source if isinstance(source, dict) else rpe_config).to_dict()
            kwargs["rpe_config"] = {**base, **kwargs["rpe_config"]}
        args = {**ARCHITECTURES[size], "rpe_config": rpe_config, **kwargs}
        return _create_irpe_deit(name, pretrained=pretrained, **args)

    create.__name__ = create.__qualname__ = name
    create.__module__ = __name__
    create.__doc__ = f"DeiT-{size[0].upper()} with iRPE ({rpe_config.mode} {rpe_config.method} on {rpe_config.rpe_on})."
    return register_model(create)


for _name, (_size, _rpe, _) in OFFICIAL_MODELS.items():
    _entrypoint(_name, _size, _rpe)
for _name, _size in GENERIC_MODELS.items():
    _entrypoint(_name, _size, RPEConfig())
