"""The fine-tuning LightningModule: any timm model with a new head, its optimisation and its metrics.

``ImageClassifier`` wraps a timm model (registered names, the iRPE and SP-ViT backbones of this
package, ``hf-hub:`` ids), puts a head for the datamodule's classes on it, and trains it with
AdamW/SGD, layer-wise learning-rate decay, cosine schedule with linear warmup (stepped per
iteration), label smoothing, Mixup/CutMix, drop path and an EMA of the weights.

The number of classes and their names are learned from ``trainer.datamodule`` in ``setup()``
(datamodules only know them once their files exist, which for the demo is after ``prepare_data``);
a checkpoint carries them, so ``predict`` and ``load_from_checkpoint`` need no dataset.

Checkpoint contract: ``state_dict`` holds the timm model under ``model.``; with EMA enabled its
averaged copy under ``ema.module.`` (same keys after the prefix). ``checkpoint["finetune"]`` is a
:class:`finetune.record.CheckpointRecord` (model, classes, data config, the metrics of exactly these
weights and the split they come from, the run's best, base weights, config), written as plain Python
so checkpoints load with ``torch.load(path, weights_only=True)``.

Validation metrics are logged under the name of the split they come from: ``val/*`` when the
datamodule holds out part of the training split (``data.val_split > 0``), ``test/*`` when its
validation set is the official test split (``data.val_split 0``).

Channels-last memory format is off by default: ViT/DeiT spend their time in matmuls on token
tensors, where it does nothing; turn ``channels_last`` on for convolutional models (e.g. SP-ViT's
conv stem on GPU, timm ConvNets).
"""

from __future__ import annotations

import fnmatch
import math
import random
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from timm.data import Mixup, resolve_model_data_config
from timm.layers import to_2tuple
from timm.loss import SoftTargetCrossEntropy
from timm.models import group_parameters
from timm.utils import ModelEmaV3
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

import finetune  # noqa: F401  (registers the iRPE / SP-ViT backbones with timm)
from finetune.errors import FinetuneError
from finetune.record import SPLIT_NAMES, CheckpointRecord, EvalMetrics, plain
from finetune.resize import resolution_args
from finetune.weights import create_model

__all__ = ["ImageClassifier", "FinetuneConfigError"]

Strategy = Literal["full", "linear_probe", "freeze_then_unfreeze"]


class FinetuneConfigError(FinetuneError, ValueError):
    """A setting of the module does not fit the model, the data or the trainer."""


