"""Image relative position encoding (iRPE, Wu et al., ICCV 2021): bucket functions and RPE modules.

No model code lives here. A relative offset (dr, dc) = p_i - p_j between a query token i and a key
token j on the patch grid is mapped to a bucket by one of four 2D methods (euc, quant, cross,
product) built on a 1D index function (piecewise g or clip h). Every bucket owns an encoding: a
scalar (bias mode) or a vector (contextual mode) that interacts with queries, keys or values.

Parameter names and shapes follow the released code, so official checkpoints load as they are:
q/k tables are ``lookup_table_weight`` (heads, head_dim, buckets) or ``lookup_table_bias``
(heads, buckets); v tables are ``lookup_table_weight`` (heads, buckets, head_dim); the cross
method holds two such modules, ``rp_rows`` and ``rp_cols``. ``heads`` is 1 for shared tables.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "RPEConfig",
    "piecewise_index",
    "clip_index",
    "num_buckets",
    "bucket_ids",
    "ImageRPE",
    "CrossImageRPE",
    "build_rpe",
    "RPEAttention",
]

METHODS = ("euc", "quant", "cross", "product")
MODES = ("bias", "ctx")
INDEX_FUNCTIONS = ("piecewise", "clip")
RESIZE_STRATEGIES = ("keep", "scale", "interpolate")
_MODE_ALIASES = {"contextual": "ctx", "ctx": "ctx", "bias": "bias"}


@dataclass(frozen=True)
class RPEConfig:
    """How one model uses iRPE.

    ``ratio`` sets the piecewise function: alpha = ratio, beta = 2 ratio, gamma = 8 ratio.
    ``rpe_on`` is any combination of q, k, v. ``skip`` is the number of leading tokens (class,
    distillation) that share one extra bucket. ``index`` is ``piecewise`` (g) or ``clip`` (h).

    ``resize`` is how tables trained on ``trained_grid`` serve another patch grid (see
    ``finetune.resize`` and docs/resolution.md): ``keep`` (raw offsets, as released), ``scale``
    (offsets in units of ``trained_grid``) or ``interpolate`` (tables resampled when a checkpoint is
    loaded). ``trained_grid`` (rows, cols) is set when a checkpoint from another grid is loaded;
    None means the model's own grid.
    """

    method: str = "product"
    mode: str = "ctx"
    ratio: float = 1.9
    rpe_on: str = "k"
    shared_head: bool = True
    skip: int = 1
    index: str = "piecewise"
    resize: str = "keep"
    trained_grid: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        mode = _MODE_ALIASES.get(self.mode)
        if mode is None:
            raise ValueError(f"rpe_config.mode={self.mode!r}: expected one of 'bias', 'ctx' ('contextual')")
        object.__setattr__(self, "mode", mode)
        if self.method not in METHODS:
            raise ValueError(f"rpe_config.method={self.method!r}: expected one of {', '.join(METHODS)}")
        if self.index not in INDEX_FUNCTIONS:
            raise ValueError(f"rpe_config.index={self.index!r}: expected one of {', '.join(INDEX_FUNCTIONS)}")
        rpe_on = self.rpe_on.lower()
        if not rpe_on or set(rpe_on) - set("qkv") or len(set(rpe_on)) != len(rpe_on):
            raise ValueError(f"rpe_config.rpe_on={self.rpe_on!r}: expected a combination of q, k, v such as 'k' or 'qkv'")
        object.__setattr__(self, "rpe_on", "".join(c for c in "qkv" if c in rpe_on))
        if self.mode == "bias" and "v" in self.rpe_on:
            raise ValueError(
                f"rpe_config: bias mode cannot be applied on values (rpe_on={self.rpe_on!r}); "
                "use mode='ctx' or drop 'v' from rpe_on"
            )
        if self.ratio <= 0:
            raise ValueError(f"rpe_config.ratio={self.ratio!r}: expected a positive number")
        if self.skip < 0:
            raise ValueError(f"rpe_config.skip={self.skip!r}: expected a non-negative token count")
        if self.resize not in RESIZE_STRATEGIES:
            raise ValueError(
                f"rpe_config.resize={self.resize!r}: expected one of {', '.join(RESIZE_STRATEGIES)}"
            )
        if self.trained_grid is not None:  # JSON/YAML give lists; the config must stay hashable
            grid = self.trained_grid
            if not (isinstance(grid, (list, tuple)) and len(grid) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in grid)):
                raise ValueError(
                    f"rpe_config.trained_grid={grid!r}: expected None or a (rows, cols) pair of positive integers"
                )
            object.__setattr__(self, "trained_grid", tuple(grid))

    @property
    def alpha(self) -> float:
        return 1.0 * self.ratio

    @property
    def beta(self) -> float:
        return 2.0 * self.ratio

    @property
    def gamma(self) -> float:
        return 8.0 * self.ratio

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_any(cls, config: RPEConfig | dict[str, Any] | None) -> RPEConfig:
        """Accept a config, a plain dict (from YAML or a Hub config.json) or None (the official default)."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if isinstance(config, dict):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(config) - known)
            if unknown:
                raise ValueError(f"rpe_config: unknown key(s) {unknown}; expected some of {sorted(known)}")
            return cls(**config)
        raise TypeError(f"rpe_config: expected an RPEConfig, a dict or None, got {type(config).__name__}")


