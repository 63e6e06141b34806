"""iRPE: index functions, bucket maps, fast vs reference attention, official models and checkpoints."""

from __future__ import annotations

import itertools

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

import finetune  # noqa: F401  (registers the models)
from finetune.backbones import flex
from finetune.backbones.checkpoint import CheckpointMismatchError
from finetune.backbones.irpe import (
    ImageRPE,
    RPEAttention,
    RPEConfig,
    bucket_ids,
    clip_index,
    num_buckets,
    piecewise_index,
)
from finetune.backbones.irpe_deit import GENERIC_MODELS, OFFICIAL_MODELS

# ---------------------------------------------------------------------------------------------
# Index functions
# ---------------------------------------------------------------------------------------------


def test_piecewise_index_matches_hand_computed_values_for_ratio_1_9():
    # alpha 1.9, beta 3.8, gamma 15.2: |x| <= 1.9 rounds; beyond, the log part rounds and caps at int(3.8) = 3.
    # x=2: 1.9 + ln(2/1.9)/ln 8 * 1.9 = 1.947 -> 2;  x=3: 2.317 -> 2;  x=4: 2.580 -> 3;  x=13: 3.657 -> 4 -> 3.
    x = torch.tensor([-13, -4, -3, -2, -1, 0, 1, 2, 3, 4, 13, 100])
    expected = torch.tensor([-3, -3, -2, -2, -1, 0, 1, 2, 2, 3, 3, 3])
    assert torch.equal(piecewise_index(x, 1.9, 3.8, 15.2), expected)


def test_piecewise_index_rounds_half_to_even_inside_alpha():
    x = torch.tensor([0.5, 1.5, 2.5, -2.5])
    assert piecewise_index(x, 5.0, 10.0, 40.0).tolist() == [0, 2, 2, -2]


def test_clip_index():
    x = torch.tensor([-5, -1, 0, 3, 7])
    assert clip_index(x, 3.0).tolist() == [-3, -1, 0, 3, 3]


# ---------------------------------------------------------------------------------------------
# Bucket maps
# ---------------------------------------------------------------------------------------------

OFFICIAL_COUNTS = [("product", 1.9, 50), ("euc", 20, 20), ("quant", 33, 51)]


@pytest.mark.parametrize(("method", "ratio", "used"), OFFICIAL_COUNTS)
def test_used_buckets_on_14x14_with_class_token(method, ratio, used):
    config = RPEConfig(method=method, ratio=ratio, skip=1)
    ids = bucket_ids(method, 14, 14, config)
    assert ids.shape == (197, 197)
    assert ids.unique().numel() == used
    assert int(ids.max()) < num_buckets(method, config)


def test_cross_uses_28_buckets_per_axis_56_in_all():
    config = RPEConfig(method="cross", ratio=20, skip=1)
    rows, cols = bucket_ids("cross_rows", 14, 14, config), bucket_ids("cross_cols", 14, 14, config)
    assert rows.unique().numel() == 28 and cols.unique().numel() == 28
    assert num_buckets("cross_rows", config) == 2 * 40 + 1 + 1


def test_table_sizes_follow_int_beta_and_skip():
    assert num_buckets("product", RPEConfig(ratio=1.9, skip=1)) == 7 * 7 + 1
    assert num_buckets("product", RPEConfig(ratio=1.9, skip=0)) == 49
    assert num_buckets("euc", RPEConfig(method="euc", ratio=20, skip=1)) == 82
    assert num_buckets("quant", RPEConfig(method="quant", ratio=33, skip=1)) == 134


def test_product_bucket_map_hand_computed_on_3x3():
    ids = bucket_ids("product", 3, 3, RPEConfig(ratio=1.9, skip=0))
    # token 0 = (0, 0), token 8 = (2, 2): (dr, dc) = (-2, -2) -> g = -2 -> (-2 + 3) * 7 + (-2 + 3) = 8
    assert ids[0, 8] == 8
    assert ids[8, 0] == (2 + 3) * 7 + (2 + 3)
    assert torch.all(ids.diagonal() == 3 * 7 + 3)
    # token 1 = (0, 1), token 3 = (1, 0): (dr, dc) = (-1, 1)
    assert ids[1, 3] == (-1 + 3) * 7 + (1 + 3)


