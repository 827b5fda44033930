"""Process setup: the accelerate ``Accelerator``, seeding, rank-0 logging and metric sinks.

One process per device under ``accelerate launch`` (DDP over NCCL on GPUs, gloo on CPU with
``ACCELERATE_USE_CPU=1 ... --multi_gpu``), or a single process when a stage's ``main()`` is called
directly. bf16 autocast is used only on CUDA.
"""
from __future__ import annotations

import json
import logging
import os
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import TrainConfig

__all__ = ["MetricLogger", "build_accelerator", "resolve_mixed_precision", "seed_everything", "setup_logging",
           "require_deepspeed"]

log = logging.getLogger("fluxvit.train")


def require_deepspeed():
    """Import deepspeed or raise with an install hint (it is an optional dependency)."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as err:
        raise ImportError("this launch config uses DeepSpeed, which is not installed: "
                          "pip install 'fluxvit[deepspeed]' (or pip install deepspeed)") from err
    return deepspeed


def resolve_mixed_precision(value: str) -> str:
    """"auto" -> "bf16" when CUDA is available, else "no"; "bf16" on a machine without CUDA falls back to
    "no" (bf16 autocast is a GPU path here)."""
    value = (value or "auto").lower()
    if value not in ("auto", "no", "bf16", "fp16"):
        raise ValueError(f"mixed_precision must be auto, no, bf16 or fp16, got {value!r}")
    cuda = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true")
    if value == "auto":
        return "bf16" if cuda else "no"
    if value in ("bf16", "fp16") and not cuda:
        log.warning("mixed_precision=%s requested without CUDA; running in fp32", value)
        return "no"
    return value


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_accelerator(cfg: TrainConfig, micro_batch_size: int, clip_grad: float):
    """An ``Accelerator`` for ``cfg``; fills DeepSpeed's "auto" batch/clipping fields when the launch config
    selected DeepSpeed (batch sizes and clipping are hyperparameters, so they live in the stage config,
    not in ``launch/``)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    handlers = [DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters)]
    acc = Accelerator(mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
                      gradient_accumulation_steps=cfg.grad_accum, kwargs_handlers=handlers,
                      step_scheduler_with_optimizer=False)
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if plugin is not None:
        require_deepspeed()
        ds = plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = micro_batch_size
        ds["gradient_accumulation_steps"] = cfg.grad_accum
        ds["train_batch_size"] = micro_batch_size * cfg.grad_accum * acc.num_processes
        if ds.get("gradient_clipping", "auto") == "auto":
            ds["gradient_clipping"] = clip_grad if clip_grad > 0 else 0.0
        ds.setdefault("steps_per_print", 10**9)
    return acc


def setup_logging(is_main: bool) -> None:
    """Console logging: INFO on the main process, warnings only elsewhere."""
    level = logging.INFO if is_main else logging.WARNING
    root = logging.getLogger("fluxvit")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(level)


class MetricLogger:
    """Rank-0 sinks: a tqdm progress bar, periodic log lines, TensorBoard scalars and ``metrics.jsonl``.

    On other ranks every method is a no-op (the null tracker).
    """

    def __init__(self, run_dir: str | Path, enabled: bool, total: int, initial: int = 0,
                 tensorboard: bool = True, progress: bool = True, log_every: int = 10):
        self.enabled = enabled
        self.log_every = max(1, log_every)
        self.bar = self.writer = self.jsonl = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tb"))
            except ImportError:  # tensorboard is a core dependency; keep training without it
                log.warning("tensorboard not installed; scalars go to metrics.jsonl only")
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, desc="train", file=sys.stderr)

    def log(self, step: int, scalars: dict[str, Any], kind: str = "train") -> None:
        """Record scalars of optimizer step ``step`` (1-based)."""
        if not self.enabled:
            return
        row = {"step": step, "kind": kind, **{k: _num(v) for k, v in scalars.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for k, v in row.items():
                if k not in ("step", "kind") and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"{kind}/{k}", v, step)
        if kind != "train":
            log.info("%s step %d: %s", kind, step, _fmt(scalars))
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(_fmt(scalars), refresh=False)
        # Every log_every-th step, and the first (so a run without a bar shows it started).
        if step % self.log_every == 0 or step == 1:
            log.info("step %d: %s", step, _fmt(scalars))

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        self.jsonl.close()


def _num(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item()
    return v


def _fmt(scalars: dict) -> str:
    parts = []
    for k, v in scalars.items():
        v = _num(v)
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)