# --------------------------------------------------------------------------------------------------
# Index functions and bucket maps
# --------------------------------------------------------------------------------------------------


def piecewise_index(x: Tensor, alpha: float, beta: float, gamma: float) -> Tensor:
    """The piecewise function g(x), exactly as released.

    round(x) for |x| <= alpha, else sign(x) * min(beta, round(alpha + ln(|x|/alpha) / ln(gamma/alpha)
    * (beta - alpha))). Rounding is half to even (torch.round) and the result is truncated to an
    integer, so a fractional beta caps at int(beta).
    """
    x = x.to(torch.float32)
    magnitude = x.abs()
    log_part = torch.log(magnitude.clamp(min=alpha) / alpha) / math.log(gamma / alpha) * (beta - alpha)
    far = torch.sign(x) * (alpha + log_part).round().clamp(max=beta)
    return torch.where(magnitude <= alpha, x.round(), far).to(torch.long)


def clip_index(x: Tensor, beta: float) -> Tensor:
    """The clip function h(x) = max(-beta, min(beta, x)), used to adapt 1D RPEs (Shaw, Transformer-XL, Huang)."""
    return x.to(torch.float32).round().clamp(-beta, beta).to(torch.long)


def _index(x: Tensor, config: RPEConfig) -> Tensor:
    if config.index == "clip":
        return clip_index(x, config.beta)
    return piecewise_index(x, config.alpha, config.beta, config.gamma)


def num_buckets(method: str, config: RPEConfig) -> int:
    """Size of one table: 2b+1 per axis (b = int(beta)), squared for product, +1 when ``skip`` > 0.

    ``method`` is one of euc, quant, product, cross_rows, cross_cols (cross has one table per axis).
    """
    side = 2 * int(config.beta) + 1
    size = side * side if method == "product" else side
    return size + (1 if config.skip > 0 else 0)


def _grid_offsets(height: int, width: int) -> tuple[Tensor, Tensor]:
    """Row and column offsets p_i - p_j for every pair of grid positions (row-major), each (n, n)."""
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    return rows[:, None] - rows[None, :], cols[:, None] - cols[None, :]


def _scaled_offset(offset: Tensor, size: int, trained: int) -> Tensor:
    """``offset`` on a grid of ``size`` in units of a grid of ``trained`` patches: the nearest offset
    (half to even) the trained grid has, so every pair gets a bucket that grid trained."""
    nearest = (offset * trained).double().div(size).round()
    return nearest.clamp(1 - trained, trained - 1).long()


@functools.lru_cache(maxsize=256)
def bucket_ids(
    method: str, height: int, width: int, config: RPEConfig, device: torch.device | None = None
) -> Tensor:
    """Bucket of every (query, key) pair, (skip + h*w) x (skip + h*w), cached per grid and device.

    Pairs that involve one of the first ``skip`` tokens use the last bucket of the table. Under
    ``config.resize == "scale"`` offsets are first measured in units of ``config.trained_grid``. The
    returned tensor is shared by all callers: do not modify it.
    """
    dr, dc = _grid_offsets(height, width)
    if config.resize == "scale" and config.trained_grid is not None:
        dr = _scaled_offset(dr, height, config.trained_grid[0])
        dc = _scaled_offset(dc, width, config.trained_grid[1])
    b = int(config.beta)
    if method == "euc":
        ids = _index((dr.square() + dc.square()).float().sqrt().round(), config) + b
    elif method == "quant":
        ids = _index(dr.square() + dc.square(), config) + b
    elif method == "product":
        ids = (_index(dr, config) + b) * (2 * b + 1) + (_index(dc, config) + b)
    elif method == "cross_rows":
        ids = _index(dr, config) + b
    elif method == "cross_cols":
        ids = _index(dc, config) + b
    else:
        raise ValueError(f"bucket method {method!r}: expected euc, quant, product, cross_rows or cross_cols")
    if config.skip > 0:
        n = height * width
        padded = torch.full((n + config.skip, n + config.skip), num_buckets(method, config) - 1, dtype=torch.long)
        padded[config.skip :, config.skip :] = ids
        ids = padded
    return ids.to(device) if device is not None else ids


