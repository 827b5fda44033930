"""Stage 2 task: FluxViT video tower + text tower + projections, trained with VTC (InfoNCE both ways).

The contrastive batch is global: each rank all-gathers the other ranks' embeddings (with gradients flowing
back to the rank that made them) and computes the loss of its own rows against every column; DDP's gradient
averaging then gives exactly the single-process gradient of the global-batch loss.
"""
from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from accelerate.utils import extract_model_from_parallel

from fluxvit.models import FluxViT, FluxViTConfig, create_model
from fluxvit.models.checkpoint import CheckpointMismatchError, read_metadata, read_state_dict, set_default_mode

from ..common.data import as_clips
from ..common.loop import StepOutput
from ..common.teacher import build_teacher
from .config import VideoTextConfig
from .text import TextTower, build_text_tower

__all__ = ["VideoTextModel", "VideoTextTask", "all_gather_with_grad", "contrastive_loss", "load_videotext",
           "save_videotext"]

log = logging.getLogger("fluxvit.train")


class _GatherWithGrad(torch.autograd.Function):
    """All-gather rows of every rank (``sizes``: rows per rank); backward sums the gradients of all ranks and
    returns this rank's slice (works on gloo, which has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: tuple) -> torch.Tensor:
        pad = max(sizes) - x.shape[0]
        xp = torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) if pad else x.contiguous()
        parts = [torch.empty_like(xp) for _ in sizes]
        dist.all_gather(parts, xp)
        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None


def all_gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B_local, D) -> ((B_global, D), offset of this rank's rows); identity without a process group.
    Ranks may hold different numbers of rows."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    local = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, local)
    sizes = tuple(int(n) for n in sizes)
    return _GatherWithGrad.apply(x, sizes), sum(sizes[: dist.get_rank()])


def contrastive_loss(video: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Symmetric InfoNCE of this rank's rows against the global batch.

    Args:
        video, text: (B_local, E) L2-normalised embeddings of matching pairs.
        logit_scale: scalar, log of the inverse temperature.

    Returns:
        the loss (mean of the video-to-text and text-to-video cross-entropies over this rank's rows; its
        mean over ranks is the global-batch loss) and detached terms for logging.
    """
    all_video, offset = all_gather_with_grad(video)
    all_text, _ = all_gather_with_grad(text)
    scale = logit_scale.exp()
    labels = torch.arange(video.shape[0], device=video.device) + offset
    v2t = F.cross_entropy(scale * video @ all_text.T, labels)
    t2v = F.cross_entropy(scale * text @ all_video.T, labels)
    loss = 0.5 * (v2t + t2v)
    with torch.no_grad():
        acc = (scale * video @ all_text.T).argmax(1).eq(labels).float().mean()
    return loss, {"vtc": loss.detach(), "v2t": v2t.detach(), "t2v": t2v.detach(), "temperature": 1 / scale.detach(),
                  "batch_acc": acc}


