"""An independent, dense re-statement of the official InternVideo2 teacher forward, for parity tests only.

It reads a state dict with the official parameter names (tests/data/internvideo2_1b_teacher_keys.json) and
computes what ``InternVideo2.forward`` of ``InternVideo2/single_modality/models/internvideo2_teacher.py`` returns
with ``clip_norm_type='l2'`` and ``return_attn=True``, on its default (fused) path: Conv3d patch embedding,
cls concatenated before the pos-embed is added, blocks that carry (branch, residual) pairs the way
``DropoutAddRMSNorm(prenorm=True)`` does, full-width qk RMSNorm, explicit softmax attention, LayerScale in fp32,
tanh-GELU MLP (flash-attn ``FusedMLP``'s ``gelu_approx``), intermediate states taken as branch + residual,
no final norm, the attention-pooling projector with its head-mean attention, L2 normalisation.

``interpolate_pos_embed`` re-states the official loader's function (multi_modality version, which the
single_modality teacher factory imports): temporal linear, then bicubic on a square grid.

Selection (FluxViT's double mask, optional): the release's boolean-mask rule (``release_reference``) applied to
the teacher's patch embeddings after the pos-embed is added; only even T other than 4 is valid there.
It shares no code with ``fluxvit.models``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from release_reference import _selection_mask


def interpolate_pos_embed(pos_embed, orig_t_size, new_t_size, new_size):
    """The official loader's steps on a (1, 1 + T0*S0*S0, C) pos-embed -> (1, 1 + T*S*S, C)."""
    C = pos_embed.shape[-1]
    orig_size = int(((pos_embed.shape[-2] - 1) // orig_t_size) ** 0.5)
    if orig_t_size != new_t_size:
        extra, tokens = pos_embed[:, :1], pos_embed[:, 1:]
        tokens = tokens.view(1, orig_t_size, -1, C).permute(0, 2, 3, 1).reshape(-1, C, orig_t_size)
        tokens = F.interpolate(tokens, size=new_t_size, mode="linear")
        tokens = tokens.view(1, -1, C, new_t_size).permute(0, 3, 1, 2).reshape(1, -1, C)
        pos_embed = torch.cat((extra, tokens), dim=1)
    if orig_size != new_size:
        extra, tokens = pos_embed[:, :1], pos_embed[:, 1:]
        tokens = tokens.reshape(-1, new_t_size, orig_size, orig_size, C)
        tokens = tokens.reshape(-1, orig_size, orig_size, C).permute(0, 3, 1, 2)
        tokens = F.interpolate(tokens, size=(new_size, new_size), mode="bicubic", align_corners=False)
        tokens = tokens.permute(0, 2, 3, 1).reshape(-1, new_t_size, new_size, new_size, C).flatten(1, 3)
        pos_embed = torch.cat((extra, tokens), dim=1)
    return pos_embed


def _rms(x, w, eps=1e-6):
    dt = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(dt)


def _add_rms(x, residual, w):
    """DropoutAddRMSNorm(prenorm=True) in eval: residual' = x (+ residual); returns (norm(residual'), residual')."""
    residual = x if residual is None else x + residual
    return _rms(residual, w), residual


def _attn(sd, pre, x, heads):
    B, N, C = x.shape
    qkv = F.linear(x, sd[pre + "qkv.weight"], sd.get(pre + "qkv.bias"))
    qkv = qkv.reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q = _rms(q.transpose(1, 2).flatten(-2, -1), sd[pre + "q_norm.weight"]).view(B, N, heads, -1).transpose(1, 2)
    k = _rms(k.transpose(1, 2).flatten(-2, -1), sd[pre + "k_norm.weight"]).view(B, N, heads, -1).transpose(1, 2)
    a = ((q * (C // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    out = (a @ v).transpose(1, 2).reshape(B, N, C)
    return F.linear(out, sd[pre + "proj.weight"], sd[pre + "proj.bias"])


def _ls(x, gamma):
    return (x.float() * gamma.float()).to(x.dtype)


def _mlp(sd, pre, x, approximate):
    h = F.gelu(F.linear(x, sd[pre + "fc1.weight"], sd[pre + "fc1.bias"]), approximate=approximate)
    return F.linear(h, sd[pre + "fc2.weight"], sd[pre + "fc2.bias"])


def _projector(sd, x, heads):
    pre = "clip_projector."
    B, N, C = x.shape
    ln = lambda t, n: F.layer_norm(t, (C,), sd[pre + n + ".weight"], sd[pre + n + ".bias"], eps=1e-5)  # noqa: E731
    xq, xk, xv = ln(x.mean(1, keepdim=True), "norm1_q"), ln(x, "norm1_k"), ln(x, "norm1_v")
    ca = pre + "cross_attn."
    q = F.linear(xq, sd[ca + "q.weight"], sd[ca + "q_bias"]).reshape(B, 1, heads, -1).transpose(1, 2)
    k = F.linear(xk, sd[ca + "k.weight"], sd[ca + "k_bias"]).reshape(B, N, heads, -1).transpose(1, 2)
    v = F.linear(xv, sd[ca + "v.weight"], sd[ca + "v_bias"]).reshape(B, N, heads, -1).transpose(1, 2)
    attn = ((q * (C // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, h, 1, N)
    out = (attn @ v).transpose(1, 2).reshape(B, 1, C)
    return F.linear(out, sd[ca + "proj.weight"], sd[ca + "proj.bias"]).squeeze(1), attn.mean(1)


def teacher_forward(sd, video, *, num_heads, attn_pool_heads, return_index, stored_frames, gelu="tanh",
                    masking_ratio=None):
    """(B, 3, T, H, W) -> (z (K, B, 1+N, C), x (B, clip_dim), attn (B, N)) as the official teacher returns them.

    ``sd['pos_embed']`` is stored for ``stored_frames`` frames of a square grid; it is first brought to the
    clip's grid with ``interpolate_pos_embed`` (the official forward adds it unresized, so an official run on
    another grid needs exactly this load-time step). ``masking_ratio`` applies FluxViT's selection.
    """
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    w = sd["patch_embed.proj.weight"]
    x = F.conv3d(video, w, sd["patch_embed.proj.bias"], stride=tuple(w.shape[2:]))
    x = x.flatten(3).permute(0, 2, 3, 1)  # B, T, HW, C
    B, T, L, C = x.shape
    patches = x
    x = torch.cat((sd["cls_token"].expand(B, -1, -1), x.reshape(B, T * L, C)), dim=1)
    x = x + interpolate_pos_embed(sd["pos_embed"], stored_frames, T, int(L ** 0.5))
    if masking_ratio is not None:
        mask = _selection_mask(patches, masking_ratio)
        x = torch.cat([x[:, :1], x[:, 1:][~mask].view(B, -1, C)], dim=1)
    residual, z = None, []
    for idx in range(depth):
        pre = f"blocks.{idx}."
        h, residual = _add_rms(x, residual, sd[pre + "norm1.weight"])
        h = _ls(_attn(sd, pre + "attn.", h, num_heads), sd[pre + "ls1.gamma"])
        h, residual = _add_rms(h, residual, sd[pre + "norm2.weight"])
        x = _ls(_mlp(sd, pre + "mlp.", h, gelu), sd[pre + "ls2.gamma"])
        if idx in return_index:
            z.append(x + residual)
    x = x + residual
    x, attn = _projector(sd, x, attn_pool_heads)
    z = torch.stack(z)
    z = z / z.norm(dim=-1, keepdim=True)
    x = x / x.norm(dim=-1, keepdim=True)
    return z, x, attn[:, 0, 1:]
