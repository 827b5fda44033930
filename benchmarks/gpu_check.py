"""One GPU check: ``make gpu-check`` / ``python -m benchmarks.gpu_check`` (about 5-8 min on one H100/H200).

Prints one table (and writes JSON, default benchmarks/results/gpu_check.json):

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

``--cpu --tiny`` runs every section end to end on CPU with a tiny model and small budgets (fp32; the tests are
not run and MFU is not defined there), so the script cannot rot; the test suite runs it.
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
from fluxvit.models.attention import PackedSeqs

RESULTS = Path(__file__).parent / "results"
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def backbone_macs(depth: int, dim: int, view_tokens) -> float:
    """Multiply-accumulates of the backbone over views of the given kept-token counts (paper convention)."""
    return float(sum(depth * (12 * (n + 1) * dim**2 + 2 * (n + 1) ** 2 * dim) for n in view_tokens))


class Bench:
    """Timing on the chosen device: medians of ``reps`` after ``warmup`` runs; CUDA peak memory per case."""

    def __init__(self, device: torch.device, reps: int, warmup: int):
        self.device, self.reps, self.warmup = device, reps, warmup

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time(self, fn) -> dict:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(self.warmup):
            fn()
        self.sync()
        times = []
        for _ in range(self.reps):
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else None
        return dict(s=statistics.median(times), peak_gib=peak)


# ------------------------------------------------------------------------------------------------ sections
def run_gpu_tests(args) -> dict:
    if args.cpu:
        return dict(status="not run (--cpu)")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1])
    tail = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    return dict(status="ok" if proc.returncode == 0 else "FAIL", summary=tail, s=time.perf_counter() - t0)


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


def train_steps(args, name, device, dtype, bench: Bench, peak_flops) -> dict:
    """Flux-Multi packed vs three passes, 2048 tokens eager / compiled, packed vs padded."""
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
                    peak_gib=t["peak_gib"], mfu=mfu)

    out = {}
    per_view = [min(b, args.frames * (args.res // cfg.patch_size) ** 2) for b in budgets]
    multi_tokens = [n for n in per_view for _ in range(args.batch)]
    out["flux_multi_packed"] = summarise(bench.time(step(multi_packed)), multi_tokens)
    out["flux_multi_three_passes"] = summarise(bench.time(step(multi_three)), multi_tokens)
    out["packed_over_three"] = out["flux_multi_packed"]["step_s"] / out["flux_multi_three_passes"]["step_s"]
    single_tokens = [per_view[1]] * args.batch
    out[f"single_{budgets[1]}"] = summarise(bench.time(step(single)), single_tokens)
    if args.compile:
        model.compile_blocks()
        out[f"single_{budgets[1]}_compiled"] = summarise(bench.time(step(single)), single_tokens)

    # Mixed budgets through the blocks (+ pooling head), packed vs padded to the longest.
    mixed = [n + 1 for n in args.mixed]
    x = torch.randn(sum(mixed), cfg.embed_dim, device=device)
    xp = torch.randn(len(mixed) * max(mixed), cfg.embed_dim, device=device)

    def blocks(x, lengths):
        pack = PackedSeqs(lengths, device)
        for blk in model.blocks:
            x = blk(x, pack)
        return model.clip_projector[0](x, pack.cu_seqlens, pack.seg).float().square().mean()

    packed = bench.time(step(lambda: blocks(x, mixed)))
    padded = bench.time(step(lambda: blocks(xp, [max(mixed)] * len(mixed))))
    out["mixed_packed"] = summarise(packed, args.mixed, len(mixed))
    out["mixed_padded"] = summarise(padded, [max(args.mixed)] * len(mixed), len(mixed))
    out["padded_over_packed"] = padded["s"] / packed["s"]
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
                share_of_stage1_step=share)


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
def table_rows(report: dict, args) -> list:
    rows = [("gpu-marked tests", report["gpu_tests"].get("summary", report["gpu_tests"]["status"]), "all pass",
             report["gpu_tests"]["status"])]
    for name, r in report["backends"].items():
        errs = r.get("rel_err_out_dq_dk_dv")
        rows.append((f"backend {name} vs math ({report['dtype']} fwd+bwd)",
                     "max rel err " + f"{max(errs):.2e}" if errs else r["status"], "< 2e-2", r["status"]))
    for model, r in report["train"].items():
        short = model.replace("fluxvit_", "").replace("_patch14", "")
        for case, v in r.items():
            if not isinstance(v, dict):
                continue
            mfu = f", MFU {100 * v['mfu']:.1f} %" if v.get("mfu") is not None else ""
            mem = f", peak {v['peak_gib']:.1f} GiB" if v.get("peak_gib") is not None else ""
            target, ok = "", ""
            if case.startswith("single_") and "base" in model and v.get("mfu") is not None and case.endswith("compiled"):
                target, ok = ">= 40 % MFU (H100)", "ok" if v["mfu"] >= 0.40 else "below"
            rows.append((f"{short} {case}", f"{v['step_s'] * 1e3:.0f} ms/step, {v['clips_s']:.1f} clips/s, "
                         f"{v['tokens_s']:.0f} tok/s{mem}{mfu}", target, ok))
        rows.append((f"{short} Flux-Multi packed / three passes", f"{r['packed_over_three']:.2f}x", "<= 0.8x",
                     "ok" if r["packed_over_three"] <= 0.8 else "above"))
        rows.append((f"{short} mixed budgets padded / packed", f"{r['padded_over_packed']:.2f}x", ">= 1.4x",
                     "ok" if r["padded_over_packed"] >= 1.4 else "below"))
    t = report["teacher"]
    rows.append((f"InternVideo2-1B teacher forward, {t.get('tokens')} tok",
                 f"{t['clips_s']:.1f} clips/s, {100 * t['share_of_stage1_step']:.0f} % of a stage-1 step"
                 if t.get("share_of_stage1_step") is not None else t["status"], "", t["status"]))
    d = report["decode"]
    rows.append((f"torchcodec decode ({d.get('device', report['device'])})",
                 f"{d['clips_s']:.1f} clips/s ({d['frames_per_clip']} x {d['size']} px)" if "clips_s" in d
                 else d["status"], "", "ok" if "clips_s" in d else "n/a"))
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
        args.compile = False  # inductor on a CPU takes minutes; the compiled path is tested in test_compile.py
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    peak_flops = peak * 1e12 if peak and device.type == "cuda" else None
    bench = Bench(device, args.reps, warmup)
    t0 = time.perf_counter()
    report = dict(device=name, dtype=str(dtype).replace("torch.", ""), torch=torch.__version__,
                  peak_tflops=peak, tiny=args.tiny, mfu_formula="6 * sum_views depth*(12*N*d^2 + 2*N^2*d) / "
                  "step_s / peak_flops, N = tokens + 1")
    report["gpu_tests"] = run_gpu_tests(args)
    report["backends"] = check_backends(args, device, dtype)
    report["train"] = {m: train_steps(args, m, device, dtype, bench, peak_flops) for m in args.models}
    student = report["train"].get("fluxvit_base_patch14", next(iter(report["train"].values())))
    report["teacher"] = teacher_forward(args, device, dtype, bench, student.get(f"single_{args.budgets[1]}", {})
                                        .get("step_s"))
    report["decode"] = torchcodec_decode(args, device, bench)
    report["total_s"] = time.perf_counter() - t0
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
