"""The stage-3 model wrapper: a FluxViT classifier running several token budgets in one packed pass, its
layer-decay grouping (the release's layer ids), and the random-token ablation."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from timm.models import group_parameters

from fluxvit.models import FluxViT

from ..common.data import as_clips

__all__ = ["FinetuneModel", "random_keep"]


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

    ``group_matcher`` / ``no_weight_decay`` are the FluxViT's under the ``net.`` prefix, so timm's
    ``create_optimizer_v2(model, layer_decay=...)`` groups the parameters with the release's layer ids.
    """

    def __init__(self, net: FluxViT):
        super().__init__()
        self.net = net

    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:
        """timm's layer-grouping hook: parameter name -> the FluxViT's layer id (the release's, 0 .. depth + 1)."""
        layer_of = group_parameters(self.net, self.net.group_matcher(coarse), reverse=True)
        return lambda name: layer_of[name.removeprefix("net.")]

    def no_weight_decay(self) -> set:
        """The FluxViT's no-decay names under the ``net.`` prefix."""
        return {f"net.{name}" for name in self.net.no_weight_decay()}

    def forward(self, video, budgets: Sequence[int], heads: Sequence[int], keeps: list | None = None):
        """See the class docstring; one packed pass over len(budgets) * B views."""
        net = self.net
        if keeps is None:
            feats = net.forward_multi(video, list(budgets), list(heads))
        else:
            clips = as_clips(video)
            B = len(clips)
            feats = net.forward_features(clips * len(budgets), keep=keeps,
                                         head=[h for h in heads for _ in range(B)])
        B = feats.pooled.shape[0] // len(budgets)
        logits = net.logits(feats)
        decs = net.final_clip_decoder_for_projs
        decoded = [decs[j - 1](feats.pooled[j * B:(j + 1) * B]) for j in range(1, len(budgets)) if j - 1 < len(decs)]
        return logits, feats.pooled, decoded, feats.last.shape[0]
