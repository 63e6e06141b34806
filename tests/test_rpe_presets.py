"""The earlier RPEs of the iRPE paper's Tab. 5 as named presets: settings, bucket counts, models."""

from __future__ import annotations

import pytest
import timm
import torch

import finetune  # noqa: F401  (registers the models)
from finetune.backbones.irpe import RPE_PRESETS, RPEConfig, bucket_ids, clip_index, num_buckets


@pytest.mark.parametrize("name", ["shaw", "transformer_xl", "huang"])
def test_adapted_1d_presets_use_product_and_clip_with_shared_tables(name: str):
    config = RPE_PRESETS[name]
    assert (config.method, config.index, config.shared_head) == ("product", "clip", True)
    # h on 14 x 14 offsets: clipped at +-3, so the product has 7 x 7 buckets plus the class bucket
    dr = torch.arange(-13, 14)
    assert clip_index(dr, config.beta).unique().tolist() == list(range(-3, 4))
    ids = bucket_ids("product", 14, 14, config)
    assert ids.shape == (197, 197)
    assert ids.unique().numel() == num_buckets("product", config) == 50


def test_presets_place_the_encodings_where_the_papers_do():
    assert {name: config.rpe_on for name, config in RPE_PRESETS.items()} == {
        "shaw": "kv",
        "transformer_xl": "k",
        "huang": "qk",
        "sasa": "k",
    }
    assert all(config.mode == "ctx" for config in RPE_PRESETS.values())


def test_sasa_preset_gives_every_row_and_column_offset_of_14x14_its_own_entry():
    config = RPE_PRESETS["sasa"]
    assert (config.method, config.index, config.shared_head) == ("cross", "clip", True)
    for axis in ("cross_rows", "cross_cols"):
        ids = bucket_ids(axis, 14, 14, config)
        assert ids.unique().numel() == num_buckets(axis, config) == 27 + 1
    rows = bucket_ids("cross_rows", 14, 14, config)[1:, 1:]
    offsets = torch.arange(14).repeat_interleave(14)
    assert torch.equal(rows, offsets[:, None] - offsets[None, :] + 13)  # raw row offset, no clipping


@pytest.mark.parametrize("name", list(RPE_PRESETS))
def test_a_preset_name_builds_the_model_with_its_tables(name: str):
    model = timm.create_model("irpe_deit_tiny_patch16_224", rpe_config=name, depth=1, num_classes=3)
    assert model.rpe_config == RPE_PRESETS[name]
    tables = {key: value.shape for key, value in model.state_dict().items() if "lookup_table" in key}
    placements = {key.split(".")[3] for key in tables}
    assert placements == {f"rpe_{on}" for on in RPE_PRESETS[name].rpe_on}
    assert all(shape[0] == 1 for shape in tables.values())  # one table shared by all heads
    assert model(torch.randn(2, 3, 224, 224)).shape == (2, 3)


def test_an_unknown_preset_name_is_a_one_line_error():
    with pytest.raises(ValueError, match="rpe_config='shaws': expected a dict or a preset name, one of shaw"):
        RPEConfig.from_any("shaws")
