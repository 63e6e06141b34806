"""``predict``: image files through the configured datamodule's eval transform, top-5 classes to a CSV."""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from .errors import UsageError

__all__ = ["IMAGE_SUFFIXES", "list_images", "ImagePaths", "ImagePathsDataModule", "PredictionWriter"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(inputs: Sequence[str]) -> list[Path]:
    """Image files among ``inputs`` (files, or folders searched recursively), sorted per folder."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            paths += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            paths.append(path)
        else:
            raise UsageError(f"predict input {item!r} does not exist; give image files or folders")
    if not paths:
        raise UsageError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {', '.join(inputs)}")
    return paths


class ImagePaths(Dataset):
    """``(image tensor, index)`` for a list of image files, through a transform of RGB arrays."""

    def __init__(self, paths: Sequence[Path], transform: Callable[[Any], torch.Tensor]) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from datamodules.transforms import load_rgb

        return self.transform(load_rgb(self.paths[index])), index


class ImagePathsDataModule(LightningDataModule):
    """The predict data: the configured datamodule's eval transform over image files."""

    def __init__(self, dataset: ImagePaths, batch_size: int, num_workers: int) -> None:
        super().__init__()
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset, batch_size=self.batch_size, num_workers=self.num_workers, shuffle=False
        )


class PredictionWriter(BasePredictionWriter):
    """``predict`` settings and output: top-5 class names and scores per image, as a CSV.

    Args:
        inputs: image files or folders to classify (``predict`` only).
        output: the CSV file to write (one row per image: path, then class and score for each rank);
            default: ``predictions.csv`` in the command's own folder, ``<run_dir>/predict/version_N/``.
    """

    def __init__(self, inputs: list[str] | None = None, output: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.inputs = inputs
        self.output = output
        self.rows: list[list[Any]] = []

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: dict[str, torch.Tensor],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        dataset: ImagePaths = trainer.predict_dataloaders.dataset
        names = pl_module.class_names
        for index, classes, scores in zip(
            batch[1].tolist(), prediction["indices"].tolist(), prediction["scores"].tolist(), strict=True
        ):
            row: list[Any] = [str(dataset.paths[index])]
            for c, s in zip(classes, scores, strict=True):
                row += [names[c], f"{s:.6f}"]
            self.rows.append(row)

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rows = self.rows
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            gathered: list[Any] = [None] * trainer.world_size
            dist.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        log_dir = trainer.log_dir  # a broadcast from rank 0: every rank must take part
        if trainer.is_global_zero:
            unique = {row[0]: row for row in rows}  # DistributedSampler pads with repeats
            k = (len(rows[0]) - 1) // 2 if rows else 0
            header = ["path"] + [f"{kind}{r}" for r in range(1, k + 1) for kind in ("class", "score")]
            out = Path(self.output).expanduser() if self.output else Path(log_dir or ".") / "predictions.csv"
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(header)
                writer.writerows(unique[path] for path in sorted(unique))
            print(f"wrote {len(unique)} predictions to {out}")
        self.rows = []
