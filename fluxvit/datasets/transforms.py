"""Video augmentation and evaluation views on decoded clips.

Clips come out of the decoders as ``uint8`` tensors ``(T, H, W, 3)``. Every transform here picks a crop box
``(top, left, height, width)`` in the source frame (the same box for all ``T`` frames), then :func:`crop_resize`
cuts it out of the ``uint8`` clip, resizes only the crop to ``size x size``, optionally flips and normalises,
returning a float tensor ``(3, T, size, size)``. Cropping before resizing is what keeps augmentation cheap
compared with decoding. Resize-then-crop (evaluation) is expressed as the equivalent box in source coordinates.

Training: :class:`MultiScaleCrop` (TSN scales 1, .875, .75, .66) or :class:`RandomResizedCrop`, plus horizontal
flip (turned off per source, e.g. for SSv2 where left/right is the label). Evaluation: :func:`center_crop_box`
(resize short side + centre crop) and :func:`three_crop_boxes` (three crops along the long side).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

__all__ = [
    "NORMALIZE", "Box", "MultiScaleCrop", "RandomResizedCrop", "center_crop_box", "three_crop_boxes",
    "crop_resize", "normalize_stats", "VideoTransform", "EvalTransform",
]

Box = tuple[int, int, int, int]  # (top, left, height, width) in source pixels

NORMALIZE: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    "clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
}


def normalize_stats(name: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """``(mean, std)`` per RGB channel in ``[0, 1]`` units for ``"imagenet"`` or ``"clip"``."""
    try:
        return NORMALIZE[name]
    except KeyError:
        raise ValueError(f"unknown normalisation {name!r}; choose from {sorted(NORMALIZE)}") from None


def crop_resize(clip: torch.Tensor, box: Box, size: int, *, flip: bool = False, normalize: str | None = "imagenet",
                antialias: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """Crop ``box`` out of a ``uint8`` clip, resize it to ``size x size``, flip, normalise.

    Args:
        clip: ``uint8`` tensor ``(T, H, W, 3)``.
        box: ``(top, left, height, width)`` inside ``(H, W)``.
        size: output side in pixels.
        flip: mirror horizontally.
        normalize: ``"imagenet"``, ``"clip"`` or ``None`` (then values are in ``[0, 1]``).
        antialias: antialiased bilinear resize (slower; worth it for large downscales).
        out: optional float32 ``(3, T, size, size)`` to write into (a slot of a preallocated batch).

    Returns:
        float32 tensor ``(3, T, size, size)`` (``out`` when given).
    """
    top, left, h, w = box
    x = clip[:, top:top + h, left:left + w, :].permute(0, 3, 1, 2)  # (T, 3, h, w), channels-last view
    if (h, w) != (size, size):
        # Resizing the uint8 channels-last crop is ~10x faster on CPU than resizing floats.
        try:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)
        except (RuntimeError, NotImplementedError):  # torch builds without the uint8 kernel
            x = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False,
                              antialias=antialias).round_().clamp_(0, 255)
    if flip:
        x = x.flip(-1)
    if out is None:
        out = torch.empty((3, x.shape[0], size, size), dtype=torch.float32)
    out.copy_(x.permute(1, 0, 2, 3))  # one pass: layout change and conversion to float
    if normalize is None:
        return out.mul_(1.0 / 255.0)
    mean, std = normalize_stats(normalize)
    scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(3, 1, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)]).view(3, 1, 1, 1)
    return out.mul_(scale).add_(shift)


@dataclass(frozen=True)
class MultiScaleCrop:
    """TSN MultiScaleCrop: a crop whose sides are ``scale * min(H, W)`` for scales drawn from ``scales``.

    Width and height scales are drawn independently among pairs at most ``max_distort`` steps apart; the crop sits
    at one of the fixed positions (corners, centre and, with ``more_fix_crop``, the quarter points) as in the
    UMT / FluxViT release.
    """

    scales: Sequence[float] = (1.0, 0.875, 0.75, 0.66)
    max_distort: int = 1
    more_fix_crop: bool = True

    def get_box(self, height: int, width: int, rng: random.Random) -> Box:
        """A crop box ``(top, left, h, w)`` for a ``height x width`` frame."""
        base = min(height, width)
        sizes = [max(1, int(base * s)) for s in self.scales]
        pairs = [(ch, cw) for i, ch in enumerate(sizes) for j, cw in enumerate(sizes) if abs(i - j) <= self.max_distort]
        ch, cw = rng.choice(pairs)
        sh, sw = (height - ch) // 4, (width - cw) // 4
        offsets = [(0, 0), (0, 4 * sw), (4 * sh, 0), (4 * sh, 4 * sw), (2 * sh, 2 * sw)]
        if self.more_fix_crop:
            offsets += [(2 * sh, 0), (2 * sh, 4 * sw), (4 * sh, 2 * sw), (0, 2 * sw),
                        (sh, sw), (sh, 3 * sw), (3 * sh, sw), (3 * sh, 3 * sw)]
        top, left = rng.choice(offsets)
        return top, left, ch, cw


@dataclass(frozen=True)
class RandomResizedCrop:
    """Inception-style crop: area fraction in ``scale``, aspect ratio (log-uniform) in ``ratio``; one box per clip.

    Falls back to the centre crop of the short side after 10 failed draws, like torchvision.
    """

    scale: tuple[float, float] = (0.25, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def get_box(self, height: int, width: int, rng: random.Random) -> Box:
        """A crop box ``(top, left, h, w)`` for a ``height x width`` frame."""
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        return center_crop_box(height, width)


def center_crop_box(height: int, width: int, crop_fraction: float = 1.0) -> Box:
    """Resize-short-side-then-centre-crop as a box: the centred square of side ``crop_fraction * min(H, W)``.

    ``crop_fraction`` < 1 gives the "resize to S / f then crop S" convention (e.g. 0.875).
    """
    side = max(1, int(round(min(height, width) * crop_fraction)))
    return (height - side) // 2, (width - side) // 2, side, side


def three_crop_boxes(height: int, width: int) -> list[Box]:
    """Three squares of the short side along the long side: start, centre, end (the "3 spatial crops")."""
    side = min(height, width)
    if width >= height:
        lefts = [0, (width - side) // 2, width - side]
        return [(0, left, side, side) for left in lefts]
    tops = [0, (height - side) // 2, height - side]
    return [(top, 0, side, side) for top in tops]


@dataclass(frozen=True)
class VideoTransform:
    """Training augmentation: crop (``"multiscale"`` or ``"rrc"``), resize, optional flip, normalise.

    ``__call__(clip (T, H, W, 3) uint8, size, rng, flip_allowed) -> (3, T, size, size)`` float32.
    """

    crop: str = "multiscale"
    flip: bool = True
    normalize: str = "imagenet"
    antialias: bool = False

    def __post_init__(self) -> None:
        if self.crop not in ("multiscale", "rrc"):
            raise ValueError(f"crop must be 'multiscale' or 'rrc', got {self.crop!r}")
        normalize_stats(self.normalize)

    def __call__(self, clip: torch.Tensor, size: int, rng: random.Random, flip_allowed: bool = True,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        _, h, w, _ = clip.shape
        cropper = MultiScaleCrop() if self.crop == "multiscale" else RandomResizedCrop()
        box = cropper.get_box(h, w, rng)
        do_flip = self.flip and flip_allowed and rng.random() < 0.5
        return crop_resize(clip, box, size, flip=do_flip, normalize=self.normalize, antialias=self.antialias, out=out)


@dataclass(frozen=True)
class EvalTransform:
    """Evaluation views: resize short side + centre crop (``num_crops=1``) or three crops (``num_crops=3``).

    ``__call__(clip (T, H, W, 3) uint8, size) -> list`` of ``num_crops`` tensors ``(3, T, size, size)``.
    """

    num_crops: int = 1
    normalize: str = "imagenet"
    crop_fraction: float = 1.0
    antialias: bool = True

    def __post_init__(self) -> None:
        if self.num_crops not in (1, 3):
            raise ValueError(f"num_crops must be 1 or 3, got {self.num_crops}")
        normalize_stats(self.normalize)

    def boxes(self, height: int, width: int) -> list[Box]:
        """The crop boxes of this transform for a ``height x width`` frame."""
        if self.num_crops == 1:
            return [center_crop_box(height, width, self.crop_fraction)]
        return three_crop_boxes(height, width)

    def __call__(self, clip: torch.Tensor, size: int, out: torch.Tensor | None = None) -> list[torch.Tensor]:
        """``out``: optional ``(num_crops, 3, T, size, size)`` to write the views into."""
        _, h, w, _ = clip.shape
        return [crop_resize(clip, b, size, normalize=self.normalize, antialias=self.antialias,
                            out=None if out is None else out[k]) for k, b in enumerate(self.boxes(h, w))]
