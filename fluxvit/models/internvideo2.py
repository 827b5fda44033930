"""InternVideo2, the paper's distillation teacher, on FluxViT's packed variable-length path.

FluxViT-S/B were distilled from InternVideo2-1B (FluxViT paper, Figure 2; ``teacher_internvideo2_stage2_1B`` of
the official ``InternVideo2/single_modality`` code). This module re-implements that model with the official
parameter names and shapes, so the released stage-2 checkpoint loads without renaming
(``fluxvit.models.load_official_checkpoint``), and runs it the way FluxViT runs:

    Conv3d patch embedding (kernel = stride = (tubelet, 14, 14), bias, no norm) -> (T', L, dim)
    + learnable 3-D pos-embed, resized at run time to (T', H/14, W/14) as the official loader's
      ``interpolate_pos_embed`` does (linear in time, then bicubic in space, align_corners False)
    -> optional group-dynamic token selection on the patch embeddings (the teacher side of FluxViT's
       "double mask", FluxViT paper, arXiv 2503.14237)
    -> cls token + kept tokens of every clip packed into one sequence (``cu_seqlens``, no padding)
    -> ``depth`` pre-norm blocks: RMSNorm, full-width qk RMSNorm, LayerScale (fp32), MLP with tanh GELU
       (the official teacher's fused MLP; exact GELU selectable with ``mlp_act="gelu"``); no final norm
    -> attention-pooling projector (query = mean of all tokens, cls included) to ``clip_embed_dim``.

``forward_teacher(video, layers, num_tokens)`` returns what the official teacher's ``forward`` returns in the
distillation path; ``forward_packed`` returns the same quantities packed, for training stages.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence, Union

import torch
from torch import nn

from .attention import PackedSeqs, varlen_attention
from .layers import AttentionPoolingHead, Block, LayerScale, Mlp, PackedBlockStack, RMSNorm
from .pos_embed import resize_pos_grid
from .selector import select_tokens

__all__ = ["InternVideo2", "InternVideo2Config", "InternVideo2Features", "TeacherForward",
           "resize_internvideo2_pos_embed"]

VideoInput = Union[torch.Tensor, Sequence[torch.Tensor]]
MLP_ACTS = {"gelu_tanh": "tanh", "gelu": "none"}


@dataclass
class InternVideo2Config:
    """Architecture of an InternVideo2 vision encoder; field names follow the official constructor.

    Defaults are the official ``teacher_internvideo2_stage2_1B`` (1,020,708,608 parameters). ``img_size`` and
    ``num_frames`` fix the stored pos-embed grid only: any T >= 1 (a multiple of ``tubelet_size``) and any H, W
    that are multiples of ``patch_size`` run. ``mlp_act``: "gelu_tanh" (the official teacher's fused MLP) or
    "gelu" (exact, the official non-fused path). ``drop_path_rate`` is live only in train mode; the stage-1
    teacher is always in eval mode. ``num_classes`` > 0 adds the official finetuning classifier (``fc_norm``,
    LayerNorm(clip_embed_dim), then ``head``, Linear(clip_embed_dim, num_classes)); the teacher has none (0).
    """

    embed_dim: int = 1408
    depth: int = 40
    num_heads: int = 16
    mlp_ratio: float = 48 / 11
    patch_size: int = 14
    img_size: int = 224
    num_frames: int = 8
    tubelet_size: int = 1
    in_chans: int = 3
    qkv_bias: bool = False
    qk_normalization: bool = True
    init_values: float = 1e-5
    drop_path_rate: float = 0.25
    attn_pool_num_heads: int = 16
    clip_embed_dim: int = 768
    mlp_act: str = "gelu_tanh"
    attn_backend: Union[str, None] = None
    num_classes: int = 0

    def __post_init__(self):
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.num_frames % self.tubelet_size:
            raise ValueError(f"num_frames {self.num_frames} is not a multiple of tubelet_size {self.tubelet_size}")
        if self.embed_dim % 16:
            raise ValueError(f"embed_dim must be divisible by 16 (3-D sin-cos PE), got {self.embed_dim}")
        if self.embed_dim % self.num_heads or self.embed_dim % self.attn_pool_num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads} and "
                             f"attn_pool_num_heads {self.attn_pool_num_heads}")
        if self.mlp_act not in MLP_ACTS:
            raise ValueError(f"mlp_act must be one of {sorted(MLP_ACTS)}, got {self.mlp_act!r}")
        if isinstance(self.num_classes, bool) or int(self.num_classes) != self.num_classes or self.num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0, got {self.num_classes!r}")

    @property
    def mlp_hidden_dim(self) -> int:
        """int(embed_dim * mlp_ratio), as the official Block computes it (6144 for the 1B model)."""
        return int(self.embed_dim * self.mlp_ratio)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class InternVideo2Attention(nn.Module):
    """Packed multi-head self-attention with full-width qk RMSNorm (across all heads together), no local PE.

    (N, dim), PackedSeqs -> (N, dim). Parameter names as released: ``qkv``, ``proj``, ``q_norm``,
    ``k_norm``.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, qk_normalization: bool = True,
                 attn_backend: str | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_backend = attn_backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = RMSNorm(dim) if qk_normalization else nn.Identity()
        self.k_norm = RMSNorm(dim) if qk_normalization else nn.Identity()

    def forward(self, x: torch.Tensor, pack: PackedSeqs) -> torch.Tensor:
        N, D = x.shape
        q, k, v = self.qkv(x).view(N, 3, D).unbind(1)
        q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)  # one dtype for the kernels (see layers)
        heads = (N, self.num_heads, self.head_dim)
        out = varlen_attention(q.reshape(heads), k.reshape(heads), v.reshape(heads), pack,
                               backend=self.attn_backend)
        return self.proj(out.flatten(1))


