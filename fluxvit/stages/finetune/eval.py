"""Multi-view classification evaluation at any token budget (FluxViT paper, arXiv 2503.14237).

Each video gives ``num_clips`` temporal clips x ``num_crops`` spatial crops at ``frames`` x ``resolution``; every
view is reduced to the token budget K by the group-dynamic selector (or random tokens, an ablation), classified
with the trained head nearest K, and the views' softmax outputs are averaged per video (``metrics.aggregate_views``).

    python -m fluxvit.stages.finetune.eval runs/finetune_smoke/model.safetensors
    python -m fluxvit.stages.finetune.eval RUN/model.safetensors --set eval.budgets=[0,128] \\
        --set eval.resolution=112 --set eval.num_clips=2 --set eval.num_crops=1 --set data.decoder=pyav

The data (source, val shards, decoder, workers), the view (``eval.frames``, ``resolution``, ``num_clips``,
``num_crops``, ``split``, ``max_videos``) and the budgets (``eval.budgets``, 0 = every token) are the trained run's
(``config.json`` beside the checkpoint), else the ``--preset``'s.
"""
from __future__ import annotations

import json
import logging
import math
import sys
from typing import Iterable, Sequence

import torch

from fluxvit.datasets import DataConfig
from fluxvit.datasets.shards import label_map_difference, shard_classes
from fluxvit.metrics import aggregate_views, fluxvit_gflops, rounded, topk_accuracy
from fluxvit.models import FluxViT, load_model
from fluxvit.models.checkpoint import read_metadata

from ..common.cli import check_budgets, fail, print_config, resolve_tool_config, tool_parser
from ..common.config import ConfigError
from .config import presets
from .data import eval_views, has_held_out

__all__ = ["check_label_map", "evaluate", "load_classifier", "main", "view_tokens"]

log = logging.getLogger("fluxvit.eval")


