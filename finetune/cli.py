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
- Checkpoints: ``checkpoint.*`` flags configure Lightning's ModelCheckpoint (``last.ckpt`` every epoch
  and on Ctrl-C/SIGTERM; ``best-epochNNN.ckpt`` when ``checkpoint.monitor`` is set); files are written
  to a temporary name and renamed into place (:class:`finetune.checkpoint_io.AtomicCheckpointIO`).
- The run folder (``--run_dir``, recipes set ``runs/<recipe>``) keeps its whole history
  (:mod:`finetune.run_folder`): ``fit`` logs to it and a resume appends; ``validate``, ``test`` and
  ``predict`` write ``<run_dir>/<command>/version_N/``; a command that fails on bad input takes back
  what it created. W&B and MLflow loggers (``--trainer.logger WandbLogger`` / ``MLFlowLogger``) keep
  their files in the run folder too (:mod:`finetune.tracking`).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentError
from lightning import Callback, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

import datamodules  # noqa: F401  (imported so that --data accepts short class names: --data.help CUB200DataModule)
from datamodules import DataError, ImageClassificationDataModule

from .callbacks import (
    LAST_CHECKPOINT,
    CheckpointSettings,
    EpochProgressBar,
    PushToHubCallback,
    RunSummary,
    checkpoint_callbacks,
)
from .checkpoint_io import AtomicCheckpointIO
from .errors import FinetuneError, UsageError
from .module import ImageClassifier
from .predict import ImagePaths, ImagePathsDataModule, PredictionWriter, list_images
from .record import CheckpointRecord
from .run_folder import (
    CommandConfig,
    CreatedFilesGuard,
    HistoryCSVLogger,
    next_config_name,
    next_version_dir,
    training_history,
)
from .tracking import finish_tracker_runs, place_trackers
from .weights import read_checkpoint

__all__ = ["main", "FinetuneCLI", "EXTRA_COMMANDS", "RECIPES_DIR", "UsageError", "resolve_recipe", "run_cli"]

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
# Module settings an evaluation command takes from its own flags: LightningCLI otherwise replaces every
# model setting with the hyperparameters of the --ckpt_path checkpoint (saved by fit, tta "none").
EVALUATION_SETTINGS = ("tta", "tta_crop_pct")

# Extra subcommands: name -> "module:function"; the function takes the remaining argv (a list of
# str) and returns an exit code (or None for 0).
EXTRA_COMMANDS: dict[str, str] = {
    "push": "finetune.commands:push_main",
    "convert": "finetune.commands:convert_main",
    "visualize": "finetune.visualize:main",
    "kfold": "finetune.kfold:main",
    "shards": "datamodules.shards:main",
}


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


