"""Stage 1 (Flux-UMT masked-teacher distillation) config and named presets.

Batch size convention: ``data.batch_size`` is the per-process micro-batch; the global batch is
``data.batch_size * num_processes * train.grad_accum`` (paper: 2048).

Presets:
  * ``paper_s`` / ``paper_b``: the paper's recipe (FluxViT paper, arXiv 2503.14237, Table 14) distilling FluxViT-S/B from
    InternVideo2-1B the way InternVideo2's distillation engine does (layers 23/26/29/33/36/39 against the
    student's last six, visible tokens drawn jointly over the clip from the teacher projector's attention, MLP
    decoders, final-feature term 1 : 1). Needs ``teacher.weights`` = the official stage-2 file.
  * ``umt_b16`` / ``umt_l14``: UMT's recipe (CLIP ViT-B/16 for FluxViT-B, ViT-L/14 for FluxViT-L; the teacher's
    last six blocks, visible tokens drawn per frame from the last block's cls attention, mask ratio 0.8, linear
    decoders, no final-feature term).
  * ``smoke``, ``smoke_corpus``, ``demo``: the InternVideo2 path with a tiny randomly initialised teacher.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fluxvit.datasets import DataConfig

from ..common.config import ModelConfig, OptimConfig, PresetRegistry, TrainConfig
from ..common.teacher import TeacherConfig

__all__ = ["DistillConfig", "LossConfig", "ModelConfig", "TeacherConfig", "presets"]


@dataclass
class LossConfig:
    """Flux-UMT loss: mean(2 - 2 cos) between decoded student features and teacher features on the student's
    visible tokens (plus the cls token when the teacher has one), averaged over the aligned layer pairs, plus
    ``pooled_weight`` times the same on the final (pooled) feature.

    Layer pairing (the official recipes): teacher block ``depth - int(i * teacher_interval) - 1`` and student
    block ``depth - int(i * student_interval) - 1`` for i < ``num_layers``, both sorted ascending and paired in
    order; ``teacher_layers`` / ``student_layers`` give explicit lists instead.

    budgets: student token budgets per step ("Multi": every clip at each budget in one packed pass).
    sampling: how visible tokens are drawn from the teacher's attention: "clip" (one multinomial over all
        T*H*W tokens jointly, InternVideo2's engine) or "frame" (an equal share per frame, UMT's engine).
    decoder: student-side decoder per aligned layer: "mlp" (Linear, GELU, Linear to the teacher width,
        LayerNorm, L2: InternVideo2's ``MLP_Decoder``) or "linear" (Linear, LayerNorm, L2: UMT's).
    decoder_pos_embed: add a student-side position embedding to the student states before the decoders:
        learnable (InternVideo2's ``clip_pos_embed``, 3-D sin-cos init, resized to each clip's grid) or, with
        ``decoder_pos_fixed``, UMT's fixed 1-D sinusoid table over the flattened patch index.
    decoder_norm: apply a LayerNorm (eps 1e-6) to the returned student states before the position embedding
        and the decoders (UMT: the student encoder's final ``norm`` on every returned layer); InternVideo2's
        distillation student feeds the raw block outputs.
    pool_heads: the student pooling head whose output carries the final-feature term at each budget (one per
        entry of ``budgets``); empty: by rank, the largest budget on head 0, the next on head 1, ... (see the
        README: the paper does not say; this trains every head, in the order stage 3 uses them).
    """

    num_layers: int = 6
    teacher_interval: float = 1.0
    student_interval: float = 1.0
    teacher_layers: tuple = ()
    student_layers: tuple = ()
    token_weight: float = 1.0
    pooled_weight: float = 1.0
    budgets: tuple = (2048, 1536, 1024)
    sampling: str = "clip"
    decoder: str = "mlp"
    decoder_pos_embed: bool = True
    decoder_pos_fixed: bool = False
    decoder_norm: bool = False
    pool_heads: tuple = ()


@dataclass
class DistillConfig:
    """Everything a stage-1 run needs; saved as ``config.json``/``config.yaml`` in the run directory.

    ``scale_lr``: the official engines' rule (InternVideo2 ``run_distill.py``, UMT ``run_umt_pretraining.py``):
    ``optim.lr``, ``optim.min_lr`` and ``optim.warmup_lr`` are per ``lr_batch`` (256) clips and are multiplied by
    ``total batch * num_sample / lr_batch`` at start, with the real number of processes."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(drop_path_rate=0.05))  # the FluxViT student
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(grid="distill"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_grid: list = field(default_factory=list)  # (frames, resolution) pairs of held-out clips
    scale_lr: bool = False
    lr_batch: int = 256


presets = PresetRegistry("distill")

# A tiny randomly initialised InternVideo2 (the 1B model's structure at width 96, depth 4): the teacher of the
# CPU presets. LayerScale starts at 0.1 (the 1B model: 1e-5) so that its random blocks shape its outputs.
TINY_INTERNVIDEO2 = dict(embed_dim=96, depth=4, num_heads=4, mlp_ratio=4.0, img_size=112, num_frames=8,
                         attn_pool_num_heads=4, clip_embed_dim=64, init_values=0.1)


@presets.register
def smoke() -> DistillConfig:
    """Tiny student, tiny random InternVideo2 teacher, synthetic clips: about a minute on a CPU."""
    return DistillConfig(
        model=ModelConfig(name="fluxvit_tiny_patch14", drop_path_rate=0.0),
        teacher=TeacherConfig(kind="internvideo2", name="internvideo2_1b_patch14", pretrained="", budget=256,
                              overrides=dict(TINY_INTERNVIDEO2)),
        loss=LossConfig(num_layers=2, teacher_interval=2.0, student_interval=1.0, budgets=(192, 128),
                        sampling="clip"),
        data=DataConfig(source="synthetic", batch_size=4, grid=[[4, 112], [6, 98], [8, 84]], num_clips=64,
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
    """`make pretrain`'s stage 1: a depth-4 tiny student distilled from a tiny random InternVideo2 teacher on the
    synthetic mp4 corpus (``data.root``), at the Flux grids stage 2's demo uses; about two minutes on 2 cores.
    A random teacher teaches no semantics: this run exercises the pipeline and initialises stage 2."""
    cfg = smoke()
    cfg.model = ModelConfig(name="fluxvit_tiny_patch14", drop_path_rate=0.0, overrides={"depth": 4})
    cfg.teacher.budget = 128
    cfg.loss = LossConfig(num_layers=2, teacher_interval=2.0, budgets=(128, 96, 64), sampling="clip")
    cfg.data = DataConfig(source="synthetic-corpus", root="data/synthetic", batch_size=16, num_workers=1,
                          grid=[[8, 56], [4, 84], [6, 70]], num_frames=8, img_size=56, num_val_clips=16)
    cfg.optim = OptimConfig(lr=1e-3, min_lr=1e-5, weight_decay=0.05, betas=(0.9, 0.98), warmup_steps=5,
                            clip_grad=1.0)
    cfg.train = TrainConfig(run_dir="runs/pretrain/distill", steps=40, log_every=5, keep_last=1, eval_every=40,
                            seed=0)
    cfg.eval_grid = [[8, 56]]
    return cfg


def _paper(student: str) -> DistillConfig:
    # Table 14 (FluxViT paper, arXiv 2503.14237): AdamW (0.9, 0.98), wd 0.05, lr 1e-3, global batch 2048, 100 epochs over
    # ~1.1 M clips (~53.7 k steps) with 20 warmup epochs, drop path 0.05, teacher 2048 tokens (selector),
    # student 2048 / 1536 / 1024. What InternVideo2's distillation engine does
    # (OpenGVLab/InternVideo, InternVideo2/single_modality engines/engine_for_distill.py, run_distill.py): K = 6, teacher
    # interval 3.34 (blocks 23, 26, 29, 33, 36, 39), student interval 1, one joint multinomial draw on the
    # projector attention, MLP decoders after a student position embedding, final 768 -> 768 decoder, 1 : 1;
    # eps 1e-6 and clip_grad 5.0 (scripts/distillation/S14_dist_1B_stage2.sh); lr, min lr (1e-5) per 256 clips,
    # scaled by the total batch (run_distill.py): Table 14's lr is that per-256 flag, as Table 15's is (RECIPES.md).
    return DistillConfig(
        model=ModelConfig(name=student, drop_path_rate=0.05),
        teacher=TeacherConfig(kind="internvideo2", name="internvideo2_1b_patch14", pretrained="", budget=2048),
        loss=LossConfig(num_layers=6, teacher_interval=3.34, student_interval=1.0, budgets=(2048, 1536, 1024),
                        sampling="clip", decoder="mlp", decoder_pos_embed=True, pooled_weight=1.0),
        data=DataConfig(source="shards", batch_size=32, num_workers=8, grid="distill", num_frames=8,
                        img_size=224, normalize="imagenet"),
        optim=OptimConfig(lr=1e-3, min_lr=1e-5, weight_decay=0.05, betas=(0.9, 0.98), eps=1e-6,
                          warmup_fraction=0.2, warmup_lr=0.0, clip_grad=5.0),
        train=TrainConfig(run_dir=f"runs/distill_{student}", steps=53_700, grad_accum=1, log_every=50,
                          ckpt_every=1000, keep_last=3, eval_every=0),
        scale_lr=True,
        lr_batch=256,
    )


@presets.register
def paper_s() -> DistillConfig:
    """FluxViT-S/14 from InternVideo2-1B, the paper's recipe (global batch 2048 = 32 per GPU x 64 GPUs, or set
    train.grad_accum); ``--set teacher.weights=InternVideo2-stage2_1b-224p-f4.pt``."""
    return _paper("fluxvit_small_patch14")


@presets.register
def paper_b() -> DistillConfig:
    """FluxViT-B/14 from InternVideo2-1B, the paper's recipe (see ``paper_s``)."""
    return _paper("fluxvit_base_patch14")


def _umt(student: str, teacher: str, drop_path: float) -> DistillConfig:
    # UMT's stage 1 (unmasked_teacher single_modality/exp/pretraining/{b16,l16}_ptk710_f8_res224.sh): CLIP teacher
    # per frame, last 6 blocks after ln_post + proj (interval 1), mask ratio 0.8 drawn per frame on the last
    # block's cls attention, linear decoders after the student's final norm and a fixed sinusoid position table
    # (models/modeling_pretrain_umt.py), token loss only; AdamW (0.9, 0.95), wd 0.05, lr 1.5e-4 and min lr 1e-5
    # per 256 clips scaled by the total batch (run_umt_pretraining.py; 1.2e-3 / 8e-5 at batch 2048), 201 epochs
    # with 40 warmup over K710 (~0.66 M clips: ~64.6 k steps).
    # At 8 x 224 with a /14 student: 256 tokens per frame, 52 visible (256 - int(0.8 * 256)), 416 per clip.
    # ViT-L/14 ran at 196 px for UMT's /16 student; image_size 0 gives it the /14 student's grid instead.
    # UMT's student has no LayerScale (init_values 0); the FluxViT student always has one: it starts at 1.0 here.
    return DistillConfig(
        model=ModelConfig(name=student, drop_path_rate=drop_path, overrides={"init_values": 1.0}),
        teacher=TeacherConfig(kind="open_clip", name=teacher, pretrained="openai", budget=0,
                              embed_dim=512 if teacher == "ViT-B-16" else 768),
        loss=LossConfig(num_layers=6, teacher_interval=1.0, student_interval=1.0, budgets=(416,), sampling="frame",
                        decoder="linear", decoder_pos_embed=True, decoder_pos_fixed=True, decoder_norm=True,
                        pooled_weight=0.0),
        data=DataConfig(source="shards", batch_size=64, num_workers=8, grid=[[8, 224]], num_frames=8,
                        img_size=224, normalize="imagenet"),
        optim=OptimConfig(lr=1.5e-4, min_lr=1e-5, weight_decay=0.05, betas=(0.9, 0.95), eps=1e-8,
                          warmup_fraction=40 / 201, warmup_lr=0.0, clip_grad=0.0),
        train=TrainConfig(run_dir=f"runs/distill_umt_{student}", steps=64_600, log_every=50, ckpt_every=1000,
                          keep_last=3, eval_every=0),
        scale_lr=True,
        lr_batch=256,
    )


@presets.register
def umt_b16() -> DistillConfig:
    """FluxViT-B/14 from CLIP ViT-B/16 with UMT's recipe (global batch 2048 = 64 per GPU x 32 GPUs)."""
    return _umt("fluxvit_base_patch14", "ViT-B-16", 0.1)


@presets.register
def umt_l14() -> DistillConfig:
    """FluxViT-L/14 from CLIP ViT-L/14 with UMT's recipe (global batch 2048 = 64 per GPU x 32 GPUs)."""
    return _umt("fluxvit_large_patch14", "ViT-L-14", 0.2)
