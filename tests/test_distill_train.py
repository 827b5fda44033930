"""Stage 1 end to end: in-process runs of the smoke preset, a 2-process gloo run, DeepSpeed ZeRO-1, and a
SIGKILLed run resumed step for step."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import reset_accelerate_state
from fluxvit.models import load_model
from fluxvit.stages.distill import main

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
QUIET = ["--set", "train.progress=false", "--set", "train.tensorboard=false"]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    reset_accelerate_state()
    # One intra-op thread: on a shared CPU box, oversubscribed OpenMP threads slow these runs ~10x.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _losses(run_dir: Path) -> dict:
    """step -> loss of the last record of each step in metrics.jsonl (a resumed run re-logs steps)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["kind"] == "train":
            out[row["step"]] = row["loss"]
    return out


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def test_two_steps_in_process_and_export(tmp_path):
    res = main(["--preset", "smoke", "--set", "train.steps=2", "--set", f"train.run_dir={tmp_path}",
                "--set", "train.eval_every=0", "--set", "train.ckpt_every=0", "--set", "loss.sampling=frame", *QUIET])
    assert res.steps == 2 and res.skipped_steps == 0 and len(res.history) == 2
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in res.history)
    assert {"loss", "tok", "pool", "lr", "tok_s", "skipped_samples"} <= set(res.history[0])
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["train"]["steps"] == 2 and cfg["loss"]["sampling"] == "frame"
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "ckpt-00000002" / "trainer_state.json").is_file()
    student = load_model(res.export_path)  # the student alone, loadable by stages 2 and 3
    assert student.config.embed_dim == 192 and student.config.num_classes == 0
    assert student(torch.randn(1, 3, 4, 56, 56)).shape == (1, student.config.clip_embed_dim)


def test_init_from_loads_student_weights_only(tmp_path):
    first = main(["--preset", "smoke", "--set", "train.steps=1", "--set", f"train.run_dir={tmp_path / 'a'}",
                  "--set", "train.eval_every=0", *QUIET])
    reset_accelerate_state()
    second = main(["--preset", "smoke", "--set", "train.steps=1", "--set", f"train.run_dir={tmp_path / 'b'}",
                   "--set", "train.eval_every=0", "--set", f"model.init={first.export_path}",
                   "--set", "optim.lr=0", "--set", "optim.min_lr=0", *QUIET])
    a, b = load_model(first.export_path), load_model(second.export_path)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    state = json.loads((tmp_path / "b" / "ckpt-00000001" / "trainer_state.json").read_text())
    assert state["step"] == 1  # a fresh run from step 0, not a resume


@pytest.mark.slow
def test_smoke_preset_cosine_rises(tmp_path):
    """The smoke preset as shipped: held-out student-teacher cosine similarity must rise clearly."""
    t0 = time.perf_counter()
    res = main(["--preset", "smoke", "--set", f"train.run_dir={tmp_path}", *QUIET])
    before, after = res.evals[0][1], res.evals[-1][1]
    print(f"smoke: {res.steps} steps in {time.perf_counter() - t0:.1f}s, held-out cosine {before} -> {after}")
    assert res.evals[0][0] == 0 and res.evals[-1][0] == res.steps
    assert after["val_cos_tok"] > before["val_cos_tok"] + 0.3
    assert after["val_cos_pool"] > before["val_cos_pool"] + 0.3
    losses = [h["loss"] for h in res.history]
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10


@pytest.mark.slow
def test_two_process_data_parallel_cpu(tmp_path, free_port):
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port),
           "-m", "fluxvit.stages.distill", "--preset", "smoke", "--set", "train.steps=3",
           "--set", f"train.run_dir={tmp_path}", "--set", "train.eval_every=0", *QUIET]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(_env(), ACCELERATE_USE_CPU="1"), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp_path / "ckpt-00000003"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["distributed_type"] == "MULTI_CPU"  # gloo
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
    # both ranks drew different batches: data position counts this rank's micro-batches
    assert state["data_position"] == 3 and len(_losses(tmp_path)) == 3


@pytest.mark.slow
def test_deepspeed_zero1_cpu(tmp_path, free_port):
    pytest.importorskip("deepspeed")
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", "launch/deepspeed_zero1_cpu.yaml",
           "--main_process_port", str(free_port), "-m", "fluxvit.stages.distill", "--preset", "smoke",
           "--set", "train.steps=3", "--set", f"train.run_dir={tmp_path}", "--set", "train.eval_every=0", *QUIET]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp_path / "ckpt-00000003"
    assert json.loads((ckpt / "trainer_state.json").read_text())["distributed_type"] == "DEEPSPEED"
    assert (ckpt / "pytorch_model").is_dir()  # DeepSpeed's own checkpoint layout (ZeRO optimizer shards)
    losses = _losses(tmp_path)
    assert len(losses) == 3 and losses[3] < losses[1]
    assert load_model(tmp_path / "student.safetensors").config.embed_dim == 192


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    steps = ["--preset", "smoke", "--set", "train.steps=8", "--set", "train.ckpt_every=3", "--set", "train.keep_last=5",
             "--set", "train.eval_every=0", "--set", "train.deterministic=true", *QUIET]
    cmd = [sys.executable, "-m", "fluxvit.stages.distill", *steps]
    # The reference run in a subprocess too: same thread count, so the same float reductions.
    proc = subprocess.run([*cmd, "--set", f"train.run_dir={tmp_path / 'full'}"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = _losses(tmp_path / "full")

    run = tmp_path / "killed"
    cmd = [*cmd, "--set", f"train.run_dir={run}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while not (run / "ckpt-00000003" / "trainer_state.json").is_file():
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.time() < deadline, "no checkpoint after 180 s"
            time.sleep(0.2)
        time.sleep(0.5)  # let it get into step 4 or 5
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "student.safetensors").exists()

    killed_at = max(_losses(run))
    proc = subprocess.run([*cmd, "--set", "train.resume=auto"], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed_from = json.loads((run / "ckpt-00000008" / "trainer_state.json").read_text())
    got = _losses(run)
    assert sorted(got) == list(range(1, 9)) and killed_at < 8 and resumed_from["step"] == 8
    for step, loss in got.items():
        assert loss == want[step], (step, loss, want[step])  # bit for bit, every step
    a, b = load_model(tmp_path / "full" / "student.safetensors"), load_model(run / "student.safetensors")
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
