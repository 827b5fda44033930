"""Checkpoint I/O: the official FluxViT and InternVideo2 ``.pth`` files and the project's own safetensors files.

Nothing here unpickles arbitrary objects: ``.pth`` files are read with ``torch.load(weights_only=True)``
and the project's own checkpoints are safetensors with the model config stored as JSON metadata.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Union

import torch

from .fluxvit import FluxViT, FluxViTConfig
from .internvideo2 import InternVideo2, resize_internvideo2_pos_embed
from .pos_embed import resize_pos_grid

__all__ = ["CheckpointMismatchError", "LoadReport", "checkpoint_filter_fn", "load_model", "load_official_checkpoint",
           "read_model_config", "read_state_dict", "save_model", "set_default_mode"]

log = logging.getLogger(__name__)
# Wrapper prefixes: DDP/DeepSpeed ("module."), the release ("backbone.", "encoder."), and this project's stage-2
# video-text export, whose video tower sits under "video.".
_PREFIXES = ("module.", "backbone.", "encoder.", "video.")
CONFIG_KEY = "fluxvit_config"


class CheckpointMismatchError(ValueError):
    """Weights that do not fit the model (another architecture); the message is one line with counts and names."""


# Parameter-name prefix of the classifiers: heads of another class count (or none) may differ from the model's.
CLASSIFIER_PREFIX = "head."


@dataclass
class LoadReport:
    """What ``load_official_checkpoint`` did: keys loaded, resized, skipped (shape), missing, unexpected, and
    (InternVideo2) dropped: the distillation-only and non-vision keys the official loader drops too."""

    loaded: list = field(default_factory=list)
    resized: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    dropped: list = field(default_factory=list)


def read_state_dict(path: Union[str, os.PathLike]) -> dict:
    """Tensors of a ``.safetensors`` or ``.pth``/``.pt``/``.bin`` file (weights only, never pickled objects)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle with non-tensor objects, or a corrupt file
        raise ValueError(f"cannot read {path} as a weights-only checkpoint: {err}") from err


