"""A small synthetic fine-grained dataset in the CUB-200-2011 layout, for the demo and the tests.

Every class is a procedurally drawn "bird": an oval body, plain or with stripes (two horizontal or
three vertical), a small head whose colour (red or yellow) is the only difference between some
pairs of classes, and a dark tail or none. Body colour, background, position, size and noise are
random and carry no class information, so a model has to look at the small parts, as on CUB.

``generate_synthetic_cub(root)`` writes real JPEGs and the CUB text files (images.txt,
image_class_labels.txt, train_test_split.txt, classes.txt, bounding_boxes.txt) under
``root/CUB_200_2011``; the folder is built under a temporary name and renamed into place, so a
crashed or concurrent generation never leaves a half-written dataset behind.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .cub import CUB200DataModule

__all__ = ["generate_synthetic_cub", "default_demo_root", "SYNTHETIC_CLASSES", "SyntheticCUBDataModule"]

TAILS = ("Long_tailed", "Tailless")
STRIPES = ("Two_Barred", "Three_Pillared", "Plain")  # 2 horizontal stripes, 3 vertical, none
HEADS = {"Red_headed": (220, 30, 30), "Yellow_headed": (235, 210, 20)}

# Ten of the twelve combinations; the names follow CUB's "NNN.Name" folder convention.
SYNTHETIC_CLASSES: list[tuple[str, str, str]] = list(itertools.product(TAILS, STRIPES, HEADS))[:10]

LAYOUT_VERSION = "v4"


def default_demo_root() -> Path:
    """``$RPE_FINETUNE_DEMO_DIR``, else ``$XDG_CACHE_HOME/rpe-finetune/demo-v4`` (``~/.cache`` by default)."""
    if os.environ.get("RPE_FINETUNE_DEMO_DIR"):
        return Path(os.environ["RPE_FINETUNE_DEMO_DIR"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return cache / "rpe-finetune" / f"demo-{LAYOUT_VERSION}"


def _class_name(index: int) -> str:
    tail, stripes, head = SYNTHETIC_CLASSES[index]
    return f"{index + 1:03d}.{head}_{stripes}_{tail}"


def _draw(
    label: int, size: int, rng: np.random.Generator
) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """One image of class ``label`` and its bounding box (x, y, w, h)."""
    tail, stripes, head = SYNTHETIC_CLASSES[label]
    background = tuple(int(v) for v in rng.integers(90, 200, 3))
    noise = rng.normal(0, 8, (size, size, 3))
    canvas = np.clip(np.asarray(background, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(canvas, "RGB")
    draw = ImageDraw.Draw(image)

    w = int(size * rng.uniform(0.45, 0.55))
    h = int(size * rng.uniform(0.4, 0.48))
    x0 = int(rng.integers(size // 5, size - w - size // 5 + 1))  # room for the tail on the left
    y0 = int(rng.integers(size // 5, size - h - size // 16))
    box = (x0, y0, x0 + w, y0 + h)
    body = tuple(int(v) for v in rng.integers(40, 160, 3))
    shift = 100 if sum(body) < 300 else -100  # stripes contrast with the body whatever its colour
    stripe = tuple(int(np.clip(c + shift, 0, 255)) for c in body)

    if tail == "Long_tailed":  # a dark wedge behind the body
        tail_len = w * rng.uniform(0.3, 0.4)
        cy = y0 + h / 2
        draw.polygon([(x0 + w * 0.15, cy), (x0 - tail_len, cy - h * 0.35), (x0 - tail_len, cy + h * 0.35)], fill=(40, 30, 30))
    mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(mask).ellipse(box, fill=255)
    pattern = Image.new("RGB", image.size, body)
    pattern_draw = ImageDraw.Draw(pattern)
    if stripes == "Three_Pillared":
        for i in range(3):
            cx = x0 + w * (i + 1) / 4
            pattern_draw.rectangle((cx - w / 16, y0, cx + w / 16, y0 + h), fill=stripe)
    elif stripes == "Two_Barred":
        count = 2
        for i in range(count):
            cy = y0 + h * (i + 1) / (count + 1)
            pattern_draw.rectangle(
                (x0, cy - h / (4 * count + 4), x0 + w, cy + h / (4 * count + 4)), fill=stripe
            )
    image.paste(pattern, (0, 0), mask)

    r = max(3, int(h * rng.uniform(0.3, 0.36)))  # the head: a small disc at the front top
    hx, hy = x0 + w - r // 2, y0 - r // 3
    draw.ellipse((hx - r, hy - r, hx + r, hy + r), fill=HEADS[head], outline=body)
    beak = (hx + r - 1, hy - 2, hx + r + r // 2 + 2, hy + 2)
    draw.rectangle(beak, fill=(60, 40, 20))

    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.6)))
    left = x0 - (w * 0.4 if tail == "Long_tailed" else 0)
    top = min(y0, hy - r)
    right, bottom = max(x0 + w, beak[2]), max(y0 + h, hy + r)
    return image, (float(left), float(top), float(right - left), float(bottom - top))


def generate_synthetic_cub(
    root: str | os.PathLike[str],
    train_per_class: int = 40,
    test_per_class: int = 20,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """Write the dataset to ``root/CUB_200_2011`` unless it is already there; return that folder."""
    root = Path(root).expanduser()
    target = root / "CUB_200_2011"
    if (target / "images.txt").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tmp = Path(tempfile.mkdtemp(prefix=".CUB_200_2011.", dir=root))
    try:
        rows: dict[str, list[str]] = {k: [] for k in ("images", "labels", "split", "boxes")}
        image_id = 0
        for label in range(len(SYNTHETIC_CLASSES)):
            name = _class_name(label)
            (tmp / "images" / name).mkdir(parents=True)
            for i in range(train_per_class + test_per_class):
                image_id += 1
                image, (x, y, w, h) = _draw(label, image_size, rng)
                rel = f"{name}/{name.split('.', 1)[1]}_{i + 1:04d}.jpg"
                image.save(tmp / "images" / rel, quality=92)
                rows["images"].append(f"{image_id} {rel}")
                rows["labels"].append(f"{image_id} {label + 1}")
                rows["split"].append(f"{image_id} {int(i < train_per_class)}")
                rows["boxes"].append(f"{image_id} {x:.1f} {y:.1f} {w:.1f} {h:.1f}")
        files = {
            "images.txt": rows["images"],
            "image_class_labels.txt": rows["labels"],
            "train_test_split.txt": rows["split"],
            "bounding_boxes.txt": rows["boxes"],
            "classes.txt": [f"{i + 1} {_class_name(i)}" for i in range(len(SYNTHETIC_CLASSES))],
        }
        for filename, lines in files.items():
            (tmp / filename).write_text("\n".join(lines) + "\n")
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: keep its copy
            if not (target / "images.txt").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class SyntheticCUBDataModule(CUB200DataModule):
    """``CUB200DataModule`` over the synthetic dataset, generated by ``prepare_data`` when missing.

    Args:
        root: where to keep the dataset; default :func:`default_demo_root`.
        train_per_class, test_per_class, image_size: size of the generated dataset.
        **kwargs: the arguments of :class:`CUB200DataModule` (``download`` is not accepted).
    """

    def __init__(
        self,
        root: str | None = None,
        train_per_class: int = 40,
        test_per_class: int = 20,
        image_size: int = 64,
        **kwargs: Any,
    ) -> None:
        super().__init__(str(root or default_demo_root()), **kwargs)
        self.generation = {
            "train_per_class": train_per_class,
            "test_per_class": test_per_class,
            "image_size": image_size,
        }

    @classmethod
    def root_can_be_missing(cls, root: str | None, init_args: dict[str, Any]) -> bool:
        return True  # generated by prepare_data (None: the default folder)

    def prepare_data(self) -> None:
        generate_synthetic_cub(self.root, **self.generation)

    @property
    def banner(self) -> str:
        """Printed at the start and end of fit: nobody should mistake this run for a real result."""
        return (
            f"DEMO DATA: {len(SYNTHETIC_CLASSES)} classes of synthetic images generated in {self.root}; "
            "not a real dataset, so the accuracy says nothing about real images."
        )
