"""SP-ViT: SP-SA attention and its prior, the LV-ViT body, official models and checkpoints."""

from __future__ import annotations

import argparse

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.layers.attention import Attention
from timm.optim import param_groups_layer_decay

import finetune  # noqa: F401  (registers the models)
from finetune.backbones import flex
from finetune.backbones.checkpoint import CheckpointMismatchError
from finetune.backbones.spvit import SPSAttention, SPViT, offset_table

# A small SP-ViT: 2 blocks (the first with SP-SA), dim 32, 4 heads, 64 px images (a 4x4 grid).
SMALL = dict(embed_dim=32, num_heads=4, depth=2, sp_layers=1, img_size=64, stem_channels=16)


def small_model(name: str = "spvit_small_patch16_224", **kwargs) -> SPViT:
    torch.manual_seed(0)
    return timm.create_model(name, **{**SMALL, **kwargs})


def randomize_(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Random values in every float parameter and buffer (w2 included), so loads are observable."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(
                    torch.randn(tensor.shape, generator=gen) * 0.1 + (1.0 if tensor.ndim == 1 else 0.0)
                )
    return model


# ---------------------------------------------------------------------------------------------
# SP-SA attention and the spatial prior
# ---------------------------------------------------------------------------------------------


def direct_prior(attn: SPSAttention, height: int, width: int, offset_scale=(1.0, 1.0)) -> torch.Tensor:
    """SP_h(dx, dy) evaluated on every one of the n^2 (query, key) pairs, (heads, n, n)."""
    pos = [(r, c) for r in range(height) for c in range(width)]
    offsets = torch.tensor(
        [[(cj - ci) * offset_scale[0], (rj - ri) * offset_scale[1]] for ri, ci in pos for rj, cj in pos],
        dtype=attn.w1.weight.dtype,
    )  # (n*n, 2) as (dx, dy)
    hidden = F.relu(offsets @ attn.w1.weight.T + attn.w1.bias)  # (n*n, dim)
    heads, head_dim = attn.num_heads, attn.head_dim
    per_head = (hidden.view(-1, heads, head_dim) * attn.w2.view(heads, head_dim)).sum(
        -1
    ) + attn.b2  # (n*n, H)
    n = height * width
    return per_head.T.reshape(heads, n, n)


def reference_spsa(attn: SPSAttention, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """SP-SA written out from its definition with the direct prior."""
    batch, n, dim = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    q, k = (t.reshape(batch, n, heads, head_dim).transpose(1, 2) for t in attn.qk(x).chunk(2, dim=-1))
    v = attn.v(x).reshape(batch, n, heads, head_dim).transpose(1, 2)
    logits = direct_prior(attn, height, width) * (q @ k.transpose(-2, -1)) / head_dim**0.5
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, n, dim)
    return attn.proj(out)


