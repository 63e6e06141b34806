"""Run every benchmark of the project and write one summary.

    python -m benchmarks                       # all, full size: the CPU suites, and the CUDA ones where a GPU is present
    python -m benchmarks --quick               # a smoke run: small depth, batches and budgets
    python -m benchmarks --only irpe compile   # a subset

Each benchmark writes its own ``NAME.{csv,md,png}`` into ``benchmarks/results/`` (``--quick``:
``benchmarks/results/quick/``, so a smoke run never replaces real numbers); this runner then writes
``README.md`` there (and, for a full run, into the project README between its benchmark markers): the machine, torch version and device, then every benchmark's table and plot
(results of benchmarks not run this time are kept, marked as from an earlier run).
A benchmark that fails does not stop the others; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import importlib.util
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

import benchmarks.common
from benchmarks.common import environment, markdown_table

RESULTS_DIR = benchmarks.common.RESULTS_DIR


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: ``module.main(argv)``, its result file stem, its arguments (full / quick) and
    the flags it takes for the device and for the output folder (None: it has none)."""

    name: str
    module: str
    result: str
    argv: list[str] = field(default_factory=list)
    quick_argv: list[str] = field(default_factory=list)
    device_flag: str | None = None
    out_flag: str | None = None
    needs_cuda: bool = False  # runs only where a CUDA device is present


# --no-memory: a tiny model's resident-set growth is mostly noise.
_BACKBONES_QUICK = ["--depth", "3", "--batch-size", "2", "--infer-batch-sizes", "1", "4", "--rounds", "1", "--infer-rounds", "1",
                    "--no-reference", "--no-memory"]
# The iRPE paper's Fig. 10 setting: bf16, batch 128, against DeiT-S with fused attention.
_BACKBONES_CUDA = ["--device", "cuda", "--batch-size", "128", "--infer-batch-sizes", "128", "--rounds", "10"]
BENCHMARKS = [
    Benchmark("irpe", "benchmarks.backbones", "backbones_irpe",
              ["--suite", "irpe", "--device", "cpu", "--infer-batch-sizes", "1", "32", "128"],
              ["--suite", "irpe", "--device", "cpu", *_BACKBONES_QUICK]),
    Benchmark("spvit", "benchmarks.backbones", "backbones_spvit",
              ["--suite", "spvit", "--device", "cpu", "--infer-batch-sizes", "1", "32", "128"],
              ["--suite", "spvit", "--device", "cpu", *_BACKBONES_QUICK]),
    Benchmark("irpe_cuda", "benchmarks.backbones", "backbones_irpe_cuda", ["--suite", "irpe_cuda", *_BACKBONES_CUDA],
              ["--suite", "irpe_cuda", *_BACKBONES_CUDA[:2], "--depth", "3", "--rounds", "2"], needs_cuda=True),
    Benchmark("spvit_cuda", "benchmarks.backbones", "backbones_spvit_cuda", ["--suite", "spvit_cuda", *_BACKBONES_CUDA],
              ["--suite", "spvit_cuda", *_BACKBONES_CUDA[:2], "--depth", "3", "--rounds", "2"], needs_cuda=True),
    # depth 4: compiling the full-depth training graph takes longer than the rest of the run on 2 CPU cores;
    # the speedup is per block
    Benchmark("compile", "benchmarks.compile", "compile", ["--depth", "4"],
              ["--depth", "3", "--batch-size", "2", "--infer-batch-size", "4", "--rounds", "1"], device_flag="--device"),
    Benchmark("attention_profile", "benchmarks.attention_profile", "attention_profile", [],
              ["--batch-size", "2", "--steps", "1"]),
    Benchmark("data_pipeline", "benchmarks.data_pipeline", "data_pipeline", [],
              ["--workers", "0", "1", "--seconds", "0.5", "--num-images", "8", "--batch-size", "4",
               "--index-samples", "100000"],
              out_flag="--out"),
    Benchmark("resolution", "benchmarks.resolution", "resolution", [], ["--quick"]),
    Benchmark("training_loop", "benchmarks.training_loop", "training_loop", [],
              ["--epochs", "2", "--settings", "defaults"]),
]
GROUPS = {"backbones": ["irpe", "spvit", "irpe_cuda", "spvit_cuda"]}
SKIPPED_NO_CUDA = "skipped: no CUDA device"


def available() -> list[Benchmark]:
    """The benchmarks whose module exists in this checkout (some are added by later work)."""
    return [b for b in BENCHMARKS if importlib.util.find_spec(b.module) is not None]


@contextmanager
def results_into(out: Path) -> Iterator[None]:
    """Point ``benchmarks.common.write_results`` (which every table-writing benchmark uses) at ``out``."""
    default, benchmarks.common.RESULTS_DIR = benchmarks.common.RESULTS_DIR, out
    try:
        yield
    finally:
        benchmarks.common.RESULTS_DIR = default


@dataclass(frozen=True)
class Outcome:
    """How one benchmark went in this run."""

    command: str
    status: str  # "ok", or the error in one line
    seconds: float


def command_line(benchmark: Benchmark, quick: bool, device: str | None, out: Path) -> list[str]:
    argv = list(benchmark.quick_argv if quick else benchmark.argv)
    if device is not None and benchmark.device_flag:
        argv += [benchmark.device_flag, device]
    if benchmark.out_flag:
        argv += [benchmark.out_flag, str(out)]
    return argv


