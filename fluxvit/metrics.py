"""Evaluation metrics shared by the stages: retrieval recalls, classification accuracy, multi-view
aggregation and the paper's compute convention (FluxViT section 8)."""
from __future__ import annotations

from typing import Any, Sequence

import torch

__all__ = [
    "aggregate_views",
    "chance_recall",
    "dual_softmax",
    "fluxvit_gflops",
    "retrieval_metrics",
    "retrieval_protocol",
    "rounded",
    "topk_accuracy",
]


def dual_softmax(sim: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual-softmax (DSL) re-scoring of a (num_texts, num_videos) similarity matrix, one prior per direction.

    Follows InternVideo2's ``tasks_clip/retrieval_utils.py``: each score is multiplied by a softmax of the
    similarities over the *other* side of the query, so a candidate that another query claims more strongly is
    pushed down.

    Args:
        sim: (M texts, N videos) similarities (InternVideo2: raw cosine).
        temperature: tau in ``softmax(sim / tau)``; InternVideo2 uses tau = 1 on cosine similarity.

    Returns:
        ``(t2v, v2t)``, both (M, N): ``t2v = sim * softmax(sim / tau)`` over the texts of each video (dim 0),
        used to rank the videos of each text; ``v2t = sim * softmax(sim / tau)`` over the videos of each text
        (dim 1), used to rank the texts of each video.
    """
    if temperature <= 0:
        raise ValueError(f"dual softmax temperature must be > 0, got {temperature}")
    return sim * torch.softmax(sim / temperature, dim=0), sim * torch.softmax(sim / temperature, dim=1)


def retrieval_protocol(dual_softmax_temperature: float | None) -> str:
    """How a retrieval table was scored: ``"plain"`` or ``"DSL tau=T"`` (for reports)."""
    return "plain" if dual_softmax_temperature is None else f"DSL tau={dual_softmax_temperature:g}"


def _ranks(sim: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """1-based rank of the best positive of each row; ties are counted pessimistically (a positive tied with
    a negative ranks after it), so a constant matrix does not score perfectly.

    sim (R, C), positives (R, C) bool with at least one True per row -> (R,) float.
    """
    best_pos = sim.masked_fill(~positives, float("-inf")).max(dim=1).values
    better_or_tied_negatives = ((sim >= best_pos[:, None]) & ~positives).sum(dim=1)
    return better_or_tied_negatives.float() + 1


def _summary(ranks: torch.Tensor, prefix: str) -> dict:
    out = {f"{prefix}_r{k}": 100.0 * (ranks <= k).float().mean().item() for k in (1, 5, 10)}
    out[f"{prefix}_medr"] = ranks.median().item() if ranks.numel() % 2 else ranks.sort().values[
        ranks.numel() // 2 - 1: ranks.numel() // 2 + 1].mean().item()
    out[f"{prefix}_meanr"] = ranks.mean().item()
    return out


def retrieval_metrics(sim, text_to_video: Sequence[int], dual_softmax_temperature: float | None = None) -> dict:
    """Text-to-video and video-to-text retrieval metrics.

    Args:
        sim: (num_texts, num_videos) similarity matrix (tensor or array-like).
        text_to_video: (num_texts,) index of the video each text describes; several texts may share one video.
        dual_softmax_temperature: when given, re-score with ``dual_softmax`` first (tau; InternVideo2 uses 1
            on cosine similarity): T2V ranks the prior taken over the texts of each video, V2T the prior taken
            over the videos of each text.

    Returns:
        ``t2v_r1, t2v_r5, t2v_r10, t2v_medr, t2v_meanr, v2t_r1, v2t_r5, v2t_r10, v2t_medr, v2t_meanr``:
        recalls in percent, ranks 1-based. For V2T a video's rank is the best rank among its texts. Ties
        between a positive and negatives count against the positive. A video without any text is ignored
        in V2T.
    """
    sim = torch.as_tensor(sim, dtype=torch.float64)
    if sim.dim() != 2:
        raise ValueError(f"sim must be (num_texts, num_videos), got shape {tuple(sim.shape)}")
    t2v = torch.as_tensor(text_to_video, dtype=torch.long)
    if t2v.shape != (sim.shape[0],):
        raise ValueError(f"text_to_video has {t2v.numel()} entries for {sim.shape[0]} texts")
    if t2v.numel() and (t2v.min() < 0 or t2v.max() >= sim.shape[1]):
        raise ValueError(f"text_to_video indexes videos outside [0, {sim.shape[1]})")
    sim_t2v = sim_v2t = sim
    if dual_softmax_temperature is not None:
        sim_t2v, sim_v2t = dual_softmax(sim, dual_softmax_temperature)
    positives = torch.zeros_like(sim, dtype=torch.bool)
    positives[torch.arange(sim.shape[0]), t2v] = True
    out = _summary(_ranks(sim_t2v, positives), "t2v")
    has_text = positives.any(dim=0)
    out.update(_summary(_ranks(sim_v2t.T[has_text], positives.T[has_text]), "v2t"))
    return out


def chance_recall(num_videos: int, k: int = 1) -> float:
    """Expected R@k in percent of a random ranking over ``num_videos`` candidates (one positive)."""
    return 100.0 * min(k, num_videos) / num_videos


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict:
    """Top-k accuracy in percent. logits (N, C), labels (N,) -> {"top1": ..., "top5": ...}.

    A ``k >= C`` other than 1 is left out (top-5 of 5 classes or fewer is 100 % by construction, not a figure)."""
    num_classes = logits.shape[1]
    ks = [k for k in ks if k == 1 or k < num_classes]
    pred = logits.topk(min(max(ks), num_classes), dim=1).indices
    hit = pred == labels[:, None]
    return {f"top{k}": 100.0 * hit[:, :k].any(dim=1).float().mean().item() for k in ks}


def rounded(value: Any, places: int = 2) -> Any:
    """``value`` with every float rounded to ``places`` decimals, through dicts, lists and tuples: reports print
    accuracies and recalls to the precision they have (85.19, not 85.18518805503845)."""
    if isinstance(value, float):
        return round(value, places)
    if isinstance(value, dict):
        return {k: rounded(v, places) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(rounded(v, places) for v in value)
    return value


def aggregate_views(logits: torch.Tensor, video_index: torch.Tensor, num_videos: int | None = None) -> torch.Tensor:
    """Average the softmax of several views (temporal clips x spatial crops) per video.

    logits (V, C), video_index (V,) -> (num_videos, C) mean probabilities.
    """
    num_videos = int(video_index.max()) + 1 if num_videos is None else num_videos
    probs = logits.float().softmax(dim=-1)
    total = probs.new_zeros(num_videos, probs.shape[1]).index_add_(0, video_index, probs)
    count = torch.bincount(video_index, minlength=num_videos).clamp(min=1).unsqueeze(1)
    return total / count


def fluxvit_gflops(num_tokens: int, embed_dim: int, depth: int, patch_dim: int = 588,
                   with_stem_and_pool: bool = True) -> float:
    """The paper's "GFLOPs" per view: multiply-accumulates in units of 1e9.

    Backbone: per layer 12*N*d^2 + 2*N^2*d with N = tokens + 1 (cls), times depth. With
    ``with_stem_and_pool`` (default) the DPN projection of the kept tokens (N*patch_dim*d) and the pooling
    head's key/value projections (2*N*d^2) are added; that total reproduces the paper's table (B/14:
    440 / 255 / 108 / 49 at 3072 / 2048 / 1024 / 512 tokens) to the table's rounding (within 0.5 GFLOPs:
    0.02-0.53 %), the backbone alone to within 1.5 %.
    """
    n = num_tokens + 1
    macs = depth * (12 * n * embed_dim ** 2 + 2 * n * n * embed_dim)
    if with_stem_and_pool:
        macs += n * patch_dim * embed_dim + 2 * n * embed_dim ** 2
    return macs / 1e9
