"""Resolution transfer: pos_embed resampling, the iRPE keep/scale/interpolate strategies, SP-ViT priors."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import timm
import torch

import finetune  # noqa: F401  (registers the models)
from finetune.backbones import irpe_deit, spvit
from finetune.backbones.irpe import ImageRPE, RPEConfig, bucket_ids
from finetune.card import CardInfo
from finetune.export import export_model
from finetune.resize import (
    checkpoint_grid,
    interpolated_config,
    prior_offset_scale,
    resample_pos_embed,
    resize_rpe_table,
    resolution_args,
)

TINY = dict(depth=1, embed_dim=32, num_heads=2)

# ---------------------------------------------------------------------------------------------
# Absolute pos_embed
# ---------------------------------------------------------------------------------------------


def test_pos_embed_resample_is_exact_at_equal_size():
    pos_embed = torch.randn(1, 1 + 14 * 14, 8)
    assert torch.equal(resample_pos_embed(pos_embed, (14, 14), (14, 14), num_prefix_tokens=1), pos_embed)


def test_pos_embed_resample_keeps_prefix_and_constants():
    pos_embed = torch.full((1, 1 + 14 * 14, 4), 0.7)
    pos_embed[:, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out = resample_pos_embed(pos_embed, (24, 24), (14, 14), num_prefix_tokens=1)
    assert out.shape == (1, 1 + 24 * 24, 4)
    assert torch.equal(out[:, 0], pos_embed[:, 0])
    torch.testing.assert_close(out[:, 1:], torch.full((1, 576, 4), 0.7))


def test_pos_embed_resample_reproduces_a_linear_ramp_inside_the_grid():
    # value = 2 * row + 3 * col on the 14x14 grid (in units of 14x14 patches); resampled to 24x24 the
    # embedding at new patch centre (r, c) must be the ramp at ((r + .5) * 14/24 - .5, (c + .5) * 14/24 - .5).
    rows, cols = torch.meshgrid(torch.arange(14.0), torch.arange(14.0), indexing="ij")
    ramp = (2 * rows + 3 * cols).reshape(1, 196, 1)
    out = resample_pos_embed(ramp, (24, 24), (14, 14), num_prefix_tokens=0).reshape(24, 24)
    centre = (torch.arange(24.0) + 0.5) * 14 / 24 - 0.5
    expected = 2 * centre[:, None] + 3 * centre[None, :]
    inner = slice(3, -3)  # bicubic clamps at the border, where a ramp is not reproduced
    torch.testing.assert_close(out[inner, inner], expected[inner, inner], atol=1e-4, rtol=0)


def test_checkpoint_grid_of_a_square_pos_embed_and_a_clear_error_otherwise():
    assert checkpoint_grid(torch.zeros(1, 1 + 24 * 24, 4), 1) == (24, 24)
    with pytest.raises(ValueError, match="200 patch tokens"):
        checkpoint_grid(torch.zeros(1, 201, 4), 1)


# ---------------------------------------------------------------------------------------------
# Bucket maps under keep / scale
# ---------------------------------------------------------------------------------------------


def _pair_offsets(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(size).repeat_interleave(size)
    cols = torch.arange(size).repeat(size)
    return rows[:, None] - rows[None, :], cols[:, None] - cols[None, :]


@pytest.mark.parametrize(("method", "table", "ratio"), [("product", "product", 1.9), ("cross", "cross_rows", 20)])
def test_scale_gives_every_pair_the_bucket_of_the_nearest_trained_offset(method, table, ratio):
    config = RPEConfig(method=method, ratio=ratio, skip=0, resize="scale", trained_grid=(14, 14))
    ids_24 = bucket_ids(table, 24, 24, config)
    ids_14 = bucket_ids(table, 14, 14, RPEConfig(method=method, ratio=ratio, skip=0))
    # the 14x14 bucket of each offset (dr, dc), as a 27 x 27 lookup
    dr14, dc14 = _pair_offsets(14)
    by_offset = torch.full((27, 27), -1, dtype=torch.long)
    by_offset[dr14 + 13, dc14 + 13] = ids_14
    dr, dc = _pair_offsets(24)
    expected = by_offset[torch.round(dr * 14 / 24).long() + 13, torch.round(dc * 14 / 24).long() + 13]
    assert torch.equal(ids_24, expected)


def test_keep_at_24x24_with_ratio_1_9_uses_exactly_the_trained_50_buckets():
    config = RPEConfig(ratio=1.9, skip=1)
    used_14 = set(bucket_ids("product", 14, 14, config).unique().tolist())
    used_24 = set(bucket_ids("product", 24, 24, config).unique().tolist())
    assert len(used_14) == 50 and used_24 == used_14


def test_keep_with_a_large_ratio_reaches_buckets_the_trained_grid_never_used():
    config = RPEConfig(method="cross", ratio=20, skip=0)
    used_14 = set(bucket_ids("cross_rows", 14, 14, config).unique().tolist())
    used_24 = set(bucket_ids("cross_rows", 24, 24, config).unique().tolist())
    # offsets 14..20 each get a bucket, 21 shares g = 20, 22 and 23 share g = 21 (log part): 8 per side
    assert used_24 > used_14 and len(used_24 - used_14) == 16
    scaled = replace_resize(config, "scale", (14, 14))
    assert set(bucket_ids("cross_rows", 24, 24, scaled).unique().tolist()) == used_14


def replace_resize(config: RPEConfig, resize: str, grid: tuple[int, int]) -> RPEConfig:
    return RPEConfig.from_any({**config.to_dict(), "resize": resize, "trained_grid": grid})


# ---------------------------------------------------------------------------------------------
# interpolate
# ---------------------------------------------------------------------------------------------


def _interp(table_1d: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of samples at 0..n-1 (numpy.interp), float64."""
    low = positions.floor().long().clamp(max=table_1d.numel() - 2)
    frac = positions - low
    return table_1d[low] * (1 - frac) + table_1d[low + 1] * frac


