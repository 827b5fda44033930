"""Stage 2 (Flux-CLIP video-text contrastive) config and named presets.

``data.batch_size`` is the per-process micro-batch; the contrastive batch is the global batch
``batch_size * num_processes`` (features are all-gathered).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fluxvit.datasets import DataConfig

from ..common.config import ModelConfig, OptimConfig, PresetRegistry, TrainConfig
from ..common.teacher import TeacherConfig

__all__ = ["ContrastConfig", "RetrievalEvalConfig", "TeacherAlignConfig", "TextConfig", "VideoTextConfig", "presets"]


@dataclass
class TextConfig:
    """The text tower: ``spec`` as in ``fluxvit.stages.videotext.text.build_text_tower``; ``weights`` a local
    weights file for an ``open_clip:`` tower (how the MobileCLIP-B tower of the paper presets runs offline);
    ``num_layers`` keeps only the first layers of a transformers encoder (0: all; UMT's VTC text encoder is the
    first 9 of BERT-base's 12, the layers below its ``fusion_layer``)."""

    spec: str = "minilm"
    freeze: bool = True
    pooling: str = "mean"
    max_length: int = 64
    weights: str = ""
    num_layers: int = 0


@dataclass
class ContrastConfig:
    """VTC: symmetric InfoNCE over the global batch in an ``embed_dim`` joint space. Temperature learnable
    (init ``temperature``, clamped to [``min_temperature``, ``max_temperature``]; 0 = no upper clamp) or fixed.

    ``vision_proj``: "linear" (pooled -> embed_dim) or "ln_linear" (LayerNorm then Linear, InternVideo2's
    ``vision_align``). ``text_proj``: "linear" (trained) or "none" (the tower's own output is the joint space,
    as InternVideo2's small CLIP uses MobileCLIP-B's frozen 512-d projection; needs tower dim == embed_dim).
    ``budgets``: the video tower's token budgets per step; ``budget_mode``: "sample" one budget per step, or
    "all" every budget in one packed pass."""

    embed_dim: int = 512
    temperature: float = 0.07
    learnable_temperature: bool = True
    min_temperature: float = 0.01
    max_temperature: float = 0.0
    vision_proj: str = "linear"
    text_proj: str = "linear"
    budgets: tuple = (2048,)
    budget_mode: str = "sample"


@dataclass
class TeacherAlignConfig:
    """Optional unmasked-teacher alignment (UMT stage 2): a decoder on the student's pooled feature regresses
    the frozen stage-1 teacher's pooled feature of the same clip, loss ``weight * mean(2 - 2 cos)``.
    ``weight = 0`` disables it (the default; the paper's Flux-CLIP used VTC only)."""

    weight: float = 0.0
    teacher: TeacherConfig = field(default_factory=TeacherConfig)


@dataclass
class RetrievalEvalConfig:
    """Zero-shot retrieval settings: token budgets and (frames, resolution) settings to test; ``dual_softmax``
    scores with InternVideo2's dual softmax at ``dual_softmax_temperature`` (tau, 1 on cosine similarity), the
    protocol of Table 9; without it the plain cosine similarity is ranked. ``split``: what the retrieval command
    evaluates (the synthetic corpus's split; shard data: ``data.val_shards`` for any split but "train"). Training
    evaluates ``data.val_shards`` every ``train.eval_every`` steps with the same protocol."""

    budgets: tuple = (2048, 1024)
    settings: list = field(default_factory=lambda: [[8, 224]])
    dual_softmax: bool = False
    dual_softmax_temperature: float = 1.0
    max_videos: int = 0  # 0: all
    split: str = "test"  # the split ``python -m fluxvit.stages.videotext.retrieval`` reports on


@dataclass
class VideoTextConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # the FluxViT video tower
    text: TextConfig = field(default_factory=TextConfig)
    contrast: ContrastConfig = field(default_factory=ContrastConfig)
    align: TeacherAlignConfig = field(default_factory=TeacherAlignConfig)
    retrieval: RetrievalEvalConfig = field(default_factory=RetrievalEvalConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(source="shards", grid="videotext",
                                                                normalize="imagenet"))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=4e-4, weight_decay=0.02, betas=(0.9, 0.98),
                                                                   warmup_fraction=0.2))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(run_dir="runs/videotext",
                                                                   export_name="videotext.safetensors"))
    # With epochs > 0 the run length is epochs x train_videos // total batch at the real number of processes
    # (resolved at start, as stage 3's; the saved config has the resulting train.steps).
    epochs: float = 0.0
    train_videos: int = 0


