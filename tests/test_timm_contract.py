"""timm's model contract over every registered model, modelled on timm's own ``tests/test_models.py``: create through
``timm.create_model``, forward and backward on a tiny video, ``reset_classifier(0)`` then features,
``forward_head(pre_logits=True)`` of width ``num_features``, layer-decay groups of ``timm.optim`` equal to the
release's layer ids, ``resolve_data_config`` giving the model's video input, the pretrained cfgs, and weights loaded
through timm's ``load_pretrained`` (a release-layout file, timm's hub layout).

Each case runs its model's family narrowed to 2 blocks of width 64 and a 4 x 4 x 4 pos-embed grid, so the file
stays well under a minute on a CPU."""
import json

import pytest
import timm
import timm.optim
import torch
from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_data_config
from timm.models import get_pretrained_cfg, is_model

import fluxvit  # noqa: F401  (registers the zoo with timm)
from fluxvit.models import FluxViT, InternVideo2, UnknownOptionError, create_model, list_models
from fluxvit.stages.common import OptimConfig
from fluxvit.stages.common.optim import layer_decay_optimizer
from fluxvit.stages.finetune.model import FinetuneModel

NAMES = list_models()
VIDEO = (2, 3, 4, 56, 56)  # (B, C, T, H, W): 4 x 16 patches per clip
BUDGET = 40


def small(name: str) -> dict:
    """Overrides that keep a model's family and layout at test cost: 2 blocks of width 64, a 4 x 4 x 4 pos-embed grid
    (``tests/test_models.py`` runs every FluxViT at its real width)."""
    return dict(depth=2, embed_dim=64, num_heads=2, clip_embed_dim=32, attn_pool_num_heads=4, img_size=56,
                num_frames=4)


def build(name: str, **kw):
    torch.manual_seed(0)
    return timm.create_model(name, **{**small(name), **kw})


def video(seed: int = 1) -> torch.Tensor:
    return torch.randn(*VIDEO, generator=torch.Generator().manual_seed(seed))


def release_layer_id(name: str, depth: int) -> int:
    # An independent re-statement of the release's optim_factory.get_num_layer_for_vit.
    if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return depth + 1


def test_timm_lists_the_zoo_through_its_public_registration():
    assert sorted(timm.list_models("fluxvit*") + timm.list_models("internvideo2*")) == NAMES
    for name in NAMES:
        assert is_model(name)
        cfg = get_pretrained_cfg(name)  # registered with generate_default_cfgs, not written into timm's dicts
        assert cfg is not None and cfg.architecture == name
    assert timm.list_models("internvideo2*", pretrained=True) == ["internvideo2_1b_patch14.stage2_f4"]
    assert timm.list_models("fluxvit*", pretrained=True) == []  # FluxViT's files are on Google Drive only


@pytest.mark.parametrize("name", NAMES)
def test_create_forward_backward(name):
    m = build(name, num_classes=5).train()
    assert isinstance(m, InternVideo2 if name.startswith("internvideo2") else FluxViT)
    # timm's and the project's create_model give the same model (weights and pretrained_cfg).
    torch.manual_seed(0)
    own = create_model(name, **small(name), num_classes=5)
    assert own.pretrained_cfg == m.pretrained_cfg
    for (k, a), (_, b) in zip(m.state_dict().items(), own.state_dict().items()):
        assert torch.equal(a, b), k
    out = m(video(), num_tokens=BUDGET)
    assert out.shape == (2, 5) and m.num_classes == 5
    out.square().mean().backward()
    for n, p in m.named_parameters():
        if n.startswith(("patch_embed", "blocks", "cls_token", "pos_embed")):
            assert p.grad is not None and torch.isfinite(p.grad).all(), n


