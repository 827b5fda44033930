"""Data-pipeline benchmark: can one CPU core per decode keep an H100 fed at the Flux grids? (measured, not asserted)

Sources, generated here (no downloads): 10 s, 30 fps H.264 videos of moving shapes over a textured background at
340p (604x340) and 720p (1280x720), encoded with libx264's defaults (keyframe interval 250), and their
training-ready re-encodes (``fluxvit-data make-shards`` defaults, ``fluxvit.datasets.prepare.Encoding``).

For every source and two Flux draws, the finetuning grid (6-24 frames, 112-336 px, 2048-6144 tokens) and the
pretraining grid (4-26 frames, 168-280 px, 2048-4096 tokens), one clip per (F, R) draw, it measures on one core
(``torch.set_num_threads(1)``, one decoder thread, no workers) the **CPU time** per clip (process time, so other
jobs on a shared machine do not count) of

* ``decoder``: open the bytes + decode the F TSN-sampled frames (the bare decoder),
* ``pipeline``: the training path per sample (decode + MultiScaleCrop + resize to R + flip + normalise),
* ``loader`` (training-ready rows): the whole loader, tar shards to collated batches of 4, against the bare
  decoder on the same draws (target: overhead <= 20 %).

GPU side, for FluxViT-S and -B (``fluxvit.metrics.fluxvit_gflops``: the paper's GFLOPs = multiply-accumulates)::

    training FLOP per clip = 2 (FLOP per MAC) x 3 (forward + backward) x sum over budgets K of
                             fluxvit_gflops(min(K, F * (R // 14)^2)) x 1e9, averaged over the draw's (F, R)
    clips/s one H100 consumes = 0.40 x 989e12 (bf16 dense peak) / training FLOP per clip
    cores per GPU = GPU clips/s / pipeline clips/s per core

with Flux-Multi budgets 3072 + 2048 + 1024 (one packed pass) and a single budget of 2048. Target: <= 12 cores per
H100 for FluxViT-B Flux-Multi with training-ready shards at the finetuning draw. Candidate encodings (shorter
side x keyframe interval) of the 720p source are measured too, to choose ``make-shards``' defaults.

    python -m benchmarks.bench_data [--seconds 3] [--backend decord] [--cache DIR]

torchcodec's CUDA decoding needs a GPU and is not measured here.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import write_result
from fluxvit.datasets import DataConfig, FluxGrid, available_backends, build_video_loader, decode_clips, process_sample
from fluxvit.datasets.prepare import Encoding, encode_video
from fluxvit.datasets.shards import ShardWriter
from fluxvit.metrics import fluxvit_gflops

RESULTS = Path(__file__).resolve().parent / "results" / "data.json"
DRAWS = {"finetune": FluxGrid.preset("finetune"), "pretrain": FluxGrid.preset("videotext")}
MODELS = {"S": (384, 12), "B": (768, 12)}  # (embed_dim, depth) of fluxvit_small/base_patch14
BUDGETS = {"multi": (3072, 2048, 1024), "single": (2048,)}
H100_BF16 = 989e12
MFU = 0.40
# (shorter side, keyframe interval, fps cap) re-encodes of the 720p source, measured to choose the defaults
CANDIDATES = [(256, 16, 30), (256, 32, 30), (256, 32, 15), (320, 16, 30), (320, 32, 30), (320, 64, 30),
              (320, 16, 15), (320, 32, 15)]


def make_source(width: int, height: int, seconds: int = 10, fps: int = 30) -> bytes:
    """A ``seconds``-long H.264 mp4 with libx264's defaults (keyframe interval 250): a slowly panning textured
    background (camera motion), three moving shapes and film grain, so that P-frames cost bits as in real video."""
    import io

    import av

    rng = np.random.default_rng(0)
    tex = rng.uniform(0.2, 1.0, (height // 8 + 2, (width + seconds * fps * 2) // 8 + 2, 1)) * np.array([90, 120, 160])
    tex = np.kron(tex, np.ones((8, 8, 1)))
    tex += rng.normal(0, 12, tex.shape)  # fine texture
    tex = tex.clip(0, 255).astype(np.uint8)
    side = height // 6
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for t in range(seconds * fps):
            img = tex[:height, 2 * t:2 * t + width].copy()  # pan 2 px per frame
            for k in range(3):
                x = int((t * (3 + 2 * k) * width / 604 + 150 * k) % (width - side))
                y = int((height * (0.25 + 0.25 * k) + 40 * np.sin(t / (10 + k))) % (height - side))
                img[y:y + side, x:x + side] = (220 - 60 * k, 60 + 70 * k, 40 + 80 * k)
            grain = rng.integers(-4, 5, img.shape, dtype=np.int16)
            img = (img.astype(np.int16) + grain).clip(0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def cached(path: Path, make) -> bytes:
    if path.exists():
        return path.read_bytes()
    data = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def draw_sequence(grid: FluxGrid, n: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [grid.sample(rng) for _ in range(n)]


def cpu_rates(fns: dict, draws: list, seconds: float) -> dict[str, float]:
    """Clips per CPU-second of each ``fn(frames, size)``, calls interleaved over the same draws, at least one pass
    over ``draws`` and about ``seconds`` of wall time per function."""
    for fn in fns.values():
        fn(*draws[0])  # warm-up
    cpu = {name: 0.0 for name in fns}
    calls, start = 0, time.perf_counter()
    while calls < len(draws) or time.perf_counter() - start < seconds * len(fns):
        frames, size = draws[calls % len(draws)]
        for name, fn in fns.items():
            t0 = time.process_time()
            fn(frames, size)
            cpu[name] += time.process_time() - t0
        calls += 1
    return {name: calls / t for name, t in cpu.items()}


def bench_row(video: bytes, backend: str, grid: FluxGrid, seconds: float) -> dict:
    cfg = DataConfig(decoder=backend, decoder_threads=1)
    sample = {"__key__": "k", "mp4": video}
    rng_a, rng_b = random.Random(0), random.Random(0)
    rates = cpu_rates({
        "decoder": lambda f, s: decode_clips(video, f, backend=backend, rng=rng_a),
        "pipeline": lambda f, s: process_sample(sample, cfg, num_frames=f, size=s, rng=rng_b),
    }, draw_sequence(grid, 24), seconds)
    return {"decoder_clips_per_core_s": rates["decoder"], "pipeline_clips_per_core_s": rates["pipeline"]}


def bench_loader(video: bytes, backend: str, grid: FluxGrid, epochs: int, tmp: Path) -> dict:
    """CPU seconds of the whole loader (no workers, batch 4, 16 clips per epoch) against the bare decoder decoding
    the same clips at the same frame counts (the loader's own per-batch grid draws)."""
    folder = tmp / f"loader_{backend}"
    if not folder.exists():
        with ShardWriter(folder, max_count=8) as writer:
            for i in range(16):
                writer.write({"__key__": f"{i:04d}", "mp4": video, "txt": "a clip"})
    cfg = DataConfig(shards=str(folder / "{00000..00001}.tar"), batch_size=4, num_workers=0, decoder=backend,
                     grid=grid, shuffle_buffer=4)
    loader = build_video_loader(cfg, seed=0, rank=0, world_size=1)
    cpu_loader = cpu_bare = 0.0
    clips = 0
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        t0 = time.process_time()
        n = sum(len(b["key"]) for b in loader)
        cpu_loader += time.process_time() - t0
        grid_rng, rng = random.Random(f"grid:0:{epoch}:0:0"), random.Random(epoch)
        t0 = time.process_time()
        for _ in range(n // 4):
            frames, _ = grid.sample(grid_rng)
            for _ in range(4):
                decode_clips(video, frames, backend=backend, rng=rng)
        cpu_bare += time.process_time() - t0
        clips += n
    return {"loader_clips_per_core_s": clips / cpu_loader, "bare_clips_per_core_s": clips / cpu_bare,
            "loader_overhead": cpu_loader / cpu_bare - 1.0}


def gpu_clips_per_s(embed_dim: int, depth: int, grid: FluxGrid, budgets: tuple) -> tuple[float, float]:
    """(training TFLOP per clip, clips/s one H100 consumes) averaged over the grid's valid pairs."""
    flops = []
    for frames, res in grid.valid_pairs():
        tokens = grid.tokens(frames, res)
        macs = sum(fluxvit_gflops(min(k, tokens), embed_dim, depth) for k in budgets) * 1e9
        flops.append(2 * 3 * macs)
    per_clip = float(np.mean(flops))
    return per_clip / 1e12, MFU * H100_BF16 / per_clip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="wall time per measured figure")
    parser.add_argument("--backend", default="decord", help="decoder backend (default decord, the loader's)")
    parser.add_argument("--loader-epochs", type=int, default=8, help="epochs of 16 clips per loader figure")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "fluxvit_bench_data",
                        help="where generated sources and encodes are kept between runs")
    parser.add_argument("--no-candidates", action="store_true", help="skip the encoding candidates")
    parser.add_argument("--only-candidates", action="store_true", help="measure the encoding candidates only")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # per-core figures
    backend = args.backend if args.backend in available_backends() else "pyav"
    enc = Encoding()
    key = f"s{enc.short_side}_k{enc.keyframe_interval}_q{enc.crf}_f{enc.max_fps:g}"
    sources = {}
    for name, (w, h) in {"340p": (604, 340), "720p": (1280, 720)}.items():
        t0 = time.perf_counter()
        src = cached(args.cache / f"{name}.mp4", lambda w=w, h=h: make_source(w, h))
        ready = cached(args.cache / f"{name}_{key}.mp4", lambda src=src: encode_video(src, enc))
        sources[f"{name} default GOP"] = src
        sources[f"{name} training-ready"] = ready
        print(f"{name}: source {len(src) / 1e6:.2f} MB, training-ready {len(ready) / 1e6:.2f} MB "
              f"({time.perf_counter() - t0:.0f} s to make or load)")

    gpu = {}
    for draw, grid in DRAWS.items():
        for model, (dim, depth) in MODELS.items():
            for mode, budgets in BUDGETS.items():
                gpu[(draw, model, mode)] = gpu_clips_per_s(dim, depth, grid, budgets)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for draw, grid in (DRAWS.items() if not args.only_candidates else ()):
            for name, video in sources.items():
                row = {"source": name, "draw": draw, "backend": backend, "bytes_per_clip": len(video),
                       **bench_row(video, backend, grid, args.seconds)}
                if name.endswith("training-ready"):
                    row.update(bench_loader(video, backend, grid, args.loader_epochs, Path(tmp) / name.split()[0]))
                for (d, model, mode), (_tflop, rate) in gpu.items():
                    if d == draw:
                        row[f"gpu_{model}_{mode}_clips_s"] = rate
                        row[f"cores_{model}_{mode}"] = rate / row["pipeline_clips_per_core_s"]
                rows.append(row)
                print(f"{draw:>8} | {name:>22} | decoder {row['decoder_clips_per_core_s']:6.1f} | pipeline "
                      f"{row['pipeline_clips_per_core_s']:6.1f} clips/s/core | B multi needs "
                      f"{row['cores_B_multi']:5.1f} cores" + (f" | loader overhead {row['loader_overhead']:+.0%}"
                                                             if "loader_overhead" in row else ""))
    candidates = []
    if not args.no_candidates:
        src = sources["720p default GOP"]
        for short, keyint, fps in CANDIDATES:
            c = Encoding(short_side=short, keyframe_interval=keyint, max_fps=fps)
            ck = f"s{short}_k{keyint}_q{c.crf}_f{c.max_fps:g}"
            video = cached(args.cache / f"720p_{ck}.mp4", lambda c=c: encode_video(src, c))
            r = bench_row(video, backend, DRAWS["finetune"], args.seconds)
            cand = {"short_side": short, "keyframe_interval": keyint, "max_fps": fps, "bytes_per_clip": len(video),
                    "pipeline_clips_per_core_s": r["pipeline_clips_per_core_s"],
                    "cores_B_multi": gpu[("finetune", "B", "multi")][1] / r["pipeline_clips_per_core_s"]}
            candidates.append(cand)
            print(f"| {short} | {keyint} | {fps:g} | {len(video) / 1e6:.2f} MB | "
                  f"{cand['pipeline_clips_per_core_s']:.1f} | {cand['cores_B_multi']:.1f} |")
    if args.only_candidates:
        return {"candidates": candidates}
    print(f"\nOne core per decode ({backend}, CPU time; {platform.processor() or platform.machine()}, "
          f"load average {os.getloadavg()[0]:.1f} at the end). GPU: {MFU:.0%} of {H100_BF16 / 1e12:.0f} TFLOP/s.")
    print("| draw | source | bytes/clip | decoder clips/s/core | pipeline clips/s/core | loader overhead | "
          "H100 clips/s S multi / single | B multi / single | cores per H100 S multi / single | B multi / single |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        over = f"{r['loader_overhead']:+.0%}" if "loader_overhead" in r else "-"
        print(f"| {r['draw']} | {r['source']} | {r['bytes_per_clip'] / 1e6:.2f} MB | {r['decoder_clips_per_core_s']:.1f} | "
              f"{r['pipeline_clips_per_core_s']:.1f} | {over} | {r['gpu_S_multi_clips_s']:.0f} / "
              f"{r['gpu_S_single_clips_s']:.0f} | {r['gpu_B_multi_clips_s']:.0f} / {r['gpu_B_single_clips_s']:.0f} | "
              f"{r['cores_S_multi']:.1f} / {r['cores_S_single']:.1f} | {r['cores_B_multi']:.1f} / "
              f"{r['cores_B_single']:.1f} |")
    for (draw, model, mode), (tflop, rate) in gpu.items():
        print(f"  {draw} {model} {mode}: {tflop:.2f} TFLOP per training clip -> {rate:.0f} clips/s per H100")
    result = {"backend": backend, "seconds_per_figure": args.seconds, "encoding": dataclasses.asdict(enc), "torch": torch.__version__, "machine": platform.machine(),
              "gpu": {f"{d}/{m}/{b}": {"tflop_per_clip": t, "clips_per_s": r} for (d, m, b), (t, r) in gpu.items()},
              "rows": rows, "candidates": candidates, "load_average": os.getloadavg()[0],
              "torchcodec_cuda": "not run (no GPU on this machine)"}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
