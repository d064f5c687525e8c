"""Lengths and masks: the one place where ``lobes`` converts between them.

Conventions used across ``lobes``:

* relative lengths (SpeechBrain's ``wav_lens``) are floats in ``(0, 1]``, a fraction of the padded length;
* absolute lengths are integer counts (samples or frames);
* a *mask* is ``True`` where a position is valid; a *padding mask* is ``True`` where it is padding;
* Kaldi frame counts (``snip_edges=True``) come from :func:`num_frames`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "lengths_to_mask",
    "lengths_to_padding_mask",
    "num_frames",
    "relative_to_absolute",
    "to_sample_lengths",
    "zero_padding",
]


def relative_to_absolute(wav_lens: Tensor, max_len: int) -> Tensor:
    """Convert relative lengths in ``(0, 1]`` to integer lengths (rounded, like SpeechBrain).

    Arguments
    ---------
    wav_lens : torch.Tensor
        Relative lengths, shape ``(B,)``, floating point, each in ``(0, 1]``.
    max_len : int
        The padded length the fractions refer to.

    Returns
    -------
    torch.Tensor
        ``(B,)`` int64 lengths in ``[0, max_len]``.

    Example
    -------
    >>> relative_to_absolute(torch.tensor([1.0, 0.5, 0.25]), 16000)
    tensor([16000,  8000,  4000])
    """
    if not torch.is_tensor(wav_lens) or not wav_lens.is_floating_point():
        raise TypeError("relative lengths must be a floating-point tensor of shape (B,) with values in (0, 1]")
    return torch.round(wav_lens.double() * max_len).long().clamp_(0, max_len)


def to_sample_lengths(lengths: Tensor | None, batch: int, max_len: int, device=None) -> Tensor:
    """Normalise a lengths argument to integer sample counts.

    A floating-point tensor is read as relative lengths in ``(0, 1]``; an integer tensor as absolute
    counts in ``[0, max_len]``; ``None`` means every row is ``max_len`` long.

    Arguments
    ---------
    lengths : torch.Tensor or None
        ``(B,)`` relative (float) or absolute (integer) lengths.
    batch : int
        Expected batch size ``B``.
    max_len : int
        Padded length ``T``.
    device : torch.device, optional
        Device of the result (default: that of ``lengths``, or CPU).

    Returns
    -------
    torch.Tensor
        ``(B,)`` int64 lengths.

    Example
    -------
    >>> to_sample_lengths(torch.tensor([1.0, 0.5]), 2, 800)
    tensor([800, 400])
    >>> to_sample_lengths(torch.tensor([800, 123]), 2, 800)
    tensor([800, 123])
    """
    if lengths is None:
        return torch.full((batch,), max_len, dtype=torch.long, device=device)
    if not torch.is_tensor(lengths):
        raise TypeError(f"lengths must be a tensor of shape ({batch},), got {type(lengths).__name__}")
    if lengths.dim() != 1 or lengths.shape[0] != batch:
        raise ValueError(f"lengths must have shape ({batch},) (one per row), got {tuple(lengths.shape)}")
    if lengths.is_floating_point():
        if not torch.isfinite(lengths).all() or (lengths <= 0).any() or (lengths > 1.0 + 1e-6).any():
            raise ValueError(
                "relative lengths must lie in (0, 1] (a fraction of the padded length), got "
                f"{lengths.tolist()}; pass an integer tensor for lengths in samples"
            )
        out = relative_to_absolute(lengths, max_len)
    elif lengths.dtype == torch.bool or lengths.is_complex():
        raise TypeError(f"lengths must be float (relative) or integer (absolute), got {lengths.dtype}")
    else:
        if (lengths < 0).any() or (lengths > max_len).any():
            raise ValueError(f"absolute lengths must lie in [0, {max_len}], got {lengths.tolist()}")
        out = lengths.long()
    return out if device is None else out.to(device)


def num_frames(num_samples: Tensor | int, window_size: int = 400, window_shift: int = 160) -> Tensor | int:
    """Number of Kaldi frames (``snip_edges=True``) in ``num_samples`` samples.

    Arguments
    ---------
    num_samples : torch.Tensor or int
        Sample counts (any shape) or one count.
    window_size : int
        Frame length in samples (400 = 25 ms at 16 kHz).
    window_shift : int
        Frame shift in samples (160 = 10 ms at 16 kHz).

    Returns
    -------
    torch.Tensor or int
        Frame counts, ``0`` where fewer than ``window_size`` samples.

    Example
    -------
    >>> num_frames(torch.tensor([0, 399, 400, 16000]))
    tensor([ 0,  0,  1, 98])
    """
    if torch.is_tensor(num_samples):
        n = num_samples.long()
        return torch.where(n >= window_size, 1 + torch.div(n - window_size, window_shift, rounding_mode="floor"), 0)
    return 0 if num_samples < window_size else 1 + (num_samples - window_size) // window_shift


def lengths_to_mask(lengths: Tensor, max_len: int | None = None) -> Tensor:
    """Boolean mask ``(B, max_len)``, ``True`` at valid positions.

    Arguments
    ---------
    lengths : torch.Tensor
        ``(B,)`` lengths, integer or float (rounded to the nearest integer).
    max_len : int, optional
        Width of the mask (default: ``lengths.max()``).

    Returns
    -------
    torch.Tensor
        ``(B, max_len)`` bool.

    Example
    -------
    >>> lengths_to_mask(torch.tensor([3, 1]), 4)
    tensor([[ True,  True,  True, False],
            [ True, False, False, False]])
    """
    if lengths.dim() != 1:
        raise ValueError(f"expected lengths of shape (B,), got {tuple(lengths.shape)}")
    if lengths.is_floating_point():  # absolute lengths derived from relative ones carry rounding error
        lengths = lengths.round().long()
    if max_len is None:
        max_len = int(lengths.max()) if lengths.numel() else 0
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def lengths_to_padding_mask(lengths: Tensor, max_len: int | None = None) -> Tensor:
    """Boolean padding mask ``(B, max_len)``, ``True`` at padded positions (the complement of
    :func:`lengths_to_mask`).

    Arguments
    ---------
    lengths : torch.Tensor
        ``(B,)`` lengths, integer or float (rounded to the nearest integer).
    max_len : int, optional
        Width of the mask (default: ``lengths.max()``).

    Returns
    -------
    torch.Tensor
        ``(B, max_len)`` bool.

    Example
    -------
    >>> lengths_to_padding_mask(torch.tensor([3, 1]), 4).shape
    torch.Size([2, 4])
    """
    return ~lengths_to_mask(lengths, max_len)


def zero_padding(x: Tensor, pad_mask: Optional[Tensor]) -> Tensor:
    """Zero the padded time steps of ``x``.

    Arguments
    ---------
    x : torch.Tensor
        ``(B, T, ...)`` values.
    pad_mask : torch.Tensor or None
        ``(B, T)`` bool, ``True`` at padding; ``None`` returns ``x`` unchanged.

    Returns
    -------
    torch.Tensor
        ``x`` with zeros at the padded steps, same shape.

    Example
    -------
    >>> zero_padding(torch.ones(1, 3, 2), torch.tensor([[False, False, True]]))[0, :, 0]
    tensor([1., 1., 0.])
    """
    if pad_mask is None:
        return x
    keep = ~pad_mask.reshape(pad_mask.shape + (1,) * (x.dim() - 2))  # (B, T, 1, ...)
    return x.masked_fill(~keep, 0.0)
