"""Batch sources: the one registry that turns a data section (``fluxvit.datasets.DataConfig``) into batches.

``data.source`` names an entry of :data:`SOURCES`; every source gives the same three things, so no stage compares
the source's name:

* ``batches(start)``: this rank's training micro-batches from micro-batch ``start`` on (resumable), as the data
  contract's dicts ``{"video": (B, 3, T, H, W) | list, "caption", "label", "key"}``;
* ``held_out(grids)``: a few held-out clips ``(1, 3, F, R, R)`` (stage 1's validation cosine);
* ``eval_views(split, ...)``: labelled multi-view evaluation batches (stage 3, Token Optimization) and
  ``val_shards`` (stage 2's retrieval during training; empty when the source has none).

Registered sources:

* ``"synthetic"`` / ``"synthetic-motion"``: :class:`SyntheticClips`, the synthetic corpus's clips
  (``fluxvit.datasets.synth``) rendered in memory, deterministic in (seed, micro-batch, rank), so a resumed run
  sees exactly the batches the uninterrupted run saw; "synthetic-motion" carries the eight motion labels.
* ``"shards"``: :class:`LoaderSource`, WebDataset shards through :func:`build_loader`.
* ``"synthetic-corpus"``: the same over the synthetic mp4 corpus, generated into ``data.root`` when absent.
* ``"annotations"``: :class:`AnnotationList`, a JSON list of videos and captions (retrieval evaluation only).

``register_source`` adds another (``@register_source("name")`` on a class taking ``(cfg, seed, rank,
world_size)``).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import random
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from fluxvit import datasets as fd
from fluxvit.datasets import DataConfig, EvalTransform, multi_clip_indices, sample_tsn_indices
from fluxvit.datasets.augment import build_train_transform, repeated_views
from fluxvit.datasets.shards import shard_classes
from fluxvit.datasets.synth import CLASSES, SPLITS, draw_clip_spec, ensure_synthetic_corpus, render_clip
from fluxvit.datasets.transforms import NORMALIZE
from fluxvit.logs import warn_once

from .config import ConfigError

__all__ = [
    "AnnotationList", "LoaderSource", "NUM_MOTION_CLASSES", "SOURCES", "SyntheticClips", "as_clips", "build_loader", "build_source",
    "corpus_clip", "draw_grids", "log_once", "normalize_video", "register_source",
]

log = logging.getLogger("fluxvit.train")

NUM_MOTION_CLASSES = len(CLASSES)  # 8: four directions x two speeds
CLIP_FRAMES = 32  # frames per clip of the synthetic corpus (SynthConfig.num_frames)


def normalize_video(video: torch.Tensor, kind: str = "imagenet") -> torch.Tensor:
    """(B, 3, T, H, W) in [0, 1] -> mean/std normalised (``kind``: "imagenet" or "clip")."""
    mean, std = NORMALIZE[kind]
    shape = (1, 3, 1, 1, 1)
    return (video - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)


def as_clips(video) -> list[torch.Tensor]:
    """A batch's ``video`` (a ``(B, ...)`` tensor or a list of B clips) as a list of B clips."""
    return list(video) if isinstance(video, (list, tuple)) else list(video.unbind(0))


def draw_grids(rng: random.Random, grids: Sequence[tuple[int, int]], batch_size: int,
               per_sample: bool) -> list[tuple[int, int]]:
    """The (frames, resolution) of each clip of a micro-batch: one Flux draw for the whole batch, or one per
    clip when ``per_sample`` (``batch_size`` pairs either way)."""
    if per_sample:
        return [rng.choice(grids) for _ in range(batch_size)]
    return [rng.choice(grids)] * batch_size


def log_once(message: str, *args) -> None:
    """Log ``message`` at warning level the first time it is seen in this process (``fluxvit.logs.warn_once``)."""
    warn_once(log, message, *args)


# ------------------------------------------------------------------------------------------------ registry
SOURCES: dict[str, Callable] = {}


def register_source(name: str, **defaults) -> Callable:
    """Class decorator: register a batch source under ``data.source=name`` (``defaults``: constructor keywords)."""
    def wrap(cls):
        if name in SOURCES:
            raise ValueError(f"batch source {name!r} registered twice")
        SOURCES[name] = functools.partial(cls, **defaults) if defaults else cls
        return cls
    return wrap