def test_interpolate_cross_stretches_the_trained_entries_onto_the_new_offsets():
    old = RPEConfig(method="cross", ratio=20, skip=1, resize="interpolate")
    new = interpolated_config(old, (14, 14), (24, 24))
    assert new.ratio == 30 and int(new.beta) == 60
    b, b_new = 40, 60
    table = torch.zeros(1, 4, 82, dtype=torch.float64)  # (heads, head_dim, buckets), contextual on keys
    table[..., b - 13 : b + 14] = torch.randn(1, 4, 27, dtype=torch.float64)
    table[..., -1] = 5.0  # the class-token bucket
    out = resize_rpe_table(table, "cross_rows", -1, old, new, (14, 14), (24, 24))
    assert out.shape == (1, 4, 2 * 60 + 2)
    segment = out[..., b_new - 23 : b_new + 24]
    # new offset x' reads the trained function at x' * 13 / 23 (end points and centre exactly)
    positions = torch.arange(47, dtype=torch.float64) * 26 / 46
    for d in range(4):
        torch.testing.assert_close(segment[0, d], _interp(table[0, d, b - 13 : b + 14], positions))
    for offset in (-13, 0, 13):
        torch.testing.assert_close(out[..., b_new + offset * 23 // 13], table[..., b + offset], rtol=0, atol=1e-12)
    assert torch.all(out[..., : b_new - 23] == 0) and torch.all(out[..., b_new + 24 : -1] == 0)
    assert torch.all(out[..., -1] == 5.0)


def test_interpolate_euc_is_exact_for_a_table_linear_in_the_distance():
    old = RPEConfig(method="euc", ratio=20, skip=1, mode="bias", rpe_on="k", resize="interpolate")
    new = interpolated_config(old, (14, 14), (24, 24))  # distances 0..18 -> 0..33
    assert new.ratio == 20 + 33 - 18
    table = torch.zeros(2, 82)
    table[:, 40:59] = torch.arange(19.0) * 0.5 + torch.tensor([[1.0], [-2.0]])  # a + 0.5 * distance
    out = resize_rpe_table(table, "euc", -1, old, new, (14, 14), (24, 24))
    b_new = int(new.beta)
    expected = torch.arange(34.0) * (18 / 33) * 0.5 + torch.tensor([[1.0], [-2.0]])
    torch.testing.assert_close(out[:, b_new : b_new + 34], expected)
    # every distance the 24x24 grid has reads an entry of the stretched range
    ids = bucket_ids("euc", 24, 24, new)
    assert int(ids[1:, 1:].max()) == b_new + 33


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (RPEConfig(method="quant", ratio=33), "quant indexes the squared distance"),
        (RPEConfig(method="product", ratio=1.9), "product index reaches 13, but the piecewise index with ratio 1.9"),
        (RPEConfig(method="euc", ratio=15), "euc index reaches 18"),
        (RPEConfig(method="cross", ratio=6, index="clip"), r"beta = 2 \* ratio = 12"),
    ],
)
def test_interpolate_names_why_a_table_does_not_qualify(config, message):
    with pytest.raises(ValueError, match=message):
        interpolated_config(config, (14, 14), (24, 24))


