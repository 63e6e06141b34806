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
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import flex

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
        self,
        method: str,
        on: str,
        num_heads: int,
        head_dim: int,
        config: RPEConfig,
        grid_size: tuple[int, int] | None = None,
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
        self.grid_size: tuple[int, int] | None = None
        self.register_buffer("bucket_index", None, persistent=False)
        if grid_size is not None:
            self.set_grid_size(grid_size)

    def set_grid_size(self, grid_size: tuple[int, int]) -> None:
        """Build the bucket ids of ``grid_size`` into the non-persistent ``bucket_index`` buffer (as
        timm's Swin builds its relative position index); call again after a grid or config change."""
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.bucket_index = bucket_ids(self.method, *self.grid_size, self.config, self.table.device)

    def extra_repr(self) -> str:
        return f"method={self.method}, on={self.on}, mode={self.mode}, buckets={self.num_buckets}"

    @property
    def table(self) -> nn.Parameter:
        return self.lookup_table_bias if self.mode == "bias" else self.lookup_table_weight

    @property
    def leaves(self) -> tuple[ImageRPE, ...]:
        """The single-table modules this encoding sums (itself; the cross method has two)."""
        return (self,)

    def bucket_ids(self, height: int, width: int, device: torch.device) -> Tensor:
        """The buffer for the built grid; for another grid (dynamic sizes), the ids computed anew."""
        if (height, width) == self.grid_size:
            return self.bucket_index
        return bucket_ids(self.method, height, width, self.config, device)

    def pairs(self, per_bucket: Tensor, height: int, width: int) -> Tensor:
        """Per-row bucket values (..., n, K) spread over the pairs: out[..., i, j] = per_bucket[..., i, b(i, j)]."""
        ids = self.bucket_ids(height, width, per_bucket.device)
        return per_bucket.gather(-1, ids.expand(per_bucket.shape[:-1] + ids.shape[-1:]))

    def bucket_sums(self, pairs: Tensor, height: int, width: int, out: Tensor | None = None) -> Tensor:
        """Per-pair values (..., n, n) summed per bucket of each row, (..., n, K): the adjoint of
        ``pairs``. Adds into ``out`` when given."""
        ids = self.bucket_ids(height, width, pairs.device)
        out = pairs.new_zeros(pairs.shape[:-1] + (self.num_buckets,)) if out is None else out
        return out.scatter_add_(-1, ids.expand(pairs.shape), pairs)

    def attn_bias(self, x: Tensor, height: int, width: int, reference: bool = False, scale: float = 1.0) -> Tensor:
        """Logit term for q or k placement; ``x`` is (B, H, n, d) queries (on k) or keys (on q), and
        ``scale`` the attention scale 1/sqrt(d) that the released code applies to them first.

        Both placements compute term[i, j] = x_i . r_{b(i, j)}; on queries the term at (i, j) reads
        the key's row, k_j . r_{b(j, i)}, which is that term transposed.
        """
        if reference and self.mode == "ctx":
            ids = self.bucket_ids(height, width, x.device)
            per_pair = self.lookup_table_weight[:, :, ids].expand(self.num_heads, -1, -1, -1)  # (H, d, n, n)
            term = torch.einsum("bhid,hdij->bhij", x * scale, per_pair)
        else:
            term = self.pairs(self._logit_buckets(x, scale), height, width)
        return term if self.on == "k" else term.transpose(-1, -2)

    def _logit_buckets(self, x: Tensor, scale: float) -> Tensor:
        """The logit term per row and bucket, (B, H, n, K) (x_i . r_b, scaled) in contextual mode and
        (H or 1, n, K) (the table, broadcast) in bias mode: ``pairs`` of it is the term."""
        if self.mode == "bias":
            return self.lookup_table_bias[:, None, :].expand(-1, x.shape[-2], -1)
        table = self.lookup_table_weight.to(x.dtype)  # matched batch dims: a strided x is not copied
        return torch.matmul(x, table.expand(x.shape[:-2] + table.shape[-2:])).mul_(scale)

    def attn_bias_backward(self, x: Tensor, grad_buckets: Tensor, scale: float = 1.0) -> tuple[Tensor | None, Tensor]:
        """Gradients of ``attn_bias(x, ...)``, given the ``bucket_sums`` (..., H, n, K) of the gradient
        of its output in the term's own orientation (transposed on q): the gradient of ``x`` (None in
        bias mode, where the term does not depend on it) and of the table."""
        if self.mode == "bias":
            return None, grad_buckets.sum(-2).sum_to_size(self.lookup_table_bias.shape)
        table = self.lookup_table_weight.to(x.dtype)  # (H or 1, d, K)
        grad_x = (grad_buckets @ table.transpose(-1, -2)).mul_(scale)
        return grad_x, (x.transpose(-1, -2) @ grad_buckets).mul_(scale).sum_to_size(table.shape)

    def value_term(self, attn: Tensor, height: int, width: int, reference: bool = False) -> Tensor:
        """sum_j a_ij r_{b(i,j)} for (B, H, n, n) attention weights, as (B, H, n, d)."""
        table = self.lookup_table_weight  # (H or 1, K, d)
        if reference:
            ids = self.bucket_ids(height, width, attn.device)
            per_pair = table[:, ids].expand(self.num_heads, -1, -1, -1)  # (H, n, n, d)
            return torch.einsum("bhij,hijd->bhid", attn, per_pair)
        return self.bucket_sums(attn, height, width) @ table.to(attn.dtype)

    def value_term_attn_grad(self, grad_out: Tensor) -> Tensor:
        """The gradient of the attention weights through ``value_term`` given the gradient of its
        output, per bucket (..., H, n, K): ``pairs`` of it is the per-pair gradient."""
        return grad_out @ self.lookup_table_weight.to(grad_out.dtype).transpose(-1, -2)

    def value_term_table_grad(self, bucket_mass: Tensor, grad_out: Tensor) -> Tensor:
        """The table's gradient through ``value_term``, from the ``bucket_sums`` (..., H, n, K) of the
        attention weights and the gradient of the output."""
        return (bucket_mass.transpose(-1, -2) @ grad_out).sum_to_size(self.lookup_table_weight.shape)


