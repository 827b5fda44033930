"""The release's stage-3 augmentation from timm's pieces: identical RandAugment ops on every frame (by value),
one erasing box through every frame, repeated augmentation, the full transform's shapes and statistics."""
import random

import numpy as np
import pytest
import torch

from fluxvit.datasets.augment import (RELEASE_RANDAUG, ReleaseTrainTransform, VideoRandAugment, VideoRandomErasing,
                                      repeated_views)


def _clip(T=4, H=48, W=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (1, H // 8, W // 8, 3), generator=g, dtype=torch.uint8)
    frames = base.repeat_interleave(8, 1).repeat_interleave(8, 2).repeat(T, 1, 1, 1)  # blocky, so ops are visible
    drift = torch.arange(T).view(T, 1, 1, 1) * 20
    return ((frames.int() + drift) % 256).to(torch.uint8)  # frames differ from one another


def test_randaugment_applies_the_same_ops_to_every_frame_by_value():
    from PIL import Image
    from timm.data import rand_augment_transform

    clip = _clip()
    out = VideoRandAugment(RELEASE_RANDAUG, crop_size=32)(clip, random.Random(7))
    assert out.shape == clip.shape and out.dtype == torch.uint8 and not torch.equal(out, clip)
    # Independent re-statement: a fresh timm RandAugment applied to each frame ALONE, with the global generators in
    # the state frame 0 saw, reproduces every output frame exactly.
    seed = random.Random(7).getrandbits(63)
    op = rand_augment_transform(RELEASE_RANDAUG, {"translate_const": int(32 * 0.45), "interpolation": Image.BICUBIC})
    for t in range(clip.shape[0]):
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        alone = np.asarray(op(Image.fromarray(clip[t].numpy())))
        np.testing.assert_array_equal(out[t].numpy(), alone, err_msg=f"frame {t}")
    # identical input frames stay identical; another clip seed draws other ops
    same = _clip().narrow(0, 0, 1).repeat(3, 1, 1, 1)
    res = VideoRandAugment(RELEASE_RANDAUG, crop_size=32)(same, random.Random(3))
    assert torch.equal(res[0], res[1]) and torch.equal(res[1], res[2])
    outs = {VideoRandAugment(RELEASE_RANDAUG, crop_size=32)(clip, random.Random(s)).sum().item() for s in range(6)}
    assert len(outs) > 1
    # the caller's global generators are left as they were
    random.seed(0)
    before = random.random()
    random.seed(0)
    VideoRandAugment(RELEASE_RANDAUG, crop_size=32)(clip, random.Random(1))
    assert random.random() == before


def test_random_erasing_one_box_through_every_frame():
    clip = torch.zeros(3, 5, 40, 40)
    erased = VideoRandomErasing(probability=1.0, mode="pixel")(clip, random.Random(0))
    mask = erased != 0  # (3, T, H, W): the box, filled with per-pixel noise
    boxes = mask.any(0)
    assert boxes[0].any() and all(torch.equal(boxes[0], boxes[t]) for t in range(5))
    assert not torch.equal(erased[:, 0][mask[:, 0]], erased[:, 1][mask[:, 1]])  # pixel mode: noise differs per frame
    untouched = VideoRandomErasing(probability=0.0)(torch.zeros(3, 2, 8, 8), random.Random(0))
    assert not untouched.any()


def test_repeated_augmentation_gives_num_sample_distinct_clips():
    tf = ReleaseTrainTransform(reprob=0.25)
    views = repeated_views(tf, _clip(T=4, H=64, W=80), 56, random.Random(5), num_sample=3)
    assert len(views) == 3 and all(v.shape == (3, 4, 56, 56) and v.dtype == torch.float32 for v in views)
    assert all(not torch.equal(views[i], views[j]) for i in range(3) for j in range(i + 1, 3))
    with pytest.raises(ValueError, match="num_sample"):
        repeated_views(tf, _clip(), 56, random.Random(0), 0)


def test_release_transform_is_deterministic_in_its_rng_and_normalised():
    clip = _clip(T=2, H=64, W=80)
    tf = ReleaseTrainTransform()
    a, b = tf(clip, 42, random.Random(9)), tf(clip, 42, random.Random(9))
    assert torch.equal(a, b) and a.shape == (3, 2, 42, 42)
    plain = ReleaseTrainTransform(randaug="", reprob=0.0, flip=False, scale=(1.0, 1.0), ratio=(1.25, 1.25))
    # the whole 64 x 80 frame (aspect 1.25) resized: the mean of the normalised clip matches the frame's
    mean = (clip.float() / 255).mean(dim=(0, 1, 2))
    expected = (mean - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(plain(clip, 40, random.Random(0)).mean(dim=(1, 2, 3)), expected, atol=0.05, rtol=0)
    with pytest.raises(ValueError, match="uint8"):
        VideoRandAugment()(clip.float(), random.Random(0))


def test_shard_loader_repeated_augmentation_and_release_transform(tmp_path):
    """Through the shard loader: each video gives num_sample distinct augmented clips, adjacent, with its label;
    per-sample grids keep one grid per video (its copies share it)."""
    from data_fixtures import make_video, video_sample, write_tar

    from fluxvit.datasets import DataConfig, FluxGrid, build_video_loader

    video = make_video(num_frames=8, width=64, height=48)
    write_tar(tmp_path / "00000.tar", [video_sample(f"k{i}", video, f"clip {i}", i) for i in range(4)])
    base = dict(shards=str(tmp_path / "00000.tar"), num_frames=4, img_size=28, batch_size=2, num_workers=0,
                decoder="pyav", shuffle_buffer=0, crop="rrc", crop_scale=(0.08, 1.0), randaug=RELEASE_RANDAUG,
                reprob=0.25, num_sample=3)
    batch = next(iter(build_video_loader(DataConfig(**base), rank=0, world_size=1)))
    v = batch["video"]
    assert v.shape == (6, 3, 4, 28, 28) and batch["label"].tolist()[:3] == [batch["label"][0].item()] * 3
    assert batch["key"][0] == batch["key"][1] == batch["key"][2] != batch["key"][3]
    assert all(not torch.equal(v[i], v[j]) for i in range(3) for j in range(i + 1, 3))
    grid = FluxGrid(frames=[2, 4], resolutions=[14, 28], threshold=(0, 200))
    packed = next(iter(build_video_loader(DataConfig(**{**base, "grid": grid, "per_sample_grid": True}), rank=0,
                                          world_size=1)))
    clips = packed["video"]
    assert isinstance(clips, list) and len(clips) == 6
    assert clips[0].shape == clips[1].shape == clips[2].shape and clips[3].shape == clips[4].shape == clips[5].shape
