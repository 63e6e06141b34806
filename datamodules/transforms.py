"""Image decoding and the train / eval transforms (albumentations on RGB uint8 HWC arrays).

Decoding uses OpenCV: on CUB-sized JPEGs it decodes about 1.2-1.3x more images per CPU second than
PIL here (``benchmarks/data_pipeline.py``). OpenCV's JPEG decoder accepts grayscale and CMYK files but fills a
truncated baseline JPEG with grey instead of failing, so :func:`load_rgb` checks for the end-of-image
marker itself and raises :class:`ImageDecodeError` for such files.

The transforms follow timm's ImageNet recipe:

- train: random resized crop, horizontal flip, then either an augmentation policy named as timm
  names it (``auto_augment``: ``rand-m9-mstd0.5-inc1`` is DeiT's RandAugment, ``augmix-m5-w4-d2``,
  ``original`` / ``v0`` AutoAugment, and ``trivialaugment`` for torchvision's TrivialAugmentWide),
  run by timm's / torchvision's own PIL code (:class:`PolicyAugment`), or, when ``auto_augment`` is
  ``None``, colour jitter (timm likewise skips colour jitter when a policy is set), then random
  erasing with per-pixel random values, normalize;
- eval: resize the shorter side to ``floor(img_size / crop_pct)``, center crop ``img_size``,
  normalize.

Mixup / CutMix work on batches and belong to the training module.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Sequence
from typing import Any

# albumentations asks PyPI at import whether a newer release exists: a network call outside prepare_data
# and, on an older release, a warning on every run. The user's own setting wins.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data import auto_augment as timm_aa
from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
from timm.data.transforms import str_to_pil_interp
from torchvision.transforms import TrivialAugmentWide

__all__ = [
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "INTERPOLATIONS",
    "ImageDecodeError",
    "ImageTransform",
    "PolicyAugment",
    "augment_policy",
    "build_eval_transform",
    "build_train_transform",
    "decode_rgb",
    "load_rgb",
]

INTERPOLATIONS: dict[str, int] = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}

_JPEG_SOI = b"\xff\xd8"
_JPEG_SOS = b"\xff\xda"
_JPEG_EOI = b"\xff\xd9"


class ImageDecodeError(OSError):
    """An image file exists but cannot be decoded (corrupt, truncated or not an image)."""


def _jpeg_is_complete(data: bytes) -> bool:
    # Inside entropy-coded data 0xFF is always followed by 0x00 or a restart marker, so the last
    # start-of-scan marker belongs to the main image's last scan and a complete file has an
    # end-of-image marker after it (trailing bytes after the marker are tolerated).
    return data.find(_JPEG_EOI, max(data.rfind(_JPEG_SOS), 0)) != -1


def load_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode one image file to an RGB ``uint8`` array of shape ``(H, W, 3)``.

    Grayscale, CMYK and palette images are converted to RGB; EXIF orientation is ignored (as PIL's
    ``Image.open(...).convert("RGB")`` and timm's loaders do, and as bounding-box annotations
    assume). Raises ``FileNotFoundError`` for a missing file and :class:`ImageDecodeError` for a
    file that is not a complete image.
    """
    with open(path, "rb") as f:
        data = f.read()
    return decode_rgb(data, os.fspath(path))


def decode_rgb(data: bytes, name: str) -> np.ndarray:
    """:func:`load_rgb` for an encoded image held in memory; ``name`` says where it came from in errors."""
    if data.startswith(_JPEG_SOI) and not _jpeg_is_complete(data):
        raise ImageDecodeError(f"{name}: truncated JPEG (no end-of-image marker)")
    try:
        image = cv2.imdecode(
            np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
        )
    except cv2.error as err:  # e.g. more pixels than OpenCV's decoding limit
        raise ImageDecodeError(f"{name}: {err.err}") from None
    if image is None:
        raise ImageDecodeError(f"{name}: not a decodable image ({len(data)} bytes)")
    return image


class ImageTransform:
    """An albumentations pipeline as a callable ``RGB uint8 HWC array -> CxHxW float tensor``."""

    def __init__(self, compose: A.Compose) -> None:
        self.compose = compose

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return self.compose(image=image)["image"]

    def set_random_seed(self, seed: int) -> None:
        """Reseed the pipeline's generators (each DataLoader worker must draw different augmentations)."""
        self.compose.set_random_seed(seed)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.compose!r})"


def _interpolation(name: str) -> int:
    try:
        return INTERPOLATIONS[name]
    except KeyError:
        raise ValueError(f"interpolation={name!r}: expected one of {sorted(INTERPOLATIONS)}") from None


