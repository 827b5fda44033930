"""Decay groups, cosine schedule with warmup, EMA."""
import pytest
import torch

from fluxvit.models import create_model
from fluxvit.stages.common import ModelEMA, OptimConfig, build_optimizer, build_scheduler, cosine_lr, param_groups


def test_decay_groups_exclude_norms_biases_pos_cls():
    model = create_model("fluxvit_tiny_patch14", num_classes=0)
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    nd = set(no_decay["names"])
    assert {"pos_embed", "cls_token"} <= nd
    assert any(n.endswith("norm1.weight") for n in nd) and any(n.endswith(".bias") for n in nd)
    assert all(not n.endswith(".bias") and "norm" not in n for n in decay["names"])
    assert "blocks.0.attn.qkv.weight" in decay["names"] and "patch_embed.proj.weight" in decay["names"]
    total = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == total
    opt = build_optimizer(model, OptimConfig(weight_decay=0.05))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.98)


def test_cosine_schedule_with_warmup():
    assert cosine_lr(0, 100, 10, 1.0, 0.0) == pytest.approx(0.1)
    assert cosine_lr(9, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert cosine_lr(55, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert cosine_lr(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)
    lin = torch.nn.Linear(2, 2)
    opt = build_optimizer(lin, OptimConfig(lr=2.0, min_lr=0.0, warmup_fraction=0.2))
    sched = build_scheduler(opt, OptimConfig(lr=2.0, min_lr=0.0, warmup_fraction=0.2), 10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1.0) and lrs[1] == pytest.approx(2.0)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:])) and lrs[-1] < 0.2


def _official_lambda(step, warmup, total, min_lr_multi):
    # InternVideo2 / UMT multi_modality utils/scheduler.py get_cosine_schedule_with_warmup, restated
    import math

    if step < warmup:
        return max(min_lr_multi, float(step) / float(max(1, warmup)))
    progress = float(step - warmup) / float(max(1, total - warmup))
    return max(min_lr_multi, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))


def test_cosine_floor_schedule_is_the_multimodality_scheduler():
    """Stage 2's schedule: from 0.01 x lr, linear warm-up, cosine to 0 held at 0.01 x lr (min_lr_multi 0.01)."""
    cfg = OptimConfig(lr=4e-4, min_lr=4e-6, warmup_fraction=0.2, schedule="cosine_floor")
    opt = build_optimizer(torch.nn.Linear(2, 2), cfg)
    sched = build_scheduler(opt, cfg, 200)
    for step in range(200):
        assert opt.param_groups[0]["lr"] == pytest.approx(4e-4 * _official_lambda(step, 40, 200, 0.01), rel=1e-9)
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(4e-6)  # held at the floor, not ramped down to it
    with pytest.raises(ValueError, match="optim.schedule"):
        build_scheduler(opt, OptimConfig(schedule="linear"), 10)


def test_ema_tracks_weights():
    lin = torch.nn.Linear(3, 3)
    ema = ModelEMA(lin, 0.5)
    with torch.no_grad():
        lin.weight.add_(2.0)
    before = ema.module.weight.clone()
    ema.update(lin)
    assert torch.allclose(ema.module.weight, before + 1.0)
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_of_a_bf16_model_is_fp32_and_keeps_small_updates():
    """Under DeepSpeed bf16 the unwrapped model is bf16. The average is kept in fp32: 100 updates at decay
    0.999 towards a weight one bf16 step (2**-7) above it move it by ~7e-4, which a bf16 average rounds away."""
    lin = torch.nn.Linear(4, 4, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema = ModelEMA(lin, 0.999)
    assert ema.module.weight.dtype == torch.float32
    with torch.no_grad():
        lin.weight.fill_(1.0 + 2 ** -7)
    for _ in range(100):
        ema.update(lin)
    expected = 1.0 + 2 ** -7 * (1 - 0.999 ** 100)
    torch.testing.assert_close(ema.module.weight, torch.full((4, 4), expected), rtol=0, atol=1e-6)
