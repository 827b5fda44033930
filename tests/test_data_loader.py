"""Streaming loader: batches, Flux grids, node/worker splits, epoch shuffles, resampling, skip counts, resume."""
import collections
import random
import tarfile
from pathlib import Path

import pytest
import torch

from data_fixtures import make_video, truncate_inside, video_sample, write_sizes, write_tar
from fluxvit.datasets import DataConfig, FluxGrid, loader_state, stats
from fluxvit.datasets import build_video_loader as _build_video_loader
from fluxvit.datasets import accounting
from fluxvit.datasets import loader as loader_mod

SHARDS, PER_SHARD = 6, 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """6 shards x 4 samples of a tiny 8-frame video, with sizes.json."""
    d = tmp_path_factory.mktemp("corpus")
    video = make_video(num_frames=8, width=32, height=24)
    for s in range(SHARDS):
        write_tar(d / f"{s:05d}.tar", [video_sample(f"s{s}k{i}", video, f"clip {s}-{i}", s) for i in range(PER_SHARD)])
    write_sizes(d, {f"{s:05d}.tar": PER_SHARD for s in range(SHARDS)})
    return str(d / f"{{00000..{SHARDS - 1:05d}}}.tar")


MODE = ("train", "seed", "eval_clips", "eval_crops")  # what a loader is given beside its data section


def cfg(shards, **kw):
    """(data section, loader mode) of a small test loader."""
    base = dict(shards=shards, num_frames=2, img_size=16, batch_size=2, num_workers=0, decoder="pyav",
                shuffle_buffer=3)
    base.update(kw)
    mode = {k: base.pop(k) for k in MODE if k in base}
    return DataConfig(**base), mode


def build_video_loader(made, **kw):
    config, mode = made
    return _build_video_loader(config, **mode, **kw)


def keys_of(loader):
    return [k for batch in loader for k in batch["key"]]


def test_batches_have_contract_fields(corpus):
    loader = build_video_loader(cfg(corpus, train=False, batch_size=5), rank=0, world_size=1)
    batches = list(loader)
    assert [len(b["key"]) for b in batches] == [5, 5, 5, 5, 4]  # evaluation keeps the last partial batch
    assert len(loader) == 5
    b = batches[0]
    assert b["video"].shape == (5, 3, 2, 16, 16) and b["video"].dtype == torch.float32
    assert b["caption"][0] == "clip 0-0" and b["label"].dtype == torch.long and b["label"][0] == 0
    assert len(set(keys_of(loader))) == SHARDS * PER_SHARD


def test_eval_multi_view(corpus):
    loader = build_video_loader(cfg(corpus, train=False, eval_clips=2, eval_crops=3, batch_size=4), rank=0,
                                world_size=1)
    assert next(iter(loader))["video"].shape == (4, 6, 3, 2, 16, 16)


def test_flux_grid_per_batch_and_per_sample(corpus):
    grid = FluxGrid(frames=[2, 4], resolutions=[14, 28], threshold=(0, 100))
    loader = build_video_loader(cfg(corpus, grid=grid, batch_size=3), rank=0, world_size=1)
    shapes = set()
    for batch in loader:
        assert isinstance(batch["video"], torch.Tensor)  # one (T, H) per batch: dense
        _, _, t, h, w = batch["video"].shape
        assert (t, h) in grid.valid_pairs() and h == w
        shapes.add((t, h))
    assert len(shapes) > 1
    packed = build_video_loader(cfg(corpus, grid=grid, per_sample_grid=True, batch_size=8), rank=0, world_size=1)
    batch = next(iter(packed))
    assert isinstance(batch["video"], list) and len(batch["video"]) == 8
    assert all((v.shape[1], v.shape[2]) in grid.valid_pairs() for v in batch["video"])
    assert DataConfig(shards=corpus, grid="finetune").flux_grid() == FluxGrid.preset("finetune")
    assert DataConfig(grid=[[2, 14], [4, 28]]).grid_pairs() == [(2, 14), (4, 28)]
    with pytest.raises(ValueError, match="data.grid"):
        DataConfig(grid="nope")


