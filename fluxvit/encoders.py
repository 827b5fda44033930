"""A trained encoder as a user has it, ready to embed videos (and captions): ``load_encoder(MODEL)``.

MODEL is any of

* a project export of any stage (``.safetensors`` with its architecture embedded): stage 1 (``distill``, the
  student), stage 2 (``fluxvit_videotext``, video tower + projections + text tower spec), stage 3 (``finetune``);
* a ``save_pretrained`` folder or a hub id ``ORG/NAME`` (``fluxvit.models.hub``);
* an official FluxViT checkpoint (``.pth`` / ``.bin`` / ``.safetensors`` without an embedded config) with
  ``arch=NAME`` (a registered model), or, the same thing spelled the other way, a registered name with
  ``weights=FILE``.

Which vector (``Encoder.vector`` says it, and ``fluxvit-embed`` writes it into the metadata):

* stage 2: the joint video-text embedding, ``vision_proj(pooled)`` (the space its text embeddings live in);
* stage 3 and official classifiers: the pooled feature before ``fc_norm`` and the classifier, from the trained
  pooling head nearest the kept-token count (as the evaluation picks it);
* stage 1: the student's pooled feature from the head nearest the kept-token count; that is the feature stage 1
  aligns with the teacher's pooled output (through a decoder that stays with the training run, not the export).

Every vector is L2-normalised per view.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

import torch
import torch.nn.functional as F

from .models import FluxViT, create_model, list_models, load_model, load_official_checkpoint, read_state_dict
from .models.checkpoint import read_metadata
from .models.hub import CONFIG_NAME, WEIGHTS_NAME, _resolve, from_pretrained, normalize_of
from .stages.videotext.task import load_videotext

__all__ = ["Encoder", "file_sha256", "load_encoder"]

log = logging.getLogger("fluxvit.embed")
_CHUNK = 1 << 20


def file_sha256(path: Union[str, os.PathLike]) -> str:
    """SHA-256 hex digest of a file (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Encoder:
    """A loaded encoder and how it turns clips into vectors.

    Attributes:
        net: the FluxViT (eval mode).
        stage: "stage-1", "stage-2", "stage-3", "official", "hub".
        vector: what ``embed`` returns, in words (written into the metadata).
        source: the MODEL argument; weights_file: the file the weights came from; model_sha256: its hash.
        normalize: the input normalisation the model was trained with ("imagenet" or "clip").
        trained_heads: pooling heads that were trained (None: all).
        videotext / text_tower: the stage-2 model and its text tower (None for other stages).
    """

    net: FluxViT
    stage: str
    vector: str
    source: str
    weights_file: str
    model_sha256: str
    normalize: str = "imagenet"
    trained_heads: Union[list, None] = None
    videotext: object = None
    text_tower: object = None
    extra: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        """Width of the vectors ``embed`` returns."""
        if self.videotext is not None:
            proj = self.videotext.vision_proj
            return (proj if isinstance(proj, torch.nn.Linear) else proj[-1]).out_features
        return self.net.config.clip_embed_dim

    @property
    def has_text(self) -> bool:
        return self.videotext is not None

    def to(self, device=None, dtype=None) -> "Encoder":
        """Move the video (and text) model; ``dtype`` applies to the video model only."""
        module = self.videotext if self.videotext is not None else self.net
        module.to(device=device, dtype=dtype)
        if self.text_tower is not None:
            self.text_tower.to(device)
        return self

    def head_for(self, tokens: int) -> int:
        """The trained pooling head whose budget is nearest ``tokens`` (ties: the lower index)."""
        budgets = self.net.config.head_budgets
        heads = self.trained_heads or list(range(len(budgets)))
        return min(heads, key=lambda h: (abs(budgets[h] - tokens), h))

    @torch.no_grad()
    def embed(self, clips: Sequence[torch.Tensor], budget: Union[int, None]) -> torch.Tensor:
        """Clips (3, T_i, H_i, W_i) of any sizes -> (len(clips), dim) L2-normalised vectors, float32.

        One packed forward (no padding): each clip keeps ``min(budget, T_i * H_i/p * W_i/p)`` tokens chosen by the
        group-dynamic selector (``budget`` None keeps all) and is pooled by the head nearest that count."""
        p = self.net.config.patch_size
        dtype = next(self.net.parameters()).dtype
        clips = [c.to(dtype) for c in clips]
        if self.videotext is not None:  # the joint space: exactly what retrieval evaluation ranks
            return self.videotext.encode_video(clips, num_tokens=budget).float()
        tokens = [c.shape[1] * (c.shape[2] // p) * (c.shape[3] // p) for c in clips]
        heads = [self.head_for(t if budget is None else min(budget, t)) for t in tokens]
        feats = self.net.forward_features(clips, num_tokens=budget, head=heads)
        return F.normalize(feats.pooled.float(), dim=-1)

    @torch.no_grad()
    def embed_text(self, captions: Sequence[str], chunk: int = 64) -> torch.Tensor:
        """Captions -> (len(captions), dim) L2-normalised joint-space vectors (stage-2 models only)."""
        if self.videotext is None:
            raise ValueError(f"{self.source} is a {self.stage} model without a text tower: text embeddings need a "
                             f"stage-2 (video-text) export")
        device = next(self.videotext.parameters()).device
        dtype = next((q.dtype for q in self.videotext.text_proj.parameters()), torch.float32)
        out = [self.videotext.encode_text_features(self.text_tower(list(captions[i:i + chunk])).to(device, dtype))
               for i in range(0, len(captions), chunk)]
        out = [o.float() for o in out]
        return torch.cat(out) if out else torch.empty(0, self.dim)

    def describe(self) -> dict:
        """What the metadata and ``embed_info.json`` record about the model."""
        cfg = self.net.config
        return {"model": self.source, "weights_file": self.weights_file, "model_sha256": self.model_sha256,
                "stage": self.stage, "vector": self.vector, "dim": self.dim, "normalize": self.normalize,
                "embed_dim": cfg.embed_dim, "depth": cfg.depth, "head_budgets": list(cfg.head_budgets),
                "trained_heads": self.trained_heads, "has_text": self.has_text, **self.extra}


def _run_normalize(path: Path) -> str:
    """The input normalisation of the run that wrote ``path`` (its saved ``config.json``), else "imagenet"."""
    cfg = path.parent / "config.json"
    if cfg.is_file():
        try:
            value = json.loads(cfg.read_text()).get("data", {}).get("normalize")
        except (ValueError, AttributeError):
            value = None
        if value in ("imagenet", "clip"):
            return value
    return "imagenet"


def _num_classes(state: dict) -> int:
    for name, value in state.items():
        if name.endswith("head.0.weight") and value.dim() == 2:
            return int(value.shape[0])
    return 0


def _official(source: str, weights: Path, arch: str) -> Encoder:
    if arch not in list_models() or not arch.startswith("fluxvit"):
        raise ValueError(f"--arch {arch!r} is not a registered FluxViT; registered: "
                         f"{', '.join(n for n in list_models() if n.startswith('fluxvit'))}")
    state = read_state_dict(weights)
    net = create_model(arch, num_classes=_num_classes(state))
    load_official_checkpoint(net, state, strict=True)
    kind = "classifier" if net.config.num_classes else "backbone"
    return Encoder(net.eval(), "official", f"official {kind}: pooled feature before fc_norm and the classifier "
                   f"(head nearest the kept tokens)", source, str(weights), file_sha256(weights),
                   extra={"arch": arch})


def load_encoder(model: str, arch: str = "", weights: str = "") -> Encoder:
    """Load MODEL (see the module docstring) for embedding; the model is in eval mode on the CPU.

    Raises:
        ValueError / FileNotFoundError: one line saying what MODEL is missing or which flag it needs.
    """
    path = Path(model)
    if weights:  # a zoo name with a weights file
        if not Path(weights).is_file():
            raise FileNotFoundError(f"weights file {weights} not found")
        return _official(model, Path(weights), arch or model)
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{path} is a folder without {CONFIG_NAME} + {WEIGHTS_NAME} (save_pretrained)")
        net = from_pretrained(path)
        return Encoder(net, "hub", "pooled feature before fc_norm and the classifier (head nearest the kept tokens)",
                       model, str(path / WEIGHTS_NAME), file_sha256(path / WEIGHTS_NAME),
                       normalize=normalize_of(net.pretrained_cfg))
    if not path.is_file():
        if model in list_models():
            raise ValueError(f"{model} is a registered architecture without weights: pass --weights FILE")
        if model.count("/") == 1 and not model.startswith((".", "/")):  # a hub id
            net = from_pretrained(model)
            wfile = _resolve(model, WEIGHTS_NAME)
            return Encoder(net, "hub", "pooled feature before fc_norm and the classifier (head nearest the kept "
                           "tokens)", model, str(wfile), file_sha256(wfile),
                           normalize=normalize_of(net.pretrained_cfg))
        raise FileNotFoundError(f"model {model} not found (a file, a save_pretrained folder, a hub id ORG/NAME, or "
                                f"a registered name with --weights)")
    meta = read_metadata(path) if path.suffix == ".safetensors" else {}
    sha = file_sha256(path)
    if "fluxvit_videotext" in meta:
        vt, tower = load_videotext(path)
        return Encoder(vt.video, "stage-2", "stage-2 joint video-text embedding: vision_proj(pooled), the space "
                       "of its text embeddings", model, str(path), sha, _run_normalize(path), videotext=vt,
                       text_tower=tower)
    if "fluxvit_config" in meta:
        if arch:
            log.warning("--arch %s ignored: %s carries its own architecture", arch, path)
        net = load_model(path).eval()
        stage = meta.get("stage", "")
        if stage == "distill":
            return Encoder(net, "stage-1", "stage-1 student pooled feature (the feature stage 1 aligns with the "
                           "teacher's pooled output; head nearest the kept tokens)", model, str(path), sha,
                           _run_normalize(path))
        heads = meta.get("trained_heads")
        return Encoder(net, "stage-3" if stage == "finetune" else "export",
                       "pooled feature before fc_norm and the classifier (trained head nearest the kept tokens)",
                       model, str(path), sha, _run_normalize(path),
                       trained_heads=[int(h) for h in heads.split(",")] if heads else None)
    if not arch:
        raise ValueError(f"{path} carries no architecture (an official checkpoint?): pass --arch NAME, one of "
                         f"{', '.join(n for n in list_models() if n.startswith('fluxvit'))}")
    return _official(model, path, arch)
