"""FlexAttention paths for iRPE and SP-SA: the position terms as ``score_mod`` s, no n x n tensor.

PyTorch's FlexAttention (``torch.nn.attention.flex_attention``) calls a ``score_mod(score, b, h, i,
j)`` on every content logit inside a fused attention kernel that torch.compile generates. Both
encodings fit it, looked up by bucket or by pair instead of materialised as a (B, H, n, n) mask:

- iRPE on keys adds ``per_bucket[b, h, i, ids[i, j]]`` (contextual: the (B, H, n, K) products
  q_i . r_k; bias: the (H, K) table), on queries ``per_bucket[b, h, j, ids[j, i]]`` (the reversed
  offset); the cross method adds one such term per axis.
- SP-SA multiplies the content logit by the prior of the pair, ``prior[h, i, j]`` ((H, n, n), the
  prior gathered from its (2h-1)(2w-1) distinct offsets, with the attention scale folded in).

The value term of iRPE needs the attention weights, which the kernel does not return: layers with
RPE on values keep their own paths. FlexAttention has no CPU backward (torch 2.14), so the layers
use it on CUDA for training and inference, and in CPU inference only when asked
(``set_cpu_inference``): its kernel is compiled on first use for each shape (tens of seconds on a
small CPU), which pays off for long inference runs, not for a quick evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn.attention.flex_attention import flex_attention

if TYPE_CHECKING:
    from .irpe import RPEAttention

__all__ = ["ScoreMod", "attend", "rpe_score_mod", "prior_score_mod", "usable", "set_cpu_inference"]

ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
# Compiled once; every score_mod of one structure and shape shares the generated kernel.
_compiled_flex_attention = torch.compile(flex_attention, dynamic=False)


def attend(q: Tensor, k: Tensor, v: Tensor, score_mod: ScoreMod, scale: float, compiled: bool = True) -> Tensor:
    """Attention output (B, H, n, d) of ``softmax(score_mod(scale * q . k)) @ v`` by FlexAttention.

    ``compiled`` False runs FlexAttention's unfused eager form (the tests' check of the score_mods
    without a compile); inside a graph being compiled the call is traced as it is.
    """
    if not compiled or torch.compiler.is_compiling():
        return flex_attention(q, k, v, score_mod=score_mod, scale=scale)
    return _compiled_flex_attention(q, k, v, score_mod=score_mod, scale=scale)


def usable(layer: nn.Module, q: Tensor, training_grad: bool) -> bool:
    """Whether an attention layer computes this call with FlexAttention: on CUDA (training and
    inference), in CPU inference when ``set_cpu_inference`` turned it on; never with attention
    dropout in training (the kernel has none), nor while exporting (the graph must stay portable)."""
    dropout = layer.training and layer.attn_drop.p > 0
    if dropout or torch.compiler.is_exporting():
        return False
    return q.is_cuda or (not training_grad and q.device.type == "cpu" and layer.cpu_flex_inference)


def set_cpu_inference(model: nn.Module, enabled: bool = True) -> int:
    """Let every iRPE and SP-SA layer of ``model`` use FlexAttention for CPU inference; returns how
    many layers it set."""
    layers = [m for m in model.modules() if hasattr(m, "cpu_flex_inference")]
    for layer in layers:
        layer.cpu_flex_inference = enabled
    return len(layers)


def _bucket_term(per_bucket: Tensor, ids: Tensor, reversed_offset: bool) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """One iRPE logit term as a function of (b, h, i, j): ``per_bucket`` is (B, H, n, K)
    (contextual) or the (H or 1, K) table (bias), ``ids`` the (n, n) bucket ids; on queries the term
    of (i, j) is the key's row at the reversed offset."""
    shared_table = per_bucket.dim() == 2 and per_bucket.shape[0] == 1

    def term(b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
        row, col = (j, i) if reversed_offset else (i, j)
        if per_bucket.dim() == 2:
            return per_bucket[0 if shared_table else h, ids[row, col]]
        return per_bucket[b, h, row, ids[row, col]]

    return term


def rpe_score_mod(layer: RPEAttention, q: Tensor, k: Tensor, grid: tuple[int, int]) -> ScoreMod:
    """The score_mod adding every query/key iRPE term of an ``RPEAttention`` layer to the scaled
    content logit, for (B, H, n, d) queries and keys on a ``grid`` of patches."""
    terms = []
    for leaf in layer.rpe_modules():
        if leaf.on == "v":
            continue
        if leaf.mode == "bias":
            per_bucket = leaf.lookup_table_bias
        else:  # contextual: (n x d) @ (d x K) per image and head, scaled as the logits are
            x = q if leaf.on == "k" else k
            per_bucket = torch.matmul(x, leaf.lookup_table_weight.to(x.dtype)) * layer.scale
        terms.append(_bucket_term(per_bucket, leaf.bucket_ids(*grid, q.device), reversed_offset=leaf.on == "q"))

    def score_mod(score: Tensor, b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
        for term in terms:
            score = score + term(b, h, i, j)
        return score

    return score_mod


def prior_score_mod(prior: Tensor) -> ScoreMod:
    """The score_mod of SP-SA: the content logit times ``prior[h, i, j]`` ((H, n, n))."""

    def score_mod(score: Tensor, b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
        return score * prior[h, i, j]

    return score_mod
