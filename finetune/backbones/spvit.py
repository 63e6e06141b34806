"""SP-ViT (Zhou et al., BMVC 2022, arXiv:2206.07662): spatial-prior self-attention on the LV-ViT body.

SP-SA multiplies each content logit by a learned spatial prior of the raw patch offset between query
and key, one small MLP per head. The body is LV-ViT as released (Jiang et al., "All Tokens Matter"):
a 4-convolution patch stem, residual branches divided by ``skip_lam``, a depthwise 3x3 convolution
on the patch tokens after every block, and an auxiliary head over the patch tokens. The first
``sp_layers`` blocks use SP-SA and see only patch tokens; the class token joins before block
``sp_layers`` and the remaining blocks use plain attention.

Parameter names are the release's, so its timm CheckpointSaver files (``state_dict`` and
``state_dict_ema``, keys possibly prefixed ``module.``) load without renaming through
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))``; pass
``use_ema=False`` to load the training weights instead of the EMA ones.
"""

# No ``from __future__ import annotations``: torch.fx writes the forward's annotations into the code
# it generates, which TorchScript then compiles, so they must be types, not strings.
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    DropPath,
    Mlp,
    get_device_dtype,
    register_notrace_function,
    register_notrace_module,
    resample_abs_pos_embed,
    to_2tuple,
    trunc_normal_,
)
from timm.layers.attention import Attention
from timm.models import (
    build_model_with_cfg,
    checkpoint,
    generate_default_cfgs,
    load_state_dict,
    named_apply,
    register_model,
    resolve_pretrained_cfg,
)
from timm.models.vision_transformer import init_weights_vit_timm
from torch import Tensor, nn

from ..resize import (
    PRIOR_RESIZE_STRATEGIES,
    pretrained_image_size,
    prior_offset_scale,
    record_input_size,
    record_model_args,
    source_grid,
)
from . import flex
from .checkpoint import check_state_dict
from .features import take_indices
from .recompute import prior_attention

__all__ = ["SPViT", "SPSAttention", "SPViTBlock", "ConvStem", "offset_table", "checkpoint_filter_fn"]

_logger = logging.getLogger(__name__)

# Weight of the auxiliary (token) head in the inference output, as released.
AUX_LOGIT_WEIGHT = 0.5

# 'token': the class token; 'avg': the mean patch token; '': no pooling (per-token logits).
GLOBAL_POOLS = ("token", "avg", "")