def test_interpolate_accepts_clip_with_beta_covering_the_grid():
    new = interpolated_config(RPEConfig(method="cross", ratio=7, index="clip"), (14, 14), (24, 24))
    assert new.beta == 24 and new.ratio == 12


# ---------------------------------------------------------------------------------------------
# Checkpoints: conversion on load, round trips, recorded settings
# ---------------------------------------------------------------------------------------------

ROUND_TRIPS = [
    ("keep", {"method": "product", "ratio": 1.9, "rpe_on": "qkv"}),
    ("scale", {"method": "product", "ratio": 1.9, "rpe_on": "qkv"}),
    ("interpolate", {"method": "cross", "ratio": 20, "rpe_on": "qkv"}),
    ("interpolate", {"method": "euc", "ratio": 20, "rpe_on": "qk", "mode": "bias", "shared_head": False}),
]


def _trained_checkpoint(path, rpe: dict) -> torch.nn.Module:
    """A 224 model with random weights; table entries the 14x14 grid never reaches stay zero, as training leaves them."""
    torch.manual_seed(0)
    model = timm.create_model("irpe_deit_tiny_patch16_224", rpe_config=rpe, **TINY)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(std=0.02)
        for module in model.modules():
            if isinstance(module, ImageRPE):
                used = torch.zeros(module.num_buckets, dtype=torch.bool)
                used[bucket_ids(module.method, 14, 14, module.config).unique()] = True
                table = module.lookup_table_bias if module.mode == "bias" else module.lookup_table_weight
                table.movedim(1 if module.on == "v" else -1, -1)[..., ~used] = 0.0
    torch.save({"model": model.state_dict()}, path)
    return model.eval()


def _load(path, rpe: dict, img_size: int) -> torch.nn.Module:
    return timm.create_model(
        "irpe_deit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
        img_size=img_size, rpe_config=rpe, **TINY,
    ).eval()


@pytest.mark.parametrize(("resize", "rpe"), ROUND_TRIPS, ids=[f"{r}-{c['method']}" for r, c in ROUND_TRIPS])
def test_224_to_384_and_back_restores_bucket_ids_and_tables(tmp_path, resize, rpe):
    source = _trained_checkpoint(tmp_path / "224.pth", rpe)
    big = _load(tmp_path / "224.pth", {**rpe, "resize": resize}, 384)
    assert big.rpe_config.resize == resize and big.rpe_config.trained_grid == (14, 14)
    torch.save({"model": big.state_dict()}, tmp_path / "384.pth")
    back = _load(tmp_path / "384.pth", big.rpe_config.to_dict(), 224)
    assert back.rpe_config.ratio == source.rpe_config.ratio and back.rpe_config.trained_grid == (14, 14)
    modules = {name: m for name, m in back.named_modules() if isinstance(m, ImageRPE)}
    for name, module in source.named_modules():
        if isinstance(module, ImageRPE):
            assert torch.equal(module.bucket_ids(14, 14, "cpu"), modules[name].bucket_ids(14, 14, "cpu")), name
    source_state, back_state = source.state_dict(), back.state_dict()
    for key, value in source_state.items():
        if ".rpe_" in key:
            torch.testing.assert_close(back_state[key], value, rtol=0, atol=1e-6, msg=key)


