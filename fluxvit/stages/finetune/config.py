"""Stage 3 (classification finetuning with Flux-Multi) config and named presets.

Batch size convention: ``data.batch_size`` is the per-process micro-batch of *videos*; with repeated augmentation
(``data.num_sample`` = N) a micro-batch holds N clips of each video. The total batch is
``data.batch_size * num_processes * train.grad_accum`` videos. With ``scale_lr`` the release's rule applies:
``optim.lr``, ``optim.min_lr`` and ``optim.warmup_lr`` are per ``lr_batch`` (256) clips and are multiplied by
``total batch * num_sample / lr_batch`` (2e-4 at 64 GPUs x 8 videos x 2 samples -> 8e-4).

``epochs`` > 0 sets the length as the release does: ``train_videos // total batch`` steps per epoch, ``epochs`` and
``warmup_epochs`` of them (resolved at start, when the number of processes is known; the saved config has the
resulting ``train.steps`` / ``optim.warmup_steps``). Every value of the paper / release presets and its source:
RECIPES.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fluxvit.datasets import DataConfig

from ..common.config import ModelConfig, OptimConfig, PresetRegistry, TrainConfig

__all__ = ["AugConfig", "EvalConfig", "FinetuneConfig", "FluxLossConfig", "ModelConfig", "presets"]


@dataclass
class FluxLossConfig:
    """Flux-Multi (FluxViT paper, arXiv 2503.14237) or Flux-Single.

    mode "multi": every clip at each of ``budgets`` with ``heads`` in ONE packed forward;
    loss = sum_j CE(head_j at budgets[j]) + align_weight * sum_{j>0} SmoothL1(dec_{j-1}(p_j), sg(norm(p_0))).
    mode "single": the clip at ``single_budget`` with head ``single_head`` and CE only (the release's Flux-Single
    scripts: 2048 tokens, head 1). A budget of 0 keeps every token (no selection).
    selection: "dynamic" (group-dynamic selector) or "random" (uniform random tokens, an ablation).
    """

    mode: str = "multi"
    budgets: tuple = (3072, 2048, 1024)
    heads: tuple = (0, 1, 2)
    single_budget: int = 2048
    single_head: int = 1
    align_weight: float = 1.0
    smooth_l1_beta: float = 1.0
    selection: str = "dynamic"


@dataclass
class AugConfig:
    """Batch-level label mixing, run in the task on the device (timm ``Mixup``, batch mode; 0 disables each part):
    mixup / cutmix alphas, ``mix_prob`` / ``switch_prob``, label smoothing folded into the targets. The per-clip
    augmentation (RandAugment, crop, flip, random erasing, repeated augmentation) is the data section's
    (``data.randaug``, ``data.crop_scale``, ``data.reprob``, ``data.num_sample``; ``fluxvit.datasets.augment``)."""

    mixup: float = 0.8
    cutmix: float = 1.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1


@dataclass
class EvalConfig:
    """Multi-view evaluation: ``num_clips`` temporal clips x ``num_crops`` spatial crops (softmax averaged) at
    ``frames`` x ``resolution``, for each token budget in ``budgets`` (0 = all tokens) with the nearest trained
    head. ``split`` is the validation split of the synthetic corpus (or ``data.val_shards`` for shards);
    ``max_videos`` caps the number of videos (0 = all)."""

    frames: int = 8
    resolution: int = 224
    num_clips: int = 4
    num_crops: int = 3
    budgets: tuple = (2048,)
    split: str = "val"
    max_videos: int = 0
    batch_size: int = 8


@dataclass
class FinetuneConfig:
    """Everything a stage-3 run needs; saved as ``config.json``/``config.yaml`` in the run directory.

    ``data.source``: "synthetic-motion" (the synthetic corpus's clips and motion labels rendered in memory,
    no decoding), "synthetic-corpus" (its mp4 shards under ``data.root``) or "shards" (labels from ``cls`` /
    json ``label``).
    """

    model: ModelConfig = field(default_factory=lambda: ModelConfig(num_classes=400))
    loss: FluxLossConfig = field(default_factory=FluxLossConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(grid="distill"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    layer_decay: float = 0.75
    scale_lr: bool = True
    lr_batch: int = 256
    epochs: float = 0.0
    warmup_epochs: float = 0.0
    train_videos: int = 0


presets = PresetRegistry("finetune")

# The tiny model's budgets keep the 3 : 2 : 1 ratio of 3072 / 2048 / 1024 at CPU scale.
_TINY_BUDGETS = (192, 128, 64)


@presets.register
def smoke() -> FinetuneConfig:
    """Tiny FluxViT on the synthetic corpus's motion labels (8 classes), rendered in memory: 12 steps, 1-3 minutes
    on a shared 2-core CPU (a pipeline check, not a trained model)."""
    return FinetuneConfig(
        model=ModelConfig(name="fluxvit_tiny_patch14", num_classes=8, drop_path_rate=0.0,
                          overrides={"head_budgets": _TINY_BUDGETS}),
        loss=FluxLossConfig(mode="multi", budgets=_TINY_BUDGETS, heads=(0, 1, 2), single_budget=_TINY_BUDGETS[1],
                            single_head=1),
        aug=AugConfig(mixup=0.0, cutmix=0.0, label_smoothing=0.1),
        data=DataConfig(source="synthetic-motion", batch_size=4, grid=[[4, 84], [8, 56], [6, 70], [8, 70]],
                        flip=False, num_clips=400, num_val_clips=16),
        optim=OptimConfig(lr=1e-3, min_lr=1e-5, weight_decay=0.05, betas=(0.9, 0.999), warmup_steps=5,
                          clip_grad=1.0),
        train=TrainConfig(run_dir="runs/finetune_smoke", steps=12, log_every=4, ckpt_every=6, keep_last=2,
                          seed=0, export_name="model.safetensors"),
        eval=EvalConfig(frames=8, resolution=70, num_clips=2, num_crops=1, budgets=(0, 64), max_videos=16,
                        batch_size=8),
        layer_decay=0.75,
        scale_lr=False,
    )


# CPU-scale experiment behind benchmarks/finetune_claims.py: the tiny config narrowed to width 96 and depth 3, with
# LayerScale 0.1 (CaiT's value for shallow models) since it trains from scratch; budgets 3 : 2 : 1 of 96 tokens.
MICRO_ARCH = {"embed_dim": 96, "depth": 3, "num_heads": 3, "clip_embed_dim": 96, "attn_pool_num_heads": 4,
              "init_values": 0.1}
MICRO_BUDGETS = (96, 64, 32)


def _micro(mode: str, budgets: tuple, grids: list, steps: int, min_lr: float, run_dir: str) -> FinetuneConfig:
    return FinetuneConfig(
        model=ModelConfig(name="fluxvit_tiny_patch14", num_classes=8, drop_path_rate=0.0,
                          overrides={**MICRO_ARCH, "head_budgets": MICRO_BUDGETS}),
        # Flux-Single, as the release's 2048 / head 1 of 3072 / 2048 / 1024: the middle budget and head.
        loss=FluxLossConfig(mode=mode, budgets=budgets, heads=tuple(range(len(budgets))),
                            single_budget=budgets[len(budgets) // 2], single_head=len(budgets) // 2),
        aug=AugConfig(mixup=0.0, cutmix=0.0, label_smoothing=0.1),
        data=DataConfig(source="synthetic-motion", batch_size=16, grid=grids, flip=False, num_clips=100_000,
                        num_val_clips=200),
        optim=OptimConfig(lr=1e-3, min_lr=min_lr, weight_decay=0.05, betas=(0.9, 0.999), warmup_steps=100,
                          clip_grad=1.0),
        train=TrainConfig(run_dir=run_dir, steps=steps, log_every=250, ckpt_every=500, keep_last=1, seed=0,
                          export_name="model.safetensors", tensorboard=False),
        eval=EvalConfig(frames=8, resolution=56, num_clips=1, num_crops=1, budgets=(0, 96, 64, 32), max_videos=200,
                        batch_size=50),
        layer_decay=1.0,
        scale_lr=False,
    )


@presets.register
def micro_scratch() -> FinetuneConfig:
    """The shared starting point of the stage-3 claims (``benchmarks/finetune_claims.py``): a micro FluxViT trained
    from scratch on the synthetic corpus's motion classes with every token of 8 x 56 clips (no selection), constant
    lr 1e-3, 6000 steps of 16 clips (about 30 min on one core; the claims script stops at 3000). Training clips are drawn from the first 100 000
    clips of the corpus generator's train split (rendered in memory; the written corpus holds the first 1000).
    Whether it leaves the initial loss plateau depends on the seed (README, stage 3)."""
    return _micro("single", (0,), [[8, 56]], 6000, 1e-3, "runs/micro_scratch")


@presets.register
def micro_multi() -> FinetuneConfig:
    """Flux-Multi finetuning of the micro FluxViT (set ``model.init``, e.g. ``micro_scratch``'s export):
    budgets 96 / 64 / 32 with heads 0 / 1 / 2 on Flux grids of 6-8 frames x 56-70 px (96-200 tokens), cosine lr
    1e-3 -> 1e-5, 1500 steps. ``--set loss.mode=single`` is the Flux-Single baseline (budget 64, head 1)."""
    return _micro("multi", MICRO_BUDGETS, [[6, 56], [8, 56], [6, 70], [8, 70]], 1500, 1e-5, "runs/micro_multi")


# ----------------------------------------------------------------------------------------- release presets
# The release recipe (FluxViT paper, arXiv 2503.14237; OpenGVLab/FluxViT single_modality: run_flexible_finetune.py defaults and
# exp/*/k400 scripts) and the schedules of Table 15. Every value and its source: RECIPES.md.
RELEASE_PROCESSES = 64  # the release scripts: 64 GPUs; data.batch_size is per process
TRAIN_VIDEOS = {"k710": 658_340, "k400": 240_436, "ssv2": 168_913, "coin": 9_030}  # [inferred] usual list sizes
NUM_CLASSES = {"k710": 710, "k400": 400, "ssv2": 174, "coin": 180}
# (epochs, warmup epochs, total batch, base lr) per dataset and size: Table 15 (COIN: lr 5e-4), except where the
# release's scripts say otherwise (they come first: RECIPES.md): its K400 FluxViT-B script runs 5 epochs (Table 15: 3).
# Table 15 has no SSv2 column: SSv2 takes K710's schedule (a choice).
SCHEDULES = {
    ("k710", "small"): (35, 5, 1024, 2e-4), ("k710", "base"): (20, 5, 1024, 2e-4),
    ("k400", "small"): (5, 1, 512, 2e-4), ("k400", "base"): (5, 1, 512, 2e-4),
    ("ssv2", "small"): (35, 5, 1024, 2e-4), ("ssv2", "base"): (20, 5, 1024, 2e-4),
    ("coin", "small"): (40, 5, 512, 5e-4), ("coin", "base"): (25, 5, 512, 5e-4),
}


def _release(dataset: str, size: str) -> FinetuneConfig:
    name = f"fluxvit_{size}_patch14"
    epochs, warmup, total_batch, lr = SCHEDULES[(dataset, size)]
    return FinetuneConfig(
        model=ModelConfig(name=name, num_classes=NUM_CLASSES[dataset], drop_path_rate=0.1,
                          init=f"runs/finetune_k710_{size}/model.safetensors" if dataset == "k400" else "",
                          init_class_map="first" if dataset == "k400" else ""),
        loss=FluxLossConfig(mode="multi", budgets=(3072, 2048, 1024), heads=(0, 1, 2), single_budget=2048,
                            single_head=1),
        aug=AugConfig(mixup=0.8, cutmix=1.0, mix_prob=1.0, switch_prob=0.5, label_smoothing=0.1),
        data=DataConfig(source="shards", batch_size=total_batch // RELEASE_PROCESSES, num_workers=12,
                        grid="finetune", num_frames=8, img_size=224, normalize="imagenet",
                        crop="rrc", crop_scale=(0.08, 1.0), randaug="rand-m7-n4-mstd0.5-inc1", reprob=0.25,
                        num_sample=2, flip=dataset != "ssv2"),
        optim=OptimConfig(lr=lr, min_lr=1e-6, warmup_lr=1e-6, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8,
                          clip_grad=0.0),
        train=TrainConfig(run_dir=f"runs/finetune_{dataset}_{size}", steps=0, mixed_precision="bf16",
                          log_every=50, ckpt_every=1000, keep_last=3, export_name="model.safetensors"),
        eval=EvalConfig(frames=8, resolution=224, num_clips=4, num_crops=3, budgets=(3072, 2048, 1024, 512)),
        layer_decay=0.75,
        scale_lr=True,
        lr_batch=256,
        epochs=epochs,
        warmup_epochs=warmup,
        train_videos=TRAIN_VIDEOS[dataset],
    )


@presets.register
def k710_small() -> FinetuneConfig:
    """Release recipe, FluxViT-S on K710 (Table 15: 35 epochs, batch 1024, warmup 5); set data.shards,
    data.val_shards and model.init (the stage-1/2 export). Then ``k400_small``."""
    return _release("k710", "small")


@presets.register
def k710_base() -> FinetuneConfig:
    """Release recipe, FluxViT-B on K710 (Table 15: 20 epochs, batch 1024, warmup 5). Then ``k400_base``."""
    return _release("k710", "base")


@presets.register
def k400_small() -> FinetuneConfig:
    """Release recipe, FluxViT-S on K400 initialised from ``k710_small``'s export (Table 15: 5 epochs, batch 512,
    warmup 1; the release script: 64 GPUs x 8 videos x 2 samples)."""
    return _release("k400", "small")


@presets.register
def k400_base() -> FinetuneConfig:
    """Release recipe, FluxViT-B on K400 initialised from ``k710_base``'s export (the release's K400 script: 5 epochs,
    warmup 1; Table 15 prints 3 epochs; batch 512)."""
    return _release("k400", "base")


@presets.register
def ssv2_small() -> FinetuneConfig:
    """Release recipe on Something-Something v2, FluxViT-S: no flip (left / right is the label)."""
    return _release("ssv2", "small")


@presets.register
def ssv2_base() -> FinetuneConfig:
    """Release recipe on Something-Something v2, FluxViT-B: no flip."""
    return _release("ssv2", "base")


@presets.register
def coin_small() -> FinetuneConfig:
    """Release recipe on COIN, FluxViT-S (Table 15: lr 5e-4, batch 512, warmup 5, 40 epochs)."""
    return _release("coin", "small")


@presets.register
def coin_base() -> FinetuneConfig:
    """Release recipe on COIN, FluxViT-B (Table 15: lr 5e-4, batch 512, warmup 5, 25 epochs)."""
    return _release("coin", "base")
