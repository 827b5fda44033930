"""Official-checkpoint loading and output parity with the release's forward semantics.

The state dicts are built from the official key list (tests/data/fluxvit_official_keys.json) with random
values, so every parameter matters; ``release_reference`` recomputes the release forward independently.
"""
import json
from pathlib import Path

import pytest
import torch

from fluxvit.models import create_model, load_official_checkpoint
from fluxvit.models.checkpoint import read_state_dict
from release_reference import release_forward

KEYS = json.loads((Path(__file__).parent / "data" / "fluxvit_official_keys.json").read_text())


def official_state_dict(name: str, seed: int = 0) -> dict:
    """Random tensors with the official names and shapes; scales chosen so every part moves the output."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in KEYS[name].items():
        t = torch.randn(*shape, generator=g)
        if key.endswith(("norm1.weight", "norm2.weight", "norm.weight", "norm_before.weight", "q_norm.weight",
                         "k_norm.weight", "fc_norm.weight")) or ".norm1_" in key and key.endswith("weight"):
            t = 1 + 0.1 * t
        elif key.endswith("gamma"):
            t = 0.2 * t
        elif "depthwise_conv.weight" in key:
            t = 1 + 0.2 * t
        elif t.dim() >= 2:
            t = t * (1.0 / shape[1] ** 0.5 if t.dim() == 2 else 0.02)
        else:
            t = 0.05 * t
        sd[key] = t
    return sd


ARCH = {
    "fluxvit_small_patch14": dict(num_frames=24, num_heads=6),
    "fluxvit_base_patch14": dict(num_frames=32, num_heads=12),
}


def test_key_list_round_trip_strict():
    for name in ARCH:
        sd = official_state_dict(name)
        model = create_model(name)
        report = load_official_checkpoint(model, sd)
        assert len(report.loaded) == len(KEYS[name]) == len(model.state_dict())
        assert not (report.missing or report.unexpected or report.skipped or report.resized)
        own = model.state_dict()
        assert all(torch.equal(own[k], sd[k]) for k in sd)


@pytest.mark.parametrize("wrap", ["bare", "model", "module", "backbone", "encoder", "module+module."])
def test_checkpoint_wrappings(wrap, tmp_path):
    sd = official_state_dict("fluxvit_small_patch14", seed=1)
    if wrap == "model":
        obj = {"model": sd, "epoch": 3}
    elif wrap == "module":
        obj = {"module": sd}
    elif wrap in ("backbone", "encoder"):
        obj = {f"{wrap}.{k}": v for k, v in sd.items()}
    elif wrap == "module+module.":
        obj = {"module": {f"module.{k}": v for k, v in sd.items()}}
    else:
        obj = sd
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    model = create_model("fluxvit_small_patch14")
    load_official_checkpoint(model, path)
    assert torch.equal(model.pos_embed, sd["pos_embed"])


def test_strict_mismatch_raises_and_nonstrict_skips_heads():
    sd = official_state_dict("fluxvit_small_patch14")
    model = create_model("fluxvit_small_patch14", num_classes=10)
    with pytest.raises(ValueError, match="head.0.weight"):
        load_official_checkpoint(model, sd)
    report = load_official_checkpoint(model, sd, strict=False)
    assert sorted(k.split(":")[0] for k in report.skipped) == sorted(
        f"head.{i}.{p}" for i in range(3) for p in ("weight", "bias"))
    assert torch.equal(model.blocks[3].attn.qkv.weight, sd["blocks.3.attn.qkv.weight"])


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "args": Path("/etc")}, path)
    with pytest.raises(ValueError, match="weights-only"):
        read_state_dict(path)


def test_pos_embed_of_another_grid_is_resized():
    sd = official_state_dict("fluxvit_small_patch14")
    model = create_model("fluxvit_small_patch14", num_frames=8, img_size=224)
    report = load_official_checkpoint(model, sd)
    assert report.resized == ["pos_embed"]
    assert model.pos_embed.shape == (1, 1 + 8 * 16 * 16, 384)


CASES = [
    # name, (B, T, H, W), budget K, head: input grids differ from the pos-embed grid in T, in space or both
    ("fluxvit_small_patch14", (2, 8, 224, 224), 1024, 2),
    ("fluxvit_small_patch14", (2, 6, 168, 168), 700, 1),
    ("fluxvit_small_patch14", (3, 12, 112, 112), 333, 0),
    ("fluxvit_small_patch14", (2, 2, 252, 252), None, 1),
    ("fluxvit_base_patch14", (2, 8, 112, 112), 100, 0),
    ("fluxvit_base_patch14", (2, 10, 140, 140), 500, 2),
]


@pytest.mark.parametrize("name,shape,budget,head", CASES)
def test_forward_matches_release(name, shape, budget, head):
    torch.manual_seed(0)
    sd = official_state_dict(name, seed=2)
    model = create_model(name).eval()
    load_official_checkpoint(model, sd)
    B, T, H, W = shape
    video = torch.randn(B, 3, T, H, W)
    tokens = T * (H // 14) * (W // 14)
    ratio = None if budget is None else 1 - budget / tokens
    with torch.no_grad():
        ours = model(video, num_tokens=budget, head=head)
        ref = release_forward(sd, video, masking_ratio=ratio, output_head=head, **ARCH[name])
    assert ours.shape == ref.shape == (B, 400)
    assert ref.abs().max() > 0.1  # the comparison is not between near-zero tensors
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