def test_quantization_indexes_the_squared_distance():
    config = RPEConfig(method="quant", ratio=33, skip=0)
    ids = bucket_ids("quant", 3, 3, config)
    b = int(config.beta)
    assert ids[0, 4] == 2 + b  # offset (1, 1): squared distance 2 (Euclidean would round sqrt(2) to 1)
    assert ids[0, 8] == 8 + b  # offset (2, 2): squared distance 8
    euc = bucket_ids("euc", 3, 3, RPEConfig(method="euc", ratio=20, skip=0))
    assert euc[0, 4] == 1 + int(RPEConfig(ratio=20).beta)


def test_skip_tokens_share_the_last_bucket():
    config = RPEConfig(ratio=1.9, skip=2)
    ids = bucket_ids("product", 4, 5, config)
    extra = num_buckets("product", config) - 1
    assert ids.shape == (22, 22)
    assert torch.all(ids[:2] == extra) and torch.all(ids[:, :2] == extra)
    assert torch.all(ids[2:, 2:] < extra)


@pytest.mark.parametrize(("method", "ratio"), [("euc", 20), ("quant", 33)])
def test_undirected_methods_are_symmetric(method, ratio):
    ids = bucket_ids(method, 14, 14, RPEConfig(method=method, ratio=ratio))
    assert torch.equal(ids, ids.t())


def test_directed_methods_tell_opposite_offsets_apart():
    ids = bucket_ids("product", 14, 14, RPEConfig())
    assert not torch.equal(ids, ids.t())
    rows = bucket_ids("cross_rows", 14, 14, RPEConfig(method="cross", ratio=20))
    assert not torch.equal(rows, rows.t())


def test_non_square_grid_12x20():
    config = RPEConfig(ratio=1.9, skip=1)
    ids = bucket_ids("product", 12, 20, config)
    assert ids.shape == (241, 241)
    # token (0, 0) -> token (0, 19): (dr, dc) = (0, -19) -> column bucket g(-19) = -3
    assert ids[1, 1 + 19] == 3 * 7 + 0
    # token (0, 0) -> token (11, 0): (dr, dc) = (-11, 0)
    assert ids[1, 1 + 11 * 20] == 0 * 7 + 3


def test_built_grid_ids_are_a_non_persistent_buffer_and_other_grids_are_computed():
    """As timm's Swin keeps its relative position index: a buffer for the built grid, not in the state
    dict; another grid (dynamic sizes) gets its ids computed; ``set_grid_size`` rebuilds the buffer."""
    config = RPEConfig()
    rpe = ImageRPE("product", "k", 2, 4, config, grid_size=(7, 9))
    assert "bucket_index" in dict(rpe.named_buffers()) and "bucket_index" not in rpe.state_dict()
    assert torch.equal(rpe.bucket_index, bucket_ids("product", 7, 9, config))
    assert rpe.bucket_ids(7, 9, torch.device("cpu")) is rpe.bucket_index
    assert torch.equal(rpe.bucket_ids(9, 7, torch.device("cpu")), bucket_ids("product", 9, 7, config))
    rpe.set_grid_size((9, 7))
    assert rpe.grid_size == (9, 7) and torch.equal(rpe.bucket_index, bucket_ids("product", 9, 7, config))
    assert rpe.to(torch.float64).bucket_index.dtype == torch.long


def test_tables_of_a_model_share_one_bucket_index_per_grid_and_config():
    """The q, k and v tables of every layer hold one (n, n) id tensor between them, not one each;
    another grid or config gets its own, and rebuilding one table's grid leaves the others alone."""
    model = timm.create_model(
        "irpe_deit_tiny_patch16_224", img_size=64, depth=2, rpe_config=dict(rpe_on="qkv"), num_classes=3
    )
    tables = [m for m in model.modules() if isinstance(m, ImageRPE)]
    assert len(tables) == 6 and len({t.bucket_index.data_ptr() for t in tables}) == 1
    assert torch.equal(tables[0].bucket_index, bucket_ids("product", 4, 4, RPEConfig(rpe_on="qkv")))
    other = ImageRPE("product", "k", 3, 64, RPEConfig(ratio=3.0), grid_size=(4, 4))
    assert other.bucket_index.data_ptr() != tables[0].bucket_index.data_ptr()
    tables[0].set_grid_size((5, 4))
    assert tables[0].bucket_index.shape == (21, 21) and tables[1].bucket_index.shape == (17, 17)


