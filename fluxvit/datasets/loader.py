"""Streaming video loader over WebDataset shards: the shard schedule (epoch list, rank and worker split, passes,
resampling, resume) and the DataLoader around it. One sample's decoding is :mod:`.samples`, batching
:mod:`.batching`, skip accounting :mod:`.accounting`.

Data flow per rank and DataLoader worker (one *stream*), webdataset's stages marked (wds)::

    epoch shard list (source weights, (seed, epoch) shuffle) -> rank split -> worker split (every W-th shard)
      | or weighted resampling -> tar streaming with a counting handler (wds tarfile_to_samples, ShardReader)
      -> resume skip -> shuffle buffer (wds shuffle) -> decode + frame sampling + crop/resize
      -> batch (one Flux (T, H) per batch)

Batching happens inside the worker because the Flux grid draws one ``(T, H)`` per batch (as released): every
clip of a batch is decoded at that frame count and resized to that resolution. A sample that cannot be read, and
a shard that cannot be opened or is truncated, is counted and skipped; the counts and keys travel with the batches
to the main process, which logs them under one process-wide rate limit (:data:`~fluxvit.datasets.accounting.skip_log`: 5 lines, then one per
30 s, across epochs, passes and loaders) and exposes them as :attr:`VideoLoader.stats` and :func:`stats`.

**Equal steps on every rank.** In training every stream takes the same number of batches per epoch,
``ceil(ceil(epoch_size / (B * world)) / workers)``; a stream whose shards hold fewer samples re-reads them (a
new *pass*, reshuffled), a rank or worker left without a shard reads one it shares with another, and the loader
warns once. With an unknown epoch length (no ``sizes.json``, no ``epoch_size``) an epoch is one pass per stream,
its last partial batch completed from the next pass.

**Resume bound.** :meth:`VideoLoader.state_dict` records ``(epoch, samples_seen)``. On restore every stream
skips the samples it had delivered: whole shards whose size is known from ``sizes.json`` are not opened, the
rest of a partial shard is read without decoding. Because a stream reads ``shuffle_buffer`` samples ahead of
what it delivers, a restored run repeats at most ``shuffle_buffer`` samples and never sees at most
``shuffle_buffer`` samples, per stream (``world_size * num_workers`` streams), plus the samples that failed to
decode before the save. This holds while no stream runs out of shards before the others (always true in
resampled mode, and with equal shard counts per worker otherwise). Without a shuffle buffer (and no failed
sample before the save) the restored batches equal the uninterrupted ones value for value: each batch's random
draws are seeded by its position in its stream, and DataLoader worker ``i`` plays stream ``(i + n) % W`` after a
resume at batch ``n``.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import random
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from fluxvit.logs import warn_once

from .accounting import DataStats, flush_report, new_report, skip_log, stats
from .batching import batch_buffer, collate_videos
from .config import DataConfig
from .decoders import resolve_backend
from .samples import SampleError, process_sample
from .shards import ShardReader, parse_shard_spec, shard_sizes
from .augment import flatten_repeats

__all__ = [
    "DataStats", "SampleError", "VideoShardDataset", "VideoLoader", "build_video_loader", "collate_videos",
    "loader_state", "process_sample", "stats",
]

log = logging.getLogger(__name__)


def _dist_info(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _worker_batches_delivered(batches_per_rank: int, worker: int, num_workers: int) -> int:
    """Batches worker ``worker`` delivered when its rank consumed ``batches_per_rank`` (DataLoader round-robin)."""
    return max(0, math.ceil((batches_per_rank - worker) / num_workers))


class VideoShardDataset(IterableDataset):
    """An iterable of ready batches (dicts from :func:`collate_videos`) for one rank; see the module docstring.

    Set :attr:`epoch` and :attr:`resume_samples` before each iteration (the :class:`VideoLoader` does it).
    """

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, *, train: bool = True, seed: int = 0,
                 eval_clips: int = 1, eval_crops: int = 1) -> None:
        super().__init__()
        cfg.validate()
        if eval_crops not in (1, 3) or eval_clips < 1:
            raise ValueError(f"evaluation views need eval_clips >= 1 and eval_crops 1 or 3, got {eval_clips} and "
                             f"{eval_crops}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.train, self.seed, self.eval_clips, self.eval_crops = train, seed, eval_clips, eval_crops
        self.grid = cfg.flux_grid()
        self.sources = parse_shard_spec(cfg.shards)
        self.urls = [u for s in self.sources for u in s.urls]
        self._flip_of = {u: s.flip for s in self.sources for u in s.urls}
        self.sizes = shard_sizes(self.urls) or {}
        self.epoch_size = cfg.epoch_size
        if self.epoch_size is None and self.sizes and all(u in self.sizes for u in self.urls):
            self.epoch_size = self._weighted_size() if self.train else sum(self.sizes[u] for u in self.urls)
        if cfg.resampled and self.epoch_size is None:
            raise ValueError("resampled mode needs epoch_size (no sizes.json beside the shards)")
        self.epoch = 0
        self.resume_samples = 0

    # -- sizes ---------------------------------------------------------------------------------------------------
    def num_workers(self) -> int:
        return max(1, self.cfg.num_workers)

    @staticmethod
    def shard_reads(weight: float, num_shards: int) -> int:
        """Shards of a source read per training epoch without resampling: ``max(1, round(weight * n))``."""
        return max(1, round(weight * num_shards))

    def _weighted_size(self) -> int:
        total = 0.0
        for s in self.sources:
            total += sum(self.sizes[u] for u in s.urls) * self.shard_reads(s.weight, len(s.urls)) / len(s.urls)
        return max(1, round(total))

    def batches_per_worker(self) -> int | None:
        """Batch quota of every stream in training (``ceil(epoch_size / (B * world)) / workers``), else ``None``.

        It is the same on every rank and worker: a stream whose shards hold fewer samples re-reads them."""
        if not self.train or self.epoch_size is None:
            return None
        per_rank = math.ceil(self.epoch_size / (self.cfg.batch_size * self.world_size))
        return math.ceil(per_rank / self.num_workers())

    # -- streams -------------------------------------------------------------------------------------------------
    def epoch_urls(self) -> list[str]:
        """The shards one epoch reads over all ranks, without resampling.

        Training: each source's shards ``weight`` times (``shard_reads``: whole repeats plus a seeded draw of the
        fraction), shuffled with ``(seed, epoch)`` (the same list on every rank). Evaluation: every shard once, in
        spec order."""
        if not self.train:
            return list(self.urls)
        urls: list[str] = []
        for i, source in enumerate(self.sources):
            n = len(source.urls)
            k = self.shard_reads(source.weight, n)
            urls += list(source.urls) * (k // n)
            if k % n:
                urls += random.Random(f"weight:{self.seed}:{self.epoch}:{i}").sample(list(source.urls), k % n)
        random.Random(f"order:{self.seed}:{self.epoch}").shuffle(urls)
        return urls

    def rank_urls(self) -> list[str]:
        """This rank's share of :meth:`epoch_urls`: every ``world_size``-th shard from ``rank`` (webdataset's
        ``split_by_node`` with the rank given explicitly); in training a rank left without a shard reads shard
        ``rank % n``."""
        urls = self.epoch_urls()
        node = urls[self.rank::self.world_size]
        if not node and urls and self.train:
            node = [urls[self.rank % len(urls)]]
        return node

    def stream_shards(self, worker: int, num_workers: int) -> list[str]:
        """Shard URLs of stream ``(rank, worker)`` for the current epoch without resampling: every
        ``num_workers``-th shard of the rank's share from ``worker`` (as webdataset's ``split_by_worker``); in
        training a worker left without a shard reads shard ``worker % n`` of its rank."""
        node = self.rank_urls()
        if self.train and node and len(node) < num_workers:
            return [node[worker % len(node)]]
        return node[worker::num_workers]

    def resampled_urls(self, worker: int) -> Iterator[str]:
        # webdataset's ResampledShards draws uniformly over URLs; per-source weights need a two-level draw.
        rng = random.Random(f"shards:{self.seed}:{self.epoch}:{self.rank}:{worker}")
        weights = [s.weight for s in self.sources]
        while True:
            source = rng.choices(self.sources, weights)[0]
            yield rng.choice(source.urls)

    def _passes(self, worker: int, num_workers: int) -> Iterator[Any]:
        """The URL sequences this stream reads one after the other: one infinite draw when resampled; else its
        shards (pass 0), then in training the same shards reshuffled for as many passes as its quota needs."""
        cfg = self.cfg
        if cfg.resampled:
            yield self.resampled_urls(worker)
            return
        own = self.stream_shards(worker, num_workers)
        yield own
        if not self.train or not own:
            return
        for p in itertools.count(1):
            again = list(own)
            random.Random(f"pass:{self.seed}:{self.epoch}:{self.rank}:{worker}:{p}").shuffle(again)
            yield again

    def stream_samples(self, worker: int, num_workers: int, skip: int, report: dict,
                       progress: dict | None = None) -> Iterator[dict]:
        """Raw samples of one stream, skipping the first ``skip`` (whole shards unopened when sizes are known),
        shuffled per pass in training. Each sample carries ``__pass__``. The batch builder steers the passes
        through ``progress``: ``good`` (decoded samples; a pass that added none ends the stream), ``more``
        (whether another pass may start) and ``short`` (whether starting one is reported as a re-read)."""
        cfg = self.cfg
        progress = progress if progress is not None else {"good": 0}
        left = {"skip": skip}

        why: dict[str, str] = {}

        def on_error(url: str, reason: str) -> None:
            report["shard_errors"] += 1
            # a broken shard is one skip (per pass): the samples after its break cannot be enumerated ...
            why[url] = reason.split(":")[0]
            report["skipped"][why[url]] += 1
            report["events"] += 1
            report["keys"].append((url, reason))

        def on_lost(url: str, lost: int) -> None:
            # ... unless sizes.json gives its size: then every sample it lost is a skip (on_error counted one)
            report["skipped"][why.get(url, "truncated shard")] += lost - 1
            report["events"] += lost - 1

        reader = ShardReader(on_error, self.sizes, on_lost)

        def urls_of(urls):
            for url in urls:
                size = self.sizes.get(url)
                if left["skip"] and size is not None and size <= left["skip"]:
                    left["skip"] -= size  # exact resume: a whole shard of known size is not opened
                    continue
                yield url

        def skipping(samples):
            for sample in samples:
                if left["skip"]:
                    left["skip"] -= 1  # exact mid-shard resume: read, not decoded
                    continue
                yield sample

        shuffle_rng = random.Random(f"shuffle:{self.seed}:{self.epoch}:{self.rank}:{worker}")
        good_before = 0
        for p, urls in enumerate(self._passes(worker, num_workers)):
            if p:
                if progress["good"] == good_before or not progress.get("more", True):
                    return  # a whole pass gave nothing usable, or the epoch needs no more samples
                if progress.get("short", True):
                    report["passes"] = p
            good_before = progress["good"]
            samples = skipping(reader(urls_of(urls)))
            if self.train and cfg.shuffle_buffer > 1:
                from webdataset import shuffle

                samples = shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_buffer, rng=shuffle_rng)(samples)
            for sample in samples:
                sample["__flip__"] = self._flip_of.get(sample["__url__"], True)
                sample["__pass__"] = p
                yield sample

    def __iter__(self) -> Iterator[dict]:
        cfg = self.cfg
        info = get_worker_info()
        consumed = self.resume_samples // (cfg.batch_size * self.world_size)  # batches this rank already took
        # The DataLoader takes batches from its workers round-robin starting at worker 0; after a resume at batch
        # ``consumed`` the next batch belongs to stream ``consumed % W``, so DataLoader worker i plays stream
        # (i + consumed) % W and the restored order equals the uninterrupted one.
        num_workers = info.num_workers if info is not None else 1
        worker = (info.id + consumed) % num_workers if info is not None else 0
        tag = f"{self.seed}:{self.epoch}:{self.rank}:{worker}"
        delivered = _worker_batches_delivered(consumed, worker, num_workers)
        quota = self.batches_per_worker()
        if quota is not None:
            quota = max(0, quota - delivered)
            if quota == 0:
                return
        report = new_report()
        progress = {"good": 0}
        samples = self.stream_samples(worker, num_workers, delivered * cfg.batch_size, report, progress)
        made = 0
        while quota is None or made < quota:
            # Exact resume: the Flux draw, frame offsets, crops and flips of a batch come from generators seeded by
            # the batch's position in the stream, so a restored stream draws what the uninterrupted one drew.
            position = f"{tag}:{delivered + made}"
            sample_rng, grid_rng = random.Random(f"sample:{position}"), random.Random(f"grid:{position}")
            frames, size = cfg.num_frames, cfg.img_size
            if self.grid is not None and not cfg.per_sample_grid:
                frames, size = self.grid.sample(grid_rng)
            batch: list[dict] = []
            buf = None
            if self.grid is None or not cfg.per_sample_grid:
                # one (T, S) for the whole batch: decode straight into the batch tensor (no stacking copy)
                # repeated augmentation (training) and multi-view evaluation write (B, V, 3, T, S, S)
                n_views = cfg.num_sample if self.train else self.eval_clips * self.eval_crops
                views = (n_views,) if n_views > 1 else ()
                buf = batch_buffer((cfg.batch_size, *views, 3, frames, size, size), in_worker=info is not None)
            # Unknown epoch length: an epoch is one pass, its last partial batch completed from the next pass.
            progress["more"] = quota is not None or made == 0
            progress["short"] = quota is not None or made == 0
            for sample in samples:
                if self.grid is not None and cfg.per_sample_grid:
                    frames, size = self.grid.sample(grid_rng)
                try:
                    batch.append(process_sample(sample, cfg, num_frames=frames, size=size, rng=sample_rng,
                                                train=self.train, eval_clips=self.eval_clips,
                                                eval_crops=self.eval_crops, flip_allowed=sample["__flip__"],
                                                out=None if buf is None else buf[len(batch)]))
                    progress["good"] += 1
                    progress["more"] = True
                except SampleError as exc:
                    reason = str(exc)
                    report["skipped"][reason.split(":")[0]] += 1
                    report["events"] += 1
                    report["keys"].append((sample["__key__"], reason))
                    continue
                if len(batch) == cfg.batch_size:
                    break
            if not batch or (len(batch) < cfg.batch_size and self.train):
                break  # stream exhausted; training drops the last partial batch
            # image samples (1 frame) are not in the batch buffer: then the batch is stacked or listed
            in_buf = buf is not None and all(e["video"].data_ptr() == buf[i].data_ptr() for i, e in enumerate(batch))
            out = collate_videos(batch, buf[:len(batch)] if in_buf else None)
            if self.train and cfg.num_sample > 1:
                out = flatten_repeats(out, cfg.num_sample)
            report["samples"] = len(batch)
            out["_report"] = flush_report(report)
            made += 1
            yield out
            if len(batch) < cfg.batch_size:
                break
        if report["events"] or report["passes"]:  # skips after the last batch still reach the counters
            yield {"_report": flush_report(report)}


def loader_state(epoch: int, samples_seen: int) -> dict[str, int]:
    """The data position a checkpoint stores: ``{"epoch", "samples_seen"}`` (samples over all ranks this epoch)."""
    return {"epoch": int(epoch), "samples_seen": int(samples_seen)}


class VideoLoader:
    """The iterable :func:`build_video_loader` returns: a DataLoader over :class:`VideoShardDataset` plus epoch,
    resume and statistics handling.

    Iterating yields batches ``{"video": (B, 3, T, H, W) float | list[(3, T_i, H_i, W_i)], "caption": list[str],
    "label": LongTensor (B,), "key": list[str]}``.

    * ``set_epoch(e)`` before each epoch: shard order, shuffles and draws are seeded by ``(seed, e)``.
    * ``state_dict()`` / ``load_state_dict(sd)``: ``{"epoch", "samples_seen"}``; the next iteration resumes there.
    * ``stats`` (this loader) and :func:`stats` (process-wide): delivered / skipped samples and skip reasons.
    """

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, **mode: Any) -> None:
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.dataset = VideoShardDataset(cfg, rank, world_size, **mode)
        self.train = self.dataset.train
        if cfg.num_workers > 0:
            resolve_backend(cfg.decoder)  # import the decoder once here: forked workers inherit it every epoch
        self.stats = DataStats()
        self.epoch = 0
        self.samples_seen = 0
        self._completed = False  # the last iteration reached the end of the epoch
        self._warned: set[str] = set()

    @property
    def num_batches(self) -> int | None:
        """Batches per epoch on this rank (``None`` when shard sizes and ``epoch_size`` are unknown).

        In evaluation it counts the batches of this rank's shards, assuming every sample decodes."""
        ds = self.dataset
        if self.train:
            per_worker = ds.batches_per_worker()
            return None if per_worker is None else per_worker * ds.num_workers()
        if len(ds.sizes) != len(ds.urls):
            return None
        total = 0
        for worker in range(ds.num_workers()):
            samples = sum(ds.sizes[u] for u in ds.stream_shards(worker, ds.num_workers()))
            total += math.ceil(samples / self.cfg.batch_size)
        return total

    @property
    def num_samples(self) -> int | None:
        """Samples per epoch over all ranks (``epoch_size`` or ``sizes.json``), ``None`` when unknown."""
        return self.dataset.epoch_size

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("loader length unknown: set DataConfig.epoch_size or provide sizes.json")
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning at the next iteration."""
        self.epoch, self.samples_seen, self._completed = int(epoch), 0, False

    def state_dict(self) -> dict[str, int]:
        """Current data position, see :func:`loader_state`."""
        return loader_state(self.epoch, self.samples_seen)

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state`` (from :meth:`state_dict`) at the next iteration; see the module docstring's bound."""
        self.epoch, self.samples_seen = int(state["epoch"]), int(state["samples_seen"])
        self._completed = False

    def _dataloader(self) -> DataLoader:
        cfg = self.cfg
        self.dataset.epoch, self.dataset.resume_samples = self.epoch, self.samples_seen
        kwargs: dict[str, Any] = {}
        if cfg.num_workers > 0:
            kwargs.update(prefetch_factor=cfg.prefetch_factor, persistent_workers=False)
        return DataLoader(self.dataset, batch_size=None, num_workers=cfg.num_workers, pin_memory=cfg.pin_memory,
                          **kwargs)

    def _warn_once(self, kind: str, msg: str, *args: Any) -> None:
        warn_once(log, msg, *args, key=kind, seen=self._warned)  # once per loader and kind

    def _check_balance(self) -> None:
        """Warn (once per loader) when this rank's streams hold fewer samples than their share of a training epoch:
        they re-read their shards so that every rank takes the same number of steps."""
        ds, cfg = self.dataset, self.cfg
        quota = ds.batches_per_worker()
        if quota is None or cfg.resampled:
            return
        nw = ds.num_workers()
        if len(ds.epoch_urls()) < self.world_size * nw:
            self._warn_once("few", "%d shards for %d ranks x %d workers: streams share shards (every stream "
                            "reads at least one)", len(ds.epoch_urls()), self.world_size, nw)
        if not all(u in ds.sizes for u in ds.urls):
            return
        need = quota * cfg.batch_size
        short = [sum(ds.sizes[u] for u in ds.stream_shards(w, nw)) for w in range(nw)]
        short = [n for n in short if n < need]
        if short:
            self._warn_once("short", "rank %d: %d of its %d data streams hold fewer samples (%d) than the %d "
                            "batches x %d they take per epoch; they re-read their shards so that every rank takes "
                            "the same %d steps per epoch (ceil(epoch_size %d / (batch %d x %d ranks)))",
                            self.rank, len(short), nw, min(short), quota, cfg.batch_size, quota * nw,
                            ds.epoch_size, cfg.batch_size, self.world_size)

    def _report(self, report: dict) -> None:
        self.stats.update(report)
        stats().update(report)
        keys = report.get("keys", ())
        for key, reason in keys:
            skip_log("skipped %s: %s", key, reason)
        missing = int(report.get("events", len(keys))) - len(keys)
        if missing > 0:
            skip_log.suppress(missing)
        if report.get("passes") and self.train:
            self._warn_once("short", "rank %d: a data stream ran out of samples and re-read its shards (pass %d) to "
                            "fill its share of the epoch (shards smaller than the epoch share, or skipped samples)",
                            self.rank, report["passes"])

    def __iter__(self) -> Iterator[dict]:
        if self._completed:  # iterating again without set_epoch repeats the same epoch from its start
            self.samples_seen, self._completed = 0, False
        if self.train:
            self._check_balance()
        for batch in self._dataloader():
            report = batch.pop("_report", None)
            if report is not None:
                self._report(report)
            if "video" not in batch:
                continue
            self.samples_seen += self.cfg.batch_size * self.world_size
            yield batch
        self._completed = True


def build_video_loader(cfg: DataConfig, *, train: bool = True, seed: int = 0, eval_clips: int = 1,
                       eval_crops: int = 1, rank: int | None = None, world_size: int | None = None) -> VideoLoader:
    """Build the loader of one rank over ``cfg.shards``. See :class:`VideoLoader`.

    Args:
        cfg: the data section (shards, grid, decoder, augmentation, batch size, workers, ...).
        train: training mode (shuffles, TSN sampling, random crops, every stream takes the same number of
            batches) or evaluation mode (shard order, segment-middle sampling, resize + centre / three crops,
            keeps every sample once).
        seed: base seed; shard order, sample shuffle, frame sampling, crops and grid draws derive from
            ``(seed, epoch, rank, worker)``.
        eval_clips, eval_crops: evaluation views per video (temporal clips, and 1 or 3 spatial crops).
        rank, world_size: default to torch.distributed, then the ``RANK`` / ``WORLD_SIZE`` environment
            variables, then 0 / 1.
    """
    rank, world_size = _dist_info(rank, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    return VideoLoader(cfg, rank, world_size, train=train, seed=seed, eval_clips=eval_clips, eval_crops=eval_crops)
