"""The loop's step body: one host-device synchronisation per optimizer step, what each stage's loss reads back,
a non-finite micro-batch skips its whole accumulated step, accumulation equals one big batch, DeepSpeed + accumulation is refused."""
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fluxvit.stages.common import OptimConfig, StepOutput, TrainConfig, build_accelerator, fit
from host_syncs import SyncCounter



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


@pytest.mark.parametrize("sampling, reads", [("clip", 0), ("frame", 2)])
def test_stage1_step_reads_nothing_back(sampling, reads):
    """A stage-1 loss (tiny student and InternVideo2 teacher) on two clip shapes: with clip sampling nothing is
    read back from the device (the teacher reports its visible-token counts as host ints); frame sampling
    reads the per-frame counts once per teacher call (here two shapes: two calls)."""
    from fluxvit.stages.distill import build_config
    from fluxvit.stages.distill.task import DistillTask

    task = DistillTask(build_config("smoke", [f"loss.sampling={sampling}"]))
    task.to_device(torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    video = [torch.randn(3, 8, 70, 70, generator=g), torch.randn(3, 8, 70, 70, generator=g),
             torch.randn(3, 4, 84, 84, generator=g)]
    counter = SyncCounter()
    with counter:
        out = task.compute_loss(task.model, {"video": video}, step=0)
        out.loss.backward()
    assert counter.count == reads
    assert torch.isfinite(out.loss.detach())


def test_stage3_step_reads_only_the_host_labels():
    """A stage-3 Flux-Multi loss reads back one thing: the batch's labels, checked on the host before they go
    to the device (the model and loss read nothing)."""
    from fluxvit.stages.finetune import build_config
    from fluxvit.stages.finetune.task import FinetuneTask

    task = FinetuneTask(build_config("smoke"))
    task.to_device(torch.device("cpu"))
    video = torch.randn(2, 3, 8, 56, 56, generator=torch.Generator().manual_seed(0))
    counter = SyncCounter()
    with counter:
        out = task.compute_loss(task.model, {"video": video, "label": torch.tensor([1, 2])}, step=0)
        out.loss.backward()
    assert counter.count == 1
    assert isinstance(out.tokens, int) and out.tokens > 0


@pytest.mark.parametrize("freeze", [True, False])
def test_stage2_step_reads_nothing_of_its_own(freeze, monkeypatch):
    """A stage-2 contrastive loss (smoke: micro video tower, MiniLM text tower, frozen or trained) reads nothing
    back itself; the one read is transformers' own check whether the captions' padding mask is all ones
    (``masking_utils``, before it picks the SDPA kernel), outside this code."""
    import traceback

    from fluxvit.stages.videotext import VideoTextTask, build_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task = VideoTextTask(build_config("smoke", [f"text.freeze={str(freeze).lower()}"]))
    task.to_device(torch.device("cpu"))
    video = torch.randn(2, 3, 4, 56, 56, generator=torch.Generator().manual_seed(0))
    where = []

    class Located(SyncCounter):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            before = self.count
            out = super().__torch_function__(func, types, args, kwargs)
            if self.count > before:
                where.append(any("/transformers/" in f.filename for f in traceback.extract_stack()))
            return out

    with Located():
        out = task.compute_loss(task.model, {"video": video, "caption": ["a red circle", "a blue square"]}, step=0)
        out.loss.backward()
    assert where.count(False) == 0  # none from the loss, the towers' own code or the projections
    assert where.count(True) <= 1
    assert isinstance(out.tokens, int) and out.tokens == 2 * 4 * (56 // 14) ** 2


def _fp16_accelerator():
    """accelerate gives no GradScaler on CPU; this one is what ``mixed_precision=fp16`` builds on CUDA (native
    amp, a GradScaler that ``backward``, ``clip_grad_norm_`` and the prepared optimizer drive)."""
    from accelerate import Accelerator

    acc = Accelerator(mixed_precision="no", cpu=True)
    acc.state._mixed_precision = "fp16"
    acc.native_amp = True
    acc.scaler = torch.amp.GradScaler("cpu")
    return acc


def test_fp16_scaler_survives_a_skipped_step(tmp_path):
    """fp16: a non-finite step is skipped and the run goes on (the scaler is closed for that step and backs its
    scale off), instead of failing at the next step's unscale_."""
    acc = _fp16_accelerator()
    task = _Task(nan_calls={1})
    res = fit(_cfg(tmp_path, steps=4, grad_accum=1), task, _Source(1), acc)
    assert res.steps == 4 and res.skipped_steps == 1
    assert acc.scaler.get_scale() == 2.0 ** 16 * 0.5  # backed off once
    assert not torch.equal(task.params_at[2][1][0], next(task.model.parameters()))  # steps after the skip train


class _EvalTask(_Task):
    def evaluate(self, model, step):
        inner = getattr(model, "module", model)
        # A submodule, as stage 3 evaluates ``model.net`` (accelerate casts the prepared model's outputs to fp32).
        self.eval_dtypes.append(inner[0](torch.randn(2, 4)).dtype)
        return {"val": 0.0}


def test_evaluation_runs_under_the_runs_mixed_precision(tmp_path):
    """A task evaluates through the unwrapped module (outside accelerate's forward wrapper): the loop puts the
    run's autocast around it, so a bf16 run evaluates in bf16 as it trains."""
    from accelerate import Accelerator

    acc = Accelerator(mixed_precision="bf16", cpu=True)
    task = _EvalTask()
    task.eval_dtypes = []
    fit(_cfg(tmp_path, steps=2, eval_every=1), task, _Source(1), acc)
    assert task.eval_dtypes and all(d == torch.bfloat16 for d in task.eval_dtypes), task.eval_dtypes
