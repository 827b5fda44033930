"""Stage 3 task: FluxViT classification finetuning with Flux-Multi (FLUXVIT.md section 6).

One step on a batch of clips (B, 3, T, H, W) with labels (B,):
  1. per-clip augmentation (RandAugment with the same ops on every frame, random erasing through all frames),
     then batch mixup / cutmix with label smoothing -> soft targets (B, C);
  2. Flux-Multi: ONE packed forward runs every clip at each budget K_j (default 3072 / 2048 / 1024) with head j
     (``FluxViT.forward_multi``; views budget-major, view j*B + i = clip i at K_j);
  3. loss = sum_j CE(logits_j, targets)
          + align_weight * sum_{j>0} SmoothL1(dec_{j-1}(p_j), sg(L2norm(p_0)))   (beta 1, mean)
     with p_j the pooled clip_embed_dim features of budget j and dec the model's two alignment decoders
     (Linear -> LayerNorm -> L2). The release ran one forward per budget; packing gives the same loss
     (``tests/test_finetune_loss.py``). Flux-Single: budget 0 and CE only.
"""
from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fluxvit.models import FluxViT, create_model, load_official_checkpoint, save_model

from ..common.config import OptimConfig
from ..common.loop import StepOutput
from ..common.optim import param_groups
from .config import FinetuneConfig

__all__ = ["FinetuneModel", "FinetuneTask", "flux_multi_loss", "layer_decay_groups", "random_keep",
           "soft_cross_entropy", "VideoAugment"]

log = logging.getLogger("fluxvit.train")


