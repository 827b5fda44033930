"""Token Optimization (TO, FluxViT paper arXiv 2503.14237): the best (frames, resolution) input for a token budget.

For each budget K: every candidate (F, R) with F * (R / 14)^2 >= K is reduced to K tokens by the group-dynamic
selector and classified with the trained head nearest K; the pair with the best top-1 on the *search* split wins.
It is compared with the *plain* setting of the same budget: the unmasked clip at the base resolution R0 with
F = K / (R0 / 14)^2 frames (the paper's "4 x 224 unmasked" for 1024 tokens). Both are then measured on the
*report* split (default: ``test``, held out from the search; on shard data without ``tokenopt.report_shards`` the
two are the same videos, and the table says so: its gains are then selection-biased). Writes ``tokenopt.json``,
``tokenopt.md`` and ``tokenopt.png`` (top-1 against GFLOPs per view, with and without TO) into ``--out``.

    python -m fluxvit.stages.finetune.tokenopt runs/finetune_smoke/model.safetensors \\
        --set tokenopt.budgets=[256,128,64] --set tokenopt.base_resolution=112 \\
        --set tokenopt.frames=[2,4,6,8,12,16] --set tokenopt.resolutions=[56,70,84,98,112]

The data (source, val shards, decoder, workers) and the evaluation settings are the trained run's (``config.json``
beside the checkpoint); the search's own settings are ``tokenopt.*`` (:class:`TokenOptConfig`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from fluxvit.datasets import DataConfig
from fluxvit.models import FluxViT

from ..common.cli import check_budgets, fail, resolve_tool_config, tool_parser
from ..common.config import ConfigError, config_to_dict
from ..common.data import build_source
from .config import presets
from .eval import check_label_map, evaluate, load_classifier

__all__ = ["TokenOptConfig", "candidate_pairs", "main", "plain_pair", "plot_tokenopt", "token_optimize",
           "write_table"]


@dataclass
class TokenOptConfig:
    """The search of ``python -m fluxvit.stages.finetune.tokenopt`` (``--set tokenopt.NAME=VALUE``).

    budgets: token budgets K searched. frames / resolutions: the candidate grid. base_resolution: R0 of the plain
    setting. max_ratio: largest candidate token count as a multiple of K. search_split / report_split: the splits
    the winner is chosen on and reported on (synthetic corpus: train / val / test; shards: "train" reads
    ``data.shards``, any other ``data.val_shards``). report_shards: shard spec the report reads instead (a held-out
    set beside ``data.val_shards``). num_clips / num_crops: views per video.
    """

    budgets: tuple = (2048, 1024, 512)
    frames: tuple = tuple(range(4, 25, 2))
    resolutions: tuple = tuple(range(112, 337, 28))
    base_resolution: int = 224
    max_ratio: float = 4.0
    search_split: str = "val"
    report_split: str = "test"
    report_shards: str = ""
    num_clips: int = 1
    num_crops: int = 1

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
                   report_data: DataConfig | None = None, num_clips: int = 1, num_crops: int = 1, max_videos: int = 0,
                   batch_size: int = 16, trained_heads: Sequence[int] | None = None, max_ratio: float = 4.0) -> dict:
    """Search the best (F, R) per budget on ``split`` of ``data`` and report it against the plain setting on
    ``report_split`` of ``report_data`` (default: ``data``).

    Returns:
        ``{"rows": [per budget: budget, plain {frames, resolution, tokens, gflops, top1, top5},
        to {...same, search_top1}, gain], "search": {budget: [(F, R, top1) ...]}, "settings": {...}}``; settings
        name what was searched and what reported (``search_on``, ``report_on``) and ``same_videos``.
    """
    p = net.config.patch_size
    report_split = report_split or split
    report_data = report_data or data
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
        plain = evaluate(net, report_data, split=report_split, frames=pf, resolution=pr, budgets=[0], **ev)[0]
        to = evaluate(net, report_data, split=report_split, frames=best[0], resolution=best[1], budgets=[K], **ev)[0]
        keep = ("frames", "resolution", "tokens", "gflops", "top1", "top5")  # top5 only with more than 5 classes
        row = {"budget": K, "plain": {k: plain[k] for k in keep if k in plain},
               "to": {**{k: to[k] for k in keep if k in to}, "search_top1": best[2]}}
        row["gain"] = round(row["to"]["top1"] - row["plain"]["top1"], 2)
        rows.append(row)
        log.info("TO K=%d: plain %dx%d %.2f | TO %dx%d %.2f", K, pf, pr, plain["top1"], best[0], best[1], to["top1"])
    search_on, report_on = describe_split(data, split), describe_split(report_data, report_split)
    settings = dict(split=split, report_split=report_split, search_on=search_on, report_on=report_on,
                    same_videos=search_on == report_on, views=num_clips * num_crops, frames=list(frames),
                    resolutions=list(resolutions), base_resolution=base_resolution, max_ratio=max_ratio,
                    videos=max_videos)
    return {"rows": rows, "search": {str(k): v for k, v in search.items()}, "settings": settings}


def describe_split(data: DataConfig, split: str) -> str:
    """What ``split`` of a data section reads, in words (two equal descriptions: the same videos)."""
    source = build_source(data, labels=True)
    shards = getattr(source, "split_shards", None)
    if shards is None:
        return f"the synthetic corpus's {split} split (rendered in memory)"
    return f"shards {shards(split)}" if shards(split) else f"no shards for {split}"


def write_table(result: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """``tokenopt.json`` and ``tokenopt.md`` (one row per budget: plain vs TO) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jpath = out / "tokenopt.json"
    jpath.write_text(json.dumps(result, indent=1) + "\n")
    s = result["settings"]
    if s.get("same_videos"):
        head = (f"Token Optimization: searched and reported on the same videos ({s['search_on']}): the TO gains are "
                f"selection-biased (report on held-out videos with tokenopt.report_split / tokenopt.report_shards)")
    else:
        head = (f"Token Optimization: searched on `{s['split']}` ({s.get('search_on', '')}), reported on "
                f"`{s['report_split']}` ({s.get('report_on', '')})")
    lines = [f"{head}, {s['views']} view(s) per video.", "",
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
    """CLI: search, print the Markdown table, write JSON / Markdown / PNG into ``--out`` (default: a ``tokenopt``
    folder beside the checkpoint)."""
    p = tool_parser("python -m fluxvit.stages.finetune.tokenopt",
                    "FluxViT Token Optimization: best (frames, resolution) per token budget", presets,
                    default_preset="smoke", sections=("tokenopt",), epilog=__doc__)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    to = TokenOptConfig()
    try:
        cfg, checkpoint, origin = resolve_tool_config(args, presets, {"tokenopt": to})
        if args.print_config:
            sys.stdout.write(json.dumps({**config_to_dict(cfg), "tokenopt": config_to_dict(to)}, indent=2) + "\n")
            return None
        budgets = check_budgets("tokenopt.budgets", to.budgets)
        if not checkpoint.is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint} not found; finetune first (make finetune) or name one")
        log.info("Token Optimization of %s with %s", checkpoint, origin)
        net, heads = load_classifier(str(checkpoint))
        report_data = dataclasses.replace(cfg.data, val_shards=to.report_shards) if to.report_shards else None
        check_label_map(str(checkpoint), cfg.data, to.search_split)
        check_label_map(str(checkpoint), report_data or cfg.data, to.report_split)
        result = token_optimize(net, cfg.data, budgets, to.frames, to.resolutions, to.base_resolution,
                                split=to.search_split, report_split=to.report_split, report_data=report_data,
                                num_clips=to.num_clips, num_crops=to.num_crops, max_videos=cfg.eval.max_videos,
                                batch_size=cfg.eval.batch_size, trained_heads=heads, max_ratio=to.max_ratio)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        fail(str(err), 2 if isinstance(err, ConfigError) else 1, p.prog)
    if not result["rows"]:
        fail(f"no budget of {budgets} has a candidate (frames, resolution) pair with at least that many tokens "
             f"in tokenopt.frames {list(to.frames)} x tokenopt.resolutions {list(to.resolutions)}; nothing written",
             1, p.prog)
    out = Path(args.out) if args.out else checkpoint.parent / "tokenopt"
    result["settings"]["checkpoint"] = str(checkpoint)
    result["settings"]["config"] = origin
    result["settings"]["seconds"] = round(time.perf_counter() - t0, 1)
    _, md = write_table(result, out)
    plot_tokenopt(result, out / "tokenopt.png", title=checkpoint.parent.name)
    sys.stdout.write(md.read_text())
    sys.stdout.write(f"wrote {out}/tokenopt.{{json,md,png}}\n")
    return result


if __name__ == "__main__":
    main()
