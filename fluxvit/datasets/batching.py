"""Batching: examples to the data contract's batch, and the batch buffer decoding writes into."""
from __future__ import annotations

import torch

__all__ = ["batch_buffer", "collate_videos"]


def collate_videos(examples: list[dict], video: torch.Tensor | None = None) -> dict:
    """Batch examples: ``video`` stacks to ``(B, 3, T, H, W)`` (or ``(B, V, 3, T, H, W)``) when all shapes agree,
    otherwise stays a list of ``B`` tensors (the packed input the model accepts); ``caption`` list[str],
    ``label`` LongTensor ``(B,)`` (-1 = none), ``key`` list[str]. ``video``: the batch tensor the examples were
    already written into (no stacking)."""
    videos = [e["video"] for e in examples]
    if video is None:
        same = all(v.shape == videos[0].shape for v in videos)
        video = torch.stack(videos) if same else videos
    return {
        "video": video,
        "caption": [e["caption"] for e in examples],
        "label": torch.tensor([e["label"] for e in examples], dtype=torch.long),
        "key": [e["key"] for e in examples],
    }


def batch_buffer(shape: tuple[int, ...], in_worker: bool) -> torch.Tensor:
    """An uninitialised float32 batch tensor; in a DataLoader worker it lives in shared memory (as
    ``default_collate`` does), so handing it to the main process copies nothing."""
    out = torch.empty(shape)
    return out.share_memory_() if in_worker else out


