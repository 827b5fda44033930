"""One raw tar sample to one example: decode (or read an image), sample frames, apply the training or evaluation
transform, read the caption and label. Raises :class:`SampleError` for a sample that cannot be used."""
from __future__ import annotations

import json
import random

import torch

from .config import DataConfig
from .decoders import DecodeError, clean_reason, decode_clips
from .shards import IMAGE_EXTENSIONS, VIDEO_KEYS
from .augment import train_views
from .transforms import EvalTransform

__all__ = ["SampleError", "process_sample"]


class SampleError(Exception):
    """A sample was skipped; ``str(err)`` is the reason."""


def _caption(sample: dict, meta: dict, rng: random.Random, train: bool) -> str:
    """Several captions (a list in the json, UMT style): a random one in training, the first in evaluation;
    otherwise ``KEY.txt``, then the json's ``caption``, then ``""``."""
    cap = meta.get("caption")
    if isinstance(cap, list) and cap:
        return str(rng.choice(cap) if train else cap[0])
    if "txt" in sample:
        return sample["txt"].decode("utf-8", "replace").strip()
    return str(cap or "")


def _label(sample: dict, meta: dict) -> int:
    for raw in (sample.get("cls"), meta.get("label")):
        if raw is None:
            continue
        try:
            return int(raw.decode().strip() if isinstance(raw, bytes) else raw)
        except (ValueError, TypeError):
            continue
    return -1


def process_sample(sample: dict, cfg: DataConfig, *, num_frames: int, size: int, rng: random.Random,
                   train: bool = True, eval_clips: int = 1, eval_crops: int = 1, flip_allowed: bool = True,
                   out: torch.Tensor | None = None) -> dict:
    """Turn one raw tar sample into a training / evaluation example.

    Args:
        sample: ``{"__key__", ext: bytes}`` from :func:`~fluxvit.datasets.shards.iter_tar_samples`.
        cfg: decoder and augmentation settings.
        num_frames: frames ``T``; size: output side ``S``.
        train: training (TSN sampling, the training transform) or evaluation (segment-middle sampling,
            ``eval_clips`` temporal clips x ``eval_crops`` (1 or 3) spatial crops).
        rng: randomness for frame sampling, crops, flips and caption choice.
        flip_allowed: whether this sample's source may be flipped.
        out: optional float32 tensor of the output's shape to write the video into (a slot of a batch buffer,
            which saves a copy when batching).

    Returns:
        ``{"video", "caption", "label", "key"}``; ``video`` is ``(3, T, S, S)`` float, or ``(V, 3, T, S, S)`` in
        evaluation with ``eval_clips * eval_crops = V > 1`` views (clip-major) and in training with repeated
        augmentation (``num_sample = V > 1`` augmented clips; the training transform is
        :func:`fluxvit.datasets.augment.train_views`: RandAugment, crop, flip, erasing as configured). An image sample (jpg, png,
        webp; no video member) becomes a 1-frame video ``(3, 1, S, S)`` written to its own tensor, not ``out``.

    Raises:
        SampleError: no video or image member, empty or undecodable video.
    """
    ext = next((e for e in VIDEO_KEYS if e in sample), None)
    if ext is None:
        image_ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if image_ext is None:
            raise SampleError("no video")
        return _process_image(sample, image_ext, cfg, size=size, rng=rng, train=train, eval_crops=eval_crops,
                              flip_allowed=flip_allowed)
    data = sample[ext]
    if not data:
        raise SampleError("empty video")
    meta: dict = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
            meta = meta if isinstance(meta, dict) else {}
        except ValueError:
            meta = {}
    try:
        if train:
            clips = decode_clips(data, num_frames, backend=cfg.decoder, sampling="tsn", rng=rng,
                                 num_threads=cfg.decoder_threads)
            video = train_views(cfg, clips[0], size, rng, flip_allowed, out=out)
        else:
            clips = decode_clips(data, num_frames, backend=cfg.decoder, sampling="middle", num_clips=eval_clips,
                                 num_threads=cfg.decoder_threads)
            views = EvalTransform(eval_crops, cfg.normalize)
            if out is None:
                out = torch.empty((len(clips) * eval_crops, 3, num_frames, size, size))
            flat = out.view(len(clips) * eval_crops, 3, num_frames, size, size)
            for k, clip in enumerate(clips):
                views(clip, size, out=flat[k * eval_crops:(k + 1) * eval_crops])
            video = out
    except DecodeError as exc:
        raise SampleError(f"decode error: {exc}") from None
    except (ValueError, RuntimeError) as exc:
        raise SampleError(f"decode error: {clean_reason(exc)}") from None
    return {"video": video, "caption": _caption(sample, meta, rng, train), "label": _label(sample, meta),
            "key": sample["__key__"]}


def _read_meta(sample: dict) -> dict:
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _process_image(sample: dict, ext: str, cfg: DataConfig, *, size: int, rng: random.Random, train: bool,
                   eval_crops: int, flip_allowed: bool) -> dict:
    """An image-text sample as a 1-frame video: (3, 1, S, S) (or (V, 3, 1, S, S) with several eval crops)."""
    from torchvision.io import ImageReadMode, decode_image

    data = sample[ext]
    if not data:
        raise SampleError("empty image")
    try:
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as exc:
        raise SampleError(f"decode error: {clean_reason(exc)}") from None
    clip = image.permute(1, 2, 0).unsqueeze(0).contiguous()  # (1, H, W, 3) uint8
    if train:
        video = train_views(cfg, clip, size, rng, flip_allowed)
    else:
        views = EvalTransform(eval_crops, cfg.normalize)(clip, size)
        video = views[0] if len(views) == 1 else torch.stack(views)
    meta = _read_meta(sample)
    return {"video": video, "caption": _caption(sample, meta, rng, train), "label": _label(sample, meta),
            "key": sample["__key__"]}


