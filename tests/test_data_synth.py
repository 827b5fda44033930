"""Synthetic corpus: layout, determinism, motion-only classes, captions, loading through the pipeline."""
import json

import numpy as np
import pytest

from fluxvit.datasets import DataConfig, build_video_loader
from fluxvit.datasets.cli import main
from fluxvit.datasets.synth import (CLASSES, draw_clip_spec, ensure_synthetic_corpus, make_synthetic_corpus,
                                    render_clip)

SMALL = dict(num_train=16, num_val=8, num_test=8, num_frames=8, size=64, samples_per_shard=8, workers=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return out, make_synthetic_corpus(out, **SMALL)


def test_layout_sizes_and_classes(corpus):
    out, info = corpus
    assert json.loads((out / "classes.json").read_text()) == CLASSES and len(CLASSES) == 8
    assert json.loads((out / "train/sizes.json").read_text()) == {"00000.tar": 8, "00001.tar": 8}
    for split in ("val", "test"):
        assert json.loads((out / split / "sizes.json").read_text()) == {"00000.tar": 8}
    assert info["splits"]["train"]["shards"].endswith("train/{00000..00001}.tar")
    assert json.loads((out / "corpus.json").read_text())["splits"] == info["splits"]


def test_deterministic_by_seed(corpus, tmp_path):
    out, _ = corpus
    again = make_synthetic_corpus(tmp_path / "a", **SMALL)
    assert (tmp_path / "a/train/00001.tar").read_bytes() == (out / "train/00001.tar").read_bytes()
    other = make_synthetic_corpus(tmp_path / "b", **{**SMALL, "seed": 1})
    assert (tmp_path / "b/val/00000.tar").read_bytes() != (out / "val/00000.tar").read_bytes()
    assert again["splits"] == {k: {**v, "shards": v["shards"].replace(str(out), str(tmp_path / "a"))}
                               for k, v in corpus[1]["splits"].items()}
    assert other["classes"] == CLASSES


def test_classes_depend_on_motion_only():
    rng = np.random.default_rng(0)
    spec = draw_clip_spec(rng, label=0, size=64)
    clips = [render_clip(type(spec)(**{**spec.__dict__, "label": label}), 6, 64) for label in range(len(CLASSES))]
    first = [c[0] for c in clips]
    assert all(np.array_equal(first[0], f) for f in first)  # one frame cannot tell the classes apart
    last = {c[-1].tobytes() for c in clips}
    assert len(last) == len(CLASSES)  # the motion can
    assert "moving left slowly" in spec.caption() and spec.colour in spec.caption() and spec.shape in spec.caption()


def test_appearance_independent_of_label():
    rng = np.random.default_rng(1)
    specs = [draw_clip_spec(rng, label=i % 8, size=64) for i in range(800)]
    for label in (0, 7):
        x = np.array([s.x0 for s in specs if s.label == label])
        assert 20 < x.mean() < 44  # start positions uniform on the torus for every class


def test_pipeline_reads_the_corpus(corpus):
    out, info = corpus
    loader = build_video_loader(DataConfig(shards=info["splits"]["train"]["shards"], num_frames=4, img_size=32,
                                           batch_size=4, num_workers=0, decoder="pyav"), rank=0, world_size=1)
    assert len(loader) == 4
    batches = list(loader)
    labels = np.concatenate([b["label"].numpy() for b in batches])
    assert len(batches) == 4 and set(labels) == set(range(8))
    assert all(c.startswith("a ") and "moving" in c for b in batches for c in b["caption"])
    assert loader.stats.skipped == 0


def test_ensure_generates_only_when_absent(tmp_path, monkeypatch):
    info = ensure_synthetic_corpus(tmp_path, **SMALL)
    stamp = (tmp_path / "train/00000.tar").stat().st_mtime_ns
    from fluxvit.datasets import synth
    monkeypatch.setattr(synth, "make_synthetic_corpus", lambda *a, **k: pytest.fail("regenerated"))
    assert ensure_synthetic_corpus(tmp_path, **SMALL) == info
    assert ensure_synthetic_corpus(tmp_path) == info  # no parameters: any complete corpus is used as it is
    with pytest.raises(ValueError, match="num_train: has"):
        ensure_synthetic_corpus(tmp_path, **{**SMALL, "num_train": SMALL["num_train"] + 1})
    assert (tmp_path / "train/00000.tar").stat().st_mtime_ns == stamp


def test_synth_cli(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path), "--num-train", "4", "--num-val", "2", "--num-test", "2",
                 "--num-frames", "4", "--size", "32", "--workers", "1"]) == 0
    assert "train: 4 clips" in capsys.readouterr().out
    assert main(["check", str(tmp_path / "train/00000.tar"), "--num-frames", "4"]) == 0
    assert main(["synth", "--out", str(tmp_path), "--scale", "0"]) == 2


def test_render_frame_subset_equals_full_render():
    spec = draw_clip_spec(np.random.default_rng(3), label=5, size=64)
    full = render_clip(spec, 12, 64)
    idx = [0, 3, 3, 7, 11]
    np.testing.assert_array_equal(render_clip(spec, 12, 64, indices=idx), full[idx])
    with pytest.raises(ValueError, match="frame indices"):
        render_clip(spec, 12, 64, indices=[12])
