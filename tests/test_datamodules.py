"""Datamodules and datasets against small datasets built in the real on-disk layouts."""

from __future__ import annotations

import functools
import hashlib
import http.server
import logging
import os
import random
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import scipy.io
import torch
from data_builders import (  # tests/ is on sys.path (pytest prepends it)
    BACKGROUND,
    CARS_LAYOUTS,
    CUB_LAYOUTS,
    IMAGENET_LAYOUTS,
    build_cars,
    build_cub,
    build_imagenet,
    make_tgz,
    truncate_file,
    write_image,
)
from jsonargparse import ArgumentParser
from numpy.lib.recfunctions import repack_fields
from PIL import Image
from timm.data.auto_augment import RandAugment

from datamodules import (
    CUB200,
    CUB200DataModule,
    DataError,
    ImageDecodeError,
    ImageListDataset,
    ImageNet,
    ImageNetDataModule,
    Sample,
    StanfordCars,
    StanfordCarsDataModule,
    TooManyBadImagesError,
    build_eval_transform,
    build_train_transform,
    load_rgb,
    stratified_split,
)
from datamodules.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PolicyAugment, augment_policy

SMALL = {"img_size": 32, "batch_size": 2, "num_workers": 0}


def pairs(dataset: ImageListDataset) -> list[tuple[str, int]]:
    return [(s.path, s.label) for s in dataset.samples]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def cub(tmp_path_factory: pytest.TempPathFactory):
    return build_cub(tmp_path_factory.mktemp("cub"))


# -- decoding and transforms ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_load_rgb_gives_rgb_for_every_jpeg_mode(tmp_path: Path, mode: str) -> None:
    path = write_image(tmp_path / "a.jpg", (5, 6, 30, 20), mode)
    image = load_rgb(path)
    reference = np.asarray(Image.open(path).convert("RGB"))
    assert image.dtype == np.uint8 and image.shape == (36, 48, 3)
    assert np.abs(image.astype(int) - reference).mean() < 2.0
    assert image[10, 10].tolist() == pytest.approx([255, 255, 255], abs=4)  # inside the box


def test_load_rgb_rejects_truncated_corrupt_and_missing_files(tmp_path: Path) -> None:
    truncated = truncate_file(write_image(tmp_path / "t.jpg", (5, 6, 30, 20)))
    with pytest.raises(ImageDecodeError, match="t.jpg: truncated JPEG"):
        load_rgb(truncated)
    garbage = tmp_path / "g.jpg"
    garbage.write_bytes(b"GIF89a not really")
    with pytest.raises(ImageDecodeError, match="g.jpg: not a decodable image"):
        load_rgb(garbage)
    with pytest.raises(FileNotFoundError):
        load_rgb(tmp_path / "missing.jpg")


def test_eval_transform_resizes_shorter_side_then_center_crops() -> None:
    # left half black, right half white, 200 x 100: shorter side -> floor(64 / 0.5) = 128, crop 64
    image = np.zeros((100, 200, 3), dtype=np.uint8)
    image[:, 100:] = 255
    out = build_eval_transform(64, crop_pct=0.5, interpolation="bilinear")(image)
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN), torch.tensor(IMAGENET_DEFAULT_STD)
    expected_white = (1 - mean) / std
    # the crop spans columns 96..160 of the 256-wide resized image: the middle, half of each colour
    assert torch.allclose(out[:, :, -1], expected_white[:, None].expand(3, 64), atol=1e-4)
    assert torch.allclose(out[:, :, 0], (-mean / std)[:, None].expand(3, 64), atol=1e-4)
    assert torch.equal(out, build_eval_transform(64, crop_pct=0.5, interpolation="bilinear")(image))


