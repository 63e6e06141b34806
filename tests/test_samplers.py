"""Training samplers (repeated augmentation, class-balanced) and class-weighted losses."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import ImageTensors, quiet_trainer, tiny_classifier

from datamodules import CUB200DataModule
from datamodules.samplers import RepeatedAugmentationSampler, class_balanced_sampler, class_counts


def test_repeated_augmentation_deals_each_images_copies_to_different_ranks():
    dataset = list(range(12))
    ranks = [RepeatedAugmentationSampler(dataset, num_replicas=2, rank=r, num_repeats=3) for r in (0, 1)]
    drawn = [list(sampler) for sampler in ranks]
    assert [len(d) for d in drawn] == [6, 6] == [len(s) for s in ranks]  # as a DistributedSampler's length
    counts = Counter(drawn[0] + drawn[1])
    assert set(counts.values()) == {3}  # 4 images, 3 copies each, this epoch
    assert all(i in drawn[0] and i in drawn[1] for i in counts)  # the copies are spread over both ranks
    for sampler in ranks:
        sampler.set_epoch(1)
    assert [list(s) for s in ranks] != drawn  # a new order each epoch


def test_class_balanced_sampler_draws_every_class_equally_often():
    targets = [0] * 90 + [1] * 9 + [2] * 1
    sampler = class_balanced_sampler(targets, generator=torch.Generator().manual_seed(0))
    drawn = Counter(targets[i] for _ in range(30) for i in sampler)
    assert len(sampler) == 100
    assert all(0.28 < drawn[c] / 3000 < 0.39 for c in (0, 1, 2)), drawn
    assert class_counts(targets, 4) == [90, 9, 1, 0]


@pytest.mark.parametrize(
    ("setting", "sampler_type"),
    [("shuffle", torch.utils.data.RandomSampler), ("repeated_augmentation", RepeatedAugmentationSampler),
     ("class_balanced", torch.utils.data.WeightedRandomSampler)],
)
def test_datamodule_trains_with_the_chosen_sampler(synthetic_cub: Path, setting, sampler_type):
    data = CUB200DataModule(str(synthetic_cub), img_size=32, batch_size=4, num_workers=0, sampler=setting)
    data.setup("fit")
    loader = data.train_dataloader()
    assert type(loader.sampler) is sampler_type
    assert sum(len(y) for _, y in loader) == 40  # 10 classes x 4 images, one epoch's worth
    assert data.class_counts() == [4] * 10


def test_balanced_class_weighting_weights_the_loss_by_inverse_class_size(tmp_path):
    model = tiny_classifier(class_weighting="balanced")
    data = ImageTensors(labels=[0] * 6 + [1] * 3 + [2] * 2 + [3] * 1)
    trainer = quiet_trainer(tmp_path, max_epochs=1)
    trainer.fit(model, datamodule=data)
    expected = torch.tensor([12 / (4 * 6), 12 / (4 * 3), 12 / (4 * 2), 12 / (4 * 1)])
    torch.testing.assert_close(model.loss_weights, expected)
