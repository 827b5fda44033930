"""One video-decoder interface over three backends: decord (default), PyAV and torchcodec.

Every backend decodes from the bytes in memory (no temporary files), decodes only the requested frames (seeking
where the backend can) and returns RGB ``uint8`` frames ``(N, H, W, 3)``. decord and torchcodec are optional:
they are imported on first use, and a missing backend falls back to PyAV (whose wheel bundles FFmpeg) with a
warning. ``import fluxvit.datasets`` imports none of them.

Every backend returns the frames a player shows (``docs/data.md`` has the measured table against FFmpeg's own
decode): the display rotation applied, only the displayed frames of a stream-copied cut (an edit list's
discarded pre-roll is neither counted nor returned), and frames sampled by presentation time, so variable-rate
video is sampled evenly in time (:class:`VideoReader`). Where a backend cannot do that for a file, the file goes to
PyAV, chosen from its metadata before decoding (:func:`choose_backend`).

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

from .probe import is_isobmff, mp4_rotation
from .sampling import multi_clip_indices, sample_tsn_indices

__all__ = [
    "BACKENDS", "DecodeError", "VideoReader", "available_backends", "resolve_backend", "open_video",
    "decode_clips", "quiet_stderr", "clean_reason", "slot_frames", "choose_backend", "rotate_frames",
]

from fluxvit.logs import warn_once

log = logging.getLogger(__name__)

BACKENDS = ("decord", "pyav", "torchcodec")
_MODULES = {"decord": "decord", "pyav": "av", "torchcodec": "torchcodec.decoders"}
_INSTALL_HINT = {
    "decord": "pip install decord  (x86_64 Linux wheels; or pip install 'fluxvit[video]')",
    "pyav": "pip install av",
    "torchcodec": "pip install torchcodec  (needs FFmpeg shared libraries, e.g. apt-get install ffmpeg)",
}


# Skip reasons in the project's words (a decoder's internal message is logged at debug level only).
NOT_A_VIDEO = "not a readable video (unknown or damaged container)"
DAMAGED_FRAMES = "frames could not be decoded (damaged or truncated video data)"


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
    warn_once(log, "decoder %r is not installed (%s); falling back to PyAV", name, _INSTALL_HINT[name])
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
    """An opened video: ``num_frames``, ``fps`` and ``get_frames(indices) -> uint8 (N, H, W, 3)``.

    ``num_frames`` counts the *displayed* frames (a frame an edit list tells players to discard is not one), and
    index ``i`` is the frame a player shows at the middle of the ``i``-th of ``num_frames`` equal time slots
    between the first frame's presentation time and the end of the video (:func:`slot_frames`). On constant-rate
    video that is frame ``i``; on variable-rate video frames are sampled by time, not by packet index. Frames come
    out as a player shows them: a display rotation is applied.
    """

    num_frames: int
    fps: float
    backend: str  # the backend that decodes (a fallback may differ from the one asked for)

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor: ...


def slot_frames(pts: np.ndarray, end: float, slots: Sequence[int]) -> np.ndarray:
    """Frame shown at the middle of each time slot: ``pts`` (n,) sorted presentation times of the displayed frames
    (seconds), ``end`` the end of the last one; slot ``k`` of ``n`` equal slots over ``[pts[0], end)`` is shown
    at ``pts[0] + (k + 1/2) (end - pts[0]) / n``. Returns frame indices ``(len(slots),)`` in ``[0, n)``; the
    identity on constant-rate video (half a frame of margin against rounded timestamps)."""
    n = len(pts)
    slots = np.asarray(slots, dtype=np.int64)
    width = (end - pts[0]) / n if n else 0.0
    if not n or not width > 0 or np.any(np.diff(pts) < 0):  # no usable times: frame i is slot i
        return np.clip(slots, 0, max(0, n - 1))
    times = pts[0] + (slots + 0.5) * width
    return np.clip(np.searchsorted(pts, times, side="right") - 1, 0, n - 1)


def rotate_frames(frames: np.ndarray, rotation: int) -> np.ndarray:
    """``frames`` (..., H, W, 3) turned counter-clockwise by ``rotation`` degrees (FFmpeg's autorotate)."""
    k = int(round(rotation / 90.0)) % 4
    return np.rot90(frames, k, axes=(-3, -2)) if k else frames


class _Reroute(Exception):
    """The backend's own index shows a case it decodes wrongly; ``open_video`` uses PyAV instead."""


def _end_time(pts: np.ndarray, last_duration: float) -> float:
    """End of the last displayed frame: its time plus its duration when the container gives one, else plus the
    mean frame spacing (FLV, WMV and AVI leave the last duration out)."""
    if last_duration > 0 or len(pts) < 2:
        return float(pts[-1] + (last_duration if last_duration > 0 else 0.0))
    return float(pts[-1] + (pts[-1] - pts[0]) / (len(pts) - 1))


class _DecordReader:
    """decord: frame timestamps come with its index (free), so variable-rate video is sampled by time. A
    stream-copied MP4 cut starts with pre-roll frames its edit list discards: decord lists them (with negative
    timestamps) and then returns frames shifted by their number after a seek, so such a file goes to PyAV."""

    backend = "decord"

    def __init__(self, data: bytes, num_threads: int) -> None:
        decord = _import_backend("decord")
        self._vr = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=num_threads)
        total = len(self._vr)
        times = np.asarray(self._vr.get_frame_timestamp(range(total)), dtype=np.float64) if total else None
        if times is not None and is_isobmff(data) and times[0, 0] < -1e-4:
            raise _Reroute("edit list discards a pre-roll")
        self.num_frames = total
        self.fps = float(self._vr.get_avg_fps() or 0.0)
        if total:
            self._pts = times[:, 0]
            self._end = _end_time(self._pts, float(times[-1, 1] - times[-1, 0]))

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        frames = slot_frames(self._pts, self._end, indices)
        return torch.from_numpy(self._vr.get_batch(frames.tolist()).asnumpy())


