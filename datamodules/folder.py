"""Any dataset of images sorted into one folder per class (torchvision's ``ImageFolder`` layout).

Two layouts, detected from ``root``:

- split: ``root/train/<class>/*`` plus ``root/val/<class>/*`` (also ``validation/`` or ``valid/``)
  and/or ``root/test/<class>/*``; classes are the class folders of ``train/``;
- single: ``root/<class>/*`` only; the test split is a stratified ``test_fraction`` of it.

Images are the files directly in each class folder with an image extension (``files.IMAGE_EXTENSIONS``);
labels index the sorted class-folder names.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .base import ImageClassificationDataModule
from .dataset import BadImageRegistry, ImageListDataset, Sample
from .files import IMAGE_EXTENSIONS, DataError, list_images_in_subdirs

__all__ = ["ImageFolderDataModule", "image_folder_samples", "read_image_folder"]

VAL_FOLDERS = ("val", "validation", "valid")


def _class_folders(directory: Path) -> list[str]:
    with os.scandir(directory) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def read_image_folder(directory: Path, classes: list[str] | None, bad_images: BadImageRegistry) -> ImageListDataset:
    """The images of ``directory/<class>/``; ``classes`` (label order) defaults to the folders found."""
    samples, classes = image_folder_samples(directory, classes)
    return ImageListDataset(samples, classes, bad_images=bad_images)


def image_folder_samples(directory: Path, classes: list[str] | None) -> tuple[list[Sample], list[str]]:
    """(samples, classes) of ``directory/<class>/*``; ``classes`` (label order) defaults to the folders found.

    Raises :class:`DataError` for an empty class folder or a class folder not among ``classes``.
    """
    if not directory.is_dir():
        raise FileNotFoundError(f"image folder not found: {directory}")
    folders = _class_folders(directory)
    if not folders:
        raise DataError(
            f"{directory}: no class folders; expected {directory}/<class name>/<image files> "
            f"(or train/ and val/ or test/ holding class folders)"
        )
    if classes is None:
        classes = folders
    index = {name: label for label, name in enumerate(classes)}
    unknown = [f for f in folders if f not in index]
    if unknown:
        raise DataError(
            f"{directory}: class folder {unknown[0]!r} is not a class of the training split "
            f"({len(classes)} classes); rename it to one of them or add it to the training split"
        )
    samples = []
    for folder, names in zip(folders, list_images_in_subdirs(directory, folders), strict=True):
        if not names:
            extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise DataError(
                f"empty class folder {directory / folder}: no image files ({extensions}); add images or remove the folder"
            )
        prefix, label = os.path.join(directory, folder, ""), index[folder]
        samples.extend(Sample(prefix + name, label) for name in names)
    return samples, classes


class ImageFolderDataModule(ImageClassificationDataModule):
    """Images in class folders (see the module docstring for the two layouts).

    Args:
        root: the folder holding ``train/`` (and ``val/`` and/or ``test/``), or the class folders.
        test_fraction: single layout only: the stratified fraction held out as test (and, unless
            ``val_split`` or ``num_folds`` carve another, validation) set, chosen by ``seed``.
        **kwargs: see :class:`ImageClassificationDataModule`.
    """

    def __init__(self, root: str, *, test_fraction: float = 0.2, **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self.test_fraction = test_fraction

    def _layout(self) -> tuple[Path, str | None, str | None]:
        """(training folder, validation folder name or None, test folder name or None)."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        if not (self.root / "train").is_dir():
            return self.root, None, None
        val = next((name for name in VAL_FOLDERS if (self.root / name).is_dir()), None)
        test = "test" if (self.root / "test").is_dir() else None
        if val is None and test is None:
            raise DataError(
                f"{self.root} has train/ but no {'/, '.join(VAL_FOLDERS)}/ or test/ folder; add one, or put the "
                "class folders directly in the root to hold out test_fraction of them"
            )
        return self.root / "train", val, test

    def split_names(self) -> tuple[str, str | None, str | None]:
        _, val, test = self._layout()
        return "train", val, test

    def read_class_names(self) -> list[str]:
        train_dir, _, _ = self._layout()
        return _class_folders(train_dir) if train_dir.is_dir() else []

    def read_split(self, split: str, bad_images: BadImageRegistry) -> ImageListDataset:
        train_dir, _, _ = self._layout()
        classes = None if split == "train" else self.class_names
        return read_image_folder(train_dir if split == "train" else self.root / split, classes, bad_images)

    def prepare_data(self) -> None:
        """Check the layout and every split before anything is trained or written."""
        for split in self.split_names():
            if split is not None:
                self._read(split)
