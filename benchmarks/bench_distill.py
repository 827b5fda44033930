"""Stage 1 (Flux-UMT) step benchmark (measured, not asserted): ``python -m benchmarks.bench_distill``.

One optimizer step = teacher targets (frozen, no_grad) + visible-token sampling + packed student forward/backward
over all budgets + AdamW. Reports the median step time, student tokens/s (cls + visible tokens of every view per
second of the whole step) and the teacher's share of the step time. Runs on CUDA when available (bf16 autocast on
both sides), else CPU. Prints a table and writes benchmarks/results/distill.json.

Cases:
  * ``smoke``: the smoke preset as shipped (tiny student, tiny random InternVideo2 teacher).
  * ``paper_s`` / ``paper_b``: the paper's stage 1 (FluxViT-S / B student, InternVideo2-1B teacher keeping 2048
    tokens of an 8 x 224 clip, student budgets 2048 / 1536 / 1024, six aligned layers with MLP decoders), batch 1,
    random weights. A full-size step is minutes on a 2-core CPU, so by default (``--full`` off) the case runs at
    reduced depth (teacher ``--teacher-depth`` of 40 blocks, student ``--student-depth`` of 12, aligned layers
    capped by the student depth), the teacher and student parts are timed separately inside the real step, and
    each part is **extrapolated to the full models by its FLOPs** (analytic counts of the matmuls and attention,
    checked against ``torch.utils.flop_counter`` on the reduced step). Every figure so obtained is labelled
    "extrapolated" in the output.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import write_result
from fluxvit.stages.common import StepOutput, build_optimizer
from fluxvit.stages.common.data import SyntheticClips
from fluxvit.stages.distill import DistillTask, build_config

RESULTS = Path(__file__).parent / "results"
STUDENTS = {"paper_s": ("fluxvit_small_patch14", 384, 1536, 768), "paper_b": ("fluxvit_base_patch14", 768, 3072, 768)}
TEACHER = dict(dim=1408, hidden=6144, depth=40, pooled=768, heads=16)  # InternVideo2-1B
BUDGETS = (2048, 1536, 1024)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------- FLOP model
ATTENTION = [True]  # False: leave out the attention products (FlopCounterMode does not count CPU SDPA kernels)


def _block_flops(lengths, dim: int, hidden: int) -> float:
    """One pre-norm block over sequences of the given lengths: qkv + proj + MLP matmuls and the attention."""
    return sum(2 * n * (4 * dim * dim + 2 * dim * hidden) + (4 * n * n * dim if ATTENTION[0] else 0) for n in lengths)


def _pool_flops(n: int, dim: int, out: int) -> float:
    return 2 * n * 2 * dim * dim + 2 * dim * dim + 4 * n * dim + 2 * dim * out


def teacher_flops(depth: int, tokens: int = 2048, patch_in: int = 3 * 14 * 14) -> float:
    """Forward FLOPs of InternVideo2-1B's width at ``depth`` blocks on one clip keeping ``tokens`` tokens."""
    d, h = TEACHER["dim"], TEACHER["hidden"]
    n = tokens + 1
    return 2 * tokens * patch_in * d + depth * _block_flops([n], d, h) + _pool_flops(n, d, TEACHER["pooled"])


def student_flops(depth: int, dim: int, hidden: int, pooled: int, aligned: int, budgets=BUDGETS,
                  clip_tokens: int = 2048) -> float:
    """Forward + backward (3x forward) FLOPs of the student side of one step on one clip: the packed student over
    all budgets, its pooling heads, ``aligned`` MLP decoders (dim -> dim -> 1408) on every row, final decoder."""
    lengths = [b + 1 for b in budgets]
    rows = sum(lengths)
    fwd = (2 * clip_tokens * 3 * 14 * 14 * dim  # patch embedding of the clip (once per view)
           * len(budgets) + depth * _block_flops(lengths, dim, hidden)
           + sum(_pool_flops(n, dim, pooled) for n in lengths)
           + aligned * rows * 2 * (dim * dim + dim * TEACHER["dim"])
           + len(budgets) * 2 * (pooled * pooled * 2))
    return 3.0 * fwd


# ------------------------------------------------------------------------------------------------ one case
def _config(case: str, teacher_depth: int, student_depth: int, full: bool):
    if case == "smoke":
        return build_config("smoke"), None
    name = STUDENTS[case][0]
    t_depth, s_depth = (40, 12) if full else (teacher_depth, student_depth)
    aligned = min(6, s_depth, t_depth)
    interval = 3.34 if t_depth == 40 else max(1.0, (t_depth - 1) / max(aligned - 1, 1))
    cfg = build_config("paper_s", [
        f"model.name={name}", f"model.overrides={{\"depth\": {s_depth}}}",
        f"teacher.overrides={{\"depth\": {t_depth}}}", "teacher.budget=2048",
        f"loss.num_layers={aligned}", f"loss.teacher_interval={interval}", "loss.budgets=[2048,1536,1024]",
        "data.source=synthetic", "data.batch_size=1", "data.grid=[[8,224]]", "data.num_workers=0",
    ])
    return cfg, (t_depth, s_depth, aligned)