def test_node_then_worker_split_has_no_duplicates(corpus):
    dataset = build_video_loader(cfg(corpus), rank=0, world_size=1).dataset
    streams = []
    for rank in range(2):
        dataset.rank, dataset.world_size = rank, 2
        for worker in range(3):
            streams.append(list(dataset.stream_shards(worker, 3)))
    flat = [u for s in streams for u in s]
    assert sorted(flat) == sorted(dataset.urls) and len(set(flat)) == len(flat)
    # and through real DataLoader worker processes on two ranks
    seen = []
    for rank in range(2):
        seen += keys_of(build_video_loader(cfg(corpus, num_workers=2, batch_size=1, train=False), rank=rank,
                                           world_size=2))
    assert len(seen) == len(set(seen)) == SHARDS * PER_SHARD


def test_epoch_shuffles_are_deterministic(corpus):
    loader = build_video_loader(cfg(corpus), rank=0, world_size=1)
    loader.set_epoch(0)
    a = keys_of(loader)
    loader.set_epoch(0)
    assert keys_of(loader) == a
    loader.set_epoch(1)
    b = keys_of(loader)
    assert b != a and sorted(b) == sorted(a) and len(a) == SHARDS * PER_SHARD


def test_resampled_epoch_length_and_weights(corpus, tmp_path):
    loader = build_video_loader(cfg(corpus, resampled=True, epoch_size=10), rank=0, world_size=1)
    assert len(loader) == 5 and len(list(loader)) == 5
    assert loader.num_samples == 10
    video = make_video(num_frames=4, width=32, height=24)
    write_tar(tmp_path / "b.tar", [video_sample("b0", video)])
    mixed = build_video_loader(cfg(f"{corpus}::0.9;{tmp_path}/b.tar::0.1", resampled=True, epoch_size=8), rank=0,
                               world_size=1)
    stream = mixed.dataset.resampled_urls(0)
    draws = collections.Counter("b.tar" in next(stream) for _ in range(2000))
    assert 0.05 < draws[True] / 2000 < 0.15
    with pytest.raises(ValueError):
        build_video_loader(cfg(f"{tmp_path}/b.tar", resampled=True), rank=0, world_size=1)


def test_bad_samples_are_counted_and_skipped(tmp_path):
    video = make_video(num_frames=8, width=32, height=24)
    good = [video_sample(f"g{i}", video) for i in range(4)]
    caption_only = video_sample("caponly", b"")
    del caption_only["mp4"]
    write_tar(tmp_path / "00000.tar", good[:2] + [video_sample("corrupt", b"junk" * 100), video_sample("zero", b"")])
    write_tar(tmp_path / "00001.tar", good[2:] + [caption_only])
    truncate_inside(write_tar(tmp_path / "00002.tar", [video_sample(f"t{i}", video) for i in range(2)]), "t1.mp4")
    before = stats().skipped
    loader = build_video_loader(cfg(str(tmp_path / "{00000..00002}.tar"), num_workers=2, batch_size=1,
                                    decoder="decord"), rank=0, world_size=1)
    keys = keys_of(loader)
    assert sorted(keys) == ["g0", "g1", "g2", "g3", "t0"]
    # 3 bad samples + the truncated shard (its torn sample t1 is lost): issue 18 counts broken shards as skips
    assert loader.stats.skipped == 4 and loader.stats.shard_errors == 1
    assert loader.stats.reasons == {"decode error": 1, "empty video": 1, "no video": 1, "truncated shard": 1}
    assert stats().skipped - before == 4  # counts crossed the worker processes
    assert loader.stats.as_dict()["data/skipped"] == 4


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_shards_anywhere_count_as_skips(tmp_path, num_workers):
    """A wholly garbage shard, one cut at a header boundary and an empty one, in the middle of the list: each adds
    to the skip figures (``skipped`` is the training loop's ``skipped_samples``), the good shards are read."""
    video = make_video(num_frames=4, width=32, height=24)
    write_tar(tmp_path / "00000.tar", [video_sample("a0", video)])
    (tmp_path / "00001.tar").write_bytes(random.Random(0).randbytes(6000))  # garbage from the first byte
    full = write_tar(tmp_path / "00002.tar", [video_sample("c0", video), video_sample("c1", video)])
    data = full.read_bytes()
    full.write_bytes(data[:700])  # cut inside the first member: no complete sample
    (tmp_path / "00003.tar").write_bytes(b"")
    write_tar(tmp_path / "00004.tar", [video_sample("e0", video)])
    loader = build_video_loader(cfg(str(tmp_path / "{00000..00004}.tar"), num_workers=num_workers, batch_size=1,
                                    decoder="pyav", train=False), rank=0, world_size=1)
    assert sorted(keys_of(loader)) == ["a0", "e0"]
    assert loader.stats.shard_errors == 3 and loader.stats.skipped == 3
    assert loader.stats.as_dict()["data/skipped"] == 3


