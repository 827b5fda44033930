"""``benchmarks/gpu_check.py --cpu --tiny`` runs every section end to end through the offline runner (so the GPU
script and its runner cannot rot); its JSON is written after every section; the time budget skips sections."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "benchmarks" / "gpu_offline.sh"


def test_gpu_check_cpu_tiny_end_to_end_through_the_offline_runner(tmp_path):
    """The runner finds everything importable here (it installs nothing), then runs the check: every row names
    the attention backend that ran, the compiled row counts its compiles."""
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable, "WHEELS": str(tmp_path / "no-wheels")}
    proc = subprocess.run(["bash", str(RUNNER), "run", "--cpu", "--tiny", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "installing" not in proc.stdout
    report = json.loads(out.read_text())
    assert report["backends"]["segments"]["status"] == "ok"
    tiny = report["train"]["fluxvit_tiny_patch14"]
    for case in ("flux_multi_packed", "flux_multi_three_passes", "single_32", "single_32_compiled", "mixed_packed",
                 "mixed_padded"):
        assert tiny[case]["step_s"] > 0 and tiny[case]["tokens_s"] > 0
        assert tiny[case]["backend"].startswith("segments"), tiny[case]["backend"]  # auto on CPU
    assert tiny["single_32"]["compiled_graphs"] == 0 and tiny["single_32_compiled"]["compiled_graphs"] >= 1
    assert report["compiles"]["graphs"] >= tiny["single_32_compiled"]["compiled_graphs"]
    assert tiny["packed_over_three"] > 0 and tiny["padded_over_packed"] > 0
    teacher = report["teacher"]
    assert teacher["status"] == "ok" and teacher["clips_s"] > 0 and 0 < teacher["share_of_stage1_step"] < 1
    assert "| check | result | target | status |" in proc.stdout and "Flux-Multi packed / three passes" in proc.stdout


def test_a_run_cut_off_keeps_what_it_measured(tmp_path, monkeypatch):
    """The JSON is written after every section: a failure in a late section leaves the earlier ones on disk."""
    out = tmp_path / "gpu_check.json"

    def broken(*args, **kwargs):
        raise RuntimeError("cut off")

    monkeypatch.setattr(gpu_check, "train_steps", broken)
    with pytest.raises(RuntimeError, match="cut off"):
        gpu_check.main(["--cpu", "--tiny", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["backends"]["segments"]["status"] == "ok" and saved["total_s"] > 0


def test_time_budget_skips_the_remaining_sections(tmp_path, capsys):
    report = gpu_check.main(["--cpu", "--tiny", "--budget-s", "0", "--out", str(tmp_path / "g.json")])
    assert report["train"]["fluxvit_tiny_patch14"]["status"] == gpu_check.SKIPPED
    assert report["teacher"]["status"] == report["decode"]["status"] == gpu_check.SKIPPED
    assert gpu_check.SKIPPED in capsys.readouterr().out


def test_gpu_tests_are_collected_from_the_marked_files_only():
    files = gpu_check.gpu_test_files(ROOT)
    assert "tests/test_attention.py" in files and "tests/test_internvideo2.py" in files
    assert "tests/test_data_shards.py" not in files  # imports webdataset, which a bare GPU machine lacks


def test_runner_usage_and_missing_wheels_are_one_line_errors(tmp_path):
    usage = subprocess.run(["bash", str(RUNNER)], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage:" in usage.stderr
    # A python that lacks the packages (-I: isolated, no site-packages; -S: no site module) and no wheel folder.
    fake = tmp_path / "python3"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -I -S \"$@\"\n")
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "WHEELS": str(tmp_path / "absent")}
    proc = subprocess.run(["bash", str(RUNNER), "run", "--cpu", "--tiny"], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "gpu_offline.sh fetch" in proc.stderr and "timm" in proc.stderr


def test_paper_flop_convention():
    """The paper's FLOP convention reproduces the paper's GFLOPs table within 3 % (the paper's figures run
    1-2 % higher, presumably counting the patch embedding and head too)."""
    paper = {(768, 3072): 440, (768, 2048): 255, (768, 1024): 108, (768, 512): 49,
             (384, 3072): 154, (384, 2048): 83, (384, 1024): 32, (384, 512): 13}
    for (dim, tokens), gmacs in paper.items():
        assert abs(gpu_check.backbone_macs(12, dim, [tokens]) / 1e9 / gmacs - 1) < 0.03, (dim, tokens)
