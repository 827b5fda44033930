"""A FluxViT of the zoo as a video teacher."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from fluxvit.models import FluxViT, create_model, load_model

from .base import TeacherOutput, _autocast, _FrozenTeacher, map_to_student_grid

__all__ = ["FluxViTTeacher"]


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
        B, _, T = video.shape[:3]
        _, hs, ws = student_grid
        video, gh, gw = self.resized(video, student_grid)
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
