"""Pull, push and convert against a local fake Hub (tests/hf_server.py).

huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE when it is imported, so every step that
talks to the Hub runs in a worker process started with its environment set (this file run as a script,
see ``Worker``); one worker serves all online steps so that torch/timm/lightning are imported once.
Steps that never touch the network (export-only, convert without --push) run in this process.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from hf_server import FakeHub  # tests/ is on sys.path (pytest's import mode, or the script's folder)
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

import finetune  # noqa: F401  (registers the models)
from finetune.callbacks import PushToHubCallback
from finetune.cli import main as cli_main
from finetune.commands import convert_main, push_main
from finetune.weights import HubError, create_model

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_secretTOKEN1234567890abcdef"
RPE = {"method": "product", "mode": "ctx", "ratio": 1.9, "rpe_on": "qk", "shared_head": True, "skip": 1,
       "index": "piecewise"}
TINY = dict(depth=1, embed_dim=32, num_heads=2, img_size=32, rpe_config=RPE)
CLASSES = ["albatross", "bunting", "cardinal", "dove", "egret"]
DATA_CONFIG = {"input_size": [3, 32, 32], "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3],
               "interpolation": "bilinear", "crop_pct": 0.9}


def randomized(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random values for every tensor (RPE tables start at zero, which would hide a lost table)."""
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator) * 0.2 for k, v in model.state_dict().items()}


def logits(model: torch.nn.Module, size: int = 32) -> torch.Tensor:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(x)


def write_ckpt(path: Path, ema: bool = True, config_yaml: str | None = "model: tiny\n",
               model_name: str = "irpe_deit_tiny_patch16_224", model_kwargs: dict | None = None,
               **meta_overrides) -> dict[str, dict[str, torch.Tensor]]:
    """A checkpoint in the agreed layout; returns the 'model' and 'ema' weights written."""
    kwargs = dict(TINY) if model_kwargs is None else model_kwargs
    model = timm.create_model(model_name, num_classes=len(CLASSES), **kwargs)
    weights = {"model": randomized(model, 1), "ema": randomized(model, 2)}
    state_dict = {f"model.{k}": v for k, v in weights["model"].items()}
    if ema:
        state_dict.update({f"ema.module.{k}": v for k, v in weights["ema"].items()})
    meta = {
        "model_name": model_name, "model_kwargs": kwargs, "num_classes": len(CLASSES), "class_names": CLASSES,
        "data_config": DATA_CONFIG,
        "metrics": {"top1": 0.8125, "top5": 0.96875, "mean_class_acc": 0.79, "split": "val", "epoch": 7, "step": 80,
                    "per_class": dict(zip(CLASSES, [0.9, 0.5, 0.75, 1.0, 0.8], strict=True))},
        "best": None,
        "pretrained": "hf-hub:someone/irpe-base@v1", "ema": ema, "dataset": "cub200", "config_yaml": config_yaml,
    }
    meta.update(meta_overrides)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state_dict, "finetune": meta, "epoch": 7}, path)
    return weights


def hub_env(tmp: Path, endpoint: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp / "hf_home"), HF_TOKEN=TOKEN, TORCH_HOME=str(tmp / "torch"))
    # the worker imports this checkout's packages (not whichever copy is installed in the environment)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(extra)
    return env


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str

    @property
    def errors(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]


