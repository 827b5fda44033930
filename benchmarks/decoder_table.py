"""Every decoder against FFmpeg's own decode, on the videos real users have (``python -m benchmarks.decoder_table``).

The cases are made here with the system ``ffmpeg`` (a few frames each, 64x48): a display rotation of 90 / 180 /
270 degrees (MP4 and MOV), a stream-copied cut whose edit list discards a pre-roll, a variable-frame-rate clip, one
clip per common container (mp4, m4v, mov, mkv, webm, avi, mpg, mpeg, ts, m2ts, flv, 3gp, wmv, ogv), an odd size
and a 1-frame clip. The reference is ``ffmpeg -i FILE -vsync passthrough -f rawvideo -pix_fmt rgb24 -``: autorotate
on, displayed frames only, with their presentation times from ``ffprobe``.

A backend *gives the same frames* when ``num_frames`` equals FFmpeg's displayed count and, for every time slot
``k`` of ``num_frames`` (:class:`fluxvit.datasets.decoders.VideoReader`), the frame it returns is the frame FFmpeg
shows at that slot's time: the same shape, every pixel within :data:`TOLERANCE` of FFmpeg's, and closer to that
reference frame than to any other frame of the video. The tolerance covers the YUV -> RGB conversion only
(each decoder bundles its own FFmpeg build; measured 0 here); a wrong frame differs by far more.

Prints a markdown table (case x backend: yes / no and why) and writes ``benchmarks/decoder_table.json``; the
table in ``docs/data.md`` is this output. ``tests/test_data_realvideo.py`` asserts the same comparisons.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["CASES", "TOLERANCE", "BAD_INPUTS", "make_cases", "make_bad_inputs", "ffmpeg_reference", "compare",
           "expected_slots", "frame_pattern"]

TOLERANCE = 2  # max |difference| per pixel and channel (uint8) between two decoders of the same frame; measured 0
# for every backend and case here (2026-12-05): the margin is for swscale SIMD paths of other CPUs
W, H, FPS = 64, 48, 24  # MPEG-1/2 take only standard rates


def frame_pattern(i: int, width: int = W, height: int = H) -> np.ndarray:
    """Frame ``i``: a red gradient along x (shows orientation), green level ``7 i`` (identifies the frame)
    and a bright bar at ``x = 4 i`` (identifies it again)."""
    img = np.zeros((height, width, 3), dtype=np.uint8)
    img[..., 0] = np.linspace(0, 220, width, dtype=np.uint8)[None, :]
    img[..., 1] = (i * 7) % 240
    img[: height // 4, :, 2] = 200  # a blue top band: up and down differ
    x = (4 * i) % width
    img[:, x:x + 3, :] = 255
    return img


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *args], check=True,
                   stdin=subprocess.DEVNULL)


def _encode(path: Path, frames: int, codec_args: list[str], width: int = W, height: int = H,
            extra_in: list[str] | None = None) -> Path:
    raw = b"".join(frame_pattern(i, width, height).tobytes() for i in range(frames))
    cmd = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{width}x{height}", "-r", str(FPS), "-i", "-", *(extra_in or []), *codec_args, str(path)]
    subprocess.run(cmd, input=raw, check=True)
    return path


H264 = ["-c:v", "libx264", "-preset", "ultrafast", "-crf", "16", "-pix_fmt", "yuv420p", "-g", "12"]
CONTAINERS = {  # extension -> encoder arguments (codecs those containers usually carry)
    "mp4": H264, "m4v": H264, "mov": H264, "mkv": H264, "ts": H264, "m2ts": H264, "3gp": H264,
    "webm": ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-crf", "20", "-b:v", "0",
             "-pix_fmt", "yuv420p"],
    "avi": ["-c:v", "mpeg4", "-q:v", "2", "-pix_fmt", "yuv420p"],
    "mpg": ["-c:v", "mpeg1video", "-q:v", "2", "-pix_fmt", "yuv420p"],
    "mpeg": ["-c:v", "mpeg2video", "-q:v", "2", "-pix_fmt", "yuv420p"],
    "flv": ["-c:v", "flv1", "-q:v", "2", "-pix_fmt", "yuv420p"],
    "wmv": ["-c:v", "wmv2", "-q:v", "2", "-pix_fmt", "yuv420p"],
    "ogv": ["-c:v", "libtheora", "-q:v", "9", "-pix_fmt", "yuv420p"],
}


def _has_display_rotation_option() -> bool:
    out = subprocess.run(["ffmpeg", "-hide_banner", "-h", "full"], capture_output=True, text=True).stdout
    return "-display_rotation" in out


def _rotated(src: Path, dst: Path, degrees: int) -> Path:
    """Stream-copy ``src`` with a display rotation: ``-display_rotation`` (FFmpeg >= 6; counter-clockwise) where it
    exists, else the legacy ``rotate`` tag (clockwise), which the MP4 / MOV muxer writes as the same matrix."""
    if _has_display_rotation_option():
        _ffmpeg("-display_rotation", str(-degrees), "-i", str(src), "-c", "copy", str(dst))
    else:
        _ffmpeg("-i", str(src), "-c", "copy", "-metadata:s:v:0", f"rotate={degrees}", str(dst))
    return dst


CASES = ["rotate 90 (mp4)", "rotate 180 (mp4)", "rotate 270 (mp4)", "rotate 90 (mov)", "edit-list cut (mp4)",
         "variable frame rate (mp4)", "odd size 70x38 (mp4)", "1 frame (mp4)",
         *(f"container .{ext}" for ext in CONTAINERS)]
BAD_INPUTS = ["audio only (m4a in .mp4)", "empty file", "random bytes"]


def make_cases(folder: str | Path) -> dict[str, Path]:
    """Write every case of :data:`CASES` into ``folder`` (about 2 s of ffmpeg on one core); ``{name: path}``."""
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    base = _encode(d / "base.mp4", 24, H264 + ["-bf", "0"])
    for deg in (90, 180, 270):
        out[f"rotate {deg} (mp4)"] = _rotated(base, d / f"rot{deg}.mp4", deg)
    out["rotate 90 (mov)"] = _rotated(base, d / "rot90.mov", 90)
    long = _encode(d / "long.mp4", 48, H264 + ["-bf", "2"])
    # a stream-copied cut: copying starts at the keyframe before 0.75 s; the edit list discards the 0.25 s pre-roll
    _ffmpeg("-ss", "0.75", "-i", str(long), "-t", "1", "-c", "copy", str(d / "cut.mp4"))
    out["edit-list cut (mp4)"] = d / "cut.mp4"
    # 24 fps for half a second, then every 4th frame (6 fps): timestamps, not packet indices, say when a frame shows
    out["variable frame rate (mp4)"] = _encode(d / "vfr.mp4", 36, ["-vf", r"select=lt(n\,12)+not(mod(n\,4))",
                                                                  "-vsync", "vfr", *H264])
    out["odd size 70x38 (mp4)"] = _encode(d / "odd.mp4", 12, H264, width=70, height=38)
    out["1 frame (mp4)"] = _encode(d / "one.mp4", 1, H264)
    for ext, args in CONTAINERS.items():
        out[f"container .{ext}"] = _encode(d / f"clip.{ext}", 24, args)
    return out


def make_bad_inputs(folder: str | Path) -> dict[str, Path]:
    """Files that hold no decodable video: audio only, empty, random bytes."""
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    _ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-c:a", "aac", str(d / "audio.mp4"))
    (d / "empty.mp4").write_bytes(b"")
    (d / "random.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 6000, dtype=np.uint8).tobytes())
    return dict(zip(BAD_INPUTS, (d / "audio.mp4", d / "empty.mp4", d / "random.mp4")))


def ffmpeg_reference(path: str | Path) -> tuple[np.ndarray, np.ndarray, float]:
    """FFmpeg's decode of ``path`` as a player shows it: ``(frames (N, H, W, 3) uint8, pts (N,) seconds, end)``
    (autorotate on, displayed frames only; ``end`` = the last frame's time plus its duration)."""
    probe = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                            "frame=best_effort_timestamp_time,pkt_duration_time,width,height", "-of", "json",
                            str(path)], capture_output=True, text=True, check=True)
    info = [f for f in json.loads(probe.stdout)["frames"] if "width" in f]  # not the side-data entries
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-map", "0:v:0", "-vsync", "passthrough",
                          "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout
    n = len(info)
    frames = np.frombuffer(raw, np.uint8)
    w, h = int(info[0]["width"]), int(info[0]["height"])
    rot = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                          "stream_side_data=rotation", "-of", "csv=p=0", str(path)], capture_output=True,
                         text=True).stdout
    turned = any(abs(int(float(v))) % 180 == 90 for v in rot.replace(",", " ").split() if v.strip("-").isdigit())
    shape = (w, h) if turned else (h, w)  # ffprobe reports the coded size; autorotate swaps it at 90 / 270
    frames = frames.reshape(n, *shape, 3)
    pts = np.array([float(f.get("best_effort_timestamp_time", "nan")) for f in info])
    duration = [float(f.get("pkt_duration_time", "nan")) for f in info]
    for i in range(1, n):  # MPEG-PS leaves the last (flushed) frame without a time: it follows the one before
        if np.isnan(pts[i]):
            pts[i] = pts[i - 1] + duration[i - 1]
    last = duration[-1]
    if not last > 0:  # no duration for the last frame (FLV, WMV): the mean frame spacing
        last = (pts[-1] - pts[0]) / (n - 1) if n > 1 else 0.0
    return frames, pts, float(pts[-1] + last)


