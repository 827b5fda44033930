"""Model zoo: registry, shapes, packing equivalence, selector, pos-embed resizing, errors, checkpoints."""
import math

import pytest
import timm
import torch

import fluxvit  # noqa: F401  (registers the timm names)
from fluxvit.models import (FluxViT, UnknownOptionError, create_model, list_models, load_model, num_groups,
                            save_model, select_tokens)
from fluxvit.models.pos_embed import resize_pos_grid, sincos_3d

TINY = dict(num_classes=7)


def tiny(**kw):
    torch.manual_seed(0)
    return create_model("fluxvit_tiny_patch14", **{**TINY, **kw}).eval()


# ----------------------------------------------------------------------------- registry
def test_registry_names_and_timm():
    assert list_models() == ["fluxvit_base_patch14", "fluxvit_large_patch14", "fluxvit_small_patch14",
                             "fluxvit_tiny_patch14", "internvideo2_1b_patch14"]
    m = timm.create_model("fluxvit_tiny_patch14", num_classes=3)
    assert isinstance(m, FluxViT) and m.config.num_classes == 3


def test_unknown_override_is_an_error():
    with pytest.raises(UnknownOptionError, match="embed_dims"):
        create_model("fluxvit_tiny_patch14", embed_dims=64)
    with pytest.raises(TypeError):
        create_model("fluxvit_tiny_patch14", bogus=1)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("fluxvit_huge_patch14")


def test_overrides_reach_the_architecture():
    m = create_model("fluxvit_small_patch14", embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0, patch_size=16,
                     img_size=64, num_frames=4, num_classes=5, clip_embed_dim=32, attn_pool_num_heads=2,
                     drop_path_rate=0.1)
    assert len(m.blocks) == 2 and m.blocks[0].mlp.fc1.out_features == 128
    assert m.pos_embed.shape == (1, 1 + 4 * 4 * 4, 64)
    assert m.head[0].out_features == 5 and m.clip_projector[0].cross_attn.proj.out_features == 32
    assert m.blocks[-1].drop_path == pytest.approx(0.1)


FLUXVIT_MODELS = [n for n in list_models() if n.startswith("fluxvit_")]  # the teacher: tests/test_internvideo2.py


@pytest.mark.parametrize("name", FLUXVIT_MODELS)
def test_every_registered_model_forward_backward(name):
    # Full width, one block: the real per-model shapes at CPU-test cost.
    m = create_model(name, depth=1, num_classes=5, drop_path_rate=0.1).train()
    video = torch.randn(2, 3, 4, 56, 56)
    out = m(video, num_tokens=40)
    assert out.shape == (2, 5)
    out.square().mean().backward()
    assert m.patch_embed.proj.weight.grad is not None and m.pos_embed.grad is not None
    assert m.clip_projector[m.nearest_head(40)].cross_attn.q.weight.grad is not None


def test_default_configs_match_reference_sizes():
    s = create_model("fluxvit_small_patch14")
    b = create_model("fluxvit_base_patch14")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    backbone = lambda m: count(m) - sum(count(x) for x in (m.clip_projector, m.head, m.fc_norm,  # noqa: E731
                                                            m.final_clip_decoder_for_projs))
    assert round(count(s) / 1e6, 1) == 28.8 and round(count(b) / 1e6, 1) == 104.6
    assert round(backbone(s) / 1e6, 1) == 24.5 and round(backbone(b) / 1e6, 1) == 95.4  # the paper's model table
    assert s.pos_grid == (24, 18, 18) and b.pos_grid == (32, 20, 20)


# ------------------------------------------------------------------------------ packing
def test_list_of_clips_equals_each_clip_alone():
    m = tiny()
    clips = [torch.randn(3, 8, 112, 112), torch.randn(3, 4, 84, 140), torch.randn(3, 1, 56, 56),
             torch.randn(3, 5, 112, 84), torch.randn(3, 33, 28, 28)]
    budgets = [150, None, 10, 77, 40]
    with torch.no_grad():
        packed = m(clips, num_tokens=budgets)
        alone = torch.cat([m(c[None], num_tokens=b) for c, b in zip(clips, budgets)])
    assert packed.shape == (5, 7)
    assert (packed - alone).abs().max() <= 1e-5


