"""Flux-UMT task: FluxViT student + student-side decoders (trainable) against a frozen teacher.

One step on a batch of clips (B, 3, T, H, W):
  1. the teacher sees each clip reduced to its budget and returns normalised targets on the student grid,
     plus its last block's cls-to-patch attention (``teacher.TeacherOutput``);
  2. for each student budget K (default 2048 / 1536 / 1024), the visible tokens of every clip are drawn by
     multinomial sampling (without replacement) on the teacher attention over the tokens the teacher saw;
  3. one packed student pass runs all B * len(budgets) views with those explicit ``keep`` indices;
  4. loss = token_weight * mean_l mean(2 - 2 cos(dec_l(student_l), teacher_t(l))) over visible tokens
     + pooled_weight * mean(2 - 2 cos(dec_pool(student pooled), teacher pooled)).
"""
from __future__ import annotations

import logging
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fluxvit.models import FluxViT, create_model, load_official_checkpoint, save_model

from ..common.loop import StepOutput
from .config import DistillConfig
from .teacher import FluxViTTeacher, OpenCLIPTeacher, TeacherOutput, align_layers

__all__ = ["DistillModel", "DistillTask", "build_teacher", "sample_visible"]

log = logging.getLogger("fluxvit.train")


def build_teacher(cfg: DistillConfig) -> nn.Module:
    """The frozen teacher named by ``cfg.teacher``."""
    t = cfg.teacher
    common = dict(budget=t.budget, image_size=t.image_size, bf16=t.bf16)
    if t.kind == "open_clip":
        return OpenCLIPTeacher.create(name=t.name, pretrained=t.pretrained, weights=t.weights,
                                      vision_cfg=t.vision_cfg or None, embed_dim=t.embed_dim,
                                      input_norm=cfg.data.normalize, **common)
    if t.kind == "fluxvit":
        return FluxViTTeacher.create(weights=t.weights, name=t.name, **common)
    raise ValueError(f"unknown teacher.kind {t.kind!r}; use open_clip or fluxvit")


