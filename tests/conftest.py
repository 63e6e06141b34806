"""Shared fixtures: a tiny synthetic dataset in the CUB-200-2011 layout and the CLI flags of a tiny run."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from datamodules.synthetic import generate_synthetic_cub
from finetune.module import ImageClassifier

# A depth-1 iRPE-DeiT on 32 px images (4 x 4 patches): seconds per epoch on a CPU.
TINY_MODEL = "{depth: 1, embed_dim: 64, num_heads: 2, img_size: 32, patch_size: 8}"
# A depth-2 iRPE-DeiT for module-level tests (layer decay needs more than one block).
TINY = dict(depth=2, embed_dim=64, num_heads=2, img_size=32, patch_size=8)


def tiny_classifier(**kwargs) -> ImageClassifier:
    args = dict(model_name="irpe_deit_tiny_patch16_224", model_kwargs=TINY, num_classes=4, warmup_epochs=0)
    return ImageClassifier(**{**args, **kwargs})


def quiet_trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    """A CPU Trainer writing under ``tmp_path`` with no logger, progress bar, summary or sanity check;
    ``kwargs`` add to or override these."""
    settings = dict(
        accelerator="cpu", default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    return L.Trainer(**{**settings, **kwargs})


class ImageTensors(L.LightningDataModule):
    """A few random images with fixed labels, exposing num_classes / class_names as datamodules do."""

    def __init__(
        self, n: int = 12, num_classes: int = 4, batch_size: int = 5, labels: list[int] | None = None
    ) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 32, 32, generator=generator)
        self.y = torch.tensor(labels) if labels is not None else torch.arange(n) % num_classes
        self.num_classes = num_classes
        self.class_names = [f"class_{i}" for i in range(num_classes)]
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size)

    def class_counts(self) -> list[int]:
        return torch.bincount(self.y, minlength=self.num_classes).tolist()


@pytest.fixture(scope="session")
def synthetic_cub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 classes, 4 train + 2 test JPEGs each, CUB-200-2011 layout; returns the parent of CUB_200_2011."""
    root = tmp_path_factory.mktemp("synthetic_cub")
    generate_synthetic_cub(root, train_per_class=4, test_per_class=2, image_size=40)
    return root


def tiny_fit_args(
    root: Path | str, run_dir: Path, epochs: int = 2, datamodule: str = "datamodules.CUB200DataModule"
) -> list[str]:
    """Flags of a deterministic tiny fit of ``datamodule`` on ``root`` (no augmentation randomness,
    fresh workers per epoch)."""
    return [
        "--seed_everything", "0",
        "--run_dir", str(run_dir),
        "--model.model_name", "irpe_deit_tiny_patch16_224",
        "--model.model_kwargs", TINY_MODEL,
        "--model.warmup_epochs", "1",
        "--data", datamodule,
        "--data.root", str(root),
        "--data.batch_size", "8",
        "--data.num_workers", "1",
        "--data.persistent_workers", "false",
        "--trainer.accelerator", "cpu",
        "--trainer.devices", "1",
        "--trainer.max_epochs", str(epochs),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.log_every_n_steps", "1",
    ]


def folder_state(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path) with a digest of its bytes: equal states, equal folders."""
    return {
        str(path.relative_to(folder)): hashlib.sha1(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def read_metrics(path: Path) -> list[dict[str, str]]:
    """The rows of a ``metrics.csv``."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class StopAfterEpochs(Callback):
    """Stops fit cleanly after ``epochs`` epochs, as an interruption at an epoch boundary would."""

    def __init__(self, epochs: int = 1) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


class InterruptEvaluation(Callback):
    """Raises KeyboardInterrupt after the first test or predict batch, as Ctrl-C would."""

    def on_test_batch_end(self, *args: object) -> None:
        raise KeyboardInterrupt

    on_predict_batch_end = on_test_batch_end


class RecordRankMetrics(Callback):
    """Writes each rank's final callback metrics to ``folder/rank{N}.json`` (for the DDP test)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "test/"))}
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        (Path(self.folder) / f"rank{trainer.global_rank}.json").write_text(json.dumps(metrics))


class RaiseOutOfMemory(Callback):
    """Raises the error PyTorch raises when a batch does not fit on the device (for the CLI's message)."""

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: object, batch_idx: int) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def timm_checkpoint_file(model_name: str, path: Path, seed: int = 0, **kwargs: object) -> tuple[torch.nn.Module, Path]:
    """A timm model (eval mode) with random weights, none zero, and its state dict written to ``path``:
    what a pretrained timm checkpoint looks like, without a download."""
    import timm

    model = timm.create_model(model_name, **kwargs).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    torch.save(model.state_dict(), path)
    return model, path