def offset_table(height: int, width: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """The distinct patch offsets of an h x w grid and the offset of every (query, key) pair.

    Returns ``offsets``, ((2h-1)(2w-1), 2) float rows (dx, dy) = (col_j - col_i, row_j - row_i), and
    ``index``, (n*n,) long with n = h*w: the ``offsets`` row of pair (i, j) at i*n + j, tokens in
    row-major order. Plain tensor code: ``SPSAttention`` keeps the table of its built grid in buffers.
    """
    dy, dx = torch.meshgrid(
        torch.arange(1 - height, height, device=device), torch.arange(1 - width, width, device=device), indexing="ij"
    )
    offsets = torch.stack([dx.flatten(), dy.flatten()], dim=1).float()
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    row_offset = rows[None, :] - rows[:, None] + height - 1
    col_offset = cols[None, :] - cols[:, None] + width - 1
    index = (row_offset * (2 * width - 1) + col_offset).flatten()
    return offsets, index


@register_notrace_module  # FX: a leaf (its token-count check and per-image CPU loop are Python control flow)
class SPSAttention(nn.Module):
    """Spatial-prior self-attention: logit_ij = SP_h(dx, dy) * (q_i . k_j) / sqrt(d), softmax over j.

    SP_h is a per-head 2 -> head_dim -> 1 ReLU MLP of the patch offset, held as released: ``w1`` is
    Linear(2, dim) whose output channels are split into heads by blocks, ``w2`` (dim, 1) is viewed
    (heads, head_dim) and ``b2`` holds one bias per head. w2 = 0 and b2 = 1 at init, so a fresh
    layer is plain attention. The prior depends on the offset only: each forward evaluates it once
    on the (2h-1)(2w-1) distinct offsets and gathers it to n x n. ``offset_scale`` (x, y) multiplies
    the raw offsets before the MLP: 1 as released; the model passes trained/current grid under
    ``prior_resize='scale'`` (``finetune.resize.prior_offset_scale``).

    On CUDA (and in CPU inference when ``cpu_flex_inference`` is set) the prior multiplies the logits
    inside FlexAttention (``finetune.backbones.flex``); eager CPU training recomputes the weights in
    backward (``finetune.backbones.recompute``): neither keeps an n x n tensor per image.
    """

    cpu_flex_inference = False

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        grid_size: tuple[int, int] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        dd = dict(device=device, dtype=dtype)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qk = nn.Linear(dim, dim * 2, bias=qkv_bias, **dd)
        self.v = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.w1 = nn.Linear(2, dim, **dd)
        self.w2 = nn.Parameter(torch.zeros(dim, 1, **dd))
        self.b2 = nn.Parameter(torch.ones(num_heads, **dd))
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.grid_size: tuple[int, int] | None = None
        self.register_buffer("prior_offsets", None, persistent=False)
        self.register_buffer("prior_index", None, persistent=False)
        if grid_size is not None:
            self.set_grid_size(grid_size)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}"

    def set_grid_size(self, grid_size: tuple[int, int]) -> None:
        """Build the offset table of ``grid_size`` into non-persistent buffers (as timm's Swin builds its
        relative position index)."""
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.prior_offsets, self.prior_index = offset_table(*self.grid_size, self.w1.weight.device)

    def spatial_prior(
        self, grid_size: tuple[int, int], offset_scale: tuple[float, float] = (1.0, 1.0)
    ) -> Tensor:
        """SP_h(dx, dy) for every head and (query, key) pair of the grid, (heads, n, n)."""
        height, width = grid_size
        if (height, width) == self.grid_size:
            offsets, index = self.prior_offsets, self.prior_index
        else:
            offsets, index = offset_table(height, width, self.w1.weight.device)
        offsets = offsets.to(self.w1.weight.dtype)
        if offset_scale[0] != 1.0 or offset_scale[1] != 1.0:
            offsets = offsets * torch.tensor([offset_scale[0], offset_scale[1]], dtype=offsets.dtype, device=offsets.device)
        hidden = F.relu(self.w1(offsets)).view(-1, self.num_heads, self.head_dim)  # (M, H, d)
        per_offset = torch.einsum("mhd,hd->hm", hidden, self.w2.view(self.num_heads, self.head_dim))
        per_offset = per_offset + self.b2[:, None]  # (H, M)
        n = height * width
        return per_offset.index_select(1, index).view(self.num_heads, n, n)

    def forward(
        self, x: Tensor, grid_size: tuple[int, int], offset_scale: tuple[float, float] = (1.0, 1.0)
    ) -> Tensor:
        batch, num_tokens, dim = x.shape
        if num_tokens != grid_size[0] * grid_size[1]:
            raise ValueError(
                f"SPSAttention: {num_tokens} tokens do not match the {grid_size[0]}x{grid_size[1]} patch grid "
                "(SP-SA layers see patch tokens only)"
            )
        qk = self.qk(x).reshape(batch, num_tokens, 2, self.num_heads, self.head_dim)
        v_heads = self.v(x).reshape(batch, num_tokens, self.num_heads, self.head_dim)
        q, k = qk.permute(2, 0, 3, 1, 4).unbind(0)
        v = v_heads.transpose(1, 2)
        # The scale folds into the (heads, n, n) prior, so the batch-sized logits see one multiply.
        prior = (self.spatial_prior(grid_size, offset_scale) * self.scale).to(q.dtype)
        if torch.jit.is_scripting():  # the whole batch at once (the paths below are eager / compile only)
            out = self._attend(q, k, v, prior).transpose(1, 2).reshape(batch, num_tokens, dim)
            return self.proj_drop(self.proj(out))
        training_grad = torch.is_grad_enabled() and q.requires_grad
        eager_cpu = x.device.type == "cpu" and not (torch.compiler.is_compiling() or torch.compiler.is_exporting())
        if flex.usable(self, q, training_grad):
            out = flex.attend(q, k, v, flex.prior_score_mod(prior), scale=1.0)
        elif eager_cpu and training_grad and (self.attn_drop.p == 0 or not self.training):
            return self.proj_drop(self.proj(prior_attention(qk, v_heads, prior)))
        # A batch's n x n logits overflow CPU caches; image by image they stay cache-resident (about
        # twice as fast here, and no copies of q, k, v). Accelerators take the whole batch at once, and
        # so do compiled / exported graphs (splitting the batch would fix their batch size).
        elif eager_cpu:
            images = zip(q.split(1), k.split(1), v.split(1), strict=True)
            out = torch.cat([self._attend(qc, kc, vc, prior) for qc, kc, vc in images])
        else:
            out = self._attend(q, k, v, prior)
        out = out.transpose(1, 2).reshape(batch, num_tokens, dim)
        return self.proj_drop(self.proj(out))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, prior: Tensor) -> Tensor:
        attn = ((q @ k.transpose(-2, -1)) * prior).softmax(dim=-1)
        return self.attn_drop(attn) @ v

    @torch.no_grad()
    def attention_weights(
        self, x: Tensor, grid_size: tuple[int, int], offset_scale: tuple[float, float] = (1.0, 1.0)
    ) -> Tensor:
        """Attention probabilities (B, H, n, n) for input tokens ``x`` (what the visualiser draws)."""
        batch, num_tokens, _ = x.shape
        q, k = self.qk(x).reshape(batch, num_tokens, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        prior = self.spatial_prior(grid_size, offset_scale) * self.scale
        return ((q @ k.transpose(-2, -1)) * prior).softmax(dim=-1)


class PosConv(nn.Module):
    """Depthwise 3x3 convolution with a residual over the patch tokens; leading tokens pass through.

    The convolution sits in a one-element Sequential so its parameters are ``proj.0.*`` as released.
    """

    def __init__(self, dim: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, device=device, dtype=dtype))

    def forward(self, x: Tensor, grid_size: tuple[int, int], num_prefix_tokens: int = 0) -> Tensor:
        prefix, tokens = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
        feat = tokens.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid_size)
        tokens = (self.proj(feat) + feat).flatten(2).transpose(1, 2)
        return torch.cat([prefix, tokens], dim=1) if num_prefix_tokens else tokens


