"""Any image classification dataset readable by Hugging Face ``datasets``: a Hub id or a local folder.

``root`` is either a Hub dataset id (``owner/name``, downloaded once into the ``datasets`` cache:
``cache_dir``, else ``HF_DATASETS_CACHE`` / ``HF_HOME``; with ``HF_HUB_OFFLINE=1`` only the cache is
read), a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or a local folder
or file of data files ``datasets`` reads (parquet, arrow, ...; split names from the file names,
e.g. ``data/train-00000-of-00001.parquet``).

``image_column`` must be an ``Image`` feature; images are read as their encoded bytes and decoded
with the same OpenCV decoder as image files (:func:`datamodules.transforms.decode_rgb`), so bad-image
handling and transforms are those of every other datamodule. ``label_column`` is a ``ClassLabel``
(class names from it), integer ids (0-based; names ``"0"``, ``"1"``, ...) or strings (class names,
sorted, from the training split). Splits: ``train``; ``validation`` (or ``valid``, ``val``) and
``test`` when present; ``splits`` renames them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .base import ImageClassificationDataModule
from .dataset import BadImageRegistry, ImageListDataset, Sample
from .files import DataError

__all__ = ["HFDataModule", "HFImageDataset"]

VAL_SPLITS = ("validation", "valid", "val")


class HFImageDataset(ImageListDataset):
    """Samples whose images are rows of a ``datasets.Dataset``; ``Sample.path`` is ``source[split][row]``."""

    def __init__(
        self,
        table: Any,
        image_column: str,
        samples: list[Sample],
        classes: list[str],
        bad_images: BadImageRegistry | None = None,
    ) -> None:
        super().__init__(samples, classes, bad_images=bad_images)
        import datasets

        # encoded bytes only: decoding is ours (one decoder, one error type for every format)
        self.table = table.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
        self.image_column = image_column

    def encoded_image(self, index: int) -> bytes:
        sample = self.samples[index]
        row = int(sample.path.rsplit("[", 1)[1].rstrip("]"))
        cell = self.table[row][self.image_column]
        if cell is None:
            raise OSError(f"{sample.path}: no image in column {self.image_column!r}")
        data = cell.get("bytes")
        if data is None:
            path = cell.get("path")
            if not path:
                raise OSError(f"{sample.path}: the image cell has neither bytes nor a path")
            with open(path, "rb") as f:
                data = f.read()
        return data


class HFDataModule(ImageClassificationDataModule):
    """A Hugging Face ``datasets`` dataset (see the module docstring).

    Args:
        root: Hub dataset id, ``save_to_disk`` folder, or local data files (folder or file).
        name: the dataset configuration (Hub datasets with several), else ``None``.
        revision: Hub branch, tag or commit.
        cache_dir: where ``datasets`` caches downloads and prepared arrow files; default its own
            (``HF_DATASETS_CACHE``, else ``HF_HOME/datasets``).
        image_column, label_column: the columns holding the image and the label.
        splits: split names of the dataset for ``train``, ``val`` and ``test`` (any subset of the three
            keys), when they differ from ``train`` / ``validation`` / ``test``.
        test_fraction: held out as test set when the dataset has neither a validation nor a test split.
        **kwargs: see :class:`ImageClassificationDataModule`.
    """

    def __init__(
        self,
        root: str,
        *,
        name: str | None = None,
        revision: str | None = None,
        cache_dir: str | None = None,
        image_column: str = "image",
        label_column: str = "label",
        splits: dict[str, str] | None = None,
        test_fraction: float = 0.2,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, **kwargs)
        unknown = sorted(set(splits or {}) - {"train", "val", "test"})
        if unknown:
            raise DataError(f"splits={splits}: unknown key {unknown[0]!r}; expected train, val and/or test")
        self.source = root
        self.config_name = name
        self.revision = revision
        self.cache_dir = cache_dir
        self.image_column = image_column
        self.label_column = label_column
        self.split_map = dict(splits or {})
        self.test_fraction = test_fraction
        self._dataset_dict: Any = None

    # -- loading --------------------------------------------------------------------------------

    def _load(self) -> Any:
        """The ``DatasetDict`` (loaded once per process)."""
        if self._dataset_dict is not None:
            return self._dataset_dict
        import datasets

        local = Path(os.path.expanduser(self.source))
        try:
            if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
                loaded = datasets.load_from_disk(str(local))
            else:
                loaded = datasets.load_dataset(
                    str(local) if local.exists() else self.source,
                    self.config_name,
                    revision=self.revision,
                    cache_dir=self.cache_dir,
                )
        except (datasets.exceptions.DatasetNotFoundError, FileNotFoundError, ConnectionError) as err:
            detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            offline = " (offline: HF_HUB_OFFLINE=1 reads only the cache; run once online to fill it)" if datasets.config.HF_HUB_OFFLINE else ""
            raise DataError(
                f"Hugging Face dataset {self.source!r} could not be loaded: {detail}{offline}; "
                "give a Hub dataset id (owner/name) or a local folder of parquet/arrow files as data.root"
            ) from None
        if isinstance(loaded, datasets.Dataset):
            loaded = datasets.DatasetDict({"train": loaded})
        self._dataset_dict = loaded
        return loaded

    def split_names(self) -> tuple[str, str | None, str | None]:
        available = list(self._load())
        train = self.split_map.get("train", "train")
        val = self.split_map.get("val", next((s for s in VAL_SPLITS if s in available), None))
        test = self.split_map.get("test", "test" if "test" in available else None)
        for role, split in (("train", train), ("val", val), ("test", test)):
            if split is not None and split not in available:
                raise DataError(
                    f"Hugging Face dataset {self.source!r} has no split {split!r} (the {role} split); "
                    f"its splits: {', '.join(available)}; set data.splits"
                )
        return train, val, test

    def _columns(self, split: str) -> Any:
        import datasets

        table = self._load()[split]
        for role, column in (("image", self.image_column), ("label", self.label_column)):
            if column not in table.column_names:
                raise DataError(
                    f"Hugging Face dataset {self.source!r} [{split}] has no {role} column {column!r} "
                    f"(columns: {', '.join(table.column_names)}); set data.{role}_column"
                )
        if not isinstance(table.features[self.image_column], datasets.Image):
            raise DataError(
                f"Hugging Face dataset {self.source!r}: column {self.image_column!r} is "
                f"{type(table.features[self.image_column]).__name__}, not an Image feature; set data.image_column"
            )
        return table

    # -- classes and splits ---------------------------------------------------------------------

    def read_class_names(self) -> list[str]:
        import datasets

        train = self.split_names()[0]
        table = self._columns(train)
        feature = table.features[self.label_column]
        if isinstance(feature, datasets.ClassLabel):
            return list(feature.names)
        labels = table[self.label_column]
        if all(isinstance(v, (int, np.integer)) for v in labels):
            return [str(i) for i in range(max(labels) + 1)] if labels else []
        return sorted({str(v) for v in labels})

    def read_split(self, split: str, bad_images: BadImageRegistry) -> ImageListDataset:
        import datasets

        table = self._columns(split)
        classes = self.class_names
        feature = table.features[self.label_column]
        values = table[self.label_column]
        by_name = not isinstance(feature, datasets.ClassLabel) and not all(
            isinstance(v, (int, np.integer)) for v in values
        )
        index = {name: label for label, name in enumerate(classes)}
        labels = []
        for row, value in enumerate(values):
            label = index.get(str(value)) if by_name else value
            if label is None or not (0 <= label < len(classes)):
                raise DataError(
                    f"Hugging Face dataset {self.source!r} [{split}] row {row} has unknown label {value!r} "
                    f"(the {len(classes)} classes come from the training split); fix the label or the split"
                )
            labels.append(int(label))
        samples = [Sample(f"{self.source}[{split}][{row}]", label) for row, label in enumerate(labels)]
        return HFImageDataset(table, self.image_column, samples, classes, bad_images)

    @classmethod
    def root_can_be_missing(cls, root: str | None, init_args: dict[str, Any]) -> bool:
        return True  # a Hub dataset id is no local path

    def prepare_data(self) -> None:
        """Download (Hub ids) and check every split's columns and labels before anything is written."""
        for split in self.split_names():
            if split is not None:
                self._read(split)
