"""Stage-3 objective: the Flux-Multi / Flux-Single loss (FluxViT paper, arXiv 2503.14237) and the batch-level label mixing
(timm ``Mixup`` / CutMix with label smoothing, targets scored with timm's ``SoftTargetCrossEntropy``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.loss import SoftTargetCrossEntropy

__all__ = ["build_mixup", "flux_multi_loss", "smooth_targets", "soft_cross_entropy"]

_SOFT_CE = SoftTargetCrossEntropy()


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (N, C) (computed in fp32) against soft targets (N, C) (timm
    ``SoftTargetCrossEntropy``) or hard labels (N,)."""
    if target.dim() == 1:
        return F.cross_entropy(logits.float(), target)
    return _SOFT_CE(logits.float(), target.float())


def smooth_targets(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(B,) labels -> (B, C) one-hot targets with label smoothing (timm ``mixup_target`` without mixing)."""
    return mixup_target(labels, num_classes, lam=1.0, smoothing=smoothing)


def build_mixup(mixup: float, cutmix: float, prob: float, switch_prob: float, label_smoothing: float,
                num_classes: int):
    """timm ``Mixup`` in batch mode (one lambda and one CutMix box per batch; the release's setting), or None when
    mixup and cutmix are both off. Call it as ``mixer(x (B, C', H, W), labels (B,)) -> (x, targets (B, classes))``
    with an even B."""
    if mixup <= 0 and cutmix <= 0:
        return None
    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=prob, switch_prob=switch_prob, mode="batch",
                 label_smoothing=label_smoothing, num_classes=num_classes)


def flux_multi_loss(logits: torch.Tensor, pooled: torch.Tensor, decoded: list, target: torch.Tensor,
                    num_budgets: int, align_weight: float = 1.0, beta: float = 1.0) -> dict:
    """Flux-Multi loss terms from budget-major outputs.

    loss = sum_j CE(head_j at budget_j) + align_weight * sum_{j>0} SmoothL1(dec_{j-1}(p_j), sg(L2norm(p_0)))
    (beta 1, mean); with no decoded terms (Flux-Single) only the CE terms remain.

    Args:
        logits: (J*B, C) classifier outputs, view j*B + i = clip i at budget j.
        pooled: (J*B, P) pooled features (budget 0 is the teacher of the alignment terms).
        decoded: J-1 tensors (B, P), alignment decoder outputs of budgets 1..J-1.
        target: (B, C) soft targets or (B,) labels.
        num_budgets: J.

    Returns:
        ``{"loss", "ce_0", ..., "align_1", ...}`` scalar tensors.
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