class CrossImageRPE(nn.Module):
    """The cross method: one table along rows and one along columns, whose encodings add."""

    def __init__(
        self, on: str, num_heads: int, head_dim: int, config: RPEConfig, grid_size: tuple[int, int] | None = None
    ) -> None:
        super().__init__()
        self.rp_rows = ImageRPE("cross_rows", on, num_heads, head_dim, config, grid_size)
        self.rp_cols = ImageRPE("cross_cols", on, num_heads, head_dim, config, grid_size)

    def attn_bias(self, x: Tensor, height: int, width: int, reference: bool = False, scale: float = 1.0) -> Tensor:
        rows = self.rp_rows.attn_bias(x, height, width, reference, scale)
        return rows + self.rp_cols.attn_bias(x, height, width, reference, scale)

    def value_term(self, attn: Tensor, height: int, width: int, reference: bool = False) -> Tensor:
        return self.rp_rows.value_term(attn, height, width, reference) + self.rp_cols.value_term(
            attn, height, width, reference
        )

    @property
    def leaves(self) -> tuple[ImageRPE, ...]:
        return (self.rp_rows, self.rp_cols)


def build_rpe(
    config: RPEConfig, num_heads: int, head_dim: int, grid_size: tuple[int, int] | None = None
) -> tuple[nn.Module | None, ...]:
    """The (rpe_q, rpe_k, rpe_v) modules of one attention layer; None where the config has no RPE."""

    def build(on: str) -> nn.Module | None:
        if on not in config.rpe_on:
            return None
        if config.method == "cross":
            return CrossImageRPE(on, num_heads, head_dim, config, grid_size)
        return ImageRPE(config.method, on, num_heads, head_dim, config, grid_size)

    return build("q"), build("k"), build("v")


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------


