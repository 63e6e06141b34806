"""Reading annotation files and listing image folders, with one-line errors that name the file.

Nothing here writes to the dataset folder.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataError",
    "check_files_exist",
    "check_label",
    "list_images",
    "list_images_in_subdirs",
    "load_mat",
    "read_lines",
    "read_rows",
    "require_file",
    "string",
    "struct_fields",
]

class DataError(ValueError):
    """Bad dataset input (a malformed annotation, an unknown label, a bad split or fold setting):
    the message is one line naming the file, key or value, and what was expected."""


IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})


def require_file(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    return path


def read_lines(path: Path) -> list[str]:
    """The non-blank lines of a text file, stripped."""
    require_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start})") from None


def read_rows(
    path: Path,
    types: Sequence[Callable[[str], Any]],
    *,
    delimiter: str | None = None,
    header: bool = False,
) -> list[tuple[Any, ...]]:
    """Rows of a whitespace-separated (``delimiter=None``) or CSV file, each value converted by ``types``.

    With whitespace separation the last column takes the rest of the line (names may hold spaces).
    """
    lines = read_lines(path)
    if delimiter is None:
        rows: Iterable[list[str]] = (line.split(None, len(types) - 1) for line in lines)
    else:
        rows = csv.reader(lines, delimiter=delimiter)
    result = []
    for lineno, row in enumerate(rows, start=1):
        if header and lineno == 1:
            continue
        cells = [cell.strip() for cell in row]
        try:
            if len(cells) != len(types):
                raise ValueError(f"{len(cells)} columns")
            result.append(tuple(convert(cell) for convert, cell in zip(types, cells, strict=True)))
        except ValueError as err:
            expected = ", ".join(getattr(t, "__name__", str(t)) for t in types)
            raise DataError(
                f"{path}: row {lineno} {row!r} does not match the expected columns ({expected}): {err}"
            ) from None
    return result


def check_label(label: int, num_classes: int, path: Path, entry: object) -> int:
    """``label`` (1-based in the annotation file) as a 0-based class index, or a clear error."""
    if not 1 <= label <= num_classes:
        raise DataError(f"{path}: {entry} has class {label}, expected 1..{num_classes} (1-based)")
    return label - 1


def load_mat(path: Path) -> dict[str, Any]:
    """A MATLAB v4-v7.2 file as a dict; struct arrays come back as numpy record arrays."""
    require_file(path)
    try:
        return scipy.io.loadmat(os.fspath(path), squeeze_me=True)
    except Exception as err:  # scipy raises anything from MatReadError to IndexError on a damaged file
        raise DataError(f"{path}: not a readable MATLAB .mat file ({err})") from None


def string(value: Any) -> str:
    """Converter for text fields of .mat structs: a non-empty string, nothing else."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value


def _scalar(value: Any) -> Any:
    if isinstance(value, np.generic) or (isinstance(value, np.ndarray) and value.size == 1):
        return value.item()
    return value


def struct_fields(
    mat: dict[str, Any], path: Path, key: str, fields: dict[str, Callable[[Any], Any]]
) -> dict[str, list[Any]]:
    """The fields of struct array ``key`` in a loaded .mat file, each converted by its callable:
    one list per field, one entry per struct."""
    if key not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(f"{path}: no variable {key!r} (found {found})")
    array = np.atleast_1d(mat[key])
    names = array.dtype.names or ()
    missing = [f for f in fields if f not in names]
    if missing:
        raise DataError(f"{path}: struct {key!r} lacks field(s) {missing} (has {list(names)})")
    result: dict[str, list[Any]] = {}
    for field, convert in fields.items():
        values = result[field] = []
        for i, raw in enumerate(array[field]):
            value = _scalar(raw)
            try:
                values.append(convert(value))
            except (TypeError, ValueError):
                raise DataError(
                    f"{path}: {key}[{i}].{field} = {value!r} is not a valid {convert.__name__}"
                ) from None
    return result


def list_images(directory: Path) -> list[str]:
    """Sorted names of the image files directly in ``directory`` (one ``os.scandir``, no stat)."""
    with os.scandir(directory) as entries:
        return sorted(
            e.name
            for e in entries
            if os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS and e.is_file()
        )


def list_images_in_subdirs(directory: Path, subdirs: Sequence[str]) -> list[list[str]]:
    """:func:`list_images` of each subfolder, listed in parallel (scandir releases the GIL,
    which pays off on network file systems with thousands of folders)."""
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(subdirs)))) as pool:
        return list(pool.map(lambda name: list_images(directory / name), subdirs))


def check_files_exist(paths: Iterable[str], listed_in: Path) -> None:
    """Raise if any of ``paths`` is missing; each parent folder is listed once instead of one stat per file."""
    listings: dict[str, set[str]] = {}
    missing = []
    for path in paths:
        parent, name = os.path.split(path)
        if parent not in listings:
            try:
                with os.scandir(parent) as entries:
                    listings[parent] = {e.name for e in entries}
            except (FileNotFoundError, NotADirectoryError):
                listings[parent] = set()
        if name not in listings[parent]:
            missing.append(path)
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise FileNotFoundError(
            f"{len(missing)} image(s) listed in {listed_in} do not exist: {', '.join(missing[:3])}{more}"
        )