@pytest.mark.parametrize("num_workers,buffer", [(2, 0), (2, 3), (0, 4)])
def test_resume_bound(corpus, num_workers, buffer, monkeypatch):
    """Stop after k batches, restore from state_dict: repeats and misses stay within one shuffle buffer per stream."""
    def make():
        return build_video_loader(cfg(corpus, num_workers=num_workers, shuffle_buffer=buffer, batch_size=2),
                                  rank=0, world_size=1)

    full = make()
    full.set_epoch(3)
    reference = keys_of(full)
    streams = max(1, num_workers)
    for k in (1, 3, 5):
        first = make()
        first.set_epoch(3)
        before = []
        for i, batch in enumerate(first):
            before += batch["key"]
            if i + 1 == k:
                break
        state = first.state_dict()
        assert state == loader_state(3, 2 * k)
        resumed = make()
        resumed.load_state_dict(state)
        after = keys_of(resumed)
        repeats = len(set(before) & set(after))
        missed = len(set(reference) - set(before) - set(after))
        assert repeats <= buffer * streams and missed <= buffer * streams, (k, repeats, missed)
        if buffer == 0:
            assert before + after == reference[:len(before) + len(after)] or sorted(before + after) == sorted(reference)
            assert repeats == missed == 0


def test_resume_skips_whole_shards_unopened(corpus, monkeypatch):
    import importlib

    gopen_module = importlib.import_module("webdataset.gopen")  # webdataset's tar streaming opens shards here
    opened = []
    real = gopen_module.gopen
    monkeypatch.setattr(gopen_module, "gopen", lambda url, *a, **k: opened.append(url) or real(url, *a, **k))
    loader = build_video_loader(cfg(corpus, shuffle_buffer=0, train=False, batch_size=2), rank=0, world_size=1)
    loader.load_state_dict(loader_state(0, 10))  # 2.5 shards consumed
    keys = keys_of(loader)
    assert len(opened) == SHARDS - 2  # shards 0 and 1 skipped without opening
    assert keys[0] == "s2k2" and len(keys) == SHARDS * PER_SHARD - 10


def test_pipe_shards_and_per_source_noflip(corpus):
    first = corpus.replace("{00000..00005}", "00000")
    loader = build_video_loader(cfg(f"pipe:cat {first}", train=False), rank=0, world_size=1)
    assert keys_of(loader) == [f"s0k{i}" for i in range(PER_SHARD)]
    rest = corpus.replace("{00000..00005}", "{00001..00005}")
    dataset = build_video_loader(cfg(f"{first}::noflip;{rest}"), rank=0, world_size=1).dataset
    assert dataset._flip_of[first] is False and dataset._flip_of[corpus.replace("{00000..00005}", "00001")] is True


