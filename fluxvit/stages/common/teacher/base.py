"""What every teacher adapter shares: the targets on the student grid (``TeacherOutput``), grid mapping,
re-normalisation and resizing of frames, and the frozen eval-mode base class."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from fluxvit.datasets.transforms import NORMALIZE as _MEANS

__all__ = ["TeacherOutput", "grid_index_map", "map_to_student_grid", "resize_frames"]


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

    def resized(self, video: torch.Tensor, student_grid: tuple[int, int, int]) -> tuple[torch.Tensor, int, int]:
        """The student's clip at the teacher's frame size: ``video`` (B, 3, T, H, W) -> (B, 3, T, H', W') with
        (H', W') = ``input_size`` of the student grid (T, h, w), and the teacher's patch grid (gh, gw) on it."""
        size = self.input_size(*student_grid[1:])
        return resize_frames(video, size), size[0] // self.patch, size[1] // self.patch
