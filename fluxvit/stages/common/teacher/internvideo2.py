"""The paper's teacher: InternVideo2-1B (or a small random one for tests and demos)."""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from fluxvit.datasets.transforms import NORMALIZE as _MEANS
from fluxvit.models import InternVideo2, create_model, load_official_checkpoint

from .base import TeacherOutput, _autocast, _FrozenTeacher, _renormalize, map_to_student_grid

__all__ = ["INTERNVIDEO2_1B_FILE", "InternVideo2Teacher"]

log = logging.getLogger("fluxvit.train")

# The paper's teacher: InternVideo2-1B after its stage 2 (the official ``teacher_internvideo2_stage2_1B`` factory).
INTERNVIDEO2_1B_FILE = ("InternVideo2-stage2_1b-224p-f4.pt from "
                        "https://huggingface.co/OpenGVLab/InternVideo2-Stage2_1B-224p-f4")


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
        if self.input_norm != "imagenet":
            frames = video.transpose(1, 2).reshape(B * T, 3, H, W).float()
            frames = _renormalize(frames, self.input_norm, *_MEANS["imagenet"])
            video = frames.view(B, T, 3, H, W).transpose(1, 2)
        video, gh, gw = self.resized(video, student_grid)
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