class Worker:
    """This file run as a script in a process with its own Hub environment; runs one command per call."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=log.open("w"), text=True, env=env, cwd=ROOT)

    def __call__(self, command: str, *args: object) -> Result:
        watchdog = threading.Timer(180, self.proc.kill)
        watchdog.start()
        try:
            self.proc.stdin.write(json.dumps([command, [str(a) for a in args]]) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        finally:
            watchdog.cancel()
        assert line, f"worker died: {self.log.read_text()[-3000:]}"
        result = Result(**json.loads(line))
        assert TOKEN not in result.stdout + result.stderr
        return result

    def close(self) -> None:
        if not self.proc.stdin.closed:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)
        assert TOKEN not in self.log.read_text()


def _pull(out: str, *names: str) -> int:
    """Load each hf-hub model, print its preprocessing config (or the HubError), save its logits."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    results = {}
    for name in names:
        try:
            model = create_model(name, pretrained=True)
        except HubError as err:
            print(err)
            continue
        with torch.no_grad():
            results[name] = model.eval()(x)
        keys = ("label_names", "input_size", "mean", "std", "crop_pct", "interpolation")
        print(json.dumps({key: model.pretrained_cfg.get(key) for key in keys}))
    torch.save(results, out)
    return 0


class TinyClassifier(pl.LightningModule):
    """Stands in for finetune.module.ImageClassifier: same checkpoint layout, a one-step fit."""

    def __init__(self) -> None:
        super().__init__()
        self.model = timm.create_model("irpe_deit_tiny_patch16_224", num_classes=len(CLASSES), **TINY)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(self.model(images), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(4, 3, 32, 32), torch.arange(4) % len(CLASSES)), batch_size=2)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["finetune"] = {
            "model_name": "irpe_deit_tiny_patch16_224", "model_kwargs": TINY, "num_classes": len(CLASSES),
            "class_names": CLASSES, "data_config": DATA_CONFIG, "metrics": None, "best": None,
            "pretrained": None, "ema": False, "dataset": "imagenet", "config_yaml": None,
        }


