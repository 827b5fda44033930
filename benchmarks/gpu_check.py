"""One GPU check: ``make gpu-check`` / ``python -m benchmarks.gpu_check`` (at most 8 min on one H100/H200).

On a GPU machine without network (its own python3 and PyTorch): ``benchmarks/gpu_offline.sh fetch`` here, then
``benchmarks/gpu_offline.sh run`` there (installs the missing wheels from the fetched folder, then this script).

Prints one table (and writes JSON, default benchmarks/results/gpu_check.json, after every section, so a run cut
off keeps what it measured):

1. the ``gpu``-marked tests (pytest -m gpu);
2. attention backends against the fp32 ``math`` reference, bf16 forward and backward on a mixed pack:
   flash (if installed), torch_varlen, flex, segments (relative error of out, dq, dk, dv; pass < 2e-2);
3. FluxViT-S and -B bf16 training steps (AdamW, clipping) on batches of 16-frame 224 px clips:
   * Flux-Multi: every clip at budgets 3072 / 2048 / 1024 in ONE packed pass, and the same as three passes
     (target: packed <= 0.8x the three passes);
   * one budget of 2048 tokens, eager and with regional ``torch.compile`` (target for B: >= 40 % MFU);
   * a mixed-budget batch (3072 / 2048 / 1024 / 512) through the blocks, packed against padded to the longest
     (target: >= 1.4x);
   each with clips/s, tokens/s, peak memory and MFU;
4. the InternVideo2-1B teacher forward at 2048 tokens (clips/s, share of a stage-1 step);
5. torchcodec decoding on the GPU (clips/s), if torchcodec is installed.

MFU uses the paper's FLOP convention (its GFLOPs column): a view of N = tokens + 1 rows costs
``depth * (12 * N * d**2 + 2 * N**2 * d)`` multiply-accumulates in the backbone; a training step costs 3x the
forward (forward + backward) and a multiply-accumulate is 2 FLOPs, so

    MFU = 6 * sum_views depth * (12 N d^2 + 2 N^2 d) / step_time / peak_bf16_flops

with peak_bf16_flops = 989e12 (H100 / H200 SXM dense bf16; ``--peak-tflops`` for other GPUs). Pooling heads,
patch embedding and selection are not counted; the formula gives the paper's GFLOPs table within 3 % (B:
435 / 251 / 106 / 48 against 440 / 255 / 108 / 49 at 3072 / 2048 / 1024 / 512 tokens).

Every timed row reports the attention backend that really ran (``fluxvit.models.attention.record_backends``;
in compiled regions the backend is resolved once at trace time, from the same inputs as the eager rows) and the
torch.compile work it caused (dynamo frames and graphs compiled: each is a compile, seconds to a minute on a GPU).

Time budget (``--budget-s``, default 480 s): a section that would start after the budget is spent is skipped
and marked so. By design the full run stays inside it on an H100 / H200: 2 warm-up + 5 timed steps per case at
batch 8, one regional compile per model (the blocks share one graph; the packed token count is dynamic, so new
packs do not recompile; the mixed-budget rows go through ``run_blocks``, which builds the flex block mask once
and marks the sizes dynamic), the gpu tests limited to 150 s.

``--cpu --tiny`` runs every section end to end on CPU with a tiny model and small budgets (fp32; the tests are
not run and MFU is not defined there), so the script cannot rot; the test suite runs it. There the compiled row
uses ``torch.compile(backend="eager")`` (dynamo without inductor's code generation): the compile count it reports
is the count a GPU run compiles with inductor.
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import write_result
from fluxvit.models import available_backends, create_model, force_backend, varlen_attention
from fluxvit.models.attention import PackedSeqs, record_backends

RESULTS = Path(__file__).parent / "results"
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def backbone_macs(depth: int, dim: int, view_tokens) -> float:
    """Multiply-accumulates of the backbone over views of the given kept-token counts (paper convention)."""
    return float(sum(depth * (12 * (n + 1) * dim**2 + 2 * (n + 1) ** 2 * dim) for n in view_tokens))


def compile_counts() -> dict:
    """Dynamo's running totals: frames compiled and graphs produced (each graph is one inductor compile)."""
    from torch._dynamo.utils import counters

    return dict(frames=int(counters["frames"]["ok"]), graphs=int(counters["stats"]["unique_graphs"]))


