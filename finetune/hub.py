"""Pull backbones from, and push fine-tuned models to, the Hugging Face Hub; convert official releases.

A pushed repo is exactly what timm reads (``model.safetensors`` + ``config.json`` written by
:func:`timm.models.save_for_hf`), so ``import finetune, timm; timm.create_model("hf-hub:owner/name",
pretrained=True)`` rebuilds the model with its RPE/SP settings (``config.json`` ``model_args``), label
names and preprocessing. The folder also holds a model card (``README.md``) and the recipe
(``config.yaml``).

Everything is exported into a local folder first and uploaded second: a failed upload leaves the
folder intact and prints the command that retries from it. Tokens are read by huggingface_hub
(``HF_TOKEN`` or ``hf auth login``) and never written or printed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import pickle
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import lightning.pytorch as pl
import timm
import torch
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, constants, hf_hub_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_token, http_backoff, validate_repo_id
from timm.data import ImageNetInfo
from timm.models import get_pretrained_cfg, parse_model_name, save_for_hf
from torch import nn

from .errors import FinetuneError

__all__ = [
    "HubError",
    "ExportError",
    "CardInfo",
    "retry_command",
    "hub_errors",
    "create_model",
    "load_checkpoint_model",
    "export_model",
    "export_checkpoint",
    "push_folder",
    "convert",
    "push_main",
    "convert_main",
    "PushToHubCallback",
]

# Retry the same failures huggingface_hub's own backoff retries (connection errors, timeouts, 429/5xx).
_BACKOFF_DEFAULTS = inspect.signature(http_backoff).parameters
_TRANSIENT_EXCEPTIONS: tuple[type[BaseException], ...] = (
    *_BACKOFF_DEFAULTS["retry_on_exceptions"].default,
    ConnectionError,
    TimeoutError,
)
_TRANSIENT_STATUS: tuple[int, ...] = tuple(_BACKOFF_DEFAULTS["retry_on_status_codes"].default)

# Dataset names (as the datamodules spell them) whose Hub dataset id is certain; others are omitted
# from the card's `datasets:` metadata and only named in the text.
_HUB_DATASETS = {"imagenet": "imagenet-1k", "imagenet1k": "imagenet-1k", "ilsvrc2012": "imagenet-1k"}


@dataclass(frozen=True)
class _Paper:
    family: str  # how the card names the architecture
    tag: str
    citation: str
    bibtex: str


_PAPERS = {
    "irpe": _Paper(
        "iRPE-DeiT",
        "irpe",
        "Kan Wu, Houwen Peng, Minghao Chen, Jianlong Fu, Hongyang Chao. *Rethinking and Improving Relative "
        "Position Encoding for Vision Transformer.* ICCV 2021. [arXiv:2107.14222](https://arxiv.org/abs/2107.14222)",
        "@inproceedings{wu2021rethinking,\n"
        "  title={Rethinking and Improving Relative Position Encoding for Vision Transformer},\n"
        "  author={Wu, Kan and Peng, Houwen and Chen, Minghao and Fu, Jianlong and Chao, Hongyang},\n"
        "  booktitle={Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},\n"
        "  year={2021}\n}",
    ),
    "spvit": _Paper(
        "SP-ViT",
        "sp-vit",
        "Yuxuan Zhou, Wangmeng Xiang, Chao Li, Biao Wang, Xihan Wei, Lei Zhang, Margret Keuper, Xiansheng Hua. "
        "*SP-ViT: Learning 2D Spatial Priors for Vision Transformers.* BMVC 2022. "
        "[arXiv:2206.07662](https://arxiv.org/abs/2206.07662)",
        "@inproceedings{zhou2022spvit,\n"
        "  title={SP-ViT: Learning 2D Spatial Priors for Vision Transformers},\n"
        "  author={Zhou, Yuxuan and Xiang, Wangmeng and Li, Chao and Wang, Biao and Wei, Xihan and Zhang, Lei"
        " and Keuper, Margret and Hua, Xiansheng},\n"
        "  booktitle={British Machine Vision Conference (BMVC)},\n"
        "  year={2022}\n}",
    ),
}


class HubError(FinetuneError, RuntimeError):
    """A Hub operation failed; the message is one line naming the repo (and file) and the cause."""


class ExportError(FinetuneError, ValueError):
    """A checkpoint or export folder is not what was expected; the message names the file and key."""


# --------------------------------------------------------------------------------------------------
# Pull
# --------------------------------------------------------------------------------------------------


def _split_revision(model_id: str) -> tuple[str, str | None]:
    repo_id, _, revision = model_id.partition("@")
    return repo_id, revision or None


@contextlib.contextmanager
def hub_errors(repo_id: str, filename: str, revision: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub's download errors into a one-line :class:`HubError` naming repo and file."""
    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        yield
    except RevisionNotFoundError as err:
        raise HubError(f"{repo_id}: revision {revision!r} not found on {constants.ENDPOINT}") from err
    except RemoteEntryNotFoundError as err:
        raise HubError(f"{where}: the repository has no file {filename!r}") from err
    except RepositoryNotFoundError as err:
        raise HubError(
            f"{where}: repository not found on {constants.ENDPOINT} (or private/gated: set HF_TOKEN or run "
            "`hf auth login`)"
        ) from err
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        if constants.HF_HUB_OFFLINE:
            cause = "HF_HUB_OFFLINE=1 forbids downloading it; run once online or unset HF_HUB_OFFLINE"
        else:
            cause = f"cannot download it from {constants.ENDPOINT} ({_cause_of(err)})"
        raise HubError(f"{where}: {filename} is not in the local cache ({constants.HF_HUB_CACHE}) and {cause}") from err
    except HfHubHTTPError as err:
        raise HubError(f"{where}: fetching {filename} failed with {_http_cause(err)}") from err