def test_dense_batch_equals_each_sample_alone_and_batch_size_one():
    m = tiny()
    video = torch.randn(3, 3, 8, 112, 112)
    with torch.no_grad():
        batch = m(video, num_tokens=300, head=1)
        alone = torch.cat([m(video[i:i + 1], num_tokens=300, head=1) for i in range(3)])
    assert (batch - alone).abs().max() <= 1e-5


def test_no_padding_in_the_pack():
    m = tiny()
    clips = [torch.randn(3, 8, 112, 112), torch.randn(3, 2, 56, 56)]
    with torch.no_grad():
        f = m.forward_features(clips, num_tokens=[200, None])
    assert f.cu_seqlens.tolist() == [0, 1 + 200, 1 + 200 + 1 + 2 * 16]
    assert f.last.shape[0] == 1 + 200 + 1 + 32


def test_forward_features_api():
    m = tiny()
    video = torch.randn(2, 3, 8, 112, 112)
    with torch.no_grad():
        f = m.forward_features(video, num_tokens=256, layers=(0, -1, -2), align=1)
    assert set(f.layers) == {0, -1, -2}
    assert f.layers[-1].shape == (2 * 257, 192) and torch.equal(f.layers[-1], f.last)
    assert [k.shape[0] for k in f.keep] == [256, 256] and all((k.diff() > 0).all() for k in f.keep)
    assert f.pooled.shape == (2, 384) and f.grids == [(8, 8, 8)] * 2
    assert torch.allclose(f.aligned.norm(dim=-1), torch.ones(2))
    assert [t.shape for t in f.patch_tokens(f.last)] == [(256, 192)] * 2
    with torch.no_grad():
        logits = m.logits(f)
    torch.testing.assert_close(logits, m(video, num_tokens=256), rtol=0, atol=1e-6)


def test_explicit_keep_indices():
    m = tiny()
    video = torch.randn(2, 3, 4, 56, 56)
    keep = torch.tensor([[0, 5, 9], [1, 2, 63]])
    with torch.no_grad():
        f = m.forward_features(video, keep=keep)
    assert [k.tolist() for k in f.keep] == keep.tolist()
    with pytest.raises(ValueError, match="outside"):
        m.forward_features(video, keep=torch.tensor([[0, 64]] * 2))


def test_forward_multi_equals_separate_passes():
    m = tiny()
    video = torch.randn(2, 3, 8, 112, 112)
    with torch.no_grad():
        f = m.forward_multi(video, budgets=[384, 256, 128])
        multi = m.logits(f)
        sep = torch.cat([m(video, num_tokens=b, head=h) for h, b in enumerate([384, 256, 128])])
    assert f.heads == [0, 0, 1, 1, 2, 2] and f.clip_index == [0, 1] * 3
    assert (multi - sep).abs().max() <= 1e-5


def test_training_mode_backward_on_packed_clips():
    m = create_model("fluxvit_tiny_patch14", num_classes=4, drop_path_rate=0.2).train()
    clips = [torch.randn(3, 4, 56, 56), torch.randn(3, 6, 84, 84)]
    m(clips, num_tokens=[30, 100]).sum().backward()
    assert all(p.grad is not None for n, p in m.named_parameters()
               if n.startswith(("blocks", "patch_embed", "pos_embed", "cls_token")))


def test_default_head_is_nearest_to_kept_tokens():
    m = create_model("fluxvit_tiny_patch14", num_classes=3)
    assert [m.nearest_head(n) for n in (5000, 3072, 2600, 2048, 1600, 1500, 1024, 10)] == [0, 0, 0, 1, 1, 2, 2, 2]
    with torch.no_grad():
        f = m.forward_features(torch.randn(1, 3, 8, 224, 224), num_tokens=1024)
    assert f.heads == [2]


# ----------------------------------------------------------------------------- selector
def test_group_rule():
    assert [num_groups(t) for t in (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 33)] == [1, 1, 1, 2, 1, 2, 4, 2, 4, 4, 1]


