"""Precision of the models: full float32, or bfloat16 autocast.

The feature front-ends (fbank) stay float32 under autocast; the loaders give float32 results either way.

bfloat16 pays only where the hardware computes it: CUDA GPUs that support it, and CPUs with AVX512-BF16 or AMX.
Elsewhere (AVX2-only x86, most ARM) torch emulates it, and a bfloat16 matrix product is one to two orders of
magnitude slower than the float32 one (2026-12-02, AMD EPYC with AVX2, 4096 x 1024 @ 1024 x 1024, 2 threads:
float32 0.06 s, bfloat16 9.7 s). :func:`native_bfloat16` tells which case a device is; the recipes train in
float32 where it is False (:func:`lobes.recipe.resolve_training_precision`), the inference commands warn.

Example
-------
>>> resolve_precision("fp32"), PRECISIONS
(torch.float32, ('fp32', 'bf16'))
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["FORCE_BF16_ENV", "PRECISIONS", "autocast", "native_bfloat16", "resolve_precision", "warn_if_emulated"]

PRECISIONS = ("fp32", "bf16")
"""Inference precisions: full float32, or bfloat16 autocast (the feature front-ends stay float32)."""

FORCE_BF16_ENV = "LOBES_FORCE_BF16"
"""Set to 1 to train in bfloat16 even where :func:`native_bfloat16` says the device only emulates it."""

_warned: set[str] = set()


def native_bfloat16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bfloat16 in hardware (else torch emulates it, far slower than float32).

    CUDA: ``torch.cuda.is_bf16_supported()``; CPU: AVX512-BF16 or AMX present; other devices: assumed.

    Example
    -------
    >>> native_bfloat16("cpu") in (True, False)
    True
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return True


def warn_if_emulated(device: torch.device | str, precision: str, what: str) -> None:
    """Log a warning (once per device and caller) when ``precision`` is bf16 and ``device`` only emulates it."""
    import torch

    key = f"{what}:{torch.device(device)}"
    if precision == "bf16" and not native_bfloat16(device) and key not in _warned:
        _warned.add(key)
        logging.getLogger(what).warning(
            "%s: bf16 on %s, which has no native bfloat16 (AVX512-BF16 / AMX on CPUs): torch emulates it, "
            "often 10-100x slower than fp32; pass --precision fp32",
            what,
            torch.device(device),
        )


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
    warn_if_emulated(device, precision, "lobes.inference")
    return torch.autocast(device.type, dtype=dtype)