def _unwrap(obj) -> dict:
    for key in ("model", "module", "state_dict"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            return _unwrap(obj[key])
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint holds a {type(obj).__name__}, expected a state dict")
    if any(isinstance(k, str) and k.startswith("video.") for k in obj):
        # A stage-2 video-text export: its video tower is the FluxViT; the text side does not belong here.
        obj = {k: v for k, v in obj.items() if k.startswith("video.")}
    out = {}
    for name, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if name.startswith(prefix):
                    name, changed = name[len(prefix):], True
        out[name] = value
    return out


def _names(items: list, n: int = 4) -> str:
    return ", ".join(str(x) for x in items[:n]) + (", ..." if len(items) > n else "")


def load_official_checkpoint(model: Union[FluxViT, InternVideo2], path_or_state_dict, strict: bool = True,
                             classifier_may_differ: bool = False, **kwargs) -> LoadReport:
    """Load released FluxViT weights (or a project export; or, for an ``InternVideo2`` model, InternVideo2
    weights, see ``load_internvideo2_checkpoint``) into ``model``.

    Accepts a path (``.pth``, ``.bin``, ``.safetensors``) or a state dict; weights may sit under ``model``,
    ``module`` or ``state_dict`` and carry ``module.`` / ``backbone.`` / ``encoder.`` prefixes (or ``video.``, the
    video tower of a stage-2 export, whose other tensors are ignored). A pos-embed stored for another grid is
    resized to the model's grid (linear in time, bicubic in space).

    Args:
        strict: any missing, unexpected or wrongly shaped tensor raises ``CheckpointMismatchError`` (one line:
            counts and the first names) before anything is loaded; without it, what fits is loaded and the
            rest reported (a warning when something did not fit).
        classifier_may_differ: classifier tensors (``head.*``) of another class count, or absent on either
            side, are skipped and reported instead of counting as a mismatch; the model keeps its own head
            (finetuning a pretrained backbone on new classes).
    """
    if isinstance(model, InternVideo2):
        return load_internvideo2_checkpoint(model, path_or_state_dict, strict=strict, **kwargs)
    if kwargs:
        raise TypeError(f"unexpected arguments for a FluxViT checkpoint: {', '.join(sorted(kwargs))}")
    src = path_or_state_dict
    name_of = str(src) if isinstance(src, (str, os.PathLike)) else "state dict"
    if isinstance(src, (str, os.PathLike)):
        src = read_state_dict(src)
    state = _unwrap(src)
    own = model.state_dict()
    report = LoadReport()
    to_load = {}
    head_skips = []
    for name, value in state.items():
        if name not in own:
            (head_skips if classifier_may_differ and name.startswith(CLASSIFIER_PREFIX)
             else report.unexpected).append(name)
            continue
        target = own[name]
        if name == "pos_embed" and value.shape != target.shape and value.shape[-1] == target.shape[-1]:
            value = _resize_official_pos_embed(value, model)
            report.resized.append(name)
        if value.shape != target.shape:
            report.skipped.append(f"{name}: checkpoint {tuple(value.shape)} vs model {tuple(target.shape)}")
            continue
        to_load[name] = value.to(target.dtype)
        report.loaded.append(name)
    report.missing = sorted(set(own) - set(to_load) - {s.split(":")[0] for s in report.skipped})
    if classifier_may_differ:
        head_skips += [s for s in report.skipped if s.startswith(CLASSIFIER_PREFIX)]
        report.skipped = [s for s in report.skipped if not s.startswith(CLASSIFIER_PREFIX)]
        head_skips += [k for k in report.missing if k.startswith(CLASSIFIER_PREFIX)]
        report.missing = [k for k in report.missing if not k.startswith(CLASSIFIER_PREFIX)]
    bad = bool(report.missing or report.unexpected or report.skipped)
    if strict and bad:
        parts = [f"{len(report.loaded)} of {len(own)} model tensors match"]
        if report.missing:
            parts.append(f"missing {len(report.missing)} ({_names(report.missing)})")
        if report.unexpected:
            parts.append(f"unexpected {len(report.unexpected)} ({_names(report.unexpected)})")
        if report.skipped:
            parts.append(f"shape mismatches {len(report.skipped)} ({_names(report.skipped, 2)})")
        raise CheckpointMismatchError(f"{name_of} does not fit the model: {'; '.join(parts)} "
                                      f"(another architecture? a non-strict load takes what fits)")
    report.skipped += head_skips
    model.load_state_dict(to_load, strict=False)
    msg = (f"loaded {len(report.loaded)} of {len(own)} tensors from {name_of} ({len(report.resized)} resized, "
           f"{len(report.skipped)} skipped, {len(report.missing)} missing, {len(report.unexpected)} unexpected)")
    if bad:
        log.warning("%s; not loaded: %s", msg, _names(report.missing + report.unexpected + report.skipped, 6))
    else:
        log.info("%s%s", msg, f"; classifier kept: {_names(head_skips)}" if head_skips else "")
    return report


def _resize_official_pos_embed(value: torch.Tensor, model: FluxViT) -> torch.Tensor:
    """(1, 1 + T0*S*S, D) -> the model's (1, 1 + T*H*W, D); T0 is guessed as the one leaving a square grid."""
    D = value.shape[-1]
    n = value.shape[1] - 1
    candidates = [t for t in range(1, n + 1) if n % t == 0 and round((n // t) ** 0.5) ** 2 == n // t]
    if not candidates:
        raise ValueError(f"cannot infer the grid of a pos_embed with {n} positions")
    t0 = min(candidates, key=lambda t: abs(t - model.pos_grid[0]))
    s = round((n // t0) ** 0.5)
    grid = resize_pos_grid(value[0, 1:].reshape(t0, s, s, D).float(), *model.pos_grid)
    return torch.cat([value[0, :1].float(), grid.reshape(-1, D)], dim=0)[None].to(value.dtype)


# Keys of the official stage-2 file that the official teacher loader drops: the distillation student's decoders
# and position embeddings of the decoder / image paths.
_IV2_DROPPED = ("clip_decoder", "final_clip_decoder", "clip_pos_embed", "clip_img_pos_embed", "img_pos_embed")


def _internvideo2_grid(n: int, model: InternVideo2, orig_t_size: Union[int, None]) -> tuple:
    """(T0, H0, W0) of a stored pos-embed with ``n`` token rows."""
    T, H, W = model.pos_grid
    if orig_t_size:
        s = round((n // orig_t_size) ** 0.5)
        if orig_t_size * s * s != n:
            raise ValueError(f"a pos_embed of {n} positions is not {orig_t_size} frames of a square grid")
        return orig_t_size, s, s
    if n % (H * W) == 0:  # the model's spatial grid, another frame count (the stage-2 file: 4 frames)
        return n // (H * W), H, W
    candidates = [t for t in range(1, n + 1) if n % t == 0 and round((n // t) ** 0.5) ** 2 == n // t]
    if not candidates:
        raise ValueError(f"cannot infer the grid of a pos_embed with {n} positions; pass orig_t_size=")
    t0 = min(candidates, key=lambda t: abs(t - T))
    s = round((n // t0) ** 0.5)
    return t0, s, s


def _internvideo2_tensors(src, dropped: list) -> dict:
    """The vision encoder's tensors of an official InternVideo2 file: unwrapped (``module`` / ``model`` /
    ``state_dict``, ``module.`` prefixes), ``vision_encoder.*`` only when present, distillation-only keys dropped
    (their names appended to ``dropped``)."""
    while isinstance(src, Mapping) and any(isinstance(src.get(k), Mapping) for k in ("module", "model", "state_dict")):
        src = next(src[k] for k in ("module", "model", "state_dict") if isinstance(src.get(k), Mapping))
    if not isinstance(src, Mapping):
        raise ValueError(f"checkpoint holds a {type(src).__name__}, expected a state dict")
    state = {}
    for name, value in src.items():
        if not isinstance(value, torch.Tensor):
            continue
        while name.startswith("module."):
            name = name[len("module."):]
        state[name] = value
    if any(k.startswith("vision_encoder.") for k in state):
        dropped += sorted(k for k in state if not k.startswith("vision_encoder."))
        state = {k[len("vision_encoder."):]: v for k, v in state.items() if k.startswith("vision_encoder.")}
    for name in sorted(state):
        if name.split(".")[0] in _IV2_DROPPED:
            dropped.append(name)
            del state[name]
    return state


def checkpoint_filter_fn(state_dict: Mapping, model: Union[FluxViT, InternVideo2]) -> dict:
    """timm's ``pretrained_filter_fn``: an official or project state dict in ``model``'s names and grid.

    FluxViT: weights under ``model`` / ``module`` / ``state_dict`` or bare, wrapper prefixes stripped (as
    ``load_official_checkpoint``); InternVideo2: the official file's vision encoder (as
    ``load_internvideo2_checkpoint``). A pos-embed stored for another grid is resized to the model's. timm's
    ``load_pretrained`` then drops the classifiers when the class counts differ and loads the rest.
    """
    own = model.state_dict()
    if isinstance(model, InternVideo2):
        state = _internvideo2_tensors(state_dict, [])
        value = state.get("pos_embed")
        if value is not None and value.dim() == 3 and value.shape != own["pos_embed"].shape:
            grid = _internvideo2_grid(value.shape[1] - 1, model, None)
            state["pos_embed"] = resize_internvideo2_pos_embed(value.float(), grid, model.pos_grid).to(value.dtype)
        return state
    state = _unwrap(state_dict)
    value = state.get("pos_embed")
    if value is not None and value.shape != own["pos_embed"].shape and value.shape[-1] == own["pos_embed"].shape[-1]:
        state["pos_embed"] = _resize_official_pos_embed(value, model)
    return state


def load_internvideo2_checkpoint(model: InternVideo2, path_or_state_dict, strict: bool = True,
                                 orig_t_size: Union[int, None] = None) -> LoadReport:
    """Load official InternVideo2 weights (e.g. the stage-2 1B file) into ``model``, as the official
    ``teacher_internvideo2_stage2_1B`` loader does, but strict by default.

    Reads weights under ``module`` (or ``model`` / ``state_dict``) or bare; when ``vision_encoder.*`` keys are
    present only those are kept (prefix stripped) and every other key is dropped; distillation-only keys
    (``clip_decoder``, ``final_clip_decoder``, ``clip_pos_embed``, ``clip_img_pos_embed``, ``img_pos_embed``) are
    dropped; a pos-embed stored for another grid (the stage-2 file's 4 frames) is resized to the model's grid
    with the official ``interpolate_pos_embed`` steps (linear in time, bicubic in space). ``orig_t_size`` gives
    its frame count when the grid cannot be inferred.

    A model built on the meta device (``with torch.device("meta"): create_model(...)``) receives the checkpoint's
    tensors directly (``assign``), converted to the model's dtype, so nothing is initialised twice.
    With ``strict`` any missing, unexpected or wrongly shaped key raises ``ValueError`` naming the keys.
    """
    src = path_or_state_dict
    if isinstance(src, (str, os.PathLike)):
        src = read_state_dict(src)
    report = LoadReport()
    state = _internvideo2_tensors(src, report.dropped)
    own = model.state_dict()
    to_load = {}
    for name, value in state.items():
        if name not in own:
            report.unexpected.append(name)
            continue
        target = own[name]
        if name == "pos_embed" and value.shape != target.shape and value.dim() == 3 and \
                value.shape[-1] == target.shape[-1]:
            grid = _internvideo2_grid(value.shape[1] - 1, model, orig_t_size)
            value = resize_internvideo2_pos_embed(value.float(), grid, model.pos_grid)
            report.resized.append(name)
        if value.shape != target.shape:
            report.skipped.append(f"{name}: checkpoint {tuple(value.shape)} vs model {tuple(target.shape)}")
            continue
        to_load[name] = value.to(target.dtype)
        report.loaded.append(name)
    report.missing = sorted(set(own) - set(to_load))
    if strict and (report.missing or report.unexpected or report.skipped):
        raise ValueError(
            "InternVideo2 checkpoint does not match the model: "
            f"missing {report.missing[:8]}{'...' if len(report.missing) > 8 else ''}, "
            f"unexpected {report.unexpected[:8]}{'...' if len(report.unexpected) > 8 else ''}, "
            f"shape mismatches {report.skipped[:8]} (pass strict=False to load what fits)"
        )
    on_meta = any(p.is_meta for p in model.parameters())
    model.load_state_dict(to_load, strict=False, assign=on_meta)
    log.info("InternVideo2: loaded %d tensors (%d resized, %d dropped, %d skipped, %d missing, %d unexpected)",
             len(report.loaded), len(report.resized), len(report.dropped), len(report.skipped),
             len(report.missing), len(report.unexpected))
    return report


def set_default_mode(path: Union[str, os.PathLike]) -> None:
    """Give ``path`` the mode a plain ``open(path, "w")`` would (0666 minus the umask): safetensors creates its
    files 0600, which would make exports the only files of a run that the group cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def save_model(model: FluxViT, path: Union[str, os.PathLike], metadata: Union[dict, None] = None) -> Path:
    """Write ``model``'s weights as safetensors with its config embedded; atomic (temp file + rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {CONFIG_KEY: json.dumps(model.config.to_dict())}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    set_default_mode(tmp)
    os.replace(tmp, path)
    return path


def read_metadata(path: Union[str, os.PathLike]) -> dict:
    """The string metadata stored in a safetensors file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def read_model_config(path: Union[str, os.PathLike]) -> dict | None:
    """The FluxViT architecture stored in an export (``save_model``'s, or a stage-2 export's video tower) as
    :class:`FluxViTConfig` keywords; ``None`` for a file without one (an official ``.pth``, a missing file)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    meta = read_metadata(path)
    return json.loads(meta[CONFIG_KEY]) if CONFIG_KEY in meta else None


def load_model(path: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu", **overrides) -> FluxViT:
    """Rebuild a FluxViT saved by ``save_model`` from its file alone (config overrides optional,
    e.g. ``drop_path_rate`` or ``attn_backend``)."""
    meta = read_metadata(path)
    if "fluxvit_videotext" in meta:
        raise ValueError(f"{path} is a stage-2 video-text export (video tower + projections), not a FluxViT; rebuild "
                         f"it with fluxvit.stages.videotext.task.load_videotext or use it as model.init")
    if CONFIG_KEY not in meta:
        raise ValueError(f"{path} has no embedded FluxViT config; was it written by fluxvit.models.save_model?")
    cfg = json.loads(meta[CONFIG_KEY])
    cfg.update(overrides)
    model = FluxViT(FluxViTConfig(**cfg))
    load_official_checkpoint(model, read_state_dict(path), strict=True)
    return model.to(map_location)