def test_train_transform_output_and_reseeding() -> None:
    image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    transform = build_train_transform(48)
    transform.set_random_seed(3)
    first = [transform(image) for _ in range(3)]
    assert all(t.shape == (3, 48, 48) and t.dtype == torch.float32 for t in first)
    assert not torch.equal(first[0], first[1])
    transform.set_random_seed(3)
    assert all(torch.equal(a, transform(image)) for a in first)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"interpolation": "cubic"}, "interpolation='cubic'"),
        ({"train_crop_scale": (0.5, 0.2)}, "train_crop_scale"),
        ({"re_prob": 1.5}, "re_prob=1.5"),
        ({"img_size": 0}, "img_size=0"),
    ],
)
def test_train_transform_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_train_transform(**kwargs)


def test_stratified_split_is_per_class_and_deterministic() -> None:
    labels = [0] * 10 + [1] * 20 + [2] * 2 + [3]
    train, val = stratified_split(labels, 0.3, seed=0)
    assert sorted(train + val) == list(range(len(labels)))
    assert Counter(labels[i] for i in val) == {0: 3, 1: 6, 2: 1}  # class 3 has one sample: train
    assert (train, val) == stratified_split(labels, 0.3, seed=0)
    assert val != stratified_split(labels, 0.3, seed=1)[1]
    with pytest.raises(ValueError, match="val_split=1.0"):
        stratified_split(labels, 1.0)


# -- CUB-200-2011 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("use_parent", [True, False])
def test_cub_official_split_labels_and_names(cub, use_parent: bool) -> None:
    root = cub.root.parent if use_parent else cub.root
    dm = CUB200DataModule(str(root), **SMALL)
    assert dm.num_classes == 3  # read from classes.txt before setup, for the CLI's argument links
    dm.setup("fit")
    assert dm.class_names == ["Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross"]
    assert pairs(dm.train_dataset) == cub.splits["train"]
    assert pairs(dm.val_dataset) == cub.splits["test"]
    assert len(dm.train_dataset) == 9 and len(dm.val_dataset) == 6
    dm.setup("test")
    assert pairs(dm.test_dataset) == cub.splits["test"]
    image, label = dm.train_dataset[4]
    assert isinstance(label, int) and label == cub.splits["train"][4][1]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32


def test_cub_val_split_is_stratified_deterministic_and_uses_eval_transform(cub) -> None:
    dm = CUB200DataModule(str(cub.root), val_split=0.34, **SMALL)
    dm.setup("fit")
    train, val = pairs(dm.train_dataset), pairs(dm.val_dataset)
    assert sorted(train + val) == sorted(cub.splits["train"])
    assert Counter(label for _, label in val) == {0: 1, 1: 1, 2: 1}
    again = CUB200DataModule(str(cub.root), val_split=0.34, **SMALL)
    again.setup("validate")
    assert pairs(again.val_dataset) == val
    other_seed = CUB200DataModule(str(cub.root), val_split=0.34, seed=5, **SMALL)
    other_seed.setup("fit")
    assert pairs(other_seed.val_dataset) != val
    assert torch.equal(dm.val_dataset[0][0], dm.val_dataset[0][0])  # deterministic eval transform
    dm.setup("test")
    assert pairs(dm.test_dataset) == cub.splits["test"]


def test_cub_bounding_box_crop(cub) -> None:
    cropped = CUB200(cub.root, "train", crop_to_bbox=True)
    full = CUB200(cub.root, "train")
    for index in (0, 3, 8):
        path = cropped.samples[index].path
        x1, y1, x2, y2 = cub.boxes[path]
        box_image = cropped[index][0]
        assert box_image.shape == (y2 - y1, x2 - x1, 3)
        assert box_image.mean() > 245  # only the white box is left
        assert full[index][0].shape == (36, 48, 3)
        assert full[index][0].mean() < 200
    dm = CUB200DataModule(str(cub.root), crop_to_bbox=True, **SMALL)
    dm.setup("test")
    white = ((1 - torch.tensor(IMAGENET_DEFAULT_MEAN)) / torch.tensor(IMAGENET_DEFAULT_STD)).mean()
    assert dm.test_dataset[0][0].mean() == pytest.approx(float(white), abs=0.1)


