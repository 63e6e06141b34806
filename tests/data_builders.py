"""Small datasets in the real on-disk layouts of CUB-200-2011, Stanford Cars and ImageNet, and in the
generic formats: class folders, CSV lists, and parquet files written by Hugging Face ``datasets``.

Every builder writes real JPEG files and real annotation files (text, CSV, and MATLAB .mat files
written with ``scipy.io.savemat`` in the struct-array layout of the official devkits) and returns a
:class:`BuiltDataset` describing what it wrote, so tests can compare against it. Images are a dark
background with a white rectangle on the annotated box, which makes a bounding-box crop visible.
"""

from __future__ import annotations

import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

__all__ = [
    "CARS_CLASSES",
    "CARS_LAYOUTS",
    "CUB_LAYOUTS",
    "GENERIC_CLASSES",
    "IMAGENET_CLASSES",
    "BuiltDataset",
    "build_cars",
    "build_csv",
    "build_cub",
    "build_hf_parquet",
    "build_image_folder",
    "build_imagenet",
    "make_tgz",
    "truncate_file",
    "write_image",
]

IMAGE_SIZE = (48, 36)  # width, height: tiny, CUB-like aspect ratio
BACKGROUND = (30, 60, 90)

CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross", "004.Groove_billed_Ani"]
# the "/" in a class name is why the Kaggle CSV layout names that folder differently
CARS_CLASSES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Ram C/V Cargo Van Minivan 2012"]
# wnid -> LOC_synset_mapping / meta.mat words
IMAGENET_CLASSES = {
    "n01440764": "tench, Tinca tinca",
    "n01443537": "goldfish, Carassius auratus",
    "n01484850": "great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias",
}


@dataclass
class BuiltDataset:
    root: Path
    class_names: list[str]
    #: (absolute image path, 0-based label) per split, in the order the layout lists them
    splits: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    #: image path -> box (x1, y1, x2, y2), 0-based pixels, end exclusive
    boxes: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)

    def labels(self, split: str) -> dict[str, int]:
        return dict(self.splits[split])


def write_image(
    path: Path, box: tuple[int, int, int, int] | None = None, mode: str = "RGB", size: tuple[int, int] = IMAGE_SIZE
) -> Path:
    """A JPEG (or other format by suffix) of ``size`` with a white ``box``, saved in PIL ``mode``
    (``RGB``, ``L`` for grayscale, ``CMYK``)."""
    pixels = np.empty((size[1], size[0], 3), dtype=np.uint8)
    pixels[:] = BACKGROUND
    if box is not None:
        x1, y1, x2, y2 = box
        pixels[y1:y2, x1:x2] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path, quality=95)
    return path


def truncate_file(path: Path, keep: float = 0.5) -> Path:
    """Cut a file to ``keep`` of its size (a download that stopped half-way)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def make_tgz(source: Path, archive: Path) -> Path:
    """Pack ``source`` as a top-level folder of a .tgz archive."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname=source.name)
    return archive


def _box(rng: np.random.Generator) -> tuple[int, int, int, int]:
    x1, y1 = int(rng.integers(2, 12)), int(rng.integers(2, 10))
    return x1, y1, x1 + int(rng.integers(12, 24)), y1 + int(rng.integers(10, 18))


def _mode(counter: int) -> str:
    # every fifth image grayscale, every seventh CMYK, as both occur in CUB and Cars
    return "L" if counter % 5 == 3 else "CMYK" if counter % 7 == 5 else "RGB"


def _matlab_struct(records: list[dict[str, object]]) -> np.ndarray:
    """A 1 x N MATLAB struct array: numbers as 1x1 arrays, strings as char arrays (as in the devkits)."""
    names = list(records[0])
    array = np.empty((1, len(records)), dtype=[(name, object) for name in names])
    for i, record in enumerate(records):
        for name in names:
            value = record[name]
            if isinstance(value, str):
                array[0, i][name] = value
            else:
                array[0, i][name] = np.array([[value]], dtype=np.uint16 if isinstance(value, int) else np.float64)
    return array


def _cell(strings: list[str]) -> np.ndarray:
    cell = np.empty((1, len(strings)), dtype=object)
    cell[0, :] = strings
    return cell


# -- CUB-200-2011 ---------------------------------------------------------------------------------


CUB_LAYOUTS = ("official", "nested", "class_folders")


