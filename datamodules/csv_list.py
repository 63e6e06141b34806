"""Any dataset listed in CSV files: one row per image, ``path,label`` (plus optional box columns).

Each CSV has a header row naming its columns; ``path_column`` and ``label_column`` name the two
that matter (extra columns are ignored). Paths are relative to ``root`` (or absolute). Labels are
class names or 0-based class ids:

- with ``classes`` (the class names in label order) a label may be a name of that list or an id
  (an integer label is read as an id);
- without it, labels that are all integers are ids (names ``"0"``, ``"1"``, ...), otherwise they are
  names and the classes are the sorted names of the training CSV; a validation or test row whose
  label is not one of them is an error.

``box_columns`` (x1, y1, x2, y2 in pixels, 0-based, end exclusive) crops every image to its box.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from .base import ImageClassificationDataModule
from .dataset import BadImageRegistry, ImageListDataset, Sample
from .files import DataError, check_files_exist, require_file

__all__ = ["CSVDataModule", "read_csv_rows"]


def read_csv_rows(path: Path, columns: list[str]) -> list[list[str]]:
    """The values of ``columns`` in each data row of the CSV file ``path`` (header row first)."""
    require_file(path)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            header = [name.strip() for name in next(reader, [])]
            missing = [c for c in columns if c not in header]
            if missing:
                raise DataError(
                    f"{path}: no column {missing[0]!r} in the header {header}; name the column in the CSV's first "
                    "row or set data.path_column / data.label_column / data.box_columns"
                )
            where = [header.index(c) for c in columns]
            rows = []
            for lineno, row in enumerate(reader, start=2):
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise DataError(f"{path}: line {lineno} has {len(row)} values, the header {len(header)}")
                rows.append([row[i].strip() for i in where])
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start})") from None
    except csv.Error as err:
        raise DataError(f"{path}: not a readable CSV file ({err})") from None
    if not rows:
        raise DataError(f"{path}: no data rows after the header")
    return rows


def _is_id(label: str) -> bool:
    return label.isdigit()


class CSVDataModule(ImageClassificationDataModule):
    """Images listed in CSV files (see the module docstring for the format).

    Args:
        root: the folder the CSV files and the image paths are relative to.
        train_csv: CSV of the training split.
        val_csv, test_csv: CSVs of the validation / test splits; either or both may be ``None``
            (without both, a stratified ``test_fraction`` of the training rows is the test set).
        path_column, label_column: header names of the image path and label columns.
        box_columns: header names of the x1, y1, x2, y2 box columns; images are cropped to the box.
        classes: class names in label order; default: from the training CSV's labels.
        test_fraction: see ``val_csv``.
        **kwargs: see :class:`ImageClassificationDataModule`.
    """

    def __init__(
        self,
        root: str,
        *,
        train_csv: str = "train.csv",
        val_csv: str | None = None,
        test_csv: str | None = None,
        path_column: str = "path",
        label_column: str = "label",
        box_columns: list[str] | None = None,
        classes: list[str] | None = None,
        test_fraction: float = 0.2,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, **kwargs)
        if box_columns is not None and len(box_columns) != 4:
            raise DataError(f"box_columns={box_columns}: expected four column names (x1, y1, x2, y2)")
        self.csv_files = {"train": train_csv, "val": val_csv, "test": test_csv}
        self.path_column = path_column
        self.label_column = label_column
        self.box_columns = list(box_columns) if box_columns else []
        self.classes = list(classes) if classes is not None else None
        self.test_fraction = test_fraction

    def split_names(self) -> tuple[str, str | None, str | None]:
        return "train", "val" if self.csv_files["val"] else None, "test" if self.csv_files["test"] else None

    def _csv_path(self, split: str) -> Path:
        return self.root / str(self.csv_files[split])

    def read_class_names(self) -> list[str]:
        if self.classes is not None:
            return self.classes
        labels = sorted({row[1] for row in read_csv_rows(self._csv_path("train"), [self.path_column, self.label_column])})
        if all(_is_id(label) for label in labels):
            return [str(i) for i in range(max(int(label) for label in labels) + 1)]
        return labels

    def read_split(self, split: str, bad_images: BadImageRegistry) -> ImageListDataset:
        path = self._csv_path(split)
        rows = read_csv_rows(path, [self.path_column, self.label_column, *self.box_columns])
        classes = self.class_names
        # ids are accepted with a given class list, or when the training labels were all ids
        accepts_ids = self.classes is not None or classes == [str(i) for i in range(len(classes))]
        index = {name: label for label, name in enumerate(classes)}
        samples = []
        for lineno, (image, label, *box_values) in enumerate(rows, start=2):
            if accepts_ids and _is_id(label) and int(label) < len(classes):
                target = int(label)
            elif label in index:
                target = index[label]
            else:
                known = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
                source = "data.classes" if self.classes is not None else self._csv_path("train").name
                raise DataError(
                    f"{path}: line {lineno} has unknown label {label!r}, not a class of {source} ({known}); "
                    f"fix the label, or list every class in data.classes"
                )
            box = None
            if box_values:
                try:
                    x1, y1, x2, y2 = (float(v) for v in box_values)
                except ValueError:
                    raise DataError(f"{path}: line {lineno} has box {box_values}, expected four numbers") from None
                if not (x2 > x1 and y2 > y1):
                    raise DataError(f"{path}: line {lineno} has box {box_values}, expected x1 < x2 and y1 < y2")
                box = (x1, y1, x2, y2)
            samples.append(Sample(os.path.join(self.root, image), target, box))
        check_files_exist((s.path for s in samples), path)
        return ImageListDataset(samples, classes, bad_images=bad_images)

    def prepare_data(self) -> None:
        """Check every CSV (columns, labels, listed files) before anything is trained or written."""
        for split in self.split_names():
            if split is not None:
                self._read(split)
