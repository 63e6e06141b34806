"""A run folder keeps its whole history: every command adds files to it, none removes or replaces one.

Layout of ``--run_dir`` (``runs/<recipe>`` in the recipes)::

    metrics.csv, events.out.tfevents.*   fit: one training history, continued by every resume
    config.yaml                          the config of the first fit
    config-resume-N.yaml                 the config of the N-th resume (--ckpt_path)
    confusion_matrix_{val,test}.png      the latest evaluation during fit
    checkpoints/last.ckpt, best-*.ckpt   fit's checkpoints
    validate/version_N/, test/version_N/, predict/version_N/
                                         one folder per evaluation command: its metrics.csv,
                                         config.yaml, confusion matrix (predict: predictions.csv)

A fresh ``fit`` (no ``--ckpt_path``) into a folder that already holds a training history is refused;
a command that fails on bad input removes what it created (:class:`CreatedFilesGuard`).
"""

from __future__ import annotations

import csv
import os
import re
import shutil
from argparse import Namespace
from pathlib import Path
from typing import Any

from lightning import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, SaveConfigCallback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor

__all__ = [
    "HistoryCSVLogger",
    "CommandConfig",
    "CreatedFilesGuard",
    "training_history",
    "next_version_dir",
    "next_config_name",
    "METRICS_FILE",
]

METRICS_FILE = "metrics.csv"


class HistoryCSVLogger(Logger):
    """Metrics as rows of ``<log_dir>/metrics.csv``, appended to and never truncated.

    Lightning's CSVLogger deletes an existing ``metrics.csv`` when it starts, so a resumed run lost
    the curves before the interruption. This one continues the file: rows are appended, and a new
    metric name widens the header (the file is rewritten through a temporary file, old rows kept).
    Hyperparameters are not logged here: the run's ``config*.yaml`` holds them.
    """

    def __init__(self, log_dir: str | Path) -> None:
        super().__init__()
        self._log_dir = Path(log_dir)
        self._rows: list[dict[str, Any]] = []

    @property
    def name(self) -> str:
        return ""

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return str(self._log_dir)

    @property
    def log_dir(self) -> str:
        return str(self._log_dir)

    @property
    def metrics_file(self) -> Path:
        return self._log_dir / METRICS_FILE

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        """Nothing: the configuration is saved as YAML beside the metrics."""

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        row = {key: value.item() if isinstance(value, Tensor) else value for key, value in metrics.items()}
        row["step"] = step if step is not None else len(self._rows)
        self._rows.append(row)

    @rank_zero_only
    def save(self) -> None:
        if not self._rows:
            return
        path = self.metrics_file
        header: list[str] = []
        if path.is_file():
            with open(path, newline="") as f:
                header = next(csv.reader(f), [])
        new_keys = sorted({key for row in self._rows for key in row} - set(header))
        if not path.is_file() or new_keys:
            self._rewrite(path, header + new_keys)
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=header + new_keys).writerows(self._rows)
        self._rows = []

    @staticmethod
    def _rewrite(path: Path, header: list[str]) -> None:
        """Write ``path`` with ``header`` and its existing rows (none if it is new), atomically."""
        rows: list[dict[str, str]] = []
        if path.is_file():
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()


class CommandConfig(SaveConfigCallback):
    """Saves a command's config as ``folder/config_filename`` (the run folder for ``fit``, the command's
    ``version_N`` folder otherwise), whatever loggers the run has: Lightning saves it in the first logger's
    folder, which for W&B is the run folder of every command and for MLflow's database none."""

    def __init__(
        self,
        parser: LightningArgumentParser,
        config: Namespace,
        folder: str | Path = ".",
        config_filename: str = "config.yaml",
        overwrite: bool = False,
        multifile: bool = False,
    ) -> None:
        super().__init__(parser, config, config_filename, overwrite, multifile, save_to_log_dir=False)
        self.folder = Path(folder)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Called on rank 0 only."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.parser.save(
            self.config,
            str(self.folder / self.config_filename),
            skip_unset=False,
            overwrite=self.overwrite,
            multifile=self.multifile,
        )


def training_history(run_dir: Path) -> list[Path]:
    """The files of ``run_dir`` that a fresh fit would continue or overwrite (metrics, checkpoints)."""
    found = [run_dir / METRICS_FILE] if (run_dir / METRICS_FILE).is_file() else []
    checkpoints = run_dir / "checkpoints"
    return found + (sorted(checkpoints.glob("*.ckpt")) if checkpoints.is_dir() else [])


def next_version_dir(parent: Path) -> Path:
    """``parent/version_N`` with N one more than the highest existing one (0 when none)."""
    versions = [
        int(match.group(1))
        for child in (parent.iterdir() if parent.is_dir() else [])
        if (match := re.fullmatch(r"version_(\d+)", child.name))
    ]
    return parent / f"version_{max(versions, default=-1) + 1}"


def next_config_name(log_dir: Path) -> str:
    """``config.yaml`` for the first fit in ``log_dir``, else ``config-resume-N.yaml`` (the next free N)."""
    if not (log_dir / "config.yaml").exists():
        return "config.yaml"
    n = 1
    while (log_dir / f"config-resume-{n}.yaml").exists():
        n += 1
    return f"config-resume-{n}.yaml"


class CreatedFilesGuard:
    """Remembers what a folder held before a command, so a command that fails on bad input can take
    back the files and folders it created (and only those) before it exits."""

    def __init__(self) -> None:
        self.folder: Path | None = None
        self._before: set[Path] = set()

    def watch(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._before = self._listing()

    def _listing(self) -> set[Path]:
        if self.folder is None or not self.folder.exists():
            return set()
        return {self.folder, *self.folder.rglob("*")}

    def remove_created(self) -> list[Path]:
        """Delete the paths created since :meth:`watch` and return them; nothing when the command had
        already written a checkpoint (it trained: what it wrote is history)."""
        created = sorted(self._listing() - self._before, key=lambda p: len(p.parts))
        if any(path.suffix == ".ckpt" for path in created):
            return []
        removed: list[Path] = []
        for path in created:
            if any(parent in removed for parent in path.parents):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        return removed
