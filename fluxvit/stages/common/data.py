"""Batch sources for the loop: resumable streams of this rank's micro-batches.

* ``SyntheticClips``: clips rendered in memory (moving blobs over drifting gratings), deterministic in
  (seed, micro-batch index, rank), so a resumed run sees exactly the batches the uninterrupted run saw. Used by
  the smoke presets, tests and benchmarks; needs no files or decoder.
* ``LoaderSource``: WebDataset shards through ``build_loader`` (the one function turning a data section into a
  ``fluxvit.datasets`` loader); resuming skips the micro-batches already consumed. ``resolve_shards`` is the one
  place the synthetic mp4 corpus is resolved.

Both yield the data contract's dicts: ``video`` (B, 3, T, H, W) normalised float, ``caption``, ``label``, ``key``.
"""
from __future__ import annotations

import logging
import math
import random
from typing import Iterator, Sequence

import torch

from fluxvit import datasets as fd
from fluxvit.datasets import FluxGrid
from fluxvit.datasets.synth import ensure_synthetic_corpus
from fluxvit.datasets.transforms import NORMALIZE

from .config import DataConfig

__all__ = [
    "LoaderSource", "SyntheticClips", "build_loader", "build_source", "draw_grids", "flux_grids", "loader_grid",
    "log_once", "normalize_video", "resolve_shards",
]

log = logging.getLogger("fluxvit.train")

_MEANS = NORMALIZE  # timm's ImageNet / OpenAI-CLIP constants (fluxvit.datasets.transforms)


def normalize_video(video: torch.Tensor, kind: str = "imagenet") -> torch.Tensor:
    """(B, 3, T, H, W) in [0, 1] -> mean/std normalised (``kind``: "imagenet" or "clip")."""
    mean, std = _MEANS[kind]
    shape = (1, 3, 1, 1, 1)
    return (video - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)


def flux_grids(cfg: DataConfig) -> list[tuple[int, int]]:
    """The (frames, resolution) pairs of ``cfg``: ``cfg.grids`` if given, else the valid pairs of
    ``FluxGrid.preset(cfg.flux_preset)``."""
    if cfg.grids:
        return [(int(f), int(r)) for f, r in cfg.grids]
    return FluxGrid.preset(cfg.flux_preset).valid_pairs()


def draw_grids(rng: random.Random, grids: Sequence[tuple[int, int]], batch_size: int,
               per_sample: bool) -> list[tuple[int, int]]:
    """The (frames, resolution) of each clip of a micro-batch: one Flux draw for the whole batch, or one per
    clip when ``per_sample`` (``batch_size`` pairs either way)."""
    if per_sample:
        return [rng.choice(grids) for _ in range(batch_size)]
    return [rng.choice(grids)] * batch_size


