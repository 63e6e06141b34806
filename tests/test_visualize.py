"""finetune.visualize: every subcommand renders a PNG of the expected size whose colours tell buckets
and heads apart; bad input gives a one-line error. Models are depth 1-2 on 32 px images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from lightning.pytorch.loggers import CSVLogger
from matplotlib.figure import Figure
from PIL import Image

import finetune  # noqa: F401  (registers the models)
from finetune.backbones.irpe import RPEConfig, bucket_ids
from finetune.visualize import (
    OFFICIAL_RATIOS,
    PANEL_INCHES,
    attention_maps,
    bucket_maps,
    load_model,
    main,
    plot_attention,
    plot_bucket_maps,
    plot_priors,
    read_curves,
    spatial_priors,
)

IRPE = "irpe_deit_tiny_patch16_224"
IRPE_KWARGS = dict(depth=1, embed_dim=32, num_heads=4, img_size=32, patch_size=8, num_classes=5,
                   rpe_config=dict(method="cross", mode="ctx", rpe_on="qk", ratio=1.9))
SPVIT = "spvit_small_patch16_224"
SPVIT_KWARGS = dict(depth=2, sp_layers=1, embed_dim=48, num_heads=3, img_size=32, patch_size=8, stem_channels=8,
                    num_classes=5)


def read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def random_weights(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values for every parameter (zero-initialised RPE tables and SP-SA w2 would make heads
    equal); buffers (BatchNorm statistics) keep their values."""
    generator = torch.Generator().manual_seed(seed)
    parameters = dict(model.named_parameters())
    return {k: torch.randn(v.shape, generator=generator) * 0.5 if k in parameters else v
            for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def irpe_pth(tmp_path_factory) -> Path:
    """An official-style iRPE file: {'model': state_dict}."""
    path = tmp_path_factory.mktemp("irpe") / "irpe.pth"
    torch.save({"model": random_weights(timm.create_model(IRPE, **IRPE_KWARGS))}, path)
    return path


@pytest.fixture(scope="module")
def irpe_ckpt(tmp_path_factory) -> Path:
    """A fine-tuning checkpoint in the module's layout (weights under ``model.``, metadata under ``finetune``)."""
    path = tmp_path_factory.mktemp("ckpt") / "best.ckpt"
    kwargs = {k: v for k, v in IRPE_KWARGS.items() if k != "num_classes"}
    weights = random_weights(timm.create_model(IRPE, **IRPE_KWARGS), seed=1)
    meta = {"model_name": IRPE, "model_kwargs": kwargs, "num_classes": 5, "ema": False}
    torch.save({"state_dict": {f"model.{k}": v for k, v in weights.items()}, "finetune": meta}, path)
    return path


@pytest.fixture(scope="module")
def spvit_pth(tmp_path_factory) -> Path:
    """A timm CheckpointSaver-style SP-ViT file: {'state_dict': ...}."""
    path = tmp_path_factory.mktemp("spvit") / "spvit.pth.tar"
    torch.save({"state_dict": random_weights(timm.create_model(SPVIT, **SPVIT_KWARGS), seed=2)}, path)
    return path


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> Path:
    """A 48x40 photo-like image: a colour gradient with a bright square."""
    y, x = np.mgrid[0:40, 0:48]
    pixels = np.stack([x * 5, y * 6, (x + y) * 3], axis=-1).astype(np.uint8)
    pixels[10:22, 14:30] = 255
    path = tmp_path_factory.mktemp("image") / "bird.png"
    Image.fromarray(pixels).save(path)
    return path


def panel_pixels(fig: Figure, png: np.ndarray, ax, points: list[tuple[float, float]]) -> list[tuple[int, ...]]:
    """RGB of the saved PNG at data points (x, y) of ``ax`` (figure saved at its own dpi)."""
    height = png.shape[0]
    colors = []
    for x, y in points:
        px, py = ax.transData.transform((x, y))
        colors.append(tuple(png[int(height - py), int(px)]))
    return colors


def panel_crop(png: np.ndarray, ax) -> np.ndarray:
    box = ax.get_window_extent()
    height = png.shape[0]
    return png[int(height - box.y1) + 2 : int(height - box.y0) - 2, int(box.x0) + 2 : int(box.x1) - 2]


# --------------------------------------------------------------------------------------------------
# buckets
# --------------------------------------------------------------------------------------------------


def test_bucket_maps_are_rows_of_bucket_ids():
    config = RPEConfig(method="product", ratio=1.9)
    maps = bucket_maps(config, (14, 14), [(0, 0), (7, 7)])
    ids = bucket_ids("product", 14, 14, config)
    assert [m.reference for m in maps] == [(0, 0), (7, 7)]
    assert np.array_equal(maps[1].ids, ids[1 + 7 * 14 + 7, 1:].view(14, 14).numpy())
    assert len(np.unique(maps[1].ids)) == 49  # the 7 x 7 product buckets, all seen from the centre
    assert len(np.unique(maps[0].ids)) == 16  # from the corner only non-positive offsets: 4 x 4
    cross = bucket_maps(RPEConfig(method="cross", ratio=20), (5, 9), [(2, 4)])
    assert [m.table for m in cross] == ["cross_rows", "cross_cols"]
    assert (cross[0].ids == cross[0].ids[:, :1]).all() and (cross[1].ids == cross[1].ids[:1]).all()


def test_bucket_figure_gives_each_bucket_its_own_colour(tmp_path):
    maps = [m for method in ("euc", "quant", "cross", "product")
            for m in bucket_maps(RPEConfig(method=method, ratio=OFFICIAL_RATIOS[method]), (14, 14), [(0, 0), (7, 7)])]
    fig = plot_bucket_maps(maps)
    fig.savefig(tmp_path / "maps.png")
    png = read_png(tmp_path / "maps.png")
    width, height = fig.get_size_inches() * fig.dpi
    assert png.shape == (round(height), round(width), 3)
    axes = [ax for ax in fig.axes if ax.images]
    assert len(axes) == len(maps) == 10
    for bucket_map in maps:
        ax = next(a for a in axes if a.get_title() == bucket_map.title and a.images)
        cells = [(c, r) for r in range(14) for c in range(14) if (r, c) != bucket_map.reference]
        colors = panel_pixels(fig, png, ax, cells)
        buckets = [int(bucket_map.ids[r, c]) for c, r in cells]
        color_of = dict(zip(buckets, colors, strict=True))
        assert all(color_of[b] == c for b, c in zip(buckets, colors, strict=True)), "one bucket, two colours"
        assert len(set(color_of.values())) == len(color_of), f"{bucket_map.title}: two buckets share a colour"
        red_star = panel_pixels(fig, png, ax, [bucket_map.reference[::-1]])[0]
        assert red_star[0] > 200 and red_star[1] < 60 and red_star[2] < 60


def test_buckets_command_all_methods(tmp_path):
    out = tmp_path / "maps.png"
    assert main(["buckets", "--all-methods", "--grid", "6", "8", "--dpi", "50", "--out", str(out)]) == 0
    png = read_png(out)
    assert png.shape[1] == round(5 * PANEL_INCHES * 50)  # euc, quant, cross rows, cross cols, product
    assert len(np.unique(png.reshape(-1, 3), axis=0)) > 30


def test_buckets_command_reads_the_model_config_from_a_checkpoint(tmp_path, irpe_pth, irpe_ckpt):
    for extra in (["--model", IRPE, "--checkpoint", str(irpe_pth), "--model-kwargs", json.dumps(IRPE_KWARGS)],
                  ["--checkpoint", str(irpe_ckpt)]):
        out = tmp_path / "model.png"
        assert main(["buckets", *extra, "--reference", "corner", "--dpi", "50", "--out", str(out)]) == 0
        assert read_png(out).shape[1] == round(2 * PANEL_INCHES * 50)  # the model's cross: two tables


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--reference", "9,0"], "reference position (9, 0) lies outside the 6x6 grid"),
        (["--reference", "middle"], "--reference 'middle': expected corner, centre or ROW,COL"),
        (["--ratio", "-1"], "--ratio -1.0: expected a positive number"),
        (["--model", IRPE, "--method", "euc"], "take the RPE settings from the model"),
        (["--model", "deit_tiny_patch16_224"], "has no rpe_config"),
        (["--model", IRPE, "--checkpoint", "missing.pth"], "--checkpoint missing.pth: no such file"),
    ],
)
def test_buckets_command_errors(tmp_path, capsys, argv, message):
    assert main(["buckets", "--grid", "6", "6", *argv, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------------------------------
# priors
# --------------------------------------------------------------------------------------------------


def test_spatial_priors_hold_the_prior_of_every_offset(spvit_pth):
    model = load_model(SPVIT, spvit_pth, SPVIT_KWARGS)
    priors = spatial_priors(model, 0)
    assert priors.shape == (3, 7, 7)  # 3 heads, offsets -3..3 on a 4 x 4 grid
    full = model.blocks[0].attn.spatial_prior((4, 4))  # (heads, 16, 16)
    for query in range(16):
        for key in range(16):
            dy, dx = key // 4 - query // 4, key % 4 - query % 4
            torch.testing.assert_close(priors[:, dy + 3, dx + 3], full[:, query, key])
    assert not torch.allclose(priors[0], priors[1])


def test_priors_figure_draws_distinct_heads(tmp_path, spvit_pth):
    model = load_model(SPVIT, spvit_pth, SPVIT_KWARGS)
    fig = plot_priors(spatial_priors(model, 0))
    fig.savefig(tmp_path / "priors.png")
    png = read_png(tmp_path / "priors.png")
    panels = [panel_crop(png, ax) for ax in fig.axes if ax.images and ax.get_title().startswith("head")]
    assert len(panels) == 3
    for panel in panels:
        assert len(np.unique(panel.reshape(-1, 3), axis=0)) > 5
    shape = min(p.shape[0] for p in panels), min(p.shape[1] for p in panels)
    crops = [p[: shape[0], : shape[1]] for p in panels]
    assert not np.array_equal(crops[0], crops[1]) and not np.array_equal(crops[1], crops[2])


def test_priors_command(tmp_path, spvit_pth, irpe_pth, capsys):
    out = tmp_path / "priors.png"
    argv = ["priors", "--model", SPVIT, "--checkpoint", str(spvit_pth), "--model-kwargs", json.dumps(SPVIT_KWARGS)]
    assert main([*argv, "--layer", "0", "--dpi", "60", "--out", str(out)]) == 0
    png = read_png(out)
    assert png.shape[1] == round((3 * PANEL_INCHES + 1.0) * 60)
    assert main([*argv, "--layer", "1", "--out", str(out)]) == 2
    assert "--layer 1: SP-SA layers of this model are 0-0" in capsys.readouterr().err
    assert main(["priors", "--model", SPVIT, "--out", str(out)]) == 2
    assert "pass --checkpoint PATH" in capsys.readouterr().err
    irpe = ["priors", "--model", IRPE, "--checkpoint", str(irpe_pth), "--model-kwargs", json.dumps(IRPE_KWARGS)]
    assert main([*irpe, "--out", str(out)]) == 2
    assert "has no SP-SA layers" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------------


def test_attention_maps_are_the_rpe_attention_rows(irpe_ckpt, image_path):
    model = load_model(None, irpe_ckpt)
    images = torch.randn(1, 3, 32, 32)
    maps = attention_maps(model, images)
    assert maps.shape == (4, 4, 4)  # 4 heads over the 4 x 4 patch grid
    with torch.no_grad():
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        weights = model.blocks[0].attn.attention_weights(model.blocks[0].norm1(tokens), (4, 4))
    torch.testing.assert_close(maps, weights[0, :, 0, 1:].reshape(4, 4, 4))
    patch = attention_maps(model, images, query_patch=(2, 1))
    torch.testing.assert_close(patch, weights[0, :, 1 + 2 * 4 + 1, 1:].reshape(4, 4, 4))


def test_attention_figure_draws_distinct_heads(tmp_path, irpe_ckpt, image_path):
    from finetune.visualize import load_image

    model = load_model(None, irpe_ckpt)
    images, shown = load_image(model, image_path)
    assert images.shape == (1, 3, 32, 32) and shown.shape == (32, 32, 3)
    fig = plot_attention(attention_maps(model, images), shown)
    fig.savefig(tmp_path / "attention.png")
    png = read_png(tmp_path / "attention.png")
    panels = [panel_crop(png, ax) for ax in fig.axes if ax.get_title().startswith("head")]
    assert len(panels) == 4
    shape = min(p.shape[0] for p in panels), min(p.shape[1] for p in panels)
    crops = [p[: shape[0], : shape[1]] for p in panels]
    assert len({c.tobytes() for c in crops}) == 4, "two heads drew the same picture"


def test_attention_command(tmp_path, irpe_pth, spvit_pth, image_path, capsys):
    out = tmp_path / "attention.png"
    irpe = ["--model", IRPE, "--checkpoint", str(irpe_pth), "--model-kwargs", json.dumps(IRPE_KWARGS)]
    assert main(["attention", *irpe, "--image", str(image_path), "--dpi", "40", "--out", str(out)]) == 0
    assert read_png(out).shape[1] == round(5 * PANEL_INCHES * 40)  # the input, then 4 heads
    spvit = ["--model", SPVIT, "--checkpoint", str(spvit_pth), "--model-kwargs", json.dumps(SPVIT_KWARGS)]
    assert main(["attention", *spvit, "--image", str(image_path), "--out", str(out)]) == 0  # last block: class token
    assert main(["attention", *spvit, "--image", str(image_path), "--layer", "0", "--query-patch", "1", "2",
                 "--out", str(out)]) == 0
    assert main(["attention", *spvit, "--image", str(image_path), "--layer", "0", "--out", str(out)]) == 2
    assert "no class token): pass --query-patch ROW COL" in capsys.readouterr().err
    assert main(["attention", *irpe, "--image", str(image_path), "--query-patch", "4", "0", "--out", str(out)]) == 2
    assert "--query-patch 4 0: outside the 4x4 patch grid" in capsys.readouterr().err
    assert main(["attention", *irpe, "--image", str(tmp_path / "none.jpg"), "--out", str(out)]) == 2
    assert "none.jpg: no such file" in capsys.readouterr().err
    assert main(["attention", *irpe, "--image", str(image_path), "--layer", "3", "--out", str(out)]) == 2
    assert "--layer 3: the model has 1 blocks" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# curves
# --------------------------------------------------------------------------------------------------


def write_metrics(folder: Path) -> Path:
    """A real CSVLogger file: per-step loss and lr, per-epoch validation metrics."""
    logger = CSVLogger(save_dir=str(folder), name="", version="")
    for step in range(12):
        logger.log_metrics({"train/loss_step": 2.0 - 0.1 * step, "train/lr": 1e-3 * min(1, (step + 1) / 4),
                            "epoch": step // 4}, step=step)
        if step % 4 == 3:
            logger.log_metrics({"val/loss": 1.9 - 0.2 * (step // 4), "val/top1": 0.2 + 0.1 * (step // 4),
                                "val/top5": 0.5 + 0.1 * (step // 4), "epoch": step // 4}, step=step)
    logger.save()
    return Path(logger.log_dir) / "metrics.csv"


def test_read_curves_groups_columns(tmp_path):
    curves = read_curves(write_metrics(tmp_path))
    assert set(curves) == {"loss", "accuracy", "learning rate"}
    assert set(curves["loss"]) == {"train/loss_step", "val/loss"}
    assert set(curves["accuracy"]) == {"val/top1", "val/top5"}
    steps, values = curves["accuracy"]["val/top1"]
    assert steps == [3.0, 7.0, 11.0] and values == pytest.approx([0.2, 0.3, 0.4])
    assert len(curves["learning rate"]["train/lr"][0]) == 12


def test_curves_command(tmp_path, capsys):
    write_metrics(tmp_path / "run")
    out = tmp_path / "curves.png"
    assert main(["curves", "--log-dir", str(tmp_path / "run"), "--dpi", "50", "--out", str(out)]) == 0
    png = read_png(out)
    assert png.shape[:2] == (round(3.4 * 50), round(3 * 4.2 * 50))
    colors = png.reshape(-1, 3).astype(int)
    for rgb in ((31, 119, 180), (255, 127, 14)):  # matplotlib's first two line colours: two curves a panel
        assert (np.abs(colors - rgb).sum(axis=1) < 12).any(), rgb
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.csv").write_text("step,epoch,grad_norm\n0,0,1.0\n")
    assert main(["curves", "--log-dir", str(tmp_path / "bad"), "--out", str(out)]) == 2
    assert "no loss, top-1/accuracy or lr column with values (columns: step, epoch, grad_norm)" in capsys.readouterr().err
    assert main(["curves", "--log-dir", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "no such file or folder" in capsys.readouterr().err
