"""Experiment trackers in the run folder: Weights & Biases and MLflow, as Lightning's loggers.

``--trainer.logger WandbLogger`` / ``MLFlowLogger`` (or a ``trainer.logger`` list in a YAML config) log
to these services; :func:`place_trackers` points the settings a user left at Lightning's defaults
into ``--run_dir``, before the loggers are created:

- W&B: ``save_dir`` = the run folder, so its files are ``<run_dir>/wandb/``; offline (``wandb sync``
  uploads later) unless an API key is set (``WANDB_API_KEY`` or ``wandb login``) or ``mode`` is given.
- MLflow: ``tracking_uri`` = ``sqlite:///<run_dir>/mlflow.db`` with artifacts under
  ``<run_dir>/mlruns`` (MLflow 3 refuses its old file store ``file:./mlruns`` by default), unless a
  tracking URI is given (flag or ``MLFLOW_TRACKING_URI``).

Each tracker's runs accumulate in these files, so the run folder keeps every command's history, as it
does for ``metrics.csv``. The packages are optional extras: ``pip install 'rpe-finetune[wandb]'``,
``'rpe-finetune[mlflow]'``.
"""

from __future__ import annotations

import importlib
import netrc
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import UsageError

__all__ = ["TRACKER_PACKAGES", "finish_tracker_runs", "place_trackers", "wandb_api_key_set"]

# Lightning logger class name -> the package it needs (the extra of the same name installs it)
TRACKER_PACKAGES = {"WandbLogger": "wandb", "MLFlowLogger": "mlflow"}


def place_trackers(logger_config: Any, run_dir: Path) -> list[str]:
    """Point the W&B / MLflow loggers of ``trainer.logger`` (parsed, not yet instantiated: a namespace with
    ``class_path`` and ``init_args``, or a list of them) into ``run_dir``; returns one note per tracker.

    Raises :class:`UsageError` when a tracker's package is not installed.
    """
    entries = logger_config if isinstance(logger_config, list) else [logger_config]
    notes = []
    for entry in entries:
        class_name = str(getattr(entry, "class_path", "")).rsplit(".", 1)[-1]
        package = TRACKER_PACKAGES.get(class_name)
        if package is None:
            continue
        try:
            importlib.import_module(package)
        except ImportError:
            raise UsageError(
                f"--trainer.logger {class_name} needs the {package} package: pip install 'rpe-finetune[{package}]'"
            ) from None
        args = entry.init_args
        run_dir.mkdir(parents=True, exist_ok=True)
        if class_name == "WandbLogger":
            notes.append(_place_wandb(args, run_dir))
        else:
            notes.append(_place_mlflow(args, run_dir))
    return notes


def _place_wandb(args: Any, run_dir: Path) -> str:
    if args.save_dir in (None, ".") and args.dir is None:
        args.save_dir = str(run_dir)
    folder = Path(args.save_dir or args.dir) / "wandb"
    online_chosen = args.get("mode") is not None or os.environ.get("WANDB_MODE")
    if not args.offline and not online_chosen and not args.log_model and not wandb_api_key_set():
        args.offline = True
        return f"W&B logs offline to {folder} (no API key; upload with: wandb sync {folder}/offline-run-*)"
    return f"W&B logs to {folder}"


def _place_mlflow(args: Any, run_dir: Path) -> str:
    if args.tracking_uri is None and args.save_dir == "./mlruns":
        args.tracking_uri = f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"
        if args.artifact_location is None:
            args.artifact_location = str(run_dir.resolve() / "mlruns")
    return f"MLflow logs to {args.tracking_uri or args.save_dir} (experiment {args.experiment_name})"


def wandb_api_key_set() -> bool:
    """Whether W&B has an API key: ``WANDB_API_KEY`` or a ``wandb login`` entry in ``~/.netrc``."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def finish_tracker_runs() -> None:
    """End the W&B run of the command that just ran (one command, one W&B run): Lightning leaves it open
    until the process exits, so a next command in the same process would log into it."""
    wandb = sys.modules.get("wandb")
    if wandb is not None:
        wandb.finish()
