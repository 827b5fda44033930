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

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
from torch import nn

from .checkpoint import CheckpointManager, clean_leftovers
from .config import ConfigError, OptimConfig, TrainConfig, check_resume_config, config_to_dict, save_config
from .optim import ModelEMA, build_optimizer, build_scheduler, warmup_steps
from .runtime import MetricLogger, truncate_metrics
from .validate import check_config, warn_conflicts

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
        config: the stage config (dataclass with ``train: TrainConfig`` and ``optim: OptimConfig``; its
            ``model.init``, when it has a ``model`` section, is loaded before training and on resume).
        task: the stage task (trainable module + loss).
        source: the batch source of this rank.
        accelerator: from ``runtime.build_accelerator``.
    """
    tcfg: TrainConfig = config.train
    ocfg: OptimConfig = config.optim
    acc = accelerator
    check_config(config)  # also for configs built in code, not through resolve_config
    _check_step_setup(tcfg, acc)
    if acc.is_main_process:
        warn_conflicts(config, tcfg.steps, warmup_steps(ocfg, tcfg.steps))
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

    init = config.model.init if hasattr(config, "model") else ""
    if init:  # also on resume: a previous stage's export can define the architecture
        task.load_init(init)
    task.to_device(acc.device)
    _apply_model_options(task, tcfg)
    # A task may supply its own parameter groups (e.g. stage 3's layer-wise lr decay).
    build = getattr(task, "build_optimizer", None)
    optimizer = build(ocfg) if callable(build) else build_optimizer(task.model, ocfg)
    scheduler = build_scheduler(optimizer, ocfg, tcfg.steps)
    # A task that knows every parameter gets a gradient each step says so (``find_unused_parameters = False``):
    # DDP then skips the search for unused parameters, and its warning that it found none.
    if getattr(task, "find_unused_parameters", None) is False and getattr(acc, "ddp_handler", None) is not None:
        acc.ddp_handler.find_unused_parameters = False
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
        _evaluate(task, model, 0, logger, result, acc)

    batches = source.batches(state["data_position"])
    model.train()
    step = start
    pending: list = []  # logged rows of steps not yet read back from the device (read at log time)
    try:
        while step < tcfg.steps:
            t0 = time.perf_counter()
            out_terms, tokens, finite = _train_step(task, model, optimizer, batches, state, step, acc, tcfg, ocfg)
            step += 1
            if finite:
                scheduler.step()
                state["bad_in_a_row"] = 0
                if ema is not None:
                    ema.update(acc.unwrap_model(model))
            else:
                state["skipped_steps"] += 1
                state["bad_in_a_row"] += 1
                log.warning("step %d: non-finite loss or gradient norm, step skipped (%d in a row)", step,
                            state["bad_in_a_row"])
                if state["bad_in_a_row"] >= tcfg.max_bad_steps:
                    raise NonFiniteLossError(
                        f"{state['bad_in_a_row']} consecutive steps had a NaN/inf loss (last at step {step}); "
                        f"stopping. Lower optim.lr, enable clipping (optim.clip_grad) or check the data.")
            dt = time.perf_counter() - t0
            state["step"] = step
            state["tokens"] += tokens
            pending.append((step, out_terms, dict(
                lr=scheduler.get_last_lr()[0], tok_s=tokens * acc.num_processes / max(dt, 1e-9),
                skipped_steps=state["skipped_steps"], skipped_samples=getattr(source, "skipped", 0))))
            evaluate = tcfg.eval_every and step % tcfg.eval_every == 0 and step < tcfg.steps
            save = tcfg.ckpt_every and step % tcfg.ckpt_every == 0 and step < tcfg.steps
            if step % logger.log_every == 0 or step == 1 or step == tcfg.steps or evaluate or save:
                _flush_logs(acc, pending, logger, result)
            if evaluate:
                _evaluate(task, model, step, logger, result, acc)
            if save:
                ckpt.save(step, _public(state), resolved)
        # The final evaluation precedes the final checkpoint, as periodic ones do: metrics.jsonl up to a
        # checkpoint's step is complete, so a resume never records a step or an evaluation twice.
        if tcfg.eval_every and step > start:
            _evaluate(task, model, step, logger, result, acc)
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


def _apply_model_options(task: TrainTask, tcfg: TrainConfig) -> None:
    """``train.grad_checkpointing`` on every submodule of the trainable ``task.model`` that offers timm's
    ``set_grad_checkpointing``; ``train.compile``: ``compile_blocks`` (regional compilation) on those and on
    the task's frozen modules (a teacher runs under no_grad, so checkpointing it would save nothing)."""
    frozen = [m for m in vars(task).values() if isinstance(m, nn.Module) and m is not task.model]
    for root, trainable in [(task.model, True)] + [(m, False) for m in frozen]:
        for m in root.modules():
            if trainable and tcfg.grad_checkpointing and callable(getattr(m, "set_grad_checkpointing", None)):
                m.set_grad_checkpointing(True)
            if tcfg.compile and callable(getattr(m, "compile_blocks", None)):
                m.compile_blocks()
    if tcfg.compile or tcfg.grad_checkpointing:
        log.info("model options: compile=%s grad_checkpointing=%s", tcfg.compile, tcfg.grad_checkpointing)


def _check_step_setup(tcfg: TrainConfig, acc) -> None:
    """Refuse what the step body cannot do reliably (one line, at start)."""
    if acc.distributed_type.value == "DEEPSPEED" and tcfg.grad_accum > 1:
        raise ConfigError(  # a ValueError the command line prints as one line (exit 2)
            f"train.grad_accum={tcfg.grad_accum} under DeepSpeed is refused: DeepSpeed steps its optimizer "
            f"inside backward, so a step with a non-finite micro-batch cannot be skipped whole; use "
            f"train.grad_accum=1 with a larger data.batch_size, or a DDP launch config")


