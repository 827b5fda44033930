"""The data pipeline's typed config."""
from __future__ import annotations

from dataclasses import dataclass

from .decoders import BACKENDS
from .grid import FluxGrid
from .transforms import NORMALIZE

__all__ = ["DataConfig"]


@dataclass
class DataConfig:
    """Everything :func:`~fluxvit.datasets.build_video_loader` needs.

    Attributes:
        shards: shard spec ``SOURCE[::WEIGHT][::noflip];...`` with brace ranges (see :mod:`fluxvit.datasets.shards`).
        num_frames: frames per clip ``T`` when no grid is used.
        img_size: square output side ``H = W`` when no grid is used.
        batch_size: clips per batch per rank ``B``.
        num_workers: DataLoader worker processes per rank (0 = decode in the main process).
        seed: base seed; shard order, sample shuffle, frame sampling, crops and grid draws derive from
            ``(seed, epoch, rank, worker)``.
        decoder: ``"decord"`` (default), ``"pyav"`` or ``"torchcodec"``; a missing one falls back to PyAV.
        decoder_threads: threads per decode (1 keeps one worker on one core).
        normalize: ``"imagenet"`` or ``"clip"`` mean/std.
        train: training mode (shuffles, TSN sampling, random crops, drops the last partial batch) or evaluation
            mode (shard order, segment-middle sampling, resize + centre / three crops, keeps every sample).
        flip: random horizontal flip in training (per source ``noflip`` turns it off).
        crop: training crop, ``"multiscale"`` (TSN scales 1, .875, .75, .66) or ``"rrc"`` (RandomResizedCrop).
        resampled: draw shards with replacement (weighted by source); an epoch is ``epoch_size`` samples.
        grid: a :class:`FluxGrid` (or a preset name) drawing ``(T, H)`` per batch; ``None`` uses
            ``num_frames`` / ``img_size``.
        per_sample_grid: draw ``(T, H)`` per sample instead of per batch (the batch is then a list).
        epoch_size: samples per epoch over all ranks; ``None`` reads ``sizes.json``.
        shuffle_buffer: samples held per worker for shuffling (memory: this many encoded videos per worker).
        eval_clips: temporal clips per video in evaluation (multi-clip offsets).
        eval_crops: spatial crops per clip in evaluation, 1 (centre) or 3.
        antialias: antialiased resize (slower).
        pin_memory: pin batches for faster host-to-GPU copies.
        prefetch_factor: batches prefetched per worker.
    """

    shards: str = ""
    num_frames: int = 8
    img_size: int = 224
    batch_size: int = 8
    num_workers: int = 2
    seed: int = 0
    decoder: str = "decord"
    decoder_threads: int = 1
    normalize: str = "imagenet"
    train: bool = True
    flip: bool = True
    crop: str = "multiscale"
    resampled: bool = False
    grid: FluxGrid | None = None
    per_sample_grid: bool = False
    epoch_size: int | None = None
    shuffle_buffer: int = 256
    eval_clips: int = 1
    eval_crops: int = 1
    antialias: bool = False
    pin_memory: bool = False
    prefetch_factor: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.grid, str):
            self.grid = FluxGrid.preset(self.grid)
        if self.decoder not in BACKENDS:
            raise ValueError(f"decoder must be one of {BACKENDS}, got {self.decoder!r}")
        if self.normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {sorted(NORMALIZE)}, got {self.normalize!r}")
        if self.crop not in ("multiscale", "rrc"):
            raise ValueError(f"crop must be 'multiscale' or 'rrc', got {self.crop!r}")
        if self.eval_crops not in (1, 3):
            raise ValueError(f"eval_crops must be 1 or 3, got {self.eval_crops}")
        for name in ("num_frames", "img_size", "batch_size", "eval_clips", "decoder_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ValueError("num_workers and shuffle_buffer must be >= 0")