# ---------------------------------------------------------------------------------------------
# Config validation
# ---------------------------------------------------------------------------------------------


def test_bias_on_values_is_a_clear_error():
    with pytest.raises(ValueError, match="bias mode cannot be applied on values"):
        RPEConfig(mode="bias", rpe_on="qkv")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "manhattan"}, "rpe_config.method='manhattan'"),
        ({"mode": "sum"}, "rpe_config.mode='sum'"),
        ({"rpe_on": "kx"}, "rpe_config.rpe_on='kx'"),
        ({"ratio": 0}, "rpe_config.ratio=0"),
    ],
)
def test_bad_config_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RPEConfig(**kwargs)


def test_config_from_dict_accepts_contextual_alias_and_rejects_unknown_keys():
    assert RPEConfig.from_any({"mode": "contextual", "rpe_on": "kq"}) == RPEConfig(mode="ctx", rpe_on="qk")
    with pytest.raises(ValueError, match="unknown key"):
        RPEConfig.from_any({"ratios": 2})


# ---------------------------------------------------------------------------------------------
# Fast path == reference path
# ---------------------------------------------------------------------------------------------

PLACEMENTS = {"ctx": ["q", "k", "v", "qk", "qkv"], "bias": ["q", "k", "qk"]}
CASES = [
    (method, mode, on, shared)
    for method in ("euc", "quant", "cross", "product")
    for mode in ("bias", "ctx")
    for on in PLACEMENTS[mode]
    for shared in (True, False)
]
RATIOS = {"euc": 2.0, "quant": 4.0, "cross": 2.0, "product": 1.9}


def _randomised_attention(config: RPEConfig, dim: int = 16, heads: int = 2) -> RPEAttention:
    torch.manual_seed(0)
    attn = RPEAttention(dim, heads, qkv_bias=True, rpe_config=config)
    with torch.no_grad():
        for name, param in attn.named_parameters():
            if "lookup_table" in name:
                assert torch.count_nonzero(param) == 0, "tables start at zero"
                param.normal_(std=0.5)
    return attn


def _forward_backward(attn: RPEAttention, x: torch.Tensor, grid: tuple[int, int], reference: bool):
    attn.reference = reference
    attn.zero_grad()
    x = x.clone().requires_grad_(True)
    out = attn(x, grid)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {name: p.grad.clone() for name, p in attn.named_parameters()}
    return out.detach(), x.grad, grads


