"""Stage 1 entry point: build config, task and data, then run the shared loop.

    accelerate launch --config_file launch/cpu.yaml -m fluxvit.stages.distill --preset smoke --set optim.lr=1e-3
    python -m fluxvit.stages.distill --preset smoke            # one process
    from fluxvit.stages.distill import main; main(["--preset", "smoke", "--set", "train.steps=2"])
"""
from __future__ import annotations

import argparse
import logging
from typing import Sequence

from ..common import apply_overrides, build_accelerator, build_source, fit, seed_everything, setup_logging
from ..common.loop import TrainResult
from .config import DistillConfig, presets
from .task import DistillTask

__all__ = ["build_config", "main", "parse_args"]

log = logging.getLogger("fluxvit.train")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fluxvit.stages.distill",
                                description="FluxViT stage 1: Flux-UMT masked-teacher distillation")
    p.add_argument("--preset", default="smoke", help=f"named preset: {', '.join(presets.names())}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, e.g. --set optim.lr=1e-3 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    return p.parse_args(argv)


def build_config(preset: str, overrides: Sequence[str] = ()) -> DistillConfig:
    """The named preset with ``key.sub=value`` overrides applied."""
    return apply_overrides(presets.get(preset), list(overrides))


def main(argv: Sequence[str] | None = None) -> TrainResult | None:
    """Run stage 1; returns the ``TrainResult`` (also callable in-process from tests)."""
    args = parse_args(argv)
    cfg = build_config(args.preset, args.overrides)
    if args.print_config:
        import json
        import sys

        from ..common import config_to_dict

        sys.stdout.write(json.dumps(config_to_dict(cfg), indent=2) + "\n")
        return None

    # Seed identically on every rank so the student and decoders start equal; data and token sampling
    # are seeded per (step, rank) inside the source and the task.
    seed_everything(cfg.train.seed)
    acc = build_accelerator(cfg.train, cfg.data.batch_size, cfg.optim.clip_grad)
    setup_logging(acc.is_main_process)
    log.info("distill preset %s on %d process(es) (%s), device %s, mixed precision %s", args.preset,
             acc.num_processes, acc.distributed_type.value, acc.device, acc.mixed_precision)
    if cfg.train.deterministic:
        import torch

        torch.use_deterministic_algorithms(True, warn_only=True)

    task = DistillTask(cfg, rank=acc.process_index)
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