class SPViTBlock(nn.Module):
    """LV-ViT block: pre-norm attention and MLP branches divided by ``skip_lam``, then ``PosConv``.

    ``spatial_prior`` selects SP-SA (patch tokens only) over plain multi-head attention;
    ``num_prefix_tokens`` is how many leading tokens (the class token) the block sees.
    """

    __constants__ = ["spatial_prior"]  # so TorchScript compiles only the attention call this block makes

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 3.0,
        qkv_bias: bool = False,
        skip_lam: float = 1.0,
        spatial_prior: bool = False,
        num_prefix_tokens: int = 0,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        grid_size: tuple[int, int] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.skip_lam = skip_lam
        self.spatial_prior = spatial_prior
        self.num_prefix_tokens = num_prefix_tokens
        self.norm1 = norm_layer(dim, **dd)
        if spatial_prior:
            self.attn = SPSAttention(
                dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, grid_size=grid_size, **dd
            )
        else:
            self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.pos_block = PosConv(dim, **dd)

    def forward(
        self, x: Tensor, grid_size: tuple[int, int], offset_scale: tuple[float, float] = (1.0, 1.0)
    ) -> Tensor:
        y = self.norm1(x)
        y = self.attn(y, grid_size, offset_scale) if self.spatial_prior else self.attn(y)
        x = x + self.drop_path1(y) / self.skip_lam
        x = x + self.drop_path2(self.mlp(self.norm2(x))) / self.skip_lam
        return self.pos_block(x, grid_size, self.num_prefix_tokens)


def stem_grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """Patch grid the stem gives an image: a stride-2 conv (padded), then a patch_size/2 projection."""
    half = patch_size // 2
    return (height + 1) // 2 // half, (width + 1) // 2 // half


