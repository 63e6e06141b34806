"""Swin Transformer with iRPE in every window (iRPE supplementary, section 6), registered with timm.

Swin's relative position bias (one learned scalar per window offset and head) is replaced by iRPE
computed per window: the bucket of a pair is that of its offset inside the window, so every window
shares the bucket ids of the window grid (a non-persistent buffer, rebuilt by ``set_window_size`` as
timm's Swin rebuilds its index). Shifted windows keep timm's mask. The supplementary reports Swin-T
80.5 without RPE, +0.8 with RPE in bias mode, and 81.9 with contextual iRPE on queries, keys and values,
the default of ``irpe_swin_tiny_patch4_window7_224``; ``rpe_config`` takes any configuration, e.g.
``{"mode": "bias", "rpe_on": "k", "shared_head": False}`` for bias mode.

The body is timm's ``SwinTransformer`` with ``WindowRPEAttention`` around each block's own qkv and
proj layers, so timm's Swin-T weights load for everything but the relative position bias tables,
which iRPE replaces (its tables start at zero). docs/irpe_swin.md has the details.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer import checkpoint_filter_fn as swin_checkpoint_filter_fn
from torch import Tensor, nn

from .checkpoint import check_state_dict
from .irpe import RPEConfig, build_rpe

__all__ = ["WindowRPEAttention", "IRPESwinTransformer", "checkpoint_filter_fn"]

# contextual product iRPE on queries, keys and values, one table for all heads (the supplementary's 81.9)
DEFAULT_RPE = RPEConfig(method="product", mode="ctx", ratio=1.9, rpe_on="qkv", shared_head=True, skip=0)


class WindowRPEAttention(nn.Module):
    """Window multi-head self-attention with iRPE (in place of timm's ``WindowAttention`` and its bias table).

    Same constructor arguments and ``forward(x, mask)`` as timm's ``WindowAttention``, plus
    ``rpe_config`` (``skip`` is always 0: a window has no class token). ``x`` holds windows,
    (num_windows * B, Wh * Ww, C); ``mask`` is the shifted windows' (num_windows, N, N) 0 / -100 mask.
    ``reference = True`` switches the RPE terms to their plain per-pair formulas (for tests).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int | None = None,
        window_size: int | tuple[int, int] = 7,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        rpe_config: RPEConfig | dict[str, Any] | str | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        self.scale = self.head_dim**-0.5
        self.rpe_config = replace(RPEConfig.from_any(rpe_config), skip=0)
        self.reference = False
        self.qkv = nn.Linear(dim, self.head_dim * num_heads * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(self.head_dim * num_heads, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.window_size = to_2tuple(window_size)
        self.rpe_q, self.rpe_k, self.rpe_v = build_rpe(self.rpe_config, num_heads, self.head_dim, self.window_size)

    def set_window_size(self, window_size: int | tuple[int, int]) -> None:
        """Rebuild the bucket ids for another window (the tables' size does not depend on it)."""
        self.window_size = to_2tuple(window_size)
        for rpe in (self.rpe_q, self.rpe_k, self.rpe_v):
            for table in () if rpe is None else rpe.tables:
                table.set_grid_size(self.window_size)

    def init_non_persistent_buffers(self) -> None:
        """Recompute the bucket-id buffers (timm calls this after building on the meta device)."""
        self.set_window_size(self.window_size)

    def _logit_term(self, q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor | None:
        """The q/k RPE logit term plus the shifted-window mask, broadcastable to (B_, H, N, N); None
        when there is neither."""
        term = None
        if self.rpe_k is not None:
            term = self.rpe_k.attn_bias(q, *self.window_size, self.reference, self.scale)
        if self.rpe_q is not None:
            on_q = self.rpe_q.attn_bias(k, *self.window_size, self.reference, self.scale)
            term = on_q if term is None else term + on_q
        if mask is None:
            return term
        windows, heads, tokens = q.shape[0], q.shape[1], q.shape[2]
        num_win = mask.shape[0]
        mask = mask.to(q.dtype).view(1, num_win, 1, tokens, tokens)
        if term is not None:
            mask = mask + term.expand(windows, heads, tokens, tokens).reshape(-1, num_win, heads, tokens, tokens)
        return mask.expand(windows // num_win, -1, heads, -1, -1).reshape(windows, heads, tokens, tokens)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        windows, tokens, _ = x.shape
        q, k, v = self.qkv(x).reshape(windows, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        term = self._logit_term(q, k, mask)
        if self.rpe_v is None and not self.reference:
            dropout = self.attn_drop.p if self.training else 0.0
            attn_mask = None if term is None else term.to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, scale=self.scale)
        else:
            logits = (q @ k.transpose(-2, -1)) * self.scale
            attn = self.attn_drop((logits if term is None else logits + term).softmax(dim=-1))
            out = attn @ v
            if self.rpe_v is not None:
                out = out + self.rpe_v.value_term(attn, *self.window_size, self.reference).to(out.dtype)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(windows, tokens, -1)))


class IRPESwinTransformer(SwinTransformer):
    """timm's SwinTransformer whose window attention carries iRPE (``rpe_config``) instead of the
    relative position bias table."""

    def __init__(self, rpe_config: RPEConfig | dict[str, Any] | str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rpe_config = replace(RPEConfig.from_any(rpe_config), skip=0)
        for stage in self.layers:
            for block in stage.blocks:
                attn = block.attn
                rpe_attn = WindowRPEAttention(
                    attn.dim,
                    attn.num_heads,
                    head_dim=attn.qkv.out_features // 3 // attn.num_heads,
                    window_size=attn.window_size,
                    attn_drop=attn.attn_drop.p,
                    proj_drop=attn.proj_drop.p,
                    rpe_config=self.rpe_config,
                ).to(attn.qkv.weight.device)
                rpe_attn.qkv, rpe_attn.proj = attn.qkv, attn.proj  # timm's layers and initialisation
                block.attn = rpe_attn

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Every iRPE table (the paper puts no weight decay on them)."""
        return {name for name, _ in self.named_parameters() if ".rpe_" in name}


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: IRPESwinTransformer) -> dict[str, Tensor]:
    """A timm (or original) Swin checkpoint without its relative position bias tables, which iRPE
    replaces, plus the model's zero iRPE tables when it has none; every other key is checked."""
    state_dict = state_dict.get("model", state_dict)
    state_dict = state_dict.get("state_dict", state_dict)
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith("relative_position_bias_table")}
    state_dict = swin_checkpoint_filter_fn(state_dict, model)
    if not any(".rpe_" in key for key in state_dict):
        state_dict.update({k: torch.zeros_like(v) for k, v in model.state_dict().items() if ".rpe_" in k})
    return check_state_dict(state_dict, model)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head.fc",
        "license": "mit",
        "paper_ids": "arXiv:2107.14222",
        "paper_name": "Rethinking and Improving Relative Position Encoding for Vision Transformer",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        # timm's Swin-T ImageNet-1k weights: everything loads but the relative position bias tables
        "irpe_swin_tiny_patch4_window7_224.ms_in1k": _cfg(hf_hub_id="timm/swin_tiny_patch4_window7_224.ms_in1k"),
    }
)


def _create_irpe_swin(variant: str, pretrained: bool = False, **kwargs: Any) -> IRPESwinTransformer:
    out_indices = kwargs.pop("out_indices", tuple(range(len(kwargs.get("depths", (1, 1, 3, 1))))))
    return build_model_with_cfg(
        IRPESwinTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs,
    )


@register_model
def irpe_swin_tiny_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> IRPESwinTransformer:
    """Swin-T with contextual product iRPE on queries, keys and values per window (``rpe_config`` overrides)."""
    if isinstance(kwargs.get("rpe_config"), dict):
        # A dict overrides key by key the settings of the source (a Hub config) or of this name.
        source = kwargs.get("pretrained_model_args", {}).get("rpe_config")
        base = RPEConfig.from_any(source if isinstance(source, dict) else DEFAULT_RPE).to_dict()
        kwargs["rpe_config"] = {**base, **kwargs["rpe_config"]}
    model_args = dict(
        patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), rpe_config=DEFAULT_RPE
    )
    return _create_irpe_swin("irpe_swin_tiny_patch4_window7_224", pretrained=pretrained, **dict(model_args, **kwargs))
