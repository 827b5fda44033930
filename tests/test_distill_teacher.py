"""Teachers: open_clip parity, token-grid mapping, budgets, FluxViT and InternVideo2 teachers, layer pairing,
visible sampling, pooling heads per budget, student-side decoders."""
import pytest
import torch
import torch.nn.functional as F

from fluxvit.models import create_model
from fluxvit.stages.common.teacher import TeacherConfig, build_teacher, map_to_student_grid
from fluxvit.stages.distill import (DecoderPosEmbed, FeatureDecoder, FluxViTTeacher, InternVideo2Teacher,
                                    OpenCLIPTeacher, align_layers, build_config, grid_index_map, pool_heads,
                                    sample_visible)

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


def test_align_layers_official_pairing():
    # InternVideo2-1B (40 blocks), K 6, interval 3.34, student interval 1: the official indices
    assert align_layers(12, 40, 6, teacher_interval=3.34) == [(6, 23), (7, 26), (8, 29), (9, 33), (10, 36),
                                                              (11, 39)]
    # UMT: a 12-block CLIP tower, its last six blocks against the student's last six
    assert align_layers(12, 12, 6) == [(6, 6), (7, 7), (8, 8), (9, 9), (10, 10), (11, 11)]
    assert align_layers(24, 24, 6) == [(18, 18), (19, 19), (20, 20), (21, 21), (22, 22), (23, 23)]
    assert align_layers(6, 4, 2, teacher_interval=2) == [(4, 1), (5, 3)]
    assert align_layers(6, 4, 2, teacher_layers=(-3, -1), student_layers=(1, 5)) == [(1, 1), (5, 3)]
    with pytest.raises(ValueError, match="do not fit"):
        align_layers(6, 4, 7)
    with pytest.raises(ValueError, match="teacher layers"):
        align_layers(6, 4, 2, teacher_layers=(1, 1))


def test_pool_heads_by_rank_or_explicit():
    assert pool_heads([2048, 1536, 1024], 3) == [0, 1, 2]
    assert pool_heads([128, 192], 3) == [1, 0]
    assert pool_heads([128, 96, 64, 32], 3) == [0, 1, 2, 2]
    assert pool_heads([2048, 1024], 3, explicit=(1, 2)) == [1, 2]
    with pytest.raises(ValueError, match="pool_heads"):
        pool_heads([2048, 1024], 3, explicit=(1, 3))


def test_decoders_and_position_embedding():
    torch.manual_seed(0)
    for kind in ("mlp", "linear"):
        dec = FeatureDecoder(16, 24, kind)
        y = dec(torch.randn(5, 16))
        assert y.shape == (5, 24)
        torch.testing.assert_close(y.norm(dim=-1), torch.ones(5))
    assert isinstance(FeatureDecoder(16, 24, "mlp").head[1], torch.nn.GELU)
    with pytest.raises(ValueError, match="loss.decoder"):
        FeatureDecoder(16, 24, "conv")
    pe = DecoderPosEmbed(32, (4, 3, 3))
    assert pe.table((4, 3, 3)) is pe.weight and pe.table((2, 5, 4)).shape == (1 + 40, 32)
    assert torch.equal(pe.table((2, 5, 4))[0], pe.weight[0])


