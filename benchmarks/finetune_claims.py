"""Stage 3 claims on the synthetic motion corpus (measured, not asserted; prints numbers and writes JSON).

(a) at a quarter of the tokens, group-dynamic selection beats random selection at the same budget;
(b) Flux-Multi finetuning loses less top-1 from the largest to the smallest budget than single-budget finetuning;
(c) Token Optimization beats the plain (unmasked, fewer frames) setting of the same small budget.

Scale: a CPU-sized FluxViT (the tiny config narrowed to width 96, depth 3) trained from scratch, or the tower of a
stage-1/2 export (``--init-from``, e.g. ``make pretrain``'s video-text model), finetuned for ``--steps`` steps on
in-memory renders of the synthetic corpus (8 motion classes, chance 12.5 %). Both finetunes use the same
seed, data stream and steps; TO searches on the val split and every number is reported on the test split.

    .venv/bin/python -m benchmarks.finetune_claims --steps 60 --seed 0
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fluxvit.stages.finetune import build_config, main as finetune_main
from fluxvit.stages.finetune.data import eval_views
from fluxvit.stages.finetune.eval import evaluate, load_classifier
from fluxvit.stages.finetune.tokenopt import plot_tokenopt, token_optimize, write_table
from benchmarks import write_result

BUDGETS = (96, 64, 32)
EVAL_FRAMES, EVAL_RES = 8, 56  # 8 x (56 / 14)^2 = 128 tokens per view; a quarter is 32
MICRO = {"head_budgets": list(BUDGETS), "depth": 3, "embed_dim": 96, "num_heads": 3, "clip_embed_dim": 96,
         "attn_pool_num_heads": 4}


def export_arch(path: str) -> dict:
    """Architecture overrides that rebuild the FluxViT stored in a stage-1/2 export (its embedded config)."""
    from fluxvit.models.checkpoint import read_metadata

    cfg = json.loads(read_metadata(path)["fluxvit_config"])
    keys = ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size", "img_size", "num_frames",
            "clip_embed_dim", "attn_pool_num_heads")
    return {**{k: cfg[k] for k in keys}, "head_budgets": list(BUDGETS)}


def finetune(mode: str, steps: int, seed: int, run_dir: Path, arch: dict, init_from: str = "",
             batch_size: int = 8) -> tuple[Path, float]:
    """Train one model (Flux-Multi or Flux-Single) and return its export and wall seconds."""
    sets = [f"train.run_dir={run_dir}", f"train.steps={steps}", f"train.seed={seed}", "train.ckpt_every=0",
            "train.tensorboard=false", "train.progress=false", f"train.log_every={max(1, steps // 5)}",
            f"train.init_from={init_from}", f"data.batch_size={batch_size}",
            f"model.overrides={json.dumps(arch)}", f"loss.mode={mode}", f"loss.budgets={list(BUDGETS)}",
            "data.grids=[[6,56],[8,56],[6,70],[8,70]]", "data.num_clips=1000",
            "optim.lr=2e-3", "optim.warmup_steps=5", "layer_decay=1.0", "eval.budgets=[]"]
    t0 = time.perf_counter()
    finetune_main(["--preset", "smoke", *[a for s in sets for a in ("--set", s)]])
    return run_dir / "model.safetensors", time.perf_counter() - t0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--videos", type=int, default=80, help="videos of the val (TO search) and test splits")
    p.add_argument("--init-from", default="", help="stage-1/2 export to finetune from (its architecture is used); "
                   "default: the micro model from scratch")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--run-dir", default="runs/finetune_claims")
    p.add_argument("--out", default="benchmarks/results/finetune_claims.json")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    data = build_config("smoke").data
    run = Path(args.run_dir)
    arch = export_arch(args.init_from) if args.init_from else MICRO
    res: dict = {"seed": args.seed, "steps": args.steps, "budgets": list(BUDGETS), "model": arch,
                 "init_from": args.init_from, "batch_size": args.batch_size,
                 "eval_input": [EVAL_FRAMES, EVAL_RES], "videos": args.videos}

    ckpts = {}
    for mode in ("multi", "single"):
        ckpts[mode], secs = finetune(mode, args.steps, args.seed, run / mode, arch, args.init_from, args.batch_size)
        res[f"train_seconds_{mode}"] = round(secs, 1)
        print(f"trained Flux-{mode}: {args.steps} steps in {secs:.0f} s")

    # The test views are rendered once and shared by every evaluation below.
    test = list(eval_views(data, "test", EVAL_FRAMES, EVAL_RES, 1, 1, args.videos, 32))
    acc = {}
    for mode, path in ckpts.items():
        net, heads = load_classifier(str(path))
        rows = evaluate(net, data, budgets=BUDGETS, frames=EVAL_FRAMES, resolution=EVAL_RES, trained_heads=heads,
                        batches=test)
        acc[mode] = {r["budget"]: r["top1"] for r in rows}
    res["b"] = {mode: {"top1": {str(k): v for k, v in a.items()}, "drop": a[BUDGETS[0]] - a[BUDGETS[-1]]}
                for mode, a in acc.items()}
    res["b"]["holds"] = res["b"]["multi"]["drop"] < res["b"]["single"]["drop"]

    net, heads = load_classifier(str(ckpts["multi"]))
    quarter = EVAL_FRAMES * (EVAL_RES // 14) ** 2 // 4
    a_rows = {sel: [evaluate(net, data, budgets=[quarter], frames=EVAL_FRAMES, resolution=EVAL_RES,
                             trained_heads=heads, batches=test, selection=sel, seed=s)[0]["top1"]
                    for s in ((0, 1, 2) if sel == "random" else (0,))]
              for sel in ("dynamic", "random")}
    res["a"] = {"budget": quarter, "dynamic": a_rows["dynamic"][0], "random_seeds": a_rows["random"],
                "random": sum(a_rows["random"]) / len(a_rows["random"])}
    res["a"]["holds"] = res["a"]["dynamic"] > res["a"]["random"]

    to = token_optimize(net, data, [64, 32], frames=[2, 4, 6, 8, 12, 16], resolutions=[42, 56, 70],
                        base_resolution=EVAL_RES, split="val", report_split="test", max_videos=args.videos,
                        batch_size=32, trained_heads=heads)
    write_table(to, run / "tokenopt")
    plot_tokenopt(to, run / "tokenopt" / "tokenopt.png", title="FluxViT micro, synthetic motion")
    res["c"] = {str(r["budget"]): {"plain": [r["plain"]["frames"], r["plain"]["resolution"], r["plain"]["top1"]],
                                   "to": [r["to"]["frames"], r["to"]["resolution"], r["to"]["top1"]],
                                   "gain": r["gain"]} for r in to["rows"]}
    res["c"]["holds"] = all(r["gain"] > 0 for r in to["rows"])
    res["seconds"] = round(time.perf_counter() - t_start, 1)

    print(f"(a) {quarter} tokens of 128: group-dynamic {res['a']['dynamic']:.1f} vs random {res['a']['random']:.1f} "
          f"(seeds {a_rows['random']}) -> {'holds' if res['a']['holds'] else 'does NOT hold'}")
    for mode in ("multi", "single"):
        t = res["b"][mode]["top1"]
        print(f"(b) Flux-{mode}: " + ", ".join(f"{k} tok {v:.1f}" for k, v in t.items())
              + f"; drop {res['b'][mode]['drop']:.1f}")
    print(f"(b) -> {'holds' if res['b']['holds'] else 'does NOT hold'}")
    for k, v in res["c"].items():
        if k != "holds":
            print(f"(c) K={k}: plain {v['plain'][0]}x{v['plain'][1]} {v['plain'][2]:.1f} | "
                  f"TO {v['to'][0]}x{v['to'][1]} {v['to'][2]:.1f} ({v['gain']:+.1f})")
    print(f"(c) -> {'holds' if res['c']['holds'] else 'does NOT hold'}; total {res['seconds']:.0f} s")
    write_result(args.out, res)
    return res


if __name__ == "__main__":
    main()