def build_cub(
    parent: Path, num_classes: int = 3, train_per_class: int = 3, test_per_class: int = 2, layout: str = "official"
) -> BuiltDataset:
    """``parent/CUB_200_2011`` with the five text files and ``images/NNN.Name/*.jpg`` (``official``);
    the same one level deeper, ``parent/CUB_200_2011/CUB_200_2011`` (``nested``, as zip mirrors
    extract); or ``parent/CUB_200_2011/{train,test}/NNN.Name/*.jpg`` without text files
    (``class_folders``, as mirrors that pre-split the images ship it)."""
    if layout not in CUB_LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {CUB_LAYOUTS}")
    if layout == "nested":
        return build_cub(parent / "CUB_200_2011", num_classes, train_per_class, test_per_class)
    if layout == "class_folders":
        built = build_cub(parent, num_classes, train_per_class, test_per_class)
        moved: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
        for split, samples in built.splits.items():
            for path, label in samples:
                target = built.root / split / Path(path).parent.name / Path(path).name
                target.parent.mkdir(parents=True, exist_ok=True)
                Path(path).rename(target)
                moved[split].append((str(target), label))
        shutil.rmtree(built.root / "images")
        for name in ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt", "classes.txt"):
            (built.root / name).unlink()
        return BuiltDataset(built.root, built.class_names, moved)
    rng = np.random.default_rng(0)
    folder = parent / "CUB_200_2011"
    classes = CUB_CLASSES[:num_classes]
    built = BuiltDataset(folder, [c.split(".", 1)[1] for c in classes], {"train": [], "test": []})
    images, labels, flags, boxes = [], [], [], []
    image_id = 0
    for label, class_folder in enumerate(classes):
        bird = class_folder.split(".", 1)[1]
        # train and test interleaved within a class, as in the real split file
        for k, is_train in enumerate([1] * train_per_class + [0] * test_per_class):
            image_id += 1
            relative = f"{class_folder}/{bird}_{k:04d}_{image_id}.jpg"
            box = _box(rng)
            path = write_image(folder / "images" / relative, box, _mode(image_id))
            images.append(f"{image_id} {relative}")
            labels.append(f"{image_id} {label + 1}")
            flags.append(f"{image_id} {is_train}")
            x1, y1, x2, y2 = box
            boxes.append(f"{image_id} {float(x1)} {float(y1)} {float(x2 - x1)} {float(y2 - y1)}")
            built.splits["train" if is_train else "test"].append((str(path), label))
            built.boxes[str(path)] = box
    for name, lines in {
        "images.txt": images,
        "image_class_labels.txt": labels,
        "train_test_split.txt": flags,
        "bounding_boxes.txt": boxes,
        "classes.txt": [f"{i} {c}" for i, c in enumerate(classes, start=1)],
    }.items():
        (folder / name).write_text("\n".join(lines) + "\n")
    return built


# -- Stanford Cars --------------------------------------------------------------------------------

CARS_LAYOUTS = ("devkit", "devkit_test_at_root", "car_ims", "csv", "torchvision")


