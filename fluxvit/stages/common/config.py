"""Typed stage configs: shared dataclasses, named presets, ``--set key.sub=value`` overrides, saving.

A stage config is a dataclass of dataclasses (``model``, ``data``, ``optim``, ``train``, plus the stage's
own sections). Experiments are preset functions registered by name (big_vision ``get_config`` style);
the command line picks one preset and overrides single fields, and the resolved config is written next to
every checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from fluxvit.datasets import DataConfig  # the stages' data section (one class for the loader and the stages)

__all__ = [
    "ConfigError", "DataConfig", "ModelConfig", "OptimConfig", "PresetRegistry", "RESUME_MAY_CHANGE", "TrainConfig", "apply_overrides",
    "check_resume_config", "config_to_dict", "parse_value", "resolve_schedule", "save_config",
]


class ConfigError(ValueError):
    """A config that cannot be used as given; the message is one line and names the key."""


@dataclass
class OptimConfig:
    """AdamW with decay groups and a cosine schedule with linear warmup (``lr`` is the peak rate)."""

    lr: float = 1e-3
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-8
    warmup_steps: int = 0
    # Fraction of total steps used for warmup when warmup_steps is 0 (paper: 20 of 100 epochs = 0.2).
    warmup_fraction: float = 0.0
    # lr at the first warmup step (the release: 1e-6 per 256, scaled like lr); 0: warmup starts at lr / warmup.
    warmup_lr: float = 0.0
    clip_grad: float = 1.0  # max global grad norm; 0 disables clipping
    # "cosine": warm-up from warmup_lr, then a half cosine from lr to min_lr. "cosine_floor": the multi-modality
    # scheduler of InternVideo2 and UMT (utils/scheduler.py): lr x max(min_lr / lr, step / warmup) while warming
    # up, then lr x max(min_lr / lr, half cosine to 0): it starts at min_lr and ends flat on min_lr.
    schedule: str = "cosine"


@dataclass
class ModelConfig:
    """The ``model`` section of every stage: a registered model name plus ``create_model`` overrides, and the
    weights it starts from.

    Attributes:
        name, overrides: ``create_model(name, num_classes=..., drop_path_rate=..., **overrides)``.
        drop_path_rate: stochastic depth of the trained model.
        num_classes: classifier classes (0: none, stages 1-2).
        init: weights to start from (not a resume): a previous stage's export (``.safetensors`` from
            ``save_model``; its stored architecture is the one built) or an official checkpoint
            (``.pth``/``.pt``/``.bin``; weights under ``model``/``module`` or bare).
        init_strict: the weights must fit the model, except a classifier head of another class count, which keeps
            its initialisation (reported); false loads what fits and warns about the rest.
        init_class_map: stage 3: the classifier rows of ``init`` to keep for this model's classes (``first``: the
            first ``num_classes`` rows, as the release slices K710 -> K400; or a JSON list file of row indices).
    """

    name: str = "fluxvit_small_patch14"
    drop_path_rate: float = 0.1
    num_classes: int = 0
    overrides: dict = field(default_factory=dict)
    init: str = ""
    init_strict: bool = True
    init_class_map: str = ""


@dataclass
class TrainConfig:
    """Loop settings shared by every stage.

    ``resume`` restores an exact training state (a checkpoint directory or "auto" for the newest intact one in
    ``run_dir``); starting weights (not a resume) are ``model.init``.
    """

    run_dir: str = "runs/default"
    steps: int = 100
    grad_accum: int = 1
    seed: int = 0
    mixed_precision: str = "auto"  # "auto" -> bf16 on CUDA, none on CPU; or "no" / "bf16"
    ema_decay: float = 0.0  # 0 disables EMA
    log_every: int = 10
    ckpt_every: int = 0  # 0: only at the end
    keep_last: int = 2
    resume: str = ""
    max_bad_steps: int = 10  # consecutive non-finite steps that stop the run
    eval_every: int = 0
    export_name: str = "student.safetensors"
    tensorboard: bool = True
    find_unused_parameters: bool = True
    deterministic: bool = False
    progress: bool = True
    # GPU-shaped training: regional torch.compile of every model block (dynamic token counts), and
    # activation checkpointing per block (recompute in backward: less memory, about one more forward).
    compile: bool = False
    grad_checkpointing: bool = False


def resolve_schedule(cfg: Any, world_size: int) -> Any:
    """A stage's run length from epochs, at the real number of processes (in place; before the run starts).

    With ``cfg.epochs`` > 0: ``train_videos // total batch`` steps per epoch (total batch = ``data.batch_size`` x
    ``train.grad_accum`` x ``world_size``), ``epochs`` of them, and, where the stage has ``warmup_epochs``, that many
    of warmup; the saved config records the resulting ``train.steps`` / ``optim.warmup_steps``. Otherwise
    ``train.steps`` stands.

    Raises:
        ConfigError: no length given (``train.steps`` and ``epochs`` both 0), or fewer videos than one total batch.
    """
    epochs = getattr(cfg, "epochs", 0)
    if epochs <= 0:
        if cfg.train.steps <= 0:
            raise ConfigError("the run needs train.steps > 0 or epochs > 0 (with train_videos)")
        return cfg
    if cfg.train_videos <= 0:
        raise ConfigError("epochs > 0 needs train_videos (videos per epoch) > 0")
    total = cfg.data.batch_size * cfg.train.grad_accum * world_size
    per_epoch = cfg.train_videos // total
    if per_epoch < 1:
        raise ConfigError(f"train_videos {cfg.train_videos} is less than one total batch of {total} videos")
    cfg.train.steps = int(round(epochs * per_epoch))
    if hasattr(cfg, "warmup_epochs"):
        cfg.optim.warmup_steps = int(round(cfg.warmup_epochs * per_epoch))
    logging.getLogger("fluxvit.train").info(
        "%g epochs of %d videos at total batch %d (%d processes): %d steps, %d warmup", epochs, cfg.train_videos,
        total, world_size, cfg.train.steps, cfg.optim.warmup_steps or round(cfg.optim.warmup_fraction * cfg.train.steps))
    return cfg


# ----------------------------------------------------------------------------------------------- presets
class PresetRegistry:
    """Named preset functions of one stage: ``@presets.register`` on ``def smoke() -> Config``."""

    def __init__(self, stage: str):
        self.stage = stage
        self._fns: dict[str, Callable[[], Any]] = {}

    def register(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        if fn.__name__ in self._fns:
            raise ValueError(f"{self.stage}: preset {fn.__name__!r} registered twice")
        self._fns[fn.__name__] = fn
        return fn

    def names(self) -> list[str]:
        return sorted(self._fns)

    def get(self, name: str) -> Any:
        if name not in self._fns:
            raise ConfigError(f"{self.stage}: unknown preset {name!r}; available: {', '.join(self.names())}")
        return self._fns[name]()


# --------------------------------------------------------------------------------------------- overrides
def parse_value(text: str, current: Any, hint: Any = None) -> Any:
    """Convert an override string to the type of the field it replaces.

    Booleans accept true/false/1/0/yes/no (never Python truthiness of a string); lists and tuples accept
    JSON (``[2048,1024]``) or comma-separated values; ``none``/``null`` gives None.
    """
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if isinstance(current, bool) or hint is bool:
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {text!r}")
    if isinstance(current, (list, tuple)) or typing.get_origin(hint) in (list, tuple):
        try:
            val = json.loads(text)
        except json.JSONDecodeError:
            val = [v for v in text.split(",") if v.strip()]
            elem = current[0] if current else None
            val = [parse_value(v, elem) if elem is not None else _auto(v) for v in val]
        if not isinstance(val, list):
            val = [val]
        return tuple(val) if isinstance(current, tuple) else val
    # The declared type wins over the current value's: ``rate: float = 0`` holds an int until overridden.
    if hint is float or (hint is not int and isinstance(current, float)):
        return float(text)
    if isinstance(current, int) or hint is int:
        return int(float(text)) if float(text).is_integer() else _bad(text, "an integer")
    if isinstance(current, str) or hint is str:
        return text
    return _auto(text)


def _bad(text: str, what: str):
    raise ValueError(f"{text!r} is not {what}")


def _auto(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _type_name(current: Any, hint: Any) -> str:
    if isinstance(current, bool) or hint is bool:
        return "a boolean (true/false)"
    if isinstance(current, (list, tuple)) or typing.get_origin(hint) in (list, tuple):
        return "a list"
    if isinstance(current, int) or hint is int:
        return "an integer"
    if isinstance(current, float) or hint is float:
        return "a float"
    return "a value"


def apply_overrides(cfg: Any, overrides: Sequence[str]) -> Any:
    """Apply ``key.sub=value`` strings to a nested dataclass config in place and return it.

    Raises:
        ConfigError: one line naming the key: an unknown section or field (with the valid names at that
        level), a value that cannot be read as the field's type, or an item without ``=``.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, text = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        obj = cfg
        for depth, name in enumerate(parts):
            where = ".".join(parts[:depth])
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"{key}: {where} is a value, not a config section")
            names = {f.name: f for f in dataclasses.fields(obj)}
            if name not in names:
                sections = sorted(n for n, f in names.items() if dataclasses.is_dataclass(getattr(obj, n)))
                fields_ = sorted(n for n in names if n not in sections)
                if depth == 0 and len(parts) > 1:
                    raise ConfigError(f"{key}: unknown config section {name!r}; sections: {', '.join(sections)}")
                valid = ", ".join(sorted(names)) if depth == 0 else ", ".join(fields_ + sections)
                raise ConfigError(f"{key}: unknown field {name!r}{' in ' + where if where else ''}; valid: {valid}")
            if depth == len(parts) - 1:
                current = getattr(obj, name)
                if dataclasses.is_dataclass(current):
                    raise ConfigError(f"{key}: is a config section; set one of its fields, e.g. {key}."
                                      f"{dataclasses.fields(current)[0].name}=...")
                hint = typing.get_type_hints(type(obj)).get(name)
                try:
                    value = parse_value(text, current, hint)
                except (ValueError, TypeError):
                    raise ConfigError(f"{key}: cannot read {text!r} as {_type_name(current, hint)}") from None
                setattr(obj, name, value)
            else:
                obj = getattr(obj, name)
    return cfg