def _cause_of(err: BaseException) -> str:
    """The innermost cause of a connection failure, by class name (never the request headers)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return type(err).__name__


def _http_cause(err: HfHubHTTPError) -> str:
    status = err.response.status_code if err.response is not None else "?"
    message = (getattr(err, "server_message", None) or "").strip().splitlines()
    return f"HTTP {status}" + (f" ({message[0][:200]})" if message else "")


def create_model(model_name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` that reports Hub failures of ``hf-hub:owner/name[@revision]`` in one line.

    timm itself accepts ``@revision`` (a branch, tag or commit) in ``hf-hub:`` ids and reads through
    huggingface_hub's cache (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, ``HF_TOKEN``); this wrapper
    only turns its download errors into a :class:`HubError` such as
    ``owner/name: model.safetensors is not in the local cache (...) and HF_HUB_OFFLINE=1 forbids ...``.
    """
    source, model_id = parse_model_name(model_name)
    if source != "hf-hub":
        return timm.create_model(model_name, pretrained=pretrained, **kwargs)
    repo_id, revision = _split_revision(model_id)
    with hub_errors(repo_id, "config.json", revision):
        hf_hub_download(repo_id, "config.json", revision=revision, library_name="timm")
    # timm looks for model.safetensors first (then pytorch_model.bin); the configuration is cached by now.
    with hub_errors(repo_id, "model.safetensors", revision):
        return timm.create_model(model_name, pretrained=pretrained, **kwargs)


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; it replaces ``target`` only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        previous = None
        if target.exists():  # move the previous export aside, restore it if the swap fails
            previous = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            target.rename(previous / target.name)
        try:
            tmp.rename(target)
        except OSError:
            if previous is not None:
                (previous / target.name).rename(target)
            raise
        finally:
            if previous is not None:
                shutil.rmtree(previous, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _plain(value: Any) -> Any:
    """A JSON-friendly copy of a model argument (dataclass configs such as RPEConfig become dicts)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _export_model_args(model: nn.Module) -> dict[str, Any]:
    """Serializable replacements for recorded factory arguments that JSON cannot hold (dataclass
    configs), plus the model's full RPE settings so that config.json states them explicitly."""
    args = {}
    for key, value in getattr(model, "_model_args", {}).items():
        try:
            json.dumps(value)
        except TypeError:
            args[key] = _plain(value)
    rpe_config = getattr(model, "rpe_config", None)
    if dataclasses.is_dataclass(rpe_config):
        args["rpe_config"] = dataclasses.asdict(rpe_config)
    return args


def _paper_of(config: dict[str, Any]) -> _Paper | None:
    """The paper behind an exported config.json (by the pretrained_cfg's arXiv id or the model args)."""
    papers = str(config["pretrained_cfg"].get("paper_ids", ""))
    if "2206.07662" in papers or config["architecture"].startswith("spvit"):
        return _PAPERS["spvit"]
    if "2107.14222" in papers or "rpe_config" in config.get("model_args", {}):
        return _PAPERS["irpe"]
    return None


def _redact(text: str) -> str:
    token = get_token()
    return text.replace(token, "<redacted>") if token else text


@dataclass
class CardInfo:
    """What the model card says beyond the model itself (all optional)."""

    repo_id: str | None = None
    dataset: str | None = None
    metrics: dict[str, Any] | None = None
    per_class_accuracy: dict[str, float] | None = None
    pretrained: str | None = None
    ema: bool = False
    source: str | None = None  # an official release file or URL, for converted checkpoints
    license: str | None = None


def _starting_point(pretrained: str, arch: str) -> tuple[str | None, str]:
    """(the Hub ``base_model`` or None, how the card names the weights training started from).

    ``pretrained`` is the module's record: ``hf-hub:owner/name[@rev]``, ``timm`` (the weights registered
    for the architecture: for iRPE/SP-ViT an official GitHub release, cited by URL) or a file path
    (named by its file name only).
    """
    if pretrained.startswith("hf-hub:"):
        repo_id = _split_revision(pretrained[len("hf-hub:"):])[0]
        return repo_id, f"[{pretrained}](https://huggingface.co/{repo_id})"
    if pretrained == "timm":
        cfg = get_pretrained_cfg(arch)
        url = cfg.url if cfg is not None else None
        return None, f"the released weights of `{arch}`" + (f" ({url})" if url else "")
    return None, f"`{Path(pretrained).name}` (a local checkpoint file)"


def _percent(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ExportError(f"metrics.{key}={value!r}: expected a fraction in [0, 1]")
    return round(100.0 * float(value), 2)


def _model_card(config: dict[str, Any], info: CardInfo, recipe: bool) -> ModelCard:
    """The README of an export, from its config.json, ``info`` and whether a recipe sits beside it."""
    cfg = config["pretrained_cfg"]
    arch = config["architecture"]
    paper = _paper_of(config)
    name = info.repo_id.split("/")[-1] if info.repo_id else arch
    hub_id = f"hf-hub:{info.repo_id}" if info.repo_id else f"hf-hub:<owner>/{name}"
    dataset = re.sub(r"DataModule$", "", info.dataset) if info.dataset else None  # a datamodule's class name
    dataset_id = _HUB_DATASETS.get(re.sub(r"[^a-z0-9]", "", (dataset or "").lower()))
    base_model, started_from = _starting_point(info.pretrained, arch) if info.pretrained else (None, None)

    metrics = info.metrics or {}
    rows = {label: _percent(metrics, key)
            for key, label in (("top1", "Top-1 accuracy"), ("top5", "Top-5 accuracy"),
                               ("mean_class_acc", "Mean class accuracy"))}
    split = metrics.get("split", "val")
    eval_results = [
        EvalResult(task_type="image-classification", dataset_type=dataset_id or dataset,
                   dataset_name=dataset, dataset_split=split, metric_type="accuracy",
                   metric_name=label, metric_value=value)
        for label, value in rows.items() if value is not None
    ] if dataset else []
    data = ModelCardData(
        library_name="timm",
        pipeline_tag="image-classification",
        tags=["image-classification", "timm", "vision-transformer", *([paper.tag] if paper else []), "rpe-finetune"],
        license=info.license or cfg.get("license") or "apache-2.0",
        base_model=base_model,
        datasets=[dataset_id] if dataset_id else None,
        model_name=name,
        eval_results=eval_results or None,
    )

    lines = [f"# {name}", ""]
    what = f"`{arch}`" + (f" ({paper.family})" if paper else "")
    if info.source:
        lines.append(f"{what} with the official released weights, converted to timm's Hub format.")
    else:
        lines.append(f"{what} fine-tuned on {dataset or 'a custom dataset'} with rpe-finetune.")
    lines += ["", "## Usage", "", "```python",
              "import finetune  # registers the iRPE-DeiT and SP-ViT architectures with timm",
              "import timm", "",
              f'model = timm.create_model("{hub_id}", pretrained=True).eval()',
              "transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))",
              "```", ""]
    if any(value is not None for value in rows.values()):
        lines += [f"## Results ({dataset or 'dataset'}, {split} split"
                  + (f", epoch {metrics['epoch']})" if "epoch" in metrics else ")"), "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {label} | {value:.2f}% |" for label, value in rows.items() if value is not None]
        lines.append("")
    if info.per_class_accuracy:
        ranked = sorted(info.per_class_accuracy.items(), key=lambda item: item[1])
        mean = sum(acc for _, acc in ranked) / len(ranked)
        lines += ["## Per-class accuracy", "", f"Mean over {len(ranked)} classes: {100 * mean:.2f}%.", ""]
        count = min(5, len(ranked) // 2)  # best and worst lists never share a class
        if count:
            lines += ["| best classes | acc | worst classes | acc |", "|---|---|---|---|"]
            for (b_name, b_acc), (w_name, w_acc) in zip(ranked[::-1][:count], ranked[:count], strict=True):
                lines.append(f"| {b_name} | {100 * b_acc:.2f}% | {w_name} | {100 * w_acc:.2f}% |")
            lines.append("")
    input_size = list(cfg.get("input_size", []))
    lines += ["## Settings", "",
              f"- Architecture: `{arch}`, model arguments in `config.json` (`model_args`)",
              f"- Classes: {config['num_classes']}" + (" (names in `config.json` `label_names`)"
                                                       if config.get("label_names") else ""),
              f"- Input size: {input_size}, mean {list(cfg.get('mean', []))}, std {list(cfg.get('std', []))}, "
              f"crop_pct {cfg.get('crop_pct')}, interpolation {cfg.get('interpolation')}"]
    if started_from:
        lines.append(f"- Initialised from: {started_from}")
    if info.source:
        lines.append(f"- Converted from: {info.source}")
    if info.ema:
        lines.append("- Weights: exponential moving average (EMA) of the training weights")
    if recipe:
        lines.append("- Recipe: [`config.yaml`](config.yaml)")
    if cfg.get("origin_url"):
        lines.append(f"- Architecture's original code: {cfg['origin_url']}")
    lines.append("")
    if paper:
        lines += ["## Citation", "", paper.citation, "", "```bibtex", paper.bibtex, "```", ""]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)
    return ModelCard(_redact(content))


def export_model(
    model: nn.Module,
    out_dir: str | Path,
    info: CardInfo,
    label_names: Sequence[str] | None = None,
    data_config: dict[str, Any] | None = None,
    config_yaml: str | None = None,
) -> Path:
    """Write model.safetensors, config.json (timm's format), README.md and config.yaml into ``out_dir``.

    The folder appears complete or not at all (it is written beside the target, then renamed). Errors
    name the offending argument (``class_names``, ``data_config``, ``metrics.top1``, ...).
    """
    out = Path(out_dir)
    if label_names is not None and len(label_names) != model.num_classes:
        raise ExportError(f"class_names: {len(label_names)} names for a model with {model.num_classes} classes")
    with _atomic_folder(out) as tmp:
        try:
            save_for_hf(
                model,
                str(tmp),
                model_config={"label_names": list(label_names)} if label_names else None,
                model_args=_export_model_args(model),
                data_config=data_config,
                safe_serialization=True,
            )
        except ValueError as err:  # e.g. an input size the model cannot take
            raise ExportError(f"data_config {data_config}: {str(err).splitlines()[0]}") from err
        exported = json.loads((tmp / "config.json").read_text())  # the card describes what was exported
        _model_card(exported, info, recipe=config_yaml is not None).save(tmp / "README.md")
        if config_yaml is not None:
            (tmp / "config.yaml").write_text(_redact(config_yaml), encoding="utf-8")
    return out


def _not_plain_weights(where: str | Path, err: Exception) -> ExportError:
    """The one-line error for a file ``torch.load(weights_only=True)`` refused (or could not read)."""
    text = str(err)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        detail = f"it pickles {found.group(1)}, and only tensors and plain containers are loaded"
    else:
        detail = text.strip().splitlines()[0][:200] if text.strip() else type(err).__name__
    return ExportError(f"{where}: not a plain weights file ({detail})")


def _load_weights_file(path: Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise ExportError(f"{path}: no such file") from err
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise _not_plain_weights(path, err) from err


def load_checkpoint_model(ckpt_path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the timm model of a fine-tuning checkpoint (EMA weights when the run used EMA).

    Returns the model (eval mode) and the checkpoint's ``finetune`` metadata.
    """
    path = Path(ckpt_path)
    ckpt = _load_weights_file(path)
    meta = ckpt.get("finetune") if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict):
        raise ExportError(f"{path}: no 'finetune' entry; expected a checkpoint written by the fine-tuning module")
    for key in ("model_name", "num_classes"):
        if key not in meta:
            raise ExportError(f"{path}: finetune.{key} is missing")
    state_dict = ckpt.get("state_dict")
    if not isinstance(state_dict, dict):
        raise ExportError(f"{path}: 'state_dict' is missing")
    prefix = "ema.module." if meta.get("ema") else "model."
    weights = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    if not weights:
        raise ExportError(f"{path}: state_dict has no keys starting with {prefix!r} (finetune.ema={meta.get('ema')})")
    kwargs = {**(meta.get("model_kwargs") or {}), "num_classes": meta["num_classes"]}
    try:
        model = create_model(meta["model_name"], pretrained=False, **kwargs)
    except HubError:
        raise
    except (TypeError, ValueError, RuntimeError) as err:
        raise ExportError(f"{path}: cannot build finetune.model_name={meta['model_name']!r} with "
                          f"model_kwargs {kwargs}: {str(err).splitlines()[0]}") from err
    expected = model.state_dict()
    for key, value in expected.items():
        if key not in weights:
            raise ExportError(f"{path}: state_dict lacks {prefix}{key} (model {meta['model_name']})")
        if weights[key].shape != value.shape:
            raise ExportError(f"{path}: state_dict key {prefix}{key} has shape {tuple(weights[key].shape)}, "
                              f"model {meta['model_name']} expects {tuple(value.shape)}")
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise ExportError(f"{path}: state_dict key {prefix}{extra[0]} does not exist in model {meta['model_name']}")
    model.load_state_dict(weights)
    return model.eval(), meta


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path, repo_id: str | None = None,
                      license: str | None = None) -> Path:
    """Export a fine-tuning checkpoint into a Hub-ready folder (see :func:`export_model`)."""
    model, meta = load_checkpoint_model(ckpt_path)
    data_config = meta.get("data_config") or None
    if data_config:
        data_config = {key: tuple(value) if isinstance(value, list) else value for key, value in data_config.items()}
    info = CardInfo(
        repo_id=repo_id, dataset=meta.get("dataset"), metrics=meta.get("metrics"),
        per_class_accuracy=meta.get("per_class_accuracy"), pretrained=meta.get("pretrained"),
        ema=bool(meta.get("ema")), license=license,
    )
    try:
        return export_model(model, out_dir, info, label_names=meta.get("class_names") or None,
                            data_config=data_config, config_yaml=meta.get("config_yaml"))
    except ExportError as err:
        raise ExportError(f"{ckpt_path}: finetune.{err}") from err


# --------------------------------------------------------------------------------------------------
# Upload
# --------------------------------------------------------------------------------------------------


def _check_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ExportError(f"--repo-id {repo_id!r}: expected 'owner/name' ({str(err).splitlines()[0]})") from err
    if repo_id.count("/") != 1:
        raise ExportError(f"--repo-id {repo_id!r}: expected 'owner/name'")


def _check_target(repo_id: str, revision: str | None, create_pr: bool) -> None:
    _check_repo_id(repo_id)
    if create_pr and revision not in (None, "main"):
        raise ExportError(f"--create-pr opens a pull request against main; it cannot be combined with --revision {revision!r}")


def retry_command(folder: Path, repo_id: str, private: bool = False, revision: str | None = None,
                  create_pr: bool = False) -> str:
    """The CLI command that uploads an exported folder again."""
    args = ["python", "cli.py", "push", "--folder", str(folder), "--repo-id", repo_id]
    args += ["--private"] * private + (["--revision", revision] if revision else []) + ["--create-pr"] * create_pr
    return shlex.join(args)


def _upload_cause(err: BaseException, repo_id: str) -> tuple[bool, str] | None:
    """(transient?, one-line cause) of an upload failure, or None for errors that are not the Hub's."""
    if isinstance(err, OfflineModeIsEnabled):
        return False, "HF_HUB_OFFLINE=1 is set; unset it to upload"
    if isinstance(err, HfHubHTTPError) and err.response is not None:
        status = err.response.status_code
        if status in (401, 403):
            return False, (f"HTTP {status}: not allowed to write to {repo_id}; set HF_TOKEN or run `hf auth login` "
                           "with a write token")
        return status in _TRANSIENT_STATUS, f"{_http_cause(err)} from {constants.ENDPOINT}"
    if isinstance(err, _TRANSIENT_EXCEPTIONS):
        return True, f"cannot reach {constants.ENDPOINT} ({_cause_of(err)})"
    return None


def push_folder(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str = "Upload model with rpe-finetune",
    retries: int = 3,
    retry_wait: float = 2.0,
) -> Any:
    """Create the repo (if needed) and upload ``folder`` to it; returns huggingface_hub's CommitInfo.

    Transient failures (connection errors, timeouts, 429/5xx) are retried ``retries`` times, waiting
    ``retry_wait`` seconds and doubling; 401/403 are not retried. Raises :class:`HubError` whose one-line
    message ends with the command that retries from the folder.
    """
    folder = Path(folder)
    _check_target(repo_id, revision, create_pr)
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise ExportError(f"{folder}: {name} is missing; expected a folder written by export/convert")
    api = HfApi(library_name="rpe-finetune")
    attempt = 0
    while True:
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision and revision != "main" and not revision.startswith("refs/"):
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                     create_pr=create_pr, commit_message=commit_message)
        except Exception as err:
            classified = _upload_cause(err, repo_id)
            if classified is None:
                raise
            transient, cause = classified
            if not transient or attempt == retries:
                tries = f" after {attempt + 1} attempts" if attempt else ""
                raise HubError(f"upload of {folder} to {repo_id} failed{tries}: {cause}; the export is kept, retry with: "
                               f"{retry_command(folder, repo_id, private, revision, create_pr)}") from err
            wait = retry_wait * 2**attempt
            print(f"upload to {repo_id} failed ({cause}); retrying in {wait:g}s", file=sys.stderr)
            time.sleep(wait)
            attempt += 1


def _report_push(info: Any, repo_id: str) -> None:
    if getattr(info, "pr_url", None):
        print(f"opened pull request {info.pr_url}")
    else:
        print(f"pushed to {constants.ENDPOINT}/{repo_id} (commit {info.oid})")


# --------------------------------------------------------------------------------------------------
# Convert
# --------------------------------------------------------------------------------------------------


def _fetch_source(source: str) -> Path:
    """A local path as is; a URL downloaded once into torch's hub cache (TORCH_HOME), atomically."""
    if urlsplit(source).scheme not in ("http", "https"):
        return Path(source)
    name = Path(urlsplit(source).path).name or "checkpoint.pth"
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / name
    if not target.is_file():
        try:  # download_url_to_file writes a temporary file beside the target and renames it
            torch.hub.download_url_to_file(source, str(target), progress=False)
        except OSError as err:
            raise ExportError(f"--source {source}: download failed ({str(err).splitlines()[0]})") from err
    return target


def convert(source: str, model_name: str, out_dir: str | Path, repo_id: str | None = None,
            model_args: dict[str, Any] | None = None) -> Path:
    """Turn an official release (iRPE ``{'model': ...}`` .pth, SP-ViT CheckpointSaver .pth.tar, or
    .safetensors) into a Hub-ready folder. timm loads it through the model's own checkpoint filter,
    which checks every key and shape; a CheckpointSaver file's EMA weights are used when present.
    """
    path = _fetch_source(source)
    if not path.is_file():
        raise ExportError(f"--source {source}: no such file")
    try:  # timm reads .pth/.pth.tar with torch.load(weights_only=True) (argparse.Namespace allowed)
        model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                  **(model_args or {}))
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, KeyError) as err:
        refused = err
        while refused is not None and not isinstance(refused, (pickle.UnpicklingError, EOFError)):
            refused = refused.__cause__ or refused.__context__  # timm re-raises torch's refusal
        if refused is not None:
            raise _not_plain_weights(source, refused) from err
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"{source}: {first}") from err
    release = model.pretrained_cfg.get("url")
    if urlsplit(source).scheme:
        cited = source
    else:  # a local file: name it (not the local path) and the official release it should be
        cited = f"`{path.name}`" + (f" (official release: {release})" if release else "")
    imagenet = model.num_classes == 1000  # every official release is an ImageNet-1k classifier
    info = CardInfo(repo_id=repo_id, source=cited, dataset="ImageNet-1k" if imagenet else None)
    label_names = ImageNetInfo().label_names() if imagenet else None  # WordNet ids, as timm's own repos
    return export_model(model.eval(), out_dir, info, label_names=label_names)


