"""Global positional encoding (the "G" of GLPE): 3-D sin-cos initialisation and run-time resizing."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["resize_pos_grid", "sincos_1d", "sincos_3d"]


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Sin-cos encoding of positions (M,) -> (M, dim): dim/2 sines then dim/2 cosines, base 10000."""
    if dim % 2:
        raise ValueError(f"sin-cos encoding needs an even dim, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = positions.to(torch.float64).reshape(-1, 1) * omega
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_3d(dim: int, frames: int, height: int, width: int) -> torch.Tensor:
    """3-D sin-cos table (frames * height * width, dim) in (t, h, w) token order, float32.

    The first dim/4 channels encode time; the other 3*dim/4 encode space, the first half of those the
    column (w) index and the second half the row (h) index, as in the released initialisation.
    """
    if dim % 16:
        raise ValueError(f"3-D sin-cos encoding needs embed_dim divisible by 16, got {dim}")
    d_t, d_s = dim // 4, dim // 4 * 3
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    spatial = torch.cat([sincos_1d(d_s // 2, cols.reshape(-1)), sincos_1d(d_s // 2, rows.reshape(-1))], dim=1)
    temporal = sincos_1d(d_t, torch.arange(frames))
    table = torch.cat(
        [temporal[:, None, :].expand(frames, height * width, d_t),
         spatial[None, :, :].expand(frames, height * width, d_s)], dim=-1,
    )
    return table.reshape(-1, dim).float()


def resize_pos_grid(grid: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
    """Resize a positional grid (T0, H0, W0, dim) to (frames, height, width, dim).

    Linear interpolation along time first (align_corners False), then bicubic in space (align_corners
    False), each only when that part of the shape changes, on the grid's own device and dtype.
    """
    T0, H0, W0, D = grid.shape
    if frames != T0:
        g = grid.permute(1, 2, 3, 0).reshape(H0 * W0, D, T0)
        g = F.interpolate(g, size=frames, mode="linear", align_corners=False)
        grid = g.reshape(H0, W0, D, frames).permute(3, 0, 1, 2)
    if (height, width) != (H0, W0):
        g = grid.permute(0, 3, 1, 2)  # (T, D, H0, W0)
        g = F.interpolate(g, size=(height, width), mode="bicubic", align_corners=False)
        grid = g.permute(0, 2, 3, 1)
    return grid
