"""Procedural synthetic video-text corpus: the embedded default dataset of every stage.

Each clip shows one shape (circle, square, triangle, diamond; several colours and two sizes) moving over a static
background (solid, gradient, stripes or noise texture) with wrap-around (toroidal) motion. The class label is the
motion, direction x speed (4 x 2 = 8 classes). Appearance is drawn independently of the class and the start
position is uniform on the torus, so every single frame has the same distribution for every class: only
temporal modelling can tell the classes apart. Each clip has a caption naming colour, size, shape, direction,
speed and background.

Layout written by :func:`make_synthetic_corpus` (video2dataset / WebDataset conventions)::

    OUT/classes.json                   label names, index = label
    OUT/corpus.json                    parameters, per-split shard patterns and counts (written last)
    OUT/{train,val,test}/00000.tar     KEY.mp4 (H.264), KEY.txt (caption), KEY.json, KEY.cls
    OUT/{train,val,test}/sizes.json    samples per shard; NNNNN_stats.json beside each shard

Everything is deterministic by ``seed`` (clip ``i`` of a split depends only on ``(seed, split, i)``).
"""
from __future__ import annotations

import io
import json
import logging
import multiprocessing as mp
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .shards import ShardWriter

__all__ = ["SynthConfig", "CLASSES", "ClipSpec", "draw_clip_spec", "render_clip", "encode_mp4",
           "make_synthetic_corpus", "ensure_synthetic_corpus"]

log = logging.getLogger(__name__)

DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SPEEDS = {"slowly": 1.5, "quickly": 4.0}  # pixels per frame at 128 px; scaled with the frame size
CLASSES = [f"moving {d} {s}" for d in DIRECTIONS for s in SPEEDS]
SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 230), "yellow": (235, 220, 50),
    "magenta": (210, 60, 200), "cyan": (60, 210, 220), "white": (240, 240, 240), "orange": (245, 140, 30),
}
BACKGROUNDS = ("plain", "gradient", "striped", "textured")
BG_TONES = {"dark grey": (40, 40, 45), "navy": (20, 25, 70), "dark green": (20, 60, 30), "brown": (70, 45, 25),
            "purple": (60, 25, 70), "light grey": (150, 150, 155)}
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SynthConfig:
    """Corpus size and clip format (defaults generate in about a minute on 2 cores)."""

    num_train: int = 1000
    num_val: int = 100
    num_test: int = 100
    seed: int = 0
    num_frames: int = 32
    size: int = 128
    fps: int = 16
    samples_per_shard: int = 100
    crf: int = 23


