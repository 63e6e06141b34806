"""Datasets written once to WebDataset tar shards, and trained from local or remote shards with DDP.

Why WebDataset (not litdata): a shard is a plain POSIX tar of the original encoded image files (and
a label file per sample), readable by ``tar``, by ``webdataset`` itself and by timm's own WebDataset
reader; the ``webdataset`` package is one small pure-Python dependency (litdata pulls boto3, obstore
and requests) and opens local paths and ``http(s)://``, ``gs://``, ``hf://`` or ``pipe:`` URLs,
with an optional local cache. What it leaves to the user, splitting shards over ranks and workers
with equal sample counts (which DDP needs), is done here in :class:`ShardStream`.

Layout written by :func:`write_shards` (``python cli.py shards``)::

    OUT/dataset.json              classes, and per split the shard names and their sample counts
    OUT/train-000000.tar ...      per sample: KEY.jpg (or .png, ... the original bytes), KEY.cls
    OUT/val-000000.tar ...        (the label), KEY.box (x1 y1 x2 y2) when the sample has a box
    OUT/test-000000.tar ...

The folder is written under a temporary name beside ``OUT`` and renamed into place when complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from .base import ImageClassificationDataModule
from .dataset import BadImageRegistry, ImageListDataset, crop_to_box
from .files import DataError
from .transforms import decode_rgb

__all__ = ["MANIFEST", "ShardDataModule", "ShardStream", "main", "write_shards"]

logger = logging.getLogger(__name__)

MANIFEST = "dataset.json"
FORMAT = "rpe-finetune webdataset shards v1"
_SHUFFLE_BUFFER = 1000

_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG", "png"), (b"RIFF", "webp"), (b"BM", "bmp"), (b"GIF8", "gif"))


def _extension(data: bytes, path: str) -> str:
    """The file extension of an encoded image: from its path when it has an image suffix, else its magic."""
    suffix = os.path.splitext(path)[1].lower().lstrip(".")
    if suffix in {"jpg", "jpeg", "png", "bmp", "webp", "gif", "tif", "tiff"}:
        return suffix
    return next((ext for magic, ext in _MAGIC if data.startswith(magic)), "img")


# -- writing --------------------------------------------------------------------------------------


def write_shards(splits: dict[str, ImageListDataset], classes: Sequence[str], out: Path, shard_size: int = 1000) -> Path:
    """Write each split's samples (the encoded bytes as stored, label, box) to tar shards in ``out``.

    ``out`` must not exist; it is filled under a temporary name and renamed into place only when every
    shard and the manifest are written, so a failure leaves nothing behind.
    """
    import webdataset as wds

    if shard_size < 1:
        raise DataError(f"shard_size={shard_size}: expected a positive number of samples per shard")
    if out.exists():
        raise DataError(f"{out} exists; remove it or choose another output folder (shards are written once)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        manifest: dict[str, Any] = {"format": FORMAT, "classes": list(classes), "splits": {}}
        for split, dataset in splits.items():
            # maxsize: rotate on the sample count alone, so the manifest's counts follow from it; an integer
            # mtime: a float one costs every member an extra pax header block that readers parse too
            with wds.ShardWriter(
                str(staging / f"{split}-%06d.tar"), maxcount=shard_size, maxsize=1e15, verbose=0, mtime=int(time.time())
            ) as writer:
                for index, sample in enumerate(dataset.samples):
                    data = dataset.encoded_image(index)
                    record = {"__key__": f"{index:09d}", _extension(data, sample.path): data, "cls": str(sample.label).encode()}
                    if sample.box is not None:
                        record["box"] = " ".join(repr(float(v)) for v in sample.box).encode()
                    writer.write(record)
            names = sorted(shard.name for shard in staging.glob(f"{split}-*.tar"))
            counts = [shard_size] * (len(names) - 1) + [len(dataset) - shard_size * (len(names) - 1)]
            manifest["splits"][split] = {"shards": names, "counts": counts if names else []}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        os.rename(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


# -- reading --------------------------------------------------------------------------------------


def _open(url: str) -> Any:
    if "://" in url or url.startswith("pipe:"):
        from webdataset import gopen

        return gopen(url, "rb")
    return open(url, "rb")


def read_manifest(root: str) -> dict[str, Any]:
    url = f"{root.rstrip('/')}/{MANIFEST}"
    try:
        with _open(url) as f:
            manifest = json.loads(f.read())
    except FileNotFoundError:
        raise FileNotFoundError(f"shard manifest not found: {url} (write shards with: python cli.py shards ...)") from None
    except (OSError, ValueError) as err:
        raise DataError(f"{url}: not a readable shard manifest ({err})") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{url}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


class ShardStream(IterableDataset):
    """One split's shards as a stream of ``(transform(rgb_uint8_hwc), label)``, split over DDP ranks
    and DataLoader workers ("consumers", ``world_size * num_workers`` of them).

    Training (``shuffle``): every epoch the shard order is shuffled (the same on every rank, from
    ``seed`` and the epoch, which each worker counts itself: workers must be persistent); consumer c
    reads the shards c, c + C, ... (or, with fewer shards than consumers, every shard keeping every
    C-th sample) through a shuffle buffer, cycling when its shards run out, and yields exactly
    ``total // C`` samples, so every rank sees the same number of batches. Evaluation: the shards in
    order, consumer c keeping samples c, c + C, ... (each sample on one rank only; the last
    ``total % C`` samples are left out). An unreadable image is logged, counted against
    ``bad_images`` and replaced by the consumer's previous sample.
    """

    def __init__(
        self,
        urls: Sequence[str],
        counts: Sequence[int],
        transform: Callable[[np.ndarray], Any] | None,
        shuffle: bool,
        seed: int,
        bad_images: BadImageRegistry,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        self.urls = list(urls)
        self.counts = list(counts)
        self.transform = transform
        self.shuffle = shuffle
        self.seed = seed
        self.bad_images = bad_images
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.cache_dir = cache_dir
        self.epoch = 0  # iterations started by this process (per worker with persistent workers)
        self._augment_seed: int | None = None

    @property
    def consumers(self) -> int:
        return self.world_size * max(self.num_workers, 1)

    def __len__(self) -> int:
        """Samples this rank yields per epoch."""
        return (sum(self.counts) // self.consumers) * max(self.num_workers, 1)

    def reseed(self, seed: int) -> None:
        """Reseed the transform's random generators (see :meth:`ImageListDataset.reseed`)."""
        set_random_seed = getattr(self.transform, "set_random_seed", None)
        if set_random_seed is not None:
            set_random_seed(seed)

    def _consumer(self) -> int:
        info = torch.utils.data.get_worker_info()
        return self.rank * max(self.num_workers, 1) + (info.id if info is not None else 0)

    def _records(self, urls: list[str]) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        dataset = wds.WebDataset(
            urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False, cache_dir=self.cache_dir
        )
        yield from dataset

    def _plan(self, consumer: int) -> tuple[list[str], int, int]:
        """(this consumer's shard urls, keep every n-th record, starting at record r) for this epoch."""
        order = np.arange(len(self.urls))
        if self.shuffle:
            order = np.random.default_rng((self.seed, self.epoch)).permutation(order)
        urls = [self.urls[i] for i in order]
        if self.shuffle and len(urls) >= self.consumers:
            return urls[consumer :: self.consumers], 1, 0
        return urls, self.consumers, consumer

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        consumer = self._consumer()
        quota = sum(self.counts) // self.consumers
        urls, step, start = self._plan(consumer)
        rng = np.random.default_rng((self.seed, self.epoch, consumer))
        self.epoch += 1
        buffer: list[dict[str, Any]] = []
        previous: tuple[Any, int] | None = None
        yielded = 0
        while yielded < quota:
            found = False
            for position, record in enumerate(self._records(urls)):
                if position % step != start:
                    continue
                found = True
                if self.shuffle:
                    buffer.append(record)
                    if len(buffer) < _SHUFFLE_BUFFER:
                        continue
                    record = buffer.pop(int(rng.integers(len(buffer))))
                item = self._item(record) or previous
                if item is not None:
                    previous = item
                    yield item
                    yielded += 1
                    if yielded == quota:
                        return
            while buffer and yielded < quota:
                item = self._item(buffer.pop(int(rng.integers(len(buffer))))) or previous
                if item is not None:
                    previous = item
                    yield item
                    yielded += 1
            if not self.shuffle or not found:
                break  # evaluation reads each sample once; a consumer without records cannot cycle
        while 0 < yielded < quota and previous is not None:  # only after unreadable images
            yield previous
            yielded += 1

    def _item(self, record: dict[str, Any]) -> tuple[Any, int] | None:
        name = f"{record.get('__url__', '?')}:{record['__key__']}"
        image_key = next((k for k in record if not k.startswith("__") and k not in ("cls", "box")), None)
        try:
            if image_key is None:
                raise OSError(f"{name}: no image file in the sample")
            image = decode_rgb(record[image_key], name)
        except OSError as err:
            logger.warning("skipping unreadable image %s (%s)", name, err)
            self.bad_images.add(name)
            return None
        if "box" in record:
            x1, y1, x2, y2 = (float(v) for v in record["box"].split())
            image = crop_to_box(image, (x1, y1, x2, y2))
        label = int(record["cls"])
        return (image if self.transform is None else self.transform(image)), label


