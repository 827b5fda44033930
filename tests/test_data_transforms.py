"""Frame-index sampling and video transforms (crops, eval views, normalisation, collate)."""
import random

import pytest
import torch

from fluxvit.datasets import (EvalTransform, MultiScaleCrop, RandomResizedCrop, VideoTransform, center_crop_box,
                              collate_videos, multi_clip_indices, sample_middle_indices, sample_tsn_indices,
                              three_crop_boxes)
from fluxvit.datasets.transforms import crop_resize, normalize_stats


@pytest.mark.parametrize("n,t", [(100, 8), (8, 8), (5, 16), (1, 4), (33, 7)])
def test_tsn_indices_one_per_segment(n, t):
    rng = random.Random(0)
    for _ in range(20):
        idx = sample_tsn_indices(n, t, rng)
        assert len(idx) == t and idx == sorted(idx) and 0 <= idx[0] and idx[-1] < n
        seg = n / t
        assert all(int(seg * i) <= j <= min(n - 1, int(seg * (i + 1))) for i, j in enumerate(idx))


def test_more_frames_than_video_repeats():
    idx = sample_middle_indices(5, 16)
    assert len(idx) == 16 and set(idx) == set(range(5))


def test_middle_and_multi_clip():
    assert sample_middle_indices(80, 8) == [5, 15, 25, 35, 45, 55, 65, 75]
    # the release's test mode: segments of 79 / 8 = 9.875 frames starting at round(9.875 i) (0, 10, 20, 30, 40,
    # 49, 59, 69); clip k of 4 adds int(9.875 / 5 * (k + 1)) = 1, 3, 5, 7
    clips = multi_clip_indices(80, 8, 4)
    starts = [0, 10, 20, 30, 40, 49, 59, 69]
    assert clips == [[s + d for s in starts] for d in (1, 3, 5, 7)]
    assert multi_clip_indices(80, 8, 1)[0] == [s + 4 for s in starts]  # one clip: the middle of each segment
    # short video: segments of 0.25 frame start at round(0.25 i) (half to even), the offset int(0.2) is 0
    assert multi_clip_indices(3, 8, 4)[3] == [0, 0, 0, 1, 1, 1, 2, 2]
    with pytest.raises(ValueError):
        sample_tsn_indices(0, 4)


@pytest.mark.parametrize("h,w", [(48, 64), (64, 48), (340, 604)])
def test_crop_boxes_inside_frame(h, w):
    rng = random.Random(0)
    for cropper in (MultiScaleCrop(), RandomResizedCrop()):
        for _ in range(50):
            top, left, ch, cw = cropper.get_box(h, w, rng)
            assert 0 <= top and 0 <= left and top + ch <= h and left + cw <= w and ch > 0 and cw > 0
    boxes = three_crop_boxes(h, w)
    side = min(h, w)
    assert len({b[:2] for b in boxes}) == (3 if h != w else 1)
    assert all(b[2] == b[3] == side for b in boxes)
    assert center_crop_box(h, w) == ((h - side) // 2, (w - side) // 2, side, side)


def test_crop_resize_shape_normalisation_and_flip():
    clip = torch.zeros(4, 48, 64, 3, dtype=torch.uint8)
    clip[..., 0] = 255
    clip[:, :, :32, 1] = 255  # left half yellow
    out = crop_resize(clip, (0, 0, 48, 64), 32, normalize="imagenet")
    assert out.shape == (3, 4, 32, 32) and out.dtype == torch.float32
    mean, std = normalize_stats("imagenet")
    assert torch.allclose(out[0], torch.full_like(out[0], (1 - mean[0]) / std[0]), atol=1e-4)
    flipped = crop_resize(clip, (0, 0, 48, 64), 32, flip=True, normalize=None)
    plain = crop_resize(clip, (0, 0, 48, 64), 32, normalize=None)
    assert plain[1, :, :, 0].mean() > 0.9 and flipped[1, :, :, 0].mean() < 0.1
    clip_out = crop_resize(clip, (0, 0, 48, 64), 32, normalize="clip")
    assert not torch.allclose(clip_out, out)


def test_video_and_eval_transforms():
    clip = torch.randint(0, 255, (6, 48, 64, 3), dtype=torch.uint8)
    out = VideoTransform()(clip, 28, random.Random(0))
    assert out.shape == (3, 6, 28, 28)
    views = EvalTransform(num_crops=3)(clip, 28)
    assert len(views) == 3 and all(v.shape == (3, 6, 28, 28) for v in views)
    assert not torch.equal(views[0], views[2])
    with pytest.raises(ValueError):
        EvalTransform(num_crops=2)


def test_collate_dense_and_packed():
    ex = [{"video": torch.zeros(3, 4, 8, 8), "caption": "a", "label": 1, "key": "k0"},
          {"video": torch.zeros(3, 4, 8, 8), "caption": "", "label": -1, "key": "k1"}]
    batch = collate_videos(ex)
    assert batch["video"].shape == (2, 3, 4, 8, 8) and batch["label"].tolist() == [1, -1]
    ex[1]["video"] = torch.zeros(3, 2, 16, 16)
    packed = collate_videos(ex)
    assert isinstance(packed["video"], list) and packed["video"][1].shape == (3, 2, 16, 16)
    assert packed["caption"] == ["a", ""] and packed["key"] == ["k0", "k1"]


def test_tsn_jitter_varies_with_the_seed_and_the_draw():
    draws = {tuple(sample_tsn_indices(100, 8, random.Random(seed))) for seed in range(8)}
    assert len(draws) == 8  # 8 seeds, 8 different clips (12.5 frames per segment to choose from)
    rng = random.Random(0)
    assert sample_tsn_indices(100, 8, rng) != sample_tsn_indices(100, 8, rng)  # successive draws differ
    assert sample_tsn_indices(100, 8, random.Random(5)) == sample_tsn_indices(100, 8, random.Random(5))
