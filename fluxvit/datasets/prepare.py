"""Training-ready shards: verify, re-encode and shard a list of videos (``fluxvit-data make-shards``).

Every input is decoded before it is stored: an unreadable, empty or undecodable file is reported as failed and
never written. By default a video is re-encoded for training (:class:`Encoding`: H.264, shorter side
``short_side``, a keyframe every ``keyframe_interval`` frames, constant quality ``crf``, frame rate capped at
``max_fps``, no audio): sparse Flux sampling then seeks to a near keyframe instead of decoding a whole
default-GOP stretch (``benchmarks/bench_data.py`` measures both). ``Encoding(copy=True)`` stores the original
bytes (still verified).

Shard ``i`` holds inputs ``i * N .. (i + 1) * N - 1`` of the list (fewer when some fail), so a killed run resumes
with the same layout: a shard is finished when its ``NNNNN_stats.json`` exists (written after the tar is renamed
into place) and is not made again, except for the inputs its stats name as failed: a rerun retries those (a fixed
file is picked up, the stored samples are kept). ``sizes.json`` is rewritten from every shard's stats at the end.
"""
from __future__ import annotations

import io
import json
import math
import logging
import multiprocessing
import os
import tarfile
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .decoders import DAMAGED_FRAMES, NOT_A_VIDEO, DecodeError, clean_reason, decode_clips, rotate_frames
from .shards import VIDEO_EXTENSIONS, VIDEO_KEYS, iter_tar_samples

