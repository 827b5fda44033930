"""fluxvit-embed and fluxvit-search on real-format videos made here with ffmpeg (mp4, mkv, avi + bad files)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("faiss")

from fluxvit.embed import main as embed_main  # noqa: E402
from fluxvit.encoders import load_encoder  # noqa: E402
from fluxvit.models import create_model, save_model  # noqa: E402
from fluxvit.search import load_index  # noqa: E402
from fluxvit.search import main as search_main  # noqa: E402
from fluxvit.stages.videotext import VideoTextModel, build_text_tower  # noqa: E402
from fluxvit.stages.videotext.config import smoke  # noqa: E402
from fluxvit.stages.videotext.task import save_videotext  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETTING = ["--frames", "4", "--resolution", "56", "--budget", "32", "--workers", "0", "--no-progress"]


def _ffmpeg(out: Path, size: str, codec: list, pattern: str = "testsrc") -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", f"{pattern}=size={size}:rate=12",
                    "-t", "1", *codec, str(out)], check=True, timeout=60)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Four good videos in three containers (one in a class folder, two aspect ratios) and two bad files."""
    root = tmp_path_factory.mktemp("videos")
    h264 = ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
    _ffmpeg(root / "a.mp4", "96x64", h264)
    _ffmpeg(root / "b.mkv", "64x64", h264, "testsrc2")
    _ffmpeg(root / "c.avi", "64x96", ["-c:v", "mpeg4"], "rgbtestsrc")
    _ffmpeg(root / "dogs" / "d.mp4", "80x64", h264, "smptebars")
    (root / "bad.mp4").write_bytes(os.urandom(3000))
    (root / "empty.mkv").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def stage2(tmp_path_factory):
    """A randomly initialised tiny stage-2 export (MiniLM text tower)."""
    torch.manual_seed(0)
    cfg = smoke()
    video = create_model("fluxvit_tiny_patch14", num_classes=0, depth=1, img_size=56, num_frames=4,
                         head_budgets=(64, 32))
    tower = build_text_tower(cfg.text.spec)
    model = VideoTextModel(video, tower.dim, cfg.contrast.embed_dim)
    path = tmp_path_factory.mktemp("stage2") / "videotext.safetensors"
    return save_videotext(model.eval(), tower, cfg, path)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    torch.manual_seed(1)
    net = create_model("fluxvit_tiny_patch14", depth=1, img_size=56, num_frames=4, num_classes=3,
                       head_budgets=(64, 32))
    return save_model(net, tmp_path_factory.mktemp("stage3") / "model.safetensors",
                      metadata={"stage": "finetune", "trained_heads": "0,1"})


def _rows(out: Path) -> tuple[np.ndarray, list]:
    parts = sorted(int(p.stem.split("_")[1]) for p in (out / "metadata").glob("*.parquet"))
    emb = np.concatenate([np.load(out / "video_emb" / f"video_emb_{n}.npy") for n in parts])
    meta = [r for n in parts for r in pq.read_table(out / "metadata" / f"metadata_{n}.parquet").to_pylist()]
    return emb, meta


def test_folder_of_videos_with_bad_files(videos, classifier, tmp_path, capsys):
    out = tmp_path / "emb"
    status = embed_main(["--model", str(classifier), "--data", str(videos), "--out", str(out), *SETTING])
    assert status == 1  # some videos failed, as make-shards reports it
    emb, meta = _rows(out)
    assert [m["key"] for m in meta] == ["a.mp4", "b.mkv", "c.avi", "dogs/d.mp4"]
    assert emb.shape == (4, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert meta[3]["label"] == "dogs" and meta[0]["label"] == ""
    assert {m["budget"] for m in meta} == {32} and {m["tokens"] for m in meta} == {32}
    assert {m["frames"] for m in meta} == {4} and {m["resolution"] for m in meta} == {56}
    assert meta[0]["model_sha256"] == load_encoder(str(classifier)).model_sha256
    assert "pooled feature" in meta[0]["vector"]
    failed = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]
    assert sorted(f["key"] for f in failed) == ["bad.mp4", "empty.mkv"]
    assert all(f["reason"] for f in failed)
    text = capsys.readouterr().out
    assert "failed bad.mp4:" in text and "failed empty.mkv:" in text


