"""Frame-index sampling: TSN-style sparse random (training), segment-middle and multi-clip offsets (evaluation).

All functions take the number of frames in the video ``n`` and the number of frames wanted ``num_frames`` and
return a list of ``num_frames`` frame indices in ``[0, n)``, non-decreasing. They work for any ``num_frames``
including more frames than the video has (frames are then repeated) and for very short videos.
"""
from __future__ import annotations

import random

__all__ = ["sample_tsn_indices", "sample_middle_indices", "multi_clip_indices"]


def _check(n: int, num_frames: int) -> None:
    if n < 1:
        raise ValueError(f"video has no frames (n={n})")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")


def _segment_indices(n: int, num_frames: int, offsets: list[float]) -> list[int]:
    """Split ``[0, n)`` into ``num_frames`` equal segments; take position ``offsets[i]`` in ``[0, 1)`` of segment i."""
    seg = n / num_frames
    return [min(n - 1, int(seg * i + seg * o)) for i, o in enumerate(offsets)]


def sample_tsn_indices(n: int, num_frames: int, rng: random.Random | None = None) -> list[int]:
    """TSN sparse sampling: one uniformly random frame per equal segment (training).

    Args:
        n: frames in the video.
        num_frames: frames wanted ``T``.
        rng: source of randomness (module RNG when ``None``).

    Returns:
        ``T`` non-decreasing indices in ``[0, n)``; when ``T > n`` each frame appears about ``T / n`` times.
    """
    _check(n, num_frames)
    rng = rng or random
    return _segment_indices(n, num_frames, [rng.random() for _ in range(num_frames)])


def sample_middle_indices(n: int, num_frames: int) -> list[int]:
    """Segment-middle sampling: the middle frame of each of ``num_frames`` equal segments (evaluation).

    Returns ``num_frames`` non-decreasing indices in ``[0, n)``; deterministic.
    """
    _check(n, num_frames)
    return _segment_indices(n, num_frames, [0.5] * num_frames)


def multi_clip_indices(n: int, num_frames: int, num_clips: int) -> list[list[int]]:
    """Multi-clip evaluation views, the release's test mode (``_get_seq_frames`` of its Kinetics dataset).

    The video is cut into ``num_frames`` segments of ``(n - 1) / num_frames`` frames; temporal clip ``k`` of
    ``num_clips`` takes, in segment ``i``, the frame ``round(seg * i) + int(seg / (num_clips + 1) * (k + 1))``,
    i.e. the point at fraction ``(k + 1) / (num_clips + 1)`` of every segment (4 clips: 1/5, 2/5, 3/5, 4/5; the
    "4 temporal clips" of FluxViT paper, arXiv 2503.14237). One clip takes the middle of every segment.

    Returns:
        ``num_clips`` lists of ``num_frames`` non-decreasing indices in ``[0, n)`` each.
    """
    _check(n, num_frames)
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    seg = max(0.0, (n - 1) / num_frames)
    step = seg / (num_clips + 1)
    return [[min(n - 1, round(seg * i) + int(step * (k + 1))) for i in range(num_frames)] for k in range(num_clips)]