def test_flip_disallowed_never_flips():
    from fluxvit.datasets import VideoTransform
    clip = torch.zeros(2, 24, 32, 3, dtype=torch.uint8)
    clip[:, :, :16] = 255
    flips = 0
    for seed in range(20):
        no = VideoTransform(flip=True)(clip, 16, random.Random(seed), flip_allowed=False)
        ref = VideoTransform(flip=False)(clip, 16, random.Random(seed))
        assert torch.equal(no, ref)
        flips += not torch.equal(VideoTransform(flip=True)(clip, 16, random.Random(seed)), ref)
    assert flips > 0


def test_epoch_mode_honours_source_weights(tmp_path):
    """Without resampling a source of weight w reads round(w * its shards) shards per epoch."""
    video = make_video(num_frames=4, width=32, height=24)
    for name in ("a0", "b0", "b1"):
        write_tar(tmp_path / f"{name}.tar", [video_sample(f"{name}k{i}", video) for i in range(2)])
    write_sizes(tmp_path, {f"{n}.tar": 2 for n in ("a0", "b0", "b1")})
    spec = f"{tmp_path}/a0.tar::2;{tmp_path}/b{{0,1}}.tar::0.5"
    loader = build_video_loader(cfg(spec, batch_size=1, shuffle_buffer=0), rank=0, world_size=1)
    assert loader.num_samples == 6  # 2 x 2 samples of a, 0.5 x 4 samples of b
    seen_b = set()
    for epoch in range(4):
        loader.set_epoch(epoch)
        keys = keys_of(loader)
        assert len(keys) == 6
        assert collections.Counter(k[0] for k in keys) == {"a": 4, "b": 2}
        assert len({k[:2] for k in keys if k[0] == "b"}) == 1  # one of b's two shards per epoch
        seen_b |= {k[:2] for k in keys if k[0] == "b"}
    assert seen_b == {"b0", "b1"}  # a different draw across epochs


def test_short_streams_take_the_same_steps_and_warn(tmp_path, caplog):
    """Shards of 5 / 5 / 2 samples, batch 4, 2 ranks: each rank takes ceil(12 / 8) = 2 batches every epoch."""
    video = make_video(num_frames=4, width=32, height=24)
    sizes = {"00000.tar": 5, "00001.tar": 5, "00002.tar": 2}
    for name, n in sizes.items():
        write_tar(tmp_path / name, [video_sample(f"{name[:5]}k{i}", video) for i in range(n)])
    write_sizes(tmp_path, sizes)
    spec = str(tmp_path / "{00000..00002}.tar")
    short_seen = False
    with caplog.at_level("WARNING", logger="fluxvit.datasets.loader"):
        for rank in range(2):
            loader = build_video_loader(cfg(spec, batch_size=4, num_workers=0), rank=rank, world_size=2)
            for epoch in range(3):
                loader.set_epoch(epoch)
                short_seen |= sum(sizes[u.rsplit("/", 1)[1]] for u in loader.dataset.stream_shards(0, 1)) < 4
                assert [len(b["key"]) for b in loader] == [4, 4]
    assert short_seen  # some epoch gave a rank less than one batch of samples
    assert any("re-read their shards" in r.message for r in caplog.records)


