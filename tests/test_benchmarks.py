"""The benchmark scripts' own logic: target checks and the per-op attention profile (no timings asserted)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import ImageTensors, quiet_trainer, tiny_classifier

import benchmarks.__main__ as runner
import benchmarks.common
from benchmarks import attention_profile
from benchmarks.backbones import Target, target_table
from benchmarks.common import round_ratios, time_paired
from benchmarks.compile import graph_count
from benchmarks.data_pipeline import format_datasets, imagenet_like_samples, index_bytes, make_jpegs
from benchmarks.training_loop import PlainSteps, images_per_s, ratio_of_means, summarize
from datamodules import SampleArray, load_rgb


def test_target_table_checks_named_rows_and_the_worst_fast_path_row():
    rows = [
        {"model": "base", "train ratio": 1.0, "train memory ratio": 1.0},
        {"model": "irpe ctx K shared", "train ratio": 0.93, "train memory ratio": 1.02},
        {"model": "irpe ctx QKV shared", "train ratio": 0.81, "train memory ratio": 1.04},
        {"model": "irpe ctx QKV shared (reference)", "train ratio": 0.40, "train memory ratio": 3.2},
    ]
    table = target_table(
        [
            Target("issue 8", "irpe ctx K shared", "train ratio", 0.95),
            Target("issue 2", "irpe ctx K shared", "train ratio", 0.92),
            Target("issue 8", None, "train memory ratio", 1.05, at_least=False),
            Target("issue 8", "irpe ctx QK shared", "train ratio", 0.8),
        ],
        rows,
    ).splitlines()
    assert table[2] == "| issue 8: irpe ctx K shared, train ratio | >= 0.95 | 0.930 | MISSED |"
    assert table[3] == "| issue 2: irpe ctx K shared, train ratio | >= 0.92 | 0.930 | met |"
    assert table[4] == "| issue 8: every fast-path row, train memory ratio | <= 1.05 | 1.040 | met |"  # not the reference's 3.2
    assert table[5].endswith("| >= 0.8 | not measured | |")


def test_attention_profile_writes_each_op_per_layer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(benchmarks.common, "RESULTS_DIR", tmp_path)
    threads = torch.get_num_threads()
    attention_profile.main(["--batch-size", "1", "--steps", "1", "--top", "30", "--threads", str(max(1, threads - 1))])
    assert torch.get_num_threads() == threads  # restored for whatever runs next
    assert {p.name for p in tmp_path.iterdir()} == {f"attention_profile.{ext}" for ext in ("csv", "md", "png")}
    with open(tmp_path / "attention_profile.csv", newline="") as f:
        rows = {row["op (self ms per step)"]: row for row in csv.DictReader(f)}
    timm, key, qkv = "timm Attention (fused SDPA)", "irpe ctx K shared", "irpe ctx QKV shared"
    fused_backward = rows["aten::_scaled_dot_product_flash_attention_for_cpu_backward"]
    assert float(fused_backward[timm]) > 0 and float(fused_backward[key]) == 0  # iRPE recomputes instead
    for op in ("aten::gather", "aten::scatter_add_"):
        assert float(rows[op][timm]) == 0 and float(rows[op][key]) > 0 and float(rows[op][qkv]) > 0  # no timing compared
    assert float(rows["wall time per step (unprofiled)"][key]) > 0


def test_compile_benchmark_counts_dynamo_graphs():
    class Breaks(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + 1
            print("a graph break")
            return x * 2

    tiny = timm.create_model("irpe_deit_tiny_patch16_224", depth=1, img_size=32, num_classes=3)
    assert graph_count(tiny, torch.randn(2, 3, 32, 32)) == 1
    assert graph_count(Breaks(), torch.randn(2)) == 2


def test_data_pipeline_formats_read_the_same_images(tmp_path: Path):
    (tmp_path / "jpegs").mkdir()
    paths = make_jpegs(tmp_path / "jpegs", 4, size=(80, 80))
    originals = {Path(p).name: (load_rgb(p), i % 2) for i, p in enumerate(paths)}
    sources = format_datasets(tmp_path / "formats", paths)
    assert set(sources) == {"folder", "csv", "hf parquet", "webdataset shards"}
    folder_order = [Path(s.path).name for s in sources["folder"].samples]
    for name, dataset in sources.items():
        assert len(dataset) == len(paths), name
        items = list(dataset) if name == "webdataset shards" else [dataset[i] for i in range(len(dataset))]
        for index, (image, label) in enumerate(items):
            # parquet rows keep the order of paths, shards the folder's order; the other two name the file
            if name == "hf parquet":
                key = Path(paths[index]).name
            elif name == "webdataset shards":
                key = folder_order[index]
            else:
                key = Path(dataset.samples[index].path).name
            assert label == originals[key][1] and np.array_equal(image, originals[key][0]), (name, index)


def test_index_bytes_of_both_layouts():
    samples = imagenet_like_samples(2000)
    assert len({s.label for s in samples}) == 1000 and samples[-1].path.endswith("n00000999_1.JPEG")
    assert 0 < index_bytes(SampleArray(samples)) < index_bytes(samples)


def test_round_ratios_pair_each_round_and_report_median_and_spread():
    # per-round ratios 0.5, 1.0 and 2.0: a slow round of one candidate moves the spread, not the median
    assert round_ratios([1.0, 2.0, 1.0], [2.0, 2.0, 0.5]) == (1.0, 0.5, 2.0)


def test_training_loop_summary_takes_medians_over_pairs_and_ratios_of_all_time():
    # [cli images, cli s, plain images, plain s]: a slow spell (epoch 2) slows both steps of a pair
    epochs = [[[16, 1.0, 16, 1.0], [16, 1.0, 16, 0.5]], [[16, 4.0, 16, 4.0], [8, 1.0, 8, 1.0]]]
    summary = summarize(epochs)
    assert images_per_s(epochs[0], "plain") == [16.0, 32.0]
    assert summary["pairs"] == 4
    assert summary["cli / plain"] == pytest.approx(1.0)  # per-pair ratios 1.0, 0.5, 1.0, 1.0
    assert summary["cli / plain of means"] == pytest.approx((56 / 7.0) / (56 / 6.5))
    assert summary["of means per epoch"] == "0.750-1.000"
    assert ratio_of_means(epochs[1]) == pytest.approx(1.0)


def test_training_loop_follows_each_fit_step_by_a_plain_step_over_the_same_model(tmp_path: Path):
    out = tmp_path / "pairs.json"
    module = tiny_classifier()
    trained = {}

    class Spy(PlainSteps):  # the plain step must train the fit's own model
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            before = pl_module.model.head.weight.detach().clone()
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            trained[batch_idx] = not torch.equal(before, pl_module.model.head.weight)

    trainer = quiet_trainer(tmp_path, max_epochs=2, limit_val_batches=0, gradient_clip_val=1.0,
                            callbacks=[Spy(str(out), skip=1)])
    trainer.fit(module, datamodule=ImageTensors(n=20, batch_size=4))  # 5 batches a epoch: steps 1-4 timed
    result = json.loads(out.read_text())
    assert len(result["epochs"]) == 2 and result["workers"] == 0
    assert all(trained.values()) and len(trained) == 5
    for epoch in result["epochs"]:
        assert [(cli_images, plain_images) for cli_images, _, plain_images, _ in epoch] == [(4, 4)] * 4
        assert all(cli_s > 0 and plain_s > 0 for _, cli_s, _, plain_s in epoch)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the run without a GPU")
@pytest.mark.parametrize("only", [["irpe_cuda", "spvit_cuda"], ["training_loop"]])
def test_cuda_benchmarks_are_skipped_and_say_so_without_a_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               only: list[str]):
    """Also when a run selects other benchmarks: the README keeps saying the CUDA rows are unmeasured."""
    monkeypatch.setattr(runner, "run", lambda b, argv, out: runner.Outcome(f"python -m {b.module}", "ok", 0.0))  # runs nothing
    assert runner.main(["--only", *only, "--out", str(tmp_path)]) == 0
    summary = (tmp_path / "README.md").read_text()
    assert "irpe_cuda (skipped), spvit_cuda (skipped)" in summary
    assert "## irpe_cuda (not run: no CUDA device on this machine)" in summary
    assert "--suite irpe_cuda --device cuda --batch-size 128" in summary


def test_paired_timing_puts_each_call_right_after_one_of_the_baseline():
    calls: list[str] = []
    candidates = {name: (lambda n=name: calls.append(n)) for name in ("base", "a", "b")}
    times = time_paired(candidates, torch.device("cpu"), rounds=2)
    assert calls[3:] == ["base", "a", "base", "b"] * 2  # after one warm-up call each
    assert set(times) == {"base", "a", "b"}
    assert all(len(times[n][0]) == len(times[n][1]) == 2 for n in ("a", "b"))
    assert times["base"][0] == times["a"][0] + times["b"][0] and times["base"][1] == times["base"][0]
