"""InternVideo2 teacher parity: ``forward_teacher`` against an independent re-statement of the official forward.

State dicts carry the official names (the names of the 1B key list, checked in test_internvideo2.py) at a reduced
width and depth with the 1B model's head width (88) and MLP ratio (48/11), random values at scales where every
parameter moves the outputs. fp32 on CPU, tolerance 1e-5.
"""
import pytest
import torch

from fluxvit.models import create_model, load_official_checkpoint
from internvideo2_reference import interpolate_pos_embed, teacher_forward

ARCH = dict(embed_dim=176, depth=6, num_heads=2, attn_pool_num_heads=2, clip_embed_dim=96, img_size=112,
            num_frames=8)
HEADS = dict(num_heads=2, attn_pool_heads=2)


def random_state_dict(model, seed=0, frames=None):
    """Random tensors with the model's (official) names and shapes; ``frames`` stores the pos-embed for another
    frame count (as the stage-2 checkpoint stores 4)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, ref in model.state_dict().items():
        shape = list(ref.shape)
        if key == "pos_embed" and frames:
            shape[1] = 1 + frames * model.pos_grid[1] * model.pos_grid[2]
        t = torch.randn(*shape, generator=g)
        if key.endswith("norm1.weight") or key.endswith("norm2.weight") or key.endswith("_norm.weight") \
                or ".norm1_" in key and key.endswith("weight"):
            t = 1 + 0.1 * t
        elif key.endswith("gamma"):
            t = 0.3 * t
        elif key == "patch_embed.proj.weight":
            t = t * (3 * 14 * 14) ** -0.5
        elif t.dim() == 2:
            t = t * shape[1] ** -0.5
        elif key in ("pos_embed", "cls_token"):
            t = 0.5 * t
        else:
            t = 0.05 * t
        sd[key] = t
    return sd


@pytest.fixture(scope="module")
def loaded():
    torch.manual_seed(0)
    model = create_model("internvideo2_1b_patch14", **ARCH).eval()
    sd = random_state_dict(model, seed=1)
    load_official_checkpoint(model, sd)
    return model, sd


CASES = [
    # (B, T, H, W), budget, return layers: the stored grid (8 x 8 x 8), other frame counts and sizes, budgets
    ((2, 8, 112, 112), None, [2, 4, 5]),
    ((2, 4, 84, 84), None, [0, 5]),
    ((1, 12, 140, 140), None, [1, 3, 5]),
    ((2, 8, 112, 112), 200, [2, 4, 5]),
    ((2, 6, 70, 70), 100, [5]),
]


@pytest.mark.parametrize("shape,budget,layers", CASES)
def test_forward_teacher_matches_official(loaded, shape, budget, layers):
    model, sd = loaded
    B, T, H, W = shape
    torch.manual_seed(2)
    video = torch.randn(B, 3, T, H, W)
    ratio = None if budget is None else 1 - budget / (T * (H // 14) * (W // 14))
    with torch.no_grad():
        z, x, attn = model.forward_teacher(video, layers, num_tokens=budget)
        rz, rx, rattn = teacher_forward(sd, video, return_index=layers, stored_frames=8, masking_ratio=ratio,
                                        **HEADS)
    n = budget or T * (H // 14) * (W // 14)
    assert z.shape == rz.shape == (len(layers), B, 1 + n, 176)
    assert x.shape == rx.shape == (B, 96) and attn.shape == rattn.shape == (B, n)
    torch.testing.assert_close(z, rz, rtol=0, atol=1e-5)
    torch.testing.assert_close(x, rx, rtol=0, atol=1e-5)
    torch.testing.assert_close(attn, rattn, rtol=0, atol=1e-5)
    assert rattn.max() > 2.0 / n  # the attention is not flat: the comparison says something
    assert (rx[0] - rx[-1]).abs().max() > 1e-2 or B == 1


def test_official_return_layers(loaded):
    model, _ = loaded
    assert model.return_layers(3, 1.67) == [2, 4, 5]
    with torch.device("meta"):
        big = create_model("internvideo2_1b_patch14")
    assert big.return_layers(6, 3.34) == [23, 26, 29, 33, 36, 39]


def test_stage2_four_frame_pos_embed_loads_like_the_official_loader():
    """The stage-2 file stores 4 frames; the official loader interpolates to 8 before the forward."""
    torch.manual_seed(0)
    model = create_model("internvideo2_1b_patch14", **ARCH).eval()
    sd4 = random_state_dict(model, seed=3, frames=4)
    report = load_official_checkpoint(model, {"module": {f"vision_encoder.{k}": v for k, v in sd4.items()}})
    assert report.resized == ["pos_embed"]
    sd8 = dict(sd4, pos_embed=interpolate_pos_embed(sd4["pos_embed"], 4, 8, 8))
    torch.testing.assert_close(model.pos_embed.detach(), sd8["pos_embed"], rtol=0, atol=1e-6)
    video = torch.randn(2, 3, 8, 112, 112)
    with torch.no_grad():
        ours = model.forward_teacher(video, [3, 5])
        ref = teacher_forward(sd8, video, return_index=[3, 5], stored_frames=8, **HEADS)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_exact_gelu_is_the_other_flavour():
    """mlp_act='gelu' is the official non-fused path; it differs measurably from the tanh teacher."""
    torch.manual_seed(0)
    tanh = create_model("internvideo2_1b_patch14", **ARCH).eval()
    exact = create_model("internvideo2_1b_patch14", mlp_act="gelu", **ARCH).eval()
    sd = random_state_dict(tanh, seed=4)
    load_official_checkpoint(tanh, sd)
    load_official_checkpoint(exact, sd)
    video = torch.randn(1, 3, 4, 56, 56)
    with torch.no_grad():
        _, xt, _ = tanh.forward_teacher(video, [5])
        _, xe, _ = exact.forward_teacher(video, [5])
        _, re, _ = teacher_forward(sd, video, return_index=[5], stored_frames=8, gelu="none", **HEADS)
    torch.testing.assert_close(xe, re, rtol=0, atol=1e-5)
    assert (xt - xe).abs().max() > 1e-5
