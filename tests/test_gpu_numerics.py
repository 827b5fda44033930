"""What a CUDA bf16 run does that a CPU run hides, emulated on CPU.

* ``index_add_`` on CUDA adds atomically and rounds to the destination dtype after every addition; CPU adds
  in a wider type. ``rounding_index_add_`` emulates the CUDA behaviour (one rounded add per source row, in
  index order within each destination row), so the pooling head's segment sums can be checked here.
* Under autocast the qk RMSNorm's fp32 weight lifted q and k to fp32 while v stayed bf16; the fused kernels
  need one dtype.
"""
import pytest
import torch

from fluxvit.models import attention, create_model
from fluxvit.models.layers import AttentionPoolingHead

_index_add = torch.Tensor.index_add_


def rounding_index_add_(dst: torch.Tensor, dim: int, index: torch.Tensor, src: torch.Tensor, *, alpha=1):
    """``dst.index_add_(dim, index, src)`` rounded to ``dst.dtype`` after each single addition (CUDA's
    atomics on a half-precision destination). fp32 destinations use the ordinary kernel."""
    if dst.dtype == torch.float32 or dim != 0:
        return _index_add(dst, dim, index, src, alpha=alpha)
    # Round r of the loop adds the r-th source row of every destination row at once: each destination
    # row still receives its rows one at a time, rounded in between.
    order = torch.argsort(index, stable=True)
    idx, rows = index[order], src[order] * alpha
    first = torch.searchsorted(idx, idx, right=False)
    rank = torch.arange(len(idx)) - first
    acc = dst.float().clone()
    for r in range(int(rank.max()) + 1 if len(rank) else 0):
        sel = rank == r
        acc[idx[sel]] = (acc[idx[sel]] + rows[sel].float()).to(dst.dtype).float()
    dst.copy_(acc.to(dst.dtype))
    return dst


def test_emulation_rounds_after_every_add():
    """The emulation is the per-add rounding: 1 + 512 additions of 2**-9 stay at 1 in bf16 (each add rounds
    back), while an fp32 accumulation reaches 2."""
    dst = torch.ones(1, 1, dtype=torch.bfloat16)
    src = torch.full((512, 1), 2.0 ** -9)
    rounding_index_add_(dst, 0, torch.zeros(512, dtype=torch.long), src.bfloat16())
    assert dst.item() == 1.0
    assert torch.ones(1, 1).index_add_(0, torch.zeros(512, dtype=torch.long), src).item() == 2.0


