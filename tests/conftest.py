"""Shared pytest setup: deterministic CPU threads, the `gpu` marker's skip rule, a free TCP port for launches."""
import os
import socket

import pytest
import torch

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
