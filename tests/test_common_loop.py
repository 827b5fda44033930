"""The shared loop on a toy task: NaN skipping, abort, checkpoints kept/atomic, exact resume after a crash."""
import json
import logging

import pytest
import torch
from torch import nn

from conftest import ToyConfig, ToySource, reset_accelerate_state
from fluxvit.stages.common import (NonFiniteLossError, OptimConfig, StepOutput, TrainConfig, build_accelerator,
                                   find_latest, fit)
from fluxvit.stages.common.checkpoint import CheckpointError, verify_checkpoint
from fluxvit.stages.common.config import ConfigError
from fluxvit.stages.common.runtime import append_metrics, read_metrics




_Cfg, _Source = ToyConfig, ToySource  # conftest.py: the shared toy config and batch source


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


# ------------------------------------------------------------------------------------------------- checkpoints
def test_checkpoints_beyond_keep_last_are_pruned_and_each_has_a_manifest(tmp_path):
    res = _run(_cfg(tmp_path, steps=7, ckpt_every=1, keep_last=3), _Task())
    assert res.steps == 7
    kept = sorted(p.name for p in tmp_path.glob("ckpt-*"))
    assert kept == ["ckpt-00000005", "ckpt-00000006", "ckpt-00000007"]
    for name in kept:
        manifest = verify_checkpoint(tmp_path / name)
        assert int(name[5:]) == manifest["step"]
        assert {"trainer_state.json", "config.json", "model.safetensors"} <= set(manifest["files"])


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_corrupt_latest_checkpoint_is_skipped_by_auto_with_a_warning(tmp_path, caplog):
    _run(_cfg(tmp_path, steps=6, ckpt_every=2, keep_last=3), _Task())
    _truncate(tmp_path / "ckpt-00000006" / "model.safetensors")
    (tmp_path / "ckpt-00000004" / "manifest.json").unlink()  # a save that never finished
    with caplog.at_level(logging.WARNING, logger="fluxvit.train"):
        assert find_latest(tmp_path).name == "ckpt-00000002"
    skipped = [r.getMessage() for r in caplog.records if "skips" in r.getMessage()]
    assert len(skipped) == 2
    assert "ckpt-00000006" in skipped[0] and "model.safetensors" in skipped[0] and "truncated" in skipped[0]
    assert "ckpt-00000004" in skipped[1] and "manifest.json" in skipped[1]


def test_flipped_byte_fails_the_hash(tmp_path):
    _run(_cfg(tmp_path, steps=2), _Task())
    path = tmp_path / "ckpt-00000002" / "optimizer.bin"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other content
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"optimizer\.bin does not match the SHA-256"):
        verify_checkpoint(tmp_path / "ckpt-00000002")
    assert find_latest(tmp_path) is None


def test_explicit_corrupt_resume_fails_in_one_line_naming_the_file(tmp_path):
    _run(_cfg(tmp_path / "a", steps=2), _Task())
    _truncate(tmp_path / "a" / "ckpt-00000002" / "optimizer.bin")
    cfg = _cfg(tmp_path / "b", steps=4, resume=str(tmp_path / "a" / "ckpt-00000002"))
    with pytest.raises(CheckpointError) as err:
        _run(cfg, _Task())
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "a" / "ckpt-00000002" / "optimizer.bin") in msg
    assert not (tmp_path / "b" / "config.json").exists()  # nothing was started


def test_leftover_tmp_dirs_are_removed_at_start(tmp_path):
    (tmp_path / "ckpt-00000003.tmp").mkdir(parents=True)
    (tmp_path / "ckpt-00000003.tmp" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / "toy.pt.tmp").write_bytes(b"partial export")
    _run(_cfg(tmp_path, steps=1), _Task())
    assert not list(tmp_path.glob("*.tmp")) and (tmp_path / "ckpt-00000001").is_dir()


def test_resume_from_older_checkpoint_drops_the_abandoned_newer_ones(tmp_path):
    _run(_cfg(tmp_path, steps=6, ckpt_every=2, keep_last=3), _Task())
    cfg = _cfg(tmp_path, steps=6, ckpt_every=2, keep_last=3, resume=str(tmp_path / "ckpt-00000002"))
    cfg.train.steps = 3  # a run-control field: allowed
    _run(cfg, _Task())
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-00000002", "ckpt-00000003"]
    assert find_latest(tmp_path).name == "ckpt-00000003"


