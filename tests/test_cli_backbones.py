"""``cli.py fit`` on the synthetic CUB with the backbones beyond the releases: an earlier RPE preset,
iRPE added to a pretrained timm ViT, iRPE-Swin from timm's Swin weights. One short epoch each; the
runs start from the checkpoint (zero tables) and must learn the RPE tables."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import timm_checkpoint_file, tiny_fit_args

from finetune.cli import main

VIT = dict(depth=1, embed_dim=64, num_heads=2, img_size=32, patch_size=8)
SWIN = dict(embed_dim=32, depths=[1, 1], num_heads=[2, 4], img_size=32, window_size=4)
# name: (model_name, model_kwargs, the plain timm model whose random weights are the pretrained file, or None)
BACKBONES = {
    "preset_huang": ("irpe_deit_tiny_patch16_224", {**VIT, "rpe_config": "huang"}, None),
    "irpe_vit_deit3": (
        "irpe_vit", {**VIT, "base_model": "deit3_small_patch16_224", "rpe_config": {"rpe_on": "qkv"}},
        "deit3_small_patch16_224",
    ),
    "irpe_swin": ("irpe_swin_tiny_patch4_window7_224", SWIN, "swin_tiny_patch4_window7_224"),
}


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_fit_trains_the_rpe_tables(synthetic_cub: Path, tmp_path: Path, backbone: str):
    model_name, model_kwargs, pretrained = BACKBONES[backbone]
    args = [*tiny_fit_args(synthetic_cub, tmp_path / "run", epochs=1), "--model.model_name", model_name,
            "--model.model_kwargs", str(model_kwargs)]
    if pretrained is not None:
        plain_kwargs = {k: v for k, v in model_kwargs.items() if k not in ("base_model", "rpe_config")}
        _, path = timm_checkpoint_file(pretrained, tmp_path / "pretrained.pth", **plain_kwargs)
        args += ["--model.pretrained", str(path)]
    assert main(["fit", *args]) == 0
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    tables = {key: value for key, value in checkpoint["state_dict"].items() if ".rpe_" in key}
    assert tables and all(value.abs().sum() > 0 for value in tables.values())  # zero at the start, trained since
    assert checkpoint["finetune"]["num_classes"] == 10
