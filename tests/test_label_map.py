"""One label map: training stops when the held-out shards index classes differently, a stage-3 export stores its
class names, and evaluation / Token Optimization stop with one line naming the first difference."""
import json

import pytest

from fluxvit.datasets import DataConfig
from fluxvit.datasets.shards import label_map_difference
from fluxvit.stages.common.config import ConfigError
from fluxvit.stages.finetune import build_config
from fluxvit.stages.finetune import eval as ft_eval
from fluxvit.stages.finetune.data import check_split_label_maps
from fluxvit.stages.finetune.task import FinetuneTask
from fluxvit.models.checkpoint import read_metadata

MICRO = '{"head_budgets": [192, 128, 64], "depth": 1, "embed_dim": 32, "num_heads": 2, "clip_embed_dim": 32, ' \
        '"attn_pool_num_heads": 2}'


def _split(tmp_path, name, classes):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "classes.json").write_text(json.dumps(classes))
    return f"{folder}/{{00000..00001}}.tar"


def test_first_difference_is_named():
    assert label_map_difference(["a", "b", "c"], ["a", "b", "c"], "x", "y") is None
    why = label_map_difference(["crawl", "jump", "run"], ["crawl", "run"], "the model", "the shards")
    assert "class 1 is 'jump' in the model but 'run' in the shards" in why and "\n" not in why
    why = label_map_difference(["a", "b"], ["a", "b", "c"], "the model", "the shards")
    assert "the model has 2 classes, the shards 3" in why and "'c'" in why


def test_training_stops_on_different_split_maps(tmp_path):
    # make-shards without --classes on a val folder that lacks 'jump': the indices shift
    train = _split(tmp_path, "train", ["crawl", "jump", "run"])
    val = _split(tmp_path, "val", ["crawl", "run"])
    with pytest.raises(ConfigError, match="class 1 is 'jump' in the training shards"):
        check_split_label_maps(DataConfig(source="shards", shards=train, val_shards=val))
    same = _split(tmp_path, "val2", ["crawl", "jump", "run"])
    check_split_label_maps(DataConfig(source="shards", shards=train, val_shards=same))  # agrees: no error
    check_split_label_maps(DataConfig(source="shards", shards=train))  # no held-out shards: nothing to compare


def test_export_stores_class_names_and_eval_checks_them(tmp_path, capsys):
    train = _split(tmp_path, "train", ["crawl", "jump", "run"])
    cfg = build_config("smoke", [f"model.overrides={MICRO}", "model.num_classes=3", "data.source=shards",
                                 f"data.shards={train}"])
    task = FinetuneTask(cfg)
    path = task.export(task.model, tmp_path / "model.safetensors")
    assert json.loads(read_metadata(path)["classes"]) == ["crawl", "jump", "run"]
    ft_eval.check_label_map(str(path), DataConfig(source="shards", shards=train,
                                                  val_shards=_split(tmp_path, "val_ok", ["crawl", "jump", "run"])))
    bad = _split(tmp_path, "val", ["crawl", "run"])
    with pytest.raises(SystemExit) as exc:
        ft_eval.main([str(path), "--set", "data.source=shards", "--set", f"data.shards={train}", "--set",
                      f"data.val_shards={bad}", "--set", "eval.budgets=[0]"])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "class 1 is 'jump' in the model" in err and "'run' in the shards" in err


def test_make_shards_classes_takes_the_training_classes_json(tmp_path):
    """The val folder lacks 'jump': with --classes TRAIN/classes.json it still gets the full map and the same
    indices, and the stage-3 check passes."""
    from data_fixtures import make_video

    from fluxvit.datasets.cli import main
    from fluxvit.datasets.shards import iter_tar_samples

    video = make_video(num_frames=4, width=32, height=24)
    for split, names in (("train", ["crawl", "jump", "run"]), ("val", ["crawl", "run"])):
        for name in names:
            (tmp_path / split / name).mkdir(parents=True)
            (tmp_path / split / name / "0.mp4").write_bytes(video)
    assert main(["make-shards", "--folder", str(tmp_path / "train"), "--out", str(tmp_path / "st"), "--copy",
                 "--no-progress"]) == 0
    assert main(["make-shards", "--folder", str(tmp_path / "val"), "--out", str(tmp_path / "sv"), "--copy",
                 "--no-progress", "--classes", str(tmp_path / "st" / "classes.json")]) == 0
    assert json.loads((tmp_path / "sv" / "classes.json").read_text()) == ["crawl", "jump", "run"]
    with open(tmp_path / "sv" / "00000.tar", "rb") as f:
        assert [int(s["cls"]) for s in iter_tar_samples(f)] == [0, 2]  # crawl, run: the training indices
    check_split_label_maps(DataConfig(source="shards", shards=str(tmp_path / "st/00000.tar"),
                                      val_shards=str(tmp_path / "sv/00000.tar")))
