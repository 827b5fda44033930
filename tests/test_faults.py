"""Fault injection: each fault hits a toy run of the shared loop, the run (or a rerun with ``train.resume=auto``)
continues from the last intact state, and nothing already trained is lost: the resumed run ends with exactly
the weights, losses and learning rates of a run that never saw the fault, and ``metrics.jsonl`` holds every step
once. The "Faults and what happens" table of docs/training.md is filled from these tests.

Run as a script (``python tests/test_faults.py RUN_DIR KILL_AT``) it is the worker of the SIGKILL test.
"""
from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import ToyConfig, ToySource, reset_accelerate_state
from fluxvit.stages.common import OptimConfig, StepOutput, TrainConfig, build_accelerator, find_latest, fit
from fluxvit.stages.common.checkpoint import CheckpointError
from fluxvit.stages.common.runtime import read_metrics

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8


_Cfg, _Source = ToyConfig, ToySource  # conftest.py: the shared toy config and batch source


class _Task:
    """Linear regression with dropout (consumes the global RNG, so resume must restore it); ``hooks`` maps a
    0-based step to a callable run at the start of that step (the fault), ``nan_steps`` poison the loss."""

    def __init__(self, hooks=None, nan_steps=()):
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.3), nn.Linear(16, 1))
        self.hooks, self.nan_steps = dict(hooks or {}), set(nan_steps)

    def to_device(self, device):
        pass

    def load_init(self, path):
        pass

    def compute_loss(self, model, batch, step):
        hook = self.hooks.pop(step, None)
        if hook is not None:
            hook()
        loss = ((model(batch["x"]) - batch["y"]) ** 2).mean()
        if step in self.nan_steps:
            loss = loss * float("nan")
        return StepOutput(loss, {"loss": loss.detach()}, tokens=8)

    def export(self, model, path):
        torch.save(model.state_dict(), path)
        return path


def _cfg(run_dir, **train):
    train = {"steps": STEPS, "ckpt_every": 2, "keep_last": 3, **train}
    return _Cfg(TrainConfig(run_dir=str(run_dir), progress=False, tensorboard=False, log_every=1000,
                            export_name="toy.pt", **train),
                OptimConfig(lr=1e-2, warmup_steps=2, clip_grad=1.0))


def _run(cfg, task, source=None):
    reset_accelerate_state()
    acc = build_accelerator(cfg.train, 8, cfg.optim.clip_grad)
    return fit(cfg, task, source or _Source(), acc)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every faulted run must reproduce."""
    run = tmp_path_factory.mktemp("reference")
    res = _run(_cfg(run), _Task())
    return {"history": {h["step"]: (h["loss"], h["lr"]) for h in res.history}, "weights": torch.load(res.export_path)}


def _assert_nothing_lost(run_dir, reference, resumed):
    """Final weights equal the reference's bit for bit; the resumed steps match it; every step logged once."""
    got = torch.load(resumed.export_path)
    assert all(torch.equal(got[k], reference["weights"][k]) for k in got)
    for h in resumed.history:
        assert (h["loss"], h["lr"]) == reference["history"][h["step"]], h["step"]
    steps = [r["step"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, STEPS + 1))


class _Stop(Exception):
    """Stands in for a crash (the process dies; the test process must not)."""


def _crash():
    raise _Stop()


# ------------------------------------------------------------------------------------------------ faults
def test_truncated_latest_checkpoint(tmp_path, reference, caplog):
    """A crash after step 6, and the newest checkpoint (6) truncated on disk: auto-resume takes 4, says so."""
    with pytest.raises(_Stop):
        _run(_cfg(tmp_path), _Task(hooks={6: _crash}))
    victim = tmp_path / "ckpt-00000006" / "model.safetensors"
    victim.write_bytes(victim.read_bytes()[:100])
    with caplog.at_level("WARNING", logger="fluxvit.train"):
        resumed = _run(_cfg(tmp_path, resume="auto"), _Task())
    assert [h["step"] for h in resumed.history] == [5, 6, 7, 8]  # from ckpt-4, the newest intact one
    assert any("skips ckpt-00000006" in r.getMessage() and "model.safetensors" in r.getMessage()
               for r in caplog.records)
    _assert_nothing_lost(tmp_path, reference, resumed)


