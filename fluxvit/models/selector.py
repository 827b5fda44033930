"""Group-dynamic token selector (FluxViT section 3.2): keep the most dynamic tokens of each frame group.

Given post-DPN patch embeddings E of shape (B, T, L, dim) and a token budget K < T*L:

1. Split the T frames into G contiguous groups (``num_groups``).
2. Score token (t, l) by ||E[t, l] - E[t-1, l]||_2 within its group; the first frame of a group copies the
   score of the second.
3. Keep the top k = int((1 - rho) * T_g * L) tokens of every group, rho = 1 - K / (T*L), so each group
   keeps the same share (truncation can leave up to G tokens under K).
4. When T*L <= K nothing is dropped.

Group rule (``num_groups``). The release uses G = 4 when T % 4 == 0, else 2 (1 when T = 2), requires even
T and crashes for T = 4 (four one-frame groups). Here G is the largest of 4, 2, 1 that divides T and leaves
at least two frames per group; so it equals the release wherever the release works (T = 2, 6, 8, 10, ...)
and never builds a one-frame group: T = 4 -> 2 groups of 2, odd T -> 1 group of T.

One frame (T = 1, images). There is no temporal difference; a token is scored by its distance to the
frame's mean embedding, ||E[0, l] - mean_l E[0, l]||, which keeps the most distinctive patches.

Very small budgets. When k rounds to 0 per group (K < G), the groups are merged and the top K tokens of
the whole clip are kept, so a positive budget always keeps at least one token.

Ties (the copied first-frame scores are exact ties) follow ``torch.argsort``'s order, as released.
"""
from __future__ import annotations

import torch

__all__ = ["num_groups", "select_tokens", "token_scores"]


def num_groups(frames: int) -> int:
    """Number of contiguous frame groups for a clip of ``frames`` frames (see the module docstring)."""
    if frames < 1:
        raise ValueError(f"a clip needs at least one frame, got {frames}")
    for groups in (4, 2):
        if frames % groups == 0 and frames // groups >= 2:
            return groups
    return 1


def token_scores(emb: torch.Tensor, groups: int | None = None) -> torch.Tensor:
    """Dynamic score of every token.

    Args:
        emb: (B, T, L, dim) patch embeddings (no gradient is taken through the scores).
        groups: number of frame groups; default ``num_groups(T)``.

    Returns:
        (B * G, T_g * L) scores laid out group by group, frame-major inside a group.
    """
    B, T, L, D = emb.shape
    emb = emb.detach()
    if T == 1:
        return (emb[:, 0] - emb[:, 0].mean(dim=1, keepdim=True)).norm(dim=-1)
    G = groups or num_groups(T)
    e = emb.reshape(B * G, T // G, L, D)
    dist = torch.norm(e[:, 1:] - e[:, :-1], p=2, dim=-1)  # (B*G, T_g - 1, L)
    return torch.cat([dist[:, 0], dist.flatten(1)], dim=1)


def select_tokens(emb: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Indices of the tokens the group-dynamic selector keeps.

    Args:
        emb: (B, T, L, dim) post-DPN patch embeddings.
        num_tokens: the token budget K >= 1.

    Returns:
        (B, k_total) int64 indices into the flattened T*L tokens, ascending (token order is preserved);
        all T*L indices when T*L <= K.
    """
    B, T, L, _ = emb.shape
    if num_tokens < 1:
        raise ValueError(f"token budget must be >= 1, got {num_tokens}")
    total = T * L
    if total <= num_tokens:
        return torch.arange(total, device=emb.device).expand(B, total)
    G = num_groups(T)
    rho = 1 - num_tokens / total
    per_group = int((1 - rho) * (T // G * L))
    if per_group == 0:
        G, per_group = 1, num_tokens
    scores = token_scores(emb, G if T > 1 else None)
    order = torch.argsort(scores, dim=1, descending=True)[:, :per_group]
    group_len = total // G
    offsets = (torch.arange(G, device=emb.device) * group_len).repeat(B).unsqueeze(1)
    keep = (order + offsets).reshape(B, G * per_group)
    return keep.sort(dim=1).values