def run(benchmark: Benchmark, argv: list[str], out: Path) -> Outcome:
    """Run one benchmark in this process; an exception is reported and becomes the outcome's status."""
    command = " ".join(["python -m", benchmark.module, *argv])
    print(f"\n=== {benchmark.name}: {command}", flush=True)
    threads = torch.get_num_threads()
    start = time.perf_counter()
    try:
        with results_into(out):
            importlib.import_module(benchmark.module).main(argv)
        status = "ok"
    except Exception as err:  # report it and go on with the other benchmarks
        traceback.print_exc()
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        status = f"{type(err).__name__}: {message[:160]}"
    finally:
        torch.set_num_threads(threads)  # data_pipeline pins one thread; later benchmarks get them all back
    return Outcome(command, status, time.perf_counter() - start)


def section(benchmark: Benchmark, outcome: Outcome | None, out: Path) -> str:
    """The README section of one benchmark: its command, its table (NAME.md, else NAME.csv) and its plot."""
    stem = out / benchmark.result
    if outcome is None or outcome.status == SKIPPED_NO_CUDA:
        why = "not run: no CUDA device on this machine" if outcome else "from an earlier run"
        if outcome and not any(out.glob(f"{benchmark.result}.*")):
            return f"## {benchmark.name} ({why})\n\n`{outcome.command}` runs where a GPU is present; nothing measured yet."
        parts = [f"## {benchmark.name} ({why}{'; results from an earlier run' if outcome else ''})",
                 f"`python -m {benchmark.module}`"]
    else:
        failed = "" if outcome.status == "ok" else f" (FAILED this run: {outcome.status})"
        parts = [f"## {benchmark.name}{failed}", f"`{outcome.command}` ({outcome.seconds:.0f} s)"]
    if stem.with_suffix(".md").is_file():
        parts.append(stem.with_suffix(".md").read_text().strip())
    elif stem.with_suffix(".csv").is_file():
        with open(stem.with_suffix(".csv"), newline="") as f:
            rows = list(csv.DictReader(f))
        parts.append(markdown_table(rows) if rows else "(empty result file)")
    else:
        parts.append("(no results yet)")
    if stem.with_suffix(".png").is_file():
        parts.append(f"![{benchmark.name}]({benchmark.result}.png)")
    return "\n\n".join(parts)


def write_summary(outcomes: dict[str, Outcome], quick: bool, out: Path) -> Path:
    env = environment()
    run_now = ", ".join(f"{name} ({'ok' if o.status == 'ok' else 'skipped' if o.status == SKIPPED_NO_CUDA else 'FAILED'})"
                        for name, o in outcomes.items())
    lines = [
        "# Benchmark results",
        "",
        f"Written by `python -m benchmarks{' --quick' if quick else ''}`"
        + (" (a smoke run: small models and budgets, not for comparison)" if quick else "") + ".",
        "",
        f"- machine: {env['machine']}",
        f"- torch: {env['torch']} (python {env['python']})",
        f"- device: {env['device']}, {env['threads']} CPU threads",
        f"- run now: {run_now or 'none'}",
    ]
    sections = [section(b, outcomes.get(b.name), out) for b in BENCHMARKS
                if b.name in outcomes or any(out.glob(f"{b.result}.*"))]
    out.mkdir(parents=True, exist_ok=True)
    (out / "README.md").write_text("\n".join(lines) + "\n\n" + "\n\n".join(sections) + "\n")
    return out / "README.md"


README = RESULTS_DIR.parent.parent / "README.md"
README_MARKERS = ("<!-- benchmarks:start -->", "<!-- benchmarks:end -->")


def update_readme(summary: Path) -> None:
    """Put the summary (tables and plots, headings one level down) between the project README's markers."""
    text = README.read_text()
    start, end = README_MARKERS
    if start not in text or end not in text:
        return
    body = summary.read_text().replace("\n## ", "\n### ").replace("# Benchmark results\n", "")
    body = body.replace("](", f"]({summary.parent.relative_to(README.parent).as_posix()}/")
    before, rest = text.split(start, 1)
    README.write_text(f"{before}{start}\n{body.strip()}\n{end}{rest.split(end, 1)[1]}")


def main(argv: list[str] | None = None) -> int:
    benchmarks = available()
    names = [b.name for b in benchmarks]
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: small depth, batches and budgets")
    parser.add_argument("--only", nargs="+", metavar="NAME", help=f"run only these: {', '.join([*names, *GROUPS])}")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present, else cpu)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"results folder (default: {RESULTS_DIR}, or its quick/ subfolder with --quick)")
    args = parser.parse_args(argv)
    out = args.out or (RESULTS_DIR / "quick" if args.quick else RESULTS_DIR)

    selected = names
    if args.only:
        unknown = [n for n in args.only if n not in names and n not in GROUPS]
        if unknown:
            parser.error(f"--only {' '.join(unknown)}: expected some of {', '.join([*names, *GROUPS])}")
        wanted = {m for n in args.only for m in GROUPS.get(n, [n])}
        selected = [n for n in names if n in wanted]

    outcomes = {}
    for b in benchmarks:
        argv = command_line(b, args.quick, args.device, out)
        if b.needs_cuda and not torch.cuda.is_available():  # said in every summary, selected or not
            outcomes[b.name] = Outcome(" ".join(["python -m", b.module, *argv]), SKIPPED_NO_CUDA, 0.0)
        elif b.name in selected:
            outcomes[b.name] = run(b, argv, out)
    summary = write_summary(outcomes, args.quick, out)
    if out == RESULTS_DIR:
        update_readme(summary)
    failed = [name for name, outcome in outcomes.items() if outcome.status not in ("ok", SKIPPED_NO_CUDA)]
    print(f"\nwrote {summary}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
