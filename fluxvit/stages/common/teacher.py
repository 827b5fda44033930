"""Frozen teachers shared by stage 1 (distillation) and stage 2 (the optional unmasked-teacher alignment).

``TeacherConfig`` names a teacher and ``build_teacher`` builds it. Every teacher is frozen and stays in eval mode,
runs under ``no_grad`` and (on CUDA) bf16 autocast, and is called as
``teacher(video, student_grid, layers) -> TeacherOutput`` with, on the *student's* token grid (T, h, w):
  * ``tokens[l]``: L2-normalised features of teacher block ``l``; (B, T*h*w, C) dense on the grid, or, when
    ``rows`` is set, (B, R, C) rows that ``rows`` (B, T*h*w) indexes (the InternVideo2 teacher: row 0 is its cls
    token, rows 1.. its kept tokens),
  * ``cls``: block -> (B, C) normalised cls-token features, or None (per-frame image towers),
  * ``pooled``: (B, C_pool) L2-normalised clip feature,
  * ``cls_attn``: (B, T*h*w) the attention visible tokens are drawn from (zero on tokens the teacher did not see):
    for image towers the last block's cls-to-patch attention per frame (UMT's rule), for InternVideo2 its
    projector's attention from the mean query to the patch tokens (the official engine's rule),
  * ``valid``: (B, T*h*w) bool, tokens the teacher saw (its Flux budget, group-dynamic selector),
  * ``visible``: B host ints, the count of ``valid`` per clip, when the teacher knows it without reading the
    device (its grid is the student's); None otherwise.

Teachers:
  * ``InternVideo2Teacher``: the paper's teacher, InternVideo2-1B (``kind="internvideo2"``, the official
    stage-2 file in ``weights``), or a small randomly initialised one (``overrides``, for tests and demos).
  * ``OpenCLIPTeacher``: any open_clip ``VisionTransformer`` (UMT's CLIP teachers), applied per frame.
  * ``FluxViTTeacher``: a FluxViT of the zoo (e.g. a larger checkpoint) as a video teacher.

Token grids: the student has patch 14, so clip (T, H, W) has grid (T, H/14, W/14). With ``image_size=0``
(default) each frame is resized (bicubic, as UMT's and InternVideo2's engines do) to (h * p_t, w * p_t) for a
teacher of patch p_t, so both grids coincide; the InternVideo2 teacher (patch 14) sees the student's clip as is.
With a fixed teacher ``image_size`` the grids differ and ``grid_index_map`` maps each student token to the teacher
token whose cell contains the student cell's centre.

The official InternVideo2 distillation script never puts its teacher in eval mode, so drop path 0.25 stays live
in its teacher; here a teacher is always in eval mode (deterministic targets).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from fluxvit.models import (FluxViT, InternVideo2, create_model, load_model, load_official_checkpoint, read_state_dict,
                            select_tokens)

from fluxvit.datasets.transforms import NORMALIZE as _MEANS

__all__ = ["FluxViTTeacher", "InternVideo2Teacher", "OpenCLIPTeacher", "TeacherConfig", "TeacherOutput",
           "build_teacher", "grid_index_map", "map_to_student_grid"]

log = logging.getLogger("fluxvit.train")

# The paper's teacher: InternVideo2-1B after its stage 2 (the official ``teacher_internvideo2_stage2_1B`` factory).
INTERNVIDEO2_1B_FILE = ("InternVideo2-stage2_1b-224p-f4.pt from "
                        "https://huggingface.co/OpenGVLab/InternVideo2-Stage2_1B-224p-f4")


@dataclass
class TeacherConfig:
    """The frozen teacher.

    kind: "internvideo2" (the zoo's ``name``, default ``internvideo2_1b_patch14``, with the official weights in
    ``weights``; ``overrides`` build a smaller randomly initialised one instead), "open_clip" (a vision tower by
    ``name`` + ``pretrained`` tag or local ``weights``, or a random tower from ``vision_cfg``) or "fluxvit" (a zoo
    checkpoint in ``weights``, or a registered ``name`` at random init).
    budget: tokens the teacher sees per clip (group-dynamic selector); 0 = all.
    image_size: teacher input size; 0 = match the student's token grid (frames resized to grid * teacher patch).
    """

    kind: str = "open_clip"
    name: str = "ViT-B-16"
    pretrained: str = "openai"
    weights: str = ""
    vision_cfg: dict = field(default_factory=dict)
    overrides: dict = field(default_factory=dict)
    embed_dim: int = 512
    image_size: int = 0
    budget: int = 2048
    bf16: bool = True


def build_teacher(t: TeacherConfig, input_norm: str = "imagenet") -> nn.Module:
    """The frozen teacher named by ``t``; ``input_norm`` is the normalisation of the videos it will receive."""
    common = dict(budget=t.budget, image_size=t.image_size, bf16=t.bf16)
    if t.kind == "internvideo2":
        return InternVideo2Teacher.create(name=t.name, weights=t.weights, overrides=t.overrides,
                                          input_norm=input_norm, **common)
    if t.kind == "open_clip":
        return OpenCLIPTeacher.create(name=t.name, pretrained=t.pretrained, weights=t.weights,
                                      vision_cfg=t.vision_cfg or None, embed_dim=t.embed_dim,
                                      input_norm=input_norm, **common)
    if t.kind == "fluxvit":
        return FluxViTTeacher.create(weights=t.weights, name=t.name, **common)
    raise ValueError(f"unknown teacher.kind {t.kind!r}; use internvideo2, open_clip or fluxvit")


@dataclass
class TeacherOutput:
    """Teacher targets on the student grid (see module docstring for shapes)."""

    tokens: dict
    pooled: torch.Tensor
    cls_attn: torch.Tensor
    valid: torch.Tensor
    rows: Union[torch.Tensor, None] = None
    cls: Union[dict, None] = None
    visible: Union[tuple, None] = None

    def token_targets(self, layer: int, b: int, idx: torch.Tensor) -> torch.Tensor:
        """(k, C) targets of clip ``b`` at grid indices ``idx`` (k,) for teacher block ``layer``."""
        rows = idx if self.rows is None else self.rows[b, idx]
        return self.tokens[layer][b, rows]


def grid_index_map(src_hw: tuple[int, int], dst_hw: tuple[int, int], device=None) -> torch.Tensor:
    """For a destination (student) grid of ``dst_hw`` cells, the flat index into a source (teacher) grid of
    ``src_hw`` cells covering the same image: cell (i, j) -> (floor((i + .5) * sh / dh), floor((j + .5) * sw / dw)).

    Returns (dh * dw,) int64; the identity when the grids are equal.
    """
    (sh, sw), (dh, dw) = src_hw, dst_hw
    rows = ((torch.arange(dh, device=device) + 0.5) * sh / dh).floor().long().clamp_(max=sh - 1)
    cols = ((torch.arange(dw, device=device) + 0.5) * sw / dw).floor().long().clamp_(max=sw - 1)
    return (rows[:, None] * sw + cols[None, :]).reshape(-1)


def map_to_student_grid(x: torch.Tensor, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> torch.Tensor:
    """(B, T, sh*sw, ...) per-frame teacher-grid values -> (B, T*dh*dw, ...) on the student grid."""
    idx = grid_index_map(src_hw, dst_hw, x.device)
    out = x.index_select(2, idx)
    return out.flatten(1, 2)


def _renormalize(video: torch.Tensor, src: str, dst_mean, dst_std) -> torch.Tensor:
    mean, std = _MEANS[src]
    shape = (1, -1, 1, 1)
    x = video * torch.tensor(std, device=video.device).view(shape) + torch.tensor(mean, device=video.device).view(shape)
    return (x - torch.tensor(dst_mean, device=video.device).view(shape)) / torch.tensor(dst_std, device=video.device).view(shape)


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def resize_frames(video: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, C, T, *size): every frame resized bicubically (float32); unchanged at that size."""
    B, C, T, H, W = video.shape
    if (H, W) == tuple(size):
        return video
    frames = F.interpolate(video.transpose(1, 2).reshape(B * T, C, H, W).float(), size=size, mode="bicubic",
                           align_corners=False)
    return frames.view(B, T, C, *size).transpose(1, 2)


