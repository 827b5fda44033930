"""Shared pytest setup: the `gpu` marker's skip rule, a free TCP port for launches, a fresh accelerate state, and the
toy config / batch source the loop tests train on."""
import os
import socket
from dataclasses import dataclass, field

import pytest
import torch

from fluxvit.stages.common.config import OptimConfig, TrainConfig

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not item.keywords: it holds path names too
            item.add_marker(skip)


@pytest.fixture
def free_port() -> int:
    """A TCP port nothing listens on now (for ``accelerate launch --main_process_port``): the OS picks it, so
    concurrent test runs on one machine do not collide on a fixed number."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ shared loop scaffolding
def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state, so that the next ``build_accelerator`` starts from scratch."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Every test starts from a fresh accelerate state: accelerate keeps one per process, and a test that built an
    accelerator with other settings (bf16, fp16, ...) would make the next one's ``Accelerator()`` refuse them, so
    the outcome would depend on which tests ran before."""
    reset_accelerate_state()
    yield


@dataclass
class ToyConfig:
    """The smallest stage config ``fit`` takes: ``train`` and ``optim`` sections."""

    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


class ToySource:
    """A batch source for toy regression tasks: micro-batch n (``x`` (8, 4), ``y = x.sum(1)``) is a fixed function
    of n, so a resumed run sees the same stream."""

    skipped = 0

    def batches(self, start):
        n = start
        while True:
            x = torch.randn(8, 4, generator=torch.Generator().manual_seed(n))
            yield {"x": x, "y": x.sum(1, keepdim=True)}
            n += 1
