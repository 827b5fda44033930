"""Labelled clips for stage 3: the synthetic corpus rendered in memory, and multi-view evaluation sets.

* ``MotionClips``: a resumable ``BatchSource`` over the synthetic corpus's clips (``fluxvit.datasets.synth``:
  the same clip specs and motion labels as the mp4 corpus, rendered directly instead of decoded). Micro-batch
  ``n`` of rank ``r`` draws one Flux (F, R) (one per clip with ``data.per_sample_grid``) and its clip ids from a
  generator seeded by (seed, n, r), TSN-samples F of the clip's frames and applies the training crop; so a resumed run sees exactly the same batches.
* ``eval_views``: evaluation batches (temporal clips x spatial crops per video) from the synthetic corpus or
  from validation shards, as ``{"video": (V, 3, F, R, R), "video_index": (V,), "label": (N,)}``.
"""
from __future__ import annotations

import functools
import logging
import random
from typing import Iterator

import numpy as np
import torch

from fluxvit.datasets import EvalTransform, multi_clip_indices, sample_tsn_indices
from fluxvit.datasets.augment import build_train_transform, repeated_views
from fluxvit.datasets.shards import shard_classes
from fluxvit.datasets.synth import CLASSES, draw_clip_spec, ensure_synthetic_corpus, render_clip

from ..common.config import DataConfig
from ..common.data import build_loader, build_source, draw_grids, flux_grids, log_once, resolve_shards

__all__ = ["MotionClips", "build_train_source", "eval_shards", "eval_views", "has_held_out", "motion_clip",
           "shard_num_classes",
           "NUM_MOTION_CLASSES"]

log = logging.getLogger("fluxvit.train")

NUM_MOTION_CLASSES = 8
CLIP_FRAMES = 32  # frames per clip of the synthetic corpus (SynthConfig.num_frames)
_SPLIT_INDEX = {"train": 0, "val": 1, "test": 2}


def motion_clip(split: str, index: int, num_frames: int = 32, size: int = 128, corpus_seed: int = 0,
                indices=None) -> tuple[torch.Tensor, int]:
    """Clip ``index`` of ``split`` of the synthetic corpus, as the corpus generator draws it.

    ``indices`` renders only those frames of the ``num_frames``-frame clip (the same pixels, far cheaper).

    Returns:
        (uint8 (num_frames or len(indices), size, size, 3) frames, motion label in [0, 8)).
    """
    rng = np.random.default_rng([corpus_seed, _SPLIT_INDEX[split], index])
    spec = draw_clip_spec(rng, label=index % len(CLASSES), size=size)
    return torch.from_numpy(render_clip(spec, num_frames, size, indices)), spec.label


