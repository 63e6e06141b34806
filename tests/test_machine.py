"""Thread and worker counts chosen from the machine (datamodules.machine) and where they apply."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import ImageTensors, quiet_trainer, tiny_classifier

import datamodules.machine as machine
from datamodules import CUB200DataModule


@pytest.mark.parametrize(
    ("cpus", "processes", "workers", "threads"),
    [(2, 1, 1, 1), (1, 1, 1, 1), (16, 1, 8, 8), (16, 4, 3, 1), (64, 8, 7, 1)],
)
def test_defaults_share_the_cores_between_processes_workers_and_threads(
    monkeypatch, cpus, processes, workers, threads
):
    monkeypatch.setattr(machine, "available_cpus", lambda: cpus)  # the machine, not the rule under test
    assert machine.default_num_workers(processes) == workers
    assert machine.default_num_threads(processes, workers) == threads


def test_datamodule_workers_come_from_the_machine_unless_given():
    assert CUB200DataModule("/nowhere").num_workers == machine.default_num_workers(1)
    assert CUB200DataModule("/nowhere", num_workers=3).num_workers == 3
    assert CUB200DataModule("/nowhere", num_workers=0).num_workers == 0


class RecordThreads(L.Callback):
    def __init__(self) -> None:
        self.during: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.during.append(torch.get_num_threads())


@pytest.mark.parametrize("omp", [None, "2"])
def test_cpu_fit_uses_the_threads_its_workers_leave_and_restores_them(tmp_path, monkeypatch, omp):
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    before = torch.get_num_threads()
    record = RecordThreads()
    data = ImageTensors()
    data.num_workers = 1
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[record], num_sanity_val_steps=2)
    trainer.fit(tiny_classifier(), datamodule=data)
    expected = before if omp else machine.default_num_threads(1, 1)
    assert record.during and set(record.during) == {expected}
    assert torch.get_num_threads() == before
