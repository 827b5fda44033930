"""Peak memory of one training step with and without activation checkpointing (``model.set_grad_checkpointing``).

``python -m benchmarks.bench_memory`` (defaults: FluxViT-B, batch 2, budget 3072 tokens of 16 x 224 px clips,
fp32 on CPU). Each mode runs in a fresh subprocess: the figure is the process's peak resident memory during
one forward + backward (``ru_maxrss``) minus its resident memory just before the step (model, inputs and
libraries already loaded), i.e. what the step itself adds: activations kept for backward, gradients and
temporaries. Prints a table and writes benchmarks/results/memory.json. Measured, not asserted.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import write_result
from fluxvit.models import create_model

RESULTS = Path(__file__).parent / "results"


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**30


def one_step(model_name: str, batch: int, tokens: int, frames: int, res: int, checkpointing: bool) -> dict:
    """One forward + backward in this process; memory figures in GiB."""
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=400).train()
    model.set_grad_checkpointing(checkpointing)
    video = torch.randn(batch, 3, frames, res, res)
    labels = torch.randint(0, 400, (batch,))
    before = _rss_gib()
    t0 = time.perf_counter()
    F.cross_entropy(model(video, num_tokens=tokens), labels).backward()
    step_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB on Linux
    return dict(checkpointing=checkpointing, before_gib=before, peak_gib=peak, step_adds_gib=peak - before,
                step_s=step_s)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fluxvit_base_patch14")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=3072)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(RESULTS / "memory.json"))
    args = ap.parse_args(argv)
    if args.child:
        row = one_step(args.model, args.batch, args.tokens, args.frames, args.res, args.child == "on")
        sys.stdout.write(json.dumps(row) + "\n")
        return row
    rows = []
    for mode in ("off", "on"):  # a fresh process each, so one mode's peak cannot hide the other's
        cmd = [sys.executable, "-m", "benchmarks.bench_memory", "--child", mode, "--model", args.model,
               "--batch", str(args.batch), "--tokens", str(args.tokens), "--frames", str(args.frames),
               "--res", str(args.res)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    off, on = rows
    report = dict(machine=dict(platform=platform.platform(), threads=torch.get_num_threads(), torch=torch.__version__),
                  model=args.model, batch=args.batch, tokens=args.tokens, clip=f"{args.frames}x{args.res}",
                  rows=rows, saving=1 - on["step_adds_gib"] / off["step_adds_gib"])
    print(f"\n{args.model}, batch {args.batch} x {args.tokens} tokens ({args.frames} x {args.res} px clips), fp32 CPU")
    print("| grad checkpointing | step adds (GiB) | process peak (GiB) | step (s) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {'on' if r['checkpointing'] else 'off'} | {r['step_adds_gib']:.2f} | {r['peak_gib']:.2f} | "
              f"{r['step_s']:.1f} |")
    print(f"checkpointing saves {100 * report['saving']:.0f} % of the step's memory")
    write_result(args.out, report)
    return report


if __name__ == "__main__":
    main()
