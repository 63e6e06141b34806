"""The command line end to end on a tiny synthetic CUB: fit, resume, validate, test, predict, recipes, errors."""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TINY_MODEL, ImageTensors, folder_state, read_metrics, tiny_classifier, tiny_fit_args
from data_builders import build_cub, truncate_file
from lightning import Callback

from datamodules import CUB200DataModule, ShardDataModule
from datamodules.synthetic import SyntheticCUBDataModule
from finetune.callbacks import BAR_DRAWS_PER_SECOND, BAR_RATE_PER_SECOND, EpochProgressBar
from finetune.checkpoint_io import AtomicCheckpointIO, CheckpointWriteError
from finetune.cli import EXTRA_COMMANDS, available_recipes, main, run_cli

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def fitted(synthetic_cub: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted 2-epoch fit with EMA, Mixup and drop path; returns its run_dir."""
    run_dir = tmp_path_factory.mktemp("runs") / "full"
    code = main(
        [
            "fit",
            *tiny_fit_args(synthetic_cub, run_dir),
            "--model.ema",
            "true",
            "--model.mixup",
            "0.8",
            "--model.model_kwargs",
            TINY_MODEL[:-1] + ", drop_path_rate: 0.1}",
        ]
    )
    assert code == 0
    return run_dir


def test_fit_writes_checkpoints_logs_config_and_confusion_matrix(fitted: Path):
    assert (fitted / "checkpoints" / "last.ckpt").is_file()
    # data.val_split 0: evaluation runs on the official test split, so nothing is selected on it
    assert sorted(p.name for p in (fitted / "checkpoints").iterdir()) == ["last.ckpt"]
    assert (fitted / "config.yaml").is_file()
    assert (fitted / "confusion_matrix_test.png").stat().st_size > 1000
    assert list(fitted.glob("events.out.tfevents.*"))
    rows = read_metrics(fitted / "metrics.csv")
    top1 = [float(r["test/top1"]) for r in rows if r.get("test/top1")]  # named after the split it comes from
    assert len(top1) == 2 and all(0.0 <= v <= 1.0 for v in top1)
    assert not any(key.startswith("val/") for key in rows[0])
    assert any(r.get("lr-AdamW/head") for r in rows)  # LearningRateMonitor, every parameter group
    assert not list(fitted.glob("checkpoints/.*.partial"))


def test_a_fit_without_our_loggers_keeps_run_dir_prints_a_full_summary_and_no_avoidable_warning(
    synthetic_cub: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
):
    run_dir = tmp_path / "quiet"
    args = [*tiny_fit_args(synthetic_cub, run_dir, epochs=1), "--trainer.logger", "false", "--model.ema", "true"]
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        assert main(["fit", *args]) == 0
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()  # --run_dir holds without the default loggers
    # deprecations raised inside the libraries (Lightning calling torch) are not the project's to avoid
    library_deprecation = (DeprecationWarning, FutureWarning)
    avoidable = [
        f"{w.category.__name__}: {w.message} ({w.filename})"
        for w in caught
        if not (issubclass(w.category, library_deprecation) and "site-packages" in w.filename)
    ]
    assert avoidable == []
    assert not [w for w in caught if "LeafSpec" in str(w.message)]  # Lightning's, silenced by the CLI
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert not [r for r in caplog.records if "Tip:" in r.getMessage()]  # Lightning's product tips
    out = capsys.readouterr().out
    assert "mean-class acc." in out and "images/s" in out


def test_evaluating_a_run_restores_its_checkpoint_callbacks_quietly_and_ctrl_c_saves_nothing(
    synthetic_cub: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    run_dir = tmp_path / "run"
    assert main(["fit", *tiny_fit_args(synthetic_cub, run_dir, epochs=1)]) == 0
    last = run_dir / "checkpoints" / "last.ckpt"
    before = folder_state(run_dir / "checkpoints")
    args = [*tiny_fit_args(synthetic_cub, run_dir), "--ckpt_path", str(last)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["test", *args]) == 0
    # fit's checkpoint callbacks take back their state in the same folder: no "dirpath has changed" or
    # "callbacks used to create the checkpoint need to be provided"
    assert [str(w.message) for w in caught if "callback" in str(w.message).lower() or "dirpath" in str(w.message)] == []
    with caplog.at_level(logging.INFO):  # another model named: the checkpoint's is evaluated, and said so
        assert main(["validate", *args, "--model.model_name", "spvit_small_patch16_224"]) == 0
    assert "holds model irpe_deit_tiny_patch16_224: validate evaluates it as saved" in caplog.text
    callback = "conftest.InterruptEvaluation"
    with pytest.raises(SystemExit):  # Lightning exits after Ctrl-C
        main(["test", *args, "--trainer.callbacks+", callback])
    assert folder_state(run_dir / "checkpoints") == before  # an evaluation saves no checkpoint, not even on Ctrl-C


def test_checkpoint_carries_the_hub_record(fitted: Path):
    checkpoint = torch.load(fitted / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    info = checkpoint["finetune"]
    assert info["num_classes"] == 10 and len(info["class_names"]) == 10
    assert info["class_names"][0] == "Red_headed_Two_Barred_Long_tailed"  # CUB naming, numeric prefix dropped
    assert info["data_config"]["input_size"] == [3, 32, 32]  # model_kwargs.img_size, linked to the data
    assert info["dataset"] == "CUB200DataModule"
    assert info["ema"] is True and info["pretrained"] is None
    # the metrics are those of exactly these weights: the last epoch, on the official test split
    assert info["metrics"]["split"] == "test"
    assert info["metrics"]["step"] == checkpoint["global_step"] and info["metrics"]["epoch"] == 1
    assert len(info["metrics"]["per_class"]) == 10
    assert info["best"] is None  # no held-out validation split: no best to select
    assert "model_name: irpe_deit_tiny_patch16_224" in info["config_yaml"]
    assert "run_dir:" in info["config_yaml"] and "fit:" not in info["config_yaml"]
    assert any(k.startswith("ema.module.") for k in checkpoint["state_dict"])


def test_hub_helper_rebuilds_the_model_from_the_checkpoint(fitted: Path, synthetic_cub: Path):
    from finetune.weights import load_checkpoint_model

    path = fitted / "checkpoints" / "last.ckpt"
    model, record = load_checkpoint_model(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert record.num_classes == 10 and model.num_classes == 10
    assert torch.equal(model.state_dict()["head.weight"], state["ema.module.head.weight"])  # EMA weights


def test_resume_after_an_interruption_gives_the_same_weights(
    fitted: Path, synthetic_cub: Path, tmp_path: Path
):
    run_dir = tmp_path / "interrupted"
    args = [
        *tiny_fit_args(synthetic_cub, run_dir),
        "--model.ema",
        "true",
        "--model.mixup",
        "0.8",
        "--model.model_kwargs",
        TINY_MODEL[:-1] + ", drop_path_rate: 0.1}",
    ]
    assert main(["fit", *args, "--trainer.callbacks+=conftest.StopAfterEpochs"]) == 0
    first = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert first["epoch"] == 0
    assert main(["fit", *args, "--ckpt_path", "last"]) == 0  # the same config again: never blocked
    resumed = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    full = torch.load(fitted / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == full["global_step"]
    for key, value in full["state_dict"].items():
        assert torch.allclose(resumed["state_dict"][key], value), key
    assert (
        resumed["optimizer_states"][0]["state"][0]["step"] == full["optimizer_states"][0]["state"][0]["step"]
    )
    # the resume continued the history: the curves of both parts, as the uninterrupted run logged them
    rows, full_rows = read_metrics(run_dir / "metrics.csv"), read_metrics(fitted / "metrics.csv")
    assert [r["step"] for r in rows if r.get("train/loss_step")] == [
        r["step"] for r in full_rows if r.get("train/loss_step")
    ]
    assert [r["epoch"] for r in rows if r.get("test/top1")] == ["0", "1"]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "config-resume-1.yaml").is_file()


# ----------------------------------------------------------------------------- numbers and their splits
@pytest.fixture(scope="module")
def selected(synthetic_cub: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-epoch fit validating on 30% of the training split and keeping its best epoch; returns its run_dir."""
    run_dir = tmp_path_factory.mktemp("runs") / "selected"
    args = [*tiny_fit_args(synthetic_cub, run_dir, epochs=3), "--data.val_split", "0.3"]
    assert main(["fit", *args, "--checkpoint.monitor", "val/top1"]) == 0
    return run_dir


def test_a_held_out_validation_split_selects_the_best_epoch(selected: Path):
    [best] = (selected / "checkpoints").glob("best-epoch*.ckpt")
    rows = read_metrics(selected / "metrics.csv")
    assert len([r for r in rows if r.get("val/top1")]) == 3 and not any(k.startswith("test/") for k in rows[0])
    best_record = torch.load(best, weights_only=True)["finetune"]
    last_record = torch.load(selected / "checkpoints" / "last.ckpt", weights_only=True)["finetune"]
    assert best_record["metrics"]["split"] == "val" and best_record["best"] == best_record["metrics"]
    assert best == selected / "checkpoints" / f"best-epoch{best_record['metrics']['epoch']:03d}.ckpt"
    assert last_record["metrics"]["epoch"] == 2 and last_record["best"] == best_record["metrics"]


def test_selecting_checkpoints_on_the_test_split_is_refused(synthetic_cub, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["fit", *tiny_fit_args(synthetic_cub, run_dir), "--checkpoint.monitor", "val/top1"]) == 2
    line = one_line_error(capsys)
    assert "--checkpoint.monitor val/top1: data.val_split is 0" in line and "--data.val_split 0.1" in line
    assert not run_dir.exists()


@pytest.mark.parametrize("which", ["last", "best"])
def test_the_card_reports_what_the_shipped_weights_measure(selected, synthetic_cub, tmp_path, which):
    import timm
    import yaml
    from timm.data import resolve_model_data_config

    from datamodules import CUB200DataModule

    ckpt = next((selected / "checkpoints").glob("best-epoch*.ckpt" if which == "best" else "last.ckpt"))
    out = tmp_path / "export"
    assert main(["push", "--ckpt", str(ckpt), "--repo-id", "me/tiny", "--export-dir", str(out), "--export-only"]) == 0
    readme = (out / "README.md").read_text()
    metadata = yaml.safe_load(readme.split("---\n")[1])
    [result] = metadata["model-index"][0]["results"]
    card_top1 = next(m["value"] for m in result["metrics"] if m["name"] == "Top-1 accuracy")
    assert result["dataset"]["split"] == "validation"
    assert "validation split held out from the official training split" in readme

    # re-measure: the exported weights, on the split the card names, with the preprocessing it ships
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    config = resolve_model_data_config(model)
    data = CUB200DataModule(
        str(synthetic_cub), img_size=config["input_size"][-1], batch_size=8, num_workers=0, val_split=0.3,
        mean=config["mean"], std=config["std"], interpolation=config["interpolation"], crop_pct=config["crop_pct"],
    )
    data.setup("fit")
    correct = total = 0
    with torch.no_grad():
        for images, labels in data.val_dataloader():
            correct += int((model(images).argmax(-1) == labels).sum())
            total += len(labels)
    assert card_top1 == round(100 * correct / total, 2)
    assert f"| Top-1 accuracy | {card_top1:.2f}% |" in readme


# ----------------------------------------------------------------------------- naming weights
def _loaded_model(synthetic_cub: Path, run_dir: Path, *flags: str) -> torch.nn.Module:
    """The timm model of a fit that trains nothing (max_epochs 0): exactly as its weights were loaded."""
    return run_cli(["fit", *tiny_fit_args(synthetic_cub, run_dir, epochs=0), *flags]).model.model


def test_pretrained_lightning_checkpoint_moves_to_another_resolution(fitted, synthetic_cub, tmp_path):
    ckpt = fitted / "checkpoints" / "last.ckpt"
    at_48 = TINY_MODEL.replace("img_size: 32", "img_size: 48")
    model = _loaded_model(synthetic_cub, tmp_path / "r", "--model.pretrained", str(ckpt), "--model.model_kwargs", at_48)
    trained = torch.load(ckpt, weights_only=True)["state_dict"]
    assert model.pos_embed.shape == (1, 1 + 6 * 6, 64)  # 32 -> 48 px: a 6x6 patch grid, resampled
    for key in ("blocks.0.attn.qkv.weight", "head.weight"):  # the run used EMA: its averaged weights
        assert torch.equal(model.state_dict()[key], trained[f"ema.module.{key}"]), key


@pytest.fixture(scope="module")
def exported(fitted: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("exported") / "tiny"
    ckpt = fitted / "checkpoints" / "last.ckpt"
    assert main(["push", "--ckpt", str(ckpt), "--repo-id", "me/tiny", "--export-dir", str(out), "--export-only"]) == 0
    return out


@pytest.mark.parametrize("naming", ["local-dir", "folder", "safetensors"])
def test_exported_weights_fine_tune_with_their_trained_head(exported, synthetic_cub, tmp_path, naming):
    import timm

    flags = {
        "local-dir": ["--model.model_name", f"local-dir:{exported}", "--model.pretrained", "true"],
        "folder": ["--model.pretrained", str(exported)],
        "safetensors": ["--model.pretrained", str(exported / "model.safetensors")],
    }[naming]
    model = _loaded_model(synthetic_cub, tmp_path / "r", *flags).eval()
    reference = timm.create_model(f"local-dir:{exported}", pretrained=True).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(images), reference(images))  # the same class count: the head is kept


def test_the_exported_program_runs_with_plain_torch(exported, tmp_path):
    import timm

    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.save(images, tmp_path / "images.pt")
    script = (
        "import sys, torch\n"
        f"model = torch.export.load({str(exported / 'model.pt2')!r}).module()\n"
        f"torch.save(model(torch.load({str(tmp_path / 'images.pt')!r})), {str(tmp_path / 'logits.pt')!r})\n"
        "assert not {'finetune', 'timm'} & set(sys.modules), 'the program needs neither package'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    reference = timm.create_model(f"local-dir:{exported}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.allclose(torch.load(tmp_path / "logits.pt"), reference(images), atol=1e-5)
    readme = (exported / "README.md").read_text()
    assert "pip install rpe-finetune" in readme and 'hf_hub_download("me/tiny", "model.pt2")' in readme


def test_resuming_a_checkpoint_of_another_architecture_is_refused(fitted, synthetic_cub, tmp_path, capsys):
    run_dir = tmp_path / "run"
    flags = ["--ckpt_path", str(fitted / "checkpoints" / "last.ckpt"), "--model.model_name", "deit_tiny_patch16_224"]
    assert main(["fit", *tiny_fit_args(synthetic_cub, run_dir), *flags]) == 2
    line = one_line_error(capsys)
    assert "holds a irpe_deit_tiny_patch16_224 model but the recipe/flags train deit_tiny_patch16_224" in line
    assert "--model.pretrained" in line
    assert not run_dir.exists()


# ----------------------------------------------------------------------------- run folder history
def test_a_fresh_fit_into_a_run_folder_with_a_training_history_is_refused(fitted, synthetic_cub, capsys):
    before = folder_state(fitted)
    assert main(["fit", *tiny_fit_args(synthetic_cub, fitted)]) == 2
    line = one_line_error(capsys)
    assert f"--run_dir {fitted} already holds a training run" in line and "--ckpt_path last" in line
    assert folder_state(fitted) == before


def test_validate_writes_its_own_version_folder_and_keeps_the_run(fitted, synthetic_cub):
    before = folder_state(fitted)
    args = ["validate", *tiny_fit_args(synthetic_cub, fitted), "--ckpt_path", str(fitted / "checkpoints" / "last.ckpt")]
    assert main(args) == 0 and main(args) == 0
    after = folder_state(fitted)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing changed or removed
    new = sorted(set(after) - set(before))
    versions = sorted({Path(k).parts[1] for k in new})
    assert {Path(k).parts[0] for k in new} == {"validate"} and len(versions) == 2
    for version in versions:
        folder = fitted / "validate" / version
        assert {"metrics.csv", "config.yaml", "confusion_matrix_test.png"} <= {p.name for p in folder.iterdir()}
        assert read_metrics(folder / "metrics.csv")[0]["test/top1"]
    from finetune.visualize import find_metrics_file

    assert find_metrics_file(fitted) == fitted / "metrics.csv"  # curves of the run, not of the newest validate


@pytest.mark.parametrize(
    "bad",
    [
        ["validate", "--data.root", "/no/such/CUB"],
        ["validate", "--ckpt_path", "/no/such/last.ckpt"],
        ["fit", "--ckpt_path", "/no/such/last.ckpt"],
        ["fit", "--ckpt_path", "last", "--model.num_classes", "3"],
    ],
    ids=["validate-data-root", "validate-ckpt-path", "resume-ckpt-path", "resume-num-classes"],
)
def test_a_failed_command_leaves_the_run_folder_as_it_was(fitted, synthetic_cub, capsys, bad):
    before = folder_state(fitted)
    command, flags = bad[0], bad[1:]
    assert main([command, *tiny_fit_args(synthetic_cub, fitted), *flags]) == 2
    one_line_error(capsys)
    assert folder_state(fitted) == before


def test_validate_links_the_model_data_config_into_the_datamodule(fitted: Path, synthetic_cub: Path):
    cli = run_cli(
        [
            "validate",
            *tiny_fit_args(synthetic_cub, fitted),
            "--model.model_name",
            "irpe_deit_tiny_patch16_224",
            "--ckpt_path",
            str(fitted / "checkpoints" / "last.ckpt"),
        ]
    )
    assert cli.datamodule.hparams.img_size == 32
    assert list(cli.datamodule.hparams.mean) == pytest.approx(cli.model.data_config["mean"])
    assert cli.datamodule.hparams.crop_pct == cli.model.data_config["crop_pct"]
    assert 0.0 <= float(cli.trainer.callback_metrics["test/top1"]) <= 1.0  # val_split 0: the test split


def test_eval_crop_pct_reaches_the_datamodule(synthetic_cub: Path, tmp_path: Path):
    args = ["validate", *tiny_fit_args(synthetic_cub, tmp_path), "--trainer.limit_val_batches", "1"]
    assert run_cli(args).datamodule.hparams.crop_pct == 0.875  # the model's pretrained cfg
    assert run_cli([*args, "--model.eval_crop_pct", "1.0"]).datamodule.hparams.crop_pct == 1.0


def test_test_subcommand_reports_metrics_and_a_test_confusion_matrix(fitted: Path, synthetic_cub: Path):
    cli = run_cli(
        [
            "test",
            *tiny_fit_args(synthetic_cub, fitted),
            "--ckpt_path",
            str(fitted / "checkpoints" / "last.ckpt"),
        ]
    )
    metrics = cli.trainer.callback_metrics
    assert {"test/top1", "test/top5", "test/mean_class_acc"} <= set(metrics)
    assert float(metrics["test/top1"]) <= float(metrics["test/top5"])
    assert (fitted / "confusion_matrix_test.png").is_file()


def test_predict_writes_top5_names_and_scores(fitted: Path, synthetic_cub: Path, tmp_path: Path):
    images = synthetic_cub / "CUB_200_2011" / "images" / "001.Red_headed_Two_Barred_Long_tailed"
    code = main(
        [
            "predict",
            *tiny_fit_args(tmp_path / "no-dataset", tmp_path / "p"),  # predict reads its inputs, not the dataset
            "--ckpt_path",
            str(fitted / "checkpoints" / "last.ckpt"),
            "--prediction.inputs",
            str(images),  # one folder as it is; a list takes [a, b]
        ]
    )
    assert code == 0
    out = tmp_path / "p" / "predict" / "version_0" / "predictions.csv"  # the command's own folder
    assert (out.parent / "config.yaml").is_file()
    with open(out) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path"] + [f"{k}{r}" for r in range(1, 6) for k in ("class", "score")]
    assert len(rows) - 1 == len(list(images.glob("*.jpg"))) == 6
    names = set(
        torch.load(fitted / "checkpoints" / "last.ckpt", weights_only=True)["finetune"]["class_names"]
    )
    for row in rows[1:]:
        scores = [float(s) for s in row[2::2]]
        assert scores == sorted(scores, reverse=True) and sum(scores) <= 1.0 + 1e-5
        assert set(row[1::2]) <= names


# ----------------------------------------------------------------------------- recipes
@pytest.mark.parametrize(("suffix", "tta"), [(".json", "flip"), (".parquet", "five_crop"), (".csv", "ten_crop")])
def test_predict_top_k_logits_embeddings_and_tta_in_each_format(
    fitted: Path, synthetic_cub: Path, tmp_path: Path, suffix: str, tta: str
):
    out = tmp_path / f"preds{suffix}"
    images = synthetic_cub / "CUB_200_2011" / "images" / "003.Red_headed_Three_Pillared_Long_tailed"
    code = main(
        [
            "predict",
            *tiny_fit_args(synthetic_cub, tmp_path / "p"),
            "--ckpt_path", str(fitted / "checkpoints" / "last.ckpt"),
            "--model.tta", tta,
            "--prediction.inputs", f"[{images}]",
            "--prediction.output", str(out),
            "--prediction.top_k", "2",
            "--prediction.logits", "true",
            "--prediction.embeddings", "true",
        ]
    )  # fmt: skip
    assert code == 0
    # the flag, not the fit's tta saved in the checkpoint's hyperparameters (which LightningCLI applies)
    assert f"tta: {tta}\n" in (tmp_path / "p" / "predict" / "version_0" / "config.yaml").read_text()
    if suffix == ".json":
        records = json.loads(out.read_text())
    elif suffix == ".parquet":
        records = pq.read_table(out).to_pylist()
    else:
        with open(out) as f:
            rows = list(csv.reader(f))
        header, rows = rows[0], rows[1:]
        assert header[:5] == ["path", "class1", "score1", "class2", "score2"]
        assert header[5] == "logit_0" and header[15] == "embedding_0" and len(header) == 5 + 10 + 64
        records = [{"path": r[0], "scores": [float(r[2]), float(r[4])], "logits": [float(v) for v in r[5:15]]}
                   for r in rows]
    assert [r["path"] for r in records] == sorted(str(p) for p in images.glob("*.jpg"))
    for record in records:
        assert len(record["scores"]) == 2 and record["scores"][0] >= record["scores"][1]
        logits = torch.tensor(record["logits"])
        assert len(logits) == 10
        assert record["scores"][0] == pytest.approx(float(logits.softmax(-1).max()), abs=1e-5)
        if suffix != ".csv":
            assert len(record["classes"]) == 2 and len(record["embedding"]) == 64


def test_predict_rejects_an_unknown_output_format(synthetic_cub: Path, tmp_path: Path, capsys):
    args = ["predict", *tiny_fit_args(synthetic_cub, tmp_path), "--prediction.output", str(tmp_path / "p.txt")]
    assert main(args) == 2
    assert "expected a file ending in .csv, .json, .parquet" in one_line_error(capsys)


@pytest.mark.parametrize("name", available_recipes())
def test_every_recipe_parses(name: str, capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--recipe", name, "--data.root", "/nonexistent", "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "model_name:" in printed and "class_path: datamodules." in printed


def test_recipes_cover_the_papers_and_the_demo():
    assert {
        "cub200",
        "stanford_cars",
        "imagenet",
        "cub200_spvit",
        "stanford_cars_spvit",
        "imagenet_spvit",
        "demo",
    } <= set(available_recipes())


def test_flags_after_a_recipe_win(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit):
        main(["fit", "--recipe", "cub200", "--model.lr", "0.123", "--print_config"])
    assert "lr: 0.123" in capsys.readouterr().out


# ----------------------------------------------------------------------------- bad input
def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1
    return err[0]


def test_unknown_recipe_lists_the_available_ones(capsys):
    assert main(["fit", "--recipe", "cub201"]) == 2
    line = one_line_error(capsys)
    assert "unknown recipe 'cub201'" in line and "cub200" in line and "demo" in line


def test_unknown_recipe_key(synthetic_cub, tmp_path, capsys):
    assert main(["fit", *tiny_fit_args(synthetic_cub, tmp_path), "--model.learning_rate", "1"]) == 2
    assert "model.learning_rate" in one_line_error(capsys)


def test_missing_dataset_root_is_reported_before_the_model_fetches_its_weights(tmp_path, capsys):
    # pretrained: the weights would be downloaded (or fail to) before a datamodule is built
    args = [*tiny_fit_args(tmp_path / "nowhere", tmp_path / "run"), "--model.pretrained", "true"]
    for command in ("fit", "validate"):
        assert main([command, *args]) == 2
        line = one_line_error(capsys)
        assert f"data.root '{tmp_path / 'nowhere'}': no such file or folder" in line and "CUB200DataModule" in line
    assert not (tmp_path / "run").exists()


def test_a_dataset_root_without_the_dataset(tmp_path, capsys):
    assert main(["fit", *tiny_fit_args(tmp_path, tmp_path / "run")]) == 2
    assert "CUB-200-2011 not found" in one_line_error(capsys)


@pytest.mark.parametrize(("data_class", "init_args"), [
    (CUB200DataModule, {"download": True}),  # prepare_data downloads it
    (SyntheticCUBDataModule, {}),  # prepare_data generates it
    (ShardDataModule, {}),  # a URL prefix below
])
def test_dataset_roots_that_prepare_data_creates_or_that_are_remote_pass_the_early_check(
    tmp_path: Path, data_class: type, init_args: dict
):
    root = "https://host/shards" if data_class is ShardDataModule else str(tmp_path / "nowhere")
    data_class.check_root({"root": root, **init_args})
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        CUB200DataModule.check_root({"root": root})


def test_pretrained_weights_of_another_architecture(synthetic_cub, tmp_path, capsys):
    import timm

    other = timm.create_model(
        "irpe_deit_tiny_patch16_224", depth=2, embed_dim=64, num_heads=2, img_size=32, patch_size=8
    )
    torch.save({"model": other.state_dict()}, tmp_path / "other.pth")
    args = [*tiny_fit_args(synthetic_cub, tmp_path), "--model.pretrained", str(tmp_path / "other.pth")]
    assert main(["fit", *args]) == 2
    assert "another architecture" in one_line_error(capsys)


def test_checkpoint_of_another_architecture(fitted, synthetic_cub, tmp_path, capsys):
    foreign = tmp_path / "foreign.ckpt"
    checkpoint = torch.load(fitted / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["finetune"]["model_name"] = "deit_small_patch16_224_ctx_product_50_shared_k"
    checkpoint.pop("hyper_parameters")
    torch.save(checkpoint, foreign)
    assert main(["test", *tiny_fit_args(synthetic_cub, tmp_path), "--ckpt_path", str(foreign)]) == 2
    assert "the checkpoint is for model 'deit_small_patch16_224_ctx_product_50_shared_k'" in one_line_error(
        capsys
    )


def test_mixup_with_batches_of_one_image_is_refused(synthetic_cub, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = [*tiny_fit_args(synthetic_cub, run_dir), "--data.batch_size", "1", "--model.mixup", "0.8"]
    assert main(["fit", *args]) == 2
    line = one_line_error(capsys)
    assert "data.batch_size=1 with Mixup/CutMix" in line and "--data.batch_size 2" in line
    assert not run_dir.exists()


@dataclass
class BadInput:
    """A command with one bad input: ``prepare`` damages a copy of the dataset or writes a file and returns
    extra flags; the command must stop with one line containing every ``expected`` part, exit 2, and
    write nothing."""

    command: str
    prepare: Callable[[Path, Path], list[str]]
    expected: tuple[str, ...]


def _empty_images_txt(cub: Path, tmp: Path) -> list[str]:
    (cub / "CUB_200_2011" / "images.txt").write_text("")
    return []


def _label_out_of_range(cub: Path, tmp: Path) -> list[str]:
    labels = cub / "CUB_200_2011" / "image_class_labels.txt"
    rows = labels.read_text().splitlines()
    rows[3] = rows[3].split()[0] + " 250"
    labels.write_text("\n".join(rows) + "\n")
    return []


def _truncated_checkpoint(flag: str) -> Callable[[Path, Path], list[str]]:
    def prepare(cub: Path, tmp: Path) -> list[str]:
        ckpt = tmp / "cut.ckpt"
        torch.save({"state_dict": {"model.w": torch.zeros(1000)}, "finetune": {}}, ckpt)
        truncate_file(ckpt)
        return [flag, str(ckpt)]

    return prepare


def _flags(*flags: str) -> Callable[[Path, Path], list[str]]:
    return lambda cub, tmp: list(flags)


def _offline_release(cub: Path, tmp: Path) -> list[str]:
    return ["--model.model_name", "deit_tiny_patch16_224_ctx_product_50_shared_k", "--model.pretrained", "true"]


def _checkpoint_of_other_data(fitted: Path) -> Callable[[Path, Path], list[str]]:
    def prepare(cub: Path, tmp: Path) -> list[str]:
        three = build_cub(tmp / "three_classes").root.parent
        return ["--data.root", str(three), "--ckpt_path", str(fitted / "checkpoints" / "last.ckpt")]

    return prepare


BAD_INPUTS = {
    "empty images.txt": BadInput("fit", _empty_images_txt, ("images.txt: lists no images",)),
    "label out of range": BadInput(
        "fit", _label_out_of_range, ("image_class_labels.txt: image id 4 has class 250, expected 1..10",)
    ),
    "truncated --ckpt_path": BadInput(
        "validate", _truncated_checkpoint("--ckpt_path"), ("cut.ckpt: not a complete checkpoint file", "save it again")
    ),
    "truncated --model.pretrained": BadInput(
        "fit", _truncated_checkpoint("--model.pretrained"), ("cut.ckpt: not a complete checkpoint file",)
    ),
    "release offline": BadInput(
        "fit",
        _offline_release,
        (
            "cannot download the pretrained weights of deit_tiny_patch16_224_ctx_product_50_shared_k from https://",
            "--model.pretrained PATH/TO/deit_tiny_patch16_224_ctx_product_50_shared_k.pth",
        ),
    ),
    "unknown model": BadInput(
        "fit",
        _flags("--model.model_name", "irpe_deit_tinyy_patch16_224"),
        ("unknown model 'irpe_deit_tinyy_patch16_224'; did you mean irpe_deit_tiny_patch16_224",),
    ),
    "num_classes flag": BadInput(
        "fit",
        _flags("--model.num_classes", "7"),
        ("model.num_classes=7 but the data (CUB200DataModule) has 10 classes; remove --model.num_classes",),
    ),
}


@pytest.mark.parametrize("case", [*BAD_INPUTS, "checkpoint of other data"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, fitted, synthetic_cub, tmp_path, capsys, monkeypatch):
    bad = BAD_INPUTS.get(case) or BadInput(
        "validate", _checkpoint_of_other_data(fitted), ("the checkpoint has 10 classes but the data has 3",)
    )
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # no network: downloads are refused at once
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cub = tmp_path / "data"
    shutil.copytree(synthetic_cub, cub)
    flags = bad.prepare(cub, tmp_path)
    run_dir = tmp_path / "run"
    assert main([bad.command, *tiny_fit_args(cub, run_dir), *flags]) == 2
    line = one_line_error(capsys)
    for part in bad.expected:
        assert part in line, line
    assert not run_dir.exists()


def test_cli_help_lists_every_command_and_the_recipe_option(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in ("fit", "validate", "test", "predict", "push", "convert", "visualize"))
    assert "--recipe NAME" in text
    with pytest.raises(SystemExit) as info:
        main(["fit", "--data.help", "CUB200DataModule"])
    assert info.value.code == 0 and "--data.crop_to_bbox" in capsys.readouterr().out


def test_out_of_memory_batch(synthetic_cub, tmp_path, capsys):
    assert (
        main(
            ["fit", *tiny_fit_args(synthetic_cub, tmp_path), "--trainer.callbacks+=conftest.RaiseOutOfMemory"]
        )
        == 2
    )
    assert "out of memory: lower --data.batch_size" in one_line_error(capsys)


def test_predict_without_inputs_or_weights(synthetic_cub, tmp_path, capsys):
    assert main(["predict", *tiny_fit_args(synthetic_cub, tmp_path)]) == 2
    assert "--prediction.inputs" in one_line_error(capsys)
    assert (
        main(
            ["predict", *tiny_fit_args(synthetic_cub, tmp_path), "--prediction.inputs", f"[{synthetic_cub}]"]
        )
        == 2
    )
    assert "--ckpt_path" in one_line_error(capsys)


# ----------------------------------------------------------------------------- plumbing
def test_extra_subcommands_dispatch_with_the_remaining_argv(monkeypatch):
    monkeypatch.setitem(EXTRA_COMMANDS, "echo-count", "test_cli:count_args")
    assert main(["echo-count", "a", "b", "c"]) == 3


def count_args(argv: list[str]) -> int:
    return len(argv)


def test_push_convert_and_visualize_are_subcommands(tmp_path, capsys):
    assert {"push", "convert", "visualize"} <= set(EXTRA_COMMANDS)
    out = tmp_path / "buckets.png"
    assert main(["visualize", "buckets", "--grid", "6", "6", "--method", "product", "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    with pytest.raises(SystemExit) as info:
        main(["push", "--help"])
    assert info.value.code == 0 and "--repo-id" in capsys.readouterr().out


def test_push_to_hub_with_a_bad_repo_id_fails_before_training(synthetic_cub, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["fit", *tiny_fit_args(synthetic_cub, run_dir), "--push_to_hub", "not a repo"])
    assert code == 2
    assert "--repo-id 'not a repo': expected 'owner/name'" in one_line_error(capsys)
    assert not (run_dir / "checkpoints").exists()


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so_in_one_line(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, path)

    def full_disk(obj: object, f: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError) as info:
        io.save_checkpoint({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    message = str(info.value)
    assert message.startswith(f"cannot write checkpoint {path} (No space left on device)") and "\n" not in message
    assert "the previous last.ckpt is kept" in message and "--ckpt_path last" in message
    assert torch.load(path, weights_only=True)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_atomic_checkpoint_write_keeps_the_previous_file_on_failure(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, path)
    with pytest.raises(Exception):  # noqa: B017  (pickling a lambda fails half-way through the write)
        io.save_checkpoint({"step": torch.tensor(2), "bad": lambda: None}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


@pytest.mark.slow
def test_sigterm_leaves_a_resumable_last_checkpoint(synthetic_cub, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        sys.executable,
        str(REPO / "cli.py"),
        "fit",
        *tiny_fit_args(synthetic_cub, run_dir, epochs=1000),
        "--data.num_workers",
        "0",
    ]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert last.exists(), proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1, output[-3000:]
    assert "resume with: --ckpt_path last" in output
    interrupted = torch.load(last, weights_only=True)
    steps_before = [r["step"] for r in read_metrics(run_dir / "metrics.csv") if r.get("train/loss_step")]
    assert steps_before and steps_before[0] == "0"
    assert (
        main(
            [
                "fit",
                *tiny_fit_args(synthetic_cub, run_dir, epochs=interrupted["epoch"] + 2),
                "--ckpt_path",
                "last",
            ]
        )
        == 0
    )
    assert torch.load(last, weights_only=True)["epoch"] == interrupted["epoch"] + 1
    steps_after = [r["step"] for r in read_metrics(run_dir / "metrics.csv") if r.get("train/loss_step")]
    assert steps_after[: len(steps_before)] == steps_before  # the curves before the interruption are kept
    assert len(steps_after) > len(steps_before)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_reports_the_same_metrics_on_both_ranks(synthetic_cub, tmp_path):
    run_dir = tmp_path / "ddp"
    args = [
        sys.executable,
        str(REPO / "cli.py"),
        "fit",
        *tiny_fit_args(synthetic_cub, run_dir, epochs=1),
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--data.num_workers",
        "0",
        "--trainer.callbacks+=conftest.RecordRankMetrics",
        f"--trainer.callbacks.folder={tmp_path / 'ranks'}",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rank0 = json.loads((tmp_path / "ranks" / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "ranks" / "rank1.json").read_text())
    assert {"test/top1", "test/top5", "test/mean_class_acc"} <= set(rank0)
    assert rank0 == pytest.approx(rank1)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


class RecordTrainBar(Callback):
    """Records the training progress bar's description and speed column at every training batch."""

    def __init__(self) -> None:
        self.descriptions: list[str] = []
        self.speeds: list[tuple[str, float | None]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = trainer.progress_bar_callback
        task = bar.train_progress_bar
        self.descriptions.append(task.description.split("]")[-1].strip())
        speed_column = bar.progress.columns[-2]  # the last one before Lightning's metrics
        self.speeds.append((speed_column.render(task).plain, None if task.speed is None else task.speed * len(batch[0])))


@pytest.mark.parametrize("epochs", [1, 2])
def test_the_progress_bar_counts_epochs_from_one_and_shows_images_per_second(tmp_path: Path, epochs: int):
    record = RecordTrainBar()
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=epochs, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[EpochProgressBar(), record],
    )  # fmt: skip
    trainer.fit(tiny_classifier(), datamodule=ImageTensors(n=12, batch_size=5))  # batches of 5, 5 and 2 images
    assert record.descriptions == [f"Epoch {e}/{epochs}" for e in range(1, epochs + 1) for _ in range(3)]
    assert any(images_per_s is not None for _, images_per_s in record.speeds)
    for text, images_per_s in record.speeds:
        assert text == ("0.0 images/s" if images_per_s is None else f"{images_per_s:.1f} images/s")



def test_the_progress_bar_draws_a_few_times_a_second_on_a_terminal_not_after_every_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    """Each draw holds the GIL for milliseconds that the training loop waits for (issue 15)."""
    if not BAR_RATE_PER_SECOND:
        pytest.skip("Lightning < 2.6.1 counts the bar's refresh rate in batches")
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich draws as on a terminal
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[EpochProgressBar()],
    )  # fmt: skip
    batches = 60
    start = time.perf_counter()
    trainer.fit(tiny_classifier(), datamodule=ImageTensors(n=2 * batches, batch_size=2))
    seconds = time.perf_counter() - start
    draws = capsys.readouterr().out.count("Epoch 1/1")
    assert 1 <= draws <= BAR_DRAWS_PER_SECOND * seconds + 4 < batches


# ----------------------------------------------------------------------------- W&B and MLflow in the run folder
def _tracker_config(folder: Path) -> Path:
    """A YAML config adding both trackers with Lightning's defaults (what a user writes)."""
    path = folder / "trackers.yaml"
    path.write_text(
        "trainer:\n  logger:\n    - class_path: WandbLogger\n    - class_path: MLFlowLogger\n"
        "      init_args: {experiment_name: tiny}\n"
    )
    return path


def _mlflow_runs(run_dir: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir.resolve() / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


@pytest.mark.slow
def test_wandb_and_mlflow_log_into_the_run_folder_and_keep_every_command(synthetic_cub, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no `wandb login` (~/.netrc) either: offline
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # nothing may land in the working folder
    run_dir = tmp_path / "run"
    config = _tracker_config(tmp_path)
    args = [*tiny_fit_args(synthetic_cub, run_dir, epochs=1), "--config", str(config)]
    assert main(["fit", *args]) == 0
    fit_files = folder_state(run_dir)
    assert len(list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))) == 1
    (fit_run,) = _mlflow_runs(run_dir)
    assert "test/top1" in fit_run.data.metrics and "train/loss_step" in fit_run.data.metrics
    assert (run_dir / "confusion_matrix_test.png").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((tmp_path / "cwd").iterdir()) == []

    ckpt = ["--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")]
    assert main(["validate", *args, *ckpt]) == 0
    assert len(list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))) == 2  # a new run, the fit's kept
    runs = _mlflow_runs(run_dir)
    assert [r.info.run_id for r in runs][0] == fit_run.info.run_id and len(runs) == 2
    assert "test/top1" in runs[1].data.metrics
    assert (run_dir / "validate" / "version_0" / "confusion_matrix_test.png").is_file()
    kept = folder_state(run_dir)
    assert {k: kept[k] for k in fit_files if k.endswith((".ckpt", ".png", ".wandb"))} == {
        k: v for k, v in fit_files.items() if k.endswith((".ckpt", ".png", ".wandb"))
    }


def test_a_tracker_that_is_not_installed_is_one_line_exit_2_and_writes_nothing(synthetic_cub, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if the extra were not installed
    run_dir = tmp_path / "run"
    args = [*tiny_fit_args(synthetic_cub, run_dir, epochs=1), "--trainer.logger", "WandbLogger"]
    assert main(["fit", *args]) == 2
    assert one_line_error(capsys) == (
        "error: --trainer.logger WandbLogger needs the wandb package: pip install 'rpe-finetune[wandb]'"
    )
    assert not run_dir.exists()


def test_a_failed_command_with_mlflow_takes_back_its_database(synthetic_cub, tmp_path, capsys):
    pytest.importorskip("mlflow")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("kept")
    bad = [*tiny_fit_args("/no/such/CUB", run_dir, epochs=1), "--config", str(_tracker_config(tmp_path))]
    assert main(["fit", *bad]) == 2
    one_line_error(capsys)
    assert folder_state(run_dir) == {"notes.txt": folder_state(run_dir)["notes.txt"]}
