"""Stage-3 training augmentation cost per clip on one core: the old path against the release's timm transform.

old: MultiScaleCrop + flip + normalise in the loader, then (in the training step) torchvision RandAugment(4 ops,
     magnitude 7) on the cropped clip and one random-erasing box (the pre-issue-11 code, re-stated here);
new: ``fluxvit.datasets.augment.ReleaseTrainTransform``: timm RandAugment ``rand-m7-n4-mstd0.5-inc1`` (bicubic) on the
     full decoded frames with the same ops on every frame, RandomResizedCrop (0.08, 1) + flip + normalise, timm
     RandomErasing p 0.25 (one box through all frames).
Both from decoded ``uint8`` frames (decoding is not included). Prints the median (and mean) ms per clip and clips/s per
core and writes JSON.

    python -m benchmarks.bench_augment                       # 16 frames, 256 x 340 source, 224 crop
    python -m benchmarks.bench_augment --source 360x640 --clips 10
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from benchmarks import write_result
from fluxvit.datasets import VideoTransform
from fluxvit.datasets.augment import RELEASE_RANDAUG, ReleaseTrainTransform, VideoRandomErasing

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1, 1)


def old_pipeline(size: int):
    """The pre-issue-11 augmentation: crop in the loader, torchvision RandAugment + erasing in the step."""
    from torchvision.transforms import v2

    crop = VideoTransform(crop="multiscale", flip=True, normalize="imagenet")
    randaug = v2.RandAugment(num_ops=4, magnitude=7)
    erase = VideoRandomErasing(0.25, "pixel")

    def run(clip: torch.Tensor, rng: random.Random) -> torch.Tensor:
        x = crop(clip, size, rng)
        u8 = ((x * STD + MEAN) * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 0, 2, 3)  # (T, 3, H, W)
        x = (randaug(u8).permute(1, 0, 2, 3).float().div(255) - MEAN) / STD
        return erase(x.contiguous(), rng)

    return run


def time_per_clip(fn, clips: list, rng: random.Random, repeats: int) -> tuple[float, float]:
    """(median, mean) seconds per clip over ``repeats x len(clips)`` calls; each call draws its own ops, so the
    mean averages over RandAugment's op mix and the median resists other processes' interference."""
    fn(clips[0], rng)  # warm up (lazy imports, op tables)
    times = []
    for _ in range(repeats):
        for c in clips:
            t0 = time.perf_counter()
            fn(c, rng)
            times.append(time.perf_counter() - t0)
    return statistics.median(times), statistics.mean(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--source", default="256x340", help="decoded frame size HxW")
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--out", default="benchmarks/results/augment.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    h, w = (int(v) for v in args.source.lower().split("x"))
    g = torch.Generator().manual_seed(0)
    # smooth random frames (block noise upsampled) so geometric ops and interpolation do real work
    clips = [torch.nn.functional.interpolate(torch.rand(args.frames, 3, h // 16, w // 16, generator=g), size=(h, w),
                                             mode="bilinear").mul(255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
             for _ in range(args.clips)]
    new = ReleaseTrainTransform(randaug=RELEASE_RANDAUG, reprob=0.25)
    rows = {}
    for name, fn in (("old", old_pipeline(args.size)), ("new", lambda c, r: new(c, args.size, r))):
        med, mean = time_per_clip(fn, clips, random.Random(1), args.repeats)
        rows[name] = {"ms_per_clip": round(1e3 * med, 1), "mean_ms_per_clip": round(1e3 * mean, 1),
                      "clips_per_s_per_core": round(1 / med, 2)}
    res = {"frames": args.frames, "size": args.size, "source": [h, w], "threads": 1, **rows,
           "new_over_old": round(rows["new"]["ms_per_clip"] / rows["old"]["ms_per_clip"], 2)}
    print(f"augmentation per clip (median of {args.repeats * args.clips}; mean), {args.frames} frames {h}x{w} -> "
          f"{args.size}, one core: old {rows['old']['ms_per_clip']} ms ({rows['old']['mean_ms_per_clip']}), "
          f"{rows['old']['clips_per_s_per_core']} clips/s; new (timm, release) {rows['new']['ms_per_clip']} ms "
          f"({rows['new']['mean_ms_per_clip']}), {rows['new']['clips_per_s_per_core']} clips/s; "
          f"new / old = {res['new_over_old']}")
    write_result(args.out, res)
    return res


if __name__ == "__main__":
    main()
