"""One video-decoder interface over three backends: decord (default), PyAV and torchcodec.

Every backend decodes from the bytes in memory (no temporary files), decodes only the requested frames (seeking
where the backend can) and returns RGB ``uint8`` frames ``(N, H, W, 3)``. decord and torchcodec are optional:
they are imported on first use, and a missing backend falls back to PyAV (whose wheel bundles FFmpeg) with a
warning. ``import fluxvit.datasets`` imports none of them.

FFmpeg and decord write to the process's stderr on bad input (decord even echoes the file's bytes); decoding runs
under :func:`quiet_stderr`, and error messages are cut to a short printable reason (:func:`clean_reason`).
"""
from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import random
import sys
import threading
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
import torch

from .sampling import multi_clip_indices, sample_tsn_indices

__all__ = [
    "BACKENDS", "DecodeError", "VideoReader", "available_backends", "resolve_backend", "open_video",
    "decode_clips", "quiet_stderr", "clean_reason",
]

log = logging.getLogger(__name__)

BACKENDS = ("decord", "pyav", "torchcodec")
_MODULES = {"decord": "decord", "pyav": "av", "torchcodec": "torchcodec.decoders"}
_INSTALL_HINT = {
    "decord": "pip install decord  (x86_64 Linux wheels; or pip install 'fluxvit[video]')",
    "pyav": "pip install av",
    "torchcodec": "pip install torchcodec  (needs FFmpeg shared libraries, e.g. apt-get install ffmpeg)",
}


class DecodeError(RuntimeError):
    """A sample could not be decoded; ``str(err)`` is a short printable reason."""


def clean_reason(exc: BaseException | str, limit: int = 160) -> str:
    """A one-line, printable, length-limited description of ``exc`` (decoders may echo raw file bytes)."""
    text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    text = "".join(ch if ch.isprintable() else "?" for ch in text.replace("\n", " "))
    return text if len(text) <= limit else text[:limit] + "..."


def _import_backend(name: str):
    try:
        return importlib.import_module(_MODULES[name])
    except Exception as exc:  # torchcodec raises RuntimeError/OSError when FFmpeg libraries are missing
        raise ImportError(f"video backend {name!r} is unavailable ({clean_reason(exc)}); install: "
                          f"{_INSTALL_HINT[name]}") from exc


_AVAILABLE: dict[str, bool] = {}
_WARNED: set[str] = set()


def _is_available(name: str) -> bool:
    if name not in _AVAILABLE:
        try:
            with quiet_stderr():
                _import_backend(name)
            _AVAILABLE[name] = True
        except ImportError:
            _AVAILABLE[name] = False
    return _AVAILABLE[name]


def available_backends() -> list[str]:
    """The backends that import on this machine (imports them)."""
    return [name for name in BACKENDS if _is_available(name)]


def resolve_backend(name: str) -> str:
    """``name`` if it imports, else ``"pyav"`` with a one-time warning; unknown names raise ``ValueError``."""
    if name not in BACKENDS:
        raise ValueError(f"unknown decoder {name!r}; choose from {BACKENDS}")
    if _is_available(name):  # imports only this backend (torchcodec alone takes about a second)
        return name
    if name not in _WARNED:
        _WARNED.add(name)
        log.warning("decoder %r is not installed (%s); falling back to PyAV", name, _INSTALL_HINT[name])
    if not _is_available("pyav"):
        raise ImportError(f"no video decoder available; install one: {_INSTALL_HINT['pyav']}")
    return "pyav"


_quiet_lock = threading.Lock()
_quiet_depth = 0
_saved_fd: int | None = None


@contextlib.contextmanager
def quiet_stderr(enabled: bool = True) -> Iterator[None]:
    """Redirect file descriptor 2 to ``/dev/null`` (re-entrant) so C libraries cannot print to the terminal.

    Python logging to stderr during the block is lost too, so keep the blocks small (one decode).
    """
    global _quiet_depth, _saved_fd
    if not enabled:
        yield
        return
    with _quiet_lock:
        if _quiet_depth == 0:
            try:
                sys.stderr.flush()
            except Exception:  # a closed or replaced stderr must not break decoding
                pass
            _saved_fd = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0 and _saved_fd is not None:
                os.dup2(_saved_fd, 2)
                os.close(_saved_fd)
                _saved_fd = None


class VideoReader(Protocol):
    """An opened video: ``num_frames``, ``fps`` and ``get_frames(indices) -> uint8 (N, H, W, 3)``."""

    num_frames: int
    fps: float

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor: ...


class _DecordReader:
    def __init__(self, data: bytes, num_threads: int) -> None:
        decord = _import_backend("decord")
        self._vr = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=num_threads)
        self.num_frames = len(self._vr)
        self.fps = float(self._vr.get_avg_fps() or 0.0)

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        return torch.from_numpy(self._vr.get_batch(list(indices)).asnumpy())


class _TorchCodecReader:
    def __init__(self, data: bytes, num_threads: int) -> None:
        decoders = _import_backend("torchcodec")
        self._dec = decoders.VideoDecoder(data, dimension_order="NHWC", num_ffmpeg_threads=num_threads,
                                          seek_mode="exact")
        meta = self._dec.metadata
        self.num_frames = int(meta.num_frames or 0)
        self.fps = float(meta.average_fps or 0.0)

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        return self._dec.get_frames_at(indices=list(indices)).data