def _head_inputs(lengths, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    # Video features have a shared component much larger than the per-token spread (the token mean matters).
    x = torch.randn(n, dim, generator=g) * 0.5 + torch.randn(dim, generator=g) * 3.0
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return x, cu, seg


def test_pooling_head_bf16_with_cuda_rounding_stays_close_to_fp32(monkeypatch):
    """FluxViT-S's pooling head (384 -> 768, 16 heads) over views of 3072 / 2048 / 1024 tokens: in bf16 with
    CUDA's per-add rounding, its output stays within 2 % of fp32 (relative norm). A bf16 accumulator (the old
    path) is off by about 10 %; the same emulation applied to it is shown alongside."""
    torch.manual_seed(0)
    head = AttentionPoolingHead(384, 16, 768).eval()
    x, cu, seg = _head_inputs([3073, 2049, 1025], 384)
    with torch.no_grad():
        ref = head(x, cu, seg)
        monkeypatch.setattr(torch.Tensor, "index_add_", rounding_index_add_)
        got = head.to(torch.bfloat16)(x.bfloat16(), cu, seg).float()
        # The old path's token mean: a bf16 accumulator with the same rounding.
        old_mean = rounding_index_add_(torch.zeros(3, 384, dtype=torch.bfloat16), 0, seg, x.bfloat16()).float()
    ref_mean = torch.zeros(3, 384).index_add_(0, seg, x)
    old_err = ((old_mean - ref_mean).norm() / ref_mean.norm()).item()
    err = ((got - ref).norm() / ref.norm()).item()
    assert old_err > 0.05, old_err  # what the bf16 accumulator did
    assert err < 0.02, (err, old_err)


def test_fluxvit_logits_bf16_autocast_with_cuda_rounding(monkeypatch):
    """A whole FluxViT under bf16 autocast with the CUDA rounding emulated: logits within 3 % of fp32."""
    torch.manual_seed(0)
    model = create_model("fluxvit_tiny_patch14", num_classes=10).eval()
    video = torch.randn(2, 3, 8, 112, 112) + 1.0
    with torch.no_grad():
        ref = model(video)
        monkeypatch.setattr(torch.Tensor, "index_add_", rounding_index_add_)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(video).float()
    err = ((got - ref).norm() / ref.norm()).item()
    assert err < 0.03, err


@pytest.mark.parametrize("name", ["fluxvit_tiny_patch14", "internvideo2_1b_patch14"])
def test_qkv_reach_attention_in_one_dtype_under_autocast(monkeypatch, name):
    """Under bf16 autocast q, k and v reach the attention kernel as bf16 (the qk norms' fp32 weights no
    longer lift q and k to fp32), so the fused half-precision kernels can be chosen."""
    seen = []
    kernel = attention._KERNELS["segments"]

    def recording(q, k, v, pack, scale):
        seen.append((q.dtype, k.dtype, v.dtype))
        return kernel(q, k, v, pack, scale)

    monkeypatch.setitem(attention._KERNELS, "segments", recording)
    tiny = dict(embed_dim=64, depth=2, num_heads=4, attn_pool_num_heads=4, clip_embed_dim=32)
    model = create_model(name, **({} if name.startswith("fluxvit") else tiny))
    with torch.autocast("cpu", dtype=torch.bfloat16), attention.force_backend("segments"):
        model(torch.randn(2, 3, 4, 56, 56))
    assert len(seen) == len(model.blocks)
    assert all(d == (torch.bfloat16,) * 3 for d in seen), seen


def test_backend_check_looks_at_q_k_and_v():
    """The half-precision kernels (flash, torch_varlen) need q, k and v in one half dtype; a q in bf16 with a
    k in fp32 does not qualify, and the refusal names all three dtypes."""
    bf, f32 = torch.randn(4, 2, 8, dtype=torch.bfloat16), torch.randn(4, 2, 8)
    assert attention._one_half_dtype(bf, bf, bf)
    assert not attention._one_half_dtype(bf, f32, bf) and not attention._one_half_dtype(bf, bf, bf.half())
    assert not attention._one_half_dtype(f32, f32, f32)
    with pytest.raises(RuntimeError, match="bfloat16/torch.float32/torch.bfloat16"):
        attention.resolve_backend(bf, "flash", f32, bf)


def test_record_backends_counts_the_resolved_kernel():
    q = torch.randn(5, 2, 8)
    with attention.record_backends() as used:
        attention.varlen_attention(q, q, q, attention.PackedSeqs([2, 3]), backend="math")
        attention.varlen_attention(q, q, q, attention.PackedSeqs([5]))
    assert used == {"math": 1, "segments": 1}


def test_torch_varlen_without_a_scale_keyword_gets_the_scale_through_q():
    """Some PyTorch releases' ``varlen_attn`` take no ``scale``: the adapter folds a non-default scale into q
    (checked here against the math reference with a CPU stand-in of that older signature)."""
    lengths = [3, 5]
    pack = attention.PackedSeqs(lengths)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(8, 2, 16, generator=g) for _ in range(3))

    def old_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        return attention._math(query, key, value, pack, query.shape[-1] ** -0.5)

    fn = attention._varlen_with_scale(old_varlen_attn)
    for scale in (None, 16 ** -0.5, 0.5):
        want = attention._math(q, k, v, pack, 16 ** -0.5 if scale is None else scale)
        torch.testing.assert_close(fn(q, k, v, pack.cu_seqlens, pack.cu_seqlens, 5, 5, scale=scale), want)