class ConvStem(nn.Module):
    """LV-ViT patch stem: conv 7x7 stride 2, two 3x3 convs (each followed by BN and ReLU), then a
    (patch/2) x (patch/2) projection with that stride. Returns the (B, C, h, w) patch map."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        stem_channels: int = 64,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if patch_size % 2:
            raise ValueError(
                f"patch_size={patch_size}: expected an even size (a stride-2 conv precedes the projection)"
            )
        self.patch_size = to_2tuple(patch_size)
        self.set_input_size(img_size)
        c = stem_channels
        self.conv1 = nn.Conv2d(in_chans, c, kernel_size=7, stride=2, padding=3, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(c, **dd)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, padding=1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(c, **dd)
        self.conv3 = nn.Conv2d(c, c, kernel_size=3, padding=1, bias=False, **dd)
        self.bn3 = nn.BatchNorm2d(c, **dd)
        self.proj = nn.Conv2d(c, embed_dim, kernel_size=patch_size // 2, stride=patch_size // 2, **dd)

    def set_input_size(self, img_size: int | tuple[int, int]) -> None:
        """Build for another image size (the convolutions do not depend on it)."""
        self.img_size = to_2tuple(img_size)
        self.grid_size = self.feat_size(self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """Patch grid of an image size."""
        return stem_grid(img_size[0], img_size[1], self.patch_size[0])

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        return self.proj(x)


class SPViT(nn.Module):
    """SP-ViT: the LV-ViT body whose first ``sp_layers`` blocks use SP-SA.

    ``forward`` returns class logits: cls_logits + 0.5 * max over patch tokens of aux_head(token),
    in training and inference alike, so plain cross-entropy fine-tuning works unchanged. With
    ``return_token_logits=True`` a model in training mode instead returns ``(cls_logits,
    token_logits)``, (B, classes) and (B, n, classes), the outputs a token-labelling loss needs.
    The release's MixToken augmentation is not part of the model.

    ``pos_embed`` covers the patch tokens only while SP-SA layers exist (``sp_layers`` > 0); with
    ``sp_layers=0`` (plain LV-ViT) the class token joins first and has a pos_embed slot.
    ``stem_channels`` is the width of the convolutional stem (64 for S/M, 128 for L);
    ``prior_resize`` says how the priors meet a grid other than ``trained_grid`` (the grid the
    weights were trained on, recorded by ``checkpoint_filter_fn``): ``keep`` feeds raw patch
    offsets (as released), ``scale`` offsets in units of ``trained_grid`` (DESIGN section 6).
    """

    aux_logit_weight = AUX_LOGIT_WEIGHT
    __constants__ = ["aux_logit_weight"]  # TorchScript reads module constants, not module globals

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 384,
        depth: int = 16,
        num_heads: int = 6,
        mlp_ratio: float = 3.0,
        qkv_bias: bool = False,
        sp_layers: int = 14,
        skip_lam: float = 2.0,
        stem_channels: int = 64,
        prior_resize: str = "keep",
        trained_grid: tuple[int, int] | None = None,
        return_token_logits: bool = False,
        global_pool: str = "token",
        dynamic_img_size: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: type[nn.Module] | None = None,
        act_layer: type[nn.Module] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if not 0 <= sp_layers < depth:
            raise ValueError(
                f"sp_layers={sp_layers}: expected 0 <= sp_layers < depth={depth} "
                "(the class token joins before block sp_layers)"
            )
        if prior_resize not in PRIOR_RESIZE_STRATEGIES:
            raise ValueError(
                f"prior_resize={prior_resize!r}: expected one of {', '.join(PRIOR_RESIZE_STRATEGIES)}"
            )
        if trained_grid is not None and len(trained_grid) != 2:
            raise ValueError(f"trained_grid={trained_grid!r}: expected None or a (rows, cols) pair")
        _check_global_pool(global_pool)
        norm_layer = norm_layer or nn.LayerNorm  # eps 1e-5, as released
        act_layer = act_layer or nn.GELU
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.dynamic_img_size = dynamic_img_size
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.sp_layers = sp_layers
        self.prior_resize = prior_resize
        self.trained_grid = tuple(int(n) for n in trained_grid) if trained_grid is not None else None
        self.return_token_logits = return_token_logits
        self.grad_checkpointing = False

        self.patch_embed = ConvStem(img_size, patch_size, in_chans, embed_dim, stem_channels, **dd)
        self.num_pos_prefix_tokens = 0 if sp_layers > 0 else 1
        self.cls_token: nn.Parameter | None = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
        self.pos_embed = nn.Parameter(
            torch.zeros(1, self.num_pos_prefix_tokens + self.patch_embed.num_patches, embed_dim, **dd)
        )
        self.pos_drop = nn.Dropout(pos_drop_rate)

        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        self.blocks = nn.ModuleList(
            SPViTBlock(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                skip_lam=skip_lam,
                spatial_prior=i < sp_layers,
                num_prefix_tokens=0 if i < sp_layers else 1,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[i],
                act_layer=act_layer,
                norm_layer=norm_layer,
                grid_size=self.patch_embed.grid_size,
                **dd,
            )
            for i in range(depth)
        )
        self.feature_info = [
            dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=self.patch_embed.patch_size[0]) for i in range(depth)
        ]
        self.norm = norm_layer(embed_dim, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head, self.aux_head = self._heads(num_classes, dd)
        self.init_weights()

    def _heads(self, num_classes: int, dd: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
        """The class head and the token head (both Identity for 0 classes)."""
        if num_classes <= 0:
            return nn.Identity(), nn.Identity()
        return nn.Linear(self.embed_dim, num_classes, **dd), nn.Linear(self.embed_dim, num_classes, **dd)

    def init_weights(self) -> None:
        """timm's ViT init; SP-SA keeps w2 = 0, b2 = 1 (plain attention at start)."""
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        named_apply(init_weights_vit_timm, self)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """pos_embed, cls_token and the spatial-prior MLPs (w1, w2, b2 of every SP-SA layer)."""
        prior = {
            f"blocks.{i}.attn.{name}"
            for i, block in enumerate(self.blocks)
            if block.spatial_prior
            for name in ("w1.weight", "w1.bias", "w2", "b2")
        }
        return {"pos_embed", "cls_token"} | prior

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise lr decay: the stem, then one group per block."""
        return dict(
            stem=r"^cls_token|pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))]
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New class and token heads for ``num_classes`` (0: both Identity, forward gives features);
        ``global_pool`` ('token', 'avg' or '') changes the pooling when given."""
        if global_pool is not None:
            _check_global_pool(global_pool)
            if global_pool == "token" and self.cls_token is None:
                raise ValueError("global_pool='token': the class token was pruned (prune_intermediate_layers)")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head, self.aux_head = self._heads(num_classes, get_device_dtype(self))
        self.head.train(self.training)
        self.aux_head.train(self.training)

    def set_grid_size(self, grid_size: tuple[int, int]) -> None:
        """Build every SP-SA layer's offset table for ``grid_size`` (as timm's Swin ``set_window_size``)."""
        for block in self.blocks:
            if block.spatial_prior:
                block.attn.set_grid_size(grid_size)

    def set_input_size(self, img_size: int | tuple[int, int] | None = None, patch_size: Any = None) -> None:
        """Build the model for another input size: pos_embed resampled (bicubic), offset tables rebuilt,
        the former grid recorded as ``trained_grid`` (unless one is named) for ``prior_resize='scale'``."""
        if patch_size is not None and to_2tuple(patch_size) != self.patch_embed.patch_size:
            raise ValueError(
                f"set_input_size(patch_size={patch_size!r}): SP-ViT's convolutional stem has a fixed patch size "
                f"{self.patch_embed.patch_size}"
            )
        if img_size is None:
            return
        old_grid = self.patch_embed.grid_size
        self.patch_embed.set_input_size(img_size)
        new_grid = self.patch_embed.grid_size
        if new_grid != old_grid:
            self.pos_embed = nn.Parameter(
                resample_abs_pos_embed(
                    self.pos_embed.detach(), new_size=list(new_grid), old_size=list(old_grid),
                    num_prefix_tokens=self.num_pos_prefix_tokens,
                ),
                requires_grad=self.pos_embed.requires_grad,
            )
            self.trained_grid = self.trained_grid or old_grid
            record_model_args(self, trained_grid=list(self.trained_grid))
        self.set_grid_size(new_grid)
        record_input_size(self, self.patch_embed.img_size)

    def grid_size_of(self, x: Tensor) -> tuple[int, int]:
        """Patch grid of an image batch: the built grid unless ``dynamic_img_size`` (``_embed`` checks)."""
        if self.dynamic_img_size:
            return self.patch_embed.feat_size((x.shape[-2], x.shape[-1]))
        return self.patch_embed.grid_size

    def _embed(self, x: Tensor, grid_size: tuple[int, int]) -> Tensor:
        """Patch tokens (with the class token when ``sp_layers`` is 0) plus pos_embed, resampled to
        ``grid_size`` when it is not the built grid (``dynamic_img_size``); other models check the
        image size first."""
        if not self.dynamic_img_size:
            x = checked_images(x, self.patch_embed.grid_size, self.patch_embed.patch_size[0], self.patch_embed.img_size)
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        if self.sp_layers == 0:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        pos_embed = self.pos_embed
        if grid_size != self.patch_embed.grid_size:
            pos_embed = resample_abs_pos_embed(
                pos_embed, new_size=list(grid_size), old_size=list(self.patch_embed.grid_size),
                num_prefix_tokens=self.num_pos_prefix_tokens,
            )
        return self.pos_drop(x + pos_embed)

    def _with_class_token(self, i: int, x: Tensor) -> Tensor:
        """``x`` as block ``i`` takes it: the class token joins before block ``sp_layers``."""
        if i == self.sp_layers and i > 0 and self.cls_token is not None:
            return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x

    def forward_features(self, x: Tensor) -> Tensor:
        """Normalised tokens (B, 1 + n, C): the class token, then the patch tokens in row-major order."""
        grid_size = self.grid_size_of(x)
        offset_scale = prior_offset_scale(self.prior_resize, self.trained_grid, grid_size)
        x = self._embed(x, grid_size)
        for i, block in enumerate(self.blocks):
            x = self._with_class_token(i, x)
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, grid_size, offset_scale)
            else:
                x = block(x, grid_size, offset_scale)
        return self.norm(x)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Block outputs as timm's ViTs give them: ``indices`` (the last n blocks, or a list), patch
        tokens as NCHW maps or NLC, the class token as the prefix (empty before it joins)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt={output_fmt!r}: expected 'NCHW' or 'NLC'")
        taken, max_index = take_indices(len(self.blocks), indices)
        grid_size = self.grid_size_of(x)
        offset_scale = prior_offset_scale(self.prior_resize, self.trained_grid, grid_size)
        x = self._embed(x, grid_size)
        last = len(self.blocks) - 1 if torch.jit.is_scripting() or not stop_early else max_index
        intermediates, prefix_tokens = [], []
        for i, block in enumerate(self.blocks):
            if i > last:
                break
            x = self._with_class_token(i, x)
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, grid_size, offset_scale)
            else:
                x = block(x, grid_size, offset_scale)
            if i in taken:
                y = self.norm(x) if norm else x
                prefix = block.num_prefix_tokens
                prefix_tokens.append(y[:, :prefix])
                tokens = y[:, prefix:]
                if output_fmt == "NCHW":
                    tokens = tokens.reshape(x.shape[0], grid_size[0], grid_size[1], -1).permute(0, 3, 1, 2).contiguous()
                intermediates.append(tokens)
        if not torch.jit.is_scripting() and return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix_tokens, strict=True))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks after the last of ``indices`` (and the norm / heads if asked)."""
        taken, max_index = take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            if max_index < self.sp_layers:  # the class token would join after the last block kept
                self.cls_token = None
                self.num_prefix_tokens = 0
            self.reset_classifier(0, "")
        return taken

    def pool(self, x: Tensor) -> Tensor:
        """``global_pool`` of ``forward_features`` tokens: the class token, the mean patch token, or all."""
        if self.global_pool == "token":
            return x[:, 0]
        if self.global_pool == "avg":
            return x[:, self.num_prefix_tokens :].mean(dim=1)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Logits from ``forward_features`` tokens: the pooled feature through ``head`` plus 0.5 * the
        max over patch tokens of ``aux_head`` (per-token logits when ``global_pool=''``); the pooled
        feature with ``pre_logits``."""
        pooled = self.head_drop(self.pool(x))
        if pre_logits or self.num_classes == 0:
            return pooled
        logits = self.head(pooled)
        if self.global_pool == "":
            return logits
        token_logits = self.aux_head(self.head_drop(x[:, self.num_prefix_tokens :]))
        if self.training and self.return_token_logits:
            return logits, token_logits
        return logits + self.aux_logit_weight * token_logits.amax(dim=1)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        return self.forward_head(self.forward_features(x))


