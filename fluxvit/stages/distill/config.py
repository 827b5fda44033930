"""Stage 1 (Flux-UMT masked-teacher distillation) config and named presets.

Batch size convention: ``data.batch_size`` is the per-process micro-batch; the global batch is
``data.batch_size * num_processes * train.grad_accum`` (paper: 2048).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..common.config import DataConfig, OptimConfig, PresetRegistry, TrainConfig

__all__ = ["DistillConfig", "LossConfig", "StudentConfig", "TeacherConfig", "presets"]


@dataclass
class StudentConfig:
    """The FluxViT student: a registered name plus ``create_model`` overrides."""

    name: str = "fluxvit_small_patch14"
    drop_path_rate: float = 0.05
    overrides: dict = field(default_factory=dict)


@dataclass
class TeacherConfig:
    """The frozen teacher.

    kind: "open_clip" (a vision tower by ``name`` + ``pretrained`` tag or local ``weights``, or a random tower
    from ``vision_cfg``) or "fluxvit" (a zoo checkpoint in ``weights``, or a registered ``name`` at random init).
    budget: tokens the teacher sees per clip (group-dynamic selector); 0 = all.
    image_size: teacher input size; 0 = match the student's token grid (frames resized to grid * teacher patch).
    """

    kind: str = "open_clip"
    name: str = "ViT-B-16"
    pretrained: str = "openai"
    weights: str = ""
    vision_cfg: dict = field(default_factory=dict)
    embed_dim: int = 512
    image_size: int = 0
    budget: int = 2048
    bf16: bool = True


@dataclass
class LossConfig:
    """Flux-UMT loss: mean(2 - 2 cos) on the student's visible tokens for the last ``num_layers`` student blocks
    (against evenly spaced teacher blocks, or ``teacher_layers``), plus the pooled-feature term.

    budgets: student token budgets per step ("Multi": every clip at each budget in one packed pass).
    sampling: visible tokens drawn by multinomial on the teacher's cls attention, over the whole clip ("clip")
    or an equal share per frame ("frame").
    """

    num_layers: int = 6
    teacher_layers: tuple = ()
    token_weight: float = 1.0
    pooled_weight: float = 1.0
    budgets: tuple = (2048, 1536, 1024)
    sampling: str = "clip"


@dataclass
class DistillConfig:
    """Everything a stage-1 run needs; saved as ``config.json``/``config.yaml`` in the run directory."""

    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_grid: list = field(default_factory=list)  # (frames, resolution) pairs of held-out clips


presets = PresetRegistry("distill")


@presets.register
def smoke() -> DistillConfig:
    """Tiny student, tiny random open_clip teacher, synthetic clips: about two minutes on a CPU."""
    return DistillConfig(
        student=StudentConfig(name="fluxvit_tiny_patch14", drop_path_rate=0.0),
        teacher=TeacherConfig(kind="open_clip", name="", pretrained="", embed_dim=64, budget=256,
                              vision_cfg=dict(image_size=112, patch_size=16, width=96, layers=4, head_width=32)),
        loss=LossConfig(num_layers=2, budgets=(192, 128), sampling="clip"),
        data=DataConfig(source="synthetic", batch_size=4, grids=[[4, 112], [6, 98], [8, 84]], num_clips=64,
                        num_val_clips=8),
        optim=OptimConfig(lr=1e-3, min_lr=1e-5, weight_decay=0.05, betas=(0.9, 0.98), warmup_steps=6,
                          clip_grad=1.0),
        train=TrainConfig(run_dir="runs/distill_smoke", steps=60, log_every=10, ckpt_every=30, eval_every=30,
                          keep_last=2, seed=0),
        eval_grid=[[8, 112]],
    )


@presets.register
def smoke_corpus() -> DistillConfig:
    """``smoke`` on the synthetic mp4 corpus through ``fluxvit.datasets`` (generated into data.root on first
    use; decoding makes it several times slower than ``smoke`` on a CPU)."""
    cfg = smoke()
    cfg.data.source, cfg.data.root, cfg.data.decoder = "synthetic-corpus", "data/synthetic", "pyav"
    cfg.data.num_val_clips = 8
    cfg.data.num_frames, cfg.data.img_size = 8, 112  # held-out clips
    cfg.train.run_dir = "runs/distill_smoke_corpus"
    cfg.eval_grid = []
    return cfg


@presets.register
def demo() -> DistillConfig:
    """`make pretrain`'s stage 1: a depth-4 tiny student distilled from a small random open_clip teacher on the
    synthetic mp4 corpus (``data.root``), at the Flux grids stage 2's demo uses; about two minutes on 2 cores.
    A random teacher teaches no semantics: this run exercises the pipeline and initialises stage 2."""
    cfg = smoke()
    cfg.student = StudentConfig(name="fluxvit_tiny_patch14", drop_path_rate=0.0, overrides={"depth": 4})
    cfg.teacher.budget = 128
    cfg.teacher.vision_cfg = dict(image_size=112, patch_size=14, width=96, layers=4, head_width=32)
    cfg.loss = LossConfig(num_layers=2, budgets=(128, 96, 64), sampling="clip")
    cfg.data = DataConfig(source="synthetic-corpus", root="data/synthetic", batch_size=16, num_workers=1,
                          grids=[[8, 56], [4, 84], [6, 70]], num_frames=8, img_size=56, num_val_clips=16)
    cfg.optim = OptimConfig(lr=1e-3, min_lr=1e-5, weight_decay=0.05, betas=(0.9, 0.98), warmup_steps=5,
                            clip_grad=1.0)
    cfg.train = TrainConfig(run_dir="runs/pretrain/distill", steps=40, log_every=5, keep_last=1, eval_every=40,
                            seed=0)
    cfg.eval_grid = [[8, 56]]
    return cfg


def _paper(student: str) -> DistillConfig:
    # Paper recipe (FluxViT paper, arXiv 2503.14237): AdamW (0.9, 0.98), wd 0.05, lr 1e-3, global batch 2048,
    # 100 epochs over ~1.1 M clips (~53.7 k steps) with 20 warmup epochs, drop path 0.05, teacher 2048
    # tokens, student 2048 / 1536 / 1024. Teacher: CLIP ViT-B/16 per frame (UMT's, InternVideo2-1B unreleased).
    return DistillConfig(
        student=StudentConfig(name=student, drop_path_rate=0.05),
        teacher=TeacherConfig(kind="open_clip", name="ViT-B-16", pretrained="openai", embed_dim=512, budget=2048),
        loss=LossConfig(num_layers=6, budgets=(2048, 1536, 1024), sampling="clip"),
        data=DataConfig(source="shards", batch_size=32, num_workers=8, flux_preset="distill", num_frames=8,
                        img_size=224, normalize="imagenet"),
        optim=OptimConfig(lr=1e-3, min_lr=1e-6, weight_decay=0.05, betas=(0.9, 0.98), warmup_fraction=0.2,
                          clip_grad=3.0),
        train=TrainConfig(run_dir=f"runs/distill_{student}", steps=53_700, grad_accum=1, log_every=50,
                          ckpt_every=1000, keep_last=3, eval_every=0),
    )


@presets.register
def small() -> DistillConfig:
    """Paper recipe for FluxViT-S/14 (global batch 2048 = 32 per GPU x 64 GPUs, or set train.grad_accum)."""
    return _paper("fluxvit_small_patch14")


@presets.register
def base() -> DistillConfig:
    """Paper recipe for FluxViT-B/14 (global batch 2048 = 32 per GPU x 64 GPUs, or set train.grad_accum)."""
    return _paper("fluxvit_base_patch14")
