"""Hub layout: save_pretrained / from_pretrained, and timm's own hf-hub loader reading an offline HF cache."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from timm.models import PretrainedCfg

import fluxvit
from fluxvit.models import create_model
from fluxvit.models.hub import normalize_of

ROOT = Path(__file__).resolve().parents[1]


def _tiny(num_classes=5):
    torch.manual_seed(0)
    # not a registered size: every architecture field must travel in config.json's model_args
    return create_model("fluxvit_tiny_patch14", depth=2, img_size=56, num_frames=4, num_classes=num_classes,
                        head_budgets=(64, 32)).eval()


def _clip():
    return torch.randn(2, 3, 4, 56, 56, generator=torch.Generator().manual_seed(1))


def test_save_and_load_a_folder_round_trip(tmp_path):
    model = _tiny()
    fluxvit.save_pretrained(model, tmp_path / "hub", normalize="clip")
    cfg = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert cfg["architecture"] == "fluxvit_tiny_patch14" and cfg["num_classes"] == 5
    assert cfg["model_args"]["depth"] == 2 and cfg["model_args"]["head_budgets"] == [64, 32]
    # timm's PretrainedCfg fields only (timm's hub loader builds one from them); the tiny's registered video input
    # (C, T, H, W), the model's class count, the mean asked for
    timm_cfg = PretrainedCfg(**cfg["pretrained_cfg"])
    assert timm_cfg.input_size == [3, 8, 112, 112] and timm_cfg.num_classes == 5
    assert cfg["pretrained_cfg"]["mean"] == [0.48145466, 0.4578275, 0.40821073]  # CLIP mean
    assert normalize_of(cfg["pretrained_cfg"]) == "clip" and normalize_of({"mean": [0.485, 0.456, 0.406]}) == "imagenet"
    loaded = fluxvit.from_pretrained(tmp_path / "hub")
    assert loaded.config == model.config and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(_clip(), num_tokens=32), model(_clip(), num_tokens=32), rtol=0, atol=0)


def test_the_models_pretrained_cfg_is_kept_and_its_source_dropped(tmp_path):
    model = _tiny()
    model.pretrained_cfg = {"license": "apache-2.0", "hf_hub_id": "someone/else", "mean": [0.5, 0.5, 0.5]}
    fluxvit.save_pretrained(model, tmp_path)
    pre = json.loads((tmp_path / "config.json").read_text())["pretrained_cfg"]
    assert pre["license"] == "apache-2.0" and pre["mean"] == [0.5, 0.5, 0.5] and "hf_hub_id" not in pre


def test_bad_sources_fail_in_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        fluxvit.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a folder nor a hub id"):
        fluxvit.from_pretrained(tmp_path / "missing" / "deep" / "path")
    with pytest.raises(TypeError, match="takes a FluxViT"):
        fluxvit.save_pretrained(torch.nn.Linear(2, 2), tmp_path)


def _fake_hf_cache(cache: Path, repo: str, folder: Path) -> None:
    """The layout huggingface_hub's cache uses: models--ORG--NAME/{refs/main, snapshots/<commit>/files}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snap / name).write_bytes((folder / name).read_bytes())


_OFFLINE_LOAD = """
import sys, torch, timm, fluxvit
ref = torch.load(sys.argv[1])
a = timm.create_model("hf-hub:fluxorg/fluxvit-tiny-test", pretrained=True).eval()
b = fluxvit.from_pretrained("fluxorg/fluxvit-tiny-test")
with torch.no_grad():
    out_a, out_b = a(ref["clip"], num_tokens=32), b(ref["clip"], num_tokens=32)
print(float((out_a - ref["out"]).abs().max()), float((out_b - ref["out"]).abs().max()), type(a).__name__)
try:
    fluxvit.from_pretrained("fluxorg/not-cached")
except FileNotFoundError as err:
    print("MISSING", str(err).splitlines()[0][:80])
"""


def test_timm_and_fluxvit_load_from_an_offline_hf_cache(tmp_path):
    model = _tiny()
    fluxvit.save_pretrained(model, tmp_path / "hub")
    _fake_hf_cache(tmp_path / "hf" / "hub", "fluxorg/fluxvit-tiny-test", tmp_path / "hub")
    with torch.no_grad():
        torch.save({"clip": _clip(), "out": model(_clip(), num_tokens=32)}, tmp_path / "ref.pt")
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"),
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _OFFLINE_LOAD, str(tmp_path / "ref.pt")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    da, db, kind = lines[0].split()
    assert float(da) == 0.0 and float(db) == 0.0 and kind == "FluxViT"
    assert lines[1].startswith("MISSING cannot get config.json of hub repo fluxorg/not-cached")


def test_timm_without_a_source_still_refuses_pretrained():
    import timm

    with pytest.raises(ValueError, match="no weights are downloaded by name"):
        timm.create_model("fluxvit_tiny_patch14", pretrained=True)