class _TorchCodecReader:
    """torchcodec (exact seek mode): displayed frames only, rotation applied; sampled by presentation time."""

    backend = "torchcodec"

    def __init__(self, data: bytes, num_threads: int) -> None:
        decoders = _import_backend("torchcodec")
        self._dec = decoders.VideoDecoder(data, dimension_order="NHWC", num_ffmpeg_threads=num_threads,
                                          seek_mode="exact")
        meta = self._dec.metadata
        self.num_frames = int(meta.num_frames or 0)
        self.fps = float(meta.average_fps or 0.0)
        self._begin = float(meta.begin_stream_seconds or 0.0)
        self._end = float(meta.end_stream_seconds or 0.0)
        n, span, rate = self.num_frames, self._end - self._begin, float(meta.average_fps_from_header or 0.0)
        # constant rate as the header says (the last frame's duration may be missing: FLV, WMV, MPEG-PS): time
        # slots are frame indices; otherwise frames are found by presentation time
        self._by_index = not span > 0 or (rate > 0 and min(abs(span - n / rate), abs(span - (n - 1) / rate))
                                          < 0.25 / rate)

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        if self._by_index:
            return self._dec.get_frames_at(indices=list(indices)).data
        width = (self._end - self._begin) / self.num_frames
        times = [self._begin + (int(i) + 0.5) * width for i in indices]
        return self._dec.get_frames_played_at(seconds=times).data


