"""Stage 2 entry point: build config, task and data, then run the shared loop.

    accelerate launch --config_file launch/cpu.yaml -m fluxvit.stages.videotext --preset demo \
        --set model.init=runs/pretrain/distill/student.safetensors
    python -m fluxvit.stages.videotext --preset smoke --set data.root=/tmp/synth
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

from fluxvit.metrics import retrieval_protocol

from ..common import build_source, fit
from ..common.data import log_once
from ..common.cli import parse_stage_args, print_config, resolve_config, start_run
from ..common.config import resolve_schedule
from ..common.loop import TrainResult
from .config import VideoTextConfig, presets
from .task import VideoTextTask

__all__ = ["build_config", "main"]

log = logging.getLogger("fluxvit.train")


def build_config(preset: str, overrides: Sequence[str] = ()) -> VideoTextConfig:
    """The named preset with ``key.sub=value`` overrides applied."""
    return resolve_config(presets, preset, overrides)


def _make_evaluator(cfg: VideoTextConfig, val_shards: str):
    """Held-out retrieval during training: the first retrieval setting and budget on ``val_shards`` (None when
    there are none: logged once, the training shards are never evaluated instead)."""
    # Imported here: a top-level import would load .retrieval with the package and make
    # `python -m fluxvit.stages.videotext.retrieval` warn (runpy's RuntimeWarning).
    from .retrieval import dual_softmax_tau, evaluate_retrieval, load_retrieval_set

    if not val_shards:
        log_once("data.val_shards is empty: held-out retrieval during training is skipped")
        return None
    frames, res = cfg.retrieval.settings[0]
    budget = cfg.retrieval.budgets[0]
    cache = {}

    def evaluator(model, tower) -> dict:
        if "set" not in cache:
            held_out = dataclasses.replace(cfg.data, source="shards", shards=val_shards, val_shards=val_shards)
            cache["set"] = load_retrieval_set(held_out, "val", frames, res, cfg.retrieval.max_videos or 64)
        device = next(model.parameters()).device
        tau = dual_softmax_tau(cfg.retrieval)
        m = evaluate_retrieval(model, tower, cache["set"], [budget], tau, device)[budget]
        return {"val_t2v_r1": m["t2v_r1"], "val_v2t_r1": m["v2t_r1"], "val_chance_r1": m["chance_r1"]}

    return evaluator


def main(argv: Sequence[str] | None = None) -> TrainResult | None:
    """Run stage 2; returns the ``TrainResult`` (also callable in-process from tests)."""
    args = parse_stage_args("fluxvit.stages.videotext",
                            "FluxViT stage 2: Flux-CLIP video-text contrastive pretraining", presets, argv)
    cfg = build_config(args.preset, args.overrides)
    if args.print_config:
        return print_config(cfg)
    acc = start_run(cfg, "videotext", args.preset)
    resolve_schedule(cfg, acc.num_processes)
    task = VideoTextTask(cfg)
    # Rank 0 generates the synthetic corpus (when asked for) before the other ranks read it.
    with acc.main_process_first():
        source = build_source(cfg.data, cfg.train.seed, acc.process_index, acc.num_processes)
    if cfg.train.eval_every and acc.is_main_process:
        task.evaluator = _make_evaluator(cfg, getattr(source, "val_shards", ""))
    result = fit(cfg, task, source, acc)
    if acc.is_main_process and result.evals:
        r = cfg.retrieval
        log.info("held-out retrieval (protocol %s): %s -> %s",
                 retrieval_protocol(r.dual_softmax_temperature if r.dual_softmax else None), result.evals[0][1],
                 result.evals[-1][1])
    acc.end_training()
    return result
