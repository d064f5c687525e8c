"""Largest tensor storage created by a computation, seen at the operator level (forward and backward)."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _LargestStorage(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def largest_storage(step) -> int:
    """Bytes of the largest storage any operator produced while ``step()`` ran."""
    with _LargestStorage() as probe:
        step()
    return probe.largest