def randomize_prior_(attn: SPSAttention, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (attn.w1.weight, attn.w1.bias, attn.w2, attn.b2):
            p.copy_(torch.randn(p.shape, generator=gen))


def test_offset_table_holds_distinct_offsets_and_pair_index():
    offsets, index = offset_table(2, 3)
    assert offsets.shape == (3 * 5, 2) and index.shape == (36,)
    assert len({tuple(o) for o in offsets.tolist()}) == 15
    # token 0 is (row 0, col 0) and token 5 is (row 1, col 2): (dx, dy) of the pair (0, 5) is (2, 1), of (5, 0) (-2, -1).
    assert offsets[index[0 * 6 + 5]].tolist() == [2.0, 1.0]
    assert offsets[index[5 * 6 + 0]].tolist() == [-2.0, -1.0]
    assert offsets[index[4 * 6 + 4]].tolist() == [0.0, 0.0]


def test_fresh_spsa_layer_is_plain_multi_head_attention():
    torch.manual_seed(0)
    sp = SPSAttention(32, num_heads=4)
    assert torch.all(sp.w2 == 0) and torch.all(sp.b2 == 1)
    plain = Attention(32, num_heads=4)
    with torch.no_grad():
        plain.qkv.weight.copy_(torch.cat([sp.qk.weight, sp.v.weight]))
        plain.proj.load_state_dict(sp.proj.state_dict())
    x = torch.randn(2, 15, 32)
    expected = plain(x)
    torch.testing.assert_close(sp(x, (3, 5)), expected, atol=1e-5, rtol=1e-5)
    # and the same through scaled_dot_product_attention by hand
    q, k, v = plain.qkv(x).reshape(2, 15, 3, 4, 8).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 15, 32)
    torch.testing.assert_close(sp(x, (3, 5)), plain.proj(out), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
@pytest.mark.parametrize("offset_scale", [(1.0, 1.0), (0.5, 2.0)])
def test_distinct_offset_prior_matches_direct_evaluation_forward_and_backward(grid, offset_scale):
    sp = SPSAttention(24, num_heads=3)
    randomize_prior_(sp)
    upstream = torch.randn(3, grid[0] * grid[1], grid[0] * grid[1])

    fast = sp.spatial_prior(grid, offset_scale)
    (fast * upstream).sum().backward()
    fast_grads = [p.grad.clone() for p in (sp.w1.weight, sp.w1.bias, sp.w2, sp.b2)]
    sp.zero_grad()
    direct = direct_prior(sp, *grid, offset_scale)
    (direct * upstream).sum().backward()
    direct_grads = [p.grad for p in (sp.w1.weight, sp.w1.bias, sp.w2, sp.b2)]

    assert fast.shape == (3, grid[0] * grid[1], grid[0] * grid[1])
    assert fast.std() > 0.1  # a non-trivial prior
    torch.testing.assert_close(fast, direct, atol=1e-5, rtol=1e-5)
    for got, want in zip(fast_grads, direct_grads, strict=True):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_spsa_forward_matches_its_definition_with_random_prior(grid):
    torch.manual_seed(0)
    sp = SPSAttention(24, num_heads=3)
    randomize_prior_(sp)
    x = torch.randn(2, grid[0] * grid[1], 24)
    torch.testing.assert_close(sp(x, grid), reference_spsa(sp, x, *grid), atol=1e-5, rtol=1e-5)


def test_spsa_training_recomputes_weights_with_the_gradients_of_its_definition():
    """Eager CPU training saves no n x n tensor (the weights are recomputed in backward): its output
    and every gradient equal autograd through the definition, compared in float64."""
    torch.manual_seed(0)
    sp = SPSAttention(24, num_heads=3).double()
    randomize_prior_(sp)
    x = torch.randn(2, 15, 24, dtype=torch.float64)
    upstream = torch.randn(2, 15, 24, dtype=torch.float64)
    results = []
    for forward in (lambda inp: sp(inp, (3, 5)), lambda inp: reference_spsa(sp, inp, 3, 5)):
        sp.zero_grad()
        inp = x.clone().requires_grad_(True)
        out = forward(inp)
        (out * upstream).sum().backward()
        results.append((out.detach(), inp.grad, {name: p.grad.clone() for name, p in sp.named_parameters()}))
    (out, grad_x, grads), (ref_out, ref_grad_x, ref_grads) = results
    assert out.grad_fn is None and grads["w2"].abs().sum() > 0
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grad_x, ref_grad_x, atol=1e-12, rtol=1e-12)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-12, rtol=1e-12, msg=name)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_score_mod_multiplies_the_logits_by_the_prior():
    torch.manual_seed(0)
    sp = SPSAttention(24, num_heads=3)
    randomize_prior_(sp)
    x = torch.randn(2, 15, 24)
    with torch.no_grad():
        q, k = sp.qk(x).reshape(2, 15, 2, 3, 8).permute(2, 0, 3, 1, 4)
        v = sp.v(x).reshape(2, 15, 3, 8).transpose(1, 2)
        prior = sp.spatial_prior((3, 5)) * sp.scale
        out = flex.attend(q, k, v, flex.prior_score_mod(prior), scale=1.0, compiled=False)
        got = sp.proj(out.transpose(1, 2).reshape(2, 15, 24))
        torch.testing.assert_close(got, reference_spsa(sp, x, 3, 5), atol=1e-5, rtol=1e-5)


def test_prior_mlp_runs_once_per_forward_on_distinct_offsets_only():
    model = small_model(img_size=(48, 80)).eval()  # a 3x5 grid
    calls = []
    model.blocks[0].attn.w1.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
    with torch.no_grad():
        model(torch.randn(3, 3, 48, 80))
    assert calls == [((2 * 3 - 1) * (2 * 5 - 1), 2)]