def test_skip_warnings_rate_limited_across_passes(tmp_path, monkeypatch, caplog):
    video = make_video(num_frames=4, width=32, height=24)
    write_tar(tmp_path / "00000.tar", [video_sample("good", video)] + [video_sample(f"bad{i}", b"junk" * 50)
                                                                     for i in range(9)])
    write_sizes(tmp_path, {"00000.tar": 10})
    monkeypatch.setattr(loader_mod, "skip_log", accounting._RateLimitedLog())
    loader = build_video_loader(cfg(str(tmp_path / "00000.tar"), batch_size=2, decoder="pyav"), rank=0,
                                world_size=1)
    with caplog.at_level("WARNING", logger="fluxvit.datasets.loader"):
        for epoch in range(3):
            loader.set_epoch(epoch)
            assert len(keys_of(loader)) == 10  # 5 batches per epoch, the one good clip re-read pass after pass
    lines = [r for r in caplog.records if r.message.startswith("skipped")]
    assert loader.stats.skipped >= 27 * 3 and len(lines) == 5


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_restores_the_sampling_state_exactly(corpus, num_workers):
    """Without a shuffle buffer a resumed loader delivers the uninterrupted run's batches value for value: the same
    Flux draw, frame offsets and crops (their random state is a function of the batch's position, not of the epoch
    start), for every worker."""
    grid = FluxGrid.from_pairs([(2, 16), (4, 24), (3, 16)])

    def make():
        return build_video_loader(cfg(corpus, num_workers=num_workers, shuffle_buffer=0, batch_size=2, grid=grid,
                                      crop="rrc"), rank=0, world_size=1)

    full = make()
    full.set_epoch(1)
    reference = [b["video"].clone() for b in full]
    assert len({tuple(v.shape) for v in reference}) > 1  # the grid draw varies between batches
    for k in (1, 3):
        resumed = make()
        resumed.load_state_dict(loader_state(1, 2 * k))
        after = [b["video"] for b in resumed]
        assert len(after) == len(reference) - k
        for want, got in zip(reference[k:], after):
            assert want.shape == got.shape and torch.equal(want, got)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_torn_shard_counts_every_sample_it_lost_when_sizes_are_known(tmp_path, num_workers):
    """A shard torn after its first sample (garbage from there on) and one cut between samples both end without a
    tar error; with sizes.json every lost sample is a skip, and the reason says what happened."""
    video = make_video(num_frames=4, width=32, height=24)
    write_tar(tmp_path / "00000.tar", [video_sample(f"a{i}", video) for i in range(2)])
    torn = write_tar(tmp_path / "00001.tar", [video_sample(f"b{i}", video) for i in range(4)])
    with tarfile.open(torn) as tar:
        second = tar.getmember("b1.mp4").offset  # the header of the second sample
    data = bytearray(torn.read_bytes())
    data[second:] = random.Random(1).randbytes(len(data) - second)
    torn.write_bytes(bytes(data))
    cut = write_tar(tmp_path / "00002.tar", [video_sample(f"c{i}", video) for i in range(3)])
    with tarfile.open(cut) as tar:
        third = tar.getmember("c2.mp4").offset
    cut.write_bytes(cut.read_bytes()[:third])  # ends cleanly between samples: tarfile sees no error
    write_sizes(tmp_path, {"00000.tar": 2, "00001.tar": 4, "00002.tar": 3})
    loader = build_video_loader(cfg(str(tmp_path / "{00000..00002}.tar"), num_workers=num_workers, batch_size=1,
                                    decoder="pyav", train=False), rank=0, world_size=1)
    assert sorted(keys_of(loader)) == ["a0", "a1", "b0", "c0", "c1"]
    assert loader.stats.shard_errors == 2
    assert loader.stats.skipped == 3 + 1  # b1..b3 and c2
    assert loader.stats.reasons == {"truncated shard": 4}
    reasons = dict(loader.stats.recent)
    assert reasons[str(tmp_path / "00002.tar")] == "truncated shard: 2 of 3 samples"


def test_shard_error_reasons_say_what_the_file_is(tmp_path):
    from fluxvit.datasets.shards import ShardReader

    video = make_video(num_frames=4, width=32, height=24)
    (tmp_path / "garbage.tar").write_bytes(random.Random(0).randbytes(6000))
    (tmp_path / "empty.tar").write_bytes(b"")
    truncate_inside(write_tar(tmp_path / "cut.tar", [video_sample("t0", video)]), "t0.mp4", into=100)
    got = {}
    reader = ShardReader(lambda url, reason: got.setdefault(Path(url).name, reason))
    assert list(reader([str(tmp_path / n) for n in ("garbage.tar", "empty.tar", "cut.tar")])) == []
    assert got == {"garbage.tar": "not a tar archive", "empty.tar": "empty shard", "cut.tar": "truncated shard"}
