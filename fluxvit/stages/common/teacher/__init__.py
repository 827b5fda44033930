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

from dataclasses import dataclass, field
from torch import nn

from .base import TeacherOutput, grid_index_map, map_to_student_grid, resize_frames
from .fluxvit import FluxViTTeacher
from .internvideo2 import INTERNVIDEO2_1B_FILE, InternVideo2Teacher
from .openclip import OpenCLIPTeacher

__all__ = ["FluxViTTeacher", "INTERNVIDEO2_1B_FILE", "InternVideo2Teacher", "OpenCLIPTeacher", "TeacherConfig",
           "TeacherOutput", "build_teacher", "grid_index_map", "map_to_student_grid", "resize_frames"]


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
