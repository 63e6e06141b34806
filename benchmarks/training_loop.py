"""Training throughput of ``cli.py fit`` against a plain PyTorch loop over the same model and loader.

Both run the demo recipe (``recipes/demo.yaml``: its iRPE-DeiT, its synthetic CUB data, its
transforms and batch size) in a fresh process each, as a user runs them:

- ``cli``: ``python cli.py fit --recipe demo`` with validation off, timed by a callback, its output on a
  pseudo-terminal as in a user's shell (the progress bar draws only on a terminal);
- ``plain``: the same datamodule's ``train_dataloader()`` and the same ``ImageClassifier``'s
  ``model`` and ``param_groups()``, stepped by a hand-written loop doing the recipe's arithmetic
  (AdamW, cross entropy with the recipe's label smoothing, gradient norm clipped at the recipe's
  ``trainer.gradient_clip_val`` as timm's ``--clip-grad`` does; the schedule's lr fixed at its peak).

A step is timed from the start of one training batch to the start of the next (data wait, forward,
backward, optimizer and, for ``cli``, Lightning's hooks, logging and progress bar), from the ``--skip``-th
batch of every epoch on. Images/s is the median over a run's steps of images / step time: this shared
machine has slow spells (stretches of ~10 steps at +40%, seen in both loops alike) that move a run's
mean by +-15% and its median by little; the mean (all images / all step time) is given too. Each setting
runs ``--rounds`` times, the candidates interleaved; the table gives each candidate's median and spread
(min-max) over the rounds, and the median and spread of the per-round ratio cli / plain (both
candidates of a round run back to back).
Settings: ``defaults`` (no thread or worker setting: ``datamodules.machine`` chooses them) and
``oversubscribed`` (``OMP_NUM_THREADS`` = all cores and 8 workers, what the recipes did before).

    python -m benchmarks.training_loop [--rounds 3] [--epochs 3] [--skip 2]
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

from benchmarks.common import round_ratios, write_results
from datamodules.machine import available_cpus, default_num_threads

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    "defaults": ({}, []),
    "oversubscribed": ({"OMP_NUM_THREADS": str(available_cpus())}, ["--data.num_workers", "8"]),
}


class StepTimes:
    """The (images, seconds) of every timed step: from one batch's start to the next one's, from the
    ``skip``-th batch of each epoch on (an epoch's last batch has no next start and is not timed)."""

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

    def epoch_end(self) -> None:
        self._previous = None

    def write(self, out: str, threads: int, workers: int) -> None:
        Path(out).write_text(json.dumps({"steps": self.steps, "threads": threads, "workers": workers}))


class TrainThroughput(Callback):
    """Writes the step times of the training batches (``StepTimes``) to the JSON file ``out``."""

    def __init__(self, out: str, skip: int = 2) -> None:
        self.out = out
        self.times = StepTimes(skip)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.times.batch_start(batch_idx, len(batch[0]))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.times.epoch_end()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.times.write(self.out, torch.get_num_threads(), trainer.datamodule.num_workers)


def recipe_args(data_root: str, epochs: int, extra: list[str], work: Path) -> list[str]:
    return ["--recipe", "demo", "--data.root", data_root, "--trainer.max_epochs", str(epochs),
            "--trainer.limit_val_batches", "0", "--model.num_classes", "10", "--run_dir", str(work / "run"), *extra]


def run_cli(data_root: str, epochs: int, skip: int, env: dict[str, str], extra: list[str], work: Path) -> dict:
    out = work / "cli.json"
    args = [sys.executable, str(ROOT / "cli.py"), "fit", *recipe_args(data_root, epochs, extra, work),
            "--trainer.callbacks+=benchmarks.training_loop.TrainThroughput",
            f"--trainer.callbacks.out={out}", f"--trainer.callbacks.skip={skip}"]
    _child(args, env, terminal=True)
    return json.loads(out.read_text())


def run_plain(data_root: str, epochs: int, skip: int, env: dict[str, str], extra: list[str], work: Path) -> dict:
    out = work / "plain.json"
    args = [sys.executable, "-m", "benchmarks.training_loop", "--child", json.dumps(
        {"data_root": data_root, "epochs": epochs, "skip": skip, "extra": extra, "out": str(out), "work": str(work)})]
    _child(args, env)
    return json.loads(out.read_text())


def _child(args: list[str], env: dict[str, str], terminal: bool = False) -> None:
    """Runs a child to its end; on a ``terminal`` its output goes to a pseudo-terminal read by a thread."""
    if not terminal:
        result = subprocess.run(args, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
        returncode, output = result.returncode, result.stderr
    else:
        reader, writer = pty.openpty()
        chunks: list[bytes] = []

        def drain() -> None:
            while True:
                try:
                    chunk = os.read(reader, 65536)
                except OSError:  # Linux: EIO once the child's side is closed
                    return
                if not chunk:
                    return
                chunks.append(chunk)

        thread = threading.Thread(target=drain, daemon=True)
        thread.start()
        with subprocess.Popen(args, cwd=ROOT, env={**os.environ, **env}, stdin=subprocess.DEVNULL,
                              stdout=writer, stderr=writer) as process:
            os.close(writer)
            returncode = process.wait()
        thread.join()
        os.close(reader)
        output = b"".join(chunks).decode(errors="replace")
    if returncode != 0:
        tail = " | ".join(output.strip().splitlines()[-3:])
        raise RuntimeError(f"{' '.join(args[:3])} failed ({returncode}): {tail}")


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
    clip = cli.trainer.gradient_clip_val
    times = StepTimes(spec["skip"])
    for _ in range(spec["epochs"]):
        for batch_idx, (x, y) in enumerate(loader):
            times.batch_start(batch_idx, len(x))
            loss = F.cross_entropy(model(x), y, label_smoothing=smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
        times.epoch_end()
    times.write(spec["out"], torch.get_num_threads(), data.num_workers)


def images_per_s(result: dict) -> float:
    """Median over a run's timed steps of images / step time."""
    return statistics.median(images / seconds for images, seconds in result["steps"])


def mean_images_per_s(result: dict) -> float:
    """All timed images / all timed step time of a run."""
    return sum(images for images, _ in result["steps"]) / sum(seconds for _, seconds in result["steps"])


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
            means = {c: [mean_images_per_s(r) for r in results] for c, results in measured.items()}
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
                "cli / plain of means": round_ratios(means["cli"], means["plain"])[0],
            })
    notes = (f"Demo recipe, {args.epochs} epochs, {args.rounds} interleaved rounds per candidate, steps from batch "
             f"number {args.skip + 1} of each epoch on timed; images/s = median over a run's steps of images / step "
             "time; 'of means' = median over rounds of the ratio of all images / all step time; "
             f"{available_cpus()} CPU cores available. "
             "Target (issue 15): cli / plain >= 0.97 with the defaults.")
    write_results("training_loop", rows, notes=notes)


if __name__ == "__main__":
    main()