def sample_visible(attn: torch.Tensor, valid: torch.Tensor, budget: int, frames: int, mode: str,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Student-visible token indices of one clip, drawn without replacement from the teacher attention.

    Args:
        attn: (T*L,) non-negative teacher cls-to-patch attention.
        valid: (T*L,) bool, tokens the teacher saw (only these have targets).
        budget: K, visible tokens wanted (fewer when fewer are valid).
        frames: T (for ``mode="frame"``: K is split evenly over frames, remainder to the first frames).
        mode: "clip" or "frame".

    Returns:
        (k,) int64 ascending indices into T*L.
    """
    w = (attn.float().clamp_min(0) + 1e-6) * valid
    n_valid = int(valid.sum())
    if budget >= n_valid:
        return valid.nonzero().squeeze(1)
    if mode == "clip":
        idx = torch.multinomial(w, budget, replacement=False, generator=generator)
    elif mode == "frame":
        L = w.numel() // frames
        per = [budget // frames + (1 if f < budget % frames else 0) for f in range(frames)]
        parts = []
        for f, k in enumerate(per):
            wf = w[f * L:(f + 1) * L]
            k = min(k, int((wf > 0).sum()))
            if k:
                parts.append(torch.multinomial(wf, k, replacement=False, generator=generator) + f * L)
        idx = torch.cat(parts)
    else:
        raise ValueError(f"loss.sampling must be 'clip' or 'frame', got {mode!r}")
    return idx.sort().values


class DistillModel(nn.Module):
    """The trainable part: the FluxViT student plus one decoder per aligned layer and a pooled decoder.

    Decoders map student width to teacher width: LayerNorm -> Linear (UMT's student-side heads).
    ``forward(clips, keep)`` -> (per-layer (N_vis, C) predictions in view order, (V, C_pool) pooled predictions,
    number of student tokens).
    """

    def __init__(self, student: FluxViT, layers: list[int], token_dim: int, pooled_dim: int):
        super().__init__()
        self.student = student
        self.layers = list(layers)
        D, P = student.config.embed_dim, student.config.clip_embed_dim
        self.decoders = nn.ModuleDict({str(s): nn.Sequential(nn.LayerNorm(D), nn.Linear(D, token_dim)) for s in layers})
        self.pooled_decoder = nn.Sequential(nn.LayerNorm(P), nn.Linear(P, pooled_dim))

    def forward(self, clips: list, keep: list):
        """clips: V tensors (3, T, H, W) (views of the same clip may repeat); keep: V tensors (k_v,)."""
        f = self.student.forward_features(clips, keep=keep, layers=self.layers)
        n = f.last.shape[0]
        patch = torch.ones(n, dtype=torch.bool, device=f.last.device)
        patch[f.cu_seqlens[:-1]] = False  # drop each view's cls row
        preds = {s: self.decoders[str(s)](f.layers[s][patch]) for s in self.layers}
        return preds, self.pooled_decoder(f.pooled), n


class DistillTask:
    """Student, frozen teacher and the Flux-UMT loss (the ``TrainTask`` of stage 1)."""

    def __init__(self, cfg: DistillConfig, rank: int = 0):
        self.cfg, self.rank = cfg, rank
        s = cfg.student
        student = create_model(s.name, num_classes=0, drop_path_rate=s.drop_path_rate, **s.overrides)
        self.teacher = build_teacher(cfg)
        self.pairs = align_layers(len(student.blocks), self.teacher.depth, cfg.loss.num_layers,
                                  cfg.loss.teacher_layers)
        pooled_dim = getattr(self.teacher, "pooled_dim", self.teacher.dim)
        self.model = DistillModel(student, [p[0] for p in self.pairs], self.teacher.dim, pooled_dim)
        self.patch = student.config.patch_size
        self.held_out: list = []
        log.info("distill: student %s (%.1f M params), teacher %s, layer pairs (student, teacher) %s",
                 s.name, sum(p.numel() for p in student.parameters()) / 1e6, type(self.teacher).__name__, self.pairs)

    # ------------------------------------------------------------------ TrainTask
    def to_device(self, device: torch.device) -> None:
        self.teacher.to(device)
        self.device = device

    def load_init(self, path: str) -> None:
        """Student weights only (e.g. a previous export); they must fit the student unless
        ``train.init_strict=false`` (a classifier head in the file is ignored)."""
        load_official_checkpoint(self.model.student, path, strict=self.cfg.train.init_strict,
                                 classifier_may_differ=True)

    def export(self, model: DistillModel, path: Path) -> Path:
        """The student alone, as a safetensors file that ``fluxvit.models.load_model`` rebuilds."""
        return save_model(model.student, path, metadata={"stage": "distill"})

    def _generator(self, step: int, device: torch.device) -> torch.Generator:
        seed = random.Random(f"{self.cfg.train.seed}-{step}-{self.rank}").getrandbits(63)
        return torch.Generator(device=device).manual_seed(seed)

    def targets(self, video) -> list[tuple[torch.Tensor, TeacherOutput, int]]:
        """Teacher outputs per clip: list of (clip (3,T,H,W), TeacherOutput of batch size 1 view, row)."""
        clips = list(video.unbind(0)) if isinstance(video, torch.Tensor) else list(video)
        groups: dict = {}
        for i, c in enumerate(clips):
            groups.setdefault(tuple(c.shape), []).append(i)
        out: list = [None] * len(clips)
        layers = [p[1] for p in self.pairs]
        for shape, idx in groups.items():
            _, T, H, W = shape
            t = self.teacher(torch.stack([clips[i] for i in idx]), (T, H // self.patch, W // self.patch), layers)
            for row, i in enumerate(idx):
                out[i] = (clips[i], t, row)
        return out

    def forward_loss(self, model: nn.Module, video, generator: torch.Generator | None) -> tuple[dict, int]:
        """Loss terms (tensors) and student token count for one batch (B, 3, T, H, W) or list of clips."""
        lc = self.cfg.loss
        tgt = self.targets(video)
        views, keeps, rows = [], [], []
        for budget in lc.budgets:
            for clip, t, r in tgt:
                keep = sample_visible(t.cls_attn[r], t.valid[r], int(budget), clip.shape[1], lc.sampling, generator)
                views.append(clip)
                keeps.append(keep)
                rows.append((t, r))
        preds, pooled, ntok = model(views, keeps)
        terms = {}
        token_losses = []
        for s, tl in self.pairs:
            target = torch.cat([t.tokens[tl][r, k] for (t, r), k in zip(rows, keeps)])
            cos = F.cosine_similarity(preds[s].float(), target, dim=-1)
            token_losses.append((2 - 2 * cos).mean())
            terms[f"cos_l{s}"] = cos.mean().detach()
        target = torch.stack([t.pooled[r] for t, r in rows])
        cos_pool = F.cosine_similarity(pooled.float(), target, dim=-1)
        terms["tok"] = torch.stack(token_losses).mean()
        terms["pool"] = (2 - 2 * cos_pool).mean()
        terms["cos_pool"] = cos_pool.mean().detach()
        terms["loss"] = lc.token_weight * terms["tok"] + lc.pooled_weight * terms["pool"]
        return terms, ntok

    def compute_loss(self, model: nn.Module, batch: dict, step: int) -> StepOutput:
        video = batch["video"]
        video = video.to(self.device, non_blocking=True) if isinstance(video, torch.Tensor) else \
            [v.to(self.device, non_blocking=True) for v in video]
        terms, ntok = self.forward_loss(model, video, self._generator(step, self.device))
        loss = terms["loss"]
        shown = {k: v.detach() for k, v in terms.items() if k in ("loss", "tok", "pool")}
        return StepOutput(loss=loss, terms=shown, tokens=ntok)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int) -> dict:
        """Student-teacher cosine similarity on held-out clips at the configured budgets (fixed sampling seed):
        ``val_cos_tok`` (last aligned layer, visible tokens) and ``val_cos_pool``."""
        if not self.held_out:
            return {}
        inner = getattr(model, "module", model)
        g = torch.Generator(device=self.device).manual_seed(1234)
        tok, pool = [], []
        for clip in self.held_out:
            terms, _ = self.forward_loss(inner, clip.to(self.device), g)
            tok.append(terms[f"cos_l{self.pairs[-1][0]}"].item())
            pool.append(terms["cos_pool"].item())
        return {"val_cos_tok": sum(tok) / len(tok), "val_cos_pool": sum(pool) / len(pool)}
