"""Model benchmarks (measured, not asserted): ``make bench`` / ``python -m benchmarks.bench_model``.

1. Selector cost: patch embedding (DPN) of the whole candidate pool plus scores + top-k, as a share of the
   full forward pass that runs the selected budget (target <= 3%).
2. Packing: one batch mixing budgets 3072 / 2048 / 1024 / 512, packed (no padding) vs every clip padded
   to the longest; and packed vs the time its real token count predicts (the sum of each clip run alone).
   Targets: packed >= 1.4x faster than padded; packed within 10% of the prediction.
3. Attention backends on the same mixed pack (one layer's attention op).

Prints a Markdown table and writes benchmarks/results/model.json. Use ``--models`` / ``--reps`` to shrink.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from fluxvit.models import available_backends, create_model, force_backend, varlen_attention
from fluxvit.models.attention import PackedSeqs
from fluxvit.models.selector import select_tokens
from benchmarks import write_result

RESULTS = Path(__file__).parent / "results"


def timed(fn, reps: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_blocks(model, x, lengths):
    """Blocks + pooling head over a pack with the given sequence lengths (what padding changes)."""
    pack = PackedSeqs(lengths, x.device)
    for blk in model.blocks:
        x = blk(x, pack)
    return model.clip_projector[0](x, pack.cu_seqlens, pack.seg)


def bench_selector(model, frames: int, res: int, budgets, reps: int) -> list[dict]:
    video = torch.randn(1, 3, frames, res, res)
    rows = []
    emb_t = timed(lambda: model.patch_embed(video), reps)
    emb = model.patch_embed(video)
    for budget in budgets:
        sel_t = timed(lambda budget=budget: select_tokens(emb, budget), reps)
        fwd_t = timed(lambda budget=budget: model(video, num_tokens=budget), reps)
        rows.append(dict(pool=f"{frames}x{res}", pool_tokens=emb.shape[1] * emb.shape[2], budget=budget,
                         patch_embed_s=emb_t, select_s=sel_t, forward_s=fwd_t,
                         selector_pct=100 * sel_t / fwd_t, total_pct=100 * (emb_t + sel_t) / fwd_t))
    return rows


def bench_packing(model, budgets, reps: int) -> dict:
    D = model.config.embed_dim
    lengths = [b + 1 for b in budgets]  # cls + kept tokens
    g = torch.Generator().manual_seed(0)
    packed_x = torch.randn(sum(lengths), D, generator=g)
    padded_x = torch.randn(len(lengths) * max(lengths), D, generator=g)
    packed_t = timed(lambda: run_blocks(model, packed_x, lengths), reps)
    padded_t = timed(lambda: run_blocks(model, padded_x, [max(lengths)] * len(lengths)), reps)
    alone = [timed(lambda n=n: run_blocks(model, packed_x[:n], [n]), reps) for n in lengths]
    predicted = sum(alone)
    return dict(budgets=list(budgets), packed_s=packed_t, padded_s=padded_t, predicted_s=predicted,
                each_alone_s=alone, speedup_vs_padded=padded_t / packed_t, packed_over_predicted=packed_t / predicted)


def bench_backends(model, budgets, reps: int) -> dict:
    H = model.config.num_heads
    d = model.config.embed_dim // H
    lengths = [b + 1 for b in budgets]
    n = sum(lengths)
    q, k, v = (torch.randn(n, H, d) for _ in range(3))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    out = {}
    for name in available_backends("cpu"):
        if name == "math":
            continue
        with force_backend(name):
            out[name] = timed(lambda: varlen_attention(q, k, v, cu), reps)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["fluxvit_small_patch14", "fluxvit_base_patch14"])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--pool", default="32x252", help="candidate pool FRAMESxRES for the selector benchmark")
    ap.add_argument("--out", default=str(RESULTS / "model.json"))
    args = ap.parse_args(argv)
    frames, res = (int(v) for v in args.pool.split("x"))
    torch.manual_seed(0)
    report = dict(machine=dict(platform=platform.platform(), threads=torch.get_num_threads(),
                               torch=torch.__version__, device="cpu"), models={})
    for name in args.models:
        model = create_model(name).eval()
        with torch.inference_mode():
            sel = bench_selector(model, frames, res, (3072, 2048, 1024), args.reps)
            pack = bench_packing(model, (3072, 2048, 1024, 512), args.reps)
            backends = bench_backends(model, (3072, 2048, 1024, 512), args.reps)
        report["models"][name] = dict(selector=sel, packing=pack, attention_backends_s=backends)
        print(f"\n## {name} (CPU, {torch.get_num_threads()} threads)")
        print("| budget | pool | patch embed (s) | scores+top-k (s) | forward (s) | selector % | embed+selector % |")
        print("|---|---|---|---|---|---|---|")
        for r in sel:
            print(f"| {r['budget']} | {r['pool']} | {r['patch_embed_s']:.3f} | {r['select_s']:.4f} | "
                  f"{r['forward_s']:.2f} | {r['selector_pct']:.2f} | {r['total_pct']:.2f} |")
        print(f"packed {pack['packed_s']:.2f} s, padded {pack['padded_s']:.2f} s -> "
              f"{pack['speedup_vs_padded']:.2f}x; predicted by token count {pack['predicted_s']:.2f} s -> "
              f"packed/predicted {pack['packed_over_predicted']:.3f}")
        print("attention op on the mixed pack: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in backends.items()))
    write_result(args.out, report)
    return report


if __name__ == "__main__":
    main()