# --------------------------------------------------------------------------------------------------
# Command lines
# --------------------------------------------------------------------------------------------------


def _add_upload_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", help="branch to push to (created from main if missing)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request against main instead")
    parser.add_argument("--retries", type=int, default=3, help="retries on connection errors and 429/5xx")
    parser.add_argument("--retry-wait", type=float, default=2.0, help="seconds before the first retry (doubles)")


def push_main(argv: list[str]) -> int:
    """``cli.py push``: export a fine-tuning checkpoint (or take an exported folder) and upload it."""
    parser = argparse.ArgumentParser(
        prog="cli.py push", description="Export a fine-tuning checkpoint (or take an exported folder) and upload it.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="Lightning checkpoint written by the fine-tuning module")
    source.add_argument("--folder", help="folder written by an earlier export (retry an upload)")
    parser.add_argument("--repo-id", required=True, help="owner/name on the Hub")
    parser.add_argument("--export-dir", help="where to export (default <ckpt dir>/hub_export/<name>)")
    parser.add_argument("--license", help="license for the card (default: the architecture's, else apache-2.0)")
    parser.add_argument("--export-only", action="store_true", help="write the folder, do not upload")
    _add_upload_args(parser)
    args = parser.parse_args(argv)
    try:
        _check_target(args.repo_id, args.revision, args.create_pr)
        if args.folder and (args.export_dir or args.export_only or args.license):
            raise ExportError("--export-dir, --export-only and --license apply to --ckpt, not to --folder")
        if args.ckpt:
            ckpt = Path(args.ckpt)
            folder = Path(args.export_dir) if args.export_dir else ckpt.parent / "hub_export" / args.repo_id.split("/")[1]
            export_checkpoint(ckpt, folder, repo_id=args.repo_id, license=args.license)
            print(f"exported {ckpt} to {folder}")
        else:
            folder = Path(args.folder)
        if args.export_only:
            return 0
        info = _push_with_args(folder, args.repo_id, args)
    except (ExportError, HubError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    _report_push(info, args.repo_id)
    return 0


def _push_with_args(folder: Path, repo_id: str, args: argparse.Namespace) -> Any:
    """``push_folder`` with the upload options ``_add_upload_args`` put on the command line."""
    return push_folder(folder, repo_id, private=args.private, revision=args.revision,
                       create_pr=args.create_pr, retries=args.retries, retry_wait=args.retry_wait)


def convert_main(argv: list[str]) -> int:
    """``cli.py convert``: official iRPE / SP-ViT checkpoint (file or URL) -> Hub-ready folder [-> push]."""
    parser = argparse.ArgumentParser(
        prog="cli.py convert",
        description="Convert an official iRPE / SP-ViT checkpoint (file or URL) into a Hub-ready folder, optionally push it.")
    parser.add_argument("--source", required=True, help="release .pth / .pth.tar / .safetensors file or URL")
    parser.add_argument("--model", required=True, help="registered model name, e.g. deit_small_patch16_224_ctx_product_50_shared_k")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--model-args", default="{}", help='JSON keyword overrides, e.g. \'{"img_size": 384}\'')
    parser.add_argument("--push", metavar="REPO_ID", help="also upload the folder to owner/name")
    _add_upload_args(parser)
    args = parser.parse_args(argv)
    try:
        try:
            model_args = json.loads(args.model_args)
        except json.JSONDecodeError as err:
            raise ExportError(f"--model-args {args.model_args!r}: not valid JSON ({err.msg})") from err
        if not isinstance(model_args, dict):
            raise ExportError(f"--model-args {args.model_args!r}: expected a JSON object")
        if args.push:
            _check_target(args.push, args.revision, args.create_pr)
        if not timm.is_model(args.model):
            raise ExportError(f"--model {args.model!r}: not a registered model (see timm.list_models('*irpe*'), "
                              "timm.list_models('spvit*'), timm.list_models('deit_*'))")
        out = convert(args.source, args.model, args.out, repo_id=args.push, model_args=model_args)
        print(f"converted {args.source} to {out}")
        if not args.push:
            return 0
        info = _push_with_args(out, args.push, args)
    except (ExportError, HubError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    _report_push(info, args.push)
    return 0


# --------------------------------------------------------------------------------------------------
# Lightning
# --------------------------------------------------------------------------------------------------


class PushToHubCallback(pl.Callback):
    """At the end of ``fit``, export the best (else last) checkpoint and push it to ``repo_id``.

    The folder goes to ``export_dir`` (default ``<checkpoint dir>/hub_export/<name>``). A failed export
    or upload does not fail the run: the one-line error (with the retry command) is printed and kept
    in :attr:`error`.
    """

    def __init__(self, repo_id: str, private: bool = False, revision: str | None = None,
                 create_pr: bool = False, export_dir: str | None = None) -> None:
        _check_target(repo_id, revision, create_pr)  # fail before training, not after
        self.repo_id, self.private, self.revision, self.create_pr = repo_id, private, revision, create_pr
        self.export_dir = export_dir
        self.error: str | None = None
        self.commit: Any = None

    def _checkpoint(self, trainer: pl.Trainer) -> Path:
        callback = trainer.checkpoint_callback
        for path in (getattr(callback, "best_model_path", ""), getattr(callback, "last_model_path", "")):
            if path and Path(path).is_file():
                return Path(path)
        path = Path(trainer.default_root_dir) / "hub_final.ckpt"
        trainer.save_checkpoint(path)  # collective: every rank takes part
        return path

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ckpt = self._checkpoint(trainer)
        if not trainer.is_global_zero:
            return
        name = self.repo_id.split("/")[1]
        folder = Path(self.export_dir) if self.export_dir else ckpt.parent / "hub_export" / name
        try:
            export_checkpoint(ckpt, folder, repo_id=self.repo_id)
            print(f"exported {ckpt} to {folder}")
            self.commit = push_folder(folder, self.repo_id, private=self.private, revision=self.revision,
                                      create_pr=self.create_pr)
        except (ExportError, HubError) as err:
            self.error = str(err)
            print(f"error: {err}", file=sys.stderr)
            return
        _report_push(self.commit, self.repo_id)

