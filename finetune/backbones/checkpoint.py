"""Checks shared by the backbones' checkpoint filters."""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import FinetuneError


class CheckpointMismatchError(FinetuneError, ValueError):
    """A checkpoint does not fit the model it is loaded into."""


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _replaced_classifiers(model: nn.Module) -> tuple[str, ...]:
    """Key prefixes of the classifier(s) when the model has a new class count: timm drops those keys."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if getattr(model, "num_classes", None) == cfg.get("num_classes", getattr(model, "num_classes", None)):
        return ()
    names = cfg.get("classifier") or ()
    return tuple(f"{name}." for name in ((names,) if isinstance(names, str) else names))


def _adapted_input_convs(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Shapes the checkpoint holds for the input convolution(s) timm adapts after the filter
    (``adapt_input_conv``) when the model's ``in_chans`` differs from the pretrained cfg's."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    source_chans = (cfg.get("input_size") or (3,))[0]
    convs = cfg.get("first_conv")
    if convs is None or getattr(model, "in_chans", source_chans) == source_chans:
        return {}
    shapes = {}
    for name in (convs,) if isinstance(convs, str) else convs:
        weight = model.get_submodule(name).weight
        if weight.ndim == 4:  # (out, in, kh, kw): timm adapts the input channels
            shapes[f"{name}.weight"] = (weight.shape[0], source_chans, *weight.shape[2:])
    return shapes


def check_state_dict(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Return ``state_dict`` unchanged if its keys and shapes are what timm's loader turns into
    exactly the model's.

    Otherwise raise a one-line error naming the first mismatching key (in the model's order) and
    both shapes, so a checkpoint for another architecture is recognised at once. timm's adaptations
    after the filter are accounted for: classifier keys are not checked when the model was built with
    a new class count (fine-tuning: timm drops them), and the input convolution is expected with the
    pretrained cfg's channels when the model has other ``in_chans`` (timm's ``adapt_input_conv``).
    """
    arch = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    classifiers = _replaced_classifiers(model)
    expected = {k: v for k, v in model.state_dict().items() if not (classifiers and k.startswith(classifiers))}
    expected_shapes = {k: _shape(v) for k, v in expected.items()} | _adapted_input_convs(model)
    state_dict_body = {k: v for k, v in state_dict.items() if not (classifiers and k.startswith(classifiers))}
    for key, param in expected.items():
        if key not in state_dict_body:
            raise CheckpointMismatchError(
                f"checkpoint lacks key {key!r} (model {arch} expects shape {_shape(param)}); "
                "is the checkpoint for another architecture?"
            )
        if _shape(state_dict[key]) != expected_shapes[key]:
            raise CheckpointMismatchError(
                f"checkpoint key {key!r} has shape {_shape(state_dict[key])} but model {arch} expects "
                f"{expected_shapes[key]}; is the checkpoint for another architecture?"
            )
    unexpected = [key for key in state_dict_body if key not in expected]
    if unexpected:
        raise CheckpointMismatchError(
            f"checkpoint key {unexpected[0]!r} (shape {_shape(state_dict[unexpected[0]])}) does not exist in "
            f"model {arch} ({len(unexpected)} unexpected key(s)); is the checkpoint for another architecture?"
        )
    return state_dict