class VideoTextModel(nn.Module):
    """Video tower + projections into a joint space (+ the text tower when it is trained).

    ``forward(video, text_features, num_tokens)`` -> (video_emb (V, E), text_emb (B, E), logit_scale), both
    L2-normalised; V = B, or B * len(budgets) when ``num_tokens`` is a list (budget-major, one packed pass).

    ``vision_proj``: "linear" or "ln_linear" (LayerNorm + Linear, InternVideo2's ``vision_align``); ``text_proj``:
    "linear" or "none" (the text tower's output is already the joint space; needs ``text_dim == embed_dim``).
    The temperature is clamped to [``min_temperature``, ``max_temperature``] (0: no upper clamp); a learnable one
    (stored as ``logit_scale`` = log(1 / temperature)) is clamped in place before every forward, as InternVideo2's
    and UMT's ``clip_contrastive_temperature`` clamp their ``temp``: at the bound it still gets a gradient.
    """

    def __init__(self, video: FluxViT, text_dim: int, embed_dim: int, temperature: float = 0.07,
                 learnable_temperature: bool = True, min_temperature: float = 0.01,
                 text_tower: TextTower | None = None, vision_proj: str = "linear", text_proj: str = "linear",
                 max_temperature: float = 0.0):
        super().__init__()
        self.video = video
        P = video.config.clip_embed_dim
        if vision_proj == "linear":
            self.vision_proj = nn.Linear(P, embed_dim)
        elif vision_proj == "ln_linear":
            self.vision_proj = nn.Sequential(nn.LayerNorm(P), nn.Linear(P, embed_dim))
        else:
            raise ValueError(f"contrast.vision_proj must be 'linear' or 'ln_linear', got {vision_proj!r}")
        if text_proj == "linear":
            self.text_proj = nn.Linear(text_dim, embed_dim)
        elif text_proj == "none":
            if text_dim != embed_dim:
                raise ValueError(f"contrast.text_proj=none needs the text tower's dim ({text_dim}) to equal "
                                 f"contrast.embed_dim ({embed_dim})")
            self.text_proj = nn.Identity()
        else:
            raise ValueError(f"contrast.text_proj must be 'linear' or 'none', got {text_proj!r}")
        self.proj_kinds = (vision_proj, text_proj)
        init = torch.tensor(math.log(1.0 / temperature))
        if learnable_temperature:
            self.logit_scale = nn.Parameter(init)
        else:
            self.register_buffer("logit_scale", init)
        self.max_logit_scale = math.log(1.0 / min_temperature)
        self.min_logit_scale = math.log(1.0 / max_temperature) if max_temperature > 0 else None
        self.text = text_tower  # None when frozen (kept outside the trained module)
        self.align_decoder = None  # see attach_align_decoder

    def clamped_scale(self) -> torch.Tensor:
        """log(1 / temperature) with the temperature clamped to its range."""
        return self.logit_scale.clamp(min=self.min_logit_scale, max=self.max_logit_scale)

    @torch.no_grad()
    def clamp_temperature(self) -> None:
        """Clamp a learnable temperature into its range in place (the official ``temp.clamp_``)."""
        if isinstance(self.logit_scale, nn.Parameter):
            self.logit_scale.clamp_(min=self.min_logit_scale, max=self.max_logit_scale)

    def encode_video(self, video, num_tokens=None) -> torch.Tensor:
        """(B, 3, T, H, W) or list of clips -> (B, E); ``num_tokens`` one budget or one per clip."""
        feats = self.video.forward_features(video, num_tokens)
        return F.normalize(self.vision_proj(feats.pooled), dim=-1)

    def encode_text_features(self, text_features: torch.Tensor) -> torch.Tensor:
        """(B, text_dim) tower features -> (B, E)."""
        return F.normalize(self.text_proj(text_features), dim=-1)

    def forward(self, video, text_features=None, num_tokens=None, captions=None):
        self.clamp_temperature()
        if captions is not None:
            if self.text is None:
                raise ValueError("captions given but the text tower is frozen: pass text_features")
            text_features = self.text(captions)
        if isinstance(num_tokens, (list, tuple)):
            feats = self.video.forward_multi(video, budgets=list(num_tokens), heads=[None] * len(num_tokens))
        else:
            feats = self.video.forward_features(video, num_tokens)
        v = F.normalize(self.vision_proj(feats.pooled), dim=-1)
        # A learnable scale was clamped in place above: use it as it is (a clamp at the bound could stop its
        # gradient, as the float32 value may round past the bound); a copy, not the leaf itself (DDP's hooks).
        scale = self.logit_scale.clone() if isinstance(self.logit_scale, nn.Parameter) else self.clamped_scale()
        out = (v, self.encode_text_features(text_features), scale)
        if self.align_decoder is not None:  # training-only head of the teacher alignment
            n = text_features.shape[0]
            out = out + (self.align_decoder(feats.pooled[:n]),)
        return out

    def attach_align_decoder(self, target_dim: int) -> None:
        """Add the student-side decoder of the unmasked-teacher alignment (pooled -> teacher pooled dim)."""
        P = self.video.config.clip_embed_dim
        self.align_decoder = nn.Sequential(nn.LayerNorm(P), nn.Linear(P, target_dim))


def _build_video(cfg: VideoTextConfig) -> FluxViT:
    return create_model(cfg.model.name, num_classes=0, drop_path_rate=cfg.model.drop_path_rate,
                        **dict(cfg.model.overrides))