__all__ = ["Encoding", "LabelMap", "encode_video", "make_shards", "prepare_sample", "read_classes"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Encoding:
    """How ``make-shards`` stores a video. The defaults (256 px, a keyframe every 32 frames, crf 23, at most 15 fps)
    were the fastest and smallest of the candidates ``benchmarks/bench_data.py`` measured at the Flux grids (the
    README's data section has the table). ``max_fps=0`` keeps the source rate (short clips, dense sampling);
    a larger ``short_side`` keeps detail for the 280-336 px grids at a higher decode and disk cost.

    Attributes:
        short_side: shorter side in pixels after re-encoding (never upscaled; sides kept even).
        keyframe_interval: frames between keyframes (the GOP); small values make sparse sampling cheap.
        crf: x264 constant rate factor (lower = better quality, larger files).
        max_fps: frame-rate cap; faster sources drop frames evenly (0 = keep the rate).
        preset: x264 speed preset of the encoder.
        copy: store the original bytes instead of re-encoding (still verified by decoding).
    """

    short_side: int = 256
    keyframe_interval: int = 32
    crf: int = 23
    max_fps: float = 15.0
    preset: str = "veryfast"
    copy: bool = False

    def __post_init__(self) -> None:
        if self.short_side < 16 or self.keyframe_interval < 1 or not 0 <= self.crf <= 51 or self.max_fps < 0:
            raise ValueError(f"bad encoding {self}: short_side >= 16, keyframe_interval >= 1, 0 <= crf <= 51, "
                             "max_fps >= 0")


def encode_video(data: bytes, enc: Encoding) -> bytes:
    """Re-encode video bytes to an H.264 mp4 as ``enc`` says (video only), as a player shows the source: the
    display rotation applied to the pixels, the frames an edit list discards left out, frames placed by their
    presentation time (a rate cap keeps the frame shown at each output tick).

    Raises:
        DecodeError: the input cannot be opened or decoded, or holds no frame.
    """
    import av

    try:
        src = av.open(io.BytesIO(data))
    except Exception as exc:  # PyAV raises several error types for bad containers: its words go to the debug log
        log.debug("PyAV could not open the input: %s", clean_reason(exc))
        raise DecodeError(NOT_A_VIDEO) from None
    buf = io.BytesIO()
    try:
        with src, av.open(buf, mode="w", format="mp4") as out:
            if not src.streams.video:
                raise DecodeError("no video stream")
            vin = src.streams.video[0]
            rate = Fraction(vin.average_rate or vin.guessed_rate or 30)
            out_rate = min(rate, Fraction(enc.max_fps).limit_denominator(1001)) if enc.max_fps else rate
            # a capped rate places frames on its own ticks (one frame each); an uncapped one keeps every frame at
            # its time (variable rate stays variable) on a 1/90000 s clock
            clock = out_rate if out_rate < rate else Fraction(90000)
            vout, kept, index, start, rotation = None, -1, 0, None, 0
            for frame in src.decode(vin):  # displayed frames only: PyAV drops what an edit list discards
                timed = frame.time is not None
                if timed:  # the output slot from the presentation time (variable rate too)
                    start = frame.time if start is None else start
                    slot = math.floor((frame.time - start) * clock + 1e-6)
                else:
                    slot = int(index * out_rate / rate)  # evenly dropped frames when the rate is capped
                index += 1
                if slot <= kept:
                    continue
                kept = slot
                if vout is None:
                    rotation = int(getattr(frame, "rotation", 0) or 0) % 360
                if rotation:  # a phone's display rotation goes into the pixels; the new file carries no tag
                    frame = av.VideoFrame.from_ndarray(
                        np.ascontiguousarray(rotate_frames(frame.to_ndarray(format="rgb24"), rotation)),
                        format="rgb24")
                if vout is None:
                    h, w = frame.height, frame.width
                    scale = min(1.0, enc.short_side / min(h, w))
                    vout = out.add_stream("libx264", rate=out_rate)
                    vout.width = max(2, int(round(w * scale / 2)) * 2)
                    vout.height = max(2, int(round(h * scale / 2)) * 2)
                    vout.pix_fmt = "yuv420p"
                    vout.codec_context.gop_size = enc.keyframe_interval
                    vout.codec_context.time_base = 1 / clock
                    vout.options = {"preset": enc.preset, "crf": str(enc.crf)}
                img = frame.reformat(width=vout.width, height=vout.height, format="yuv420p")
                img.pts, img.time_base = slot if timed else int(slot * clock / out_rate), 1 / clock
                img.duration = max(1, round(clock / out_rate))  # the last frame's duration in the file
                for packet in vout.encode(img):
                    out.mux(packet)
            if vout is None:
                raise DecodeError("no frame decoded")
            for packet in vout.encode():
                out.mux(packet)
    except DecodeError:
        raise
    except Exception as exc:
        log.debug("re-encoding failed: %s", clean_reason(exc))
        raise DecodeError(DAMAGED_FRAMES) from None
    return buf.getvalue()


def verify_video(data: bytes, num_frames: int = 8) -> None:
    """Decode ``num_frames`` frames spread over the video (PyAV); raises :class:`DecodeError` when it cannot."""
    if not data:
        raise DecodeError("empty file")
    try:
        decode_clips(data, num_frames, backend="pyav", sampling="middle")
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(clean_reason(exc)) from None


def read_classes(path: str | Path) -> list[str]:
    """Class names of a ``--classes`` file: a JSON list, or one name per line (blank lines ignored)."""
    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        names = [str(n) for n in json.loads(text)]
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"{path}: class names must be non-empty and unique")
    return names


@dataclass
class LabelMap:
    """Label name -> index. ``names`` is written as ``classes.json`` (None: numeric labels kept as given)."""

    index: dict
    names: list | None

    @classmethod
    def build(cls, items: Sequence[dict], classes: Sequence[str] | None = None) -> "LabelMap":
        """From a shared class list (``--classes``: the same indices for train and val), else from the labels of
        ``items`` (numeric labels kept; names sorted, so the indices depend on this list).

        Raises:
            ValueError: a label of ``items`` is not in ``classes``.
        """
        labels = [str(it["label"]) for it in items if it.get("label") is not None]
        if classes is not None:
            index = {n: i for i, n in enumerate(classes)}
            unknown = sorted(set(labels) - set(index))
            if unknown and all(lbl.lstrip("-").isdigit() for lbl in unknown):
                unknown = [u for u in unknown if not 0 <= int(u) < len(classes)]
                index.update({lbl: int(lbl) for lbl in labels if lbl not in index})
            if unknown:
                raise ValueError(f"{len(unknown)} labels not in the classes file, e.g. {unknown[:3]}")
            return cls(index, list(classes))
        if not labels or all(lbl.lstrip("-").isdigit() for lbl in labels):
            return cls({lbl: int(lbl) for lbl in labels}, None)
        names = sorted(set(labels))
        return cls({n: i for i, n in enumerate(names)}, names)


