"""The generic datamodules (class folders, CSV lists, Hugging Face datasets) and k-fold splits, on data
built in each real format (parquet written by ``datasets`` itself), through the datamodule and ``cli.py fit``."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_fit_args
from data_builders import GENERIC_CLASSES, build_csv, build_cub, build_hf_parquet, build_image_folder
from hf_server import FakeHub

from datamodules import (
    CSVDataModule,
    CUB200DataModule,
    DataError,
    HFDataModule,
    ImageFolderDataModule,
    ImageListDataset,
    stratified_folds,
)
from finetune.cli import main

REPO = Path(__file__).resolve().parent.parent
SMALL = {"img_size": 32, "batch_size": 2, "num_workers": 0}


def pairs(dataset: ImageListDataset) -> list[tuple[str, int]]:
    return [(s.path, s.label) for s in dataset.samples]


# -- class folders --------------------------------------------------------------------------------


def test_image_folder_reads_train_val_and_test_folders(tmp_path: Path) -> None:
    built = build_image_folder(tmp_path, ("train", "val", "test"))
    dm = ImageFolderDataModule(str(tmp_path), **SMALL)
    assert dm.class_names == GENERIC_CLASSES  # known before setup
    dm.setup()
    assert pairs(dm.train_dataset) == built.splits["train"]
    assert pairs(dm.val_dataset) == built.splits["val"]
    assert pairs(dm.test_dataset) == built.splits["test"]
    image, label = dm.train_dataset[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 0


@pytest.mark.parametrize("present", ["val", "test"])
def test_image_folder_with_one_evaluation_folder_uses_it_for_val_and_test(tmp_path: Path, present: str) -> None:
    built = build_image_folder(tmp_path, ("train", present))
    dm = ImageFolderDataModule(str(tmp_path), **SMALL)
    dm.setup()
    assert pairs(dm.val_dataset) == pairs(dm.test_dataset) == built.splits[present]


def test_single_image_folder_holds_out_a_stratified_seeded_test_fraction(tmp_path: Path) -> None:
    built = build_image_folder(tmp_path, (), per_class=10)
    dm = ImageFolderDataModule(str(tmp_path), test_fraction=0.3, seed=3, **SMALL)
    dm.setup()
    train, test = pairs(dm.train_dataset), pairs(dm.test_dataset)
    assert sorted(train + test) == sorted(built.splits["all"]) and not set(train) & set(test)
    assert Counter(label for _, label in test) == {0: 3, 1: 3, 2: 3}
    assert dm.val_dataset is dm.test_dataset
    again = ImageFolderDataModule(str(tmp_path), test_fraction=0.3, seed=3, **SMALL)
    again.setup("test")
    assert pairs(again.test_dataset) == test


# -- CSV ------------------------------------------------------------------------------------------


def test_csv_with_label_names_and_boxes_crops_to_the_box(tmp_path: Path) -> None:
    built = build_csv(tmp_path, ("train", "val", "test"), boxes=True)
    dm = CSVDataModule(
        str(tmp_path), val_csv="val.csv", test_csv="test.csv", box_columns=["x1", "y1", "x2", "y2"], **SMALL
    )
    assert dm.class_names == sorted(GENERIC_CLASSES)
    dm.setup()
    assert pairs(dm.train_dataset) == built.splits["train"]
    assert pairs(dm.test_dataset) == built.splits["test"]
    raw = dm.val_dataset.with_transform(None)
    for index in range(len(raw)):
        crop = raw[index][0]
        x1, y1, x2, y2 = built.boxes[raw.samples[index].path]
        assert crop.shape[:2] == (y2 - y1, x2 - x1)
        assert crop.mean() > 200  # the white box only, no background


def test_csv_with_label_ids_and_given_class_names(tmp_path: Path) -> None:
    built = build_csv(tmp_path, ("train",), label_ids=True)
    dm = CSVDataModule(str(tmp_path), **SMALL)
    assert dm.class_names == ["0", "1", "2"]
    named = CSVDataModule(str(tmp_path), classes=["kitten", "puppy", "owlet"], **SMALL)
    named.setup("fit")
    assert named.class_names == ["kitten", "puppy", "owlet"]
    assert sorted(pairs(named.train_dataset) + pairs(named.val_dataset)) == sorted(built.splits["train"])


# -- Hugging Face datasets ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_parquet(tmp_path_factory: pytest.TempPathFactory):
    return build_hf_parquet(tmp_path_factory.mktemp("hf"), ("train", "validation", "test"))


def test_hf_parquet_written_by_datasets_reads_like_any_dataset(hf_parquet, tmp_path: Path) -> None:
    dm = HFDataModule(str(hf_parquet.root), cache_dir=str(tmp_path / "cache"), **SMALL)
    assert dm.class_names == GENERIC_CLASSES  # from the ClassLabel feature
    dm.setup()
    assert pairs(dm.train_dataset) == hf_parquet.splits["train"]
    assert pairs(dm.val_dataset) == hf_parquet.splits["validation"]
    assert pairs(dm.test_dataset) == hf_parquet.splits["test"]
    image, label = dm.val_dataset[5]
    assert image.shape == (3, 32, 32) and label == hf_parquet.splits["validation"][5][1]
    raw = dm.train_dataset.with_transform(None)[0][0]
    assert raw.dtype == np.uint8 and raw.shape == (36, 48, 3)  # decoded from the parquet's JPEG bytes
    assert list((tmp_path / "cache").iterdir())  # the prepared arrow files went to cache_dir


def test_hf_dataset_saved_to_disk_with_string_labels(tmp_path: Path) -> None:
    import datasets

    built = build_hf_parquet(tmp_path / "src", ("train",))
    table = datasets.load_dataset(str(built.root), cache_dir=str(tmp_path / "cache"))["train"]
    names = table.features["label"].names
    table = table.cast_column("label", datasets.Value("int64")).map(
        lambda row: {"species": names[row["label"]]}, remove_columns=["label"]
    )
    table.save_to_disk(str(tmp_path / "saved"))
    dm = HFDataModule(str(tmp_path / "saved"), label_column="species", test_fraction=0.25, **SMALL)
    assert dm.class_names == sorted(GENERIC_CLASSES)
    dm.setup()
    assert len(dm.train_dataset) + len(dm.test_dataset) == 12 and len(dm.test_dataset) == 3


# -- k-fold ---------------------------------------------------------------------------------------


def test_stratified_folds_partition_every_class_evenly() -> None:
    labels = [0] * 10 + [1] * 7 + [2] * 3
    folds = [stratified_folds(labels, 5, k, seed=1) for k in range(5)]
    vals = [set(val) for _, val in folds]
    assert sorted(i for v in vals for i in v) == list(range(20))  # disjoint, covering
    for (train, val), v in zip(folds, vals, strict=True):
        assert set(train) == set(range(20)) - v
        assert Counter(labels[i] for i in val)[0] == 2  # every fold gets 1/5 of class 0
    assert max(map(len, vals)) - min(map(len, vals)) <= 1
    assert stratified_folds(labels, 5, 2, seed=1) == folds[2]
    assert stratified_folds(labels, 5, 2, seed=2) != folds[2]


def test_num_folds_makes_fold_k_the_validation_set_and_keeps_the_official_test(tmp_path: Path) -> None:
    built = build_image_folder(tmp_path, ("train", "test"), per_class=5)
    seen: list[tuple[str, int]] = []
    for fold in range(5):
        dm = ImageFolderDataModule(str(tmp_path), num_folds=5, fold=fold, **SMALL)
        dm.setup()
        val = pairs(dm.val_dataset)
        assert Counter(label for _, label in val) == {0: 1, 1: 1, 2: 1}
        assert sorted(pairs(dm.train_dataset) + val) == sorted(built.splits["train"])
        assert pairs(dm.test_dataset) == built.splits["test"]
        seen += val
    assert sorted(seen) == sorted(built.splits["train"])


def test_num_folds_works_on_the_published_datasets_too(synthetic_cub: Path) -> None:
    dm = CUB200DataModule(str(synthetic_cub), num_folds=4, fold=3, **SMALL)
    dm.setup("fit")
    assert len(dm.train_dataset) == 30 and len(dm.val_dataset) == 10


# -- through cli.py fit ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generic_roots(tmp_path_factory: pytest.TempPathFactory, hf_parquet) -> dict[str, tuple[str, list[str]]]:
    """datamodule class path -> (root, extra flags), one dataset of each generic format."""
    folder = build_image_folder(tmp_path_factory.mktemp("folder"), ("train", "val"))
    table = build_csv(tmp_path_factory.mktemp("csv"), ("train", "val"))
    return {
        "datamodules.ImageFolderDataModule": (str(folder.root), []),
        "datamodules.CSVDataModule": (str(table.root), ["--data.val_csv", "val.csv"]),
        "datamodules.HFDataModule": (str(hf_parquet.root), []),
    }


@pytest.mark.parametrize("datamodule", ["datamodules.ImageFolderDataModule", "datamodules.CSVDataModule", "datamodules.HFDataModule"])
def test_each_generic_datamodule_trains_through_cli_fit(generic_roots, datamodule: str, tmp_path: Path) -> None:
    root, extra = generic_roots[datamodule]
    run_dir = tmp_path / "run"
    assert main(["fit", *tiny_fit_args(root, run_dir, epochs=1, datamodule=datamodule), *extra]) == 0
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert checkpoint["finetune"]["class_names"] == sorted(GENERIC_CLASSES)
    assert checkpoint["finetune"]["dataset"] == datamodule.split(".")[-1]


@pytest.mark.parametrize("recipe", ["folder", "csv", "hf"])
def test_generic_recipes_name_their_datamodule(recipe: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--recipe", recipe, "--print_config"])
    assert exit_info.value.code == 0
    expected = {"folder": "ImageFolderDataModule", "csv": "CSVDataModule", "hf": "HFDataModule"}[recipe]
    assert f"class_path: datamodules.{expected}" in capsys.readouterr().out


# -- bad input ------------------------------------------------------------------------------------


def _empty_class_folder(root: Path) -> tuple[str, list[str]]:
    build_image_folder(root, ("train", "val"))
    (root / "train" / "zebra").mkdir()
    return str(root), []


def _unknown_csv_label(root: Path) -> tuple[str, list[str]]:
    build_csv(root, ("train", "val"))
    with open(root / "val.csv", "a") as f:
        f.write("images/val_cat_0.jpg,tiger\n")
    return str(root), ["--data.val_csv", "val.csv"]


def _missing_image_column(root: Path) -> tuple[str, list[str]]:
    build_hf_parquet(root, ("train", "validation"), per_class=1, image_column="img")
    return str(root), []


def _fold_out_of_range(root: Path) -> tuple[str, list[str]]:
    build_image_folder(root, ("train", "val"))
    return str(root), ["--data.num_folds", "5", "--data.fold", "5"]


BAD_INPUT = {
    # case: (builder, datamodule, words the one-line error must hold: the value and the fix)
    "empty class folder": (_empty_class_folder, "ImageFolderDataModule", ["empty class folder", "zebra", "add images or remove"]),
    "unknown CSV label": (_unknown_csv_label, "CSVDataModule", ["val.csv", "line 14", "unknown label 'tiger'", "data.classes"]),
    "missing image column": (_missing_image_column, "HFDataModule", ["no image column 'image'", "columns: img, label", "data.image_column"]),
    "fold out of range": (_fold_out_of_range, "ImageFolderDataModule", ["fold=5", "num_folds=5", "expected 0..4"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_and_nothing_written(case: str, tmp_path: Path, capsys) -> None:
    build, datamodule, words = BAD_INPUT[case]
    root, extra = build(tmp_path / "data")
    run_dir = tmp_path / "run"
    code = main(["fit", *tiny_fit_args(root, run_dir, epochs=1, datamodule=f"datamodules.{datamodule}"), *extra])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, errors
    for word in words:
        assert word in errors[0], errors[0]
    assert not run_dir.exists()


@pytest.mark.parametrize("online", [False, True], ids=["offline, not cached", "not on the Hub"])
def test_hf_dataset_id_that_cannot_be_loaded_is_one_line(tmp_path: Path, online: bool) -> None:
    # datasets reads HF_ENDPOINT, HF_HUB_OFFLINE and HF_HOME at import: a process of its own
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH=str(REPO / "tests"))
    run_dir = tmp_path / "run"
    args = tiny_fit_args("someone/no-such-dataset", run_dir, epochs=1, datamodule="datamodules.HFDataModule")
    command = [sys.executable, str(REPO / "cli.py"), "fit", *args]
    with FakeHub() as hub:  # the local stand-in for the Hub: it knows no dataset
        if online:
            env["HF_ENDPOINT"] = hub.url
        else:
            env["HF_HUB_OFFLINE"] = "1"
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert "Hugging Face dataset 'someone/no-such-dataset' could not be loaded" in errors[0]
    assert ("HF_HUB_OFFLINE=1" in errors[0]) != online and "data.root" in errors[0]
    assert not run_dir.exists()


def test_fold_settings_are_checked_at_construction() -> None:
    with pytest.raises(DataError, match="num_folds=1"):
        ImageFolderDataModule("/nowhere", num_folds=1)
    with pytest.raises(DataError, match="set only one"):
        ImageFolderDataModule("/nowhere", num_folds=3, val_split=0.1)


def test_annotation_errors_of_the_published_datasets_are_one_line_exit_2(tmp_path: Path, capsys) -> None:
    built = build_cub(tmp_path / "cub")
    labels = built.root / "image_class_labels.txt"
    labels.write_text(labels.read_text().replace("1 1\n", "1 9\n", 1))
    assert main(["fit", *tiny_fit_args(tmp_path / "cub", tmp_path / "run", epochs=1)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "image_class_labels.txt: image id 1 has class 9, expected 1..3" in errors[0]


def test_kfold_command_runs_every_fold_and_prints_mean_and_std(tmp_path: Path, capsys) -> None:
    build_image_folder(tmp_path / "data", ("train", "test"), per_class=3)
    run_dir = tmp_path / "kfold"
    args = tiny_fit_args(tmp_path / "data", tmp_path / "ignored", epochs=1, datamodule="datamodules.ImageFolderDataModule")
    assert main(["kfold", "--folds", "3", *args, "--run_dir", str(run_dir)]) == 0
    results = [
        torch.load(run_dir / f"fold{k}" / "checkpoints" / "last.ckpt", weights_only=True)["finetune"]["metrics"]
        for k in range(3)
    ]
    out = capsys.readouterr().out
    assert "3-fold cross-validation" in out and "mean +- std" in out
    with open(run_dir / "kfold.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["fold", "epoch", "top1", "top5", "mean_class_acc"]
    assert [float(v) for v in rows[1][2:]] == pytest.approx([results[0][m] for m in ("top1", "top5", "mean_class_acc")])
    top1 = [r["top1"] for r in results]
    assert float(rows[4][2]) == pytest.approx(np.mean(top1)) and float(rows[5][2]) == pytest.approx(np.std(top1, ddof=1))
    assert not (tmp_path / "ignored").exists()


def test_kfold_command_stops_at_the_first_failing_fold(tmp_path: Path, capsys) -> None:
    args = tiny_fit_args(tmp_path / "missing", tmp_path / "run", epochs=1, datamodule="datamodules.ImageFolderDataModule")
    assert main(["kfold", "--folds", "3", *args]) == 2
    assert f"data.root '{tmp_path / 'missing'}': no such file or folder" in capsys.readouterr().err
