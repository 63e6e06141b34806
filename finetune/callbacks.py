"""Callbacks of the command line: the progress bar, the checkpoints of a fit, the summary printed at its
end, the push to the Hub after it."""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar

from .errors import FinetuneError
from .export import export_checkpoint
from .record import SPLIT_NAMES, EvalMetrics
from .upload import check_target, push_folder, report_push

__all__ = [
    "CheckpointSettings",
    "checkpoint_callbacks",
    "EpochProgressBar",
    "RunSummary",
    "PushToHubCallback",
    "LAST_CHECKPOINT",
]

LAST_CHECKPOINT = "last"

# From Lightning 2.6.1 the rich bar is drawn by a thread, at most ``refresh_rate`` times a second (default
# 100: after every batch). A draw holds the GIL for a few ms (~4 ms on a small CPU), which the training
# loop waits for: 4-6% of the demo's images/s in a terminal. Twice a second costs ~0.1%. Lightning 2.6.0
# counts ``refresh_rate`` in batches and keeps its default (every batch).
BAR_DRAWS_PER_SECOND = 2
BAR_RATE_PER_SECOND = tuple(int(part) for part in re.findall(r"\d+", lightning.__version__)[:3]) >= (2, 6, 1)


@dataclass
class CheckpointSettings:
    """What ``fit`` keeps in ``<run_dir>/checkpoints/``: always ``last.ckpt`` (every epoch and on Ctrl-C or
    SIGTERM), and with ``monitor`` also the best checkpoints as ``best-epochNNN.ckpt``.

    Args:
        monitor: the metric that selects best checkpoints, e.g. ``val/top1`` (needs a validation split
            held out from the training split, ``data.val_split > 0``); ``None``: keep the last epoch only.
        mode: ``max`` (accuracies) or ``min`` (losses).
        save_top_k: how many best checkpoints to keep.
        every_n_epochs: save every this many epochs.
    """

    monitor: str | None = None
    mode: Literal["max", "min"] = "max"
    save_top_k: int = 1
    every_n_epochs: int = 1


def checkpoint_callbacks(dirpath: Path, settings: CheckpointSettings, fitting: bool = True) -> list[ModelCheckpoint]:
    """Lightning's ModelCheckpoint for ``last.ckpt`` (and one selecting best checkpoints when monitoring),
    the selecting one first so that it is ``trainer.checkpoint_callback``. Not ``fitting`` (validate, test,
    predict), they only take back their state from a checkpoint: they save nothing, not even on an
    exception (Lightning's ``save_on_exception`` would otherwise overwrite ``last.ckpt`` on Ctrl-C)."""
    last = ModelCheckpoint(
        dirpath=dirpath,
        filename=LAST_CHECKPOINT,
        save_top_k=1,
        every_n_epochs=settings.every_n_epochs,
        save_on_exception=fitting,
        enable_version_counter=False,  # one training run per run_dir: a resume continues last.ckpt
    )
    if settings.monitor is None:
        return [last]
    best = ModelCheckpoint(
        dirpath=dirpath,
        filename="best-epoch{epoch:03d}",
        monitor=settings.monitor,
        mode=settings.mode,
        save_top_k=settings.save_top_k,
        every_n_epochs=settings.every_n_epochs,
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    return [best, last]


class EpochProgressBar(RichProgressBar):
    """Lightning's rich progress bar with the epoch counted from 1 (``Epoch 1/1`` for a one-epoch run, where
    Lightning shows the 0-based index over the last index, ``Epoch 0/0``) and the speed in images/s (the
    bar's batches/s times the images of its latest batch) in place of batches/s, drawn
    ``BAR_DRAWS_PER_SECOND`` times a second."""

    def __init__(self) -> None:
        super().__init__(refresh_rate=BAR_DRAWS_PER_SECOND if BAR_RATE_PER_SECOND else 1)
        self.batch_images: dict[Any, int] = {}  # progress task id -> images in its latest batch

    def configure_columns(self, trainer: Trainer) -> list:
        from rich.progress import ProgressColumn
        from rich.text import Text

        bar = self

        class ImagesPerSecond(ProgressColumn):
            def render(self, task: Any) -> Text:
                images = bar.batch_images.get(task.id)
                speed = f"{task.speed * images:.1f}" if task.speed is not None and images else "0.0"
                return Text(f"{speed} images/s", style=bar.theme.processing_speed)

        columns = super().configure_columns(trainer)
        return [*columns[:-1], ImagesPerSecond()]  # Lightning's last column: batches/s

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self.progress is None or self.train_progress_bar_id is None:
            return
        text = f"Epoch {trainer.current_epoch + 1}"
        if trainer.max_epochs is not None and trainer.max_epochs > 0:  # -1: no end
            text += f"/{trainer.max_epochs}"
        text = f"{text:{len(self.validation_description)}}"  # as wide as "Validation": no flicker
        style = self.theme.description
        self.progress.update(self.train_progress_bar_id, description=f"[{style}]{text}" if style else text)
        self.refresh()

    def _count(self, task_id: Any, batch: Any) -> None:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        if task_id is not None and hasattr(images, "__len__"):
            self.batch_images[task_id] = len(images)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._count(self.train_progress_bar_id, batch)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        task = self.val_sanity_progress_bar_id if trainer.sanity_checking else self.val_progress_bar_id
        self._count(task, batch)
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._count(self.test_progress_bar_id, batch)
        super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._count(self.predict_progress_bar_id, batch)
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)