# ------------------------------------------------------------------------------ hyperparameters on resume
def test_changed_hyperparameter_on_resume_is_refused_and_config_json_kept(tmp_path):
    _run(_cfg(tmp_path, steps=2), _Task())
    before = (tmp_path / "config.json").read_text()
    cfg = _cfg(tmp_path, steps=4, resume="auto")
    cfg.optim.lr = 5e-2
    with pytest.raises(ConfigError) as err:
        _run(cfg, _Task())
    msg = str(err.value)
    assert "\n" not in msg and "optim.lr: 0.01 -> 0.05" in msg
    assert (tmp_path / "config.json").read_text() == before  # still the truth
    assert find_latest(tmp_path).name == "ckpt-00000002"


def test_more_steps_on_resume_take_effect_and_are_recorded(tmp_path):
    _run(_cfg(tmp_path / "a", steps=2, ckpt_every=1), _Task())
    full = _run(_cfg(tmp_path / "full", steps=5), _Task())
    cfg = _cfg(tmp_path / "a", steps=5, resume="auto")
    resumed = _run(cfg, _Task())
    assert json.loads((tmp_path / "a" / "config.json").read_text())["train"]["steps"] == 5
    # the cosine schedule now spans 5 steps: from step 3 on the lrs are those of a 5-step run
    lrs = {h["step"]: h["lr"] for h in resumed.history}
    assert lrs == {s: h["lr"] for s, h in ((h["step"], h) for h in full.history) if s > 2}


# --------------------------------------------------------------------------------------- metrics.jsonl
class _EvalTask(_Task):
    def evaluate(self, model, step):
        return {"val": float(step)}


def test_metrics_jsonl_holds_each_step_once_after_resume_and_the_final_eval(tmp_path):
    cfg = _cfg(tmp_path, steps=6, ckpt_every=2, keep_last=3, eval_every=2)
    with pytest.raises(KeyboardInterrupt):
        _run(cfg, _EvalTask(crash_at=4))  # steps 1..4 logged (crash inside step 5), ckpt at 2 and 4
    (tmp_path / "ckpt-00000004" / "manifest.json").unlink()  # and the checkpoint at 4 is unusable
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert max(r["step"] for r in rows) == 4
    cfg.train.resume = "auto"
    _run(cfg, _EvalTask())
    rows = read_metrics(tmp_path / "metrics.jsonl")
    train = [r["step"] for r in rows if r["kind"] == "train"]
    evals = [r["step"] for r in rows if r["kind"] == "eval"]
    assert train == [1, 2, 3, 4, 5, 6]
    assert evals == [0, 2, 4, 6]  # the final evaluation too, once


def test_finetune_style_final_eval_is_appended(tmp_path):
    append_metrics(tmp_path, 3, {"top1": torch.tensor(50.0)})
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 3, "kind": "eval", "top1": 50.0}]


# ---------------------------------------------------------------------------------- gradient accumulation
class _BigBatches:
    """Batch n is the concatenation of micro-batches k*n .. k*n+k-1 of ``_Source``."""

    skipped = 0

    def __init__(self, k):
        self.k = k

    def batches(self, start):
        micro = _Source().batches(start * self.k)
        while True:
            parts = [next(micro) for _ in range(self.k)]
            yield {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


class _DeterministicTask(_Task):
    def __init__(self):
        super().__init__()
        self.model[1].p = 0.0  # no dropout: the two runs see the same function


# (eps, clip): AdamW as shipped with clipping on, and a scale-sensitive setting (Adam's eps far above the gradient
# makes the update proportional to it, clipping off): a wrong 1/k or a sum instead of a mean only shows there.
@pytest.mark.parametrize("eps,clip", [(1e-8, 1.0), (10.0, 0.0)])
@pytest.mark.parametrize("k", [2, 3])
def test_grad_accum_k_micro_batches_equal_one_step_on_k_times_b(tmp_path, k, eps, clip):
    cfg_acc = _cfg(tmp_path / "acc", steps=3, grad_accum=k)
    cfg_acc.optim.eps, cfg_acc.optim.clip_grad = eps, clip
    acc = build_accelerator(cfg_acc.train, 8, cfg_acc.optim.clip_grad)
    a = fit(cfg_acc, _DeterministicTask(), _Source(), acc)
    reset_accelerate_state()
    cfg_big = _cfg(tmp_path / "big", steps=3)
    cfg_big.optim.eps, cfg_big.optim.clip_grad = eps, clip
    acc = build_accelerator(cfg_big.train, 8 * k, cfg_big.optim.clip_grad)
    b = fit(cfg_big, _DeterministicTask(), _BigBatches(k), acc)
    wa, wb = torch.load(a.export_path), torch.load(b.export_path)
    first = _DeterministicTask().model.state_dict()
    for name in wa:
        assert not torch.equal(wa[name], first[name]), name  # training moved the weights
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6, msg=name)
    assert [h["loss"] for h in a.history] == pytest.approx([h["loss"] for h in b.history], rel=1e-5)


