"""FluxViT training pipeline: model zoo, video data pipeline and the three training stages.

``import fluxvit`` needs only the core dependencies (torch, timm, ...); flash-attn, deepspeed, decord and
torchcodec are imported lazily where used.
"""
from . import models
from .models import create_model, list_models, load_model, load_official_checkpoint

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "load_model", "load_official_checkpoint", "models", "__version__"]