def test_spsa_rejects_tokens_that_do_not_fit_the_grid():
    with pytest.raises(ValueError, match=r"17 tokens do not match the 4x4 patch grid"):
        SPSAttention(32, 4)(torch.randn(1, 17, 32), (4, 4))
    with pytest.raises(ValueError, match=r"dim=30 must be divisible by num_heads=4"):
        SPSAttention(30, 4)


# ---------------------------------------------------------------------------------------------
# Official models
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "depth", "sp_layers", "millions"),
    [
        ("spvit_small_patch16_224", 16, 14, 26),
        ("spvit_medium_patch16_224", 20, 10, 56),
        ("spvit_large_patch16_224", 24, 22, 150),
    ],
)
def test_official_sizes_parameter_counts_and_sp_layers(name, depth, sp_layers, millions):
    with torch.device("meta"):
        model = timm.create_model(name)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / 1e6 - millions) / millions < 0.03, count
    assert len(model.blocks) == depth and model.sp_layers == sp_layers
    assert [b.spatial_prior for b in model.blocks] == [True] * sp_layers + [False] * (depth - sp_layers)
    assert model.pretrained_cfg["paper_ids"] == "arXiv:2206.07662"
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)


def test_large_model_uses_128_channel_stem_and_skip_lam_3():
    with torch.device("meta"):
        large = timm.create_model("spvit_large_patch16_224")
        small = timm.create_model("spvit_small_patch16_224")
    assert large.patch_embed.conv1.out_channels == 128 and large.blocks[0].skip_lam == 3.0
    assert small.patch_embed.conv1.out_channels == 64 and small.blocks[0].skip_lam == 2.0


def test_keyword_arguments_override_defaults_and_384_tag_sets_the_grid():
    model = small_model(num_classes=7, drop_path_rate=0.1)
    assert model.num_classes == 7 and model.embed_dim == 32 and len(model.blocks) == 2
    assert model.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)
    without_img_size = {k: v for k, v in SMALL.items() if k != "img_size"}
    with torch.device("meta"):
        model_384 = timm.create_model("spvit_small_patch16_224.tl_in1k_384", **without_img_size)
    assert model_384.pos_embed.shape == (1, 24 * 24, 32)
    assert model_384.pretrained_cfg["crop_pct"] == 1.0


def test_bad_sp_layers_and_image_size_give_clear_errors():
    with pytest.raises(ValueError, match=r"sp_layers=2: expected 0 <= sp_layers < depth=2"):
        small_model(sp_layers=2)
    model = small_model()
    with pytest.raises(ValueError, match=r"give a 5x5 patch grid.*img_size=\(80, 80\)"):
        model(torch.randn(1, 3, 80, 80))
    with pytest.raises(ValueError, match=r"global_pool='max': SP-ViT pools with one of 'token', 'avg', ''"):
        model.reset_classifier(3, global_pool="max")


# ---------------------------------------------------------------------------------------------
# Outputs, training, feature extraction
# ---------------------------------------------------------------------------------------------


def test_outputs_in_training_and_inference_on_a_non_square_grid():
    model = small_model(img_size=(48, 80), num_classes=5)  # a 3x5 grid
    x = torch.randn(2, 3, 48, 80)
    model.eval()
    with torch.no_grad():
        tokens = model.forward_features(x)
        logits = model(x)
    assert tokens.shape == (2, 1 + 15, 32)
    expected = model.head(tokens[:, 0]) + 0.5 * model.aux_head(tokens[:, 1:]).max(dim=1).values
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), tokens[:, 0])

    model.train()
    combined = model(x)  # default: combined logits in training too
    model.return_token_logits = True
    cls_logits, token_logits = model(x)
    assert combined.shape == (2, 5) and cls_logits.shape == (2, 5) and token_logits.shape == (2, 15, 5)
    torch.testing.assert_close(combined, cls_logits + 0.5 * token_logits.max(dim=1).values)

    loss = F.cross_entropy(cls_logits, torch.tensor([1, 2])) + token_logits.logsumexp(-1).mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert model.blocks[0].attn.w2.grad.abs().sum() > 0
    assert model.cls_token.grad.abs().sum() > 0 and model.pos_embed.grad.abs().sum() > 0


