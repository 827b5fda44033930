"""Packed variable-length self-attention with interchangeable kernels.

Every FluxViT forward pass packs the kept tokens of all clips of a batch into one sequence of shape
(N_total, heads, head_dim). The packing is described once per forward by a ``PackedSeqs``: the sequence
lengths as host integers (known when the batch is packed), ``cu_seqlens`` (num_seqs + 1,) on the device,
``max_seqlen`` and the per-token segment ids. Tokens of one clip attend only to tokens of the same clip;
nothing is padded. Everything a kernel needs is built and checked once at packing, so the attention calls
inside the blocks never read a device tensor back to the host (no host-device synchronisation).

Backends, in the order ``"auto"`` tries them:

=================  =====================================================================  ==================
name               kernel                                                                 where
=================  =====================================================================  ==================
``flash``          ``flash_attn.flash_attn_varlen_func`` (optional ``gpu`` extra)         CUDA, fp16 / bf16
``torch_varlen``   ``torch.nn.attention.varlen.varlen_attn`` (PyTorch's own varlen)       CUDA, fp16 / bf16
``flex``           ``torch.nn.attention.flex_attention`` (compiled) with a document       CUDA (any dtype);
                   block mask from ``cu_seqlens``, built once per forward                 CPU forward only
``nested``         SDPA on a jagged nested tensor (``torch.nested`` layout=jagged)        CPU and CUDA
``segments``       one fused SDPA call per sequence (no padding, no mask)                 CPU and CUDA
``block_mask``     SDPA over the whole pack with a dense block-diagonal boolean mask      small packs only
``math``           explicit softmax(QK^T)V per sequence in fp32: the reference            anywhere
=================  =====================================================================  ==================

``auto``: flash, then torch_varlen (CUDA half precision); then ``flex`` on CUDA (the fallback when
flash-attn is absent or the dtype is fp32); else ``segments``. On CPU, compiled ``flex`` measured level with
``segments`` (S/14 dims: 1.13 s vs 1.24 s; B/14 dims: 1.92 s vs 1.60 s on a mixed 6660-token pack) after a
15-30 s compile per pack length, and it has no CPU backward, so ``auto`` keeps ``segments`` there.

Choose one with the environment variable ``FLUXVIT_ATTN_BACKEND`` or a model's ``attn_backend`` config
field; ``force_backend`` is a context manager for tests. A requested backend that cannot run on the
given tensors raises ``RuntimeError`` (an explicit choice never silently falls back).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "PackedSeqs",
    "available_backends",
    "force_backend",
    "has_flash_attn",
    "record_backends",
    "resolve_backend",
    "varlen_attention",
]

ENV_VAR = "FLUXVIT_ATTN_BACKEND"
BACKENDS = ("flash", "torch_varlen", "flex", "nested", "segments", "block_mask", "math")
FLEX_BLOCK = 128  # FlexAttention's default sparse block size (tokens per q / kv tile)
_forced: list[str] = []
_recorders: list[dict] = []


class PackedSeqs:
    """How a packed (N_total, ...) token tensor splits into sequences; built once per forward.

    Built from the sequence lengths, which are host integers when a batch is packed, so nothing here reads
    the device: ``cu_seqlens`` is copied host-to-device (pinned, non-blocking on CUDA) and every derived
    tensor is computed on the device without a synchronisation.

    Attributes:
        lengths: tuple of S host ints (each >= 1).
        total: N_total = sum(lengths).
        max_seqlen: longest sequence.
        cu_seqlens: (S + 1,) int32 on ``device``, cumulative lengths starting at 0.
        seg: (N_total,) int64 on ``device``, the sequence index of every token.
    """

    def __init__(self, lengths: Sequence[int], device: torch.device | str = "cpu"):
        lengths = tuple(int(n) for n in lengths)
        if not lengths or min(lengths) < 1:
            raise ValueError(f"a pack needs at least one sequence and every length >= 1, got {list(lengths)}")
        self.lengths = lengths
        self.total = sum(lengths)
        self.max_seqlen = max(lengths)
        self.device = torch.device(device)
        cum = [0]
        for n in lengths:
            cum.append(cum[-1] + n)
        host = torch.tensor(cum, dtype=torch.int32)
        if self.device.type == "cuda":  # an async copy from pinned memory does not wait for queued kernels
            host = host.pin_memory()
        self.cu_seqlens = host.to(self.device, non_blocking=True)
        counts = torch.diff(self.cu_seqlens).long()
        self.seg = torch.repeat_interleave(torch.arange(len(lengths), device=self.device), counts,
                                           output_size=self.total)
        self._block_masks: dict = {}

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, total: int | None = None) -> "PackedSeqs":
        """From a (S + 1,) cumulative-length tensor (reads it back to the host once: one sync on CUDA)."""
        cu = cu_seqlens.tolist()
        if cu_seqlens.dim() != 1 or len(cu) < 2 or cu[0] != 0:
            raise ValueError(f"cu_seqlens must be a 1-D tensor [0, ..., N_total], got {cu_seqlens.tolist()}")
        if total is not None and cu[-1] != total:
            raise ValueError(f"cu_seqlens ends at {cu[-1]} but the pack holds {total} tokens")
        return cls([b - a for a, b in zip(cu[:-1], cu[1:])], cu_seqlens.device)

    @property
    def num_seqs(self) -> int:
        return len(self.lengths)

    def flex_block_mask(self, block_size: int = FLEX_BLOCK):
        """The document mask (token i sees token j iff both are in one sequence) as a FlexAttention
        ``BlockMask``; built from the block structure of ``cu_seqlens`` (no N x N mask is materialised),
        once per pack and block size, then reused by every layer."""
        if block_size not in self._block_masks:
            self._block_masks[block_size] = _document_block_mask(self.seg, self.total, block_size)
        return self._block_masks[block_size]

    def __repr__(self) -> str:
        return f"PackedSeqs(num_seqs={self.num_seqs}, total={self.total}, max_seqlen={self.max_seqlen})"


def _document_block_mask(seg: torch.Tensor, total: int, block: int):
    """BlockMask of a block-diagonal (document) mask over ``total`` tokens with sequence ids ``seg``.

    A (q tile, kv tile) pair is *full* when both tiles lie inside one sequence (no mask evaluated), *partial*
    when their sequence ranges overlap otherwise (the mask_mod decides per token), else skipped.
    """
    from torch.nn.attention.flex_attention import BlockMask

    nb = -(-total // block)
    pad = nb * block - total
    seg_pad = F.pad(seg, (0, pad), value=-1) if pad else seg
    tiles = seg_pad.view(nb, block)
    first, last = tiles[:, 0], tiles.max(dim=1).values  # sequence ids are ascending along the pack
    pure = first == last
    if pad:
        pure = pure.clone()
        pure[-1] = False  # the padded tail tile always needs the mask
    overlap = (first[:, None] <= last[None, :]) & (first[None, :] <= last[:, None])
    full = overlap & pure[:, None] & pure[None, :] & (first[:, None] == first[None, :])
    partial = overlap & ~full

    def as_kv(blocks: torch.Tensor):
        num = blocks.sum(dim=1, dtype=torch.int32)
        idx = torch.argsort((~blocks).to(torch.int8), dim=1, stable=True).to(torch.int32)
        return num[None, None], idx[None, None]

    def document(b, h, q_idx, kv_idx):
        return seg_pad[q_idx] == seg_pad[kv_idx]

    kv_num, kv_idx = as_kv(partial)
    full_num, full_idx = as_kv(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=document,
                                    seq_lengths=(total, total))


# Optional kernels, imported once on first use. A plain dict, not functools.lru_cache: torch.compile traces
# through these lookups inside compiled blocks.
_LAZY: dict = {}


def _lazy(name: str, load: Callable[[], Callable]) -> Callable | None:
    if name not in _LAZY:
        try:
            _LAZY[name] = load()
        except Exception:  # ImportError, or a broken CUDA build raising at import
            _LAZY[name] = None
    return _LAZY[name]


def _load_flash():
    from flash_attn import flash_attn_varlen_func  # type: ignore

    return flash_attn_varlen_func


def _load_torch_varlen():
    from torch.nn.attention import varlen

    return _varlen_with_scale(varlen.varlen_attn)


def _varlen_with_scale(varlen_attn: Callable) -> Callable:
    """PyTorch's ``varlen_attn`` as ``fn(q, k, v, cu_q, cu_k, max_q, max_k, scale=...)`` on every release that
    has it: releases whose ``varlen_attn`` takes no ``scale`` keyword use head_dim ** -0.5, so another scale
    is applied to q (softmax(s * q k^T) = softmax((s / s0) q * s0 k^T), exact)."""
    import inspect

    if "scale" in inspect.signature(varlen_attn).parameters:
        return varlen_attn

    def with_scale(q, k, v, cu_q, cu_k, max_q, max_k, scale=None):
        default = q.shape[-1] ** -0.5
        if scale is not None and scale != default:
            q = q * (scale / default)
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k)

    return with_scale


def _load_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


def _flash_attn_varlen() -> Callable | None:
    """flash-attn's varlen kernel, or None when the package is not importable (it is optional)."""
    return _lazy("flash", _load_flash)


