"""fluxvit-embed throughput on this machine's CPU: videos/s per core for FluxViT-S and -B at token budgets
2048 / 1024 / 512, 8 frames x 224 px, with the share of the time spent decoding.

Measured, not asserted. Videos are made here with ffmpeg (H.264 mp4, 320x240, 30 fps, 4 s); the models are
randomly initialised (the cost does not depend on the weights). Decoding runs in the main process
(``--workers 0``) on one thread and the model on one thread, so the figures are per core and the decode share is
the fraction of the wall time spent decoding + cropping. The machine may be shared: the 1-minute load average
before and after is printed and recorded.

    python benchmarks/bench_embed.py [--videos 6] [--out runs/bench/embed.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from fluxvit.embed import EmbedSettings, embed_videos
from fluxvit.encoders import Encoder
from fluxvit.models import create_model


def make_videos(folder: Path, n: int) -> None:
    patterns = ["testsrc", "testsrc2", "smptebars", "rgbtestsrc", "mandelbrot", "life"]
    for i in range(n):
        subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                        f"{patterns[i % len(patterns)]}=size=320x240:rate=30", "-t", "4", "-c:v", "libx264",
                        "-preset", "veryfast", "-pix_fmt", "yuv420p", str(folder / f"v{i:03d}.mp4")], check=True)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=6)
    p.add_argument("--models", nargs="+", default=["fluxvit_small_patch14", "fluxvit_base_patch14"])
    p.add_argument("--budgets", type=int, nargs="+", default=[2048, 1024, 512])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", default="runs/bench/embed.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        videos = Path(tmp) / "videos"
        videos.mkdir()
        make_videos(videos, args.videos)
        for name in args.models:
            torch.manual_seed(0)
            net = create_model(name, num_classes=0).eval()
            enc = Encoder(net, "zoo", "pooled feature (random init)", name, "", "random-init")
            for budget in args.budgets:
                s = EmbedSettings(budget=budget, frames=8, resolution=224, decoder="decord")
                out = Path(tmp) / f"{name}-{budget}"
                embed_videos(enc, str(videos), out, s, batch_size=args.batch_size, workers=0, progress=False,
                             part_size=args.videos)  # warm-up pass over the same videos (allocator, caches)
                out2 = Path(tmp) / f"{name}-{budget}-timed"
                t0 = time.perf_counter()
                r = embed_videos(enc, str(videos), out2, s, batch_size=args.batch_size, workers=0, progress=False,
                                 part_size=args.videos)
                wall = time.perf_counter() - t0
                row = {"model": name, "budget": budget, "frames": 8, "resolution": 224, "videos": r.videos,
                       "seconds": round(wall, 2), "videos_per_s_per_core": round(r.videos / wall, 3),
                       "decode_share": round(r.decode_seconds / wall, 3),
                       "model_share": round(r.model_seconds / wall, 3)}
                rows.append(row)
                print(f"{name:24s} K={budget:5d}  {row['videos_per_s_per_core']:7.3f} videos/s/core  "
                      f"decode {100 * row['decode_share']:4.1f}%  model {100 * row['model_share']:4.1f}%", flush=True)
    load_after = os.getloadavg()[0]
    report = {"commit": _git_commit(), "date": time.strftime("%Y-%m-%d", time.gmtime()), "cpu": platform.processor()
              or platform.machine(), "cpu_count": os.cpu_count(), "threads": 1, "load_1min_before": load_before,
              "load_1min_after": load_after, "video": "H.264 mp4 320x240 30 fps 4 s (ffmpeg lavfi), decord",
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"load average (1 min) {load_before:.1f} before, {load_after:.1f} after, on {os.cpu_count()} cores; "
          f"wrote {args.out}")


if __name__ == "__main__":
    main()