@pytest.mark.parametrize(("method", "mode", "on", "shared"), CASES)
def test_fast_path_equals_reference_forward_and_backward(method, mode, on, shared):
    """In float32 the outputs and input gradients agree to 1e-5.

    Parameter gradients sum over every token (tables over every (i, j) pair, 330k terms at 24x24)
    with heavy cancellation: in float32 both paths sit about 2e-5 (relative) from float64, so
    they are compared in float64 (on 14x14), where the two formulas must agree to rounding.
    """
    for grid, skip in itertools.product([(14, 14), (24, 24)], [1, 0]):
        config = RPEConfig(method=method, mode=mode, ratio=RATIOS[method], rpe_on=on, shared_head=shared, skip=skip)
        attn = _randomised_attention(config)
        x = torch.randn(2, skip + grid[0] * grid[1], 16)  # two images: the fast path loops over them
        fast = _forward_backward(attn, x, grid, reference=False)
        ref = _forward_backward(attn, x, grid, reference=True)
        torch.testing.assert_close(fast[0], ref[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast[1], ref[1], atol=1e-5, rtol=1e-5)
        with torch.no_grad():  # inference takes the fused SDPA kernels where training on the CPU does not
            attn.reference = False
            torch.testing.assert_close(attn(x, grid), ref[0], atol=1e-5, rtol=1e-5)
        if grid != (14, 14):  # the float64 gradient check does not depend on the grid size: once is enough
            continue
        attn.double()
        fast64 = _forward_backward(attn, x.double(), grid, reference=False)
        ref64 = _forward_backward(attn, x.double(), grid, reference=True)
        torch.testing.assert_close(fast64[1], ref64[1], atol=1e-10, rtol=1e-10)
        for name in fast64[2]:
            torch.testing.assert_close(fast64[2][name], ref64[2][name], atol=1e-9, rtol=1e-9, msg=name)


# every method, mode and q/k placement once; shared tables on half the methods, per-head on the others
FLEX_CASES = [(m, mode, on, m in ("euc", "cross")) for m, mode, on, shared in CASES if "v" not in on and shared]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize(("method", "mode", "on", "shared"), FLEX_CASES)
def test_flex_score_mod_equals_reference_attention(method, mode, on, shared):
    """FlexAttention with the layer's score_mod (its unfused eager form: same maths as the compiled
    kernel, no compile) gives the reference output on a non-square grid (product: also without skip)."""
    for grid, skip in [((5, 4), 1), ((3, 6), 0)][: 2 if method == "product" else 1]:
        config = RPEConfig(method=method, mode=mode, ratio=RATIOS[method], rpe_on=on, shared_head=shared, skip=skip)
        attn = _randomised_attention(config).eval()
        batch, num_tokens = 2, skip + grid[0] * grid[1]
        x = torch.randn(batch, num_tokens, 16)
        attn.reference = True
        with torch.no_grad():
            expected = attn(x, grid)
            q, k, v = attn.qkv(x).reshape(batch, num_tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            out = flex.attend(q, k, v, flex.rpe_score_mod(attn, q, k, grid), attn.scale, compiled=False)
            got = attn.proj(out.transpose(1, 2).reshape(batch, num_tokens, 16))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_flex_is_used_on_cpu_only_for_inference_and_when_asked():
    attn = _randomised_attention(RPEConfig(rpe_on="k"))
    q = torch.randn(1, 2, 5, 8)
    assert not flex.usable(attn.eval(), q, training_grad=False)  # off by default on the CPU
    assert flex.set_cpu_inference(torch.nn.Sequential(attn, torch.nn.Linear(2, 2))) == 1
    assert flex.usable(attn, q, training_grad=False)
    assert not flex.usable(attn.train(), q, training_grad=True)  # no CPU backward
    attn.attn_drop.p = 0.1
    assert flex.usable(attn.eval(), q, training_grad=False) and not flex.usable(attn.train(), q, training_grad=False)


@pytest.mark.parametrize("method", ["euc", "quant", "cross_rows", "product"])
def test_bucket_sums_is_the_adjoint_of_pairs(method):
    """<pairs(P), G> == <P, bucket_sums(G)>: the backward pass relies on it for every table."""
    rpe = ImageRPE(method, "k", 2, 4, RPEConfig(method="cross" if method.startswith("cross") else method))
    grid, n = (5, 7), 1 + 35
    per_bucket = torch.randn(3, 2, n, rpe.num_buckets, dtype=torch.float64)
    per_pair = torch.randn(3, 2, n, n, dtype=torch.float64)
    spread, summed = rpe.pairs(per_bucket, *grid), rpe.bucket_sums(per_pair, *grid)
    assert spread.shape == per_pair.shape and summed.shape == per_bucket.shape
    torch.testing.assert_close((spread * per_pair).sum(), (per_bucket * summed).sum())
    ids = rpe.bucket_ids(*grid, torch.device("cpu"))
    assert spread[1, 0, 4, 9] == per_bucket[1, 0, 4, ids[4, 9]]


def test_rpe_changes_the_output_once_tables_are_trained():
    config = RPEConfig(rpe_on="qkv")
    attn = _randomised_attention(config)
    x = torch.randn(1, 1 + 36, 16)
    with_rpe = attn(x, (6, 6))
    with torch.no_grad():
        for name, param in attn.named_parameters():
            if "lookup_table" in name:
                param.zero_()
    assert not torch.allclose(with_rpe, attn(x, (6, 6)))


def test_token_count_must_match_grid_and_skip():
    attn = RPEAttention(16, 2, rpe_config=RPEConfig(skip=1))
    with pytest.raises(ValueError, match="do not match a 4x5 grid with 1 leading token"):
        attn(torch.randn(1, 20, 16), (4, 5))
    with pytest.raises(ValueError, match="no patch grid; pass grid_size"):  # no square guess
        attn(torch.randn(1, 17, 16))


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def test_every_official_and_generic_name_is_registered_with_its_release_file():
    registered = set(timm.list_models("*deit*"))
    assert set(OFFICIAL_MODELS) | set(GENERIC_MODELS) <= registered
    for name in OFFICIAL_MODELS:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.url.endswith(f"/{name}.pth")
        assert cfg.input_size == (3, 224, 224) and cfg.crop_pct == 0.875 and cfg.interpolation == "bicubic"
        assert cfg.mean == timm.data.IMAGENET_DEFAULT_MEAN and cfg.std == timm.data.IMAGENET_DEFAULT_STD


def test_keyword_arguments_override_architecture_defaults():
    model = timm.create_model(
        "irpe_deit_small_patch16_224",
        depth=2,
        num_classes=7,
        img_size=64,
        rpe_config={"method": "cross", "ratio": 2, "rpe_on": "qk", "mode": "bias"},
    )
    assert len(model.blocks) == 2 and model.num_classes == 7 and model.embed_dim == 384
    assert model.blocks[0].attn.rpe_k.rp_rows.lookup_table_bias.shape == (1, 2 * 4 + 1 + 1)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)


# The released key layout: name -> {key: shape} at depth 1 (rpe tables of block 0).
OFFICIAL_KEYS = {
    "deit_small_patch16_224_ctx_product_50_shared_k": {"blocks.0.attn.rpe_k.lookup_table_weight": (1, 64, 50)},
    "deit_small_patch16_224_ctx_cross_56_shared_k": {
        "blocks.0.attn.rpe_k.rp_rows.lookup_table_weight": (1, 64, 82),
        "blocks.0.attn.rpe_k.rp_cols.lookup_table_weight": (1, 64, 82),
    },
    "deit_small_patch16_224_ctx_product_50_shared_qkv": {
        "blocks.0.attn.rpe_q.lookup_table_weight": (1, 64, 50),
        "blocks.0.attn.rpe_k.lookup_table_weight": (1, 64, 50),
        "blocks.0.attn.rpe_v.lookup_table_weight": (1, 50, 64),
    },
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_KEYS))
def test_official_key_layout(name):
    state = timm.create_model(name, depth=1).state_dict()
    for key, shape in OFFICIAL_KEYS[name].items():
        assert tuple(state[key].shape) == shape
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "head.weight"} <= set(state)


