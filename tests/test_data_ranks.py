"""Small data on many ranks: a stage run whose ranks hold less than one batch must train, in lockstep."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_fixtures import make_video, video_sample, write_sizes, write_tar

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_two_processes_over_5_5_2_samples_batch_4(tmp_path, free_port):
    """3 shards of 5 / 5 / 2 samples, batch 4, 2 processes: 2 steps per epoch on both ranks (the rank holding the
    2-sample shard re-reads it), 5 steps = 3 epochs, no "yielded no batch", a warning saying what was done."""
    video = make_video(num_frames=8, width=32, height=24)
    sizes = {"00000.tar": 5, "00001.tar": 5, "00002.tar": 2}
    for name, n in sizes.items():
        write_tar(tmp_path / "shards" / name, [video_sample(f"{name[:5]}k{i}", video) for i in range(n)])
    write_sizes(tmp_path / "shards", sizes)
    run_dir = tmp_path / "run"
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port),
           "-m", "fluxvit.stages.distill", "--preset", "smoke", "--set", "train.steps=5",
           "--set", f"train.run_dir={run_dir}", "--set", "train.eval_every=0", "--set", "train.ckpt_every=0",
           "--set", "train.progress=false", "--set", "train.tensorboard=false", "--set", "data.source=shards",
           "--set", f"data.shards={tmp_path / 'shards'}/{{00000..00002}}.tar", "--set", "data.batch_size=4",
           "--set", "data.decoder=pyav", "--set", "data.grid=[[4,112]]", "--set", "data.num_workers=0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false",
               ACCELERATE_USE_CPU="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((run_dir / "ckpt-00000005" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["data_position"] == 5
    assert "re-read their shards so that every rank takes the same 2 steps per epoch" in proc.stderr
    assert "yielded no batch" not in proc.stderr
