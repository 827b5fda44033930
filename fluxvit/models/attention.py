"""Packed variable-length self-attention with interchangeable kernels.

Every FluxViT forward pass packs the kept tokens of all clips of a batch into one sequence of shape
(N_total, heads, head_dim) with ``cu_seqlens`` (int32 or int64, shape (num_seqs + 1,), cumulative lengths
starting at 0). Tokens of one clip attend only to tokens of the same clip; nothing is padded.

Backends, in the order ``"auto"`` tries them:

=================  =====================================================================  ==================
name               kernel                                                                 where
=================  =====================================================================  ==================
``flash``          ``flash_attn.flash_attn_varlen_func`` (optional ``gpu`` extra)         CUDA, fp16 / bf16
``torch_varlen``   ``torch.nn.attention.varlen.varlen_attn`` (PyTorch's own varlen)       CUDA, fp16 / bf16
``nested``         SDPA on a jagged nested tensor (``torch.nested`` layout=jagged)        CPU and CUDA
``segments``       one fused SDPA call per sequence (no padding, no mask)                 CPU and CUDA
``block_mask``     SDPA over the whole pack with a dense block-diagonal boolean mask      small packs only
``math``           explicit softmax(QK^T)V per sequence in fp32: the reference            anywhere
=================  =====================================================================  ==================

Choose one with the environment variable ``FLUXVIT_ATTN_BACKEND`` or a model's ``attn_backend`` config
field; ``force_backend`` is a context manager for tests. A requested backend that cannot run on the
given tensors raises ``RuntimeError`` (an explicit choice never silently falls back).
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "available_backends",
    "force_backend",
    "has_flash_attn",
    "resolve_backend",
    "varlen_attention",
]

ENV_VAR = "FLUXVIT_ATTN_BACKEND"
BACKENDS = ("flash", "torch_varlen", "nested", "segments", "block_mask", "math")
_forced: list[str] = []


@functools.lru_cache(maxsize=None)
def _flash_attn_varlen() -> Callable | None:
    """flash-attn's varlen kernel, or None when the package is not importable (it is optional)."""
    try:
        from flash_attn import flash_attn_varlen_func  # type: ignore
    except Exception:  # ImportError, or a broken CUDA build raising at import
        return None
    return flash_attn_varlen_func


def has_flash_attn() -> bool:
    """True when flash-attn is importable (install with ``pip install 'fluxvit[gpu]'`` on a CUDA machine)."""
    return _flash_attn_varlen() is not None


@functools.lru_cache(maxsize=None)
def _torch_varlen() -> Callable | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:
        return None
    return varlen_attn


def _supports(name: str, q: torch.Tensor) -> bool:
    half = q.dtype in (torch.float16, torch.bfloat16)
    if name == "flash":
        return q.is_cuda and half and has_flash_attn()
    if name == "torch_varlen":
        return q.is_cuda and half and _torch_varlen() is not None
    return name in BACKENDS


