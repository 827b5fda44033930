"""Every attention backend available here agrees with the math reference on mixed-length packs."""
import pytest
import torch

from fluxvit.models import attention
from fluxvit.models.attention import BACKENDS, available_backends, force_backend, varlen_attention


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


@pytest.mark.parametrize("backend", [b for b in available_backends("cpu") if b != "math"])
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
    assert set(available_backends("cpu")) == {"nested", "segments", "block_mask", "math"}
    assert set(BACKENDS) >= set(available_backends("cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash", "torch_varlen", "nested", "segments", "block_mask"])
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