def test_resume_skips_done_parts_and_writes_no_key_twice(videos, classifier, tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    for name in ("a.mp4", "b.mkv", "c.avi"):
        shutil.copy(videos / name, good / name)
    out = tmp_path / "emb"
    args = ["--model", str(classifier), "--data", str(good), "--out", str(out), "--part-size", "2", *SETTING]
    assert embed_main(args) == 0
    first, meta = _rows(out)
    (out / "metadata" / "metadata_1.parquet").unlink()  # as if killed before part 1 finished
    assert embed_main(args) == 0
    again, meta2 = _rows(out)
    assert [m["key"] for m in meta2] == [m["key"] for m in meta] == ["a.mp4", "b.mkv", "c.avi"]
    np.testing.assert_allclose(again, first, rtol=0, atol=1e-6)
    rank = json.loads((out / "ranks" / "rank_0.json").read_text())
    assert rank["parts_written"] == [1] and rank["parts_skipped"] == 1
    with pytest.raises(SystemExit) as err:  # another setting into the same folder is refused
        embed_main([*args[:-len(SETTING)], *SETTING[:4], "--budget", "16", "--workers", "0", "--no-progress"])
    assert err.value.code == 2


def test_views_are_averaged_and_mixed_sizes_pack_without_padding(videos, classifier, tmp_path):
    out1, out2 = tmp_path / "one", tmp_path / "batched"
    common = ["--model", str(classifier), "--data", str(videos), "--keep-aspect", "--clips", "2", "--crops", "1",
              *SETTING]
    assert embed_main([*common, "--out", str(out1), "--batch-size", "1"]) == 1
    assert embed_main([*common, "--out", str(out2), "--batch-size", "4"]) == 1
    one, meta = _rows(out1)
    batched, _ = _rows(out2)
    # a 96x64 and a 64x96 video keep their aspect: 84x56 and 56x84 grids go through one packed forward
    np.testing.assert_allclose(batched, one, rtol=0, atol=1e-5)
    assert {m["views"] for m in meta} == {2}
    enc = load_encoder(str(classifier))
    from fluxvit.embed import EmbedSettings, _decode

    s = EmbedSettings(budget=32, frames=4, resolution=56, clips=2, keep_aspect=True)
    views, _, _ = _decode({"__key__": "a", "mp4": (videos / "a.mp4").read_bytes()}, s)
    assert [tuple(v.shape) for v in views] == [(3, 4, 56, 84)] * 2
    ref = torch.nn.functional.normalize(enc.embed(views, 32).mean(0), dim=0).numpy()
    np.testing.assert_allclose(one[0], ref, rtol=0, atol=1e-5)


def test_official_checkpoint_needs_arch(tmp_path, videos):
    torch.manual_seed(2)
    net = create_model("fluxvit_tiny_patch14", num_classes=0)
    torch.save({"module": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "release.pth")
    base = ["--data", str(videos), "--out", str(tmp_path / "emb"), *SETTING]
    with pytest.raises(SystemExit) as err:
        embed_main(["--model", str(tmp_path / "release.pth"), *base])
    assert err.value.code == 2
    assert embed_main(["--model", str(tmp_path / "release.pth"), "--arch", "fluxvit_tiny_patch14", *base]) == 1
    emb, meta = _rows(tmp_path / "emb")
    assert emb.shape == (4, 384) and meta[0]["vector"].startswith("official backbone")
    with pytest.raises(SystemExit):  # text needs a stage-2 model
        embed_main(["--model", str(tmp_path / "release.pth"), "--arch", "fluxvit_tiny_patch14", "--text",
                    *base[:2], "--out", str(tmp_path / "emb2"), *SETTING])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from fluxvit.datasets.synth import make_synthetic_corpus

    root = tmp_path_factory.mktemp("synth")
    make_synthetic_corpus(root, num_train=0, num_val=0, num_test=12, num_frames=8, size=64, samples_per_shard=5,
                          workers=1)
    return root


def test_search_recall_equals_retrieval_t2v_r1(corpus, stage2, tmp_path, capsys):
    """The synthetic test split, one stage-2 model, one protocol (4 x 56, budget 32, one view, plain cosine)."""
    from fluxvit.datasets import DataConfig
    from fluxvit.stages.videotext.retrieval import encode_set, evaluate_retrieval, load_retrieval_set
    from fluxvit.stages.videotext.task import load_videotext

    spec = json.loads((corpus / "corpus.json").read_text())["splits"]["test"]["shards"]
    out = tmp_path / "emb"
    args = ["--model", str(stage2), "--data", spec, "--out", str(out), "--text", "--frames", "4",
            "--resolution", "56", "--budget", "32", "--workers", "2", "--batch-size", "5", "--no-progress"]
    assert embed_main(args) == 0
    emb, meta = _rows(out)
    assert len(meta) == 12 and len({m["key"] for m in meta}) == 12 and "joint video-text" in meta[0]["vector"]

    model, tower = load_videotext(stage2)
    data = DataConfig(source="synthetic-corpus", root=str(corpus), shards=spec, num_workers=0)  # no train split
    rset = load_retrieval_set(data, "test", 4, 56)
    ref = evaluate_retrieval(model, tower, rset, [32])[32]
    text, vids = encode_set(model, tower, rset, [32])
    order = [rset.keys.index(m["key"]) for m in meta]
    np.testing.assert_allclose(emb, vids[32][order].numpy(), rtol=0, atol=1e-5)  # the same vectors

    index = load_index(out)
    enc = load_encoder(str(stage2))
    queries = enc.embed_text([rset.texts[i] for i in range(len(rset.texts))])
    _, rows = index.search(queries, 1)
    hits = [index.keys[r[0]] == rset.keys[rset.text_to_video[i]] for i, r in enumerate(rows)]
    # the same count of hits (the evaluation reports R@1 as a float32 percentage)
    assert sum(hits) == round(ref["t2v_r1"] * len(hits) / 100) and len(hits) == ref["num_texts"] == 12
    text_emb = np.concatenate([np.load(out / "text_emb" / f"text_emb_{n}.npy") for n in range(3)])
    np.testing.assert_allclose(text_emb, text[order].numpy(), rtol=0, atol=1e-5)

    capsys.readouterr()
    assert search_main(["query", str(out), "--text", rset.texts[0], "-k", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["hits"]) == 3 and res["hits"][0]["key"] == index.keys[rows[0][0]]
    assert res["hits"][0]["score"] >= res["hits"][1]["score"] >= res["hits"][2]["score"]


def test_search_by_video_finds_the_video_itself(videos, classifier, tmp_path, capsys):
    out = tmp_path / "emb"
    embed_main(["--model", str(classifier), "--data", str(videos), "--out", str(out), *SETTING])
    assert search_main(["index", str(out)]) == 0
    capsys.readouterr()
    assert search_main(["query", str(out), "--video", str(videos / "c.avi"), "-k", "2", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert hits[0]["key"] == "c.avi" and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(SystemExit) as err:  # text search needs a stage-2 model
        search_main(["query", str(out), "--text", "a dog"])
    assert err.value.code == 2


@pytest.mark.slow
def test_two_processes_split_the_parts(videos, classifier, tmp_path, free_port):
    out = tmp_path / "emb"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), ACCELERATE_USE_CPU="1")
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(free_port), "-m", "fluxvit.embed", "--model", str(classifier), "--data",
           str(videos), "--out", str(out), "--part-size", "1", *SETTING]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 1, proc.stderr[-3000:]  # the two bad files
    ranks = [json.loads((out / "ranks" / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert sorted(ranks[0]["parts_written"] + ranks[1]["parts_written"]) == list(range(6))
    assert all(p % 2 == r["rank"] for r in ranks for p in r["parts_written"])
    _, meta = _rows(out)
    keys = [m["key"] for m in meta]
    assert sorted(keys) == ["a.mp4", "b.mkv", "c.avi", "dogs/d.mp4"] and len(set(keys)) == len(keys)


def test_ivf_index_beyond_the_threshold_and_rebuild_when_parts_change(tmp_path):
    from fluxvit.embed import _write_part
    from fluxvit.search import build_index

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cols = {"frames": 8, "resolution": 224, "budget": 512, "vector": "test", "model_sha256": "0"}
    for n in range(2):
        rows = [{"key": f"k{i}", "path": f"p{i}", "tokens": 512, "views_n": 1} for i in range(n * 1000, n * 1000 + 1000)]
        _write_part(tmp_path, n, rows, x[n * 1000:(n + 1) * 1000], None, [], cols)
    index = build_index(tmp_path, ivf_above=1000)
    assert index.kind.startswith("ivf44,") and len(index.keys) == 2000
    _, rows = index.search(x[::97], 1)
    assert [index.keys[r[0]] for r in rows] == [f"k{i}" for i in range(0, 2000, 97)]  # each row finds itself
    assert build_index(tmp_path, ivf_above=5000).kind == "flat"
    (tmp_path / "metadata" / "metadata_1.parquet").unlink()  # a part gone: the saved index is stale
    assert len(load_index(tmp_path).keys) == 1000


def test_csv_and_json_lists_with_a_missing_file(videos, stage2, tmp_path):
    (tmp_path / "list.csv").write_text(f"path,label\n{videos / 'a.mp4'},3\nmissing.mp4,1\n")
    out = tmp_path / "csv"
    assert embed_main(["--model", str(stage2), "--data", str(tmp_path / "list.csv"), "--out", str(out), *SETTING]) == 1
    _, meta = _rows(out)
    assert [(m["key"], m["label"]) for m in meta] == [(str(videos / "a.mp4"), "3")]
    failed = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]
    assert failed[0]["key"] == "missing.mp4" and failed[0]["reason"].startswith("cannot read")
    shutil.copy(videos / "b.mkv", tmp_path / "b.mkv")  # JSON paths are relative to the list's folder
    (tmp_path / "list.json").write_text(json.dumps([{"video": "b.mkv", "caption": ["a test pattern", "other"]}]))
    out = tmp_path / "json"
    assert embed_main(["--model", str(stage2), "--data", str(tmp_path / "list.json"), "--out", str(out), "--text",
                       *SETTING]) == 0
    _, meta = _rows(out)
    assert meta[0]["caption"] == "a test pattern" and "joint video-text" in meta[0]["vector"]
    text = np.load(out / "text_emb" / "text_emb_0.npy")
    np.testing.assert_allclose(text[0], load_encoder(str(stage2)).embed_text(["a test pattern"])[0].numpy(), atol=1e-5)


def test_setting_from_token_optimization_and_bf16(videos, classifier, tmp_path):
    rows = [{"budget": 32, "to": {"frames": 2, "resolution": 84}}, {"budget": 16, "to": {"frames": 4, "resolution": 56}}]
    (tmp_path / "tokenopt.json").write_text(json.dumps({"rows": rows}))
    base = ["--model", str(classifier), "--data", str(videos), "--setting", str(tmp_path / "tokenopt.json"),
            "--workers", "0", "--no-progress"]
    assert embed_main([*base, "--budget", "32", "--out", str(tmp_path / "a")]) == 1
    emb, meta = _rows(tmp_path / "a")
    assert {(m["frames"], m["resolution"], m["budget"], m["tokens"]) for m in meta} == {(2, 84, 32, 32)}
    with pytest.raises(SystemExit) as err:  # two budgets in the file: which one?
        embed_main([*base, "--out", str(tmp_path / "b")])
    assert err.value.code == 2
    assert embed_main([*base, "--budget", "32", "--dtype", "bfloat16", "--out", str(tmp_path / "c")]) == 1
    half, _ = _rows(tmp_path / "c")
    assert np.allclose(np.linalg.norm(half, axis=1), 1, atol=1e-5)
    assert (half * emb).sum(1).min() > 0.99  # bf16 vectors point where the fp32 ones do