@register_notrace_function  # FX: one node whose output is used, so a traced model still checks
def checked_images(x: Tensor, grid_size: tuple[int, int], patch_size: int, img_size: tuple[int, int]) -> Tensor:
    """``x`` itself if the image batch gives the ``grid_size`` a model was built for (``img_size``, the
    stem's patch size ``patch_size``); a clear error otherwise."""
    height, width = x.shape[-2], x.shape[-1]
    grid = stem_grid(height, width, patch_size)
    if grid[0] != grid_size[0] or grid[1] != grid_size[1]:
        raise ValueError(
            f"input images {height}x{width} give a {grid[0]}x{grid[1]} patch grid, but the model was built for "
            f"img_size=({img_size[0]}, {img_size[1]}) ({grid_size[0]}x{grid_size[1]}); create it with "
            f"img_size=({height}, {width}) or dynamic_img_size=True"
        )
    return x


def _check_global_pool(global_pool: str) -> None:
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"global_pool={global_pool!r}: SP-ViT pools with one of {', '.join(map(repr, GLOBAL_POOLS))}")


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: SPViT) -> dict[str, Tensor]:
    """An official SP-ViT state_dict fitted to ``model``, every key and shape checked.

    State dict in, state dict out; the model is only read. Strips a ``module.`` prefix and resamples
    a pos_embed from another grid (bicubic) to the model's; ``_create_spvit`` recorded that grid as
    the model's ``trained_grid`` before building it. With a new class count the heads are left to
    timm, which drops the classifier keys as for any fine-tuning load.
    """
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    pos_embed = state_dict.get("pos_embed")
    prefix = model.num_pos_prefix_tokens
    new_grid = model.patch_embed.grid_size
    if pos_embed is not None and pos_embed.ndim == 3 and pos_embed.shape[-1] == model.embed_dim:
        old_grid = _checkpoint_grid(model, pos_embed.shape[1] - prefix)
        if old_grid is not None and old_grid != new_grid:
            if model.trained_grid is None:
                raise ValueError(
                    f"checkpoint grid {old_grid[0]}x{old_grid[1]} differs from the model's {new_grid[0]}x{new_grid[1]}, "
                    "but the model was not built for it (trained_grid is unset): create it with timm.create_model("
                    "..., pretrained=True) so the grid is read from its pretrained cfg, or pass trained_grid"
                )
            state_dict["pos_embed"] = resample_abs_pos_embed(
                pos_embed, new_size=list(new_grid), old_size=list(old_grid), num_prefix_tokens=prefix
            )
            _logger.info(
                "checkpoint grid %dx%d -> model grid %dx%d: pos_embed resampled (bicubic), spatial priors on "
                "%s offsets (prior_resize=%s)",
                *old_grid,
                *new_grid,
                "raw" if model.prior_resize == "keep" else "trained-grid",
                model.prior_resize,
            )
    return check_state_dict(state_dict, model)


