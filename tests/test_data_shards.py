"""Shard specs, tar reading (truncated tars), the shard writer, and the make-shards / check CLIs."""
import json
import logging
import random
import shutil
import subprocess
import sys
import tarfile

import pytest

from data_fixtures import make_video, truncate_inside, video_sample, write_tar
from fluxvit.datasets import ShardWriter, parse_shard_spec
from fluxvit.datasets.cli import main
from fluxvit.datasets.shards import TruncatedShard, iter_tar_samples, shard_classes, shard_sizes


@pytest.fixture(scope="module")
def video():
    return make_video(num_frames=12)


def test_parse_shard_spec():
    sources = parse_shard_spec("a/{000..009}.tar::0.7; b/{x,y}.tar::0.3::noflip;c.tar")
    assert [len(s.urls) for s in sources] == [10, 2, 1]
    assert sources[0].urls[0] == "a/000.tar" and sources[0].urls[-1] == "a/009.tar"
    assert [s.weight for s in sources] == [0.7, 0.3, 1.0] and [s.flip for s in sources] == [True, False, True]
    assert parse_shard_spec("pipe:cat x/{0..1}.tar")[0].urls == ("pipe:cat x/0.tar", "pipe:cat x/1.tar")
    for bad in ("", " ; ", "a.tar::heavy", "a.tar::-1"):
        with pytest.raises(ValueError):
            parse_shard_spec(bad)


def test_tar_reading_and_truncation(tmp_path, video):
    samples = [video_sample(f"{i:03d}", video, f"caption {i}") for i in range(4)]
    path = write_tar(tmp_path / "a.tar", samples)
    with open(path, "rb") as f:
        got = list(iter_tar_samples(f, str(path)))
    assert [s["__key__"] for s in got] == ["000", "001", "002", "003"]
    assert got[1]["txt"] == b"caption 1" and got[1]["mp4"] == video and json.loads(got[1]["json"])["key"] == "001"
    with open(path, "rb") as f:
        assert [s["__key__"] for s in iter_tar_samples(f, skip=3)] == ["003"]
    cut = truncate_inside(write_tar(tmp_path / "cut.tar", samples), "001.mp4")
    keys = []
    with open(cut, "rb") as f, pytest.raises(TruncatedShard):
        for s in iter_tar_samples(f, str(cut)):
            keys.append(s["__key__"])
    assert keys == ["000"]  # complete samples before the cut; the incomplete one is dropped
    (tmp_path / "zero.tar").write_bytes(b"")
    with open(tmp_path / "zero.tar", "rb") as f, pytest.raises(TruncatedShard):
        list(iter_tar_samples(f))


def test_shard_writer_sizes_and_determinism(tmp_path, video):
    def write(out):
        with ShardWriter(out, max_count=3) as w:
            for i in range(7):
                w.write({"__key__": f"k{i}", "mp4": video, "txt": "c", "json": {"key": f"k{i}"}})
        return w.sizes
    sizes = write(tmp_path / "a")
    assert sizes == {"00000.tar": 3, "00001.tar": 3, "00002.tar": 1}
    write(tmp_path / "b")
    assert (tmp_path / "a/00001.tar").read_bytes() == (tmp_path / "b/00001.tar").read_bytes()
    urls = [str(tmp_path / "a" / n) for n in sizes]
    assert shard_sizes(urls) == dict(zip(urls, sizes.values()))
    (tmp_path / "a/sizes.json").unlink()  # falls back to the video2dataset stats files
    assert shard_sizes(urls) == dict(zip(urls, sizes.values()))
    with tarfile.open(tmp_path / "a/00000.tar") as tar:
        assert tar.getnames()[:3] == ["k0.json", "k0.mp4", "k0.txt"]


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory, video):
    """Good, corrupt, zero-byte and caption-only samples, plus a truncated tar."""
    d = tmp_path_factory.mktemp("mixed")
    good = [video_sample(f"g{i}", video) for i in range(3)]
    corrupt = video_sample("corrupt", b"\x00\x01not an mp4" * 40)
    zero = video_sample("zero", b"")
    caption_only = video_sample("caponly", b"")
    del caption_only["mp4"]
    write_tar(d / "00000.tar", good)
    write_tar(d / "00001.tar", [corrupt, zero, caption_only, video_sample("g3", video)])
    truncate_inside(write_tar(d / "00002.tar", [video_sample(f"t{i}", video) for i in range(3)]), "t2.mp4")
    return d


