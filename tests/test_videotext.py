"""Stage 2: contrastive loss across processes, text towers, smoke run, retrieval from a saved checkpoint."""
import json
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from fluxvit.models import create_model
from fluxvit.stages.videotext import VideoTextModel, build_text_tower, contrastive_loss, load_videotext
from fluxvit.stages.videotext import main as videotext_main
from fluxvit.stages.videotext.retrieval import main as retrieval_main

B_GLOBAL, TEXT_DIM = 6, 12


def _model():
    torch.manual_seed(0)
    video = create_model("fluxvit_tiny_patch14", num_classes=0, depth=1, img_size=28, num_frames=2)
    return VideoTextModel(video, TEXT_DIM, embed_dim=16, temperature=0.1)


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B_GLOBAL, 3, 2, 28, 28, generator=g), torch.randn(B_GLOBAL, TEXT_DIM, generator=g)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank, world, port, out):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _model()
        ddp = DDP(model, find_unused_parameters=True)
        video, text = _batch()
        per = B_GLOBAL // world
        v, t, scale = ddp(video[rank * per:(rank + 1) * per], text_features=text[rank * per:(rank + 1) * per])
        loss, _ = contrastive_loss(v, t, scale)
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        if rank == 0:
            torch.save({"world": dist.get_world_size(), "loss": mean_loss / world, "grads": _grads(model)}, out)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process_over_the_global_batch(tmp_path):
    out = tmp_path / "rank0.pt"
    mp.start_processes(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    dist_result = torch.load(out, weights_only=True)
    assert dist_result["world"] == 2

    model = _model()
    video, text = _batch()
    v, t, scale = model(video, text_features=text)
    loss, _ = contrastive_loss(v, t, scale)
    loss.backward()
    single = _grads(model)

    torch.testing.assert_close(dist_result["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    assert set(dist_result["grads"]) == set(single)
    for name, grad in single.items():
        torch.testing.assert_close(dist_result["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert single["logit_scale"].abs() > 0 and single["video.blocks.0.attn.qkv.weight"].abs().sum() > 0


def test_contrastive_loss_prefers_matching_pairs():
    e = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    scale = torch.tensor(3.0)
    matched, _ = contrastive_loss(e, e, scale)
    shuffled, _ = contrastive_loss(e, e.roll(1, 0), scale)
    assert matched < shuffled


def test_embedded_minilm_tower_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tower = build_text_tower("minilm")
    feats = tower(["a red circle moving left", "a red circle moving left", "a blue square moving up"])
    assert feats.shape == (3, 384) and not feats.requires_grad
    sim = torch.nn.functional.cosine_similarity
    assert sim(feats[0], feats[1], dim=0) > 0.999 > sim(feats[0], feats[2], dim=0)


def test_open_clip_text_tower_random_init():
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    from fluxvit.stages.videotext import OpenClipTextTower

    clip = CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=16, image_size=32),
                text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    tower = OpenClipTextTower(clip, open_clip.get_tokenizer("ViT-B-32"), "open_clip:test", freeze=False)
    feats = tower(["a cat", "a dog"])
    assert feats.shape == (2, 32) and feats.requires_grad


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    from fluxvit.datasets.synth import make_synthetic_corpus

    root = tmp_path_factory.mktemp("synth")
    make_synthetic_corpus(root, num_train=24, num_val=8, num_test=8, num_frames=8, size=64, samples_per_shard=12,
                          workers=1)
    return root


@pytest.mark.slow
def test_smoke_run_end_to_end_then_retrieval_from_checkpoint(tiny_corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = tmp_path / "run"
    result = videotext_main(["--preset", "smoke", "--set", f"data.root={tiny_corpus}", "--set", f"train.run_dir={run}",
                             "--set", "train.eval_every=4", "--set", "train.progress=false"])
    assert result.steps == 4 and result.export_path.is_file()
    assert all(torch.isfinite(torch.tensor(h["vtc"])) for h in result.history)
    assert (run / "config.json").is_file() and result.evals  # resolved config saved, held-out eval ran

    model, tower = load_videotext(result.export_path)
    assert model.video.config.depth == 2 and tower.dim == 384
    # stage 3 initialises from this file: its video tower loads into a plain FluxViT ("video." prefix stripped)
    from fluxvit.models import load_official_checkpoint
    net = create_model("fluxvit_tiny_patch14", depth=2, num_classes=8)
    report = load_official_checkpoint(net, result.export_path, strict=False)
    assert not report.missing or all(k.startswith("head.") for k in report.missing)
    torch.testing.assert_close(net.blocks[1].attn.qkv.weight, model.video.blocks[1].attn.qkv.weight)
    # the data (the run's synthetic corpus, its test split) and the protocol come from the run's saved config
    report = retrieval_main([str(result.export_path), "--set", "retrieval.budgets=[64,16]",
                             "--set", "retrieval.settings=[[4,56]]", "--out", str(tmp_path / "r.json")])
    assert [r["budget"] for r in report["results"]] == [64, 16] and "saved config" in report["config"]
    assert report["results"][0]["num_videos"] == 8 and report["results"][0]["chance_r1"] == 12.5
    assert json.loads((tmp_path / "r.json").read_text())["results"][1]["kept_tokens"] == 16
    assert report["protocol"] == "plain" and all(r["protocol"] == "plain" for r in report["results"])
    out = capsys.readouterr().out
    assert "T2V R@1" in out and "protocol plain" in out and "Scoring: plain" in out
    # a run trained with the dual softmax (the paper presets) is evaluated with it, and the report says so
    saved = json.loads((run / "config.json").read_text())
    saved["retrieval"].update(dual_softmax=True, budgets=[64], settings=[[4, 56]])
    (run / "config.json").write_text(json.dumps(saved))
    dsl = retrieval_main([str(result.export_path), "--out", str(tmp_path / "d.json")])
    assert dsl["protocol"] == "DSL tau=1" and dsl["results"][0]["protocol"] == "DSL tau=1"
    assert "protocol DSL tau=1" in capsys.readouterr().out


def test_paper_presets_evaluate_retrieval_with_the_dual_softmax_and_stage2_steps_follow_the_world_size():
    from fluxvit.stages.common.config import resolve_schedule
    from fluxvit.stages.videotext import build_config
    from fluxvit.stages.videotext.retrieval import protocol_of

    assert protocol_of(build_config("paper_s").retrieval) == "DSL tau=1"  # InternVideo2's DSL, as Table 9
    assert protocol_of(build_config("umt_s").retrieval) == "plain"
    assert protocol_of(build_config("paper_s", ["retrieval.dual_softmax=false"]).retrieval) == "plain"
    # 3 epochs of 25 M clips at 64 per process: 64 processes -> 18309 steps, 32 -> twice as many
    assert resolve_schedule(build_config("paper_s"), world_size=64).train.steps == 3 * (25_000_000 // 4096)
    assert resolve_schedule(build_config("paper_s"), world_size=32).train.steps == 3 * (25_000_000 // 2048)
    assert resolve_schedule(build_config("paper_b_2m5"), world_size=64).train.steps == 2_500_000 // 2048


def test_msrvtt_json_input_with_several_captions(tiny_corpus, tmp_path):
    """MSRVTT-style annotations: a JSON list of {video, caption or [captions]} over a folder of videos."""
    import tarfile

    from fluxvit.datasets import DataConfig
    from fluxvit.stages.videotext.retrieval import load_retrieval_set

    videos = tmp_path / "videos"
    videos.mkdir()
    with tarfile.open(tiny_corpus / "test" / "00000.tar") as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(".mp4")][:3]
        for m in members:
            (videos / m.name).write_bytes(tar.extractfile(m).read())
    ann = [{"video": members[0].name, "caption": ["first caption", "another caption"]},
           {"video": members[1].name, "caption": "second caption"},
           {"video": members[2].name, "caption": ["third"]}]
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    data = DataConfig(source="annotations", val_shards=str(tmp_path / "ann.json"), root=str(videos), decoder="pyav")
    rset = load_retrieval_set(data, "test", 4, 56)
    assert len(rset.videos) == 3 and rset.videos[0].shape == (3, 4, 56, 56)
    assert rset.texts == ["first caption", "another caption", "second caption", "third"]
    assert rset.text_to_video == [0, 0, 1, 2]
    # a missing and an undecodable video are skipped by name and counted, not a traceback
    (videos / "broken.mp4").write_bytes(b"\x00not a video" * 50)
    ann[1:1] = [{"video": "missing.mp4", "caption": "gone"}, {"video": "broken.mp4", "caption": "bad"}]
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    rset = load_retrieval_set(data, "test", 4, 56)
    assert len(rset.videos) == 3 and rset.texts == ["first caption", "another caption", "second caption", "third"]
    assert rset.text_to_video == [0, 0, 1, 2] and rset.keys == [m.name for m in members]
    assert sorted(rset.skipped) == ["broken.mp4", "missing.mp4"]
    assert "cannot read" in rset.skipped["missing.mp4"]
    with pytest.raises(ValueError, match="data.source='webvid' is not a batch source"):
        load_retrieval_set(DataConfig(source="webvid"), "test", 4, 56)
    with pytest.raises(ValueError, match="renders clips without files"):
        load_retrieval_set(DataConfig(source="synthetic"), "test", 4, 56)


def test_unmasked_teacher_alignment_term(tiny_corpus, monkeypatch):
    """With align.weight > 0 the stage-1 teacher's pooled feature becomes a second loss term with gradients."""
    from fluxvit.stages.videotext import VideoTextTask, build_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = build_config("smoke", ["align.weight=0.5", "align.teacher.name=", "align.teacher.pretrained=",
                                 "align.teacher.embed_dim=32", "align.teacher.budget=0"])
    cfg.align.teacher.vision_cfg = dict(image_size=56, patch_size=14, width=32, layers=1, head_width=16)
    task = VideoTextTask(cfg)
    video = torch.randn(2, 3, 2, 56, 56)
    out = task.compute_loss(task.model, {"video": video, "caption": ["a red circle", "a blue square"]}, step=0)
    assert "align" in out.terms and 0 < float(out.terms["align"]) < 4
    out.loss.backward()
    assert task.model.align_decoder[1].weight.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in task.teacher.parameters())


def test_open_clip_tower_loads_a_local_weights_file_and_fails_in_one_line_offline(tmp_path, monkeypatch):
    """The paper presets' MobileCLIP-B tower runs offline from a local file (``text.weights``); a tag that is
    neither cached nor downloadable is a one-line error. A tiny open_clip config stands in for MobileCLIP-B."""
    import open_clip

    from fluxvit.stages.videotext.text import resolve_open_clip_weights

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                           "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "fluxvit-tiny-text.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "fluxvit-tiny-text.json")
    torch.manual_seed(3)
    ref = open_clip.create_model("fluxvit-tiny-text")
    torch.save(ref.state_dict(), tmp_path / "weights.bin")

    tower = build_text_tower("open_clip:fluxvit-tiny-text", weights=str(tmp_path / "weights.bin"))
    torch.testing.assert_close(tower.model.text_projection, ref.text_projection)
    feats = tower(["a red circle", "a blue square"])
    assert feats.shape == (2, 16) and not feats.requires_grad and tower.dim == 16

    with pytest.raises(FileNotFoundError, match="not found"):
        build_text_tower("open_clip:fluxvit-tiny-text", weights=str(tmp_path / "missing.bin"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(FileNotFoundError) as err:
        resolve_open_clip_weights("MobileCLIP-B", "datacompdr")
    assert "text.weights" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="text.weights applies"):
        build_text_tower("minilm", weights=str(tmp_path / "weights.bin"))


def test_paper_projection_layout_and_temperature_clamp():
    """Flux-CLIP (InternVideo2 small CLIP): LayerNorm + Linear on the video side, the text tower's own 512-d output
    as the joint space, fixed temperature 1/100; UMT: learnable temperature clamped to [0.001, 0.5]."""
    from fluxvit.stages.videotext import build_config

    torch.manual_seed(0)
    video = create_model("fluxvit_tiny_patch14", num_classes=0, depth=1, img_size=28, num_frames=2)
    model = VideoTextModel(video, 16, 16, temperature=0.01, learnable_temperature=False, vision_proj="ln_linear",
                           text_proj="none")
    text = torch.randn(2, 16)
    v, t, scale = model(torch.randn(2, 3, 2, 28, 28), text_features=text)
    torch.testing.assert_close(t, torch.nn.functional.normalize(text, dim=-1))  # no trained text projection
    assert isinstance(model.vision_proj[0], torch.nn.LayerNorm) and scale.item() == pytest.approx(4.60517, 1e-5)
    assert not any("logit_scale" in n for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match="equal"):
        VideoTextModel(video, 12, 16, text_proj="none")
    umt = VideoTextModel(video, 12, 16, temperature=0.9, min_temperature=0.001, max_temperature=0.5)
    assert umt.clamped_scale().item() == pytest.approx(math.log(2.0))  # 0.9 clamped to 0.5
    cfg = build_config("paper_s")
    assert (cfg.text.spec, cfg.contrast.text_proj, cfg.contrast.vision_proj) == \
        ("open_clip:MobileCLIP-B:datacompdr_lt", "none", "ln_linear")  # the official config loads mobileclip_blt.pt
    c = cfg.contrast
    assert c.learnable_temperature and (c.temperature, c.min_temperature, c.max_temperature) == (0.01, 0.01, 0.0)


def test_learnable_temperature_is_clamped_in_place_before_every_forward():
    """InternVideo2's small CLIP: ``temp`` is a parameter from 1/100, ``temp.clamp_(min=1/100)`` before each
    forward: a step that pushes it below the bound is undone, and at the bound it still gets a gradient."""
    torch.manual_seed(0)
    video = create_model("fluxvit_tiny_patch14", num_classes=0, depth=1, img_size=28, num_frames=2)
    model = VideoTextModel(video, 16, 16, temperature=0.01, learnable_temperature=True, min_temperature=0.01,
                           vision_proj="ln_linear", text_proj="none")
    clip, text = torch.randn(4, 3, 2, 28, 28), torch.randn(4, 16)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1 / 0.005))  # an optimizer step below the bound
    v, t, scale = model(clip, text_features=text)
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))  # reset to the bound, as temp.clamp_
    loss = -(scale.exp() * (v @ t.T)).diagonal().mean()
    loss.backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs() > 0
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1 / 0.05))  # above the bound: left alone (no upper clamp)
    model(clip, text_features=text)
    assert model.logit_scale.item() == pytest.approx(math.log(20.0))


def test_text_tower_keeps_its_first_layers():
    """UMT's VTC text encoder: BERT in mode "text", the layers below fusion_layer 9; num_layers=k gives the full
    encoder's k-th hidden state."""
    full = build_text_tower("minilm", pooling="cls")
    cut = build_text_tower("minilm", pooling="cls", num_layers=3)
    assert len(cut.model.encoder.layer) == 3 and len(full.model.encoder.layer) == 6
    caps = ["a red circle moving left", "a small blue square"]
    batch = full.tokenizer(caps, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = full.model(**batch, output_hidden_states=True).hidden_states[3][:, 0]
    torch.testing.assert_close(cut(caps), want)
    with pytest.raises(ValueError, match="num_layers"):
        build_text_tower("minilm", num_layers=7)
    from fluxvit.stages.videotext import build_config

    assert build_config("umt_s").text.num_layers == 9 and build_config("paper_s").text.num_layers == 0
