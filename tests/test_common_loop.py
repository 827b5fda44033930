"""The shared loop on a toy task: NaN skipping, abort, checkpoints kept/atomic, exact resume after a crash."""
import json
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from fluxvit.stages.common import (NonFiniteLossError, OptimConfig, StepOutput, TrainConfig, build_accelerator,
                                   find_latest, fit)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield


@dataclass
class _Cfg:
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


class _Source:
    skipped = 0

    def batches(self, start):
        n = start
        while True:
            g = torch.Generator().manual_seed(n)
            x = torch.randn(8, 4, generator=g)
            yield {"x": x, "y": x.sum(1, keepdim=True)}
            n += 1


class _Task:
    def __init__(self, nan_steps=(), crash_at=None):
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.3), nn.Linear(16, 1))
        self.nan_steps, self.crash_at = set(nan_steps), crash_at

    def to_device(self, device):
        pass

    def load_init(self, path):
        pass

    def compute_loss(self, model, batch, step):
        if step == self.crash_at:
            raise KeyboardInterrupt("simulated crash")
        loss = ((model(batch["x"]) - batch["y"]) ** 2).mean()  # dropout: consumes the global RNG
        if step in self.nan_steps:
            loss = loss * float("nan")
        return StepOutput(loss, {"loss": loss.detach()}, tokens=8)

    def export(self, model, path):
        torch.save(model.state_dict(), path)
        return path


def _cfg(tmp_path, **train):
    return _Cfg(TrainConfig(run_dir=str(tmp_path), progress=False, tensorboard=False, log_every=1000,
                            export_name="toy.pt", **train),
                OptimConfig(lr=1e-2, warmup_steps=2, clip_grad=1.0))


def _run(cfg, task):
    acc = build_accelerator(cfg.train, 8, cfg.optim.clip_grad)
    return fit(cfg, task, _Source(), acc)


def test_nan_steps_are_skipped_and_counted(tmp_path):
    res = _run(_cfg(tmp_path, steps=6), _Task(nan_steps={1, 3}))
    assert res.steps == 6 and res.skipped_steps == 2
    assert [h["skipped_steps"] for h in res.history] == [0, 1, 1, 2, 2, 2]
    assert (tmp_path / "ckpt-00000006").is_dir() and res.export_path.is_file()


def test_too_many_nan_steps_stop_the_run(tmp_path):
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        _run(_cfg(tmp_path, steps=10, max_bad_steps=3), _Task(nan_steps=set(range(10))))


def test_resume_after_crash_is_exact_and_old_checkpoints_pruned(tmp_path):
    full = _run(_cfg(tmp_path / "full", steps=8, grad_accum=2), _Task())
    crashed = _cfg(tmp_path / "run", steps=8, grad_accum=2, ckpt_every=2, keep_last=2)
    with pytest.raises(KeyboardInterrupt):
        _run(crashed, _Task(crash_at=5))
    assert sorted(p.name for p in (tmp_path / "run").glob("ckpt-*")) == ["ckpt-00000002", "ckpt-00000004"]
    (tmp_path / "run" / "ckpt-00000006.tmp").mkdir()  # a save interrupted by a kill is never picked
    assert find_latest(tmp_path / "run").name == "ckpt-00000004"
    state = json.loads((tmp_path / "run" / "ckpt-00000004" / "trainer_state.json").read_text())
    assert state["data_position"] == 8 and state["world_size"] == 1
    crashed.train.resume = "auto"
    resumed = _run(crashed, _Task())
    want = {h["step"]: (h["loss"], h["lr"]) for h in full.history}
    got = {h["step"]: (h["loss"], h["lr"]) for h in resumed.history}
    assert sorted(got) == [5, 6, 7, 8]
    for step, (loss, lr) in got.items():
        assert loss == want[step][0] and lr == want[step][1], step
    a = torch.load(full.export_path)
    b = torch.load(resumed.export_path)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_metric_logger_logs_every_log_every_steps_without_a_bar(tmp_path, caplog):
    import logging

    from fluxvit.stages.common.runtime import MetricLogger

    ml = MetricLogger(tmp_path, enabled=True, total=10, tensorboard=False, progress=False, log_every=4)
    with caplog.at_level(logging.INFO, logger="fluxvit.train"):
        for step in range(1, 11):
            ml.log(step, {"loss": 1.0})
    ml.close()
    logged = [r.getMessage().split(":")[0] for r in caplog.records if r.getMessage().startswith("step ")]
    assert logged == ["step 1", "step 4", "step 8"]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 10  # every step still recorded
