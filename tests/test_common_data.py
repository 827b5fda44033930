"""LoaderSource resumes by seeking, not by decoding every batch before the saved position."""
import pytest

from fluxvit import logs

from fluxvit.datasets import loader as loader_mod
from fluxvit.datasets.synth import make_synthetic_corpus
from fluxvit.datasets import DataConfig
from fluxvit.stages.common.data import LoaderSource


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return make_synthetic_corpus(root, num_train=24, num_val=0, num_test=0, num_frames=4, size=32,
                                 samples_per_shard=6, workers=1)


def test_seek_to_epoch_boundary_is_exact_and_decodes_little(corpus, monkeypatch):
    cfg = DataConfig(source="shards", shards=corpus["splits"]["train"]["shards"], batch_size=4, grid=[[2, 28]],
                     num_workers=0, flip=False, decoder="pyav")
    stream = LoaderSource(cfg, seed=3).batches(0)
    uninterrupted = [next(stream)["key"] for _ in range(14)]  # 6 batches per epoch: into epoch 2

    decoded = []
    real = loader_mod.process_sample
    monkeypatch.setattr(loader_mod, "process_sample", lambda s, *a, **k: decoded.append(s["__key__"]) or real(s, *a, **k))
    resumed = LoaderSource(cfg, seed=3).batches(12)
    assert next(resumed)["key"] == uninterrupted[12]
    assert len(decoded) == 4  # only the delivered batch was decoded, not the 12 before it
    assert next(resumed)["key"] == uninterrupted[13]


def test_set_overrides_reach_the_loader_and_the_saved_config(corpus, tmp_path):
    import json

    from fluxvit.stages.common.config import apply_overrides, save_config
    from fluxvit.stages.distill.config import smoke

    cfg = apply_overrides(smoke(), [
        "data.source=shards", f"data.shards={corpus['splits']['train']['shards']}", "data.resampled=true",
        "data.epoch_size=12", "data.shuffle_buffer=5", "data.crop=rrc", "data.decoder=pyav", "data.num_workers=0",
        "data.grid=[[2,28]]"])
    source = LoaderSource(cfg.data, seed=1)
    got = source.loader.cfg
    assert (got.resampled, got.epoch_size, got.shuffle_buffer, got.crop, got.decoder, got.num_workers) == \
        (True, 12, 5, "rrc", "pyav", 0)
    assert got.grid_pairs() == [(2, 28)] and len(source.loader) == 12 // cfg.data.batch_size
    saved = json.loads(save_config(cfg, tmp_path).read_text())["data"]
    for key, value in {"resampled": True, "epoch_size": 12, "shuffle_buffer": 5, "crop": "rrc", "decoder": "pyav",
                       "num_workers": 0}.items():
        assert saved[key] == value
    with pytest.raises(ValueError, match="data.crop"):
        LoaderSource(apply_overrides(smoke(), ["data.source=shards", "data.shards=x.tar", "data.crop=bogus"]).data)


def test_no_val_shards_skips_held_out_once_and_never_reads_training_shards(corpus, caplog, monkeypatch):

    cfg = DataConfig(source="shards", shards=corpus["splits"]["train"]["shards"], batch_size=4, grid=[[2, 28]],
                     num_workers=0, decoder="pyav")
    before = dict(vars(cfg))
    source = LoaderSource(cfg)
    logs._SEEN.clear()  # fluxvit.logs.warn_once: forget earlier warnings
    with caplog.at_level("WARNING", logger="fluxvit.train"):
        assert source.held_out() == [] and source.held_out() == []
    assert sum("held-out evaluation is skipped" in r.message for r in caplog.records) == 1
    assert vars(cfg) == before  # resolving shards never rewrites the user's config
    with_val = LoaderSource(DataConfig(**{**before, "val_shards": corpus["splits"]["train"]["shards"],
                                          "num_val_clips": 3, "decoder": "torchcodec", "crop": "rrc"}))
    import fluxvit.datasets as fd

    built = []
    real = fd.build_video_loader
    monkeypatch.setattr(fd, "build_video_loader", lambda c, **kw: built.append((c, kw)) or real(c, **kw))
    clips = with_val.held_out([(2, 28)])
    assert len(clips) == 3 and clips[0].shape == (1, 3, 2, 28, 28)
    assert built[0][0].decoder == "torchcodec" and not built[0][1]["train"]  # the section's decoder reaches evaluation


def test_eval_skips_are_not_training_skipped_samples(corpus, tmp_path):
    from data_fixtures import make_video, video_sample, write_tar

    from fluxvit.datasets import stats

    video = make_video(num_frames=4, width=32, height=24)
    write_tar(tmp_path / "val.tar", [video_sample("v0", video), video_sample("bad", b"junk" * 64)])
    cfg = DataConfig(source="shards", shards=corpus["splits"]["train"]["shards"], val_shards=str(tmp_path / "val.tar"),
                     batch_size=4, grid=[[2, 28]], num_workers=0, decoder="pyav", num_val_clips=4)
    source = LoaderSource(cfg)
    next(source.batches(0))
    before = stats().skipped
    assert len(source.held_out([(2, 28)])) == 1
    assert stats().skipped == before + 1  # the process-wide counter saw the evaluation skip ...
    assert source.skipped == 0  # ... the training metric skipped_samples did not


def test_finetune_reads_num_classes_from_shards(tmp_path):
    import json

    from data_fixtures import make_video, video_sample, write_tar

    from fluxvit.stages.finetune.data import shard_num_classes

    write_tar(tmp_path / "00000.tar", [video_sample("a", make_video(num_frames=4, width=32, height=24), label=2)])
    cfg = DataConfig(source="shards", shards=str(tmp_path / "00000.tar"))
    assert shard_num_classes(cfg) is None  # no classes.json: the preset's model.num_classes stands
    (tmp_path / "classes.json").write_text(json.dumps(["crawl", "run", "jump"]))
    assert shard_num_classes(cfg) == 3
    assert shard_num_classes(DataConfig(source="synthetic-motion")) is None