def test_a_224_checkpoint_converts_on_load_with_one_log_line(tmp_path, caplog):
    rpe = {"method": "cross", "ratio": 20}
    _trained_checkpoint(tmp_path / "224.pth", rpe)
    with caplog.at_level(logging.INFO, logger="finetune.resize"):
        model = _load(tmp_path / "224.pth", {**rpe, "resize": "interpolate"}, 384)
    lines = [r.getMessage() for r in caplog.records if r.name == "finetune.resize"]
    assert lines == ["checkpoint grid 14x14 -> model grid 24x24: pos_embed resampled (bicubic), "
                     "cross iRPE tables interpolated (ratio 20 -> 30)"]
    assert model.blocks[0].attn.rpe_k.rp_rows.lookup_table_weight.shape == (1, 16, 122)
    with caplog.at_level(logging.INFO, logger="finetune.resize"):
        caplog.clear()
        _load(tmp_path / "224.pth", rpe, 224)
    assert not [r for r in caplog.records if r.name == "finetune.resize"]  # same grid: nothing to say


def test_a_224_hub_style_export_loads_at_384_with_only_the_strategy_given(tmp_path):
    # What a recipe with model_name hf-hub:... (here its local-dir twin) and rpe_config {resize: ...} does.
    rpe = {"method": "cross", "ratio": 20, "rpe_on": "qk"}
    source = _trained_checkpoint(tmp_path / "224.pth", rpe)
    folder = export_model(source, tmp_path / "export224", CardInfo())
    model = timm.create_model(f"local-dir:{folder}", pretrained=True, img_size=384, rpe_config={"resize": "interpolate"})
    assert model.rpe_config == RPEConfig(method="cross", ratio=30, rpe_on="qk", resize="interpolate", trained_grid=(14, 14))
    assert model.blocks[0].attn.rpe_q.rp_cols.lookup_table_weight.shape == (1, 16, 122)
    assert model.pos_embed.shape == (1, 1 + 24 * 24, 32)


@pytest.mark.parametrize("resize", ["keep", "scale", "interpolate"])
def test_a_384_model_from_a_224_checkpoint_exports_and_reloads_with_its_settings(tmp_path, resize):
    rpe = {"method": "euc", "ratio": 20, "rpe_on": "kv"}
    _trained_checkpoint(tmp_path / "224.pth", rpe)
    model = _load(tmp_path / "224.pth", {"resize": resize, **rpe}, 384)
    folder = export_model(model, tmp_path / "export", CardInfo())
    saved = json.loads((folder / "config.json").read_text())["model_args"]["rpe_config"]
    assert saved["resize"] == resize and saved["trained_grid"] == [14, 14]
    assert saved["ratio"] == (35 if resize == "interpolate" else 20)
    reloaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert reloaded.rpe_config == model.rpe_config
    x = torch.randn(2, 3, 384, 384)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))
    assert resolution_args(reloaded) == {"rpe_config": model.rpe_config.to_dict()}


def test_scale_changes_the_384_model_and_keep_equals_the_released_behaviour(tmp_path):
    rpe = {"method": "cross", "ratio": 20}
    _trained_checkpoint(tmp_path / "224.pth", rpe)
    keep, scale = (_load(tmp_path / "224.pth", {**rpe, "resize": r}, 384) for r in ("keep", "scale"))
    released = _load(tmp_path / "224.pth", rpe, 384)  # resize defaults to keep
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        assert torch.equal(keep(x), released(x))
        assert not torch.equal(scale.forward_features(x), keep.forward_features(x))


def _assert_filter_is_pure(filter_fn, checkpoint: dict, model: torch.nn.Module, settings) -> dict:
    """Run ``filter_fn`` twice on copies of ``checkpoint``: same output, the model's weights, buffers,
    settings (``settings(model)``) and recorded arguments untouched, the input not modified."""
    state = copy.deepcopy(model.state_dict(keep_vars=False))
    before, recorded, given = settings(model), timm.models.get_model_args(model), copy.deepcopy(checkpoint)
    first, second = filter_fn(checkpoint, model), filter_fn(copy.deepcopy(given), model)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert settings(model) == before and timm.models.get_model_args(model) == recorded
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert checkpoint.keys() == given.keys()
    return first