def build_source(cfg: DataConfig, seed: int = 0, rank: int = 0, world_size: int = 1, *, labels: bool = False):
    """The batch source named by ``cfg.source`` (``cfg`` is not modified).

    Args:
        labels: the caller trains on labels (stage 3): a source without them is refused with a one-line error.

    Raises:
        ConfigError: an unknown source name, or an unlabelled source where labels are needed.
    """
    if cfg.source not in SOURCES:
        raise ConfigError(f"data.source={cfg.source!r} is not a batch source; choose from {', '.join(SOURCES)}")
    source = SOURCES[cfg.source](cfg, seed, rank, world_size)
    if labels and not source.labelled:
        raise ConfigError(f"data.source={cfg.source} has no labels; use "
                          f"{', '.join(n for n, s in SOURCES.items() if _labelled(s))} for stage 3")
    return source


def _labelled(entry) -> bool:
    return getattr(entry, "keywords", {}).get("labels", getattr(entry, "labelled", True))


# ----------------------------------------------------------------------------------- the synthetic corpus
def corpus_clip(split: str, index: int, num_frames: int = CLIP_FRAMES, size: int = 128, corpus_seed: int = 0,
                indices=None, start_spread: float = 1.0) -> tuple[torch.Tensor, int, str]:
    """Clip ``index`` of ``split`` of the synthetic corpus, as the corpus generator draws it (the one renderer of
    every synthetic source). ``indices`` renders only those frames of the ``num_frames``-frame clip.
    ``start_spread`` < 1 pulls the shape's start position towards the frame centre by that factor (0: every clip
    starts at the centre; 1: the corpus's uniform start), appearance and label unchanged: the curriculum of
    ``data.motion_curriculum``.

    Returns:
        (uint8 (num_frames or len(indices), size, size, 3) frames, motion label in [0, 8), caption).
    """
    rng = np.random.default_rng([corpus_seed, SPLITS.index(split), index])
    spec = draw_clip_spec(rng, label=index % len(CLASSES), size=size)
    if start_spread != 1.0:
        c = size / 2
        spec = dataclasses.replace(spec, x0=c + (spec.x0 - c) * start_spread, y0=c + (spec.y0 - c) * start_spread)
    return torch.from_numpy(render_clip(spec, num_frames, size, indices)), spec.label, spec.caption()


@functools.lru_cache(maxsize=160)
def _eval_clip(split: str, index: int) -> tuple[torch.Tensor, int, str]:
    # Evaluation renders the same few videos at many settings (Token Optimization): keep them (1.5 MB each).
    return corpus_clip(split, index)


def motion_start_spread(curriculum, n: int) -> float:
    """The start spread of micro-batch ``n`` under ``data.motion_curriculum`` ``(hold, ramp)``: 0 for the first
    ``hold`` batches, then rising linearly to 1 over ``ramp`` batches; 1 without a curriculum."""
    if not curriculum:
        return 1.0
    hold, ramp = (int(v) for v in curriculum)
    return min(1.0, max(0.0, (n + 1 - hold) / ramp))