def _umt_sinusoid(n, d):
    # UMT's get_sinusoid_encoding_table (single_modality/models/modeling_pretrain_umt.py), restated with numpy
    import numpy as np

    table = np.array([[p / np.power(10000, 2 * (j // 2) / d) for j in range(d)] for p in range(n)])
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return torch.tensor(table, dtype=torch.float)


def test_umt_fixed_decoder_position_table():
    from fluxvit.stages.distill.decoders import FixedDecoderPosEmbed, sinusoid_table

    torch.testing.assert_close(sinusoid_table(40, 32), _umt_sinusoid(40, 32))
    pe = FixedDecoderPosEmbed(32)
    assert not list(pe.parameters())  # fixed, as UMT's clip_pos_embed (a plain tensor, never trained)
    t = pe.table((2, 5, 4))
    assert t.shape == (41, 32) and torch.equal(t[0], torch.zeros(32))
    torch.testing.assert_close(t[1:], _umt_sinusoid(40, 32))


def test_umt_decoders_see_the_normed_student_states_plus_the_fixed_table():
    """UMT's student: final LayerNorm on every returned layer, then the fixed sinusoid table, then the decoder."""
    from fluxvit.stages.distill import DistillModel
    from fluxvit.stages.distill.config import LossConfig

    torch.manual_seed(0)
    student = create_model("fluxvit_tiny_patch14", num_classes=0, depth=2, head_budgets=(32, 16, 8))
    lc = LossConfig(num_layers=1, decoder="linear", decoder_pos_fixed=True, decoder_norm=True)
    model = DistillModel(student, [1], 24, 16, lc).eval()
    assert not any("decoder_pos_embed" in n for n, _ in model.named_parameters())
    clip = torch.randn(3, 2, 56, 56)
    keep = torch.tensor([0, 3, 5, 17, 30])
    preds, _, _, _ = model([clip], [keep], [0])
    f = student.forward_features([clip], keep=[keep], layers=[1], head=[0])
    pos = _umt_sinusoid(32, student.config.embed_dim)[keep]
    x = F.layer_norm(f.layers[1], (student.config.embed_dim,), model.decoder_norm.weight, model.decoder_norm.bias,
                     1e-6)
    want = model.decoders["1"](x + torch.cat([torch.zeros(1, student.config.embed_dim), pos]))
    torch.testing.assert_close(preds[1], want)
    plain = DistillModel(student, [1], 24, 16, LossConfig(num_layers=1, decoder="linear")).eval()
    assert plain.decoder_norm is None and isinstance(plain.decoder_pos_embed, DecoderPosEmbed)


def test_stage1_lr_is_per_256_and_scaled_by_the_total_batch():
    """run_distill.py / run_umt_pretraining.py: lr, min_lr, warmup_lr x total batch x num_sample / 256."""
    from fluxvit.stages.distill import DistillTask

    cfg = build_config("smoke", ["scale_lr=true", "optim.lr=1e-3", "data.batch_size=4", "train.grad_accum=2"])
    task = DistillTask(cfg, world_size=3)
    opt = task.build_optimizer(cfg.optim)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3 * 4 * 2 * 3 / 256] * len(opt.param_groups))
    cfg.scale_lr = False
    assert {g["lr"] for g in task.build_optimizer(cfg.optim).param_groups} == {1e-3}


TINY_IV2 = dict(embed_dim=64, depth=4, num_heads=4, attn_pool_num_heads=4, clip_embed_dim=32, img_size=56,
                num_frames=4, init_values=0.1)


def test_internvideo2_teacher_targets_are_the_models_outputs():
    torch.manual_seed(0)
    t = build_teacher(TeacherConfig(kind="internvideo2", budget=40, overrides=TINY_IV2))
    assert isinstance(t, InternVideo2Teacher) and not t.training and t.depth == 4 and t.pooled_dim == 32
    t.train()
    assert not t.training and not t.model.training  # never leaves eval mode (the official script's teacher does)
    video = torch.randn(2, 3, 4, 56, 42)  # grid 4 x 4 x 3 = 48 tokens, the teacher keeps 40
    out = t(video, (4, 4, 3), layers=[1, 3])
    z, pooled, attn = t.model.forward_teacher(video, [1, 3], num_tokens=40)
    keep = torch.stack(t.model.forward_packed(video, [], 40).keep)
    assert out.valid.sum(1).tolist() == [40, 40]
    for b in range(2):
        assert torch.equal(out.valid[b].nonzero().squeeze(1), keep[b])
        torch.testing.assert_close(out.token_targets(3, b, keep[b]), z[1, b, 1:])
        torch.testing.assert_close(out.cls[1][b], z[0, b, 0])
        torch.testing.assert_close(out.cls_attn[b, keep[b]], attn[b])
    assert (out.cls_attn[~out.valid] == 0).all()
    torch.testing.assert_close(out.pooled, pooled)


def test_internvideo2_teacher_needs_the_official_weights():
    with pytest.raises(ValueError, match="InternVideo2-stage2_1b-224p-f4.pt"):
        build_teacher(TeacherConfig(kind="internvideo2", name="internvideo2_1b_patch14"))
    from fluxvit.stages.distill import DistillTask
    with pytest.raises(ValueError, match=r"teacher.weights.*InternVideo2-Stage2_1B-224p-f4"):
        DistillTask(build_config("paper_s"))


def test_internvideo2_teacher_loads_weights(tmp_path):
    torch.manual_seed(0)
    src = create_model("internvideo2_1b_patch14", **TINY_IV2)
    path = tmp_path / "iv2.pt"
    torch.save({"module": {f"vision_encoder.{k}": v for k, v in src.state_dict().items()}}, path)
    t = build_teacher(TeacherConfig(kind="internvideo2", weights=str(path), overrides=TINY_IV2))
    assert torch.equal(t.model.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)
    assert not any(p.requires_grad for p in t.parameters())


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


def test_presets_follow_their_source_recipes():
    for name, student in (("paper_s", "fluxvit_small_patch14"), ("paper_b", "fluxvit_base_patch14")):
        c = build_config(name)
        assert c.model.name == student and c.teacher.kind == "internvideo2" and c.teacher.budget == 2048
        assert (c.loss.num_layers, c.loss.teacher_interval, c.loss.student_interval) == (6, 3.34, 1.0)
        assert c.loss.sampling == "clip" and c.loss.decoder == "mlp" and c.loss.pooled_weight == c.loss.token_weight
        assert tuple(c.loss.budgets) == (2048, 1536, 1024) and c.optim.lr == 1e-3 and c.scale_lr
        assert (c.optim.eps, c.optim.clip_grad, c.optim.min_lr) == (1e-6, 5.0, 1e-5)  # S14_dist_1B_stage2.sh
        assert align_layers(12, 40, 6, c.loss.teacher_interval)[0] == (6, 23)
    for name, tower, student in (("umt_b16", "ViT-B-16", "fluxvit_base_patch14"),
                                 ("umt_l14", "ViT-L-14", "fluxvit_large_patch14")):
        c = build_config(name)
        assert c.teacher.kind == "open_clip" and c.teacher.name == tower and c.model.name == student
        assert c.loss.sampling == "frame" and c.loss.decoder == "linear" and c.loss.teacher_interval == 1.0
        assert c.loss.pooled_weight == 0 and tuple(c.loss.budgets) == (416,) and tuple(c.optim.betas) == (0.9, 0.95)
        assert c.loss.decoder_pos_fixed and c.loss.decoder_norm and c.scale_lr and c.optim.lr == 1.5e-4
    for name in ("smoke", "smoke_corpus", "demo"):
        assert build_config(name).teacher.kind == "internvideo2"


def test_videotext_shares_the_teacher_without_importing_distill():
    import ast
    from pathlib import Path

    import fluxvit.stages.videotext as videotext
    from fluxvit.stages.videotext.config import TeacherAlignConfig

    assert TeacherAlignConfig().teacher.__class__ is TeacherConfig  # one teacher config for stages 1 and 2
    for path in Path(videotext.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "distill" not in (node.module or ""), f"{path.name} imports {node.module}"