def expected_slots(pts: np.ndarray, end: float, n: int) -> list[set[int]]:
    """Which reference frame a player shows at the middle of each of ``n`` equal slots of ``[pts[0], end)``
    (restated here independently of the library: the last frame whose time is not after the slot's). A slot
    time within 1 ms of a frame's time accepts either neighbour (timestamps are rounded to ms in some containers)."""
    out = []
    for k in range(n):
        t = pts[0] + (k + 0.5) * (end - pts[0]) / n
        shown = max(i for i in range(len(pts)) if pts[i] <= t + 1e-3)
        out.append({shown - 1, shown} if shown and abs(pts[shown] - t) < 1e-3 else {shown})
    return out


def compare(path: str | Path, backend: str, ref: tuple | None = None) -> tuple[bool, str]:
    """Whether ``backend`` gives FFmpeg's frames for ``path`` (see the module docstring); ``(ok, reason)``."""
    from fluxvit.datasets import decoders

    frames_ref, pts, end = ref if ref is not None else ffmpeg_reference(path)
    data = Path(path).read_bytes()
    try:
        reader = decoders.open_video(data, backend)
        n = reader.num_frames
        if n != len(frames_ref):
            return False, f"{n} frames, FFmpeg shows {len(frames_ref)}"
        got = reader.get_frames(list(range(n))).numpy()
    except decoders.DecodeError as exc:
        return False, f"DecodeError: {exc}"
    want = expected_slots(pts, end, n)
    if got.shape[1:] != frames_ref.shape[1:]:
        return False, f"frames {got.shape[1:3]}, FFmpeg {frames_ref.shape[1:3]}"
    ref_i = frames_ref.astype(np.int16)
    for k, (frame, accept) in enumerate(zip(got.astype(np.int16), want)):
        dist = np.abs(ref_i - frame).mean(axis=(1, 2, 3))
        j = min(accept, key=lambda i: dist[i])
        worst = int(np.abs(ref_i[j] - frame).max())
        if int(dist.argmin()) not in accept and dist[dist.argmin()] < dist[j]:
            return False, f"slot {k}: frame {int(dist.argmin())}, FFmpeg shows {sorted(accept)}"
        if worst > TOLERANCE:
            return False, f"slot {k}: pixels differ by up to {worst}"
    return True, ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).with_name("decoder_table.json")))
    args = p.parse_args(argv)
    from fluxvit.datasets import available_backends, decoders

    backends = available_backends()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        cases = make_cases(tmp)
        for name, path in cases.items():
            ref = ffmpeg_reference(path)
            rows[name] = {}
            for b in backends:
                ok, why = compare(path, b, ref)
                try:  # the backend that decoded it (a fallback chosen from the file's metadata)
                    used = decoders.open_video(path.read_bytes(), b).backend
                except decoders.DecodeError:
                    used = b
                rows[name][b] = {"same": ok, "why": why, "decoded_by": used}
        bad = make_bad_inputs(tmp)
        for name, path in bad.items():
            rows[name] = {}
            for b in backends:
                try:
                    decoders.decode_clips(path.read_bytes(), 4, backend=b)
                    rows[name][b] = {"same": False, "why": "decoded something", "decoded_by": b}
                except decoders.DecodeError as exc:
                    rows[name][b] = {"same": True, "why": f"DecodeError: {exc}"[:60], "decoded_by": b}
    print("| case | " + " | ".join(backends) + " |")
    print("|---|" + "---|" * len(backends))
    for name, row in rows.items():
        cells = []
        for b in backends:
            r = row[b]
            cell = "yes" if r["same"] else f"**no**: {r['why']}"
            if name in BAD_INPUTS and r["same"]:
                cell = "refused (DecodeError)"
            if r["decoded_by"] != b:
                cell += f" (via {r['decoded_by']})"
            cells.append(cell)
        print(f"| {name} | " + " | ".join(cells) + " |")
    Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
