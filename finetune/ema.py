"""An exponential moving average of the weights a process holds, for FSDP.

Under FSDP every process holds a shard of each parameter (with ``use_orig_params`` the parameters
are views of the local shard between forward passes), so a full EMA copy of the model (timm's
``ModelEmaV3``) would not be sharded like the model, and FSDP would flatten it into its own shards.
:class:`ShardedEma` averages exactly what this process holds: the local shard of every parameter and
the floating-point buffers (replicated), with timm's ``ModelEmaV3`` decay and warmup, so that the
average of the shards is the shard of the average. The full averaged weights (for evaluation and for
checkpoints) are gathered by FSDP's own full state dict while the averages are copied into the shards
(:meth:`ShardedEma.applied`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .errors import FinetuneError

__all__ = ["ShardedEma"]


class ShardedEma:
    """EMA of the parameters (local shards under FSDP) and floating-point buffers of ``module``.

    Args:
        module: the model, already sharded (its parameters are read at every :meth:`update`).
        decay: the decay at the end of the warmup (timm's ``decay``).
        use_warmup: timm's EMA warmup: the decay at step ``t`` is ``1 - (1 + t) ** -2/3``, capped at
            ``decay`` (``ModelEmaV3(use_warmup=True)``).
    """

    def __init__(self, module: nn.Module, decay: float, use_warmup: bool = True) -> None:
        self.decay = decay
        self.use_warmup = use_warmup
        self.names = [name for name, _ in _averaged_tensors(module)]
        self.tensors = [tensor for _, tensor in _averaged_tensors(module)]
        self.averages = [tensor.detach().clone() for tensor in self.tensors]

    def get_decay(self, step: int) -> float:
        """The decay applied by the update of optimizer step ``step`` (timm's ``ModelEmaV3.get_decay``)."""
        step = max(0, step - 1)
        if step <= 0:
            return 0.0
        if not self.use_warmup:
            return self.decay
        return min(1 - (1 + step) ** (-2 / 3), self.decay)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the averages towards the current weights (call after each optimizer step)."""
        weight = 1.0 - self.get_decay(step)
        for name, average, tensor in zip(self.names, self.averages, self.tensors, strict=True):
            if average.shape != tensor.shape:
                raise FinetuneError(
                    f"model.ema under FSDP: {name} has shape {tuple(tensor.shape)} after the optimizer step, its "
                    f"average {tuple(average.shape)}; the EMA needs the parameters resharded after each step "
                    "(sharding_strategy FULL_SHARD, the default), or set model.ema false"
                )
            average.lerp_(tensor.detach().to(average.dtype), weight)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the module holds the averages, copied into its weights in place (FSDP keeps its
        storage); the trained weights come back at the end, also on an exception. Under FSDP, only gather
        the weights in the block (``state_dict``): a forward pass of the root module would keep its gathered
        parameters, and the next forward use them."""
        trained = [tensor.detach().clone() for tensor in self.tensors]
        with torch.no_grad():
            for tensor, average in zip(self.tensors, self.averages, strict=True):
                tensor.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for tensor, weights in zip(self.tensors, trained, strict=True):
                    tensor.copy_(weights)

    @torch.no_grad()
    def take_current(self) -> None:
        """Make the module's current weights the averages (after loading averaged weights into it)."""
        for average, tensor in zip(self.averages, self.tensors, strict=True):
            average.copy_(tensor)


def _averaged_tensors(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    yield from module.named_parameters()
    yield from ((name, b) for name, b in module.named_buffers() if b.is_floating_point())
