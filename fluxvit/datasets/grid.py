"""Flux: the flexible sampling grid of frame counts and resolutions (FluxViT paper, arXiv 2503.14237).

Flux draws a frame count ``F`` and a square resolution ``R`` at random and keeps only pairs whose token count
``F * (R // patch_size) ** 2`` lies inside a threshold ``(lo, hi)``. The release draws one ``(F, R)`` per per-GPU
batch; packed batches may draw one per sample (``per_sample_grid`` in :class:`~fluxvit.datasets.DataConfig`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Iterable, Sequence

__all__ = ["FluxGrid"]


def _as_tuple(values: Iterable[int]) -> tuple[int, ...]:
    out = tuple(int(v) for v in values)
    if not out:
        raise ValueError("FluxGrid needs at least one frame count and one resolution")
    return out


@dataclass(frozen=True)
class FluxGrid:
    """A set of frame counts and resolutions filtered by a token threshold.

    Args:
        frames: candidate frame counts ``F`` (a ``range`` or list).
        resolutions: candidate square resolutions ``R`` in pixels (multiples of ``patch_size`` in practice).
        threshold: ``(lo, hi)``; a pair is valid when ``lo <= F * (R // patch_size) ** 2 <= hi``.
        patch_size: spatial patch size (14 for FluxViT).
        pairs: an explicit list of ``(F, R)`` pairs (see :meth:`from_pairs`); when given, exactly these are valid.

    ``sample(rng)`` draws uniformly over :meth:`valid_pairs`, so every valid pair has probability ``1 / len(pairs)``.
    """

    frames: Sequence[int] = field(default=tuple(range(4, 25, 2)))
    resolutions: Sequence[int] = field(default=tuple(range(168, 253, 28)))
    threshold: tuple[int, int] = (2048, 4096)
    patch_size: int = 14
    pairs: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "pairs", tuple(sorted({(int(f), int(r)) for f, r in self.pairs})))
        object.__setattr__(self, "frames", _as_tuple(self.frames))
        object.__setattr__(self, "resolutions", _as_tuple(self.resolutions))
        lo, hi = (int(v) for v in self.threshold)
        if lo > hi:
            raise ValueError(f"FluxGrid threshold lo > hi: {self.threshold}")
        object.__setattr__(self, "threshold", (lo, hi))
        if not self.valid_pairs():
            raise ValueError(f"FluxGrid has no (frames, resolution) pair inside threshold {self.threshold}: {self}")

    def tokens(self, frames: int, resolution: int) -> int:
        """Number of patch tokens of a ``(frames, resolution)`` clip (cls excluded): ``F * (R // p) ** 2``."""
        return int(frames) * (int(resolution) // self.patch_size) ** 2

    def valid_pairs(self) -> list[tuple[int, int]]:
        """All ``(F, R)`` pairs whose token count lies inside ``threshold`` (inclusive), sorted."""
        if self.pairs:
            return list(self.pairs)
        lo, hi = self.threshold
        return [(f, r) for f in sorted(set(self.frames)) for r in sorted(set(self.resolutions))
                if lo <= self.tokens(f, r) <= hi]

    def sample(self, rng: random.Random | None = None) -> tuple[int, int]:
        """Draw one valid ``(F, R)`` uniformly; ``rng`` is a :class:`random.Random` (module RNG when ``None``)."""
        pairs = self.valid_pairs()
        return (rng or random).choice(pairs)

    @classmethod
    def from_pairs(cls, pairs, patch_size: int = 14) -> "FluxGrid":
        """A grid of exactly the given ``[(F, R), ...]`` pairs (a stage's ``data.grid``), drawn uniformly."""
        pairs = [(int(f), int(r)) for f, r in pairs]
        if not pairs:
            raise ValueError("FluxGrid.from_pairs needs at least one (frames, resolution) pair")
        tokens = [f * (r // patch_size) ** 2 for f, r in pairs]
        return cls(frames=[f for f, _ in pairs], resolutions=[r for _, r in pairs],
                   threshold=(min(tokens), max(tokens)), patch_size=patch_size, pairs=tuple(pairs))

    @classmethod
    def preset(cls, name: str) -> "FluxGrid":
        """The grids of the three stages (FluxViT paper, arXiv 2503.14237): ``distill``, ``videotext``, ``finetune``."""
        presets = {
            # The paper's (start, end, stride) bounds are read as the release reads its --range_* arguments, with
            # Python's range() (end excluded; run_flexible_finetune.py:101-106, 339-340), in every stage.
            # Stage 1: the paper's grid, frames 4..24, resolution 168..252; the threshold assumed equal to stage 2's.
            "distill": dict(frames=range(4, 26, 2), resolutions=range(168, 280, 28), threshold=(2048, 4096)),
            # Stage 2: Table 16's (4, 26, 2) / (168, 280, 28): frames 4..24, resolution 168..252.
            "videotext": dict(frames=range(4, 26, 2), resolutions=range(168, 280, 28), threshold=(2048, 4096)),
            # The public finetuning release: range(6, 26, 2) / range(112, 364, 28) (its argparse defaults).
            "finetune": dict(frames=range(6, 26, 2), resolutions=range(112, 364, 28), threshold=(2048, 6144)),
        }
        if name not in presets:
            raise KeyError(f"unknown FluxGrid preset {name!r}; choose from {sorted(presets)}")
        return cls(**presets[name])
