"""Inference precision of the pretrained-model loaders: full float32, or bfloat16 autocast.

The feature front-ends (fbank) stay float32 under autocast; the loaders give float32 results either way.

Example
-------
>>> resolve_precision("fp32"), PRECISIONS
(torch.float32, ('fp32', 'bf16'))
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["PRECISIONS", "autocast", "resolve_precision"]

PRECISIONS = ("fp32", "bf16")
"""Inference precisions: full float32, or bfloat16 autocast (the feature front-ends stay float32)."""


def resolve_precision(precision: str) -> torch.dtype:
    """``fp32`` -> ``torch.float32``, ``bf16`` -> ``torch.bfloat16`` (a ``ValueError`` lists the valid names).

    Example
    -------
    >>> resolve_precision("bf16")
    torch.bfloat16
    >>> resolve_precision("fp16")
    Traceback (most recent call last):
    ...
    ValueError: precision 'fp16': expected one of fp32, bf16
    """
    import torch  # on use: the command runner imports this module on torch-free paths too

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if precision not in dtypes:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    return dtypes[precision]


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """A context that runs the model at ``precision`` on ``device`` (no-op for ``fp32``).

    Example
    -------
    >>> import torch
    >>> with autocast(torch.device("cpu"), "bf16"):
    ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
    torch.bfloat16
    """
    import torch

    dtype = resolve_precision(precision)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