def build_cars(root: Path, layout: str = "devkit", train_per_class: int = 2, test_per_class: int = 2) -> BuiltDataset:
    """Stanford Cars in one of :data:`CARS_LAYOUTS` (``devkit_test_at_root``: the devkit layout with
    ``cars_test_annos_withlabels.mat`` beside ``devkit/`` instead of in it; ``torchvision``: that
    layout in ``root/stanford_cars``, where torchvision's ``StanfordCars(root)`` reads it)."""
    if layout not in CARS_LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {CARS_LAYOUTS}")
    if layout == "torchvision":
        built = build_cars(root / "stanford_cars", "devkit_test_at_root", train_per_class, test_per_class)
        built.root = root
        return built
    rng = np.random.default_rng(1)
    built = BuiltDataset(root, list(CARS_CLASSES), {"train": [], "test": []})
    entries: dict[str, list[dict[str, object]]] = {"train": [], "test": []}
    counter = 0
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        number = 0
        # the devkit lists images in file-name order with classes mixed: go round the classes
        for _ in range(per_class):
            for label, name in enumerate(CARS_CLASSES):
                number += 1
                counter += 1
                box = _box(rng)
                if layout == "car_ims":
                    relative = f"car_ims/{counter:06d}.jpg"
                elif layout == "csv":
                    relative = f"car_data/{split}/{name.replace('/', '-')}/{number:05d}.jpg"
                else:
                    relative = f"cars_{split}/{number:05d}.jpg"
                path = write_image(root / relative, box, _mode(counter))
                x1, y1, x2, y2 = box
                entries[split].append(
                    {"relative": relative, "bbox_x1": x1 + 1, "bbox_y1": y1 + 1, "bbox_x2": x2, "bbox_y2": y2, "class": label + 1}
                )
                built.splits[split].append((str(path), label))
                built.boxes[str(path)] = box
    if layout in ("devkit", "devkit_test_at_root"):
        devkit = root / "devkit"
        devkit.mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(devkit / "cars_meta.mat", {"class_names": _cell(CARS_CLASSES)})
        test_annotations = (root if layout == "devkit_test_at_root" else devkit) / "cars_test_annos_withlabels.mat"
        for split, target in (("train", devkit / "cars_train_annos.mat"), ("test", test_annotations)):
            records = [
                {**{k: v for k, v in e.items() if k != "relative"}, "fname": str(e["relative"]).split("/")[-1]}
                for e in entries[split]
            ]
            scipy.io.savemat(target, {"annotations": _matlab_struct(records)})
        # the unlabelled test file of the devkit, which must not be mistaken for the labelled one
        unlabelled = [{"fname": str(e["relative"]).split("/")[-1]} for e in entries["test"]]
        scipy.io.savemat(devkit / "cars_test_annos.mat", {"annotations": _matlab_struct(unlabelled)})
    elif layout == "car_ims":
        records = [
            {"relative_im_path": e.pop("relative"), **e, "test": int(split == "test")}
            for split in ("train", "test")
            for e in entries[split]
        ]
        scipy.io.savemat(root / "cars_annos.mat", {"annotations": _matlab_struct(records), "class_names": _cell(CARS_CLASSES)})
    else:
        for split in ("train", "test"):
            lines = [
                f"{str(e['relative']).split('/')[-1]},{e['bbox_x1']},{e['bbox_y1']},{e['bbox_x2']},{e['bbox_y2']},{e['class']}"
                for e in entries[split]
            ]
            (root / f"anno_{split}.csv").write_text("\n".join(lines) + "\n")
        (root / "names.csv").write_text("\n".join(CARS_CLASSES) + "\n")
    return built


# -- ImageNet -------------------------------------------------------------------------------------

IMAGENET_LAYOUTS = ("folder", "loc", "devkit")


def build_imagenet(root: Path, layout: str = "folder", train_per_class: int = 2, val_per_class: int = 2) -> BuiltDataset:
    """ImageNet with three classes in one of :data:`IMAGENET_LAYOUTS`; the split names are
    ``train`` and ``val``."""
    if layout not in IMAGENET_LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {IMAGENET_LAYOUTS}")
    wnids = sorted(IMAGENET_CLASSES)
    built = BuiltDataset(root, [IMAGENET_CLASSES[w].split(",")[0] for w in wnids], {"train": [], "val": []})
    base = root / "ILSVRC" / "Data" / "CLS-LOC" if layout == "loc" else root
    counter = 0
    for label, wnid in enumerate(wnids):
        for k in range(train_per_class):
            counter += 1
            path = write_image(base / "train" / wnid / f"{wnid}_{k + 1}.JPEG", None, _mode(counter))
            built.splits["train"].append((str(path), label))
    # validation images numbered with the classes interleaved, as in the real set
    val_wnids = [wnids[i % len(wnids)] for i in range(val_per_class * len(wnids))]
    for number, wnid in enumerate(val_wnids, start=1):
        name = f"ILSVRC2012_val_{number:08d}.JPEG"
        folder = base / "val" / wnid if layout == "folder" else base / "val"
        path = write_image(folder / name, None, _mode(number))
        built.splits["val"].append((str(path), wnids.index(wnid)))
    if layout == "loc":
        # the real mapping file is sorted; write it reversed to check that labels follow sorted wnids
        mapping = [f"{w} {IMAGENET_CLASSES[w]}" for w in reversed(wnids)]
        (root / "LOC_synset_mapping.txt").write_text("\n".join(mapping) + "\n")
        solution = ["ImageId,PredictionString"] + [
            f"ILSVRC2012_val_{n:08d},{w} 1 2 30 20 {w} 3 4 20 10" for n, w in enumerate(val_wnids, start=1)
        ]
        (root / "LOC_val_solution.csv").write_text("\n".join(solution) + "\n")
    elif layout == "devkit":
        # ILSVRC2012 ids are not in wnid order; non-leaf synsets follow the 1000 leaves
        ids = {wnids[2]: 1, wnids[0]: 2, wnids[1]: 3}
        synsets = [
            {"ILSVRC2012_ID": ids[w], "WNID": w, "words": IMAGENET_CLASSES[w], "gloss": "a fish", "num_children": 0}
            for w in wnids
        ]
        synsets.append({"ILSVRC2012_ID": 4, "WNID": "n01440000", "words": "fish", "gloss": "any fish", "num_children": 3})
        data = root / "ILSVRC2012_devkit_t12" / "data"
        data.mkdir(parents=True)
        scipy.io.savemat(data / "meta.mat", {"synsets": _matlab_struct(synsets)})
        (data / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(str(ids[w]) for w in val_wnids) + "\n")
    return built


