"""Stage 3: classification finetuning with Flux-Multi, multi-view evaluation and Token Optimization
(FLUXVIT.md sections 6-8)."""
from .config import AugConfig, EvalConfig, FinetuneConfig, FluxLossConfig, ModelConfig, presets
from .task import FinetuneModel, FinetuneTask, flux_multi_loss, layer_decay_groups, random_keep
from .train import build_config, main

__all__ = [
    "AugConfig", "EvalConfig", "FinetuneConfig", "FinetuneModel", "FinetuneTask", "FluxLossConfig", "ModelConfig",
    "build_config", "flux_multi_loss", "layer_decay_groups", "main", "presets", "random_keep",
]