class _PyAVReader:
    """PyAV: frame index from the presentation timestamp; seeks to the keyframe before a far-away frame."""

    SEEK_GAP = 64  # frames; closer targets are reached by decoding forward, which is cheaper than a seek

    def __init__(self, data: bytes, num_threads: int) -> None:
        av = _import_backend("pyav")
        self._container = av.open(io.BytesIO(data), mode="r")
        if not self._container.streams.video:
            raise DecodeError("no video stream")
        self._stream = stream = self._container.streams.video[0]
        stream.thread_type = "AUTO" if num_threads > 1 else "SLICE"
        stream.codec_context.thread_count = max(1, num_threads)
        rate = stream.average_rate or stream.guessed_rate
        self.fps = float(rate) if rate else 0.0
        self._tb = float(stream.time_base) if stream.time_base else 0.0
        self._start = stream.start_time or 0
        n = int(stream.frames or 0)
        if n <= 0 and stream.duration and self.fps and self._tb:
            n = int(round(stream.duration * self._tb * self.fps))
        if n <= 0:  # no count in the container: count by demuxing (no decoding)
            n = sum(1 for p in self._container.demux(stream) if p.size)
            self._container.seek(0)
        self.num_frames = n

    def _index(self, frame, counter: int) -> int:
        if frame.pts is None or not self._tb or not self.fps:
            return counter
        return int(round((frame.pts - self._start) * self._tb * self.fps))

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        wanted = sorted(set(int(i) for i in indices))
        got: dict[int, np.ndarray] = {}
        k, pos, last = 0, -1, None
        can_seek = bool(self._tb and self.fps)
        while k < len(wanted):
            if can_seek and wanted[k] - pos > self.SEEK_GAP:
                ts = self._start + int(wanted[k] / self.fps / self._tb)
                self._container.seek(ts, stream=self._stream, backward=True, any_frame=False)
            k_before, exhausted = k, True
            for frame in self._container.decode(self._stream):
                pos = self._index(frame, pos + 1)
                last = frame
                if pos >= wanted[k]:
                    # an index missing from the stream takes the next frame (exact on constant-rate video)
                    arr = frame.to_ndarray(format="rgb24")
                    while k < len(wanted) and wanted[k] <= pos:
                        got[wanted[k]] = arr
                        k += 1
                if k >= len(wanted) or (k > k_before and can_seek and wanted[k] - pos > self.SEEK_GAP):
                    exhausted = False
                    break
            if exhausted:
                break  # end of stream: the remaining indices repeat the last frame
        if last is None:
            raise DecodeError("no frame decoded")
        fill = last.to_ndarray(format="rgb24") if len(got) < len(wanted) else None
        return torch.from_numpy(np.stack([got.get(int(i), fill) for i in indices]))


_READERS: dict[str, Callable[[bytes, int], VideoReader]] = {
    "decord": _DecordReader, "pyav": _PyAVReader, "torchcodec": _TorchCodecReader,
}


def open_video(data: bytes, backend: str = "decord", num_threads: int = 1) -> VideoReader:
    """Open encoded video bytes with ``backend`` (falls back to PyAV when it is missing).

    Raises:
        DecodeError: empty or undecodable input.
    """
    if not data:
        raise DecodeError("empty video")
    name = resolve_backend(backend)
    try:
        with quiet_stderr():
            reader = _READERS[name](bytes(data), num_threads)
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(clean_reason(exc)) from None
    if reader.num_frames < 1:
        raise DecodeError("video has no frames")
    return reader


def decode_clips(data: bytes, num_frames: int, *, backend: str = "decord", sampling: str = "tsn",
                 rng: random.Random | None = None, num_clips: int = 1, num_threads: int = 1) -> list[torch.Tensor]:
    """Decode the frames of one or more clips of a video, each ``num_frames`` long.

    Args:
        data: encoded video bytes (mp4, webm, ...).
        num_frames: frames per clip ``T`` (may exceed the video's frame count: frames repeat).
        backend: ``"decord"``, ``"pyav"`` or ``"torchcodec"``.
        sampling: ``"tsn"`` (one random frame per segment, training; one clip) or ``"middle"`` (segment-middle,
            ``num_clips`` interleaved offsets, evaluation).
        rng: randomness for ``"tsn"``.
        num_clips: clips for ``"middle"``.
        num_threads: decoder threads (1 = one core).

    Returns:
        list of ``uint8`` tensors ``(T, H, W, 3)``, one per clip.

    A video the chosen backend cannot decode is retried with PyAV before giving up.

    Raises:
        DecodeError: with a short reason; nothing is printed.
    """
    try:
        return _decode_clips(data, num_frames, backend, sampling, rng, num_clips, num_threads)
    except DecodeError as exc:
        # decord fails on some valid videos (e.g. widths it cannot align); PyAV is the most tolerant backend
        if not data or resolve_backend(backend) == "pyav":
            raise
        try:
            clips = _decode_clips(data, num_frames, "pyav", sampling, rng, num_clips, num_threads)
        except DecodeError:
            raise exc from None
        log.debug("%s failed (%s); decoded with PyAV instead", backend, exc)
        return clips


def _decode_clips(data: bytes, num_frames: int, backend: str, sampling: str, rng: random.Random | None,
                  num_clips: int, num_threads: int) -> list[torch.Tensor]:
    reader = open_video(data, backend, num_threads)
    n = reader.num_frames
    if sampling == "tsn":
        clips = [sample_tsn_indices(n, num_frames, rng)]
    elif sampling == "middle":
        clips = multi_clip_indices(n, num_frames, num_clips)
    else:
        raise ValueError(f"sampling must be 'tsn' or 'middle', got {sampling!r}")
    unique = sorted({i for clip in clips for i in clip})
    try:
        with quiet_stderr():
            frames = reader.get_frames(unique)
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(clean_reason(exc)) from None
    if frames.ndim != 4 or frames.shape[0] != len(unique) or frames.shape[-1] != 3:
        raise DecodeError(f"decoder returned frames of shape {tuple(frames.shape)}")
    where = {i: k for k, i in enumerate(unique)}
    return [frames[[where[i] for i in clip]] for clip in clips]
