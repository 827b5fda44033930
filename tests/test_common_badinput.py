"""Bad input stops with a clear error, nothing silent: weights of another architecture, classifier heads of
another class count, labels outside the head, a stage-2 export given to stage-3 evaluation."""
import logging

import pytest
import torch

from fluxvit.models import create_model, save_model
from fluxvit.models.checkpoint import CheckpointMismatchError, load_official_checkpoint
from fluxvit.stages.common.cli import run_cli
from fluxvit.stages.common.config import ConfigError

MICRO = dict(depth=2, embed_dim=64, num_heads=2, clip_embed_dim=64, attn_pool_num_heads=4, head_budgets=[64, 48, 32])




def _micro(**kw):
    torch.manual_seed(kw.pop("seed", 0))
    return create_model("fluxvit_tiny_patch14", **{**MICRO, **kw})


def test_weights_of_another_architecture_stop_with_counts_and_names(tmp_path):
    path = save_model(_micro(depth=3, num_classes=0), tmp_path / "deeper.safetensors")
    model = _micro(num_classes=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as err:
        load_official_checkpoint(model, path)
    msg = str(err.value)
    n = len(model.state_dict())
    assert "\n" not in msg and f"{n} of {n} model tensors match" in msg
    assert "unexpected 15 (blocks.2." in msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded

    wide = save_model(_micro(embed_dim=96, num_heads=3, num_classes=0), tmp_path / "wide.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"\d+ of \d+ model tensors match; shape mismatches \d+ \(blocks"):
        load_official_checkpoint(_micro(num_classes=0), wide)


def test_non_strict_loads_what_fits_and_warns(tmp_path, caplog):
    src = _micro(depth=3, num_classes=0, seed=1)
    path = save_model(src, tmp_path / "deeper.safetensors")
    model = _micro(num_classes=0)
    with caplog.at_level(logging.WARNING, logger="fluxvit.models.checkpoint"):
        report = load_official_checkpoint(model, path, strict=False)
    assert len(report.unexpected) == 15 and not report.missing
    assert torch.equal(model.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)
    assert any("not loaded: blocks.2." in r.getMessage() for r in caplog.records)


def test_classifier_of_another_class_count_keeps_the_models_head(tmp_path, caplog):
    src = _micro(num_classes=5, seed=1)
    path = save_model(src, tmp_path / "k5.safetensors")
    model = _micro(num_classes=8)
    head = model.head[0].weight.clone()
    with caplog.at_level(logging.INFO, logger="fluxvit.models.checkpoint"):
        report = load_official_checkpoint(model, path, classifier_may_differ=True)
    assert torch.equal(model.head[0].weight, head) and model.head[0].weight.shape == (8, 64)
    assert torch.equal(model.blocks[0].mlp.fc1.weight, src.blocks[0].mlp.fc1.weight)
    assert sorted(s.split(":")[0] for s in report.skipped) == [f"head.{i}.{p}" for i in range(3) for p in ("bias", "weight")]
    assert any("classifier kept: head." in r.getMessage() for r in caplog.records)
    with pytest.raises(CheckpointMismatchError, match="head.0"):  # without the permission it is a mismatch
        load_official_checkpoint(_micro(num_classes=8), path)


def _finetune_args(tmp_path, *extra):
    import json

    sets = [f"train.run_dir={tmp_path / 'run'}", "train.steps=1", "train.tensorboard=false", "train.progress=false",
            f"model.overrides={json.dumps({k: v for k, v in MICRO.items()})}", "data.batch_size=2",
            "data.grid=[[4,56]]", "loss.budgets=[64,48,32]", "eval.budgets=[]", "aug.mixup=0", "aug.cutmix=0", *extra]
    return ["--preset", "smoke", *[a for s in sets for a in ("--set", s)]]


def test_stage3_init_from_another_architecture_exits_2_in_one_line(tmp_path, capsys):
    """A weights file without a stored architecture (an official .pth) must fit model.name's; an export carries
    its architecture, which stage 3 then builds (tests/test_finetune_train.py)."""
    from fluxvit.stages.finetune import main

    path = tmp_path / "deeper.pth"
    torch.save({"model": _micro(depth=3, num_classes=0).state_dict()}, path)
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: main(_finetune_args(tmp_path, f"model.init={path}")))
    assert exc.value.code == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and "model.init:" in err[0] and "unexpected 15 (blocks.2." in err[0]


def test_label_at_or_above_num_classes_names_the_sample_and_the_class_count(tmp_path):
    from fluxvit.stages.finetune import main

    # synthetic-motion clips carry labels 0..7; a 1-class head cannot take them
    with pytest.raises(ConfigError, match=r"model.num_classes=1, but sample 'train\d{6}' has label [1-7] "):
        main(_finetune_args(tmp_path, "model.num_classes=1"))


def test_evaluation_with_labels_beyond_the_head_fails():
    from fluxvit.stages.finetune.eval import evaluate

    net = _micro(num_classes=4)
    batch = {"video": torch.randn(2, 3, 2, 56, 56), "video_index": torch.tensor([0, 1]), "label": torch.tensor([1, 6])}
    with pytest.raises(ValueError, match="label 6 but the model's head has 4 classes"):
        evaluate(net, None, frames=2, resolution=56, budgets=[0], batches=[batch])
    batch["label"] = torch.tensor([1, 3])
    assert evaluate(net, None, frames=2, resolution=56, budgets=[0], batches=[batch])[0]["videos"] == 2


def test_stage2_export_given_to_stage3_eval_says_so_in_one_line(tmp_path, capsys):
    from safetensors.torch import save_file

    from fluxvit.stages.finetune.eval import main

    path = tmp_path / "videotext.safetensors"
    save_file({"video.cls_token": torch.zeros(1, 1, 64)}, str(path),
              metadata={"fluxvit_videotext": "1", "fluxvit_config": "{}"})
    with pytest.raises(SystemExit) as exc:
        main([str(path), "--set", "eval.budgets=[64]"])
    assert exc.value.code == 1
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and "stage-2 video-text export" in err[0] and "retrieval" in err[0]


@pytest.mark.parametrize("kind", ["finetune", "distill", "garbage"])
def test_retrieval_given_a_stage3_or_stage1_export_or_a_non_checkpoint_says_so_in_one_line(tmp_path, capsys, kind):
    from safetensors.torch import save_file

    from fluxvit.stages.videotext.retrieval import main

    path = tmp_path / "model.safetensors"
    if kind == "garbage":
        path.write_bytes(b"\xff" * 64)
    else:
        save_file({"cls_token": torch.zeros(1, 1, 64)}, str(path), metadata={"stage": kind})
    with pytest.raises(SystemExit) as exc:
        main([str(path), "--set", "retrieval.max_videos=2"])
    assert exc.value.code == 1
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    want = {"finetune": "stage-3 classifier export", "distill": "stage-1 export",
            "garbage": "is not a safetensors checkpoint"}[kind]
    assert len(err) == 1 and want in err[0], err
