"""Teachers: open_clip parity, token-grid mapping, budgets, FluxViT teacher, layer alignment, visible sampling."""
import pytest
import torch
import torch.nn.functional as F

from fluxvit.stages.distill import (FluxViTTeacher, OpenCLIPTeacher, align_layers, grid_index_map, sample_visible)
from fluxvit.stages.distill.teacher import map_to_student_grid

VISION = dict(image_size=112, patch_size=16, width=64, layers=4, head_width=32)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return OpenCLIPTeacher.create(vision_cfg=VISION, embed_dim=48, budget=0, input_norm="clip")


def test_grid_index_map():
    assert torch.equal(grid_index_map((3, 5), (3, 5)), torch.arange(15))
    # teacher 2x2 grid under a student 4x4 grid: each teacher cell covers a 2x2 block of student cells
    m = grid_index_map((2, 2), (4, 4)).view(4, 4)
    assert torch.equal(m, torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]))
    # teacher 4x4 under a student 2x2: the cell containing each student cell's centre
    assert grid_index_map((4, 4), (2, 2)).tolist() == [5, 7, 13, 15]
    # 14x14 teacher (ViT-L/14 at 196 px) against a 16x16 student grid (224 px / 14): no index out of range
    m = grid_index_map((14, 14), (16, 16))
    assert m.min() == 0 and m.max() == 14 * 14 - 1 and m.numel() == 256
    x = torch.arange(2 * 3 * 4, dtype=torch.float).view(1, 2, 4, 3)  # (B, T, 2*2, C)
    y = map_to_student_grid(x, (2, 2), (4, 4))
    assert y.shape == (1, 2 * 16, 3) and torch.equal(y[0, 16 + 5], x[0, 1, 0]) and torch.equal(y[0, 15], x[0, 0, 3])


def test_open_clip_teacher_matches_open_clip(teacher):
    frames = torch.randn(3, 3, 112, 112)
    out = teacher(frames.permute(1, 0, 2, 3)[None], (3, 7, 7), layers=[1, 3])
    ref = teacher.visual.forward_intermediates(frames, indices=[1, 3], normalize_intermediates=True, output_fmt="NLC")
    for i, layer in enumerate([1, 3]):
        want = F.normalize(ref["image_intermediates"][i] @ teacher.visual.proj, dim=-1)
        torch.testing.assert_close(out.tokens[layer].view(3, 49, -1), want, atol=1e-5, rtol=1e-4)
    pooled = F.normalize(F.normalize(ref["image_features"], dim=-1).mean(0), dim=-1)
    torch.testing.assert_close(out.pooled[0], pooled, atol=1e-5, rtol=1e-4)
    assert out.valid.all() and torch.allclose(out.cls_attn.view(3, 49).sum(-1), torch.ones(3))
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training  # never leaves eval mode


def test_teacher_budget_and_resolution_mapping(teacher):
    video = torch.randn(2, 3, 4, 84, 84)  # student grid 4 x 6 x 6
    teacher.budget = 100
    try:
        out = teacher(video, (4, 6, 6), layers=[3])
    finally:
        teacher.budget = 0
    assert out.tokens[3].shape == (2, 144, 48)
    assert out.valid.sum(1).tolist() == [100, 100]
    assert (out.cls_attn[~out.valid] == 0).all() and (out.cls_attn[out.valid] > 0).all()
    # fixed teacher input size: teacher grid 4x4 (64 px / 16) mapped onto the student's 6x6 grid
    teacher.image_size = 64
    try:
        out = teacher(video, (4, 6, 6), layers=[3])
    finally:
        teacher.image_size = 0
    idx = grid_index_map((4, 4), (6, 6))
    frame0 = out.tokens[3][0, :36]
    assert idx[:6].tolist() == [0, 1, 1, 2, 3, 3]  # student cells 1 and 2 share teacher cell 1
    assert torch.equal(frame0[1], frame0[2]) and not torch.equal(frame0[0], frame0[1])


def test_fluxvit_teacher_interface():
    torch.manual_seed(0)
    t = FluxViTTeacher.create(name="fluxvit_tiny_patch14", budget=100)
    out = t(torch.randn(2, 3, 4, 98, 98), (4, 7, 7), layers=[4, 5])
    assert out.tokens[5].shape == (2, 196, 192) and out.pooled.shape == (2, 384)
    assert out.valid.sum(1).tolist() == [100, 100]
    norms = out.tokens[5][out.valid].norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    assert (out.tokens[5][~out.valid] == 0).all()
    torch.testing.assert_close(out.cls_attn.view(2, 4, 49).sum(-1), torch.ones(2, 4))


def test_align_layers():
    assert align_layers(12, 12, 6) == [(6, 1), (7, 3), (8, 5), (9, 7), (10, 9), (11, 11)]
    assert align_layers(12, 24, 6)[-1] == (11, 23) and align_layers(12, 24, 6)[0] == (6, 3)
    assert align_layers(6, 4, 2) == [(4, 1), (5, 3)]
    assert align_layers(6, 4, 2, teacher_layers=(-2, -1)) == [(4, 2), (5, 3)]
    with pytest.raises(ValueError):
        align_layers(6, 4, 7)


def test_sample_visible():
    g = torch.Generator().manual_seed(0)
    attn = torch.rand(4 * 10)
    valid = torch.rand(40) > 0.3
    keep = sample_visible(attn * valid, valid, 12, 4, "clip", g)
    assert keep.numel() == 12 and valid[keep].all() and torch.equal(keep, keep.sort().values)
    assert keep.unique().numel() == 12
    keep = sample_visible(attn, torch.ones(40, dtype=torch.bool), 12, 4, "frame", g)
    assert torch.bincount(keep // 10, minlength=4).tolist() == [3, 3, 3, 3]
    assert torch.equal(sample_visible(attn, valid, 1000, 4, "clip", g), valid.nonzero().squeeze(1))
    # attention decides: a token with all the mass is always drawn
    peaked = torch.zeros(40)
    peaked[7] = 1.0
    for _ in range(5):
        assert 7 in sample_visible(peaked, torch.ones(40, dtype=torch.bool), 3, 4, "clip", g)
