"""Training throughput of ``cli.py fit`` against a plain PyTorch loop over the same model and loader.

Both run the demo recipe (``recipes/demo.yaml``: its iRPE-DeiT, its synthetic CUB data, its
transforms and batch size) in a fresh process each, as a user runs them:

- ``cli``: ``python cli.py fit --recipe demo`` with validation off, timed by a callback;
- ``plain``: the same datamodule's ``train_dataloader()`` and the same ``ImageClassifier``'s
  ``model`` and ``param_groups()``, stepped by a hand-written loop (AdamW, cross entropy with the
  recipe's label smoothing, the schedule's lr fixed at its peak).

Images/s counts the training batches of every epoch from its ``--skip``-th batch on (data waits
included, validation and checkpoints excluded). Each setting runs ``--rounds`` times, the candidates
interleaved; the table gives each candidate's median and spread (min-max) over the rounds, and the
median and spread of the per-round ratio cli / plain (both candidates of a round run back to back, so
a slow spell of the machine moves one round's ratio, not the median).
Settings: ``defaults`` (no thread or worker setting: ``datamodules.machine`` chooses them) and
``oversubscribed`` (``OMP_NUM_THREADS`` = all cores and 8 workers, what the recipes did before).

    python -m benchmarks.training_loop [--rounds 3] [--epochs 3] [--skip 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning import Callback, LightningModule, Trainer

from benchmarks.common import round_ratios, write_results
from datamodules.machine import available_cpus, default_num_threads

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    "defaults": ({}, []),
    "oversubscribed": ({"OMP_NUM_THREADS": str(available_cpus())}, ["--data.num_workers", "8"]),
}


class TrainThroughput(Callback):
    """Writes the images/s of each training epoch (from batch ``skip`` on) to the JSON file ``out``."""

    def __init__(self, out: str, skip: int = 2) -> None:
        self.out = out
        self.skip = skip
        self.epochs: list[dict[str, Any]] = []
        self.start = 0.0
        self.images = 0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.skip:
            self.start = time.perf_counter()
            self.images = 0

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx >= self.skip:
            self.images += len(batch[0])

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.epochs.append({"images": self.images, "seconds": time.perf_counter() - self.start})

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        Path(self.out).write_text(json.dumps({"epochs": self.epochs, "threads": torch.get_num_threads(),
                                              "workers": trainer.datamodule.num_workers}))


def recipe_args(data_root: str, epochs: int, extra: list[str], work: Path) -> list[str]:
    return ["--recipe", "demo", "--data.root", data_root, "--trainer.max_epochs", str(epochs),
            "--trainer.limit_val_batches", "0", "--model.num_classes", "10", "--run_dir", str(work / "run"), *extra]


def run_cli(data_root: str, epochs: int, skip: int, env: dict[str, str], extra: list[str], work: Path) -> dict:
    out = work / "cli.json"
    args = [sys.executable, str(ROOT / "cli.py"), "fit", *recipe_args(data_root, epochs, extra, work),
            "--trainer.callbacks+=benchmarks.training_loop.TrainThroughput",
            f"--trainer.callbacks.out={out}", f"--trainer.callbacks.skip={skip}"]
    _child(args, env)
    return json.loads(out.read_text())


def run_plain(data_root: str, epochs: int, skip: int, env: dict[str, str], extra: list[str], work: Path) -> dict:
    out = work / "plain.json"
    args = [sys.executable, "-m", "benchmarks.training_loop", "--child", json.dumps(
        {"data_root": data_root, "epochs": epochs, "skip": skip, "extra": extra, "out": str(out), "work": str(work)})]
    _child(args, env)
    return json.loads(out.read_text())


def _child(args: list[str], env: dict[str, str]) -> None:
    result = subprocess.run(args, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
    if result.returncode != 0:
        tail = " | ".join(result.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"{' '.join(args[:3])} failed ({result.returncode}): {tail}")


def plain_loop(spec: dict[str, Any]) -> None:
    """The child of ``run_plain``: the recipe's objects, built by the CLI's parser, stepped by hand."""
    from finetune.cli import FinetuneCLI, expand_recipe
    from finetune.module import ImageClassifier

    args = recipe_args(spec["data_root"], spec["epochs"], spec["extra"], Path(spec["work"]))
    cli = FinetuneCLI(ImageClassifier, None, args=expand_recipe(args), run=False)
    data, module = cli.datamodule, cli.model
    torch.manual_seed(0)
    data.prepare_data()
    data.setup("fit")
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(default_num_threads(1, data.num_workers))
    model = module.model.train()
    optimizer = torch.optim.AdamW(module.param_groups())
    loader = data.train_dataloader()
    smoothing = module.hparams.label_smoothing
    epochs = []
    for _ in range(spec["epochs"]):
        start, images = time.perf_counter(), 0
        for batch_idx, (x, y) in enumerate(loader):
            if batch_idx == spec["skip"]:
                start, images = time.perf_counter(), 0
            loss = F.cross_entropy(model(x), y, label_smoothing=smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if batch_idx >= spec["skip"]:
                images += len(x)
        epochs.append({"images": images, "seconds": time.perf_counter() - start})
    Path(spec["out"]).write_text(json.dumps({"epochs": epochs, "threads": torch.get_num_threads(),
                                             "workers": data.num_workers}))


def images_per_s(result: dict) -> float:
    """Images/s of a run: all measured epochs together (the first epoch's worker start-up excluded by skip)."""
    return sum(e["images"] for e in result["epochs"]) / sum(e["seconds"] for e in result["epochs"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--skip", type=int, default=2, help="batches of each epoch not timed")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        plain_loop(json.loads(args.child))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data_root = str(Path(tmp) / "demo-data")
        for name in args.settings:
            env, extra = SETTINGS[name]
            measured: dict[str, list[dict]] = {"cli": [], "plain": []}
            for round_ in range(args.rounds):
                for candidate, run in (("cli", run_cli), ("plain", run_plain)):
                    work = Path(tmp) / f"{name}-{candidate}-{round_}"
                    work.mkdir()
                    measured[candidate].append(run(data_root, args.epochs, args.skip, env, extra, work))
            speeds = {c: [images_per_s(r) for r in results] for c, results in measured.items()}
            # each round's cli / plain (images/s of the same round), then their median and range
            ratio, lowest, highest = round_ratios(speeds["cli"], speeds["plain"])
            rows.append({
                "setting": name,
                "workers": measured["cli"][0]["workers"],
                "threads (cli / plain)": f"{measured['cli'][0]['threads']} / {measured['plain'][0]['threads']}",
                "cli images/s": statistics.median(speeds["cli"]),
                "cli spread": f"{min(speeds['cli']):.0f}-{max(speeds['cli']):.0f}",
                "plain images/s": statistics.median(speeds["plain"]),
                "plain spread": f"{min(speeds['plain']):.0f}-{max(speeds['plain']):.0f}",
                "cli / plain": ratio,
                "cli / plain spread": f"{lowest:.3f}-{highest:.3f}",
            })
    notes = (f"Demo recipe, {args.epochs} epochs, {args.rounds} interleaved rounds per candidate, batches from "
             f"number {args.skip + 1} of each epoch on timed; {available_cpus()} CPU cores available. "
             "Target (issue 15): cli / plain >= 0.97 with the defaults.")
    write_results("training_loop", rows, notes=notes)


if __name__ == "__main__":
    main()