def test_cub_grayscale_and_cmyk_images_become_three_channels(cub) -> None:
    dataset = CUB200(cub.root, "train")
    modes = {s.path: Image.open(s.path).mode for s in dataset.samples}
    assert {"L", "CMYK", "RGB"} <= set(modes.values())
    for index, sample in enumerate(dataset.samples):
        image, _ = dataset[index]
        assert image.shape == (36, 48, 3) and image.dtype == np.uint8
        red, green, blue = image[0, 0].tolist()
        if modes[sample.path] == "L":
            assert red == green == blue
        else:
            assert [red, green, blue] == pytest.approx(list(BACKGROUND), abs=6)


def test_cub_dataloaders(cub) -> None:
    dm = CUB200DataModule(str(cub.root), img_size=32, batch_size=4, num_workers=0)
    with pytest.raises(RuntimeError, match=r"call setup\('fit'\)"):
        dm.train_dataloader()
    dm.setup("fit")
    dm.setup("test")
    train_batches = list(dm.train_dataloader())
    assert len(train_batches) == 2  # 9 images, batch 4, drop_last
    images, labels = train_batches[0]
    assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.int64
    val_labels = torch.cat([b[1] for b in dm.val_dataloader()])
    assert val_labels.tolist() == [label for _, label in cub.splits["test"]]  # not shuffled
    assert sum(len(b[1]) for b in dm.test_dataloader()) == 6
    loader = dm.train_dataloader()
    assert loader.drop_last and not loader.persistent_workers and not loader.pin_memory


def test_cub_setup_leaves_dataset_folder_unchanged(cub) -> None:
    before = snapshot(cub.root)
    dm = CUB200DataModule(str(cub.root), crop_to_bbox=True, val_split=0.3, **SMALL)
    dm.setup("fit")
    dm.setup("test")
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        list(loader)
    assert snapshot(cub.root) == before


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(
    ("damage", "error", "message"),
    [
        (lambda r: (r / "image_class_labels.txt").unlink(), FileNotFoundError, "annotation file not found: .*image_class_labels.txt"),
        (lambda r: (r / "classes.txt").write_bytes(b"\xff\xfe\x00"), ValueError, "classes.txt: not a UTF-8 text file"),
        (lambda r: _edit(r / "image_class_labels.txt", "1 1\n", "1 7\n"), ValueError, r"image_class_labels.txt: image id 1 has class 7, expected 1..3"),
        (lambda r: _edit(r / "image_class_labels.txt", "1 1\n", "1 one\n"), ValueError, r"image_class_labels.txt: row 1 .* expected columns \(int, int\)"),
        (lambda r: _edit(r / "train_test_split.txt", "1 1\n", "1 2\n"), ValueError, "train_test_split.txt: image id 1 has flag 2"),
        (lambda r: next((r / "images").rglob("*_0001_2.jpg")).unlink(), FileNotFoundError, r"1 image\(s\) listed in .*images.txt do not exist: .*_0001_2.jpg"),
        (lambda r: _edit(r / "bounding_boxes.txt", "1 ", "1 1.0 1.0 0.0 5.0\n0 "), ValueError, "bounding_boxes.txt: image id 1 has box size 0.0 x 5.0"),
    ],
    ids=["missing-file", "not-text", "label-out-of-range", "malformed-row", "bad-split-flag", "missing-image", "bad-box"],
)
def test_cub_bad_annotations_fail_at_setup_naming_the_file(tmp_path: Path, damage, error, message) -> None:
    built = build_cub(tmp_path, num_classes=3, train_per_class=2, test_per_class=1)
    damage(built.root)
    dm = CUB200DataModule(str(built.root), crop_to_bbox=True, **SMALL)
    with pytest.raises(error, match=message):
        dm.setup("fit")