class VideoTextTask:
    """The ``TrainTask`` of stage 2 (see ``fluxvit.stages.common.loop``)."""

    def __init__(self, cfg: VideoTextConfig, text_tower: TextTower | None = None):
        self.cfg = cfg
        t = cfg.text
        self.text_tower = text_tower or build_text_tower(t.spec, t.freeze, t.pooling, t.max_length, t.weights,
                                                           t.num_layers)
        c = cfg.contrast
        self.model = VideoTextModel(_build_video(cfg), self.text_tower.dim, c.embed_dim, c.temperature,
                                    c.learnable_temperature, c.min_temperature,
                                    None if t.freeze else self.text_tower, c.vision_proj, c.text_proj,
                                    c.max_temperature)
        self.evaluator = None  # set by train.py: callable(model_module) -> metrics dict
        self.teacher = None
        if cfg.align.weight > 0:
            self.teacher = build_teacher(cfg.align.teacher, input_norm=cfg.data.normalize)
            self.model.attach_align_decoder(getattr(self.teacher, "pooled_dim", self.teacher.dim))

    def to_device(self, device: torch.device) -> None:
        self.model.to(device)
        self.text_tower.to(device)
        if self.teacher is not None:
            self.teacher.to(device)

    def _teacher_pooled(self, video) -> torch.Tensor:
        """The frozen teacher's pooled feature of every (unmasked) clip: (B, pooled_dim)."""
        clips = as_clips(video)
        out = [None] * len(clips)
        groups: dict = {}
        for i, c in enumerate(clips):
            groups.setdefault(tuple(c.shape), []).append(i)
        p = self.model.video.config.patch_size
        with torch.no_grad():
            for (_, T, H, W), idx in groups.items():
                pooled = self.teacher(torch.stack([clips[i] for i in idx]), (T, H // p, W // p), []).pooled
                for row, i in enumerate(idx):
                    out[i] = pooled[row]
        return torch.stack(out).float()

    def load_init(self, path: str) -> None:
        """Initialise the video tower from a stage-1 export (its embedded config defines the architecture)
        or from another stage-2 export (video tower and projections)."""
        meta = read_metadata(path)
        state = read_state_dict(path)
        if "fluxvit_videotext" in meta:
            own = self.model.state_dict()
            loadable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
            off = sorted(set(own) - set(loadable)) + sorted(set(state) - set(own))
            if off and self.cfg.model.init_strict:
                raise CheckpointMismatchError(
                    f"{path} does not fit the model: {len(loadable)} of {len(own)} tensors match; first "
                    f"mismatches: {', '.join(off[:4])} (another architecture? model.init_strict=false loads what fits)")
            self.model.load_state_dict(loadable, strict=False)
            (log.warning if off else log.info)("init from stage-2 export %s (%d of %d tensors)%s", path,
                                               len(loadable), len(own), f"; not loaded: {off[:6]}" if off else "")
            return
        cfg = json.loads(meta["fluxvit_config"])
        cfg.update(num_classes=0, drop_path_rate=self.cfg.model.drop_path_rate)
        video = FluxViT(FluxViTConfig(**cfg))
        missing, unexpected = video.load_state_dict(
            {k: v for k, v in state.items() if not k.startswith("head.")}, strict=False)
        missing = [k for k in missing if not k.startswith("head.")]
        if missing:
            raise ValueError(f"{path} lacks video tower weights: {missing[:6]}")
        self.model.video = video
        proj = self.model.vision_proj
        linear = proj if isinstance(proj, nn.Linear) else proj[-1]
        P = video.config.clip_embed_dim
        if linear.in_features != P:
            new = nn.Linear(P, linear.out_features)
            self.model.vision_proj = new if isinstance(proj, nn.Linear) else nn.Sequential(nn.LayerNorm(P), new)
        log.info("video tower initialised from stage-1 export %s", path)

    def _budgets(self, step: int):
        v = self.cfg.contrast
        if v.budget_mode == "all" and len(v.budgets) > 1:
            return list(v.budgets)
        return random.Random(f"budget-{self.cfg.train.seed}-{step}").choice(list(v.budgets))

    def compute_loss(self, model: nn.Module, batch: dict, step: int) -> StepOutput:
        captions = list(batch["caption"])
        if any(not c for c in captions):
            raise ValueError("video-text training needs a caption for every sample (empty caption found)")
        budgets = self._budgets(step)
        if self.cfg.text.freeze:
            out = model(batch["video"], text_features=self.text_tower(captions), num_tokens=budgets)
        else:
            out = model(batch["video"], num_tokens=budgets, captions=captions)
        v, t, scale = out[:3]
        if isinstance(budgets, list):  # every budget against the same texts; average the losses
            B = t.shape[0]
            parts = [contrastive_loss(v[j * B:(j + 1) * B], t, scale) for j in range(len(budgets))]
            loss = sum(p[0] for p in parts) / len(parts)
            terms = {k: sum(p[1][k] for p in parts) / len(parts) for k in parts[0][1]}
        else:
            loss, terms = contrastive_loss(v, t, scale)
        if self.teacher is not None:
            target = self._teacher_pooled(batch["video"])
            align = (2 - 2 * F.cosine_similarity(out[3].float(), target, dim=-1)).mean()
            loss = loss + self.cfg.align.weight * align
            terms["align"] = align.detach()
        p = self.model.video.config.patch_size
        clip_tokens = [c.shape[-3] * (c.shape[-2] // p) * (c.shape[-1] // p) for c in batch["video"]]
        kept = sum(min(b, n) for b in (budgets if isinstance(budgets, list) else [budgets]) for n in clip_tokens)
        return StepOutput(loss=loss, terms=terms, tokens=int(kept))

    def evaluate(self, model: nn.Module, step: int) -> dict:
        if self.evaluator is None:
            return {}
        return self.evaluator(extract_model_from_parallel(model), self.text_tower)

    def export(self, model: nn.Module, path: Path) -> Path:
        return save_videotext(extract_model_from_parallel(model), self.text_tower, self.cfg, path)


def save_videotext(model: VideoTextModel, text_tower: TextTower, cfg: VideoTextConfig, path) -> Path:
    """One safetensors file: video tower, projections, temperature (and the text tower when trained), with the
    video config, text spec and joint-space settings as metadata. Atomic."""
    import os

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if not k.startswith("align_decoder.")}  # a training-only head
    meta = {
        "fluxvit_videotext": "1",
        "fluxvit_config": json.dumps(model.video.config.to_dict()),
        "text": json.dumps({"spec": cfg.text.spec, "freeze": cfg.text.freeze, "pooling": cfg.text.pooling,
                            "max_length": cfg.text.max_length, "dim": text_tower.dim, "weights": cfg.text.weights,
                            "num_layers": cfg.text.num_layers}),
        "contrast": json.dumps({"embed_dim": cfg.contrast.embed_dim,
                                "learnable_temperature": isinstance(model.logit_scale, nn.Parameter),
                                "min_temperature": math.exp(-model.max_logit_scale),
                                "max_temperature": (math.exp(-model.min_logit_scale)
                                                    if model.min_logit_scale is not None else 0.0),
                                "vision_proj": model.proj_kinds[0], "text_proj": model.proj_kinds[1]}),
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    set_default_mode(tmp)  # safetensors writes 0600; the run's other files follow the umask
    os.replace(tmp, path)
    return path


def load_videotext(path, text_tower: TextTower | None = None) -> tuple[VideoTextModel, TextTower]:
    """Rebuild (VideoTextModel, TextTower) from a ``save_videotext`` file alone (the text tower is rebuilt
    from its spec, and its recorded local weights file, unless given)."""
    try:
        meta = read_metadata(path)
    except Exception as err:  # safetensors raises its own (Rust) error types for a file it cannot parse
        raise ValueError(f"{path} is not a safetensors checkpoint ({' '.join(str(err).split())[:120]})") from None
    if "fluxvit_videotext" not in meta:
        stage = meta.get("stage", "")
        if stage == "finetune":
            raise ValueError(f"{path} is a stage-3 classifier export, not a stage-2 video-text checkpoint: evaluate "
                             f"it with python -m fluxvit.stages.finetune.eval {path}")
        if stage == "distill":
            raise ValueError(f"{path} is a stage-1 export (no text tower): train stage 2 from it first (make "
                             f"pretrain, or --set model.init={path} in stage 2)")
        raise ValueError(f"{path} is not a stage-2 video-text checkpoint")
    text = json.loads(meta["text"])
    contrast = json.loads(meta["contrast"])
    video = FluxViT(FluxViTConfig(**json.loads(meta["fluxvit_config"])))
    tower = text_tower or build_text_tower(text["spec"], True, text["pooling"], text["max_length"],
                                           text.get("weights", ""), text.get("num_layers", 0))
    trained_text = not text["freeze"]
    model = VideoTextModel(video, text["dim"], contrast["embed_dim"], 0.07, contrast["learnable_temperature"],
                           contrast["min_temperature"], tower if trained_text else None,
                           contrast.get("vision_proj", "linear"), contrast.get("text_proj", "linear"),
                           contrast.get("max_temperature", 0.0))
    state = read_state_dict(path)
    model.load_state_dict(state, strict=True)
    tower.frozen = True
    tower.requires_grad_(False)
    tower.eval()
    return model.eval(), tower
