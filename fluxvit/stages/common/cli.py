"""The command line every stage shares: ``--preset NAME``, repeatable ``--set key.sub=value``,
``--print-config``, and the start of a run (seeds, accelerator, rank-0 logging)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Sequence

from .config import PresetRegistry, apply_overrides, config_to_dict
from .runtime import build_accelerator, seed_everything, setup_logging

__all__ = ["parse_stage_args", "print_config", "resolve_config", "start_run"]

log = logging.getLogger("fluxvit.train")


def parse_stage_args(module: str, description: str, presets: PresetRegistry,
                     argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a stage's command line: ``python -m MODULE --preset NAME --set a.b=c ... [--print-config]``."""
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    p.add_argument("--preset", default="smoke", choices=presets.names(), metavar="NAME",
                   help=f"named preset: {', '.join(presets.names())}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, e.g. --set optim.lr=1e-3 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    return p.parse_args(argv)


def resolve_config(presets: PresetRegistry, preset: str, overrides: Sequence[str] = ()) -> Any:
    """The named preset with ``key.sub=value`` overrides applied."""
    return apply_overrides(presets.get(preset), list(overrides))


def print_config(cfg: Any) -> None:
    """Write the resolved config as JSON to stdout (``--print-config``)."""
    sys.stdout.write(json.dumps(config_to_dict(cfg), indent=2) + "\n")


def start_run(cfg: Any, stage: str, preset: str):
    """Seed (identically on every rank, so replicas start equal; data and sampling are seeded per step and
    rank inside the sources and tasks), build the accelerator, set up rank-0 logging; returns the accelerator."""
    seed_everything(cfg.train.seed)
    acc = build_accelerator(cfg.train, cfg.data.batch_size, cfg.optim.clip_grad)
    setup_logging(acc.is_main_process)
    log.info("%s preset %s on %d process(es) (%s), device %s, mixed precision %s", stage, preset,
             acc.num_processes, acc.distributed_type.value, acc.device, acc.mixed_precision)
    if getattr(cfg.train, "deterministic", False):
        import torch

        torch.use_deterministic_algorithms(True, warn_only=True)
    return acc