def has_flash_attn() -> bool:
    """True when flash-attn is importable (install with ``pip install 'fluxvit[gpu]'`` on a CUDA machine)."""
    return _flash_attn_varlen() is not None


def _torch_varlen() -> Callable | None:
    return _lazy("torch_varlen", _load_torch_varlen)


def _flex_attention() -> Callable | None:
    return _lazy("flex", _load_flex)


def _flex_compiled(device_type: str) -> Callable:
    # FlexAttention is a compiled kernel; called eagerly it materialises the full score matrix. On CUDA one
    # dynamic-shape compilation serves every pack length (after the first recompile); inductor's CPU flex
    # template fails to build with dynamic shapes (torch 2.14), so CPU compiles once per pack length.
    return _lazy(f"flex_compiled_{device_type}",
                 lambda: torch.compile(_flex_attention(), dynamic=False if device_type == "cpu" else None))


def _needs_grad(q: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and q.requires_grad


def _one_half_dtype(*tensors: torch.Tensor) -> bool:
    """True when every tensor is fp16, or every one is bf16 (what the fused kernels take)."""
    return tensors[0].dtype in (torch.float16, torch.bfloat16) and all(t.dtype == tensors[0].dtype for t in tensors)


def _supports(name: str, q: torch.Tensor, *kv: torch.Tensor) -> bool:
    half = _one_half_dtype(q, *kv)  # q, k and v are all checked
    if name == "flash":
        return q.is_cuda and half and has_flash_attn()
    if name == "torch_varlen":
        return q.is_cuda and half and _torch_varlen() is not None
    if name == "flex":
        # PyTorch's FlexAttention has a CPU forward but no CPU backward.
        return _flex_attention() is not None and (q.is_cuda or (q.device.type == "cpu" and not _needs_grad(q)))
    return name in BACKENDS


def available_backends(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                       requires_grad: bool = False) -> list[str]:
    """Backends that can run on tensors of this device and dtype (and need of a gradient), in ``auto`` order."""
    probe = torch.empty(0, device=device, dtype=dtype, requires_grad=requires_grad and dtype.is_floating_point)
    return [b for b in BACKENDS if _supports(b, probe)]


@contextlib.contextmanager
def force_backend(name: str) -> Iterator[None]:
    """Use backend ``name`` inside the block, over the environment variable and model configs (tests, benchmarks)."""
    if name not in BACKENDS and name != "auto":
        raise ValueError(f"unknown attention backend {name!r}; choose from {BACKENDS + ('auto',)}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def resolve_backend(q: torch.Tensor, requested: str | None = None, k: torch.Tensor | None = None,
                    v: torch.Tensor | None = None) -> str:
    """Pick the backend for ``q`` (and ``k``, ``v`` when given: the half-precision kernels need all three in
    one dtype): forced > ``requested`` (config) > ``$FLUXVIT_ATTN_BACKEND`` > auto.

    Auto: flash, torch_varlen (CUDA half precision); flex on CUDA (fp32, or no flash-attn / varlen);
    else ``segments`` (on CPU as fast as compiled flex, without its compile; see the module docstring).
    """
    name = _forced[-1] if _forced else (requested or os.environ.get(ENV_VAR) or "auto")
    kv = tuple(t for t in (k, v) if t is not None)
    if name == "auto":
        for candidate in ("flash", "torch_varlen"):
            if _supports(candidate, q, *kv):
                return _note(candidate)
        if q.is_cuda and _supports("flex", q, *kv):
            return _note("flex")
        return _note("segments")
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {BACKENDS + ('auto',)}")
    if not _supports(name, q, *kv):
        hint = ""
        if name == "flash":
            hint = " (pip install 'fluxvit[gpu]' on a CUDA machine)"
        elif name == "flex" and q.device.type == "cpu":
            hint = " (PyTorch's FlexAttention has no CPU backward; use segments to train on CPU)"
        raise RuntimeError(
            f"attention backend {name!r} cannot run on {q.device.type} "
            f"{'/'.join(str(t.dtype) for t in (q, *kv))} tensors{hint}; "
            f"available here: {available_backends(q.device, q.dtype, _needs_grad(q))}"
        )
    return _note(name)


def _note(name: str) -> str:
    if torch.compiler.is_compiling():  # traced code must not guard on (or mutate) the recorders
        return name
    for sink in _recorders:
        sink[name] = sink.get(name, 0) + 1
    return name


@contextlib.contextmanager
def record_backends() -> Iterator[dict]:
    """Count the backends ``varlen_attention`` resolves inside the block: yields a dict name -> calls
    (benchmarks report which kernel really ran). Calls inside compiled regions are not counted: there the backend
    is resolved once, when the region is traced, from the same inputs an eager call would see."""
    sink: dict = {}
    _recorders.append(sink)
    try:
        yield sink
    finally:
        _recorders.remove(sink)


def _math(q, k, v, pack: PackedSeqs, scale):
    outs = []
    # torch.split's backward is one concatenation (slicing each sequence separately would allocate a
    # full-size zero gradient per sequence).
    for qs, ks, vs in zip(q.split(pack.lengths), k.split(pack.lengths), v.split(pack.lengths)):
        qs, ks, vs = (t.float().transpose(0, 1) for t in (qs, ks, vs))  # (H, n, D)
        attn = torch.softmax((qs @ ks.transpose(-1, -2)) * scale, dim=-1)
        outs.append((attn @ vs).transpose(0, 1).to(q.dtype))
    return torch.cat(outs, dim=0)


def _segments(q, k, v, pack: PackedSeqs, scale):
    outs = []
    for qs, ks, vs in zip(q.split(pack.lengths), k.split(pack.lengths), v.split(pack.lengths)):
        qs, ks, vs = (t.transpose(0, 1).unsqueeze(0) for t in (qs, ks, vs))  # (1, H, n, D)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, scale=scale)[0].transpose(0, 1))
    return torch.cat(outs, dim=0)


def _block_mask(q, k, v, pack: PackedSeqs, scale):
    mask = pack.seg[:, None] == pack.seg[None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
        attn_mask=mask, scale=scale,
    )
    return out[0].transpose(0, 1)


def _nested(q, k, v, pack: PackedSeqs, scale):
    offsets = pack.cu_seqlens.long()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "nested tensors are a prototype" notices
        # Contiguous values: jagged tensors over strided views (q, k, v come out of one fused projection)
        # take a CUDA-only path in some torch builds and fail on CPU machines.
        qn, kn, vn = (torch.nested.nested_tensor_from_jagged(t.contiguous(), offsets).transpose(1, 2)
                      for t in (q, k, v))
        out = F.scaled_dot_product_attention(qn, kn, vn, scale=scale)
        return out.transpose(1, 2).values()


def _flex(q, k, v, pack: PackedSeqs, scale):
    fn = _flex_attention() if torch.compiler.is_compiling() else _flex_compiled(q.device.type)
    if not torch.is_grad_enabled():  # flex rejects CPU inputs that require grad even under no_grad
        q, k, v = q.detach(), k.detach(), v.detach()
    qf, kf, vf = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, H, N, D)
    out = fn(qf, kf, vf, block_mask=pack.flex_block_mask(), scale=scale)
    return out[0].transpose(0, 1)


