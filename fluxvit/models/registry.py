"""The project's model registry: named FluxViT (and InternVideo2 teacher) configurations, ``create_model`` and
``list_models``.

The same names are registered with timm when ``fluxvit.models`` is imported, so
``timm.create_model("fluxvit_small_patch14")`` works after ``import fluxvit``.
"""
from __future__ import annotations

import dataclasses
from typing import Union

from torch import nn

from . import hub as _hub  # a module: hub uses this registry too
from .fluxvit import FluxViT, FluxViTConfig
from .internvideo2 import InternVideo2, InternVideo2Config

__all__ = ["UnknownOptionError", "create_model", "list_models", "model_config", "register_with_timm"]

_CONFIGS: dict[str, dict] = {
    # Small enough for CPU tests and the demo (about 3 M parameters in the backbone).
    "fluxvit_tiny_patch14": dict(embed_dim=192, depth=6, num_heads=3, img_size=112, num_frames=8,
                                 clip_embed_dim=384, attn_pool_num_heads=8),
    # Released S/14 and B/14 (pos-embed grids 24x18x18 and 32x20x20, as the official checkpoints).
    "fluxvit_small_patch14": dict(embed_dim=384, depth=12, num_heads=6, img_size=252, num_frames=24),
    "fluxvit_base_patch14": dict(embed_dim=768, depth=12, num_heads=12, img_size=280, num_frames=32),
    # L/14 appears in the paper only; no weights exist.
    "fluxvit_large_patch14": dict(embed_dim=1024, depth=24, num_heads=16, img_size=280, num_frames=32),
}
# The paper's distillation teacher (official ``teacher_internvideo2_stage2_1B``: 224 px, patch 14, 8 frames,
# 1408 / 40 / 16, MLP 6144, projector to 768); its overrides use the official field names.
_INTERNVIDEO2_CONFIGS: dict[str, dict] = {
    "internvideo2_1b_patch14": dict(),
}
_FIELDS = {f.name for f in dataclasses.fields(FluxViTConfig)}
_INTERNVIDEO2_FIELDS = {f.name for f in dataclasses.fields(InternVideo2Config)}
# Keywords timm's create_model may pass through; they carry no architecture.
_TIMM_KEYS = {"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "features_only",
              "pretrained_model_args"}


class UnknownOptionError(TypeError, ValueError):
    """An override that is not a FluxViT config field (a TypeError, like any bad keyword, and a ValueError)."""


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted([*_CONFIGS, *_INTERNVIDEO2_CONFIGS])


def model_config(name: str, **overrides) -> Union[FluxViTConfig, InternVideo2Config]:
    """The config of a registered model with ``overrides`` applied (unknown keys are an error)."""
    if name in _INTERNVIDEO2_CONFIGS:
        unknown = sorted(set(overrides) - _INTERNVIDEO2_FIELDS)
        if unknown:
            raise UnknownOptionError(f"unknown option(s) for {name}: {', '.join(unknown)}; "
                                     f"valid: {', '.join(sorted(_INTERNVIDEO2_FIELDS))}")
        return InternVideo2Config(**{**_INTERNVIDEO2_CONFIGS[name], **overrides})
    if name not in _CONFIGS:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    unknown = sorted(set(overrides) - _FIELDS)
    if unknown:
        raise UnknownOptionError(
            f"unknown option(s) for {name}: {', '.join(unknown)}; valid: {', '.join(sorted(_FIELDS))}"
        )
    return FluxViTConfig(**{**_CONFIGS[name], **overrides})


def create_model(name: str, **overrides) -> Union[FluxViT, InternVideo2]:
    """Build a registered model, e.g. ``create_model("fluxvit_small_patch14", num_classes=174)``.

    Overrides are config fields: ``FluxViTConfig`` (embed_dim, depth, num_heads, mlp_ratio, patch_size, img_size,
    num_frames, num_classes, clip_embed_dim, attn_pool_num_heads, drop_path_rate, ...) or, for
    ``internvideo2_1b_patch14``, ``InternVideo2Config`` (the official names: embed_dim, depth, num_heads,
    mlp_ratio, img_size, num_frames, attn_pool_num_heads, clip_embed_dim, mlp_act, ...). Build the 1B model
    under ``with torch.device("meta"):`` to load a checkpoint without initialising 4 GB first.
    """
    cfg = model_config(name, **overrides)
    return InternVideo2(cfg) if isinstance(cfg, InternVideo2Config) else FluxViT(cfg)


def register_with_timm() -> None:
    """Register every name with timm's registry (idempotent; timm is a core dependency)."""
    from timm.models import register_model
    from timm.models._registry import _model_entrypoints

    for name in list_models():
        if name in _model_entrypoints:
            continue

        def entry(pretrained: bool = False, _name: str = name, **kwargs) -> nn.Module:
            pretrained_cfg = kwargs.get("pretrained_cfg")
            for key in _TIMM_KEYS & set(kwargs):
                kwargs.pop(key)
            model = create_model(_name, **kwargs)
            if pretrained:
                # timm's hub path ("hf-hub:ORG/NAME", "local-dir:PATH") names the weights in pretrained_cfg
                if not isinstance(model, FluxViT) or not _hub.weights_from_pretrained_cfg(model, pretrained_cfg):
                    raise ValueError(f"{_name}: no weights are downloaded by name; use timm.create_model("
                                     f"'hf-hub:ORG/NAME', pretrained=True) for a save_pretrained upload, or "
                                     f"fluxvit.models.load_official_checkpoint(model, path) for a release file")
            return model

        entry.__name__ = name
        entry.__module__ = __name__
        register_model(entry)