@pytest.mark.parametrize("layout", CUB_LAYOUTS)
def test_cub_mirror_layouts_are_detected(tmp_path: Path, layout: str) -> None:
    built = build_cub(tmp_path, layout=layout)
    dm = CUB200DataModule(str(tmp_path), **SMALL)  # the parent of everything, whatever the mirror
    assert dm.class_names == built.class_names
    dm.setup()
    assert pairs(dm.train_dataset) == built.splits["train"]
    assert pairs(dm.test_dataset) == built.splits["test"]
    assert dm.train_dataset[0][0].shape == (3, 32, 32)


def test_cub_class_folders_have_no_boxes_to_crop_to(tmp_path: Path) -> None:
    build_cub(tmp_path, layout="class_folders")
    with pytest.raises(DataError, match="crop_to_bbox=True: .* holds CUB in class folders"):
        CUB200DataModule(str(tmp_path), crop_to_bbox=True, **SMALL).setup("fit")


def test_cub_missing_root_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"looked for .*images.txt and .*CUB_200_2011/images.txt"):
        CUB200DataModule(str(tmp_path), **SMALL).setup("fit")


# -- unreadable images during an epoch ------------------------------------------------------------


def test_unreadable_image_is_logged_and_replaced_by_same_class(tmp_path: Path, caplog) -> None:
    built = build_cub(tmp_path)
    bad_path, bad_label = built.splits["train"][1]
    truncate_file(Path(bad_path))
    dm = CUB200DataModule(str(built.root), max_bad_images=1, **SMALL)
    dm.setup("fit")  # annotations are fine: the damage only shows when decoding
    dataset = CUB200(built.root, "train")
    with caplog.at_level(logging.WARNING, logger="datamodules.dataset"):
        image, label = dataset[1]
    assert label == bad_label
    assert np.array_equal(image, dataset[2][0])  # the next image of the same class
    assert bad_path in caplog.text
    assert len([r for r in caplog.records if bad_path in r.getMessage()]) == 1
    dataset[1]  # met again: neither logged nor counted twice
    assert len([r for r in caplog.records if bad_path in r.getMessage()]) == 1
    assert dataset.bad_images.paths == [bad_path]


def test_too_many_unreadable_images_stop_the_run_listing_them(tmp_path: Path) -> None:
    built = build_cub(tmp_path)
    bad = [built.splits["train"][0][0], built.splits["train"][4][0]]
    for path in bad:
        truncate_file(Path(path))
    dm = CUB200DataModule(str(built.root), max_bad_images=1, **SMALL)
    dm.setup("fit")
    with pytest.raises(TooManyBadImagesError, match="2 unreadable image files, more than max_bad_images=1") as info:
        list(dm.train_dataloader())
    assert all(path in str(info.value) for path in bad)


def test_a_class_with_only_unreadable_images_fails_clearly(tmp_path: Path) -> None:
    built = build_cub(tmp_path, train_per_class=1)
    truncate_file(Path(built.splits["train"][0][0]))
    dataset = CUB200(built.root, "train")
    with pytest.raises(TooManyBadImagesError, match="every image of class 0 .Black_footed_Albatross. is unreadable"):
        dataset[0]


def test_bad_image_budget_is_shared_by_dataloader_workers(tmp_path: Path) -> None:
    # one bad file in each of two workers: per-worker counting would tolerate both with a limit of 1
    built = build_cub(tmp_path, num_classes=2, train_per_class=2, test_per_class=1)
    bad = [built.splits["train"][0][0], built.splits["train"][3][0]]
    for path in bad:
        truncate_file(Path(path))
    dm = CUB200DataModule(str(built.root), img_size=32, batch_size=1, num_workers=2, max_bad_images=1)
    dm.setup("fit")
    # unshuffled, items 0, 2 go to worker 0 and items 1, 3 to worker 1
    # (spawned workers share it too, checked by hand: each one re-imports torch, too slow for this suite)
    loader = torch.utils.data.DataLoader(dm.train_dataset, batch_size=1, num_workers=2)
    with pytest.raises(TooManyBadImagesError) as info:
        list(loader)
    assert all(path in str(info.value) for path in bad)


