"""The model card (README.md) of an exported model: Hub metadata, usage, the metrics of exactly the
weights shipped and the split they come from, settings, citation."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import get_token
from timm.models import get_pretrained_cfg

from .record import SPLIT_NAMES, EvalMetrics
from .weights import split_revision

__all__ = ["CardInfo", "model_card", "redact", "INSTALL", "PROGRAM_FILE"]

INSTALL = "pip install rpe-finetune"
PROGRAM_FILE = "model.pt2"  # the torch.export program beside model.safetensors

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


def _paper_of(config: dict[str, Any]) -> _Paper | None:
    """The paper behind an exported config.json (by the pretrained_cfg's arXiv id or the model args)."""
    papers = str(config["pretrained_cfg"].get("paper_ids", ""))
    if "2206.07662" in papers or config["architecture"].startswith("spvit"):
        return _PAPERS["spvit"]
    if "2107.14222" in papers or "rpe_config" in config.get("model_args", {}):
        return _PAPERS["irpe"]
    return None


def redact(text: str) -> str:
    token = get_token()
    return text.replace(token, "<redacted>") if token else text


@dataclass
class CardInfo:
    """What the model card says beyond the model itself (all optional)."""

    repo_id: str | None = None
    dataset: str | None = None
    metrics: EvalMetrics | None = None  # of exactly the exported weights
    best: EvalMetrics | None = None  # the run's best validation, when other weights reached it
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
        repo_id = split_revision(pretrained[len("hf-hub:"):])[0]
        return repo_id, f"[{pretrained}](https://huggingface.co/{repo_id})"
    if pretrained == "timm":
        cfg = get_pretrained_cfg(arch)
        url = cfg.url if cfg is not None else None
        return None, f"the released weights of `{arch}`" + (f" ({url})" if url else "")
    return None, f"`{Path(pretrained).name}` (a local checkpoint file)"


_METRIC_LABELS = {"top1": "Top-1 accuracy", "top5": "Top-5 accuracy", "mean_class_acc": "Mean class accuracy"}


def model_card(config: dict[str, Any], info: CardInfo, recipe: bool, program: bool = False) -> ModelCard:
    """The README of an export, from its config.json, ``info``, and whether a recipe (``config.yaml``) and
    a ``torch.export`` program (:data:`PROGRAM_FILE`) sit beside it."""
    cfg = config["pretrained_cfg"]
    arch = config["architecture"]
    paper = _paper_of(config)
    name = info.repo_id.split("/")[-1] if info.repo_id else arch
    hub_id = f"hf-hub:{info.repo_id}" if info.repo_id else f"hf-hub:<owner>/{name}"
    dataset = re.sub(r"DataModule$", "", info.dataset) if info.dataset else None  # a datamodule's class name
    dataset_id = _HUB_DATASETS.get(re.sub(r"[^a-z0-9]", "", (dataset or "").lower()))
    base_model, started_from = _starting_point(info.pretrained, arch) if info.pretrained else (None, None)

    metrics = info.metrics
    rows = {label: round(100.0 * getattr(metrics, key), 2) for key, label in _METRIC_LABELS.items()} if metrics else {}
    eval_results = [
        EvalResult(task_type="image-classification", dataset_type=dataset_id or dataset,
                   dataset_name=dataset, dataset_split="test" if metrics.split == "test" else "validation",
                   metric_type="accuracy", metric_name=label, metric_value=value)
        for label, value in rows.items()
    ] if dataset and metrics else []
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
    repo_id = hub_id.removeprefix("hf-hub:")
    lines += ["", "## Usage", "",
              f"The architecture's code comes with the rpe-finetune package: `{INSTALL}`.", "", "```python",
              "import finetune  # registers the iRPE-DeiT and SP-ViT architectures with timm",
              "import timm", "",
              f'model = timm.create_model("{hub_id}", pretrained=True).eval()',
              "transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))",
              "```", ""]
    if program:
        lines += [f"Without that package, with PyTorch alone: `{PROGRAM_FILE}` is the model as a `torch.export` "
                  f"program (written by torch {torch.__version__}; any batch size, the input size of `config.json`).",
                  "", "```python",
                  "import torch",
                  "from huggingface_hub import hf_hub_download", "",
                  f'model = torch.export.load(hf_hub_download("{repo_id}", "{PROGRAM_FILE}")).module()',
                  "logits = model(images)  # float (N, 3, H, W), resized, cropped and normalised as config.json "
                  "pretrained_cfg says",
                  "```", ""]
    if metrics is not None:
        lines += [f"## Results ({dataset or 'dataset'}, {SPLIT_NAMES[metrics.split]}, epoch {metrics.epoch})", "",
                  "Measured on exactly the weights of this repository.", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {label} | {value:.2f}% |" for label, value in rows.items()]
        lines.append("")
    elif not info.source:
        lines += ["## Results", "", "These weights were not evaluated (a checkpoint saved in the middle of an "
                  "epoch); measure them with `python cli.py validate --ckpt_path CHECKPOINT`.", ""]
    best = info.best
    if best is not None and (metrics is None or best.step != metrics.step):
        lines += [f"The run's best epoch was {best.epoch}: top-1 {100 * best.top1:.2f}% on the "
                  f"{SPLIT_NAMES[best.split]}, with other weights than these.", ""]
    if metrics is not None and metrics.per_class:
        ranked = sorted(metrics.per_class.items(), key=lambda item: item[1])
        mean = sum(acc for _, acc in ranked) / len(ranked)
        lines += ["## Per-class accuracy", "", f"Mean over {len(ranked)} classes: {100 * mean:.2f}% "
                  f"({SPLIT_NAMES[metrics.split]}).", ""]
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
    return ModelCard(redact(content))