def _checkpoint_grid(model: SPViT, num_patch_tokens: int) -> tuple[int, int] | None:
    """Patch grid of a checkpoint's pos_embed: from the source image size of the model's pretrained cfg
    when it accounts for every token, else square; None if neither fits (the key check names it)."""
    expected = model.patch_embed.feat_size(pretrained_image_size(model.pretrained_cfg, model.pretrained_model_args))
    if expected[0] * expected[1] == num_patch_tokens:
        return expected
    side = math.isqrt(num_patch_tokens)
    return (side, side) if side * side == num_patch_tokens else None


def _training_weights_overlay(
    variant: str, pretrained_cfg: Any, overlay: dict[str, Any] | None
) -> dict[str, Any]:
    """A pretrained_cfg overlay that hands timm the ``state_dict`` (not ``state_dict_ema``) of the
    checkpoint file or URL the cfg names. timm's own loader always prefers the EMA weights."""
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg, overlay)
    if cfg.file:
        state_dict = load_state_dict(cfg.file, use_ema=False)
    elif isinstance(cfg.url, str) and cfg.url:
        checkpoint = torch.hub.load_state_dict_from_url(cfg.url, map_location="cpu", weights_only=True)
        state_dict = checkpoint.get("state_dict", checkpoint)
    else:
        raise ValueError(
            f"use_ema=False needs a checkpoint file or url in the pretrained cfg of {variant}; "
            "pass pretrained_cfg_overlay=dict(file=PATH)"
        )
    return {**(overlay or {}), "state_dict": state_dict}


