"""Training throughput of ``cli.py fit`` against a plain PyTorch loop over the same model and loader.

One ``python cli.py fit --recipe demo`` process per setting (validation off, its output on a
pseudo-terminal as in a user's shell: the progress bar draws only on a terminal) runs the demo
recipe's iRPE-DeiT, synthetic CUB data, transforms and batch size with every callback, logger and
the progress bar of the command line. A benchmark callback added to it (``PlainSteps``) follows
every training step of the fit by one step of a hand-written loop over the same ``model``: AdamW
over the module's ``param_groups()``, cross entropy with the recipe's label smoothing, the gradient
norm clipped at the recipe's ``trainer.gradient_clip_val`` (as timm's ``--clip-grad`` does), the lr
fixed, its batches from a second training loader that the datamodule builds as it built the fit's
(same dataset, transforms, batch size and workers). Each pair of steps is tens of milliseconds
apart: this shared 2-core machine changes speed by up to 1.6x for tens of seconds at a time (both
loops alike), which turned separate processes into +-20% between candidates and epoch-by-epoch
pairs into single ratios from 0.66 to 1.36.

The fit's step is one whole Lightning iteration (hooks, logging, progress bar, the batch fetch,
forward, backward, clipping, optimizer); the plain step its fetch, forward, backward, clipping and
optimizer. From step ``--skip`` + 1 of every epoch on, images/s is the median over steps; the table
gives the median over pairs of the cli / plain ratio with its quartiles, and the ratio from all
images over all step time, over the run and per epoch (min-max).
Settings: ``defaults`` (no thread or worker setting: ``datamodules.machine`` chooses them),
``oversubscribed`` (``OMP_NUM_THREADS`` = all cores and 8 workers, what the recipes did before),
``no bar, no logger`` (the defaults without the progress bar and the loggers: Lightning's loop and
the project's callbacks) and ``196 tokens`` (the defaults with 112-pixel images: the demo model on a 14 x 14 patch grid, DeiT's at
224 pixels; a ~6x longer step, so Lightning's fixed work per step is a smaller share).

    python -m benchmarks.training_loop [--epochs 10] [--skip 2]
"""

from __future__ import annotations

import argparse
import json
import os
import pty
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning import Callback, LightningModule, Trainer
from torch import nn

