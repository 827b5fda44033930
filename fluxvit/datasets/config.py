"""The data pipeline's typed config: :class:`LoaderOptions` (every loader knob) and :class:`DataConfig` (those
knobs plus what one loader reads: shards, grid, mode, seed, evaluation views).

The training stages subclass :class:`LoaderOptions` for their ``data`` section (adding source, root, validation
shards and grids), so every knob here is settable with ``--set data.NAME=VALUE`` and recorded in the saved config,
and :meth:`LoaderOptions.loader_options` hands all of them to a :class:`DataConfig` without a hand-kept subset.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .decoders import BACKENDS
from .grid import FluxGrid
from .transforms import NORMALIZE

__all__ = ["DataConfig", "LoaderOptions"]

CROPS = ("multiscale", "rrc")


@dataclass
class LoaderOptions:
    """The loader knobs a training stage sets (``--set data.NAME=VALUE``).

    Attributes:
        batch_size: clips per batch per rank ``B``.
        num_workers: DataLoader worker processes per rank (0 = decode in the main process); training and
            evaluation loaders both use it.
        num_frames: frames per clip ``T`` when no grid is used.
        img_size: square output side ``H = W`` when no grid is used.
        decoder: ``"decord"`` (default), ``"pyav"`` or ``"torchcodec"``, for training and evaluation; a missing
            one falls back to PyAV with a warning.
        decoder_threads: threads per decode (1 keeps one worker on one core).
        normalize: ``"imagenet"`` or ``"clip"`` mean/std.
        flip: random horizontal flip in training (per source ``noflip`` turns it off).
        crop: training crop, ``"multiscale"`` (TSN scales 1, .875, .75, .66) or ``"rrc"`` (RandomResizedCrop).
        crop_scale: area range of the ``"rrc"`` crop (stage-3 release: (0.08, 1); stage 2: (0.5, 1)).
        randaug: timm RandAugment config (e.g. ``"rand-m7-n4-mstd0.5-inc1"``) applied to the full decoded frames
            before the crop, the same ops on every frame (:mod:`fluxvit.datasets.augment`); ``""``: off.
        reprob: random-erasing probability (timm, pixel mode, one box through every frame); 0: off.
        num_sample: repeated augmentation, differently augmented clips per decoded video (release: 2); the
            training batch then holds ``batch_size * num_sample`` clips, copies of one video adjacent.
        resampled: draw shards with replacement (weighted by source); an epoch is ``epoch_size`` samples.
        per_sample_grid: draw ``(T, H)`` per sample instead of per batch (the batch is then a list).
        epoch_size: samples per epoch over all ranks; ``None`` reads ``sizes.json``.
        shuffle_buffer: samples held per stream for shuffling (memory: this many encoded videos per worker).
        antialias: antialiased resize (slower).
        pin_memory: pin batches for faster host-to-GPU copies.
        prefetch_factor: batches prefetched per worker.
    """

    batch_size: int = 8
    num_workers: int = 2
    num_frames: int = 8
    img_size: int = 224
    decoder: str = "decord"
    decoder_threads: int = 1
    normalize: str = "imagenet"
    flip: bool = True
    crop: str = "multiscale"
    crop_scale: tuple = (0.25, 1.0)
    randaug: str = ""
    reprob: float = 0.0
    num_sample: int = 1
    resampled: bool = False
    per_sample_grid: bool = False
    epoch_size: int | None = None
    shuffle_buffer: int = 256
    antialias: bool = False
    pin_memory: bool = False
    prefetch_factor: int = 2

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` with a one-line message for a bad knob (also called when a loader is built, so
        ``--set`` values are checked too)."""
        if self.decoder not in BACKENDS:
            raise ValueError(f"data.decoder must be one of {BACKENDS}, got {self.decoder!r}")
        if self.normalize not in NORMALIZE:
            raise ValueError(f"data.normalize must be one of {sorted(NORMALIZE)}, got {self.normalize!r}")
        if self.crop not in CROPS:
            raise ValueError(f"data.crop must be 'multiscale' or 'rrc', got {self.crop!r}")
        for name in ("num_frames", "img_size", "batch_size", "decoder_threads", "prefetch_factor"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ValueError(f"data.num_workers and data.shuffle_buffer must be >= 0, got {self.num_workers} and "
                             f"{self.shuffle_buffer}")
        lo, hi = (float(v) for v in self.crop_scale)
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"data.crop_scale must satisfy 0 < lo <= hi <= 1, got {tuple(self.crop_scale)}")
        if not 0.0 <= self.reprob <= 1.0:
            raise ValueError(f"data.reprob must be in [0, 1], got {self.reprob}")
        if self.num_sample < 1:
            raise ValueError(f"data.num_sample must be >= 1, got {self.num_sample}")
        if self.randaug and not self.randaug.startswith("rand"):
            raise ValueError(f"data.randaug must be a timm RandAugment string like 'rand-m7-n4-mstd0.5-inc1', got "
                             f"{self.randaug!r}")
        if self.epoch_size is not None and self.epoch_size < 1:
            raise ValueError(f"data.epoch_size must be >= 1 or None, got {self.epoch_size}")

    def loader_options(self) -> dict[str, Any]:
        """Every :class:`LoaderOptions` field of this config (a stage's data section included) as keywords."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(LoaderOptions)}


@dataclass
class DataConfig(LoaderOptions):
    """Everything :func:`~fluxvit.datasets.build_video_loader` needs: the :class:`LoaderOptions` plus

    Attributes:
        shards: shard spec ``SOURCE[::WEIGHT][::noflip];...`` with brace ranges (see :mod:`fluxvit.datasets.shards`).
        grid: a :class:`FluxGrid`, a preset name or a list of ``[frames, resolution]`` pairs, drawing ``(T, H)``
            per batch; ``None`` uses ``num_frames`` / ``img_size``.
        train: training mode (shuffles, TSN sampling, random crops, every stream takes the same number of
            batches) or evaluation mode (shard order, segment-middle sampling, resize + centre / three crops,
            keeps every sample once).
        seed: base seed; shard order, sample shuffle, frame sampling, crops and grid draws derive from
            ``(seed, epoch, rank, worker)``.
        eval_clips: temporal clips per video in evaluation (multi-clip offsets).
        eval_crops: spatial crops per clip in evaluation, 1 (centre) or 3.
    """

    shards: str = ""
    grid: Any = None
    train: bool = True
    seed: int = 0
    eval_clips: int = 1
    eval_crops: int = 1

    def validate(self) -> None:
        super().validate()
        if isinstance(self.grid, str):
            self.grid = FluxGrid.preset(self.grid)
        elif isinstance(self.grid, (list, tuple)):
            self.grid = FluxGrid.from_pairs(self.grid) if self.grid else None
        if self.grid is not None and not isinstance(self.grid, FluxGrid):
            raise ValueError(f"grid must be a FluxGrid, a preset name or [frames, resolution] pairs, got {self.grid!r}")
        if self.eval_crops not in (1, 3):
            raise ValueError(f"eval_crops must be 1 or 3, got {self.eval_crops}")
        if self.eval_clips < 1:
            raise ValueError(f"eval_clips must be >= 1, got {self.eval_clips}")
