"""The fine-tuning LightningModule: any timm model with a new head, its optimisation and its metrics.

``ImageClassifier`` wraps a timm model (registered names, the iRPE and SP-ViT backbones of this
package, ``hf-hub:`` ids), puts a head for the datamodule's classes on it, and trains it with
AdamW/SGD, layer-wise learning-rate decay, timm's cosine schedule with linear warmup (stepped per
optimizer step, sized from the training loader the run really uses), the learning rate scaled by the
global batch, label smoothing, Mixup/CutMix, drop path and an EMA of the weights (see ``finetune.optim``).

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

import math
import random
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from timm.data import Mixup, resolve_model_data_config
from timm.layers import to_2tuple
from timm.scheduler.scheduler import Scheduler as TimmScheduler
from timm.utils import ModelEmaV3
from torch import Tensor, nn
from torch.distributed.fsdp import FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

import finetune  # noqa: F401  (registers the iRPE / SP-ViT backbones with timm)
from datamodules.machine import CpuThreads
from finetune.callbacks import BAR_DRAWS_PER_SECOND
from finetune.distillation import DistillationKind, distillation_loss
from finetune.ema import ShardedEma
from finetune.errors import FinetuneError
from finetune.optim import build_schedule, global_batch_size, loader_batch_size, plan_param_groups
from finetune.record import SPLIT_NAMES, CheckpointRecord, EvalMetrics, plain
from finetune.resize import resolution_args
from finetune.weights import create_model

__all__ = ["ImageClassifier", "FinetuneConfigError"]

# EMA under FSDP was tested on torch 2.14; on 2.11 (the lower bound) FSDP's full state dict segfaults
# cloning the gathered weights at the first evaluation.
FSDP_EMA_MIN_TORCH = "2.14"

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
        lr: peak learning rate of the head (and of the last layer under layer decay) for a global batch
            of ``base_batch_size`` images; the run uses ``lr * global_batch / base_batch_size`` with
            ``global_batch = processes x batch size x accumulate_grad_batches`` (DeiT's linear rule,
            timm's ``--lr-base``), and prints it. A ``LearningRateFinder``'s choice replaces it.
        base_batch_size: the global batch ``lr`` is stated for; ``None`` uses ``lr`` as is.
        layer_decay: layer-wise lr decay factor (timm's ``param_groups_layer_decay``); ``None`` = off.
        warmup_epochs: linear warmup length, in epochs of the training loader (may be fractional).
        warmup_lr: the warmup starts from this lr (times each group's scale).
        min_lr: the cosine schedule ends at this lr (times each group's scale), as in timm.
        label_smoothing: label smoothing of the cross entropy (also applied to Mixup targets).
        class_weighting: ``balanced`` weights the training loss of class ``c`` by
            ``images / (classes * images of c)`` (from the datamodule's ``class_counts()``, for
            imbalanced data); ``none`` = unweighted. A class-balanced sampler is the datamodule's
            ``sampler: class_balanced``.
        mixup, cutmix: Mixup / CutMix alphas; either > 0 enables timm's ``Mixup``.
        teacher: distil from this teacher (see ``finetune.distillation``): a checkpoint of this toolkit
            (``.ckpt``; its EMA weights when it has them) or a timm model name / ``hf-hub:`` id created
            with ``pretrained=True`` and this run's ``num_classes`` (``teacher_kwargs`` override, e.g.
            ``pretrained_cfg_overlay: {file: PATH}``). It runs in eval mode, is never trained and is not
            saved in this model's checkpoints. ``None`` = no distillation.
        distillation: ``soft`` (KL at temperature ``distillation_tau``) or ``hard`` (teacher's top class).
        distillation_alpha: weight of the distillation term; the classification loss gets ``1 - alpha``.
        tta: test-time augmentation for ``test`` and ``predict``: the softmax probabilities (and the
            embeddings) of several views of each evaluation image are averaged, and the logits reported are
            their log (``softmax`` of them gives the averaged probabilities back). ``flip``: the image and
            its mirror image; ``five_crop``: crops of ``tta_crop_pct`` of the image's height and width at
            its four corners and its centre, each resized back to the input size (torchvision's
            ``five_crop``); ``ten_crop``: those five and their mirror images (``ten_crop``); ``none``:
            the image alone, logits as they are.
        tta_crop_pct: side of the ``five_crop`` / ``ten_crop`` crops, as a fraction of the image's.
        ema: keep an exponential moving average of the weights; validation and test then use it. Under
            FSDP it is the average of each process's shards (``finetune.ema``); checkpoints hold the full
            averaged weights all the same.
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
        base_batch_size: int | None = None,
        weight_decay: float = 0.05,
        momentum: float = 0.9,
        layer_decay: float | None = None,
        warmup_epochs: float = 5.0,
        warmup_lr: float = 1e-6,
        min_lr: float = 1e-6,
        label_smoothing: float = 0.1,
        class_weighting: Literal["none", "balanced"] = "none",
        mixup: float = 0.0,
        cutmix: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        teacher: str | None = None,
        teacher_kwargs: dict[str, Any] | None = None,
        distillation: DistillationKind = "soft",
        distillation_alpha: float = 0.5,
        distillation_tau: float = 1.0,
        tta: Literal["none", "flip", "five_crop", "ten_crop"] = "none",
        tta_crop_pct: float = 0.875,
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
        if not 0.0 <= distillation_alpha <= 1.0:
            raise FinetuneConfigError(
                f"model.distillation_alpha={distillation_alpha!r}: expected a value in [0, 1]"
            )
        if distillation_tau <= 0:
            raise FinetuneConfigError(
                f"model.distillation_tau={distillation_tau!r}: expected a positive temperature"
            )
        if base_batch_size is not None and base_batch_size < 1:
            raise FinetuneConfigError(
                f"model.base_batch_size={base_batch_size!r}: expected a positive integer or null"
            )
        if not 0.0 < tta_crop_pct <= 1.0:
            raise FinetuneConfigError(f"model.tta_crop_pct={tta_crop_pct!r}: expected a fraction in (0, 1]")
        if eval_crop_pct is not None and not 0.0 < eval_crop_pct <= 1.0:
            raise FinetuneConfigError(f"model.eval_crop_pct={eval_crop_pct!r}: expected a fraction in (0, 1]")
        self.model = _create_model(model_name, pretrained, model_kwargs or {})
        self.data_config = _data_config(self.model, model_kwargs or {})
        if eval_crop_pct is not None:
            self.data_config["crop_pct"] = float(eval_crop_pct)
        # one image: Lightning's model summary then reports FLOPs and input/output shapes
        self.example_input_array = torch.zeros(1, *self.data_config["input_size"])
        self.num_classes: int | None = None
        self.class_names: list[str] | None = None
        self.ema: ModelEmaV3 | None = None
        self._epoch_losses: dict[str, tuple[Tensor, int]] = {}  # name -> (sum of loss x images, images)
        self._step_losses_logged_at = -math.inf
        self.sharded_ema: ShardedEma | None = None  # the EMA under FSDP, in place of ema (see _fsdp_ema)
        self.fsdp_eval_nets: tuple[nn.Module, ...] = ()  # its gathered weights while evaluating (not a submodule)
        self.mixup_fn: Mixup | None = None
        self.config_yaml: str | None = None  # the run's full config, set by the CLI
        self.validation_split = "val"  # "test" when the datamodule validates on its official test split
        self.measured: EvalMetrics | None = None  # the latest evaluation (of the weights at .step)
        self.best_metrics: EvalMetrics | None = None  # the best validation of the run
        self.teacher_nets: tuple[nn.Module, ...] = ()  # a tuple, so the teacher is no submodule (not saved)
        self.predict_embeddings = False  # predict_step also returns pre-logits embeddings (set by the writer)
        self.loss_weights: Tensor | None = None  # per class, with class_weighting balanced (set in setup)
        self.param_plan: list[dict[str, Any]] = []  # see finetune.optim.plan_param_groups
        self.schedule_sizing: tuple[float, int, int] | None = None  # (lr, warmup steps, total steps) in use
        self.configured_lr: float | None = None  # model.lr when the schedule was sized
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
        self.param_plan = self._plan_param_groups()
        if self.hparams.ema:
            self.ema = ModelEmaV3(self.model, decay=self.hparams.ema_decay, use_warmup=True)
            self.ema.requires_grad_(False)
            # timm puts the copy in eval mode; it only runs in validation/test/predict, where Lightning sets
            # eval mode on the whole module, so train mode here is equivalent and spares Lightning's
            # "modules in eval mode at the start of training" warning
            self.ema.train()
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
        if h.teacher is not None:
            self.teacher_nets = (self._create_teacher(num_classes),)
            if hasattr(
                self.model, "set_distilled_training"
            ):  # DeiT's distillation token trains on the teacher
                self.model.set_distilled_training(True)
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
        if stage == "fit" and self.hparams.class_weighting == "balanced":
            self.loss_weights = _balanced_class_weights(datamodule)
        if self.hparams.compile and self.num_classes is not None:
            self.model.compile()
        if self.ema is not None and isinstance(self.trainer.strategy, FSDPStrategy):
            if torch.__version__ < FSDP_EMA_MIN_TORCH:
                raise FinetuneConfigError(
                    f"model.ema under FSDP needs torch >= {FSDP_EMA_MIN_TORCH} (torch {torch.__version__} crashes "
                    "gathering the averaged weights in FSDP's full state dict); set --model.ema false or upgrade torch"
                )
            # A full copy would not be sharded like the model (FSDP would flatten it into the module's own
            # shards): the EMA of the shards (finetune.ema) replaces it once the model is sharded. The
            # checkpoints' ema.module.* keys have no module to load into: _fsdp_ema reads them itself.
            # Evaluation gathers the averages into an unsharded copy (_use_fsdp_ema).
            self.ema = None
            self.strict_loading = False

    # ------------------------------------------------------------------ EMA under FSDP
    def _fsdp_ema(self) -> ShardedEma | None:
        """Under FSDP with ``model.ema``: the EMA of this process's shards, created on first use (after the
        model is sharded and a checkpoint restored), from the checkpoint's EMA weights when it has them."""
        if not self.hparams.ema or not isinstance(self.trainer.strategy, FSDPStrategy):
            return None
        if self.sharded_ema is None:
            self.sharded_ema = ShardedEma(self.model, self.hparams.ema_decay)
            if self.trainer.ckpt_path:
                self._load_sharded_ema(self.trainer.ckpt_path)
        return self.sharded_ema

    def _load_sharded_ema(self, path: str | Path) -> None:
        if Path(path).is_dir():
            raise FinetuneConfigError(
                f"--ckpt_path {path} is a sharded FSDP checkpoint folder; model.ema under FSDP reads its averages "
                "from a full checkpoint file (FSDPStrategy state_dict_type full, the default)"
            )
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
        prefix = "ema.module."
        averaged = {f"model.{k[len(prefix):]}": v for k, v in state.items() if k.startswith(prefix)}
        if not averaged:  # a checkpoint without EMA: the average starts from its weights
            return
        root = self.trainer.strategy.model
        with self.sharded_ema.applied(), FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT):
            root.load_state_dict(averaged, strict=False)  # collective: every rank loads its shards
            self.sharded_ema.take_current()

    def _gather_fsdp_ema(self) -> dict[str, Tensor]:
        """The full averaged weights, as ``self.model.state_dict()`` names them, on every rank (collective)."""
        root = self.trainer.strategy.model
        config = FullStateDictConfig(offload_to_cpu=True, rank0_only=False)
        with self.sharded_ema.applied(), FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT, config):
            state = root.state_dict()
        prefix = "model."
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    def _use_fsdp_ema(self, use: bool) -> None:
        """Under FSDP with ``model.ema``, an evaluation epoch runs an unsharded model holding the gathered
        averages (created at its start, dropped at its end), as an unsharded run evaluates its EMA copy."""
        if self._fsdp_ema() is None:
            return
        self.fsdp_eval_nets = ()
        if not use:
            return
        h = self.hparams
        net = _create_model(h.model_name, False, h.model_kwargs or {})
        if net.num_classes != self.num_classes:
            net.reset_classifier(self.num_classes)
        net.load_state_dict(self._gather_fsdp_ema())
        if h.channels_last:
            net.to(memory_format=torch.channels_last)
        self.fsdp_eval_nets = (net.to(self.device).requires_grad_(False).eval(),)

    def on_train_start(self) -> None:
        self._fsdp_ema()

    def on_validation_epoch_start(self) -> None:
        self._use_fsdp_ema(True)

    def on_test_epoch_start(self) -> None:
        self._use_fsdp_ema(True)

    def on_predict_epoch_start(self) -> None:
        self._use_fsdp_ema(True)

    def on_predict_epoch_end(self) -> None:
        self._use_fsdp_ema(False)

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
        for teacher in self.teacher_nets:
            teacher.to(self.device).eval()
        # Tuners (BatchSizeFinder, LearningRateFinder) run in the callbacks' on_fit_start, before this
        # hook: size the schedule for the batch and the lr they left.
        self._adopt_found_lr()
        config = self.trainer.lr_scheduler_configs[0]
        config.scheduler = self._schedule(config.scheduler.optimizer)

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
        self._epoch_losses.clear()
        # Derived from the epoch alone, so a resumed run lands in the right state.
        frozen = self.backbone_frozen_at(self.current_epoch)
        if self.hparams.finetune_strategy == "freeze_then_unfreeze":
            self._set_backbone_frozen(frozen)
        if frozen:
            self._set_backbone_eval()

    # ------------------------------------------------------------------ optimisation
    def _plan_param_groups(self) -> list[dict[str, Any]]:
        h = self.hparams
        if h.layer_decay is not None and not hasattr(self.model, "group_matcher"):
            raise FinetuneConfigError(
                f"{h.model_name} has no group_matcher, so layer-wise lr decay is undefined; "
                "set model.layer_decay null"
            )
        return plan_param_groups(
            self.model, h.weight_decay, h.layer_decay, self.is_head_param, h.backbone_lr_scale
        )

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups, with each group's ``lr_scale`` folded into ``lr``.

        No weight decay on anything but the weights of linear, convolution and embedding layers, nor on
        ``model.no_weight_decay()`` (pos_embed, cls_token, RPE tables, SP priors): decided by module and
        name, so FSDP's flattened parameters keep it. With ``layer_decay``, timm's
        ``param_groups_layer_decay`` scales (unmatched parameters such as the head join the top layer).
        Non-head parameters get a further ``backbone_lr_scale``; under ``linear_probe`` only the head
        is optimised. Each group has ``name``, ``param_names``, ``lr_scale`` and
        ``lr = model.lr * lr_scale`` (before the global-batch scaling of :meth:`effective_lr`).
        """
        head_only = self.hparams.finetune_strategy == "linear_probe"
        return [
            {**group, "params": list(group["params"]), "lr": self.hparams.lr * group["lr_scale"]}
            for group in self.param_plan
            if not head_only or group["name"].startswith("head")
        ]

    def effective_lr(self) -> float:
        """``lr`` scaled from ``base_batch_size`` to the global batch of the training loader in use."""
        h = self.hparams
        if h.base_batch_size is None:
            return float(h.lr)
        return float(h.lr) * self.global_batch_size() / h.base_batch_size

    def global_batch_size(self) -> int:
        trainer = self.trainer
        batch = loader_batch_size(trainer.train_dataloader)
        return global_batch_size(batch, trainer.world_size, trainer.accumulate_grad_batches)

    def _adopt_found_lr(self) -> None:
        """A LearningRateFinder sets ``lr`` to the lr it found at the current batch: keep that lr, restated
        per ``base_batch_size`` so that ``lr`` keeps its meaning (and the checkpoint its value)."""
        h = self.hparams
        if h.base_batch_size is None or h.lr == self.configured_lr:
            return
        found = float(h.lr)
        h.lr = found * h.base_batch_size / self.global_batch_size()
        rank_zero_info(
            f"learning-rate finder: {found:.4g} at this batch (lr {h.lr:.4g} per {h.base_batch_size})"
        )

    def _schedule(self, optimizer: torch.optim.Optimizer) -> TimmScheduler:
        """timm's warmup + cosine over the optimizer steps of the training loader in use (see finetune.optim)."""
        h = self.hparams
        trainer = self.trainer
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise FinetuneConfigError(
                "the lr schedule needs a finite run: set trainer.max_epochs or trainer.max_steps"
            )
        steps_per_epoch = max(1, math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches))
        warmup = min(round(h.warmup_epochs * steps_per_epoch), int(total) - 1)  # at least one cosine step
        sizing = (self.effective_lr(), max(0, warmup), int(total))
        schedule = build_schedule(optimizer, sizing[0], h.min_lr, h.warmup_lr, sizing[1], sizing[2])
        schedule.step_update(self.global_step)  # a resumed run continues where it stopped
        if sizing != self.schedule_sizing:
            self._report_schedule(sizing)
        self.schedule_sizing = sizing
        self.configured_lr = float(h.lr)
        return schedule

    def _report_schedule(self, sizing: tuple[float, int, int]) -> None:
        h = self.hparams
        lr, warmup, total = sizing
        if h.base_batch_size is None:
            source = "model.lr"
        else:
            trainer = self.trainer
            source = (
                f"{h.lr:.4g} x {self.global_batch_size()} / {h.base_batch_size} (global batch = "
                f"{trainer.world_size} process(es) x {loader_batch_size(trainer.train_dataloader)} images x "
                f"{trainer.accumulate_grad_batches} accumulated)"
            )
        rank_zero_info(
            f"learning rate {lr:.4g} = {source}; warmup {warmup} steps, cosine to {h.min_lr:.3g} at step {total}"
        )

    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        groups = self.param_groups()
        if h.optimizer == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=h.lr, weight_decay=h.weight_decay)
        else:
            optimizer = torch.optim.SGD(groups, lr=h.lr, momentum=h.momentum, nesterov=True)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self._schedule(optimizer), "interval": "step"},
        }

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        if isinstance(scheduler, TimmScheduler):  # timm's schedulers take the number of optimizer steps
            scheduler.step_update(self.global_step)
        else:  # a tuner's (e.g. the learning-rate finder's) torch scheduler
            super().lr_scheduler_step(scheduler, metric)

    def configure_callbacks(self) -> list[Callback]:
        # CPU threads from the machine unless chosen; the lr of every parameter group, per optimizer step
        callbacks: list[Callback] = [CpuThreads()]
        if self.trainer.loggers:
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        return callbacks

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step + 1)
        if self.sharded_ema is not None:
            self.sharded_ema.update(step=self.global_step + 1)

    # ------------------------------------------------------------------ steps
    def forward(self, x: Tensor) -> Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def _eval_net(self) -> nn.Module:
        if self.fsdp_eval_nets:
            return self.fsdp_eval_nets[0]
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
            x, soft = self.mixup_fn(x, y)  # smoothed, mixed class probabilities
            outputs = self(x)
            logits, distilled = outputs if isinstance(outputs, tuple) else (outputs, outputs)
            loss = F.cross_entropy(logits, soft, weight=self._loss_weights())
        else:
            outputs = self(x)
            logits, distilled = outputs if isinstance(outputs, tuple) else (outputs, outputs)
            loss = F.cross_entropy(
                logits, y, weight=self._loss_weights(), label_smoothing=self.hparams.label_smoothing
            )
        if self.teacher_nets:
            h = self.hparams
            with torch.no_grad():
                teacher_logits = self.teacher_nets[0](x)
            distill = distillation_loss(distilled, teacher_logits, h.distillation, h.distillation_tau)
            loss = (1 - h.distillation_alpha) * loss + h.distillation_alpha * distill
            self._log_training_losses({"train/loss": loss, "train/distillation_loss": distill}, len(x))
        else:
            self._log_training_losses({"train/loss": loss}, len(x))
        return loss

    def _log_training_losses(self, losses: dict[str, Tensor], batch_size: int) -> None:
        """``{name}_step`` and ``{name}_epoch`` (the epoch's mean, weighted by batch size) of every loss,
        the names ``self.log(name, on_step=True, on_epoch=True)`` gives, at a fraction of its cost.

        ``self.log`` costs about 1 ms a call (Lightning copies its record of the metric each time),
        2.5% of the demo's training step. The step values go through it on the steps a logger writes
        (every ``trainer.log_every_n_steps``) and when the progress bar's value is older than one of its
        draws; they are this process's losses (no collective a step; the step is chosen by time, which
        differs between processes). The epoch means are summed here and logged once, synced across
        processes, in ``on_train_epoch_end`` (before checkpoint and early-stopping callbacks read them).
        """
        for name, value in losses.items():
            total, images = self._epoch_losses.get(name, (0.0, 0))
            self._epoch_losses[name] = (value.detach() * batch_size + total, images + batch_size)
        every = self.trainer.log_every_n_steps
        now = time.monotonic()
        logger_writes = every > 0 and (self.trainer.global_step + 1) % every == 0
        if logger_writes or now - self._step_losses_logged_at >= 1 / BAR_DRAWS_PER_SECOND:
            for name, value in losses.items():
                self.log(f"{name}_step", value, on_step=True, on_epoch=False, prog_bar=name == "train/loss",
                         batch_size=batch_size)
            self._step_losses_logged_at = now

    def on_train_epoch_end(self) -> None:
        for name, (total, images) in self._epoch_losses.items():
            self.log(f"{name}_epoch", total / images, on_step=False, on_epoch=True, prog_bar=name == "train/loss",
                     sync_dist=True)

    def _create_teacher(self, num_classes: int) -> nn.Module:
        h = self.hparams
        if h.teacher.endswith(".ckpt"):
            if not Path(h.teacher).expanduser().is_file():
                raise FinetuneConfigError(
                    f"model.teacher {h.teacher!r} does not exist; give a checkpoint file"
                )
            classifier = ImageClassifier.load_from_checkpoint(
                Path(h.teacher).expanduser(), map_location="cpu"
            )
            teacher = classifier._eval_net()
        else:
            kwargs = {"pretrained": True, "num_classes": num_classes, **(h.teacher_kwargs or {})}
            teacher = _create_model(h.teacher, kwargs.pop("pretrained"), kwargs)
        head = teacher.get_classifier() if hasattr(teacher, "get_classifier") else None
        classes = getattr(teacher, "num_classes", getattr(head, "out_features", num_classes))
        if classes != num_classes:
            raise FinetuneConfigError(
                f"the teacher {h.teacher!r} predicts {classes} classes but the data has {num_classes}; "
                "give a teacher trained on this dataset"
            )
        return teacher.requires_grad_(False).eval()

    def _loss_weights(self) -> Tensor | None:
        return None if self.loss_weights is None else self.loss_weights.to(self.device)

    def tta_views(self, x: Tensor) -> list[Tensor]:
        """The views of a batch of evaluation images that ``model.tta`` averages over (see the class doc)."""
        tta = self.hparams.tta
        if tta == "flip":
            return [x, x.flip(-1)]
        if tta in ("five_crop", "ten_crop"):
            height, width = x.shape[-2:]
            pct = self.hparams.tta_crop_pct
            size = [max(1, round(height * pct)), max(1, round(width * pct))]
            crops = TF.ten_crop(x, size) if tta == "ten_crop" else TF.five_crop(x, size)
            mode = "bicubic" if self.data_config["interpolation"] == "bicubic" else "bilinear"
            return [F.interpolate(crop, size=(height, width), mode=mode, align_corners=False) for crop in crops]
        return [x]

    def _eval_outputs(self, x: Tensor, tta: bool, embeddings: bool) -> tuple[Tensor, Tensor | None]:
        """Logits (and pre-logits embeddings) of the evaluation net; with TTA, the log of the softmax
        probabilities averaged over the views (and the mean embedding)."""
        net = self._eval_net()
        views = self.tta_views(x) if tta else [x]
        logits, embeds = [], []
        for view in views:
            if self.hparams.channels_last:
                view = view.contiguous(memory_format=torch.channels_last)
            if embeddings:
                features = net.forward_features(view)
                logits.append(net.forward_head(features))
                embeds.append(net.forward_head(features, pre_logits=True))
            else:
                logits.append(net(view))  # forward itself: what model.compile compiled
        embedding = torch.stack(embeds).mean(0) if embeddings else None
        if len(logits) == 1:
            return logits[0], embedding
        probabilities = torch.stack(logits).float().softmax(-1).mean(0)
        return probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny).log(), embedding  # no -inf

    def _eval_step(self, batch: tuple[Tensor, Tensor], split: str) -> None:
        x, y = batch
        logits, _ = self._eval_outputs(x, tta=split == "test", embeddings=False)
        name = self.validation_split if split == "val" else split
        self.log(f"{name}/loss", F.cross_entropy(logits, y), on_epoch=True, sync_dist=True)
        self.metrics[split].update(logits, y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """``logits`` of a batch ``(images, ...)`` in float32, and ``embeddings`` when
        ``predict_embeddings`` is set (see ``finetune.predict``)."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        logits, embeddings = self._eval_outputs(x, tta=True, embeddings=self.predict_embeddings)
        outputs = {"logits": logits.float()}
        if embeddings is not None:
            outputs["embeddings"] = embeddings.float()
        return outputs

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
        # the run's own folder (the CLI's run_dir or command folder), whatever loggers the run has
        self._save_confusion_matrix(values["confusion"], name, self.trainer.default_root_dir)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")
        self._use_fsdp_ema(False)  # before the callbacks' on_validation_end saves checkpoints

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")
        self._use_fsdp_ema(False)

    @rank_zero_only
    def _save_confusion_matrix(self, confusion: Tensor, split: str, folder: str) -> None:
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
        Path(folder).mkdir(parents=True, exist_ok=True)
        fig.savefig(Path(folder) / f"confusion_matrix_{split}.png", dpi=100)
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
        if self.sharded_ema is not None:
            self._add_sharded_ema(checkpoint)

    def _add_sharded_ema(self, checkpoint: dict[str, Any]) -> None:
        """The full EMA weights under ``ema.module.*``, as an unsharded run writes them (collective)."""
        checkpoint["state_dict"].update({f"ema.module.{k}": v for k, v in self._gather_fsdp_ema().items()})

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


def _balanced_class_weights(datamodule: Any) -> Tensor:
    """``images / (classes * images of c)`` per class c (0 for a class without training images)."""
    if not hasattr(datamodule, "class_counts"):
        raise FinetuneConfigError(
            f"model.class_weighting balanced needs class counts, which {type(datamodule).__name__} does not "
            "give (no class_counts()); use class_weighting none"
        )
    counts = torch.tensor(datamodule.class_counts(), dtype=torch.float32)
    weights = counts.sum() / (len(counts) * counts.clamp(min=1))
    return torch.where(counts > 0, weights, torch.zeros_like(weights))


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