@pytest.mark.parametrize("name", NAMES)
def test_reset_classifier_and_forward_head(name):
    m = build(name, num_classes=5).eval()
    x = video()
    with torch.no_grad():
        feats = m.forward_features(x, num_tokens=BUDGET)
        pre = m.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, m.num_features) and m.head_hidden_size == m.num_features
        assert torch.equal(m.forward_head(feats), m(x, num_tokens=BUDGET))
        m.reset_classifier(0)
        assert m.num_classes == 0 and m.config.num_classes == 0
        torch.testing.assert_close(m(x, num_tokens=BUDGET), pre, rtol=0, atol=0)
        m.reset_classifier(3)
        assert m(x, num_tokens=BUDGET).shape == (2, 3) and m.num_classes == m.config.num_classes == 3
    heads = m.get_classifier()
    heads = list(heads) if isinstance(heads, torch.nn.ModuleList) else [heads]
    assert len(heads) == (1 if isinstance(m, InternVideo2) else len(m.config.head_budgets))
    assert all(h.out_features == 3 and h.in_features == m.num_features for h in heads)
    with pytest.raises(ValueError, match="global_pool"):
        m.reset_classifier(3, global_pool="avg")


@pytest.mark.parametrize("name", NAMES)
def test_layer_decay_groups_are_the_release_layer_ids(name):
    m = build(name, num_classes=5)
    depth = len(m.blocks)
    opt = timm.optim.create_optimizer_v2(m, "adamw", lr=1.0, weight_decay=0.05, layer_decay=0.75)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    skip = m.no_weight_decay()
    assert {"pos_embed", "cls_token"} <= skip <= {n for n, _ in m.named_parameters()}
    ids = set()
    for n, p in m.named_parameters():
        lid = release_layer_id(n, depth)
        ids.add(lid)
        g = group_of[id(p)]
        assert g["lr_scale"] == pytest.approx(0.75 ** (depth + 1 - lid)), n
        assert g["weight_decay"] == (0.0 if p.ndim <= 1 or n in skip else 0.05), n
    assert ids == set(range(depth + 2))  # stem, every block, the heads
    if isinstance(m, FluxViT):
        # The release's quirk: gpe_proj (the global PE's affine) trains at the heads' full lr.
        assert group_of[id(m.gpe_proj.depthwise_conv.weight)]["lr_scale"] == 1.0
        # The project's finetuning optimizer (timm's, over the FinetuneModel wrapper) gives the same groups.
        ft = layer_decay_optimizer(FinetuneModel(m), OptimConfig(weight_decay=0.05), 0.75, lr=2.0)
        for g in ft.param_groups:
            for p in g["params"]:
                assert g["lr_scale"] == group_of[id(p)]["lr_scale"] and g["lr"] == 2.0 * g["lr_scale"]
                assert g["weight_decay"] == group_of[id(p)]["weight_decay"]
        assert sum(len(g["params"]) for g in ft.param_groups) == sum(1 for _ in m.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_resolve_data_config_gives_the_video_input(name):
    m = build(name)
    size = 112 if name == "fluxvit_tiny_patch14" else 224
    assert resolve_data_config(model=m) == dict(input_size=(3, 8, size, size), interpolation="bicubic",
                                                mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, crop_pct=1.0,
                                                crop_mode="center")
    C, T, H, W = m.pretrained_cfg["input_size"]
    with torch.no_grad():
        out = m.eval()(torch.randn(1, C, T, H, W), num_tokens=BUDGET)
    assert out.shape == (1, m.num_classes or m.num_features)


@pytest.mark.parametrize("name", NAMES)
def test_grad_checkpointing_keeps_loss_and_grads(name):
    m = build(name, num_classes=5).train()
    x = video()

    def step():
        torch.manual_seed(0)  # the same stochastic-depth draws (InternVideo2's default drop path is 0.25)
        m.zero_grad()
        loss = m(x, num_tokens=BUDGET).square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    loss, grads = step()
    m.set_grad_checkpointing(True)
    assert m.grad_checkpointing
    loss_ckpt, grads_ckpt = step()
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads_ckpt.keys() == grads.keys()
    for n in grads:
        torch.testing.assert_close(grads_ckpt[n], grads[n], msg=n)


def test_release_pretrained_cfgs():
    for name, drive_id in (("fluxvit_small_patch14", "1OTjTsAnZGaq7AufDaw8IYLeSgmLYZjds"),
                           ("fluxvit_base_patch14", "1YsxsB3_pkpdvmXQIhD3YOmWlqCyzJskg")):
        cfg = get_pretrained_cfg(name)
        assert cfg.tag == "k710_ft_k400" and cfg.num_classes == 400 and cfg.hf_hub_id is None
        assert cfg.classifier == ("head.0", "head.1", "head.2") and cfg.first_conv == "patch_embed.proj"
        assert any(drive_id in note for note in cfg.notes)
    iv2 = get_pretrained_cfg("internvideo2_1b_patch14")
    assert (iv2.hf_hub_id, iv2.hf_hub_filename) == ("OpenGVLab/InternVideo2-Stage2_1B-224p-f4",
                                                    "InternVideo2-stage2_1b-224p-f4.pt")
    assert iv2.num_classes == 0


def test_pretrained_without_a_file_names_where_the_weights_are():
    with pytest.raises(ValueError, match="drive.google.com"):
        timm.create_model("fluxvit_small_patch14", pretrained=True, **small("fluxvit_small_patch14"))
    with pytest.raises(ValueError, match="none published"):
        timm.create_model("fluxvit_tiny_patch14", pretrained=True)


def test_timm_rejects_unknown_options_and_features_only():
    with pytest.raises(UnknownOptionError, match="embed_dims"):
        timm.create_model("fluxvit_tiny_patch14", embed_dims=64)
    with pytest.raises(ValueError, match="features_only"):
        timm.create_model("fluxvit_tiny_patch14", features_only=True)


def test_official_layout_file_loads_through_timm(tmp_path):
    # A release-layout file (weights under "module", "backbone." prefixes, a pos-embed of another grid) loads through
    # timm's load_pretrained with the zoo's filter; another class count keeps the backbone and drops the heads.
    src = build("fluxvit_tiny_patch14", num_classes=400, img_size=112).eval()
    path = tmp_path / "release.pth"
    torch.save({"module": {f"backbone.{k}": v for k, v in src.state_dict().items()}}, path)
    x = video()
    same = build("fluxvit_tiny_patch14", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                 img_size=112).eval()
    with torch.no_grad():
        torch.testing.assert_close(same(x, num_tokens=BUDGET), src(x, num_tokens=BUDGET), rtol=0, atol=0)
    resized = build("fluxvit_tiny_patch14", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                    num_classes=3).eval()  # a 4 x 4 x 4 pos-embed grid: the file's 4 x 8 x 8 resized
    assert resized.pos_grid == (4, 4, 4)
    with torch.no_grad():
        a = resized.forward_head(resized.forward_features(x, num_tokens=BUDGET), pre_logits=True)
        b = src.forward_head(src.forward_features(x, num_tokens=BUDGET), pre_logits=True)
    # At the input's 4 x 4 x 4 grid the source resizes its pos-embed at run time the same way the load did.
    assert resized.num_classes == 3 and resized.head[0].out_features == 3
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_internvideo2_official_layout_loads_through_timm(tmp_path):
    src = build("internvideo2_1b_patch14").eval()
    state = {f"vision_encoder.{k}": v for k, v in src.state_dict().items()}
    state["text_encoder.embeddings.weight"] = torch.zeros(2, 2)  # the stage-2 file's other towers are dropped
    state["vision_encoder.clip_decoder.0.head.weight"] = torch.zeros(2, 2)
    path = tmp_path / "iv2.pt"
    torch.save({"module": state}, path)
    loaded = build("internvideo2_1b_patch14", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = video()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, num_tokens=BUDGET), src(x, num_tokens=BUDGET), rtol=0, atol=0)


def test_hub_layout_folder_loads_through_timm(tmp_path):
    # timm's hub layout (config.json + model.safetensors), read by timm's own local-dir loader: the class count and
    # model_args of config.json reach the zoo's entry point, the weights load unchanged.
    src = build("fluxvit_tiny_patch14", num_classes=7).eval()
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "model.safetensors"))
    cfg = {k: v for k, v in src.pretrained_cfg.items() if k != "architecture"}
    (tmp_path / "config.json").write_text(json.dumps(dict(architecture="fluxvit_tiny_patch14", num_classes=7,
                                                          pretrained_cfg=cfg, model_args=small("fluxvit_tiny_patch14"))))
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert loaded.num_classes == 7 and loaded.pretrained_model_args == small("fluxvit_tiny_patch14")
    for k, v in src.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
