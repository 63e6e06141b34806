"""ImageClassifier: parameter groups, fine-tuning strategies, EMA, checkpoint record, bad settings."""

from __future__ import annotations

import copy
import csv
import fnmatch
import json
import math
import os
import socket
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
import torch.distributed as dist
from conftest import TINY, ImageTensors, StopAfterEpochs, quiet_trainer, tiny_classifier
from lightning.pytorch.callbacks import BatchSizeFinder, LearningRateFinder, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import FSDPStrategy
from timm.optim import param_groups_layer_decay
from timm.utils import ModelEmaV3
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import StateDictType
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from finetune.ema import ShardedEma
from finetune.module import FSDP_EMA_MIN_TORCH, FinetuneConfigError, ImageClassifier
from finetune.optim import no_weight_decay_names
from finetune.weights import WeightsError

SPVIT_TINY = dict(depth=2, sp_layers=1, embed_dim=64, num_heads=2, img_size=32)


def lr_and_decay_by_param(groups: list[dict]) -> dict[str, tuple[float, float]]:
    return {name: (g["lr"], g["weight_decay"]) for g in groups for name in g["param_names"]}


def fit(model: ImageClassifier, tmp_path: Path, epochs: int, **trainer_kwargs) -> L.Trainer:
    trainer = quiet_trainer(tmp_path, max_epochs=epochs, **trainer_kwargs)
    trainer.fit(model, datamodule=ImageTensors())
    return trainer


# ----------------------------------------------------------------------------- param groups
def test_no_weight_decay_groups_hold_biases_norms_tokens_and_rpe_tables():
    model = tiny_classifier(weight_decay=0.05)
    by_param = lr_and_decay_by_param(model.param_groups())
    assert set(by_param) == {n for n, p in model.model.named_parameters()}
    no_decay = {n for n, (_, wd) in by_param.items() if wd == 0.0}
    rpe = {n for n in by_param if ".rpe_" in n}
    assert rpe, "the iRPE model must have RPE tables"
    assert {"model.pos_embed", "model.cls_token"} - {f"model.{n}" for n in no_decay} == set()
    assert rpe <= no_decay
    assert {n for n, p in model.model.named_parameters() if p.ndim <= 1} <= no_decay
    assert by_param["head.weight"][1] == 0.05
    assert by_param["blocks.0.attn.qkv.weight"][1] == 0.05


@pytest.mark.parametrize(
    ("model_name", "kwargs"),
    [("irpe_deit_tiny_patch16_224", TINY), ("spvit_small_patch16_224", dict(SPVIT_TINY, num_classes=4))],
)
def test_weight_decay_by_module_and_name_agrees_with_timms_shape_rule_on_unwrapped_models(model_name, kwargs):
    model = timm.create_model(model_name, **kwargs)
    patterns = model.no_weight_decay()
    by_shape = {
        n
        for n, p in model.named_parameters()
        if p.ndim <= 1 or n.endswith(".bias") or any(fnmatch.fnmatch(n, pat) for pat in patterns)
    }
    assert set(no_weight_decay_names(model)) == by_shape