def _trained_grid_for_pretrained(variant: str, kwargs: dict[str, Any]) -> tuple[int, int] | None:
    """The ``trained_grid`` of a model that loads the pretrained weights of ``kwargs``: the grid the
    weights were trained on when it is not the model's (``finetune.resize.source_grid``), decided once,
    before the model is built; a ``trained_grid`` given (or recorded by a Hub config) wins."""
    if kwargs.get("trained_grid") is not None:
        return kwargs["trained_grid"]
    cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay")).to_dict()
    patch = kwargs.get("patch_size", 16)

    def feat_size(size: tuple[int, int]) -> tuple[int, int]:
        return stem_grid(size[0], size[1], patch)

    source = source_grid(
        cfg, kwargs.get("pretrained_model_args") or {}, feat_size, 0 if kwargs.get("sp_layers", 14) > 0 else 1
    )
    model_grid = feat_size(to_2tuple(kwargs.get("img_size") or cfg["input_size"][-2:]))
    return source if source != model_grid else None


def _create_spvit(variant: str, pretrained: bool = False, use_ema: bool = True, **kwargs: Any) -> SPViT:
    if pretrained and not use_ema:
        kwargs["pretrained_cfg_overlay"] = _training_weights_overlay(
            variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay")
        )
    if pretrained:
        kwargs["trained_grid"] = _trained_grid_for_pretrained(variant, kwargs)
    model = build_model_with_cfg(
        SPViT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=3, feature_cls="getter"),
        **kwargs,
    )
    model.pretrained_cfg.pop("state_dict", None)  # the in-memory weights of use_ema=False, now loaded
    return model


