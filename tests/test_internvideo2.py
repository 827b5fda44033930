"""InternVideo2 in the zoo: registry, the official 1B names/shapes and parameter count (meta device), strict
checkpoint loading of the official layout, packed variable-length batches, bad input."""
import json
from pathlib import Path

import pytest
import torch

from fluxvit.models import (InternVideo2, UnknownOptionError, create_model, force_backend,
                            load_official_checkpoint)

KEYS = json.loads((Path(__file__).parent / "data" / "internvideo2_1b_teacher_keys.json").read_text())
TINY = dict(embed_dim=64, depth=3, num_heads=4, attn_pool_num_heads=4, clip_embed_dim=32, img_size=56,
            num_frames=4)


def tiny(**kw):
    torch.manual_seed(0)
    return create_model("internvideo2_1b_patch14", **{**TINY, **kw}).eval()


def meta_1b():
    with torch.device("meta"):
        return create_model("internvideo2_1b_patch14")


def test_1b_names_shapes_and_parameter_count_on_meta():
    model = meta_1b()
    assert isinstance(model, InternVideo2)
    own = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert own == KEYS["keys"] and len(own) == KEYS["num_tensors"] == 538
    assert sum(p.numel() for p in model.parameters()) == KEYS["num_params"] == 1_020_708_608
    cfg = model.config
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_hidden_dim, cfg.clip_embed_dim) == (1408, 40, 16, 6144, 768)
    assert cfg.mlp_act == "gelu_tanh" and model.pos_grid == (8, 16, 16)


def _official_file_layout(frames: int = 4) -> dict:
    """The stage-2 file's layout on the meta device: weights under 'module', 'vision_encoder.' prefix, a 4-frame
    pos-embed, the distillation-only keys and the rest of the multimodal model."""
    sd = {f"vision_encoder.{k}": torch.empty(v, device="meta") for k, v in KEYS["keys"].items()}
    sd["vision_encoder.pos_embed"] = torch.empty(1, 1 + frames * 256, 1408, device="meta")
    for extra in ("clip_decoder.0.head.weight", "final_clip_decoder.head.weight", "clip_pos_embed",
                  "clip_img_pos_embed", "img_pos_embed"):
        sd[f"vision_encoder.{extra}"] = torch.empty(4, 4, device="meta")
    sd["text_encoder.embeddings.weight"] = torch.empty(10, 4, device="meta")
    sd["temp"] = torch.empty((), device="meta")
    return {"module": sd}


def test_official_1b_layout_loads_strictly_on_meta():
    model = meta_1b()
    report = load_official_checkpoint(model, _official_file_layout())
    assert len(report.loaded) == 538 and report.resized == ["pos_embed"]
    assert not (report.missing or report.unexpected or report.skipped)
    assert sorted(report.dropped) == sorted(["clip_decoder.0.head.weight", "final_clip_decoder.head.weight",
                                             "clip_pos_embed", "clip_img_pos_embed", "img_pos_embed",
                                             "text_encoder.embeddings.weight", "temp"])
    assert model.pos_embed.shape == (1, 2049, 1408)


def test_strict_load_names_the_mismatching_keys():
    model = meta_1b()
    layout = _official_file_layout()
    del layout["module"]["vision_encoder.blocks.7.attn.q_norm.weight"]
    layout["module"]["vision_encoder.blocks.0.attn.lpe.weight"] = torch.empty(3, device="meta")
    with pytest.raises(ValueError, match=r"blocks\.7\.attn\.q_norm\.weight.*blocks\.0\.attn\.lpe\.weight"):
        load_official_checkpoint(model, layout)
    report = load_official_checkpoint(meta_1b(), layout, strict=False)
    assert report.missing == ["blocks.7.attn.q_norm.weight"] and report.unexpected == ["blocks.0.attn.lpe.weight"]


