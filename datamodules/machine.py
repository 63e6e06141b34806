"""Thread and DataLoader-worker counts chosen from the machine, for settings the user left open.

Oversubscribing a CPU is the common way a default run goes slow: each training process runs its
intra-op threads plus its DataLoader workers, and torch's default (one intra-op thread per core) plus
a recipe's 8 workers put several busy threads on each core of a small machine. The defaults here give
each process on the node an equal share of the cores this process may run on (CPU affinity, so
containers and ``taskset`` count), one core of it for the training step and the rest, up to 8, for
data workers; on a CPU-only run the step's intra-op threads take what the workers leave
(``benchmarks/training_loop.py`` measures the effect).
"""

from __future__ import annotations

import os

import torch
from lightning import Callback, LightningModule, Trainer

__all__ = ["MAX_DEFAULT_WORKERS", "CpuThreads", "available_cpus", "default_num_threads", "default_num_workers"]

MAX_DEFAULT_WORKERS = 8


def available_cpus() -> int:
    """CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _cores_per_process(processes: int) -> int:
    return max(1, available_cpus() // max(1, processes))


def default_num_workers(processes: int = 1) -> int:
    """DataLoader workers per training process: its share of the cores less one, between 1 and 8."""
    return max(1, min(MAX_DEFAULT_WORKERS, _cores_per_process(processes) - 1))


def default_num_threads(processes: int, num_workers: int) -> int:
    """Intra-op threads of a CPU training process: its share of the cores left by its workers (>= 1)."""
    return max(1, _cores_per_process(processes) - num_workers)


class CpuThreads(Callback):
    """On a CPU-only run, torch's intra-op threads for the duration of each stage: the cores the
    process's DataLoader workers leave (``default_num_threads``). Left alone when ``OMP_NUM_THREADS``
    is set (the user chose) or the run is on an accelerator; restored at teardown."""

    def __init__(self) -> None:
        self.previous: int | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if os.environ.get("OMP_NUM_THREADS") or trainer.strategy.root_device.type != "cpu":
            return
        workers = int(getattr(trainer.datamodule, "num_workers", 0) or 0)
        self.previous = torch.get_num_threads()
        torch.set_num_threads(default_num_threads(trainer.num_devices, workers))

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.previous is not None:
            torch.set_num_threads(self.previous)
            self.previous = None
