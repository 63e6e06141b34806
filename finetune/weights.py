"""The one path by which models get their weights, whatever names them.

:func:`create_model` builds a timm model (``import finetune`` registers the iRPE-DeiT and SP-ViT
names) and fills it from any of:

- ``pretrained=True`` with a timm name: the weights timm registers for it (for iRPE-DeiT, the
  official GitHub release); with ``hf-hub:owner/name[@revision]``: that Hub repo, through
  huggingface_hub's cache (``HF_HOME``, ``HF_HUB_OFFLINE``); with ``local-dir:PATH``: a folder
  written by ``cli.py push``/``convert`` (``config.json`` + ``model.safetensors``);
- ``pretrained=PATH``: a Lightning checkpoint of the fine-tuning module (``.ckpt``: its EMA weights
  when the run used EMA), an exported folder, or a weights file (official ``.pth`` / ``.pth.tar``
  releases, ``.safetensors``, timm CheckpointSaver files).

Every source goes through timm's pretrained loader, so the model's checkpoint filter moves the weights
to the model's grid (224 -> 384, see :mod:`finetune.resize`) and checks every key and shape. A
classifier whose class count matches the model's is kept (a fine-tuned head stays trained); another
count is dropped, as timm does when fine-tuning to new classes. Every failure is a one-line
:class:`WeightsError` (or :class:`HubError`) naming the file, repo or name and what to do.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.error import URLError

import timm
import torch
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from timm.models import get_pretrained_cfg, load_state_dict, parse_model_name
from torch import Tensor, nn

from .backbones.checkpoint import CheckpointMismatchError
from .errors import FinetuneError
from .record import CheckpointRecord

__all__ = [
    "WeightsError",
    "HubError",
    "hub_errors",
    "split_revision",
    "check_model_name",
    "read_checkpoint",
    "read_weights",
    "create_model",
    "load_checkpoint_model",
]


class WeightsError(FinetuneError, ValueError):
    """Weights that cannot be read or do not fit the model; the message names the file and the fix."""


class HubError(FinetuneError, RuntimeError):
    """A Hub operation failed; the message is one line naming the repo (and file) and the cause."""


# --------------------------------------------------------------------------------------------------
# The Hub
# --------------------------------------------------------------------------------------------------


def split_revision(model_id: str) -> tuple[str, str | None]:
    """``owner/name@revision`` -> (``owner/name``, ``revision`` or None)."""
    repo_id, _, revision = model_id.partition("@")
    return repo_id, revision or None


def cause_of(err: BaseException) -> str:
    """The innermost cause of a connection failure, by class name (never the request headers)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return type(err).__name__


def http_cause(err: HfHubHTTPError) -> str:
    status = err.response.status_code if err.response is not None else "?"
    message = (getattr(err, "server_message", None) or "").strip().splitlines()
    return f"HTTP {status}" + (f" ({message[0][:200]})" if message else "")


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
            f"{where}: repository not found on {constants.ENDPOINT} (check the name; private or gated repos "
            "need HF_TOKEN or `hf auth login`)"
        ) from err
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        if constants.HF_HUB_OFFLINE:
            cause = "HF_HUB_OFFLINE=1 forbids downloading it; run once online or unset HF_HUB_OFFLINE"
        else:
            cause = f"cannot download it from {constants.ENDPOINT} ({cause_of(err)})"
        raise HubError(
            f"{where}: {filename} is not in the local cache ({constants.HF_HUB_CACHE}) and {cause}"
        ) from err
    except HfHubHTTPError as err:
        raise HubError(f"{where}: fetching {filename} failed with {http_cause(err)}") from err


@contextlib.contextmanager
def _download_errors(model_name: str) -> Iterator[None]:
    """One-line errors for the weights timm downloads for a registered name (a URL or a Hub repo)."""
    cfg = get_pretrained_cfg(model_name)
    url = getattr(cfg, "url", None) or ""
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        with hub_errors(hub_id, getattr(cfg, "hf_hub_filename", None) or "model.safetensors"):
            yield
        return
    try:
        yield
    except (URLError, ConnectionError, TimeoutError) as err:
        filename = Path(url).name or f"{model_name}.pth"
        raise WeightsError(
            f"cannot download the pretrained weights of {model_name} from {url or '(no URL registered)'} "
            f"({cause_of(err)}): fetch {filename} where there is internet and pass it with "
            f"--model.pretrained PATH/TO/{filename}"
        ) from err


