"""CUB-200-2011 (Wah et al., 2011): 200 bird species, 5,994 train / 5,794 test images."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, ClassVar

from .base import ImageClassificationDataModule
from .dataset import BadImageRegistry, OnDiskDataset, Sample
from .download import download_and_extract
from .files import check_files_exist, check_label, read_rows

__all__ = ["CUB200", "CUB200DataModule"]

_CLASS_PREFIX = re.compile(r"^\d+\.")


class CUB200(OnDiskDataset):
    """CUB-200-2011 in its official layout.

    ``root`` is the ``CUB_200_2011`` folder or its parent. It holds ``images.txt`` (id, path),
    ``image_class_labels.txt`` (id, 1-based class), ``train_test_split.txt`` (id, 1 = train,
    0 = test), ``classes.txt`` (id, ``NNN.Name``), ``bounding_boxes.txt`` (id, x, y, w, h; read
    only with ``crop_to_bbox``) and ``images/NNN.Name/*.jpg``. Class names drop the numeric prefix
    and keep the underscores: ``001.Black_footed_Albatross`` -> ``Black_footed_Albatross``.
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
        wanted_flag = 1 if self.check_split(split) == "train" else 0
        folder = self.find_folder(root)
        classes = self.read_class_names(root)
        images = read_rows(folder / "images.txt", (int, str))
        if not images:
            raise ValueError(f"{folder / 'images.txt'}: lists no images; expected one 'id path' line per image")
        labels_file = folder / "image_class_labels.txt"
        labels = dict(read_rows(labels_file, (int, int)))
        split_file = folder / "train_test_split.txt"
        flags = dict(read_rows(split_file, (int, int)))
        boxes = self._read_boxes(folder / "bounding_boxes.txt") if crop_to_bbox else {}
        image_dir = folder / "images"
        samples = []
        for image_id, relative_path in images:
            flag = flags.get(image_id)
            if flag not in (0, 1):
                raise ValueError(f"{split_file}: image id {image_id} has flag {flag!r}, expected 1 (train) or 0 (test)")
            if flag != wanted_flag:
                continue
            if image_id not in labels:
                raise ValueError(f"{labels_file}: no class for image id {image_id}")
            label = check_label(labels[image_id], len(classes), labels_file, f"image id {image_id}")
            box = None
            if crop_to_bbox:
                if image_id not in boxes:
                    raise ValueError(f"{folder / 'bounding_boxes.txt'}: no box for image id {image_id}")
                box = boxes[image_id]
            samples.append(Sample(os.path.join(image_dir, relative_path), label, box))
        check_files_exist((s.path for s in samples), folder / "images.txt")
        super().__init__(samples, classes, transform, bad_images)

    @classmethod
    def find_folder(cls, root: str | os.PathLike[str]) -> Path:
        candidates = [Path(root), Path(root) / cls.base_folder]
        for candidate in candidates:
            if (candidate / "images.txt").is_file():
                return candidate
        looked = " and ".join(str(c / "images.txt") for c in candidates)
        raise FileNotFoundError(f"CUB-200-2011 not found: looked for {looked} (set download=True to fetch it)")

    @classmethod
    def read_class_names(cls, root: str | os.PathLike[str]) -> list[str]:
        path = cls.find_folder(root) / "classes.txt"
        rows = read_rows(path, (int, str))
        ids = [class_id for class_id, _ in rows]
        if ids != list(range(1, len(rows) + 1)):
            raise ValueError(f"{path}: class ids must run 1..{len(rows)} in order, got {ids[:5]}...")
        return [_CLASS_PREFIX.sub("", name) for _, name in rows]

    @staticmethod
    def _read_boxes(path: Path) -> dict[int, tuple[float, float, float, float]]:
        boxes = {}
        for image_id, x, y, w, h in read_rows(path, (int, float, float, float, float)):
            if w <= 0 or h <= 0:
                raise ValueError(f"{path}: image id {image_id} has box size {w} x {h}, expected positive")
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

    def prepare_data(self) -> None:
        if not self.download:
            return
        try:
            CUB200.find_folder(self.root)
        except FileNotFoundError:
            download_and_extract(self.url, self.md5, self.root, CUB200.base_folder)
