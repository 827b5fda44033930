"""Token Optimization (TO, FluxViT paper arXiv 2503.14237): the best (frames, resolution) input for a token budget.

For each budget K: every candidate (F, R) with F * (R / 14)^2 >= K is reduced to K tokens by the group-dynamic
selector and classified with the trained head nearest K; the pair with the best top-1 on the search split wins.
It is compared with the *plain* setting of the same budget: the unmasked clip at the base resolution R0 with
F = K / (R0 / 14)^2 frames (the paper's "4 x 224 unmasked" for 1024 tokens). Both are then measured on the
report split (default: the search split, as the paper does; pass a held-out split to avoid selection bias).
Writes ``tokenopt.json``, ``tokenopt.md`` and ``tokenopt.png`` (top-1 against GFLOPs per view, with and
without TO) into ``--out``.

    python -m fluxvit.stages.finetune.tokenopt --checkpoint runs/finetune_smoke/model.safetensors \\
        --budgets 256 128 64 --base-resolution 112 --frames 2 4 6 8 12 16 --resolutions 56 70 84 98 112
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from fluxvit.models import FluxViT

from ..common.cli import OneLineParser, fail, token_budget
from fluxvit.datasets import DataConfig
from .eval import add_data_args, data_config, evaluate, load_classifier

__all__ = ["candidate_pairs", "main", "plain_pair", "plot_tokenopt", "token_optimize", "write_table"]

log = logging.getLogger("fluxvit.eval")


def candidate_pairs(budget: int, frames: Sequence[int], resolutions: Sequence[int], patch: int = 14,
                    max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """(F, R) pairs with K <= F * (R / patch)^2 <= max_ratio * K (the selector then keeps K), sorted."""
    out = []
    for f in sorted(set(frames)):
        for r in sorted(set(resolutions)):
            n = f * (r // patch) ** 2
            if budget <= n <= max_ratio * budget:
                out.append((f, r))
    return out


def plain_pair(budget: int, base_resolution: int, patch: int = 14) -> tuple[int, int]:
    """The unmasked setting of a budget: F = K // (R0 / patch)^2 frames at the base resolution R0 (at least one
    frame; when one frame at R0 already exceeds K, the largest resolution whose single frame fits)."""
    per_frame = (base_resolution // patch) ** 2
    if per_frame <= budget:
        return budget // per_frame, base_resolution
    side = max(1, int(budget ** 0.5))
    return 1, side * patch


def token_optimize(net: FluxViT, data: DataConfig, budgets: Sequence[int], frames: Sequence[int],
                   resolutions: Sequence[int], base_resolution: int, *, split: str = "val", report_split: str = "",
                   num_clips: int = 1, num_crops: int = 1, max_videos: int = 0, batch_size: int = 16,
                   trained_heads: Sequence[int] | None = None, max_ratio: float = 4.0) -> dict:
    """Search the best (F, R) per budget on ``split`` and report it against the plain setting.

    Returns:
        ``{"rows": [per budget: budget, plain {frames, resolution, tokens, gflops, top1, top5},
        to {...same, search_top1}, gain], "search": {budget: [(F, R, top1) ...]}, "settings": {...}}``.
    """
    p = net.config.patch_size
    report_split = report_split or split
    ev = dict(num_clips=num_clips, num_crops=num_crops, max_videos=max_videos, batch_size=batch_size,
              trained_heads=trained_heads)
    rows, search = [], {}
    for K in budgets:
        K = int(K)
        scores = []
        for f, r in candidate_pairs(K, frames, resolutions, p, max_ratio):
            res = evaluate(net, data, split=split, frames=f, resolution=r, budgets=[K], **ev)[0]
            scores.append((f, r, res["top1"]))
            log.info("TO K=%d: %d x %d -> top-1 %.2f", K, f, r, res["top1"])
        if not scores:
            log.warning("TO K=%d: no candidate pair in the search space", K)
            continue
        best = max(scores, key=lambda s: (s[2], -s[0] * s[1] ** 2))  # ties: the cheaper input
        search[K] = scores
        pf, pr = plain_pair(K, base_resolution, p)
        plain = evaluate(net, data, split=report_split, frames=pf, resolution=pr, budgets=[0], **ev)[0]
        to = evaluate(net, data, split=report_split, frames=best[0], resolution=best[1], budgets=[K], **ev)[0]
        keep = ("frames", "resolution", "tokens", "gflops", "top1", "top5")
        row = {"budget": K, "plain": {k: plain[k] for k in keep},
               "to": {**{k: to[k] for k in keep}, "search_top1": best[2]}}
        row["gain"] = row["to"]["top1"] - row["plain"]["top1"]
        rows.append(row)
        log.info("TO K=%d: plain %dx%d %.2f | TO %dx%d %.2f", K, pf, pr, plain["top1"], best[0], best[1], to["top1"])
    settings = dict(split=split, report_split=report_split, views=num_clips * num_crops, frames=list(frames),
                    resolutions=list(resolutions), base_resolution=base_resolution, max_ratio=max_ratio,
                    videos=max_videos)
    return {"rows": rows, "search": {str(k): v for k, v in search.items()}, "settings": settings}


def write_table(result: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """``tokenopt.json`` and ``tokenopt.md`` (one row per budget: plain vs TO) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jpath = out / "tokenopt.json"
    jpath.write_text(json.dumps(result, indent=1) + "\n")
    s = result["settings"]
    lines = [f"Token Optimization: searched on `{s['split']}`, reported on `{s['report_split']}`, "
             f"{s['views']} view(s) per video.", "",
             "| budget | plain F x R | plain GFLOPs | plain top-1 | TO F x R | TO GFLOPs | TO top-1 | gain |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        pl, to = r["plain"], r["to"]
        lines.append(f"| {r['budget']} | {pl['frames']} x {pl['resolution']} | {pl['gflops']:.3f} | {pl['top1']:.1f} "
                     f"| {to['frames']} x {to['resolution']} | {to['gflops']:.3f} | {to['top1']:.1f} "
                     f"| {r['gain']:+.1f} |")
    mpath = out / "tokenopt.md"
    mpath.write_text("\n".join(lines) + "\n")
    return jpath, mpath


def plot_tokenopt(result: dict, path: str | Path, title: str = "") -> Path:
    """PNG of top-1 against GFLOPs per view, plain vs TO (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(result["rows"], key=lambda r: r["budget"])
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for key, label, style in (("plain", "without TO (unmasked)", "o--"), ("to", "with TO", "s-")):
        xs = [r[key]["gflops"] for r in rows]
        ys = [r[key]["top1"] for r in rows]
        ax.plot(xs, ys, style, label=label)
        if key == "to":
            for r, x, y in zip(rows, xs, ys):
                ax.annotate(f"{r['budget']} tok\n{r['to']['frames']}x{r['to']['resolution']}", (x, y),
                            textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("GFLOPs per view (paper convention)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title or "Token Optimization")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> dict:
    """CLI: search, print the Markdown table, write JSON / Markdown / PNG into ``--out``."""
    p = OneLineParser(prog="python -m fluxvit.stages.finetune.tokenopt",
                      description="FluxViT Token Optimization: best (frames, resolution) per token budget")
    add_data_args(p)
    p.add_argument("--budgets", type=token_budget, nargs="+", default=[2048, 1024, 512], help="token budgets (>= 1)")
    p.add_argument("--frames", type=int, nargs="+", default=list(range(4, 25, 2)), help="candidate frame counts")
    p.add_argument("--resolutions", type=int, nargs="+", default=list(range(112, 337, 28)),
                   help="candidate resolutions (pixels)")
    p.add_argument("--base-resolution", type=int, default=224, help="resolution of the plain (unmasked) setting")
    p.add_argument("--report-split", default="", help="split the winners are reported on (default: --split)")
    p.add_argument("--clips", type=int, default=1)
    p.add_argument("--crops", type=int, default=1, choices=(1, 3))
    p.add_argument("--max-ratio", type=float, default=4.0, help="largest candidate token count as a multiple of K")
    p.add_argument("--out", default="runs/tokenopt", help="output folder")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    if not Path(args.checkpoint).is_file():
        fail(f"checkpoint {args.checkpoint} not found; finetune first (make finetune) or pass --checkpoint", 1, p.prog)
    try:
        net, heads = load_classifier(args.checkpoint)
        result = token_optimize(net, data_config(args), args.budgets, args.frames, args.resolutions,
                                args.base_resolution, split=args.split, report_split=args.report_split,
                                num_clips=args.clips, num_crops=args.crops, max_videos=args.max_videos,
                                batch_size=args.batch_size, trained_heads=heads, max_ratio=args.max_ratio)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err), 1, p.prog)
    if not result["rows"]:
        fail(f"no budget of {args.budgets} has a candidate (frames, resolution) pair with at least that many tokens "
             f"in --frames {args.frames} x --resolutions {args.resolutions}; nothing written", 1, p.prog)
    result["settings"]["checkpoint"] = args.checkpoint
    result["settings"]["seconds"] = round(time.perf_counter() - t0, 1)
    _, md = write_table(result, args.out)
    plot_tokenopt(result, Path(args.out) / "tokenopt.png", title=Path(args.checkpoint).parent.name)
    sys.stdout.write(md.read_text())
    sys.stdout.write(f"wrote {args.out}/tokenopt.{{json,md,png}}\n")
    return result


if __name__ == "__main__":
    main()
