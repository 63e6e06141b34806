"""Distillation from a teacher: the loss terms (DeiT's formulas) and a fit with a teacher checkpoint."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, ImageTensors, quiet_trainer, tiny_classifier

from finetune.distillation import distillation_loss
from finetune.module import FinetuneConfigError


def test_soft_and_hard_distillation_follow_deits_formulas():
    student, teacher = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(1)).unbind(0)
    tau = 3.0
    p_teacher = F.softmax(teacher / tau, dim=-1)
    kl = (p_teacher * (p_teacher.log() - F.log_softmax(student / tau, dim=-1))).sum()
    torch.testing.assert_close(distillation_loss(student, teacher, "soft", tau), kl * tau**2 / student.numel())
    assert distillation_loss(teacher, teacher, "soft", tau).abs() < 1e-6
    torch.testing.assert_close(
        distillation_loss(student, teacher, "hard", tau), F.cross_entropy(student, teacher.argmax(-1))
    )


def _fit(model, tmp_path, data=None) -> L.Trainer:
    trainer = quiet_trainer(tmp_path, max_epochs=1)
    trainer.fit(model, datamodule=data or ImageTensors())
    return trainer


def test_fit_with_a_teacher_checkpoint_distils_without_training_or_saving_the_teacher(tmp_path):
    teacher_trainer = _fit(tiny_classifier(), tmp_path / "teacher")
    teacher_ckpt = tmp_path / "teacher.ckpt"
    teacher_trainer.save_checkpoint(teacher_ckpt)

    student = tiny_classifier(teacher=str(teacher_ckpt), distillation="soft", distillation_tau=2.0, mixup=0.8)
    teacher = student.teacher_nets[0]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = _fit(student, tmp_path / "student")
    assert torch.isfinite(trainer.callback_metrics["train/distillation_loss_epoch"])
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not teacher.training
    assert not any(k.startswith("teacher") for k in student.state_dict())


def test_teacher_for_another_number_of_classes_is_one_clear_error():
    with pytest.raises(FinetuneConfigError, match="predicts 3 classes but the data has 4"):
        tiny_classifier(
            teacher="irpe_deit_tiny_patch16_224", teacher_kwargs={**TINY, "pretrained": False, "num_classes": 3}
        )
