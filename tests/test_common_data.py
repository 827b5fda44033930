"""LoaderSource resumes by seeking, not by decoding every batch before the saved position."""
import pytest

from fluxvit.datasets import loader as loader_mod
from fluxvit.datasets.synth import make_synthetic_corpus
from fluxvit.stages.common.config import DataConfig
from fluxvit.stages.common.data import LoaderSource


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return make_synthetic_corpus(root, num_train=24, num_val=0, num_test=0, num_frames=4, size=32,
                                 samples_per_shard=6, workers=1)


def test_seek_to_epoch_boundary_is_exact_and_decodes_little(corpus, monkeypatch):
    cfg = DataConfig(source="shards", shards=corpus["splits"]["train"]["shards"], batch_size=4, grids=[[2, 28]],
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