def _worker(run_dir: str, kill_at: int) -> None:
    """SIGKILL this process in the middle of saving the checkpoint of step ``kill_at``: after the tensors are
    written, before the manifest that would make it complete."""
    from fluxvit.stages.common import checkpoint

    real = checkpoint.write_manifest

    def write_manifest(ckpt_dir, step):
        if step == kill_at:
            (Path(ckpt_dir) / "manifest.json").write_text('{"step": ')  # a torn write, then death
            os.kill(os.getpid(), signal.SIGKILL)
        return real(ckpt_dir, step)

    checkpoint.write_manifest = write_manifest
    _run(_cfg(run_dir), _Task())


@pytest.mark.slow
def test_sigkill_during_checkpoint_save(tmp_path, reference, caplog):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__, str(tmp_path), "4"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (tmp_path / "ckpt-00000004.tmp" / "model.safetensors").is_file()  # the torn save is on disk
    assert find_latest(tmp_path).name == "ckpt-00000002"
    with caplog.at_level("WARNING", logger="fluxvit.train"):
        resumed = _run(_cfg(tmp_path, resume="auto"), _Task())
    assert any("ckpt-00000004.tmp" in r.getMessage() and "interrupted save" in r.getMessage() for r in caplog.records)
    assert not list(tmp_path.glob("*.tmp"))
    assert resumed.history[0]["step"] == 3
    _assert_nothing_lost(tmp_path, reference, resumed)


def test_full_disk_during_checkpoint_save(tmp_path, reference):
    """RLIMIT_FSIZE stands in for a full disk from step 3 on: the save at step 4 fails with one line, the partial
    folder is removed, checkpoint 2 stays intact; with space again, auto-resume continues from it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def disk_full():
        resource.setrlimit(resource.RLIMIT_FSIZE, (8 * 1024, hard))  # the RNG state file alone is ~15 kB

    try:
        with pytest.raises(CheckpointError) as err:
            _run(_cfg(tmp_path), _Task(hooks={3: disk_full}))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    msg = str(err.value)
    assert "\n" not in msg and "cannot write checkpoint" in msg and "ckpt-00000004" in msg and "resume=auto" in msg
    assert not (tmp_path / "ckpt-00000004.tmp").exists() and not (tmp_path / "ckpt-00000004").exists()
    assert find_latest(tmp_path).name == "ckpt-00000002"
    resumed = _run(_cfg(tmp_path, resume="auto"), _Task())
    assert resumed.history[0]["step"] == 3
    _assert_nothing_lost(tmp_path, reference, resumed)


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def test_read_only_run_directory_as_a_user():
    """Root writes into read-only directories, so as root the next test runs in a child pytest as the
    unprivileged user ``nobody`` (uid 65534) and must pass there; as any other user it runs directly."""
    if os.geteuid() != 0:
        pytest.skip("not root: test_read_only_run_directory runs directly")
    probe = subprocess.run([*NOBODY, sys.executable, "-c", "import fluxvit, torch"], cwd=ROOT, capture_output=True,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if probe.returncode != 0:
        pytest.skip(f"root, and user nobody cannot run this interpreter: {probe.stderr.decode()[-200:]}")
    base = Path(tempfile.mkdtemp(prefix="fluxvit-nobody-"))  # pytest's own tmp root is private to root
    try:
        os.chown(base, 65534, 65534)
        cmd = [*NOBODY, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={base / 't'}",
               f"{Path(__file__).resolve()}::test_read_only_run_directory"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1"))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories: run as nobody by the test "
                                              "above")
def test_read_only_run_directory(tmp_path, reference):
    def read_only():
        os.chmod(tmp_path, 0o555)

    try:
        with pytest.raises(CheckpointError, match="cannot write checkpoint .*ckpt-00000004"):
            _run(_cfg(tmp_path), _Task(hooks={3: read_only}))
    finally:
        os.chmod(tmp_path, 0o755)
    resumed = _run(_cfg(tmp_path, resume="auto"), _Task())
    _assert_nothing_lost(tmp_path, reference, resumed)


def test_burst_of_non_finite_losses(tmp_path, reference):
    """Three NaN steps in a row (below max_bad_steps): skipped and counted, the weights stay finite; a crash inside
    the burst, resumed from the checkpoint taken during it, reproduces the uninterrupted faulty run exactly."""
    burst = {3, 4, 5}
    full = _run(_cfg(tmp_path / "full"), _Task(nan_steps=burst))
    assert full.skipped_steps == 3 and [h["skipped_steps"] for h in full.history][-1] == 3
    weights = torch.load(full.export_path)
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in full.history if h["step"] - 1 not in burst)

    run = tmp_path / "crashed"
    with pytest.raises(_Stop):
        _run(_cfg(run), _Task(nan_steps=burst, hooks={5: _crash}))  # dies in the burst, after ckpt-4
    resumed = _run(_cfg(run, resume="auto"), _Task(nan_steps=burst))
    assert resumed.skipped_steps == 3 and resumed.history[0]["step"] == 5
    got = torch.load(resumed.export_path)
    assert all(torch.equal(got[k], weights[k]) for k in got)
    want = {h["step"]: h["loss"] for h in full.history}
    assert all(h["loss"] == want[h["step"]] or h["step"] - 1 in burst for h in resumed.history)


# ------------------------------------------------------------------------------- a shard that turns corrupt
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from fluxvit.datasets.synth import make_synthetic_corpus

    root = tmp_path_factory.mktemp("synth")
    return make_synthetic_corpus(root, num_train=24, num_val=0, num_test=0, num_frames=4, size=32,
                                 samples_per_shard=6, workers=1)


class _VideoTask(_Task):
    """Regress the clip's mean intensity from a 4-number summary of it."""

    def compute_loss(self, model, batch, step):
        hook = self.hooks.pop(step, None)
        if hook is not None:
            hook()
        v = batch["video"].float().flatten(2).mean(-1)  # (B, 3)
        x = torch.cat([v, v.mean(1, keepdim=True)], 1)
        loss = ((model(x) - x[:, 3:]) ** 2).mean()
        return StepOutput(loss, {"loss": loss.detach()}, tokens=len(x))


