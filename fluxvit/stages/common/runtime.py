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
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import TrainConfig

__all__ = ["DistributedMismatchError", "MetricLogger", "append_metrics", "build_accelerator", "check_distributed",
           "expected_distributed_types", "quiet_third_party", "read_metrics", "require_deepspeed",
           "resolve_mixed_precision", "seed_everything", "setup_logging", "truncate_metrics"]

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


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def quiet_third_party(progress: bool = True) -> None:
    """Silence library noise that says nothing about the run.

    * DeepSpeed logs "Setting accelerator to CPU" whenever it is first imported without a GPU (accelerate imports
      it in ``unwrap_model``, i.e. at every export): naming the CPU accelerator explicitly skips the detection.
    * DDP's "find_unused_parameters=True was specified ... but did not find any unused parameters" warning:
      the stages keep the flag on because a step may leave a budget's pooling head unused.
    * DeepSpeed's use of the deprecated ``all_gather_into_tensor`` name (a FutureWarning per rank).
    * With ``progress`` off, the Hugging Face "Loading weights" bars of text towers are disabled too.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", message="find_unused_parameters=True was specified in DDP constructor")
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    if not progress:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        # Modules imported already read the variable at import time: switch them off directly.
        if "huggingface_hub" in sys.modules:
            sys.modules["huggingface_hub"].utils.disable_progress_bars()
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()


class DistributedMismatchError(RuntimeError):
    """The process group the run got is not the one its launch config asked for."""


def expected_distributed_types(env: dict | None = None) -> tuple[set[str], int]:
    """What ``accelerate launch`` asked for, read from the environment it gives every process.

    Returns:
        (acceptable ``DistributedType`` values, expected world size). DeepSpeed configs export
        ``ACCELERATE_USE_DEEPSPEED``; multi-process launches export ``WORLD_SIZE``; a plain ``python -m`` run
        has neither and expects one process.
    """
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if str(env.get("ACCELERATE_USE_DEEPSPEED", "")).lower() == "true":
        return {"DEEPSPEED"}, world
    if str(env.get("ACCELERATE_USE_FSDP", "")).lower() == "true":
        return {"FSDP"}, world
    if world > 1:
        return {"MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_HPU"}, world
    return {"NO"}, 1


def check_distributed(acc, env: dict | None = None) -> None:
    """Stop at start when the accelerator's distributed type or world size differs from the launch config's.

    Raises:
        DistributedMismatchError: one line saying what was asked for, what was got, and the usual cause.
    """
    want, world = expected_distributed_types(env)
    got = acc.distributed_type.value
    if got in want and acc.num_processes == world:
        return
    hint = ""
    if "DEEPSPEED" in want and got != "DEEPSPEED":
        hint = ("; ACCELERATE_USE_CPU=1 / use_cpu: true make accelerate drop DeepSpeed, use "
                "launch/deepspeed_zero2_cpu.yaml for DeepSpeed on CPU")
    elif acc.num_processes != world:
        hint = "; on CPU, multi-process needs launch/cpu_ddp2.yaml (MULTI_GPU with use_cpu)"
    raise DistributedMismatchError(
        f"launch config asked for {'/'.join(sorted(want))} on {world} process(es) but this run got {got} on "
        f"{acc.num_processes}{hint}")


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
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    quiet_third_party(cfg.progress)

    handlers = [DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters)]
    if (_env_true("ACCELERATE_USE_DEEPSPEED") and int(os.environ.get("WORLD_SIZE", "1")) > 1
            and not torch.cuda.is_available() and not _env_true("ACCELERATE_USE_CPU")):
        # DeepSpeed on CPU: accelerate finds no GPU backend and would report world size 1 on every rank while
        # DeepSpeed initialises the real group; naming gloo makes both agree (launch/deepspeed_zero2_cpu.yaml).
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
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
    """Console logging of the ``fluxvit`` loggers: INFO on the main process, warnings only elsewhere.

    The handler goes on the root logger when it has none, so a library that later logs through the root logger
    (open_clip calls ``logging.info``, which runs ``basicConfig`` on a handler-less root) adds no second handler
    and no line is printed twice. When the root logger is configured already, records propagate to it.
    """
    level = logging.INFO if is_main else logging.WARNING
    logging.getLogger("fluxvit").setLevel(level)
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a ``metrics.jsonl`` (an unparsable last line, cut by a kill, is dropped)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def truncate_metrics(path: str | Path, step: int) -> int:
    """Keep the rows of steps <= ``step`` in ``metrics.jsonl`` (rewritten atomically); returns rows dropped.

    Called on resume from the checkpoint of ``step``: rows after it were logged by the interrupted run and are
    logged again by the resumed one, so every step appears once.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    rows = read_metrics(path)
    keep = [r for r in rows if r.get("step", 0) <= step]
    if len(keep) == len(lines):
        return 0
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, path)
    return len(rows) - len(keep)


def append_metrics(run_dir: str | Path, step: int, scalars: dict[str, Any], kind: str = "eval") -> None:
    """Append one row to ``run_dir/metrics.jsonl`` (e.g. an evaluation run after ``fit`` returned)."""
    with open(Path(run_dir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "kind": kind, **{k: _num(v) for k, v in scalars.items()}}) + "\n")


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

                # purge_step drops events a killed run wrote after the checkpoint being resumed.
                self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=initial + 1 if initial else None)
            except ImportError:  # tensorboard is a core dependency; keep training without it
                log.warning("tensorboard not installed; scalars go to metrics.jsonl only")
        # A bar only on a terminal: redirected to a file, carriage-return redraws are noise; log lines remain.
        if progress and sys.stderr.isatty():
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
            # Postfix first, then the update that redraws: the bar shows step n with step n's scalars.
            self.bar.set_postfix_str(_fmt(scalars), refresh=False)
            self.bar.update(1)
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