def available_backends(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> list[str]:
    """Backends that can run on tensors of this device and dtype, in ``auto`` order."""
    probe = torch.empty(0, device=device, dtype=dtype)
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


def resolve_backend(q: torch.Tensor, requested: str | None = None) -> str:
    """Pick the backend for ``q``: forced > ``requested`` (config) > ``$FLUXVIT_ATTN_BACKEND`` > auto.

    Auto order: flash, torch_varlen (CUDA half precision), then ``segments`` (fastest measured on CPU and
    the general fallback; see the attention-backend timings of benchmarks/bench_model.py, `make bench`).
    """
    name = _forced[-1] if _forced else (requested or os.environ.get(ENV_VAR) or "auto")
    if name == "auto":
        for candidate in ("flash", "torch_varlen"):
            if _supports(candidate, q):
                return candidate
        return "segments"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {BACKENDS + ('auto',)}")
    if not _supports(name, q):
        hint = " (pip install 'fluxvit[gpu]' on a CUDA machine)" if name == "flash" else ""
        raise RuntimeError(
            f"attention backend {name!r} cannot run on {q.device.type} {q.dtype} tensors{hint}; "
            f"available here: {available_backends(q.device, q.dtype)}"
        )
    return name


def _lengths(cu_seqlens: torch.Tensor) -> list[int]:
    return (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()


def _split(cu_seqlens: torch.Tensor, *tensors: torch.Tensor):
    """Per-sequence views of packed tensors via ``torch.split``, whose backward is one concatenation (slicing
    each sequence separately would allocate a full-size zero gradient per sequence)."""
    lengths = _lengths(cu_seqlens)
    return zip(*(t.split(lengths) for t in tensors))


def _math(q, k, v, cu_seqlens, scale):
    outs = []
    for qs, ks, vs in _split(cu_seqlens, q, k, v):
        qs, ks, vs = (t.float().transpose(0, 1) for t in (qs, ks, vs))  # (H, n, D)
        attn = torch.softmax((qs @ ks.transpose(-1, -2)) * scale, dim=-1)
        outs.append((attn @ vs).transpose(0, 1).to(q.dtype))
    return torch.cat(outs, dim=0)


def _segments(q, k, v, cu_seqlens, scale):
    outs = []
    for qs, ks, vs in _split(cu_seqlens, q, k, v):
        qs, ks, vs = (t.transpose(0, 1).unsqueeze(0) for t in (qs, ks, vs))  # (1, H, n, D)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, scale=scale)[0].transpose(0, 1))
    return torch.cat(outs, dim=0)


def _block_mask(q, k, v, cu_seqlens, scale):
    seq_id = torch.repeat_interleave(
        torch.arange(len(cu_seqlens) - 1, device=q.device), torch.diff(cu_seqlens).to(q.device)
    )
    mask = seq_id[:, None] == seq_id[None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
        attn_mask=mask, scale=scale,
    )
    return out[0].transpose(0, 1)


def _nested(q, k, v, cu_seqlens, scale):
    offsets = cu_seqlens.to(device=q.device, dtype=torch.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "nested tensors are a prototype" notices
        # Contiguous values: jagged tensors over strided views (q, k, v come out of one fused projection)
        # take a CUDA-only path in some torch builds and fail on CPU machines.
        qn, kn, vn = (torch.nested.nested_tensor_from_jagged(t.contiguous(), offsets).transpose(1, 2)
                      for t in (q, k, v))
        out = F.scaled_dot_product_attention(qn, kn, vn, scale=scale)
        return out.transpose(1, 2).values()


def _flash(q, k, v, cu_seqlens, scale, max_seqlen):
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    return _flash_attn_varlen()(q, k, v, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale)


def _varlen(q, k, v, cu_seqlens, scale, max_seqlen):
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    return _torch_varlen()(q, k, v, cu, cu, max_seqlen, max_seqlen, scale=scale)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Non-causal attention within each packed sequence.

    Args:
        q, k, v: (N_total, heads, head_dim), the sequences laid end to end.
        cu_seqlens: (num_seqs + 1,) cumulative sequence lengths, ``cu_seqlens[0] == 0`` and
            ``cu_seqlens[-1] == N_total``.
        max_seqlen: longest sequence (computed when omitted; pass it to avoid a device sync on CUDA).
        scale: softmax scale, default ``head_dim ** -0.5``.
        backend: a name from ``BACKENDS`` or ``"auto"``; see ``resolve_backend`` for precedence.

    Returns:
        (N_total, heads, head_dim) in the dtype of ``q``.
    """
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one (N, heads, head_dim) shape, got {q.shape}, {k.shape}, {v.shape}")
    if int(cu_seqlens[-1]) != q.shape[0]:
        raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])} but the pack holds {q.shape[0]} tokens")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    name = resolve_backend(q, backend)
    if name in ("flash", "torch_varlen"):
        max_seqlen = max_seqlen or max(_lengths(cu_seqlens))
        fn = _flash if name == "flash" else _varlen
        return fn(q, k, v, cu_seqlens, scale, max_seqlen)
    return {"nested": _nested, "segments": _segments, "block_mask": _block_mask, "math": _math}[name](
        q, k, v, cu_seqlens, scale
    )