def test_dataloader_workers_draw_different_augmentations(tmp_path: Path) -> None:
    path = str(write_image(tmp_path / "a.jpg", (5, 6, 30, 20)))
    dm = CUB200DataModule(str(tmp_path), img_size=32, batch_size=1, num_workers=2, persistent_workers=False)
    dm.train_dataset = ImageListDataset([Sample(path, 0)] * 4, ["a"], dm.train_transform)
    # with shuffling the order differs, but every item is the same image: compare the outputs
    outputs = [images[0] for images, _ in dm.train_dataloader()]
    assert len(outputs) == 4
    assert not torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[2], outputs[3])


# -- download -------------------------------------------------------------------------------------


class _Server:
    """A local HTTP server for a folder, counting requests."""

    def __init__(self, directory: Path) -> None:
        self.requests: list[str] = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                server.requests.append(self.path)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def __enter__(self) -> _Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def cub_archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    built = build_cub(tmp_path_factory.mktemp("source"), train_per_class=1, test_per_class=1)
    served = tmp_path_factory.mktemp("served")
    archive = make_tgz(built.root, served / "CUB_200_2011.tgz")
    return served, hashlib.md5(archive.read_bytes()).hexdigest()


def _downloading_module(root: Path, server: _Server, md5: str) -> CUB200DataModule:
    dm = CUB200DataModule(str(root), download=True, **SMALL)
    dm.url = server.url("CUB_200_2011.tgz")
    dm.md5 = md5
    return dm


def test_prepare_data_downloads_checks_and_extracts(tmp_path: Path, cub_archive) -> None:
    served, md5 = cub_archive
    root = tmp_path / "data"
    with _Server(served) as server:
        dm = _downloading_module(root, server, md5)
        dm.prepare_data()
        assert sorted(os.listdir(root)) == ["CUB_200_2011"]  # no archive or temp folder left
        dm.setup("fit")
        assert len(dm.train_dataset) == 3 and dm.num_classes == 3
        dm.prepare_data()  # present: no second download
        assert server.requests == ["/CUB_200_2011.tgz"]


def test_prepare_data_checksum_mismatch_leaves_nothing(tmp_path: Path, cub_archive) -> None:
    served, _ = cub_archive
    root = tmp_path / "data"
    with _Server(served) as server:
        dm = _downloading_module(root, server, "0" * 32)
        with pytest.raises(OSError, match=f"checksum mismatch for {server.url('CUB_200_2011.tgz')}: got md5"):
            dm.prepare_data()
    assert not root.exists()  # created for the download, removed with it
    root.mkdir()
    with _Server(served) as server, pytest.raises(OSError, match="checksum mismatch"):
        _downloading_module(root, server, "0" * 32).prepare_data()
    assert os.listdir(root) == []


def test_prepare_data_does_not_download_unless_asked(tmp_path: Path, cub_archive) -> None:
    served, md5 = cub_archive
    with _Server(served) as server:
        dm = CUB200DataModule(str(tmp_path), **SMALL)
        dm.url, dm.md5 = server.url("CUB_200_2011.tgz"), md5
        dm.prepare_data()
        assert server.requests == [] and os.listdir(tmp_path) == []


# -- Stanford Cars --------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", CARS_LAYOUTS)
def test_cars_layouts(tmp_path: Path, layout: str) -> None:
    built = build_cars(tmp_path, layout)
    dm = StanfordCarsDataModule(str(tmp_path), **SMALL)
    assert dm.class_names == built.class_names
    dm.setup("fit")
    dm.setup("test")
    assert pairs(dm.train_dataset) == built.splits["train"]
    assert pairs(dm.test_dataset) == built.splits["test"]
    image, label = dm.test_dataset[5]
    assert image.shape == (3, 32, 32) and label == built.splits["test"][5][1]
    cropped = StanfordCars(tmp_path, "test", crop_to_bbox=True)
    for index in (0, 5):
        x1, y1, x2, y2 = built.boxes[cropped.samples[index].path]
        assert cropped[index][0].shape == (y2 - y1, x2 - x1, 3)
        assert cropped[index][0].mean() > 245


