"""The dataset all formats share: a list of (image path, label, optional box) samples.

Per-format classes (``CUB200``, ``StanfordCars``, ``ImageNet``) only parse their on-disk layout into
:class:`Sample` lists, kept as a compact :class:`SampleArray`; decoding, the bounding-box crop, the transform and the handling of unreadable
files live here.
"""

from __future__ import annotations

import copy
import ctypes
import logging
import math
import multiprocessing
import os
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple, overload

import numpy as np
from torch.utils.data import Dataset

from .transforms import decode_rgb

__all__ = [
    "BadImageRegistry",
    "ImageListDataset",
    "OnDiskDataset",
    "Sample",
    "SampleArray",
    "TooManyBadImagesError",
    "stratified_folds",
    "stratified_split",
]

logger = logging.getLogger(__name__)


class Sample(NamedTuple):
    path: str
    label: int
    #: (x1, y1, x2, y2) in 0-based pixel coordinates, end exclusive; set only when cropping to it.
    box: tuple[float, float, float, float] | None = None


class SampleArray(Sequence[Sample]):
    """An immutable sequence of :class:`Sample` held in a few numpy arrays instead of Python objects.

    A list of 1.28M ``Sample`` tuples (ImageNet) is about 215 MB of Python objects, and every
    DataLoader worker that reads it touches their reference counts, so the copy-on-write pages
    inherited from the main process end up copied into each worker. Here the samples are the
    distinct folders (a short list of strings), per sample a folder index and a label (int32) and
    where its file name starts and how long it is (int64, int32) in one UTF-8 byte buffer, and the
    boxes as an (N, 4) float64 array (only when some sample has one; NaN rows for none). Reading a
    sample touches no shared Python object, so workers keep sharing those pages; a subset shares the
    name buffer. ``benchmarks/data_pipeline.py`` reports both layouts' worker memory.
    """

    def __init__(self, samples: Iterable[Sample]) -> None:
        folders: dict[str, int] = {}
        folder_index, labels, names, boxes = [], [], [], []
        for sample in samples:
            folder, name = os.path.split(sample.path)
            folder_index.append(folders.setdefault(folder, len(folders)))
            labels.append(sample.label)
            names.append(os.fsencode(name))
            boxes.append(sample.box)
        self.folders = list(folders)
        self.folder_index = np.asarray(folder_index, dtype=np.int32)
        self.labels = np.asarray(labels, dtype=np.int32)
        self.name_lengths = np.asarray([len(n) for n in names], dtype=np.int32)
        self.name_starts = np.zeros(len(names), dtype=np.int64)
        np.cumsum(self.name_lengths[:-1], out=self.name_starts[1:])
        self.name_bytes = np.frombuffer(b"".join(names), dtype=np.uint8)
        self.boxes: np.ndarray | None = None
        if any(box is not None for box in boxes):
            self.boxes = np.array([(np.nan,) * 4 if box is None else box for box in boxes], dtype=np.float64)

    def __len__(self) -> int:
        return len(self.labels)

    @overload
    def __getitem__(self, index: int) -> Sample: ...
    @overload
    def __getitem__(self, index: slice) -> SampleArray: ...
    def __getitem__(self, index: int | slice) -> Sample | SampleArray:
        if isinstance(index, slice):
            return self.take(range(len(self))[index])
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample index {index} out of range for {len(self)} samples")
        index = int(index) % len(self)
        start = int(self.name_starts[index])
        name = os.fsdecode(self.name_bytes[start : start + int(self.name_lengths[index])].tobytes())
        box = None
        if self.boxes is not None and not np.isnan(self.boxes[index, 0]):
            box = tuple(float(v) for v in self.boxes[index])
        return Sample(os.path.join(self.folders[self.folder_index[index]], name), int(self.labels[index]), box)

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(len(self)))

    def take(self, indices: Sequence[int]) -> SampleArray:
        """The samples at ``indices`` (in that order), sharing this array's folders and name buffer."""
        indices = np.asarray(indices, dtype=np.int64)
        taken = copy.copy(self)
        taken.folder_index = self.folder_index[indices]
        taken.labels = self.labels[indices]
        taken.name_starts = self.name_starts[indices]
        taken.name_lengths = self.name_lengths[indices]
        taken.boxes = None if self.boxes is None else self.boxes[indices]
        return taken

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (the folder strings not counted)."""
        arrays = [self.folder_index, self.labels, self.name_starts, self.name_lengths, self.name_bytes]
        return sum(a.nbytes for a in arrays) + (0 if self.boxes is None else self.boxes.nbytes)


class TooManyBadImagesError(RuntimeError):
    """More unreadable image files than ``max_bad_images`` were met."""


class BadImageRegistry:
    """The distinct unreadable files met so far, shared by every process that reads the datasets.

    DataLoader workers are separate processes, so a plain counter would let each worker tolerate
    ``limit`` bad files on its own. The count and the paths live in shared memory created in the
    main process (inherited by forked workers, passed along when workers are spawned), which makes
    ``limit`` a bound for the whole run: all splits, all workers, all epochs (per training process:
    DDP ranks each keep their own count). A file counts once however often it is met.
    """

    _SLOT = 4096  # bytes kept per path (PATH_MAX on Linux)

    def __init__(self, limit: int = 10) -> None:
        if limit < 0:
            raise ValueError(f"max_bad_images={limit}: expected a non-negative integer")
        self.limit = limit
        # A lock made by the spawn context can be inherited by forked workers and pickled for spawned
        # or forkserver ones; one made by the fork context only the former.
        context = multiprocessing.get_context("spawn")
        self._count = context.Value(ctypes.c_int, 0)
        # room for limit + 1 paths: enough to list every file in the final error
        self._paths = context.RawArray(ctypes.c_char, (limit + 1) * self._SLOT)

    def _recorded(self) -> list[bytes]:
        stored = min(self._count.value, self.limit + 1)
        return [self._paths[i * self._SLOT : (i + 1) * self._SLOT].rstrip(b"\0") for i in range(stored)]

    @property
    def paths(self) -> list[str]:
        with self._count.get_lock():
            return [os.fsdecode(p) for p in self._recorded()]

    def add(self, path: str) -> None:
        """Count ``path`` (once); raise :class:`TooManyBadImagesError` past the limit."""
        encoded = os.fsencode(path)[: self._SLOT - 1]
        with self._count.get_lock():
            recorded = self._recorded()
            if encoded in recorded:
                return
            count = self._count.value
            if count <= self.limit:
                self._paths[count * self._SLOT : count * self._SLOT + len(encoded)] = encoded
                recorded.append(encoded)
            self._count.value = count = count + 1
        if count > self.limit:
            listed = ", ".join(os.fsdecode(p) for p in recorded)
            raise TooManyBadImagesError(
                f"{count} unreadable image files, more than max_bad_images={self.limit}: {listed}"
            )


def crop_to_box(image: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    height, width = image.shape[:2]
    x1 = min(max(math.floor(box[0]), 0), width - 1)
    y1 = min(max(math.floor(box[1]), 0), height - 1)
    x2 = max(min(math.ceil(box[2]), width), x1 + 1)
    y2 = max(min(math.ceil(box[3]), height), y1 + 1)
    return image[y1:y2, x1:x2]


class ImageListDataset(Dataset):
    """Images given as a list of samples; an item is ``(transform(rgb_uint8_hwc), label)``.

    Without a transform the item is the RGB ``uint8`` array itself. A file that cannot be decoded
    during an epoch is logged (warning with its path) and replaced by the next readable image of the
    same class; ``bad_images`` bounds how many distinct such files are tolerated.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        classes: Sequence[str],
        transform: Callable[[np.ndarray], Any] | None = None,
        bad_images: BadImageRegistry | None = None,
    ) -> None:
        self.samples = samples if isinstance(samples, SampleArray) else SampleArray(samples)
        self.classes = list(classes)
        self.transform = transform
        self.bad_images = bad_images if bad_images is not None else BadImageRegistry()
        self._known_bad: set[int] = set()  # per process: indices that failed here already
        self._by_class: dict[int, list[int]] | None = None

    @property
    def targets(self) -> list[int]:
        return self.samples.labels.tolist()

    def __len__(self) -> int:
        return len(self.samples)

    def encoded_image(self, index: int) -> bytes:
        """The encoded image file of sample ``index``, as stored (what shards are written from)."""
        with open(self.samples[index].path, "rb") as f:
            return f.read()

    def load_image(self, index: int) -> np.ndarray:
        """The decoded RGB image of sample ``index``, cropped to its box when it has one."""
        sample = self.samples[index]
        image = decode_rgb(self.encoded_image(index), sample.path)
        return image if sample.box is None else crop_to_box(image, sample.box)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        current = index
        while True:
            if current not in self._known_bad:
                try:
                    image = self.load_image(current)
                    break
                except OSError as err:  # missing since setup, truncated, corrupt
                    self._known_bad.add(current)
                    logger.warning("skipping unreadable image %s (%s)", self.samples[current].path, err)
                    self.bad_images.add(self.samples[current].path)
            current = self._next_of_same_class(index, current)
        label = self.samples[current].label
        return (image if self.transform is None else self.transform(image)), label

    def _next_of_same_class(self, requested: int, current: int) -> int:
        if self._by_class is None:
            self._by_class = {}
            for i, label in enumerate(self.samples.labels.tolist()):
                self._by_class.setdefault(label, []).append(i)
        members = self._by_class[self.samples[requested].label]
        start = bisect_right(members, current)
        for k in range(len(members)):
            candidate = members[(start + k) % len(members)]
            if candidate not in self._known_bad:
                return candidate
        label = self.samples[requested].label
        raise TooManyBadImagesError(
            f"every image of class {label} ({self.classes[label]}) is unreadable, e.g. {self.samples[requested].path}"
        )

    def subset(
        self, indices: Sequence[int], transform: Callable[[np.ndarray], Any] | None = None
    ) -> ImageListDataset:
        """The samples at ``indices`` with another transform, sharing this dataset's bad-image budget
        (and whatever else the dataset reads images from: the copy has the same type)."""
        subset = self.with_transform(transform)
        subset.samples = self.samples.take(indices)
        return subset

    def with_transform(self, transform: Callable[[np.ndarray], Any] | None) -> ImageListDataset:
        """A shallow copy of this dataset with another transform (same samples, same bad-image budget)."""
        dataset = copy.copy(self)
        dataset.transform = transform
        dataset._known_bad = set()
        dataset._by_class = None
        return dataset

    def reseed(self, seed: int) -> None:
        """Reseed the transform's random generators when it has any (used per DataLoader worker)."""
        set_random_seed = getattr(self.transform, "set_random_seed", None)
        if set_random_seed is not None:
            set_random_seed(seed)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, {len(self.classes)} classes)"