def view_tokens(frames: int, resolution: int, budget: int, patch: int = 14) -> int:
    """Tokens a view keeps: min(K, F * (R / patch)^2); K = 0 keeps all."""
    total = frames * (resolution // patch) ** 2
    return total if budget <= 0 else min(budget, total)


def _random_keeps(n_views: int, grid: tuple, budget: int, generator: torch.Generator) -> list:
    n = math.prod(grid)
    return [torch.randperm(n, generator=generator)[:budget].sort().values for _ in range(n_views)]


@torch.no_grad()
def evaluate(net: FluxViT, data: DataConfig, *, split: str = "val", frames: int = 8, resolution: int = 224,
             budgets: Iterable[int] = (2048,), num_clips: int = 1, num_crops: int = 1, max_videos: int = 0,
             batch_size: int = 8, trained_heads: Sequence[int] | None = None, selection: str = "dynamic",
             seed: int = 0, batches: Iterable[dict] | None = None) -> list[dict]:
    """Multi-view top-1 / top-5 of ``net`` at every budget (views rendered once, all budgets evaluated on them).

    Args:
        net: a FluxViT classifier (eval mode is set here and restored afterwards).
        data: data config naming the source (``eval_views`` in ``.data``); ignored when ``batches`` is given.
        budgets: token budgets K (0 = every token).
        selection: "dynamic" (group-dynamic selector) or "random" (uniform random tokens, seeded by ``seed``).
        batches: precomputed evaluation batches (``{"video" (V, 3, F, R, R), "video_index" (V,), "label" (N,)}``).

    Returns:
        ``[]`` when a shard source has no held-out shards; else one dict per budget: ``budget, tokens, head,
        frames, resolution, views, videos, top1, top5, gflops`` (paper GFLOPs per view, ``metrics.fluxvit_gflops``).
    """
    budgets = [int(b) for b in budgets]
    if any(b < 0 for b in budgets):
        raise ValueError(f"token budgets must be >= 1 (or 0 for every token), got {budgets}")
    if not net.config.num_classes:
        raise ValueError("the model has no classifier (num_classes=0): evaluate a stage-3 export")
    if batches is None and not has_held_out(data, split):
        return []  # no held-out shards (logged once); the training shards are not evaluated instead
    if batches is None:
        batches = eval_views(data, split, frames, resolution, num_clips, num_crops, max_videos, batch_size)
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    p = net.config.patch_size
    g = torch.Generator().manual_seed(seed)
    probs: dict = {b: [] for b in budgets}
    labels = []
    for batch in batches:
        top = int(batch["label"].max()) if len(batch["label"]) else -1
        if top >= net.config.num_classes:
            raise ValueError(f"the evaluation data has label {top} but the model's head has {net.config.num_classes} "
                             f"classes: wrong checkpoint for this data (or the data for this checkpoint)")
        video = batch["video"].to(device)
        V, _, T, H, W = video.shape
        index = batch["video_index"].to(device)
        for b in budgets:
            tokens = view_tokens(T, H, b, p)
            head = net.nearest_head(tokens, trained_heads)
            if selection == "random" and tokens < T * (H // p) * (W // p):
                keep = [k.to(device) for k in _random_keeps(V, (T, H // p, W // p), tokens, g)]
                feats = net.forward_features(video, head=head, keep=keep)
            elif selection in ("dynamic", "random"):
                feats = net.forward_features(video, num_tokens=b if b > 0 else None, head=head)
            else:
                raise ValueError(f"selection must be 'dynamic' or 'random', got {selection!r}")
            logits = net.logits(feats)
            probs[b].append(aggregate_views(logits, index, int(batch["label"].shape[0])))
        labels.append(batch["label"])
    net.train(was_training)
    if not labels:
        raise RuntimeError("evaluation produced no batch (empty validation split?)")
    labels = torch.cat(labels).to(device)
    cfg = net.config
    out = []
    for b in budgets:
        tokens = view_tokens(frames, resolution, b, p)
        acc = topk_accuracy(torch.cat(probs[b]), labels, (1, 5))
        out.append({"budget": b, "tokens": tokens, "head": net.nearest_head(tokens, trained_heads), "frames": frames,
                    "resolution": resolution, "views": num_clips * num_crops, "videos": int(labels.numel()),
                    "selection": selection, **acc,
                    "gflops": fluxvit_gflops(tokens, cfg.embed_dim, cfg.depth)})
    return out


def check_label_map(path: str, data: DataConfig, split: str = "val") -> None:
    """Stop with one line when the ``classes.json`` of the shards ``split`` reads (``data.shards`` for "train",
    else ``data.val_shards``) differs from the class names the stage-3 export ``path`` stored. Exports made before
    names were stored, in-memory sources and shards without ``classes.json`` are not checked.

    Raises:
        ValueError: the first class whose index differs.
    """
    stored = read_metadata(path).get("classes")
    shards = (data.shards if split == "train" else data.val_shards) if data.source == "shards" else ""
    found = shard_classes(shards) if stored and shards else None
    if found is not None:
        why = label_map_difference(json.loads(stored), found, f"the model ({path})", f"the shards ({shards})")
        if why:
            raise ValueError(why)


def load_classifier(path: str) -> tuple[FluxViT, list[int] | None]:
    """A finetuned FluxViT from a stage-3 export, with its trained heads (None: all).

    Raises:
        ValueError: one line when ``path`` is a stage-1 or stage-2 export (no classifier) or not a FluxViT file.
    """
    meta = read_metadata(path)
    if "fluxvit_videotext" in meta:
        raise ValueError(f"{path} is a stage-2 video-text export, which has no classifier: evaluate it with "
                         f"python -m fluxvit.stages.videotext.retrieval, or finetune it first (make finetune "
                         f"ARGS='--set model.init={path}')")
    if meta.get("stage") == "distill":
        raise ValueError(f"{path} is a stage-1 export, which has no classifier: finetune it first (make finetune "
                         f"ARGS='--set model.init={path}')")
    net = load_model(path)
    heads = meta.get("trained_heads")
    return net, ([int(h) for h in heads.split(",")] if heads else None)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """CLI: print a JSON list of per-budget results (and write it to ``--out``)."""
    p = tool_parser("python -m fluxvit.stages.finetune.eval",
                    "FluxViT multi-view classification evaluation at token budgets. Settings come from the run's "
                    "saved config (data.*, eval.*, loss.selection); --set overrides single fields.",
                    presets, default_preset="smoke", epilog=__doc__)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg, checkpoint, origin = resolve_tool_config(args, presets)
        if args.print_config:
            return print_config(cfg)
        budgets = check_budgets("eval.budgets", cfg.eval.budgets, allow_all=True)
        log.info("evaluating %s with %s", checkpoint, origin)
        net, heads = load_classifier(str(checkpoint))
        e = cfg.eval
        check_label_map(str(checkpoint), cfg.data, e.split)
        res = evaluate(net, cfg.data, split=e.split, frames=e.frames, resolution=e.resolution, budgets=budgets,
                       num_clips=e.num_clips, num_crops=e.num_crops, max_videos=e.max_videos, batch_size=e.batch_size,
                       trained_heads=heads, selection=cfg.loss.selection)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        fail(str(err), 1 if not isinstance(err, ConfigError) else 2, p.prog)
    # Each row names the data it was computed on; figures to the precision they have.
    where = cfg.data.shards if e.split == "train" else cfg.data.val_shards
    res = [{**r, "split": e.split, "data": where or cfg.data.source} for r in rounded(res)]
    text = json.dumps(res, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    sys.stdout.write(text + "\n")
    return res


if __name__ == "__main__":
    main()
