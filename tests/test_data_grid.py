"""Flux grid: validity of every draw, coverage of all valid pairs, presets."""
import random

import pytest

from fluxvit.datasets import FluxGrid


@pytest.mark.parametrize("name", ["distill", "videotext", "finetune"])
def test_preset_draws_are_valid_and_cover_all_pairs(name):
    grid = FluxGrid.preset(name)
    pairs = grid.valid_pairs()
    lo, hi = grid.threshold
    # an independent enumeration of the rule, not a re-check of the list valid_pairs filtered itself
    expected = {(f, r) for f in grid.frames for r in grid.resolutions if lo <= f * (r // 14) ** 2 <= hi}
    assert pairs and set(pairs) == expected and len(pairs) == len(expected)
    rng = random.Random(0)
    draws = [grid.sample(rng) for _ in range(40 * len(pairs))]
    assert set(draws) <= set(pairs)
    assert set(draws) == set(pairs)  # uniform over the valid pairs: every one shows up


def test_invalid_pairs_are_excluded():
    grid = FluxGrid(frames=[4, 8, 16], resolutions=[112, 224], threshold=(1000, 2048))
    # tokens: 4x64=256, 4x256=1024, 8x64=512, 8x256=2048, 16x64=1024, 16x256=4096
    assert grid.valid_pairs() == [(4, 224), (8, 224), (16, 112)]
    assert grid.tokens(8, 224) == 2048


def test_finetune_preset_matches_release():
    grid = FluxGrid.preset("finetune")
    assert grid.frames == tuple(range(6, 25, 2)) and grid.resolutions == tuple(range(112, 337, 28))
    assert grid.threshold == (2048, 6144)


def test_stage1_and_stage2_read_the_paper_bounds_as_the_release_reads_range():
    """Table 16's (4, 26, 2) / (168, 280, 28), end excluded as in the release's range(start, end, stride):
    frames 4..24, resolution 168..252, in stage 1 and stage 2 alike."""
    for name in ("distill", "videotext"):
        grid = FluxGrid.preset(name)
        assert grid.frames == tuple(range(4, 25, 2)) and grid.resolutions == (168, 196, 224, 252)


def test_empty_grid_and_unknown_preset_raise():
    with pytest.raises(ValueError):
        FluxGrid(frames=[2], resolutions=[28], threshold=(10_000, 20_000))
    with pytest.raises(KeyError):
        FluxGrid.preset("nope")


def test_sampling_is_deterministic_by_rng():
    grid = FluxGrid.preset("distill")
    a = [grid.sample(random.Random(3)) for _ in range(5)]
    b = [grid.sample(random.Random(3)) for _ in range(5)]
    assert a == b
