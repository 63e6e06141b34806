"""Training throughput of ``cli.py fit`` against a plain PyTorch loop over the same model and loader.

One ``python cli.py fit --recipe demo`` process per setting (validation off, its output on a
pseudo-terminal as in a user's shell: the progress bar draws only on a terminal) runs the demo
recipe's iRPE-DeiT, synthetic CUB data, transforms and batch size with every callback, logger and
the progress bar of the command line. A benchmark callback added to it (``PlainEpochs``) times the
fit's training steps and, after each of its epochs, runs one epoch of a hand-written loop over the
same ``model`` and the same training loader: AdamW over the module's ``param_groups()``, cross
entropy with the recipe's label smoothing, the gradient norm clipped at the recipe's
``trainer.gradient_clip_val`` (as timm's ``--clip-grad`` does), the lr fixed. So each cli epoch has a
plain epoch seconds away in the same process: this shared 2-core machine changes speed by up to 1.6x
for tens of seconds at a time (both loops alike), which separate processes turned into +-20% between
candidates.

A step is timed from the start of one training batch to the start of the next (data wait, forward,
backward, optimizer and, for ``cli``, Lightning's hooks, logging and progress bar), from the
``--skip``-th batch of every epoch on. Images/s is the median over an epoch's steps of images / step
time (slow spells move a mean more); the table gives each candidate's median and spread (min-max)
over the ``--epochs`` pairs, the median and spread of the per-pair ratio cli / plain, and that ratio
from each epoch's mean (all images / all step time).
Settings: ``defaults`` (no thread or worker setting: ``datamodules.machine`` chooses them) and
``oversubscribed`` (``OMP_NUM_THREADS`` = all cores and 8 workers, what the recipes did before).

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning import Callback, LightningModule, Trainer
from torch import nn

from benchmarks.common import round_ratios, write_results
from datamodules.machine import available_cpus

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    "defaults": ({}, []),
    "oversubscribed": ({"OMP_NUM_THREADS": str(available_cpus())}, ["--data.num_workers", "8"]),
}


class StepTimes:
    """The (images, seconds) of every timed step of one epoch: from one batch's start to the next one's,
    from the ``skip``-th batch on (the last batch has no next start and is not timed)."""

    def __init__(self, skip: int, clock: Callable[[], float] = time.perf_counter) -> None:
        self.skip = skip
        self.clock = clock
        self.steps: list[tuple[int, float]] = []
        self._previous: tuple[int, float] | None = None

    def batch_start(self, batch_idx: int, images: int) -> None:
        now = self.clock()
        if self._previous is not None and batch_idx > self.skip:
            self.steps.append((self._previous[0], now - self._previous[1]))
        self._previous = (images, now)


def plain_epoch(model: nn.Module, loader: Any, optimizer: torch.optim.Optimizer, label_smoothing: float,
                clip: float | None, skip: int) -> list[tuple[int, float]]:
    """One epoch of the hand-written loop; returns its timed steps (``StepTimes``)."""
    times = StepTimes(skip)
    with torch.enable_grad():
        for batch_idx, (x, y) in enumerate(loader):
            times.batch_start(batch_idx, len(x))
            loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
    return times.steps


class PlainEpochs(Callback):
    """Times the fit's training steps and runs a plain epoch (``plain_epoch``) after each of its epochs,
    over the module's ``model`` and the trainer's training loader; writes both to the JSON file ``out``."""

    def __init__(self, out: str, skip: int = 2) -> None:
        self.out = out
        self.skip = skip
        self.pairs: list[dict[str, list]] = []
        self.times = StepTimes(skip)
        self.optimizer: torch.optim.Optimizer | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.optimizer = torch.optim.AdamW(pl_module.param_groups())

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.times = StepTimes(self.skip)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.times.batch_start(batch_idx, len(batch[0]))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        plain = plain_epoch(pl_module.model, trainer.train_dataloader, self.optimizer,
                            pl_module.hparams.label_smoothing, trainer.gradient_clip_val, self.skip)
        self.pairs.append({"cli": self.times.steps, "plain": plain})

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        Path(self.out).write_text(json.dumps({"pairs": self.pairs, "threads": torch.get_num_threads(),
                                              "workers": trainer.train_dataloader.num_workers}))


def run_cli(data_root: str, epochs: int, skip: int, env: dict[str, str], extra: list[str], work: Path) -> dict:
    """``cli.py fit --recipe demo`` with ``PlainEpochs``, on a pseudo-terminal; its JSON."""
    out = work / "pairs.json"
    args = [sys.executable, str(ROOT / "cli.py"), "fit", "--recipe", "demo", "--data.root", data_root,
            "--trainer.max_epochs", str(epochs), "--trainer.limit_val_batches", "0", "--model.num_classes", "10",
            "--run_dir", str(work / "run"), *extra,
            "--trainer.callbacks+=benchmarks.training_loop.PlainEpochs",
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


def images_per_s(steps: list) -> float:
    """Median over timed steps of images / step time."""
    return statistics.median(images / seconds for images, seconds in steps)


def mean_images_per_s(steps: list) -> float:
    """All timed images / all timed step time."""
    return sum(images for images, _ in steps) / sum(seconds for _, seconds in steps)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10, help="cli epochs, each followed by a plain one")
    parser.add_argument("--skip", type=int, default=2, help="batches of each epoch not timed")
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
            pairs = result["pairs"]
            speeds = {c: [images_per_s(p[c]) for p in pairs] for c in ("cli", "plain")}
            means = {c: [mean_images_per_s(p[c]) for p in pairs] for c in ("cli", "plain")}
            # each pair's cli / plain, then their median and range
            ratio, lowest, highest = round_ratios(speeds["cli"], speeds["plain"])
            rows.append({
                "setting": name,
                "workers": result["workers"],
                "threads": result["threads"],
                "cli images/s": statistics.median(speeds["cli"]),
                "cli spread": f"{min(speeds['cli']):.0f}-{max(speeds['cli']):.0f}",
                "plain images/s": statistics.median(speeds["plain"]),
                "plain spread": f"{min(speeds['plain']):.0f}-{max(speeds['plain']):.0f}",
                "cli / plain": ratio,
                "cli / plain spread": f"{lowest:.3f}-{highest:.3f}",
                "cli / plain of means": round_ratios(means["cli"], means["plain"])[0],
            })
    notes = (f"Demo recipe, one cli.py fit per setting: {args.epochs} training epochs, each followed by a plain "
             f"epoch in the same process; steps from batch number {args.skip + 1} of each epoch on timed; images/s = "
             "median over an epoch's steps of images / step time; 'of means' = median over pairs of the ratio of all "
             f"images / all step time; {available_cpus()} CPU cores available. "
             "Target (issue 15): cli / plain >= 0.97 with the defaults.")
    write_results("training_loop", rows, notes=notes)


if __name__ == "__main__":
    main()
