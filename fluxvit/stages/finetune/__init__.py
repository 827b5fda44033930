"""Stage 3: classification finetuning with Flux-Multi, multi-view evaluation and Token Optimization
(FluxViT paper, arXiv 2503.14237). ``model`` (the packed multi-budget wrapper), ``loss`` (Flux-Multi, label mixing),
``task`` (the training task), ``data`` (labelled sources, evaluation views), ``eval``, ``tokenopt``."""
from .config import AugConfig, EvalConfig, FinetuneConfig, FluxLossConfig, ModelConfig, presets
from .loss import flux_multi_loss
from .model import FinetuneModel, random_keep
from .task import FinetuneTask
from .train import build_config, main, resolve_schedule

__all__ = [
    "AugConfig", "EvalConfig", "FinetuneConfig", "FinetuneModel", "FinetuneTask", "FluxLossConfig", "ModelConfig",
    "build_config", "flux_multi_loss", "main", "presets", "random_keep", "resolve_schedule",
]
