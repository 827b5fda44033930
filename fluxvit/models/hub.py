"""The Hugging Face hub layout of a FluxViT: ``config.json`` + ``model.safetensors`` in one folder (or hub repo).

The layout is timm's (``timm.models._hub``): ``config.json`` holds ``architecture`` (a registered name),
``num_classes``, ``num_features``, ``model_args`` (every architecture field, so any project export rebuilds, not
only the registered sizes) and ``pretrained_cfg`` (timm's ``PretrainedCfg`` fields only, so timm's loader accepts it:
``input_size`` (C, T, H, W) with the frames, mean/std, crop); ``model.safetensors`` holds the plain state dict. So all of these load the same weights::

    fluxvit.from_pretrained("runs/finetune/hub")              # a local folder
    fluxvit.from_pretrained("ORG/NAME")                       # a hub repo (or its copy in the local HF cache)
    timm.create_model("hf-hub:ORG/NAME", pretrained=True)     # timm's own hub loader (after ``import fluxvit``)

Upload with ``huggingface_hub`` (README, "Sharing an encoder on the hub")::

    hf upload ORG/NAME runs/finetune/hub .
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Union

from huggingface_hub import hf_hub_download
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from timm.models import PretrainedCfg

from . import registry as _registry
from .checkpoint import load_official_checkpoint, read_state_dict, set_default_mode
from .fluxvit import FluxViT, FluxViTConfig

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "from_pretrained", "hub_config", "load_pretrained_weights",
           "normalize_of", "save_pretrained"]

log = logging.getLogger(__name__)
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Run-time choices that are no part of the architecture (timm passes its own keys besides these).
_RUNTIME_FIELDS = ("attn_backend", "drop_path_rate")
# pretrained_cfg keys that say where a copy came from: never written into a new config.json.
_NORMALIZE = {"imagenet": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD), "clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)}
_SOURCE_KEYS = ("hf_hub_id", "hf_hub_filename", "file", "source", "url", "state_dict", "architecture", "tag")


def architecture_name(config: FluxViTConfig) -> str:
    """The registered name whose width, depth and heads match ``config`` (its other fields travel in
    ``model_args``); the nearest width when none matches exactly."""
    key = (config.embed_dim, config.depth, config.num_heads)
    for name, cfg in _registry._CONFIGS.items():
        if (cfg["embed_dim"], cfg["depth"], cfg["num_heads"]) == key:
            return name
    return min(_registry._CONFIGS, key=lambda n: (abs(_registry._CONFIGS[n]["embed_dim"] - config.embed_dim), n))


def _pretrained_cfg_of(model: FluxViT) -> dict:
    cfg = getattr(model, "pretrained_cfg", None)
    if cfg is None:
        return {}
    if dataclasses.is_dataclass(cfg):
        cfg = dataclasses.asdict(cfg)
    return {k: v for k, v in dict(cfg).items() if k not in _SOURCE_KEYS and v is not None}


def normalize_of(pretrained_cfg: Union[dict, None]) -> str:
    """"clip" when a ``pretrained_cfg``'s mean is CLIP's, else "imagenet" (an older config's ``normalize`` key wins)."""
    cfg = dict(pretrained_cfg or {})
    if cfg.get("normalize") in _NORMALIZE:
        return cfg["normalize"]
    mean = cfg.get("mean")
    clip = _NORMALIZE["clip"][0]
    if mean is not None and len(mean) == len(clip) and all(abs(a - b) < 1e-6 for a, b in zip(mean, clip)):
        return "clip"
    return "imagenet"


def hub_config(model: FluxViT, normalize: Union[str, None] = None, extra: Union[dict, None] = None) -> dict:
    """The ``config.json`` of ``model``: timm's keys (``architecture``, ``num_classes``, ``num_features``,
    ``model_args``, ``pretrained_cfg``).

    ``pretrained_cfg`` is the model's own (``create_model`` attaches its name's: ``input_size`` (C, T, H, W), mean /
    std, crop) without its source keys, else ``input_size`` (C, num_frames, img_size, img_size) and ImageNet mean /
    std; the class count is the model's.

    Args:
        model: a FluxViT (any config).
        normalize: the input normalisation it was trained with ("imagenet" or "clip"), replacing the mean / std
            of its ``pretrained_cfg``; None keeps them.
        extra: more ``PretrainedCfg`` keys (e.g. ``{"license": "apache-2.0"}``).
    """
    cfg = model.config
    if normalize is not None and normalize not in _NORMALIZE:
        raise ValueError(f"normalize must be one of {sorted(_NORMALIZE)} or None, got {normalize!r}")
    args = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.to_dict().items() if k not in _RUNTIME_FIELDS}
    mean, std = _NORMALIZE["imagenet"]
    pretrained = {"input_size": [cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size], "mean": list(mean),
                  "std": list(std), "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center"}
    pretrained.update(_pretrained_cfg_of(model))
    if normalize is not None:
        pretrained["mean"], pretrained["std"] = (list(v) for v in _NORMALIZE[normalize])
    pretrained.update(extra or {})
    pretrained["num_classes"] = cfg.num_classes
    unknown = sorted(set(pretrained) - {f.name for f in dataclasses.fields(PretrainedCfg)})
    if unknown:
        raise ValueError(f"pretrained_cfg keys timm does not know: {', '.join(unknown)}")
    pretrained = {k: (list(v) if isinstance(v, tuple) else v) for k, v in pretrained.items()}
    return {"architecture": architecture_name(cfg), "num_classes": cfg.num_classes,
            "num_features": cfg.clip_embed_dim, "model_args": args, "pretrained_cfg": pretrained}


