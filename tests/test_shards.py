"""WebDataset shards: written by ``cli.py shards`` (webdataset's own writer), read back by ShardDataModule,
split over ranks and DataLoader workers, and trained through ``cli.py fit`` (also DDP on two processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_fit_args
from data_builders import build_cub, write_image

from datamodules import (
    CUB200,
    BadImageRegistry,
    ImageListDataset,
    Sample,
    ShardDataModule,
    ShardStream,
    write_shards,
)
from finetune.cli import main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cub_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(CUB root, its shards with boxes, 4 samples per shard), written through the command."""
    root = tmp_path_factory.mktemp("cub")
    build_cub(root, train_per_class=5)
    out = root / "shards"
    flags = ["--data", "datamodules.CUB200DataModule", "--data.root", str(root), "--data.crop_to_bbox", "true"]
    assert main(["shards", *flags, "--out", str(out), "--shard_size", "4"]) == 0
    return root, out


def test_shards_hold_the_original_files_labels_and_boxes(cub_shards) -> None:
    root, out = cub_shards
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["classes"] == ["Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross"]
    assert set(manifest["splits"]) == {"train", "test"}  # val was the test split: written once
    assert manifest["splits"]["train"]["counts"] == [4, 4, 4, 3]
    official = CUB200(root, "train", crop_to_bbox=True)
    with tarfile.open(out / "train-000000.tar") as tar:
        names = tar.getnames()
        first = tar.extractfile("000000000.jpg").read()
    assert set(names[:3]) == {"000000000.jpg", "000000000.cls", "000000000.box"} and len(names) == 12
    assert first == Path(official.samples[0].path).read_bytes()  # the file itself, not re-encoded


def test_shard_datamodule_reads_what_the_dataset_reads(cub_shards) -> None:
    root, out = cub_shards
    dm = ShardDataModule(str(out), img_size=32, batch_size=4, num_workers=0)
    assert dm.num_classes == 3
    dm.setup()
    official = CUB200(root, "test", crop_to_bbox=True)
    evaluation = dm.test_dataset
    assert dm.val_dataset is evaluation and len(evaluation) == len(official) == 6
    raw = ShardStream(evaluation.urls, evaluation.counts, None, False, 0, BadImageRegistry())
    for (image, label), index in zip(raw, range(len(official)), strict=True):
        expected, expected_label = official[index]
        assert label == expected_label and np.array_equal(image, expected)  # decoded and cropped alike
    train = list(dm.train_dataset)
    assert len(train) == 15 and Counter(label for _, label in train) == {0: 5, 1: 5, 2: 5}
    assert train[0][0].shape == (3, 32, 32)
    batches = list(dm.train_dataloader())
    assert len(batches) == 3 and batches[0][0].shape == (4, 3, 32, 32)


@pytest.fixture(scope="module")
def numbered_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 samples whose label is their number, 5 per shard: which rank and worker read what."""
    tmp = tmp_path_factory.mktemp("numbered")
    image = write_image(tmp / "a.jpg", (2, 2, 10, 10))
    dataset = ImageListDataset([Sample(str(image), i) for i in range(40)], [str(i) for i in range(40)])
    return write_shards({"train": dataset, "test": dataset}, dataset.classes, tmp / "shards", shard_size=5)


def _labels_per_rank(out: Path, split: str, shuffle: bool, world_size: int, workers: int, epochs: int) -> list[list[list[int]]]:
    """[rank][epoch] -> labels, read through a real DataLoader with persistent workers."""
    entry = json.loads((out / "dataset.json").read_text())["splits"][split]
    urls = [str(out / name) for name in entry["shards"]]
    result = []
    for rank in range(world_size):
        stream = ShardStream(urls, entry["counts"], None, shuffle, 7, BadImageRegistry(), rank, world_size, workers)
        loader = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
            collate_fn=lambda item: item[1],
        )
        result.append([list(loader) for _ in range(epochs)])
    return result


@pytest.mark.parametrize("world_size, workers", [(2, 2), (3, 1), (2, 0)])
def test_training_streams_split_shards_evenly_over_ranks_and_workers(numbered_shards, world_size, workers) -> None:
    per_rank = _labels_per_rank(numbered_shards, "train", True, world_size, workers, epochs=2)
    consumers = world_size * max(workers, 1)
    for epoch in range(2):
        seen = [labels[epoch] for labels in per_rank]
        assert {len(s) for s in seen} == {40 // consumers * max(workers, 1)}  # same batches on every rank
        everything = [label for s in seen for label in s]
        if 8 % consumers == 0:  # shards divide evenly: an exact partition of the epoch
            assert sorted(everything) == list(range(40))
    assert per_rank[0][0] != per_rank[0][1]  # reshuffled every epoch


def test_evaluation_streams_give_each_sample_to_one_rank(numbered_shards) -> None:
    per_rank = _labels_per_rank(numbered_shards, "test", False, 3, 2, epochs=1)
    seen = [labels[0] for labels in per_rank]
    assert {len(s) for s in seen} == {12}  # 40 // 6 per worker, two workers
    everything = [label for s in seen for label in s]
    assert len(set(everything)) == len(everything) == 36


def test_fit_from_shards_through_the_cli(cub_shards, tmp_path: Path) -> None:
    _, out = cub_shards
    run_dir = tmp_path / "run"
    args = tiny_fit_args(out, run_dir, epochs=1, datamodule="datamodules.ShardDataModule")
    assert main(["fit", *args, "--data.persistent_workers", "true", "--data.batch_size", "4"]) == 0
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert checkpoint["global_step"] == 3 and checkpoint["finetune"]["num_classes"] == 3


def test_bad_shard_input_is_one_line(cub_shards, tmp_path: Path, capsys) -> None:
    root, out = cub_shards
    flags = ["--data", "datamodules.CUB200DataModule", "--data.root", str(root)]
    assert main(["shards", *flags, "--out", str(out)]) == 2
    assert f"{out} exists" in capsys.readouterr().err
    run_dir = tmp_path / "run"
    assert main(["fit", *tiny_fit_args(tmp_path, run_dir, epochs=1, datamodule="datamodules.ShardDataModule"), "--data.persistent_workers", "true"]) == 2
    assert "shard manifest not found" in capsys.readouterr().err and not run_dir.exists()
    assert main(["fit", *tiny_fit_args(out, run_dir, epochs=1, datamodule="datamodules.ShardDataModule"), "--data.persistent_workers", "true", "--data.num_folds", "3"]) == 2
    assert "hold-out splits cannot be carved" in capsys.readouterr().err and not run_dir.exists()


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_trains_from_shards(cub_shards, tmp_path: Path) -> None:
    _, out = cub_shards
    run_dir = tmp_path / "ddp"
    args = [
        sys.executable, str(REPO / "cli.py"), "fit",
        *tiny_fit_args(out, run_dir, epochs=1, datamodule="datamodules.ShardDataModule"),
        "--data.persistent_workers", "true", "--data.batch_size", "2",
        "--trainer.devices", "2", "--trainer.strategy", "ddp", "--data.num_workers", "1",
        "--trainer.callbacks+=conftest.RecordRankMetrics", f"--trainer.callbacks.folder={tmp_path / 'ranks'}",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rank0 = json.loads((tmp_path / "ranks" / "rank0.json").read_text())
    assert rank0 == pytest.approx(json.loads((tmp_path / "ranks" / "rank1.json").read_text()))
    # 15 training samples over 2 ranks x 1 worker: 7 each, 3 batches of 2 (the last one dropped)
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
