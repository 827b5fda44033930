"""A counter of host reads of tensor values (each one a host-device synchronisation on CUDA), for tests."""
import sys

import torch
from torch.overrides import TorchFunctionMode

# Tensor methods that read a value back to the host (on CUDA each waits for the queued kernels).
SYNC_METHODS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
                torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.nonzero,
                torch.Tensor.cpu}


class SyncCounter(TorchFunctionMode):
    """Counts calls of ``SYNC_METHODS`` while active. Reads made inside ``torch.optim`` are left out: its step
    counters are CPU tensors on every device (reading them waits for nothing)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SYNC_METHODS and not _called_from_optim():
            self.count += 1
        return func(*args, **(kwargs or {}))


def _called_from_optim(depth: int = 4) -> bool:
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        if "torch/optim/" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False
