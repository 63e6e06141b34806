"""Stanford Cars (Krause et al., 2013): 196 classes, 8,144 train / 8,041 test images.

The dataset circulates in three layouts, detected from their marker file in ``root`` or in
``root/stanford_cars`` (torchvision's place for the devkit layout; see ``docs/datasets.md``):

- ``devkit``: ``cars_train/``, ``cars_test/``, ``devkit/cars_meta.mat`` (``class_names``),
  ``devkit/cars_train_annos.mat`` and ``cars_test_annos_withlabels.mat`` (at the root or in
  ``devkit/``), each with a struct array ``annotations`` (bbox_x1, bbox_y1, bbox_x2, bbox_y2,
  class (1-based), fname);
- ``car_ims``: ``cars_annos.mat`` (``annotations`` with relative_im_path, bbox_*, class, test;
  ``class_names``) and ``car_ims/``;
- ``csv``: ``anno_train.csv`` / ``anno_test.csv`` (fname, x1, y1, x2, y2, class (1-based), no
  header), ``names.csv`` (one class name per line) and ``car_data/{train,test}/<class>/`` (also
  ``car_data/car_data/...``, as the Kaggle archive nests it).

Boxes are MATLAB-style pixel coordinates (1-based, inclusive).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .base import ImageClassificationDataModule
from .dataset import BadImageRegistry, OnDiskDataset, Sample
from .files import (
    DataError,
    check_files_exist,
    check_label,
    list_images_in_subdirs,
    load_mat,
    read_lines,
    read_rows,
    string,
    struct_fields,
)

__all__ = ["StanfordCars", "StanfordCarsDataModule"]

_BOX_FIELDS = {"bbox_x1": float, "bbox_y1": float, "bbox_x2": float, "bbox_y2": float}

# (image path, 1-based class, MATLAB box) per image, and the file that listed them
_Records = tuple[list[tuple[str, int, tuple[float, float, float, float]]], Path]


def _mat_strings(path: Path, key: str) -> list[str]:
    mat = load_mat(path)
    if key not in mat:
        raise DataError(f"{path}: no variable {key!r}")
    values = [v.item() if isinstance(v, np.ndarray) and v.size == 1 else v for v in np.atleast_1d(mat[key])]
    if not values or not all(isinstance(v, str) for v in values):
        raise DataError(f"{path}: {key!r} must be a cell array of strings")
    return values


def _box(fields: dict[str, list[Any]], i: int) -> tuple[float, float, float, float]:
    return fields["bbox_x1"][i], fields["bbox_y1"][i], fields["bbox_x2"][i], fields["bbox_y2"][i]


# -- devkit ---------------------------------------------------------------------------------------


def _devkit_classes(root: Path) -> list[str]:
    return _mat_strings(root / "devkit" / "cars_meta.mat", "class_names")


def _devkit_records(root: Path, split: str) -> _Records:
    if split == "train":
        annotations = root / "devkit" / "cars_train_annos.mat"
    else:
        candidates = [root / "cars_test_annos_withlabels.mat", root / "devkit" / "cars_test_annos_withlabels.mat"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise FileNotFoundError(
                f"Stanford Cars test labels not found: looked for {' and '.join(map(str, candidates))} "
                "(devkit/cars_test_annos.mat has no labels)"
            )
        annotations = found[0]
    fields = struct_fields(
        load_mat(annotations), annotations, "annotations", {"fname": string, "class": int, **_BOX_FIELDS}
    )
    image_dir = root / f"cars_{split}"
    records = [
        (os.path.join(image_dir, name), label, _box(fields, i))
        for i, (name, label) in enumerate(zip(fields["fname"], fields["class"], strict=True))
    ]
    return records, annotations


# -- cars_annos.mat + car_ims/ --------------------------------------------------------------------


def _car_ims_classes(root: Path) -> list[str]:
    return _mat_strings(root / "cars_annos.mat", "class_names")


def _car_ims_records(root: Path, split: str) -> _Records:
    annotations = root / "cars_annos.mat"
    fields = struct_fields(
        load_mat(annotations),
        annotations,
        "annotations",
        {"relative_im_path": string, "class": int, "test": int, **_BOX_FIELDS},
    )
    wanted = int(split == "test")
    records = []
    for i, (relative_path, label, test) in enumerate(
        zip(fields["relative_im_path"], fields["class"], fields["test"], strict=True)
    ):
        if test not in (0, 1):
            raise DataError(f"{annotations}: annotations[{i}].test = {test}, expected 0 (train) or 1 (test)")
        if test == wanted:
            records.append((os.path.join(root, relative_path), label, _box(fields, i)))
    return records, annotations


# -- CSV ------------------------------------------------------------------------------------------


def _csv_classes(root: Path) -> list[str]:
    return read_lines(root / "names.csv")


def _csv_records(root: Path, split: str) -> _Records:
    annotations = root / f"anno_{split}.csv"
    rows = read_rows(annotations, (str, float, float, float, float, int), delimiter=",")
    candidates = [root / "car_data" / split, root / "car_data" / "car_data" / split]
    image_dir = next((c for c in candidates if c.is_dir()), None)
    if image_dir is None:
        raise FileNotFoundError(f"Stanford Cars {split} images not found: looked for {' and '.join(map(str, candidates))}")
    # Images sit in per-class folders named after the class (with filesystem-unsafe characters
    # replaced, depending on who packed them): find each file by name instead of by class.
    with os.scandir(image_dir) as entries:
        class_dirs = sorted(e.name for e in entries if e.is_dir())
    located: dict[str, str] = {}
    for class_dir, names in zip(class_dirs, list_images_in_subdirs(image_dir, class_dirs), strict=True):
        for name in names:
            path = os.path.join(image_dir, class_dir, name)
            if located.setdefault(name, path) != path:
                raise DataError(f"{image_dir}: image name {name} occurs in two class folders: {located[name]}, {path}")
    missing = [name for name, *_ in rows if name not in located]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) listed in {annotations} are in no class folder of {image_dir}: "
            + ", ".join(missing[:3])
        )
    return [(located[name], label, (x1, y1, x2, y2)) for name, x1, y1, x2, y2, label in rows], annotations


class _Layout(NamedTuple):
    name: str
    marker: str
    classes: Callable[[Path], list[str]]
    records: Callable[[Path, str], _Records]


_LAYOUTS = (
    _Layout("devkit", "devkit/cars_meta.mat", _devkit_classes, _devkit_records),
    _Layout("car_ims", "cars_annos.mat", _car_ims_classes, _car_ims_records),
    _Layout("csv", "anno_train.csv", _csv_classes, _csv_records),
)


class StanfordCars(OnDiskDataset):
    """Stanford Cars in any of its three published layouts (see the module docstring), in ``root`` or
    in ``root/stanford_cars`` (where torchvision's ``StanfordCars(root)`` expects the devkit layout)."""

    splits = ("train", "test")
    base_folder = "stanford_cars"

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        transform: Any = None,
        crop_to_bbox: bool = False,
        bad_images: BadImageRegistry | None = None,
    ) -> None:
        self.check_split(split)
        folder, self.layout = self.find_layout(root)
        classes = self.layout.classes(folder)
        records, annotations = self.layout.records(folder, split)
        samples = []
        for path, class_id, (x1, y1, x2, y2) in records:
            label = check_label(class_id, len(classes), annotations, os.path.basename(path))
            if crop_to_bbox and not (x2 >= x1 and y2 >= y1):
                raise DataError(f"{annotations}: {os.path.basename(path)} has box {(x1, y1, x2, y2)}, expected x1 <= x2, y1 <= y2")
            box = (x1 - 1, y1 - 1, x2, y2) if crop_to_bbox else None
            samples.append(Sample(path, label, box))
        check_files_exist((s.path for s in samples), annotations)
        super().__init__(samples, classes, transform, bad_images)

    @classmethod
    def find_layout(cls, root: str | os.PathLike[str]) -> tuple[Path, _Layout]:
        """The folder holding a layout's marker (``root`` or ``root/stanford_cars``) and that layout."""
        for folder in (Path(root), Path(root) / cls.base_folder):
            for layout in _LAYOUTS:
                if (folder / layout.marker).is_file():
                    return folder, layout
        looked = "; ".join(f"{layout.marker} ({layout.name} layout)" for layout in _LAYOUTS)
        raise FileNotFoundError(f"no Stanford Cars layout found in {root} or {Path(root) / cls.base_folder}: looked for {looked}")

    @classmethod
    def read_class_names(cls, root: str | os.PathLike[str]) -> list[str]:
        folder, layout = cls.find_layout(root)
        return layout.classes(folder)


class StanfordCarsDataModule(ImageClassificationDataModule):
    """Stanford Cars with the official train/test split, layout detected from ``root``.

    ``crop_to_bbox`` crops every image to its annotated box before the transforms. All other
    arguments: see :class:`ImageClassificationDataModule`.
    """

    dataset_class = StanfordCars

    def __init__(self, root: str, *, crop_to_bbox: bool = False, **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self.crop_to_bbox = crop_to_bbox

    def dataset_kwargs(self) -> dict[str, Any]:
        return {"crop_to_bbox": self.crop_to_bbox}
