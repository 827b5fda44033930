"""Container metadata read from the bytes, without a decoder: the display rotation of an MP4 / MOV / 3GP video.

Phones record sideways and store a *display matrix* in the video track's header (ISO BMFF ``tkhd``; FFmpeg's
legacy ``rotate`` tag is written the same way). A player rotates the decoded frames by it. decord ignores the
matrix (its frames come back with the wrong shape), so :mod:`.decoders` reads it here first, in microseconds
(top-level and ``moov`` box headers only), to route such a file to a backend that applies it.
"""
from __future__ import annotations

import math
import struct

__all__ = ["is_isobmff", "mp4_rotation"]

_CONTAINERS = {b"moov", b"trak", b"mdia"}


def is_isobmff(data: bytes) -> bool:
    """Whether ``data`` starts like an ISO base media file (mp4, m4v, mov, 3gp): an ``ftyp``/``moov``/... box."""
    return len(data) >= 8 and data[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")


def _boxes(data: bytes, start: int, end: int):
    """``(type, payload_start, box_end)`` of the boxes in ``data[start:end]``; stops at a malformed header."""
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if size == 1:
            if pos + 16 > end:
                return
            size = struct.unpack_from(">Q", data, pos + 8)[0]
            header = 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            return
        yield kind, pos + header, pos + size
        pos += size


def _child(data: bytes, start: int, end: int, kind: bytes) -> tuple[int, int] | None:
    for k, s, e in _boxes(data, start, end):
        if k == kind:
            return s, e
    return None


def _tkhd_rotation(data: bytes, start: int, end: int) -> int:
    version = data[start]
    matrix_at = start + (4 + 8 + 8 + 4 + 4 + 8 if version == 1 else 4 + 4 + 4 + 4 + 4 + 4) + 8 + 2 + 2 + 2 + 2
    if matrix_at + 36 > end:
        return 0
    a, b, _, c, d = struct.unpack_from(">5i", data, matrix_at)
    if not (a or b or c or d):
        return 0
    # the matrix [a b; c d] maps (x, y) -> (a x + c y, b x + d y); FFmpeg's rotation (counter-clockwise degrees,
    # av_display_rotation_get) of the matrix it builds from these fields is atan2(c, a) in degrees
    angle = math.degrees(math.atan2(c / 65536.0, a / 65536.0))
    return int(round(angle / 90.0)) * 90 % 360


def mp4_rotation(data: bytes) -> int:
    """Display rotation of the first video track of an ISO BMFF file, counter-clockwise degrees in
    ``{0, 90, 180, 270}`` (FFmpeg's sign: the frame is shown turned by ``np.rot90(frame, rotation // 90)``);
    ``0`` for other containers, unrotated or unreadable headers."""
    if not is_isobmff(data):
        return 0
    moov = _child(data, 0, len(data), b"moov")
    if moov is None:
        return 0
    for kind, s, e in _boxes(data, *moov):
        if kind != b"trak":
            continue
        mdia = _child(data, s, e, b"mdia")
        hdlr = _child(data, *mdia, b"hdlr") if mdia else None
        if hdlr is None or data[hdlr[0] + 8:hdlr[0] + 12] != b"vide":
            continue
        tkhd = _child(data, s, e, b"tkhd")
        return _tkhd_rotation(data, *tkhd) if tkhd else 0
    return 0
