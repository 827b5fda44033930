"""Video data pipeline: WebDataset shards, decoding, Flux sampling grids, augmentation, synthetic corpus.

Typical use (the training stages)::

    from fluxvit.datasets import DataConfig, FluxGrid, build_video_loader, stats

    cfg = DataConfig(shards="data/synth/train/{00000..00007}.tar", grid="distill", num_workers=2)
    loader = build_video_loader(cfg)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:          # batch["video"]: (B, 3, T, H, W) float, or a list when shapes differ
            ...
        log(stats().as_dict())        # delivered / skipped samples, shard errors

Modules: :mod:`.shards` (spec syntax, tar reading/writing), :mod:`.decoders` (decord / PyAV / torchcodec),
:mod:`.sampling` (frame indices), :mod:`.transforms` (crops, eval views), :mod:`.augment` (the release's training
augmentation from timm's pieces: RandAugment, RandomResizedCrop, RandomErasing, repeated augmentation), :mod:`.grid`
(Flux), :mod:`.loader` (shard schedule, streaming, resume), :mod:`.samples` (decoding one sample), :mod:`.batching`, :mod:`.accounting` (skip counts), :mod:`.synth` (synthetic corpus), :mod:`.cli` (``fluxvit-data``).
decord, torchcodec and PyAV are imported only when a video is decoded.
"""
from .config import DataConfig, resolve_grid
from .decoders import BACKENDS, DecodeError, available_backends, decode_clips, open_video
from .grid import FluxGrid
from .loader import (DataStats, VideoLoader, build_video_loader, collate_videos, loader_state, process_sample,
                     stats)
from .sampling import multi_clip_indices, sample_middle_indices, sample_tsn_indices
from .shards import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, VIDEO_KEYS, ShardReader, ShardWriter, parse_shard_spec
from .transforms import (EvalTransform, MultiScaleCrop, RandomResizedCrop, VideoTransform, center_crop_box,
                         three_crop_boxes)

__all__ = [
    "BACKENDS", "DataConfig", "IMAGE_EXTENSIONS", "VIDEO_EXTENSIONS", "VIDEO_KEYS", "DataStats", "DecodeError", "EvalTransform", "FluxGrid", "MultiScaleCrop",
    "RandomResizedCrop", "ShardReader", "ShardWriter", "VideoLoader", "VideoTransform", "available_backends", "build_video_loader",
    "center_crop_box", "collate_videos", "decode_clips", "loader_state", "multi_clip_indices", "open_video",
    "parse_shard_spec", "process_sample", "resolve_grid", "sample_middle_indices", "sample_tsn_indices", "stats",
    "three_crop_boxes",
]