class MotionClips:
    """Training batches of the synthetic corpus with motion labels (a stage-3 ``BatchSource``).

    Args:
        cfg: data config (``batch_size``, ``grids`` or ``flux_preset``, ``num_clips`` = training clips used,
            ``normalize``, ``flip`` (keep False: a mirrored clip moves the other way)).
        seed: base seed; rank, world_size: this process and the number of processes.

    ``batch(n)`` -> ``{"video": (B * N, 3, F, R, R) float (per-sample grids: a list of B * N (3, F_i, R_i, R_i)),
    "label": (B * N,) int64, "key": list[str]}`` with N = ``num_sample`` (repeated augmentation: the N clips of a
    video are adjacent and share its grid). The per-clip augmentation is ``fluxvit.datasets.augment``'s
    (``data.randaug``, ``data.crop`` / ``crop_scale``, ``data.reprob``).
    """

    def __init__(self, cfg: DataConfig, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.cfg, self.seed, self.rank, self.world = cfg, seed, rank, world_size
        self.grids = flux_grids(cfg)
        self.transform = build_train_transform(cfg)
        self.skipped = 0

    def batch(self, n: int) -> dict:
        """Micro-batch ``n`` of this rank: ``batch_size`` videos x ``num_sample`` clips each."""
        rng = random.Random(f"{self.seed}-{n}-{self.rank}")
        grids = draw_grids(rng, self.grids, self.cfg.batch_size, self.cfg.per_sample_grid)
        ids = [rng.randrange(self.cfg.num_clips) for _ in range(self.cfg.batch_size)]
        clips, labels, keys = [], [], []
        n_rep = self.cfg.num_sample
        for i, (frames, size) in zip(ids, grids):
            # Only the TSN-sampled frames of the 32-frame clip are rendered (4x cheaper at 8 frames).
            video, label = motion_clip("train", i, indices=sample_tsn_indices(CLIP_FRAMES, frames, rng))
            # repeated augmentation: num_sample differently augmented clips of the video, at its one Flux grid
            clips.extend(repeated_views(self.transform, video, size, rng, n_rep, flip_allowed=True))
            labels.extend([label] * n_rep)
            keys.extend([f"train{i:06d}"] * n_rep)
        return {"video": clips if self.cfg.per_sample_grid else torch.stack(clips),
                "label": torch.tensor(labels, dtype=torch.long), "key": keys}

    def batches(self, start: int = 0) -> Iterator[dict]:
        """Micro-batches ``start, start + 1, ...`` (endless)."""
        n = start
        while True:
            yield self.batch(n)
            n += 1


@functools.lru_cache(maxsize=160)
def _eval_clip(split: str, index: int) -> tuple[torch.Tensor, int]:
    # Evaluation renders the same few videos at many settings (Token Optimization): keep them (1.5 MB each).
    return motion_clip(split, index)


def _motion_views(split: str, num_videos: int, frames: int, resolution: int, num_clips: int, num_crops: int,
                  normalize: str, batch_size: int) -> Iterator[dict]:
    tf = EvalTransform(num_crops=num_crops, normalize=normalize)
    for start in range(0, num_videos, batch_size):
        views, index, labels = [], [], []
        for j, vid in enumerate(range(start, min(num_videos, start + batch_size))):
            video, label = _eval_clip(split, vid)
            for idx in multi_clip_indices(video.shape[0], frames, num_clips):
                for crop in tf(video[idx], resolution):
                    views.append(crop)
                    index.append(j)
            labels.append(label)
        yield {"video": torch.stack(views), "video_index": torch.tensor(index),
               "label": torch.tensor(labels, dtype=torch.long)}


def _shard_views(data: DataConfig, shards: str, frames: int, resolution: int, num_clips: int, num_crops: int,
                 batch_size: int, max_videos: int) -> Iterator[dict]:
    loader = build_loader(data, shards, train=False, num_frames=frames, img_size=resolution, batch_size=batch_size,
                          eval_clips=num_clips, eval_crops=num_crops)
    seen = 0
    for batch in loader:
        video = batch["video"]
        clips = list(video) if isinstance(video, (list, tuple)) else list(video.unbind(0))
        views, index = [], []
        for j, c in enumerate(clips):
            c = c if c.dim() == 5 else c[None]  # (V_i, 3, T, H, W)
            views.extend(c.unbind(0))
            index.extend([j] * c.shape[0])
        labels = batch["label"]
        if max_videos:
            keep = min(len(clips), max_videos - seen)
            if keep < len(clips):
                sel = [k for k, j in enumerate(index) if j < keep]
                views, index, labels = [views[k] for k in sel], [index[k] for k in sel], labels[:keep]
        yield {"video": torch.stack(views), "video_index": torch.tensor(index), "label": labels}
        seen += len(labels)
        if max_videos and seen >= max_videos:
            return


def eval_shards(data: DataConfig, split: str) -> str:
    """The shard spec ``eval_views`` reads for ``split`` ("" when there is none: evaluation is then skipped)."""
    train, val = resolve_shards(data)
    if split == "train":
        return train
    if data.source == "synthetic-corpus" and not data.val_shards and split != "val":
        info = ensure_synthetic_corpus(data.root)["splits"].get(split, {})
        return info.get("shards", "") if info.get("num_samples") else ""
    return val


def has_held_out(data: DataConfig, split: str) -> bool:
    """Whether ``eval_views(data, split, ...)`` has videos to show; logs once when a shard source has none."""
    if data.source == "synthetic-motion":
        return True
    if data.source in ("shards", "synthetic-corpus") and not eval_shards(data, split):
        log_once(f"no held-out shards for split {split!r} (data.val_shards is empty): held-out evaluation is "
                 "skipped; the training shards are never used for it")
        return False
    return True


def eval_views(data: DataConfig, split: str, frames: int, resolution: int, num_clips: int = 1, num_crops: int = 1,
               max_videos: int = 0, batch_size: int = 8) -> Iterator[dict]:
    """Multi-view evaluation batches of ``batch_size`` videos.

    Synthetic sources render ``split`` of the synthetic corpus (``max_videos`` or ``data.num_val_clips``
    videos); shard sources read ``data.val_shards`` (the corpus's ``split`` for "synthetic-corpus"; the training
    shards only when ``split`` is "train"), with the data section's decoder and workers. No held-out shards:
    nothing is yielded (``has_held_out`` logs it once).

    Yields:
        ``{"video": (V, 3, frames, resolution, resolution), "video_index": (V,) int64 in [0, N),
        "label": (N,) int64}`` with V = N * num_clips * num_crops, views of one video contiguous.
    """
    if data.source == "synthetic-motion":
        n = max_videos or data.num_val_clips
        return _motion_views(split, n, frames, resolution, num_clips, num_crops, data.normalize, batch_size)
    if data.source in ("shards", "synthetic-corpus"):
        if not has_held_out(data, split):
            return iter(())
        return _shard_views(data, eval_shards(data, split), frames, resolution, num_clips, num_crops, batch_size,
                            max_videos)
    raise ValueError(f"stage 3 evaluation needs labelled clips; data.source {data.source!r} has none "
                     f"(use synthetic-motion, synthetic-corpus or shards)")


def shard_num_classes(data: DataConfig) -> int | None:
    """Number of classes the training shards carry (``classes.json`` written by ``fluxvit-data make-shards``),
    ``None`` for in-memory sources or shards without one."""
    if data.source not in ("shards", "synthetic-corpus"):
        return None
    names = shard_classes(resolve_shards(data)[0])
    return None if names is None else len(names)


def build_train_source(cfg: DataConfig, seed: int, rank: int, world_size: int):
    """The training ``BatchSource``: ``MotionClips`` for "synthetic-motion", else ``common.build_source``."""
    if cfg.source == "synthetic-motion":
        return MotionClips(cfg, seed, rank, world_size)
    if cfg.source == "synthetic":
        raise ValueError("data.source=synthetic has no labels; use synthetic-motion for stage 3")
    return build_source(cfg, seed, rank, world_size)
