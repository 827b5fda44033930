"""Stage 1 (Flux-UMT) step benchmark (measured, not asserted): ``python -m benchmarks.bench_distill``.

For each case, one optimizer step = teacher targets (frozen, no_grad) + visible-token sampling + packed student
forward/backward over all budgets + AdamW. Reports the median step time, student tokens/s (cls + visible
tokens of every view per second of the whole step) and the teacher's share of the step time. Runs on CUDA
when available (bf16 autocast on both sides), else CPU. Prints a table and writes
benchmarks/results/distill.json.

Cases: ``smoke`` (the smoke preset: tiny student, 4-layer 96-wide teacher), ``small`` (FluxViT-S/14 student
against a randomly initialised ViT-B/16-shaped open_clip tower, 8 x 224 clips, paper budgets; slow on a CPU).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from fluxvit.stages.common import StepOutput, build_optimizer
from fluxvit.stages.common.data import SyntheticClips
from fluxvit.stages.distill import DistillTask, build_config
from benchmarks import write_result

RESULTS = Path(__file__).parent / "results"

CASES = {
    "smoke": [],
    "small": ["student.name=fluxvit_small_patch14", "teacher.vision_cfg={\"image_size\": 224, \"patch_size\": 16, "
              "\"width\": 768, \"layers\": 12, \"head_width\": 64}", "teacher.embed_dim=512", "teacher.budget=2048",
              "loss.num_layers=6", "loss.budgets=[2048,1536,1024]", "data.batch_size=1", "data.grids=[[8,224]]"],
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_case(name: str, reps: int, device: torch.device) -> dict:
    """Median timings of ``reps`` steps (after one warmup step) of case ``name``."""
    cfg = build_config("smoke", CASES[name])
    task = DistillTask(cfg)
    task.to_device(device)
    model = task.model.to(device).train()
    opt = build_optimizer(model, cfg.optim)
    source = SyntheticClips(cfg.data, seed=0)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    # Time the teacher inside the real step by wrapping its forward.
    teacher_time = [0.0]
    inner = task.teacher.forward

    def timed_teacher(*args, **kwargs):
        _sync(device)
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        _sync(device)
        teacher_time[0] += time.perf_counter() - t0
        return out

    task.teacher.forward = timed_teacher
    steps, shares, tokens = [], [], []
    for i in range(reps + 1):
        batch = source.batch(i)
        teacher_time[0] = 0.0
        _sync(device)
        t0 = time.perf_counter()
        with amp:
            out: StepOutput = task.compute_loss(model, batch, i)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        dt = time.perf_counter() - t0
        if i:  # the first step warms up allocators and kernels
            steps.append(dt)
            shares.append(teacher_time[0] / dt)
            tokens.append(out.tokens)
    step = statistics.median(steps)
    return {"case": name, "device": str(device), "student": cfg.student.name,
            "budgets": list(cfg.loss.budgets), "batch": cfg.data.batch_size, "reps": reps,
            "step_s": round(step, 4), "student_tokens_per_step": int(statistics.median(tokens)),
            "student_tokens_per_s": round(statistics.median(t / s for t, s in zip(tokens, steps)), 1),
            "teacher_share": round(statistics.median(shares), 3)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="smoke", help=f"comma-separated subset of {sorted(CASES)}")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--out", default=str(RESULTS / "distill.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    rows = [bench_case(c.strip(), args.reps, device) for c in args.cases.split(",") if c.strip()]
    result = {"host": platform.node(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "cuda": torch.cuda.get_device_name() if device.type == "cuda" else None, "results": rows}
    print("| case | device | batch | budgets | step (s) | student tokens/step | student tokens/s | teacher share |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['device']} | {r['batch']} | {r['budgets']} | {r['step_s']:.3f} | "
              f"{r['student_tokens_per_step']} | {r['student_tokens_per_s']:.0f} | {r['teacher_share']:.1%} |")
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