@register_source("synthetic", labels=False)
@register_source("synthetic-motion", labels=True)
class SyntheticClips:
    """The synthetic corpus's clips rendered in memory (no files, no decoder): a resumable batch source.

    Micro-batch ``n`` of rank ``r`` draws one Flux (F, R) from ``cfg.grid_pairs()`` (one per clip with
    ``per_sample_grid``) and ``batch_size`` clip ids below ``num_clips`` from a generator seeded by (seed, n, r),
    renders the TSN-sampled F of the clip's 32 frames and applies the data section's training transform
    (``fluxvit.datasets.augment``: crop, flip, RandAugment, erasing, ``num_sample`` repeated views). With
    ``data.motion_curriculum`` the shapes of early batches start near the frame centre (:func:`motion_start_spread`).

    Args:
        cfg: the data section; seed: base seed; rank, world_size: this process and the number of processes.
        labels: yield the motion labels (``"synthetic-motion"``; keep ``data.flip`` off: a mirrored clip moves
            the other way) or -1 (``"synthetic"``).

    ``batch(n)`` -> ``{"video": (B * N, 3, F, R, R) float (per-sample grids: a list), "caption": list[str],
    "label": (B * N,) int64, "key": list[str]}`` with N = ``num_sample`` (the N clips of a video adjacent).
    """

    val_shards = ""

    def __init__(self, cfg: DataConfig, seed: int = 0, rank: int = 0, world_size: int = 1, *, labels: bool = True):
        cfg.validate()
        self.cfg, self.seed, self.rank, self.world = cfg, seed, rank, world_size
        self.labelled = labels
        self.grids = cfg.grid_pairs()
        self.transform = build_train_transform(cfg)
        self.skipped = 0

    def batch(self, n: int) -> dict:
        """Micro-batch ``n`` of this rank: ``batch_size`` videos x ``num_sample`` clips each."""
        rng = random.Random(f"{self.seed}-{n}-{self.rank}")
        grids = draw_grids(rng, self.grids, self.cfg.batch_size, self.cfg.per_sample_grid)
        ids = [rng.randrange(self.cfg.num_clips) for _ in range(self.cfg.batch_size)]
        spread = motion_start_spread(self.cfg.motion_curriculum, n)
        clips, labels, captions, keys = [], [], [], []
        n_rep = self.cfg.num_sample
        for i, (frames, size) in zip(ids, grids):
            # Only the TSN-sampled frames of the 32-frame clip are rendered (4x cheaper at 8 frames).
            video, label, caption = corpus_clip("train", i, indices=sample_tsn_indices(CLIP_FRAMES, frames, rng),
                                                start_spread=spread)
            # repeated augmentation: num_sample differently augmented clips of the video, at its one Flux grid
            clips.extend(repeated_views(self.transform, video, size, rng, n_rep, flip_allowed=True))
            labels.extend([label if self.labelled else -1] * n_rep)
            captions.extend([caption] * n_rep)
            keys.extend([f"train{i:06d}"] * n_rep)
        return {"video": clips if self.cfg.per_sample_grid else torch.stack(clips), "caption": captions,
                "label": torch.tensor(labels, dtype=torch.long), "key": keys}

    def batches(self, start: int = 0) -> Iterator[dict]:
        """Micro-batches ``start, start + 1, ...`` (endless)."""
        n = start
        while True:
            yield self.batch(n)
            n += 1

    def held_out(self, grids: Sequence[tuple[int, int]] | None = None) -> list[torch.Tensor]:
        """``num_val_clips`` clips of the corpus's val split, each (1, 3, F, R, R) (centre crop) at the given
        grids in turn (default: the first training pair)."""
        grids = list(grids or self.grids[:1])
        tf = EvalTransform(1, self.cfg.normalize)
        out = []
        for j in range(self.cfg.num_val_clips):
            frames, size = grids[j % len(grids)]
            video = _eval_clip("val", j)[0]
            out.append(tf(video[multi_clip_indices(video.shape[0], frames, 1)[0]], size)[0][None])
        return out

    def has_held_out(self, split: str) -> bool:
        """Every split of the synthetic corpus can be rendered."""
        return True

    def num_classes(self) -> int | None:
        """Classes of the training labels (None: unlabelled)."""
        return NUM_MOTION_CLASSES if self.labelled else None

    def eval_views(self, split: str, frames: int, resolution: int, num_clips: int = 1, num_crops: int = 1,
                   max_videos: int = 0, batch_size: int = 8) -> Iterator[dict]:
        """Multi-view evaluation batches of ``split``'s first ``max_videos`` (or ``num_val_clips``) videos; see
        :func:`fluxvit.stages.finetune.data.eval_views`."""
        if not self.labelled:
            raise ConfigError(f"data.source={self.cfg.source} has no labels to evaluate; use synthetic-motion")
        num_videos = max_videos or self.cfg.num_val_clips
        tf = EvalTransform(num_crops=num_crops, normalize=self.cfg.normalize)
        for start in range(0, num_videos, batch_size):
            views, index, labels = [], [], []
            for j, vid in enumerate(range(start, min(num_videos, start + batch_size))):
                video, label, _ = _eval_clip(split, vid)
                for idx in multi_clip_indices(video.shape[0], frames, num_clips):
                    for crop in tf(video[idx], resolution):
                        views.append(crop)
                        index.append(j)
                labels.append(label)
            yield {"video": torch.stack(views), "video_index": torch.tensor(index),
                   "label": torch.tensor(labels, dtype=torch.long)}