def test_irpe_checkpoint_filter_is_pure_and_gives_what_the_built_model_loads(tmp_path):
    rpe = {"method": "cross", "ratio": 20, "rpe_on": "qkv"}
    _trained_checkpoint(tmp_path / "224.pth", rpe)
    model = _load(tmp_path / "224.pth", {**rpe, "resize": "interpolate"}, 384)

    def settings(m):
        return m.rpe_config, [(t.config, t.num_buckets, t.grid_size) for t in m.modules() if isinstance(t, ImageRPE)]

    checkpoint = torch.load(tmp_path / "224.pth", weights_only=True)
    converted = _assert_filter_is_pure(irpe_deit.checkpoint_filter_fn, checkpoint, model, settings)
    loaded = model.state_dict()
    assert converted.keys() == loaded.keys() and all(torch.equal(converted[k], loaded[k]) for k in loaded)


def test_spvit_checkpoint_filter_is_pure_and_gives_what_the_built_model_loads(tmp_path):
    _spvit_checkpoint(tmp_path / "224.pth")
    model = _load_spvit(tmp_path / "224.pth", 384, prior_resize="scale")
    checkpoint = torch.load(tmp_path / "224.pth", weights_only=True)["state_dict"]
    converted = _assert_filter_is_pure(
        spvit.checkpoint_filter_fn, checkpoint, model, lambda m: (m.prior_resize, m.trained_grid)
    )
    loaded = model.state_dict()
    assert all(torch.equal(converted[k], loaded[k]) for k in loaded)


def test_a_filter_given_a_model_not_built_for_the_checkpoint_grid_says_how_to_build_it(tmp_path):
    rpe = {"method": "product", "ratio": 1.9, "resize": "scale"}
    _trained_checkpoint(tmp_path / "224.pth", rpe)
    model = timm.create_model("irpe_deit_tiny_patch16_224", img_size=384, rpe_config=rpe, **TINY)
    with pytest.raises(ValueError, match=r"checkpoint grid 14x14 differs from the model's 24x24.*pretrained=True"):
        irpe_deit.checkpoint_filter_fn(torch.load(tmp_path / "224.pth", weights_only=True), model)
    assert model.rpe_config.trained_grid is None


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def test_config_fields_validate_and_stay_hashable():
    config = RPEConfig.from_any({"resize": "scale", "trained_grid": [14, 16]})
    assert config.trained_grid == (14, 16) and hash(config) == hash(RPEConfig(resize="scale", trained_grid=(14, 16)))
    assert RPEConfig.from_any(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match=r"rpe_config.resize='stretch': expected one of keep, scale, interpolate"):
        RPEConfig(resize="stretch")
    with pytest.raises(ValueError, match=r"rpe_config.trained_grid=\[14\]: expected None or a \(rows, cols\) pair"):
        RPEConfig(trained_grid=[14])


def test_a_partial_rpe_config_overrides_an_official_model_key_by_key():
    model = timm.create_model("deit_small_patch16_224_ctx_euc_20_shared_k", rpe_config={"resize": "scale"}, **TINY)
    assert model.rpe_config == RPEConfig(method="euc", ratio=20, rpe_on="k", resize="scale")


# ---------------------------------------------------------------------------------------------
# SP-ViT spatial priors
# ---------------------------------------------------------------------------------------------

SP_TINY = dict(depth=2, sp_layers=1, embed_dim=32, num_heads=2)


def _spvit_checkpoint(path) -> torch.nn.Module:
    """A 224 SP-ViT with random weights (w2 too, so the priors are not constant), as a CheckpointSaver file."""
    torch.manual_seed(0)
    model = timm.create_model("spvit_small_patch16_224", **SP_TINY)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(std=0.3)
    torch.save({"state_dict": model.state_dict()}, path)
    return model.eval()


def _load_spvit(path, img_size: int, **kwargs) -> torch.nn.Module:
    return timm.create_model(
        "spvit_small_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
        img_size=img_size, **SP_TINY, **kwargs,
    ).eval()


def _direct_prior(attn, offsets: torch.Tensor) -> torch.Tensor:
    """SP_h(dx, dy) of every head at (M, 2) offsets, straight from the MLP weights: (heads, M)."""
    hidden = torch.relu(offsets @ attn.w1.weight.t() + attn.w1.bias).view(-1, attn.num_heads, attn.head_dim)
    return torch.einsum("mhd,hd->hm", hidden, attn.w2.view(attn.num_heads, attn.head_dim)) + attn.b2[:, None]


