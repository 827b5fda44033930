"""Config values checked at the door: every field with a valid range or a fixed set of choices is checked when a
stage's config is resolved, before anything is written, and a bad value stops the command with one line naming
the key, the value and what is allowed (``ConfigError``: exit 2 through ``run_cli``).

Rules are keyed by the dotted names users type with ``--set``; a key a stage does not have is not checked there
(``tests/test_common_validate.py`` holds every key to at least one stage, so a renamed field cannot slip out of
its rule). Two fields that conflict without being wrong alone (a run shorter than its warm-up; held-out shards
with held-out evaluation off) are logged once at start by :func:`warn_conflicts`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import Any, Callable

from .config import ConfigError

__all__ = ["RULES", "Rule", "check_config", "config_problems", "warn_conflicts"]

log = logging.getLogger("fluxvit.train")

@dataclasses.dataclass(frozen=True)
class Rule:
    """A check of one value: ``ok(value)`` and, for the message, the ``allowed`` values in words."""

    ok: Callable[[Any], bool]
    allowed: str


def _show(v: Any) -> str:
    """A value as a user types it after ``--set key=``: strings bare, everything else as JSON."""
    return v if isinstance(v, str) else json.dumps(v, default=str)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int | None = None) -> Rule:
    """An integer ``>= lo``."""
    return Rule(lambda v: _is_int(v) and (lo is None or v >= lo), "an integer" + (f" >= {lo}" if lo is not None else ""))


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False) -> Rule:
    """A finite number between ``lo`` and ``hi`` (``*_open``: that end excluded)."""
    def ok(v):
        return _is_num(v) and (lo is None or (v > lo if lo_open else v >= lo)) and \
            (hi is None or (v < hi if hi_open else v <= hi))
    ends = ([f"{'>' if lo_open else '>='} {lo:g}"] if lo is not None else []) + \
        ([f"{'<' if hi_open else '<='} {hi:g}"] if hi is not None else [])
    return Rule(ok, " ".join(["a finite number", " and ".join(ends)]).strip())


def choice(*values: Any) -> Rule:
    """One of ``values``."""
    return Rule(lambda v: v in values, "one of " + ", ".join(_show(v) for v in values))


def optional(rule: Rule) -> Rule:
    """``None`` or what ``rule`` allows."""
    return Rule(lambda v: v is None or rule.ok(v), f"null or {rule.allowed}")


def each(rule: Rule, *, nonempty: bool = False) -> Rule:
    """A list whose every item ``rule`` allows (``nonempty``: at least one item)."""
    return Rule(lambda v: isinstance(v, (list, tuple)) and (bool(v) or not nonempty) and all(rule.ok(x) for x in v),
                f"a {'non-empty ' if nonempty else ''}list, each item {rule.allowed}")


POSITIVE, NON_NEGATIVE, FRACTION = integer(1), integer(0), number(0.0, 1.0)
DROP_RATE = number(0.0, 1.0, hi_open=True)

# --set key -> rule; a key a stage does not have is skipped there.
RULES: dict[str, Rule] = {
    # train (train.steps 0 only with stage 3's epochs: checked in config_problems)
    "train.steps": NON_NEGATIVE, "train.grad_accum": POSITIVE, "train.log_every": POSITIVE,
    "train.ckpt_every": NON_NEGATIVE, "train.eval_every": NON_NEGATIVE, "train.keep_last": POSITIVE,
    "train.max_bad_steps": POSITIVE, "train.seed": NON_NEGATIVE, "train.ema_decay": number(0.0, 1.0, hi_open=True),
    "train.mixed_precision": choice("auto", "no", "bf16", "fp16"),
    # optim
    "optim.lr": number(0.0), "optim.min_lr": number(0.0), "optim.warmup_lr": number(0.0),
    "optim.weight_decay": number(0.0), "optim.eps": number(0.0, lo_open=True),
    "optim.betas": each(number(0.0, 1.0, hi_open=True), nonempty=True), "optim.warmup_steps": NON_NEGATIVE,
    "optim.warmup_fraction": number(0.0, 1.0, hi_open=True), "optim.clip_grad": number(0.0),
    "layer_decay": number(0.0, 1.0, lo_open=True),
    # data (the loader's own fields are checked by fluxvit.datasets.DataConfig.validate, called below)
    "data.num_clips": POSITIVE, "data.num_val_clips": NON_NEGATIVE,
    # stage-3 augmentation, model and evaluation
    "aug.mixup": number(0.0), "aug.cutmix": number(0.0), "aug.mix_prob": FRACTION, "aug.switch_prob": FRACTION,
    "aug.label_smoothing": number(0.0, 1.0, hi_open=True),
    "eval.batch_size": POSITIVE, "eval.num_clips": POSITIVE, "eval.num_crops": POSITIVE,
    "eval.max_videos": NON_NEGATIVE, "eval.budgets": each(NON_NEGATIVE),
    "model.num_classes": NON_NEGATIVE, "model.drop_path_rate": DROP_RATE,  # num_classes 0: no classifier (stages 1-2)
    "loss.budgets": each(NON_NEGATIVE),  # 0: every token
    # stages 1-2
    "contrast.budgets": each(POSITIVE, nonempty=True), "retrieval.budgets": each(NON_NEGATIVE),
    "retrieval.max_videos": NON_NEGATIVE, "contrast.temperature": number(0.0, lo_open=True),
}


def _get(cfg: Any, key: str) -> Any:
    obj = cfg
    for part in key.split("."):
        if not dataclasses.is_dataclass(obj) or not any(f.name == part for f in dataclasses.fields(obj)):
            return _ABSENT
        obj = getattr(obj, part)
    return obj


_ABSENT = object()


def _grid_tokens(data: Any) -> int | None:
    """The most tokens one clip of the data section's grid holds (``F * (R // 14) ** 2``; patch 14)."""
    pairs = data.grid_pairs() if callable(getattr(data, "grid_pairs", None)) else []
    return max((int(f) * (int(r) // 14) ** 2 for f, r in pairs), default=None)


def config_problems(cfg: Any) -> list[str]:
    """Every rule the config breaks, as ``"key=value: must be ..."`` (empty when the config is valid)."""
    problems = []
    for key in RULES:
        value = _get(cfg, key)
        if value is _ABSENT:
            continue
        if not RULES[key].ok(value):
            problems.append(f"{key}={_show(value)}: must be {RULES[key].allowed}")
    steps, epochs = _get(cfg, "train.steps"), _get(cfg, "epochs")
    if steps == 0 and not (_is_num(epochs) and epochs > 0):
        problems.append("train.steps=0: must be an integer >= 1" + (" (or set epochs > 0)" if epochs is not _ABSENT
                                                                     else ""))
    if _get(cfg, "eval.budgets") is not _ABSENT and _get(cfg, "model.num_classes") == 0:  # stage 3 classifies
        problems.append("model.num_classes=0: must be an integer >= 1 (stage 3 trains a classifier)")
    data = _get(cfg, "data")
    most = None
    if callable(getattr(data, "validate", None)):
        try:
            data.validate()  # the data library's own field checks (one line each)
            most = _grid_tokens(data)
        except ValueError as err:
            problems.append(str(err))
    if most is not None:
        for key in ("loss.budgets", "contrast.budgets"):
            budgets = _get(cfg, key)
            if budgets is _ABSENT or not isinstance(budgets, (list, tuple)):
                continue
            too_big = [b for b in budgets if _is_int(b) and b > most]
            if too_big:
                problems.append(f"{key}={_show(list(budgets))}: budgets {too_big} exceed the {most} tokens the largest "
                                f"clip of data.grid holds (frames x (resolution // 14)^2)")
    return problems


def check_config(cfg: Any) -> Any:
    """Raise ``ConfigError`` (one line: every bad key, its value and what is allowed) unless ``cfg`` is valid;
    returns ``cfg``."""
    problems = config_problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    return cfg


def warn_conflicts(cfg: Any, total_steps: int, warmup: int) -> list[str]:
    """Log (once, at start) the pairs of fields that conflict without being invalid alone; returns the lines."""
    lines = []
    if 0 < warmup >= total_steps:
        lines.append(f"the warm-up ({warmup} steps) is not shorter than the run (train.steps={total_steps}): the "
                     f"learning rate never reaches optim.lr")
    val = _get(cfg, "data.val_shards")
    final = _get(cfg, "eval.budgets")  # stage 3 evaluates the final weights once when it has eval budgets
    if val not in (_ABSENT, None, "") and _get(cfg, "train.eval_every") == 0 and final in (_ABSENT, [], ()):
        lines.append("data.val_shards is set but held-out evaluation is off (train.eval_every=0"
                     + (", eval.budgets=[]" if final is not _ABSENT else "") + "): the shards are not read")
    for line in lines:
        log.warning(line)
    return lines
