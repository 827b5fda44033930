"""The loop skeleton shared by the three training stages: configs and presets, accelerate setup,
AdamW/cosine/EMA, atomic checkpoints with exact resume, rank-0 logging, batch sources and ``fit``."""
from .checkpoint import CheckpointManager, find_latest
from .cli import parse_stage_args, print_config, resolve_config, start_run
from .config import (DataConfig, OptimConfig, PresetRegistry, TrainConfig, apply_overrides, config_to_dict,
                     parse_value, save_config)
from .data import SOURCES, LoaderSource, SyntheticClips, build_source, normalize_video, register_source
from .loop import BatchSource, NonFiniteLossError, StepOutput, TrainResult, TrainTask, fit
from .optim import ModelEMA, build_optimizer, build_scheduler, cosine_lr, param_groups
from .runtime import MetricLogger, build_accelerator, resolve_mixed_precision, seed_everything, setup_logging

__all__ = [
    "BatchSource", "CheckpointManager", "DataConfig", "LoaderSource", "SOURCES", "MetricLogger", "ModelEMA",
    "NonFiniteLossError", "OptimConfig", "PresetRegistry", "StepOutput", "SyntheticClips", "TrainConfig",
    "TrainResult", "TrainTask", "apply_overrides", "build_accelerator", "build_optimizer", "build_scheduler",
    "build_source", "config_to_dict", "cosine_lr", "find_latest", "fit", "normalize_video",
    "param_groups", "parse_stage_args", "parse_value", "print_config", "register_source", "resolve_config", "start_run", "resolve_mixed_precision", "save_config", "seed_everything", "setup_logging",
]
