"""FluxViT building blocks, written for packed token sequences.

All token tensors here are packed: (N_total, dim) with a ``PackedSeqs`` (host lengths, ``cu_seqlens``
(num_seqs + 1,), segment ids; built once per forward) marking where each sequence (one clip's kept tokens,
cls first) starts. Nothing inside a block reads a device value back to the host. Parameter names and shapes follow the official release
so that its checkpoints load without renaming (see ``fluxvit.models.checkpoint``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import PackedSeqs, available_backends, varlen_attention
from .pos_embed import sincos_3d

__all__ = [
    "AlignDecoder",
    "Attention",
    "AttentionPoolingHead",
    "Block",
    "ChannelAffine",
    "DualNormPatchEmbed",
    "LayerScale",
    "Mlp",
    "PackedBlockStack",
    "RMSNorm",
    "drop_path_scale",
    "packed_drop_path",
    "segment_ids",
]


def segment_ids(cu_seqlens: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """(N_total,) int64 index of the sequence each packed token belongs to."""
    lengths = torch.diff(cu_seqlens).to(torch.int64)
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths, output_size=total)


def drop_path_scale(num_seqs: int, p: float, device: torch.device | str) -> torch.Tensor:
    """One stochastic-depth draw: (num_seqs,) fp32 factors, 0 (dropped) or 1 / (1 - p) (kept, probability 1 - p)."""
    return torch.empty(num_seqs, device=device).bernoulli_(1.0 - p).div_(1.0 - p)


def packed_drop_path(x: torch.Tensor, seg: torch.Tensor, num_seqs: int, p: float, training: bool,
                     scale: torch.Tensor | None = None) -> torch.Tensor:
    """Stochastic depth per sequence (= per sample) on packed tokens x (N, D); seg (N,) from ``segment_ids``.

    ``scale`` (num_seqs,): factors drawn beforehand by ``drop_path_scale`` (``PackedBlockStack.run_blocks`` draws
    every block's outside the blocks, so a compiled block reads no rate and one graph serves blocks of any rate);
    when given, ``p`` and ``training`` are not read. Otherwise the block draws its own (the same draw)."""
    if scale is None:
        if p == 0.0 or not training:
            return x
        scale = drop_path_scale(num_seqs, p, x.device)
    return x * scale.to(x.dtype)[seg].unsqueeze(-1)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a weight and no bias, computed in fp32. (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


class LayerScale(nn.Module):
    """Per-channel residual scale ``gamma`` (init 1e-5), applied in fp32 as released. (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() * self.gamma.float()).to(x.dtype)


class ChannelAffine(nn.Module):
    """Per-channel scale and shift ``x * w + b`` (init 1, 0) stored as the release's depthwise Conv3d k=(1,1,1).

    Used for the global positional encoding (``gpe_proj``) and the local one inside attention (``lpe``).
    The Conv3d is kept only for its parameter names and shapes: (dim, 1, 1, 1, 1) and (dim,).
    (..., dim) -> (..., dim).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.depthwise_conv = nn.Conv3d(dim, dim, kernel_size=1, groups=dim)
        nn.init.ones_(self.depthwise_conv.weight)
        nn.init.zeros_(self.depthwise_conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.depthwise_conv.weight.view(-1) + self.depthwise_conv.bias


class DualNormPatchEmbed(nn.Module):
    """Dual patch norm (DPN) embedding: RMSNorm on raw patches, linear projection, RMSNorm on embeddings.

    Each 14x14 patch of each frame is flattened in (h, w, c) order (588 values for RGB), normalised by
    ``norm_before``, projected by ``proj`` (a Conv3d kernel = stride = (1, p, p) in the release, applied
    here as the equivalent matrix product) and normalised by ``norm``.

    Input (B, C, T, H, W) with H, W multiples of ``patch_size``; output (B, T, H/p * W/p, dim).
    """

    def __init__(self, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=(1, patch_size, patch_size),
                              stride=(1, patch_size, patch_size))
        self.norm_before = RMSNorm(patch_size * patch_size * in_chans)
        self.norm = RMSNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = x.shape
        p = self.patch_size
        h, w = H // p, W // p
        x = x.reshape(B, C, T, h, p, w, p).permute(0, 2, 3, 5, 4, 6, 1).reshape(B, T, h * w, p * p * C)
        x = self.norm_before(x)
        # Conv3d weight (dim, C, 1, p, p) -> (dim, p*p*C) in the (hp, wp, c) order of the flattened patches.
        weight = self.proj.weight.squeeze(2).permute(0, 2, 3, 1).reshape(self.proj.out_channels, -1)
        x = F.linear(x, weight.to(x.dtype), self.proj.bias.to(x.dtype))
        return self.norm(x)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2, both with bias. (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention over packed sequences with qk-norm and local PE (LPE).

    out = proj(softmax(q k^T / sqrt(d)) v + lpe(v)), where q and k are RMS-normed over the full dim before
    the head split and ``lpe`` is a per-channel affine map of v. (N, dim), PackedSeqs -> (N, dim).
    """

    def __init__(self, dim: int, num_heads: int, attn_backend: str | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_backend = attn_backend
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.lpe = ChannelAffine(dim)
        self.q_norm = RMSNorm(dim)
        self.k_norm = RMSNorm(dim)

    def forward(self, x: torch.Tensor, pack: PackedSeqs) -> torch.Tensor:
        N, D = x.shape
        q, k, v = self.qkv(x).view(N, 3, D).unbind(1)
        # The norms' fp32 weights would lift q and k to fp32 under autocast while v stays in the autocast dtype;
        # the kernels (flash-attn, varlen) take one dtype, so q and k follow v.
        q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        heads = (N, self.num_heads, self.head_dim)
        out = varlen_attention(q.reshape(heads), k.reshape(heads), v.reshape(heads), pack,
                               backend=self.attn_backend)
        return self.proj(out.flatten(1) + self.lpe(v))


class Block(nn.Module):
    """Pre-norm transformer block: x += ls1 * Attn(RMSNorm(x)); x += ls2 * MLP(RMSNorm(x)).

    (N, dim), PackedSeqs -> (N, dim). Stochastic depth drops whole sequences (samples).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, init_values: float = 1e-5,
                 drop_path: float = 0.0, attn_backend: str | None = None):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads, attn_backend=attn_backend)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = RMSNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor, pack: PackedSeqs, drop: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, dim) -> (N, dim); drop: None (draw stochastic depth here) or (2, views) factors of the attention
        and MLP branches drawn beforehand (``PackedBlockStack.run_blocks``)."""
        # The view count is read as a size of cu_seqlens where it is used (not a host int held across the
        # attention call): compiled blocks then do not specialise on it.
        x = x + packed_drop_path(self.ls1(self.attn(self.norm1(x), pack)), pack.seg, pack.cu_seqlens.shape[0] - 1,
                                 self.drop_path, self.training, None if drop is None else drop[0])
        return x + packed_drop_path(self.ls2(self.mlp(self.norm2(x))), pack.seg, pack.cu_seqlens.shape[0] - 1,
                                    self.drop_path, self.training, None if drop is None else drop[1])


class PackedBlockStack:
    """Mixin for a model whose ``self.blocks`` each map (N, dim), PackedSeqs -> (N, dim) (FluxViT, InternVideo2).

    ``set_grad_checkpointing`` (timm's convention): each block's activations are recomputed in the backward
    pass instead of stored (outputs, gradients and stochastic-depth draws unchanged). ``compile_blocks``:
    regional compilation as torchtitan does it, ``torch.compile`` of each block in place (parameter names do
    not change), with the packed token count marked dynamic so a new Flux grid or budget reuses the compiled
    blocks; kernels that split by host lengths (segments, nested, math, block_mask) run eagerly between the
    compiled parts.

    ``reset_parameters`` / ``no_weight_decay`` / ``group_matcher`` / ``dtype``: the ViT initialisation and
    conventions both models share (they need ``pos_embed``, ``pos_grid``, ``cls_token``, ``patch_embed.proj`` and
    ``config.embed_dim``).
    """

    grad_checkpointing: bool = False
    blocks_compiled: bool = False

    def reset_parameters(self) -> None:
        """Release / official initialisation: 3-D sin-cos pos-embed (cls row zero), trunc-normal(0.02) cls and
        Linear weights, zero biases, LayerNorm 1/0, and block i's attn.proj / mlp.fc2 weights divided by sqrt(2 i)."""
        with torch.no_grad():
            self.pos_embed.zero_()
            self.pos_embed[0, 1:].copy_(sincos_3d(self.config.embed_dim, *self.pos_grid))
            nn.init.trunc_normal_(self.cls_token, std=0.02)
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
            for i, blk in enumerate(self.blocks, start=1):
                blk.attn.proj.weight.div_(math.sqrt(2.0 * i))
                blk.mlp.fc2.weight.div_(math.sqrt(2.0 * i))

    def no_weight_decay(self) -> set:
        """Parameter names excluded from weight decay besides norms and biases."""
        return {"pos_embed", "cls_token"}

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer grouping (``timm.optim`` layer decay), the release's layer ids
        (``optim_factory.get_num_layer_for_vit``): ``cls_token`` / ``mask_token`` / ``pos_embed`` (exact names) and
        ``patch_embed.*`` -> 0, ``blocks.i.*`` -> i + 1, everything else -> depth + 1 (the heads' full lr). The
        release's quirk is kept: FluxViT's ``gpe_proj`` (the global PE's affine) is not in the stem, so it gets the
        heads' id. Blocks are the finest unit, so ``coarse`` changes nothing."""
        return dict(stem=r"^(?:cls_token|mask_token|pos_embed)$|^patch_embed", blocks=r"^blocks\.(\d+)")

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = bool(enable)

    def compile_blocks(self, **compile_kwargs) -> None:
        for blk in self.blocks:
            blk.compile(**compile_kwargs)
        self.blocks_compiled = True

    def draw_drop_path(self, pack: PackedSeqs) -> list:
        """Every block's stochastic-depth factors for this forward, drawn before the blocks run: per block None
        (rate 0 or eval mode) or (2, views) fp32 (attention branch, MLP branch). The draws are the ones the
        blocks would make themselves, in the same order (block 0's attention, its MLP, block 1's, ...), so
        results do not change; the blocks then take them as inputs, and a compiled block neither specialises on
        its rate (one graph for every block, where a rate per block hit dynamo's recompile limit after 8) nor
        redraws when gradient checkpointing recomputes it."""
        views = len(pack.lengths)
        drops = []
        for blk in self.blocks:
            p = getattr(blk, "drop_path", 0.0)
            if not (self.training and p > 0.0):
                drops.append(None)
                continue
            d = torch.stack([drop_path_scale(views, p, pack.device), drop_path_scale(views, p, pack.device)])
            if self.blocks_compiled:
                torch._dynamo.maybe_mark_dynamic(d, 1)
            drops.append(d)
        return drops

    def run_blocks(self, x: torch.Tensor, pack: PackedSeqs, keep: set | dict = ()) -> tuple[torch.Tensor, dict]:
        """x (N, dim) through every block; returns (output, {i: output of block i for i in keep})."""
        if self.blocks_compiled:
            for t in (x, pack.seg, pack.cu_seqlens):
                torch._dynamo.maybe_mark_dynamic(t, 0)
            grad = x.requires_grad and torch.is_grad_enabled()
            if (self.config.attn_backend or "auto") in ("auto", "flex") and \
                    "flex" in available_backends(x.device, x.dtype, grad):
                pack.flex_block_mask()  # built outside the compiled regions, reused by every block
        drops = self.draw_drop_path(pack)
        outs = {}
        ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        for i, (blk, drop) in enumerate(zip(self.blocks, drops)):
            x = checkpoint(blk, x, pack, drop, use_reentrant=False) if ckpt else blk(x, pack, drop)
            if i in keep:
                outs[i] = x
        return x, outs


class _PoolingCrossAttention(nn.Module):
    """Single-query cross-attention used by ``AttentionPoolingHead`` (names as released)."""

    def __init__(self, dim: int, num_heads: int, out_dim: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by attn_pool_num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.k_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, out_dim)


class AttentionPoolingHead(nn.Module):
    """Attention pooling with one query per sequence: the mean of all its tokens (cls included).

    Separate LayerNorms on the q, k and v inputs, bias-free q/k/v projections plus learned biases,
    ``num_heads`` heads, output projection to ``out_dim``; no residual, no MLP.
    (N, dim), cu_seqlens -> (num_seqs, out_dim).
    """

    def __init__(self, dim: int, num_heads: int, out_dim: int):
        super().__init__()
        self.norm1_q = nn.LayerNorm(dim, eps=1e-5)
        self.norm1_k = nn.LayerNorm(dim, eps=1e-5)
        self.norm1_v = nn.LayerNorm(dim, eps=1e-5)
        self.cross_attn = _PoolingCrossAttention(dim, num_heads, out_dim)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, seg: torch.Tensor,
                return_attention: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Pool packed tokens x (N, dim) with sequence ids ``seg`` (N,) -> (num_seqs, out_dim); with
        ``return_attention`` also the attention (N,) from each sequence's query to each of its tokens, averaged
        over heads (each sequence's weights sum to 1)."""
        ca = self.cross_attn
        S, (N, D) = len(cu_seqlens) - 1, x.shape
        H = ca.num_heads
        # Every segment sum (token mean, softmax denominators, weighted values) accumulates in fp32 and is cast
        # once: CUDA's index_add_ adds atomically and rounds to the destination dtype after every addition, so
        # a bf16 accumulator over thousands of tokens loses most of its precision.
        counts = torch.diff(cu_seqlens).to(torch.float32).unsqueeze(-1)
        mean = (x.new_zeros(S, D, dtype=torch.float32).index_add_(0, seg, x.float()) / counts).to(x.dtype)
        q = F.linear(self.norm1_q(mean), ca.q.weight, ca.q_bias).view(S, H, -1)
        k = F.linear(self.norm1_k(x), ca.k.weight, ca.k_bias).view(N, H, -1)
        v = F.linear(self.norm1_v(x), ca.v.weight, ca.v_bias).view(N, H, -1)
        logits = (q[seg] * k).sum(-1).float() * ca.scale  # (N, H)
        seg_h = seg.unsqueeze(-1).expand(N, H)
        peak = logits.new_full((S, H), -math.inf).scatter_reduce(0, seg_h, logits, "amax", include_self=True)
        weights = torch.exp(logits - peak[seg])
        weights = weights / logits.new_zeros(S, H).index_add_(0, seg, weights)[seg]
        pooled = v.new_zeros(S, H, v.shape[-1], dtype=torch.float32)
        pooled.index_add_(0, seg, weights.unsqueeze(-1) * v.float())
        out = ca.proj(pooled.reshape(S, D).to(v.dtype))
        return (out, weights.mean(-1)) if return_attention else out


class AlignDecoder(nn.Module):
    """Alignment decoder of a pooled feature: Linear -> LayerNorm -> L2 normalise. (B, dim) -> (B, dim)."""

    def __init__(self, dim: int):
        super().__init__()
        self.head = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.head(x))
        return x / x.norm(dim=-1, keepdim=True)
