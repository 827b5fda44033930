"""``data.motion_curriculum``: the synthetic sources' start-position curriculum (the claims' start recipe)."""
import pytest
import torch

from fluxvit.datasets import DataConfig
from fluxvit.stages.common.data import SyntheticClips, corpus_clip, motion_start_spread


def _centroid(frame: torch.Tensor, background: torch.Tensor) -> tuple[float, float]:
    """Centre of mass (row, col) of the pixels that differ from the background."""
    w = (frame.float() - background.float()).abs().sum(-1)
    rows, cols = torch.meshgrid(torch.arange(w.shape[0]), torch.arange(w.shape[1]), indexing="ij")
    return (w * rows).sum().item() / w.sum().item(), (w * cols).sum().item() / w.sum().item()


def test_schedule_holds_at_zero_then_ramps_linearly_to_one():
    assert motion_start_spread((), 0) == motion_start_spread([], 10 ** 6) == 1.0
    got = [motion_start_spread([2, 4], n) for n in range(8)]
    assert got == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert motion_start_spread([0, 1], 0) == 1.0


@pytest.mark.parametrize("index", [1, 5, 7, 11])  # quick clips: the shape never covers a pixel for long
def test_spread_zero_starts_the_shape_at_the_centre_and_keeps_label_and_look(index):
    full, label, caption = corpus_clip("train", index)
    centred, label0, caption0 = corpus_clip("train", index, start_spread=0.0)
    assert (label0, caption0) == (label, caption)
    background = full.median(dim=0).values  # the shape moves on: the per-pixel median is the background
    assert torch.equal(centred.median(dim=0).values, background)
    r, c = _centroid(centred[0], background)
    assert abs(r - 64) < 4 and abs(c - 64) < 4, (r, c)  # a triangle's centroid is off its centre
    r_full, c_full = _centroid(full[0], background)
    assert abs(r_full - 64) + abs(c_full - 64) > 15  # these clips start elsewhere in the corpus
    assert torch.equal(corpus_clip("train", index, start_spread=1.0)[0], full)


def test_source_applies_the_curriculum_by_batch_index_only_to_training_clips():
    kw = dict(source="synthetic-motion", batch_size=3, grid=[[4, 28]], num_clips=50, num_val_clips=2, flip=False)
    plain, cur = SyntheticClips(DataConfig(**kw)), SyntheticClips(DataConfig(**kw, motion_curriculum=[1, 2]))
    b0, c0 = plain.batch(0), cur.batch(0)
    assert torch.equal(b0["label"], c0["label"]) and b0["key"] == c0["key"]
    assert not torch.equal(b0["video"], c0["video"])  # batch 0: every shape starts at the centre
    assert torch.equal(plain.batch(2)["video"], cur.batch(2)["video"])  # ramp over: the corpus as generated
    assert all(torch.equal(a, b) for a, b in zip(plain.held_out(), cur.held_out()))


@pytest.mark.parametrize("value, words", [([300], "hold, ramp"), ([5, 0], "ramp >= 1"), ([-1, 3], "hold >= 0"),
                                          ([1.5, 3], "hold, ramp")])
def test_bad_curriculum_is_refused_in_one_line(value, words):
    with pytest.raises(ValueError, match="data.motion_curriculum") as err:
        DataConfig(source="synthetic-motion", motion_curriculum=value)
    assert "\n" not in str(err.value) and "[hold, ramp]" in str(err.value)


def test_curriculum_on_a_shard_source_is_refused():
    with pytest.raises(ValueError, match="in-memory synthetic sources"):
        DataConfig(source="shards", shards="x.tar", motion_curriculum=[1, 2])