def _write_official_checkpoint(path, name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(1)
    model = timm.create_model(name, **kwargs)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(std=0.02)
    torch.save({"model": model.state_dict()}, path)
    return model.eval()


def test_full_size_official_checkpoint_loads_with_no_missing_or_unexpected_keys(tmp_path):
    name = "deit_small_patch16_224_ctx_product_50_shared_k"
    path = tmp_path / f"{name}.pth"
    source = _write_official_checkpoint(path, name)
    loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("name", sorted(OFFICIAL_KEYS))
def test_official_checkpoint_round_trips_through_timm(tmp_path, name):
    path = tmp_path / f"{name}.pth"
    source = _write_official_checkpoint(path, name, depth=2)
    loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), depth=2).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x))


def test_official_checkpoint_loads_at_another_resolution(tmp_path):
    name = "deit_tiny_patch16_224_ctx_product_50_shared_k"
    path = tmp_path / f"{name}.pth"
    source = _write_official_checkpoint(path, name, depth=1)
    loaded = timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), depth=1, img_size=160
    )
    expected = resample_abs_pos_embed(source.pos_embed.detach(), new_size=(10, 10), num_prefix_tokens=1)
    assert loaded.pos_embed.shape == (1, 101, 192)
    torch.testing.assert_close(loaded.pos_embed.detach(), expected)
    assert loaded(torch.randn(1, 3, 160, 160)).shape == (1, 1000)


def test_checkpoint_for_another_architecture_names_the_key_and_both_shapes(tmp_path):
    path = tmp_path / "tiny.pth"
    _write_official_checkpoint(path, "deit_tiny_patch16_224_ctx_product_50_shared_k", depth=1)
    with pytest.raises(CheckpointMismatchError) as info:
        timm.create_model(
            "deit_small_patch16_224_ctx_product_50_shared_k",
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(path)),
            depth=1,
        )
    message = str(info.value)
    assert "'cls_token'" in message and "(1, 1, 192)" in message and "(1, 1, 384)" in message


def test_checkpoint_with_other_rpe_layout_names_the_missing_key(tmp_path):
    path = tmp_path / "k.pth"
    _write_official_checkpoint(path, "deit_small_patch16_224_ctx_product_50_shared_k", depth=1)
    with pytest.raises(CheckpointMismatchError, match=r"lacks key 'blocks\.0\.attn\.rpe_q\.lookup_table_weight'"):
        timm.create_model(
            "deit_small_patch16_224_ctx_product_50_shared_qkv",
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(path)),
            depth=1,
        )


