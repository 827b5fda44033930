"""The project's model registry: named FluxViT (and InternVideo2 teacher) configurations, ``create_model`` and
``list_models``, and their registration with timm.

Every name is registered with timm through its public API (``register_model`` with ``generate_default_cfgs``) when
this module is imported, so after ``import fluxvit`` ``timm.create_model("fluxvit_small_patch14")`` works and
``timm.list_models("fluxvit*")`` lists the zoo. Both ``create_model``s give the same model, carrying timm's
``pretrained_cfg`` with video meaning: ``input_size`` is (C, T, H, W), frames included.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, load_pretrained, register_model, resolve_pretrained_cfg
from torch import nn

from .checkpoint import checkpoint_filter_fn
from .fluxvit import FluxViT, FluxViTConfig
from .internvideo2 import InternVideo2, InternVideo2Config

__all__ = ["UnknownOptionError", "create_model", "default_cfgs", "list_models", "model_config"]

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
    model = InternVideo2(cfg) if isinstance(cfg, InternVideo2Config) else FluxViT(cfg)
    _attach_pretrained_cfg(model, name)
    return model


# ---------------------------------------------------------------------------------------------------- timm
# timm's pretrained_cfg with video meaning. input_size is (C, T, H, W): the frames and size the weights were
# evaluated at (the release's K400 test: 8 frames, short side resized to 224, 224 crops, so crop_pct 1.0; its
# 3 spatial x 4 temporal views are the evaluation's, not the transform's). The classifier is one Linear per budget
# head. FluxViT's official files are on Google Drive (file ids below; no direct URL timm could download): load one
# with ``fluxvit.models.load_official_checkpoint(model, path)`` or ``timm.create_model(name, pretrained=True,
# pretrained_cfg_overlay=dict(file=path))``. ``hf_hub_id`` is left empty until the project publishes weights.
_PAPER = dict(paper_name="Make Your Training Flexible: Towards Deployment-Efficient Video Models",
              paper_ids="arXiv:2503.14237", origin_url="https://github.com/OpenGVLab/FluxViT")
_RELEASE_DRIVE = "https://drive.google.com/file/d/{}/view"


def _cfg(**kwargs) -> dict:
    return {**dict(input_size=(3, 8, 224, 224), crop_pct=1.0, crop_mode="center", interpolation="bicubic",
                   mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, num_classes=400, first_conv="patch_embed.proj",
                   classifier=("head.0", "head.1", "head.2")), **kwargs}


def _release_cfg(size: str, top1: float, drive_id: str) -> dict:
    return _cfg(**_PAPER, description=f"FluxViT-{size}/14, K-Mash pretraining, K710 then K400 finetuning "
                                      f"(official release; K400 top-1 {top1} at 8 x 224, 2048 tokens, head 1, 4 x 3 views)",
                notes=(f"official file: {_RELEASE_DRIVE.format(drive_id)} (Google Drive, release MODEL_ZOO.md)",))


default_cfgs = generate_default_cfgs({
    "fluxvit_tiny_patch14": _cfg(input_size=(3, 8, 112, 112), description="CPU-scale FluxViT of this project; no weights"),
    "fluxvit_small_patch14.k710_ft_k400": _release_cfg("S", 87.3, "1OTjTsAnZGaq7AufDaw8IYLeSgmLYZjds"),
    "fluxvit_base_patch14.k710_ft_k400": _release_cfg("B", 89.3, "1YsxsB3_pkpdvmXQIhD3YOmWlqCyzJskg"),
    "fluxvit_large_patch14": _cfg(**_PAPER, description="FluxViT-L/14 of the paper; no weights were released"),
    # The paper's distillation teacher: the official stage-2 file holds the vision encoder under vision_encoder.*
    # (its text side and distillation decoders are dropped on load) and a 4-frame pos-embed (resized to 8).
    "internvideo2_1b_patch14.stage2_f4": _cfg(
        hf_hub_id="OpenGVLab/InternVideo2-Stage2_1B-224p-f4", hf_hub_filename="InternVideo2-stage2_1b-224p-f4.pt",
        num_classes=0, classifier="head", origin_url="https://github.com/OpenGVLab/InternVideo",
        paper_name="InternVideo2: Scaling Foundation Models for Multimodal Video Understanding",
        paper_ids="arXiv:2403.15377",
        description="InternVideo2-1B stage-2 vision encoder (FluxViT's distillation teacher), projector to 768"),
})


def _attach_pretrained_cfg(model: nn.Module, name: str, pretrained_cfg=None, overlay: Union[dict, None] = None) -> dict:
    """Set timm's ``pretrained_cfg`` / ``default_cfg`` (a dict) on ``model``; returns it."""
    cfg = resolve_pretrained_cfg(name, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=overlay).to_dict()
    model.pretrained_cfg = model.default_cfg = cfg
    return cfg