def test_shard_turning_corrupt_mid_epoch(tmp_path, corpus):
    """A shard is overwritten with garbage while the first epoch runs: the next pass over it skips its samples and
    counts the skip, the run finishes every step, and a rerun with resume=auto of the finished run changes nothing.
    (The pipeline counts one skip per pass over a torn shard: the samples after the tear are not enumerable.)"""
    from fluxvit.datasets import DataConfig
    from fluxvit.stages.common.data import LoaderSource

    pattern = corpus["splits"]["train"]["shards"]
    shards = sorted(Path(pattern).parent.glob("*.tar"))
    assert len(shards) == 4
    dcfg = DataConfig(source="shards", shards=pattern, batch_size=4, grid=[[2, 28]], num_workers=0, flip=False,
                      decoder="pyav")
    victim = shards[-1]
    original = victim.read_bytes()

    def corrupt():
        data = bytearray(victim.read_bytes())
        data[512:] = os.urandom(len(data) - 512)  # the first header survives, everything after is noise
        victim.write_bytes(bytes(data))

    try:
        source = LoaderSource(dcfg, seed=0)
        res = _run(_cfg(tmp_path, steps=12, ckpt_every=4), _VideoTask(hooks={1: corrupt}), source)
    finally:
        victim.write_bytes(original)
    assert res.steps == 12 and len(res.history) == 12
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in res.history)
    assert res.history[-1]["skipped_samples"] > 0  # counted, not silent
    again = _run(_cfg(tmp_path, steps=12, ckpt_every=4, resume="auto"), _VideoTask(), LoaderSource(dcfg, seed=0))
    assert again.history == [] and again.steps == 12
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, 13))


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]))