class Bench:
    """Timing on the chosen device: medians of ``reps`` after ``warmup`` runs; CUDA peak memory per case; the
    attention backends resolved and the compiles caused while the case ran (warm-up included)."""

    def __init__(self, device: torch.device, reps: int, warmup: int):
        self.device, self.reps, self.warmup = device, reps, warmup
        self.last_backend = None

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time(self, fn) -> dict:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        before, t_start = compile_counts(), time.perf_counter()
        with record_backends() as used:
            for _ in range(self.warmup):
                fn()
            self.sync()
            times = []
            for _ in range(self.reps):
                t0 = time.perf_counter()
                fn()
                self.sync()
                times.append(time.perf_counter() - t0)
        after = compile_counts()
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else None
        if used:
            backend = ",".join(sorted(used))
            self.last_backend = backend
        else:  # every attention call ran inside compiled regions: resolved at trace time, as in the eager rows
            backend = f"{self.last_backend} (traced)" if self.last_backend else "traced"
        return dict(s=statistics.median(times), peak_gib=peak, backend=backend, wall_s=time.perf_counter() - t_start,
                    compiled_frames=after["frames"] - before["frames"], compiled_graphs=after["graphs"] - before["graphs"])


# ------------------------------------------------------------------------------------------------ sections
def gpu_test_files(root: Path) -> list:
    """The test files holding ``gpu``-marked tests (collecting only these: the others import optional packages
    a bare GPU machine may lack)."""
    return sorted(str(p.relative_to(root)) for p in (root / "tests").glob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text())


def run_gpu_tests(args) -> dict:
    if args.cpu:
        return dict(status="not run (--cpu)")
    t0 = time.perf_counter()
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", *gpu_test_files(root)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=150)
    except subprocess.TimeoutExpired:
        return dict(status="FAIL", summary="timed out after 150 s", s=time.perf_counter() - t0)
    lines = proc.stdout.strip().splitlines() or ["(no output)"]
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    return dict(status="ok" if proc.returncode == 0 else "FAIL", summary=lines[-1], failed=failed[:10],
                s=time.perf_counter() - t0)


def check_backends(args, device, dtype) -> dict:
    lengths = [1, 77, 300, 12, 513] if not args.tiny else [1, 7, 33, 2]
    heads, dim = (6, 64) if not args.tiny else (2, 16)
    g = torch.Generator().manual_seed(0)
    n = sum(lengths)
    base = [torch.randn(n, heads, dim, generator=g) for _ in range(3)]
    grad_out = torch.randn(n, heads, dim, generator=g)
    pack = PackedSeqs(lengths, device)

    def run(name, dt):
        q, k, v = (t.to(device, dt).requires_grad_() for t in base)
        with force_backend(name):
            out = varlen_attention(q, k, v, pack)
        grads = torch.autograd.grad(out, (q, k, v), grad_out.to(device, dt))
        return [t.float() for t in (out, *grads)]

    ref = run("math", torch.float32)
    rows = {}
    for name in ("flash", "torch_varlen", "flex", "segments"):
        if name not in available_backends(device, dtype, requires_grad=True):
            rows[name] = dict(status="not available here")
            continue
        got = run(name, dtype)
        errs = [((a - b).norm() / b.norm()).item() for a, b in zip(got, ref)]
        rows[name] = dict(rel_err_out_dq_dk_dv=errs, status="ok" if max(errs) < 2e-2 else "FAIL")
    return rows


def _clips(batch, frames, res, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, frames, res, res, generator=g).to(device, dtype)


