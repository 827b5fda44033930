"""The command line every stage shares: ``--preset NAME``, repeatable ``--set key.sub=value``,
``--print-config``, the start of a run (seeds, accelerator, rank-0 logging, the launch check), and ``run_cli``,
which turns the errors a user can fix into one line on stderr and an exit status instead of a traceback:
2 for a bad config or launch (``ConfigError``, ``DistributedMismatchError``), 1 for an unusable checkpoint
(``CheckpointError``)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Callable, NoReturn, Sequence

import torch

from fluxvit.models.checkpoint import CheckpointMismatchError

from .checkpoint import CheckpointError
from .config import ConfigError, PresetRegistry, apply_overrides, config_to_dict
from .runtime import (DistributedMismatchError, build_accelerator, check_distributed, seed_everything,
                      setup_logging)

__all__ = ["OneLineParser", "fail", "parse_stage_args", "print_config", "resolve_config", "run_cli", "start_run"]

log = logging.getLogger("fluxvit.train")


def fail(message: str, status: int = 2, prog: str = "fluxvit") -> NoReturn:
    """Write ``prog: error: message`` as one line to stderr (on the main process only) and exit with ``status``."""
    if os.environ.get("RANK", "0") in ("", "0"):
        sys.stderr.write(f"{prog}: error: {' '.join(str(message).split())}\n")
    raise SystemExit(status)


def token_budget(text: str) -> int:
    """argparse type of a CLI token budget: an integer >= 1 (a clear usage error otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"token budget must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"token budget must be >= 1, got {value}")
    return value


def token_budget_or_all(text: str) -> int:
    """argparse type: an integer token budget >= 1, or "all" (every token; 0 internally)."""
    if text.strip().lower() == "all":
        return 0
    try:
        return token_budget(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (or 'all' for every token)") from None


class OneLineParser(argparse.ArgumentParser):
    """``argparse`` whose usage errors are one line (``prog: error: ...``, exit 2), without the usage dump."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see --help)", 2, self.prog)


def run_cli(main: Callable[[], Any], prog: str = "fluxvit") -> Any:
    """Run a stage's ``main()`` as a command: errors a user can fix end the process with one line."""
    try:
        return main()
    except (ConfigError, DistributedMismatchError) as err:
        fail(str(err), 2, prog)
    except CheckpointMismatchError as err:
        fail(f"train.init_from: {err}", 2, prog)
    except CheckpointError as err:
        fail(str(err), 1, prog)


def parse_stage_args(module: str, description: str, presets: PresetRegistry,
                     argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a stage's command line: ``python -m MODULE --preset NAME --set a.b=c ... [--print-config]``."""
    p = OneLineParser(prog=f"python -m {module}", description=description)
    p.add_argument("--preset", default="smoke", choices=presets.names(), metavar="NAME",
                   help=f"named preset: {', '.join(presets.names())}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, e.g. --set optim.lr=1e-3 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    return p.parse_args(argv)


def resolve_config(presets: PresetRegistry, preset: str, overrides: Sequence[str] = ()) -> Any:
    """The named preset with ``key.sub=value`` overrides applied (``ConfigError`` names a bad key)."""
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
    check_distributed(acc)
    log.info("%s preset %s on %d process(es) (%s), device %s, mixed precision %s", stage, preset,
             acc.num_processes, acc.distributed_type.value, acc.device, acc.mixed_precision)
    if getattr(cfg.train, "deterministic", False):
        torch.use_deterministic_algorithms(True, warn_only=True)
    return acc
