"""ImageNet-1k (ILSVRC 2012): 1000 classes, 1.28M train / 50,000 val images.

Three layouts, detected from ``root`` (see ``docs/datasets.md``):

- ``folder``: ``train/<wnid>/*``, ``val/<wnid>/*`` (ImageFolder; also what torchvision leaves);
- ``loc`` (Kaggle): ``ILSVRC/Data/CLS-LOC/{train/<wnid>/, val/*.JPEG}``, ``LOC_val_solution.csv``
  (ImageId, PredictionString whose first word is the wnid), ``LOC_synset_mapping.txt``;
- ``devkit``: ``train/<wnid>/*``, flat ``val/*.JPEG`` labelled by the devkit's
  ``ILSVRC2012_validation_ground_truth.txt`` (1-based ILSVRC2012 ids, one per validation image in
  file-name order) mapped to wnids through its ``meta.mat``; both files are looked for in ``root``,
  ``root/ILSVRC2012_devkit_t12/data`` and ``root/devkit/data``.

Labels index the sorted wnids; class names are the first name of each synset ("tench"), taken from
the layout's metadata, or from timm's ImageNet-1k synset table for the folder layout (wnids timm
does not know keep their wnid as name). The official validation set is the ``val`` split; the
datamodule uses it as its test split.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from timm.data import ImageNetInfo

from .base import ImageClassificationDataModule
from .dataset import BadImageRegistry, OnDiskDataset, Sample
from .files import (
    IMAGE_EXTENSIONS,
    DataError,
    check_files_exist,
    list_images_in_subdirs,
    load_mat,
    read_lines,
    read_rows,
    string,
    struct_fields,
)

__all__ = ["ImageNet", "ImageNetDataModule"]

_LOC_DIR = Path("ILSVRC", "Data", "CLS-LOC")
_DEVKIT_DIRS = (Path("."), Path("ILSVRC2012_devkit_t12", "data"), Path("devkit", "data"))
_GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"


def _first_name(words: str) -> str:
    return words.split(",")[0].strip()


def _subdirs(directory: Path) -> list[str]:
    if not directory.is_dir():
        raise FileNotFoundError(f"ImageNet folder not found: {directory}")
    with os.scandir(directory) as entries:
        return sorted(e.name for e in entries if e.is_dir())


def _scan_class_folders(directory: Path, index: dict[str, int]) -> list[Sample]:
    """Samples of ``directory/<wnid>/*``: one scandir per class folder, no per-file stat."""
    wnids = _subdirs(directory)
    unknown = [w for w in wnids if w not in index]
    if unknown:
        raise DataError(f"{directory}: class folder(s) {unknown[:3]} are not among the {len(index)} known classes")
    samples = []
    for wnid, names in zip(wnids, list_images_in_subdirs(directory, wnids), strict=True):
        prefix, label = os.path.join(directory, wnid, ""), index[wnid]  # concatenation: 1.28M joins are slow
        samples.extend(Sample(prefix + name, label) for name in names)
    return samples


# -- folder ---------------------------------------------------------------------------------------


def _folder_classes(root: Path) -> tuple[list[str], list[str]]:
    source = root / "train" if (root / "train").is_dir() else root / "val"
    wnids = _subdirs(source)
    if not wnids:
        raise FileNotFoundError(f"{source}: no class folders (expected {source}/<wnid>/)")
    known = ImageNetInfo().label_descriptions(as_dict=True)
    return wnids, [_first_name(known[w]) if w in known else w for w in wnids]


def _folder_samples(root: Path, split: str, index: dict[str, int]) -> list[Sample]:
    return _scan_class_folders(root / split, index)


# -- Kaggle LOC -----------------------------------------------------------------------------------


def _loc_classes(root: Path) -> tuple[list[str], list[str]]:
    rows = sorted(read_rows(root / "LOC_synset_mapping.txt", (str, str)))
    return [wnid for wnid, _ in rows], [_first_name(words) for _, words in rows]


def _loc_samples(root: Path, split: str, index: dict[str, int]) -> list[Sample]:
    if split == "train":
        return _scan_class_folders(root / _LOC_DIR / "train", index)
    solution = root / "LOC_val_solution.csv"
    image_dir = root / _LOC_DIR / "val"
    samples = []
    for image_id, prediction in sorted(read_rows(solution, (str, str), delimiter=",", header=True)):
        wnid = prediction.split()[0] if prediction.split() else ""
        if wnid not in index:
            raise DataError(f"{solution}: {image_id} has label {wnid!r}, not a wnid of LOC_synset_mapping.txt")
        samples.append(Sample(os.path.join(image_dir, image_id + ".JPEG"), index[wnid]))
    check_files_exist((s.path for s in samples), solution)
    return samples


# -- devkit ---------------------------------------------------------------------------------------


def _devkit_file(root: Path, name: str) -> Path:
    candidates = [root / d / name for d in _DEVKIT_DIRS]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"ImageNet devkit file not found: looked for {', '.join(map(str, candidates))}")


def _devkit_synsets(root: Path) -> tuple[Path, dict[int, tuple[str, str]]]:
    """ILSVRC2012 id -> (wnid, first name) of the 1000 leaf synsets in the devkit's meta.mat."""
    meta = _devkit_file(root, "meta.mat")
    fields = struct_fields(
        load_mat(meta), meta, "synsets", {"ILSVRC2012_ID": int, "WNID": string, "words": string, "num_children": int}
    )
    leaves = {
        ilsvrc_id: (wnid, _first_name(words))
        for ilsvrc_id, wnid, words, children in zip(*fields.values(), strict=True)
        if children == 0
    }
    return meta, leaves


def _devkit_classes(root: Path) -> tuple[list[str], list[str]]:
    _, leaves = _devkit_synsets(root)
    pairs = sorted(leaves.values())
    return [wnid for wnid, _ in pairs], [name for _, name in pairs]


def _devkit_samples(root: Path, split: str, index: dict[str, int]) -> list[Sample]:
    if split == "train":
        return _scan_class_folders(root / "train", index)
    meta, leaves = _devkit_synsets(root)
    ground_truth = _devkit_file(root, _GROUND_TRUTH)
    samples = []
    for number, line in enumerate(read_lines(ground_truth), start=1):
        if not line.isdigit() or int(line) not in leaves:
            raise DataError(f"{ground_truth}: line {number} is {line!r}, expected a class id of {meta} (1..1000)")
        path = os.path.join(root, "val", f"ILSVRC2012_val_{number:08d}.JPEG")
        samples.append(Sample(path, index[leaves[int(line)][0]]))
    check_files_exist((s.path for s in samples), ground_truth)
    return samples


class _Layout(NamedTuple):
    name: str
    classes: Callable[[Path], tuple[list[str], list[str]]]
    samples: Callable[[Path, str, dict[str, int]], list[Sample]]


_FOLDER = _Layout("folder", _folder_classes, _folder_samples)
_LOC = _Layout("loc", _loc_classes, _loc_samples)
_DEVKIT = _Layout("devkit", _devkit_classes, _devkit_samples)


def _holds_images(directory: Path) -> bool:
    """Whether ``directory`` has image files directly in it (stops at the first one)."""
    with os.scandir(directory) as entries:
        return any(os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS for e in entries)


class ImageNet(OnDiskDataset):
    """ImageNet-1k in any of its three common layouts (see the module docstring).

    ``split`` is ``train`` or ``val``; ``wnids[label]`` is the WordNet id of a label.
    """

    splits = ("train", "val")

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        transform: Any = None,
        bad_images: BadImageRegistry | None = None,
    ) -> None:
        self.check_split(split)
        self.layout = self.detect_layout(root)
        self.wnids, classes = self.layout.classes(Path(root))
        index = {wnid: label for label, wnid in enumerate(self.wnids)}
        samples = self.layout.samples(Path(root), split, index)
        if not samples:
            raise FileNotFoundError(f"no {split} images found in {root} ({self.layout.name} layout)")
        super().__init__(samples, classes, transform, bad_images)

    @staticmethod
    def detect_layout(root: str | os.PathLike[str]) -> _Layout:
        root = Path(root)
        if (root / _LOC_DIR).is_dir():
            return _LOC
        if (root / "val").is_dir() and _holds_images(root / "val"):
            return _DEVKIT
        if (root / "train").is_dir() or (root / "val").is_dir():
            return _FOLDER
        raise FileNotFoundError(
            f"no ImageNet layout found in {root}: looked for {_LOC_DIR}/ (loc layout), "
            f"train/<wnid>/ and val/<wnid>/ (folder layout), val/*.JPEG with {_GROUND_TRUTH} "
            "and meta.mat (devkit layout)"
        )

    @classmethod
    def read_class_names(cls, root: str | os.PathLike[str]) -> list[str]:
        return cls.detect_layout(root).classes(Path(root))[1]


class ImageNetDataModule(ImageClassificationDataModule):
    """ImageNet-1k: train split for training, the official validation set as test split.

    Arguments: see :class:`ImageClassificationDataModule`.
    """

    dataset_class = ImageNet