def _resolve(path: Path) -> Path:
    """``path``, or ``path.EXT`` for a video extension when the list names a video by id (WebVid's ``videoid``,
    video2dataset's keys) and ``path`` itself does not exist."""
    if path.exists() or path.suffix.lower().lstrip(".") in VIDEO_EXTENSIONS:
        return path
    for ext in VIDEO_EXTENSIONS:
        candidate = path.with_name(f"{path.name}.{ext}")
        if candidate.exists():
            return candidate
    return path


def prepare_sample(job: tuple) -> tuple[int, dict | None, str]:
    """Read, re-encode and verify one input: ``(index, item, root, encoding, label)`` ->
    ``(index, sample or None, failure reason)``. Runs in the worker processes."""
    index, item, root, enc, label = job
    path = _resolve(Path(root, item["video"]) if root and not Path(item["video"]).is_absolute()
                    else Path(item["video"]))
    ext = "mp4" if not enc.copy else path.suffix.lower().lstrip(".")
    if ext not in VIDEO_KEYS:  # the loader would skip the stored sample: refuse it here, by name
        return index, None, (f"{path}: --copy keeps the file's extension as the sample key, and "
                             f"{ext or '(none)'!r} is not one the loader reads ({', '.join(VIDEO_KEYS)}); "
                             "re-encode it (drop --copy)")
    try:
        data = path.read_bytes()
        if not data:
            raise DecodeError("empty file")
        if not enc.copy:
            data = encode_video(data, enc)
        verify_video(data)
    except DecodeError as exc:
        return index, None, f"{path}: {exc}"
    except OSError as exc:
        return index, None, f"{path}: cannot read the file ({exc.strerror or clean_reason(exc)})"
    key = f"{index:09d}"
    caption = item.get("caption")
    meta = {"key": key, "status": "success", "url": str(item["video"])}
    sample = {"__key__": key, ext: data}
    if caption is not None:
        meta["caption"] = caption
        sample["txt"] = caption[0] if isinstance(caption, list) and caption else str(caption)
    if label is not None:
        meta["label"] = label
        sample["cls"] = str(label)
    sample["json"] = meta
    return index, sample, ""


