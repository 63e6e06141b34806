"""Tensors of a patch grid (bucket ids, offset tables) as constants of traced graphs.

The backbones cache such tensors per grid with ``functools.lru_cache``. Two tracers mishandle that:

- ``torch.export`` (and any FakeTensor / make_fx trace) runs the Python code with fake tensors, so a
  cache miss during the trace would store a FakeTensor in the cache and break every later eager call
  on that grid;
- ``torch.compile`` traces through the cache wrapper (with a warning) and re-computes the tensors
  inside the compiled graph on every call.

``grid_constant`` computes the tensors with every tracing mode suspended (real tensors, which the
exported graph holds as constants) and marks the call as a constant for Dynamo, which then runs it
once while tracing and embeds the result.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch.utils._python_dispatch import _disable_current_modes

__all__ = ["grid_constant"]

T = TypeVar("T")


def grid_constant(fn: Callable[..., T]) -> Callable[..., T]:
    """Wrap a cached function of a grid so traced graphs (compile, export) hold its result as a constant.

    Integer arguments go through ``operator.index`` first: under ``torch.compile`` with dynamic
    shapes this specialises a symbolic grid size to its value (one graph per grid), which the
    constant needs; on plain ints it is a no-op.
    """

    @torch.compiler.assume_constant_result
    def constant(*args: Any, **kwargs: Any) -> T:
        with _disable_current_modes():
            return fn(*args, **kwargs)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        args = tuple(operator.index(a) if isinstance(a, int) else a for a in args)
        kwargs = {k: operator.index(v) if isinstance(v, int) else v for k, v in kwargs.items()}
        return constant(*args, **kwargs)

    return wrapper