# ------------------------------------------------------------------------------------------------- shards
def build_loader(cfg: DataConfig, shards: str, *, train: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_frames: int | None = None, img_size: int | None = None, batch_size: int | None = None,
                 eval_clips: int = 1, eval_crops: int = 1):
    """The one way a stage builds a ``fluxvit.datasets`` loader over ``shards`` from its data section.

    Training loaders draw the data section's grid; evaluation loaders read ``shards`` once in order at
    ``num_frames`` x ``img_size`` (default: the section's) without flips, grid or resampling, with ``eval_clips``
    x ``eval_crops`` views per video.

    Returns:
        a ``fluxvit.datasets.VideoLoader`` yielding ``{"video": (B, 3, T, H, W) | list, "caption", "label", "key"}``.
    """
    view = {k: v for k, v in dict(num_frames=num_frames, img_size=img_size, batch_size=batch_size).items()
            if v is not None}
    if not train:
        view.update(flip=False, per_sample_grid=False, resampled=False, grid=None)
    loader_cfg = dataclasses.replace(cfg, shards=shards, **view)
    return fd.build_video_loader(loader_cfg, train=train, seed=seed, eval_clips=eval_clips, eval_crops=eval_crops,
                                 rank=rank, world_size=world_size)


@register_source("shards")
class LoaderSource:
    """Micro-batches of ``fluxvit.datasets`` loaders over the data section's shards, epochs chained with
    ``set_epoch``; ``source="synthetic-corpus"`` reads the synthetic mp4 corpus's splits (generated under
    ``data.root`` when absent; call it on the main process first in multi-process runs).

    ``batches(start)`` restores a checkpoint's data position by seeking (see ``batches``). ``skipped`` counts the
    bad samples of the training loader only (held-out evaluation keeps its own counts). ``cfg`` is never modified.
    """

    labelled = True  # labels come from each sample's ``cls`` / json ``label`` (-1 when absent)

    def __init__(self, cfg: DataConfig, seed: int = 0, rank: int = 0, world_size: int = 1):
        cfg.validate()
        self.cfg, self.seed, self.rank, self.world = cfg, seed, rank, world_size
        self.shards, self.val_shards = self.resolve_shards()
        self._loader = None

    @property
    def loader(self):
        """The training loader (built on first use: an evaluation-only source never opens the training shards)."""
        if self._loader is None:
            self._loader = build_loader(self.cfg, self.shards, train=True, seed=self.seed, rank=self.rank,
                                        world_size=self.world)
        return self._loader

    def resolve_shards(self) -> tuple[str, str]:
        """``(training shards, held-out shards)``; the held-out spec is empty when there is none."""
        if not self.cfg.shards:
            raise ConfigError("data.source=shards needs data.shards (a brace pattern of .tar files)")
        return self.cfg.shards, self.cfg.val_shards

    def split_shards(self, split: str) -> str:
        """The shard spec of ``split``: the training shards for "train", else ``data.val_shards`` ("": none)."""
        return self.shards if split == "train" else self.val_shards

    @property
    def skipped(self) -> int:
        return 0 if self._loader is None else int(self._loader.stats.skipped)

    def batches(self, start: int = 0) -> Iterator[dict]:
        """Endless batches from micro-batch ``start`` on.

        With a known epoch length (``sizes.json`` or ``epoch_size``) the loader seeks: epoch ``start // n`` at
        ``start % n`` batches, skipping whole shards unread (the data pipeline's resume bound applies: at most
        one shuffle buffer repeated or missed per stream). Without one it iterates ``start`` batches. Every rank
        takes the same number of batches per epoch (the loader's shared epoch length).
        """
        loader = self.loader
        per_epoch = loader.num_batches
        epoch, n = 0, 0
        if start and per_epoch:
            epoch, within = divmod(start, per_epoch)
            loader.set_epoch(epoch)
            loader.load_state_dict({"epoch": epoch, "samples_seen": within * self.cfg.batch_size * self.world})
            n = start
        else:
            loader.set_epoch(epoch)
        while True:
            got = False
            for batch in loader:
                got = True
                if n >= start:
                    yield batch
                n += 1
            if not got:
                raise RuntimeError(f"data loader over {self.shards!r} yielded no batch on rank {self.rank}: "
                                   f"{loader.stats.skipped} samples skipped, reasons {dict(loader.stats.reasons)}")
            epoch += 1
            loader.set_epoch(epoch)

    def held_out(self, grids=None) -> list[torch.Tensor]:
        """Up to ``num_val_clips`` clips (1, 3, num_frames, img_size, img_size) from the held-out shards
        (``[]``, logged once, when there are none: the training shards are never reused for evaluation)."""
        if not self.val_shards:
            log_once("data.val_shards is empty: held-out evaluation is skipped (set data.val_shards to evaluate)")
            return []
        frames, size = (int(v) for v in grids[0]) if grids else (self.cfg.num_frames, self.cfg.img_size)
        loader = build_loader(self.cfg, self.val_shards, train=False, seed=self.seed, num_frames=frames,
                              img_size=size)
        out = []
        for batch in loader:
            out.extend(c[None] for c in as_clips(batch["video"]))
            if len(out) >= self.cfg.num_val_clips:
                break
        return out[: self.cfg.num_val_clips]

    def has_held_out(self, split: str) -> bool:
        """Whether ``split`` has shards to evaluate; logs once when it has none."""
        if self.split_shards(split):
            return True
        log_once(f"no held-out shards for split {split!r} (data.val_shards is empty): held-out evaluation is "
                 "skipped; the training shards are never used for it")
        return False

    def num_classes(self) -> int | None:
        """Classes the training shards carry (``classes.json`` of ``fluxvit-data make-shards``); None without."""
        names = shard_classes(self.shards)
        return None if names is None else len(names)

    def eval_views(self, split: str, frames: int, resolution: int, num_clips: int = 1, num_crops: int = 1,
                   max_videos: int = 0, batch_size: int = 8) -> Iterator[dict]:
        """Multi-view evaluation batches of ``split``'s shards (nothing when it has none), with the data section's
        decoder and workers; see :func:`fluxvit.stages.finetune.data.eval_views`."""
        if not self.has_held_out(split):
            return
        loader = build_loader(self.cfg, self.split_shards(split), train=False, num_frames=frames,
                              img_size=resolution, batch_size=batch_size, eval_clips=num_clips, eval_crops=num_crops)
        seen = 0
        for batch in loader:
            clips = as_clips(batch["video"])
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


