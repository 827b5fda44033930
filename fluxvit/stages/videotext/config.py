"""Stage 2 (Flux-CLIP video-text contrastive) config and named presets.

``data.batch_size`` is the per-process micro-batch; the contrastive batch is the global batch
``batch_size * num_processes`` (features are all-gathered).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..common.config import DataConfig, OptimConfig, PresetRegistry, TrainConfig
from ..distill.config import TeacherConfig

__all__ = ["ContrastConfig", "RetrievalEvalConfig", "TeacherAlignConfig", "TextConfig", "VideoConfig", "VideoTextConfig", "presets"]


@dataclass
class VideoConfig:
    """The FluxViT video tower (a registered name + overrides; ``train.init_from`` loads a stage-1 export,
    whose embedded config then defines the architecture). ``budgets``: token budgets per step;
    ``budget_mode``: "sample" one budget per step, or "all" every budget in one packed pass."""

    name: str = "fluxvit_small_patch14"
    drop_path_rate: float = 0.1
    overrides: dict = field(default_factory=dict)
    budgets: tuple = (2048,)
    budget_mode: str = "sample"


@dataclass
class TextConfig:
    """The text tower: ``spec`` as in ``fluxvit.stages.videotext.text.build_text_tower``."""

    spec: str = "minilm"
    freeze: bool = True
    pooling: str = "mean"
    max_length: int = 64


@dataclass
class ContrastConfig:
    """VTC: symmetric InfoNCE over the global batch in an ``embed_dim`` joint space. Temperature learnable
    (init ``temperature``, clamped to >= ``min_temperature``) or fixed."""

    embed_dim: int = 512
    temperature: float = 0.07
    learnable_temperature: bool = True
    min_temperature: float = 0.01


@dataclass
class TeacherAlignConfig:
    """Optional unmasked-teacher alignment (UMT stage 2): a decoder on the student's pooled feature regresses
    the frozen stage-1 teacher's pooled feature of the same clip, loss ``weight * mean(2 - 2 cos)``.
    ``weight = 0`` disables it (the default; the paper's Flux-CLIP used VTC only)."""

    weight: float = 0.0
    teacher: TeacherConfig = field(default_factory=TeacherConfig)


@dataclass
class RetrievalEvalConfig:
    """Zero-shot retrieval settings: token budgets and (frames, resolution) settings to test, dual softmax."""

    budgets: tuple = (2048, 1024)
    settings: list = field(default_factory=lambda: [[8, 224]])
    dual_softmax: bool = False
    max_videos: int = 0  # 0: all


@dataclass
class VideoTextConfig:
    video: VideoConfig = field(default_factory=VideoConfig)
    text: TextConfig = field(default_factory=TextConfig)
    contrast: ContrastConfig = field(default_factory=ContrastConfig)
    align: TeacherAlignConfig = field(default_factory=TeacherAlignConfig)
    retrieval: RetrievalEvalConfig = field(default_factory=RetrievalEvalConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(source="shards", flux_preset="videotext",
                                                                normalize="imagenet"))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=4e-4, weight_decay=0.02, betas=(0.9, 0.98),
                                                                   warmup_fraction=0.2))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(run_dir="runs/videotext",
                                                                   export_name="videotext.safetensors"))


presets = PresetRegistry("videotext")


@presets.register
def smoke() -> VideoTextConfig:
    """Seconds on a CPU: tiny tower, in-memory clips with made-up captions replaced by the synthetic corpus
    when ``data.source=synthetic-corpus``; used by tests."""
    cfg = VideoTextConfig()
    cfg.video = VideoConfig(name="fluxvit_tiny_patch14", drop_path_rate=0.0, overrides={"depth": 2},
                            budgets=(64, 32))
    cfg.contrast.embed_dim = 64
    cfg.data = DataConfig(source="synthetic-corpus", root="data/synthetic", batch_size=8,
                          grids=[[4, 56], [2, 84]], normalize="imagenet", num_val_clips=16)
    cfg.retrieval = RetrievalEvalConfig(budgets=(64,), settings=[[4, 56]], max_videos=32)
    cfg.optim = OptimConfig(lr=1e-3, weight_decay=0.02, warmup_steps=2, clip_grad=1.0)
    cfg.train = TrainConfig(run_dir="runs/smoke/videotext", steps=4, log_every=1, keep_last=1,
                            export_name="videotext.safetensors")
    return cfg


@presets.register
def demo() -> VideoTextConfig:
    """`make pretrain`'s stage 2 on the synthetic corpus: a few minutes on a 2-core CPU."""
    cfg = VideoTextConfig()
    cfg.video = VideoConfig(name="fluxvit_tiny_patch14", drop_path_rate=0.0, overrides={"depth": 4},
                            budgets=(128, 96, 64), budget_mode="sample")
    cfg.contrast = ContrastConfig(embed_dim=256, temperature=0.07, learnable_temperature=True)
    cfg.data = DataConfig(source="synthetic-corpus", root="data/synthetic", batch_size=32,
                          grids=[[8, 56], [4, 84], [6, 70]], normalize="imagenet", num_workers=1)
    cfg.retrieval = RetrievalEvalConfig(budgets=(128, 64), settings=[[8, 56], [4, 84]])
    cfg.optim = OptimConfig(lr=2e-3, weight_decay=0.02, warmup_steps=20, min_lr=1e-5, clip_grad=1.0)
    cfg.train = TrainConfig(run_dir="runs/pretrain/videotext", steps=160, log_every=10, keep_last=1,
                            ckpt_every=80, eval_every=80, export_name="videotext.safetensors")
    return cfg


def _paper(model: str) -> VideoTextConfig:
    cfg = VideoTextConfig()
    cfg.video = VideoConfig(name=model, drop_path_rate=0.1, budgets=(2048, 1024), budget_mode="sample")
    cfg.text = TextConfig(spec="hf:bert-base-uncased", freeze=True)
    cfg.contrast = ContrastConfig(embed_dim=512, temperature=0.01, learnable_temperature=False)
    cfg.data = DataConfig(source="shards", batch_size=64, flux_preset="videotext", num_workers=8)
    cfg.optim = OptimConfig(lr=4e-4, weight_decay=0.02, betas=(0.9, 0.98), warmup_fraction=0.2, min_lr=1e-6)
    cfg.train = TrainConfig(run_dir=f"runs/videotext_{model}", steps=100_000, log_every=50, ckpt_every=2000,
                            export_name="videotext.safetensors")
    cfg.retrieval = RetrievalEvalConfig(budgets=(2048, 1024, 512), settings=[[8, 224], [16, 224]],
                                        dual_softmax=True)
    return cfg


@presets.register
def paper_s() -> VideoTextConfig:
    """FluxViT-S Flux-CLIP recipe (25 M corpus stage: lr 4e-4, wd 0.02, AdamW 0.9/0.98, temperature 1/100,
    frozen text tower). Set ``data.shards``, ``train.init_from`` (stage-1 export) and ``train.steps``."""
    return _paper("fluxvit_small_patch14")


@presets.register
def paper_b() -> VideoTextConfig:
    """FluxViT-B Flux-CLIP recipe (see ``paper_s``)."""
    return _paper("fluxvit_base_patch14")