# -- generic formats ------------------------------------------------------------------------------

GENERIC_CLASSES = ["cat", "dog", "owl"]


def _generic_images(root: Path, split: str, per_class: int, folders: bool) -> list[tuple[str, int]]:
    """``per_class`` JPEGs of each generic class under ``root`` (in class folders when ``folders``)."""
    written = []
    for label, name in enumerate(GENERIC_CLASSES):
        for k in range(per_class):
            relative = f"{name}/{split}_{k}.jpg" if folders else f"images/{split}_{name}_{k}.jpg"
            path = write_image(root / relative, (4 + 8 * label, 4, 20 + 8 * label, 20), _mode(k + label))
            written.append((str(path), label))
    return written


def build_image_folder(root: Path, splits: tuple[str, ...] = ("train", "val"), per_class: int = 4) -> BuiltDataset:
    """Class folders: ``root/<split>/<class>/*.jpg`` for each of ``splits``, or ``root/<class>/*.jpg``
    when ``splits`` is empty."""
    built = BuiltDataset(root, list(GENERIC_CLASSES))
    for split in splits or ("all",):
        built.splits[split] = _generic_images(root / split if splits else root, split, per_class, folders=True)
    return built


def build_csv(
    root: Path, splits: tuple[str, ...] = ("train", "val"), per_class: int = 4, label_ids: bool = False, boxes: bool = False
) -> BuiltDataset:
    """``root/<split>.csv`` (header ``path,label`` [``,x1,y1,x2,y2``]) and ``root/images/*.jpg``;
    labels are class names, or 0-based ids with ``label_ids``."""
    built = BuiltDataset(root, [str(i) for i in range(3)] if label_ids else list(GENERIC_CLASSES))
    for split in splits:
        images = _generic_images(root, split, per_class, folders=False)
        built.splits[split] = images
        lines = ["path,label" + (",x1,y1,x2,y2" if boxes else "")]
        for path, label in images:
            box = (4 + 8 * label, 4, 20 + 8 * label, 20)
            built.boxes[path] = box
            row = f"{Path(path).relative_to(root)},{label if label_ids else GENERIC_CLASSES[label]}"
            lines.append(row + ("," + ",".join(map(str, box)) if boxes else ""))
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return built


def build_hf_parquet(
    root: Path, splits: tuple[str, ...] = ("train", "validation"), per_class: int = 4, image_column: str = "image"
) -> BuiltDataset:
    """A Hub-style parquet dataset written by ``datasets`` itself: ``root/data/<split>-00000-of-00001.parquet``
    with an ``Image`` column holding JPEG bytes and a ``ClassLabel`` column ``label``. ``splits[s]`` lists
    ``(f"{root}[{s}][{row}]", label)``."""
    import datasets  # optional dependency: imported by the tests that build this format

    features = datasets.Features({image_column: datasets.Image(), "label": datasets.ClassLabel(names=GENERIC_CLASSES)})
    built = BuiltDataset(root, list(GENERIC_CLASSES))
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split in splits:
        images, labels = [], []
        staging = root / ".staging" / split
        for path, label in _generic_images(staging, split, per_class, folders=True):
            images.append({"bytes": Path(path).read_bytes(), "path": None})
            labels.append(label)
        table = datasets.Dataset.from_dict({image_column: images, "label": labels}, features=features)
        table.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
        built.splits[split] = [(f"{root}[{split}][{row}]", label) for row, label in enumerate(labels)]
    shutil.rmtree(root / ".staging")
    return built
