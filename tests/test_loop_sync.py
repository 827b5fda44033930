"""The loop's step body: one host-device synchronisation per optimizer step, a non-finite micro-batch skips
its whole accumulated step, accumulation equals one big batch, DeepSpeed + accumulation is refused."""
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fluxvit.stages.common import OptimConfig, StepOutput, TrainConfig, build_accelerator, fit
from host_syncs import SyncCounter

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


def _data(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(8, 4, generator=g)
    return x, x.sum(1, keepdim=True) * 0.5


class _Source:
    """Step n's 8 samples, as ``micro`` micro-batches."""

    skipped = 0

    def __init__(self, micro=1):
        self.micro = micro

    def batches(self, start):
        n = start // self.micro
        while True:
            x, y = _data(n)
            for xs, ys in zip(x.chunk(self.micro), y.chunk(self.micro)):
                yield {"x": xs, "y": ys}
            n += 1


class _Task:
    def __init__(self, nan_calls=(), counter=None):
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
        self.nan_calls, self.counter = set(nan_calls), counter
        self.calls, self.marks, self.params_at = 0, [], []

    def to_device(self, device):
        pass

    def load_init(self, path):
        pass

    def compute_loss(self, model, batch, step):
        if self.counter is not None:
            self.marks.append((step, self.counter.count))
        self.params_at.append((step, [p.detach().clone() for p in model.parameters()]))
        loss = ((model(batch["x"]) - batch["y"]) ** 2).mean()
        if self.calls in self.nan_calls:
            loss = loss * float("nan")
        self.calls += 1
        return StepOutput(loss, {"loss": loss.detach(), "half": loss.detach() / 2}, tokens=len(batch["x"]))

    def export(self, model, path):
        torch.save(model.state_dict(), path)
        return path


def _cfg(tmp_path, **train):
    return _Cfg(TrainConfig(run_dir=str(tmp_path), progress=False, tensorboard=False, export_name="toy.pt",
                            **{"log_every": 1000, **train}),
                OptimConfig(lr=1e-2, warmup_steps=1, clip_grad=1.0))


def _run(cfg, task, micro=1):
    acc = build_accelerator(cfg.train, 8 // micro, cfg.optim.clip_grad)
    return fit(cfg, task, _Source(micro), acc)


def test_one_sync_per_optimizer_step(tmp_path):
    counter = SyncCounter()
    task = _Task(counter=counter)
    with counter:
        res = _run(_cfg(tmp_path, steps=6, grad_accum=2), task, micro=2)
    assert res.steps == 6 and len(res.history) == 6
    starts = {}
    for step, count in task.marks:
        starts.setdefault(step, count)
    # Steps 2..4 (0-based 1..3) log nothing: the finite check is their one read; step 1 and 6 also flush logs.
    per_step = [starts[s + 1] - starts[s] for s in range(1, 4)]
    assert per_step == [1, 1, 1]
    # The logged terms were read at flush time and equal the micro-batch means.
    assert res.history[2]["half"] == pytest.approx(res.history[2]["loss"] / 2)


def test_nan_in_one_micro_batch_skips_the_whole_step(tmp_path):
    task = _Task(nan_calls={5})  # step 2 (0-based), second of its two micro-batches
    res = _run(_cfg(tmp_path, steps=4, grad_accum=2), task, micro=2)
    assert res.skipped_steps == 1 and [h["skipped_steps"] for h in res.history] == [0, 0, 1, 1]
    first = {}
    for step, params in task.params_at:
        first.setdefault(step, params)
    assert all(torch.equal(a, b) for a, b in zip(first[2], first[3]))  # the skipped step changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(first[1], first[2]))  # a finite step does


def test_accumulation_equals_one_big_batch(tmp_path):
    """k = 2 micro-batches of 4 give the same AdamW updates (with clipping) as steps on all 8 samples."""
    big, acc2 = _Task(), _Task()
    _run(_cfg(tmp_path / "big", steps=4, grad_accum=1), big, micro=1)
    _run(_cfg(tmp_path / "acc", steps=4, grad_accum=2), acc2, micro=2)
    for a, b in zip(big.model.parameters(), acc2.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(big.params_at[0][1][0], next(big.model.parameters()))  # it trained


def test_deepspeed_with_accumulation_is_refused(tmp_path):
    from accelerate.utils import DistributedType

    fake = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED)
    with pytest.raises(ValueError, match="grad_accum=2 under DeepSpeed is refused"):
        fit(_cfg(tmp_path, steps=2, grad_accum=2), _Task(), _Source(2), fake)