# --------------------------------------------------------------------------- the CLI
class FinetuneCLI(LightningCLI):
    """LightningCLI with this project's defaults, links, run folder and predict wiring.

    ``guard`` records what the run folder held before the command, so that :func:`main` can take back
    what a command that failed on bad input created.
    """

    def __init__(self, *args: Any, guard: CreatedFilesGuard | None = None, **kwargs: Any) -> None:
        self.guard = guard if guard is not None else CreatedFilesGuard()
        self.log_dir: Path | None = None
        self.evaluation_settings: dict[str, Any] = {}
        kwargs.setdefault("save_config_callback", CommandConfig)  # the config in the command's own folder
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(CheckpointSettings, "checkpoint")
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
            help="Folder of the run: fit's metrics.csv, TensorBoard events, config.yaml and checkpoints/ "
            "(a resume with --ckpt_path last continues them); validate/test/predict write "
            "<run_dir>/<command>/version_N/.",
        )
        parser.add_argument(
            "--push_to_hub",
            type=str | None,
            default=None,
            help="fit: at the end, export the best (else last) checkpoint and push it to this Hub repo (owner/name).",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then check ``--ckpt_path`` before Lightning reads it: the file must be a complete checkpoint
        of the fine-tuning module, and ``fit`` must resume it with the model it holds."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand is None:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last":
            ckpt_path = str(Path(config.run_dir) / "checkpoints" / f"{LAST_CHECKPOINT}.ckpt")
            if not Path(ckpt_path).is_file():
                return  # Lightning starts afresh (with a warning): "last" may be set before the first run
        elif ckpt_path is None or ckpt_path in ("best", "hpc", "registry"):
            return
        record = CheckpointRecord.from_checkpoint(read_checkpoint(ckpt_path), f"--ckpt_path {ckpt_path}")
        model_name = config.model.model_name
        if subcommand == "fit" and record.model_name != model_name:
            raise UsageError(
                f"--ckpt_path {ckpt_path} holds a {record.model_name} model but the recipe/flags train {model_name}; "
                f"resume it with --model.model_name {record.model_name}, or start {model_name} from its weights "
                f"with --model.pretrained {ckpt_path} (without --ckpt_path)"
            )
        if subcommand != "fit":
            self.evaluation_settings = {name: config.model[name] for name in EVALUATION_SETTINGS}
            if record.model_name != model_name:
                rank_zero_info(
                    f"--ckpt_path {ckpt_path} holds model {record.model_name}: {subcommand} evaluates it as saved "
                    f"(the recipe/flags name {model_name})"
                )

    def before_instantiate_classes(self) -> None:
        if self.subcommand is None:
            return
        for name, value in self.evaluation_settings.items():  # over the checkpoint's
            self.config[self.subcommand].model[name] = value
        run_dir = Path(self._get(self.config, "run_dir"))
        self.guard.watch(run_dir)
        data = self._get(self.config, "data")
        data_class = _data_class(data.class_path) if data is not None and data.get("class_path") else None
        # predict reads --prediction.inputs and only takes the datamodule's transforms
        if self.subcommand != "predict" and data_class and issubclass(data_class, ImageClassificationDataModule):
            data_class.check_root(dict(data.get("init_args") or {}))  # before the model downloads its weights
        logger_config = self._get(self.config, "trainer").get("logger")
        if logger_config not in (None, True, False):
            for note in place_trackers(logger_config, run_dir):
                rank_zero_info(note)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={})
        run_dir = Path(self._get(self.config_init, "run_dir"))
        ckpt_path = self._get(self.config_init, "ckpt_path")
        # Rich progress bar unless the run turns progress bars off (Lightning refuses both at once).
        callbacks: list[Callback] = [RunSummary()]
        if trainer_config.get("enable_progress_bar") is not False:
            callbacks.insert(0, EpochProgressBar())
        # every command has fit's checkpoint callbacks (only fit saves), so a --ckpt_path of the run
        # restores their state into the same folder instead of Lightning warning about a changed dirpath
        settings = self._get(self.config_init, "checkpoint")
        callbacks += checkpoint_callbacks(run_dir / "checkpoints", settings, fitting=self.subcommand == "fit")
        if self.subcommand == "fit":
            history = training_history(run_dir)
            if ckpt_path is None and history:
                raise UsageError(
                    f"--run_dir {run_dir} already holds a training run ({history[0]}); resume it with "
                    "--ckpt_path last, or give a new --run_dir"
                )
            self.log_dir = run_dir
            repo_id = self._get(self.config_init, "push_to_hub", default=None)
            if repo_id:
                callbacks.append(PushToHubCallback(repo_id))
            if ckpt_path is not None:  # resuming: the sanity check would draw from the restored RNG streams
                kwargs["num_sanity_val_steps"] = 0
        else:
            self.log_dir = next_version_dir(run_dir / str(self.subcommand))
        self.save_config_kwargs = {
            "folder": self.log_dir,
            "config_filename": next_config_name(self.log_dir),
            "overwrite": False,
        }
        self.trainer_defaults["callbacks"] = callbacks
        if trainer_config.get("logger") in (None, True):
            loggers: list[Logger] = [HistoryCSVLogger(self.log_dir)]
            if self.subcommand == "fit":
                loggers.append(TensorBoardLogger(save_dir=self.log_dir, name="", version=""))
            kwargs["logger"] = loggers
        if trainer_config.get("default_root_dir") is None:  # where the trainer writes without loggers
            kwargs["default_root_dir"] = str(self.log_dir)
        if not trainer_config.get("plugins"):
            kwargs["plugins"] = [AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    def after_instantiate_classes(self) -> None:
        if self.subcommand is not None:
            self.model.config_yaml = self._parser(self.subcommand).dump(
                self.config[self.subcommand], skip_unset=False
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


def _data_class(class_path: str) -> type | None:
    """The class a ``--data`` class path names (None when it names no class)."""
    module_name, _, name = class_path.rpartition(".")
    data_class = getattr(importlib.import_module(module_name), name, None) if module_name else None
    return data_class if isinstance(data_class, type) else None


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
    usage = (
        "Fine-tune vision transformers with 2D relative position encodings. Usage: cli.py "
        "{fit,validate,test,predict} [--recipe NAME] [--config FILE] [--KEY VALUE ...]; also cli.py push "
        "(export a checkpoint and upload it to the Hugging Face Hub), cli.py convert (an official release -> "
        "a Hub-ready folder) and cli.py visualize (buckets, priors, attention, curves), each with --help."
    )
    return {
        "description": usage,
        **sub,
        **{name: sub for name in FinetuneCLI.subcommands()},
    }


class _NoProductTips(logging.Filter):
    """Drops Lightning's "💡 Tip: ... try installing litlogger / litmodels" lines, printed on every fit."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def run_cli(argv: Sequence[str], guard: CreatedFilesGuard | None = None) -> FinetuneCLI:
    """Parse ``argv`` (recipes expanded) and run the subcommand; errors propagate."""
    # argv is always passed explicitly (expanded), which Lightning warns about when sys.argv also has args.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    # Lightning 2.6 builds torch's deprecated LeafSpec on every step (a FutureWarning from torch 2.10 on):
    # nothing a user of this CLI can act on.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
    lightning_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoProductTips) for f in lightning_log.filters):
        lightning_log.addFilter(_NoProductTips())
    try:
        return FinetuneCLI(
            ImageClassifier,
            None,
            args=expand_recipe(argv),
            parser_kwargs=_parser_kwargs(),
            auto_configure_optimizers=False,
            guard=guard,
        )
    finally:
        finish_tracker_runs()


def _raised_by(package: str, error: BaseException) -> bool:
    """Whether ``error`` was raised by code of ``package`` itself (its innermost frame is there)."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    name = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
    return name == package or name.startswith(package + ".")


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
    guard = CreatedFilesGuard()
    try:
        run_cli(argv, guard)
    except SIGTERMException:
        print("interrupted (SIGTERM); resume with: --ckpt_path last", file=sys.stderr)
        return 1
    except BaseException as error:
        message = _bad_input_message(error)
        if message is None:
            raise
        guard.remove_created()
        return _fail(message)
    return 0


def _bad_input_message(error: BaseException) -> str | None:
    """The one-line report of an error caused by bad input, or None for any other error."""
    if isinstance(error, (FinetuneError, DataError, FileNotFoundError, NotADirectoryError)):
        return _one_line(error)
    cause = _data_error_cause(error)
    if cause is not None:  # jsonargparse wraps what a datamodule's constructor raises
        return _one_line(cause)
    if isinstance(error, (ValueError, OSError)) and _raised_by("datamodules", error):
        return _one_line(error)  # the datamodules' checks of annotation files: one line naming the file
    if isinstance(error, ArgumentError):
        detail = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        return f"{detail[:400]} (see --help)"
    if isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError)
        and ("can't allocate memory" in str(error) or "out of memory" in str(error).lower())
    ):
        return (
            "out of memory: lower --data.batch_size (raise --trainer.accumulate_grad_batches to keep the "
            "effective batch size) or use --trainer.precision bf16-mixed"
        )
    if isinstance(error, RuntimeError) and "Error(s) in loading state_dict" in str(error):
        detail = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), "")
        return f"the weights do not fit the model ({detail}); is the checkpoint for another architecture?"
    return None


def _data_error_cause(error: BaseException | None) -> DataError | None:
    """The datamodules' :class:`DataError` behind ``error`` (its cause or context chain), if any."""
    seen: set[int] = set()
    while error is not None and not isinstance(error, DataError) and id(error) not in seen:
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return error if isinstance(error, DataError) else None


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2
