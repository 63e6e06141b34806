"""SP-SA attention that saves no n x n tensor: the weights are recomputed in backward (CPU training).

Autograd through ``softmax((q k^T) * prior) @ v`` keeps the batch's logits and weights, several
(B, H, n, n) tensors per layer: SP-ViT-S trained 1.26x the memory of its plain-attention body, whose
fused kernel keeps none. ``prior_attention`` keeps what that kernel keeps (queries, keys, values and
the output) and recomputes each image's weights in backward, as flash attention does; image by
image the n x n blocks stay in cache.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def _split_qk(qk: Tensor) -> tuple[Tensor, Tensor]:
    """Queries and keys (B, H, n, d) as views of the projection's (B, n, 2, H, d) output."""
    q, k = qk.permute(2, 0, 3, 1, 4).unbind(0)
    return q, k


def _weights(q: Tensor, k: Tensor, prior: Tensor) -> tuple[Tensor, Tensor]:
    """One image's content scores q k^T (H, n, n) and attention weights softmax(scores * prior)."""
    scores = q @ k.transpose(-2, -1)
    return scores, (scores * prior).softmax(dim=-1)


class _PriorAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, qk: Tensor, v: Tensor, prior: Tensor) -> Tensor:
        batch, num_tokens, _, heads, head_dim = qk.shape
        q, k = _split_qk(qk)
        values = v.transpose(1, 2)  # (B, H, n, d) view
        out = qk.new_empty(batch, num_tokens, heads, head_dim)
        for i in range(batch):
            out[i] = (_weights(q[i], k[i], prior)[1] @ values[i]).transpose(0, 1)
        out = out.view(batch, num_tokens, heads * head_dim)
        ctx.save_for_backward(qk, v, prior, out)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        qk, v, prior, out = ctx.saved_tensors
        batch, num_tokens, _, heads, head_dim = qk.shape
        q, k = _split_qk(qk)
        values = v.transpose(1, 2)
        grad_qk, grad_v = torch.empty_like(qk), torch.empty_like(v)
        grad_q, grad_k = _split_qk(grad_qk)
        grad_values = grad_v.transpose(1, 2)
        grad_prior = torch.zeros_like(prior)
        grad_out = grad_out.reshape(batch, num_tokens, heads, head_dim)
        # softmax backward: dL = A (dA - D) with D_i = sum_j A_ij dA_ij = dO_i . O_i
        row_dot = (grad_out * out.view_as(grad_out)).sum(-1).transpose(1, 2).unsqueeze(-1)  # (B, H, n, 1)
        grad_out = grad_out.transpose(1, 2)  # (B, H, n, d) view
        for i in range(batch):
            scores, attn = _weights(q[i], k[i], prior)
            grad_values[i] = attn.transpose(-2, -1) @ grad_out[i]
            grad_logits = (grad_out[i] @ values[i].transpose(-2, -1)).sub_(row_dot[i]).mul_(attn)
            grad_prior.addcmul_(grad_logits, scores)
            grad_scores = grad_logits.mul_(prior)
            grad_q[i] = grad_scores @ k[i]
            grad_k[i] = grad_scores.transpose(-2, -1) @ q[i]
        return grad_qk, grad_v, grad_prior


def prior_attention(qk: Tensor, v: Tensor, prior: Tensor) -> Tensor:
    """``softmax((q k^T) * prior) @ v`` with heads merged, (B, n, H * d), for the projections' outputs
    ``qk`` (B, n, 2, H, d) and ``v`` (B, n, H, d) and a (H, n, n) ``prior`` (attention scale folded
    in); backward recomputes the weights image by image and saves no n x n tensor."""
    return _PriorAttention.apply(qk, v, prior)