class _FrozenTeacher(nn.Module):
    def freeze(self) -> "_FrozenTeacher":
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True):  # a teacher never leaves eval mode
        return super().train(False)

    def input_size(self, hs: int, ws: int) -> tuple[int, int]:
        """The teacher's frame size for a student grid of ``hs x ws`` patches: the same grid at the teacher's patch
        size, or the fixed ``image_size``."""
        return (hs * self.patch, ws * self.patch) if not self.image_size else (self.image_size, self.image_size)


class OpenCLIPTeacher(_FrozenTeacher):
    """An open_clip vision tower applied frame by frame.

    Args:
        visual: an ``open_clip`` ``VisionTransformer`` (standard ``ResidualAttentionBlock`` blocks, 'tok' or
            'avg' pooling).
        budget: tokens the teacher sees per clip (group-dynamic selector over its own patch embeddings);
            0 = all. Dropped tokens are masked out of every attention (same result as removing them).
        image_size: teacher input size; 0 matches the student grid (h * patch_t).
        input_norm: normalisation of incoming videos ("imagenet" or "clip"); frames are re-normalised to the
            tower's own mean/std.
        bf16: autocast the teacher to bf16 on CUDA.
    """

    def __init__(self, visual: nn.Module, budget: int = 2048, image_size: int = 0, input_norm: str = "imagenet",
                 bf16: bool = True):
        super().__init__()
        blocks = visual.transformer.resblocks
        if getattr(visual, "attn_pool", None) is not None or visual.pool_type not in ("tok", "avg"):
            raise ValueError("OpenCLIPTeacher supports towers with 'tok' or 'avg' pooling (no attentional pool)")
        if not all(isinstance(getattr(b, "attn", None), nn.MultiheadAttention) for b in blocks):
            raise ValueError("OpenCLIPTeacher needs open_clip ResidualAttentionBlock blocks (nn.MultiheadAttention)")
        self.visual = visual
        self.budget, self.image_size, self.input_norm, self.bf16 = budget, image_size, input_norm, bf16
        self.patch = visual.conv1.kernel_size[0]
        self.depth = len(blocks)
        self.dim = visual.proj.shape[1] if visual.proj is not None else visual.conv1.out_channels
        self.mean = tuple(getattr(visual, "image_mean", None) or _MEANS["clip"][0])
        self.std = tuple(getattr(visual, "image_std", None) or _MEANS["clip"][1])
        self.freeze()

    @classmethod
    def create(cls, name: str = "", pretrained: str = "", weights: str = "", vision_cfg: dict | None = None,
               embed_dim: int = 512, **kwargs) -> "OpenCLIPTeacher":
        """Build from an open_clip model ``name`` (+ ``pretrained`` tag, downloaded by open_clip, or a local
        ``weights`` file of the full CLIP or of the visual tower alone), or from a ``vision_cfg`` dict
        (``open_clip.CLIPVisionCfg`` fields, randomly initialised unless ``weights`` is given)."""
        import open_clip
        from open_clip.model import CLIPVisionCfg, _build_vision_tower

        if vision_cfg:
            visual = _build_vision_tower(embed_dim, CLIPVisionCfg(**vision_cfg))
            if weights:
                _load_visual(visual, weights)
        elif name:
            if pretrained and weights:
                raise ValueError("give either teacher.pretrained (an open_clip tag) or teacher.weights, not both")
            visual = open_clip.create_model(name, pretrained=pretrained or weights or None).visual
        else:
            raise ValueError("an open_clip teacher needs teacher.name or teacher.vision_cfg")
        return cls(visual, **kwargs)

    def _pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        pos = self.visual.positional_embedding  # (1 + g*g, W)
        n = pos.shape[0] - 1
        g = int(math.isqrt(n))
        if (gh, gw) == (g, g):
            return pos
        grid = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, -1).to(pos.dtype)])

    def _block(self, blk, x: torch.Tensor, mask, want_attn: bool):
        attn: nn.MultiheadAttention = blk.attn
        y = blk.ln_1(x)
        n, length, d = y.shape
        heads = attn.num_heads
        q, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).view(n, length, 3, heads, d // heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + blk.ls_1(attn.out_proj(o.transpose(1, 2).reshape(n, length, d)))
        x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
        cls = None
        if want_attn:
            s = (q[:, :, :1].float() @ k.float().transpose(-1, -2)) / math.sqrt(d // heads)  # (n, h, 1, len)
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf"))
            cls = s.softmax(-1).mean(1)[:, 0, 1:]  # (n, len - 1), cls -> patches
        return x, cls

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        x = self.visual.ln_post(x)
        return x @ self.visual.proj if self.visual.proj is not None else x

    @torch.no_grad()
    def forward(self, video: torch.Tensor, student_grid: tuple[int, int, int], layers: Sequence[int]) -> TeacherOutput:
        """video (B, 3, T, H, W) normalised with ``input_norm``; student_grid (T, h, w); layers: teacher blocks."""
        B, _, T, H, W = video.shape
        _, hs, ws = student_grid
        size = self.input_size(hs, ws)
        frames = video.transpose(1, 2).reshape(B * T, 3, H, W).float()
        frames = _renormalize(frames, self.input_norm, self.mean, self.std)
        if (H, W) != size:
            frames = F.interpolate(frames, size=size, mode="bicubic", align_corners=False)
        with _autocast(video.device, self.bf16):
            v = self.visual
            emb = v.conv1(frames.to(v.conv1.weight.dtype))  # (BT, D, gh, gw)
            gh, gw = emb.shape[-2:]
            L = gh * gw
            emb = emb.flatten(2).transpose(1, 2)  # (BT, L, D)
            valid = torch.ones(B, T * L, dtype=torch.bool, device=video.device)
            mask, seen = None, T * L
            if self.budget and self.budget < T * L:
                keep = select_tokens(emb.detach().float().view(B, T, L, -1), self.budget)
                seen = keep.shape[1]
                valid = torch.zeros_like(valid).scatter_(1, keep, True)
                key = torch.cat([valid.new_ones(B * T, 1), valid.view(B * T, L)], dim=1)
                mask = key[:, None, None, :]  # (BT, 1, 1, 1 + L): attend to kept keys only
            cls = v.class_embedding.view(1, 1, -1).expand(B * T, 1, -1).to(emb.dtype)
            x = v.ln_pre(torch.cat([cls, emb], 1) + self._pos_embed(gh, gw).to(emb.dtype))
            wanted = set(layers)
            feats, attn = {}, None
            for i, blk in enumerate(v.transformer.resblocks):
                x, a = self._block(blk, x, mask, want_attn=i == self.depth - 1)
                if i in wanted:
                    feats[i] = F.normalize(self._project(x[:, 1:]).float(), dim=-1).view(B, T, L, -1)
                if a is not None:
                    attn = a
            if v.pool_type == "tok":
                pooled = self._project(x[:, 0])
            else:
                w = valid.view(B * T, L, 1).to(x.dtype)
                pooled = self._project((x[:, 1:] * w).sum(1) / w.sum(1).clamp_min(1))
        pooled = F.normalize(F.normalize(pooled.float(), dim=-1).view(B, T, -1).mean(1), dim=-1)
        src, dst = (gh, gw), (hs, ws)
        tokens = {i: map_to_student_grid(f, src, dst) for i, f in feats.items()}
        attn = attn.float().view(B, T, L) * valid.view(B, T, L)
        attn = attn / attn.sum(-1, keepdim=True).clamp_min(1e-12)
        return TeacherOutput(tokens, pooled, map_to_student_grid(attn, src, dst),
                             map_to_student_grid(valid.view(B, T, L), src, dst),
                             visible=(seen,) * B if src == dst else None)


def _load_visual(visual: nn.Module, path: str) -> None:
    state = read_state_dict(path)
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    visual.load_state_dict(state, strict=True)


class FluxViTTeacher(_FrozenTeacher):
    """A FluxViT video teacher: it selects ``budget`` tokens itself (group-dynamic selector) and returns its
    block outputs (no final norm exists; features are L2-normalised), its pooled feature, and its last
    block's cls-to-patch attention.

    Args:
        model: a FluxViT (e.g. ``load_model(path)`` of a larger checkpoint), depth >= 2.
        budget: tokens the teacher keeps per clip (0 = all).
        image_size: 0 matches the student grid; a teacher of another patch size sees frames resized to
            h * patch_t (grids then coincide).
    """

    def __init__(self, model: FluxViT, budget: int = 2048, image_size: int = 0, bf16: bool = True, **_):
        super().__init__()
        if len(model.blocks) < 2:
            raise ValueError("a FluxViT teacher needs depth >= 2")
        self.model, self.budget, self.image_size, self.bf16 = model, budget, image_size, bf16
        self.patch = model.config.patch_size
        self.depth = len(model.blocks)
        self.dim = model.config.embed_dim
        self.pooled_dim = model.config.clip_embed_dim
        self.freeze()

    @classmethod
    def create(cls, weights: str = "", name: str = "", **kwargs) -> "FluxViTTeacher":
        """From a ``save_model`` safetensors file, or a registered name (random init, for tests)."""
        model = load_model(weights) if weights else create_model(name, num_classes=0)
        return cls(model, **kwargs)

    @torch.no_grad()
    def forward(self, video: torch.Tensor, student_grid: tuple[int, int, int], layers: Sequence[int]) -> TeacherOutput:
        """Same contract as ``OpenCLIPTeacher.forward``."""
        B, _, T, H, W = video.shape
        _, hs, ws = student_grid
        size = self.input_size(hs, ws)
        video = resize_frames(video, size)
        gh, gw = size[0] // self.patch, size[1] // self.patch
        L = gh * gw
        last = self.depth - 1
        with _autocast(video.device, self.bf16):
            f = self.model.forward_features(video, num_tokens=self.budget or None,
                                            layers=sorted(set(layers) | {last - 1}))
        valid = torch.zeros(B, T * L, dtype=torch.bool, device=video.device)
        tokens = {}
        for layer in layers:
            dense = video.new_zeros(B, T * L, self.dim, dtype=torch.float32)
            for b, (rows, keep) in enumerate(zip(f.patch_tokens(f.layers[layer]), f.keep)):
                dense[b, keep] = F.normalize(rows.float(), dim=-1)
            tokens[layer] = dense
        attn = video.new_zeros(B, T * L, dtype=torch.float32)
        blk = self.model.blocks[last]
        for b, (seq, keep) in enumerate(zip(f.split(f.layers[last - 1]), f.keep)):
            valid[b, keep] = True
            y = blk.norm1(seq)
            q, k, _ = blk.attn.qkv(y).chunk(3, dim=-1)
            q, k = blk.attn.q_norm(q), blk.attn.k_norm(k)
            h, d = blk.attn.num_heads, blk.attn.head_dim
            s = (q[:1].view(1, h, d).transpose(0, 1).float() @ k.view(-1, h, d).permute(1, 2, 0).float()) / math.sqrt(d)
            attn[b, keep] = s.softmax(-1).mean(0)[0, 1:]
        # Per frame, like the image teacher: each frame's attention sums to 1 over its kept tokens.
        attn = attn.view(B, T, L)
        attn = attn / attn.sum(-1, keepdim=True).clamp_min(1e-12)
        pooled = F.normalize(f.pooled.float(), dim=-1)
        src, dst = (gh, gw), (hs, ws)
        tokens = {i: map_to_student_grid(t.view(B, T, L, -1), src, dst) for i, t in tokens.items()}
        return TeacherOutput(tokens, pooled, map_to_student_grid(attn, src, dst),
                             map_to_student_grid(valid.view(B, T, L), src, dst),
                             visible=tuple(n - 1 for n in f.lengths) if src == dst else None)


class InternVideo2Teacher(_FrozenTeacher):
    """The paper's teacher: an InternVideo2 of the zoo (the official 1B model with its stage-2 weights).

    The clip runs as FluxViT's double mask does it: the teacher keeps ``budget`` tokens of each clip with the
    group-dynamic selector on its own patch embeddings, all clips of a call in one packed pass (flash-attn on GPU).
    Targets are what the official teacher returns in the distillation path: the hidden states of the requested
    blocks (cls included) and the projector output, L2-normalised, and the projector's attention from its query
    (the mean token) to the patch tokens, from which the student's visible tokens are drawn.

    Args:
        model: an ``InternVideo2``.
        budget: tokens the teacher keeps per clip (0 = all).
        image_size: 0 feeds the student's clip (resized bicubic only when the teacher's patch differs);
            otherwise frames are resized to ``image_size`` and the grids are mapped.
        input_norm: normalisation of incoming videos; re-normalised to ImageNet mean/std (InternVideo2's input).
        bf16: autocast the teacher to bf16 on CUDA.
    """

    def __init__(self, model: InternVideo2, budget: int = 2048, image_size: int = 0, input_norm: str = "imagenet",
                 bf16: bool = True):
        super().__init__()
        if model.config.tubelet_size != 1:
            raise ValueError("the InternVideo2 teacher needs tubelet_size 1 (one token grid per student frame)")
        self.model, self.budget, self.image_size, self.input_norm, self.bf16 = model, budget, image_size, input_norm, bf16
        self.patch = model.config.patch_size
        self.depth = len(model.blocks)
        self.dim = model.config.embed_dim
        self.pooled_dim = model.config.clip_embed_dim
        self.freeze()

    @classmethod
    def create(cls, name: str = "", weights: str = "", overrides: dict | None = None, **kwargs) -> "InternVideo2Teacher":
        """The zoo model ``name`` (default ``internvideo2_1b_patch14``) with the official ``weights`` loaded
        strictly (built on the meta device and filled from the file: no 4 GB random init first), or, with
        ``overrides`` and no weights, a randomly initialised model of that shape (tests, demos, benchmarks)."""
        name = name if name and name.startswith("internvideo2") else "internvideo2_1b_patch14"
        random_init = bool(overrides) and not weights
        overrides = {"drop_path_rate": 0.0, **(overrides or {})}  # inert in eval mode; zero says so
        if weights:
            with torch.device("meta"):
                model = create_model(name, **overrides)
            report = load_official_checkpoint(model, weights)
            log.info("InternVideo2 teacher %s: %d tensors from %s (%d resized, %d dropped)", name, len(report.loaded),
                     weights, len(report.resized), len(report.dropped))
        elif random_init:
            model = create_model(name, **overrides)
            log.info("InternVideo2 teacher %s: randomly initialised with %s (no weights)", name, overrides)
        else:
            raise ValueError(f"teacher.weights is required for the {name} teacher: download {INTERNVIDEO2_1B_FILE} "
                             "and pass --set teacher.weights=PATH")
        return cls(model, **kwargs)

    @torch.no_grad()
    def forward(self, video: torch.Tensor, student_grid: tuple[int, int, int], layers: Sequence[int]) -> TeacherOutput:
        """video (B, 3, T, H, W) normalised with ``input_norm``; student_grid (T, h, w); layers: teacher blocks."""
        B, _, T, H, W = video.shape
        _, hs, ws = student_grid
        size = self.input_size(hs, ws)
        if self.input_norm != "imagenet":
            frames = video.transpose(1, 2).reshape(B * T, 3, H, W).float()
            frames = _renormalize(frames, self.input_norm, *_MEANS["imagenet"])
            video = frames.view(B, T, 3, H, W).transpose(1, 2)
        video = resize_frames(video, size)
        gh, gw = size[0] // self.patch, size[1] // self.patch
        L = gh * gw
        layers = sorted(set(layers))
        with _autocast(video.device, self.bf16):
            f = self.model.forward_packed(video, layers, num_tokens=self.budget or None)
        n = f.lengths[0]  # every clip of the call has the same grid and budget: equal lengths (host ints)
        tokens, cls = {}, {}
        for layer in layers:
            h = f.hidden[layer].float()
            tokens[layer] = (h / h.norm(dim=-1, keepdim=True)).view(B, n, -1)
            cls[layer] = tokens[layer][:, 0]
        pooled = f.pooled.float()
        pooled = pooled / pooled.norm(dim=-1, keepdim=True)
        keep = torch.stack(f.keep)  # (B, n - 1) ascending grid indices
        valid = torch.zeros(B, T * L, dtype=torch.bool, device=video.device).scatter_(1, keep, True)
        rows = torch.zeros(B, T * L, dtype=torch.long, device=video.device)
        rows.scatter_(1, keep, torch.arange(1, n, device=video.device).expand(B, -1))
        attn = torch.zeros(B, T * L, dtype=torch.float32, device=video.device)
        attn.scatter_(1, keep, f.attn.float().view(B, n)[:, 1:])
        src, dst = (gh, gw), (hs, ws)
        if src != dst:  # fixed teacher image_size: map the student's grid onto the teacher's
            rows = map_to_student_grid(rows.view(B, T, L), src, dst)
            return TeacherOutput(tokens, pooled, map_to_student_grid(attn.view(B, T, L), src, dst),
                                 map_to_student_grid(valid.view(B, T, L), src, dst), rows, cls)
        return TeacherOutput(tokens, pooled, attn, valid, rows, cls, visible=(n - 1,) * B)