def _train_step(task: TrainTask, model, optimizer, batches, state: dict, step: int, acc, tcfg: TrainConfig,
                ocfg: OptimConfig):
    """One optimizer step over ``tcfg.grad_accum`` micro-batches with at most one host-device sync.

    Every micro-batch runs its backward pass; whether the losses (and the clipped gradient norm) were finite
    on every rank is kept on the device and read once, before ``optimizer.step()`` (as ``GradScaler`` does),
    so a non-finite micro-batch skips the whole step on every rank alike. Under DeepSpeed (which steps inside
    backward, grad_accum is 1 there) the flag is read before the backward pass instead.

    Returns (logged terms as detached tensors / floats averaged over micro-batches, tokens, finite).
    """
    deepspeed = acc.distributed_type.value == "DEEPSPEED"
    terms: dict = {}
    tokens, bad, finite = 0, None, True
    for _ in range(tcfg.grad_accum):
        batch = next(batches)
        state["data_position"] += 1
        with acc.accumulate(model):
            out = task.compute_loss(model, batch, step)
            nonfinite = (~torch.isfinite(out.loss.detach())).float()
            bad = nonfinite if bad is None else bad + nonfinite
            if deepspeed:
                finite = _all_ranks_finite(acc, bad)
                if finite:
                    acc.backward(out.loss)
            else:
                acc.backward(out.loss)
        tokens += out.tokens
        for k, v in out.terms.items():
            v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
            terms[k] = terms.get(k, 0.0) + v / tcfg.grad_accum
    if not deepspeed:
        # The last micro-batch's backward has synchronised the gradients (acc.sync_gradients is True). The norm is
        # taken with clipping off too (an infinite bound scales nothing): a finite loss can still have a NaN
        # gradient, and only the norm shows it.
        norm = acc.clip_grad_norm_(model.parameters(), ocfg.clip_grad if ocfg.clip_grad > 0 else float("inf"))
        finite = _all_ranks_finite(acc, bad, norm)
        if finite:
            optimizer.step()
        else:
            _skip_scaled_step(acc)
    optimizer.zero_grad(set_to_none=True)
    return terms, tokens, finite


def _skip_scaled_step(acc) -> None:
    """fp16 (a ``GradScaler``): a skipped step runs neither the scaler's ``step`` nor its ``update``, so its
    per-step state (gradients already unscaled by clipping) would make the next step's ``unscale_`` fail.
    Close the step as an overflow does: back the scale off and reset that state."""
    scaler = getattr(acc, "scaler", None)
    if scaler is not None and scaler.is_enabled():
        scaler.update(scaler.get_scale() * scaler.get_backoff_factor())


def _all_ranks_finite(acc, bad: torch.Tensor, norm: torch.Tensor | None = None) -> bool:
    """True when no rank saw a non-finite loss (``bad`` counts them) or gradient norm: one all-reduce (a
    collective, no host wait) and one read back, the step's single synchronisation. Every rank gets the same
    answer, so DDP/DeepSpeed collectives stay in step."""
    flag = bad.to(acc.device)
    if norm is not None:
        flag = flag + (~torch.isfinite(norm.detach())).float().to(acc.device)
    if acc.num_processes > 1:
        flag = acc.reduce(flag, reduction="sum")
    return flag.item() == 0


def _public(state: dict) -> dict:
    return {k: v for k, v in state.items() if k != "step"}


def _f(v):
    return v.item() if isinstance(v, torch.Tensor) else v


def _flush_logs(acc, pending: list, logger: MetricLogger, result: TrainResult) -> None:
    """Read the buffered steps' loss terms back (one all-reduce mean over ranks, one read for all steps) and
    log each step's row. Called at log time, before evaluations and checkpoints, and at the end, so every step
    up to a checkpoint is recorded; a crash loses only rows after the last checkpoint, which a resume redoes.
    The progress bar therefore advances in jumps of ``train.log_every`` steps."""
    if not pending:
        return
    slots = [(i, k) for i, (_, terms, _) in enumerate(pending) for k in sorted(terms)
             if isinstance(terms[k], torch.Tensor)]
    values: list = []
    if slots:
        vec = torch.stack([pending[i][1][k].to(acc.device, torch.float64).reshape(()) for i, k in slots])
        if acc.num_processes > 1:
            vec = acc.reduce(vec, reduction="mean")
        values = vec.tolist()
    read = dict(zip(slots, values))
    for i, (step, terms, host) in enumerate(pending):
        scalars = {k: read[(i, k)] if (i, k) in read else v for k, v in sorted(terms.items())}
        scalars.update(host)
        logger.log(step, scalars)
        if acc.is_main_process:
            result.history.append({"step": step, **{k: _f(v) for k, v in scalars.items()}})
    pending.clear()


def _evaluate(task: TrainTask, model: nn.Module, step: int, logger: MetricLogger, result: TrainResult,
              acc=None) -> None:
    fn = getattr(task, "evaluate", None)
    if fn is None:
        return
    model.eval()
    # Tasks evaluate through the unwrapped module (no DDP hooks), which bypasses the autocast accelerate wraps
    # around the prepared model's forward: evaluate under the run's mixed precision explicitly.
    with acc.autocast() if acc is not None else contextlib.nullcontext():
        metrics = fn(model, step)
    model.train()
    if metrics:
        logger.log(step, metrics, kind="eval")
        result.evals.append((step, metrics))