presets = PresetRegistry("videotext")


@presets.register
def smoke() -> VideoTextConfig:
    """Seconds on a CPU: tiny tower, in-memory clips with made-up captions replaced by the synthetic corpus
    when ``data.source=synthetic-corpus``; used by tests."""
    cfg = VideoTextConfig()
    cfg.model = ModelConfig(name="fluxvit_tiny_patch14", drop_path_rate=0.0, overrides={"depth": 2})
    cfg.contrast.embed_dim, cfg.contrast.budgets = 64, (64, 32)
    cfg.data = DataConfig(source="synthetic-corpus", root="data/synthetic", batch_size=8,
                          grid=[[4, 56], [2, 84]], normalize="imagenet", num_val_clips=16)
    cfg.retrieval = RetrievalEvalConfig(budgets=(64,), settings=[[4, 56]], max_videos=32)
    cfg.optim = OptimConfig(lr=1e-3, weight_decay=0.02, warmup_steps=2, clip_grad=1.0)
    cfg.train = TrainConfig(run_dir="runs/smoke/videotext", steps=4, log_every=1, keep_last=1,
                            export_name="videotext.safetensors")
    return cfg


@presets.register
def demo() -> VideoTextConfig:
    """`make pretrain`'s stage 2 on the synthetic corpus: a few minutes on a 2-core CPU."""
    cfg = VideoTextConfig()
    cfg.model = ModelConfig(name="fluxvit_tiny_patch14", drop_path_rate=0.0, overrides={"depth": 4})
    cfg.contrast = ContrastConfig(embed_dim=256, temperature=0.07, learnable_temperature=True,
                                  budgets=(128, 96, 64), budget_mode="sample")
    cfg.data = DataConfig(source="synthetic-corpus", root="data/synthetic", batch_size=32,
                          grid=[[8, 56], [4, 84], [6, 70]], normalize="imagenet", num_workers=1)
    cfg.retrieval = RetrievalEvalConfig(budgets=(128, 64), settings=[[8, 56], [4, 84]])
    cfg.optim = OptimConfig(lr=2e-3, weight_decay=0.02, warmup_steps=20, min_lr=1e-5, clip_grad=1.0)
    cfg.train = TrainConfig(run_dir="runs/pretrain/videotext", steps=160, log_every=10, keep_last=1,
                            ckpt_every=80, eval_every=80, export_name="videotext.safetensors")
    return cfg


# ------------------------------------------------------------------------------------------- paper presets
# Flux-CLIP (FluxViT paper, arXiv 2503.14237): Table 16 gives the optimiser, schedule, batches, grid and crop; the rest follows
# InternVideo2's public small-CLIP config (scripts/pretraining/clip/S14/config.py), whose numbers Table 16 matches.
# Every value and its source: RECIPES.md (checked field by field by tests/test_recipes.py).
CORPUS_25M, CORPUS_2M5 = 25_000_000, 2_500_000
PAPER_PROCESSES = 64  # data.batch_size is per process: 64 processes x 64 = the global batch 4096 of Table 16