@register_source("synthetic-corpus")
class CorpusSource(LoaderSource):
    """:class:`LoaderSource` over the synthetic mp4 corpus in ``data.root`` (generated with the default
    parameters when absent; ``fluxvit-data synth --out ROOT`` makes other sizes): its train / val / test splits
    fill what ``data.shards`` / ``data.val_shards`` leave empty."""

    def resolve_shards(self) -> tuple[str, str]:
        if not self.cfg.root:
            raise ConfigError("data.source=synthetic-corpus needs data.root (where the corpus is generated)")
        self.splits = ensure_synthetic_corpus(self.cfg.root)["splits"]
        val = self.splits.get("val", {})
        return (self.cfg.shards or self.splits["train"]["shards"],
                self.cfg.val_shards or (val.get("shards", "") if val.get("num_samples") else ""))

    def split_shards(self, split: str) -> str:
        if split not in ("train", "val") and not self.cfg.val_shards:
            info = self.splits.get(split, {})
            return info.get("shards", "") if info.get("num_samples") else ""
        return super().split_shards(split)


@register_source("annotations")
class AnnotationList:
    """An annotation list over a folder of videos: evaluation data for retrieval, not a training source.

    ``data.val_shards`` names the JSON list (``data.shards`` the one of "train") of ``{"video": path relative to
    ``data.root``, "caption": str or [str]}`` (MSRVTT / UMT / InternVideo style); every caption is a query. To train
    on such a list, write shards first (``fluxvit-data make-shards --json LIST``).
    """

    labelled = False

    def __init__(self, cfg: DataConfig, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.cfg = cfg
        self.val_shards = cfg.val_shards
        self.skipped = 0

    def split_list(self, split: str) -> str:
        """The annotation list of ``split`` ("" when none)."""
        return self.cfg.shards if split == "train" else self.cfg.val_shards

    def batches(self, start: int = 0) -> Iterator[dict]:
        raise ConfigError("data.source=annotations is evaluation data; write shards from the list to train on it "
                          "(fluxvit-data make-shards --json LIST) and use data.source=shards")

    def held_out(self, grids=None) -> list[torch.Tensor]:
        return []

    def has_held_out(self, split: str) -> bool:
        return bool(self.split_list(split))
