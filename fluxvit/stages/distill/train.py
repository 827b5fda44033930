"""Stage 1 entry point: build config, task and data, then run the shared loop.

    accelerate launch --config_file launch/cpu.yaml -m fluxvit.stages.distill --preset smoke --set optim.lr=1e-3
    python -m fluxvit.stages.distill --preset smoke            # one process
    from fluxvit.stages.distill import main; main(["--preset", "smoke", "--set", "train.steps=2"])
"""
from __future__ import annotations

import logging
from typing import Sequence

from ..common import build_source, fit
from ..common.cli import parse_stage_args, print_config, resolve_config, start_run
from ..common.loop import TrainResult
from .config import DistillConfig, presets
from .task import DistillTask

__all__ = ["build_config", "main", "parse_args"]

log = logging.getLogger("fluxvit.train")


def parse_args(argv: Sequence[str] | None = None):
    return parse_stage_args("fluxvit.stages.distill", "FluxViT stage 1: Flux-UMT masked-teacher distillation",
                            presets, argv)


def build_config(preset: str, overrides: Sequence[str] = ()) -> DistillConfig:
    """The named preset with ``key.sub=value`` overrides applied."""
    return resolve_config(presets, preset, overrides)


def main(argv: Sequence[str] | None = None) -> TrainResult | None:
    """Run stage 1; returns the ``TrainResult`` (also callable in-process from tests)."""
    args = parse_args(argv)
    cfg = build_config(args.preset, args.overrides)
    if args.print_config:
        return print_config(cfg)
    acc = start_run(cfg, "distill", args.preset)
    task = DistillTask(cfg, rank=acc.process_index, world_size=acc.num_processes)
    # Rank 0 generates the synthetic corpus (when asked for) before the other ranks read it.
    with acc.main_process_first():
        source = build_source(cfg.data, cfg.train.seed, acc.process_index, acc.num_processes)
        if cfg.train.eval_every:
            task.held_out = source.held_out([tuple(g) for g in cfg.eval_grid] or None)
    result = fit(cfg, task, source, acc)
    if acc.is_main_process and result.evals:
        first, last = result.evals[0][1], result.evals[-1][1]
        log.info("held-out cosine: %s -> %s", first, last)
    acc.end_training()
    return result
