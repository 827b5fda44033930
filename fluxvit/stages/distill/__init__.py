"""Stage 1: Flux-UMT masked-teacher distillation (FluxViT paper, arXiv 2503.14237)."""
from ..common.teacher import (FluxViTTeacher, InternVideo2Teacher, OpenCLIPTeacher, TeacherConfig, TeacherOutput,
                              build_teacher, grid_index_map)
from .config import DistillConfig, LossConfig, presets
from .decoders import DecoderPosEmbed, FeatureDecoder
from .task import DistillModel, DistillTask, align_layers, pool_heads, return_index, sample_visible
from .train import build_config, main

__all__ = [
    "DecoderPosEmbed", "DistillConfig", "DistillModel", "DistillTask", "FeatureDecoder", "FluxViTTeacher",
    "InternVideo2Teacher", "LossConfig", "OpenCLIPTeacher", "TeacherConfig", "TeacherOutput",
    "align_layers", "build_config", "build_teacher", "grid_index_map", "main", "pool_heads", "presets",
    "return_index", "sample_visible",
]
