"""Data pipeline throughput: JPEG decoding (OpenCV vs PIL), the train / eval transforms, the dataset
formats, and the memory of a 1.28M-sample index in DataLoader workers.

Generates CUB-sized JPEGs (500 x 375) into a temporary folder, then measures

- decoding alone in this process: ``datamodules.load_rgb`` (OpenCV) against PIL's
  ``Image.open(...).convert("RGB")``;
- decode + transform through a DataLoader for each worker count, train and eval transforms
  (``workers = 0`` is the main process alone);
- the same JPEGs read through each dataset format (class folders, a CSV list, parquet written by
  Hugging Face ``datasets``, WebDataset tar shards), decode + eval transform in this process, as
  images per CPU second and as a ratio to the folder;
- an ImageNet-sized index (1,281,167 samples by default): its size, and the private memory a forked
  worker adds by reading every sample once, for a Python list of ``Sample`` tuples (what the datasets
  held before) against :class:`datamodules.SampleArray`.

OpenCV and torch are limited to one thread each (inherited by the workers), so images/s per worker
is images/s per core when the machine is otherwise idle; on a shared machine the images per CPU
second of this process (decoding, and the ``workers = 0`` rows) is the steadier per-core figure. Prints the tables and writes ``benchmarks/results/data_pipeline.{csv,md,png}``.

    python benchmarks/data_pipeline.py [--workers 0 1 2] [--img-size 224] [--seconds 4] [--index-samples 1281167]
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import matplotlib
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from benchmarks.common import markdown_table
from datamodules import (
    BadImageRegistry,
    CSVDataModule,
    HFDataModule,
    ImageListDataset,
    Sample,
    SampleArray,
    ShardStream,
    build_eval_transform,
    build_train_transform,
    load_rgb,
    write_shards,
)
from datamodules.folder import read_image_folder
from datamodules.shards import read_manifest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ["measure", "decoder", "workers", "images_per_s", "images_per_s_per_worker", "images_per_cpu_s"]


def make_jpegs(folder: Path, count: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> list[str]:
    """Photo-like JPEGs (smooth colour fields plus sensor-like noise, quality 90, ~60-90 KB)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        coarse = rng.integers(0, 256, (size[1] // 40, size[0] // 40, 3), dtype=np.uint8)
        smooth = cv2.resize(coarse, size, interpolation=cv2.INTER_CUBIC).astype(np.float32)
        pixels = np.clip(smooth + rng.normal(0, 10, smooth.shape), 0, 255).astype(np.uint8)
        path = folder / f"{i:04d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(str(path))
    return paths


def pil_rgb(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def decode_rates(decoders: dict[str, Callable[[str], np.ndarray]], paths: list[str], seconds: float) -> dict[str, tuple[float, float]]:
    """(images per wall second, images per CPU second) of each decoder, measured in alternating
    rounds so that load from other processes affects all of them alike."""
    for decode in decoders.values():
        for path in paths[:8]:  # warm the page cache and the decoder
            decode(path)
    totals = {name: [0, 0.0, 0.0] for name in decoders}
    deadline = time.perf_counter() + seconds * len(decoders)
    while time.perf_counter() < deadline:
        for name, decode in decoders.items():
            wall, cpu = time.perf_counter(), time.process_time()
            for path in paths:
                decode(path)
            totals[name][0] += len(paths)
            totals[name][1] += time.perf_counter() - wall
            totals[name][2] += time.process_time() - cpu
    return {name: (n / wall, n / cpu) for name, (n, wall, cpu) in totals.items()}


def loader_rates(dataset: ImageListDataset, workers: int, batch_size: int, seconds: float) -> tuple[float, float | None]:
    """(images per wall second, images per CPU second of this process) once the workers run;
    start-up and the first batches are not counted. The CPU rate is given for ``workers == 0`` only,
    where all the work happens in this process."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=True)
    iterator = iter(loader)
    for _ in range(max(2, 2 * workers)):
        next(iterator)
    count, start, cpu = 0, time.perf_counter(), time.process_time()
    for images, _ in iterator:
        count += len(images)
        if time.perf_counter() - start > seconds:
            break
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return count / wall, (count / cpu if workers == 0 else None)


def run(workers: list[int], img_size: int, seconds: float, num_images: int, batch_size: int) -> tuple[list[dict], list[dict]]:
    """(decode and DataLoader rows, dataset format rows)."""
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), num_images)
        sizes = [os.path.getsize(p) for p in paths]
        print(f"{num_images} JPEGs of 500x375, {np.mean(sizes) / 1024:.0f} KB on average; output {img_size}px")
        rates = decode_rates({"opencv": load_rgb, "pil": pil_rgb}, paths, seconds)
        for decoder, (wall, cpu) in rates.items():
            rows.append(dict(measure="decode", decoder=decoder, workers=0, images_per_s=wall, images_per_s_per_worker=wall, images_per_cpu_s=cpu))
        # enough samples that no epoch ends within a measurement
        samples = [Sample(p, i % 10) for i, p in enumerate(paths)] * 200
        classes = [str(c) for c in range(10)]
        for measure, transform in (
            ("train", build_train_transform(img_size)),
            ("eval", build_eval_transform(img_size)),
        ):
            dataset = ImageListDataset(samples, classes, transform)
            for n in workers:
                wall, cpu = loader_rates(dataset, n, batch_size, seconds)
                rows.append(
                    dict(measure=measure, decoder="opencv", workers=n, images_per_s=wall, images_per_s_per_worker=wall / max(n, 1), images_per_cpu_s=cpu)
                )
        transform = build_eval_transform(img_size)
        sources = format_datasets(Path(tmp) / "formats", paths)
        for dataset in sources.values():
            dataset.transform = transform
        formats = format_rates(sources, seconds)
    return rows, formats



# -- dataset formats ------------------------------------------------------------------------------


def format_datasets(root: Path, paths: list[str], classes: int = 2) -> dict[str, ImageListDataset | ShardStream]:
    """The JPEGs at ``paths`` in each format, read back through each format's datamodule code."""
    import datasets  # the optional dependency of HFDataModule

    labels = [i % classes for i in range(len(paths))]
    folder = root / "folder"
    for path, label in zip(paths, labels, strict=True):
        (folder / f"c{label}").mkdir(parents=True, exist_ok=True)
        os.link(path, folder / f"c{label}" / os.path.basename(path))
    lines = ["path,label"] + [f"{path},c{label}" for path, label in zip(paths, labels, strict=True)]
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=[f"c{c}" for c in range(classes)])})
    images = [{"bytes": Path(path).read_bytes(), "path": None} for path in paths]
    table = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    table.to_parquet(str(root / "parquet" / "data" / "train-00000-of-00001.parquet"))
    registry = BadImageRegistry()
    in_folder = read_image_folder(folder, None, registry)
    shards = write_shards({"train": in_folder}, in_folder.classes, root / "shards", shard_size=max(1, len(paths) // 4))
    entry = read_manifest(str(shards))["splits"]["train"]
    return {
        "folder": in_folder,
        "csv": CSVDataModule(str(root)).read_split("train", registry),
        "hf parquet": HFDataModule(str(root / "parquet"), cache_dir=str(root / "hf_cache")).read_split("train", registry),
        "webdataset shards": ShardStream([str(shards / n) for n in entry["shards"]], entry["counts"], None, False, 0, registry),
    }


def _read_all(dataset: ImageListDataset | ShardStream) -> int:
    """Read every item once (a stream in order, a map-style dataset by index); the number read."""
    items = iter(dataset) if isinstance(dataset, ShardStream) else (dataset[i] for i in range(len(dataset)))
    return sum(1 for _ in items)


def format_rates(sources: dict[str, ImageListDataset | ShardStream], seconds: float) -> list[dict]:
    """Images per CPU second of decode + eval transform through each source, in alternating rounds."""
    totals = {name: [0, 0.0] for name in sources}
    for dataset in sources.values():
        _read_all(dataset)  # warm the page cache, the decoder and (parquet) the memory map
    deadline = time.perf_counter() + seconds * len(sources)
    while time.perf_counter() < deadline:
        for name, dataset in sources.items():
            cpu = time.process_time()
            totals[name][0] += _read_all(dataset)
            totals[name][1] += time.process_time() - cpu
    folder = totals["folder"][0] / totals["folder"][1]
    return [
        {"format": name, "images": len(sources[name]), "images_per_cpu_s": n / cpu, "vs_folder": (n / cpu) / folder}
        for name, (n, cpu) in totals.items()
    ]


# -- index memory ---------------------------------------------------------------------------------


def imagenet_like_samples(count: int) -> list[Sample]:
    """``count`` samples with ImageNet's path shapes: 1000 class folders of ``<wnid>_<n>.JPEG`` files."""
    per_class = -(-count // 1000)
    return [
        Sample(f"/data/imagenet/train/n{c:08d}/n{c:08d}_{i}.JPEG", c)
        for c in range(1000)
        for i in range(per_class)
    ][:count]


def _private_kb() -> int:
    """This process's private (unshared) resident memory, from /proc/self/smaps_rollup."""
    total = 0
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total


def _read_every_sample(samples: Sequence[Sample], queue: multiprocessing.Queue) -> None:
    before = _private_kb()
    checksum = 0
    for sample in samples:  # what a DataLoader worker does over an epoch: path and label of each
        checksum += len(sample.path) + sample.label
    queue.put((_private_kb() - before, checksum))


def index_bytes(samples: Sequence[Sample]) -> int:
    """Bytes of the objects an index is made of: the list, its tuples and path strings (labels are
    small shared ints); for a :class:`SampleArray`, its arrays and folder strings."""
    if isinstance(samples, SampleArray):
        return samples.nbytes + sum(sys.getsizeof(folder) for folder in samples.folders)
    return sys.getsizeof(samples) + sum(sys.getsizeof(s) + sys.getsizeof(s.path) for s in samples)


def index_memory(count: int) -> list[dict]:
    """Size of a ``count``-sample index and the private memory a forked worker adds reading it once."""
    rows = []
    context = multiprocessing.get_context("fork")
    for storage in ("list of Sample", "SampleArray"):
        samples: Sequence[Sample] = imagenet_like_samples(count)
        if storage == "SampleArray":
            samples = SampleArray(samples)
        queue = context.Queue()
        worker = context.Process(target=_read_every_sample, args=(samples, queue))
        worker.start()
        added_kb, _ = queue.get()
        worker.join()
        rows.append({
            "index": storage,
            "samples": count,
            "index_mb": index_bytes(samples) / 2**20,
            "worker_private_mb_after_one_pass": added_kb / 1024,
        })
        del samples
    return rows


def report(rows: list[dict], formats: list[dict], memory: list[dict], out: Path) -> None:
    print(f"\n{'measure':<8} {'decoder':<8} {'workers':>7} {'images/s':>10} {'per worker':>11} {'per CPU-s':>10}")
    for r in rows:
        cpu = "" if r["images_per_cpu_s"] is None else f"{r['images_per_cpu_s']:.0f}"
        print(
            f"{r['measure']:<8} {r['decoder']:<8} {r['workers']:>7} {r['images_per_s']:>10.0f} "
            f"{r['images_per_s_per_worker']:>11.0f} {cpu:>10}"
        )
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "data_pipeline.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows({k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    tables = [
        "Decoding, and decode + transform through a DataLoader:",
        markdown_table(rows),
        "The same JPEGs read through each dataset format (decode + eval transform, one thread, "
        "this process; goal: within 10% of the folder):",
        markdown_table(formats),
        "An ImageNet-sized index: its bytes, and the private memory a forked DataLoader worker adds by "
        "reading every sample's path and label once (copy-on-write pages it had to copy):",
        markdown_table(memory),
    ]
    (out / "data_pipeline.md").write_text("\n\n".join(tables) + "\n")
    print("\n" + "\n\n".join(tables[2:]))

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    decode = [r for r in rows if r["measure"] == "decode"]
    x = np.arange(len(decode))
    left.bar(x - 0.2, [r["images_per_s"] for r in decode], width=0.4, label="per wall second")
    left.bar(x + 0.2, [r["images_per_cpu_s"] for r in decode], width=0.4, label="per CPU second")
    left.set_xticks(x, [r["decoder"] for r in decode])
    left.set_title("JPEG decode, 500x375, one thread")
    left.set_ylabel("images / s")
    left.legend(fontsize=8)
    for measure, marker in (("train", "o"), ("eval", "s")):
        points = [r for r in rows if r["measure"] == measure]
        workers = [r["workers"] for r in points]
        right.plot(workers, [r["images_per_s"] for r in points], marker=marker, label=f"{measure} total")
        right.plot(workers, [r["images_per_s_per_worker"] for r in points], marker=marker, linestyle="--", label=f"{measure} per worker")
        cpu = [r for r in points if r["images_per_cpu_s"] is not None]
        right.scatter([r["workers"] for r in cpu], [r["images_per_cpu_s"] for r in cpu], marker="*", s=120, label=f"{measure} per CPU second")
    right.set_xticks(sorted({r["workers"] for r in rows if r["measure"] != "decode"}))
    right.axhline(150, color="grey", linewidth=0.8, linestyle=":", label="target: 150 train img/s per core")
    right.set_title("decode + transform through a DataLoader")
    right.set_xlabel("DataLoader workers (0 = main process)")
    right.set_ylabel("images / s")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "data_pipeline.png", dpi=120)
    plt.close(fig)
    print(f"\nwrote {out / 'data_pipeline.csv'}, {out / 'data_pipeline.md'} and {out / 'data_pipeline.png'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each measurement")
    parser.add_argument("--num-images", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--index-samples", type=int, default=1_281_167, help="size of the index whose memory is measured")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows, formats = run(args.workers, args.img_size, args.seconds, args.num_images, args.batch_size)
    report(rows, formats, index_memory(args.index_samples), args.out)


if __name__ == "__main__":
    main()
