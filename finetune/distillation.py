"""Knowledge distillation from a teacher's logits (DeiT, Touvron et al. 2021; timm's logit distillation).

- ``soft``: KL divergence between the student's and the teacher's class distributions at
  temperature ``tau``, scaled by ``tau**2`` (DeiT's ``soft`` distillation, Hinton et al.);
- ``hard``: cross entropy against the teacher's top class (DeiT's ``hard`` distillation).

The training loss is ``(1 - alpha) * classification loss + alpha * distillation loss``. A student with
a distillation token (timm's ``deit_*_distilled_*``) trains its distillation head on the teacher and
its class head on the labels, as DeiT does; otherwise both terms act on the one head.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

__all__ = ["DistillationKind", "distillation_loss"]

DistillationKind = Literal["soft", "hard"]


def distillation_loss(
    student_logits: Tensor, teacher_logits: Tensor, kind: DistillationKind, tau: float
) -> Tensor:
    """The distillation term of one batch (see the module docstring)."""
    if kind == "hard":
        return F.cross_entropy(student_logits, teacher_logits.argmax(dim=-1))
    student = F.log_softmax(student_logits / tau, dim=-1)
    teacher = F.log_softmax(teacher_logits / tau, dim=-1)
    return F.kl_div(student, teacher, reduction="sum", log_target=True) * (tau * tau) / student_logits.numel()