# The release page links every checkpoint to this tag; the asset file names could not be confirmed,
# so no ``url`` is set: pass ``pretrained_cfg_overlay=dict(file=PATH)`` with a downloaded file.
RELEASE_PAGE = "https://github.com/ZhouYuxuanYX/SP-ViT/releases/tag/download"


def _cfg(top1: float, **kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.conv1",
        "classifier": ("head", "aux_head"),
        "license": "apache-2.0",
        "paper_ids": "arXiv:2206.07662",
        "paper_name": "SP-ViT: Learning 2D Spatial Priors for Vision Transformers",
        "origin_url": "https://github.com/ZhouYuxuanYX/SP-ViT",
        "notes": (f"ImageNet-1k top-1 {top1} (published)", f"weights: GitHub release assets, {RELEASE_PAGE}"),
        **kwargs,
    }


# Token-labelling ImageNet-1k weights at 224 and fine-tuned at 384 (crop_pct as the release's cfgs).
default_cfgs = generate_default_cfgs(
    {
        "spvit_small_patch16_224.tl_in1k": _cfg(83.9),
        "spvit_small_patch16_224.tl_in1k_384": _cfg(85.1, input_size=(3, 384, 384), crop_pct=1.0),
        "spvit_medium_patch16_224.tl_in1k": _cfg(84.9, crop_pct=1.0),
        "spvit_medium_patch16_224.tl_in1k_384": _cfg(86.0, input_size=(3, 384, 384), crop_pct=1.0),
        "spvit_large_patch16_224.tl_in1k": _cfg(85.5, crop_pct=1.0),
        "spvit_large_patch16_224.tl_in1k_384": _cfg(86.3, input_size=(3, 384, 384), crop_pct=1.0),
    }
)


@register_model
def spvit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> SPViT:
    """SP-ViT-S: LV-ViT-S body (dim 384, depth 16, 6 heads), SP-SA in the first 14 blocks, ~26M params."""
    model_args = dict(embed_dim=384, depth=16, num_heads=6, sp_layers=14, skip_lam=2.0, stem_channels=64)
    return _create_spvit("spvit_small_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def spvit_medium_patch16_224(pretrained: bool = False, **kwargs: Any) -> SPViT:
    """SP-ViT-M: LV-ViT-M body (dim 512, depth 20, 8 heads), SP-SA in the first 10 blocks, ~56M params."""
    model_args = dict(embed_dim=512, depth=20, num_heads=8, sp_layers=10, skip_lam=2.0, stem_channels=64)
    return _create_spvit("spvit_medium_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def spvit_large_patch16_224(pretrained: bool = False, **kwargs: Any) -> SPViT:
    """SP-ViT-L: LV-ViT-L body (dim 768, depth 24, 12 heads, 128-channel stem), SP-SA in the first 22
    blocks as the paper describes (the released code's L path drops SP-SA), ~150M params."""
    model_args = dict(embed_dim=768, depth=24, num_heads=12, sp_layers=22, skip_lam=3.0, stem_channels=128)
    return _create_spvit("spvit_large_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))