def _flash(q, k, v, pack: PackedSeqs, scale):
    cu, n = pack.cu_seqlens, pack.max_seqlen
    return _flash_attn_varlen()(q, k, v, cu, cu, n, n, softmax_scale=scale)


def _varlen(q, k, v, pack: PackedSeqs, scale):
    cu, n = pack.cu_seqlens, pack.max_seqlen
    return _torch_varlen()(q, k, v, cu, cu, n, n, scale=scale)


def _outside_graphs(kernel: Callable) -> Callable:
    """The eager-only kernels split by host lengths: inside a compiled block they run as a graph break, so
    the compiled graph neither specialises on nor recompiles for each new set of lengths; their output's
    token count is marked dynamic for the graph that resumes after them."""

    @torch.compiler.disable
    def run(q, k, v, pack, scale):
        out = kernel(q, k, v, pack, scale)
        torch._dynamo.maybe_mark_dynamic(out, 0)
        return out

    return run


_KERNELS = {"flash": _flash, "torch_varlen": _varlen, "flex": _flex,
            **{name: _outside_graphs(fn) for name, fn in
               {"nested": _nested, "segments": _segments, "block_mask": _block_mask, "math": _math}.items()}}


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | PackedSeqs,
    max_seqlen: int | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Non-causal attention within each packed sequence.

    Args:
        q, k, v: (N_total, heads, head_dim), the sequences laid end to end.
        cu_seqlens: a ``PackedSeqs`` built at packing (no host-device sync here), or a (num_seqs + 1,)
            cumulative-length tensor ``[0, ..., N_total]`` (read back to the host once per call and checked).
        max_seqlen: unused with a ``PackedSeqs`` (it carries it); kept for call compatibility.
        scale: softmax scale, default ``head_dim ** -0.5``.
        backend: a name from ``BACKENDS`` or ``"auto"``; see ``resolve_backend`` for precedence.

    Returns:
        (N_total, heads, head_dim) in the dtype of ``q``.
    """
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one (N, heads, head_dim) shape, got {q.shape}, {k.shape}, {v.shape}")
    pack = cu_seqlens if isinstance(cu_seqlens, PackedSeqs) else PackedSeqs.from_cu_seqlens(cu_seqlens, q.shape[0])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _KERNELS[resolve_backend(q, backend, k, v)](q, k, v, pack, scale)