def stratified_split(labels: Sequence[int], fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Split indices into (train, val) with ``fraction`` of each class in val, deterministically.

    Every class with at least two samples keeps at least one on each side; a class with a single
    sample stays in train.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"val_split={fraction}: expected a fraction in (0, 1)")
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    order = np.argsort(labels_arr, kind="stable")
    _, starts = np.unique(labels_arr[order], return_index=True)
    val: list[np.ndarray] = []
    for begin, end in zip(starts, [*starts[1:], len(order)], strict=True):
        members = rng.permutation(order[begin:end])
        n_val = min(max(round(len(members) * fraction), 1), len(members) - 1)
        val.append(members[:n_val])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    train_mask = np.ones(len(labels_arr), dtype=bool)
    train_mask[val_idx] = False
    return np.flatnonzero(train_mask).tolist(), val_idx.tolist()


def stratified_folds(labels: Sequence[int], num_folds: int, fold: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Split indices into (train, val) for fold ``fold`` of a stratified ``num_folds``-fold partition.

    Each class is shuffled (seeded) and dealt round-robin to the folds, starting where the previous
    class stopped, so fold sizes differ by at most one and every fold holds about ``1/num_folds`` of
    every class. The ``num_folds`` val parts are disjoint and together cover every index once.
    """
    if num_folds < 2:
        raise ValueError(f"num_folds={num_folds}: expected at least 2")
    if not 0 <= fold < num_folds:
        raise ValueError(f"fold={fold}: expected 0..{num_folds - 1} (num_folds={num_folds})")
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    order = np.argsort(labels_arr, kind="stable")
    _, starts = np.unique(labels_arr[order], return_index=True)
    assignment = np.empty(len(labels_arr), dtype=np.int64)
    dealt = 0
    for begin, end in zip(starts, [*starts[1:], len(order)], strict=True):
        members = rng.permutation(order[begin:end])
        assignment[members] = (dealt + np.arange(len(members))) % num_folds
        dealt += len(members)
    in_fold = assignment == fold
    return np.flatnonzero(~in_fold).tolist(), np.flatnonzero(in_fold).tolist()


class OnDiskDataset(ImageListDataset):
    """A dataset read from its published on-disk layout (one subclass per dataset)."""

    #: split names accepted by the constructor; the first is the training split
    splits: tuple[str, ...] = ("train", "test")

    @classmethod
    def read_class_names(cls, root: str | os.PathLike[str]) -> list[str]:
        """Class names in label order, read from the metadata only (no image listing)."""
        raise NotImplementedError

    @classmethod
    def check_split(cls, split: str) -> str:
        if split not in cls.splits:
            raise ValueError(f"split={split!r}: expected one of {list(cls.splits)}")
        return split
