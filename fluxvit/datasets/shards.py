"""WebDataset shards: source specs, ``sizes.json``, streaming tar reading (truncation-safe) and writing.

Shard spec syntax (``DataConfig.shards``)::

    SOURCE[::WEIGHT][::noflip] [; SOURCE[::WEIGHT][::noflip] ...]

* ``SOURCE`` is a local path, a ``pipe:COMMAND`` (its stdout is read) or a URL webdataset's ``gopen`` understands,
  with brace ranges: ``data/k400/{00000..00099}.tar``. Several brace groups and comma lists ``{a,b}`` work.
* ``WEIGHT`` (float, default 1) is the source's share of the samples drawn in resampled mode.
* ``noflip`` turns horizontal flipping off for that source (direction-sensitive data such as SSv2).
* Sources are separated by ``;`` (so a ``pipe:`` command cannot contain ``;``).

Samples are read in the video2dataset layout: members ``KEY.mp4`` (or another video extension), ``KEY.txt``,
``KEY.json`` and optional ``KEY.cls``, grouped by key in tar order. ``sizes.json`` beside the shards maps shard
basenames to sample counts (open_clip convention); video2dataset's ``NNNNN_stats.json`` is the fallback.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

from braceexpand import braceexpand

__all__ = [
    "ShardSource", "ShardReader", "parse_shard_spec", "expand_urls", "shard_sizes", "open_shard", "iter_tar_samples",
    "IMAGE_EXTENSIONS", "TruncatedShard", "ShardWriter", "VIDEO_EXTENSIONS", "VIDEO_KEYS", "shard_classes", "shard_error_reason", "label_map_difference",
]

log = logging.getLogger(__name__)

# The one set of video names shared by writer and reader: the file suffixes ``make-shards --folder`` takes (any
# case) and the tar member keys the loader decodes. ``make-shards`` stores a re-encoded video as ``KEY.mp4`` and,
# with ``--copy``, under the file's lowercased suffix, which is always one of these.
VIDEO_EXTENSIONS = ("mp4", "m4v", "mov", "mkv", "webm", "avi", "mpg", "mpeg", "ts", "m2ts", "flv", "3gp", "wmv",
                    "ogv", "gif")
VIDEO_KEYS = VIDEO_EXTENSIONS
# Image-text samples (CC3M/COCO-style shards) train as 1-frame videos.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class ShardSource:
    """One source of a shard spec: expanded ``urls``, sampling ``weight``, whether ``flip`` is allowed."""

    urls: tuple[str, ...]
    weight: float = 1.0
    flip: bool = True
    spec: str = ""


def expand_urls(pattern: str) -> list[str]:
    """Brace-expand one shard pattern (``a/{000..009}.tar`` -> 10 paths)."""
    return [u for u in braceexpand(pattern.strip()) if u]


def parse_shard_spec(spec: str) -> list[ShardSource]:
    """Parse ``SOURCE[::WEIGHT][::noflip];...`` (see module docstring) into :class:`ShardSource` objects.

    Raises:
        ValueError: empty spec, bad weight or unknown option.
    """
    sources = []
    for part in (p.strip() for p in str(spec).split(";")):
        if not part:
            continue
        pattern, *options = part.split("::")
        weight, flip = 1.0, True
        for opt in (o.strip() for o in options):
            if opt == "noflip":
                flip = False
            else:
                try:
                    weight = float(opt)
                except ValueError:
                    raise ValueError(f"bad shard option {opt!r} in {part!r}: expected a weight or 'noflip'") from None
                if weight <= 0:
                    raise ValueError(f"shard weight must be > 0, got {weight} in {part!r}")
        urls = expand_urls(pattern)
        if not urls:
            raise ValueError(f"shard pattern {pattern!r} expands to nothing")
        sources.append(ShardSource(tuple(urls), weight, flip, part))
    if not sources:
        raise ValueError("empty shard spec")
    return sources


def _local_path(url: str) -> str | None:
    if url.startswith("file:"):
        return url[5:]
    if "://" in url or url.startswith("pipe:"):
        return None
    return url


def shard_sizes(urls: list[str]) -> dict[str, int] | None:
    """Sample count of every shard, from ``sizes.json`` (or ``NNNNN_stats.json``) beside it; ``None`` if unknown."""
    cache: dict[str, dict] = {}
    out: dict[str, int] = {}
    for url in urls:
        path = _local_path(url)
        if path is None:
            return None
        folder, name = os.path.split(path)
        if folder not in cache:
            sizes_file = os.path.join(folder or ".", "sizes.json")
            try:
                with open(sizes_file) as f:
                    cache[folder] = json.load(f)
            except (OSError, ValueError):
                cache[folder] = {}
        if name in cache[folder]:
            out[url] = int(cache[folder][name])
            continue
        stats = os.path.join(folder or ".", name.split(".")[0] + "_stats.json")
        try:
            with open(stats) as f:
                out[url] = int(json.load(f)["successes"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return out


def shard_classes(spec: str) -> list[str] | None:
    """Class names from ``classes.json`` beside the shards of ``spec`` (``make-shards`` writes it), ``None`` when
    no local source has one.

    Raises:
        ValueError: sources carry different class lists.
    """
    found: dict[str, list[str]] = {}
    for source in parse_shard_spec(spec):
        path = _local_path(source.urls[0])
        if path is None:
            continue
        file = os.path.join(os.path.dirname(path) or ".", "classes.json")
        if os.path.exists(file):
            with open(file) as f:
                found[file] = [str(n) for n in json.load(f)]
    lists = {tuple(v) for v in found.values()}
    if len(lists) > 1:
        raise ValueError(f"the shard sources carry different classes.json files: {sorted(found)}")
    return list(lists.pop()) if lists else None


def label_map_difference(expected: list[str], found: list[str], expected_name: str, found_name: str) -> str | None:
    """One line naming the first difference between two class lists (index -> name), ``None`` when they agree.

    E.g. ``class 2 is 'jump' in the model but 'run' in the shards``; a shorter list: ``the shards have 3 classes,
    the model 4 (the first missing: 'swim')``. Used where a model meets labelled data (training vs held-out
    shards, a stage-3 export vs evaluation shards): indices that mean other classes give a wrong accuracy silently.
    """
    for i, (a, b) in enumerate(zip(expected, found)):
        if a != b:
            return (f"the label maps differ: class {i} is {a!r} in {expected_name} but {b!r} in {found_name}; "
                    "make every split with the same fluxvit-data make-shards --classes FILE (e.g. the training "
                    "shards' classes.json)")
    if len(expected) != len(found):
        longer, name = (expected, expected_name) if len(expected) > len(found) else (found, found_name)
        return (f"the label maps differ: {expected_name} has {len(expected)} classes, {found_name} {len(found)} "
                f"(the first only in {name}: {longer[min(len(expected), len(found))]!r}); make every split with the "
                "same fluxvit-data make-shards --classes FILE")
    return None


def open_shard(url: str) -> IO[bytes]:
    """Open a shard for streaming: local file, ``pipe:`` command or URL (via webdataset's ``gopen``)."""
    path = _local_path(url)
    if path is not None:
        return open(path, "rb")
    from webdataset.gopen import gopen  # handles pipe:, http(s) via curl, ...

    return gopen(url, "rb")


class TruncatedShard(Exception):
    """Raised by :func:`iter_tar_samples` after the last complete sample of a truncated or corrupt tar."""


def shard_error_reason(exc: BaseException) -> str:
    """Why a shard could not be read, in the project's words: ``"empty shard"``, ``"not a tar archive"`` (garbage
    from the first header on), ``"truncated shard"`` (the tar ends early or breaks after a good start), or
    ``"cannot open shard: ..."``."""
    text = str(exc.args[0]) if exc.args else ""
    if isinstance(exc, tarfile.ReadError) and text == "empty file":
        return "empty shard"
    if isinstance(exc, tarfile.ReadError) and ("invalid header" in text or "bad checksum" in text):
        return "not a tar archive"
    if isinstance(exc, (tarfile.TarError, EOFError)):
        return "truncated shard"
    text = str(exc.args[0]) if exc.args else type(exc).__name__
    text = "".join(ch if ch.isprintable() else "?" for ch in text.replace("\n", " "))[:200]
    return f"cannot open shard: {type(exc).__name__}: {text}"


class ShardReader:
    """Samples ``{"__key__", "__url__", ext: bytes}`` of a sequence of shard URLs, in tar order.

    Tar streaming is webdataset's (``tarfile_to_samples``: ``gopen`` for paths, ``pipe:`` and URLs, tar member
    iteration, grouping by key) with this reader's handler: a shard that cannot be opened, is truncated or is
    corrupt is reported once through ``on_error(url, reason)`` and skipped, the stream continuing with the next
    shard. What webdataset lacks is added here: the sample that was being read when a shard broke (its members
    may be incomplete) is dropped, every complete sample before it is kept.

    A tar that breaks after a good start can also end silently (Python's ``tarfile`` takes an invalid header
    after the first as the end of the archive), so with ``sizes`` (``sizes.json``) a shard read to its end with
    fewer samples than its size is reported too (``"truncated shard: k of n samples"``), and ``on_lost`` learns how
    many samples every broken shard of known size lost.

    Args:
        on_error: called with ``(url, reason)`` per broken shard (reason from :func:`shard_error_reason`).
        sizes: ``{url: samples}`` of the shards whose size is known.
        on_lost: called with ``(url, samples lost)`` when a broken shard of known size has been read to its end.
    """

    def __init__(self, on_error=None, sizes: dict | None = None, on_lost=None) -> None:
        self.on_error, self.sizes, self.on_lost = on_error, sizes or {}, on_lost
        self.errors: list[tuple[str, str]] = []
        self._url, self._member = "", ""
        self._failed: set[str] = set()
        self._broken: set[tuple[str, str]] = set()
        self._read = 0  # samples of the current shard yielded so far

    def _report(self, url: str, reason: str) -> None:
        self._failed.add(url)
        self.errors.append((url, reason))
        if self.on_error is not None:
            self.on_error(url, reason)

    def _finish(self) -> None:
        """The current shard was read to its end: compare what it gave with its known size."""
        url, expected = self._url, self.sizes.get(self._url)
        if not url or expected is None or self._read >= expected:
            return
        if url not in self._failed:  # ended silently
            self._report(url, f"truncated shard: {self._read} of {expected} samples")
        if self.on_lost is not None:
            self.on_lost(url, expected - self._read)

    def _urls(self, urls):
        for url in urls:
            self._finish()
            self._url, self._member, self._read = url, "", 0
            self._failed.discard(url)  # a shard read again (resampling, passes) reports again
            yield {"url": url}
        self._finish()
        self._url = ""

    def _rename(self, name: str) -> str:
        self._member = name  # called before the member's data is read: the member a read error belongs to
        return name

    def _handler(self, exc: BaseException) -> bool:
        url = self._url
        if self._member:
            key = _split_name(self._member)
            if key is not None:
                self._broken.add((url, key[0]))
        if url not in self._failed:  # webdataset calls the handler at member and at shard level for one break
            self._report(url, shard_error_reason(exc))
        return True

    def __call__(self, urls) -> Iterator[dict]:
        """Stream the samples of ``urls`` (any iterable of URL strings, consumed lazily)."""
        from webdataset import tarfile_to_samples

        samples = tarfile_to_samples(handler=self._handler, rename_files=self._rename)(self._urls(urls))
        for sample in samples:
            if self._broken and (sample["__url__"], sample["__key__"]) in self._broken:
                continue  # incomplete: the shard broke while it was read
            if os.path.basename(sample["__key__"]).startswith("__"):
                continue
            self._read += 1
            yield sample


_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def _split_name(name: str) -> tuple[str, str] | None:
    m = _KEY_RE.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


def iter_tar_samples(stream: IO[bytes], url: str = "", skip: int = 0) -> Iterator[dict]:
    """Stream the samples of one open WebDataset tar: dicts ``{"__key__", "__url__", ext: bytes}`` in tar order.

    Args:
        stream: the open shard.
        url: recorded in each sample as ``__url__``.
        skip: samples to pass over first.

    Raises:
        TruncatedShard: the tar ends early or is corrupt; every complete sample before that was yielded.
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander

    reader = ShardReader()
    files = tar_file_expander([{"url": url, "stream": stream}], handler=reader._handler,
                              rename_files=reader._rename)
    reader._url = url
    for i, sample in enumerate(group_by_keys(files, handler=reader._handler)):
        if (url, sample["__key__"]) in reader._broken or os.path.basename(sample["__key__"]).startswith("__"):
            continue
        if i >= skip:
            yield sample
    if reader.errors:
        raise TruncatedShard(f"{url}: {reader.errors[0][1]}")


@dataclass
class ShardWriter:
    """Write samples into ``PREFIX%05d.tar`` shards of ``max_count`` samples plus ``sizes.json``.

    Also writes video2dataset-style ``NNNNN_stats.json`` per shard. Tar members carry mtime 0 and sorted
    extensions, so the same samples give byte-identical shards.

    Usage: ``with ShardWriter(out_dir, 100) as w: w.write({"__key__": k, "mp4": b, "txt": s})``.
    """

    out_dir: str | Path
    max_count: int = 1000
    prefix: str = ""
    _tar: tarfile.TarFile | None = field(default=None, init=False, repr=False)
    _index: int = field(default=-1, init=False)
    _count: int = field(default=0, init=False)
    sizes: dict[str, int] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.max_count < 1:
            raise ValueError("max_count must be >= 1")

    @property
    def _name(self) -> str:
        return f"{self.prefix}{self._index:05d}.tar"

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self.sizes[self._name] = self._count
        stats = {"count": self._count, "successes": self._count, "failed_to_download": 0, "failed_to_decode": 0}
        (self.out_dir / f"{self.prefix}{self._index:05d}_stats.json").write_text(json.dumps(stats))
        self._tar = None

    def write(self, sample: dict) -> None:
        """Add one sample: ``__key__`` plus ``ext -> bytes | str | dict`` (dicts are written as JSON)."""
        if self._tar is None or self._count >= self.max_count:
            self._close_shard()
            self._index += 1
            self._count = 0
            self._tar = tarfile.open(self.out_dir / self._name, "w", format=tarfile.USTAR_FORMAT)
        key = sample["__key__"]
        for ext in sorted(k for k in sample if not k.startswith("__")):
            value = sample[ext]
            if isinstance(value, dict):
                value = json.dumps(value, sort_keys=True)
            data = value.encode() if isinstance(value, str) else bytes(value)
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1

    def close(self) -> dict[str, int]:
        """Finish the last shard and write ``sizes.json``; returns ``{shard name: samples}``."""
        self._close_shard()
        (self.out_dir / "sizes.json").write_text(json.dumps(self.sizes, indent=1, sort_keys=True))
        return self.sizes

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
