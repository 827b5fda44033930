"""Labelled clips for stage 3, through the batch-source registry (``fluxvit.stages.common.data``).

* ``build_train_source``: the training source of a data section, refused when it has no labels.
* ``eval_views``: multi-view evaluation batches (temporal clips x spatial crops per video) of a split, as
  ``{"video": (V, 3, F, R, R), "video_index": (V,), "label": (N,)}``, from whatever source the section names.
"""
from __future__ import annotations

import logging
from typing import Iterator

from fluxvit.datasets import DataConfig
from fluxvit.datasets.shards import label_map_difference, shard_classes

from ..common.config import ConfigError
from ..common.data import NUM_MOTION_CLASSES, SyntheticClips, build_source, corpus_clip

__all__ = ["MotionClips", "NUM_MOTION_CLASSES", "build_train_source", "eval_views", "has_held_out", "motion_clip",
           "shard_num_classes", "check_split_label_maps"]

log = logging.getLogger("fluxvit.train")

MotionClips = SyntheticClips  # the labelled synthetic source ("synthetic-motion")


def motion_clip(split: str, index: int, num_frames: int = 32, size: int = 128, corpus_seed: int = 0,
                indices=None):
    """(uint8 frames (T, size, size, 3), motion label) of clip ``index`` of ``split`` of the synthetic corpus."""
    video, label, _ = corpus_clip(split, index, num_frames, size, corpus_seed, indices)
    return video, label


def has_held_out(data: DataConfig, split: str) -> bool:
    """Whether ``eval_views(data, split, ...)`` has videos to show; logs once when a shard source has none."""
    return build_source(data, labels=True).has_held_out(split)


def eval_views(data: DataConfig, split: str, frames: int, resolution: int, num_clips: int = 1, num_crops: int = 1,
               max_videos: int = 0, batch_size: int = 8) -> Iterator[dict]:
    """Multi-view evaluation batches of ``batch_size`` videos.

    Synthetic sources render ``split`` of the synthetic corpus (``max_videos`` or ``data.num_val_clips``
    videos); shard sources read ``data.val_shards`` (the corpus's ``split`` for "synthetic-corpus"; the training
    shards only when ``split`` is "train"), with the data section's decoder and workers. No held-out shards:
    nothing is yielded (logged once).

    Yields:
        ``{"video": (V, 3, frames, resolution, resolution), "video_index": (V,) int64 in [0, N),
        "label": (N,) int64}`` with V = N * num_clips * num_crops, views of one video contiguous.
    """
    source = build_source(data, labels=True)
    return source.eval_views(split, frames, resolution, num_clips, num_crops, max_videos, batch_size)


def shard_num_classes(data: DataConfig) -> int | None:
    """Number of classes the training shards carry (``classes.json`` written by ``fluxvit-data make-shards``),
    ``None`` for in-memory sources or shards without one."""
    source = build_source(data, labels=True)
    return source.num_classes() if source.labelled and not isinstance(source, SyntheticClips) else None


def check_split_label_maps(data: DataConfig) -> None:
    """Stop with one line when the training and held-out shards carry different class lists (``classes.json``);
    either lacking one is not checked.

    Raises:
        ConfigError: the first class whose index differs.
    """
    if data.source != "shards" or not data.shards or not data.val_shards:
        return
    try:
        train, val = shard_classes(data.shards), shard_classes(data.val_shards)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if train is not None and val is not None:
        why = label_map_difference(train, val, "the training shards (data.shards)",
                                   "the held-out shards (data.val_shards)")
        if why:
            raise ConfigError(why)


def build_train_source(cfg: DataConfig, seed: int, rank: int, world_size: int):
    """The training ``BatchSource`` of a stage-3 data section (one with labels)."""
    return build_source(cfg, seed, rank, world_size, labels=True)