def _create_timm(name: str, pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None,
                 cache_dir=None, pretrained_model_args=None, features_only: bool = False, device=None, dtype=None,
                 **overrides) -> nn.Module:
    """timm's entry point: the project's ``create_model`` (unknown options are an error) plus timm's pretrained
    cfg and weight loading (``load_pretrained`` with ``checkpoint_filter_fn``, so official files load too)."""
    if features_only:
        raise ValueError(f"{name}: features_only is not supported; use model.forward_features(video, layers=...) "
                         f"for per-block token features")
    cfg = resolve_pretrained_cfg(name, pretrained_cfg=pretrained_cfg,
                                 pretrained_cfg_overlay=pretrained_cfg_overlay).to_dict()
    # Fail before building (the 1B teacher takes seconds): FluxViT's release files are not downloadable by name.
    if pretrained and not any(cfg.get(k) for k in ("file", "url", "hf_hub_id", "state_dict")):
        raise ValueError(f"{name}: no weights are downloaded by name "
                         f"({'; '.join(cfg.get('notes') or ('none published',))}); pass "
                         f"pretrained_cfg_overlay=dict(file=PATH) for a release file, or use "
                         f"timm.create_model('hf-hub:ORG/NAME', pretrained=True) for a save_pretrained upload")
    # As timm's build_model_with_cfg: the source's class count and channels are the defaults (a hub or local
    # config.json states the class count of the weights it carries).
    if cfg.get("num_classes") is not None and cfg["num_classes"] >= 0:
        overrides.setdefault("num_classes", cfg["num_classes"])
    overrides.setdefault("in_chans", cfg.get("input_size", (3,))[0])
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = create_model(name, **overrides)
    model.pretrained_cfg = model.default_cfg = cfg
    model.pretrained_model_args = dict(pretrained_model_args or {})
    if pretrained:
        load_pretrained(model, pretrained_cfg=cfg, num_classes=model.num_classes, in_chans=model.in_chans,
                        filter_fn=checkpoint_filter_fn, cache_dir=cache_dir)
    if dtype is not None:
        model.to(dtype=dtype)
    return model


@register_model
def fluxvit_tiny_patch14(pretrained: bool = False, **kwargs) -> FluxViT:
    """FluxViT-Ti/14 (192 / 6 / 3), the project's CPU-scale model."""
    return _create_timm("fluxvit_tiny_patch14", pretrained, **kwargs)


@register_model
def fluxvit_small_patch14(pretrained: bool = False, **kwargs) -> FluxViT:
    """FluxViT-S/14 (384 / 12 / 6) as released."""
    return _create_timm("fluxvit_small_patch14", pretrained, **kwargs)


@register_model
def fluxvit_base_patch14(pretrained: bool = False, **kwargs) -> FluxViT:
    """FluxViT-B/14 (768 / 12 / 12) as released."""
    return _create_timm("fluxvit_base_patch14", pretrained, **kwargs)


@register_model
def fluxvit_large_patch14(pretrained: bool = False, **kwargs) -> FluxViT:
    """FluxViT-L/14 (1024 / 24 / 16), the paper's; no weights exist."""
    return _create_timm("fluxvit_large_patch14", pretrained, **kwargs)


@register_model
def internvideo2_1b_patch14(pretrained: bool = False, **kwargs) -> InternVideo2:
    """InternVideo2-1B vision encoder (1408 / 40 / 16), the paper's distillation teacher."""
    return _create_timm("internvideo2_1b_patch14", pretrained, **kwargs)