def test_no_weight_decay_names_rpe_tables_pos_embed_and_cls_token():
    model = timm.create_model("deit_small_patch16_224_ctx_product_50_shared_qkv", depth=2)
    names = model.no_weight_decay()
    assert {"pos_embed", "cls_token"} <= names
    tables = {n for n, _ in model.named_parameters() if "lookup_table" in n}
    assert len(tables) == 6 and tables <= names


def test_non_square_and_dynamic_inputs():
    model = timm.create_model("irpe_deit_tiny_patch16_224", depth=1, img_size=(192, 320)).eval()
    assert model(torch.randn(1, 3, 192, 320)).shape == (1, 1000)
    dynamic = timm.create_model("irpe_deit_tiny_patch16_224", depth=1, img_size=64, dynamic_img_size=True).eval()
    assert dynamic(torch.randn(1, 3, 48, 80)).shape == (1, 1000)


def test_grad_checkpointing_matches_plain_forward():
    model = timm.create_model("irpe_deit_tiny_patch16_224", depth=2, img_size=64)
    x = torch.randn(2, 3, 64, 64)
    plain = model(x)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(x), plain)


def test_official_checkpoint_loads_with_a_new_class_count_for_fine_tuning(tmp_path):
    name = "deit_tiny_patch16_224_ctx_product_50_shared_k"
    path = tmp_path / f"{name}.pth"
    source = _write_official_checkpoint(path, name, depth=1)
    loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), depth=1, num_classes=10)
    assert loaded.head.weight.shape == (10, 192)
    assert torch.equal(loaded.blocks[0].attn.rpe_k.lookup_table_weight, source.blocks[0].attn.rpe_k.lookup_table_weight)


def test_other_grid_ids_are_reused_across_eager_calls_and_serve_training_after_inference_mode():
    rpe = ImageRPE("product", "k", 2, 4, RPEConfig(), grid_size=(3, 3))
    with torch.inference_mode():
        first = rpe.bucket_ids(4, 5, torch.device("cpu"))
    assert first.is_inference()
    ids = rpe.bucket_ids(4, 5, torch.device("cpu"))
    assert not ids.is_inference() and rpe.bucket_ids(4, 5, torch.device("cpu")) is ids
    assert torch.equal(ids, bucket_ids("product", 4, 5, RPEConfig()))
    per_bucket = torch.randn(1, 2, ids.shape[0], rpe.num_buckets, requires_grad=True)
    rpe.pairs(per_bucket, 4, 5).sum().backward()  # the gather saves the ids for backward
    assert per_bucket.grad is not None


def test_official_checkpoint_loads_with_one_input_channel(tmp_path):
    """timm's adapt_input_conv sums the RGB kernels after the filter's checks."""
    name = "deit_tiny_patch16_224_ctx_product_50_shared_k"
    path = tmp_path / f"{name}.pth"
    source = _write_official_checkpoint(path, name, depth=1)
    loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), depth=1, in_chans=1)
    torch.testing.assert_close(loaded.patch_embed.proj.weight.data, source.patch_embed.proj.weight.sum(1, keepdim=True))
    assert torch.equal(loaded.blocks[0].attn.rpe_k.lookup_table_weight, source.blocks[0].attn.rpe_k.lookup_table_weight)
    assert loaded.eval()(torch.randn(1, 1, 224, 224)).shape == (1, 1000)


# ---------------------------------------------------------------------------------------------
# timm's habits: attn_layer arguments, features, sizes
# ---------------------------------------------------------------------------------------------


def test_timm_attention_arguments_reach_the_rpe_attention():
    model = timm.create_model(
        "irpe_deit_tiny_patch16_224", depth=1, img_size=32, patch_size=8, qk_norm=True, proj_bias=False,
        scale_attn_norm=True, rpe_config=dict(rpe_on="qkv"),
    )
    attn = model.blocks[0].attn
    assert isinstance(attn, RPEAttention) and attn.rpe_v is not None
    assert isinstance(attn.q_norm, torch.nn.LayerNorm) and isinstance(attn.k_norm, torch.nn.LayerNorm)
    assert isinstance(attn.norm, torch.nn.LayerNorm) and attn.proj.bias is None
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()  # the CPU training path (recomputed attention) with normalised q and k
    assert attn.q_norm.weight.grad is not None and attn.rpe_v.lookup_table_weight.grad is not None
    with pytest.raises(ValueError, match="attn_layer=.* cannot be set"):
        timm.create_model("irpe_deit_tiny_patch16_224", depth=1, attn_layer="attn")


