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

import math
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from functools import partialmethod
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from timm.layers.attention import resolve_self_attn_mask
from torch import Tensor, nn

from . import flex

__all__ = [
    "RPEConfig",
    "RPE_PRESETS",
    "piecewise_index",
    "clip_index",
    "num_buckets",
    "bucket_ids",
    "ImageRPE",
    "CrossImageRPE",
    "build_rpe",
    "spread_over_pairs",
    "sum_per_bucket",
    "logit_term",
    "value_term",
    "RPEAttention",
    "rpe_attention_layer",
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
    def from_any(cls, config: RPEConfig | dict[str, Any] | str | None) -> RPEConfig:
        """Accept a config, a plain dict (from YAML or a Hub config.json), a name of ``RPE_PRESETS`` or
        None (the official default)."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if isinstance(config, str):
            if config not in RPE_PRESETS:
                raise ValueError(f"rpe_config={config!r}: expected a dict or a preset name, one of {', '.join(RPE_PRESETS)}")
            return RPE_PRESETS[config]
        if isinstance(config, dict):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(config) - known)
            if unknown:
                raise ValueError(f"rpe_config: unknown key(s) {unknown}; expected some of {sorted(known)}")
            return cls(**config)
        raise TypeError(f"rpe_config: expected an RPEConfig, a dict, a preset name or None, got {type(config).__name__}")


# The earlier relative position encodings as the iRPE paper compares them (Tab. 5; supplementary,
# section 4): the 1D methods of Shaw et al., Transformer-XL and Huang et al. adapted to 2D by the
# product method with the clip function h(x) in place of g(x), one table shared by all heads; SASA's
# 2D encoding (row and column offsets, each its own table) on keys. ratio 1.9 (h clips offsets at
# +-int(3.8) = 3) gives the 7 x 7 + 1 = 50 buckets of the iRPE product models; ratio 6.5 (clip at 13)
# gives SASA every offset of a 14 x 14 grid. docs/rpe_presets.md says what each one keeps and drops.
RPE_PRESETS: dict[str, RPEConfig] = {
    "shaw": RPEConfig("product", "ctx", 1.9, "kv", index="clip"),
    "transformer_xl": RPEConfig("product", "ctx", 1.9, "k", index="clip"),
    "huang": RPEConfig("product", "ctx", 1.9, "qk", index="clip"),
    "sasa": RPEConfig("cross", "ctx", 6.5, "k", index="clip"),
}


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


def _grid_offsets(height: int, width: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Row and column offsets p_i - p_j for every pair of grid positions (row-major), each (n, n)."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    return rows[:, None] - rows[None, :], cols[:, None] - cols[None, :]


def _scaled_offset(offset: Tensor, size: int, trained: int) -> Tensor:
    """``offset`` on a grid of ``size`` in units of a grid of ``trained`` patches: the nearest offset
    (half to even) the trained grid has, so every pair gets a bucket that grid trained."""
    nearest = (offset * trained).double().div(size).round()
    return nearest.clamp(1 - trained, trained - 1).long()


def bucket_ids(
    method: str, height: int, width: int, config: RPEConfig, device: torch.device | None = None
) -> Tensor:
    """Bucket of every (query, key) pair, (skip + h*w) x (skip + h*w).

    Pairs that involve one of the first ``skip`` tokens use the last bucket of the table. Under
    ``config.resize == "scale"`` offsets are first measured in units of ``config.trained_grid``.
    Plain tensor code: ``ImageRPE`` keeps the ids of its built grid in a buffer and calls this for
    other grids, which ``torch.compile`` and ``torch.export`` trace like any other op.
    """
    dr, dc = _grid_offsets(height, width, device)
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
        ids = F.pad(ids, (config.skip, 0, config.skip, 0), value=num_buckets(method, config) - 1)
    return ids


# Bucket ids of built grids, by (method, grid, config, device, inference mode), while a module holds them.
_BUILT_GRID_IDS: weakref.WeakValueDictionary[tuple, Tensor] = weakref.WeakValueDictionary()


def _built_grid_ids(method: str, grid_size: tuple[int, int], config: RPEConfig, device: torch.device) -> Tensor:
    """``bucket_ids`` of a grid a module is built for, one tensor for every table that asks for the same
    ids: the q, k and v tables of every layer of a model then hold one (n, n) tensor between them, not
    one each (36 for DeiT-S with RPE on q, k and v: 11 MB, 4% of its inference memory at batch 32)."""
    key = (method, grid_size, config, torch.device(device), torch.is_inference_mode_enabled())
    ids = _BUILT_GRID_IDS.get(key)
    if ids is None:
        ids = bucket_ids(method, *grid_size, config, device)
        _BUILT_GRID_IDS[key] = ids
    return ids


# --------------------------------------------------------------------------------------------------
# Per-table terms: plain functions of tensors (the modules and the autograd function share them)
# --------------------------------------------------------------------------------------------------


def spread_over_pairs(per_bucket: Tensor, ids: Tensor) -> Tensor:
    """Per-row bucket values (..., n, K) spread over the pairs: out[..., i, j] = per_bucket[..., i, ids[i, j]]."""
    return per_bucket.gather(-1, ids.expand(per_bucket.shape[:-1] + ids.shape[-1:]))


def sum_per_bucket(per_pair: Tensor, ids: Tensor, num_buckets: int) -> Tensor:
    """Per-pair values (..., n, n) summed per bucket of each row, (..., n, K): the adjoint of
    ``spread_over_pairs``."""
    out = per_pair.new_zeros(per_pair.shape[:-1] + (num_buckets,))
    return out.scatter_add_(-1, ids.expand(per_pair.shape), per_pair)


def logit_term(x: Tensor, table: Tensor, ids: Tensor, mode: str, on: str, scale: float) -> Tensor:
    """The logit term of one q/k table, (..., H, n, n) in the logits' orientation.

    ``x`` is (..., H, n, d): the queries for a table on keys, the keys for a table on queries;
    ``scale`` is the attention scale the released code applies to them first. Both placements compute
    term[i, j] = x_i . r_{b(i, j)} (contextual; the table entry in bias mode); on queries the term
    at (i, j) reads the key's row, k_j . r_{b(j, i)}, which is that term transposed. The contextual
    form multiplies by the table first and gathers by bucket: no n x n x d tensor.
    """
    if mode == "bias":
        per_bucket = table[:, None, :].expand(-1, x.shape[-2], -1)
    else:
        table = table.to(x.dtype)  # matched batch dims: a strided x is not copied
        per_bucket = torch.matmul(x, table.expand(x.shape[:-2] + table.shape[-2:])).mul_(scale)
    term = spread_over_pairs(per_bucket, ids)
    return term if on == "k" else term.transpose(-1, -2)


def logit_term_backward(
    x: Tensor, grad_logits: Tensor, table: Tensor, ids: Tensor, mode: str, on: str, scale: float
) -> tuple[Tensor | None, Tensor]:
    """Gradients of ``logit_term`` given the gradient of the logits: that of ``x`` (None in bias mode,
    where the term does not depend on it) and that of the table."""
    grad_term = grad_logits if on == "k" else grad_logits.transpose(-1, -2)
    grad_buckets = sum_per_bucket(grad_term, ids, table.shape[-1])  # (..., H, n, K)
    if mode == "bias":
        return None, grad_buckets.sum(-2).sum_to_size(table.shape)
    table = table.to(x.dtype)  # (H or 1, d, K)
    grad_x = (grad_buckets @ table.transpose(-1, -2)).mul_(scale)
    return grad_x, (x.transpose(-1, -2) @ grad_buckets).mul_(scale).sum_to_size(table.shape)


def value_term(attn: Tensor, table: Tensor, ids: Tensor) -> Tensor:
    """sum_j a_ij r_{b(i,j)} for (..., H, n, n) attention weights and a (H or 1, K, d) table, as
    (..., H, n, d): per-bucket sums of each attention row times the table."""
    return sum_per_bucket(attn, ids, table.shape[-2]) @ table.to(attn.dtype)


def value_term_backward(attn: Tensor, grad_out: Tensor, table: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of ``value_term`` given the gradient of its output: that of the attention weights
    (per pair) and that of the table."""
    table_t = table.to(grad_out.dtype).transpose(-1, -2)
    grad_attn = spread_over_pairs(grad_out @ table_t, ids)
    grad_table = (sum_per_bucket(attn, ids, table.shape[-2]).transpose(-1, -2) @ grad_out).sum_to_size(table.shape)
    return grad_attn, grad_table


# --------------------------------------------------------------------------------------------------
# RPE modules
# --------------------------------------------------------------------------------------------------


class ImageRPE(nn.Module):
    """One iRPE table for queries, keys or values, with the efficient and the plain (reference) forms.

    For keys, ``attn_bias(q)`` gives q_i . r_{b(i,j)} (q already scaled by 1/sqrt(d)); for queries,
    ``attn_bias(k)`` gives k_j . r_{b(j,i)}; for values, ``value_term(attn)`` gives
    sum_j a_ij r_{b(i,j)}. The efficient forms are the module-level ``logit_term`` and ``value_term``;
    the plain per-pair forms (``reference_logit_term``, ``reference_value_term``) serve tests and TorchScript.
    """

    __jit_unused_properties__ = ["table", "tables"]  # TorchScript reads the tables by name

    def __init__(
        self,
        method: str,
        on: str,
        num_heads: int,
        head_dim: int,
        config: RPEConfig,
        grid_size: tuple[int, int] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
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
        dd = dict(device=device, dtype=dtype)
        if self.mode == "bias":
            self.lookup_table_bias = nn.Parameter(torch.zeros(table_heads, self.num_buckets, **dd))
        elif on == "v":
            self.lookup_table_weight = nn.Parameter(torch.zeros(table_heads, self.num_buckets, head_dim, **dd))
        else:
            self.lookup_table_weight = nn.Parameter(torch.zeros(table_heads, head_dim, self.num_buckets, **dd))
        self.grid_size: tuple[int, int] | None = None
        self.register_buffer("bucket_index", None, persistent=False)
        self._other_grid_key: tuple | None = None
        self._other_grid_ids: Tensor | None = None
        if grid_size is not None:
            self.set_grid_size(grid_size)

    def set_grid_size(self, grid_size: tuple[int, int]) -> None:
        """Build the bucket ids of ``grid_size`` into the non-persistent ``bucket_index`` buffer (as
        timm's Swin builds its relative position index); call again after a grid or config change."""
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.bucket_index = _built_grid_ids(self.method, self.grid_size, self.config, self.table.device)

    def extra_repr(self) -> str:
        return f"method={self.method}, on={self.on}, mode={self.mode}, buckets={self.num_buckets}"

    @property
    def table(self) -> nn.Parameter:
        return self.lookup_table_bias if self.mode == "bias" else self.lookup_table_weight

    @property
    def tables(self) -> tuple[ImageRPE, ...]:
        """The single-table modules this encoding sums (itself; the cross method has two)."""
        return (self,)

    def bucket_ids(self, height: int, width: int, device: torch.device) -> Tensor:
        """The buffer for the built grid; for another grid (dynamic sizes), the ids computed anew.

        Traced graphs (compile, export) compute them inside the graph; eager calls keep the last other
        grid's ids, since one forward asks for them once per image and table.
        """
        if (height, width) == self.grid_size:
            return self.bucket_index
        if torch.jit.is_scripting():
            raise RuntimeError(
                f"TorchScript: iRPE bucket ids exist for the built {self.grid_size} grid only, not {height}x{width}; "
                "script a model built for that input size (img_size=...)"
            )
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return bucket_ids(self.method, height, width, self.config, device)
        key = (height, width, torch.device(device), self.config, torch.is_inference_mode_enabled())
        if self._other_grid_key != key:
            self._other_grid_ids = bucket_ids(self.method, height, width, self.config, device)
            self._other_grid_key = key
        return self._other_grid_ids

    def pairs(self, per_bucket: Tensor, height: int, width: int) -> Tensor:
        """``spread_over_pairs`` with this table's bucket ids on an h x w grid."""
        return spread_over_pairs(per_bucket, self.bucket_ids(height, width, per_bucket.device))

    def bucket_sums(self, per_pair: Tensor, height: int, width: int) -> Tensor:
        """``sum_per_bucket`` with this table's bucket ids on an h x w grid."""
        return sum_per_bucket(per_pair, self.bucket_ids(height, width, per_pair.device), self.num_buckets)

    def attn_bias(self, x: Tensor, height: int, width: int, reference: bool = False, scale: float = 1.0) -> Tensor:
        """Logit term for q or k placement (``logit_term``); ``reference`` uses the plain per-pair formula."""
        ids = self.bucket_ids(height, width, x.device)
        if reference or torch.jit.is_scripting():
            return self.reference_logit_term(x, ids, scale)
        return logit_term(x, self.table, ids, self.mode, self.on, scale)

    def value_term(self, attn: Tensor, height: int, width: int, reference: bool = False) -> Tensor:
        """sum_j a_ij r_{b(i,j)} for (B, H, n, n) attention weights, as (B, H, n, d)."""
        ids = self.bucket_ids(height, width, attn.device)
        if reference or torch.jit.is_scripting():
            return self.reference_value_term(attn, ids)
        return value_term(attn, self.lookup_table_weight, ids)

    def reference_logit_term(self, x: Tensor, ids: Tensor, scale: float) -> Tensor:
        """``logit_term`` by the plain per-pair formula: the table entry of every pair (bias), or
        x_i . r_{b(i,j)} through an (H, d, n, n) gather of the table (contextual)."""
        if hasattr(self, "lookup_table_bias"):  # bias mode (a static check under TorchScript)
            term = self.lookup_table_bias[:, ids]  # (H or 1, n, n)
        else:
            per_pair = self.lookup_table_weight[:, :, ids].expand(self.num_heads, -1, -1, -1)  # (H, d, n, n)
            term = torch.einsum("bhid,hdij->bhij", x * scale, per_pair)
        return term if self.on == "k" else term.transpose(-1, -2)

    def reference_value_term(self, attn: Tensor, ids: Tensor) -> Tensor:
        """``value_term`` by the plain per-pair formula, through an (H, n, n, d) gather of the table."""
        per_pair = self.lookup_table_weight[:, ids].expand(self.num_heads, -1, -1, -1)  # (H, n, n, d)
        return torch.einsum("bhij,hijd->bhid", attn, per_pair)


class CrossImageRPE(nn.Module):
    """The cross method: one table along rows and one along columns, whose encodings add."""

    __jit_unused_properties__ = ["tables"]

    def __init__(
        self,
        on: str,
        num_heads: int,
        head_dim: int,
        config: RPEConfig,
        grid_size: tuple[int, int] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.rp_rows = ImageRPE("cross_rows", on, num_heads, head_dim, config, grid_size, device, dtype)
        self.rp_cols = ImageRPE("cross_cols", on, num_heads, head_dim, config, grid_size, device, dtype)

    def attn_bias(self, x: Tensor, height: int, width: int, reference: bool = False, scale: float = 1.0) -> Tensor:
        rows = self.rp_rows.attn_bias(x, height, width, reference, scale)
        return rows + self.rp_cols.attn_bias(x, height, width, reference, scale)

    def value_term(self, attn: Tensor, height: int, width: int, reference: bool = False) -> Tensor:
        return self.rp_rows.value_term(attn, height, width, reference) + self.rp_cols.value_term(
            attn, height, width, reference
        )

    @property
    def tables(self) -> tuple[ImageRPE, ...]:
        return (self.rp_rows, self.rp_cols)


def build_rpe(
    config: RPEConfig,
    num_heads: int,
    head_dim: int,
    grid_size: tuple[int, int] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[nn.Module | None, ...]:
    """The (rpe_q, rpe_k, rpe_v) modules of one attention layer; None where the config has no RPE."""

    def build(on: str) -> nn.Module | None:
        if on not in config.rpe_on:
            return None
        if config.method == "cross":
            return CrossImageRPE(on, num_heads, head_dim, config, grid_size, device, dtype)
        return ImageRPE(config.method, on, num_heads, head_dim, config, grid_size, device, dtype)

    return build("q"), build("k"), build("v")


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------

# (on, mode) of each table an attention layer passes to ``_RecomputedAttention``: q/k tables first.
TableSpec = tuple[tuple[str, str], ...]


def _split_heads(qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys and values (B, H, n, d), as views of the projection's (B, n, 3, H, d) output."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def _qk_logit_term(
    q: Tensor, k: Tensor, specs: TableSpec, tables: tuple[Tensor, ...], ids: tuple[Tensor, ...], scale: float
) -> Tensor | None:
    """The summed logit terms of the q/k tables, or None without any."""
    total = None
    for (on, mode), table, table_ids in zip(specs, tables, ids, strict=True):
        if on == "v":
            continue
        term = logit_term(q if on == "k" else k, table, table_ids, mode, on, scale)
        if total is None:
            total = term
        else:  # both are new tensors: sum in place, into the contiguous one (a query term is a transposed view)
            total = term.add_(total) if term.is_contiguous() and term.shape == total.shape else total.add_(term)
    return total


def _attention_per_image(
    q: Tensor, k: Tensor, scale: float, specs: TableSpec, tables: tuple[Tensor, ...], ids: tuple[Tensor, ...]
) -> Iterator[tuple[int, Tensor]]:
    """Each image's attention weights (H, n, n) from (B, H, n, d) queries and keys; per image, the
    RPE logit term stays in cache for the ``baddbmm`` that adds the scaled scores to it."""
    batch, heads, num_tokens, _ = q.shape
    shape = (heads, num_tokens, num_tokens)
    for i in range(batch):
        bias = _qk_logit_term(q[i], k[i], specs, tables, ids, scale)
        if bias is None:
            logits = torch.bmm(q[i], k[i].transpose(-2, -1)).mul_(scale)
        elif bias.shape == shape and bias.is_contiguous():  # a new tensor: the scores add into it
            logits = bias.baddbmm_(q[i], k[i].transpose(-2, -1), alpha=scale)
        else:  # a bias shared by the heads, or a transposed query term
            logits = torch.baddbmm(bias.expand(shape), q[i], k[i].transpose(-2, -1), alpha=scale)
        yield i, torch.softmax(logits, dim=-1, out=logits)  # in place: one n x n block per image


class _RecomputedAttention(torch.autograd.Function):
    """Attention with iRPE that saves no n x n tensor: flash-style recomputation on the CPU.

    Inputs: the projection's output (B, n, 3, H, d) as it is, the attention scale, the (on, mode) of
    every table (q/k tables first, then v tables), then the tables, then their bucket ids (n, n).
    Returns the attention output as (B, n, H * d), the layout the output projection reads, so
    neither direction copies q, k, v or their gradients. Both directions compute the attention
    weights one image at a time, so each n x n block stays in cache: a whole batch's logit terms
    as one (B, H, n, n) mask for the fused kernel made DeiT-S's layer at batch 16 2% slower with a
    key table and 9% with query and key tables (the gather wrote 15 MB a term, read back by the
    kernel). Forward saves the projection output, the attention output (which the output projection
    keeps anyway) and the tables. Backward recomputes the weights and takes each table's gradient
    through ``sum_per_bucket`` (the adjoint of the gather that built its term).
    """

    @staticmethod
    def forward(ctx: Any, qkv: Tensor, scale: float, specs: TableSpec, *tables_and_ids: Tensor) -> Tensor:
        tables, ids = tables_and_ids[: len(specs)], tables_and_ids[len(specs) :]
        batch, num_tokens, _, heads, head_dim = qkv.shape
        q, k, v = _split_heads(qkv)
        value_tables = [t for t, (on, _) in enumerate(specs) if on == "v"]
        out = q.new_empty(batch, num_tokens, heads, head_dim)
        for i, attn in _attention_per_image(q, k, scale, specs, tables, ids):
            if value_tables:
                values = sum(value_term(attn, tables[t], ids[t]) for t in value_tables)
                out[i] = torch.baddbmm(values, attn, v[i]).transpose(0, 1)
            else:
                out[i] = torch.bmm(attn, v[i]).transpose(0, 1)
        out = out.view(batch, num_tokens, heads * head_dim)
        ctx.scale, ctx.specs = scale, specs
        ctx.save_for_backward(qkv, out, *tables, *ids)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        scale, specs = ctx.scale, ctx.specs
        qkv, out, *saved = ctx.saved_tensors
        tables, ids = tuple(saved[: len(specs)]), tuple(saved[len(specs) :])
        batch, num_tokens, _, heads, head_dim = qkv.shape
        q, k, v = _split_heads(qkv)
        grad_qkv = torch.empty_like(qkv)
        grad_q, grad_k, grad_v = _split_heads(grad_qkv)
        grad_out = grad_out.reshape(batch, num_tokens, heads, head_dim)
        # softmax backward: dS = P (dP - D) with D_i = sum_j P_ij dP_ij = dO_i . O_i (as flash attention does)
        row_dot = (grad_out * out.view_as(grad_out)).sum(-1).transpose(1, 2).unsqueeze(-1)  # (B, H, n, 1)
        grad_out = grad_out.transpose(1, 2)  # (B, H, n, d)
        grad_tables: list[Tensor | None] = [None] * len(specs)
        for i, attn in _attention_per_image(q, k, scale, specs, tables, ids):
            grad_out_i = grad_out[i]
            grad_v[i] = torch.bmm(attn.transpose(-2, -1), grad_out_i)
            grad_attn = torch.bmm(grad_out_i, v[i].transpose(-2, -1))
            image_grads: list[Tensor] = []
            for (on, _), table, table_ids in zip(specs, tables, ids, strict=True):
                if on == "v":
                    grad_attn_v, grad_table = value_term_backward(attn, grad_out_i, table, table_ids)
                    grad_attn += grad_attn_v
                    image_grads.append(grad_table)
            grad_logits = grad_attn.sub_(row_dot[i]).mul_(attn)
            # beta=0: baddbmm scales the product in place and ignores its first argument
            grad_q_i = torch.baddbmm(q[i], grad_logits, k[i], beta=0.0, alpha=scale)
            grad_k_i = torch.baddbmm(k[i], grad_logits.transpose(-2, -1), q[i], beta=0.0, alpha=scale)
            qk_grads: list[Tensor] = []
            for (on, mode), table, table_ids in zip(specs, tables, ids, strict=True):
                if on == "v":
                    continue
                x, grad_x = (q[i], grad_q_i) if on == "k" else (k[i], grad_k_i)
                grad_extra, grad_table = logit_term_backward(x, grad_logits, table, table_ids, mode, on, scale)
                if grad_extra is not None:
                    grad_x += grad_extra
                qk_grads.append(grad_table)
            grad_q[i], grad_k[i] = grad_q_i, grad_k_i
            for t, grad in enumerate(qk_grads + image_grads):  # a table's gradient sums over the images
                grad_tables[t] = grad if grad_tables[t] is None else grad_tables[t].add_(grad)
        return (grad_qkv, None, None, *grad_tables, *([None] * len(ids)))


@register_notrace_module  # FX: a leaf (the grid check and the choice of path are Python control flow)
class RPEAttention(nn.Module):
    """Multi-head self-attention with iRPE on queries, keys and/or values.

    Plugs into timm's blocks as timm plugs attention (``attn_layer=partial(RPEAttention,
    rpe_config=..., grid_size=...)``) and takes timm ``Attention``'s arguments (``attn_head_dim``,
    ``dim_out``, ``qkv_bias``, ``qk_norm``, ``scale_norm``, ``proj_bias``, ``gated``, dropouts,
    ``norm_layer``, ``device``, ``dtype``) with the same meaning. ``grid_size`` is the patch grid
    whose bucket ids are built into buffers; ``forward`` takes the grid of its input (a plain timm
    block passes none: the built grid is used, and the token count must match it).

    Query/key terms enter ``scaled_dot_product_attention`` as an additive float mask, so the fused
    kernels apply on CUDA and in CPU inference. CPU training (eager) recomputes the attention in
    backward instead of saving it (``_RecomputedAttention``), so RPE costs almost no memory.
    ``reference = True`` switches every term to the plain per-pair formulas (for tests). Layers
    without RPE on values use FlexAttention on CUDA, and in CPU inference when
    ``cpu_flex_inference`` is set (``finetune.backbones.flex``).
    """

    cpu_flex_inference = False

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        attn_head_dim: int | None = None,
        dim_out: int | None = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        gated: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        rpe_config: RPEConfig | dict[str, Any] | None = None,
        grid_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if attn_head_dim is None:
            if dim % num_heads:
                raise ValueError(f"RPEAttention: dim={dim} must be divisible by num_heads={num_heads} (or pass attn_head_dim)")
            attn_head_dim = dim // num_heads
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("RPEAttention: qk_norm=True or scale_norm=True needs norm_layer (e.g. nn.LayerNorm)")
        self.num_heads = num_heads
        self.head_dim = attn_head_dim
        self.attn_dim = num_heads * attn_head_dim
        self.scale = self.head_dim**-0.5
        self.rpe_config = RPEConfig.from_any(rpe_config)
        self.skip = self.rpe_config.skip  # the config object is Python-only (TorchScript reads this)
        self.reference = False
        self.qk_norm = qk_norm
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out or dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.grid_size = None if grid_size is None else (int(grid_size[0]), int(grid_size[1]))
        self.rpe_q, self.rpe_k, self.rpe_v = build_rpe(
            self.rpe_config, self.num_heads, self.head_dim, self.grid_size, **dd
        )

    def set_grid_size(self, grid_size: tuple[int, int]) -> None:
        """The patch grid this layer is built for: its bucket ids are kept in buffers."""
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        for table in self.rpe_modules():
            table.set_grid_size(self.grid_size)

    def rpe_modules(self) -> list[ImageRPE]:
        """The single-table RPE modules, those on queries and keys first, then those on values."""
        return [table for rpe in (self.rpe_q, self.rpe_k, self.rpe_v) if rpe is not None for table in rpe.tables]

    def _grid(self, num_tokens: int, grid_size: tuple[int, int] | None) -> tuple[int, int]:
        skip = self.skip
        if grid_size is None:
            grid_size = self.grid_size
        if grid_size is None:
            raise ValueError(
                "RPEAttention: no patch grid; pass grid_size to forward or build the layer with grid_size=(rows, cols)"
            )
        height, width = grid_size
        if height * width + skip != num_tokens:
            raise ValueError(
                f"RPEAttention: {num_tokens} tokens do not match a {height}x{width} grid with "
                f"{skip} leading token(s) (rpe_config.skip); pass grid_size or fix skip"
            )
        return int(height), int(width)

    def _qkv(self, x: Tensor, grid_size: tuple[int, int] | None) -> tuple[Tensor, tuple[int, int]]:
        """The projection's output as (B, n, 3, H, d) (q and k normalised under ``qk_norm``) and the
        grid. Queries stay unscaled: the logits are scaled in place instead, which saves a (B, H, n, d)
        activation."""
        batch, num_tokens, _ = x.shape
        grid = self._grid(num_tokens, grid_size)
        qkv = self.qkv(x).reshape(batch, num_tokens, 3, self.num_heads, self.head_dim)
        if self.qk_norm:
            q, k, v = qkv.unbind(2)
            qkv = torch.stack([self.q_norm(q), self.k_norm(k), v], dim=2)
        return qkv, grid

    def _logit_bias(self, q: Tensor, k: Tensor, grid: tuple[int, int]) -> Tensor | None:
        """The summed q/k RPE logit term, or None without RPE on q and k."""
        bias = None
        if self.rpe_k is not None:
            bias = self.rpe_k.attn_bias(q, *grid, self.reference, self.scale)
        if self.rpe_q is not None:
            term = self.rpe_q.attn_bias(k, *grid, self.reference, self.scale)
            bias = term if bias is None else bias.add_(term)  # the key term is a new tensor: add in place
        return bias

    def _logits(self, q: Tensor, k: Tensor, grid: tuple[int, int]) -> Tensor:
        logits = (q @ k.transpose(-2, -1)).mul_(self.scale)  # in place: matmul does not save its output
        bias = self._logit_bias(q, k, grid)
        return logits if bias is None else logits.add_(bias)

    def _path(self, q: Tensor, masked: bool) -> str:
        """How this call computes attention: ``flex``, ``sdpa``, ``recompute`` or ``explicit``.

        The value term needs the attention weights and the reference path is explicit by design.
        On the CPU, SDPA has no fused backward for a float mask that needs a gradient (it falls back
        to its math kernel, slower than an explicit softmax), so eager CPU training recomputes the
        attention in backward; compiled graphs leave memory planning to the compiler. Eager CPU
        inference with a value term takes the same per-image loop (forward only), so no batch-sized
        n x n tensor is built there either.
        """
        has_qk_rpe = self.rpe_q is not None or self.rpe_k is not None
        training_grad = torch.is_grad_enabled() and q.requires_grad
        if self.reference:
            return "explicit"
        if self.rpe_v is None and has_qk_rpe and not masked and flex.usable(self, q, training_grad):
            return "flex"
        if self.rpe_v is None and (q.is_cuda or not has_qk_rpe or not training_grad):
            return "sdpa"
        no_dropout = self.attn_drop.p == 0 or not self.training
        eager_full_precision_cpu = not (q.is_cuda or q.dtype in (torch.float16, torch.bfloat16) or torch.compiler.is_compiling())
        if no_dropout and eager_full_precision_cpu and not masked:
            return "recompute"
        return "explicit"

    @torch.no_grad()
    def attention_weights(
        self,
        x: Tensor,
        grid_size: tuple[int, int] | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        """Attention probabilities (B, H, n, n) for the inputs of a ``forward`` call (what the visualiser draws)."""
        qkv, grid = self._qkv(x, grid_size)
        q, k, _ = _split_heads(qkv)
        logits = self._logits(q, k, grid)
        mask = resolve_self_attn_mask(x.shape[1], logits, attn_mask, is_causal)
        return (logits if mask is None else logits + mask).softmax(dim=-1)

    def forward(
        self,
        x: Tensor,
        grid_size: tuple[int, int] | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        """Attention over ``x`` (B, n, C) on the patch grid ``grid_size`` (None: the built grid);
        ``attn_mask`` (bool or additive) and ``is_causal`` as in timm's ``Attention``."""
        if torch.jit.is_scripting():  # the paths below are eager / compile only
            return self._scripted_forward(x, grid_size, attn_mask, is_causal)
        batch, num_tokens, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv, grid = self._qkv(x, grid_size)
        q, k, v = _split_heads(qkv)
        mask = resolve_self_attn_mask(num_tokens, q, attn_mask, is_causal)
        path = self._path(q, mask is not None)
        if path == "recompute":
            tables = self.rpe_modules()
            specs = tuple((table.on, table.mode) for table in tables)
            ids = [table.bucket_ids(*grid, x.device) for table in tables]
            out = _RecomputedAttention.apply(qkv, self.scale, specs, *[t.table for t in tables], *ids)
        elif path == "flex":
            out = flex.attend(q, k, v, flex.rpe_score_mod(self, q, k, grid), self.scale)
            out = out.transpose(1, 2).reshape(batch, num_tokens, self.attn_dim)
        else:
            bias = self._logit_bias(q, k, grid)
            if mask is not None:
                bias = mask if bias is None else bias + mask
            if path == "sdpa":
                dropout = self.attn_drop.p if self.training else 0.0
                mask = None if bias is None else bias.to(q.dtype)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.scale)
            else:
                logits = (q @ k.transpose(-2, -1)).mul_(self.scale)
                attn = self.attn_drop((logits if bias is None else logits.add_(bias)).softmax(dim=-1))
                out = attn @ v
                if self.rpe_v is not None:
                    out = out + self.rpe_v.value_term(attn, *grid, self.reference).to(out.dtype)
            out = out.transpose(1, 2).reshape(batch, num_tokens, self.attn_dim)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))

    def _scripted_forward(
        self, x: Tensor, grid_size: tuple[int, int] | None, attn_mask: Tensor | None, is_causal: bool
    ) -> Tensor:
        """TorchScript's forward: the plain formulas (explicit softmax, per-pair RPE terms) on the built grid."""
        batch, num_tokens, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv, grid = self._qkv(x, grid_size)
        q, k, v = _split_heads(qkv)
        logits = self._logits(q, k, grid)
        mask = resolve_self_attn_mask(num_tokens, q, attn_mask, is_causal)
        attn = self.attn_drop((logits if mask is None else logits + mask).softmax(dim=-1))
        out = attn @ v
        if self.rpe_v is not None:
            out = out + self.rpe_v.value_term(attn, grid[0], grid[1], True)
        out = self.norm(out.transpose(1, 2).reshape(batch, num_tokens, self.attn_dim))
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))


def rpe_attention_layer(
    rpe_config: RPEConfig | dict[str, Any] | None = None, grid_size: tuple[int, int] | None = None
) -> type[RPEAttention]:
    """``RPEAttention`` with ``rpe_config`` and ``grid_size`` bound, for timm's ``attn_layer=``.

    This is ``functools.partial(RPEAttention, rpe_config=..., grid_size=...)`` as a class: timm's
    ``Block`` checks its ``attn_layer`` with ``issubclass``, which a partial does not pass. Every
    other argument comes from the block, as for timm's own ``Attention``.
    """
    config = RPEConfig.from_any(rpe_config)
    init = partialmethod(RPEAttention.__init__, rpe_config=config, grid_size=grid_size)
    return type("RPEAttention", (RPEAttention,), {"__init__": init, "__module__": __name__, "__doc__": RPEAttention.__doc__})