@dataclass(frozen=True)
class ClipSpec:
    """Everything that determines one clip: appearance, motion (the label) and start position."""

    label: int
    shape: str
    colour: str
    large: bool
    background: str
    bg_tone: str
    bg_seed: int
    x0: float
    y0: float

    @property
    def direction(self) -> str:
        return list(DIRECTIONS)[self.label // len(SPEEDS)]

    @property
    def speed(self) -> str:
        return list(SPEEDS)[self.label % len(SPEEDS)]

    def caption(self) -> str:
        """``"a large red circle moving left quickly over a striped navy background"``."""
        size = "large" if self.large else "small"
        return (f"a {size} {self.colour} {self.shape} moving {self.direction} {self.speed} "
                f"over a {self.background} {self.bg_tone} background")


def draw_clip_spec(rng: np.random.Generator, label: int, size: int) -> ClipSpec:
    """Draw appearance and start position independently of ``label`` (so a single frame carries no label)."""
    return ClipSpec(
        label=int(label), shape=str(rng.choice(SHAPES)), colour=str(rng.choice(list(COLOURS))),
        large=bool(rng.random() < 0.5), background=str(rng.choice(BACKGROUNDS)),
        bg_tone=str(rng.choice(list(BG_TONES))), bg_seed=int(rng.integers(2 ** 31)),
        x0=float(rng.uniform(0, size)), y0=float(rng.uniform(0, size)),
    )


def _background(spec: ClipSpec, size: int) -> np.ndarray:
    rng = np.random.default_rng(spec.bg_seed)
    tone = np.array(BG_TONES[spec.bg_tone], dtype=np.float32)
    if spec.background == "plain":
        img = np.broadcast_to(tone, (size, size, 3)).copy()
    elif spec.background == "gradient":
        ramp = np.linspace(0.5, 1.5, size, dtype=np.float32)
        ramp = ramp[:, None] if rng.random() < 0.5 else ramp[None, :]
        img = tone * np.broadcast_to(ramp, (size, size))[..., None]
    elif spec.background == "striped":
        period = int(rng.integers(8, 24))
        axis = np.arange(size)
        bands = ((axis // period) % 2).astype(np.float32) * 0.6 + 0.7
        bands = bands[:, None] if rng.random() < 0.5 else bands[None, :]
        img = tone * np.broadcast_to(bands, (size, size))[..., None]
    else:  # textured: smooth noise
        small = rng.uniform(0.6, 1.4, (size // 8, size // 8)).astype(np.float32)
        img = tone * np.kron(small, np.ones((8, 8), np.float32))[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_mask(spec: ClipSpec, size: int) -> np.ndarray:
    """The shape centred at pixel (0, 0) of a ``size x size`` torus (wraps around the borders)."""
    r = size * (0.14 if spec.large else 0.08)
    c = np.arange(size)
    d = np.minimum(c, size - c).astype(np.float32)  # toroidal distance to 0
    sign = np.where(c <= size // 2, 1.0, -1.0).astype(np.float32)
    dy, dx = (d * sign)[:, None], (d * sign)[None, :]
    if spec.shape == "circle":
        return dx ** 2 + dy ** 2 <= r ** 2
    if spec.shape == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if spec.shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r * 1.2
    # triangle pointing up
    return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)


def render_clip(spec: ClipSpec, num_frames: int, size: int, indices=None) -> np.ndarray:
    """Render a clip: ``uint8 (num_frames, size, size, 3)``; frame 0 does not depend on ``spec.label``.

    ``indices`` (optional sequence of frame numbers in ``[0, num_frames)``) renders only those frames, in that
    order: ``(len(indices), size, size, 3)``, equal to ``render_clip(spec, num_frames, size)[indices]`` at a
    fraction of the cost (training samples 8 of 32 frames).
    """
    ts = range(num_frames) if indices is None else [int(t) for t in indices]
    if any(not 0 <= t < num_frames for t in ts):
        raise ValueError(f"frame indices must lie in [0, {num_frames}), got {list(ts)}")
    bg = _background(spec, size)
    mask0 = _shape_mask(spec, size)
    colour = np.array(COLOURS[spec.colour], dtype=np.uint8)
    ux, uy = DIRECTIONS[spec.direction]
    step = SPEEDS[spec.speed] * size / 128
    frames = np.empty((len(ts), size, size, 3), dtype=np.uint8)
    for i, t in enumerate(ts):
        x = int(round(spec.x0 + ux * step * t)) % size
        y = int(round(spec.y0 + uy * step * t)) % size
        mask = np.roll(mask0, (y, x), axis=(0, 1))
        frames[i] = np.where(mask[..., None], colour, bg)
    return frames


def encode_mp4(frames: np.ndarray, fps: int = 16, crf: int = 23) -> bytes:
    """Encode ``uint8 (T, H, W, 3)`` frames as H.264 mp4 bytes (libx264, one thread: deterministic)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = 16
        stream.options = {"preset": "veryfast", "crf": str(crf), "threads": "1", "bf": "0"}
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def _make_sample(job: tuple[SynthConfig, str, int]) -> dict:
    cfg, split, index = job
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split), index])
    spec = draw_clip_spec(rng, label=index % len(CLASSES), size=cfg.size)
    video = encode_mp4(render_clip(spec, cfg.num_frames, cfg.size), cfg.fps, cfg.crf)
    key = f"{split}{index:06d}"
    caption = spec.caption()
    meta = {"key": key, "caption": caption, "status": "success", "label": spec.label,
            "label_name": CLASSES[spec.label], **{k: v for k, v in asdict(spec).items() if k != "label"}}
    return {"__key__": key, "mp4": video, "txt": caption, "json": meta, "cls": str(spec.label)}


def make_synthetic_corpus(out_dir: str | os.PathLike, num_train: int = 1000, num_val: int = 100,
                          num_test: int = 100, seed: int = 0, *, num_frames: int = 32, size: int = 128,
                          fps: int = 16, samples_per_shard: int = 100, workers: int | None = None) -> dict:
    """Generate the synthetic corpus into ``out_dir`` (see the module docstring for the layout).

    Args:
        out_dir: output folder (created).
        num_train, num_val, num_test: clips per split.
        seed: corpus seed.
        num_frames, size, fps: clip format (``size x size`` pixels).
        samples_per_shard: clips per tar shard.
        workers: generator processes (default: all cores).

    Returns:
        the ``corpus.json`` content: parameters, ``classes``, per split ``{"shards": brace pattern usable as
        ``DataConfig.shards``, "num_samples", "num_shards"}`` and ``seconds``.
    """
    cfg = SynthConfig(num_train, num_val, num_test, seed, num_frames, size, fps, samples_per_shard)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    counts = {"train": num_train, "val": num_val, "test": num_test}
    workers = workers or os.cpu_count() or 1
    splits = {}
    ctx = mp.get_context("fork") if hasattr(os, "fork") else mp.get_context()
    with ctx.Pool(workers) if workers > 1 else _SerialPool() as pool:
        for split in SPLITS:
            if counts[split] <= 0:
                continue
            with ShardWriter(out / split, samples_per_shard) as writer:
                jobs = [(cfg, split, i) for i in range(counts[split])]
                for sample in pool.imap(_make_sample, jobs, chunksize=8):
                    writer.write(sample)
            n = len(writer.sizes)
            pattern = str(out / split / ("00000.tar" if n == 1 else f"{{00000..{n - 1:05d}}}.tar"))
            splits[split] = {"shards": pattern, "num_samples": counts[split], "num_shards": n}
            log.info("synthetic %s split: %d clips in %d shards", split, counts[split], n)
    (out / "classes.json").write_text(json.dumps(CLASSES, indent=1))
    info = {"config": asdict(cfg), "classes": CLASSES, "splits": splits,
            "seconds": round(time.perf_counter() - start, 2)}
    tmp = out / "corpus.json.tmp"
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, out / "corpus.json")  # the marker of a complete corpus
    return info


def ensure_synthetic_corpus(out_dir: str | os.PathLike, **kwargs) -> dict:
    """Return the corpus in ``out_dir``, generating it with :func:`make_synthetic_corpus` only when absent.

    An existing complete corpus (``corpus.json`` present) is returned as it is when no parameters are given or
    when they match the ones it was made with. Parameters that contradict an existing corpus raise
    ``ValueError``: a corpus is never deleted or regenerated behind the caller's back (delete the folder or pick
    another one to make a different corpus).
    """
    marker = Path(out_dir) / "corpus.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        made = info.get("config", {})
        asked = {k: v for k, v in kwargs.items() if k in SynthConfig.__dataclass_fields__}
        conflicts = {k: (made.get(k), v) for k, v in asked.items() if made.get(k) != v}
        if conflicts:
            detail = ", ".join(f"{k}: has {a!r}, asked {b!r}" for k, (a, b) in sorted(conflicts.items()))
            raise ValueError(f"the synthetic corpus in {out_dir} was made with other parameters ({detail}); "
                             "delete it or choose another folder")
        return info
    return make_synthetic_corpus(out_dir, **kwargs)


class _SerialPool:
    """In-process stand-in for ``multiprocessing.Pool`` (``workers=1``)."""

    def imap(self, fn, jobs, chunksize: int = 1):
        return map(fn, jobs)

    def __enter__(self) -> "_SerialPool":
        return self

    def __exit__(self, *exc) -> None:
        return None
