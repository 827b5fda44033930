"""Data-pipeline benchmark: clips per second per core, per decoder backend (measured, not asserted).

For each backend and two inputs (clips of the synthetic corpus; a 10 s, 30 fps, 340p H.264 video with ffmpeg's
default GOP) it measures, on one core (``torch.set_num_threads(1)``, one decoder thread, no workers):

* ``decoder``: open the bytes + decode the TSN-sampled frames (the bare decoder),
* ``pipeline``: the training path per sample: decode + frame sampling + MultiScaleCrop + resize + flip +
  normalise (:func:`fluxvit.datasets.process_sample`),
* ``loader`` (synthetic corpus only): the whole loader from tar shards to collated batches.

It prints the pipeline rate as a ratio of the bare decoder's (target: overhead <= 20%) and each backend as a
ratio of decord, and writes ``benchmarks/results/data.json``.

    python -m benchmarks.bench_data [--seconds 3] [--frames 8] [--size 224]
"""
from __future__ import annotations

import argparse
import io
import logging
import platform
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fluxvit.datasets import DataConfig, available_backends, build_video_loader, decode_clips, process_sample
from fluxvit.datasets.shards import iter_tar_samples, parse_shard_spec
from fluxvit.datasets.synth import make_synthetic_corpus
from benchmarks import write_result

RESULTS = Path(__file__).resolve().parent / "results" / "data.json"


def make_340p_video(seconds: int = 10, fps: int = 30, width: int = 604, height: int = 340) -> bytes:
    """A ``seconds``-long H.264 mp4 (libx264 defaults: GOP 250) of moving shapes over a textured background."""
    import av

    rng = np.random.default_rng(0)
    bg = (rng.uniform(0.3, 1.0, (height // 4 + 1, width // 4 + 1, 1)) * np.array([90, 120, 160]))
    bg = np.kron(bg, np.ones((4, 4, 1)))[:height, :width].astype(np.uint8)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for t in range(seconds * fps):
            img = bg.copy()
            for k in range(3):
                x = int((t * (3 + 2 * k) + 150 * k) % (width - 60))
                y = int((80 + 90 * k + 40 * np.sin(t / (10 + k))) % (height - 60))
                img[y:y + 60, x:x + 60] = (220 - 60 * k, 60 + 70 * k, 40 + 80 * k)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def interleaved_rates(fns: dict, items: list, seconds: float, min_calls: int = 5) -> dict[str, float]:
    """Calls per second of each ``fn(item)``, from the median time of calls interleaved over the same items.

    Interleaving and the median keep the ratios fair on a machine shared with other jobs.
    """
    for fn in fns.values():
        fn(items[0])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    start, i = time.perf_counter(), 0
    while i < min_calls or time.perf_counter() - start < seconds * len(fns):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(items[i % len(items)])
            times[name].append(time.perf_counter() - t0)
        i += 1
    return {name: 1.0 / float(np.median(ts)) for name, ts in times.items()}


def bench_input(name: str, videos: list[bytes], backend: str, frames: int, size: int, seconds: float) -> dict:
    cfg = DataConfig(num_frames=frames, img_size=size, decoder=backend, decoder_threads=1, train=True)
    samples = [{"__key__": f"k{i}", "mp4": v} for i, v in enumerate(videos)]
    rng_a, rng_b = random.Random(0), random.Random(0)
    rates = interleaved_rates({
        "decoder": lambda k: decode_clips(videos[k], frames, backend=backend, rng=rng_a),
        "pipeline": lambda k: process_sample(samples[k], cfg, num_frames=frames, size=size, rng=rng_b),
    }, list(range(len(videos))), seconds)
    return {"input": name, "backend": backend, "decoder_clips_per_s": rates["decoder"],
            "pipeline_clips_per_s": rates["pipeline"], "pipeline_over_decoder": rates["pipeline"] / rates["decoder"]}


def bench_loader(shards: str, backend: str, frames: int, size: int, seconds: float) -> float:
    """Clips per second through the whole loader (tar reading, shuffle, decode, augment, collate), no workers;
    median over batches, epoch start-up included in the first batch of each epoch."""
    cfg = DataConfig(shards=shards, num_frames=frames, img_size=size, batch_size=8, num_workers=0, decoder=backend,
                     shuffle_buffer=16)
    loader = build_video_loader(cfg, rank=0, world_size=1)
    per_clip: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        for batch in loader:
            per_clip.append((time.perf_counter() - t0) / len(batch["key"]))
            t0 = time.perf_counter()
    return 1.0 / float(np.median(per_clip))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per figure")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--synth-clips", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # per-core figures

    # Why a fresh small corpus: the benchmark must not depend on a previous `synth` run.
    tmp = tempfile.TemporaryDirectory()
    info = make_synthetic_corpus(tmp.name, args.synth_clips, 0, 0, workers=1, samples_per_shard=32)
    shards = info["splits"]["train"]["shards"]
    synth_videos = []
    for url in parse_shard_spec(shards)[0].urls:
        with open(url, "rb") as f:
            synth_videos += [s["mp4"] for s in iter_tar_samples(f)]
    t0 = time.perf_counter()
    video_340p = make_340p_video()
    print(f"made the 340p test video ({len(video_340p) / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")

    backends = available_backends()
    rows = []
    for backend in backends:
        for name, videos in (("synthetic 128p 32f", synth_videos), ("340p 10s 30fps", [video_340p])):
            row = bench_input(name, videos, backend, args.frames, args.size, args.seconds)
            if name.startswith("synthetic"):
                row["loader_clips_per_s"] = bench_loader(shards, backend, args.frames, args.size, args.seconds)
            rows.append(row)
            print(f"{backend:>10} | {name:>18} | decoder {row['decoder_clips_per_s']:7.1f} clips/s | pipeline "
                  f"{row['pipeline_clips_per_s']:7.1f} clips/s | pipeline/decoder {row['pipeline_over_decoder']:.2f}")
    for row in rows:
        ref = next((r for r in rows if r["backend"] == "decord" and r["input"] == row["input"]), None)
        row["pipeline_vs_decord"] = row["pipeline_clips_per_s"] / ref["pipeline_clips_per_s"] if ref else None

    print(f"\nclips of {args.frames} frames at {args.size} px, one core ({platform.processor() or platform.machine()})")
    print("| input | backend | decoder clips/s/core | pipeline clips/s/core | pipeline / decoder | vs decord |"
          + (" loader clips/s/core |" if any("loader_clips_per_s" in r for r in rows) else ""))
    print("|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["input"], r["backend"])):
        vs = f"{r['pipeline_vs_decord']:.2f}" if r["pipeline_vs_decord"] is not None else "-"
        loader = f"{r['loader_clips_per_s']:.1f}" if "loader_clips_per_s" in r else "-"
        print(f"| {r['input']} | {r['backend']} | {r['decoder_clips_per_s']:.1f} | {r['pipeline_clips_per_s']:.1f} | "
              f"{r['pipeline_over_decoder']:.2f} | {vs} | {loader} |")

    result = {"frames": args.frames, "size": args.size, "seconds_per_figure": args.seconds,
              "torch": torch.__version__, "machine": platform.machine(), "backends": backends, "rows": rows}
    write_result(args.out, result)
    tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