def _check_fsdp_weight_decay() -> None:
    """Weight decay by module and name holds on FSDP's flattened shards."""
    module = tiny_classifier(weight_decay=0.5, layer_decay=0.5)
    decayed = {n for g in module.param_groups() if g["weight_decay"] for n in g["param_names"]}
    names = {p: n for n, p in module.model.named_parameters()}
    block = type(module.model.blocks[0])
    FSDP(
        module.model,
        use_orig_params=True,
        device_id=torch.device("cpu"),
        auto_wrap_policy=ModuleWrapPolicy({block}),
    )
    params = [p for g in module.param_groups() for p in g["params"]]
    assert all(p.ndim == 1 for p in params)  # flattened shards: a shape rule would decay nothing
    before = {p: p.detach().clone() for p in params}
    optimizer = torch.optim.AdamW(module.param_groups(), lr=1.0)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()  # zero gradients: only weight decay moves a parameter, by a factor 1 - lr_scale * 0.5
    for group in optimizer.param_groups:
        for p in group["params"]:
            factor = 1 - group["lr"] * 0.5 if names[p] in decayed else 1.0
            torch.testing.assert_close(p.detach(), before[p] * factor, msg=names[p])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_fsdp_ema() -> None:
    """A tiny model under FSDP and the same model unsharded, trained by the same SGD steps on the same batch
    (FSDP averages the two ranks' equal gradients): the EMA of the shards is the shard of timm's EMA of the
    whole model."""
    torch.manual_seed(0)
    model = timm.create_model("irpe_deit_tiny_patch16_224", **TINY, num_classes=4)
    reference = copy.deepcopy(model)
    reference_ema = ModelEmaV3(reference, decay=0.9, use_warmup=True)
    sharded = FSDP(
        model, use_orig_params=True, device_id=torch.device("cpu"),
        auto_wrap_policy=ModuleWrapPolicy({type(model.blocks[0])}),
    )  # fmt: skip
    ema = ShardedEma(sharded, decay=0.9)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3])
    for net in (sharded, reference):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
        for step in range(1, 4):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
            if net is sharded:
                ema.update(step)
            else:
                reference_ema.update(reference, step=step)
    def full_state() -> dict[str, torch.Tensor]:
        with FSDP.state_dict_type(sharded, StateDictType.FULL_STATE_DICT):
            return sharded.state_dict()

    trained = full_state()
    with ema.applied():
        averaged = full_state()
    restored = full_state()
    with torch.no_grad():  # the model trains on with its own weights, not the averages just gathered
        torch.testing.assert_close(sharded.eval()(x), reference.eval()(x))
    for name, value in reference_ema.module.state_dict().items():
        torch.testing.assert_close(averaged[name], value, msg=name)
        torch.testing.assert_close(restored[name], trained[name], msg=name)  # trained weights back
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(trained[name], value, msg=name)
    assert not torch.allclose(averaged["head.weight"], trained["head.weight"])


