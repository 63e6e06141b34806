"""``python cli.py kfold``: run ``fit`` once per fold of a k-fold split and report mean +- std per metric.

    python cli.py kfold --folds 5 --recipe folder --data.root /data/flowers [other fit flags]

Every flag except ``--folds`` and ``--run_dir`` is passed to ``fit`` unchanged; fold ``k`` runs with
``--data.num_folds N --data.fold k --run_dir RUN_DIR/fold{k}`` (``RUN_DIR`` default ``runs/kfold``).
A fold's result is the best validation epoch recorded in its ``last.ckpt``. The table (each fold,
mean and sample standard deviation) is printed and written to ``RUN_DIR/kfold.csv``. The first fold
that fails stops the command with its exit code.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .record import CheckpointRecord

__all__ = ["METRICS", "main", "summarize"]

METRICS = ("top1", "top5", "mean_class_acc")


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """(mean, sample standard deviation) of each of :data:`METRICS` over the folds' results."""
    summary = {}
    for metric in METRICS:
        values = [float(r[metric]) for r in results]
        summary[metric] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    return summary


def _fold_result(run_dir: Path) -> dict[str, Any]:
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise FileNotFoundError(f"{last} not found: each fold needs checkpointing on to report its best epoch")
    record = CheckpointRecord.from_checkpoint(torch.load(last, map_location="cpu", weights_only=True), str(last))
    best = record.best  # the best validation epoch of the run (``metrics``: the last epoch's weights)
    if best is None or best.split != "val":
        raise ValueError(f"{last} records no validation metrics: is validation turned off?")
    return dataclasses.asdict(best)


def _report(results: list[dict[str, Any]], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    summary = summarize(results)
    table = Table(title=f"{len(results)}-fold cross-validation (best validation epoch of each fold)")
    table.add_column("fold")
    table.add_column("best epoch", justify="right")
    for metric in METRICS:
        table.add_column(metric, justify="right")
    for fold, result in enumerate(results):
        table.add_row(str(fold), str(result["epoch"]), *(f"{100 * result[m]:.2f}" for m in METRICS))
    table.add_row("mean +- std", "", *(f"{100 * mean:.2f} +- {100 * std:.2f}" for mean, std in summary.values()))
    Console().print(table)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "kfold.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["fold", "epoch", *METRICS])
        for fold, result in enumerate(results):
            writer.writerow([fold, result["epoch"], *(result[m] for m in METRICS)])
        writer.writerow(["mean", "", *(mean for mean, _ in summary.values())])
        writer.writerow(["std", "", *(std for _, std in summary.values())])
    Console().print(f"wrote {out / 'kfold.csv'}")


def main(argv: Sequence[str]) -> int:
    """Entry point of ``cli.py kfold``; returns the exit code."""
    from .cli import main as cli_main

    parser = argparse.ArgumentParser(
        prog="cli.py kfold", description=__doc__.splitlines()[0], epilog="Other flags are passed to fit."
    )
    parser.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    parser.add_argument("--run_dir", default="runs/kfold", help="fold k is written to RUN_DIR/fold{k}")
    args, fit_args = parser.parse_known_args(list(argv))
    if args.folds < 2:
        print(f"error: --folds {args.folds}: expected at least 2", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir)
    results = []
    for fold in range(args.folds):
        fold_dir = run_dir / f"fold{fold}"
        fold_flags = ["--data.num_folds", str(args.folds), "--data.fold", str(fold), "--run_dir", str(fold_dir)]
        code = cli_main(["fit", *fit_args, *fold_flags])
        if code:
            return code
        try:
            results.append(_fold_result(fold_dir))
        except (FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    _report(results, run_dir)
    return 0