def _split_heads(qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys and values (B, H, n, d), as views of the projection's (B, n, 3, H, d) output."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def _attention_per_image(layer: RPEAttention, q: Tensor, k: Tensor, grid: tuple[int, int]) -> Iterator[tuple[int, Tensor]]:
    """Each image's attention weights (H, n, n) from (B, H, n, d) queries and keys; per image, the
    RPE logit term stays in cache for the ``baddbmm`` that adds the scaled scores to it."""
    batch, heads, num_tokens, _ = q.shape
    no_bias = q.new_zeros(()).expand(heads, num_tokens, num_tokens)
    for i in range(batch):
        bias = layer._logit_bias(q[i], k[i], grid)
        beta, bias = (0.0, no_bias) if bias is None else (1.0, bias.expand(heads, num_tokens, num_tokens))
        yield i, torch.baddbmm(bias, q[i], k[i].transpose(-2, -1), beta=beta, alpha=layer.scale).softmax(dim=-1)


class _RecomputedAttention(torch.autograd.Function):
    """Attention with iRPE that saves no n x n tensor: flash-style recomputation on the CPU.

    Takes the projection's output (B, n, 3, H, d) as it is and returns the attention output as
    (B, n, H * d), the layout the output projection reads, so neither direction copies q, k, v or
    their gradients. Forward keeps only the projection output and the attention output (which the
    output projection keeps anyway). Backward recomputes the attention weights one image at a time,
    so its n x n blocks stay in cache, and takes the RPE terms' gradients through each table's
    ``bucket_sums`` (the adjoint of the ``pairs`` that built the terms): one loop serves every
    method, mode and placement.
    """

    @staticmethod
    def forward(ctx: Any, layer: RPEAttention, grid: tuple[int, int], qkv: Tensor, *tables: Tensor) -> Tensor:
        """``tables`` are ``layer.rpe_tables()`` (q/k tables, then v tables), passed so they get gradients."""
        batch, num_tokens, _, heads, head_dim = qkv.shape
        q, k, v = _split_heads(qkv)
        if layer.rpe_v is None:  # the fused kernel takes the q/k terms as an additive mask
            mask = layer._logit_bias(q, k, grid)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=layer.scale)
            out = out.transpose(1, 2).reshape(batch, num_tokens, heads * head_dim)
        else:
            out = q.new_empty(batch, num_tokens, heads, head_dim)
            for i, attn in _attention_per_image(layer, q, k, grid):
                out[i] = torch.baddbmm(layer.rpe_v.value_term(attn, *grid), attn, v[i]).transpose(0, 1)
            out = out.view(batch, num_tokens, heads * head_dim)
        ctx.layer, ctx.grid = layer, grid
        ctx.save_for_backward(qkv, out)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        layer, grid = ctx.layer, ctx.grid
        qkv, out = ctx.saved_tensors
        batch, num_tokens, _, heads, head_dim = qkv.shape
        q, k, v = _split_heads(qkv)
        grad_qkv = torch.empty_like(qkv)
        grad_q, grad_k, grad_v = _split_heads(grad_qkv)
        grad_out = grad_out.reshape(batch, num_tokens, heads, head_dim)
        # softmax backward: dS = P (dP - D) with D_i = sum_j P_ij dP_ij = dO_i . O_i (as flash attention does)
        row_dot = (grad_out * out.view_as(grad_out)).sum(-1).transpose(1, 2).unsqueeze(-1)  # (B, H, n, 1)
        grad_out = grad_out.transpose(1, 2)  # (B, H, n, d)
        qk_leaves, v_leaves = layer.rpe_leaves()
        grad_tables: list[Tensor | None] = [None] * (len(qk_leaves) + len(v_leaves))
        for i, attn in _attention_per_image(layer, q, k, grid):
            grad_out_i = grad_out[i]
            grad_v[i] = torch.bmm(attn.transpose(-2, -1), grad_out_i)
            grad_attn = torch.bmm(grad_out_i, v[i].transpose(-2, -1))
            v_table_grads = []
            for leaf in v_leaves:
                grad_attn += leaf.pairs(leaf.value_term_attn_grad(grad_out_i), *grid)
                v_table_grads.append(leaf.value_term_table_grad(leaf.bucket_sums(attn, *grid), grad_out_i))
            grad_logits = grad_attn.sub_(row_dot[i]).mul_(attn)
            # beta=0: baddbmm scales the product in place and ignores its first argument
            grad_q_i = torch.baddbmm(q[i], grad_logits, k[i], beta=0.0, alpha=layer.scale)
            grad_k_i = torch.baddbmm(k[i], grad_logits.transpose(-2, -1), q[i], beta=0.0, alpha=layer.scale)
            qk_table_grads = []
            for leaf in qk_leaves:
                x, grad_x = (q[i], grad_q_i) if leaf.on == "k" else (k[i], grad_k_i)
                grad_term = grad_logits if leaf.on == "k" else grad_logits.transpose(-2, -1)
                grad_extra, grad_table = leaf.attn_bias_backward(x, leaf.bucket_sums(grad_term, *grid), layer.scale)
                if grad_extra is not None:
                    grad_x += grad_extra
                qk_table_grads.append(grad_table)
            grad_q[i], grad_k[i] = grad_q_i, grad_k_i
            for t, grad in enumerate(qk_table_grads + v_table_grads):  # a table's gradient sums over the images
                grad_tables[t] = grad if grad_tables[t] is None else grad_tables[t].add_(grad)
        return (None, None, grad_qkv, *grad_tables)