@pytest.mark.parametrize("frames", range(1, 34))
def test_selector_any_frame_count(frames):
    L = 12
    emb = torch.randn(2, frames, L, 16)
    for budget in (1, 5, frames * L // 2, frames * L - 1, frames * L, frames * L + 10):
        keep = select_tokens(emb, budget)
        assert keep.shape[0] == 2
        n = keep.shape[1]
        G = num_groups(frames)
        assert n <= max(budget, 0) or n == frames * L
        assert n >= min(budget, frames * L) - G
        assert n >= 1
        assert (keep.diff(dim=1) > 0).all(), "kept tokens must stay in order and be unique"
        assert keep.min() >= 0 and keep.max() < frames * L


def test_selector_keeps_equal_share_per_group():
    emb = torch.randn(1, 8, 10, 4)
    keep = select_tokens(emb, 40)[0]
    per_group = torch.bincount(keep // 20, minlength=4)
    assert per_group.tolist() == [10, 10, 10, 10]


def test_selector_keeps_the_one_moving_patch():
    """A static random video where one patch changes every frame: its tokens are the ones kept."""
    torch.manual_seed(0)
    m = tiny()
    T, p, side = 8, 14, 56
    video = torch.randn(1, 3, 1, side, side).repeat(1, 1, T, 1, 1)
    row, col = 2, 1  # patch (2, 1) of a 4x4 grid
    for t in range(T):
        video[0, :, t, row * p:(row + 1) * p, col * p:(col + 1) * p] = torch.randn(3, p, p)
    with torch.no_grad():
        emb = m.patch_embed(video)
    moving = row * 4 + col
    keep = select_tokens(emb, T)[0]
    assert sorted(keep.tolist()) == [t * 16 + moving for t in range(T)]
    with torch.no_grad():
        f = m.forward_features(video, num_tokens=T)
    assert f.keep[0].tolist() == [t * 16 + moving for t in range(T)]


def test_single_frame_score_prefers_distinct_patches():
    emb = torch.zeros(1, 1, 9, 4)
    emb[0, 0, 4] = 5.0
    assert select_tokens(emb, 1)[0].tolist() == [4]


# ---------------------------------------------------------------------------- pos-embed
def test_pos_resize_identity_and_linear_time():
    grid = torch.randn(4, 3, 5, 8)
    assert torch.equal(resize_pos_grid(grid, 4, 3, 5), grid)
    a, b = torch.randn(8), torch.randn(8)
    two = torch.stack([a, b])[:, None, None, :].expand(2, 3, 3, 8)
    four = resize_pos_grid(two, 4, 3, 3)
    for t, s in enumerate([0.0, 0.25, 0.75, 1.0]):  # align_corners=False source positions, clamped
        torch.testing.assert_close(four[t, 1, 2], a + s * (b - a))


def test_pos_resize_rectangular_and_dtype_device():
    grid = torch.randn(2, 4, 4, 16, dtype=torch.float64)
    out = resize_pos_grid(grid, 3, 6, 2)
    assert out.shape == (3, 6, 2, 16) and out.dtype == torch.float64 and out.device == grid.device
    m = tiny()
    pe = m.pos_embed_for(5, 3, 7)
    assert pe.shape == (1 + 5 * 3 * 7, 192)


def test_sincos_layout():
    table = sincos_3d(32, 2, 3, 4)
    assert table.shape == (24, 32)
    # first dim/4 channels depend on time only, the rest on space only
    t = table.reshape(2, 12, 32)
    assert torch.allclose(t[:, :1, :8].expand(2, 12, 8), t[:, :, :8])
    assert torch.allclose(t[:1, :, 8:], t[1:, :, 8:])
    assert math.isclose(table[0, 0].item(), 0.0) and math.isclose(table[0, 4].item(), 1.0)


# ------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("video,kwargs,match", [
    (torch.randn(1, 3, 4, 50, 56), {}, "multiples of the patch"),
    (torch.randn(1, 3, 4, 56, 57), {}, "multiples of the patch"),
    (torch.randn(1, 4, 4, 56, 56), {}, "channels"),
    (torch.randn(3, 4, 56, 56), {}, "rank 4"),
    (torch.randn(1, 1, 3, 4, 56, 56), {}, "rank 6"),
    (torch.randn(1, 3, 4, 56, 56), {"num_tokens": 0}, "budget"),
    (torch.randn(1, 3, 4, 56, 56), {"num_tokens": -3}, "budget"),
    (torch.randn(1, 3, 4, 56, 56), {"num_tokens": 2.5}, "budget"),
    (torch.randn(1, 3, 4, 56, 56), {"head": 3}, "head"),
    (torch.randn(1, 3, 4, 56, 56), {"head": -1}, "head"),
    ([torch.randn(3, 4, 56, 56), torch.randn(3, 4, 56)], {}, "clip 1"),
    ([torch.randn(3, 4, 56, 56)], {"num_tokens": [3, 4]}, "entries"),
    ([], {}, "empty"),
])
def test_bad_input_is_a_clear_value_error(video, kwargs, match):
    m = tiny()
    with pytest.raises(ValueError, match=match):
        m(video, **kwargs)


