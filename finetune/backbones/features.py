"""Which blocks ``forward_intermediates`` and ``prune_intermediate_layers`` take, as timm's ViTs read ``indices``."""

from __future__ import annotations

__all__ = ["take_indices"]


def take_indices(num_blocks: int, indices: int | list[int] | tuple[int, ...] | None = None) -> tuple[list[int], int]:
    """Absolute block indices named by ``indices`` and the largest of them.

    None: every block; an int n: the last n blocks; a list: those blocks (negative from the end).
    """
    if indices is None:
        indices = num_blocks
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"indices={indices}: expected the last n blocks with 1 <= n <= {num_blocks}")
        taken = list(range(num_blocks - indices, num_blocks))
    else:
        taken = []
        for index in indices:
            absolute = num_blocks + index if index < 0 else index
            if not 0 <= absolute < num_blocks:
                raise ValueError(f"indices: block {index} is out of range for {num_blocks} blocks")
            taken.append(absolute)
        if not taken:
            raise ValueError("indices: expected at least one block index")
    return taken, max(taken)
