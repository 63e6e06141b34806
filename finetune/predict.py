"""``predict``: image files through the configured datamodule's eval transform (:class:`ImagePaths`,
:class:`ImagePathsDataModule`), and the output: the top-k classes of every image, and on request its
logits and embedding.

``PredictionWriter`` is the ``prediction.*`` group of the command line. ``output`` defaults to
``predictions.csv`` in the command's own folder, ``<run_dir>/predict/version_N/``. The file format
follows the suffix of ``output``:

- ``.csv``: one row per image: ``path``, then ``class1, score1, ..., classK, scoreK``, then
  ``logit_<i>`` per class and ``embedding_<j>`` per feature when asked for;
- ``.json``: a list of records ``{"path", "classes", "scores"[, "logits"][, "embedding"]}``;
- ``.parquet``: the same columns as the JSON records (lists as list columns), written with pyarrow
  (``pip install 'rpe-finetune[parquet]'``).

Scores are softmax probabilities; embeddings are the model's pre-logits features
(``forward_head(..., pre_logits=True)``). With ``model.tta`` (``flip``, ``five_crop``, ``ten_crop``)
both are averaged over the views of each image, and the logits written are the log of the averaged
probabilities. Rows are sorted by path; under DDP they are gathered on rank 0.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from .errors import UsageError
from .module import FinetuneConfigError

__all__ = [
    "FORMATS",
    "IMAGE_SUFFIXES",
    "list_images",
    "ImagePaths",
    "ImagePathsDataModule",
    "PredictionWriter",
    "write_predictions",
]

FORMATS = (".csv", ".json", ".parquet")
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
    """``predict`` settings and output (see the module docstring).

    Args:
        inputs: an image file or folder, or a list of them, to classify (``predict`` only).
        output: the file to write; its suffix (``.csv``, ``.json``, ``.parquet``) picks the format;
            default: ``predictions.csv`` in the command's own folder, ``<run_dir>/predict/version_N/``.
        top_k: how many classes (with their scores) per image, at most the number of classes.
        logits: also write every class's logit.
        embeddings: also write the pre-logits embedding.
    """

    def __init__(
        self,
        inputs: list[str] | str | None = None,
        output: str | None = None,
        top_k: int = 5,
        logits: bool = False,
        embeddings: bool = False,
    ) -> None:
        super().__init__(write_interval="batch")
        if output is not None and Path(output).suffix.lower() not in FORMATS:
            raise FinetuneConfigError(
                f"prediction.output {output!r}: expected a file ending in {', '.join(FORMATS)}"
            )
        if top_k < 1:
            raise FinetuneConfigError(f"prediction.top_k={top_k}: expected a positive integer")
        self.inputs = [inputs] if isinstance(inputs, str) else inputs
        self.output = output
        self.top_k = top_k
        self.logits = logits
        self.embeddings = embeddings
        self.records: list[dict[str, Any]] = []

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pl_module.predict_embeddings = self.embeddings

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
        paths = trainer.predict_dataloaders.dataset.paths
        names = pl_module.class_names
        logits = prediction["logits"]
        scores, indices = logits.softmax(dim=-1).topk(min(self.top_k, logits.shape[-1]), dim=-1)
        for row, index in enumerate(batch[1].tolist()):
            record: dict[str, Any] = {
                "path": str(paths[index]),
                "classes": [names[c] for c in indices[row].tolist()],
                "scores": scores[row].tolist(),
            }
            if self.logits:
                record["logits"] = logits[row].tolist()
            if self.embeddings:
                record["embedding"] = prediction["embeddings"][row].tolist()
            self.records.append(record)

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        records = self.records
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            gathered: list[Any] = [None] * trainer.world_size
            dist.all_gather_object(gathered, records)
            records = [record for part in gathered for record in part]
        if trainer.is_global_zero:
            unique = {record["path"]: record for record in records}  # DistributedSampler pads with repeats
            folder = Path(trainer.default_root_dir)  # the command's own folder, whatever loggers it has
            out = Path(self.output).expanduser() if self.output else folder / "predictions.csv"
            out = write_predictions([unique[path] for path in sorted(unique)], out)
            print(f"wrote {len(unique)} predictions to {out}")
        self.records = []


def write_predictions(records: list[dict[str, Any]], out: Path) -> Path:
    """Write prediction records in the format of ``out``'s suffix; returns ``out``."""
    suffix = out.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise FinetuneConfigError(
                "writing .parquet needs pyarrow: pip install 'rpe-finetune[parquet]' (or write .csv / .json)"
            ) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".json":
        out.write_text(json.dumps(records, indent=1))
    elif suffix == ".parquet":
        columns = list(records[0]) if records else ["path", "classes", "scores"]
        pq.write_table(pa.table({c: [r[c] for r in records] for c in columns}), out)
    else:
        with open(out, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(_csv_header(records[0]) if records else ["path"])
            for record in records:
                row: list[Any] = [record["path"]]
                for name, score in zip(record["classes"], record["scores"], strict=True):
                    row += [name, f"{score:.6f}"]
                row += [f"{v:.6g}" for v in record.get("logits", [])]
                row += [f"{v:.6g}" for v in record.get("embedding", [])]
                writer.writerow(row)
    return out


def _csv_header(record: dict[str, Any]) -> list[str]:
    k = len(record["classes"])
    header = ["path"] + [f"{kind}{r}" for r in range(1, k + 1) for kind in ("class", "score")]
    header += [f"logit_{i}" for i in range(len(record.get("logits", [])))]
    header += [f"embedding_{j}" for j in range(len(record.get("embedding", [])))]
    return header
