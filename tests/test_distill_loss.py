"""Stage 1's loss on hand-built features: identical features give 0, orthogonal ones give 2 per term, and each
student layer is compared with the teacher layer the official pairing assigns to it (not a neighbour)."""
from types import SimpleNamespace

import pytest
import torch

from fluxvit.stages.common.teacher import TeacherOutput
from fluxvit.stages.distill.config import LossConfig
from fluxvit.stages.distill.task import DistillTask, align_layers

DIM = 16  # one-hot feature space: index l stands for "teacher block l", POOL for the pooled feature
POOL = 15


def _onehot(i: int, n: int = 1) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.full((n,), i), DIM).float()


class _Teacher:
    """Every token of teacher block l is the unit vector e_l; the pooled feature is e_POOL."""

    def __call__(self, video, grid, layers):
        B, N = video.shape[0], grid[0] * grid[1] * grid[2]
        tokens = {layer: _onehot(layer, B * N).view(B, N, DIM) for layer in layers}
        return TeacherOutput(tokens=tokens, pooled=_onehot(POOL, B), cls_attn=torch.rand(B, N),
                             valid=torch.ones(B, N, dtype=torch.bool), cls={layer: _onehot(layer, B) for layer in layers})


class _Student:
    """Decoded rows for student layer s: e_{layer_of[s]} on every row (cls + kept tokens of every view)."""

    def __init__(self, layer_of: dict, pooled: int):
        self.layer_of, self.pooled = layer_of, pooled

    def __call__(self, views, keeps, heads):
        lengths = [1 + len(k) for k in keeps]
        n = sum(lengths)
        cu = torch.tensor([0] + lengths).cumsum(0)
        preds = {s: _onehot(t, n) for s, t in self.layer_of.items()}
        return preds, _onehot(self.pooled, len(views)), cu, n - len(views)


def _task(student_depth=4, teacher_depth=12, num_layers=2):
    task = DistillTask.__new__(DistillTask)  # no real student or teacher: the loss alone
    loss = LossConfig(num_layers=num_layers, budgets=(6, 3), sampling="clip")
    task.cfg = SimpleNamespace(loss=loss)
    task.pairs = align_layers(student_depth, teacher_depth, num_layers)
    task.heads = [0, 1]
    task.teacher = _Teacher()
    task.patch = 14
    return task


VIDEO = torch.zeros(2, 3, 2, 28, 28)  # 2 clips of 2 x 2 x 2 = 8 tokens


def test_official_pairing_of_student_and_teacher_blocks():
    # official rule: block depth - i - 1 for i < K on both sides, ascending, paired in order
    assert align_layers(4, 12, 2) == [(2, 10), (3, 11)]
    assert align_layers(12, 40, 3, teacher_interval=3.34) == [(9, 33), (10, 36), (11, 39)]


def test_identical_features_give_zero():
    task = _task()
    terms, _ = task.forward_loss(_Student({2: 10, 3: 11}, POOL), VIDEO, torch.Generator().manual_seed(0))
    assert terms["tok"].item() == 0.0 and terms["pool"].item() == 0.0 and terms["loss"].item() == 0.0
    assert terms["cos_l2"].item() == 1.0 and terms["cos_l3"].item() == 1.0


def test_orthogonal_features_give_two():
    task = _task()
    terms, _ = task.forward_loss(_Student({2: 5, 3: 6}, 0), VIDEO, torch.Generator().manual_seed(0))
    assert terms["tok"].item() == pytest.approx(2.0) and terms["pool"].item() == pytest.approx(2.0)
    assert terms["loss"].item() == pytest.approx(4.0)  # token_weight 1 * 2 + pooled_weight 1 * 2


def test_each_student_layer_is_compared_with_its_paired_teacher_layer():
    task = _task()
    g = torch.Generator().manual_seed(0)
    crossed, _ = task.forward_loss(_Student({2: 11, 3: 10}, POOL), VIDEO, g)  # each matches the other's teacher
    assert crossed["cos_l2"].item() == 0.0 and crossed["cos_l3"].item() == 0.0 and crossed["tok"].item() == 2.0
    half, _ = task.forward_loss(_Student({2: 10, 3: 10}, POOL), VIDEO, g)  # only student block 2 is right
    assert half["cos_l2"].item() == 1.0 and half["cos_l3"].item() == 0.0
    assert half["tok"].item() == pytest.approx(1.0)  # the mean over the two pairs of (0, 2)
