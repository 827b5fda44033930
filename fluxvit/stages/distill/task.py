"""Flux-UMT task: FluxViT student + student-side decoders (trainable) against a frozen teacher.

One step on a batch of clips (B, 3, T, H, W):
  1. the teacher sees each clip reduced to its budget (the double mask) and returns normalised targets on the
     student grid and the attention visible tokens are drawn from (``common.teacher.TeacherOutput``);
  2. for each student budget K (default 2048 / 1536 / 1024), the visible tokens of every clip are drawn by
     multinomial sampling without replacement on that attention over the tokens the teacher saw: jointly over
     the clip (``loss.sampling="clip"``, InternVideo2's engine) or an equal share per frame ("frame", UMT's);
  3. one packed student pass runs all B * len(budgets) views with those explicit ``keep`` indices;
  4. loss = token_weight * mean over layer pairs and rows of (2 - 2 cos(dec_l(student_l + pos), teacher_t(l)))
     (rows: the visible tokens, and the cls token when the teacher has one, as InternVideo2's engine)
     + pooled_weight * mean(2 - 2 cos(final_dec(student pooled of the view's head), teacher pooled)).
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from accelerate.utils import extract_model_from_parallel

from fluxvit.models import FluxViT, create_model, load_official_checkpoint, save_model

from ..common.data import as_clips
from ..common.config import OptimConfig
from ..common.loop import StepOutput
from ..common.optim import build_optimizer, peak_lr
from ..common.teacher import TeacherOutput, build_teacher
from .config import DistillConfig, LossConfig
from .decoders import DecoderPosEmbed, FeatureDecoder, FixedDecoderPosEmbed

__all__ = ["DistillModel", "DistillTask", "align_layers", "pool_heads", "return_index", "sample_visible"]

log = logging.getLogger("fluxvit.train")


def return_index(depth: int, num_layers: int, interval: float) -> list[int]:
    """Blocks the official recipes return, ascending: ``depth - int(i * interval) - 1`` for i < num_layers."""
    blocks = sorted({depth - int(i * interval) - 1 for i in range(num_layers)})
    if len(blocks) != num_layers or blocks[0] < 0:
        raise ValueError(f"{num_layers} layers at interval {interval} do not fit a {depth}-block model")
    return blocks


def _explicit(layers: Sequence[int], depth: int, num_layers: int, who: str) -> list[int]:
    out = sorted(t + depth if t < 0 else t for t in layers)
    if len(out) != num_layers or len(set(out)) != num_layers or not all(0 <= t < depth for t in out):
        raise ValueError(f"{who} layers {list(layers)} must be {num_layers} distinct blocks in [0, {depth})")
    return out


def align_layers(student_depth: int, teacher_depth: int, num_layers: int, teacher_interval: float = 1.0,
                 student_interval: float = 1.0, teacher_layers: Sequence[int] = (),
                 student_layers: Sequence[int] = ()) -> list[tuple[int, int]]:
    """Pairs (student block, teacher block), 0-based, as the official recipes pair them: each side returns
    ``depth - int(i * interval) - 1`` for i < ``num_layers`` (or the explicit lists), both sorted ascending and
    paired in that order. InternVideo2-1B with K 6 and interval 3.34: 23, 26, 29, 33, 36, 39; a 12-block CLIP
    tower with interval 1: its last six blocks."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    student = (_explicit(student_layers, student_depth, num_layers, "student") if student_layers
               else return_index(student_depth, num_layers, student_interval))
    teacher = (_explicit(teacher_layers, teacher_depth, num_layers, "teacher") if teacher_layers
               else return_index(teacher_depth, num_layers, teacher_interval))
    return list(zip(student, teacher))


def pool_heads(budgets: Sequence[int], num_heads: int, explicit: Sequence[int] = ()) -> list[int]:
    """The student pooling head of each budget: ``explicit`` when given, else by rank (the largest budget on
    head 0, the next on head 1, ...; budgets beyond the last head share it)."""
    if explicit:
        if len(explicit) != len(budgets) or not all(0 <= h < num_heads for h in explicit):
            raise ValueError(f"loss.pool_heads {list(explicit)} must give one head in [0, {num_heads}) per budget "
                             f"{list(budgets)}")
        return list(explicit)
    order = sorted(range(len(budgets)), key=lambda i: -budgets[i])
    heads = [0] * len(budgets)
    for rank, i in enumerate(order):
        heads[i] = min(rank, num_heads - 1)
    return heads


