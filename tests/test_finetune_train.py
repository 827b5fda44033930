"""Stage 3 end to end on the smoke preset (narrowed further for test time): a finetune run with checkpoints and
final multi-view evaluation, exact resume, and Token Optimization writing its table and PNG."""
import json

import pytest
import torch

from fluxvit.models import read_state_dict
from fluxvit.stages.finetune import build_config, main
from fluxvit.stages.finetune import tokenopt

MICRO = '{"head_budgets": [96, 64, 32], "depth": 2, "embed_dim": 64, "num_heads": 2, "clip_embed_dim": 64, ' \
        '"attn_pool_num_heads": 4}'


def _args(run_dir, *extra):
    sets = [f"train.run_dir={run_dir}", "train.steps=4", "train.ckpt_every=2", "train.tensorboard=false",
            "train.progress=false", f"model.overrides={MICRO}", "data.batch_size=2", "data.grid=[[4,56],[6,56]]",
            "loss.budgets=[96,64,32]", "eval.budgets=[]", *extra]
    return ["--preset", "smoke", *[a for s in sets for a in ("--set", s)]]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ft") / "a"
    result = main(_args(run, "eval.budgets=[0,32]", "eval.max_videos=4", "eval.num_clips=2",
                        "eval.resolution=56", "data.randaug=rand-m7-n4-mstd0.5-inc1", "data.reprob=0.5", "data.crop=rrc", "data.crop_scale=[0.08,1]", "data.num_sample=2", "aug.mixup=0.8", "aug.cutmix=1.0"))
    return run, result


def test_smoke_finetune_runs_and_evaluates(smoke_run):
    run, result = smoke_run
    assert result.steps == 4 and result.skipped_steps == 0
    assert (run / "model.safetensors").is_file() and (run / "config.json").is_file()
    assert sorted(p.name for p in run.glob("ckpt-*")) == ["ckpt-00000002", "ckpt-00000004"]
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert {"ce_0", "ce_1", "ce_2", "align_1", "align_2"} <= set(result.history[0])
    step, metrics = result.evals[-1]
    assert step == 4 and set(metrics) == {"top1@0", "top5@0", "top1@32", "top5@32"}
    for b in (0, 32):  # 4 videos: accuracies are multiples of 25 %, top-5 never below top-1
        assert metrics[f"top5@{b}"] >= metrics[f"top1@{b}"]
        assert all((metrics[f"top{k}@{b}"] * 4 / 100).is_integer() for k in (1, 5))
    saved = json.loads((run / "config.json").read_text())
    assert saved["loss"]["mode"] == "multi" and saved["layer_decay"] == 0.75


