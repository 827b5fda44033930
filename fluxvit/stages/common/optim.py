"""AdamW with weight-decay groups (or layer-decayed, built by timm), the release's lr scaling, the
cosine-with-warmup schedule and an EMA of the weights."""
from __future__ import annotations

import copy
import logging
import math
from typing import Iterable

import torch
from torch import nn

from .config import OptimConfig

__all__ = ["ModelEMA", "build_optimizer", "cosine_lr", "layer_decay_optimizer", "param_groups", "build_scheduler",
           "peak_lr", "scale_lr", "warmup_steps"]

log = logging.getLogger("fluxvit.train")


def _no_decay_names(module: nn.Module) -> set:
    """Names of ``module``'s parameters listed by ``no_weight_decay()`` of it or any submodule."""
    names = set()
    for prefix, sub in module.named_modules():
        fn = getattr(sub, "no_weight_decay", None)
        if callable(fn):
            for n in fn():
                names.add(f"{prefix}.{n}" if prefix else n)
    return names


def param_groups(model: nn.Module, weight_decay: float, extra_no_decay: Iterable[str] = ()) -> list[dict]:
    """Two AdamW groups over the trainable parameters of ``model``.

    No decay: 1-D tensors (norm weights, biases, LayerScale, per-channel affines), any name ending in
    ``pos_embed``/``cls_token``/``positional_embedding``/``class_embedding``, and the names a submodule lists in
    ``no_weight_decay()`` (timm convention). Everything else (matrices, conv kernels) decays.
    """
    skip = _no_decay_names(model) | set(extra_no_decay)
    keywords = ("pos_embed", "cls_token", "positional_embedding", "class_embedding")
    decay, no_decay = [], []
    decay_names, no_decay_names = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name in skip or name.endswith(".bias") or any(name.endswith(k) for k in keywords):
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    return [
        {"params": decay, "weight_decay": weight_decay, "names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names},
    ]


def layer_decay_optimizer(model: nn.Module, cfg: OptimConfig, layer_decay: float, lr: float) -> torch.optim.AdamW:
    """AdamW with layer-wise lr decay, built by timm: ``timm.optim.create_optimizer_v2(model, "adamw",
    layer_decay=...)``.

    The layers come from ``model.group_matcher()`` (the zoo's models and ``FinetuneModel`` give the release's layer
    ids), the no-decay set from 1-D tensors plus ``model.no_weight_decay()``. Group ``k`` gets ``lr_scale =
    layer_decay ** (L - id)`` with L the largest id (the heads). timm's own schedulers multiply by ``lr_scale`` at
    every step; the project's ``build_scheduler`` scales each group's own peak instead, so the peak
    ``lr * lr_scale`` is written into each group here, once.

    Returns:
        ``torch.optim.AdamW`` whose groups carry ``lr`` (= lr * lr_scale), ``lr_scale`` and ``weight_decay``.
    """
    from timm.optim import create_optimizer_v2

    if not hasattr(model, "group_matcher"):
        raise TypeError(f"{type(model).__name__} has no group_matcher(): layer decay needs the model's layer ids")
    optimizer = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=cfg.weight_decay, layer_decay=layer_decay,
                                    betas=tuple(cfg.betas), eps=cfg.eps)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    return optimizer


def scale_lr(value: float, batch_per_process: int, grad_accum: int, world_size: int, num_sample: int = 1,
             per: int = 256) -> float:
    """The release's linear scaling: ``value * total_batch * num_sample / per`` with total_batch = videos per
    process x grad accumulation x processes and ``num_sample`` the repeated-augmentation copies of each video
    (``run_flexible_finetune.py``: lr, min_lr and warmup_lr alike; 64 GPUs x 8 x 2 at 2e-4 -> 8e-4)."""
    return value * batch_per_process * grad_accum * world_size * num_sample / per