def _fsdp_rank(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        _check_fsdp_weight_decay()
        _check_fsdp_ema()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_shards_keep_weight_decay_and_an_ema_equal_to_timms_on_two_cpu_processes():
    torch.multiprocessing.spawn(_fsdp_rank, args=(_free_port(),), nprocs=2)


class CpuFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy, which accepts only GPUs as such: a subclass runs on CPU processes (gloo)."""


class CpuShardedClassifier(ImageClassifier):
    """Wraps its timm model in FSDP on the CPU (Lightning's own wrapping asks for a GPU), blocks as units."""

    def configure_model(self) -> None:
        if not isinstance(self.model, FSDP):
            self.model = FSDP(
                self.model, use_orig_params=True, device_id=torch.device("cpu"),
                auto_wrap_policy=ModuleWrapPolicy({type(self.model.blocks[0])}),
            )  # fmt: skip


def _lightning_fsdp_ema_rank(rank: int, port: int, folder: str) -> None:
    """fit with EMA under Lightning's FSDPStrategy on two CPU processes, then validate its checkpoint under FSDP;
    rank 0 writes the last validation of each to ``folder``."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE="2"
    )  # processes started here: Lightning launches none

    def trainer(**kwargs) -> L.Trainer:
        return L.Trainer(
            accelerator="cpu", devices=2, strategy=CpuFSDPStrategy(process_group_backend="gloo"), logger=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=folder,
            **kwargs,
        )  # fmt: skip

    settings = dict(model_name="irpe_deit_tiny_patch16_224", model_kwargs=TINY, num_classes=4, warmup_epochs=0)
    settings.update(ema=True, ema_decay=0.5, lr=1e-2)
    fitting = trainer(max_epochs=2, callbacks=[ModelCheckpoint(dirpath=folder, filename="fsdp")])
    fitting.fit(CpuShardedClassifier(**settings), datamodule=ImageTensors())
    validating = trainer()
    validating.validate(CpuShardedClassifier(**settings), ImageTensors(), ckpt_path=f"{folder}/fsdp.ckpt")
    if rank == 0:
        for name, run in (("fit", fitting), ("validate", validating)):
            metrics = {k: float(v) for k, v in run.callback_metrics.items() if k.startswith("val/")}
            Path(folder, f"{name}.json").write_text(json.dumps(metrics))


@pytest.mark.slow
def test_ema_under_lightning_fsdp_evaluates_and_saves_the_averaged_weights(tmp_path):
    if torch.__version__ < FSDP_EMA_MIN_TORCH:  # the lower-bound run: refused in one line, before training
        with pytest.raises(Exception, match=f"model.ema under FSDP needs torch >= {FSDP_EMA_MIN_TORCH}"):
            torch.multiprocessing.spawn(_lightning_fsdp_ema_rank, args=(_free_port(), str(tmp_path)), nprocs=2)
        assert not (tmp_path / "fsdp.ckpt").exists()
        return
    torch.multiprocessing.spawn(_lightning_fsdp_ema_rank, args=(_free_port(), str(tmp_path)), nprocs=2)
    state = torch.load(tmp_path / "fsdp.ckpt", weights_only=True)["state_dict"]
    model_keys = {k[len("model.") :] for k in state if k.startswith("model.")}
    assert {k[len("ema.module.") :] for k in state if k.startswith("ema.module.")} == model_keys
    for key in model_keys:  # full tensors, as an unsharded run saves them
        assert state[f"ema.module.{key}"].shape == state[f"model.{key}"].shape, key
    assert not torch.allclose(state["ema.module.head.weight"], state["model.head.weight"])
    # the same checkpoint validated in one process evaluates its ema.module weights (ModelEmaV3)
    single = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )  # fmt: skip
    single.validate(ImageClassifier.load_from_checkpoint(tmp_path / "fsdp.ckpt"), ImageTensors())
    expected = {k: float(v) for k, v in single.callback_metrics.items() if k.startswith("val/")}
    assert set(expected) >= {"val/loss", "val/top1"}
    for name in ("fit", "validate"):  # FSDP's last validation of the fit, and of the checkpoint it saved
        assert json.loads((tmp_path / f"{name}.json").read_text()) == pytest.approx(expected, abs=1e-5), name


def test_layer_decay_matches_timm_scales_baked_into_lr():
    model = tiny_classifier(lr=1.0, layer_decay=0.5)
    ours = lr_and_decay_by_param(model.param_groups())
    timm_groups = param_groups_layer_decay(
        model.model, weight_decay=0.05, no_weight_decay_list=model.model.no_weight_decay(), layer_decay=0.5
    )
    timm_scale = {}
    for group in timm_groups:
        for param in group["params"]:
            name = next(n for n, p in model.model.named_parameters() if p is param)
            timm_scale[name] = group["lr_scale"]
    assert {n: lr for n, (lr, _) in ours.items()} == pytest.approx(timm_scale)
    # depth 2, timm's grouping: stem 0, block 0, block 1 (+ final norm), head on top
    assert ours["head.weight"][0] == 1.0
    assert ours["norm.weight"][0] == ours["blocks.1.attn.qkv.weight"][0] == 0.5
    assert ours["blocks.0.attn.qkv.weight"][0] == 0.25
    assert ours["pos_embed"][0] == ours["patch_embed.proj.weight"][0] == 0.125


def test_backbone_lr_scale_applies_to_every_non_head_parameter():
    model = tiny_classifier(lr=2.0, backbone_lr_scale=0.1)
    ours = lr_and_decay_by_param(model.param_groups())
    for name, (lr, _) in ours.items():
        assert lr == pytest.approx(2.0 if name.startswith("head.") else 0.2), name


class RecordLr(L.Callback):
    """The head's (the highest) lr at every training batch, and each batch's size."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.batch_sizes: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(max(g["lr"] for g in trainer.optimizers[0].param_groups))
        self.batch_sizes.append(len(batch[0]))


def timm_warmup_cosine(
    step: int, lr: float, warmup_lr: float, min_lr: float, warmup: int, total: int
) -> float:
    """The lr timm's CosineLRScheduler(warmup_prefix=True) gives after ``step`` optimizer steps."""
    if step < warmup:
        return warmup_lr + step * (lr - warmup_lr) / warmup
    progress = (step - warmup) / (total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def test_warmup_then_cosine_schedule_is_timms_stepped_per_optimizer_step(tmp_path):
    model = tiny_classifier(lr=1e-3, min_lr=1e-5, warmup_lr=1e-6, warmup_epochs=1)
    record = RecordLr()
    fit(model, tmp_path, epochs=3, callbacks=[record])
    assert len(record.lrs) == 9  # 12 images, batch 5: 3 steps per epoch
    assert model.schedule_sizing == (1e-3, 3, 9)
    expected = [timm_warmup_cosine(t, 1e-3, 1e-6, 1e-5, 3, 9) for t in range(9)]
    assert record.lrs == pytest.approx(expected)
    assert record.lrs[0] == pytest.approx(1e-6) and record.lrs[3] == pytest.approx(1e-3)


def test_lr_is_scaled_by_the_global_batch_and_the_layer_scales_follow(tmp_path):
    # lr 1e-3 is stated for 20 images; this run steps on 5 x 2 accumulated = 10: the lr halves
    model = tiny_classifier(lr=1e-3, base_batch_size=20, layer_decay=0.5)
    record = RecordLr()
    trainer = fit(model, tmp_path, epochs=1, callbacks=[record], accumulate_grad_batches=2)
    assert model.effective_lr() == pytest.approx(5e-4)
    assert record.lrs[0] == pytest.approx(5e-4)
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    assert groups["backbone_depth1"]["lr"] / groups["head_depth0"]["lr"] == pytest.approx(0.5)
    assert groups["backbone_depth1"]["lr_scale"] == 0.5


def test_batch_size_finder_resizes_the_schedule_to_the_loader_in_use(tmp_path):
    model = tiny_classifier(lr=1e-3, min_lr=0.0, warmup_lr=0.0, warmup_epochs=1, base_batch_size=4)
    data = ImageTensors(n=12, batch_size=6)
    record = RecordLr()
    finder = BatchSizeFinder(mode="power", init_val=2, max_trials=2, steps_per_trial=1)
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=[finder, record])
    trainer.fit(model, datamodule=data)
    assert data.batch_size == finder.optimal_batch_size == 4  # 2, then 4 (two trials)
    assert set(record.batch_sizes) == {4}
    steps = 2 * 3  # 12 images in batches of 4, 2 epochs
    assert trainer.global_step == steps
    assert model.schedule_sizing == (1e-3, 3, steps)  # lr for 4 images: base_batch_size 4
    assert record.lrs == pytest.approx(
        [timm_warmup_cosine(t, 1e-3, 0.0, 0.0, 3, steps) for t in range(steps)]
    )


def test_lr_finder_choice_is_the_lr_the_run_uses(tmp_path):
    model = tiny_classifier(lr=1e-3, warmup_epochs=0, base_batch_size=8)
    record = RecordLr()
    finder = LearningRateFinder(min_lr=1e-5, max_lr=1.0, num_training_steps=20, early_stop_threshold=None)
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=[finder, record])
    trainer.fit(model, datamodule=ImageTensors(n=48, batch_size=4))
    found = finder.optimal_lr.suggestion()
    assert found is not None and not math.isclose(found, 1e-3 * 4 / 8)
    steps = 2 * 12
    assert record.lrs[0] == pytest.approx(found)  # step 0 of the run, not the finder's last lr
    assert record.lrs[1:] == pytest.approx(
        [timm_warmup_cosine(t, found, 0, 1e-6, 0, steps) for t in range(1, steps)]
    )
    assert model.hparams.lr == pytest.approx(found * 8 / 4)  # restated per base_batch_size


# ----------------------------------------------------------------------------- strategies
def test_linear_probe_trains_only_the_head_with_a_frozen_eval_mode_backbone(tmp_path):
    model = tiny_classifier(finetune_strategy="linear_probe", model_kwargs={**TINY, "drop_path_rate": 0.5})
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    names = {n for g in model.param_groups() for n in g["param_names"]}
    assert names == {"head.weight", "head.bias"}
    modes: list[tuple[bool, bool]] = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            modes.append((pl_module.model.blocks[0].training, pl_module.model.head.training))

    fit(model, tmp_path, epochs=2, callbacks=[Record()])
    after = model.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.weight", "head.bias"}
    assert modes and all(m == (False, True) for m in modes)  # also after each validation


def test_freeze_then_unfreeze_and_resume_restore_the_frozen_state(tmp_path):
    flags: dict[int, bool] = {}

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            flags[trainer.current_epoch] = pl_module.model.blocks[0].attn.qkv.weight.requires_grad

    settings = dict(
        finetune_strategy="freeze_then_unfreeze", unfreeze_epoch=1, backbone_lr_scale=0.1, lr=1e-3
    )
    model = tiny_classifier(**settings)
    groups = lr_and_decay_by_param(model.param_groups())
    assert "blocks.0.attn.qkv.weight" in groups  # in the optimizer from the start, at the lower lr
    assert groups["blocks.0.attn.qkv.weight"][0] == pytest.approx(1e-4)
    start = model.model.blocks[0].attn.qkv.weight.detach().clone()
    fit(model, tmp_path, epochs=3, callbacks=[Record(), StopAfterEpochs(1)])
    assert flags == {0: False}
    assert torch.equal(model.model.blocks[0].attn.qkv.weight, start)  # frozen during epoch 0

    resumed = tiny_classifier(**settings)
    ckpt = tmp_path / "checkpoints"
    last = sorted(ckpt.glob("*.ckpt"))[-1]
    trainer = quiet_trainer(tmp_path, max_epochs=3, callbacks=[Record()], num_sanity_val_steps=2)
    trainer.fit(resumed, datamodule=ImageTensors(), ckpt_path=last)
    assert flags == {0: False, 1: True, 2: True}
    assert not torch.equal(resumed.model.blocks[0].attn.qkv.weight, start)
    opt_lrs = {g["param_names"][0]: g["initial_lr"] for g in trainer.optimizers[0].param_groups}
    assert opt_lrs.get("head.weight") == pytest.approx(1e-3)


def test_ema_weights_are_kept_under_ema_module_and_used_for_validation(tmp_path):
    model = tiny_classifier(ema=True, ema_decay=0.5, mixup=0.8, cutmix=1.0)
    fit(model, tmp_path, epochs=1)
    state = model.state_dict()
    ema_keys = {k[len("ema.module.") :] for k in state if k.startswith("ema.module.")}
    assert ema_keys == {k[len("model.") :] for k in state if k.startswith("model.")}
    assert not torch.equal(state["ema.module.head.weight"], state["model.head.weight"])
    assert model._eval_net() is model.ema.module
    assert all(not p.requires_grad for p in model.ema.parameters())


def test_mixup_and_cutmix_train_on_odd_sized_batches(tmp_path):
    model = tiny_classifier(mixup=0.8, cutmix=1.0)
    trainer = fit(model, tmp_path, epochs=1)  # 12 images in batches of 5, 5, 2: Mixup needs even sizes
    assert trainer.global_step == 3
    assert torch.isfinite(trainer.callback_metrics["train/loss_epoch"])


def test_training_loss_is_logged_per_logger_step_and_as_the_epochs_weighted_mean(tmp_path):
    losses: list[tuple[int, float, int]] = []  # (global step, loss, batch size) of every batch

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append((trainer.global_step - 1, outputs["loss"].item(), len(batch[0])))

    logger = CSVLogger(tmp_path, name="", version="")
    fit(tiny_classifier(), tmp_path, epochs=2, logger=logger, log_every_n_steps=2, callbacks=[Record()])
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    step_rows = {int(r["step"]): float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")}
    assert step_rows == pytest.approx({step: loss for step, loss, _ in losses if (step + 1) % 2 == 0})
    epoch_means = [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]
    per_epoch = [losses[:3], losses[3:]]  # 12 images in batches of 5, 5, 2
    expected = [sum(loss * n for _, loss, n in batches) / 12 for batches in per_epoch]
    assert epoch_means == pytest.approx(expected)


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_record_and_weights_only_loading(tmp_path):
    model = tiny_classifier(ema=True, dataset_name="tensors")
    trainer = fit(model, tmp_path, epochs=1)
    path = tmp_path / "manual.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    info = checkpoint["finetune"]
    assert info["model_name"] == "irpe_deit_tiny_patch16_224"
    # the recipe's keywords plus the full RPE settings the model was built with (resolution strategy, grid)
    assert info["model_kwargs"] == {**TINY, "rpe_config": model.model.rpe_config.to_dict()}
    assert info["model_kwargs"]["rpe_config"]["resize"] == "keep"
    assert info["num_classes"] == 4 and info["class_names"] == ["class_0", "class_1", "class_2", "class_3"]
    assert info["data_config"] == {
        "input_size": [3, 32, 32],
        "mean": pytest.approx([0.485, 0.456, 0.406]),
        "std": pytest.approx([0.229, 0.224, 0.225]),
        "interpolation": "bicubic",
        "crop_pct": 0.875,
    }
    assert info["metrics"]["split"] == "val" and info["metrics"]["epoch"] == 0
    assert 0.0 <= info["metrics"]["top1"] <= info["metrics"]["top5"] <= 1.0
    assert set(info["metrics"]["per_class"]) == set(info["class_names"])
    assert info["metrics"]["step"] == checkpoint["global_step"]  # the evaluation of exactly these weights
    assert info["best"] == info["metrics"]
    assert info["pretrained"] is None and info["ema"] is True and info["dataset"] == "tensors"

    loaded = ImageClassifier.load_from_checkpoint(path, map_location="cpu")
    assert loaded.num_classes == 4
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_class_names_come_from_the_datamodule_in_setup(tmp_path):
    model = ImageClassifier("irpe_deit_tiny_patch16_224", model_kwargs=TINY, warmup_epochs=0)
    assert model.num_classes is None
    fit(model, tmp_path, epochs=1)
    assert model.num_classes == 4
    assert model.class_names == ["class_0", "class_1", "class_2", "class_3"]
    assert model.model.get_classifier().out_features == 4


# ----------------------------------------------------------------------------- bad settings
def test_unknown_model_name_is_one_clear_error():
    with pytest.raises(WeightsError, match="unknown model 'irpe_deit_tinny'; did you mean .*irpe_deit_tiny_patch16_224"):
        ImageClassifier("irpe_deit_tinny")


def test_missing_pretrained_file_is_one_clear_error(tmp_path):
    with pytest.raises(FinetuneConfigError, match="does not exist"):
        ImageClassifier("irpe_deit_tiny_patch16_224", pretrained=str(tmp_path / "nope.pth"))


def test_eval_crop_pct_replaces_the_pretrained_crop_and_rejects_non_fractions():
    assert tiny_classifier().data_config["crop_pct"] == 0.875  # the model's pretrained cfg
    assert tiny_classifier(eval_crop_pct=1.0).data_config["crop_pct"] == 1.0
    for bad in (0.0, 1.5):
        with pytest.raises(FinetuneConfigError, match=f"model.eval_crop_pct={bad}: expected a fraction"):
            tiny_classifier(eval_crop_pct=bad)


def test_pretrained_file_of_another_architecture_names_the_mismatch(tmp_path):
    other = timm.create_model("irpe_deit_tiny_patch16_224", **{**TINY, "embed_dim": 32})
    path = tmp_path / "other.pth"
    torch.save({"model": other.state_dict()}, path)
    with pytest.raises(WeightsError, match="other.pth: checkpoint key 'cls_token' .* another architecture"):
        ImageClassifier("irpe_deit_tiny_patch16_224", pretrained=str(path), model_kwargs=TINY)


def test_num_classes_mismatch_with_the_data_is_one_clear_error(tmp_path):
    model = tiny_classifier(num_classes=7)
    with pytest.raises(
        FinetuneConfigError,
        match=r"num_classes mismatch: model.num_classes=7 but the data \(ImageTensors\) has 4 classes; remove",
    ):
        fit(model, tmp_path, epochs=1)


def test_freeze_then_unfreeze_needs_an_unfreeze_epoch():
    with pytest.raises(FinetuneConfigError, match="unfreeze_epoch >= 1"):
        tiny_classifier(finetune_strategy="freeze_then_unfreeze")


def _corners_and_centre(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Top-left, top-right, bottom-left, bottom-right and centre crops of a square batch, by slicing."""
    side, offset = x.shape[-1], (x.shape[-1] - size) // 2
    return [
        x[..., :size, :size],
        x[..., :size, side - size :],
        x[..., side - size :, :size],
        x[..., side - size :, side - size :],
        x[..., offset : offset + size, offset : offset + size],
    ]


@pytest.mark.parametrize("tta", ["flip", "five_crop", "ten_crop"])
def test_tta_averages_the_probabilities_of_the_views_for_test_and_predict(tta: str):
    model = tiny_classifier(tta=tta, tta_crop_pct=0.75).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    if tta == "flip":
        views = [x, x.flip(-1)]
    else:  # 24 px crops (0.75 of 32) resized back to the model's 32 px, as bicubic as the model's data config
        crops = _corners_and_centre(x, 24)
        crops += _corners_and_centre(x.flip(-1), 24) if tta == "ten_crop" else []  # and of the mirror image
        views = [torch.nn.functional.interpolate(c, size=(32, 32), mode="bicubic") for c in crops]
    assert len(views) == {"flip": 2, "five_crop": 5, "ten_crop": 10}[tta]
    with torch.no_grad():
        view_logits = [model.model(v) for v in views]
        # a position-dependent model: every view gives other outputs, so each one counts in the mean
        assert all(not torch.allclose(a, b) for i, a in enumerate(view_logits) for b in view_logits[i + 1 :])
        expected = torch.stack(view_logits).softmax(-1).mean(0)
        logits, _ = model._eval_outputs(x, tta=True, embeddings=False)
        torch.testing.assert_close(logits.softmax(-1), expected)
        torch.testing.assert_close(logits, expected.log())
        torch.testing.assert_close(model.predict_step((x,), 0)["logits"], expected.log())
        _, embeddings = model._eval_outputs(x, tta=True, embeddings=True)
        features = [model.model.forward_head(model.model.forward_features(v), pre_logits=True) for v in views]
        torch.testing.assert_close(embeddings, torch.stack(features).mean(0))
        plain, _ = model._eval_outputs(x, tta=False, embeddings=False)  # validation: no TTA
        torch.testing.assert_close(plain, model.model(x))


def test_tta_crop_pct_must_be_a_fraction():
    with pytest.raises(FinetuneConfigError, match=r"model.tta_crop_pct=1.5: expected a fraction in \(0, 1\]"):
        tiny_classifier(tta="five_crop", tta_crop_pct=1.5)