def train_steps(args, name, device, dtype, bench: Bench, peak_flops, out: dict | None = None,
                save=lambda: None) -> dict:
    """Flux-Multi packed vs three passes, 2048 tokens eager / compiled, packed vs padded (rows added to ``out``
    as they are measured; ``save`` after each)."""
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device (fast for B and the 1B teacher)
        model = create_model(name, num_classes=400)
    cfg = model.config
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    budgets = args.budgets
    video = _clips(args.batch, args.frames, args.res, device, torch.float32)
    labels = torch.randint(0, 400, (args.batch,), device=device)
    amp = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step(loss_fn):
        def run():
            with amp:
                loss = loss_fn()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    def multi_packed():
        feats = model.forward_multi(video, budgets)
        return F.cross_entropy(model.logits(feats), labels.repeat(len(budgets)))

    def multi_three():
        loss = 0.0
        for j, b in enumerate(budgets):
            loss = loss + F.cross_entropy(model(video, num_tokens=b, head=j), labels)
        return loss

    def single():
        return F.cross_entropy(model(video, num_tokens=budgets[1]), labels)

    def summarise(t: dict, view_tokens, clips=args.batch) -> dict:
        macs = backbone_macs(cfg.depth, cfg.embed_dim, view_tokens)
        mfu = 6 * macs / t["s"] / peak_flops if peak_flops else None
        return dict(step_s=t["s"], clips_s=clips / t["s"], tokens_s=sum(view_tokens) / t["s"],
                    peak_gib=t["peak_gib"], mfu=mfu, backend=t["backend"], wall_s=t["wall_s"],
                    compiled_frames=t["compiled_frames"], compiled_graphs=t["compiled_graphs"])

    def row(key, value):
        out[key] = value
        save()

    out = {} if out is None else out
    per_view = [min(b, args.frames * (args.res // cfg.patch_size) ** 2) for b in budgets]
    multi_tokens = [n for n in per_view for _ in range(args.batch)]
    row("flux_multi_packed", summarise(bench.time(step(multi_packed)), multi_tokens))
    row("flux_multi_three_passes", summarise(bench.time(step(multi_three)), multi_tokens))
    row("packed_over_three", out["flux_multi_packed"]["step_s"] / out["flux_multi_three_passes"]["step_s"])
    single_tokens = [per_view[1]] * args.batch
    row(f"single_{budgets[1]}", summarise(bench.time(step(single)), single_tokens))
    if args.compile:
        model.compile_blocks(**({"backend": args.compile_backend} if args.compile_backend else {}))
        row(f"single_{budgets[1]}_compiled", summarise(bench.time(step(single)), single_tokens))

    # Mixed budgets through the blocks (+ pooling head), packed vs padded to the longest, through run_blocks:
    # compiled blocks get their sizes marked dynamic and the flex block mask once per pack, as in training.
    # The inputs need a gradient, as the embedded tokens do in training (the compiled blocks' graphs then match).
    mixed = [n + 1 for n in args.mixed]
    x = torch.randn(sum(mixed), cfg.embed_dim, device=device, requires_grad=True)
    xp = torch.randn(len(mixed) * max(mixed), cfg.embed_dim, device=device, requires_grad=True)

    def blocks(x, lengths):
        pack = PackedSeqs(lengths, device)
        y, _ = model.run_blocks(x, pack)
        return model.clip_projector[0](y, pack.cu_seqlens, pack.seg).float().square().mean()

    packed = bench.time(step(lambda: blocks(x, mixed)))
    row("mixed_packed", summarise(packed, args.mixed, len(mixed)))
    padded = bench.time(step(lambda: blocks(xp, [max(mixed)] * len(mixed))))
    row("mixed_padded", summarise(padded, [max(args.mixed)] * len(mixed), len(mixed)))
    row("padded_over_packed", padded["s"] / packed["s"])
    return out


def teacher_forward(args, device, dtype, bench: Bench, student_step_s: float | None) -> dict:
    """The frozen InternVideo2-1B teacher (random weights: speed does not depend on them) at the 2048-token
    budget on the same clips; its share of a stage-1 step = teacher / (teacher + B student step at 2048)."""
    tiny = dict(embed_dim=64, depth=2, num_heads=4, attn_pool_num_heads=4, clip_embed_dim=32) if args.tiny else {}
    torch.manual_seed(0)
    with torch.device(device):
        teacher = create_model("internvideo2_1b_patch14", **tiny).eval()
    video = _clips(args.batch, args.frames, args.res, device, torch.float32)
    budget = args.budgets[1]

    def forward():
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return teacher.forward_teacher(video, [teacher.depth - 1], num_tokens=budget)

    t = bench.time(forward)
    share = t["s"] / (t["s"] + student_step_s) if student_step_s else None
    return dict(status="ok", model="internvideo2_1b_patch14" + (" (tiny dims)" if args.tiny else ""),
                tokens=budget, clips_s=args.batch / t["s"], step_s=t["s"], peak_gib=t["peak_gib"],
                share_of_stage1_step=share, backend=t["backend"])


def torchcodec_decode(args, device, bench: Bench) -> dict:
    try:
        from torchcodec.decoders import VideoDecoder
        import av
    except Exception as exc:  # torchcodec needs FFmpeg's shared libraries
        return dict(status=f"absent ({type(exc).__name__})")
    frames, size = (16, 224) if not args.tiny else (8, 64)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        g = torch.Generator().manual_seed(0)
        for _ in range(4 * frames):
            img = torch.randint(0, 255, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    data = buf.getvalue()
    idx = list(range(0, 4 * frames, 4))

    def decode():
        dec = VideoDecoder(data, device=str(device), seek_mode="exact")
        return dec.get_frames_at(indices=idx).data

    try:
        t = bench.time(decode)
    except Exception as exc:  # e.g. torchcodec built without CUDA decoding
        return dict(status=f"FAIL: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    return dict(status="ok", device=device.type, clips_s=1.0 / t["s"], frames_per_clip=frames, size=size)


# ------------------------------------------------------------------------------------------------- report
SKIPPED = "skipped: time budget spent"


def table_rows(report: dict, args) -> list:
    """The printed table: one row per check (sections skipped for time say so)."""
    g = report.get("gpu_tests", {"status": SKIPPED})
    rows = [("gpu-marked tests", g.get("summary", g["status"]), "all pass", g["status"])]
    for name, r in report.get("backends", {}).items():
        errs = r.get("rel_err_out_dq_dk_dv")
        rows.append((f"backend {name} vs math ({report['dtype']} fwd+bwd)",
                     "max rel err " + f"{max(errs):.2e}" if errs else r["status"], "< 2e-2", r["status"]))
    for model, r in report.get("train", {}).items():
        short = model.replace("fluxvit_", "").replace("_patch14", "")
        if r.get("status") == SKIPPED:
            rows.append((short, SKIPPED, "", "n/a"))
            continue
        for case, v in r.items():
            if not isinstance(v, dict):
                continue
            mfu = f", MFU {100 * v['mfu']:.1f} %" if v.get("mfu") is not None else ""
            mem = f", peak {v['peak_gib']:.1f} GiB" if v.get("peak_gib") is not None else ""
            comp = f", {v['compiled_graphs']} graphs compiled" if v.get("compiled_graphs") else ""
            target, ok = "", ""
            if case.startswith("single_") and "base" in model and v.get("mfu") is not None and case.endswith("compiled"):
                target, ok = ">= 40 % MFU (H100)", "ok" if v["mfu"] >= 0.40 else "below"
            rows.append((f"{short} {case} [{v.get('backend')}]", f"{v['step_s'] * 1e3:.0f} ms/step, "
                         f"{v['clips_s']:.1f} clips/s, {v['tokens_s']:.0f} tok/s{mem}{mfu}{comp}", target, ok))
        if "packed_over_three" in r:
            rows.append((f"{short} Flux-Multi packed / three passes", f"{r['packed_over_three']:.2f}x", "<= 0.8x",
                         "ok" if r["packed_over_three"] <= 0.8 else "above"))
        if "padded_over_packed" in r:
            rows.append((f"{short} mixed budgets padded / packed", f"{r['padded_over_packed']:.2f}x", ">= 1.4x",
                         "ok" if r["padded_over_packed"] >= 1.4 else "below"))
    t = report.get("teacher", {"status": SKIPPED})
    rows.append((f"InternVideo2-1B teacher forward, {t.get('tokens')} tok [{t.get('backend')}]",
                 f"{t['clips_s']:.1f} clips/s, {100 * t['share_of_stage1_step']:.0f} % of a stage-1 step"
                 if t.get("share_of_stage1_step") is not None else t["status"], "", t["status"]))
    d = report.get("decode", {"status": SKIPPED})
    rows.append((f"torchcodec decode ({d.get('device', report['device'])})",
                 f"{d['clips_s']:.1f} clips/s ({d['frames_per_clip']} x {d['size']} px)" if "clips_s" in d
                 else d["status"], "", "ok" if "clips_s" in d else "n/a"))
    c = report.get("compiles", {})
    rows.append(("torch.compile work (whole run)", f"{c.get('frames', 0)} frames, {c.get('graphs', 0)} graphs",
                 "", ""))
    rows.append(("wall time", f"{report.get('total_s', 0):.0f} s", f"<= {args.budget_s:.0f} s",
                 "ok" if report.get("total_s", 0) <= args.budget_s else "above"))
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="run on CPU (fp32; no gpu tests, no MFU)")
    ap.add_argument("--tiny", action="store_true", help="tiny model and budgets (seconds; for the test suite)")
    ap.add_argument("--models", nargs="+", default=["fluxvit_small_patch14", "fluxvit_base_patch14"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--compile-backend", default=None,
                    help="torch.compile backend of the compiled row (default inductor; --tiny: eager)")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="wall-clock budget: sections that would start after it are skipped (default 480)")
    ap.add_argument("--out", default=str(RESULTS / "gpu_check.json"))
    args = ap.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        ap.error("no CUDA device: run on a GPU machine, or use --cpu --tiny for the end-to-end CPU check")
    device = torch.device("cpu" if args.cpu else "cuda")
    dtype = torch.float32 if args.cpu else torch.bfloat16
    args.frames, args.res = 16, 224
    args.budgets, args.mixed = (3072, 2048, 1024), (3072, 2048, 1024, 512)
    warmup = 2
    if args.tiny:
        args.models, args.batch, args.reps, warmup = ["fluxvit_tiny_patch14"], 2, 1, 1
        args.frames, args.res = 4, 56
        args.budgets, args.mixed = (48, 32, 16), (48, 32, 16, 8)
        # Inductor's code generation on a CPU takes minutes; dynamo with the eager backend traces the same
        # graphs, so the compile count is the GPU run's.
        args.compile_backend = args.compile_backend or "eager"
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    peak_flops = peak * 1e12 if peak and device.type == "cuda" else None
    bench = Bench(device, args.reps, warmup)
    t0 = time.perf_counter()
    start = compile_counts()
    report = dict(device=name, dtype=str(dtype).replace("torch.", ""), torch=torch.__version__,
                  peak_tflops=peak, tiny=args.tiny, budget_s=args.budget_s, mfu_formula="6 * sum_views "
                  "depth*(12*N*d^2 + 2*N^2*d) / step_s / peak_flops, N = tokens + 1")

    def save():
        now = compile_counts()
        report["compiles"] = {k: now[k] - start[k] for k in now}
        report["total_s"] = time.perf_counter() - t0
        write_result(args.out, json.loads(json.dumps(report, default=str)), quiet=True)

    def within_budget() -> bool:
        return time.perf_counter() - t0 < args.budget_s

    # Each section is written as soon as it is measured: a run cut off keeps what it has.
    report["gpu_tests"] = run_gpu_tests(args)
    save()
    report["backends"] = check_backends(args, device, dtype) if within_budget() else {"all": dict(status=SKIPPED)}
    save()
    report["train"] = {}
    for m in args.models:
        if not within_budget():
            report["train"][m] = dict(status=SKIPPED)
            continue
        report["train"][m] = {}
        train_steps(args, m, device, dtype, bench, peak_flops, report["train"][m], save)
        save()
    measured = [r for r in report["train"].values() if r.get("status") != SKIPPED]
    student = report["train"].get("fluxvit_base_patch14") or (measured[0] if measured else {})
    student_s = (student.get(f"single_{args.budgets[1]}") or {}).get("step_s")
    report["teacher"] = teacher_forward(args, device, dtype, bench, student_s) if within_budget() else \
        dict(status=SKIPPED)
    save()
    report["decode"] = torchcodec_decode(args, device, bench) if within_budget() else dict(status=SKIPPED)
    save()
    rows = table_rows(report, args)
    report["table"] = [dict(zip(("check", "result", "target", "status"), r)) for r in rows]
    print(f"\n## GPU check on {name} ({report['dtype']}, torch {torch.__version__}, {report['total_s']:.0f} s)\n")
    print("| check | result | target | status |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    write_result(args.out, json.loads(json.dumps(report, default=str)))
    return report


if __name__ == "__main__":
    main()