def random_keep(grid: tuple, budget: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniformly random kept-token indices (ablation against the group-dynamic selector).

    Args:
        grid: (T, H', W') patch grid of the clip.
        budget: K; all T*H'*W' tokens when K >= T*H'*W'.

    Returns:
        (min(K, T*H'*W'),) int64 ascending indices.
    """
    n = math.prod(grid)
    if budget >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=generator)[:budget].sort().values


class FinetuneModel(nn.Module):
    """The trainable module: a FluxViT classifier whose forward runs several token budgets in one packed pass.

    ``forward(video, budgets, heads, keeps=None)`` with video (B, 3, T, H, W) or a list of B clips returns
    ``(logits (J*B, C), pooled (J*B, P), decoded list of J-1 tensors (B, P), tokens)``, budget-major; ``decoded[j-1]``
    is alignment decoder j-1 applied to budget j's pooled features. ``keeps`` (J*B index tensors) replaces the
    selector (random-selection ablation). Going through ``forward`` keeps DDP / DeepSpeed hooks intact.
    """

    def __init__(self, net: FluxViT):
        super().__init__()
        self.net = net

    def forward(self, video, budgets: Sequence[int], heads: Sequence[int], keeps: list | None = None):
        """See the class docstring; one packed pass over len(budgets) * B views."""
        net = self.net
        if keeps is None:
            feats = net.forward_multi(video, list(budgets), list(heads))
        else:
            clips = list(video.unbind(0)) if isinstance(video, torch.Tensor) else list(video)
            B = len(clips)
            feats = net.forward_features(clips * len(budgets), keep=keeps,
                                         head=[h for h in heads for _ in range(B)])
        B = feats.pooled.shape[0] // len(budgets)
        logits = net.logits(feats)
        decs = net.final_clip_decoder_for_projs
        decoded = [decs[j - 1](feats.pooled[j * B:(j + 1) * B]) for j in range(1, len(budgets)) if j - 1 < len(decs)]
        return logits, feats.pooled, decoded, int(feats.cu_seqlens[-1])


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (N, C) against soft targets (N, C) or hard labels (N,)."""
    if target.dim() == 1:
        return F.cross_entropy(logits.float(), target)
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def flux_multi_loss(logits: torch.Tensor, pooled: torch.Tensor, decoded: list, target: torch.Tensor,
                    num_budgets: int, align_weight: float = 1.0, beta: float = 1.0) -> dict:
    """Flux-Multi loss terms from budget-major outputs.

    Args:
        logits: (J*B, C) classifier outputs, view j*B + i = clip i at budget j.
        pooled: (J*B, P) pooled features (budget 0 is the teacher of the alignment terms).
        decoded: J-1 tensors (B, P), alignment decoder outputs of budgets 1..J-1.
        target: (B, C) soft targets or (B,) labels.
        num_budgets: J.

    Returns:
        ``{"loss", "ce_0", ..., "align_1", ...}`` scalar tensors; loss = sum ce_j + align_weight * sum align_j.
    """
    B = logits.shape[0] // num_budgets
    terms = {f"ce_{j}": soft_cross_entropy(logits[j * B:(j + 1) * B], target) for j in range(num_budgets)}
    ref = F.normalize(pooled[:B].detach().float(), dim=-1)
    for j, d in enumerate(decoded, start=1):
        terms[f"align_{j}"] = F.smooth_l1_loss(d.float(), ref, beta=beta, reduction="mean")
    loss = sum(v for k, v in terms.items() if k.startswith("ce_"))
    aligns = [v for k, v in terms.items() if k.startswith("align_")]
    if aligns:
        loss = loss + align_weight * sum(aligns)
    terms["loss"] = loss
    return terms


# ------------------------------------------------------------------------------------------ augmentation
_MEANS = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
          "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))}


class VideoAugment:
    """Per-clip RandAugment (torchvision, the same ops and magnitudes on every frame of a clip) and random
    erasing (one box through all frames, filled with per-pixel normal noise, timm's "pixel" mode).

    ``__call__(video (B, 3, T, H, W) normalised float) -> same shape``; randomness from torch's global RNG.
    """

    def __init__(self, randaug_n: int, randaug_m: int, reprob: float, normalize: str = "imagenet"):
        self.reprob = reprob
        self.randaug = None
        if randaug_n > 0:
            from torchvision.transforms import v2

            self.randaug = v2.RandAugment(num_ops=randaug_n, magnitude=randaug_m)
        mean, std = _MEANS[normalize]
        self.mean = torch.tensor(mean).view(3, 1, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1, 1)

    def _randaug(self, clip: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean.to(clip), self.std.to(clip)
        u8 = ((clip * std + mean) * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 0, 2, 3)  # (T, 3, H, W)
        out = self.randaug(u8).permute(1, 0, 2, 3).float().div(255)
        return (out - mean) / std

    def _erase(self, clip: torch.Tensor) -> torch.Tensor:
        _, _, H, W = clip.shape
        for _ in range(10):
            area = H * W * random.uniform(0.02, 1 / 3)
            aspect = math.exp(random.uniform(math.log(0.3), math.log(1 / 0.3)))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if 0 < h < H and 0 < w < W:
                top, left = random.randint(0, H - h), random.randint(0, W - w)
                clip = clip.clone()
                clip[:, :, top:top + h, left:left + w] = torch.randn(3, 1, h, w, device=clip.device, dtype=clip.dtype)
                return clip
        return clip

    def __call__(self, video):
        clips = list(video.unbind(0)) if isinstance(video, torch.Tensor) else list(video)
        out = []
        for c in clips:
            if self.randaug is not None:
                c = self._randaug(c)
            if self.reprob > 0 and random.random() < self.reprob:
                c = self._erase(c)
            out.append(c)
        return torch.stack(out) if isinstance(video, torch.Tensor) else out


def _mixer(cfg: FinetuneConfig):
    """timm ``Mixup`` (batch mode) for the config, or None when mixup and cutmix are off."""
    a = cfg.aug
    if a.mixup <= 0 and a.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mix_prob, switch_prob=a.switch_prob,
                 mode="batch", label_smoothing=a.label_smoothing, num_classes=cfg.model.num_classes)


def smooth_targets(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(B,) labels -> (B, C) one-hot targets with label smoothing."""
    off = smoothing / num_classes
    return torch.full((labels.shape[0], num_classes), off, device=labels.device).scatter_(
        1, labels[:, None], 1.0 - smoothing + off)


# ----------------------------------------------------------------------------------- layer-wise lr decay
def layer_id(name: str, depth: int) -> int:
    """Layer index for lr decay: stem (patch embed, cls, pos-embed) 0, block i -> i + 1, heads depth + 1."""
    name = name.removeprefix("net.")
    if name.startswith(("patch_embed", "cls_token", "pos_embed", "gpe_proj")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_groups(model: nn.Module, depth: int, weight_decay: float, layer_decay: float, lr: float) -> list:
    """AdamW parameter groups with layer-wise lr decay: ``lr * layer_decay ** (depth + 1 - layer_id)``,
    split further into decay / no-decay (``common.optim.param_groups`` rules). Each group has ``lr``,
    ``weight_decay``, ``lr_scale`` and ``names``."""
    groups: dict = {}
    for g in param_groups(model, weight_decay):
        for name, p in zip(g["names"], g["params"]):
            lid = layer_id(name, depth)
            key = (lid, g["weight_decay"])
            if key not in groups:
                scale = layer_decay ** (depth + 1 - lid)
                groups[key] = {"params": [], "names": [], "weight_decay": g["weight_decay"], "lr": lr * scale,
                               "lr_scale": scale}
            groups[key]["params"].append(p)
            groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


# ------------------------------------------------------------------------------------------------ task
class FinetuneTask:
    """FluxViT classifier, augmentation and the Flux-Multi / Flux-Single loss (the ``TrainTask`` of stage 3).

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
        net = create_model(m.name, num_classes=m.num_classes, drop_path_rate=m.drop_path_rate, **m.overrides)
        self.model = FinetuneModel(net)
        if any(int(b) < 0 for b in lc.budgets):
            raise ValueError(f"loss.budgets must be >= 0 (0 = every token), got {lc.budgets}")
        # 0 = every token of the clip (no selection), as in eval.budgets.
        self.budgets = [int(b) or None for b in (lc.budgets if lc.mode == "multi" else lc.budgets[:1])]
        self.heads = [int(h) for h in (lc.heads if lc.mode == "multi" else lc.heads[:1])]
        self.augment = VideoAugment(cfg.aug.randaug_n, cfg.aug.randaug_m, cfg.aug.reprob, cfg.data.normalize)
        self.mixer = _mixer(cfg)
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
        """Weights of a stage-1/2 export or an official FluxViT checkpoint; shape-mismatched heads are skipped."""
        report = load_official_checkpoint(self.model.net, path, strict=False)
        log.info("init_from %s: %d loaded, %d skipped (shape), %d missing, %d unexpected", path,
                 len(report.loaded), len(report.skipped), len(report.missing), len(report.unexpected))

    def build_optimizer(self, ocfg: OptimConfig) -> torch.optim.AdamW:
        """AdamW over layer-decayed groups; the peak lr is ``optim.lr * global_batch / lr_batch`` with
        ``scale_lr`` (release: 2e-4 per 256)."""
        lr = ocfg.lr
        if self.cfg.scale_lr:
            global_batch = self.cfg.data.batch_size * self.cfg.train.grad_accum * self.world
            lr = ocfg.lr * global_batch / self.cfg.lr_batch
            log.info("lr %.3g per %d clips -> %.3g at global batch %d", ocfg.lr, self.cfg.lr_batch, lr, global_batch)
        groups = layer_decay_groups(self.model, len(self.model.net.blocks), ocfg.weight_decay,
                                    self.cfg.layer_decay, lr)
        groups = [{k: v for k, v in g.items() if k != "names"} for g in groups if g["params"]]
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(ocfg.betas), eps=ocfg.eps)

    def export(self, model: FinetuneModel, path: Path) -> Path:
        """The classifier alone, as safetensors that ``fluxvit.models.load_model`` rebuilds."""
        return save_model(model.net, path, metadata={"stage": "finetune", "mode": self.cfg.loss.mode,
                                                    "trained_heads": ",".join(map(str, self.heads))})

    # ------------------------------------------------------------------ loss
    def _seed(self, step: int) -> None:
        # Augmentation, mixup, drop path and random selection draw from global RNGs seeded per (step, rank):
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
        clips = list(video.unbind(0)) if isinstance(video, torch.Tensor) else list(video)
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
        """Augment, mix and run the Flux-Multi / Flux-Single loss on ``batch`` ({"video": (B, 3, T, H, W),
        "label": (B,)}); terms ce_j / align_j / loss are logged."""
        self._seed(step)
        video = batch["video"]
        video = video.to(self.device, non_blocking=True) if isinstance(video, torch.Tensor) else \
            [v.to(self.device, non_blocking=True) for v in video]
        labels = torch.as_tensor(batch["label"]).to(self.device)
        if (labels < 0).any():
            raise ValueError("stage 3 needs a class label for every clip (got -1: no cls / json label in the data)")
        video = self.augment(video)
        video, target = self.targets(video, labels)
        terms, ntok = self.forward_loss(model, video, target)
        return StepOutput(loss=terms["loss"], terms={k: v.detach() for k, v in terms.items()}, tokens=ntok)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int) -> dict:
        """Multi-view top-1 / top-5 on the validation split at ``eval.budgets`` (see ``eval.evaluate``)."""
        from .eval import evaluate

        inner = getattr(model, "module", model)
        e = self.cfg.eval
        res = evaluate(inner.net, self.cfg.data, split=e.split, frames=e.frames, resolution=e.resolution,
                       budgets=e.budgets, num_clips=e.num_clips, num_crops=e.num_crops, max_videos=e.max_videos,
                       batch_size=e.batch_size, trained_heads=self.heads)
        return {f"{k}@{r['budget']}": r[k] for r in res for k in ("top1", "top5")}
