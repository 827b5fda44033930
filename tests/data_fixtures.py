"""Tiny test videos and shards for the data-pipeline tests (made with PyAV; a few KB each)."""
from __future__ import annotations

import io
import json
import tarfile
from fractions import Fraction
from pathlib import Path

import numpy as np


def frame_pattern(i: int, width: int, height: int) -> np.ndarray:
    """A frame whose content identifies its index ``i``: a bright bar at x = 4 * i plus a gradient."""
    img = np.zeros((height, width, 3), dtype=np.uint8)
    img[..., 0] = np.linspace(0, 200, width, dtype=np.uint8)[None, :]
    img[..., 1] = (i * 9) % 256
    x = (4 * i) % width
    img[:, x:x + 4, :] = 255
    return img


def make_video(num_frames: int = 24, width: int = 64, height: int = 48, fps: int = 12, audio: bool = False,
               codec: str = "libx264", gop: int = 12) -> bytes:
    """Encode ``num_frames`` frames of :func:`frame_pattern` as an mp4 (optionally with a silent AAC track)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.options = {"preset": "ultrafast", "crf": "18", "bf": "0"} if codec == "libx264" else {}
        astream = None
        if audio:
            astream = out.add_stream("aac", rate=16000)
            astream.layout = "mono"
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(frame_pattern(i, width, height), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
        if astream is not None:
            samples = np.zeros((1, 1024), dtype=np.float32)
            for k in range(int(16000 * num_frames / fps) // 1024):
                af = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
                af.sample_rate = 16000
                af.pts = k * 1024
                af.time_base = Fraction(1, 16000)
                for packet in astream.encode(af):
                    out.mux(packet)
            for packet in astream.encode():
                out.mux(packet)
    return buf.getvalue()


def write_tar(path: str | Path, samples: list[dict[str, bytes | str]], truncate_to: int | None = None) -> Path:
    """Write a WebDataset tar: every sample is ``{"__key__": key, ext: bytes | str, ...}``.

    ``truncate_to`` cuts the finished file to that many bytes (a truncated shard).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            key = sample["__key__"]
            for ext, value in sample.items():
                if ext == "__key__":
                    continue
                data = value.encode() if isinstance(value, str) else value
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    if truncate_to is not None:
        with open(path, "r+b") as f:
            f.truncate(truncate_to)
    return path


def video_sample(key: str, video: bytes, caption: str | None = "a clip", label: int | None = 0) -> dict:
    """A video2dataset-style sample: mp4, txt, json (caption, key, status) and cls."""
    meta = {"key": key, "status": "success"}
    sample = {"__key__": key, "mp4": video}
    if caption is not None:
        sample["txt"] = caption
        meta["caption"] = caption
    if label is not None:
        sample["cls"] = str(label)
    sample["json"] = json.dumps(meta)
    return sample


def write_sizes(directory: str | Path, sizes: dict[str, int]) -> None:
    """Write an open_clip-style ``sizes.json``."""
    Path(directory, "sizes.json").write_text(json.dumps(sizes))


def truncate_inside(path: str | Path, member: str, into: int = 10) -> Path:
    """Cut a tar ``into`` bytes into the data of ``member`` (every sample before it stays complete)."""
    with tarfile.open(path) as tar:
        offset = tar.getmember(member).offset_data
    with open(path, "r+b") as f:
        f.truncate(offset + into)
    return Path(path)
