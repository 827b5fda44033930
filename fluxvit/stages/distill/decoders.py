"""Student-side heads of stage 1: decoders from student features to teacher features, and the student-side
position embedding added before them (InternVideo2's distillation student: learnable 3-D table; UMT's: a fixed
1-D sinusoid table and linear decoders)."""
from __future__ import annotations

import math

import torch
from torch import nn

from fluxvit.models.pos_embed import resize_pos_grid, sincos_3d

__all__ = ["DecoderPosEmbed", "FeatureDecoder", "FixedDecoderPosEmbed", "sinusoid_table"]


class FeatureDecoder(nn.Module):
    """Student feature -> L2-normalised teacher-space feature. (..., in_dim) -> (..., out_dim).

    ``kind="mlp"``: Linear(in, in), GELU, Linear(in, out), LayerNorm, L2 (InternVideo2's ``MLP_Decoder``);
    ``kind="linear"``: Linear(in, out), LayerNorm, L2 (UMT's ``Linear_Decoder``). Xavier-uniform weights, zero
    biases, as released.
    """

    def __init__(self, in_dim: int, out_dim: int, kind: str = "mlp"):
        super().__init__()
        if kind == "mlp":
            self.head = nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim))
        elif kind == "linear":
            self.head = nn.Linear(in_dim, out_dim)
        else:
            raise ValueError(f"loss.decoder must be 'mlp' or 'linear', got {kind!r}")
        self.norm = nn.LayerNorm(out_dim, eps=1e-5)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.head(x))
        return x / x.norm(dim=-1, keepdim=True)


class DecoderPosEmbed(nn.Module):
    """Learnable student-side position embedding for the decoders (InternVideo2's ``clip_pos_embed``).

    Stored for the student's pos-embed grid (T0, H0, W0) plus a cls row, initialised with the 3-D sin-cos table
    (cls row zero); ``table(grid)`` resizes it to a clip's (T, h, w) grid (linear in time, bicubic in space):
    (1 + T*h*w, dim), cls row first.
    """

    def __init__(self, dim: int, grid: tuple):
        super().__init__()
        self.grid = tuple(grid)
        self.weight = nn.Parameter(torch.zeros(1 + math.prod(self.grid), dim))
        with torch.no_grad():
            self.weight[1:].copy_(sincos_3d(dim, *self.grid))

    def table(self, grid: tuple) -> torch.Tensor:
        if tuple(grid) == self.grid:
            return self.weight
        D = self.weight.shape[-1]
        resized = resize_pos_grid(self.weight[1:].reshape(*self.grid, D), *grid).reshape(-1, D)
        return torch.cat([self.weight[:1], resized], dim=0)


def sinusoid_table(n: int, dim: int) -> torch.Tensor:
    """UMT's ``get_sinusoid_encoding_table(n, dim)``: (n, dim) float32, position p and channel j at angle
    ``p / 10000 ** (2 * (j // 2) / dim)``, sine on even channels and cosine on odd ones."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)[None, :]
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    table = torch.where(j.long() % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float()


class FixedDecoderPosEmbed(nn.Module):
    """UMT's student-side decoder position table (``clip_pos_embed`` of ``modeling_pretrain_umt.py``): a fixed,
    not learnable, 1-D sinusoid over a clip's flattened (t, y, x) patch index, computed for each clip's grid.
    ``table(grid)`` -> (1 + T*h*w, dim), cls row first and zero (UMT's student has no cls token). No parameters."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self._tables: dict = {}  # per grid, on the CPU

    def table(self, grid: tuple) -> torch.Tensor:
        grid = tuple(grid)
        if grid not in self._tables:
            rows = sinusoid_table(math.prod(grid), self.dim)
            self._tables[grid] = torch.cat([rows.new_zeros(1, self.dim), rows], dim=0)
        return self._tables[grid]
