"""Stage 3 task: FluxViT classification finetuning with Flux-Multi (FluxViT paper, arXiv 2503.14237).

One step on a batch of clips (B, 3, T, H, W) (or a list of B clips) with labels (B,), already augmented per clip by
the data path (``fluxvit.datasets.augment``: RandAugment, crop, flip, random erasing, repeated augmentation):
  1. batch Mixup / CutMix with label smoothing -> soft targets (B, C) (``loss.build_mixup``, timm);
  2. Flux-Multi: ONE packed forward runs every clip at each budget K_j (default 3072 / 2048 / 1024) with head j
     (``model.FinetuneModel``; views budget-major, view j*B + i = clip i at K_j);
  3. the loss terms of ``loss.flux_multi_loss``. Flux-Single: ``loss.single_budget`` / ``loss.single_head``, CE only.
The optimiser is timm's AdamW with layer decay over the release's layer ids (the zoo's ``group_matcher``) and the
release's lr scaling (``common.optim.layer_decay_optimizer`` / ``scale_lr``).
"""
from __future__ import annotations

import json
import logging
import math
import random
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn
from accelerate.utils import extract_model_from_parallel

from fluxvit.datasets.shards import shard_classes
from fluxvit.models import FluxViT, FluxViTConfig, create_model, load_official_checkpoint, read_state_dict, save_model
from fluxvit.models.checkpoint import read_model_config

from ..common.data import as_clips
from ..common.config import ConfigError, OptimConfig
from ..common.loop import StepOutput
from ..common.optim import layer_decay_optimizer, peak_lr
from .config import FinetuneConfig
from .loss import build_mixup, flux_multi_loss, smooth_targets
from .model import FinetuneModel, random_keep

__all__ = ["FinetuneTask", "check_labels", "map_classifier_rows"]

log = logging.getLogger("fluxvit.train")


def check_labels(labels: torch.Tensor, num_classes: int, keys=None) -> None:
    """Raise ``ConfigError`` naming the first sample whose label (B,) is >= ``num_classes`` (the model's head),
    ``ValueError`` when a label is negative (no label). One read of the (host) labels."""
    values = labels.tolist()
    if any(v < 0 for v in values):
        raise ValueError("stage 3 needs a class label for every clip (got -1: no cls / json label in the data)")
    bad = [i for i, v in enumerate(values) if v >= num_classes]
    if bad:
        i = bad[0]
        key = keys[i] if keys is not None and i < len(keys) else f"#{i} of the batch"
        raise ConfigError(f"model.num_classes={num_classes}, but sample {key!r} has label {values[i]} "
                          f"(labels must be in [0, {num_classes - 1}]); raise model.num_classes or fix the data")


# ------------------------------------------------------------------------------------------------ task
def map_classifier_rows(state: dict, class_map: str, num_classes: int) -> dict:
    """Classifier rows of a checkpoint re-ordered for another label set (K710 -> K400 in the release).

    Args:
        state: the checkpoint's tensors; every ``head.<k>.weight`` (C_src, D) / ``head.<k>.bias`` (C_src,) is mapped.
        class_map: JSON file with a list of ``num_classes`` source row indices (target class i <- source row map[i]),
            or ``"first"``: the first ``num_classes`` rows of every head that has more, as the release takes K400's
            400 classes from a K710 head (``run_flexible_finetune.py``; the slice implies K710's label list starts with K400's classes
            in K400's order); a checkpoint without a larger head is returned as it is.

    Returns:
        a new dict with the heads (num_classes, D) / (num_classes,).
    """
    if class_map == "first":
        return {name: value[:num_classes] if re.search(r"(^|\.)head\.\d+\.(weight|bias)$", name)
                and value.shape[0] > num_classes else value for name, value in state.items()}
    rows = json.loads(Path(class_map).read_text())
    if not isinstance(rows, list) or len(rows) != num_classes or not all(isinstance(r, int) for r in rows):
        raise ValueError(f"model.init_class_map {class_map}: expected a JSON list of {num_classes} row indices")
    index = torch.tensor(rows)
    out, mapped = dict(state), 0
    for name, value in state.items():
        if re.search(r"(^|\.)head\.\d+\.(weight|bias)$", name):
            if index.max() >= value.shape[0] or index.min() < 0:
                raise ValueError(f"model.init_class_map {class_map}: row {int(index.max())} outside {name}'s "
                                 f"{value.shape[0]} classes")
            out[name] = value[index]
            mapped += 1
    if not mapped:
        raise ValueError(f"model.init_class_map {class_map}: the checkpoint has no classifier head to map")
    return out


