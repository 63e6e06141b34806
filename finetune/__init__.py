"""Fine-tune vision transformers with 2D relative position encodings (iRPE-DeiT, SP-ViT).

Importing the package registers every backbone with timm, so ``timm.create_model(name)`` works.
"""

from . import backbones  # noqa: F401  (registers the models with timm)

__version__ = "0.1.0"