@pytest.mark.parametrize("prior_resize", ["keep", "scale"])
def test_spvit_prior_at_384_reads_raw_or_trained_grid_offsets(tmp_path, prior_resize):
    _spvit_checkpoint(tmp_path / "224.pth")
    model = _load_spvit(tmp_path / "224.pth", 384, prior_resize=prior_resize)
    assert model.prior_resize == prior_resize and model.trained_grid == (14, 14)
    attn = model.blocks[0].attn
    scale = prior_offset_scale(model.prior_resize, model.trained_grid, (24, 24))
    assert scale == ((1.0, 1.0) if prior_resize == "keep" else (14 / 24, 14 / 24))
    prior = attn.spatial_prior((24, 24), scale)  # (heads, n, n), query i -> key j
    # pairs: (0,0)->(5,7), (23,23)->(0,0), (10,3)->(10,20); (dx, dy) = (col_j - col_i, row_j - row_i)
    pairs = [((0, 0), (5, 7)), ((23, 23), (0, 0)), ((10, 3), (10, 20))]
    factor = 14 / 24 if prior_resize == "scale" else 1.0
    offsets = torch.tensor([[(cj - ci) * factor, (rj - ri) * factor] for (ri, ci), (rj, cj) in pairs])
    expected = _direct_prior(attn, offsets)
    with torch.no_grad():
        for k, ((ri, ci), (rj, cj)) in enumerate(pairs):
            torch.testing.assert_close(prior[:, ri * 24 + ci, rj * 24 + cj], expected[:, k])


def test_spvit_scale_equals_keep_with_first_layer_weights_scaled(tmp_path):
    # Offsets times s through Linear(2, dim) are the offsets through columns scaled by s: the whole
    # model under scale must then equal the keep model with those weights (end-to-end check of the axes).
    _spvit_checkpoint(tmp_path / "224.pth")
    scaled = _load_spvit(tmp_path / "224.pth", 384, prior_resize="scale")
    keep = _load_spvit(tmp_path / "224.pth", 384, prior_resize="keep")
    released = _load_spvit(tmp_path / "224.pth", 384)
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        assert torch.equal(keep(x), released(x))  # keep is the default, as released
        assert not torch.allclose(scaled(x), keep(x))
        keep.blocks[0].attn.w1.weight.mul_(14 / 24)
        torch.testing.assert_close(scaled(x), keep(x))


def test_spvit_384_from_224_exports_and_reloads_with_its_prior_settings(tmp_path):
    _spvit_checkpoint(tmp_path / "224.pth")
    model = _load_spvit(tmp_path / "224.pth", 384, prior_resize="scale")
    folder = export_model(model, tmp_path / "export", CardInfo())
    args = json.loads((folder / "config.json").read_text())["model_args"]
    assert args["prior_resize"] == "scale" and args["trained_grid"] == [14, 14] and args["img_size"] == [384, 384]
    reloaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert reloaded.prior_resize == "scale" and reloaded.trained_grid == (14, 14)
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))
    assert resolution_args(reloaded) == {"prior_resize": "scale", "trained_grid": [14, 14]}


def test_spvit_prior_resize_names_the_bad_value():
    with pytest.raises(ValueError, match="prior_resize='stretch': expected one of keep, scale"):
        prior_offset_scale("stretch", (14, 14), (24, 24))


def test_a_checkpoint_without_pos_embed_takes_its_grid_from_the_pretrained_cfg(tmp_path):
    rpe = {"method": "product", "ratio": 1.9}
    model = timm.create_model("irpe_deit_tiny_patch16_224", pos_embed="none", rpe_config=rpe, **TINY)
    torch.save({"model": model.state_dict()}, tmp_path / "224.pth")
    big = timm.create_model(
        "irpe_deit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "224.pth")),
        pos_embed="none", img_size=384, rpe_config={**rpe, "resize": "scale"}, **TINY,
    )
    assert big.pos_embed is None and big.rpe_config.trained_grid == (14, 14)