# ------------------------------------------------------------------------------ each guard alone
class _NanGrad(torch.autograd.Function):
    """Identity forward (a finite loss), NaN gradient backward: only the gradient check can catch it."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


class _GradFaultTask(_Task):
    """A finite loss whose gradient is NaN in micro-batch ``micro`` of the steps in ``bad``."""

    def __init__(self, bad, micro=0):
        super().__init__()
        self.bad, self.micro, self.calls = set(bad), micro, {}

    def compute_loss(self, model, batch, step):
        k = self.calls.get(step, 0)
        self.calls[step] = k + 1
        pred = model(batch["x"])
        if step in self.bad and k == self.micro:
            pred = _NanGrad.apply(pred)
        loss = ((pred - batch["y"]) ** 2).mean()
        return StepOutput(loss, {"loss": loss.detach()}, tokens=8)


@pytest.mark.parametrize("clip_grad", [1.0, 0.0])  # 0.0: clipping off, as several shipped presets run
@pytest.mark.parametrize("grad_accum,micro", [(1, 0), (3, 0), (3, 2)])
def test_finite_loss_with_a_nan_gradient_skips_the_step(tmp_path, clip_grad, grad_accum, micro):
    """The loss check cannot see this fault; the gradient check alone must skip the step (whatever micro-batch
    carries it, clipping on or off), leaving every weight finite and the step counted."""
    cfg = _cfg(tmp_path, steps=4, grad_accum=grad_accum)
    cfg.optim.clip_grad = clip_grad
    res = _run(cfg, _GradFaultTask(bad={1}, micro=micro))
    assert res.skipped_steps == 1 and [h["skipped_steps"] for h in res.history] == [0, 1, 1, 1]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in res.history)  # the loss never showed it
    weights = torch.load(res.export_path)
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.parametrize("grad_accum,micro", [(1, 0), (3, 1), (3, 2)])
def test_nan_loss_in_any_micro_batch_skips_the_whole_step_without_clipping(tmp_path, grad_accum, micro):
    """The loss check alone (clipping off, so no gradient norm is needed to see it) skips the whole step, wherever
    the NaN micro-batch lands; the weights equal a run that never took that step's update."""

    class _LossFault(_Task):
        def __init__(self):
            super().__init__()
            self.calls = {}

        def compute_loss(self, model, batch, step):
            k = self.calls.get(step, 0)
            self.calls[step] = k + 1
            out = super().compute_loss(model, batch, step)
            if step == 2 and k == micro:
                out = StepOutput(out.loss * float("nan"), out.terms, out.tokens)
            return out

    cfg = _cfg(tmp_path, steps=4, grad_accum=grad_accum)
    cfg.optim.clip_grad = 0.0
    res = _run(cfg, _LossFault())
    assert res.skipped_steps == 1
    weights = torch.load(res.export_path)
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.parametrize("k", [1, 3])
def test_logged_loss_is_the_mean_of_the_micro_batch_losses(tmp_path, k):
    """The logged value of a term is exactly the mean of what the task returned over the step's micro-batches (no
    offset, no sum), checked against the task's own record."""

    class _Recording(_DeterministicTask):
        def __init__(self):
            super().__init__()
            self.seen = {}

        def compute_loss(self, model, batch, step):
            out = super().compute_loss(model, batch, step)
            self.seen.setdefault(step, []).append(float(out.loss.detach()))
            return out

    task = _Recording()
    res = _run(_cfg(tmp_path, steps=3, grad_accum=k), task)
    for h in res.history:
        parts = task.seen[h["step"] - 1]
        assert len(parts) == k and h["loss"] == pytest.approx(sum(parts) / k, rel=1e-6)
