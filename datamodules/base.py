"""What the three datamodules share: arguments, transforms, splits and dataloaders."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .dataset import BadImageRegistry, ImageListDataset, OnDiskDataset, stratified_folds, stratified_split
from .files import DataError
from .machine import default_num_workers
from .samplers import RepeatedAugmentationSampler, class_balanced_sampler, class_counts
from .transforms import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    build_eval_transform,
    build_train_transform,
)

__all__ = ["ImageClassificationDataModule"]


def _init_worker(worker_id: int) -> None:
    # Forked workers inherit identical augmentation generators: give each its own stream, derived
    # from torch's per-worker seed (so ``seed_everything`` makes runs repeatable). OpenCV's thread
    # count is left alone: cv2.setNumThreads in a forked child can deadlock on the thread pool
    # inherited from the parent.
    info = get_worker_info()
    if info is not None and hasattr(info.dataset, "reseed"):  # ImageListDataset, ShardStream
        info.dataset.reseed(info.seed)


class ImageClassificationDataModule(L.LightningDataModule):
    """Base datamodule: subclasses name their :class:`OnDiskDataset` and its extra arguments, or
    override :meth:`split_names`, :meth:`read_split` and :meth:`read_class_names` (the generic formats).

    Splits: ``train_dataset`` is the official training split, less a stratified ``val_split``
    fraction (seeded by ``seed``) when ``val_split > 0``, or less fold ``fold`` of a stratified
    ``num_folds``-fold partition (seeded by ``seed``) when ``num_folds >= 2``; ``val_dataset`` is that
    held-out part, else the official validation split where the dataset has one, else the official
    test split (what the papers report); ``test_dataset`` is the official test split, else the
    official validation split, else (a dataset with neither) a stratified ``test_fraction`` of the
    training split held out before anything else. ``mean``, ``std``, ``interpolation`` and
    ``crop_pct`` normally come from the model's pretrained config. ``num_workers=None`` (the default)
    takes the cores this process's share of the machine has left, see ``num_workers``. ``auto_augment``
    names a timm augmentation policy (``rand-m9-mstd0.5-inc1``, ``augmix-m5-w4-d2``, ``trivialaugment``,
    ...; ``None`` = colour jitter instead, see ``datamodules.transforms``). ``max_bad_images`` bounds the distinct unreadable image
    files tolerated in the whole run (each is logged and replaced by an image of the same class).

    ``eval_transform`` (RGB ``uint8`` HWC array -> normalized CxHxW tensor) is available right after
    construction for prediction on single images; ``class_names`` / ``num_classes`` too (read from
    the dataset's metadata on first access).

    ``sampler`` orders the training set: ``shuffle``; ``repeated_augmentation`` (DeiT: each image
    ``repeats`` times per epoch, the copies on different processes); ``class_balanced`` (draws with
    replacement, every class equally often). See ``datamodules.samplers``.
    """

    dataset_class: ClassVar[type[OnDiskDataset]]
    #: held out as the test split when a dataset has neither a validation nor a test split
    test_fraction: float = 0.0

    def __init__(
        self,
        root: str,
        img_size: int = 224,
        batch_size: int = 32,
        num_workers: int | None = None,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        val_split: float = 0.0,
        num_folds: int = 0,
        fold: int = 0,
        seed: int = 0,
        mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
        interpolation: str = "bicubic",
        crop_pct: float = 0.875,
        train_crop_scale: tuple[float, float] = (0.08, 1.0),
        hflip: float = 0.5,
        color_jitter: float = 0.4,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        re_prob: float = 0.25,
        max_bad_images: int = 10,
        sampler: Literal["shuffle", "repeated_augmentation", "class_balanced"] = "shuffle",
        repeats: int = 3,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: expected a positive integer")
        if num_workers is not None and num_workers < 0:
            raise ValueError(f"num_workers={num_workers}: expected a non-negative integer")
        if not 0 <= val_split < 1:
            raise ValueError(f"val_split={val_split}: expected a fraction in [0, 1)")
        if repeats < 1:
            raise ValueError(f"repeats={repeats}: expected a positive integer")
        if max_bad_images < 0:
            raise ValueError(f"max_bad_images={max_bad_images}: expected a non-negative integer")
        if num_folds == 1 or num_folds < 0:
            raise DataError(f"num_folds={num_folds}: expected 0 (no cross-validation) or at least 2")
        if num_folds and not 0 <= fold < num_folds:
            raise DataError(f"fold={fold}: out of range for num_folds={num_folds}; expected 0..{num_folds - 1}")
        if num_folds and val_split:
            raise DataError(
                f"val_split={val_split} and num_folds={num_folds}: set only one (the fold is the validation set)"
            )
        self.root = Path(os.path.expanduser(root))
        self.batch_size = batch_size
        self.workers_setting = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.val_split = val_split
        self.num_folds = num_folds
        self.fold = fold
        self.seed = seed
        self.max_bad_images = max_bad_images
        self.train_transform = build_train_transform(
            img_size, mean, std, interpolation, train_crop_scale, hflip, color_jitter, auto_augment, re_prob
        )
        self.eval_transform = build_eval_transform(img_size, mean, std, interpolation, crop_pct)
        self.train_dataset: ImageListDataset | None = None
        self.val_dataset: ImageListDataset | None = None
        self.test_dataset: ImageListDataset | None = None
        self._class_names: list[str] | None = None
        self._bad_images: BadImageRegistry | None = None
        self._read_splits: dict[str, ImageListDataset] = {}  # split name -> dataset without transform

    @classmethod
    def check_root(cls, init_args: dict[str, Any]) -> None:
        """Raise ``FileNotFoundError`` (one line) when ``init_args["root"]`` names nothing this datamodule
        can read or create. The command line calls it before it builds the model, whose pretrained weights
        may take minutes to download; the datasets' own checks follow in ``setup``."""
        root = init_args.get("root")
        if cls.root_can_be_missing(root, init_args):
            return
        if root is None or not Path(os.path.expanduser(str(root))).exists():
            raise FileNotFoundError(f"data.root {root!r}: no such file or folder (expected by {cls.__name__})")

    @classmethod
    def root_can_be_missing(cls, root: str | None, init_args: dict[str, Any]) -> bool:
        """Whether ``prepare_data`` creates ``root``, or ``root`` names something remote: no local path to check."""
        return False

    @property
    def num_workers(self) -> int:
        """DataLoader workers: as given, else chosen for the training processes on this machine
        (``datamodules.machine.default_num_workers``)."""
        if self.workers_setting is not None:
            return self.workers_setting
        return default_num_workers(self.trainer.num_devices if self.trainer is not None else 1)

    # -- what subclasses adapt ---------------------------------------------------------------

    def dataset_kwargs(self) -> dict[str, Any]:
        """Extra constructor arguments of ``dataset_class`` (e.g. ``crop_to_bbox``)."""
        return {}

    @property
    def test_split(self) -> str:
        """Name of the official evaluation split in ``dataset_class.splits``."""
        return self.dataset_class.splits[-1]

    def split_names(self) -> tuple[str, str | None, str | None]:
        """(training, official validation or ``None``, official test or ``None``) split names."""
        return self.dataset_class.splits[0], None, self.test_split

    def read_split(self, split: str, bad_images: BadImageRegistry) -> ImageListDataset:
        """Split ``split`` (one of :meth:`split_names`) without a transform; errors name the bad file."""
        return self.dataset_class(self.root, split, transform=None, bad_images=bad_images, **self.dataset_kwargs())

    def read_class_names(self) -> list[str]:
        """Class names in label order, from the metadata only where the format allows."""
        return self.dataset_class.read_class_names(self.root)

    # -- classes ------------------------------------------------------------------------------

    @property
    def class_names(self) -> list[str]:
        if self._class_names is None:
            self._class_names = self.read_class_names()
        return self._class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # -- datasets -----------------------------------------------------------------------------

    def _read(self, split: str) -> ImageListDataset:
        if self._bad_images is None:
            self._bad_images = BadImageRegistry(self.max_bad_images)
        if split not in self._read_splits:
            dataset = self.read_split(split, self._bad_images)
            self._class_names = dataset.classes
            self._read_splits[split] = dataset
        return self._read_splits[split]

    def _training_parts(self) -> tuple[ImageListDataset, ImageListDataset | None, ImageListDataset | None]:
        """(train, val carved from it or ``None``, test carved from it or ``None``), without transforms."""
        train_name, val_name, test_name = self.split_names()
        train = self._read(train_name)
        test = None
        if val_name is None and test_name is None:
            if not 0 < self.test_fraction < 1:
                raise DataError(
                    f"test_fraction={self.test_fraction}: {self.root} has no validation or test split, "
                    "so a fraction in (0, 1) of the training images must be held out as test set"
                )
            keep, held = stratified_split(train.targets, self.test_fraction, self.seed)
            train, test = train.subset(keep), train.subset(held)
        val = None
        if self.num_folds:
            keep, held = stratified_folds(train.targets, self.num_folds, self.fold, self.seed)
            train, val = train.subset(keep), train.subset(held)
        elif self.val_split > 0:
            keep, held = stratified_split(train.targets, self.val_split, self.seed)
            train, val = train.subset(keep), train.subset(held)
        return train, val, test

    def setup(self, stage: str | None = None) -> None:
        """Parse the annotation files (errors name the bad file) for the datasets ``stage`` needs."""
        need_train = stage in (None, "fit") and self.train_dataset is None
        need_val = stage in (None, "fit", "validate") and self.val_dataset is None
        need_test = stage in (None, "test") and self.test_dataset is None
        _, val_name, test_name = self.split_names()
        carves_val = bool(self.num_folds) or self.val_split > 0
        carves_test = val_name is None and test_name is None
        train = val = test = None
        if need_train or (need_val and carves_val) or ((need_test or need_val) and carves_test):
            train, val, test = self._training_parts()
        if need_train:
            self.train_dataset = train.with_transform(self.train_transform)
        if (need_test or (need_val and val is None and val_name is None)) and self.test_dataset is None:
            official = test if carves_test else self._read(test_name or val_name)
            self.test_dataset = official.with_transform(self.eval_transform)
        if need_val:
            if val is not None:
                self.val_dataset = val.with_transform(self.eval_transform)
            elif val_name is not None:
                self.val_dataset = self._read(val_name).with_transform(self.eval_transform)
            else:
                self.val_dataset = self.test_dataset
        self._read_splits.clear()  # kept from prepare_data to here only: the datasets hold what they need

    def class_counts(self) -> list[int]:
        """Training images per class (for class-weighted losses); needs ``setup("fit")``."""
        if self.train_dataset is None:
            raise RuntimeError("train_dataset is not set: call setup('fit') first")
        return class_counts(self.train_dataset.targets, self.num_classes)

    # -- dataloaders --------------------------------------------------------------------------

    def _train_sampler(self, dataset: ImageListDataset) -> Any:
        setting = self.hparams.sampler
        if setting == "repeated_augmentation":
            replicas, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
            return RepeatedAugmentationSampler(dataset, replicas, rank, self.hparams.repeats, seed=self.seed)
        if setting == "class_balanced":
            return class_balanced_sampler(dataset.targets)
        return None

    def _dataloader(self, dataset: ImageListDataset | None, name: str, stage: str, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{name} is not set: call setup({stage!r}) first")
        workers = self.num_workers
        if train and workers == 0:
            # no worker to reseed: draw the augmentation seed from torch's generator instead
            dataset.reseed(int(torch.empty((), dtype=torch.int64).random_().item()))
        stream = isinstance(dataset, IterableDataset)  # shards order themselves (ShardDataModule)
        sampler = self._train_sampler(dataset) if train and not stream else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train and sampler is None and not stream,
            sampler=sampler,
            # a train set smaller than one batch would otherwise give empty epochs
            drop_last=train and len(dataset) >= self.batch_size,
            num_workers=workers,
            pin_memory=self.pin_memory and torch.accelerator.is_available(),
            persistent_workers=self.persistent_workers and workers > 0,
            worker_init_fn=_init_worker if workers > 0 else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._dataloader(self.train_dataset, "train_dataset", "fit", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._dataloader(self.val_dataset, "val_dataset", "validate", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._dataloader(self.test_dataset, "test_dataset", "test", train=False)