class ShardDataModule(ImageClassificationDataModule):
    """Splits written by ``python cli.py shards`` (see the module docstring), local or remote.

    Args:
        root: the shard folder, or a URL prefix webdataset opens (``https://host/path``, ``gs://...``).
        cache_dir: keep a local copy of remote shards here (webdataset's file cache).
        **kwargs: see :class:`ImageClassificationDataModule`; ``val_split`` and ``num_folds`` must stay
            off (carve them before writing the shards) and workers must be persistent.
    """

    def __init__(self, root: str, *, cache_dir: str | None = None, **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        if self.val_split or self.num_folds:
            raise DataError(
                "val_split / num_folds: shards are streamed in order, so hold-out splits cannot be carved from them; "
                "set them on the datamodule you write the shards from"
            )
        if self.num_workers and not self.persistent_workers:
            raise DataError("persistent_workers=False: shard streams count epochs per worker, so workers must persist")
        self.source = root
        self.cache_dir = cache_dir
        self._manifest: dict[str, Any] | None = None

    @property
    def manifest(self) -> dict[str, Any]:
        if self._manifest is None:
            self._manifest = read_manifest(self.source)
        return self._manifest

    def read_class_names(self) -> list[str]:
        return list(self.manifest["classes"])

    def split_names(self) -> tuple[str, str | None, str | None]:
        splits = self.manifest["splits"]
        return "train", "val" if "val" in splits else None, "test" if "test" in splits else None

    def _stream(self, split: str, transform: Any, shuffle: bool) -> ShardStream:
        entry = self.manifest["splits"][split]
        if self._bad_images is None:
            self._bad_images = BadImageRegistry(self.max_bad_images)
        trainer = self.trainer
        return ShardStream(
            [f"{self.source.rstrip('/')}/{name}" for name in entry["shards"]],
            entry["counts"],
            transform,
            shuffle,
            self.seed,
            self._bad_images,
            rank=trainer.global_rank if trainer is not None else 0,
            world_size=trainer.world_size if trainer is not None else 1,
            num_workers=self.num_workers,
            cache_dir=self.cache_dir,
        )

    def setup(self, stage: str | None = None) -> None:
        _, val, test = self.split_names()
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._stream("train", self.train_transform, shuffle=True)
        needs_test = stage in (None, "test") or (stage in ("fit", "validate") and val is None)
        if needs_test and self.test_dataset is None and (test or val):
            self.test_dataset = self._stream(test or val, self.eval_transform, shuffle=False)
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            self.val_dataset = self._stream(val, self.eval_transform, shuffle=False) if val else self.test_dataset

    @classmethod
    def root_can_be_missing(cls, root: str | None, init_args: dict[str, Any]) -> bool:
        return root is not None and "://" in root  # a URL prefix webdataset opens

    def prepare_data(self) -> None:
        """Read the manifest (a one-line error when it is missing or not ours) before anything is written."""
        self.split_names()


# -- the command ----------------------------------------------------------------------------------


def main(argv: Sequence[str]) -> int:
    """``python cli.py shards --data CLASS --data.root PATH [--data.* ...] --out DIR [--shard_size N]``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="cli.py shards", description="Write a datamodule's splits to WebDataset tar shards.")
    parser.add_subclass_arguments(ImageClassificationDataModule, "data", required=True)
    parser.add_argument("--out", type=str, required=True, help="the shard folder to create (must not exist)")
    parser.add_argument("--shard_size", type=int, default=1000, help="samples per shard")
    try:
        config = parser.parse_args(list(argv))
        datamodule = parser.instantiate_classes(config).data
        out = Path(os.path.expanduser(config.out))
        if out.exists():
            raise DataError(f"{out} exists; remove it or choose another --out (shards are written once)")
        datamodule.prepare_data()
        datamodule.setup()
        splits = {"train": datamodule.train_dataset}
        if datamodule.val_dataset is not datamodule.test_dataset:
            splits["val"] = datamodule.val_dataset
        splits["test"] = datamodule.test_dataset
        write_shards({k: v.with_transform(None) for k, v in splits.items()}, datamodule.class_names, out, config.shard_size)
    except (DataError, FileNotFoundError) as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    sizes = ", ".join(f"{name} {len(dataset)}" for name, dataset in splits.items())
    print(f"wrote {out}: {sizes} samples")
    return 0

