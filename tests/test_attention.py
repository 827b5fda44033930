"""Every attention backend available here agrees with the math reference on mixed-length packs."""
import pytest
import torch

from fluxvit.models import attention
from fluxvit.models.attention import BACKENDS, PackedSeqs, available_backends, force_backend, varlen_attention


def _pack(lengths, heads=3, dim=16, dtype=torch.float32, device="cpu", seed=0, fused=False):
    """q, k, v (N, heads, dim) leaf tensors; ``fused``: strided views of one (N, 3, heads*dim) tensor, the
    layout the model's fused qkv projection produces."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    if fused:
        qkv = torch.randn(n, 3, heads * dim, generator=g).to(device=device, dtype=dtype).requires_grad_()
        q, k, v = (t.reshape(n, heads, dim) for t in qkv.unbind(1))
        assert not q.is_contiguous()
    else:
        q, k, v = (torch.randn(n, heads, dim, generator=g).to(device=device, dtype=dtype).requires_grad_()
                   for _ in range(3))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device=device)
    return q, k, v, cu


def _run(backend, q, k, v, cu):
    out = varlen_attention(q, k, v, cu, backend=backend)
    grad_out = torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape).to(out.dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    return out, dq, dk, dv


@pytest.mark.parametrize("backend", [b for b in available_backends("cpu", requires_grad=True) if b != "math"])
@pytest.mark.parametrize("lengths", [[1, 7, 33, 2], [65], [5, 5, 5, 5, 5, 40]])
@pytest.mark.parametrize("fused", [False, True])
def test_backend_matches_math_forward_backward(backend, lengths, fused):
    q, k, v, cu = _pack(lengths, fused=fused)
    ref = _run("math", q, k, v, cu)
    got = _run(backend, q, k, v, cu)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_tokens_do_not_attend_across_sequences():
    q, k, v, cu = _pack([4, 6])
    out = varlen_attention(q, k, v, cu, backend="segments")
    v2 = v.detach().clone()
    v2[4:] += 100.0  # change only the second sequence's values
    out2 = varlen_attention(q, k, v2, cu, backend="segments")
    torch.testing.assert_close(out[:4], out2[:4])
    assert not torch.allclose(out[4:], out2[4:])


def test_selection_precedence(monkeypatch):
    q, _, _, _ = _pack([3])
    monkeypatch.setenv(attention.ENV_VAR, "block_mask")
    assert attention.resolve_backend(q) == "block_mask"
    assert attention.resolve_backend(q, "nested") == "nested"  # config beats the environment
    with force_backend("math"):
        assert attention.resolve_backend(q, "nested") == "math"  # tests/benchmarks force over both
    monkeypatch.delenv(attention.ENV_VAR)
    assert attention.resolve_backend(q) == "segments"  # auto on CPU


def test_bad_backend_requests():
    q, k, v, cu = _pack([3, 4])
    with pytest.raises(ValueError, match="unknown attention backend"):
        varlen_attention(q, k, v, cu, backend="fast")
    with pytest.raises(RuntimeError, match="cannot run on cpu"):
        varlen_attention(q, k, v, cu, backend="flash")
    with pytest.raises(ValueError, match="cu_seqlens ends"):
        varlen_attention(q, k, v, cu[:-1])


def test_all_backends_named():
    assert set(available_backends("cpu", requires_grad=True)) == {"nested", "segments", "block_mask", "math"}
    assert set(available_backends("cpu")) == {"flex", "nested", "segments", "block_mask", "math"}
    assert set(BACKENDS) >= set(available_backends("cpu"))


# Tiles of 128 tokens: [0,128) spans sequences 0-1 (partial), [128,256) lies inside sequence 1 (full),
# [256,384) spans 1-3 (partial), [384,458) is sequence 3 plus padding (partial).
FLEX_PACK = [3, 300, 5, 150]


def test_packed_seqs_built_from_host_lengths():
    pack = PackedSeqs([3, 1, 4])
    assert pack.cu_seqlens.tolist() == [0, 3, 4, 8] and pack.cu_seqlens.dtype == torch.int32
    assert pack.seg.tolist() == [0, 0, 0, 1, 2, 2, 2, 2] and (pack.total, pack.max_seqlen) == (8, 4)
    with pytest.raises(ValueError, match="every length >= 1"):
        PackedSeqs([3, 0])
    with pytest.raises(ValueError, match="cu_seqlens ends at 8"):
        PackedSeqs.from_cu_seqlens(pack.cu_seqlens, total=9)


def test_flex_document_block_mask_structure():
    """Tile pairs the BlockMask visits are exactly those holding an attending token pair; full tiles need
    no mask (every pair attends)."""
    pack = PackedSeqs(FLEX_PACK)
    bm = pack.flex_block_mask()
    assert pack.flex_block_mask() is bm  # built once per pack
    n, tile = pack.total, 128
    nb = -(-n // tile)
    seg = torch.cat([pack.seg, torch.full((nb * tile - n,), -1)]).view(nb, tile)
    pair = (seg[:, None, :, None] == seg[None, :, None, :]) & (seg[:, None, :, None] >= 0)  # (nb, nb, t, t)
    any_pair, all_pair = pair.any(-1).any(-1), pair.all(-1).all(-1)
    visited = bm.to_dense()[0, 0].bool()
    assert torch.equal(visited, any_pair)
    full = torch.zeros(nb, nb, dtype=torch.bool)
    for i in range(nb):
        full[i, bm.full_kv_indices[0, 0, i, :bm.full_kv_num_blocks[0, 0, i]].long()] = True
    assert torch.equal(full, all_pair) and full.sum() == 1  # exactly the tile inside sequence 1


def test_flex_matches_math_forward_cpu_compiled():
    """The compiled FlexAttention kernel on CPU (forward only: PyTorch has no CPU flex backward; the
    backward is compared on CUDA by the gpu-marked test below and by benchmarks/gpu_check.py)."""
    q, k, v, cu = _pack(FLEX_PACK, heads=2, dim=16)
    pack = PackedSeqs(FLEX_PACK)
    with torch.no_grad():
        ref = varlen_attention(q, k, v, pack, backend="math")
        got = varlen_attention(q, k, v, pack, backend="flex")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="no CPU backward"):
        varlen_attention(q, k, v, pack, backend="flex")  # q requires grad


def test_auto_prefers_flex_only_where_it_can_run():
    q = torch.randn(4, 2, 8)
    assert attention.resolve_backend(q) == "segments"  # eager CPU: segments measured fastest
    assert attention.resolve_backend(q.requires_grad_()) == "segments"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash", "torch_varlen", "flex", "nested", "segments", "block_mask"])
def test_cuda_backends_bf16(backend):
    if backend not in available_backends("cuda", torch.bfloat16):
        pytest.skip(f"{backend} not available on this GPU machine")
    q, k, v, cu = _pack([1, 77, 300, 12, 513], heads=6, dim=64, dtype=torch.bfloat16, device="cuda")
    ref = [t.float() for t in _run("math", q, k, v, cu)]
    got = [t.float() for t in _run(backend, q, k, v, cu)]
    for a, b in zip(got, ref):
        rel = (a - b).norm() / b.norm()
        assert rel < 2e-2, f"{backend}: relative error {rel:.2e}"


@pytest.mark.gpu
def test_cuda_model_bf16_packed_matches_fp32():
    from fluxvit.models import create_model

    torch.manual_seed(0)
    model = create_model("fluxvit_small_patch14", num_classes=10).cuda().eval()
    clips = [torch.randn(3, t, s, s, device="cuda") for t, s in [(8, 224), (16, 168), (4, 112)]]
    with torch.no_grad():
        ref = model(clips, num_tokens=[1024, 2048, None])
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = model(clips, num_tokens=[1024, 2048, None]).float()
    assert (got - ref).norm() / ref.norm() < 5e-2