# --------------------------------------------------------------------------- checkpoints
def test_safetensors_round_trip(tmp_path):
    m = create_model("fluxvit_tiny_patch14", num_classes=5, depth=2, img_size=56, num_frames=4).eval()
    path = save_model(m, tmp_path / "m.safetensors", metadata={"step": 12})
    assert not (tmp_path / "m.safetensors.tmp").exists()
    loaded = load_model(path).eval()
    assert loaded.config == m.config
    video = torch.randn(2, 3, 4, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(loaded(video, num_tokens=30), m(video, num_tokens=30), rtol=0, atol=0)


def test_load_model_rejects_foreign_safetensors(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="no embedded FluxViT config"):
        load_model(tmp_path / "x.safetensors")


def test_every_cpu_backend_through_the_whole_model():
    from fluxvit.models import available_backends, force_backend

    m = tiny()
    clips = [torch.randn(3, 4, 56, 56), torch.randn(3, 2, 84, 56)]
    with torch.no_grad(), force_backend("math"):
        ref = m(clips, num_tokens=[30, None])
    for name in available_backends("cpu"):
        with torch.no_grad(), force_backend(name):
            torch.testing.assert_close(m(clips, num_tokens=[30, None]), ref, rtol=1e-5, atol=1e-5, msg=name)


def _cubic_weights(x: float, size: int) -> list[tuple[int, float]]:
    """Keys cubic convolution (A = -0.75, PyTorch's bicubic) at source coordinate x, borders clamped."""
    import math

    A = -0.75
    x0 = math.floor(x)
    t = x - x0
    out = []
    for k in (-1, 0, 1, 2):
        d = abs(t - k)
        w = ((A + 2) * d - (A + 3)) * d * d + 1 if d <= 1 else ((A * d - 5 * A) * d + 8 * A) * d - 4 * A
        out.append((min(max(x0 + k, 0), size - 1), w))
    return out


def test_pos_resize_values_against_an_independent_restatement():
    """Linear in time then bicubic in space, align_corners=False, restated element by element."""
    g = torch.Generator().manual_seed(0)
    grid = torch.randn(2, 4, 5, 3, dtype=torch.float64, generator=g)
    T, H, W = 3, 6, 2
    out = resize_pos_grid(grid, T, H, W)
    T0, H0, W0, _ = grid.shape

    def src(i, n_in, n_out):
        return (i + 0.5) * n_in / n_out - 0.5

    want = torch.zeros(T, H, W, 3, dtype=torch.float64)
    for t in range(T):
        x = min(max(src(t, T0, T), 0.0), T0 - 1)
        lo = int(x)
        hi = min(lo + 1, T0 - 1)
        frame = grid[lo] * (1 - (x - lo)) + grid[hi] * (x - lo)
        for i in range(H):
            for j in range(W):
                want[t, i, j] = sum(wi * wj * frame[a, b] for a, wi in _cubic_weights(src(i, H0, H), H0)
                                    for b, wj in _cubic_weights(src(j, W0, W), W0))
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


def test_nearest_head_ties_go_to_the_first_head():
    m = create_model("fluxvit_tiny_patch14", num_classes=3)
    assert tuple(m.config.head_budgets) == (3072, 2048, 1024)
    # 2560 is as far from 3072 as from 2048, 1536 as far from 2048 as from 1024: the earlier head wins
    assert [m.nearest_head(n) for n in (2561, 2560, 2559, 1537, 1536, 1535)] == [0, 0, 1, 1, 1, 2]
