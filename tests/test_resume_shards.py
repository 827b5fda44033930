"""Exact resume of stage 3 on real-format shards (mp4 clips decoded from WebDataset tars): a run stopped after
step k and resumed from its checkpoint ends with the uninterrupted run's weights, bit for bit, with no shuffle
buffer, 0 or 2 DataLoader workers, in deterministic mode (the loader's random state follows the data position)."""
import shutil

import pytest
import torch

from fluxvit.models import read_state_dict
from fluxvit.stages.finetune import main

MICRO = '{"head_budgets": [16, 12, 8], "depth": 1, "embed_dim": 32, "num_heads": 2, "clip_embed_dim": 32, ' \
        '"attn_pool_num_heads": 2}'


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from fluxvit.datasets.synth import make_synthetic_corpus

    root = tmp_path_factory.mktemp("synth")
    corpus = make_synthetic_corpus(root, num_train=24, num_val=0, num_test=0, num_frames=6, size=32,
                                   samples_per_shard=6, workers=1)
    return corpus["splits"]["train"]["shards"]


def _args(run_dir, shards, workers, *extra):
    sets = [f"train.run_dir={run_dir}", "train.steps=6", "train.ckpt_every=2", "train.tensorboard=false",
            "train.progress=false", "train.deterministic=true", f"model.overrides={MICRO}", "data.source=shards",
            f"data.shards={shards}", "data.val_shards=", "data.shuffle_buffer=0", f"data.num_workers={workers}",
            "data.decoder=pyav", "data.batch_size=2", "data.grid=[[2,28],[4,28],[2,42]]", "data.crop=rrc",
            "loss.budgets=[16,12,8]", "eval.budgets=[]", *extra]
    return ["--preset", "smoke", *[a for s in sets for a in ("--set", s)]]


@pytest.mark.parametrize("workers", [0, 2])
def test_stage3_killed_after_step_4_resumes_to_the_same_weights(shards, tmp_path, workers):
    full = main(_args(tmp_path / "full", shards, workers))
    assert full.steps == 6
    # What a SIGKILL after step 4 leaves on disk: the run's config and its newest checkpoint, step 4.
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(tmp_path / "full" / "ckpt-00000004", cut / "ckpt-00000004")
    shutil.copy(tmp_path / "full" / "config.json", cut / "config.json")
    resumed = main(_args(cut, shards, workers, "train.resume=auto"))
    assert [h["step"] for h in resumed.history] == [5, 6]
    want = {h["step"]: h["loss"] for h in full.history}
    assert all(h["loss"] == want[h["step"]] for h in resumed.history)
    a = read_state_dict(tmp_path / "full" / "model.safetensors")
    b = read_state_dict(cut / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


@pytest.mark.slow
def test_two_ddp_ranks_killed_after_step_4_resume_to_the_same_weights(shards, tmp_path, free_port):
    """The same on 2 data-parallel CPU processes (gloo): each rank's loader restarts where it stopped."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root), ACCELERATE_USE_CPU="1")

    def launch(run_dir, *extra):
        cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", "launch/cpu_ddp2.yaml",
               "--main_process_port", str(free_port), "-m", "fluxvit.stages.finetune",
               *_args(run_dir, shards, 0, *extra)]
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]

    launch(tmp_path / "full")
    assert json.loads((tmp_path / "full" / "ckpt-00000004" / "trainer_state.json").read_text())["world_size"] == 2
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(tmp_path / "full" / "ckpt-00000004", cut / "ckpt-00000004")
    launch(cut, "train.resume=auto")
    a = read_state_dict(tmp_path / "full" / "model.safetensors")
    b = read_state_dict(cut / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