class ImageClassifier(L.LightningModule):
    """Fine-tune a timm model for image classification.

    Args:
        model_name: timm model name, ``hf-hub:owner/name[@revision]`` or ``local-dir:FOLDER``.
        pretrained: ``False`` (random init), ``True`` (the weights of timm's pretrained cfg, of the Hub
            repo or of the folder) or a path: a release file, ``.safetensors``, an exported folder or a
            checkpoint of this module (:func:`finetune.weights.create_model`; a head with the data's
            class count is kept).
        model_kwargs: extra ``timm.create_model`` keywords (``img_size``, ``drop_path_rate``,
            ``depth``, ``rpe_config``, ...).
        num_classes: head size; ``None`` takes it from the datamodule at ``setup``.
        class_names: class names; ``None`` takes them from the datamodule at ``setup``.
        finetune_strategy: ``full``; ``linear_probe`` (backbone frozen and in eval mode, only the head
            trains); ``freeze_then_unfreeze`` (linear probe until ``unfreeze_epoch``, then the backbone
            trains too, at ``backbone_lr_scale`` times the learning rate).
        backbone_lr_scale: learning-rate factor for every non-head parameter.
        optimizer: ``adamw`` or ``sgd`` (momentum, nesterov).
        lr: peak learning rate of the head (and of the last layer under layer decay).
        layer_decay: layer-wise lr decay factor (BEiT-style, timm's group matcher); ``None`` = off.
        warmup_epochs: linear warmup length, in epochs (may be fractional).
        min_lr: the cosine schedule ends at ``min_lr / lr`` times each group's peak lr.
        label_smoothing: label smoothing of the cross entropy (also applied to Mixup targets).
        mixup, cutmix: Mixup / CutMix alphas; either > 0 enables timm's ``Mixup``.
        ema: keep an exponential moving average of the weights; validation and test then use it.
        compile: ``torch.compile`` the model (in place, so checkpoint keys do not change).
        channels_last: convert model and inputs to channels-last (helps convnets on GPU).
        dataset_name: name recorded in the checkpoint; default: the datamodule class name.
        eval_crop_pct: centre-crop fraction of evaluation images in place of the model's pretrained
            ``crop_pct`` (DeiT and SP-ViT evaluate at 384 with 1.0); the datamodule, the checkpoint and
            the exported Hub config take it.
    """

    def __init__(
        self,
        model_name: str = "deit_small_patch16_224_ctx_product_50_shared_k",
        pretrained: bool | str = False,
        model_kwargs: dict[str, Any] | None = None,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        finetune_strategy: Strategy = "full",
        unfreeze_epoch: int = 0,
        backbone_lr_scale: float = 1.0,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 5e-4,
        weight_decay: float = 0.05,
        momentum: float = 0.9,
        layer_decay: float | None = None,
        warmup_epochs: float = 5.0,
        min_lr: float = 1e-6,
        label_smoothing: float = 0.1,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        ema: bool = False,
        ema_decay: float = 0.9998,
        compile: bool = False,
        channels_last: bool = False,
        dataset_name: str | None = None,
        eval_crop_pct: float | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)  # the run's config*.yaml holds them
        if finetune_strategy == "freeze_then_unfreeze" and unfreeze_epoch < 1:
            raise FinetuneConfigError(
                f"finetune_strategy freeze_then_unfreeze needs unfreeze_epoch >= 1 (got {unfreeze_epoch}); "
                "set model.unfreeze_epoch or use finetune_strategy full"
            )
        if eval_crop_pct is not None and not 0.0 < eval_crop_pct <= 1.0:
            raise FinetuneConfigError(f"model.eval_crop_pct={eval_crop_pct!r}: expected a fraction in (0, 1]")
        self.model = _create_model(model_name, pretrained, model_kwargs or {})
        self.data_config = _data_config(self.model, model_kwargs or {})
        if eval_crop_pct is not None:
            self.data_config["crop_pct"] = float(eval_crop_pct)
        self.num_classes: int | None = None
        self.class_names: list[str] | None = None
        self.ema: ModelEmaV3 | None = None
        self.mixup_fn: Mixup | None = None
        self.config_yaml: str | None = None  # the run's full config, set by the CLI
        self.validation_split = "val"  # "test" when the datamodule validates on its official test split
        self.measured: EvalMetrics | None = None  # the latest evaluation (of the weights at .step)
        self.best_metrics: EvalMetrics | None = None  # the best validation of the run
        if num_classes is not None:
            self._finalize(num_classes, class_names)

    # ------------------------------------------------------------------ building
    def _finalize(self, num_classes: int, class_names: list[str] | None) -> None:
        """Size the head, create EMA, Mixup and metrics once the classes are known (idempotent)."""
        if self.num_classes is not None:
            if num_classes != self.num_classes:  # the callers say which sides differ
                raise FinetuneConfigError(f"num_classes mismatch: {self.num_classes} classes, then {num_classes}")
            if class_names is not None:
                self.class_names = list(class_names)
            return
        if class_names is not None and len(class_names) != num_classes:
            raise FinetuneConfigError(
                f"{len(class_names)} class names for {num_classes} classes; give one name per class"
            )
        self.num_classes = int(num_classes)
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        if self.model.num_classes != num_classes:
            self.model.reset_classifier(num_classes)
        if self.hparams.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.hparams.ema:
            self.ema = ModelEmaV3(self.model, decay=self.hparams.ema_decay, use_warmup=True)
            self.ema.requires_grad_(False)
        h = self.hparams
        if h.mixup > 0 or h.cutmix > 0:
            self.mixup_fn = Mixup(
                mixup_alpha=h.mixup,
                cutmix_alpha=h.cutmix,
                prob=h.mixup_prob,
                switch_prob=h.mixup_switch_prob,
                label_smoothing=h.label_smoothing,
                num_classes=num_classes,
            )
        top_k = min(5, num_classes)
        self.metrics = nn.ModuleDict({split: _make_metrics(num_classes, top_k) for split in ("val", "test")})
        if self.hparams.finetune_strategy == "linear_probe":
            # Frozen before DDP wraps the model and the optimizer is built: the backbone is never trained.
            self._set_backbone_frozen(True)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        num_classes = getattr(datamodule, "num_classes", None)
        if num_classes is not None:
            if self.num_classes is not None and num_classes != self.num_classes:
                raise FinetuneConfigError(
                    f"num_classes mismatch: model.num_classes={self.num_classes} but the data "
                    f"({type(datamodule).__name__}) has {num_classes} classes; remove --model.num_classes "
                    "(the classes come from the data)"
                )
            self._finalize(num_classes, getattr(datamodule, "class_names", None))
        elif self.num_classes is None and stage != "predict":
            raise FinetuneConfigError(
                "the number of classes is unknown: the datamodule exposes no num_classes after setup; "
                "set model.num_classes"
            )
        val_dataset = getattr(datamodule, "val_dataset", None)
        self.validation_split = (
            "test" if val_dataset is not None and val_dataset is getattr(datamodule, "test_dataset", None) else "val"
        )
        if stage == "fit":
            self._check_fit_settings(datamodule)
        if self.hparams.compile and self.num_classes is not None:
            self.model.compile()

    def _check_fit_settings(self, datamodule: Any) -> None:
        """Settings that cannot train, refused before anything is trained or written."""
        batch_size = getattr(datamodule, "batch_size", None)
        if self.mixup_fn is not None and batch_size is not None and batch_size < 2:
            raise FinetuneConfigError(
                f"data.batch_size={batch_size} with Mixup/CutMix (model.mixup={self.hparams.mixup}, "
                f"model.cutmix={self.hparams.cutmix}): timm's Mixup mixes each image with another of the batch; "
                "use --data.batch_size 2 or more, or --model.mixup 0 --model.cutmix 0"
            )
        if self.validation_split != "test":
            return
        for callback in self.trainer.checkpoint_callbacks:
            monitor = getattr(callback, "monitor", None)
            if monitor and monitor.startswith("val/"):
                raise FinetuneConfigError(
                    f"--checkpoint.monitor {monitor}: data.val_split is 0, so validation runs on the official test "
                    "split, and checkpoints must not be selected on it; hold out part of the training split "
                    "(--data.val_split 0.1) or keep the last epoch (--checkpoint.monitor null)"
                )

    def on_fit_start(self) -> None:
        ddp = self.trainer.strategy.model
        if (
            self.hparams.finetune_strategy == "freeze_then_unfreeze"
            and isinstance(ddp, nn.parallel.DistributedDataParallel)
            and not ddp.find_unused_parameters
        ):
            raise FinetuneConfigError(
                "freeze_then_unfreeze under DDP leaves the backbone without gradients while frozen; "
                "use --trainer.strategy ddp_find_unused_parameters_true"
            )

    # ------------------------------------------------------------------ freezing
    def _head_prefixes(self) -> tuple[str, ...]:
        classifier = self.model.pretrained_cfg.get("classifier") or "head"
        names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        return tuple(n for n in names if n)

    def is_head_param(self, name: str) -> bool:
        """Whether a parameter name of ``self.model`` belongs to the classification head."""
        return any(name == p or name.startswith(p + ".") for p in self._head_prefixes())

    def backbone_frozen_at(self, epoch: int) -> bool:
        strategy = self.hparams.finetune_strategy
        return strategy == "linear_probe" or (
            strategy == "freeze_then_unfreeze" and epoch < self.hparams.unfreeze_epoch
        )

    def _set_backbone_frozen(self, frozen: bool) -> None:
        for name, param in self.model.named_parameters():
            if not self.is_head_param(name):
                param.requires_grad_(not frozen)

    def _set_backbone_eval(self) -> None:
        """A frozen backbone is a fixed feature extractor: norms, dropout and drop path in eval mode."""
        self.model.eval()
        for prefix in self._head_prefixes():
            self.model.get_submodule(prefix).train()

    def on_train_epoch_start(self) -> None:
        # Derived from the epoch alone, so a resumed run lands in the right state.
        frozen = self.backbone_frozen_at(self.current_epoch)
        if self.hparams.finetune_strategy == "freeze_then_unfreeze":
            self._set_backbone_frozen(frozen)
        if frozen:
            self._set_backbone_eval()

    # ------------------------------------------------------------------ optimisation
    def param_groups(self) -> list[dict[str, Any]]:
        """Parameter groups with weight decay and the learning-rate scales baked into ``lr``.

        No weight decay on 1-D parameters (biases, norms) and on ``model.no_weight_decay()``
        (pos_embed, cls_token, RPE tables, SP priors). With ``layer_decay``, layer ``i`` of ``n``
        (timm's group matcher; unmatched parameters such as the head join the last layer) gets
        ``layer_decay ** (n - 1 - i)``, the scales of ``timm.optim.param_groups_layer_decay``, but
        baked into ``lr`` because Lightning's schedulers do not read timm's ``lr_scale``. Non-head
        parameters get a further ``backbone_lr_scale``. Each group lists its ``param_names``.
        """
        h = self.hparams
        skip = set(self.model.no_weight_decay()) if hasattr(self.model, "no_weight_decay") else set()
        layer_map: dict[str, int] = {}
        if h.layer_decay is not None:
            if not hasattr(self.model, "group_matcher"):
                raise FinetuneConfigError(
                    f"{h.model_name} has no group_matcher, so layer-wise lr decay is undefined; "
                    "set model.layer_decay null"
                )
            layer_map = group_parameters(self.model, self.model.group_matcher(coarse=False), reverse=True)
        last = max(layer_map.values(), default=0)  # the head (unmatched) shares the last layer, as in timm
        groups: dict[tuple[int, bool, bool], dict[str, Any]] = {}
        for name, param in self.model.named_parameters():
            if not param.requires_grad and not (
                h.finetune_strategy == "freeze_then_unfreeze" and not self.is_head_param(name)
            ):
                continue
            no_decay = param.ndim <= 1 or any(fnmatch.fnmatch(name, pattern) for pattern in skip)
            layer = layer_map.get(name, last) if h.layer_decay is not None else 0
            head = self.is_head_param(name)
            scale = h.layer_decay ** (last - layer) if h.layer_decay is not None else 1.0
            if not head:
                scale *= h.backbone_lr_scale
            key = (layer, no_decay, head)
            if key not in groups:
                groups[key] = {
                    "params": [],
                    "param_names": [],
                    "lr": h.lr * scale,
                    "weight_decay": 0.0 if no_decay else h.weight_decay,
                }
            groups[key]["params"].append(param)
            groups[key]["param_names"].append(name)
        return [groups[k] for k in sorted(groups)]

    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        groups = self.param_groups()
        if h.optimizer == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=h.lr, weight_decay=h.weight_decay)
        else:
            optimizer = torch.optim.SGD(groups, lr=h.lr, momentum=h.momentum, nesterov=True)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = max(1, self.trainer.max_epochs or 1)
        warmup = int(round(total * h.warmup_epochs / epochs))
        floor = min(1.0, h.min_lr / h.lr) if h.lr > 0 else 0.0
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(warmup, total, floor))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step + 1)

    # ------------------------------------------------------------------ steps
    def forward(self, x: Tensor) -> Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def _eval_net(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        if self.mixup_fn is not None:
            if len(x) % 2:  # timm's batch Mixup pairs a batch with its reverse: needs an even size
                x, y = x[:-1], y[:-1]
            if len(x) == 0:
                raise FinetuneConfigError(
                    f"a training batch of 1 image (batch {batch_idx}) cannot be mixed (model.mixup/cutmix): the "
                    "training set is smaller than data.batch_size; lower --data.batch_size or set --model.mixup 0 "
                    "--model.cutmix 0"
                )
            x, soft = self.mixup_fn(x, y)
            loss = SoftTargetCrossEntropy()(self(x), soft)
        else:
            loss = F.cross_entropy(self(x), y, label_smoothing=self.hparams.label_smoothing)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True)
        lr = max(group["lr"] for group in self.trainer.optimizers[0].param_groups)
        self.log("train/lr", lr, on_step=True, on_epoch=False)
        return loss

    def _eval_step(self, batch: tuple[Tensor, Tensor], split: str) -> None:
        x, y = batch
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = self._eval_net()(x)
        name = self.validation_split if split == "val" else split
        self.log(f"{name}/loss", F.cross_entropy(logits, y), on_epoch=True, sync_dist=True)
        self.metrics[split].update(logits, y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """Top-k class indices and probabilities (k = min(5, num_classes)) of a batch ``(images, ...)``."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        probs = self._eval_net()(x).float().softmax(dim=-1)
        scores, indices = probs.topk(min(5, probs.shape[-1]), dim=-1)
        return {"indices": indices, "scores": scores}

    def _eval_epoch_end(self, split: str) -> None:
        if self.trainer.sanity_checking:  # a couple of batches: nothing worth reporting
            self.metrics[split].reset()
            return
        # compute() synchronises the states across ranks: every rank must call it.
        values = self.metrics[split].compute()
        self.metrics[split].reset()
        name = self.validation_split if split == "val" else split
        measured = EvalMetrics(
            top1=float(values["top1"]),
            top5=float(values["top5"]),
            mean_class_acc=float(values["mean_class_acc"]),
            split=name,
            epoch=int(self.current_epoch),
            step=int(self.global_step),
            per_class=dict(zip(self.class_names, values["per_class"].tolist(), strict=True)),
        )
        for key in ("top1", "top5", "mean_class_acc"):
            self.log(f"{name}/{key}", getattr(measured, key), prog_bar=key == "top1", sync_dist=True)
        self.measured = measured
        if name == "val" and (self.best_metrics is None or measured.top1 > self.best_metrics.top1):
            self.best_metrics = measured
        # trainer.log_dir broadcasts from rank 0: every rank must ask, before the rank-0-only plot.
        self._save_confusion_matrix(values["confusion"], name, self.trainer.log_dir)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    @rank_zero_only
    def _save_confusion_matrix(self, confusion: Tensor, split: str, log_dir: str | None) -> None:
        if log_dir is None:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = confusion.shape[0]
        size = min(16.0, 4.0 + n * 0.25)
        fig, ax = plt.subplots(figsize=(size, size))
        image = ax.imshow(confusion.float().cpu().numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
        if n <= 30:
            ax.set_xticks(range(n), self.class_names, rotation=90, fontsize=7)
            ax.set_yticks(range(n), self.class_names, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{SPLIT_NAMES[split]}: confusion matrix (row-normalised), epoch {self.current_epoch}", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046)
        fig.tight_layout()
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        fig.savefig(Path(log_dir) / f"confusion_matrix_{split}.png", dpi=100)
        plt.close(fig)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_record(self) -> CheckpointRecord:
        """The ``checkpoint["finetune"]`` record of the current weights (see :mod:`finetune.record`)."""
        h = self.hparams
        pretrained = h.pretrained
        source = None if pretrained is False else ("timm" if pretrained is True else str(pretrained))
        if source == "timm" and h.model_name.startswith("hf-hub:"):
            source = h.model_name
        dataset = h.dataset_name
        if dataset is None:
            datamodule = getattr(self._attached_trainer(), "datamodule", None)
            dataset = type(datamodule).__name__ if datamodule is not None else "unknown"
        measured = self.measured
        return CheckpointRecord(
            model_name=h.model_name,
            num_classes=int(self.num_classes or 0),
            class_names=list(self.class_names or []),
            # the settings a resolution change set on load (strategy, training grid), so the export rebuilds it
            model_kwargs=plain({**(h.model_kwargs or {}), **resolution_args(self.model)}),
            data_config=plain(self.data_config),
            # only an evaluation of exactly these weights: a mid-epoch (Ctrl-C) checkpoint has none
            metrics=measured if measured is not None and measured.step == self.global_step else None,
            best=self.best_metrics,
            pretrained=source,
            ema=bool(h.ema),
            dataset=dataset,
            config_yaml=self.config_yaml,
        )

    def _attached_trainer(self) -> L.Trainer | None:
        """The trainer, or None when there is none (``load_from_checkpoint``, a module used on its own)."""
        try:
            return self.trainer
        except RuntimeError:  # Lightning's "not attached to a `Trainer`"
            return None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CheckpointRecord.KEY] = self.checkpoint_record().to_dict()
        checkpoint["rng_states"] = _rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        record = CheckpointRecord.from_checkpoint(checkpoint, "--ckpt_path")
        if record.model_name != self.hparams.model_name:
            raise FinetuneConfigError(
                f"the checkpoint is for model {record.model_name!r} but the model is "
                f"{self.hparams.model_name!r}; set --model.model_name {record.model_name} or use another checkpoint"
            )
        if self.num_classes is not None and record.num_classes != self.num_classes:
            raise FinetuneConfigError(
                f"num_classes mismatch: the checkpoint has {record.num_classes} classes but the data has "
                f"{self.num_classes}; use it on the dataset it was trained on ({record.dataset}), or fine-tune "
                f"its weights on this one with --model.pretrained PATH (no --ckpt_path)"
            )
        self._finalize(record.num_classes, record.class_names)
        self.measured = record.metrics
        self.best_metrics = record.best
        self.config_yaml = self.config_yaml or record.config_yaml
        trainer = self._attached_trainer()
        if trainer is not None and trainer.state.fn == "fit" and checkpoint.get("rng_states"):
            # Resuming: continue the interrupted run's RNG streams (shuffling, Mixup, drop path). The
            # first training dataloader iterator is created right after this hook, as in the
            # uninterrupted run (the CLI turns the sanity check off when resuming: it would draw from
            # the RNG in between).
            _set_rng_states(checkpoint["rng_states"])


def _make_metrics(num_classes: int, top_k: int) -> MetricCollection:
    return MetricCollection(
        {
            "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
            "top5": MulticlassAccuracy(num_classes, top_k=top_k, average="micro"),
            "mean_class_acc": MulticlassAccuracy(num_classes, average="macro"),
            "per_class": MulticlassAccuracy(num_classes, average="none"),
            "confusion": MulticlassConfusionMatrix(num_classes, normalize="true"),
        },
        compute_groups=False,
    )


def _create_model(model_name: str, pretrained: bool | str, model_kwargs: dict[str, Any]) -> nn.Module:
    """The timm model with the weights ``pretrained`` names (:func:`finetune.weights.create_model`); the
    head for the data's classes is put on in ``_finalize``."""
    if isinstance(pretrained, str) and not Path(pretrained).expanduser().exists():
        raise FinetuneConfigError(
            f"model.pretrained {pretrained!r} does not exist; give a checkpoint file or an exported folder, "
            "true (timm/Hub weights) or false"
        )
    return create_model(model_name, pretrained, **model_kwargs)


def _data_config(model: nn.Module, model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Input size, mean/std, interpolation and crop_pct of the model (``img_size`` override applied)."""
    config = resolve_model_data_config(model)
    input_size = list(config["input_size"])
    if model_kwargs.get("img_size") is not None:
        input_size[1:] = list(to_2tuple(model_kwargs["img_size"]))
    return {
        "input_size": [int(v) for v in input_size],
        "mean": [float(v) for v in config["mean"]],
        "std": [float(v) for v in config["std"]],
        "interpolation": str(config["interpolation"]),
        "crop_pct": float(config["crop_pct"]),
    }


def _rng_states() -> dict[str, Any]:
    """Global RNG states (torch, CUDA, numpy, random) as tensors and plain types (``weights_only``-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(state), gauss_next],
    }


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, state, gauss_next = states["python"]
    random.setstate((version, tuple(state), gauss_next))


def _warmup_cosine(warmup: int, total: int, floor: float):
    """LR factor at optimizer step ``step``: linear warmup to 1, then cosine down to ``floor``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