def _check_common(img_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
    if img_size <= 0:
        raise ValueError(f"img_size={img_size}: expected a positive integer")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean={tuple(mean)}, std={tuple(std)}: expected three values each (RGB)")
    if any(s <= 0 for s in std):
        raise ValueError(f"std={tuple(std)}: expected positive values")


def augment_policy(
    name: str, img_size: int, mean: Sequence[float], interpolation: str
) -> Callable[[Image.Image], Image.Image]:
    """The PIL-image augmentation ``name`` means in timm (``timm.data.create_transform(auto_augment=...)``).

    ``rand-...`` is timm's RandAugment, ``augmix...`` timm's AugMix, ``trivialaugment`` torchvision's
    TrivialAugmentWide, anything else one of timm's AutoAugment policies (``original``, ``v0``, ``3a``, ...).
    Magnitudes are relative to ``img_size`` and fills use ``mean``, with timm's settings.
    """
    fill = tuple(min(255, round(255 * m)) for m in mean)
    if name == "trivialaugment":
        return TrivialAugmentWide(fill=list(fill))
    params: dict[str, Any] = {"translate_const": int(img_size * 0.45), "img_mean": fill}
    params["interpolation"] = str_to_pil_interp(interpolation)
    try:
        if name.startswith("rand"):
            policy = rand_augment_transform(name, params)
            ops = policy.ops
        elif name.startswith("augmix"):
            policy = augment_and_mix_transform(name, {**params, "translate_pct": 0.3})
            ops = policy.ops
        else:
            policy = auto_augment_transform(name, params)
            ops = [op for sub_policy in policy.policy for op in sub_policy]
    except (AssertionError, ValueError, KeyError, IndexError) as err:
        raise ValueError(
            f"auto_augment={name!r}: not a timm augmentation string ({err or 'unknown policy'}); expected e.g. "
            "rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, trivialaugment, original, v0 or null"
        ) from None
    for op in ops:
        if op.aug_fn is timm_aa.posterize:
            op.aug_fn = _posterize
    return policy


def _posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize, with 0 bits giving a black image as in Pillow < 11.

    timm's Posterize levels reach 0 bits (``Posterize`` at magnitude 0, ``PosterizeIncreasing`` at 10,
    which DeiT's ``mstd0.5`` noise reaches), which current Pillow rejects with an error.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


class PolicyAugment(A.ImageOnlyTransform):
    """An augmentation policy of :func:`augment_policy`, run on the PIL image inside albumentations.

    timm's policies draw from Python's ``random`` (AugMix also from NumPy's global generator), so
    :meth:`set_random_seed` (called per DataLoader worker) seeds those generators as well.
    """

    def __init__(
        self, name: str, img_size: int, mean: Sequence[float], interpolation: str, p: float = 1.0
    ) -> None:
        super().__init__(p=p)
        self.name = name
        self.img_size = img_size
        self.mean = tuple(mean)
        self.interpolation = interpolation
        self.policy = augment_policy(name, img_size, mean, interpolation)

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return np.asarray(self.policy(Image.fromarray(img)), dtype=np.uint8)

    def set_random_seed(self, seed: int | None) -> None:
        super().set_random_seed(seed)
        if seed is not None:
            random.seed(seed)
            np.random.seed(seed % 2**32)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("name", "img_size", "mean", "interpolation")


def build_train_transform(
    img_size: int = 224,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    interpolation: str = "bicubic",
    train_crop_scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
    color_jitter: float = 0.4,
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    re_prob: float = 0.25,
) -> ImageTransform:
    """Training augmentation (see the module docstring); output ``3 x img_size x img_size`` float."""
    if auto_augment is not None and not isinstance(auto_augment, str):
        raise ValueError(
            f"auto_augment={auto_augment!r}: expected a timm augmentation string (e.g. rand-m9-mstd0.5-inc1) or null"
        )
    _check_common(img_size, mean, std)
    low, high = train_crop_scale
    if not 0 < low <= high <= 1:
        raise ValueError(f"train_crop_scale={tuple(train_crop_scale)}: expected 0 < low <= high <= 1")
    for name, p in (("hflip", hflip), ("re_prob", re_prob)):
        if not 0 <= p <= 1:
            raise ValueError(f"{name}={p}: expected a probability in [0, 1]")
    if color_jitter < 0:
        raise ValueError(f"color_jitter={color_jitter}: expected a non-negative strength")
    ops: list[A.BasicTransform | A.BaseCompose] = [
        A.RandomResizedCrop(size=(img_size, img_size), scale=(low, high), interpolation=_interpolation(interpolation)),
    ]
    if hflip > 0:
        ops.append(A.HorizontalFlip(p=hflip))
    if auto_augment is not None:
        ops.append(PolicyAugment(auto_augment, img_size, mean, interpolation))
    elif color_jitter > 0:
        ops.append(A.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter, hue=0, p=1.0))
    if re_prob > 0:
        ops.append(A.Erasing(scale=(0.02, 1 / 3), ratio=(0.3, 3.3), fill="random", p=re_prob))
    ops += [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()]
    return ImageTransform(A.Compose(ops))


def build_eval_transform(
    img_size: int = 224,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    interpolation: str = "bicubic",
    crop_pct: float = 0.875,
) -> ImageTransform:
    """Deterministic evaluation transform: shorter side to ``floor(img_size / crop_pct)``, center crop."""
    _check_common(img_size, mean, std)
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct={crop_pct}: expected a value in (0, 1]")
    scale_size = math.floor(img_size / crop_pct)
    return ImageTransform(
        A.Compose(
            [
                A.SmallestMaxSize(max_size=scale_size, interpolation=_interpolation(interpolation)),
                A.CenterCrop(height=img_size, width=img_size),
                A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0),
                ToTensorV2(),
            ]
        )
    )
