"""Stage 3 Flux-Multi loss: one packed forward equals the release's three separate forwards (loss and grads);
multi-view aggregation on hand-built logits; layer-decay groups equal to the release's ids on FluxViT-S; the
release's lr scaling and warmup; random token selection."""
import pytest
import torch

from fluxvit.metrics import aggregate_views, topk_accuracy
from fluxvit.models import create_model
from fluxvit.stages.finetune.eval import view_tokens
from fluxvit.stages.common import OptimConfig
from fluxvit.stages.common.optim import cosine_lr, layer_decay_optimizer, scale_lr
from fluxvit.stages.finetune.loss import flux_multi_loss, smooth_targets, soft_cross_entropy
from fluxvit.stages.finetune.model import FinetuneModel, random_keep
from fluxvit.stages.finetune.tokenopt import candidate_pairs, plain_pair

BUDGETS, HEADS = (96, 64, 32), (0, 1, 2)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    m = create_model("fluxvit_tiny_patch14", num_classes=5, depth=2, head_budgets=BUDGETS)
    return m.train()


def _three_pass_loss(net, video, target):
    """The release's Flux-Multi: one forward per budget, then the same terms."""
    B = video.shape[0]
    feats = [net.forward_features(video, num_tokens=b, head=h) for b, h in zip(BUDGETS, HEADS)]
    ce = [soft_cross_entropy(net.logits(f), target) for f in feats]
    ref = torch.nn.functional.normalize(feats[0].pooled.detach(), dim=-1)
    dec = net.final_clip_decoder_for_projs
    align = [torch.nn.functional.smooth_l1_loss(dec[j - 1](feats[j].pooled), ref, beta=1.0) for j in (1, 2)]
    assert all(f.pooled.shape[0] == B for f in feats)
    return sum(ce) + sum(align)


def test_packed_flux_multi_loss_equals_three_passes(net):
    torch.manual_seed(1)
    video = torch.randn(3, 3, 8, 56, 56)  # 8 x 16 = 128 tokens > 96 > 64 > 32: the selector runs at each budget
    target = torch.softmax(torch.randn(3, 5), dim=-1)
    model = FinetuneModel(net)

    net.zero_grad()
    logits, pooled, decoded, ntok = model(video, BUDGETS, HEADS)
    terms = flux_multi_loss(logits, pooled, decoded, target, len(BUDGETS))
    terms["loss"].backward()
    packed = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    assert ntok == 3 * (97 + 65 + 33)
    assert set(terms) == {"loss", "ce_0", "ce_1", "ce_2", "align_1", "align_2"}

    net.zero_grad()
    ref = _three_pass_loss(net, video, target)
    ref.backward()
    separate = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    torch.testing.assert_close(terms["loss"], ref, rtol=1e-5, atol=1e-6)
    assert packed.keys() == separate.keys()
    for n in packed:
        torch.testing.assert_close(packed[n], separate[n], rtol=1e-4, atol=1e-6, msg=n)
    # the alignment target is stop-gradient: the 3072-budget branch gets no gradient through it
    assert terms["align_1"].item() > 0


def test_flux_multi_alignment_is_stop_gradient():
    pooled = torch.randn(4, 8, requires_grad=True)  # J=2 budgets x B=2 clips
    dec = torch.nn.functional.normalize(pooled[2:] * 2, dim=-1)
    terms = flux_multi_loss(torch.zeros(4, 3), pooled, [dec], torch.tensor([0, 1]), 2)
    terms["align_1"].backward()
    assert pooled.grad[:2].abs().sum() == 0 and pooled.grad[2:].abs().sum() > 0


def test_multi_view_aggregation_hand_built():
    # video 0: two views that disagree; the softmax average picks the confident view's class
    logits = torch.tensor([[10.0, 0.0, 0.0], [0.0, 1.0, 0.0],   # video 0: probs ~[1,0,0] and [.21,.58,.21]
                           [0.0, 0.0, 3.0], [0.0, 0.0, 3.0],    # video 1: class 2 twice
                           [0.0, 5.0, 0.0]])                    # video 2: one view, class 1
    index = torch.tensor([0, 0, 1, 1, 2])
    probs = aggregate_views(logits, index)
    assert probs.shape == (3, 3)
    torch.testing.assert_close(probs.sum(1), torch.ones(3))
    p0 = (torch.softmax(logits[0], 0) + torch.softmax(logits[1], 0)) / 2
    torch.testing.assert_close(probs[0], p0)
    assert probs.argmax(1).tolist() == [0, 2, 1]
    acc = topk_accuracy(probs, torch.tensor([1, 2, 1]), (1, 2))
    assert acc["top1"] == pytest.approx(200 / 3) and acc["top2"] == pytest.approx(100.0)