# Fields a resumed run may change: they steer the run (its length, cadence, output, evaluation) without changing
# what a training step computes. ``train.steps`` takes effect through the schedule: the cosine is recomputed over
# the new total from the resumed step on. ``model.init`` has no effect on resume (the checkpoint's weights
# win). Entries ending in "." cover a whole section (the evaluation settings of stages 1-3).
RESUME_MAY_CHANGE = frozenset({
    "train.steps", "train.run_dir", "train.resume", "model.init", "model.init_strict", "train.log_every",
    "train.ckpt_every", "train.keep_last", "train.eval_every", "train.progress", "train.tensorboard",
    "train.max_bad_steps", "train.export_name", "data.num_workers", "eval.", "retrieval.", "eval_grid",
})


def _may_change(key: str) -> bool:
    return key in RESUME_MAY_CHANGE or any(p.endswith(".") and key.startswith(p) for p in RESUME_MAY_CHANGE)


def _leaves(cfg: Any, prefix: str = "") -> dict:
    """``{"optim.lr": 0.001, ...}``: every non-section field of a nested dataclass config, as JSON values."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out.update(_leaves(v, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = json.loads(json.dumps(v, default=str))
    return out


_MISSING = object()


def _lookup(d: dict, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return _MISSING
        d = d[part]
    return d


def check_resume_config(cfg: Any, ckpt_dir: str | Path) -> list[str]:
    """The rule for hyperparameters on resume: a resumed run continues the checkpoint's run, so every field
    outside ``RESUME_MAY_CHANGE`` must equal the checkpoint's ``config.json``; those inside take effect.

    Args:
        cfg: the stage config the run was started with.
        ckpt_dir: the checkpoint being resumed.

    Returns:
        the run-control fields that changed (each also logged), e.g. ``["train.steps: 60 -> 80"]``.

    Raises:
        ConfigError: one line naming each changed hyperparameter with the checkpoint's and the new value.
    """
    path = Path(ckpt_dir) / "config.json"
    if not path.is_file():
        return []
    saved = json.loads(path.read_text())
    changed, allowed = [], []
    for key, value in _leaves(cfg).items():
        before = _lookup(saved, key)
        if before is not _MISSING and before != value:  # a field added to the code since is not a change
            (allowed if _may_change(key) else changed).append(f"{key}: {before!r} -> {value!r}")
    if changed:
        raise ConfigError(
            f"resume from {ckpt_dir}: a resumed run keeps its checkpoint's hyperparameters, but "
            f"{'; '.join(changed[:6])}{' ...' if len(changed) > 6 else ''} changed; drop the override(s) or start "
            f"a new run directory with model.init=<an export>")
    for item in allowed:
        if not item.startswith("train.resume"):
            logging.getLogger("fluxvit.train").info("resume: %s (takes effect)", item)
    return allowed


def config_to_dict(cfg: Any) -> dict:
    """Plain-dict view of a (nested) dataclass config, tuples as lists."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def save_config(cfg: Any, run_dir: str | Path, name: str = "config") -> Path:
    """Write the resolved config as ``name.json`` and ``name.yaml`` into ``run_dir``; returns the JSON path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = config_to_dict(cfg)
    path = run_dir / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    try:
        import yaml

        (run_dir / f"{name}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    except ImportError:  # pyyaml is a core dependency; JSON alone is enough to rebuild the config
        pass
    return path
