"""The data section: one typed :class:`DataConfig` for the loader, the synthetic sources and every stage.

A training stage's ``data`` section *is* this class (``--set data.NAME=VALUE`` sets any field, and the saved
config records all of them); :func:`~fluxvit.datasets.build_video_loader` reads the same object. What differs
between two loaders of one run (training or evaluation mode, seed, evaluation views) is passed to the loader, not
stored here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .decoders import BACKENDS
from .grid import FluxGrid
from .transforms import NORMALIZE

__all__ = ["DataConfig", "resolve_grid"]

CROPS = ("multiscale", "rrc")


def resolve_grid(grid: Any, patch_size: int = 14) -> FluxGrid | None:
    """The one grid resolver: ``None`` / ``""`` / ``[]`` (no Flux grid), a :class:`FluxGrid`, a preset name
    (``"distill"``, ``"videotext"``, ``"finetune"``) or a list of ``[frames, resolution]`` pairs.

    Raises:
        ValueError: one line for anything else (or an unknown preset name).
    """
    if grid is None or (isinstance(grid, (str, list, tuple)) and not grid):
        return None
    if isinstance(grid, FluxGrid):
        return grid
    if isinstance(grid, str) and grid.lstrip().startswith("["):  # pairs given as JSON text (``--set``)
        import json

        try:
            grid = json.loads(grid)
        except ValueError:
            raise ValueError(f"data.grid: cannot read {grid!r} as [[frames, resolution], ...]") from None
    if isinstance(grid, str):
        try:
            return FluxGrid.preset(grid)
        except KeyError as err:
            raise ValueError(f"data.grid: {err.args[0]}") from None
    if isinstance(grid, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in grid):
        return FluxGrid.from_pairs(grid, patch_size=patch_size)
    raise ValueError(f"data.grid must be a FluxGrid preset name or [[frames, resolution], ...], got {grid!r}")


@dataclass
class DataConfig:
    """Where the clips come from and how they are decoded, sampled, augmented and batched.

    Source and splits:
        source: the batch source (``fluxvit.stages.common.sources``): ``"shards"`` (WebDataset shards),
            ``"synthetic-corpus"`` (the synthetic mp4 corpus, generated into ``root`` on first use; its train / val
            splits unless ``shards`` / ``val_shards`` are set), ``"synthetic"`` (the corpus's clips rendered in
            memory, no labels) or ``"synthetic-motion"`` (the same with the eight motion labels, for stage 3).
        shards: training shard spec ``SOURCE[::WEIGHT][::noflip];...`` with brace ranges
            (:mod:`fluxvit.datasets.shards`).
        val_shards: held-out shard spec; empty: held-out evaluation is skipped (never the training shards).
        root: folder of the synthetic corpus.
        num_clips: clips of the in-memory synthetic sources' training split.
        num_val_clips: held-out clips evaluated during training.
        motion_curriculum: ``[hold, ramp]`` in micro-batches, the in-memory synthetic sources only: the moving
            shape starts at the frame centre for the first ``hold`` batches, then its start window widens linearly
            to the whole frame over ``ramp`` batches (held-out and evaluation clips always start anywhere). With a
            fixed start a direction can be read from where the shape is; the widening window makes the model read
            it from the displacement. ``[]``: off (the corpus as generated).

    Clip shape:
        grid: the Flux grid drawn per batch (:func:`resolve_grid`: a preset name or ``[[frames, resolution],
            ...]``); ``None`` or empty: every clip is ``num_frames`` x ``img_size``.
        per_sample_grid: draw ``(T, H)`` per clip instead of per batch (the batch's ``video`` is then a list of
            ``(3, T_i, H_i, W_i)``, the packed input FluxViT takes).
        num_frames, img_size: frames ``T`` and square side ``H = W`` without a grid (and of evaluation views).

    Loader knobs:
        batch_size: clips per batch per rank ``B``.
        num_workers: DataLoader worker processes per rank (0 = decode in the main process).
        decoder: ``"decord"`` (default), ``"pyav"`` or ``"torchcodec"``; a missing one falls back to PyAV with a
            warning. decoder_threads: threads per decode (1 keeps one worker on one core).
        normalize: ``"imagenet"`` or ``"clip"`` mean/std.
        flip: random horizontal flip in training (per shard source ``noflip`` turns it off).
        crop: training crop, ``"multiscale"`` (TSN scales 1, .875, .75, .66) or ``"rrc"`` (RandomResizedCrop).
        crop_scale: area range of the ``"rrc"`` crop (stage-3 release: (0.08, 1); stage 2: (0.5, 1)).
        randaug: timm RandAugment config (e.g. ``"rand-m7-n4-mstd0.5-inc1"``) applied to the full decoded frames
            before the crop, the same ops on every frame (:mod:`fluxvit.datasets.augment`); ``""``: off.
        reprob: random-erasing probability (timm, pixel mode, one box through every frame); 0: off.
        num_sample: repeated augmentation, differently augmented clips per decoded video (release: 2); the
            training batch then holds ``batch_size * num_sample`` clips, copies of one video adjacent.
        resampled: draw shards with replacement (weighted by source); an epoch is ``epoch_size`` samples.
        epoch_size: samples per epoch over all ranks; ``None`` reads ``sizes.json``.
        shuffle_buffer: samples held per stream for shuffling (memory: this many encoded videos per worker).
        antialias: antialiased resize (slower). pin_memory: pin batches for host-to-GPU copies.
        prefetch_factor: batches prefetched per worker.
    """

    source: str = "synthetic"
    shards: str = ""
    val_shards: str = ""
    root: str = ""
    num_clips: int = 256
    num_val_clips: int = 16
    motion_curriculum: tuple = ()
    grid: Any = None
    per_sample_grid: bool = False
    num_frames: int = 8
    img_size: int = 224
    batch_size: int = 8
    num_workers: int = 0
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
    epoch_size: int | None = None
    shuffle_buffer: int = 256
    antialias: bool = False
    pin_memory: bool = False
    prefetch_factor: int = 2

    def __post_init__(self) -> None:
        self.validate()

    def flux_grid(self) -> FluxGrid | None:
        """The resolved Flux grid of ``grid`` (``None``: every clip is ``num_frames`` x ``img_size``)."""
        return resolve_grid(self.grid)

    def grid_pairs(self) -> list[tuple[int, int]]:
        """The ``(frames, resolution)`` pairs a batch is drawn from: the grid's valid pairs, or the one pair
        ``(num_frames, img_size)`` without a grid."""
        grid = self.flux_grid()
        return grid.valid_pairs() if grid is not None else [(self.num_frames, self.img_size)]

    def validate(self) -> None:
        """Raise ``ValueError`` with a one-line message for a bad field (also called when a loader or a source is
        built, so ``--set`` values are checked too)."""
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
        if self.motion_curriculum:
            cur = list(self.motion_curriculum)
            if len(cur) != 2 or any(isinstance(v, bool) or int(v) != v for v in cur) or cur[0] < 0 or cur[1] < 1:
                raise ValueError(f"data.motion_curriculum must be [hold, ramp] with hold >= 0 and ramp >= 1 batches, "
                                 f"got {self.motion_curriculum!r}")
            if self.source not in ("synthetic", "synthetic-motion"):
                raise ValueError(f"data.motion_curriculum applies to the in-memory synthetic sources (synthetic, "
                                 f"synthetic-motion), not data.source={self.source!r}")
        self.flux_grid()  # a bad grid fails here, with its one-line message
