"""DeepSpeed ZeRO-2 on two CPU processes over gloo (launch/deepspeed_zero2_cpu.yaml), and the launch check that
refuses a run whose distributed type is not the one its launch config asked for."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
QUIET = ["--set", "train.progress=false", "--set", "train.tensorboard=false", "--set", "train.eval_every=0"]


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", **extra)
    if "ACCELERATE_USE_CPU" not in extra:
        env.pop("ACCELERATE_USE_CPU", None)
    return env


def _launch(run_dir, port, **env):
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", "launch/deepspeed_zero2_cpu.yaml",
           "--main_process_port", str(port), "-m", "fluxvit.stages.distill", "--preset", "smoke",
           "--set", "train.steps=2", "--set", f"train.run_dir={run_dir}", *QUIET]
    return subprocess.run(cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=500)


@pytest.mark.slow
def test_deepspeed_zero2_runs_on_two_cpu_processes(tmp_path, free_port):
    pytest.importorskip("deepspeed")
    proc = _launch(tmp_path, free_port)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp_path / "ckpt-00000002"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["distributed_type"] == "DEEPSPEED"
    # DeepSpeed's own checkpoint: one ZeRO optimizer partition per rank, written by a 2-rank data-parallel engine
    shards = sorted(p.name for p in (ckpt / "pytorch_model").glob("zero_pp_rank_*_optim_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    engine = torch.load(ckpt / "pytorch_model" / "mp_rank_00_model_states.pt", weights_only=False)
    assert engine["dp_world_size"] == 2
    optim = torch.load(ckpt / "pytorch_model" / shards[1], weights_only=False)["optimizer_state_dict"]
    assert int(optim["zero_stage"]) == 2 and set(optim["partition_count"]) == {2}  # each param group split in 2
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
    assert (tmp_path / "student.safetensors").is_file()
    # the launcher process itself prints DeepSpeed's CPU notice once (stdout or stderr, by DeepSpeed version);
    # the two ranks and the export must add none
    assert (proc.stdout + proc.stderr).count("Setting accelerator to CPU") <= 1, proc.stdout[-3000:]


@pytest.mark.slow
def test_deepspeed_dropped_by_use_cpu_is_refused_in_one_line(tmp_path, free_port):
    pytest.importorskip("deepspeed")
    proc = _launch(tmp_path, free_port, ACCELERATE_USE_CPU="1")  # accelerate would silently run plain DDP
    assert proc.returncode != 0
    lines = [x for x in proc.stderr.splitlines() if "fluxvit.stages.distill: error:" in x]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "asked for DEEPSPEED on 2 process(es) but this run got MULTI_CPU on 2" in lines[0]
    assert not (tmp_path / "ckpt-00000002").exists()


def test_finetune_declares_when_every_parameter_is_used():
    from fluxvit.stages.finetune import FinetuneTask, build_config

    assert FinetuneTask(build_config("smoke")).find_unused_parameters is False  # 3 budgets, 3 heads, 2 decoders
    assert FinetuneTask(build_config("smoke", ["loss.mode=single"])).find_unused_parameters is True  # heads 1, 2 idle


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_without_the_unused_parameters_warning(tmp_path, free_port):
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", "launch/cpu_ddp2.yaml", "--main_process_port", str(free_port),
           "-m", "fluxvit.stages.finetune", "--preset", "smoke", "--set", "train.steps=2",
           "--set", f"train.run_dir={tmp_path}", "--set", "eval.budgets=[]", *QUIET]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(ACCELERATE_USE_CPU="1"), capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "ckpt-00000002" / "trainer_state.json").read_text())["world_size"] == 2
    assert "find_unused_parameters=True was specified" not in proc.stderr