def bench_case(case: str, reps: int, device: torch.device, teacher_depth: int, student_depth: int,
               full: bool) -> dict:
    """Median timings of ``reps`` steps (after one warmup step); extrapolated to full depth unless ``full``."""
    cfg, depths = _config(case, teacher_depth, student_depth, full)
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

    def step(i: int, batch: dict):
        with amp:
            out: StepOutput = task.compute_loss(model, batch, i)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out

    steps, teach, tokens = [], [], []
    for i in range(reps + 1):
        batch = source.batch(i)  # clip synthesis is not part of the step
        teacher_time[0] = 0.0
        _sync(device)
        t0 = time.perf_counter()
        out = step(i, batch)
        _sync(device)
        dt = time.perf_counter() - t0
        if i:  # the first step warms up allocators and kernels
            steps.append(dt)
            teach.append(teacher_time[0])
            tokens.append(out.tokens)
    step_s, teacher_s = statistics.median(steps), statistics.median(teach)
    row = {"case": case, "device": str(device), "student": cfg.model.name, "budgets": list(cfg.loss.budgets),
           "batch": cfg.data.batch_size, "reps": reps, "measured_step_s": round(step_s, 3),
           "measured_teacher_s": round(teacher_s, 3), "student_tokens_per_step": int(statistics.median(tokens))}
    if depths is None:
        row.update(step_s=row["measured_step_s"], teacher_share=round(teacher_s / step_s, 3),
                   student_tokens_per_s=round(row["student_tokens_per_step"] / step_s, 1), extrapolated=False)
        return row

    t_depth, s_depth, aligned = depths
    _, dim, hidden, pooled = STUDENTS[case]
    # Check the FLOP model on the measured (reduced) step.
    with FlopCounterMode(display=False) as counter:
        step(reps + 1, source.batch(reps + 1))
    counted = counter.get_total_flops()
    ATTENTION[0] = device.type == "cuda"  # what the counter sees: on CPU, matmuls only
    modelled = teacher_flops(t_depth) + student_flops(s_depth, dim, hidden, pooled, aligned)
    ATTENTION[0] = True
    t_full, s_full = teacher_flops(40), student_flops(12, dim, hidden, pooled, 6)
    t_red, s_red = teacher_flops(t_depth), student_flops(s_depth, dim, hidden, pooled, aligned)
    teacher_full_s = teacher_s * t_full / t_red
    student_full_s = (step_s - teacher_s) * s_full / s_red
    full_step = teacher_full_s + student_full_s
    row.update(extrapolated=not full, teacher_depth=t_depth, student_depth=s_depth, aligned_layers=aligned,
               flops_counted_reduced=counted, flops_modelled_reduced=modelled,
               flops_teacher_full=t_full, flops_student_full=s_full,
               step_s=round(full_step, 2), teacher_s=round(teacher_full_s, 2),
               teacher_share=round(teacher_full_s / full_step, 3),
               student_tokens_per_s=round(row["student_tokens_per_step"] / full_step, 1))
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="smoke,paper_s,paper_b", help="comma-separated subset of smoke,paper_s,paper_b")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--teacher-depth", type=int, default=2, help="teacher blocks measured (extrapolated to 40)")
    p.add_argument("--student-depth", type=int, default=2, help="student blocks measured (extrapolated to 12)")
    p.add_argument("--full", action="store_true", help="run the full 40-block teacher and 12-block students")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--out", default=str(RESULTS / "distill.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    rows = [bench_case(c.strip(), args.reps, device, args.teacher_depth, args.student_depth, args.full)
            for c in args.cases.split(",") if c.strip()]
    result = {"host": platform.node(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "cuda": torch.cuda.get_device_name() if device.type == "cuda" else None, "results": rows}
    print("| case | device | measured at (teacher / student blocks) | measured step (s) | teacher (s) | "
          "step (s) | student tokens/s | teacher share | |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        at = f"{r['teacher_depth']} / {r['student_depth']}" if "teacher_depth" in r else "as shipped"
        note = "extrapolated to 40 / 12 blocks by FLOPs" if r["extrapolated"] else "measured"
        print(f"| {r['case']} | {r['device']} | {at} | {r['measured_step_s']:.2f} | {r['measured_teacher_s']:.2f} | "
              f"{r['step_s']:.2f} | {r['student_tokens_per_s']:.0f} | {r['teacher_share']:.1%} | {note} |")
        if "flops_counted_reduced" in r:
            what = "matmul " if r["device"] == "cpu" else ""
            print(f"  {r['case']}: {what}FLOP model of the measured step {r['flops_modelled_reduced'] / 1e12:.3f} T vs "
                  f"torch.utils.flop_counter {r['flops_counted_reduced'] / 1e12:.3f} T; full teacher "
                  f"{r['flops_teacher_full'] / 1e12:.2f} T, full student step {r['flops_student_full'] / 1e12:.2f} T")
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