class _PyAVReader:
    """PyAV: the presentation times of the displayed frames come from demuxing the packets (no decoding; packets
    an edit list discards are left out); a frame is found by its timestamp, seeking to the keyframe before a
    far-away one; the display rotation of the frames is applied."""

    SEEK_GAP = 64  # frames; closer targets are reached by decoding forward, which is cheaper than a seek

    backend = "pyav"

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
        pts, last_duration, untimed = [], 0, 0
        for packet in self._container.demux(stream):
            if not packet.size or packet.is_discard:
                continue
            t = packet.pts if packet.pts is not None else packet.dts
            if t is None:
                untimed += 1
                continue
            pts.append(t)
            last_duration = packet.duration or 0
        self._container.seek(0)
        self._timed = bool(pts) and not untimed and bool(self._tb)
        if self._timed:
            self._ticks = np.unique(np.asarray(pts, dtype=np.int64))  # sorted presentation times, stream ticks
            self.num_frames = len(self._ticks)
            self._pts = self._ticks * self._tb
            self._end = _end_time(self._pts, last_duration * self._tb)
        else:
            self.num_frames = len(pts) + untimed
        self._rotation: int | None = None

    def _position(self, frame, counter: int) -> int:
        if not self._timed or frame.pts is None:
            return counter
        return int(np.searchsorted(self._ticks, frame.pts))

    def _array(self, frame) -> np.ndarray:
        if self._rotation is None:
            self._rotation = int(getattr(frame, "rotation", 0) or 0)
        return rotate_frames(frame.to_ndarray(format="rgb24"), self._rotation)

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        if self._timed:
            frame_of = dict(zip((int(i) for i in indices), slot_frames(self._pts, self._end, indices).tolist()))
        else:
            frame_of = {int(i): int(i) for i in indices}
        wanted = sorted(set(frame_of.values()))
        got: dict[int, np.ndarray] = {}
        k, pos, last = 0, -1, None
        can_seek = self._timed
        while k < len(wanted):
            if can_seek and wanted[k] - pos > self.SEEK_GAP:
                self._container.seek(int(self._ticks[wanted[k]]), stream=self._stream, backward=True,
                                     any_frame=False)
            k_before, exhausted = k, True
            for frame in self._container.decode(self._stream):
                pos = self._position(frame, pos + 1)
                last = frame
                if pos >= wanted[k]:
                    # a frame missing from the stream takes the next one
                    arr = self._array(frame)
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
        fill = self._array(last) if len(got) < len(wanted) else None
        return torch.from_numpy(np.stack([got.get(frame_of[int(i)], fill) for i in indices]))


_READERS: dict[str, Callable[[bytes, int], VideoReader]] = {
    "decord": _DecordReader, "pyav": _PyAVReader, "torchcodec": _TorchCodecReader,
}


_MPEG_PS = (b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3")  # MPEG-1/2 program or elementary stream (.mpg, .mpeg)


def choose_backend(name: str, data: bytes) -> str:
    """The backend that decodes ``data`` as a player shows it, given the one asked for, chosen from the file's
    header before decoding (``docs/data.md`` has the measured table):

    * decord -> PyAV for a display rotation (decord ignores it and returns frames of the wrong shape;
      :func:`~fluxvit.datasets.probe.mp4_rotation` reads it), Ogg (decord cannot open it) and MPEG-PS (decord
      returns wrong frames). A stream-copied MP4 cut (edit list) goes to PyAV once decord's index shows it.
    * torchcodec -> PyAV for MPEG-PS (torchcodec fails on its last, untimed frame).
    """
    if name == "decord" and (mp4_rotation(data) or data[:4] == b"OggS" or data[:4] in _MPEG_PS):
        log.debug("display rotation, Ogg or MPEG-PS: decoding with PyAV instead of decord")
        return resolve_backend("pyav")
    if name == "torchcodec" and data[:4] in _MPEG_PS:
        log.debug("MPEG-PS: decoding with PyAV instead of torchcodec")
        return resolve_backend("pyav")
    return name


def open_video(data: bytes, backend: str = "decord", num_threads: int = 1) -> VideoReader:
    """Open encoded video bytes with ``backend`` (falls back to PyAV when it is missing).

    Raises:
        DecodeError: empty or undecodable input.
    """
    if not data:
        raise DecodeError("empty video")
    name = choose_backend(resolve_backend(backend), data)
    try:
        with quiet_stderr():
            try:
                reader = _READERS[name](bytes(data), num_threads)
            except _Reroute as why:
                log.debug("%s: decoding with PyAV instead of %s", why, name)
                reader = _READERS[resolve_backend("pyav")](bytes(data), num_threads)
    except DecodeError:
        raise
    except Exception as exc:  # the decoder's own words go to the debug log, the reason is the project's
        log.debug("%s could not open the video: %s", name, clean_reason(exc))
        raise DecodeError(NOT_A_VIDEO) from None
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
        log.debug("%s could not decode frames %s: %s", backend, unique[:8], clean_reason(exc))
        raise DecodeError(DAMAGED_FRAMES) from None
    if frames.ndim != 4 or frames.shape[0] != len(unique) or frames.shape[-1] != 3:
        raise DecodeError(f"decoder returned frames of shape {tuple(frames.shape)}")
    where = {i: k for k, i in enumerate(unique)}
    return [frames[[where[i] for i in clip]] for clip in clips]