def _write_tar(path: Path, samples: Iterable[dict]) -> None:
    """Deterministic tar (mtime 0, sorted extensions), written to a temporary name and renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for ext in sorted(k for k in sample if not k.startswith("__")):
                value = sample[ext]
                if isinstance(value, dict):
                    value = json.dumps(value, sort_keys=True)
                data = value.encode() if isinstance(value, str) else bytes(value)
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


def make_shards(items: list[dict], out: str | Path, samples_per_shard: int = 1000, root: str | None = None,
                encoding: Encoding = Encoding(), classes: Sequence[str] | None = None, workers: int = 1,
                progress: bool = True) -> dict:
    """Write ``items`` (``{"video", "caption"?, "label"?}``) as shards in ``out``; resumable (see module doc).

    Args:
        samples_per_shard: inputs per shard ``N`` (a shard holds fewer when inputs fail).
        encoding: how videos are stored (re-encoded by default, or copied).
        classes: a shared label list (``--classes``); ``classes.json`` is written from it or from the labels.
        workers: processes that read, re-encode and verify in parallel.
        progress: show a progress bar (tqdm) on stderr.

    Returns:
        ``{"written", "failed": [reason...], "skipped_shards", "shards": {name: samples}}``.

    Raises:
        ValueError: a label is missing from ``classes``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = LabelMap.build(items, classes)
    settings = {"encoding": asdict(encoding), "samples_per_shard": samples_per_shard, "inputs": len(items)}
    manifest = out / "make_shards.json"
    if manifest.exists():
        before = json.loads(manifest.read_text())
        if before != settings:
            raise ValueError(f"{out} holds shards made with other settings ({before}); use another --out")
    manifest.write_text(json.dumps(settings, indent=1))
    num_shards = -(-len(items) // samples_per_shard)
    done, retry, pending = _finished_shards(out, num_shards, samples_per_shard)
    jobs = [(i, it, root, encoding, labels.index.get(str(it["label"])) if it.get("label") is not None else None)
            for i, it in enumerate(items) if i // samples_per_shard not in done or i in retry]
    failed: list[str] = []
    failed_at: dict[int, dict[str, str]] = {}
    written = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), unit="video", desc=f"make-shards ({len(done)} shards already complete)")
    ctx = multiprocessing.get_context("spawn") if workers > 1 else None
    pool = ctx.Pool(workers) if ctx is not None else None
    try:
        results = pool.imap_unordered(prepare_sample, jobs) if pool is not None else map(prepare_sample, jobs)
        expected: dict[int, int] = {}
        for index, _, _, _, _ in jobs:
            shard = index // samples_per_shard
            expected[shard] = expected.get(shard, 0) + 1
        for index, sample, reason in results:
            shard = index // samples_per_shard
            pending.setdefault(shard, {})[index] = sample
            if sample is None:
                failed.append(reason)
                failed_at.setdefault(shard, {})[str(index)] = reason
                log.warning("failed, not stored: %s", reason)
            else:
                written += 1
            if bar is not None:
                bar.update(1)
            expected[shard] -= 1
            if expected[shard] == 0:  # every input of this shard is done: write it
                results_of = pending.pop(shard)
                kept = [results_of[i] for i in sorted(results_of) if results_of[i] is not None]
                _write_tar(out / f"{shard:05d}.tar", kept)
                count = min(samples_per_shard, len(items) - shard * samples_per_shard)
                stats = {"count": count, "successes": len(kept), "failed_to_decode": count - len(kept),
                         "failed": failed_at.get(shard, {})}  # index -> reason: retried by the next run
                (out / f"{shard:05d}_stats.json").write_text(json.dumps(stats))
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()
    sizes = {}
    for i in range(num_shards):
        stats_file = out / f"{i:05d}_stats.json"
        if stats_file.exists():
            sizes[f"{i:05d}.tar"] = int(json.loads(stats_file.read_text())["successes"])
    (out / "sizes.json").write_text(json.dumps(sizes, indent=1, sort_keys=True))
    if labels.names is not None:
        (out / "classes.json").write_text(json.dumps(labels.names, indent=1))
    return {"written": written, "failed": failed, "skipped_shards": len(done) - len({i // samples_per_shard
                                                                                    for i in retry}),
            "retried": len(retry), "shards": sizes}


def _finished_shards(out: Path, num_shards: int, per_shard: int) -> tuple[set[int], set[int], dict[int, dict]]:
    """Shards an earlier run finished (tar and stats), the input indices they failed on (to retry) and, for
    shards with such failures, the samples they stored (kept, not made again): ``(done, retry, pending)``."""
    done, retry, pending = set(), set(), {}
    for shard in range(num_shards):
        stats_file, tar = out / f"{shard:05d}_stats.json", out / f"{shard:05d}.tar"
        if not (stats_file.exists() and tar.exists()):
            continue
        stats = json.loads(stats_file.read_text())
        if int(stats.get("failed_to_decode", 0)) and "failed" not in stats:
            continue  # an older run's shard with failures it did not name: made again
        done.add(shard)
        failed = {int(i) for i in stats.get("failed", {})}
        if failed:
            retry |= failed
            with open(tar, "rb") as f:
                pending[shard] = {int(smp["__key__"]): _stored_sample(smp) for smp in iter_tar_samples(f)}
    return done, retry, pending


def _stored_sample(sample: dict) -> dict:
    """A sample read back from a shard, in the form :func:`_write_tar` writes."""
    out = {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}
    if "json" in out:
        out["json"] = json.loads(out["json"])
    return out
