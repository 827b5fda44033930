"""Stage 1: Flux-UMT masked-teacher distillation (FluxViT paper, arXiv 2503.14237)."""
from .config import DistillConfig, LossConfig, StudentConfig, TeacherConfig, presets
from .task import DistillModel, DistillTask, build_teacher, sample_visible
from .teacher import FluxViTTeacher, OpenCLIPTeacher, TeacherOutput, align_layers, grid_index_map
from .train import build_config, main

__all__ = [
    "DistillConfig", "DistillModel", "DistillTask", "FluxViTTeacher", "LossConfig", "OpenCLIPTeacher",
    "StudentConfig", "TeacherConfig", "TeacherOutput", "align_layers", "build_config", "build_teacher",
    "grid_index_map", "main", "presets", "sample_visible",
]
