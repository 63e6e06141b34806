"""Backbones registered with timm on import: iRPE-DeiT, iRPE on any timm ViT (``irpe_vit``), iRPE-Swin and SP-ViT."""

from . import irpe_deit, irpe_swin, irpe_vit, spvit  # noqa: F401  (registers the models with timm)
from .irpe import RPEAttention, RPEConfig, bucket_ids, num_buckets
from .irpe_deit import IRPEVisionTransformer

__all__ = ["RPEAttention", "RPEConfig", "bucket_ids", "num_buckets", "IRPEVisionTransformer"]
