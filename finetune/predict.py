"""``predict`` output: the top-k classes of every image, and on request its logits and embedding.

``PredictionWriter`` is the ``prediction.*`` group of the command line. The file format follows the
suffix of ``output``:

- ``.csv``: one row per image: ``path``, then ``class1, score1, ..., classK, scoreK``, then
  ``logit_<i>`` per class and ``embedding_<j>`` per feature when asked for;
- ``.json``: a list of records ``{"path", "classes", "scores"[, "logits"][, "embedding"]}``;
- ``.parquet``: the same columns as the JSON records (lists as list columns), written with pyarrow
  (``pip install 'rpe-finetune[parquet]'``).

Scores are softmax probabilities; embeddings are the model's pre-logits features
(``forward_head(..., pre_logits=True)``). With ``model.tta flip`` both are averaged over the image
and its mirror image. Rows are sorted by path; under DDP they are gathered on rank 0.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from .module import FinetuneConfigError

__all__ = ["FORMATS", "PredictionWriter", "write_predictions"]

FORMATS = (".csv", ".json", ".parquet")


class PredictionWriter(BasePredictionWriter):
    """``predict`` settings and output (see the module docstring).

    Args:
        inputs: image files or folders to classify (``predict`` only).
        output: the file to write; its suffix (``.csv``, ``.json``, ``.parquet``) picks the format.
        top_k: how many classes (with their scores) per image, at most the number of classes.
        logits: also write every class's logit.
        embeddings: also write the pre-logits embedding.
    """

    def __init__(
        self,
        inputs: list[str] | None = None,
        output: str = "predictions.csv",
        top_k: int = 5,
        logits: bool = False,
        embeddings: bool = False,
    ) -> None:
        super().__init__(write_interval="batch")
        if Path(output).suffix.lower() not in FORMATS:
            raise FinetuneConfigError(
                f"prediction.output {output!r}: expected a file ending in {', '.join(FORMATS)}"
            )
        if top_k < 1:
            raise FinetuneConfigError(f"prediction.top_k={top_k}: expected a positive integer")
        self.inputs = inputs
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
            out = write_predictions([unique[path] for path in sorted(unique)], Path(self.output).expanduser())
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