def test_load_from_a_file_with_module_and_prefix(tmp_path):
    src = tiny()
    sd = {k: torch.randn_like(v) for k, v in src.state_dict().items()}
    path = tmp_path / "iv2.pt"
    torch.save({"module": {f"vision_encoder.{k}": v.bfloat16() for k, v in sd.items()}}, path)
    model = tiny()
    report = load_official_checkpoint(model, path)
    assert len(report.loaded) == len(sd) and not report.resized
    assert model.blocks[2].mlp.fc1.weight.dtype == torch.float32
    torch.testing.assert_close(model.blocks[2].mlp.fc1.weight, sd["blocks.2.mlp.fc1.weight"].bfloat16().float())
    with torch.device("meta"):
        direct = create_model("internvideo2_1b_patch14", **TINY)
    load_official_checkpoint(direct, path)  # meta model: tensors assigned directly
    assert not any(p.is_meta for p in direct.parameters())
    assert torch.equal(direct.cls_token, model.cls_token)


def test_registry_overrides_and_errors():
    m = tiny(mlp_act="gelu", depth=2)
    assert len(m.blocks) == 2 and m.blocks[0].mlp.act.approximate == "none"
    assert tiny().blocks[0].mlp.act.approximate == "tanh"
    assert m.blocks[0].mlp.fc1.out_features == int(64 * 48 / 11)
    with pytest.raises(UnknownOptionError, match="num_labels"):
        create_model("internvideo2_1b_patch14", num_labels=3)
    # num_classes is timm's contract: the official finetuning classifier (fc_norm, head); the teacher has none.
    assert tiny().num_classes == 0 and not any(k.startswith(("fc_norm", "head")) for k in tiny().state_dict())
    assert tiny(num_classes=3).head.out_features == 3 and tiny(num_classes=3).fc_norm.normalized_shape == (32,)
    with pytest.raises(ValueError, match="mlp_act"):
        create_model("internvideo2_1b_patch14", mlp_act="relu", **TINY)


def test_packed_batch_of_mixed_grids_equals_each_clip_alone():
    model = tiny()
    torch.manual_seed(1)
    clips = [torch.randn(3, 4, 56, 56), torch.randn(3, 1, 70, 42), torch.randn(3, 6, 28, 56), torch.randn(3, 8, 56, 56)]
    budgets = [None, None, 20, 50]
    with torch.no_grad():
        packed = model.forward_packed(clips, layers=[0, -1], num_tokens=budgets)
        assert [k.numel() for k in packed.keep] == [64, 15, 20, 48]  # 4 groups of 12
        for i, (clip, b) in enumerate(zip(clips, budgets)):
            alone = model.forward_packed([clip], layers=[0, 2], num_tokens=b)
            torch.testing.assert_close(packed.split(packed.hidden[2])[i], alone.hidden[2], rtol=0, atol=1e-5)
            torch.testing.assert_close(packed.pooled[i], alone.pooled[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(packed.split(packed.attn)[i], alone.attn, rtol=0, atol=1e-6)
            assert torch.equal(packed.keep[i], alone.keep[0])
    with pytest.raises(ValueError, match="forward_packed"):
        model.forward_teacher(clips, [1])


def test_backends_agree():
    model = tiny()
    video = torch.randn(2, 3, 4, 56, 42)
    with torch.no_grad():
        with force_backend("math"):
            ref = model.forward_teacher(video, [1, 2], num_tokens=30)
        with force_backend("segments"):
            got = model.forward_teacher(video, [1, 2], num_tokens=30)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("video,match", [
    (torch.randn(1, 3, 4, 50, 56), "multiples of the patch size"),
    (torch.randn(1, 4, 4, 56, 56), "expected"),
    (torch.randn(3, 4, 56, 56), "shape"),
])
def test_bad_input_is_a_clear_error(video, match):
    with pytest.raises(ValueError, match=match):
        tiny()(video)


def test_bad_budget_and_layer():
    model = tiny()
    with pytest.raises(ValueError, match="budget"):
        model(torch.randn(1, 3, 2, 28, 28), num_tokens=0)
    with pytest.raises(ValueError, match="out of range"):
        model.forward_teacher(torch.randn(1, 3, 2, 28, 28), [3])


@pytest.mark.gpu
def test_cuda_bf16_matches_fp32_within_bf16_rounding():
    """On CUDA the teacher runs under bf16 autocast on the fastest backend (flash-attn when installed)."""
    model = tiny().cuda()
    video = torch.randn(2, 3, 8, 56, 56, device="cuda")
    with torch.no_grad():
        with force_backend("math"):
            ref = model.forward_teacher(video, [1, 2])
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = model.forward_teacher(video, [1, 2])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.float(), b, rtol=0, atol=5e-2)
