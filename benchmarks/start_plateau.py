"""Why the micro start sits on the ln 8 plateau: a small in-process training loop over the claims' start (the
``micro_scratch`` model, data and AdamW settings) with the levers of docs/results.md, printing the training CE
every 100 steps and val top-1 (uniform starts, every token) every 500. Exploratory: default kernels, not the
claims' deterministic ones, so its digits are not the claims script's.

    .venv/bin/python -m benchmarks.start_plateau --seed 0                        # the plateau (no crop)
    .venv/bin/python -m benchmarks.start_plateau --seed 0 --easy centre          # fixed start: learnt in ~300 steps
    .venv/bin/python -m benchmarks.start_plateau --seed 0 --curriculum 300 700   # the curriculum start recipe
    .venv/bin/python -m benchmarks.start_plateau --seed 0 --easy plain large --init mimetic-v
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time

from benchmarks import write_result


def _easy_specs(kinds: list[str]):
    """Patch the renderer's spec draw so every clip has the named easy property (plain background, large shape,
    start at the centre); the label and the rest of the look are drawn as before."""
    import fluxvit.stages.common.data as common_data
    from fluxvit.datasets.synth import draw_clip_spec

    def draw(rng, label, size):
        spec, kw = draw_clip_spec(rng, label, size), {}
        if "plain" in kinds:
            kw["background"] = "plain"
        if "large" in kinds:
            kw["large"] = True
        if "centre" in kinds:
            kw["x0"] = kw["y0"] = size / 2
        return dataclasses.replace(spec, **kw)

    common_data.draw_clip_spec = draw


def _init(net, how: str, head_scale: float) -> None:
    """Alternative initialisations: ``mimetic`` ties each block's key projection to its query projection (attention
    by similarity from the first step), ``mimetic-v`` also sets value = I and output projection = -0.8 I (plus small
    noise); ``head_scale`` > 0 redraws classifier 0 as scaled orthonormal rows."""
    import torch

    D = net.embed_dim
    with torch.no_grad():
        for blk in net.blocks:
            if how.startswith("mimetic"):
                blk.attn.qkv.weight[D:2 * D].copy_(blk.attn.qkv.weight[:D])
            if how == "mimetic-v":
                blk.attn.qkv.weight[2 * D:].copy_(torch.eye(D) + 0.02 * torch.randn(D, D))
                blk.attn.proj.weight.copy_(-0.8 * torch.eye(D) + 0.02 * torch.randn(D, D))
        if head_scale > 0:
            w = net.head[0].weight
            q, _ = torch.linalg.qr(torch.randn(w.shape[1], w.shape[0]))
            w.copy_(q.T * head_scale * math.sqrt(w.shape[1]))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=1e-3, help="constant after a 100-step warm-up")
    p.add_argument("--curriculum", type=int, nargs=2, default=None, metavar=("HOLD", "RAMP"),
                   help="data.motion_curriculum")
    p.add_argument("--easy", nargs="+", default=[], choices=["plain", "large", "centre"],
                   help="training clips only (val keeps the corpus's clips unless centre is given)")
    p.add_argument("--crop", action="store_true", help="keep micro_scratch's multi-scale crop (default: none)")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--arch", default="{}", help="JSON overrides of the micro model, e.g. '{\"depth\": 6}'")
    p.add_argument("--init", default="default", choices=["default", "mimetic", "mimetic-v"])
    p.add_argument("--head", default="train", choices=["train", "frozen"])
    p.add_argument("--head-scale", type=float, default=0.0, help="orthonormal classifier rows x this x sqrt(dim)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/start_plateau.json")
    args = p.parse_args(argv)
    import torch
    import torch.nn.functional as F

    from fluxvit.models import create_model
    from fluxvit.stages.finetune import build_config
    from fluxvit.stages.finetune.data import build_train_source, eval_views

    torch.set_num_threads(args.threads)
    cfg = build_config("micro_scratch")
    extra = {} if args.crop else {"crop": "rrc", "crop_scale": (1.0, 1.0)}
    data = dataclasses.replace(cfg.data, grid=[[args.frames, 56]], motion_curriculum=tuple(args.curriculum or ()),
                               **extra)
    if args.easy:
        _easy_specs(args.easy)
    val = list(eval_views(data, "val", args.frames, 56, 1, 1, 400, 50))
    source = build_train_source(data, args.seed, 0, 1)
    torch.manual_seed(args.seed)
    net = create_model(cfg.model.name, num_classes=8, drop_path_rate=0.0,
                       **{**cfg.model.overrides, **json.loads(args.arch)})
    _init(net, args.init, args.head_scale)
    if args.head == "frozen":
        net.head[0].requires_grad_(False)
    skip = net.no_weight_decay()
    params = [(n, q) for n, q in net.named_parameters() if q.requires_grad]
    decay = [q for n, q in params if q.ndim > 1 and n not in skip]
    rest = [q for n, q in params if not (q.ndim > 1 and n not in skip)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=args.lr, betas=tuple(cfg.optim.betas))

    def top1() -> float:
        net.eval()
        with torch.no_grad():
            hits = sum((net(b["video"], head=0).argmax(1) == b["label"]).sum().item() for b in val)
        net.train()
        return 100 * hits / sum(len(b["label"]) for b in val)

    rows, ce, t0 = [], None, time.perf_counter()
    for step in range(1, args.steps + 1):
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, step / 100)
        batch = source.batch(step - 1)
        loss = F.cross_entropy(net(batch["video"], head=0), batch["label"], label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.optim.clip_grad)
        opt.step()
        ce = loss.item() if ce is None else 0.98 * ce + 0.02 * loss.item()
        if step % 100 == 0:
            row = {"step": step, "train_ce": round(ce, 3), "seconds": round(time.perf_counter() - t0, 1)}
            if step % 500 == 0 or step == args.steps:
                row["val_top1"] = round(top1(), 1)
            rows.append(row)
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    res = {"args": vars(args), "rows": rows, "ln8": round(math.log(8), 3)}
    write_result(args.out, res)
    return res


if __name__ == "__main__":
    main()