def test_cars_without_any_layout_lists_what_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"devkit/cars_meta.mat \(devkit layout\); cars_annos.mat \(car_ims layout\); anno_train.csv \(csv layout\)"):
        StanfordCarsDataModule(str(tmp_path), **SMALL).setup("fit")


def test_cars_devkit_without_test_labels(tmp_path: Path) -> None:
    build_cars(tmp_path, "devkit")
    (tmp_path / "devkit" / "cars_test_annos_withlabels.mat").unlink()
    assert len(StanfordCars(tmp_path, "train")) == 6
    dm = StanfordCarsDataModule(str(tmp_path), **SMALL)
    with pytest.raises(FileNotFoundError, match="cars_test_annos_withlabels.mat .*has no labels"):
        dm.setup("fit")  # validation uses the test split


def test_cars_label_out_of_range_in_mat_file(tmp_path: Path) -> None:
    build_cars(tmp_path, "devkit")
    path = tmp_path / "devkit" / "cars_train_annos.mat"
    mat = scipy.io.loadmat(path)
    mat["annotations"][0, 2]["class"] = np.array([[9]], dtype=np.uint8)
    scipy.io.savemat(path, {"annotations": mat["annotations"]})
    with pytest.raises(ValueError, match=r"cars_train_annos.mat: 00003.jpg has class 9, expected 1..3"):
        StanfordCars(tmp_path, "train")


def test_cars_bad_mat_files(tmp_path: Path) -> None:
    build_cars(tmp_path, "car_ims")
    path = tmp_path / "cars_annos.mat"
    mat = scipy.io.loadmat(path)
    without_test = repack_fields(mat["annotations"][["relative_im_path", "class"]])
    scipy.io.savemat(path, {"annotations": without_test, "class_names": mat["class_names"]})
    with pytest.raises(ValueError, match=r"cars_annos.mat: struct 'annotations' lacks field\(s\) \['test'"):
        StanfordCars(tmp_path, "train")
    path.write_bytes(b"MATLAB 5.0 but not really")
    with pytest.raises(ValueError, match="cars_annos.mat: not a readable MATLAB .mat file"):
        StanfordCars(tmp_path, "train")


def test_cars_csv_missing_image(tmp_path: Path) -> None:
    built = build_cars(tmp_path, "csv")
    Path(built.splits["train"][1][0]).unlink()
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) listed in .*anno_train.csv are in no class folder .*: 00002.jpg"):
        StanfordCars(tmp_path, "train")


def test_cars_single_annotation_mat(tmp_path: Path) -> None:
    # a one-element struct array squeezes to a scalar struct in loadmat
    built = build_cars(tmp_path, "devkit", train_per_class=1, test_per_class=1)
    path = tmp_path / "devkit" / "cars_train_annos.mat"
    mat = scipy.io.loadmat(path)
    scipy.io.savemat(path, {"annotations": mat["annotations"][:, :1]})
    assert pairs(StanfordCars(tmp_path, "train")) == built.splits["train"][:1]


# -- ImageNet -------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", IMAGENET_LAYOUTS)
def test_imagenet_layouts(tmp_path: Path, layout: str) -> None:
    built = build_imagenet(tmp_path, layout)
    dm = ImageNetDataModule(str(tmp_path), **SMALL)
    assert dm.class_names == ["tench", "goldfish", "great white shark"]
    dm.setup("fit")
    assert sorted(pairs(dm.train_dataset)) == sorted(built.splits["train"])
    assert sorted(pairs(dm.val_dataset)) == sorted(built.splits["val"])
    dm.setup("test")
    assert dm.test_dataset is dm.val_dataset
    image, label = dm.train_dataset[3]
    assert image.shape == (3, 32, 32) and label == dict(built.splits["train"])[dm.train_dataset.samples[3].path]
    assert ImageNet(tmp_path, "val").wnids == ["n01440764", "n01443537", "n01484850"]


