"""Stage 2: Flux-CLIP video-text contrastive pretraining and zero-shot retrieval (FluxViT paper, arXiv 2503.14237)."""
from .config import ContrastConfig, RetrievalEvalConfig, TextConfig, VideoTextConfig, presets
from .task import (VideoTextModel, VideoTextTask, all_gather_with_grad, contrastive_loss, load_videotext,
                   save_videotext)
from .text import HFTextTower, OpenClipTextTower, TextTower, build_text_tower, minilm_path
from .train import build_config, main

__all__ = [
    "ContrastConfig", "HFTextTower", "OpenClipTextTower", "RetrievalEvalConfig", "TextConfig", "TextTower",
    "VideoTextConfig", "VideoTextModel", "VideoTextTask", "all_gather_with_grad", "build_config",
    "build_text_tower", "contrastive_loss", "load_videotext", "main", "minilm_path", "presets", "save_videotext",
]