def save_pretrained(model: FluxViT, directory: Union[str, os.PathLike], normalize: Union[str, None] = None,
                    extra: Union[dict, None] = None) -> Path:
    """Write ``directory/config.json`` and ``directory/model.safetensors`` (atomic per file); returns the folder.

    ``model``: a FluxViT (a stage-2 ``VideoTextModel``'s video tower is ``model.video``)."""
    from safetensors.torch import save_file

    if not isinstance(model, FluxViT):
        raise TypeError(f"save_pretrained takes a FluxViT, got {type(model).__name__} (a video-text model: pass "
                        f"its .video tower)")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = out / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    set_default_mode(tmp)
    os.replace(tmp, out / WEIGHTS_NAME)
    tmp = out / (CONFIG_NAME + ".tmp")
    tmp.write_text(json.dumps(hub_config(model, normalize, extra), indent=2) + "\n")
    os.replace(tmp, out / CONFIG_NAME)
    return out


def _resolve(dir_or_id: Union[str, os.PathLike], filename: str, cache_dir=None) -> Path:
    """A file of a local folder, or of a hub repo through ``huggingface_hub`` (its cache; offline with
    ``HF_HUB_OFFLINE=1``)."""
    local = Path(dir_or_id)
    if local.is_dir():
        path = local / filename
        if not path.is_file():
            raise FileNotFoundError(f"{local} has no {filename}: not a folder written by save_pretrained")
        return path
    name = str(dir_or_id)
    if name.startswith("hf-hub:"):
        name = name[len("hf-hub:"):]
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise FileNotFoundError(f"{dir_or_id} is neither a folder nor a hub id ORG/NAME")
    repo, _, revision = name.partition("@")
    try:
        return Path(hf_hub_download(repo, filename, revision=revision or None, cache_dir=cache_dir))
    except Exception as err:  # offline without a cached copy, unknown repo, no network
        raise FileNotFoundError(f"cannot get {filename} of hub repo {repo}: {type(err).__name__}: "
                                f"{str(err).splitlines()[0] if str(err) else ''}") from None


def load_pretrained_weights(model: FluxViT, dir_or_id: Union[str, os.PathLike], cache_dir=None) -> FluxViT:
    """Load ``model.safetensors`` of a folder or hub repo into ``model`` (strict: every tensor must fit)."""
    load_official_checkpoint(model, read_state_dict(_resolve(dir_or_id, WEIGHTS_NAME, cache_dir)), strict=True)
    return model


def from_pretrained(dir_or_id: Union[str, os.PathLike], cache_dir=None, map_location="cpu",
                    **overrides) -> FluxViT:
    """A FluxViT from a ``save_pretrained`` folder or a hub repo id (``ORG/NAME[@REVISION]``).

    ``overrides`` are run-time config fields (``attn_backend``, ``drop_path_rate``); the model is returned in
    eval mode with ``pretrained_cfg`` (the config's) attached, as timm does.
    """
    cfg = json.loads(_resolve(dir_or_id, CONFIG_NAME, cache_dir).read_text())
    if "architecture" not in cfg:
        raise ValueError(f"{dir_or_id}: config.json has no 'architecture'; not a timm/FluxViT hub config")
    model = _registry.create_model(cfg["architecture"], **{**cfg.get("model_args", {}), **overrides})
    load_pretrained_weights(model, dir_or_id, cache_dir)
    model.pretrained_cfg = dict(cfg.get("pretrained_cfg", {}))
    return model.to(map_location).eval()