def test_imagenet_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no ImageNet layout found .*CLS-LOC.*train/<wnid>/.*ILSVRC2012_validation_ground_truth.txt"):
        ImageNet(tmp_path / "nothing", "train")
    build_imagenet(tmp_path / "devkit", "devkit")
    truth = tmp_path / "devkit" / "ILSVRC2012_devkit_t12" / "data" / "ILSVRC2012_validation_ground_truth.txt"
    truth.write_text(truth.read_text().replace("3\n", "4\n", 1))  # 4: a non-leaf synset
    with pytest.raises(ValueError, match=r"ILSVRC2012_validation_ground_truth.txt: line \d is '4', expected a class id"):
        ImageNet(tmp_path / "devkit", "val")
    build_imagenet(tmp_path / "loc", "loc")
    solution = tmp_path / "loc" / "LOC_val_solution.csv"
    solution.write_text(solution.read_text().replace("n01443537", "n09999999"))
    with pytest.raises(ValueError, match="LOC_val_solution.csv: ILSVRC2012_val_00000002 has label 'n09999999'"):
        ImageNet(tmp_path / "loc", "val")
    built = build_imagenet(tmp_path / "folder", "folder")
    (tmp_path / "folder" / "val" / "n07000000").mkdir()
    write_image(tmp_path / "folder" / "val" / "n07000000" / "x.JPEG")
    with pytest.raises(ValueError, match=r"val: class folder\(s\) \['n07000000'\] are not among the 3 known classes"):
        ImageNet(built.root, "val")


# -- construction from the CLI's YAML -------------------------------------------------------------


@pytest.mark.parametrize("cls", [CUB200DataModule, StanfordCarsDataModule, ImageNetDataModule])
def test_constructor_arguments_are_cli_friendly(cls) -> None:
    parser = ArgumentParser()
    parser.add_class_arguments(cls, "data")
    config = parser.parse_object(
        {"data": {"root": "/data/x", "img_size": 384, "mean": [0.5, 0.5, 0.5], "val_split": 0.1, "interpolation": "bilinear"}}
    )
    dm = parser.instantiate_classes(config).data
    assert isinstance(dm, cls)
    assert dm.hparams["img_size"] == 384 and dm.hparams["mean"] == (0.5, 0.5, 0.5)
    common = {"root", "img_size", "batch_size", "num_workers", "pin_memory", "persistent_workers", "val_split", "seed",
              "mean", "std", "interpolation", "crop_pct", "train_crop_scale", "hflip", "color_jitter", "auto_augment",
              "re_prob", "max_bad_images"}
    assert common <= set(vars(config.data))
    assert dm.eval_transform(np.zeros((50, 60, 3), dtype=np.uint8)).shape == (3, 384, 384)


def test_invalid_constructor_values_are_rejected() -> None:
    with pytest.raises(ValueError, match="val_split=1.2"):
        CUB200DataModule("/nowhere", val_split=1.2)
    with pytest.raises(ValueError, match="crop_pct=0"):
        CUB200DataModule("/nowhere", crop_pct=0)
    with pytest.raises(ValueError, match="max_bad_images=-1"):
        CUB200DataModule("/nowhere", max_bad_images=-1)


# -- augmentation policies named as timm names them -----------------------------------------------


@pytest.mark.parametrize("name", ["rand-m9-mstd0.5-inc1", "augmix-m5-w4-d2", "trivialaugment", "original"])
def test_auto_augment_string_runs_timms_own_policy(name: str) -> None:
    image = np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    ours = PolicyAugment(name, 40, IMAGENET_DEFAULT_MEAN, "bicubic")
    theirs = augment_policy(name, 40, IMAGENET_DEFAULT_MEAN, "bicubic")
    outputs = []
    for policy in (lambda x: ours(image=x)["image"], lambda x: np.asarray(theirs(Image.fromarray(x)))):
        random.seed(5)
        np.random.seed(5)
        torch.manual_seed(5)
        outputs.append([policy(image) for _ in range(4)])
    assert all(np.array_equal(a, b) for a, b in zip(*outputs, strict=True))
    assert not all(np.array_equal(a, image) for a in outputs[0])


