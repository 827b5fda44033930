"""FluxViT: a video ViT that runs any token budget on any frame count and resolution.

Pipeline of one clip (B, 3, T, H, W) -> logits (paper section 3; names follow the official release):

    DPN patch embedding (T, L, dim), L = (H/14) * (W/14)
    + global PE (learnable 3-D grid, per-channel affine ``gpe_proj``, resized to (T, H/14, W/14))
    -> group-dynamic token selection down to the budget (after the PE, so kept tokens keep their position)
    -> cls token + kept tokens, packed with every other clip of the batch (``cu_seqlens``, no padding)
    -> ``depth`` blocks (RMSNorm, qk-norm, local PE, LayerScale)
    -> attention pooling head k of three (budgets 3072 / 2048 / 1024), LayerNorm, classifier k.

Inputs are either a dense tensor (B, 3, T, H, W) or a list of clips (3, T_i, H_i, W_i) with their own
grids; both run as one packed sequence. A budget ``num_tokens`` may be one int or one per clip.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Sequence, Union

import torch
from torch import nn

from .attention import PackedSeqs
from .layers import AlignDecoder, AttentionPoolingHead, Block, ChannelAffine, DualNormPatchEmbed, PackedBlockStack
from .pos_embed import resize_pos_grid
from .selector import select_tokens

__all__ = ["FluxFeatures", "FluxViT", "FluxViTConfig", "VideoInput"]

VideoInput = Union[torch.Tensor, Sequence[torch.Tensor]]
Budget = Union[int, None]


@dataclass
class FluxViTConfig:
    """Architecture of a FluxViT. ``img_size`` and ``num_frames`` fix the stored pos-embed grid only;
    any input grid runs (the grid is resized at run time)."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 14
    img_size: int = 224
    num_frames: int = 8
    in_chans: int = 3
    num_classes: int = 400
    clip_embed_dim: int = 768
    attn_pool_num_heads: int = 16
    drop_path_rate: float = 0.0
    init_values: float = 1e-5
    head_budgets: tuple = (3072, 2048, 1024)
    num_align_decoders: int = 2
    attn_backend: Union[str, None] = None

    def __post_init__(self):
        self.head_budgets = tuple(int(b) for b in self.head_budgets)
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % 16:
            raise ValueError(f"embed_dim must be divisible by 16 (3-D sin-cos PE), got {self.embed_dim}")
        if not self.head_budgets:
            raise ValueError("head_budgets needs at least one budget")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class FluxFeatures:
    """What one packed forward pass returns to training stages.

    Tokens are packed per *view* (one clip at one budget): view i owns rows
    ``cu_seqlens[i]:cu_seqlens[i+1]`` of every packed tensor; its first row is the cls token, the others
    its kept tokens in space-time order.

    Attributes:
        cu_seqlens: (V + 1,) int64 cumulative view lengths.
        keep: V tensors (k_i,) of kept token indices into the view's flattened T*H'*W' grid (ascending).
        grids: V tuples (T, H/p, W/p).
        clip_index: V ints, the input clip each view came from.
        heads: V ints, the pooling head each view used.
        layers: block index (0-based, as requested) -> (N, dim) packed token features after that block.
        last: (N, dim) packed tokens after the last block.
        pooled: (V, clip_embed_dim) pooled features of the views' heads (before ``fc_norm``).
        aligned: (V, clip_embed_dim) L2-normalised decoder output, or None when not requested.
        lengths: V host ints, the views' row counts (so splitting reads nothing back from the device).
    """

    cu_seqlens: torch.Tensor
    keep: list
    grids: list
    clip_index: list
    heads: list
    last: torch.Tensor
    pooled: torch.Tensor
    layers: dict = field(default_factory=dict)
    aligned: Union[torch.Tensor, None] = None
    lengths: tuple = ()

    def split(self, packed: torch.Tensor) -> list:
        """Split a packed (N, ...) tensor into V per-view tensors."""
        lengths = list(self.lengths) if self.lengths else torch.diff(self.cu_seqlens).tolist()
        return list(torch.split(packed, lengths))

    def patch_tokens(self, packed: torch.Tensor) -> list:
        """Per-view kept-token rows of ``packed`` without the cls row: V tensors (k_i, ...)."""
        return [t[1:] for t in self.split(packed)]