class SyntheticClips:
    """In-memory synthetic video clips for smoke runs and tests.

    Clip ``i`` is a fixed random scene (3 coloured blobs moving linearly over a drifting sinusoidal grating),
    rendered at any (frames, resolution), so Flux grids cost nothing. Micro-batch ``n`` of rank ``r`` draws
    one (F, R) from ``grids`` (one per clip with ``per_sample_grid``: ``video`` is then a list) and
    ``batch_size`` clip ids, both from a generator seeded by (seed, n, r).

    Args:
        cfg: data config (``batch_size``, ``grids`` or ``flux_preset``, ``num_clips``, ``normalize``).
        seed: base seed.
        rank, world_size: this process and the number of processes.
    """

    def __init__(self, cfg: DataConfig, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.cfg, self.seed, self.rank, self.world = cfg, seed, rank, world_size
        self.grids = flux_grids(cfg)
        self.skipped = 0

    @staticmethod
    def render(index: int, frames: int, size: int, seed: int = 0) -> torch.Tensor:
        """Clip ``index`` as (3, frames, size, size) in [0, 1]."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + index)
        rnd = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
        t = torch.linspace(0, 1, frames).view(frames, 1, 1)
        y = torch.linspace(0, 1, size).view(1, size, 1)
        x = torch.linspace(0, 1, size).view(1, 1, size)
        freq, angle, speed = 2 + 6 * rnd(1), math.pi * rnd(1), 2 * rnd(1) - 1
        phase = (x * torch.cos(angle) + y * torch.sin(angle)) * freq * 2 * math.pi + speed * 4 * t
        base = rnd(3, 1, 1, 1) * 0.5 + 0.25
        video = base * (0.75 + 0.25 * torch.sin(phase)).unsqueeze(0)
        for _ in range(3):
            c0, v, r, col = rnd(2), (rnd(2) - 0.5) * 0.8, 0.08 + 0.15 * rnd(1), rnd(3)
            cy, cx = c0[0] + v[0] * t, c0[1] + v[1] * t
            mask = torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r ** 2)).unsqueeze(0)
            video = video * (1 - mask) + col.view(3, 1, 1, 1) * mask
        return video.clamp(0, 1)

    def batch(self, n: int) -> dict:
        """Micro-batch ``n`` of this rank."""
        rng = random.Random(f"{self.seed}-{n}-{self.rank}")
        grids = draw_grids(rng, self.grids, self.cfg.batch_size, self.cfg.per_sample_grid)
        ids = [rng.randrange(self.cfg.num_clips) for _ in range(self.cfg.batch_size)]
        clips = [self.render(i, f, r, self.seed) for i, (f, r) in zip(ids, grids)]
        flip = self.cfg.flip and rng.random() < 0.5
        clips = [normalize_video((c.flip(-1) if flip else c)[None], self.cfg.normalize)[0] for c in clips]
        video = clips if self.cfg.per_sample_grid else torch.stack(clips)
        return {"video": video, "caption": [""] * len(ids),
                "label": torch.full((len(ids),), -1, dtype=torch.long), "key": [f"synth{i:06d}" for i in ids]}

    def batches(self, start: int = 0) -> Iterator[dict]:
        """Micro-batches ``start, start + 1, ...`` (endless)."""
        n = start
        while True:
            yield self.batch(n)
            n += 1

    def held_out(self, grids: Sequence[tuple[int, int]] | None = None) -> list[torch.Tensor]:
        """Validation clips (ids disjoint from training), each (1, 3, F, R, R) at the given or first grid."""
        grids = list(grids or self.grids[:1])
        out = []
        for j in range(self.cfg.num_val_clips):
            frames, size = grids[j % len(grids)]
            v = self.render(10_000_000 + j, frames, size, self.seed)[None]
            out.append(normalize_video(v, self.cfg.normalize))
        return out


_ONCE: set[str] = set()


def log_once(message: str, *args) -> None:
    """Log ``message`` at warning level the first time it is seen in this process."""
    text = message % args if args else message
    if text not in _ONCE:
        _ONCE.add(text)
        log.warning(text)


def resolve_shards(cfg: DataConfig) -> tuple[str, str]:
    """``(training shards, held-out shards)`` of a data section; the one place the synthetic corpus is resolved.

    ``source="synthetic-corpus"`` generates the corpus into ``cfg.root`` when absent (call it on the main process
    first in multi-process runs) and fills what ``shards`` / ``val_shards`` leave empty with its train / val
    splits. ``cfg`` is never modified. The held-out spec is empty when there is none (no ``val_shards``).
    """
    if cfg.source == "synthetic-corpus":
        if not cfg.root:
            raise ValueError("data.source=synthetic-corpus needs data.root (where the corpus is generated)")
        # An existing corpus is used as it is; a missing one is generated with the default parameters
        # (``fluxvit-data synth --out ROOT`` makes other sizes).
        splits = ensure_synthetic_corpus(cfg.root)["splits"]
        val = splits.get("val", {})
        return (cfg.shards or splits["train"]["shards"],
                cfg.val_shards or (val.get("shards", "") if val.get("num_samples") else ""))
    if cfg.source == "shards":
        if not cfg.shards:
            raise ValueError("data.source=shards needs data.shards (a brace pattern of .tar files)")
        return cfg.shards, cfg.val_shards
    raise ValueError(f"data.source={cfg.source!r} reads no shards; use shards or synthetic-corpus")


def loader_grid(cfg: DataConfig):
    """The ``FluxGrid`` of a data section: exactly ``cfg.grids`` when given, else ``FluxGrid.preset(flux_preset)``."""
    return FluxGrid.from_pairs(cfg.grids) if cfg.grids else FluxGrid.preset(cfg.flux_preset)


def build_loader(cfg: DataConfig, shards: str, *, train: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
                 **view):
    """The one way a stage builds a ``fluxvit.datasets`` loader from its data section.

    Every loader knob of ``cfg`` (``LoaderOptions``: workers, decoder, crop, resampled, shuffle buffer, epoch
    size, ...) is passed on. Training loaders draw ``loader_grid(cfg)``; evaluation loaders read ``shards`` once in
    order at ``num_frames`` x ``img_size`` (or the ``view`` overrides: ``num_frames``, ``img_size``, ``eval_clips``,
    ``eval_crops``, ``batch_size``) without flips.

    Returns:
        a ``fluxvit.datasets.VideoLoader`` yielding ``{"video": (B, 3, T, H, W) | list, "caption", "label", "key"}``.
    """
    opts = cfg.loader_options()
    opts.update({k: v for k, v in view.items() if k in opts})
    extra = {k: v for k, v in view.items() if k not in opts}
    if not train:
        opts.update(flip=False, per_sample_grid=False, resampled=False)
    dc = fd.DataConfig(**opts, shards=shards, train=train, seed=seed, grid=loader_grid(cfg) if train else None,
                       **extra)
    return fd.build_video_loader(dc, rank=rank, world_size=world_size)


class LoaderSource:
    """Micro-batches of ``fluxvit.datasets`` loaders over the data section's shards, epochs chained with
    ``set_epoch``.

    ``batches(start)`` restores a checkpoint's data position by seeking (see ``batches``). ``skipped`` counts the
    bad samples of the training loader only (held-out evaluation keeps its own counts).
    """

    def __init__(self, cfg: DataConfig, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.cfg, self.seed, self.rank, self.world = cfg, seed, rank, world_size
        self.shards, self.val_shards = resolve_shards(cfg)
        self.loader = build_loader(cfg, self.shards, train=True, seed=seed, rank=rank, world_size=world_size)

    @property
    def skipped(self) -> int:
        return int(self.loader.stats.skipped)

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
            video = batch["video"]
            clips = list(video) if isinstance(video, (list, tuple)) else list(video.unbind(0))
            out.extend(c[None] for c in clips)
            if len(out) >= self.cfg.num_val_clips:
                break
        return out[: self.cfg.num_val_clips]


def build_source(cfg: DataConfig, seed: int, rank: int, world_size: int):
    """The batch source named by ``cfg.source``: "synthetic" (``SyntheticClips``), or "shards" /
    "synthetic-corpus" (``LoaderSource``; the corpus is generated under ``cfg.root`` when absent). ``cfg`` is not
    modified."""
    if cfg.source == "synthetic":
        return SyntheticClips(cfg, seed, rank, world_size)
    if cfg.source in ("shards", "synthetic-corpus"):
        return LoaderSource(cfg, seed, rank, world_size)
    raise ValueError(f"unknown data.source {cfg.source!r}; use synthetic, shards or synthetic-corpus")