def test_deit_rand_augment_string_has_timms_meaning() -> None:
    transform = build_train_transform(48, auto_augment="rand-m9-mstd0.5-inc1")
    policy = next(t for t in transform.compose.transforms if isinstance(t, PolicyAugment)).policy
    assert isinstance(policy, RandAugment)
    assert policy.num_layers == 2  # timm's default n
    assert {op.magnitude for op in policy.ops} == {9} and {op.magnitude_std for op in policy.ops} == {0.5}
    names = {op.name for op in policy.ops}
    assert {"SolarizeIncreasing", "PosterizeIncreasing", "SharpnessIncreasing"} <= names  # inc1
    assert len(names) == 15  # timm's increasing RandAugment set
    assert not any(isinstance(t, A.ColorJitter) for t in transform.compose.transforms)  # as timm: no jitter


def test_policy_augment_is_reseeded_per_worker() -> None:
    image = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    transform = build_train_transform(32, auto_augment="augmix-m5-w4-d2", re_prob=0.0)
    draws = []
    for seed in (3, 3, 4):
        transform.set_random_seed(seed)
        draws.append(transform(image))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


@pytest.mark.parametrize("bad", ["rand-x9", "nonsense", True])
def test_unknown_auto_augment_is_one_clear_error(bad) -> None:
    with pytest.raises(ValueError, match="auto_augment=.*expected"):
        build_train_transform(32, auto_augment=bad)


def test_posterize_at_zero_bits_gives_black_as_timm_meant() -> None:
    policy = augment_policy("rand-m10-mstd0-inc1", 32, IMAGENET_DEFAULT_MEAN, "bicubic")
    op = next(op for op in policy.ops if op.name == "PosterizeIncreasing")
    op.prob = 1.0  # magnitude 10: 4 - 4 = 0 bits kept, which Pillow >= 11 refuses
    image = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    assert not np.asarray(op(image)).any()


# -- the compact sample index ---------------------------------------------------------------------


def test_sample_array_gives_back_every_sample_and_subsets_share_the_names() -> None:
    from datamodules import SampleArray

    samples = [
        Sample("/data/train/n01/a.JPEG", 0),
        Sample("/data/train/n01/bé.JPEG", 0, (1.5, 2.0, 30.0, 40.25)),
        Sample("/data/train/n02/" + os.fsdecode(b"\xff-not-utf8.jpg"), 1),
        Sample("relative/c.png", 7),
    ]
    array = SampleArray(samples)
    assert list(array) == samples and len(array) == 4
    assert array[-1] == samples[-1] and array[1].box == (1.5, 2.0, 30.0, 40.25)
    assert list(array[1:3]) == samples[1:3]
    taken = array.take([3, 0, 2])
    assert list(taken) == [samples[3], samples[0], samples[2]]
    assert taken.name_bytes is array.name_bytes and taken.labels.tolist() == [7, 0, 1]
    with pytest.raises(IndexError):
        array[4]
    assert list(SampleArray([])) == [] and SampleArray(samples[:1]).boxes is None
    dataset = ImageListDataset(samples, [str(c) for c in range(8)])
    assert dataset.targets == [0, 0, 1, 7] and list(dataset.subset([1]).samples) == [samples[1]]


@pytest.mark.parametrize(("user_setting", "expected"), [(None, "1"), ("0", "0")])
def test_importing_the_transforms_skips_albumentations_update_check_unless_the_user_asks(user_setting, expected):
    """albumentations would ask PyPI for a newer release at import (and warn on an older one)."""
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    if user_setting is not None:
        env["NO_ALBUMENTATIONS_UPDATE"] = user_setting
    code = "import os, datamodules.transforms; print(os.environ['NO_ALBUMENTATIONS_UPDATE'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == expected