class RPEAttention(nn.Module):
    """Multi-head self-attention with iRPE on queries, keys and/or values.

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
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        rpe_config: RPEConfig | dict[str, Any] | None = None,
        grid_size: tuple[int, int] | None = None,
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
        self.grid_size = None if grid_size is None else (int(grid_size[0]), int(grid_size[1]))
        self.rpe_q, self.rpe_k, self.rpe_v = build_rpe(self.rpe_config, self.num_heads, self.head_dim, self.grid_size)

    def set_grid_size(self, grid_size: tuple[int, int]) -> None:
        """The patch grid this layer is built for: its bucket ids are kept in buffers."""
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        qk, v = self.rpe_leaves()
        for leaf in qk + v:
            leaf.set_grid_size(self.grid_size)

    def rpe_leaves(self) -> tuple[list[ImageRPE], list[ImageRPE]]:
        """The single-table RPE modules on queries and keys, and those on values."""
        qk = [leaf for rpe in (self.rpe_q, self.rpe_k) if rpe is not None for leaf in rpe.leaves]
        return qk, ([] if self.rpe_v is None else list(self.rpe_v.leaves))

    def rpe_tables(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """The RPE parameters of queries and keys, and those of values (in ``rpe_leaves`` order)."""
        qk, v = self.rpe_leaves()
        return [leaf.table for leaf in qk], [leaf.table for leaf in v]

    def _grid(self, num_tokens: int, grid_size: tuple[int, int] | None) -> tuple[int, int]:
        skip = self.rpe_config.skip
        if grid_size is None and self.grid_size is not None and num_tokens == self.grid_size[0] * self.grid_size[1] + skip:
            grid_size = self.grid_size
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

    def _qkv(self, x: Tensor, grid_size: tuple[int, int] | None) -> tuple[Tensor, tuple[int, int]]:
        """The projection's output as (B, n, 3, H, d) and the grid. Queries stay unscaled: the logits
        are scaled in place instead, which saves a (B, H, n, d) activation."""
        batch, num_tokens, _ = x.shape
        grid = self._grid(num_tokens, grid_size)
        return self.qkv(x).reshape(batch, num_tokens, 3, self.num_heads, self.head_dim), grid

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

    def _path(self, q: Tensor) -> str:
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
        if self.rpe_v is None and has_qk_rpe and flex.usable(self, q, training_grad):
            return "flex"
        if self.rpe_v is None and (q.is_cuda or not has_qk_rpe or not training_grad):
            return "sdpa"
        no_dropout = self.attn_drop.p == 0 or not self.training
        eager_full_precision_cpu = not (q.is_cuda or q.dtype in (torch.float16, torch.bfloat16) or torch.compiler.is_compiling())
        if no_dropout and eager_full_precision_cpu:
            return "recompute"
        return "explicit"

    @torch.no_grad()
    def attention_weights(self, x: Tensor, grid_size: tuple[int, int] | None = None) -> Tensor:
        """Attention probabilities (B, H, n, n) for input tokens ``x`` (what the visualiser draws)."""
        qkv, grid = self._qkv(x, grid_size)
        q, k, _ = _split_heads(qkv)
        return self._logits(q, k, grid).softmax(dim=-1)

    def forward(self, x: Tensor, grid_size: tuple[int, int] | None = None) -> Tensor:
        batch, num_tokens, dim = x.shape
        qkv, grid = self._qkv(x, grid_size)
        q, k, v = _split_heads(qkv)
        path = self._path(q)
        if path == "recompute":
            qk_tables, v_tables = self.rpe_tables()
            return self.proj_drop(self.proj(_RecomputedAttention.apply(self, grid, qkv, *qk_tables, *v_tables)))
        if path == "flex":
            out = flex.attend(q, k, v, flex.rpe_score_mod(self, q, k, grid), self.scale)
        elif path == "sdpa":
            bias = self._logit_bias(q, k, grid)
            dropout = self.attn_drop.p if self.training else 0.0
            mask = None if bias is None else bias.to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.scale)
        else:
            attn = self.attn_drop(self._logits(q, k, grid).softmax(dim=-1))
            out = attn @ v
            if self.rpe_v is not None:
                out = out + self.rpe_v.value_term(attn, *grid, self.reference).to(out.dtype)
        out = out.transpose(1, 2).reshape(batch, num_tokens, dim)
        return self.proj_drop(self.proj(out))