class InternVideo2Mlp(Mlp):
    """fc1 -> GELU (tanh approximation or exact) -> fc2. (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, hidden: int, act: str = "gelu_tanh"):
        super().__init__(dim, hidden)
        self.act = nn.GELU(approximate=MLP_ACTS[act])


class InternVideo2Block(nn.Module):
    """Pre-norm block: x += ls1 * Attn(RMSNorm(x)); x += ls2 * MLP(RMSNorm(x)). (N, dim) -> (N, dim).

    The official fused path carries (branch, residual) between blocks and its hidden state is their sum;
    the additions happen in the same order here, so the results are the same.
    """

    def __init__(self, cfg: InternVideo2Config, drop_path: float = 0.0):
        super().__init__()
        D = cfg.embed_dim
        self.norm1 = RMSNorm(D)
        self.attn = InternVideo2Attention(D, cfg.num_heads, cfg.qkv_bias, cfg.qk_normalization, cfg.attn_backend)
        self.ls1 = LayerScale(D, cfg.init_values)
        self.norm2 = RMSNorm(D)
        self.mlp = InternVideo2Mlp(D, cfg.mlp_hidden_dim, cfg.mlp_act)
        self.ls2 = LayerScale(D, cfg.init_values)
        self.drop_path = drop_path

    # The same residual layout as FluxViT's block (norm1 / attn / ls1, norm2 / mlp / ls2, stochastic depth):
    # x (N, D), PackedSeqs, drop -> (N, D).
    forward = Block.forward


class PatchEmbed3d(nn.Module):
    """Conv3d patch embedding, kernel = stride = (tubelet, p, p), with bias and no norm.

    (B, C, T, H, W) -> (B, T / tubelet, (H/p) * (W/p), dim), tokens t-major, then h, then w.
    """

    def __init__(self, patch_size: int, tubelet_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=(tubelet_size, patch_size, patch_size),
                              stride=(tubelet_size, patch_size, patch_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(3).permute(0, 2, 3, 1)


def resize_internvideo2_pos_embed(pos_embed: torch.Tensor, src_grid: Sequence[int],
                                  dst_grid: Sequence[int]) -> torch.Tensor:
    """Resize a (1, 1 + T0*H0*W0, D) pos-embed stored for ``src_grid`` (T0, H0, W0) to ``dst_grid``.

    The official ``interpolate_pos_embed`` steps: linear interpolation in time, then bicubic in space
    (align_corners False), each only when that part of the grid changes; the cls row is kept.
    """
    (T0, H0, W0), D = src_grid, pos_embed.shape[-1]
    if pos_embed.shape[1] != 1 + T0 * H0 * W0:
        raise ValueError(f"pos_embed has {pos_embed.shape[1]} rows, grid {tuple(src_grid)} needs {1 + T0 * H0 * W0}")
    if tuple(src_grid) == tuple(dst_grid):
        return pos_embed
    grid = resize_pos_grid(pos_embed[0, 1:].reshape(T0, H0, W0, D), *dst_grid)
    return torch.cat([pos_embed[0, :1], grid.reshape(-1, D)], dim=0)[None]


@dataclass
class InternVideo2Features:
    """One packed forward pass over V clips (view v owns rows ``cu_seqlens[v]:cu_seqlens[v+1]``, cls first,
    then its kept tokens in space-time order).

    Attributes:
        cu_seqlens: (V + 1,) int64.
        keep: V tensors (k_v,) kept token indices into the clip's T'*h*w grid (ascending).
        grids: V tuples (T', h, w).
        hidden: block index (0-based) -> (N, dim) packed hidden states after that block (not normalised).
        pooled: (V, clip_embed_dim) projector output (not normalised).
        attn: (N,) projector attention from each view's query to each of its rows (cls row included).
        lengths: V host ints, the views' row counts (splitting reads nothing back from the device).
    """

    cu_seqlens: torch.Tensor
    keep: list
    grids: list
    hidden: dict
    pooled: torch.Tensor
    attn: torch.Tensor
    lengths: tuple = ()

    def split(self, packed: torch.Tensor) -> list:
        """Per-view pieces of a packed (N, ...) tensor."""
        lengths = list(self.lengths) if self.lengths else torch.diff(self.cu_seqlens).tolist()
        return list(torch.split(packed, lengths))


class TeacherForward(NamedTuple):
    """The official teacher's distillation outputs (``clip_norm_type='l2'``, ``return_attn=True``).

    hidden: (K, B, 1 + N, dim) L2-normalised hidden states after the requested blocks, ascending block order.
    pooled: (B, clip_embed_dim) L2-normalised projector output.
    attn: (B, N) projector attention from its query to the N patch tokens, head mean, cls key dropped.
    """

    hidden: torch.Tensor
    pooled: torch.Tensor
    attn: torch.Tensor


class InternVideo2(PackedBlockStack, nn.Module):
    """InternVideo2 vision encoder (the official distillation teacher) on packed variable-length sequences.

    ``model(video, num_tokens=None)`` -> (B, clip_embed_dim) projector output (the teacher, no classes), or
    logits (B, num_classes) through ``fc_norm`` and ``head``. ``forward_teacher`` and ``forward_packed`` return
    intermediate states for distillation.

    timm's model contract, with video meaning: ``num_classes``; ``num_features`` = ``head_hidden_size`` =
    ``clip_embed_dim`` (the projector's output width); ``forward_head(forward_features(x), pre_logits)``;
    ``get_classifier`` / ``reset_classifier(n)`` (0 gives features); ``group_matcher`` (the release's layer ids),
    ``no_weight_decay``, ``set_grad_checkpointing``; ``pretrained_cfg`` is set by ``create_model``.
    """

    def __init__(self, config: InternVideo2Config | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = InternVideo2Config(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        self.config = cfg = config
        D, p = cfg.embed_dim, cfg.patch_size
        self.num_classes, self.in_chans, self.embed_dim = cfg.num_classes, cfg.in_chans, D
        self.num_features = self.head_hidden_size = cfg.clip_embed_dim
        self.pos_grid = (cfg.num_frames // cfg.tubelet_size, cfg.img_size // p, cfg.img_size // p)
        self.patch_embed = PatchEmbed3d(p, cfg.tubelet_size, cfg.in_chans, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + math.prod(self.pos_grid), D))
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()  # also under a meta device
        self.blocks = nn.ModuleList(InternVideo2Block(cfg, rates[i]) for i in range(cfg.depth))
        self.clip_projector = AttentionPoolingHead(D, cfg.attn_pool_num_heads, cfg.clip_embed_dim)
        # The official finetuning classifier; the teacher's checkpoint has neither tensor.
        self.fc_norm = nn.LayerNorm(cfg.clip_embed_dim) if cfg.num_classes else nn.Identity()
        self.head = nn.Linear(cfg.clip_embed_dim, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.reset_parameters()

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def return_layers(self, num_layers: int, interval: float) -> list[int]:
        """The official teacher's return blocks, ascending: ``depth - int(i * interval) - 1`` for i < K."""
        return sorted({self.depth - int(i * interval) - 1 for i in range(num_layers)})

    def pos_embed_for(self, frames: int, height: int, width: int) -> torch.Tensor:
        """Pos-embed for a (frames, height, width) token grid: (1 + frames*height*width, dim), cls row first."""
        return resize_internvideo2_pos_embed(self.pos_embed, self.pos_grid, (frames, height, width))[0]

    # ---------------------------------------------------------------- inputs
    def _clips(self, video: VideoInput) -> list:
        cfg = self.config
        if isinstance(video, torch.Tensor):
            if video.dim() != 5:
                raise ValueError(f"video must have shape (B, C, T, H, W), got rank {video.dim()} {tuple(video.shape)}")
            clips = list(video.unbind(0))
        elif isinstance(video, (list, tuple)) and all(isinstance(c, torch.Tensor) for c in video):
            clips = list(video)
        else:
            raise ValueError("video must be a tensor (B, C, T, H, W) or a list of (C, T, H, W) tensors")
        if not clips:
            raise ValueError("video batch is empty")
        for i, c in enumerate(clips):
            if c.dim() != 4 or c.shape[0] != cfg.in_chans:
                raise ValueError(f"clip {i}: expected ({cfg.in_chans}, T, H, W), got {tuple(c.shape)}")
            _, T, H, W = c.shape
            if T < 1 or T % cfg.tubelet_size:
                raise ValueError(f"clip {i}: T={T} must be a positive multiple of tubelet_size {cfg.tubelet_size}")
            if H < 1 or W < 1 or H % cfg.patch_size or W % cfg.patch_size:
                raise ValueError(f"clip {i}: H and W must be positive multiples of the patch size "
                                 f"{cfg.patch_size}, got H={H}, W={W}")
        return clips

    def _layer_indices(self, layers: Sequence[int]) -> list[int]:
        out = set()
        for layer in layers:
            idx = layer + self.depth if layer < 0 else layer
            if not 0 <= idx < self.depth:
                raise ValueError(f"layer {layer} out of range for depth {self.depth}")
            out.add(idx)
        return sorted(out)

    # ---------------------------------------------------------------- engine
    def forward_packed(self, video: VideoInput, layers: Sequence[int] = (),
                       num_tokens: Union[int, None, Sequence[Union[int, None]]] = None) -> InternVideo2Features:
        """One packed pass over every clip.

        Args:
            video: (B, C, T, H, W) or a list of clips (C, T_i, H_i, W_i) with their own grids.
            layers: block indices (negative from the end) whose hidden states to return.
            num_tokens: token budget, one for all clips or one per clip; tokens are kept by the group-dynamic
                selector scored on the patch embeddings; None (or a budget >= the clip's tokens) keeps all.

        Returns:
            ``InternVideo2Features``.
        """
        clips = self._clips(video)
        n = len(clips)
        budgets = list(num_tokens) if isinstance(num_tokens, (list, tuple)) else [num_tokens] * n
        if len(budgets) != n:
            raise ValueError(f"num_tokens has {len(budgets)} entries for {n} clips")
        for b in budgets:
            if b is not None and (isinstance(b, bool) or int(b) != b or b < 1):
                raise ValueError(f"num_tokens (token budget) must be an integer >= 1 or None, got {b!r}")
        wanted = set(self._layer_indices(layers))
        p, tub = self.config.patch_size, self.config.tubelet_size

        # Embed each distinct (shape, budget) group once, batched; keep its selected rows.
        groups: dict = {}
        for i, (clip, b) in enumerate(zip(clips, budgets)):
            groups.setdefault((tuple(clip.shape), b), []).append(i)
        rows: list = [None] * n
        keep: list = [None] * n
        grids: list = [None] * n
        for ((_, T, H, W), budget), idx in groups.items():
            grid = (T // tub, H // p, W // p)
            e = self.patch_embed(torch.stack([clips[i] for i in idx]).to(self.dtype))  # (b, T', L, D)
            pos = self.pos_embed_for(*grid)
            total = e.shape[1] * e.shape[2]
            x = e.flatten(1, 2) + pos[1:]
            if budget is None or budget >= total:
                sel = torch.arange(total, device=x.device).expand(len(idx), total)
            else:
                with torch.no_grad():
                    sel = select_tokens(e, int(budget))
            x = torch.gather(x, 1, sel.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            cls = (self.cls_token[0, 0] + pos[0]).expand(len(idx), 1, -1)
            x = torch.cat([cls.to(x.dtype), x], dim=1)
            for j, i in enumerate(idx):
                rows[i], keep[i], grids[i] = x[j], sel[j], grid
        x = torch.cat(rows)
        # Lengths are host ints: cu_seqlens, max_seqlen and segment ids are built once, no block syncs.
        pack = PackedSeqs([r.shape[0] for r in rows], x.device)
        cu = pack.cu_seqlens.long()
        x, hidden = self.run_blocks(x, pack, wanted)
        pooled, attn = self.clip_projector(x, cu, pack.seg, return_attention=True)
        return InternVideo2Features(cu_seqlens=cu, keep=keep, grids=grids, hidden=hidden, pooled=pooled, attn=attn,
                                    lengths=pack.lengths)

    def forward_teacher(self, video: VideoInput, layers: Sequence[int],
                        num_tokens: Union[int, None] = None) -> TeacherForward:
        """The official teacher's ``forward`` in the distillation path, for clips that keep equally many tokens
        (a dense batch, or a list whose clips keep the same count).

        Args:
            video: (B, C, T, H, W) or a list of clips.
            layers: block indices whose hidden states to return (stacked ascending, duplicates merged).
            num_tokens: token budget per clip (group-dynamic selector), None keeps all T'*h*w tokens.

        Returns:
            ``TeacherForward(hidden (K, B, 1 + N, dim), pooled (B, clip_embed_dim), attn (B, N))``, the first
            two L2-normalised as in the official ``clip_norm_type='l2'``.
        """
        order = self._layer_indices(layers)
        f = self.forward_packed(video, order, num_tokens)
        lengths = list(f.lengths)
        if len(set(lengths)) != 1:
            raise ValueError(f"forward_teacher stacks clips of equal kept-token counts, got {lengths}; "
                             "use forward_packed for mixed grids or budgets")
        B, n = len(lengths), lengths[0]
        z = torch.stack([f.hidden[i].view(B, n, -1) for i in order]) if order else f.pooled.new_zeros(0, B, n, 0)
        z = z / z.norm(dim=-1, keepdim=True)
        pooled = f.pooled / f.pooled.norm(dim=-1, keepdim=True)
        return TeacherForward(z, pooled, f.attn.view(B, n)[:, 1:])

    def forward_features(self, video: VideoInput, num_tokens: Union[int, None, Sequence[Union[int, None]]] = None,
                         *, layers: Sequence[int] = ()) -> InternVideo2Features:
        """timm's features step: ``forward_packed(video, layers, num_tokens)``."""
        return self.forward_packed(video, layers, num_tokens)

    def forward_head(self, feats: InternVideo2Features, pre_logits: bool = False) -> torch.Tensor:
        """``fc_norm`` of the projector output (B, num_features) when ``pre_logits`` (the raw projector output
        when the model has no ``fc_norm``, as the teacher), else ``head`` of it, (B, num_classes)."""
        z = self.fc_norm(feats.pooled)
        return z if pre_logits else self.head(z)

    def get_classifier(self) -> nn.Module:
        """The classifier (``nn.Identity`` for the teacher)."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Union[str, None] = None) -> None:
        """A new ``head`` for ``num_classes`` (trunc-normal 0.02, zero bias; adds the official ``fc_norm`` when the
        model has none), or ``nn.Identity`` for 0 (the model then returns features). ``global_pool``: only None
        (the attention-pooling projector is the model's pooling)."""
        if global_pool is not None:
            raise ValueError(f"global_pool={global_pool!r}: InternVideo2 pools with its attention-pooling projector; "
                             f"pass None")
        if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0, got {num_classes!r}")
        ref = self.clip_projector.cross_attn.proj.weight
        if num_classes:
            if isinstance(self.fc_norm, nn.Identity):
                self.fc_norm = nn.LayerNorm(self.num_features, device=ref.device, dtype=ref.dtype)
            self.head = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        else:
            self.head = nn.Identity()
        self.num_classes = int(num_classes)
        self.config = dataclasses.replace(self.config, num_classes=self.num_classes)

    def forward(self, video: VideoInput, num_tokens: Union[int, None] = None) -> torch.Tensor:
        """Projector output (B, clip_embed_dim), not normalised (the teacher); logits (B, num_classes) with a
        classifier."""
        return self.forward_head(self.forward_features(video, num_tokens))