def test_check_cli_exit_codes_and_json(mixed_shards, capsys):
    assert main(["check", str(mixed_shards / "00000.tar"), "--json", "--num-frames", "4"]) == 0
    ok = json.loads(capsys.readouterr().out)
    assert ok["total"] == ok["ok"] == 3 and ok["skipped"] == 0 and ok["skipped_keys"] == []

    assert main(["check", str(mixed_shards / "{00000..00002}.tar"), "--json", "--decoder", "pyav"]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] == 6  # g0-g3, t0 and t1 (before the cut)
    truncated = str(mixed_shards / "00002.tar")
    assert set(rep["skipped_keys"]) == {"corrupt", "zero", "caponly", truncated}
    assert rep["total"] == rep["ok"] + rep["skipped"] == 10
    assert rep["reasons"]["zero"] == "empty video" and rep["reasons"]["caponly"] == "no video"
    assert rep["reasons"]["corrupt"].startswith("decode error") and rep["reasons"][truncated] == "truncated shard"

    assert main(["check", str(mixed_shards / "00001.tar")]) == 1
    assert "skipped corrupt" in capsys.readouterr().out
    assert main(["check"]) == 2
    assert main(["check", "x.tar::bogus"]) == 2
    assert main(["check", str(mixed_shards / "missing.tar"), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["shard_errors"][0]["reason"].startswith("cannot open")


def test_check_console_module_runs(mixed_shards):
    proc = subprocess.run([sys.executable, "-m", "fluxvit.datasets.cli", "check", str(mixed_shards / "00001.tar"),
                           "--json"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["skipped"] == 3
    assert "not an mp4" not in proc.stderr  # decoder noise stays out of the terminal


def _keyframes_and_size(data: bytes):
    import io

    import av

    with av.open(io.BytesIO(data)) as c:
        s = c.streams.video[0]
        keys = [p.is_keyframe for p in c.demux(s) if p.size]
        return sum(keys), len(keys), (s.codec_context.width, s.codec_context.height), float(s.average_rate)


def test_make_shards_from_csv_json_and_folder(tmp_path, video, capsys):
    vids = tmp_path / "videos"
    for cls in ("jump", "run"):
        (vids / cls).mkdir(parents=True)
        for i in range(2):
            (vids / cls / f"{i}.mp4").write_bytes(video)
    (tmp_path / "list.csv").write_text("path,label\n" + "\n".join(
        f"{c}/{i}.mp4,{c}" for c in ("jump", "run") for i in range(2)) + "\nmissing.mp4,run\n")
    # a missing input is reported as failed (exit 1), the others are stored
    assert main(["make-shards", "--csv", str(tmp_path / "list.csv"), "--root", str(vids), "--out",
                 str(tmp_path / "csv"), "--samples-per-shard", "3", "--copy", "--no-progress"]) == 1
    assert "failed" in capsys.readouterr().out
    assert json.loads((tmp_path / "csv/sizes.json").read_text()) == {"00000.tar": 3, "00001.tar": 1}
    assert json.loads((tmp_path / "csv/classes.json").read_text()) == ["jump", "run"]
    with open(tmp_path / "csv/00001.tar", "rb") as f:
        (last,) = list(iter_tar_samples(f))
    assert last["cls"] == b"1" and last["mp4"] == video  # --copy stores the bytes as they are

    items = [{"video": str(vids / "run/0.mp4"), "caption": ["a person runs", "running"]},
             {"video": str(vids / "jump/1.mp4"), "caption": "a person jumps"}]
    (tmp_path / "list.json").write_text(json.dumps(items))
    assert main(["make-shards", "--json", str(tmp_path / "list.json"), "--out", str(tmp_path / "js"),
                 "--short-side", "32", "--keyframe-interval", "4", "--max-fps", "6", "--no-progress"]) == 0
    with open(tmp_path / "js/00000.tar", "rb") as f:
        got = list(iter_tar_samples(f))
    assert got[0]["txt"] == b"a person runs" and json.loads(got[0]["json"])["caption"] == ["a person runs", "running"]
    keys, frames, size, fps = _keyframes_and_size(got[0]["mp4"])
    src_keys, src_frames, _, _ = _keyframes_and_size(video)
    assert size == (42, 32) and fps == 6 and frames == src_frames // 2  # 64x48 at 12 fps -> 42x32 at 6 fps
    assert keys == -(-frames // 4) and src_keys == 1  # a keyframe every 4 frames (the source: one)

    assert main(["make-shards", "--folder", str(vids), "--out", str(tmp_path / "dir"), "--no-progress"]) == 0
    assert "wrote 4 samples" in capsys.readouterr().out
    assert main(["check", str(tmp_path / "js/00000.tar")]) == 0
    assert main(["make-shards", "--out", str(tmp_path / "x")]) == 2


@pytest.mark.parametrize("copy", [True, False])
def test_make_shards_verifies_every_input(tmp_path, video, copy, capsys):
    vids = tmp_path / "v"
    vids.mkdir()
    (vids / "good.mp4").write_bytes(video)
    (vids / "zero.mp4").write_bytes(b"")
    (vids / "random.mp4").write_bytes(bytes(random.Random(0).getrandbits(8) for _ in range(4000)))
    (vids / "cut.mp4").write_bytes(video[: len(video) // 3])
    args = ["make-shards", "--folder", str(vids), "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(args + (["--copy"] if copy else [])) == 1
    out = capsys.readouterr().out
    for name in ("zero.mp4", "random.mp4"):
        assert f"failed {vids / name}" in out
    with open(tmp_path / "o/00000.tar", "rb") as f:
        stored = [json.loads(s["json"])["url"] for s in iter_tar_samples(f)]
    assert str(vids / "good.mp4") in stored and str(vids / "zero.mp4") not in stored
    assert str(vids / "random.mp4") not in stored
    assert main(["check", str(tmp_path / "o/00000.tar")]) == 0  # whatever was stored decodes


def test_make_shards_resumes_and_parallel_workers_agree(tmp_path, video, monkeypatch):
    from fluxvit.datasets import prepare

    vids = tmp_path / "v"
    vids.mkdir()
    for i in range(6):
        (vids / f"{i}.mp4").write_bytes(video)
    items = [{"video": str(vids / f"{i}.mp4"), "label": i % 2} for i in range(6)]
    first = prepare.make_shards(items, tmp_path / "a", 2, progress=False, workers=2)
    assert first["written"] == 6 and first["shards"] == {"00000.tar": 2, "00001.tar": 2, "00002.tar": 2}
    reference = (tmp_path / "a/00001.tar").read_bytes()
    # a killed run: shard 1 never completed (its tar half-written, no stats file)
    (tmp_path / "a/00001_stats.json").unlink()
    (tmp_path / "a/00001.tar").unlink()
    (tmp_path / "a/00001.tar.tmp").write_bytes(b"partial")
    calls = []
    real = prepare.prepare_sample
    monkeypatch.setattr(prepare, "prepare_sample", lambda job: calls.append(job[0]) or real(job))
    again = prepare.make_shards(items, tmp_path / "a", 2, progress=False, workers=1)
    assert sorted(calls) == [2, 3] and again["skipped_shards"] == 2 and again["written"] == 2
    assert (tmp_path / "a/00001.tar").read_bytes() == reference  # the same shard as the parallel run wrote
    assert json.loads((tmp_path / "a/sizes.json").read_text()) == first["shards"]
    with pytest.raises(ValueError, match="other settings"):
        prepare.make_shards(items, tmp_path / "a", 3, progress=False)


def test_shared_label_map_across_splits(tmp_path, video, capsys):
    vids = tmp_path / "v"
    vids.mkdir()
    for name in ("a", "b", "c"):
        (vids / f"{name}.mp4").write_bytes(video)
    (tmp_path / "classes.txt").write_text("crawl\nrun\njump\n")
    (tmp_path / "train.csv").write_text(f"{vids}/a.mp4,jump\n{vids}/b.mp4,run\n")
    (tmp_path / "val.csv").write_text(f"{vids}/c.mp4,crawl\n")

    def labels(split, *extra):
        assert main(["make-shards", "--csv", str(tmp_path / f"{split}.csv"), "--out", str(tmp_path / split),
                     "--copy", "--no-progress", *extra]) == 0
        with open(tmp_path / split / "00000.tar", "rb") as f:
            return [int(s["cls"]) for s in iter_tar_samples(f)]

    assert labels("val") == [0] and labels("train") == [0, 1]  # per-list maps: "crawl" and "jump" both 0
    for split in ("train", "val"):
        shutil.rmtree(tmp_path / split)
    assert labels("train", "--classes", str(tmp_path / "classes.txt")) == [2, 1]
    assert labels("val", "--classes", str(tmp_path / "classes.txt")) == [0]
    for split in ("train", "val"):
        assert json.loads((tmp_path / split / "classes.json").read_text()) == ["crawl", "run", "jump"]
    assert shard_classes(f"{tmp_path}/train/00000.tar;{tmp_path}/val/00000.tar") == ["crawl", "run", "jump"]
    (tmp_path / "bad.csv").write_text(f"{vids}/a.mp4,swim\n")
    assert main(["make-shards", "--csv", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "bad"),
                 "--classes", str(tmp_path / "classes.txt")]) == 2
    assert "not in the classes file" in capsys.readouterr().err


def test_csv_keeps_every_column_it_understands(tmp_path, video, caplog):
    from fluxvit.datasets.cli import read_csv_list

    (tmp_path / "a.csv").write_text("path,label,caption\nx.mp4,run,a person runs\ny.mp4,jump,\n")
    assert list(read_csv_list(tmp_path / "a.csv")) == [
        {"video": "x.mp4", "label": "run", "caption": "a person runs"},
        {"video": "y.mp4", "label": "jump", "caption": None}]
    (tmp_path / "b.csv").write_text("x.mp4,run\n")  # Kinetics style, no header
    assert list(read_csv_list(tmp_path / "b.csv")) == [{"video": "x.mp4", "label": "run"}]
    # WebVid: videoid (no extension on disk name), contentUrl, duration, page_dir, name (the caption)
    (tmp_path / "webvid.csv").write_text('videoid,contentUrl,duration,page_dir,name\n'
                                         '1066,https://example.org/1066.mp4,PT00H00M10S,001,"Dog, running"\n')
    with caplog.at_level(logging.WARNING, logger="fluxvit.datasets.cli"):
        items = list(read_csv_list(tmp_path / "webvid.csv"))
    assert items == [{"video": "1066", "label": None, "caption": "Dog, running"}]
    assert caplog.text.count("columns not used: contentUrl, duration, page_dir") == 1
    (tmp_path / "bad.csv").write_text("caption,label\nhello,1\n")
    with pytest.raises(ValueError, match="no path column"):
        list(read_csv_list(tmp_path / "bad.csv"))
    # the WebVid id resolves to the downloaded file, the caption is stored
    (tmp_path / "1066.mp4").write_bytes(video)
    assert main(["make-shards", "--csv", str(tmp_path / "webvid.csv"), "--root", str(tmp_path), "--copy",
                 "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    with open(tmp_path / "o/00000.tar", "rb") as f:
        (sample,) = list(iter_tar_samples(f))
    assert sample["txt"] == b"Dog, running" and sample["mp4"] == video


def test_rerun_picks_up_a_fixed_input(tmp_path, video, capsys, monkeypatch):
    from fluxvit.datasets import prepare

    vids = tmp_path / "v"
    vids.mkdir()
    for name in ("a", "b", "c"):
        (vids / f"{name}.mp4").write_bytes(video)
    (vids / "b.mp4").write_bytes(b"\x00not a video" * 100)
    args = ["make-shards", "--folder", str(vids), "--out", str(tmp_path / "o"), "--copy", "--no-progress",
            "--samples-per-shard", "2"]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "still missing 1 of 3" in out and f"failed {vids / 'b.mp4'}" in out
    (vids / "b.mp4").write_bytes(video)  # fixed
    calls = []
    real = prepare.prepare_sample
    monkeypatch.setattr(prepare, "prepare_sample", lambda job: calls.append(job[0]) or real(job))
    assert main(args) == 0
    out = capsys.readouterr().out
    assert calls == [1] and "1 inputs that failed before retried" in out and "still missing" not in out
    with open(tmp_path / "o/00000.tar", "rb") as f:
        stored = [json.loads(s["json"])["url"] for s in iter_tar_samples(f)]
    assert stored == [str(vids / "a.mp4"), str(vids / "b.mp4")]
    assert json.loads((tmp_path / "o/sizes.json").read_text()) == {"00000.tar": 2, "00001.tar": 1}
    assert main(args) == 0 and "wrote 0 samples" in capsys.readouterr().out  # nothing left to do