def _draw(w: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """``torch.multinomial(w, k, replacement=False)`` without its two host reads (its input checks): the same
    exponential-race draw (top k of w / Exp(1)), the same random stream, so the same indices."""
    keys = w / torch.empty_like(w).exponential_(1, generator=generator)
    return keys.argmax(-1, keepdim=True) if k == 1 else keys.topk(k).indices


def sample_visible(attn: torch.Tensor, valid: torch.Tensor, budget: int, frames: int, mode: str,
                   generator: torch.Generator | None = None, visible: int | None = None,
                   frame_counts: Sequence[int] | None = None) -> torch.Tensor:
    """Student-visible token indices of one clip, drawn without replacement from the teacher attention.

    Args:
        attn: (T*L,) non-negative teacher attention.
        valid: (T*L,) bool, tokens the teacher saw (only these have targets).
        budget: K, visible tokens wanted (fewer when fewer are valid).
        frames: T (for ``mode="frame"``: K is split evenly over frames, remainder to the first frames).
        mode: "clip" (one draw over all tokens: InternVideo2's engine) or "frame" (per frame: UMT's).
        visible: the number of valid tokens, as a host int ("clip" then reads nothing back from the device).
        frame_counts: T host ints, valid tokens per frame (read from ``valid`` in one go when not given).

    Returns:
        (k,) int64 ascending indices into T*L.
    """
    if mode not in ("clip", "frame"):
        raise ValueError(f"loss.sampling must be 'clip' or 'frame', got {mode!r}")
    # A floor far below any softmax weight keeps every valid token drawable (underflowed weights) without
    # changing the distribution measurably.
    w = attn.float().clamp_min(1e-12) * valid
    L = w.numel() // frames
    if frame_counts is None and (mode == "frame" or visible is None):
        frame_counts = valid.view(frames, L).sum(1).tolist()  # the one read back, when the caller has no counts
    n_valid = visible if visible is not None else sum(frame_counts)
    if budget >= n_valid:  # every valid token: the top n_valid of the 0/1 mask
        return valid.float().topk(n_valid).indices.sort().values if n_valid else valid.new_zeros(0).long()
    if mode == "clip":
        idx = _draw(w, budget, generator)
    else:
        per = [budget // frames + (1 if f < budget % frames else 0) for f in range(frames)]
        parts = [_draw(w[f * L:(f + 1) * L], min(k, frame_counts[f]), generator) + f * L
                 for f, k in enumerate(per) if min(k, frame_counts[f])]
        idx = torch.cat(parts)
    return idx.sort().values


class DistillModel(nn.Module):
    """The trainable part: the FluxViT student plus the student-side heads of stage 1.

    Per aligned student layer a ``FeatureDecoder`` to the teacher width, applied after adding the student-side
    position table (when enabled: learnable ``DecoderPosEmbed`` or UMT's ``FixedDecoderPosEmbed``), and, with
    ``loss.decoder_norm``, after one shared LayerNorm (UMT: the student's final norm); a final ``FeatureDecoder``
    from the student's pooled feature to the teacher's pooled width. ``forward(clips, keep, heads)`` -> (student layer -> (N, C) decoded rows of every
    view, cls first per view, packed; (V, C_pool) decoded pooled features; ``cu_seqlens``; student token count).
    """

    def __init__(self, student: FluxViT, layers: list[int], token_dim: int, pooled_dim: int, loss: LossConfig):
        super().__init__()
        self.student = student
        self.layers = list(layers)
        D, P = student.config.embed_dim, student.config.clip_embed_dim
        self.decoders = nn.ModuleDict({str(s): FeatureDecoder(D, token_dim, loss.decoder) for s in layers})
        self.decoder_pos_embed = None
        if loss.decoder_pos_embed:
            self.decoder_pos_embed = FixedDecoderPosEmbed(D) if loss.decoder_pos_fixed else \
                DecoderPosEmbed(D, student.pos_grid)
        self.decoder_norm = nn.LayerNorm(D, eps=1e-6) if loss.decoder_norm else None
        self.final_decoder = FeatureDecoder(P, pooled_dim, loss.decoder)

    def forward(self, clips: list, keep: list, heads: list):
        """clips: V tensors (3, T, H, W) (views of one clip may repeat); keep: V tensors (k_v,); heads: V ints."""
        f = self.student.forward_features(clips, keep=keep, layers=self.layers, head=heads)
        pos = None
        if self.decoder_pos_embed is not None:
            tables: dict = {}  # one resize per distinct grid
            rows = []
            for grid, k in zip(f.grids, f.keep):
                if grid not in tables:
                    tables[grid] = self.decoder_pos_embed.table(grid).to(f.last.device)
                rows.append(torch.cat([tables[grid][:1], tables[grid][1 + k]]))
            pos = torch.cat(rows)
        states = {s: f.layers[s] if self.decoder_norm is None else self.decoder_norm(f.layers[s]) for s in self.layers}
        preds = {s: self.decoders[str(s)](x if pos is None else x + pos.to(x.dtype)) for s, x in states.items()}
        return preds, self.final_decoder(f.pooled), f.cu_seqlens, f.last.shape[0]


class DistillTask:
    """Student, frozen teacher and the Flux-UMT loss (the ``TrainTask`` of stage 1)."""

    def __init__(self, cfg: DistillConfig, rank: int = 0, world_size: int = 1):
        self.cfg, self.rank, self.world = cfg, rank, world_size
        s, lc = cfg.model, cfg.loss
        student = create_model(s.name, num_classes=0, drop_path_rate=s.drop_path_rate, **s.overrides)
        self.teacher = build_teacher(cfg.teacher, input_norm=cfg.data.normalize)
        self.pairs = align_layers(len(student.blocks), self.teacher.depth, lc.num_layers, lc.teacher_interval,
                                  lc.student_interval, lc.teacher_layers, lc.student_layers)
        self.heads = pool_heads([int(b) for b in lc.budgets], student.num_heads_pool, lc.pool_heads)
        pooled_dim = getattr(self.teacher, "pooled_dim", self.teacher.dim)
        self.model = DistillModel(student, [p[0] for p in self.pairs], self.teacher.dim, pooled_dim, lc)
        self.patch = student.config.patch_size
        self.held_out: list = []
        log.info("distill: student %s (%.1f M params), teacher %s (%d blocks), layer pairs (student, teacher) %s, "
                 "pooling heads per budget %s", s.name, sum(p.numel() for p in student.parameters()) / 1e6,
                 type(self.teacher).__name__, self.teacher.depth, self.pairs, dict(zip(lc.budgets, self.heads)))

    # ------------------------------------------------------------------ TrainTask
    def to_device(self, device: torch.device) -> None:
        self.teacher.to(device)
        self.device = device

    def load_init(self, path: str) -> None:
        """Student weights only (e.g. a previous export); they must fit the student unless
        ``model.init_strict=false`` (a classifier head in the file is ignored)."""
        load_official_checkpoint(self.model.student, path, strict=self.cfg.model.init_strict,
                                 classifier_may_differ=True)

    def build_optimizer(self, ocfg: OptimConfig) -> torch.optim.Optimizer:
        """AdamW at ``optim.lr``, per ``lr_batch`` clips and scaled by the total batch when ``scale_lr`` (the
        official engines' rule; min / warmup lr follow through the schedule's ratios)."""
        d, t = self.cfg.data, self.cfg.train
        lr = peak_lr(ocfg, self.cfg.scale_lr, d.batch_size, t.grad_accum, self.world, d.num_sample, self.cfg.lr_batch)
        return build_optimizer(self.model, ocfg, lr)

    def export(self, model: DistillModel, path: Path) -> Path:
        """The student alone, as a safetensors file that ``fluxvit.models.load_model`` rebuilds."""
        return save_model(model.student, path, metadata={"stage": "distill"})

    def _generator(self, step: int, device: torch.device) -> torch.Generator:
        seed = random.Random(f"{self.cfg.train.seed}-{step}-{self.rank}").getrandbits(63)
        return torch.Generator(device=device).manual_seed(seed)

    def targets(self, video) -> list[tuple[torch.Tensor, TeacherOutput, int]]:
        """Teacher outputs per clip: list of (clip (3,T,H,W), TeacherOutput of its shape group, row)."""
        clips = as_clips(video)
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
        views, keeps, rows, heads = [], [], [], []
        counts: dict = {}  # per teacher call: valid tokens per clip and frame, read back once when needed
        for budget, head in zip(lc.budgets, self.heads):
            for clip, t, r in tgt:
                visible = t.visible[r] if t.visible is not None else None
                per_frame = None
                if lc.sampling == "frame" or visible is None:
                    if id(t) not in counts:
                        counts[id(t)] = t.valid.view(t.valid.shape[0], clip.shape[1], -1).sum(-1).tolist()
                    per_frame = counts[id(t)][r]
                keeps.append(sample_visible(t.cls_attn[r], t.valid[r], int(budget), clip.shape[1], lc.sampling,
                                            generator, visible, per_frame))
                views.append(clip)
                rows.append((t, r))
                heads.append(head)
        preds, pooled, cu, ntok = model(views, keeps, heads)
        with_cls = tgt[0][1].cls is not None
        if not with_cls:  # teacher without a cls token: patch rows only
            patch = torch.ones(ntok, dtype=torch.bool, device=cu.device)
            patch[cu[:-1]] = False
        terms, token_losses = {}, []
        for s, tl in self.pairs:
            parts = []
            for (t, r), k in zip(rows, keeps):
                if with_cls:
                    parts.append(t.cls[tl][r:r + 1])
                parts.append(t.token_targets(tl, r, k))
            target = torch.cat(parts).float()
            pred = preds[s] if with_cls else preds[s][patch]
            cos = F.cosine_similarity(pred.float(), target, dim=-1)
            token_losses.append((2 - 2 * cos).mean())
            terms[f"cos_l{s}"] = cos.mean().detach()
        target = torch.stack([t.pooled[r] for t, r in rows]).float()
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
        inner = extract_model_from_parallel(model)
        g = torch.Generator(device=self.device).manual_seed(1234)
        tok, pool = [], []
        for clip in self.held_out:
            terms, _ = self.forward_loss(inner, clip.to(self.device), g)
            tok.append(terms[f"cos_l{self.pairs[-1][0]}"].item())
            pool.append(terms["cos_pool"].item())
        return {"val_cos_tok": sum(tok) / len(tok), "val_cos_pool": sum(pool) / len(pool)}
