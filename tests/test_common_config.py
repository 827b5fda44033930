"""Stage configs: typed overrides, presets, saving."""
import json
from dataclasses import dataclass, field

import pytest

from fluxvit.stages.common import (DataConfig, OptimConfig, PresetRegistry, TrainConfig, apply_overrides,
                                   save_config)


@dataclass
class _Cfg:
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


def test_overrides_are_typed():
    cfg = apply_overrides(_Cfg(), ["optim.lr=3e-4", "train.steps=7", "train.tensorboard=false",
                                   "optim.betas=0.9,0.95", "data.grid=[[4,112],[8,84]]", "train.resume=auto"])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.train.tensorboard is False  # the string "false" must not be truthy
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.data.grid == [[4, 112], [8, 84]]
    assert cfg.train.resume == "auto"


@pytest.mark.parametrize("bad", ["optim.lrr=1", "nosuch.x=1", "optim.lr", "train.steps=1.5", "train.progress=maybe",
                                 "optim.lr.x=1"])
def test_bad_overrides_raise(bad):
    with pytest.raises(ValueError):
        apply_overrides(_Cfg(), [bad])


def test_presets_and_save(tmp_path):
    reg = PresetRegistry("demo")

    @reg.register
    def tiny():
        return _Cfg()

    assert reg.names() == ["tiny"]
    with pytest.raises(ValueError, match="unknown preset"):
        reg.get("huge")
    cfg = reg.get("tiny")
    path = save_config(cfg, tmp_path / "run")
    data = json.loads(path.read_text())
    assert data["optim"]["betas"] == [0.9, 0.98]
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_distill_presets_resolve():
    from fluxvit.stages.distill import build_config, presets

    assert {"smoke", "paper_s", "paper_b", "umt_b16", "umt_l14"} <= set(presets.names())
    b = build_config("paper_b")
    assert b.optim.lr == 1e-3 and tuple(b.optim.betas) == (0.9, 0.98) and b.optim.weight_decay == 0.05
    assert b.optim.warmup_fraction == 0.2 and b.model.drop_path_rate == 0.05
    assert b.teacher.budget == 2048 and tuple(b.loss.budgets) == (2048, 1536, 1024) and b.loss.num_layers == 6
    s = build_config("smoke", ["loss.budgets=[64]", "teacher.budget=0"])
    assert s.loss.budgets == (64,) and s.teacher.budget == 0


@pytest.mark.parametrize("text,want", [("0", False), ("1", True), ("false", False), ("TRUE", True), ("off", False),
                                       ("on", True), ("no", False), ("yes", True)])
def test_booleans_at_every_spelling(text, want):
    """Each spelling, 0 and 1 included, reads as its boolean (a string would always be truthy)."""
    cfg = apply_overrides(_Cfg(), [f"train.tensorboard={text}", f"train.progress={text}"])
    assert cfg.train.tensorboard is want and cfg.train.progress is want


def test_a_float_field_with_an_int_default_reads_a_float():
    @dataclass
    class _Sec:
        rate: float = 0

    @dataclass
    class _Top:
        sec: _Sec = field(default_factory=_Sec)

    cfg = apply_overrides(_Top(), ["sec.rate=2"])
    assert cfg.sec.rate == 2.0 and isinstance(cfg.sec.rate, float)


def test_one_step_runs_and_zero_steps_without_epochs_is_refused():
    from fluxvit.stages.common.config import resolve_schedule
    from fluxvit.stages.finetune import build_config

    assert resolve_schedule(build_config("smoke", ["train.steps=1"]), world_size=1).train.steps == 1
    cfg = build_config("smoke")
    cfg.train.steps = 0
    with pytest.raises(ValueError, match="train.steps"):
        resolve_schedule(cfg, world_size=1)


def test_resume_check_takes_an_old_scalar_where_a_section_is_now_as_absent(tmp_path):
    """A checkpoint whose config.json held a plain value where the code now has a section (an older layout)
    is read as 'not in the checkpoint', not a crash."""
    from fluxvit.stages.common.config import check_resume_config

    (tmp_path / "config.json").write_text(json.dumps({"optim": 3, "train": ["x"], "data": "shards"}))
    assert check_resume_config(_Cfg(), tmp_path) == []


def test_comma_lists_keep_their_element_type():
    @dataclass
    class _Sec:
        names: tuple = ("a", "b")
        sizes: tuple = (1, 2)

    @dataclass
    class _Top:
        sec: _Sec = field(default_factory=_Sec)

    cfg = apply_overrides(_Top(), ["sec.names=1,x", "sec.sizes=3,4"])
    assert cfg.sec.names == ("1", "x") and cfg.sec.sizes == (3, 4)  # "1" stays a name, not the number 1