# --------------------------------------------------------------------------------------------------
# RPE modules
# --------------------------------------------------------------------------------------------------


class ImageRPE(nn.Module):
    """One iRPE table for queries, keys or values, with the efficient and the plain (reference) forms.

    For keys, ``attn_bias(q)`` gives q_i . r_{b(i,j)} (q already scaled by 1/sqrt(d)); for queries,
    ``attn_bias(k)`` gives k_j . r_{b(j,i)}; for values, ``value_term(attn)`` gives
    sum_j a_ij r_{b(i,j)}. The efficient form multiplies by the table first and gathers by bucket
    (contextual q/k) or sums attention rows per bucket first (values): no n x n x d tensor.
    """

    def __init__(
        self, method: str, on: str, num_heads: int, head_dim: int, config: RPEConfig
    ) -> None:
        super().__init__()
        self.method = method
        self.on = on
        self.mode = config.mode
        self.config = config
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_buckets = num_buckets(method, config)
        table_heads = 1 if config.shared_head else num_heads
        if self.mode == "bias":
            self.lookup_table_bias = nn.Parameter(torch.zeros(table_heads, self.num_buckets))
        elif on == "v":
            self.lookup_table_weight = nn.Parameter(torch.zeros(table_heads, self.num_buckets, head_dim))
        else:
            self.lookup_table_weight = nn.Parameter(torch.zeros(table_heads, head_dim, self.num_buckets))

    def extra_repr(self) -> str:
        return f"method={self.method}, on={self.on}, mode={self.mode}, buckets={self.num_buckets}"

    def bucket_ids(self, height: int, width: int, device: torch.device) -> Tensor:
        return bucket_ids(self.method, height, width, self.config, device)

    def attn_bias(self, x: Tensor, height: int, width: int, reference: bool = False) -> Tensor:
        """Logit term for q or k placement; ``x`` is (B, H, n, d) scaled queries (on k) or keys (on q).

        Both placements compute term[i, j] = x_i . r_{b(i, j)}; on queries the term at (i, j) reads
        the key's row, k_j . r_{b(j, i)}, which is that term transposed.
        """
        ids = self.bucket_ids(height, width, x.device)
        if self.mode == "bias":
            term = self.lookup_table_bias[:, ids].unsqueeze(0)  # (1, H or 1, n, n)
        elif reference:
            per_pair = self.lookup_table_weight[:, :, ids].expand(self.num_heads, -1, -1, -1)  # (H, d, n, n)
            term = torch.einsum("bhid,hdij->bhij", x, per_pair)
        else:
            per_bucket = x @ self.lookup_table_weight.to(x.dtype)  # (B, H, n, K)
            term = per_bucket.gather(-1, ids.expand(per_bucket.shape[:-2] + ids.shape))
        return term if self.on == "k" else term.transpose(-1, -2)

    def value_term(self, attn: Tensor, height: int, width: int, reference: bool = False) -> Tensor:
        """sum_j a_ij r_{b(i,j)} for (B, H, n, n) attention weights, as (B, H, n, d)."""
        ids = self.bucket_ids(height, width, attn.device)
        table = self.lookup_table_weight  # (H or 1, K, d)
        if reference:
            per_pair = table[:, ids].expand(self.num_heads, -1, -1, -1)  # (H, n, n, d)
            return torch.einsum("bhij,hijd->bhid", attn, per_pair)
        bucket_mass = attn.new_zeros(attn.shape[:-1] + (self.num_buckets,))
        bucket_mass = bucket_mass.scatter_add(-1, ids.expand(attn.shape), attn)  # (B, H, n, K)
        return bucket_mass @ table.to(attn.dtype)


class CrossImageRPE(nn.Module):
    """The cross method: one table along rows and one along columns, whose encodings add."""

    def __init__(self, on: str, num_heads: int, head_dim: int, config: RPEConfig) -> None:
        super().__init__()
        self.rp_rows = ImageRPE("cross_rows", on, num_heads, head_dim, config)
        self.rp_cols = ImageRPE("cross_cols", on, num_heads, head_dim, config)

    def attn_bias(self, x: Tensor, height: int, width: int, reference: bool = False) -> Tensor:
        return self.rp_rows.attn_bias(x, height, width, reference) + self.rp_cols.attn_bias(x, height, width, reference)

    def value_term(self, attn: Tensor, height: int, width: int, reference: bool = False) -> Tensor:
        return self.rp_rows.value_term(attn, height, width, reference) + self.rp_cols.value_term(
            attn, height, width, reference
        )


