"""The release's stage-3 training augmentation, built from timm's pieces and applied to whole clips
(FluxViT paper, arXiv 2503.14237).

Per clip, on ``uint8`` frames ``(T, H, W, 3)`` as decoded:

1. timm RandAugment (``rand-m7-n4-mstd0.5-inc1``, bicubic) on the **full** frames, with the same ops and the same
   magnitudes on every frame (:class:`VideoRandAugment`);
2. RandomResizedCrop, area scale (0.08, 1), aspect ratio (3/4, 4/3), one box for the clip, to ``R x R``; flip 0.5
   (none for sources where left / right is the label); normalise (:func:`~fluxvit.datasets.transforms.crop_resize`);
3. timm RandomErasing, probability 0.25, "pixel" mode, one box through every frame (:class:`VideoRandomErasing`).

Mixup / CutMix and label smoothing are batch-level and run in the training step (timm ``Mixup``); repeated
augmentation (``num_sample`` differently augmented clips of one decoded video) is :func:`repeated_views`.

timm's RandAugment and RandomErasing draw from Python's, NumPy's and torch's global generators. Here every draw is
seeded from the caller's ``random.Random`` (so the loader's per-sample seeding, resume and worker layout decide the
augmentation) and the global generators are restored afterwards. "The same ops on every frame" is implemented by
replaying the same generator state for each frame: frame t gets exactly the draws frame 0 got.
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .transforms import MultiScaleCrop, RandomResizedCrop, VideoTransform, crop_resize, normalize_stats

__all__ = ["ReleaseTrainTransform", "VideoRandAugment", "VideoRandomErasing", "build_train_transform", "flatten_repeats",
           "repeated_views", "seeded_global_rngs", "train_views"]

RELEASE_RANDAUG = "rand-m7-n4-mstd0.5-inc1"


@contextlib.contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed Python's ``random``, NumPy's legacy global generator and torch's CPU generator with ``seed`` inside the
    block and restore all three afterwards (timm's augmentations draw from them)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class VideoRandAugment:
    """timm RandAugment applied with identical ops and magnitudes to every frame of a clip.

    Args:
        config: timm RandAugment string (release: ``rand-m7-n4-mstd0.5-inc1``).
        crop_size: the training resolution ``R``; as in the release, translations are ``0.45 * R`` pixels even
            though the op runs on the full frame before the crop.
        interpolation: ``"bicubic"`` (release) or ``"bilinear"``.

    ``__call__(frames uint8 (T, H, W, 3) tensor, rng: random.Random) -> uint8 (T, H, W, 3)``.
    """

    def __init__(self, config: str = RELEASE_RANDAUG, crop_size: int = 224, interpolation: str = "bicubic"):
        from PIL import Image
        from timm.data import rand_augment_transform

        modes = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}
        if interpolation not in modes:
            raise ValueError(f"RandAugment interpolation must be 'bicubic' or 'bilinear', got {interpolation!r}")
        if not config.startswith("rand"):
            raise ValueError(f"RandAugment config must start with 'rand' (timm syntax), got {config!r}")
        self.config, self.crop_size = config, crop_size
        self.op = rand_augment_transform(config, {"translate_const": int(crop_size * 0.45),
                                                  "interpolation": modes[interpolation]})

    def __call__(self, frames: torch.Tensor, rng: random.Random) -> torch.Tensor:
        from PIL import Image

        if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
            raise ValueError(f"VideoRandAugment takes uint8 frames (T, H, W, 3), got {frames.dtype} "
                             f"{tuple(frames.shape)}")
        arrays = frames.numpy()
        out = np.empty_like(arrays)
        with seeded_global_rngs(rng.getrandbits(63)):
            py_state, np_state = random.getstate(), np.random.get_state()
            for t, frame in enumerate(arrays):
                random.setstate(py_state)  # replay: every frame sees the draws of frame 0
                np.random.set_state(np_state)
                out[t] = np.asarray(self.op(Image.fromarray(frame)))
        return torch.from_numpy(out)


class VideoRandomErasing:
    """timm RandomErasing with one box through every frame of a clip (the release's "cube" erasing).

    The normalised clip ``(3, T, H, W)`` is erased as one ``(3T, H, W)`` image, so timm draws the box once and, in
    "pixel" mode, fills it with independent normal noise per frame and channel. In place; returns the clip.
    """

    def __init__(self, probability: float = 0.25, mode: str = "pixel", max_count: int = 1):
        from timm.data.random_erasing import RandomErasing

        self.probability = probability
        self.erase = RandomErasing(probability, mode=mode, max_count=max_count, num_splits=0, device="cpu")

    def __call__(self, clip: torch.Tensor, rng: random.Random) -> torch.Tensor:
        if clip.dim() != 4 or not clip.is_contiguous():
            raise ValueError(f"VideoRandomErasing takes a contiguous (3, T, H, W) clip, got {tuple(clip.shape)}")
        c, t, h, w = clip.shape
        with seeded_global_rngs(rng.getrandbits(63)):
            self.erase(clip.view(c * t, h, w))
        return clip


@dataclass(frozen=True)
class ReleaseTrainTransform:
    """The release's stage-3 training transform (module docstring); the same call as ``VideoTransform``.

    ``__call__(clip uint8 (T, H, W, 3), size R, rng, flip_allowed=True, out=None) -> float32 (3, T, R, R)``.
    ``randaug=""`` or ``reprob=0`` switch those parts off; ``crop="multiscale"`` replaces the RandomResizedCrop by
    TSN's MultiScaleCrop.
    """

    randaug: str = RELEASE_RANDAUG
    crop: str = "rrc"
    interpolation: str = "bicubic"
    scale: tuple = (0.08, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    flip: bool = True
    reprob: float = 0.25
    remode: str = "pixel"
    normalize: str = "imagenet"
    antialias: bool = False

    def __post_init__(self) -> None:
        normalize_stats(self.normalize)
        if self.crop not in ("rrc", "multiscale"):
            raise ValueError(f"crop must be 'rrc' or 'multiscale', got {self.crop!r}")
        if not 0.0 <= self.reprob <= 1.0:
            raise ValueError(f"reprob must be in [0, 1], got {self.reprob}")

    def _randaug(self, size: int) -> VideoRandAugment:
        # One RandAugment per resolution (its translate range follows R); built lazily, reused across clips.
        cache = self.__dict__.setdefault("_randaug_cache", {})
        if size not in cache:
            cache[size] = VideoRandAugment(self.randaug, size, self.interpolation)
        return cache[size]

    def __call__(self, clip: torch.Tensor, size: int, rng: random.Random, flip_allowed: bool = True,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        if self.randaug:
            clip = self._randaug(size)(clip, rng)
        _, h, w, _ = clip.shape
        cropper = (RandomResizedCrop(scale=tuple(self.scale), ratio=tuple(self.ratio)) if self.crop == "rrc"
                   else MultiScaleCrop())
        box = cropper.get_box(h, w, rng)
        do_flip = self.flip and flip_allowed and rng.random() < 0.5
        video = crop_resize(clip, box, size, flip=do_flip, normalize=self.normalize, antialias=self.antialias, out=out)
        if self.reprob > 0:
            VideoRandomErasing(self.reprob, self.remode)(video, rng)
        return video


def repeated_views(transform, clip: torch.Tensor, size: int, rng: random.Random, num_sample: int,
                   flip_allowed: bool = True) -> list[torch.Tensor]:
    """Repeated augmentation: ``num_sample`` independently augmented ``(3, T, size, size)`` clips of one decoded
    clip ``(T, H, W, 3)`` (release: 2 per video per epoch), all at the clip's one Flux grid ``(T, size)``."""
    if num_sample < 1:
        raise ValueError(f"num_sample must be >= 1, got {num_sample}")
    return [transform(clip, size, rng, flip_allowed) for _ in range(num_sample)]


_TRANSFORMS: dict = {}


def build_train_transform(opts) -> VideoTransform | ReleaseTrainTransform:
    """The training transform of a data section (:class:`~fluxvit.datasets.DataConfig`): the plain crop / flip / normalise
    ``VideoTransform`` unless RandAugment, random erasing or a non-default crop scale is asked for, then
    ``ReleaseTrainTransform`` with those settings. One instance per setting (RandAugment's op tables are reused)."""
    scale = tuple(float(v) for v in opts.crop_scale)
    key = (opts.randaug, opts.crop, scale, opts.flip, float(opts.reprob), opts.normalize, opts.antialias)
    if key not in _TRANSFORMS:
        plain = not opts.randaug and opts.reprob == 0 and (opts.crop != "rrc" or scale == (0.25, 1.0))
        _TRANSFORMS[key] = (VideoTransform(opts.crop, opts.flip, opts.normalize, opts.antialias) if plain else
                            ReleaseTrainTransform(randaug=opts.randaug, crop=opts.crop, scale=scale, flip=opts.flip,
                                                  reprob=opts.reprob, normalize=opts.normalize,
                                                  antialias=opts.antialias))
    return _TRANSFORMS[key]


def train_views(opts, clip: torch.Tensor, size: int, rng: random.Random, flip_allowed: bool = True,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """The training clip(s) of one decoded clip ``(T, H, W, 3)`` under a loader config: ``(3, T, S, S)``, or
    ``(num_sample, 3, T, S, S)`` with repeated augmentation. ``out``: optional tensor of that shape to fill."""
    transform = build_train_transform(opts)
    n = opts.num_sample
    if n == 1:
        return transform(clip, size, rng, flip_allowed, out=out)
    if out is None:
        out = torch.empty((n, 3, clip.shape[0], size, size))
    for k in range(n):
        transform(clip, size, rng, flip_allowed, out=out[k])
    return out


def flatten_repeats(batch: dict, num_sample: int) -> dict:
    """A collated batch of B videos with ``num_sample`` clips each -> B * num_sample clips (copies of a video
    adjacent): ``video`` (B, N, 3, T, H, W) -> (B * N, 3, T, H, W) (a list of (N, 3, T_i, H_i, W_i) -> a list of
    B * N clips); ``caption``, ``label``, ``key`` repeated N times each."""
    n = num_sample
    video = batch["video"]
    if isinstance(video, torch.Tensor):
        video = video.flatten(0, 1)
    else:
        video = [clip for v in video for clip in (v.unbind(0) if v.dim() == 5 else [v] * n)]
    rep = lambda xs: [x for x in xs for _ in range(n)]  # noqa: E731
    return {**batch, "video": video, "caption": rep(batch["caption"]),
            "label": batch["label"].repeat_interleave(n), "key": rep(batch["key"])}