@pytest.mark.parametrize("sp_layers", [0, 1])
def test_trains_with_dropout_and_drop_path_with_and_without_sp_sa(sp_layers):
    model = small_model(
        sp_layers=sp_layers, drop_path_rate=0.1, drop_rate=0.1, attn_drop_rate=0.1, proj_drop_rate=0.1
    )
    # sp_layers=0 is plain LV-ViT: the class token joins first and has a pos_embed slot
    assert model.pos_embed.shape == (1, (1 if sp_layers == 0 else 0) + 16, 32)
    assert [b.spatial_prior for b in model.blocks] == [i < sp_layers for i in range(2)]
    out = model(torch.randn(2, 3, 64, 64))
    out.sum().backward()
    assert out.shape == (2, 1000) and model.pos_embed.grad.abs().sum() > 0
    assert model.blocks[0].attn.proj.weight.grad.abs().sum() > 0


def test_grad_checkpointing_gives_the_same_output_and_gradients():
    model = small_model(num_classes=3)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    out = model(x)
    out.sum().backward()
    grad = model.blocks[0].attn.qk.weight.grad.clone()
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out_ckpt = model(x)
    out_ckpt.sum().backward()
    torch.testing.assert_close(out_ckpt, out)
    torch.testing.assert_close(model.blocks[0].attn.qk.weight.grad, grad)


def test_reset_classifier_resets_both_heads_and_features():
    model = small_model()
    assert model.num_features == 32 and model.get_classifier() is model.head
    model.reset_classifier(7)
    assert model.head.out_features == 7 and model.aux_head.out_features == 7 and model.num_classes == 7
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    model.reset_classifier(0)
    model.eval()
    with torch.no_grad():
        x = torch.randn(1, 3, 64, 64)
        torch.testing.assert_close(model(x), model.forward_features(x)[:, 0])


def test_no_weight_decay_and_layer_decay_groups():
    model = small_model()
    no_wd = model.no_weight_decay()
    assert no_wd == {
        "pos_embed",
        "cls_token",
        "blocks.0.attn.w1.weight",
        "blocks.0.attn.w1.bias",
        "blocks.0.attn.w2",
        "blocks.0.attn.b2",
    }
    groups = param_groups_layer_decay(model, weight_decay=0.05, no_weight_decay_list=no_wd, layer_decay=0.5)
    params = dict(model.named_parameters())

    def group_of(name):
        return next(g for g in groups if any(p is params[name] for p in g["params"]))

    assert group_of("blocks.0.attn.w1.weight")["weight_decay"] == 0.0
    assert group_of("blocks.0.attn.qk.weight")["weight_decay"] == 0.05
    # stem < block 0 < block 1 < head in lr scale
    scales = [
        group_of(n)["lr_scale"]
        for n in (
            "patch_embed.conv1.weight",
            "blocks.0.attn.qk.weight",
            "blocks.1.attn.qkv.weight",
            "head.weight",
        )
    ]
    assert scales == sorted(scales) and len(set(scales)) == 4
    assert group_of("pos_embed")["lr_scale"] == group_of("cls_token")["lr_scale"] == scales[0]


# ---------------------------------------------------------------------------------------------
# Official checkpoints (timm CheckpointSaver files)
# ---------------------------------------------------------------------------------------------


