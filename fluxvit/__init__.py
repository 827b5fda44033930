"""FluxViT training pipeline: model zoo, video data pipeline and the three training stages.

``import fluxvit`` needs only the core dependencies (torch, timm, ...); flash-attn, deepspeed, decord and
torchcodec are imported lazily where used.
"""
from . import models
from .models import (create_model, from_pretrained, list_models, load_model, load_official_checkpoint,
                     save_pretrained)

__version__ = "0.1.0"
__all__ = ["create_model", "from_pretrained", "list_models", "load_model", "load_official_checkpoint", "models",
           "save_pretrained", "__version__"]
