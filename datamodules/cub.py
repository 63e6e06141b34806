"""CUB-200-2011 (Wah et al., 2011): 200 bird species, 5,994 train / 5,794 test images."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, ClassVar

from .base import ImageClassificationDataModule
from .dataset import BadImageRegistry, OnDiskDataset, Sample
from .download import download_and_extract
from .files import DataError, check_files_exist, check_label, read_rows
from .folder import image_folder_samples

__all__ = ["CUB200", "CUB200DataModule"]

_CLASS_PREFIX = re.compile(r"^\d+\.")


class CUB200(OnDiskDataset):
    """CUB-200-2011 in its official layout, or split into class folders as some mirrors ship it.

    Official: ``root`` is the ``CUB_200_2011`` folder, its parent, or the parent of a doubly nested
    ``CUB_200_2011/CUB_200_2011`` (as some zip mirrors extract). It holds ``images.txt`` (id, path),
    ``image_class_labels.txt`` (id, 1-based class), ``train_test_split.txt`` (id, 1 = train,
    0 = test), ``classes.txt`` (id, ``NNN.Name``), ``bounding_boxes.txt`` (id, x, y, w, h; read
    only with ``crop_to_bbox``) and ``images/NNN.Name/*.jpg``.

    Class folders (mirrors that pre-split the images; looked for in the same places when no
    ``images.txt`` is found): ``train/NNN.Name/*.jpg`` and ``test/NNN.Name/*.jpg``; labels follow the
    sorted folder names, and there are no boxes. In both, class names drop the numeric prefix and keep
    the underscores: ``001.Black_footed_Albatross`` -> ``Black_footed_Albatross``.
    """

    base_folder = "CUB_200_2011"
    splits = ("train", "test")

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
        classes = self.read_class_names(root)
        if self.layout == "official":
            samples = self._official_samples(folder, split, classes, crop_to_bbox)
        else:
            if crop_to_bbox:
                raise DataError(
                    f"crop_to_bbox=True: {folder} holds CUB in class folders (train/, test/), which have no "
                    "bounding_boxes.txt; set crop_to_bbox false or use the official CUB_200_2011 archive"
                )
            folders = [f.name for f in sorted((folder / "train").iterdir()) if f.is_dir()]
            samples, _ = image_folder_samples(folder / split, folders)
        super().__init__(samples, classes, transform, bad_images)

    @staticmethod
    def _official_samples(folder: Path, split: str, classes: list[str], crop_to_bbox: bool) -> list[Sample]:
        wanted_flag = 1 if split == "train" else 0
        images = read_rows(folder / "images.txt", (int, str))
        if not images:
            raise DataError(f"{folder / 'images.txt'}: lists no images; expected one 'id path' line per image")
        labels_file = folder / "image_class_labels.txt"
        labels = dict(read_rows(labels_file, (int, int)))
        split_file = folder / "train_test_split.txt"
        flags = dict(read_rows(split_file, (int, int)))
        boxes = CUB200._read_boxes(folder / "bounding_boxes.txt") if crop_to_bbox else {}
        image_dir = folder / "images"
        samples = []
        for image_id, relative_path in images:
            flag = flags.get(image_id)
            if flag not in (0, 1):
                raise DataError(f"{split_file}: image id {image_id} has flag {flag!r}, expected 1 (train) or 0 (test)")
            if flag != wanted_flag:
                continue
            if image_id not in labels:
                raise DataError(f"{labels_file}: no class for image id {image_id}")
            label = check_label(labels[image_id], len(classes), labels_file, f"image id {image_id}")
            box = None
            if crop_to_bbox:
                if image_id not in boxes:
                    raise DataError(f"{folder / 'bounding_boxes.txt'}: no box for image id {image_id}")
                box = boxes[image_id]
            samples.append(Sample(os.path.join(image_dir, relative_path), label, box))
        check_files_exist((s.path for s in samples), folder / "images.txt")
        return samples

    @classmethod
    def find_layout(cls, root: str | os.PathLike[str]) -> tuple[Path, str]:
        """The dataset folder and its layout: ``official`` or ``folders`` (see the class docstring)."""
        candidates = [Path(root), Path(root) / cls.base_folder, Path(root) / cls.base_folder / cls.base_folder]
        for candidate in candidates:
            if (candidate / "images.txt").is_file():
                return candidate, "official"
        for candidate in candidates:
            if (candidate / "train").is_dir() and (candidate / "test").is_dir():
                return candidate, "folders"
        looked = " and ".join(str(c / "images.txt") for c in candidates)
        raise FileNotFoundError(
            f"CUB-200-2011 not found: looked for {looked}, and for train/ and test/ class folders beside them "
            "(set download=True to fetch it)"
        )

    @classmethod
    def find_folder(cls, root: str | os.PathLike[str]) -> Path:
        return cls.find_layout(root)[0]

    @classmethod
    def read_class_names(cls, root: str | os.PathLike[str]) -> list[str]:
        folder, layout = cls.find_layout(root)
        if layout == "folders":
            return [_CLASS_PREFIX.sub("", f.name) for f in sorted((folder / "train").iterdir()) if f.is_dir()]
        path = folder / "classes.txt"
        rows = read_rows(path, (int, str))
        ids = [class_id for class_id, _ in rows]
        if ids != list(range(1, len(rows) + 1)):
            raise DataError(f"{path}: class ids must run 1..{len(rows)} in order, got {ids[:5]}...")
        return [_CLASS_PREFIX.sub("", name) for _, name in rows]

    @staticmethod
    def _read_boxes(path: Path) -> dict[int, tuple[float, float, float, float]]:
        boxes = {}
        for image_id, x, y, w, h in read_rows(path, (int, float, float, float, float)):
            if w <= 0 or h <= 0:
                raise DataError(f"{path}: image id {image_id} has box size {w} x {h}, expected positive")
            boxes[image_id] = (x, y, x + w, y + h)
        return boxes


class CUB200DataModule(ImageClassificationDataModule):
    """CUB-200-2011 with the official train/test split (see :class:`CUB200` for the layout).

    ``crop_to_bbox`` crops every image to its annotated box before the transforms. ``download``
    makes :meth:`prepare_data` fetch and verify ``CUB_200_2011.tgz`` into ``root`` when the dataset
    is not there yet; nothing is downloaded otherwise. All other arguments: see
    :class:`ImageClassificationDataModule`.
    """

    dataset_class = CUB200
    url: ClassVar[str] = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
    md5: ClassVar[str] = "97eceeb196236b17998738112f37df78"

    def __init__(self, root: str, *, crop_to_bbox: bool = False, download: bool = False, **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self.crop_to_bbox = crop_to_bbox
        self.download = download

    def dataset_kwargs(self) -> dict[str, Any]:
        return {"crop_to_bbox": self.crop_to_bbox}

    @classmethod
    def root_can_be_missing(cls, root: str | None, init_args: dict[str, Any]) -> bool:
        return bool(init_args.get("download"))

    def prepare_data(self) -> None:
        if not self.download:
            return
        try:
            CUB200.find_folder(self.root)
        except FileNotFoundError:
            download_and_extract(self.url, self.md5, self.root, CUB200.base_folder)