def release_layout(dim, heads, depth, sp_layers, num_patches, stem, classes):
    """Key -> shape of the released SP_ViT (local_up_to_layer = sp_layers), written from its code."""
    keys = {"cls_token": (1, 1, dim), "pos_embed": (1, num_patches, dim)}
    for i, cin, kernel in ((1, 3, 7), (2, stem, 3), (3, stem, 3)):
        keys[f"patch_embed.conv{i}.weight"] = (stem, cin, kernel, kernel)
        for stat in ("weight", "bias", "running_mean", "running_var"):
            keys[f"patch_embed.bn{i}.{stat}"] = (stem,)
        keys[f"patch_embed.bn{i}.num_batches_tracked"] = ()
    keys["patch_embed.proj.weight"], keys["patch_embed.proj.bias"] = (dim, stem, 8, 8), (dim,)
    for b in range(depth):
        p = f"blocks.{b}."
        for norm in ("norm1", "norm2"):
            keys[p + norm + ".weight"] = keys[p + norm + ".bias"] = (dim,)
        if b < sp_layers:
            keys |= {
                p + "attn.qk.weight": (2 * dim, dim),
                p + "attn.v.weight": (dim, dim),
                p + "attn.w1.weight": (dim, 2),
                p + "attn.w1.bias": (dim,),
                p + "attn.w2": (dim, 1),
                p + "attn.b2": (heads,),
            }
        else:
            keys[p + "attn.qkv.weight"] = (3 * dim, dim)
        keys |= {
            p + "attn.proj.weight": (dim, dim),
            p + "attn.proj.bias": (dim,),
            p + "mlp.fc1.weight": (3 * dim, dim),
            p + "mlp.fc1.bias": (3 * dim,),
            p + "mlp.fc2.weight": (dim, 3 * dim),
            p + "mlp.fc2.bias": (dim,),
            p + "pos_block.proj.0.weight": (dim, 1, 3, 3),
            p + "pos_block.proj.0.bias": (dim,),
        }
    keys |= {
        "norm.weight": (dim,),
        "norm.bias": (dim,),
        "head.weight": (classes, dim),
        "head.bias": (classes,),
        "aux_head.weight": (classes, dim),
        "aux_head.bias": (classes,),
    }
    return keys


def test_state_dict_layout_is_the_release_one():
    model = small_model(depth=3, sp_layers=2)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == release_layout(32, 4, 3, 2, 16, 16, 1000)


def save_release_checkpoint(path, state_dict, ema=None):
    """A timm CheckpointSaver file as the release's training script writes it (DDP: ``module.``)."""
    checkpoint = {
        "epoch": 309,
        "arch": "lvvit_s",
        "state_dict": {f"module.{k}": v for k, v in state_dict.items()},
        "version": 2,
        "args": argparse.Namespace(model="lvvit_s", local_up_to_layer=1),
        "metric": 83.9,
    }
    if ema is not None:
        checkpoint["state_dict_ema"] = dict(ema)
    torch.save(checkpoint, path)


@pytest.fixture(scope="module")
def release_weights():
    """Training and EMA weights of a small SP-ViT, different in every float tensor."""
    raw = randomize_(small_model(), seed=1).state_dict()
    ema = {k: (v + 0.5 if v.is_floating_point() else v) for k, v in raw.items()}
    return raw, ema


def load_release_file(path, **kwargs) -> SPViT:
    """timm.create_model on a local release file (the small test architecture; ``kwargs`` on top)."""
    return timm.create_model(
        "spvit_small_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **{**SMALL, **kwargs}
    )


def assert_loaded(model, expected, skip=()):
    for key, value in model.state_dict().items():
        if key not in skip:
            torch.testing.assert_close(value, expected[key], msg=f"{key} differs")


@pytest.mark.parametrize("use_ema", [None, True, False])
def test_release_checkpoint_with_ema_loads_ema_unless_told_not_to(tmp_path, release_weights, use_ema):
    raw, ema = release_weights
    path = tmp_path / "model_best.pth.tar"
    save_release_checkpoint(path, raw, ema)
    kwargs = {} if use_ema is None else {"use_ema": use_ema}
    model = load_release_file(path, **kwargs)
    assert_loaded(model, raw if use_ema is False else ema)
    assert model.pretrained_cfg["file"] == str(path) and "state_dict" not in model.pretrained_cfg


@pytest.mark.parametrize("use_ema", [True, False])
def test_release_checkpoint_without_ema_loads_training_weights(tmp_path, release_weights, use_ema):
    raw, _ = release_weights
    path = tmp_path / "checkpoint-309.pth.tar"
    save_release_checkpoint(path, raw)
    model = load_release_file(path, use_ema=use_ema)
    assert_loaded(model, raw)


