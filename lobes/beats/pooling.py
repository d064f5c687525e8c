"""Token validity, pooling and tagging utilities for BEATs features.

Token ``t * F + f`` (``F = 128 // patch_size`` frequency patches) is valid when its whole time patch of
``patch_size`` Kaldi frames (25 ms every 10 ms) lies inside the row's valid samples; masks here are
*padding* masks (``True`` = padded token), as BEATs returns them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lobes.masks import lengths_to_padding_mask, num_frames, to_sample_lengths

__all__ = [
    "NUM_MEL_BINS",
    "AttentivePooling",
    "WeightedLayerSum",
    "masked_mean",
    "min_num_samples",
    "token_padding_mask",
    "top_k_labels",
    "valid_token_counts",
]

NUM_MEL_BINS = 128
_WINDOW, _SHIFT = 400, 160  # 25 ms / 10 ms at 16 kHz


def min_num_samples(patch_size: int = 16) -> int:
    """Fewest samples (16 kHz) giving one token row: ``patch_size`` frames of 25 ms every 10 ms.

    Example
    -------
    >>> min_num_samples()
    2800
    """
    return _WINDOW + (patch_size - 1) * _SHIFT


def valid_token_counts(wav: Tensor, wav_lens: Tensor | None = None, patch_size: int = 16) -> Tensor:
    """Number of valid tokens per row: ``(frames(valid samples) // patch_size) * (128 // patch_size)``.

    Arguments
    ---------
    wav : torch.Tensor
        ``(B, N)`` waveforms (only the shape and device are used).
    wav_lens : torch.Tensor, optional
        ``(B,)`` relative lengths in ``(0, 1]`` (or integer sample counts).
    patch_size : int
        Patch size in frames and mel bins.

    Returns
    -------
    torch.Tensor
        ``(B,)`` int64 token counts.

    Example
    -------
    >>> valid_token_counts(torch.zeros(2, 160000), torch.tensor([1.0, 0.5]))
    tensor([496, 248])
    """
    samples = to_sample_lengths(wav_lens, wav.shape[0], wav.shape[-1], device=wav.device)
    return (num_frames(samples, _WINDOW, _SHIFT) // patch_size) * (NUM_MEL_BINS // patch_size)


def token_padding_mask(wav: Tensor, wav_lens: Tensor | None = None, patch_size: int = 16) -> Tensor:
    """Token padding mask ``(B, T)``, ``True`` at padded tokens, as BEATs returns it.

    Arguments
    ---------
    wav : torch.Tensor
        ``(B, N)`` waveforms (only the shape and device are used).
    wav_lens : torch.Tensor, optional
        ``(B,)`` relative lengths in ``(0, 1]`` (or integer sample counts).
    patch_size : int
        Patch size in frames and mel bins.

    Returns
    -------
    torch.Tensor
        ``(B, T)`` bool with ``T = (frames(N) // patch_size) * (128 // patch_size)``.

    Example
    -------
    >>> token_padding_mask(torch.zeros(2, 32000), torch.tensor([1.0, 0.5])).sum(1)
    tensor([ 0, 48])
    """
    f_patches = NUM_MEL_BINS // patch_size
    t_total = num_frames(wav.shape[-1], _WINDOW, _SHIFT) // patch_size
    t_valid = valid_token_counts(wav, wav_lens, patch_size) // f_patches  # (B,) valid time patches
    pad = lengths_to_padding_mask(t_valid, t_total)  # (B, T_time)
    return pad.repeat_interleave(f_patches, dim=1)  # (B, T_time * F)


def masked_mean(x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
    """Mean over valid tokens.

    Arguments
    ---------
    x : torch.Tensor
        ``(B, T, C)`` features.
    padding_mask : torch.Tensor, optional
        ``(B, T)`` bool, ``True`` at padded tokens (every row needs one valid token).

    Returns
    -------
    torch.Tensor
        ``(B, C)``.

    Example
    -------
    >>> x = torch.ones(2, 5, 3); mask = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]]).bool()
    >>> masked_mean(x, mask).shape
    torch.Size([2, 3])
    """
    if padding_mask is None:
        return x.mean(dim=1)
    valid = (~padding_mask).to(x.dtype).unsqueeze(-1)  # (B, T, 1)
    return (x * valid).sum(dim=1) / valid.sum(dim=1).clamp_min(1.0)


def top_k_labels(probs: Tensor, labels: dict | list | None = None, k: int = 5) -> list[list[tuple[str, float]]]:
    """The ``k`` most probable labels of each row.

    Arguments
    ---------
    probs : torch.Tensor
        ``(B, classes)`` class probabilities.
    labels : dict or list, optional
        Index -> label name (a checkpoint's ``label_dict``); ``None`` gives ``"class_<i>"``.
    k : int
        How many labels per row.

    Returns
    -------
    list of list of (str, float)
        Per row, ``(label, probability)`` sorted by decreasing probability.

    Example
    -------
    >>> tags = top_k_labels(torch.tensor([[0.1, 0.9, 0.5]]), ["dog", "cat", "bird"], k=2)
    >>> [(name, round(p, 2)) for name, p in tags[0]]
    [('cat', 0.9), ('bird', 0.5)]
    """
    k = min(k, probs.shape[-1])
    values, idx = probs.float().topk(k, dim=-1)
    out = []
    for vrow, irow in zip(values.tolist(), idx.tolist()):
        out.append([(str(labels[i]) if labels is not None else f"class_{i}", v) for v, i in zip(vrow, irow)])
    return out


class WeightedLayerSum(nn.Module):
    """Learnable softmax-weighted sum of hidden layers (SUPERB-style), for downstream heads.

    Arguments
    ---------
    num_layers : int
        Number of stacked hiddens ``L`` (``encoder_layers + 1`` for BEATs' ``output_all_hiddens``).

    Example
    -------
    >>> hiddens = torch.randn(13, 2, 40, 768)
    >>> WeightedLayerSum(13)(hiddens).shape
    torch.Size([2, 40, 768])
    """

    def __init__(self, num_layers: int) -> None:
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(num_layers))

    def forward(self, hiddens: Tensor) -> Tensor:
        """``(L, B, T, C)`` -> ``(B, T, C)``."""
        if hiddens.dim() != 4 or hiddens.shape[0] != self.weights.shape[0]:
            raise ValueError(
                f"expected hiddens of shape ({self.weights.shape[0]}, B, T, C), got {tuple(hiddens.shape)}"
            )
        w = torch.softmax(self.weights, dim=0).to(hiddens.dtype)
        return torch.einsum("l,lbtc->btc", w, hiddens)


class AttentivePooling(nn.Module):
    """Attention pooling over valid tokens: ``softmax(w . tanh(W x))``-weighted mean.

    Arguments
    ---------
    input_size : int
        Feature size ``C``.
    hidden_size : int
        Size of the scoring layer.

    Example
    -------
    >>> pool = AttentivePooling(768)
    >>> pool(torch.randn(2, 40, 768), torch.zeros(2, 40, dtype=torch.bool)).shape
    torch.Size([2, 768])
    """

    def __init__(self, input_size: int, hidden_size: int = 128) -> None:
        super().__init__()
        self.proj = nn.Linear(input_size, hidden_size)
        self.score = nn.Linear(hidden_size, 1, bias=False)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """``x`` (B, T, C), ``padding_mask`` (B, T) bool (``True`` = padded) -> (B, C)."""
        scores = self.score(torch.tanh(self.proj(x))).squeeze(-1)  # (B, T)
        if padding_mask is not None:
            scores = scores.masked_fill(padding_mask, float("-inf"))
        weights = torch.softmax(scores.float(), dim=-1).to(x.dtype)  # (B, T)
        return torch.einsum("bt,btc->bc", weights, x)