def test_resume_is_exact(smoke_run, tmp_path):
    run, _ = smoke_run
    main(_args(tmp_path / "b", "data.randaug=rand-m7-n4-mstd0.5-inc1", "data.reprob=0.5", "data.crop=rrc", "data.crop_scale=[0.08,1]", "data.num_sample=2", "aug.mixup=0.8", "aug.cutmix=1.0",
               f"train.resume={run / 'ckpt-00000002'}"))
    a = read_state_dict(run / "model.safetensors")
    b = read_state_dict(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_tokenopt_writes_table_and_png(smoke_run, tmp_path, capsys):
    run, _ = smoke_run
    out = tmp_path / "to"
    result = tokenopt.main([str(run / "model.safetensors"), "--set", "tokenopt.budgets=[64,32]",
                            "--set", "tokenopt.frames=[2,4,8]", "--set", "tokenopt.resolutions=[42,56]",
                            "--set", "tokenopt.base_resolution=56", "--set", "eval.max_videos=4", "--out", str(out)])
    settings = result["settings"]  # the run's saved config gave the data; search and report splits differ
    assert "saved config" in settings["config"] and not settings["same_videos"]
    assert settings["split"] == "val" and settings["report_split"] == "test"
    assert "searched on `val`" in (out / "tokenopt.md").read_text()
    assert [r["budget"] for r in result["rows"]] == [64, 32]
    for r in result["rows"]:
        assert r["plain"]["tokens"] == r["budget"] and r["to"]["tokens"] == r["budget"]
        assert r["to"]["frames"] * (r["to"]["resolution"] // 14) ** 2 >= r["budget"]
    assert (out / "tokenopt.json").is_file() and (out / "tokenopt.md").is_file()
    assert (out / "tokenopt.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 32 | 2 x 56 |" in (out / "tokenopt.md").read_text()
    assert "TO top-1" in capsys.readouterr().out


def test_release_schedule_resolves_from_epochs():
    from fluxvit.stages.finetune import resolve_schedule

    k = resolve_schedule(build_config("k400_small"), world_size=64)  # 64 x 8 = 512 videos per step
    assert k.train.steps == 5 * (240_436 // 512) and k.optim.warmup_steps == 240_436 // 512
    k710 = resolve_schedule(build_config("k710_base"), world_size=64)
    assert k710.train.steps == 20 * (658_340 // 1024) and k710.optim.warmup_steps == 5 * (658_340 // 1024)
    with pytest.raises(ValueError, match="less than one total batch"):
        resolve_schedule(build_config("coin_small", ["train_videos=100"]), world_size=64)
    with pytest.raises(ValueError, match="unknown field"):
        build_config("smoke", ["loss.budget=1"])


def test_per_sample_grid_batches_are_packed_lists(tmp_path):
    from fluxvit.datasets import DataConfig
    from fluxvit.stages.finetune.data import MotionClips

    cfg = DataConfig(source="synthetic-motion", batch_size=4, grid=[[4, 56], [6, 70]], per_sample_grid=True,
                     flip=False, num_clips=50)
    batches = [MotionClips(cfg, seed=0).batch(n) for n in range(3)]
    shapes = {tuple(v.shape) for b in batches for v in b["video"]}
    assert all(isinstance(b["video"], list) and len(b["video"]) == 4 for b in batches)
    assert shapes == {(3, 4, 56, 56), (3, 6, 70, 70)}  # clips of one batch draw their own grid
    per_batch = MotionClips(DataConfig(**{**cfg.__dict__, "per_sample_grid": False}), seed=0).batch(0)
    assert per_batch["video"].shape[0] == 4  # the default stays one grid per batch, stacked

    result = main(_args(tmp_path / "ps", "data.per_sample_grid=true", "data.batch_size=3", "aug.mixup=0.8"))
    assert result.steps == 4 and all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    assert (tmp_path / "ps" / "model.safetensors").is_file()


def test_tokenopt_says_when_search_and_report_are_the_same_videos(tmp_path):
    from fluxvit.datasets import DataConfig
    from fluxvit.stages.finetune.tokenopt import describe_split, write_table

    shards = DataConfig(source="shards", shards="train.tar", val_shards="val.tar")
    assert describe_split(shards, "val") == describe_split(shards, "test") == "shards val.tar"
    motion = DataConfig(source="synthetic-motion")
    assert describe_split(motion, "val") != describe_split(motion, "test")
    row = {"budget": 8, "gain": 0.0, **{k: {"frames": 1, "resolution": 14, "gflops": 0.1, "top1": 50.0}
                                        for k in ("plain", "to")}}
    for same, needle in ((True, "searched and reported on the same videos"), (False, "reported on `test`")):
        settings = dict(split="val", report_split="test", search_on="a", report_on="a" if same else "b",
                        same_videos=same, views=1)
        _, md = write_table({"rows": [row], "settings": settings}, tmp_path / str(same))
        assert needle in md.read_text() and ("selection-biased" in md.read_text()) == same


def test_stage3_builds_the_architecture_stored_in_a_previous_stage_export(tmp_path):
    """A stage-1 student of another depth and width finetunes as it was trained (its export carries its config)."""
    from fluxvit.models import create_model, save_model
    from fluxvit.stages.finetune.task import FinetuneTask

    path = save_model(create_model("fluxvit_tiny_patch14", depth=2, embed_dim=96, num_heads=3, num_classes=0),
                      tmp_path / "student.safetensors")
    cfg = build_config("smoke", [f"model.init={path}"])
    net = FinetuneTask(cfg).model.net
    assert (len(net.blocks), net.config.embed_dim, net.config.num_classes) == (2, 96, 8)
    assert len(FinetuneTask(build_config("smoke")).model.net.blocks) == 6  # no export: model.name's depth (tiny: 6)


def test_budgets_are_declared_once_and_the_heads_must_agree():
    """loss.budgets name the budgets; the model's head budgets (what evaluation picks a head by) must match them."""
    from fluxvit.stages.common.config import ConfigError
    from fluxvit.stages.finetune.task import FinetuneTask

    for name in ("smoke", "micro_multi", "k400_small"):
        task = FinetuneTask(build_config(name))
        assert [task.model.net.config.head_budgets[h] for h in task.heads] == [b or 0 for b in task.budgets]
    with pytest.raises(ConfigError, match=r"loss trains head 0 at 100 tokens .* head_budgets \(192, 128, 64\)"):
        FinetuneTask(build_config("smoke", ["loss.budgets=[100,128,64]"]))
