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
from .validate import check_config
from .runtime import (DistributedMismatchError, build_accelerator, check_distributed, seed_everything,
                      setup_logging)

__all__ = ["OneLineParser", "apply_saved", "check_budgets", "fail", "parse_stage_args", "print_config", "resolve_config", "resolve_tool_config",
           "run_cli", "start_run", "tool_parser"]

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
        fail(f"model.init: {err}", 2, prog)
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
    """The named preset with ``key.sub=value`` overrides applied; ``ConfigError`` names a bad key, or a value
    outside its range or choices (``validate.check_config``)."""
    return check_config(apply_overrides(presets.get(preset), list(overrides)))


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


# ------------------------------------------------------------------------------------- evaluation tools
def apply_saved(cfg: Any, saved: dict) -> Any:
    """Overwrite ``cfg``'s fields with a saved config's values (``config.json`` of a run), section by section, in
    place; fields the saved config lacks keep ``cfg``'s values, and saved keys the code no longer has are ignored
    (lists become tuples where the field is a tuple)."""
    import dataclasses

    for f in dataclasses.fields(cfg):
        if f.name not in saved:
            continue
        current, value = getattr(cfg, f.name), saved[f.name]
        if dataclasses.is_dataclass(current):
            if isinstance(value, dict):
                apply_saved(current, value)
        else:
            setattr(cfg, f.name, tuple(value) if isinstance(current, tuple) and isinstance(value, list) else value)
    return cfg


def tool_parser(prog: str, description: str, presets: PresetRegistry, default_preset: str,
                sections: Sequence[str] = (), epilog: str | None = None) -> OneLineParser:
    """The command line of an evaluation tool (eval, Token Optimization, retrieval): the stages' vocabulary.

    ``CHECKPOINT`` (positional, optional: default ``train.run_dir/train.export_name`` of the preset), ``--preset``
    (used when the checkpoint has no saved ``config.json`` beside it), repeatable ``--set key.sub=value`` (the
    stage's keys, plus the tool's own ``sections``), ``--out``, ``--print-config``."""
    p = OneLineParser(prog=prog, description=description, epilog=epilog,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", default="",
                   help="the export to evaluate (default: train.run_dir/train.export_name of the config)")
    p.add_argument("--preset", default=None, choices=presets.names(), metavar="NAME",
                   help=f"config when the checkpoint has no saved config.json beside it (default {default_preset}): "
                        f"{', '.join(presets.names())}")
    extra = f" and {', '.join(s + '.*' for s in sections)}" if sections else ""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a field of the run's config{extra}, e.g. --set data.decoder=pyav (repeatable)")
    p.add_argument("--out", default="", help="output path")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.set_defaults(_default_preset=default_preset)
    return p


def resolve_tool_config(args: argparse.Namespace, presets: PresetRegistry, sections: dict | None = None):
    """The config an evaluation tool runs with, and where it came from.

    The checkpoint's run directory's ``config.json`` (the trained run's resolved config) when present, else the
    preset (``--preset``, or the tool's default); then the ``--set`` overrides, those of the tool's own
    ``sections`` (``{"tokenopt": TokenOptConfig()}``) applied to those.

    Returns:
        ``(cfg, checkpoint path, origin)`` with ``origin`` a phrase naming the config's source for the report.

    Raises:
        ConfigError: a bad override (one line naming the key).
    """
    from pathlib import Path

    sections = sections or {}
    cfg = presets.get(args.preset or args._default_preset)
    checkpoint = Path(args.checkpoint or Path(cfg.train.run_dir) / cfg.train.export_name)
    saved = checkpoint.parent / "config.json"
    if saved.is_file():
        try:
            apply_saved(cfg, json.loads(saved.read_text()))
        except ValueError as err:
            raise ConfigError(f"{saved}: not a readable config ({err})") from None
        origin = f"the run's saved config {saved}"
        if args.preset:
            log.warning("--preset %s ignored: %s has a saved config (override single fields with --set)",
                        args.preset, checkpoint.parent)
    else:
        origin = f"preset {args.preset or args._default_preset} (no config.json beside {checkpoint})"
    own, stage = [], []
    for item in args.overrides:
        (own if item.split("=", 1)[0].split(".", 1)[0] in sections else stage).append(item)
    apply_overrides(cfg, stage)
    for item in own:
        name, rest = item.split(".", 1)
        try:
            apply_overrides(sections[name], [rest])
        except ConfigError as err:
            raise ConfigError(f"{name}.{err}") from None
    try:
        cfg.data.validate()  # a bad --set data.* value fails here, in one line, before any model is loaded
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return cfg, checkpoint, origin


def check_budgets(key: str, budgets: Sequence[int], allow_all: bool = False) -> list[int]:
    """Token budgets of a config key as ints: each >= 1 (or 0 = every token with ``allow_all``), at least one.

    Raises:
        ConfigError: one line naming ``key`` and the bad value.
    """
    out = []
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, (int, float)) or int(b) != b or b < (0 if allow_all else 1):
            floor = ">= 1, or 0 for every token" if allow_all else ">= 1"
            raise ConfigError(f"{key}: token budgets must be integers {floor}, got {b!r}")
        out.append(int(b))
    if not out:
        raise ConfigError(f"{key}: give at least one token budget")
    return out
