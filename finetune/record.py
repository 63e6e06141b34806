"""The record a fine-tuning checkpoint carries (``checkpoint["finetune"]``), as typed structures.

The module writes it (:meth:`finetune.module.ImageClassifier.on_save_checkpoint`); the loading path
(:mod:`finetune.weights`), the Hub export (:mod:`finetune.export`) and ``visualize`` read it, all
through :class:`CheckpointRecord`. On disk it is plain Python (dicts, lists, str, int, float, bool,
None), so checkpoints load with ``torch.load(path, weights_only=True)``.

Accuracies are fractions in [0, 1]. ``split`` says where a number comes from: ``"val"`` is a part of
the official training split held out for validation (``data.val_split > 0``), ``"test"`` the
official test split (for ImageNet: the official validation set, which the papers report).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from .errors import FinetuneError

__all__ = ["RecordError", "EvalMetrics", "CheckpointRecord", "SPLIT_NAMES", "plain"]

Split = Literal["val", "test"]

#: how logs, summaries and model cards name a split
SPLIT_NAMES: dict[str, str] = {
    "val": "validation split held out from the official training split",
    "test": "official test split",
}


class RecordError(FinetuneError, ValueError):
    """A checkpoint's ``finetune`` record is missing or malformed; the message names the file and key."""


@dataclass(frozen=True)
class EvalMetrics:
    """One evaluation of one set of weights: on ``split``, at training ``epoch`` and optimizer ``step``."""

    top1: float
    top5: float
    mean_class_acc: float
    split: Split
    epoch: int
    step: int
    per_class: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> EvalMetrics:
        if not isinstance(data, dict):
            raise RecordError(f"{where}: expected a mapping of metrics, got {type(data).__name__}")
        for key in ("top1", "top5", "mean_class_acc"):
            value = data.get(key)
            if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
                raise RecordError(f"{where}.{key}={value!r}: expected a fraction in [0, 1]")
        if data.get("split") not in SPLIT_NAMES:
            raise RecordError(f"{where}.split={data.get('split')!r}: expected one of {sorted(SPLIT_NAMES)}")
        return cls(
            top1=float(data["top1"]),
            top5=float(data["top5"]),
            mean_class_acc=float(data["mean_class_acc"]),
            split=data["split"],
            epoch=int(data.get("epoch", -1)),
            step=int(data.get("step", -1)),
            per_class={str(k): float(v) for k, v in (data.get("per_class") or {}).items()},
        )


@dataclass
class CheckpointRecord:
    """What a fine-tuning checkpoint says about its weights, beside the ``state_dict``.

    ``metrics`` is the evaluation of exactly the weights in the checkpoint (``None`` when they were
    never evaluated, e.g. a checkpoint written on Ctrl-C in the middle of an epoch); ``best`` is the
    run's best validation so far, which may belong to other weights (another checkpoint file).
    ``pretrained`` names the base weights: a timm name (``timm``: the weights timm registers for
    ``model_name``), ``hf-hub:owner/name``, ``local-dir:PATH``, a file path, or ``None``.
    """

    KEY: ClassVar[str] = "finetune"

    model_name: str
    num_classes: int
    class_names: list[str]
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data_config: dict[str, Any] = field(default_factory=dict)
    metrics: EvalMetrics | None = None
    best: EvalMetrics | None = None
    pretrained: str | None = None
    ema: bool = False
    dataset: str = "unknown"
    config_yaml: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Any, where: str) -> CheckpointRecord:
        """Read a record written by :meth:`to_dict` (or by earlier versions, whose ``metrics`` were the
        best validation of the run); errors name ``where`` and the key."""
        if not isinstance(data, dict):
            raise RecordError(
                f"{where}: no '{cls.KEY}' record; expected a checkpoint written by the fine-tuning module "
                "(to start from other weights use --model.pretrained PATH)"
            )
        for key, kind in (("model_name", str), ("num_classes", int)):
            if not isinstance(data.get(key), kind):
                raise RecordError(f"{where}: {cls.KEY}.{key}={data.get(key)!r}: expected a {kind.__name__}")
        names = list(data.get("class_names") or [str(i) for i in range(data["num_classes"])])
        if len(names) != data["num_classes"]:
            raise RecordError(
                f"{where}: {cls.KEY}.class_names has {len(names)} names for num_classes={data['num_classes']}"
            )
        legacy = "best" not in data and "per_class_accuracy" in data  # metrics held the run's best
        metrics = None if legacy else data.get("metrics") or None
        best = data.get("metrics") if legacy else data.get("best") or None
        return cls(
            model_name=data["model_name"],
            num_classes=int(data["num_classes"]),
            class_names=[str(n) for n in names],
            model_kwargs=dict(data.get("model_kwargs") or {}),
            data_config=dict(data.get("data_config") or {}),
            metrics=None if metrics is None else EvalMetrics.from_dict(metrics, f"{where}: {cls.KEY}.metrics"),
            best=None if best is None else EvalMetrics.from_dict(best, f"{where}: {cls.KEY}.best"),
            pretrained=data.get("pretrained"),
            ema=bool(data.get("ema", False)),
            dataset=str(data.get("dataset") or "unknown"),
            config_yaml=data.get("config_yaml"),
        )

    @classmethod
    def from_checkpoint(cls, checkpoint: Any, where: str) -> CheckpointRecord:
        record = checkpoint.get(cls.KEY) if isinstance(checkpoint, dict) else None
        return cls.from_dict(record, where)


def plain(value: Any) -> Any:
    """Plain Python containers and scalars only (dataclass settings such as an RPEConfig become dicts),
    so a checkpoint loads with ``weights_only=True`` and a config serialises to JSON."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "__dict__"):
        return plain(vars(value))
    return str(value)