@dataclass
class _View:
    clip: int
    num_tokens: Budget
    keep: Union[torch.Tensor, None]
    head: Union[int, None]


class FluxViT(PackedBlockStack, nn.Module):
    """FluxViT video encoder with three budget pooling heads, classifiers and two alignment decoders.

    ``model(video, num_tokens=None, head=None)`` -> logits (B, num_classes), or the normalised pooled
    feature (B, clip_embed_dim) when ``num_classes == 0``. ``forward_features`` and ``forward_multi``
    return ``FluxFeatures`` for training stages. ``set_grad_checkpointing`` / ``compile_blocks``: see
    ``PackedBlockStack``.

    timm's model contract, with video meaning: ``num_classes``; ``num_features`` = ``head_hidden_size`` =
    ``clip_embed_dim``, the width of the pooled feature the classifiers read (tokens are ``embed_dim`` wide);
    ``forward_head(forward_features(x), pre_logits)``; ``get_classifier()`` (the budget heads) and
    ``reset_classifier(n)`` (all of them, 0 gives features); ``group_matcher`` (the release's layer ids),
    ``no_weight_decay``, ``set_grad_checkpointing``; ``pretrained_cfg`` is set by ``create_model``.
    """

    def __init__(self, config: FluxViTConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = FluxViTConfig(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        self.config = cfg = config
        D, p = cfg.embed_dim, cfg.patch_size
        self.num_classes, self.in_chans, self.embed_dim = cfg.num_classes, cfg.in_chans, D
        self.num_features = self.head_hidden_size = cfg.clip_embed_dim
        self.pos_grid = (cfg.num_frames, cfg.img_size // p, cfg.img_size // p)
        self.patch_embed = DualNormPatchEmbed(p, cfg.in_chans, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + math.prod(self.pos_grid), D))
        self.gpe_proj = ChannelAffine(D)
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(D, cfg.num_heads, cfg.mlp_ratio, cfg.init_values, rates[i], cfg.attn_backend)
            for i in range(cfg.depth)
        )
        nb = len(cfg.head_budgets)
        self.clip_projector = nn.ModuleList(
            AttentionPoolingHead(D, cfg.attn_pool_num_heads, cfg.clip_embed_dim) for _ in range(nb)
        )
        self.fc_norm = nn.LayerNorm(cfg.clip_embed_dim)
        self.head = nn.ModuleList(
            nn.Linear(cfg.clip_embed_dim, cfg.num_classes) if cfg.num_classes else nn.Identity() for _ in range(nb)
        )
        self.final_clip_decoder_for_projs = nn.ModuleList(
            AlignDecoder(cfg.clip_embed_dim) for _ in range(cfg.num_align_decoders)
        )
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    @property
    def num_heads_pool(self) -> int:
        return len(self.clip_projector)

    # ------------------------------------------------------------- utilities
    def nearest_head(self, num_tokens: int, heads: Sequence[int] | None = None) -> int:
        """Index of the pooling head whose budget is nearest ``num_tokens`` (first on ties), among ``heads``
        (default: all; a Flux-Single model has only its trained head)."""
        budgets = self.config.head_budgets
        return min(heads or range(len(budgets)), key=lambda i: (abs(budgets[i] - num_tokens), i))

    def pos_embed_for(self, frames: int, height: int, width: int) -> torch.Tensor:
        """Global PE for a (frames, height, width) patch grid: (1 + frames*height*width, dim), cls row first."""
        D = self.config.embed_dim
        grid = self.gpe_proj(self.pos_embed[0, 1:]).reshape(*self.pos_grid, D)
        grid = resize_pos_grid(grid, frames, height, width).reshape(-1, D)
        return torch.cat([self.pos_embed[0, :1], grid], dim=0)

    def _check_clip(self, clip: torch.Tensor, where: str) -> None:
        cfg = self.config
        if clip.dim() != 4:
            raise ValueError(f"{where}: expected a clip of shape (C, T, H, W), got rank {clip.dim()} {tuple(clip.shape)}")
        C, T, H, W = clip.shape
        if C != cfg.in_chans:
            raise ValueError(f"{where}: expected {cfg.in_chans} channels in dim 1 of (B, C, T, H, W), got {C}")
        if T < 1:
            raise ValueError(f"{where}: a clip needs at least one frame")
        if H % cfg.patch_size or W % cfg.patch_size or H == 0 or W == 0:
            raise ValueError(f"{where}: H and W must be positive multiples of the patch size {cfg.patch_size}, "
                             f"got H={H}, W={W}")

    def _as_clips(self, video: VideoInput) -> tuple[list, bool]:
        if isinstance(video, torch.Tensor):
            if video.dim() != 5:
                raise ValueError(f"video must have shape (B, C, T, H, W), got rank {video.dim()} {tuple(video.shape)}")
            if video.shape[0] < 1:
                raise ValueError("video batch is empty")
            self._check_clip(video[0], "video")
            return list(video.unbind(0)), True
        if isinstance(video, (list, tuple)):
            if not video:
                raise ValueError("video list is empty")
            for i, clip in enumerate(video):
                if not isinstance(clip, torch.Tensor):
                    raise ValueError(f"clip {i} is a {type(clip).__name__}, expected a tensor (C, T, H, W)")
                self._check_clip(clip, f"clip {i}")
            return list(video), False
        raise ValueError(f"video must be a tensor (B, C, T, H, W) or a list of (C, T, H, W) tensors, "
                         f"got {type(video).__name__}")

    def _per_clip(self, value, n: int, name: str) -> list:
        if isinstance(value, (list, tuple)):
            if len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries for {n} clips")
            return list(value)
        if isinstance(value, torch.Tensor) and name == "keep":
            return list(value.unbind(0)) if value.dim() == 2 else [value] * n
        return [value] * n

    def _check_budget(self, budget) -> None:
        if budget is not None and (isinstance(budget, bool) or int(budget) != budget or budget < 1):
            raise ValueError(f"num_tokens (token budget) must be an integer >= 1 or None, got {budget!r}")

    def _check_head(self, head) -> None:
        if head is not None and not (isinstance(head, int) and 0 <= head < self.num_heads_pool):
            raise ValueError(f"head must be an int in [0, {self.num_heads_pool - 1}] or None, got {head!r}")

    # ------------------------------------------------------------ the engine
    def _run_views(self, clips: list, views: list, layers: Sequence[int], align: Union[int, None]) -> FluxFeatures:
        for v in views:
            self._check_budget(v.num_tokens)
            self._check_head(v.head)
        if align is not None and not (isinstance(align, int) and 0 <= align < len(self.final_clip_decoder_for_projs)):
            raise ValueError(f"align must index one of the {len(self.final_clip_decoder_for_projs)} decoders, got {align!r}")
        depth = len(self.blocks)
        wanted = {}
        for layer in layers:
            idx = layer + depth if layer < 0 else layer
            if not 0 <= idx < depth:
                raise ValueError(f"layer {layer} out of range for depth {depth}")
            wanted[idx] = layer

        # Patch-embed and position-encode every distinct clip shape once, batched, into one token table
        # [cls_g0, tokens of group 0 ..., cls_g1, tokens of group 1 ...]; views are then one gather from it
        # (a single index op, so the backward pass is one scatter-add, not one per view).
        p = self.config.patch_size
        by_shape: dict = {}
        for i, clip in enumerate(clips):
            by_shape.setdefault(tuple(clip.shape), []).append(i)
        emb, grid_of, clip_row, cls_row = {}, {}, {}, {}
        table, offset = [], 0
        for shape, idx in by_shape.items():
            _, T, H, W = shape
            batch = torch.stack([clips[i] for i in idx]).to(self.dtype)
            e = self.patch_embed(batch)  # (b, T, L, D)
            pos = self.pos_embed_for(T, H // p, W // p)
            x = e.flatten(1, 2) + pos[1:]
            table += [(self.cls_token[0, 0] + pos[0])[None], x.flatten(0, 1)]
            n_tok = x.shape[1]
            for j, i in enumerate(idx):
                emb[i], grid_of[i] = e[j], (T, H // p, W // p)
                cls_row[i], clip_row[i] = offset, offset + 1 + j * n_tok
            offset += 1 + x.shape[0] * n_tok
        table = torch.cat(table)

        # Select each view's tokens; views of one shape and budget are selected together.
        device = table.device
        keep: list = [None] * len(views)
        pending: dict = {}
        for vi, v in enumerate(views):
            T, h, w = grid_of[v.clip]
            if v.keep is not None:
                k = torch.as_tensor(v.keep, device=device).long().reshape(-1)
                if k.numel():  # checked on the device: no read back to the host (a device-side assert on CUDA)
                    try:
                        torch._assert_async((k.min() >= 0) & (k.max() < T * h * w),
                                            f"keep indices of view {vi} fall outside its {T * h * w} tokens")
                    except RuntimeError as err:  # raised at once on CPU
                        raise ValueError(str(err)) from None
                keep[vi] = k
            elif v.num_tokens is None or v.num_tokens >= T * h * w:
                keep[vi] = torch.arange(T * h * w, device=device)
            else:
                pending.setdefault((tuple(clips[v.clip].shape), v.num_tokens), []).append(vi)
        for (_, budget), vis in pending.items():
            with torch.no_grad():
                sel = select_tokens(torch.stack([emb[views[vi].clip] for vi in vis]), budget)
            for vi, s in zip(vis, sel):
                keep[vi] = s

        # Pack: lengths are host ints (kept-index tensors have host-known sizes), so cu_seqlens, max_seqlen
        # and segment ids are built here once and no block reads anything back from the device.
        rows = []
        for vi, v in enumerate(views):
            rows += [keep[vi].new_full((1,), cls_row[v.clip]), keep[vi] + clip_row[v.clip]]
        x = table[torch.cat(rows)]
        lengths = [1 + k.numel() for k in keep]
        pack = PackedSeqs(lengths, device)
        cu = pack.cu_seqlens.long()
        x, outs = self.run_blocks(x, pack, wanted)
        out_layers = {wanted[i]: t for i, t in outs.items()}

        heads = [v.head if v.head is not None else self.nearest_head(lengths[vi] - 1) for vi, v in enumerate(views)]
        pooled = self._pool(x, cu, pack.seg, heads, lengths)
        aligned = self.final_clip_decoder_for_projs[align](pooled) if align is not None else None
        return FluxFeatures(cu_seqlens=cu, keep=keep, grids=[grid_of[v.clip] for v in views],
                            clip_index=[v.clip for v in views], heads=heads, last=x, pooled=pooled,
                            layers=out_layers, aligned=aligned, lengths=pack.lengths)

    def _pool(self, x, cu, seg, heads, lengths) -> torch.Tensor:
        if len(set(heads)) == 1:
            return self.clip_projector[heads[0]](x, cu, seg)
        pooled = x.new_zeros(len(heads), self.config.clip_embed_dim)
        parts = x.split(lengths)
        for h in sorted(set(heads)):
            vis = [i for i, hh in enumerate(heads) if hh == h]
            sub = PackedSeqs([lengths[i] for i in vis], x.device)
            rows = torch.cat([parts[i] for i in vis])
            pooled[vis] = self.clip_projector[h](rows, sub.cu_seqlens, sub.seg).to(pooled.dtype)
        return pooled

    # ---------------------------------------------------------------- public
    def forward_features(
        self,
        video: VideoInput,
        num_tokens: Union[Budget, Sequence[Budget]] = None,
        head: Union[int, None, Sequence[Union[int, None]]] = None,
        *,
        keep: Union[torch.Tensor, Sequence[torch.Tensor], None] = None,
        layers: Sequence[int] = (),
        align: Union[int, None] = None,
    ) -> FluxFeatures:
        """One view per clip.

        Args:
            video: (B, C, T, H, W) tensor or a list of B clips (C, T_i, H_i, W_i).
            num_tokens: token budget, one for all clips or one per clip; None keeps every token.
            head: pooling head index (one or per clip); default the head whose budget is nearest the
                number of kept tokens.
            keep: explicit kept-token indices instead of the selector, (B, k) or B tensors (k_i,)
                (used by masked distillation).
            layers: block indices (negative from the end) whose packed outputs to return.
            align: index of the alignment decoder to apply to the pooled features.

        Returns:
            ``FluxFeatures`` with B views.
        """
        clips, _ = self._as_clips(video)
        n = len(clips)
        budgets = self._per_clip(num_tokens, n, "num_tokens")
        heads = self._per_clip(head, n, "head")
        keeps = self._per_clip(keep, n, "keep")
        views = [_View(i, budgets[i], keeps[i], heads[i]) for i in range(n)]
        return self._run_views(clips, views, layers, align)

    def forward_multi(
        self,
        video: VideoInput,
        budgets: Sequence[int],
        heads: Union[Sequence[int], None] = None,
        *,
        layers: Sequence[int] = (),
        align: Union[int, None] = None,
    ) -> FluxFeatures:
        """Every clip at several budgets in one packed pass (Flux-Multi), budget-major views.

        View ``j * B + i`` is clip i at ``budgets[j]`` with ``heads[j]`` (default: head j when there are as
        many budgets as heads, else the nearest head). Returns ``FluxFeatures`` with len(budgets) * B views.
        """
        clips, _ = self._as_clips(video)
        if heads is None:
            heads = list(range(len(budgets))) if len(budgets) == self.num_heads_pool else [None] * len(budgets)
        if len(heads) != len(budgets):
            raise ValueError(f"{len(heads)} heads for {len(budgets)} budgets")
        views = [_View(i, b, None, h) for b, h in zip(budgets, heads) for i in range(len(clips))]
        return self._run_views(clips, views, layers, align)

    def forward_head(self, feats: FluxFeatures, pre_logits: bool = False) -> torch.Tensor:
        """timm's head step on ``forward_features``' output: ``fc_norm`` of each view's pooled feature,
        (V, num_features), when ``pre_logits``, else the classifier of each view's budget head, (V, num_classes)."""
        z = self.fc_norm(feats.pooled)
        if pre_logits:
            return z
        heads = feats.heads
        if len(set(heads)) == 1:
            return self.head[heads[0]](z)
        rows = [self.head[h](z[i:i + 1]) for i, h in enumerate(heads)]
        return torch.cat(rows, dim=0)

    def logits(self, feats: FluxFeatures) -> torch.Tensor:
        """Classifier outputs (V, num_classes) of each view's head from ``FluxFeatures`` (``forward_head``)."""
        return self.forward_head(feats)

    def get_classifier(self) -> nn.ModuleList:
        """The classifiers, one per budget head (``head[k]`` reads pooling head k's normalised feature)."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Union[str, None] = None) -> None:
        """New classifiers for ``num_classes`` on every budget head (trunc-normal 0.02, zero bias), or none
        (``nn.Identity``, the model then returns the (B, num_features) normalised pooled feature) for 0.

        ``global_pool`` is timm's argument; FluxViT pools with its attention-pooling heads, so only None is valid.
        """
        if global_pool is not None:
            raise ValueError(f"global_pool={global_pool!r}: FluxViT pools with its budget attention-pooling heads; "
                             f"pass None")
        if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0, got {num_classes!r}")
        ref = self.fc_norm.weight
        heads = []
        for _ in range(self.num_heads_pool):
            if num_classes:
                lin = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
                nn.init.trunc_normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
                heads.append(lin)
            else:
                heads.append(nn.Identity())
        self.head = nn.ModuleList(heads)
        self.num_classes = int(num_classes)
        self.config = dataclasses.replace(self.config, num_classes=self.num_classes)

    def forward(
        self,
        video: VideoInput,
        num_tokens: Union[Budget, Sequence[Budget]] = None,
        head: Union[int, None, Sequence[Union[int, None]]] = None,
    ) -> torch.Tensor:
        """Logits (B, num_classes) for a dense (B, C, T, H, W) batch or a list of clips.

        ``num_tokens`` is the token budget K: tokens are selected only when T*L > K, with
        rho = 1 - K / (T*L). ``head`` picks the pooling head (default: nearest budget).
        """
        return self.forward_head(self.forward_features(video, num_tokens, head))