def describe(metrics: EvalMetrics | None) -> str:
    """``top-1 93.33%, top-5 100.00%, mean-class acc. 93.10% (official test split, epoch 3)`` or
    ``not evaluated``."""
    if metrics is None:
        return "not evaluated"
    return (
        f"top-1 {100 * metrics.top1:.2f}%, top-5 {100 * metrics.top5:.2f}%, "
        f"mean-class acc. {100 * metrics.mean_class_acc:.2f}% "
        f"({SPLIT_NAMES[metrics.split]}, epoch {metrics.epoch})"
    )


class RunSummary(Callback):
    """Says which split validation runs on when fit starts, and prints a table of the run after it.

    The table is printed at teardown, after the progress bar has stopped (so it is not redrawn
    below the table); training speed is in images/s over the training batches of this process.
    """

    def __init__(self) -> None:
        self.start = 0.0
        self.images = 0
        self.train_seconds = 0.0
        self.batch_start = 0.0

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.start = time.perf_counter()
        if trainer.is_global_zero:
            self._notes(trainer, pl_module)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.batch_start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.train_seconds += time.perf_counter() - self.batch_start
        self.images += len(batch[0])

    @staticmethod
    def _notes(trainer: Trainer, pl_module: LightningModule) -> None:
        console = _console()
        banner = getattr(trainer.datamodule, "banner", None)
        if banner:
            console.print(f"[bold yellow]{banner}[/]")
        if pl_module.hparams.get("pretrained") is False:
            console.print("[bold yellow]The model trains from random weights (model.pretrained: false).[/]")
        split = getattr(pl_module, "validation_split", "val")
        console.print(
            f"Evaluation during fit runs on the {SPLIT_NAMES[split]} (logged as {split}/*)"
            + ("; checkpoints are not selected on it." if split == "test" else ".")
        )

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or trainer.interrupted or not trainer.is_global_zero:
            return
        from rich.table import Table

        table = Table(title="fine-tuning summary", show_header=False)
        table.add_row("model", str(pl_module.hparams.get("model_name")))
        table.add_row("last epoch", describe(getattr(pl_module, "measured", None)))
        selecting = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.monitor]
        if selecting:
            table.add_row(f"best ({selecting[0].monitor})", describe(getattr(pl_module, "best_metrics", None)))
            table.add_row("best checkpoint", selecting[0].best_model_path or "n/a")
        last = Path(trainer.checkpoint_callback.dirpath or ".") / f"{LAST_CHECKPOINT}.ckpt" if trainer.checkpoint_callback else None
        table.add_row("last checkpoint", str(last) if last is not None and last.is_file() else "n/a")
        table.add_row("run folder", str(trainer.default_root_dir))  # the CLI's run_dir (W&B / MLflow: inside)
        table.add_row("wall time", f"{time.perf_counter() - self.start:.1f} s")
        if self.train_seconds > 0:
            table.add_row("training speed", f"{self.images / self.train_seconds:.1f} images/s (this process)")
        _console().print(table)
        self._notes(trainer, pl_module)


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=False)


class PushToHubCallback(Callback):
    """At the end of ``fit``, export the best (else last) checkpoint and push it to ``repo_id``.

    The folder goes to ``export_dir`` (default ``<checkpoint dir>/hub_export/<name>``). A failed export
    or upload does not fail the run: the one-line error (with the retry command) is printed and kept
    in :attr:`error`.
    """

    def __init__(self, repo_id: str, private: bool = False, revision: str | None = None,
                 create_pr: bool = False, export_dir: str | None = None) -> None:
        check_target(repo_id, revision, create_pr)  # fail before training, not after
        self.repo_id, self.private, self.revision, self.create_pr = repo_id, private, revision, create_pr
        self.export_dir = export_dir
        self.error: str | None = None
        self.commit: Any = None

    def _checkpoint(self, trainer: Trainer) -> Path:
        """The best checkpoint when the run selects on a validation split, else the last one."""
        callbacks = sorted(trainer.checkpoint_callbacks, key=lambda cb: not getattr(cb, "monitor", None))
        for callback in callbacks:
            path = getattr(callback, "best_model_path", "")
            if path and Path(path).is_file():
                return Path(path)
        path = Path(trainer.default_root_dir) / "hub_final.ckpt"
        trainer.save_checkpoint(path)  # collective: every rank takes part
        return path

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        ckpt = self._checkpoint(trainer)
        if not trainer.is_global_zero:
            return
        name = self.repo_id.split("/")[1]
        folder = Path(self.export_dir) if self.export_dir else ckpt.parent / "hub_export" / name
        try:
            export_checkpoint(ckpt, folder, repo_id=self.repo_id)
            print(f"exported {ckpt} to {folder}")
            self.commit = push_folder(folder, self.repo_id, private=self.private, revision=self.revision,
                                      create_pr=self.create_pr)
        except FinetuneError as err:
            self.error = str(err)
            print(f"error: {err}", file=sys.stderr)
            return
        report_push(self.commit, self.repo_id)