def peak_lr(cfg: OptimConfig, scale: bool, batch_per_process: int, grad_accum: int, world_size: int,
            num_sample: int = 1, per: int = 256) -> float:
    """The optimizer's peak lr: ``cfg.lr``, or with ``scale`` the official engines' rule ``scale_lr`` (InternVideo2
    ``run_distill.py``, UMT ``run_umt_pretraining.py``, FluxViT ``run_flexible_finetune.py``); min and warmup lr
    follow through the schedule's ratios to ``cfg.lr``. Logs the per-``per`` and the scaled values."""
    if not scale:
        return cfg.lr
    lr = scale_lr(cfg.lr, batch_per_process, grad_accum, world_size, num_sample, per)
    factor = lr / cfg.lr if cfg.lr else 0.0
    log.info("lr %.3g / min %.3g / warmup %.3g per %d clips -> %.3g / %.3g / %.3g at total batch %d x %d samples",
             cfg.lr, cfg.min_lr, cfg.warmup_lr, per, lr, cfg.min_lr * factor, cfg.warmup_lr * factor,
             batch_per_process * grad_accum * world_size, num_sample)
    return lr


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float | None = None) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over ``param_groups(model, cfg.weight_decay)`` at ``lr`` (default ``cfg.lr``; a torch
    optimizer, so DeepSpeed needs no compiled fused Adam)."""
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(model, cfg.weight_decay)]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr if lr is None else lr, betas=tuple(cfg.betas), eps=cfg.eps)


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    """Warmup length in steps: ``warmup_steps`` if set, else ``warmup_fraction * total_steps``."""
    return cfg.warmup_steps if cfg.warmup_steps > 0 else int(round(cfg.warmup_fraction * total_steps))


def cosine_lr(step: int, total_steps: int, warmup: int, lr: float, min_lr: float, warmup_lr: float = 0.0,
              floor: bool = False) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup over ``warmup`` steps, from ``warmup_lr``
    at step 0 to ``lr`` at step ``warmup - 1`` (the release's ``np.linspace``; ``warmup_lr`` 0: from
    ``lr / warmup``), then a half cosine from ``lr`` down to ``min_lr`` at ``total_steps``.

    ``floor``: the multi-modality scheduler of InternVideo2 and UMT (``get_cosine_schedule_with_warmup``) instead:
    ``lr * max(min_lr / lr, step / warmup)`` during warmup, then ``lr * max(min_lr / lr, 0.5 * (1 + cos(pi * p)))``
    with p the progress after warmup (a cosine to 0, held at ``min_lr``); ``warmup_lr`` is not used."""
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    if floor:
        ratio = step / max(1, warmup) if step < warmup else 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(min_lr, lr * ratio)
    if warmup > 0 and step < warmup:
        if warmup_lr > 0:
            return warmup_lr + (lr - warmup_lr) * step / max(1, warmup - 1)
        return lr * (step + 1) / warmup
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


SCHEDULES = ("cosine", "cosine_floor")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """A ``LambdaLR`` following ``cosine_lr`` (``cfg.schedule``); call ``.step()`` once per optimizer step."""
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
    warm = warmup_steps(cfg, total_steps)
    base = cfg.lr
    floor = cfg.schedule == "cosine_floor"

    def factor(step: int) -> float:
        # A ratio to the peak: groups keep their own (scaled, layer-decayed) peak lr, and min / warmup lr scale
        # with it.
        return cosine_lr(step, total_steps, warm, base, cfg.min_lr, cfg.warmup_lr, floor) / base if base > 0 else 0.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class ModelEMA:
    """Exponential moving average of a module's floating-point state: ``ema = d * ema + (1 - d) * w``.

    Holds a detached fp32 copy (same device; fp32 also when the model runs in bf16, as under DeepSpeed bf16,
    where an update of (1 - d) * w would round away); ``state_dict``/``load_state_dict`` make it checkpointable
    with ``accelerator.register_for_checkpointing``. Why not timm's ``ModelEmaV3``: it keeps the average in the
    model's dtype and lerps tensors of one dtype, so a bf16 model's average would round the small updates away.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).float().eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend the current weights of ``model`` (same architecture) into the average."""
        for ema_v, v in zip(self.module.state_dict().values(), model.state_dict().values()):
            if ema_v.dtype.is_floating_point:
                ema_v.lerp_(v.detach().to(ema_v.dtype), 1.0 - self.decay)
            else:
                ema_v.copy_(v)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