def build_classifier(m, init: str = "") -> FluxViT:
    """The stage-3 FluxViT: the architecture stored in ``init`` when it is a stage-1/2/3 export (so a student of
    another depth or width finetunes as it was trained), with ``model.overrides`` (e.g. ``head_budgets``),
    ``model.num_classes`` and ``model.drop_path_rate`` on top; else ``model.name`` with ``model.overrides``."""
    stored = read_model_config(init) if init else None
    if stored is None:
        return create_model(m.name, num_classes=m.num_classes, drop_path_rate=m.drop_path_rate, **m.overrides)
    stored.update(**dict(m.overrides), num_classes=m.num_classes, drop_path_rate=m.drop_path_rate)
    log.info("finetune: architecture of %s (depth %d, width %d) with model.overrides; model.name not used", init,
             stored.get("depth", 0), stored.get("embed_dim", 0))
    return FluxViT(FluxViTConfig(**stored))


class FinetuneTask:
    """FluxViT classifier, label mixing and the Flux-Multi / Flux-Single loss (the ``TrainTask`` of stage 3).

    Args:
        cfg: the stage config.
        rank: process index (seeds per-step randomness); world_size: processes (global batch for lr scaling).
    """

    def __init__(self, cfg: FinetuneConfig, rank: int = 0, world_size: int = 1):
        self.cfg, self.rank, self.world = cfg, rank, world_size
        m, lc = cfg.model, cfg.loss
        if lc.mode not in ("multi", "single"):
            raise ValueError(f"loss.mode must be 'multi' or 'single', got {lc.mode!r}")
        if lc.selection not in ("dynamic", "random"):
            raise ValueError(f"loss.selection must be 'dynamic' or 'random', got {lc.selection!r}")
        if len(lc.heads) != len(lc.budgets):
            raise ValueError(f"loss.heads {lc.heads} and loss.budgets {lc.budgets} differ in length")
        net = build_classifier(m, m.init)
        self.model = FinetuneModel(net)
        if any(int(b) < 0 for b in (*lc.budgets, lc.single_budget)):
            raise ValueError(f"loss.budgets must be >= 0 (0 = every token), got {lc.budgets}")
        # 0 = every token of the clip (no selection), as in eval.budgets.
        budgets, heads = (lc.budgets, lc.heads) if lc.mode == "multi" else ((lc.single_budget,), (lc.single_head,))
        self.budgets = [int(b) or None for b in budgets]
        self.heads = [int(h) for h in heads]
        if max(self.heads) >= len(net.clip_projector):
            raise ValueError(f"loss heads {self.heads} exceed the model's {len(net.clip_projector)} pooling heads")
        # The budgets are declared once (loss.budgets); the heads' nominal budgets, which evaluation uses to pick the
        # head nearest a view's token count, must agree with them.
        for b, h in zip(budgets, self.heads):
            if int(b) and net.config.head_budgets[h] != int(b):
                raise ConfigError(f"loss trains head {h} at {int(b)} tokens but the model's head_budgets "
                                  f"{tuple(net.config.head_budgets)} give head {h} {net.config.head_budgets[h]}: set "
                                  f"model.overrides.head_budgets (or loss.budgets / loss.heads) so that they agree")
        # Every parameter gets a gradient each step when the step uses every pooling head and classifier and, in
        # Flux-Multi, every alignment decoder: DDP then need not search for unused ones (and warns when asked to).
        n_dec = len(net.final_clip_decoder_for_projs)
        self.find_unused_parameters = not (set(self.heads) == set(range(len(net.clip_projector)))
                                           and (n_dec == 0 or (lc.mode == "multi" and len(self.budgets) - 1 >= n_dec)))
        a = cfg.aug
        self.mixer = build_mixup(a.mixup, a.cutmix, a.mix_prob, a.switch_prob, a.label_smoothing, m.num_classes)
        if self.mixer is not None and cfg.data.per_sample_grid:
            log.warning("data.per_sample_grid: clips of a batch differ in shape, so mixup / cutmix are skipped "
                        "(label smoothing %.2g still applies)", cfg.aug.label_smoothing)
        self.device = torch.device("cpu")
        log.info("finetune: %s (%.1f M params), Flux-%s budgets %s heads %s", m.name,
                 sum(p.numel() for p in net.parameters()) / 1e6, lc.mode.capitalize(), self.budgets, self.heads)

    # ------------------------------------------------------------------ TrainTask
    def to_device(self, device: torch.device) -> None:
        self.device = device

    def load_init(self, path: str) -> None:
        """Weights of a stage-1/2/3 export or an official FluxViT checkpoint. They must fit the model unless
        ``model.init_strict=false``; classifier heads of another class count keep their initialisation (reported),
        or, with ``model.init_class_map``, their rows are picked for this model's classes."""
        src = path
        if self.cfg.model.init_class_map:
            src = map_classifier_rows(read_state_dict(path), self.cfg.model.init_class_map, self.cfg.model.num_classes)
        load_official_checkpoint(self.model.net, src, strict=self.cfg.model.init_strict, classifier_may_differ=True)

    def peak_lr(self, ocfg: OptimConfig) -> float:
        """``optim.lr``, scaled as the release does with ``scale_lr``: x total batch x num_sample / lr_batch
        (min / warmup lr follow through the schedule's ratios)."""
        d, t = self.cfg.data, self.cfg.train
        return peak_lr(ocfg, self.cfg.scale_lr, d.batch_size, t.grad_accum, self.world, d.num_sample,
                       self.cfg.lr_batch)

    def build_optimizer(self, ocfg: OptimConfig) -> torch.optim.AdamW:
        """timm's AdamW with layer decay (the release's layer ids, ``layer_decay``) at ``peak_lr``."""
        return layer_decay_optimizer(self.model, ocfg, self.cfg.layer_decay, self.peak_lr(ocfg))

    def export(self, model: FinetuneModel, path: Path) -> Path:
        """The classifier alone, as safetensors that ``fluxvit.models.load_model`` rebuilds."""
        meta = {"stage": "finetune", "mode": self.cfg.loss.mode, "trained_heads": ",".join(map(str, self.heads))}
        names = shard_classes(self.cfg.data.shards) if self.cfg.data.source == "shards" and self.cfg.data.shards \
            else None
        if names is not None:  # the label map the classifier was trained with: evaluation checks its data by it
            meta["classes"] = json.dumps(names)
        return save_model(model.net, path, metadata=meta)

    # ------------------------------------------------------------------ loss
    def _seed(self, step: int) -> None:
        # Mixup, drop path and random selection draw from global RNGs seeded per (step, rank):
        # a resumed run repeats the exact randomness of the uninterrupted one.
        s = random.Random(f"{self.cfg.train.seed}-{step}-{self.rank}-ft").getrandbits(32)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)

    def targets(self, video, labels: torch.Tensor):
        """Mixup / cutmix (batch mode, needs an even batch) with label smoothing -> (video, (B, C) targets)."""
        C, sm = self.cfg.model.num_classes, self.cfg.aug.label_smoothing
        if self.mixer is not None and isinstance(video, torch.Tensor) and video.shape[0] % 2 == 0:
            B, c, T, H, W = video.shape
            flat = video.reshape(B, c * T, H, W)  # cutmix boxes span (H, W); every frame shares the box
            flat, target = self.mixer(flat, labels)
            return flat.reshape(B, c, T, H, W), target
        return video, smooth_targets(labels, C, sm)

    def keeps_for(self, video, generator: torch.Generator | None = None) -> list | None:
        """Random kept-token indices for every view (selection "random"), else None (the selector)."""
        if self.cfg.loss.selection != "random":
            return None
        p = self.model.net.config.patch_size
        clips = as_clips(video)
        return [random_keep((c.shape[1], c.shape[2] // p, c.shape[3] // p), b or math.inf, generator)
                for b in self.budgets for c in clips]

    def forward_loss(self, model: nn.Module, video, target: torch.Tensor) -> tuple[dict, int]:
        """Loss terms for one (augmented) batch: video (B, 3, T, H, W) or clips, target (B, C) or (B,)."""
        lc = self.cfg.loss
        logits, pooled, decoded, ntok = model(video, self.budgets, self.heads, self.keeps_for(video))
        terms = flux_multi_loss(logits, pooled, decoded if lc.mode == "multi" else [], target, len(self.budgets),
                                lc.align_weight, lc.smooth_l1_beta)
        return terms, ntok

    def compute_loss(self, model: nn.Module, batch: dict, step: int) -> StepOutput:
        """Mix and run the Flux-Multi / Flux-Single loss on ``batch`` ({"video": (B, 3, T, H, W) or clips,
        "label": (B,)}, augmented per clip by the data path); terms ce_j / align_j / loss are logged."""
        self._seed(step)
        video = batch["video"]
        video = video.to(self.device, non_blocking=True) if isinstance(video, torch.Tensor) else \
            [v.to(self.device, non_blocking=True) for v in video]
        labels = torch.as_tensor(batch["label"])  # checked on the host, before the copy to the device
        check_labels(labels, self.cfg.model.num_classes, batch.get("key"))
        labels = labels.to(self.device)
        video, target = self.targets(video, labels)
        terms, ntok = self.forward_loss(model, video, target)
        return StepOutput(loss=terms["loss"], terms={k: v.detach() for k, v in terms.items()}, tokens=ntok)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int) -> dict:
        """Multi-view top-1 / top-5 on the validation split at ``eval.budgets`` (see ``eval.evaluate``)."""
        # Imported here: a top-level import would load .eval with the package and make
        # `python -m fluxvit.stages.finetune.eval` warn (runpy's RuntimeWarning).
        from .eval import evaluate

        inner = extract_model_from_parallel(model)
        e = self.cfg.eval
        res = evaluate(inner.net, self.cfg.data, split=e.split, frames=e.frames, resolution=e.resolution,
                       budgets=e.budgets, num_clips=e.num_clips, num_crops=e.num_crops, max_videos=e.max_videos,
                       batch_size=e.batch_size, trained_heads=self.heads)
        return {f"{k}@{r['budget']}": r[k] for r in res for k in ("top1", "top5") if k in r}
