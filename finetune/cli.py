"""The command line: LightningCLI with recipes, plus a dispatch point for extra subcommands.

``python cli.py fit --recipe cub200 --data.root PATH`` loads ``recipes/cub200.yaml`` (or a YAML path)
first, then ``--config`` files and flags in order (later wins). Subcommands: ``fit``, ``validate``,
``test``, ``predict`` (Lightning's), and whatever ``EXTRA_COMMANDS`` names.

Wiring decisions:

- ``num_classes`` / ``class_names``: the model learns them from ``trainer.datamodule`` in its
  ``setup`` (the datamodule only knows them once its files exist, e.g. after the demo's
  ``prepare_data``), or from a checkpoint; so they are stated nowhere in a recipe.
- The data config goes the other way, model -> data, at instantiation: the datamodule's
  ``img_size``, ``mean``, ``std``, ``interpolation`` and ``crop_pct`` are the model's pretrained
  config (with ``model_kwargs.img_size`` applied), so a recipe states the model once.
- Checkpoints: ``checkpoint.*`` flags configure a ModelCheckpoint (monitor ``val/top1``, ``last.ckpt``
  always, also on Ctrl-C/SIGTERM) whose files are written to a temporary name and renamed into place.
- Loggers: CSV and TensorBoard, both writing to ``--run_dir`` (default ``runs/default``; recipes set
  ``runs/<recipe>``) with no version subfolder, so ``--ckpt_path last`` finds the previous run's
  ``last.ckpt`` there; the saved config.yaml is overwritten, so a second run is never blocked.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentError
from lightning import Callback, LightningDataModule, LightningModule, Trainer
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from datamodules import DataError

from .backbones.checkpoint import CheckpointMismatchError
from .hub import ExportError, HubError, PushToHubCallback
from .module import FinetuneConfigError, ImageClassifier
from .predict import PredictionWriter

__all__ = ["main", "FinetuneCLI", "EXTRA_COMMANDS", "RECIPES_DIR", "UsageError", "resolve_recipe"]

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"

# Extra subcommands: name -> "module:function"; the function takes the remaining argv (a list of
# str) and returns an exit code (or None for 0).
EXTRA_COMMANDS: dict[str, str] = {
    "push": "finetune.hub:push_main",
    "convert": "finetune.hub:convert_main",
    "visualize": "finetune.visualize:main",
    "kfold": "finetune.kfold:main",
    "shards": "datamodules.shards:main",
}

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class UsageError(ValueError):
    """Bad command-line input, reported as one line."""


# --------------------------------------------------------------------------- recipes
def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def resolve_recipe(name: str) -> Path:
    """``recipes/NAME.yaml``, or ``name`` itself when it is a YAML file path."""
    path = Path(name).expanduser()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    candidate = RECIPES_DIR / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    raise UsageError(
        f"unknown recipe {name!r}; available: {', '.join(available_recipes())} (or a path to a YAML file)"
    )


def expand_recipe(argv: Sequence[str]) -> list[str]:
    """Replace ``--recipe NAME`` by ``--config recipes/NAME.yaml`` placed right after the subcommand."""
    args, recipes = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--recipe":
            if i + 1 >= len(argv):
                raise UsageError(f"--recipe needs a name; available: {', '.join(available_recipes())}")
            recipes.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--recipe="):
            recipes.append(arg.split("=", 1)[1])
        else:
            args.append(arg)
        i += 1
    if not recipes:
        return args
    configs = [item for recipe in recipes for item in ("--config", str(resolve_recipe(recipe)))]
    at = next((k + 1 for k, a in enumerate(args) if a in FinetuneCLI.subcommands()), 0)
    return args[:at] + configs + args[at:]


# --------------------------------------------------------------------------- checkpoints
class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes local checkpoints to a temporary file in the same folder, then renames it into place.

    An interrupted write (Ctrl-C, SIGKILL, full disk) leaves the previous ``last.ckpt`` intact
    instead of a truncated one. Remote paths (``s3://`` ...) go through Lightning's fsspec writer.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class FinetuneCheckpoint(ModelCheckpoint):
    """ModelCheckpoint with this project's defaults and atomic writes (see ``AtomicCheckpointIO``)."""

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str = "best-epoch{epoch:03d}",
        monitor: str = "val/top1",
        mode: str = "max",
        save_top_k: int = 1,
        save_last: bool = True,
        save_on_exception: bool = True,
        every_n_epochs: int | None = None,
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=monitor,
            mode=mode,
            save_top_k=save_top_k,
            save_last=save_last,
            save_on_exception=save_on_exception,
            every_n_epochs=every_n_epochs,
            auto_insert_metric_name=False,
            enable_version_counter=False,  # one run per run_dir: a re-run replaces, never adds last-v1.ckpt
        )

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Only last.ckpt: Lightning would also write a "best-..." file for a model that may not be the best.
        if self._should_save_on_exception(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            rank_zero_info(
                f"{type(exception).__name__}: saved {self.last_model_path}; resume with --ckpt_path last"
            )

    def _refresh_last(self, trainer: Trainer) -> None:
        # Lightning 2.6 only rewrites last.ckpt when a top-k checkpoint was saved at the same step;
        # a resumable last.ckpt must follow every epoch.
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.dirpath is None:  # the run folder's checkpoints/, whatever loggers the run has (or none)
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        super().setup(trainer, pl_module, stage)


# --------------------------------------------------------------------------- run summary
class RunSummary(Callback):
    """Prints the datamodule's banner (if any) and, after fit, a rich table of the run.

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

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or trainer.interrupted:
            return
        log_dir = trainer.log_dir  # a broadcast from rank 0: every rank must take part
        if not trainer.is_global_zero:
            return
        from rich.table import Table

        best = getattr(pl_module, "best_metrics", None) or {}
        ckpt = trainer.checkpoint_callback
        table = Table(title="fine-tuning summary", show_header=False)
        table.add_row("model", str(pl_module.hparams.get("model_name")))
        table.add_row("best val top-1", f"{100 * best['top1']:.2f}%" if best else "n/a")
        table.add_row("best val top-5", f"{100 * best['top5']:.2f}%" if best else "n/a")
        table.add_row("best val mean-class acc.", f"{100 * best['mean_class_acc']:.2f}%" if best else "n/a")
        table.add_row("best epoch", str(best.get("epoch", "n/a")))
        table.add_row("best checkpoint", getattr(ckpt, "best_model_path", "") or "n/a")
        table.add_row("last checkpoint", getattr(ckpt, "last_model_path", "") or "n/a")
        table.add_row("log dir", str(log_dir))
        table.add_row("wall time", f"{time.perf_counter() - self.start:.1f} s")
        if self.train_seconds > 0:
            table.add_row("training speed", f"{self.images / self.train_seconds:.1f} images/s (this process)")
        _console().print(table)
        self._notes(trainer, pl_module)


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=False)


# --------------------------------------------------------------------------- predict
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


# --------------------------------------------------------------------------- the CLI
class FinetuneCLI(LightningCLI):
    """LightningCLI with this project's defaults, links and predict wiring."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(FinetuneCheckpoint, "checkpoint")
        parser.add_lightning_class_args(PredictionWriter, "prediction")
        for key in ("mean", "std", "interpolation", "crop_pct"):
            parser.link_arguments(
                "model", f"data.init_args.{key}", compute_fn=_data_config_getter(key), apply_on="instantiate"
            )
        parser.link_arguments(
            "model", "data.init_args.img_size", compute_fn=_image_size, apply_on="instantiate"
        )
        parser.add_argument(
            "--run_dir",
            type=str,
            default="runs/default",
            help="Folder of the run: CSV + TensorBoard logs, config.yaml, confusion matrices, checkpoints/. "
            "Fixed (no version_N), so --ckpt_path last resumes the run in it.",
        )
        parser.add_argument(
            "--push_to_hub",
            type=str | None,
            default=None,
            help="fit: at the end, export the best checkpoint and push it to this Hub repo (owner/name).",
        )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # Rich progress bar unless the run turns progress bars off (Lightning refuses both at once).
        trainer_config = self._get(self.config_init, "trainer", default={})
        callbacks: list[Callback] = [RunSummary()]
        if trainer_config.get("enable_progress_bar") is not False:
            callbacks.insert(0, RichProgressBar())
        repo_id = self._get(self.config_init, "push_to_hub", default=None)
        if repo_id:
            callbacks.append(PushToHubCallback(repo_id))
        self.trainer_defaults["callbacks"] = callbacks
        run_dir = self._get(self.config_init, "run_dir")
        if trainer_config.get("default_root_dir") is None:  # without our loggers too: checkpoints/ in run_dir
            kwargs["default_root_dir"] = run_dir
        if trainer_config.get("logger") in (None, True):
            kwargs["logger"] = [
                CSVLogger(save_dir=run_dir, name="", version=""),
                TensorBoardLogger(save_dir=run_dir, name="", version=""),
            ]
        return super().instantiate_trainer(**kwargs)

    def after_instantiate_classes(self) -> None:
        if self.subcommand is not None:
            self.model.config_yaml = self._parser(self.subcommand).dump(
                self.config[self.subcommand], skip_none=False
            )

    def before_predict(self) -> None:
        predict_cfg = self._get(self.config_init, "prediction")
        if not predict_cfg.inputs:
            raise UsageError("predict needs images: --prediction.inputs PATH (a folder or image files)")
        ckpt_path = self._get(self.config_init, "ckpt_path")
        if ckpt_path is None and self.model.num_classes is None:
            raise UsageError("predict needs trained weights: --ckpt_path PATH/TO/last.ckpt")
        data = self.datamodule
        transform = getattr(data, "eval_transform", None)
        if transform is None:
            raise UsageError(
                f"{type(data).__name__} has no eval_transform; predict needs a datamodule with one"
            )
        dataset = ImagePaths(list_images(predict_cfg.inputs), transform)
        self.datamodule = ImagePathsDataModule(
            dataset, batch_size=getattr(data, "batch_size", 32), num_workers=getattr(data, "num_workers", 0)
        )


def _data_config_getter(key: str) -> Callable[[ImageClassifier], Any]:
    def get(model: ImageClassifier) -> Any:
        value = model.data_config[key]
        return tuple(value) if isinstance(value, list) else value

    return get


def _image_size(model: ImageClassifier) -> int:
    return int(model.data_config["input_size"][-1])


def _parser_kwargs() -> dict[str, Any]:
    epilog = (
        "--recipe NAME loads recipes/NAME.yaml (or a YAML path) before --config files and flags; "
        f"available: {', '.join(available_recipes())}. Example: cli.py fit --recipe cub200 --data.root PATH"
    )
    sub = {"exit_on_error": False, "epilog": epilog}
    return {
        "description": __doc__.split("\n\n")[0],
        **sub,
        **{name: sub for name in FinetuneCLI.subcommands()},
    }


def run_cli(argv: Sequence[str]) -> FinetuneCLI:
    """Parse ``argv`` (recipes expanded) and run the subcommand; errors propagate."""
    # argv is always passed explicitly (expanded), which Lightning warns about when sys.argv also has args.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    return FinetuneCLI(
        ImageClassifier,
        None,
        args=expand_recipe(argv),
        save_config_kwargs={"overwrite": True},
        parser_kwargs=_parser_kwargs(),
        auto_configure_optimizers=False,
    )


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _dispatch_extra(name: str, argv: list[str]) -> int:
    module_name, function_name = EXTRA_COMMANDS[name].split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    return int(function(argv) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for bad input, 1 for an interrupted run)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EXTRA_COMMANDS:
        return _dispatch_extra(argv[0], argv[1:])
    if os.environ.get("RPE_FINETUNE_DEBUG"):
        run_cli(argv)
        return 0
    try:
        run_cli(argv)
    except (
        UsageError,
        FinetuneConfigError,
        CheckpointMismatchError,
        ExportError,
        HubError,
        DataError,
        FileNotFoundError,
        NotADirectoryError,
    ) as e:
        return _fail(_one_line(e))
    except ValueError as e:  # jsonargparse wraps what a datamodule's constructor raises
        cause = _data_error_cause(e)
        if cause is None:
            raise
        return _fail(_one_line(cause))
    except ArgumentError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        return _fail(f"{detail[:400]} (see --help)")
    except torch.OutOfMemoryError:
        return _fail(
            "out of memory: lower --data.batch_size (raise --trainer.accumulate_grad_batches to keep the "
            "effective batch size) or use --trainer.precision bf16-mixed"
        )
    except SIGTERMException:
        print("interrupted (SIGTERM); resume with: --ckpt_path last", file=sys.stderr)
        return 1
    except RuntimeError as e:
        message = str(e)
        if "Error(s) in loading state_dict" in message:
            detail = next((line.strip() for line in message.splitlines()[1:] if line.strip()), "")
            return _fail(
                f"the weights do not fit the model ({detail}); is the checkpoint for another architecture?"
            )
        if "can't allocate memory" in message or "out of memory" in message.lower():
            return _fail(
                "out of memory: lower --data.batch_size (raise --trainer.accumulate_grad_batches to keep "
                "the effective batch size)"
            )
        raise
    return 0


def _data_error_cause(error: BaseException) -> DataError | None:
    while error is not None and not isinstance(error, DataError):
        error = error.__cause__ or error.__context__
    return error


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2
