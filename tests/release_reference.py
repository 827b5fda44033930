"""An independent, dense re-statement of the released FluxViT forward pass, for parity tests only.

It reads a state dict with the official parameter names (shared/reference/fluxvit_official_keys.json) and
computes ``forward(video, masking_ratio, output_head)`` the way the release does on its non-flash path:
raw-patch RMSNorm and Conv3d projection, global PE with the depthwise affine, temporal-linear then
bicubic resizing of a square grid, boolean-mask token selection on padded dense batches, explicit
softmax attention with full-dim qk-norm and V-side local PE, attention pooling, fc_norm and heads.
It shares no code with ``fluxvit.models``, so agreement between the two is evidence, not a tautology.
Only even T other than 4 is valid here, as in the release.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _rms(x, w, eps=1e-6):
    dt = x.dtype
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(dt)


def _patch_embed(sd, video, p):
    B, C, T, H, W = video.shape
    x = video.permute(0, 2, 3, 4, 1)  # B T H W C
    x = x.reshape(B, T, H // p, p, W // p, p, C).permute(0, 1, 2, 4, 3, 5, 6)  # B T h w hp wp C
    x = x.reshape(B, T * (H // p) * (W // p), p * p * C)
    x = _rms(x, sd["patch_embed.norm_before.weight"])
    x = x.reshape(B, T, H // p, W // p, p, p, C).permute(0, 1, 2, 4, 3, 5, 6).reshape(B, T, H, W, C)
    x = F.conv3d(x.permute(0, 4, 1, 2, 3), sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"],
                 stride=(1, p, p))  # B D T h w
    x = x.flatten(3).permute(0, 2, 3, 1)  # B T L D
    return _rms(x, sd["patch_embed.norm.weight"])


def _selection_mask(x, masking_ratio):
    """True = dropped, as the release's boolean mask."""
    B, T, L, C = x.shape
    e = x.detach().clone()
    G = 4 if T % 4 == 0 else (1 if T == 2 else 2)
    e = e.reshape(B * G, T // G, L, C)
    Tg = T // G
    dist = torch.norm(e[:, : Tg - 1] - e[:, 1:], p=2, dim=3)
    importance = torch.cat((dist[:, 0, :], dist.flatten(1)), dim=1)
    ids_sorted = torch.argsort(importance, dim=1, descending=True)
    keep = int((1 - masking_ratio) * (Tg * L))
    ids_restore = torch.argsort(ids_sorted, dim=1)
    mask = torch.ones(B * G, Tg * L)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return mask.reshape(B, T * L).bool()


def _pos_embed(sd, grid_t, T, L):
    pe = sd["pos_embed"]
    C = pe.shape[-1]
    cls_pos, grid = pe[:, :1], pe[:, 1:]
    s0 = int(math.sqrt(grid.shape[1] / grid_t))
    w = sd["gpe_proj.depthwise_conv.weight"]
    b = sd["gpe_proj.depthwise_conv.bias"]
    g = grid.view(1, grid_t, s0, s0, C).permute(0, 4, 1, 2, 3)
    g = F.conv3d(g, w, b, groups=C).permute(0, 2, 3, 4, 1).reshape(1, -1, C)
    pe = torch.cat([cls_pos, g], 1)
    if pe.shape[1] == 1 + T * L:
        return pe
    new_s = int(L ** 0.5)
    if grid_t != T:
        extra, tok = pe[:, :1], pe[:, 1:]
        tok = tok.view(1, grid_t, -1, C).permute(0, 2, 3, 1).reshape(-1, C, grid_t)
        tok = F.interpolate(tok, size=T, mode="linear")
        tok = tok.view(1, -1, C, T).permute(0, 3, 1, 2).reshape(1, -1, C)
        pe = torch.cat([extra, tok], 1)
    if s0 != new_s:
        extra, tok = pe[:, :1], pe[:, 1:]
        tok = tok.reshape(-1, T, s0, s0, C).reshape(-1, s0, s0, C).permute(0, 3, 1, 2)
        tok = F.interpolate(tok, size=(new_s, new_s), mode="bicubic", align_corners=False)
        tok = tok.permute(0, 2, 3, 1).reshape(-1, T, new_s, new_s, C).flatten(1, 3)
        pe = torch.cat([extra, tok], 1)
    return pe


def _block(sd, i, x, heads):
    pre = f"blocks.{i}."
    B, N, C = x.shape
    h = _rms(x, sd[pre + "norm1.weight"])
    qkv = F.linear(h, sd[pre + "attn.qkv.weight"]).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q = _rms(q.transpose(1, 2).flatten(-2), sd[pre + "attn.q_norm.weight"]).view(B, N, heads, -1).transpose(1, 2)
    k = _rms(k.transpose(1, 2).flatten(-2), sd[pre + "attn.k_norm.weight"]).view(B, N, heads, -1).transpose(1, 2)
    v_flat = v.permute(0, 2, 1, 3).reshape(B, N, C)
    lpe = F.conv3d(v_flat.permute(0, 2, 1).reshape(B, C, 1, N, 1), sd[pre + "attn.lpe.depthwise_conv.weight"],
                   sd[pre + "attn.lpe.depthwise_conv.bias"], groups=C).reshape(B, C, N).permute(0, 2, 1)
    attn = ((q * (C // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    a = (attn @ v).transpose(1, 2).reshape(B, N, C)
    a = F.linear(a + lpe, sd[pre + "attn.proj.weight"], sd[pre + "attn.proj.bias"])
    x = x + (a.float() * sd[pre + "ls1.gamma"].float()).to(x.dtype)
    h = _rms(x, sd[pre + "norm2.weight"])
    m = F.linear(F.gelu(F.linear(h, sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc1.bias"])),
                 sd[pre + "mlp.fc2.weight"], sd[pre + "mlp.fc2.bias"])
    return x + (m.float() * sd[pre + "ls2.gamma"].float()).to(x.dtype)


def _pool(sd, k, x, heads):
    pre = f"clip_projector.{k}."
    B, N, C = x.shape
    ln = lambda t, n: F.layer_norm(t, (C,), sd[pre + n + ".weight"], sd[pre + n + ".bias"], eps=1e-5)  # noqa: E731
    xq = ln(x.mean(1, keepdim=True), "norm1_q")
    xk, xv = ln(x, "norm1_k"), ln(x, "norm1_v")
    ca = pre + "cross_attn."
    q = F.linear(xq, sd[ca + "q.weight"], sd[ca + "q_bias"]).reshape(B, 1, heads, -1).transpose(1, 2)
    kk = F.linear(xk, sd[ca + "k.weight"], sd[ca + "k_bias"]).reshape(B, N, heads, -1).transpose(1, 2)
    v = F.linear(xv, sd[ca + "v.weight"], sd[ca + "v_bias"]).reshape(B, N, heads, -1).transpose(1, 2)
    attn = ((q * (C // heads) ** -0.5) @ kk.transpose(-2, -1)).softmax(-1)
    out = (attn @ v).transpose(1, 2).reshape(B, 1, C)
    return F.linear(out, sd[ca + "proj.weight"], sd[ca + "proj.bias"])[:, 0]


def release_forward(sd, video, *, num_frames, num_heads, masking_ratio=None, output_head=0,
                    attn_pool_heads=16, patch_size=14, return_pooled=False):
    """Release semantics: (B, 3, T, H, W) -> logits (B, classes) (and the pooled feature if asked)."""
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    x = _patch_embed(sd, video, patch_size)
    B, T, L, C = x.shape
    mask = _selection_mask(x, masking_ratio) if masking_ratio is not None else None
    x = torch.cat([sd["cls_token"].expand(B, -1, -1), x.reshape(B, T * L, C)], 1)
    x = x + _pos_embed(sd, num_frames, T, L)
    if mask is not None:
        cls, rest = x[:, :1], x[:, 1:]
        x = torch.cat([cls, rest[~mask].view(B, -1, C)], 1)
    for i in range(depth):
        x = _block(sd, i, x, num_heads)
    pooled = _pool(sd, output_head, x, attn_pool_heads)
    z = F.layer_norm(pooled, (pooled.shape[-1],), sd["fc_norm.weight"], sd["fc_norm.bias"], eps=1e-5)
    logits = F.linear(z, sd[f"head.{output_head}.weight"], sd[f"head.{output_head}.bias"])
    return (logits, pooled) if return_pooled else logits
