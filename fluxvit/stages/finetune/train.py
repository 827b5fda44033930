"""Stage 3 entry point: build config, task and data, run the shared loop, evaluate at the eval budgets.

    accelerate launch --config_file launch/deepspeed_zero1.yaml -m fluxvit.stages.finetune --preset k400_base \\
        --set data.shards='k400/train/{00000..00999}.tar' --set data.val_shards='k400/val/{00000..00019}.tar' \\
        --set model.init=runs/distill_fluxvit_base_patch14/student.safetensors
    python -m fluxvit.stages.finetune --preset smoke          # one process, about a minute on a CPU
    from fluxvit.stages.finetune import main; main(["--preset", "smoke", "--set", "train.steps=2"])
"""
from __future__ import annotations

import logging
from typing import Sequence

from fluxvit.metrics import rounded

from ..common import fit
from ..common.cli import parse_stage_args, print_config, resolve_config, start_run
from ..common.config import resolve_schedule
from ..common.loop import TrainResult
from ..common.runtime import append_metrics, read_metrics
from .config import FinetuneConfig, presets
from .data import build_train_source, check_split_label_maps, shard_num_classes
from .task import FinetuneTask

__all__ = ["build_config", "main", "parse_args", "resolve_schedule"]

log = logging.getLogger("fluxvit.train")


def parse_args(argv: Sequence[str] | None = None):
    return parse_stage_args("fluxvit.stages.finetune", "FluxViT stage 3: classification finetuning with Flux-Multi",
                            presets, argv)


def build_config(preset: str, overrides: Sequence[str] = ()) -> FinetuneConfig:
    """The named preset with ``key.sub=value`` overrides applied."""
    return resolve_config(presets, preset, overrides)


def main(argv: Sequence[str] | None = None) -> TrainResult | None:
    """Run stage 3; returns the ``TrainResult`` whose last ``evals`` entry holds the final multi-view
    top-1 / top-5 per eval budget (also callable in-process from tests)."""
    args = parse_args(argv)
    cfg = build_config(args.preset, args.overrides)
    if args.print_config:
        return print_config(cfg)
    acc = start_run(cfg, "finetune", args.preset)
    resolve_schedule(cfg, acc.num_processes)
    with acc.main_process_first():  # rank 0 generates the synthetic corpus first when asked for
        num_classes = shard_num_classes(cfg.data)
    check_split_label_maps(cfg.data)
    if num_classes is not None and num_classes != cfg.model.num_classes:
        log.warning("the shards carry %d classes (classes.json): model.num_classes %d -> %d", num_classes,
                    cfg.model.num_classes, num_classes)
        cfg.model.num_classes = num_classes
    task = FinetuneTask(cfg, rank=acc.process_index, world_size=acc.num_processes)
    source = build_train_source(cfg.data, cfg.train.seed, acc.process_index, acc.num_processes)
    result = fit(cfg, task, source, acc)
    if acc.is_main_process and not result.evals and cfg.eval.budgets:
        # No periodic evaluation configured: evaluate the final weights once, and record it with the run's metrics
        # (once: a rerun that resumes the finished run finds it there).
        done = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if r["kind"] == "eval"
                and r["step"] == result.steps]
        metrics = task.evaluate(task.model, result.steps)
        result.evals.append((result.steps, metrics))
        if not done:
            append_metrics(result.run_dir, result.steps, metrics)
    if acc.is_main_process and result.evals:
        step, metrics = result.evals[-1]
        log.info("final multi-view eval (%s) at step %d: %s", cfg.eval.split, step, rounded(metrics))
    acc.end_training()
    return result
