"""Hub-ready folders: a fine-tuning checkpoint or an official release written as timm reads it.

A folder is exactly what timm reads (``model.safetensors`` + ``config.json`` written by
:func:`timm.models.save_for_hf`), so ``import finetune, timm; timm.create_model("hf-hub:owner/name",
pretrained=True)`` (or ``local-dir:FOLDER``) rebuilds the model with its RPE/SP settings, label names and
preprocessing; plus the model card (``README.md``, :mod:`finetune.card`) and the recipe (``config.yaml``).
The folder appears complete or not at all.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from timm.data import ImageNetInfo
from timm.models import save_for_hf
from torch import nn

from .card import PROGRAM_FILE, CardInfo, model_card, redact
from .errors import FinetuneError
from .record import plain
from .resize import resolution_args
from .weights import create_model, load_checkpoint_model

__all__ = ["ExportError", "export_model", "export_checkpoint", "convert"]


class ExportError(FinetuneError, ValueError):
    """A checkpoint or export folder is not what was expected; the message names the file and key."""


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


def _export_model_args(model: nn.Module) -> dict[str, Any]:
    """Serializable replacements for recorded factory arguments that JSON cannot hold (dataclass
    configs), plus the model's resolution settings (full RPE config; SP-ViT's prior_resize and
    trained_grid), which the model decided at build time, so that config.json states them explicitly."""
    args = {}
    for key, value in getattr(model, "_model_args", {}).items():
        try:
            json.dumps(value)
        except TypeError:
            args[key] = plain(value)
    return {**args, **resolution_args(model)}


def export_model(
    model: nn.Module,
    out_dir: str | Path,
    info: CardInfo,
    label_names: Sequence[str] | None = None,
    data_config: dict[str, Any] | None = None,
    config_yaml: str | None = None,
) -> Path:
    """Write model.safetensors, config.json (timm's format), model.pt2 (:func:`save_program`), README.md and
    config.yaml into ``out_dir``.

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
        program = save_program(model, exported["pretrained_cfg"]["input_size"], tmp / PROGRAM_FILE)
        model_card(exported, info, recipe=config_yaml is not None, program=program).save(tmp / "README.md")
        if config_yaml is not None:
            (tmp / "config.yaml").write_text(redact(config_yaml), encoding="utf-8")
    return out


def save_program(model: nn.Module, input_size: Sequence[int], path: Path) -> bool:
    """Save ``model`` as a ``torch.export`` program with a dynamic batch size, which runs with plain torch
    (``torch.export.load(path).module()``). A model torch.export cannot trace is exported without it: the
    reason is printed and False returned."""
    example = torch.randn(2, *input_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))
    except Exception as err:  # torch.export raises many types; the safetensors export stands without it
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"note: {path.name} not written: torch.export failed ({reason[:200]})", file=sys.stderr)
        return False
    torch.export.save(program, path)
    return True


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path, repo_id: str | None = None,
                      license: str | None = None) -> Path:
    """Export a fine-tuning checkpoint into a Hub-ready folder (see :func:`export_model`); the card
    reports the metrics recorded for exactly these weights."""
    model, record = load_checkpoint_model(ckpt_path)
    data_config = {key: tuple(value) if isinstance(value, list) else value
                   for key, value in record.data_config.items()} or None
    info = CardInfo(
        repo_id=repo_id, dataset=record.dataset, metrics=record.metrics, best=record.best,
        pretrained=record.pretrained, ema=record.ema, license=license,
    )
    try:
        return export_model(model, out_dir, info, label_names=record.class_names or None,
                            data_config=data_config, config_yaml=record.config_yaml)
    except ExportError as err:
        raise ExportError(f"{ckpt_path}: finetune.{err}") from err


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
    .safetensors) into a Hub-ready folder. It loads through :func:`finetune.weights.create_model`: the
    model's own checkpoint filter checks every key and shape; a CheckpointSaver file's EMA weights are
    used when present.
    """
    path = _fetch_source(source)
    if not path.is_file():
        raise ExportError(f"--source {source}: no such file")
    model = create_model(model_name, pretrained=path, **(model_args or {}))
    release = model.pretrained_cfg.get("url")
    if urlsplit(source).scheme:
        cited = source
    else:  # a local file: name it (not the local path) and the official release it should be
        cited = f"`{path.name}`" + (f" (official release: {release})" if release else "")
    imagenet = model.num_classes == 1000  # every official release is an ImageNet-1k classifier
    info = CardInfo(repo_id=repo_id, source=cited, dataset="ImageNet-1k" if imagenet else None)
    label_names = ImageNetInfo().label_names() if imagenet else None  # WordNet ids, as timm's own repos
    return export_model(model.eval(), out_dir, info, label_names=label_names)
