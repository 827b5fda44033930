"""UMT's image teachers: any open_clip ``VisionTransformer`` applied per frame.

Its blocks run through this module's own attention step rather than open_clip's ``forward_intermediates``: the
teacher keeps only its Flux budget of tokens (a key mask the library forward has no argument for) and the
visible-token rule needs the last block's cls-to-patch attention weights, which the library forward does not
return."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fluxvit.datasets.transforms import NORMALIZE as _MEANS
from fluxvit.models import read_state_dict, select_tokens

from .base import TeacherOutput, _autocast, _FrozenTeacher, _renormalize, map_to_student_grid

__all__ = ["OpenCLIPTeacher"]


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