def test_release_checkpoint_at_another_img_size_resamples_pos_embed(tmp_path, release_weights):
    raw, _ = release_weights
    path = tmp_path / "model_best.pth.tar"
    save_release_checkpoint(path, raw)
    model = load_release_file(path, img_size=96)
    expected = resample_abs_pos_embed(raw["pos_embed"], new_size=(6, 6), old_size=(4, 4), num_prefix_tokens=0)
    assert model.pos_embed.shape == (1, 36, 32)
    torch.testing.assert_close(model.pos_embed.data, expected)
    assert_loaded(model, raw, skip={"pos_embed"})
    model.eval()
    assert model(torch.randn(1, 3, 96, 96)).shape == (1, 1000)


def test_release_checkpoint_loads_for_fine_tuning_with_new_heads(tmp_path, release_weights):
    raw, _ = release_weights
    path = tmp_path / "model_best.pth.tar"
    save_release_checkpoint(path, raw)
    model = load_release_file(path, num_classes=10)
    assert model.head.weight.shape == (10, 32) and model.aux_head.weight.shape == (10, 32)
    assert_loaded(model, raw, skip={"head.weight", "head.bias", "aux_head.weight", "aux_head.bias"})


def test_checkpoint_for_another_architecture_names_the_key_and_shapes(tmp_path):
    wider = small_model(embed_dim=48).state_dict()
    path = tmp_path / "wider.pth.tar"
    save_release_checkpoint(path, wider)
    with pytest.raises(
        CheckpointMismatchError, match=r"'cls_token' has shape \(1, 1, 48\) but model .* expects \(1, 1, 32\)"
    ):
        load_release_file(path)
    # a plain ViT of the same width: its pos_embed has a class slot (17 = 1 + 4x4), SP-ViT's does not
    vit = timm.create_model(
        "vit_tiny_patch16_224", depth=1, img_size=64, embed_dim=32, num_heads=4
    ).state_dict()
    path = tmp_path / "vit.pth.tar"
    save_release_checkpoint(path, vit)
    with pytest.raises(
        CheckpointMismatchError,
        match=r"'pos_embed' has shape \(1, 17, 32\) but model .* expects \(1, 16, 32\)",
    ):
        load_release_file(path)


@pytest.mark.parametrize(("prior_resize", "largest_dx"), [("keep", 5.0), ("scale", 5.0 * 4 / 6)])
def test_loading_at_another_grid_records_trained_grid_for_prior_resize(
    tmp_path, release_weights, prior_resize, largest_dx
):
    raw, _ = release_weights
    path = tmp_path / "model_best.pth.tar"
    save_release_checkpoint(path, raw)
    model = load_release_file(path, img_size=96, prior_resize=prior_resize).eval()
    assert model.prior_resize == prior_resize and model.trained_grid == (4, 4)
    offsets = []
    model.blocks[0].attn.w1.register_forward_hook(lambda m, args, out: offsets.append(args[0]))
    with torch.no_grad():
        model(torch.randn(1, 3, 96, 96))
    # 6x6 grid: raw offsets reach 5 patches; 'scale' measures them in patches of the 4x4 training grid
    assert offsets[0][:, 0].max().item() == pytest.approx(largest_dx)
    assert offsets[0][:, 1].min().item() == pytest.approx(-largest_dx)


def test_bad_prior_resize_is_a_clear_error():
    with pytest.raises(ValueError, match=r"prior_resize='stretch': expected one of keep, scale"):
        small_model(prior_resize="stretch")


def test_use_ema_false_without_a_checkpoint_source_is_a_clear_error():
    with pytest.raises(
        ValueError, match=r"use_ema=False needs a checkpoint file or url.*spvit_small_patch16_224"
    ):
        timm.create_model("spvit_small_patch16_224", pretrained=True, use_ema=False, **SMALL)


def test_release_checkpoint_loads_with_one_input_channel(tmp_path, release_weights):
    """timm's adapt_input_conv sums the RGB kernels of the stem after the filter's checks."""
    raw, _ = release_weights
    path = tmp_path / "model_best.pth.tar"
    save_release_checkpoint(path, raw)
    model = load_release_file(path, in_chans=1)
    torch.testing.assert_close(model.patch_embed.conv1.weight.data, raw["patch_embed.conv1.weight"].sum(1, keepdim=True))
    assert_loaded(model, raw, skip={"patch_embed.conv1.weight"})
    assert model.eval()(torch.randn(1, 1, 64, 64)).shape == (1, 1000)