def _fit(root: str, repo_id: str) -> int:
    callback = PushToHubCallback(repo_id)
    trainer = pl.Trainer(default_root_dir=root, max_steps=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", callbacks=[callback])
    trainer.fit(TinyClassifier())
    print(f"callback error: {callback.error}")
    return 0


def _serve() -> None:
    """Worker loop: one JSON [command, args] per stdin line, one JSON result per stdout line."""
    commands = {"push": push_main, "convert": convert_main, "pull": lambda a: _pull(*a), "fit": lambda a: _fit(*a),
                "cli": cli_main}
    channel = sys.stdout
    for line in sys.stdin:
        command, args = json.loads(line)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = commands[command](args)
        channel.write(json.dumps({"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}) + "\n")
        channel.flush()


def assert_no_token(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


@pytest.fixture(scope="module")
def hub():
    with FakeHub() as server:
        yield server


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """HF_HOME and TORCH_HOME of the online worker (and later of the offline one)."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def workers(hub, home):
    """Started together so that their imports overlap: online, offline (same cache), and one whose
    endpoint refuses connections."""
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    started = {
        "online": Worker(hub_env(home, hub.url), home / "online.log"),
        "offline": Worker(hub_env(home, hub.url, HF_HUB_OFFLINE="1"), home / "offline.log"),
        "refused": Worker(hub_env(home, f"http://127.0.0.1:{closed_port}"), home / "refused.log"),
    }
    yield started
    for worker in started.values():
        worker.proc.stdin.close()  # let all three exit at once
    for worker in started.values():
        worker.close()


@pytest.fixture(scope="module")
def online(workers):
    return workers["online"]


@pytest.fixture(scope="module")
def pushed(online, tmp_path_factory):
    """One push of an EMA checkpoint (with the token inside its recipe) to me/tiny-cub."""
    tmp = tmp_path_factory.mktemp("pushed")
    ckpt = tmp / "run" / "checkpoints" / "best.ckpt"
    weights = write_ckpt(ckpt, config_yaml=f"trainer:\n  max_epochs: 7\nhub_token: {TOKEN}\n")
    result = online("push", "--ckpt", ckpt, "--repo-id", "me/tiny-cub")
    assert result.rc == 0, result.stderr
    return {"ckpt": ckpt, "weights": weights, "result": result, "folder": ckpt.parent / "hub_export" / "tiny-cub"}


def test_push_uploads_a_complete_timm_repo(hub, pushed):
    folder = pushed["folder"]
    files = hub.files("me/tiny-cub")
    assert {"model.safetensors", "config.json", "README.md", "config.yaml"} <= set(files)
    for name in ("model.safetensors", "config.json", "README.md", "config.yaml"):
        assert files[name] == (folder / name).read_bytes(), name  # the export folder is kept as uploaded
    assert "pushed to" in pushed["result"].stdout

    # EMA weights are the ones pushed
    pushed_weights = load_file(folder / "model.safetensors")
    for key, value in pushed["weights"]["ema"].items():
        assert torch.equal(pushed_weights[key], value), key
    assert not torch.equal(pushed_weights["head.weight"], pushed["weights"]["model"]["head.weight"])

    config = json.loads(files["config.json"])
    assert config["architecture"] == "irpe_deit_tiny_patch16_224"
    assert config["num_classes"] == 5 and config["label_names"] == CLASSES
    assert config["model_args"]["rpe_config"] == {**RPE, "resize": "keep", "trained_grid": None}
    assert config["model_args"]["depth"] == 1 and config["model_args"]["embed_dim"] == 32
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 32, 32] and cfg["mean"] == DATA_CONFIG["mean"]
    assert cfg["std"] == DATA_CONFIG["std"] and cfg["crop_pct"] == 0.9 and cfg["interpolation"] == "bilinear"

    readme = files["README.md"].decode()
    metadata = yaml.safe_load(re.match(r"^---\n(.*?)\n---\n", readme, re.S).group(1))
    assert metadata["library_name"] == "timm"
    assert {"image-classification", "timm", "irpe"} <= set(metadata["tags"])
    assert metadata["base_model"] == "someone/irpe-base"
    assert "datasets" not in metadata  # cub200 has no Hub id we are sure of
    metrics = {m["name"]: m["value"] for m in metadata["model-index"][0]["results"][0]["metrics"]}
    assert metrics == {"Top-1 accuracy": 81.25, "Top-5 accuracy": 96.88, "Mean class accuracy": 79.0}
    card = ModelCard(readme)  # huggingface_hub parses the metadata too
    assert card.data.eval_results[0].dataset_split == "validation"
    assert "## Results (cub200, validation split held out from the official training split, epoch 7)" in readme
    assert 'timm.create_model("hf-hub:me/tiny-cub", pretrained=True)' in readme
    assert "| dove | 100.00% | bunting | 50.00% |\n| albatross | 90.00% | cardinal | 75.00% |\n\n" in readme
    assert "arXiv:2107.14222" in readme

    assert b"max_epochs: 7" in files["config.yaml"]


def test_token_never_written_or_printed(hub, pushed):
    sent = [r.headers.get("authorization") or r.headers.get("Authorization") for r in hub.requests]
    assert f"Bearer {TOKEN}" in sent  # the token was used ...
    assert_no_token(pushed["folder"])  # ... but appears in no file (the recipe had it) ...
    for name, data in hub.files("me/tiny-cub").items():
        assert TOKEN.encode() not in data, name
    assert b"hub_token: <redacted>" in hub.files("me/tiny-cub")["config.yaml"]
    # ... nor in any output (Worker checks every result and the worker's own stderr)


def _reference_model(weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = timm.create_model("irpe_deit_tiny_patch16_224", num_classes=len(CLASSES), **TINY)
    model.load_state_dict(weights)
    return model


def test_pull_into_fresh_cache_then_offline(hub, home, workers, online, pushed, tmp_path):
    expected = logits(_reference_model(pushed["weights"]["ema"]))
    commit = hub.repos["me/tiny-cub"].branches["main"]
    assert not (home / "hf_home" / "hub").exists()  # nothing was downloaded before
    names = ["hf-hub:me/tiny-cub", f"hf-hub:me/tiny-cub@{commit}"]
    result = online("pull", tmp_path / "online.pt", *names)
    assert result.rc == 0, result.stderr
    cfg = json.loads(result.stdout.splitlines()[0])
    assert cfg == {"label_names": CLASSES, "input_size": [3, 32, 32], "mean": DATA_CONFIG["mean"],
                   "std": DATA_CONFIG["std"], "crop_pct": 0.9, "interpolation": "bilinear"}
    pulled = torch.load(tmp_path / "online.pt")
    for name in names:
        assert torch.equal(pulled[name], expected), name

    # offline: the warm cache serves the model; a repo never downloaded fails in one line
    requests_before = len(hub.requests)
    result = workers["offline"]("pull", tmp_path / "offline.pt", "hf-hub:me/tiny-cub", "hf-hub:me/never-pulled")
    assert result.rc == 0, result.stderr
    assert len(hub.requests) == requests_before  # not a single request went out
    assert torch.equal(torch.load(tmp_path / "offline.pt")["hf-hub:me/tiny-cub"], expected)
    message = result.stdout.splitlines()[-1]
    assert message.startswith("me/never-pulled: config.json is not in the local cache")
    assert "HF_HUB_OFFLINE=1" in message


def test_pull_missing_revision_and_repo(hub, online, pushed, tmp_path):
    result = online("pull", tmp_path / "x.pt", "hf-hub:me/tiny-cub@no-such-branch", "hf-hub:me/absent")
    lines = result.stdout.splitlines()
    assert lines[0] == f"me/tiny-cub: revision 'no-such-branch' not found on {hub.url}"
    assert lines[1].startswith(f"me/absent: repository not found on {hub.url}")


@pytest.mark.parametrize(
    ("worker", "model_name", "pretrained", "expected"),
    [
        ("online", "hf-hub:me/tiny-cbu", "true", "me/tiny-cbu: repository not found on"),
        ("offline", "hf-hub:me/never-pulled", "true", "me/never-pulled: config.json is not in the local cache"),
        ("offline", "hf-hub:me/never-pulled", "false", "me/never-pulled: config.json is not in the local cache"),
        ("offline", "deit_tiny_patch16_224", "true", "timm/deit_tiny_patch16_224.fb_in1k: model.safetensors is not"),
    ],
    ids=["typo", "offline-hub-repo", "offline-hub-config", "offline-timm-weights"],
)
def test_cli_names_the_hub_repo_in_one_line(workers, pushed, tmp_path, worker, model_name, pretrained, expected):
    run_dir = tmp_path / "run"
    result = workers[worker]("cli", "fit", "--model.model_name", model_name, "--model.pretrained", pretrained,
                             "--data", "datamodules.CUB200DataModule", "--data.root", tmp_path, "--run_dir", run_dir)
    assert result.rc == 2, result.stderr[-2000:]
    [line] = result.errors
    assert expected in line
    if worker == "offline":
        assert "HF_HUB_OFFLINE=1" in line
    assert not run_dir.exists()


def test_push_folder_to_branch_and_pull_request(hub, online, pushed):
    folder = pushed["folder"]
    result = online("push", "--folder", folder, "--repo-id", "me/tiny-cub", "--revision", "dev")
    assert result.rc == 0, result.stderr
    result = online("push", "--folder", folder, "--repo-id", "me/tiny-cub", "--create-pr")
    assert result.rc == 0, result.stderr
    assert "opened pull request" in result.stdout
    repo = hub.repos["me/tiny-cub"]
    weights = (folder / "model.safetensors").read_bytes()
    for ref in ("dev", "refs/pr/1"):
        assert hub.files("me/tiny-cub", ref)["model.safetensors"] == weights, ref
    assert repo.branches["main"] != repo.branches["refs/pr/1"] != repo.branches["dev"]


def _assert_failed_push(result: Result, folder: Path, cause: str) -> None:
    assert result.rc == 2
    [line] = result.errors
    assert cause in line
    assert f"the export is kept, retry with: python cli.py push --folder {folder} --repo-id me/fail" in line
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "model.pt2", "config.json", "README.md", "config.yaml"}


def test_push_401_is_not_retried(hub, online, tmp_path):
    ckpt = tmp_path / "best.ckpt"
    write_ckpt(ckpt)
    hub.unauthorized = True
    try:
        before = len(hub.requests)
        result = online("push", "--ckpt", ckpt, "--repo-id", "me/fail")
    finally:
        hub.unauthorized = False
    _assert_failed_push(result, tmp_path / "hub_export" / "fail", "HTTP 401")
    assert [r.path for r in hub.requests[before:]].count("/api/repos/create") == 1
    assert "me/fail" not in hub.repos


def test_push_retries_after_500(hub, online, tmp_path):
    ckpt = tmp_path / "best.ckpt"
    write_ckpt(ckpt, ema=False)
    hub.fail("POST", r"^/api/repos/create$", 500, times=2)
    result = online("push", "--ckpt", ckpt, "--repo-id", "me/flaky", "--retry-wait", "0.05")
    assert result.rc == 0, result.stderr
    assert result.stderr.count("HTTP 500") == 2 and "retrying" in result.stderr
    exported = tmp_path / "hub_export" / "flaky" / "model.safetensors"
    assert hub.files("me/flaky")["model.safetensors"] == exported.read_bytes()


def test_push_connection_refused(workers, tmp_path):
    ckpt = tmp_path / "best.ckpt"
    write_ckpt(ckpt)
    result = workers["refused"]("push", "--ckpt", ckpt, "--repo-id", "me/fail", "--retries", "2",
                                "--retry-wait", "0")
    _assert_failed_push(result, tmp_path / "hub_export" / "fail", "after 3 attempts: cannot reach")


def test_callback_pushes_at_fit_end(hub, online, tmp_path):
    result = online("fit", tmp_path, "me/from-fit")
    assert result.rc == 0 and "callback error: None" in result.stdout, result.stdout + result.stderr
    [ckpt] = (tmp_path / "checkpoints").glob("*.ckpt")
    trained = {k[len("model."):]: v for k, v in torch.load(ckpt, weights_only=True)["state_dict"].items()}
    files = hub.files("me/from-fit")
    assert (tmp_path / "checkpoints" / "hub_export" / "from-fit" / "model.safetensors").read_bytes() == files[
        "model.safetensors"]
    pushed_weights = load_file(tmp_path / "checkpoints" / "hub_export" / "from-fit" / "model.safetensors")
    assert pushed_weights.keys() == trained.keys()
    assert all(torch.equal(pushed_weights[k], trained[k]) for k in trained)
    assert ModelCard(files["README.md"].decode()).data.datasets == ["imagenet-1k"]


def test_export_errors_are_one_line(tmp_path, capsys):
    ckpt = tmp_path / "best.ckpt"
    write_ckpt(ckpt, metrics={"top1": 81.2, "split": "val"})
    assert push_main(["--ckpt", str(ckpt), "--repo-id", "me/x", "--export-only"]) == 2
    assert f"error: {ckpt}: finetune.metrics.top1=81.2: expected a fraction in [0, 1]\n" == capsys.readouterr().err
    assert not (tmp_path / "hub_export").exists()  # nothing written: the record is checked first

    other = tmp_path / "other.ckpt"
    write_ckpt(other, model_kwargs=dict(TINY, embed_dim=64, num_heads=2))
    torch.save({**torch.load(other, weights_only=True), "finetune": {
        **torch.load(ckpt, weights_only=True)["finetune"], "metrics": {}}}, other)
    assert push_main(["--ckpt", str(other), "--repo-id", "me/x", "--export-only"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {other}: checkpoint key 'cls_token' has shape (1, 1, 64)")
    assert "expects (1, 1, 32)" in line

    write_ckpt(ckpt, data_config={**DATA_CONFIG, "input_size": [3, 64, 64]})  # the model takes 32x32
    assert push_main(["--ckpt", str(ckpt), "--repo-id", "me/x", "--export-only"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {ckpt}: finetune.data_config {{'input_size': (3, 64, 64)")

    assert push_main(["--folder", str(tmp_path), "--repo-id", "me/x", "--create-pr", "--revision", "dev"]) == 2
    assert "cannot be combined with --revision 'dev'" in capsys.readouterr().err
    assert push_main(["--folder", str(tmp_path), "--repo-id", "not a repo"]) == 2
    assert "--repo-id 'not a repo'" in capsys.readouterr().err


def test_export_only_keeps_existing_folder_until_replaced(tmp_path, capsys):
    ckpt = tmp_path / "best.ckpt"
    write_ckpt(ckpt, ema=False, config_yaml=None)
    out = tmp_path / "export"
    assert push_main(["--ckpt", str(ckpt), "--repo-id", "me/x", "--export-only", "--export-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.pt2", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "export"]  # no temporary leftovers
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    write_ckpt(ckpt, ema=False, metrics={"top1": 2.0})  # a bad re-export leaves the old folder as it was
    assert push_main(["--ckpt", str(ckpt), "--repo-id", "me/x", "--export-only", "--export-dir", str(out)]) == 2
    assert torch.equal(logits(timm.create_model(f"local-dir:{out}", pretrained=True)), logits(model))


def test_card_cites_release_and_keeps_local_paths_private(tmp_path, capsys):
    ckpt = tmp_path / "best.ckpt"
    kwargs = {"depth": 1, "img_size": 32}
    write_ckpt(ckpt, model_name=OFFICIAL, model_kwargs=kwargs, pretrained="timm", dataset="ImageNetDataModule")
    out = tmp_path / "export"
    assert push_main(["--ckpt", str(ckpt), "--repo-id", "me/x", "--export-only", "--export-dir", str(out)]) == 0
    card = ModelCard((out / "README.md").read_text())
    assert card.data.datasets == ["imagenet-1k"] and card.data.base_model is None  # a release is no Hub repo
    assert "fine-tuned on ImageNet with" in card.text
    assert f"released weights of `{OFFICIAL}` (https://github.com/wkcn/iRPE-model-zoo/" in card.text

    write_ckpt(ckpt, pretrained=str(tmp_path / "secret_dir" / "start.pth"))
    assert push_main(["--ckpt", str(ckpt), "--repo-id", "me/x", "--export-only", "--export-dir", str(out)]) == 0
    readme = (out / "README.md").read_text()
    assert "`start.pth` (a local checkpoint file)" in readme and "secret_dir" not in readme


# ----------------------------------------------------------------------------------------------------
# convert
# ----------------------------------------------------------------------------------------------------

OFFICIAL = "deit_tiny_patch16_224_ctx_product_50_shared_k"


def test_convert_official_irpe_release_from_url_and_push(hub, home, online, tmp_path):
    model = timm.create_model(OFFICIAL, depth=1)
    weights = randomized(model, 3)
    release = tmp_path / f"{OFFICIAL}.pth"
    torch.save({"model": weights}, release)  # the iRPE model zoo layout
    hub.static[release.name] = release.read_bytes()
    out = tmp_path / "converted"
    result = online("convert", "--source", f"{hub.url}/files/{release.name}", "--model", OFFICIAL,
                    "--model-args", '{"depth": 1}', "--out", out, "--push", "me/irpe-tiny")
    assert result.rc == 0, result.stderr
    assert (home / "torch" / "hub" / "checkpoints" / release.name).is_file()  # cached download

    model.load_state_dict(weights)
    converted = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert torch.equal(logits(converted, 224), logits(model, 224))
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == OFFICIAL and config["model_args"]["rpe_config"]["rpe_on"] == "k"
    assert len(config["label_names"]) == 1000 and config["label_names"][0] == "n01440764"  # ImageNet synsets
    files = hub.files("me/irpe-tiny")
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    readme = files["README.md"].decode()
    assert "arXiv:2107.14222" in readme and "ICCV 2021" in readme
    assert f"{hub.url}/files/{release.name}" in readme
    metadata = ModelCard(readme).data
    assert metadata.datasets == ["imagenet-1k"] and metadata.base_model is None
    assert_no_token(out)


def test_convert_checkpoint_saver_file_uses_ema(tmp_path, capsys):
    model = timm.create_model(OFFICIAL, depth=1)
    weights, ema = randomized(model, 4), randomized(model, 5)
    source = tmp_path / "release.pth.tar"
    torch.save({"epoch": 299, "arch": OFFICIAL, "args": argparse.Namespace(model=OFFICIAL, lr=5e-4),
                "state_dict": {f"module.{k}": v for k, v in weights.items()},
                "state_dict_ema": {f"module.{k}": v for k, v in ema.items()}}, source)
    out = tmp_path / "out"
    assert convert_main(["--source", str(source), "--model", OFFICIAL, "--model-args", '{"depth": 1}',
                         "--out", str(out)]) == 0, capsys.readouterr().err
    model.load_state_dict(ema)
    assert torch.equal(logits(timm.create_model(f"local-dir:{out}", pretrained=True), 224), logits(model, 224))
    readme = (out / "README.md").read_text()
    assert "`release.pth.tar` (official release: https://github.com/" in readme
    assert str(tmp_path) not in readme  # local paths stay private


def test_convert_rejects_other_architectures_and_pickled_objects(tmp_path, capsys):
    other = timm.create_model("irpe_deit_tiny_patch16_224", depth=1, embed_dim=64, num_heads=2)
    source = tmp_path / "other.pth"
    torch.save({"model": other.state_dict()}, source)
    out = tmp_path / "out"
    assert convert_main(["--source", str(source), "--model", OFFICIAL, "--model-args", '{"depth": 1}',
                         "--out", str(out)]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {source}: checkpoint key 'cls_token' has shape (1, 1, 64)")
    assert not out.exists()

    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": {}, "hook": socket.socket}, unsafe)  # an arbitrary class in the pickle
    assert convert_main(["--source", str(unsafe), "--model", OFFICIAL, "--out", str(out)]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {unsafe}: not a plain weights file (it pickles socket.socket")

    assert convert_main(["--source", str(source), "--model", "no_such_model", "--out", str(out)]) == 2
    assert "unknown model 'no_such_model'" in capsys.readouterr().err


SPVIT = "spvit_small_patch16_224"


@pytest.mark.skipif(not timm.is_model(SPVIT), reason=f"{SPVIT} is not registered (SP-ViT backbone missing)")
def test_convert_spvit_checkpoint_saver_file(tmp_path, capsys):
    kwargs = dict(depth=2, sp_layers=1, embed_dim=32, num_heads=2, stem_channels=8)
    model = timm.create_model(SPVIT, **kwargs)
    weights, ema = randomized(model, 6), randomized(model, 7)
    for key, value in model.state_dict().items():  # BatchNorm statistics must stay valid
        if "running_var" in key or "num_batches_tracked" in key:
            weights[key] = ema[key] = value
    source = tmp_path / "spvit_small.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in weights.items()},
                "state_dict_ema": {f"module.{k}": v for k, v in ema.items()}}, source)
    out = tmp_path / "out"
    assert convert_main(["--source", str(source), "--model", SPVIT, "--model-args", json.dumps(kwargs),
                         "--out", str(out)]) == 0, capsys.readouterr().err
    model.load_state_dict(ema)
    assert torch.equal(logits(timm.create_model(f"local-dir:{out}", pretrained=True), 224), logits(model, 224))
    readme = (out / "README.md").read_text()
    assert "arXiv:2206.07662" in readme and "BMVC 2022" in readme and "sp-vit" in readme


if __name__ == "__main__":
    _serve()
