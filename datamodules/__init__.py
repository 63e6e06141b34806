"""LightningDataModules for CUB-200-2011, Stanford Cars and ImageNet-1k as published on disk, and for
any other data: class folders, CSV lists and Hugging Face ``datasets``.

Each datamodule reads its dataset's own layout (``docs/datasets.md``) and yields
``(image CxHxW float tensor, int label)`` items; see :class:`ImageClassificationDataModule` for the
arguments they share.
"""

from .base import ImageClassificationDataModule
from .cars import StanfordCars, StanfordCarsDataModule
from .csv_list import CSVDataModule
from .cub import CUB200, CUB200DataModule
from .dataset import (
    BadImageRegistry,
    ImageListDataset,
    Sample,
    SampleArray,
    TooManyBadImagesError,
    stratified_folds,
    stratified_split,
)
from .files import DataError
from .folder import ImageFolderDataModule
from .hf_datasets import HFDataModule
from .imagenet import ImageNet, ImageNetDataModule
from .shards import ShardDataModule, ShardStream, write_shards
from .transforms import ImageDecodeError, build_eval_transform, build_train_transform, decode_rgb, load_rgb

__all__ = [
    "CUB200",
    "BadImageRegistry",
    "CSVDataModule",
    "CUB200DataModule",
    "DataError",
    "HFDataModule",
    "ImageClassificationDataModule",
    "ImageFolderDataModule",
    "ImageDecodeError",
    "ImageListDataset",
    "ImageNet",
    "ImageNetDataModule",
    "Sample",
    "SampleArray",
    "ShardDataModule",
    "ShardStream",
    "StanfordCars",
    "StanfordCarsDataModule",
    "TooManyBadImagesError",
    "build_eval_transform",
    "build_train_transform",
    "decode_rgb",
    "load_rgb",
    "stratified_folds",
    "stratified_split",
    "write_shards",
]