# ---------------------------------------------------------------------------------------------
# The timm feature and sizing API
# ---------------------------------------------------------------------------------------------


def test_forward_intermediates_match_forward_features_and_give_patch_maps():
    model = randomize_(small_model(depth=3, sp_layers=2, img_size=(64, 48))).eval()
    x = torch.randn(2, 3, 64, 48)
    final, maps = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x))
    assert [m.shape for m in maps] == [(2, 32, 4, 3)] * 3
    pairs = model.forward_intermediates(x, indices=[1, 2], output_fmt="NLC", return_prefix_tokens=True, intermediates_only=True)
    (before, no_cls), (after, cls) = pairs
    assert before.shape == after.shape == (2, 12, 32)
    assert no_cls.shape == (2, 0, 32) and cls.shape == (2, 1, 32)  # the class token joins before block sp_layers
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model.forward_intermediates(x)[0], final)


@pytest.mark.parametrize("img_size", [(256, 192), 64])
def test_features_only_on_non_square_and_dynamic_inputs(img_size):
    dynamic = img_size == 64
    model = small_model(img_size=img_size, features_only=True, out_indices=(0, 1), dynamic_img_size=dynamic).eval()
    assert model.feature_info.channels() == [32, 32] and model.feature_info.reduction() == [16, 16]
    assert [f.shape for f in model(torch.randn(1, 3, 256, 192))] == [(1, 32, 16, 12)] * 2


def test_prune_intermediate_layers_keeps_the_taken_blocks():
    model = randomize_(small_model(depth=3, sp_layers=2)).eval()
    x = torch.randn(1, 3, 64, 64)
    expected = model.forward_intermediates(x, indices=[0], intermediates_only=True)
    assert model.prune_intermediate_layers([0]) == [0]
    assert len(model.blocks) == 1 and model.num_classes == 0 and model.global_pool == ""
    torch.testing.assert_close(model.forward_intermediates(x, indices=[0], intermediates_only=True), expected)


def test_global_pool_and_reset_classifier_pooling():
    model = randomize_(small_model(num_classes=5)).eval()
    x = torch.randn(2, 3, 64, 64)
    tokens = model.forward_features(x)
    aux = 0.5 * model.aux_head(tokens[:, 1:]).amax(dim=1)
    torch.testing.assert_close(model(x), model.head(tokens[:, 0]) + aux)
    model.reset_classifier(5, "avg")
    tokens = model.forward_features(x)
    torch.testing.assert_close(model(x), model.head(tokens[:, 1:].mean(1)) + 0.5 * model.aux_head(tokens[:, 1:]).amax(1))
    model.reset_classifier(0, "")
    torch.testing.assert_close(model(x), tokens)
    assert small_model(global_pool="avg", num_classes=0).eval()(x).shape == (2, 32)


def test_dynamic_img_size_resamples_pos_embed_and_builds_offsets_for_the_input_grid():
    model = randomize_(small_model(dynamic_img_size=True)).eval()
    fixed = randomize_(small_model(img_size=(80, 48))).eval()
    expected = resample_abs_pos_embed(model.pos_embed.data, new_size=(5, 3), old_size=(4, 4), num_prefix_tokens=0)
    fixed.load_state_dict({**model.state_dict(), "pos_embed": expected})
    x = torch.randn(1, 3, 80, 48)
    torch.testing.assert_close(model(x), fixed(x))


def test_set_input_size_resamples_pos_embed_rebuilds_offsets_and_records_the_trained_grid():
    model = randomize_(small_model(prior_resize="scale")).eval()
    pos_embed = model.pos_embed.data.clone()
    model.set_input_size((96, 64))
    assert model.patch_embed.grid_size == (6, 4) and model.trained_grid == (4, 4)
    torch.testing.assert_close(
        model.pos_embed.data, resample_abs_pos_embed(pos_embed, new_size=(6, 4), old_size=(4, 4), num_prefix_tokens=0)
    )
    assert model.blocks[0].attn.grid_size == (6, 4)
    assert timm.models.get_model_args(model)["trained_grid"] == [4, 4]
    assert model(torch.randn(1, 3, 96, 64)).shape == (1, 1000)
    with pytest.raises(ValueError, match="fixed patch size"):
        model.set_input_size(patch_size=8)
