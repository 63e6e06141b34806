"""iRPE added to timm ViT checkpoints (``irpe_vit``): zero-init equivalence, strict loading, resolution, Hub."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import timm
import torch
from conftest import timm_checkpoint_file

import finetune  # noqa: F401  (registers the models)
from finetune.backbones.checkpoint import CheckpointMismatchError
from finetune.backbones.irpe import RPEConfig
from finetune.backbones.irpe_deit import IRPEVisionTransformer
from finetune.card import CardInfo
from finetune.export import export_model

# Tiny bodies of three ViT families: plain ViT (augreg), DeiT III (layer scale, no class slot in pos_embed),
# and a ViT with two register tokens, no class token and average pooling (skip follows the prefix tokens).
BODIES = {
    "vit": ("vit_small_patch16_224", {}),
    "deit3": ("deit3_small_patch16_224", {}),
    "registers_avg_pool": ("vit_small_patch16_224", {"reg_tokens": 2, "class_token": False, "global_pool": "avg"}),
}
TINY = dict(depth=2, embed_dim=32, num_heads=2, img_size=32, patch_size=8)
CONFIGS = [
    {"method": "product", "mode": "ctx", "rpe_on": "qkv"},
    {"method": "cross", "mode": "bias", "rpe_on": "qk", "shared_head": False},
    "shaw",
]


def _images(size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _irpe_vit(base: str, path: Path, rpe_config: object, **kwargs: object) -> IRPEVisionTransformer:
    return timm.create_model(
        "irpe_vit", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), base_model=base,
        rpe_config=rpe_config, **kwargs,
    ).eval()


@pytest.mark.parametrize("body", list(BODIES))
@pytest.mark.parametrize("rpe_config", CONFIGS, ids=["ctx_product_qkv", "bias_cross_qk_per_head", "shaw"])
def test_a_pretrained_vit_with_irpe_added_computes_the_same_logits(tmp_path, body, rpe_config):
    base, extra = BODIES[body]
    plain, path = timm_checkpoint_file(base, tmp_path / "plain.pth", **TINY, **extra)
    model = _irpe_vit(base, path, rpe_config, **TINY, **extra)
    assert isinstance(model, IRPEVisionTransformer)
    assert model.rpe_config.skip == plain.num_prefix_tokens
    with torch.no_grad():
        torch.testing.assert_close(model(_images()), plain(_images()), rtol=0, atol=1e-5)
    # every original key with its value, plus the zero tables and nothing else
    new_keys = set(model.state_dict()) - set(plain.state_dict())
    assert new_keys and all(".attn.rpe_" in key and ".lookup_table_" in key for key in new_keys)
    assert all(not model.state_dict()[key].any() for key in new_keys)
    for key, value in plain.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert new_keys <= model.no_weight_decay()  # the paper puts no weight decay on the tables


def test_tables_learn_while_the_rest_is_the_checkpoint(tmp_path):
    _, path = timm_checkpoint_file("vit_small_patch16_224", tmp_path / "plain.pth", **TINY)
    model = _irpe_vit("vit_small_patch16_224", path, {"rpe_on": "qkv"}, **TINY).train()
    model(_images()).sum().backward()
    tables = [p for name, p in model.named_parameters() if ".rpe_" in name]
    assert len(tables) == 3 * TINY["depth"] and all(p.grad is not None and p.grad.abs().sum() > 0 for p in tables)
    assert {name for name, _ in model.named_parameters() if ".rpe_" in name} <= model.no_weight_decay()


def test_a_checkpoint_missing_a_body_key_is_refused_by_name(tmp_path):
    plain, path = timm_checkpoint_file("vit_small_patch16_224", tmp_path / "plain.pth", **TINY)
    state = plain.state_dict()
    del state["blocks.1.attn.proj.weight"]
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError, match="checkpoint lacks key 'blocks.1.attn.proj.weight'"):
        _irpe_vit("vit_small_patch16_224", path, None, **TINY)


@pytest.mark.parametrize(
    ("base", "kwargs", "message"),
    [
        ("vit_small_patch16_224", {"qk_norm": True}, "block 0 .* has attention options iRPE does not take"),
        ("deit_small_distilled_patch16_224", {}, "builds VisionTransformerDistilled; expected a timm VisionTransformer"),
        ("resnet18", {}, "builds ResNet; expected a timm VisionTransformer"),
    ],
)
def test_bodies_without_timm_plain_attention_are_refused(base, kwargs, message):
    args = {} if base == "resnet18" else TINY
    with pytest.raises(ValueError, match=message):
        timm.create_model("irpe_vit", base_model=base, **args, **kwargs)


def test_resolution_transfer_of_a_plain_and_of_a_fine_tuned_checkpoint(tmp_path, caplog):
    _, path = timm_checkpoint_file("vit_small_patch16_224", tmp_path / "plain.pth", **TINY)
    # a plain 32 px ViT at 64 px: pos_embed resampled, the tables start at zero (nothing trained to move)
    at_64 = _irpe_vit("vit_small_patch16_224", path, {"resize": "scale"}, **{**TINY, "img_size": 64})
    assert at_64.pos_embed.shape == (1, 1 + 8 * 8, 32) and at_64.rpe_config.trained_grid is None
    # a fine-tuned 32 px irpe_vit (tables trained) at 64 px, by each strategy
    fine_tuned = _irpe_vit("vit_small_patch16_224", path, {"method": "cross", "ratio": 20, "rpe_on": "k"}, **TINY)
    with torch.no_grad():
        for name, param in fine_tuned.named_parameters():
            if ".rpe_" in name:
                param.normal_()
    torch.save(fine_tuned.state_dict(), tmp_path / "fine_tuned.pth")
    rpe = {"method": "cross", "ratio": 20, "rpe_on": "k"}
    with caplog.at_level(logging.INFO, logger="finetune.resize"):
        scaled = _irpe_vit("vit_small_patch16_224", tmp_path / "fine_tuned.pth", {**rpe, "resize": "scale"},
                           **{**TINY, "img_size": 64})
    assert scaled.rpe_config.trained_grid == (4, 4)
    assert "checkpoint grid 4x4 -> model grid 8x8" in caplog.text
    interpolated = _irpe_vit("vit_small_patch16_224", tmp_path / "fine_tuned.pth", {**rpe, "resize": "interpolate"},
                             **{**TINY, "img_size": 64})
    assert interpolated.rpe_config.ratio == 24  # linear range grown by the 4 more offsets of the 8x8 grid
    with torch.no_grad():
        assert scaled(_images(64)).shape == interpolated(_images(64)).shape == (2, 1000)


def test_hub_export_rebuilds_and_moves_to_another_resolution(tmp_path):
    _, path = timm_checkpoint_file("deit3_small_patch16_224", tmp_path / "plain.pth", **TINY)
    model = _irpe_vit("deit3_small_patch16_224", path, "huang", **TINY, num_classes=5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".rpe_" in name:
                param.normal_()
    folder = export_model(model, tmp_path / "export", CardInfo())
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "irpe_vit"
    assert config["model_args"]["base_model"] == "deit3_small_patch16_224"
    assert RPEConfig.from_any(config["model_args"]["rpe_config"]) == model.rpe_config
    reloaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(_images()), model(_images()))
    at_64 = timm.create_model(f"local-dir:{folder}", pretrained=True, img_size=64, rpe_config={"resize": "scale"})
    assert at_64.rpe_config == RPEConfig("product", "ctx", 1.9, "qk", index="clip", resize="scale", trained_grid=(4, 4))


def test_compiles_in_one_graph_and_exports(tmp_path):
    _, path = timm_checkpoint_file("vit_small_patch16_224", tmp_path / "plain.pth", **TINY)
    model = _irpe_vit("vit_small_patch16_224", path, {"method": "cross", "rpe_on": "qkv"}, **TINY)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".rpe_" in name:
                param.normal_()
        torch.compiler.reset()
        torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="eager")(_images()), model(_images()))
        program = torch.export.export(model, (_images(),))
        torch.testing.assert_close(program.module()(_images()), model(_images()))
