"""iRPE in Swin (``irpe_swin_tiny_patch4_window7_224``): windows and shifted masks against timm's Swin,
fast vs per-pair formulas, loading timm's Swin weights, window changes and the Hub export."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from conftest import timm_checkpoint_file

import finetune  # noqa: F401  (registers the models)
from finetune.backbones.checkpoint import CheckpointMismatchError
from finetune.backbones.irpe import RPEConfig
from finetune.backbones.irpe_swin import WindowRPEAttention
from finetune.card import CardInfo
from finetune.export import export_model

NAME = "irpe_swin_tiny_patch4_window7_224"
# two stages on a 16 x 16 then 8 x 8 patch grid with 4 x 4 windows: every second block is shifted
TINY = dict(embed_dim=32, depths=(2, 2), num_heads=(2, 4), img_size=64, window_size=4)
# bias mode, a table per head, clip at +-3 = window - 1: one bucket per window offset, as Swin's table
SWIN_BIAS = {"method": "product", "mode": "bias", "index": "clip", "ratio": 1.5, "rpe_on": "k", "shared_head": False}


def _images(size: int = 64) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _attention_layers(model: torch.nn.Module) -> list[WindowRPEAttention]:
    return [m for m in model.modules() if isinstance(m, WindowRPEAttention)]


def _randomize_tables(model: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".rpe_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def test_blocks_are_shifted_and_windows_share_the_window_grid_ids():
    model = timm.create_model(NAME, **TINY)
    assert [block.shift_size for stage in model.layers for block in stage.blocks] == [(0, 0), (2, 2)] * 2
    for layer in _attention_layers(model):
        assert layer.rpe_config.skip == 0 and layer.window_size == (4, 4)
        assert layer.rpe_k.bucket_index.shape == (16, 16)  # per window, not per image


def test_bias_mode_with_swin_tables_is_timm_swin_with_its_shifted_masks(tmp_path):
    """The reference path: timm's own Swin. iRPE bias mode with one bucket per window offset holds
    Swin's relative position bias exactly, so with Swin's tables moved in, the logits must agree."""
    swin, path = timm_checkpoint_file("swin_tiny_patch4_window7_224", tmp_path / "swin.pth", **TINY)
    model = timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              rpe_config=SWIN_BIAS, **TINY).eval()
    swin_tables = {k: v for k, v in swin.state_dict().items() if k.endswith("relative_position_bias_table")}
    assert len(swin_tables) == 4
    with torch.no_grad():
        for key, table in swin_tables.items():  # (window offsets, heads) -> (heads, buckets)
            model.get_submodule(key[: -len(".relative_position_bias_table")]).rpe_k.lookup_table_bias.copy_(table.T)
        torch.testing.assert_close(model(_images()), swin(_images()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rpe_config", [{}, SWIN_BIAS, {"method": "cross", "rpe_on": "qk", "shared_head": False}],
                         ids=["ctx_product_qkv", "bias_product_k", "ctx_cross_qk"])
def test_fast_terms_equal_the_per_pair_formulas_forward_and_backward(rpe_config):
    model = timm.create_model(NAME, rpe_config=rpe_config, **TINY).eval()
    _randomize_tables(model)
    results = []
    for reference in (False, True):
        for layer in _attention_layers(model):
            layer.reference = reference
        model.zero_grad()
        images = _images().requires_grad_()
        out = model(images)
        out.square().sum().backward()
        grads = [p.grad.clone() for name, p in model.named_parameters() if ".rpe_" in name]
        results.append((out.detach(), images.grad, grads))
    (fast, fast_input_grad, fast_grads), (ref, ref_input_grad, ref_grads) = results
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast_input_grad, ref_input_grad, rtol=1e-4, atol=1e-5)
    assert fast_grads
    for a, b in zip(fast_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_timm_swin_weights_load_for_everything_but_the_relative_position_bias(tmp_path):
    swin, path = timm_checkpoint_file("swin_tiny_patch4_window7_224", tmp_path / "swin.pth", **TINY)
    model = timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **TINY).eval()
    assert model.rpe_config == RPEConfig("product", "ctx", 1.9, "qkv", shared_head=True, skip=0)
    swin_state, state = swin.state_dict(), model.state_dict()
    assert {k for k in set(swin_state) - set(state)} == {k for k in swin_state if k.endswith("relative_position_bias_table")}
    new_keys = set(state) - set(swin_state)
    assert new_keys and all(".attn.rpe_" in k and not state[k].any() for k in new_keys)
    assert all(torch.equal(state[k], v) for k, v in swin_state.items() if k in state)
    assert new_keys <= model.no_weight_decay()
    # with zero tables the model is Swin without its relative position bias
    with torch.no_grad():
        for key, table in swin.named_parameters():
            if key.endswith("relative_position_bias_table"):
                table.zero_()
        torch.testing.assert_close(model(_images()), swin(_images()), rtol=1e-5, atol=1e-5)
    del swin_state["layers.1.blocks.0.mlp.fc2.weight"]
    torch.save(swin_state, path)
    with pytest.raises(CheckpointMismatchError, match="checkpoint lacks key 'layers.1.blocks.0.mlp.fc2.weight'"):
        timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **TINY)


def test_another_window_size_rebuilds_the_bucket_ids_and_keeps_the_tables():
    model = timm.create_model(NAME, **TINY).eval()
    _randomize_tables(model)
    tables = {k: v.clone() for k, v in model.state_dict().items() if ".rpe_" in k}
    model.set_input_size(img_size=(96, 96), window_size=6)
    assert all(layer.window_size == (6, 6) and layer.rpe_k.bucket_index.shape == (36, 36)
               for layer in _attention_layers(model)[:2])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in tables.items())
    with torch.no_grad():
        assert model(_images(96)).shape == (2, 1000)


def test_hub_export_rebuilds_the_same_model(tmp_path):
    model = timm.create_model(NAME, rpe_config={"mode": "bias", "rpe_on": "qk"}, **TINY).eval()
    _randomize_tables(model)
    folder = export_model(model, tmp_path / "export", CardInfo())
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == NAME
    assert RPEConfig.from_any(config["model_args"]["rpe_config"]) == model.rpe_config
    reloaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(_images()), model(_images()))


def test_compiles_in_one_graph_and_exports():
    model = timm.create_model(NAME, **TINY).eval()
    _randomize_tables(model)
    with torch.no_grad():
        torch.compiler.reset()
        torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="eager")(_images()), model(_images()))
        program = torch.export.export(model, (_images(),))
        torch.testing.assert_close(program.module()(_images()), model(_images()))