@pytest.mark.parametrize("reference", [False, True])
def test_qk_norm_normalises_queries_and_keys_on_every_path(reference):
    """Fast (recomputed) and reference training paths agree with qk_norm, gating and scale_norm on."""
    torch.manual_seed(0)
    config = RPEConfig(rpe_on="qkv")
    attn = RPEAttention(16, 2, qkv_bias=True, qk_norm=True, scale_norm=True, gated=True,
                        norm_layer=torch.nn.LayerNorm, rpe_config=config, grid_size=(3, 4))
    with torch.no_grad():
        for table in attn.rpe_modules():
            table.table.normal_(std=0.5)
    x = torch.randn(2, 13, 16, requires_grad=True)
    attn.reference = reference
    out = attn(x)
    out.sum().backward()
    attn.reference = True
    with torch.no_grad():
        expected = attn(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="qk_norm=True or scale_norm=True needs norm_layer"):
        RPEAttention(16, 2, qk_norm=True)


def test_rpe_attention_layer_plugs_into_timms_own_vision_transformer():
    from timm.models.vision_transformer import VisionTransformer

    from finetune.backbones.irpe import rpe_attention_layer

    layer = rpe_attention_layer(dict(method="cross", mode="bias", ratio=2, rpe_on="qk"), grid_size=(4, 3))
    model = VisionTransformer(img_size=(32, 24), patch_size=8, embed_dim=32, depth=1, num_heads=2, attn_layer=layer)
    attn = model.blocks[0].attn
    assert isinstance(attn, RPEAttention) and attn.grid_size == (4, 3) and attn.rpe_config.method == "cross"
    model(torch.randn(2, 3, 32, 24)).sum().backward()
    assert attn.rpe_k.rp_rows.lookup_table_bias.grad is not None


@pytest.mark.parametrize("dynamic", [False, True])
def test_forward_intermediates_and_features_only_on_a_non_square_input(dynamic):
    """256x192 (a 16x12 grid): every path passes the grid to the blocks (no square guess)."""
    kwargs = dict(depth=2, rpe_config=dict(rpe_on="qk"))
    kwargs.update(dict(img_size=224, dynamic_img_size=True) if dynamic else dict(img_size=(256, 192)))
    model = timm.create_model("irpe_deit_tiny_patch16_224", **kwargs).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lookup_table" in name:
                param.normal_(std=0.5)
    x = torch.randn(1, 3, 256, 192)
    final, maps = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x))
    assert [m.shape for m in maps] == [(1, 192, 16, 12)] * 2
    features = timm.create_model("irpe_deit_tiny_patch16_224", features_only=True, out_indices=(0, 1), **kwargs).eval()
    assert features.model.load_state_dict(model.state_dict(), strict=False).missing_keys == []  # pruned: no norm, head
    for got, expected in zip(features(x), maps, strict=True):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("resize", ["keep", "scale", "interpolate"])
def test_set_input_size_follows_rpe_config_resize(tmp_path, resize):
    """set_input_size gives the model that loading its weights at the new size builds."""
    name = "irpe_deit_tiny_patch16_224"
    rpe = dict(method="product", ratio=3.0 if resize == "interpolate" else 1.9, resize=resize)
    source = timm.create_model(name, depth=1, img_size=64, rpe_config=rpe).eval()
    with torch.no_grad():
        for param in source.parameters():
            param.normal_(std=0.02)
    path = tmp_path / "w.pth"
    torch.save({"model": source.state_dict()}, path)
    loaded = timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), input_size=(3, 64, 64)),
        depth=1, img_size=96, rpe_config=rpe,
    ).eval()
    source.set_input_size((96, 96))
    assert source.rpe_config == loaded.rpe_config and source.rpe_config.trained_grid == (4, 4)
    assert torch.equal(source.blocks[0].attn.rpe_k.bucket_index, loaded.blocks[0].attn.rpe_k.bucket_index)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(source(x), loaded(x))