def _flux_clip(model: str, phase: str) -> VideoTextConfig:
    base = model.endswith("base_patch14")
    cfg = VideoTextConfig()
    cfg.model = ModelConfig(name=model, drop_path_rate=0.1)
    cfg.text = TextConfig(spec="open_clip:MobileCLIP-B:datacompdr_lt", freeze=True, max_length=77)
    # InternVideo2's small CLIP: a learnable temperature starting at 1/100, clamped below at 1/100 before every
    # forward (models/internvideo2_clip_small.py), so it can only rise.
    cfg.contrast = ContrastConfig(embed_dim=512, temperature=0.01, learnable_temperature=True, min_temperature=0.01,
                                  max_temperature=0.0, vision_proj="ln_linear", text_proj="none",
                                  budgets=(2048, 1024), budget_mode="sample")
    if phase == "25m":
        global_batch, lr, epochs, warmup, corpus = 4096, 4e-4, 3, 0.6, CORPUS_25M
    else:  # the 2.5 M post-pretraining phase, initialised from the 25 M phase's export
        global_batch, lr, epochs, warmup, corpus = (2048 if base else 4096), 2e-5, 1, 0.0, CORPUS_2M5
    # Table 16's "MultiScaleCrop [0.5, 1]" is InternVideo2's RandomResizedCrop with area scale (0.5, 1) + flip.
    cfg.data = DataConfig(source="shards", batch_size=global_batch // PAPER_PROCESSES, grid="videotext",
                          num_workers=8, normalize="imagenet", crop="rrc", crop_scale=(0.5, 1.0), flip=True)
    # InternVideo2's scheduler (multi_modality utils/scheduler.py): warm-up from 0.01 x lr, cosine floored at 0.01 x lr.
    cfg.optim = OptimConfig(lr=lr, min_lr=lr * 0.01, weight_decay=0.02, betas=(0.9, 0.98),
                            warmup_fraction=warmup / epochs, clip_grad=0.0, schedule="cosine_floor")
    cfg.epochs, cfg.train_videos = epochs, corpus  # train.steps: resolved at start from the real world size
    cfg.train = TrainConfig(run_dir=f"runs/flux_clip_{phase}_{model}", steps=0,
                            mixed_precision="bf16", log_every=50, ckpt_every=2000,
                            export_name="videotext.safetensors")
    cfg.retrieval = RetrievalEvalConfig(budgets=(2048, 1024, 512), settings=[[8, 224], [16, 224]],
                                        dual_softmax=True, dual_softmax_temperature=1.0)
    return cfg


@presets.register
def paper_s() -> VideoTextConfig:
    """Flux-CLIP for FluxViT-S, 25 M phase (Table 16): frozen MobileCLIP-B text tower, joint dim 512, VTC only,
    learnable temperature from 1/100 (clamped below at 1/100), AdamW (0.9, 0.98) wd 0.02, lr 4e-4, 3 epochs, warmup 0.6 epoch. Set ``data.shards``,
    ``model.init`` (the stage-1 export) and, offline, ``text.weights``. Then ``paper_s_2m5``."""
    return _flux_clip("fluxvit_small_patch14", "25m")


@presets.register
def paper_b() -> VideoTextConfig:
    """Flux-CLIP for FluxViT-B, 25 M phase (see ``paper_s``)."""
    return _flux_clip("fluxvit_base_patch14", "25m")


@presets.register
def paper_s_2m5() -> VideoTextConfig:
    """Flux-CLIP for FluxViT-S, 2.5 M phase (S-MiT, InternVid2M, COCO): lr 2e-5, 1 epoch, no warmup; set
    ``model.init`` to ``paper_s``'s export."""
    return _flux_clip("fluxvit_small_patch14", "2m5")


@presets.register
def paper_b_2m5() -> VideoTextConfig:
    """Flux-CLIP for FluxViT-B, 2.5 M phase (batch 2048, Table 16); see ``paper_s_2m5``."""
    return _flux_clip("fluxvit_base_patch14", "2m5")


def _umt(model: str) -> VideoTextConfig:
    # UMT's stage 2 (FluxViT paper, arXiv 2503.14237): BERT-base text, learnable temperature 0.07 clamped to [0.001, 0.5],
    # trained projections, plain (no dual softmax) retrieval. Of its losses only VTC is implemented here (VTM,
    # MLM and ITM re-ranking are not); the unmasked-teacher alignment is ``align.weight``.
    cfg = _flux_clip(model, "25m")
    # UMT's VTC text encoder runs BERT-base in mode "text": the 9 layers below its fusion_layer 9.
    cfg.text = TextConfig(spec="hf:bert-base-uncased", freeze=False, pooling="cls", max_length=32, num_layers=9)
    cfg.contrast = ContrastConfig(embed_dim=512, temperature=0.07, learnable_temperature=True,
                                  min_temperature=0.001, max_temperature=0.5, vision_proj="linear",
                                  text_proj="linear", budgets=(2048, 1024), budget_mode="sample")
    cfg.train.run_dir = f"runs/umt_{model}"
    cfg.retrieval = RetrievalEvalConfig(budgets=(2048, 1024, 512), settings=[[8, 224]], dual_softmax=False)
    return cfg


@presets.register
def umt_s() -> VideoTextConfig:
    """UMT-style stage 2 for FluxViT-S: BERT-base text tower (trained), learnable temperature, VTC; the
    Flux-CLIP data and schedule of ``paper_s``."""
    return _umt("fluxvit_small_patch14")


@presets.register
def umt_b() -> VideoTextConfig:
    """UMT-style stage 2 for FluxViT-B (see ``umt_s``)."""
    return _umt("fluxvit_base_patch14")
