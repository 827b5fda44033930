"""The training loop every stage runs: written once, driven by a stage's task and batch source.

A stage supplies
  * a ``TrainTask``: the trainable module (student plus stage-side heads), frozen parts (teacher, text
    tower), ``compute_loss(model, batch, step) -> StepOutput`` (a dict of loss terms), optional ``evaluate``,
    ``export`` and ``load_init``;
  * a ``BatchSource``: ``batches(start)`` yields this rank's micro-batches from micro-batch ``start`` on
    (the saved data position), so resume continues the exact sample stream.

``fit`` then does: accelerate prepare (DDP / DeepSpeed), AdamW with decay groups, cosine schedule with
warmup, gradient accumulation and clipping, optional EMA, non-finite loss skipping, rank-0 progress and
metrics, periodic atomic checkpoints, exact resume, and the final export.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
from torch import nn

from .checkpoint import CheckpointManager, clean_leftovers
from .config import OptimConfig, TrainConfig, check_resume_config, config_to_dict, save_config
from .optim import ModelEMA, build_optimizer, build_scheduler
from .runtime import MetricLogger, truncate_metrics

__all__ = ["BatchSource", "NonFiniteLossError", "StepOutput", "TrainResult", "TrainTask", "fit"]

log = logging.getLogger("fluxvit.train")


@dataclass
class StepOutput:
    """One micro-batch's result: ``loss`` (scalar with grad), detached ``terms`` for logging, and the number
    of student tokens processed (for tokens/s)."""

    loss: torch.Tensor
    terms: dict = field(default_factory=dict)
    tokens: int = 0


class TrainTask(Protocol):
    """What a stage provides to ``fit`` (see ``fluxvit.stages.distill.task.DistillTask``)."""

    model: nn.Module

    def to_device(self, device: torch.device) -> None: ...

    def compute_loss(self, model: nn.Module, batch: dict, step: int) -> StepOutput: ...

    def evaluate(self, model: nn.Module, step: int) -> dict: ...

    def export(self, model: nn.Module, path: Path) -> Path: ...

    def load_init(self, path: str) -> None: ...

    # Optional: ``build_optimizer(optim_cfg) -> torch.optim.Optimizer`` replaces the default AdamW decay
    # groups (e.g. stage 3's layer-wise lr decay).


class BatchSource(Protocol):
    """This rank's micro-batches: ``batches(start)`` resumes at micro-batch index ``start``."""

    def batches(self, start: int) -> Iterator[dict]: ...

    @property
    def skipped(self) -> int: ...


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a NaN or infinite loss."""


@dataclass
class TrainResult:
    """What ``fit`` returns on every rank."""

    run_dir: Path
    steps: int
    skipped_steps: int
    export_path: Path | None
    history: list = field(default_factory=list)  # per-step logged scalars (main process)
    evals: list = field(default_factory=list)  # (step, metrics) pairs


def fit(config: Any, task: TrainTask, source: BatchSource, accelerator) -> TrainResult:
    """Train ``task.model`` for ``config.train.steps`` optimizer steps.

    Args:
        config: the stage config (dataclass with ``train: TrainConfig`` and ``optim: OptimConfig``).
        task: the stage task (trainable module + loss).
        source: the batch source of this rank.
        accelerator: from ``runtime.build_accelerator``.
    """
    tcfg: TrainConfig = config.train
    ocfg: OptimConfig = config.optim
    acc = accelerator
    run_dir = Path(tcfg.run_dir)
    resolved = config_to_dict(config)
    ckpt = CheckpointManager(acc, run_dir, tcfg.keep_last)
    # Resume first: a checkpoint that is corrupt or whose hyperparameters differ stops the run before anything
    # in run_dir is rewritten. Leftovers of a killed save are removed by the main process.
    if acc.is_main_process:
        clean_leftovers(run_dir)
    acc.wait_for_everyone()
    path = ckpt.resolve(tcfg.resume)
    if path is not None:
        check_resume_config(config, path)
    if acc.is_main_process:
        save_config(config, run_dir)

    if tcfg.init_from:  # also on resume: a stage-1 export can define the architecture (stage 2)
        task.load_init(tcfg.init_from)
    task.to_device(acc.device)
    # A task may supply its own parameter groups (e.g. stage 3's layer-wise lr decay).
    build = getattr(task, "build_optimizer", None)
    optimizer = build(ocfg) if callable(build) else build_optimizer(task.model, ocfg)
    scheduler = build_scheduler(optimizer, ocfg, tcfg.steps)
    model, optimizer = acc.prepare(task.model, optimizer)
    acc.register_for_checkpointing(scheduler)
    ema = None
    if tcfg.ema_decay > 0:
        ema = ModelEMA(acc.unwrap_model(model), tcfg.ema_decay)
        acc.register_for_checkpointing(ema)

    state = {"step": 0, "data_position": 0, "skipped_steps": 0, "bad_in_a_row": 0, "tokens": 0}
    if path is not None:
        state.update(ckpt.load(path))
    state.update(world_size=acc.num_processes, distributed_type=str(acc.distributed_type.value))
    start = state["step"]
    if acc.is_main_process:
        # Rows logged after the checkpoint belong to steps that are about to be run again.
        truncate_metrics(run_dir / "metrics.jsonl", start)

    logger = MetricLogger(run_dir, acc.is_main_process, tcfg.steps, start, tcfg.tensorboard, tcfg.progress,
                          tcfg.log_every)
    result = TrainResult(run_dir, start, state["skipped_steps"], None)
    if tcfg.eval_every and start == 0:
        _evaluate(task, model, 0, logger, result)

    batches = source.batches(state["data_position"])
    model.train()
    step = start
    try:
        while step < tcfg.steps:
            t0 = time.perf_counter()
            sums: dict[str, float] = {}
            tokens, finite = 0, True
            for _ in range(tcfg.grad_accum):
                batch = next(batches)
                state["data_position"] += 1
                with acc.accumulate(model):
                    out = task.compute_loss(model, batch, step)
                    ok = torch.isfinite(out.loss.detach()).float()
                    # Every rank must agree, or DDP/DeepSpeed collectives would deadlock.
                    ok = acc.reduce(ok.to(acc.device), reduction="sum").item() == acc.num_processes
                    finite = finite and ok
                    if finite:
                        acc.backward(out.loss)
                        if acc.sync_gradients and ocfg.clip_grad > 0 and acc.distributed_type.value != "DEEPSPEED":
                            acc.clip_grad_norm_(model.parameters(), ocfg.clip_grad)
                        if acc.sync_gradients:
                            optimizer.step()
                    tokens += out.tokens
                    for k, v in out.terms.items():
                        sums[k] = sums.get(k, 0.0) + float(v) / tcfg.grad_accum
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if finite:
                scheduler.step()
                state["bad_in_a_row"] = 0
                if ema is not None:
                    ema.update(acc.unwrap_model(model))
            else:
                state["skipped_steps"] += 1
                state["bad_in_a_row"] += 1
                log.warning("step %d: non-finite loss, step skipped (%d in a row)", step, state["bad_in_a_row"])
                if state["bad_in_a_row"] >= tcfg.max_bad_steps:
                    raise NonFiniteLossError(
                        f"{state['bad_in_a_row']} consecutive steps had a NaN/inf loss (last at step {step}); "
                        f"stopping. Lower optim.lr, enable clipping (optim.clip_grad) or check the data.")
            dt = time.perf_counter() - t0
            state["step"] = step
            state["tokens"] += tokens
            scalars = _reduce_scalars(acc, sums)
            scalars.update(lr=scheduler.get_last_lr()[0], tok_s=tokens * acc.num_processes / max(dt, 1e-9),
                           skipped_steps=state["skipped_steps"], skipped_samples=getattr(source, "skipped", 0))
            logger.log(step, scalars)
            if acc.is_main_process:
                result.history.append({"step": step, **{k: _f(v) for k, v in scalars.items()}})
            if tcfg.eval_every and step % tcfg.eval_every == 0 and step < tcfg.steps:
                _evaluate(task, model, step, logger, result)
            if tcfg.ckpt_every and step % tcfg.ckpt_every == 0 and step < tcfg.steps:
                ckpt.save(step, _public(state), resolved)
        # The final evaluation precedes the final checkpoint, as periodic ones do: metrics.jsonl up to a
        # checkpoint's step is complete, so a resume never records a step or an evaluation twice.
        if tcfg.eval_every and step > start:
            _evaluate(task, model, step, logger, result)
        ckpt.save(step, _public(state), resolved)
        export_model = ema.module if ema is not None else acc.unwrap_model(model)
        if acc.is_main_process:
            result.export_path = task.export(export_model, run_dir / tcfg.export_name)
            log.info("exported student to %s", result.export_path)
        acc.wait_for_everyone()
    finally:
        logger.close()
    result.steps = step
    result.skipped_steps = state["skipped_steps"]
    return result


def _public(state: dict) -> dict:
    return {k: v for k, v in state.items() if k != "step"}


def _f(v):
    return v.item() if isinstance(v, torch.Tensor) else v


def _reduce_scalars(acc, sums: dict) -> dict:
    """Mean of each loss term over ranks (one all-reduce for all terms)."""
    if not sums:
        return {}
    keys = sorted(sums)
    vec = torch.tensor([sums[k] for k in keys], device=acc.device, dtype=torch.float64)
    if acc.num_processes > 1:
        vec = acc.reduce(vec, reduction="mean")
    return {k: float(v) for k, v in zip(keys, vec.tolist())}


def _evaluate(task: TrainTask, model: nn.Module, step: int, logger: MetricLogger, result: TrainResult) -> None:
    fn = getattr(task, "evaluate", None)
    if fn is None:
        return
    model.eval()
    metrics = fn(model, step)
    model.train()
    if metrics:
        logger.log(step, metrics, kind="eval")
        result.evals.append((step, metrics))