def test_eval_head_and_tokens(net):
    assert view_tokens(8, 56, 0) == 128 and view_tokens(8, 56, 64) == 64 and view_tokens(2, 56, 64) == 32
    assert net.nearest_head(96) == 0 and net.nearest_head(60) == 1 and net.nearest_head(10) == 2
    assert net.nearest_head(10, [0]) == 0  # Flux-Single: only head 0 was trained


def test_tokenopt_search_space():
    pairs = candidate_pairs(1024, range(4, 25, 2), range(112, 337, 28), max_ratio=4)
    assert all(1024 <= f * (r // 14) ** 2 <= 4096 for f, r in pairs)
    assert (4, 224) in pairs and (12, 168) in pairs and (16, 168) in pairs
    assert plain_pair(1024, 224) == (4, 224)  # the paper's "4 x 224 unmasked"
    assert plain_pair(128, 56) == (8, 56) and plain_pair(100, 224) == (1, 140)


def _release_layer_id(name: str, num_max_layer: int) -> int:
    # An independent re-statement of the release's optim_factory.get_num_layer_for_vit (FluxViT names).
    if name in ("cls_token", "mask_token", "pos_embed"):
        return 0
    if name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return num_max_layer - 1


def test_layer_decay_groups_equal_the_release_ids_on_fluxvit_s():
    net = create_model("fluxvit_small_patch14", num_classes=400)
    model = FinetuneModel(net)
    groups = layer_decay_optimizer(model, OptimConfig(weight_decay=0.05), layer_decay=0.75, lr=8e-4).param_groups
    depth = 12
    values = [0.75 ** (depth + 1 - i) for i in range(depth + 2)]  # the release's LayerDecayValueAssigner
    skip = {"pos_embed", "cls_token"}
    seen = 0
    by_param = {id(p): g for g in groups for p in g["params"]}
    for name, p in net.named_parameters():
        g = by_param[id(p)]
        lid = _release_layer_id(name, depth + 2)
        assert g["lr_scale"] == pytest.approx(values[lid]), name
        assert g["lr"] == pytest.approx(8e-4 * values[lid]), name
        no_decay = p.ndim == 1 or name.endswith(".bias") or name in skip
        assert g["weight_decay"] == (0.0 if no_decay else 0.05), name
        seen += 1
    assert seen == sum(len(g["params"]) for g in groups) == sum(1 for _ in model.parameters())
    # the quirk: gpe_proj (the global PE's affine) trains at the head's full lr, the pos-embed at 0.75 ** 13
    assert by_param[id(net.gpe_proj.depthwise_conv.weight)]["lr_scale"] == 1.0
    assert by_param[id(net.pos_embed)]["lr_scale"] == pytest.approx(0.75 ** 13)
    assert by_param[id(net.blocks[0].mlp.fc1.weight)]["lr_scale"] == pytest.approx(0.75 ** 12)
    assert by_param[id(net.gpe_proj.depthwise_conv.weight)]["weight_decay"] == 0.05  # 5-D kernel: decays


def test_release_lr_scaling_and_warmup():
    # 64 GPUs x 8 videos x 2 samples at 2e-4 per 256 -> 8e-4; min / warmup lr 1e-6 -> 4e-6
    assert scale_lr(2e-4, 8, 1, 64, num_sample=2) == pytest.approx(8e-4)
    assert scale_lr(1e-6, 8, 1, 64, num_sample=2) == pytest.approx(4e-6)
    assert scale_lr(2e-4, 8, 1, 64, num_sample=1) == pytest.approx(4e-4)
    # warmup from warmup_lr at step 0 to lr at step warmup - 1 (np.linspace), then cosine to min_lr
    assert cosine_lr(0, 100, 5, 1.0, 0.0, warmup_lr=0.2) == pytest.approx(0.2)
    assert cosine_lr(2, 100, 5, 1.0, 0.0, warmup_lr=0.2) == pytest.approx(0.6)
    assert cosine_lr(4, 100, 5, 1.0, 0.0, warmup_lr=0.2) == pytest.approx(1.0)
    assert cosine_lr(100, 100, 5, 1.0, 0.1) == pytest.approx(0.1)


def test_targets_and_random_keep():
    t = smooth_targets(torch.tensor([2, 0]), 4, 0.1)
    torch.testing.assert_close(t[0], torch.tensor([0.025, 0.025, 0.925, 0.025]))
    logits = torch.randn(2, 4)
    manual = -(t * torch.log_softmax(logits, -1)).sum(-1).mean()
    torch.testing.assert_close(soft_cross_entropy(logits, t), manual)
    keep = random_keep((4, 2, 2), 5)
    assert keep.shape == (5,) and torch.all(keep[1:] > keep[:-1]) and keep.max() < 16
    assert random_keep((2, 2, 2), 100).tolist() == list(range(8))


def test_budget_zero_keeps_every_token_and_micro_presets_resolve():
    from fluxvit.stages.finetune import FinetuneTask, build_config

    cfg = build_config("smoke", ["loss.mode=single", "loss.single_budget=0", "loss.single_head=0",
                                 'model.overrides={"depth": 1, "head_budgets": [192, 128, 64]}'])
    task = FinetuneTask(cfg)
    video = torch.randn(2, 3, 4, 56, 56)  # 4 x 16 = 64 tokens per clip, all kept
    terms, ntok = task.forward_loss(task.model, video, torch.tensor([1, 3]))
    assert ntok == 2 * (64 + 1) and set(terms) == {"loss", "ce_0"}
    with pytest.raises(ValueError, match=">= 0"):
        FinetuneTask(build_config("smoke", ["loss.budgets=[-1,2,3]"]))
    with pytest.raises(ValueError, match="pooling heads"):
        FinetuneTask(build_config("smoke", ["loss.mode=single", "loss.single_head=3"]))
    start, multi = build_config("micro_scratch"), build_config("micro_multi")
    assert start.loss.budgets == (0,) and start.optim.min_lr == start.optim.lr  # constant lr from scratch
    assert multi.loss.budgets == (96, 64, 32) and multi.model.overrides["head_budgets"] == (96, 64, 32)
    assert all(f * (r // 14) ** 2 >= 96 for f, r in multi.data.grid)  # every Flux grid holds the largest budget


def test_eval_head_ties_go_to_the_earlier_head(net):
    budgets = net.config.head_budgets
    for a, b in zip(range(len(budgets)), range(1, len(budgets))):
        mid = budgets[a] + budgets[b]
        if mid % 2 == 0:  # an exact tie
            assert net.nearest_head(mid // 2) == a
        assert net.nearest_head(mid // 2 + 1) == a and net.nearest_head((mid + 1) // 2 - 1) == b
    assert net.nearest_head((budgets[0] + budgets[2]) // 2, [2, 0]) == 0  # order of the list is irrelevant


def test_init_class_map_picks_classifier_rows(tmp_path):
    """K710 -> K400 as the release does it: the init checkpoint's classifier rows are re-ordered for the new classes."""
    import json

    from fluxvit.models import save_model
    from fluxvit.stages.finetune import FinetuneTask, build_config

    torch.manual_seed(0)
    src = create_model("fluxvit_tiny_patch14", num_classes=5, depth=1, head_budgets=(192, 128, 64))
    save_model(src, tmp_path / "src.safetensors")
    (tmp_path / "map.json").write_text(json.dumps([4, 0, 2]))
    cfg = build_config("smoke", ["model.num_classes=3", f"model.init_class_map={tmp_path / 'map.json'}",
                                 'model.overrides={"depth": 1, "head_budgets": [192, 128, 64]}'])
    task = FinetuneTask(cfg)
    task.load_init(str(tmp_path / "src.safetensors"))
    for k in range(3):
        torch.testing.assert_close(task.model.net.head[k].weight, src.head[k].weight[[4, 0, 2]])
        torch.testing.assert_close(task.model.net.head[k].bias, src.head[k].bias[[4, 0, 2]])
    torch.testing.assert_close(task.model.net.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    # "first": the release's K710 -> K400 slice (the first 400 rows of the K710 head); a smaller head is kept
    task.cfg.model.init_class_map = "first"
    task.load_init(str(tmp_path / "src.safetensors"))
    for k in range(3):
        torch.testing.assert_close(task.model.net.head[k].weight, src.head[k].weight[:3])
        torch.testing.assert_close(task.model.net.head[k].bias, src.head[k].bias[:3])
    assert build_config("k400_small").model.init_class_map == "first"
    (tmp_path / "bad.json").write_text(json.dumps([0, 1]))
    task.cfg.model.init_class_map = str(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="list of 3 row indices"):
        task.load_init(str(tmp_path / "src.safetensors"))