def build_rpe(config: RPEConfig, num_heads: int, head_dim: int) -> tuple[nn.Module | None, ...]:
    """The (rpe_q, rpe_k, rpe_v) modules of one attention layer; None where the config has no RPE."""

    def build(on: str) -> nn.Module | None:
        if on not in config.rpe_on:
            return None
        if config.method == "cross":
            return CrossImageRPE(on, num_heads, head_dim, config)
        return ImageRPE(config.method, on, num_heads, head_dim, config)

    return build("q"), build("k"), build("v")


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------


class RPEAttention(nn.Module):
    """Multi-head self-attention with iRPE on queries, keys and/or values.

    Query/key terms enter ``scaled_dot_product_attention`` as an additive float mask, so the fused
    kernels apply. The value term needs the attention weights, so with RPE on values the softmax is
    explicit. ``reference = True`` switches every term to the plain per-pair formulas (for tests).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        rpe_config: RPEConfig | dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.rpe_config = RPEConfig.from_any(rpe_config)
        self.reference = False
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.rpe_q, self.rpe_k, self.rpe_v = build_rpe(self.rpe_config, self.num_heads, self.head_dim)

    def _grid(self, num_tokens: int, grid_size: tuple[int, int] | None) -> tuple[int, int]:
        skip = self.rpe_config.skip
        if grid_size is None:  # square grid, as the released code assumes
            side = math.isqrt(num_tokens - skip)
            grid_size = (side, side)
        height, width = grid_size
        if height * width + skip != num_tokens:
            raise ValueError(
                f"RPEAttention: {num_tokens} tokens do not match a {height}x{width} grid with "
                f"{skip} leading token(s) (rpe_config.skip); pass grid_size or fix skip"
            )
        return int(height), int(width)

    def _project(self, x: Tensor, grid_size: tuple[int, int] | None) -> tuple[Tensor, ...]:
        """Scaled queries, keys, values (B, H, n, d), the summed q/k RPE logit term (or None) and the grid."""
        batch, num_tokens, _ = x.shape
        height, width = self._grid(num_tokens, grid_size)
        qkv = self.qkv(x).reshape(batch, num_tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = q * self.scale
        bias = None
        if self.rpe_k is not None:
            bias = self.rpe_k.attn_bias(q, height, width, self.reference)
        if self.rpe_q is not None:
            term = self.rpe_q.attn_bias(k * self.scale, height, width, self.reference)
            bias = term if bias is None else bias + term
        return q, k, v, bias, (height, width)

    @staticmethod
    def _softmax(q: Tensor, k: Tensor, bias: Tensor | None) -> Tensor:
        logits = q @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        return logits.softmax(dim=-1)

    def _use_sdpa(self, q: Tensor, bias: Tensor | None) -> bool:
        """Whether ``scaled_dot_product_attention`` computes this layer (otherwise an explicit softmax).

        The value term needs the attention weights, and the reference path is explicit by design.
        On the CPU, SDPA has no fused backward for a float mask that needs a gradient: it falls back
        to its math kernel, which measures slower than the explicit softmax (benchmarks/backbones.py),
        so CPU training with q/k RPE is explicit; CPU inference and CUDA keep the fused kernels.
        """
        if self.reference or self.rpe_v is not None:
            return False
        return q.is_cuda or bias is None or not (torch.is_grad_enabled() and bias.requires_grad)

    @torch.no_grad()
    def attention_weights(self, x: Tensor, grid_size: tuple[int, int] | None = None) -> Tensor:
        """Attention probabilities (B, H, n, n) for input tokens ``x`` (what the visualiser draws)."""
        q, k, _, bias, _ = self._project(x, grid_size)
        return self._softmax(q, k, bias)

    def forward(self, x: Tensor, grid_size: tuple[int, int] | None = None) -> Tensor:
        batch, num_tokens, dim = x.shape
        q, k, v, bias, (height, width) = self._project(x, grid_size)
        if self._use_sdpa(q, bias):
            if bias is not None:
                bias = bias.to(q.dtype)
            dropout = self.attn_drop.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=1.0)
        else:
            attn = self.attn_drop(self._softmax(q, k, bias))
            out = attn @ v
            if self.rpe_v is not None:
                out = out + self.rpe_v.value_term(attn, height, width, self.reference).to(out.dtype)

        out = out.transpose(1, 2).reshape(batch, num_tokens, dim)
        return self.proj_drop(self.proj(out))