# --------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------


def _unreadable(path: Path, err: BaseException) -> WeightsError:
    """The one-line error for a file ``torch.load(weights_only=True)`` refused or could not read."""
    text = str(err).strip()
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return WeightsError(
            f"{path}: not a plain weights file (it pickles {found.group(1)}, and only tensors and plain "
            "containers are loaded)"
        )
    detail = text.splitlines()[0].split(". ")[0][:160] if text else type(err).__name__
    return WeightsError(
        f"{path}: not a complete checkpoint file ({detail}); it may be truncated: copy or save it again"
    )


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` of a file that must exist and be complete."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file; give the path of an existing checkpoint")
    try:  # timm CheckpointSaver files hold their training args as an argparse.Namespace
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        raise _unreadable(path, err) from err
    if not isinstance(checkpoint, dict):
        raise WeightsError(f"{path}: holds a {type(checkpoint).__name__}, expected a dict of weights")
    return checkpoint


def _lightning_weights(checkpoint: dict[str, Any], path: Path) -> tuple[dict[str, Tensor], CheckpointRecord]:
    record = CheckpointRecord.from_checkpoint(checkpoint, str(path))
    state_dict = checkpoint.get("state_dict")
    if not isinstance(state_dict, dict):
        raise WeightsError(f"{path}: 'state_dict' is missing; expected a checkpoint written by the fine-tuning module")
    prefix = "ema.module." if record.ema else "model."
    weights = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    if not weights:
        raise WeightsError(f"{path}: state_dict has no keys starting with {prefix!r} (finetune.ema={record.ema})")
    return weights, record


def read_weights(source: str | Path) -> tuple[dict[str, Tensor], CheckpointRecord | None]:
    """The state dict of a weights source (file or exported folder), and its record when it is a
    fine-tuning checkpoint."""
    path = Path(source).expanduser()
    if path.is_dir():
        weights_file = path / "model.safetensors"
        if not weights_file.is_file():
            raise WeightsError(f"{path}: a folder without model.safetensors; expected one written by cli.py push/convert")
        path = weights_file
    if path.suffix == ".safetensors":
        try:
            return load_state_dict(str(path)), None
        except FileNotFoundError as err:
            raise WeightsError(f"{path}: no such file; give the path of an existing weights file") from err
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise _unreadable(path, err) from err
    checkpoint = read_checkpoint(path)
    if CheckpointRecord.KEY in checkpoint:
        return _lightning_weights(checkpoint, path)
    try:  # release layouts: {'model': ...}, CheckpointSaver (state_dict, state_dict_ema, module. prefix)
        return load_state_dict(str(path), use_ema=True), None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise _unreadable(path, err) from err


def _head_classes(state_dict: dict[str, Tensor], model_name: str) -> int | None:
    """The class count of the classifier in ``state_dict`` (None when it has none)."""
    cfg = get_pretrained_cfg(model_name)
    names = getattr(cfg, "classifier", None) or "head"
    for name in (names,) if isinstance(names, str) else names:
        weight = state_dict.get(f"{name}.weight")
        if weight is not None and weight.ndim == 2:
            return int(weight.shape[0])
    return None


# --------------------------------------------------------------------------------------------------
# Building models
# --------------------------------------------------------------------------------------------------


def check_model_name(model_name: str) -> None:
    """Refuse a name timm cannot build, suggesting the closest registered ones (this project's included)."""
    source, name = parse_model_name(model_name)
    if source in ("hf-hub", "local-dir"):
        if source == "local-dir" and not (Path(name).expanduser() / "config.json").is_file():
            raise WeightsError(
                f"{model_name}: no config.json in {name}; local-dir: takes a folder written by cli.py push/convert"
            )
        return
    if timm.is_model(model_name):
        return
    close = difflib.get_close_matches(model_name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise WeightsError(
        f"unknown model {model_name!r}; {hint}use a timm name (timm.list_models('*irpe*'), 'spvit*', ...), "
        "hf-hub:owner/name or local-dir:PATH"
    )


def create_model(model_name: str, pretrained: bool | str | Path = False, **kwargs: Any) -> nn.Module:
    """A timm model with the weights ``pretrained`` names (see the module docstring).

    ``kwargs`` are ``timm.create_model`` keywords (``num_classes``, ``img_size``, ``rpe_config``, ...).
    Without ``num_classes``, a model given weights from a file gets the class count of their classifier,
    so a fine-tuned head is kept.
    """
    check_model_name(model_name)
    source, model_id = parse_model_name(model_name)
    if isinstance(pretrained, (str, Path)) and not isinstance(pretrained, bool):
        state_dict, _ = read_weights(pretrained)
        classes = _head_classes(state_dict, model_name)
        num_classes = kwargs.pop("num_classes", classes)
        # source "": the in-memory weights win over an hf-hub:/local-dir: name's own files
        overlay = {"state_dict": state_dict, "source": "", **({"num_classes": classes} if classes is not None else {})}
        with _load_errors(model_name, str(pretrained)):
            if num_classes is None:
                return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
            return timm.create_model(
                model_name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=num_classes, **kwargs
            )
    if source == "hf-hub":
        repo_id, revision = split_revision(model_id)
        with hub_errors(repo_id, "config.json", revision):
            hf_hub_download(repo_id, "config.json", revision=revision, library_name="timm")
        # timm reads model.safetensors (else pytorch_model.bin); the configuration is cached by now
        with hub_errors(repo_id, "model.safetensors", revision), _load_errors(model_name, model_name):
            return timm.create_model(model_name, pretrained=pretrained, **kwargs)
    if source == "local-dir" or not pretrained:
        with _load_errors(model_name, model_name):
            return timm.create_model(model_name, pretrained=bool(pretrained), **kwargs)
    with _download_errors(model_name), _load_errors(model_name, model_name):
        return timm.create_model(model_name, pretrained=True, **kwargs)


@contextlib.contextmanager
def _load_errors(model_name: str, source: str) -> Iterator[None]:
    """One line for weights that do not fit the model (timm's strict load, the backbones' filters)."""
    try:
        yield
    except CheckpointMismatchError as err:
        raise WeightsError(f"{source}: {err}") from err
    except RuntimeError as err:
        text = str(err)
        if "Error(s) in loading state_dict" in text or "size mismatch" in text:
            detail = next((line.strip() for line in text.splitlines()[1:] if line.strip()), text.splitlines()[0])
            raise WeightsError(
                f"{source}: the weights do not fit {model_name} ({detail[:200]}); are they for another architecture?"
            ) from err
        if "No pretrained weights exist" in text:
            raise WeightsError(
                f"{model_name} has no registered weights; pass a file with --model.pretrained PATH or use "
                "--model.pretrained false"
            ) from err
        raise


def load_checkpoint_model(ckpt_path: str | Path) -> tuple[nn.Module, CheckpointRecord]:
    """The exact model of a fine-tuning checkpoint (eval mode, EMA weights when the run used EMA) and its
    record; every key and shape is checked."""
    path = Path(ckpt_path)
    checkpoint = read_checkpoint(path)
    _, record = _lightning_weights(checkpoint, path)
    kwargs = {**record.model_kwargs, "num_classes": record.num_classes}
    try:
        model = create_model(record.model_name, pretrained=path, **kwargs)
    except (HubError, WeightsError):
        raise
    except (TypeError, ValueError, RuntimeError) as err:
        raise WeightsError(
            f"{path}: cannot build finetune.model_name={record.model_name!r} with model_kwargs {kwargs}: "
            f"{str(err).splitlines()[0]}"
        ) from err
    return model.eval(), record