from benchmarks.common import write_results
from datamodules.machine import available_cpus

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    "defaults": ({}, []),
    "oversubscribed": ({"OMP_NUM_THREADS": str(available_cpus())}, ["--data.num_workers", "8"]),
    "no bar, no logger": ({}, ["--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]),
    "196 tokens": ({}, ["--model.model_kwargs.img_size", "112"]),
}


def plain_step(model: nn.Module, batch: Any, optimizer: torch.optim.Optimizer, label_smoothing: float,
               clip: float | None) -> None:
    """One step of the hand-written loop: forward, cross entropy, backward, clipping, AdamW."""
    x, y = batch
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()


class PlainSteps(Callback):
    """Follows every training step of the fit by one plain step (``plain_step``) over the module's
    ``model``, on batches of a second training loader the datamodule builds as it built the fit's;
    writes the timed pairs of every epoch to the JSON file ``out``.

    The plain step runs at the end of the fit's ``on_train_batch_end`` and is timed with its batch
    fetch; the fit's step is the time from the end of one plain step to the start of the next: one
    whole Lightning iteration (the rest of the batch-end hooks, loop bookkeeping, logging, the fetch,
    the batch-start hooks, training step, backward, clipping, optimizer). The first ``skip`` steps of
    every epoch (worker start-up, epoch-end work) are not timed.
    """

    def __init__(self, out: str, skip: int = 2) -> None:
        self.out = out
        self.skip = skip
        self.epochs: list[list[list[float]]] = []  # per epoch: [cli images, cli s, plain images, plain s]
        self.optimizer: torch.optim.Optimizer | None = None
        self.loader: Any = None
        self.batches: Iterator[Any] | None = None
        self.last_end: float | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.datamodule is None:
            raise RuntimeError("PlainSteps needs a datamodule: it builds the plain loop's loader as the fit's")
        self.optimizer = torch.optim.AdamW(pl_module.param_groups())
        self.loader = trainer.datamodule.train_dataloader()

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.epochs.append([])
        self.last_end = None

    def _next_batch(self) -> Any:
        if self.batches is not None:
            batch = next(self.batches, None)
            if batch is not None:
                return batch
        self.batches = iter(self.loader)
        return next(self.batches)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        start = time.perf_counter()
        fit_step = None if self.last_end is None or batch_idx < self.skip else start - self.last_end
        plain_batch = self._next_batch()
        plain_step(pl_module.model, plain_batch, self.optimizer, pl_module.hparams.label_smoothing,
                   trainer.gradient_clip_val)
        self.last_end = time.perf_counter()
        if fit_step is not None:
            self.epochs[-1].append([len(batch[0]), fit_step, len(plain_batch[0]), self.last_end - start])

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        Path(self.out).write_text(json.dumps({"epochs": self.epochs, "threads": torch.get_num_threads(),
                                              "workers": trainer.train_dataloader.num_workers}))


def run_cli(data_root: str, epochs: int, skip: int, env: dict[str, str], extra: list[str], work: Path) -> dict:
    """``cli.py fit --recipe demo`` with ``PlainSteps``, on a pseudo-terminal; its JSON."""
    out = work / "pairs.json"
    args = [sys.executable, str(ROOT / "cli.py"), "fit", "--recipe", "demo", "--data.root", data_root,
            "--trainer.max_epochs", str(epochs), "--trainer.limit_val_batches", "0", "--model.num_classes", "10",
            "--run_dir", str(work / "run"), *extra,
            "--trainer.callbacks+=benchmarks.training_loop.PlainSteps",
            f"--trainer.callbacks.out={out}", f"--trainer.callbacks.skip={skip}"]
    reader, writer = pty.openpty()
    output: list[bytes] = []

    def drain() -> None:  # the terminal's reader: the child would block on a full terminal
        while True:
            try:
                chunk = os.read(reader, 65536)
            except OSError:  # Linux: EIO once the child's side is closed
                return
            if not chunk:
                return
            output.append(chunk)

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    with subprocess.Popen(args, cwd=ROOT, env={**os.environ, **env}, stdin=subprocess.DEVNULL,
                          stdout=writer, stderr=writer) as process:
        os.close(writer)
        returncode = process.wait()
    thread.join()
    os.close(reader)
    if returncode != 0:
        tail = " | ".join(b"".join(output).decode(errors="replace").strip().splitlines()[-3:])
        raise RuntimeError(f"cli.py fit failed ({returncode}): {tail}")
    return json.loads(out.read_text())


def images_per_s(pairs: list[list[float]], candidate: str) -> list[float]:
    """Images / step time of every timed step of ``candidate`` (``cli`` or ``plain``)."""
    column = 0 if candidate == "cli" else 2
    return [pair[column] / pair[column + 1] for pair in pairs]


def ratio_of_means(pairs: list[list[float]]) -> float:
    """cli / plain from all timed images over all step time of each."""
    cli = sum(p[0] for p in pairs) / sum(p[1] for p in pairs)
    plain = sum(p[2] for p in pairs) / sum(p[3] for p in pairs)
    return cli / plain


def summarize(epochs: list[list[list[float]]]) -> dict[str, Any]:
    """The table's columns for one setting from ``PlainSteps``' epochs of timed pairs."""
    pairs = [pair for epoch in epochs for pair in epoch]
    cli, plain = images_per_s(pairs, "cli"), images_per_s(pairs, "plain")
    ratios = [c / p for c, p in zip(cli, plain, strict=True)]
    lower, median, upper = statistics.quantiles(ratios, n=4)
    per_epoch = [ratio_of_means(epoch) for epoch in epochs if epoch]
    return {
        "pairs": len(pairs),
        "cli images/s": statistics.median(cli),
        "plain images/s": statistics.median(plain),
        "cli / plain": median,
        "cli / plain quartiles": f"{lower:.3f}-{upper:.3f}",
        "cli / plain of means": ratio_of_means(pairs),
        "of means per epoch": f"{min(per_epoch):.3f}-{max(per_epoch):.3f}",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10, help="training epochs of the fit")
    parser.add_argument("--skip", type=int, default=2, help="steps of each epoch not timed")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data_root = str(Path(tmp) / "demo-data")
        for name in args.settings:
            env, extra = SETTINGS[name]
            work = Path(tmp) / name
            work.mkdir()
            result = run_cli(data_root, args.epochs, args.skip, env, extra, work)
            rows.append({"setting": name, "workers": result["workers"], "threads": result["threads"],
                         **summarize(result["epochs"])})
    notes = (f"Demo recipe, one cli.py fit per setting ({args.epochs} epochs); every training step of the fit is "
             "followed by a step of a plain PyTorch loop over the same model (its batches from a second loader "
             f"built like the fit's), from step {args.skip + 1} of each epoch on. images/s = median over steps; "
             "cli / plain = median over pairs of the two neighbouring steps' ratio, with its quartiles; 'of means' = "
             "all images / all step time of each, over the run and per epoch (min-max); "
             f"{available_cpus()} CPU cores available. Target (issue 15): cli / plain >= 0.97 compute-bound.")
    write_results("training_loop", rows, notes=notes)


if __name__ == "__main__":
    main()
