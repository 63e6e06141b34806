"""Training samplers: repeated augmentation (DeiT) and class-balanced sampling.

``RepeatedAugmentationSampler`` is DeiT's ``RASampler`` (and timm's ``RepeatAugSampler``): every
image of a shuffled epoch is repeated ``num_repeats`` times and the repeats are dealt to consecutive
ranks, so each copy gets its own augmentation on another process. It subclasses
``DistributedSampler`` so that Lightning passes it through instead of wrapping it in a second
distributed sampler (which would shard it twice). Each rank draws as many samples per epoch as a
``DistributedSampler`` would; DeiT additionally rounds that count down to a multiple of 256.

``class_balanced_sampler`` draws with replacement, each image with probability inversely
proportional to its class size, so every class is seen equally often; under DDP Lightning shards it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Dataset, DistributedSampler, WeightedRandomSampler

__all__ = ["RepeatedAugmentationSampler", "class_balanced_sampler", "class_counts"]


class RepeatedAugmentationSampler(DistributedSampler):
    """Each image ``num_repeats`` times per epoch, the copies on consecutive ranks (see the module docstring)."""

    def __init__(
        self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, num_repeats: int = 3, seed: int = 0
    ) -> None:
        if num_repeats < 1:
            raise ValueError(f"repeats={num_repeats}: expected a positive integer")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.num_repeats = num_repeats
        self.num_samples = math.ceil(len(dataset) / num_replicas)  # per rank, as without repetition
        self.total_repeated = math.ceil(len(dataset) * num_repeats / num_replicas) * num_replicas

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator)
        repeated = order.repeat_interleave(self.num_repeats).tolist()
        repeated += repeated[: self.total_repeated - len(repeated)]  # pad so every rank gets the same count
        return iter(repeated[self.rank : self.total_repeated : self.num_replicas][: self.num_samples])

    def __len__(self) -> int:
        return self.num_samples


def class_counts(targets: Sequence[int], num_classes: int) -> list[int]:
    """Images per class (classes without images count 0)."""
    counts = Counter(targets)
    return [counts.get(label, 0) for label in range(num_classes)]


def class_balanced_sampler(
    targets: Sequence[int], generator: torch.Generator | None = None
) -> WeightedRandomSampler:
    """``len(targets)`` draws with replacement, each image weighted by 1 / (images of its class)."""
    counts = Counter(targets)
    weights = torch.tensor([1.0 / counts[label] for label in targets], dtype=torch.double)
    return WeightedRandomSampler(weights, num_samples=len(targets), replacement=True, generator=generator)
