"""LightningDataModules for CUB-200-2011, Stanford Cars and ImageNet-1k as published on disk.

Each datamodule reads its dataset's own layout (``docs/datasets.md``) and yields
``(image CxHxW float tensor, int label)`` items; see :class:`ImageClassificationDataModule` for the
arguments they share.
"""

from .base import ImageClassificationDataModule
from .cars import StanfordCars, StanfordCarsDataModule
from .cub import CUB200, CUB200DataModule
from .dataset import BadImageRegistry, ImageListDataset, Sample, TooManyBadImagesError, stratified_split
from .imagenet import ImageNet, ImageNetDataModule
from .transforms import ImageDecodeError, build_eval_transform, build_train_transform, load_rgb

__all__ = [
    "CUB200",
    "BadImageRegistry",
    "CUB200DataModule",
    "ImageClassificationDataModule",
    "ImageDecodeError",
    "ImageListDataset",
    "ImageNet",
    "ImageNetDataModule",
    "Sample",
    "StanfordCars",
    "StanfordCarsDataModule",
    "TooManyBadImagesError",
    "build_eval_transform",
    "build_train_transform",
    "load_rgb",
    "stratified_split",
]
