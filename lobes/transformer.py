"""Pre-norm Transformer encoder whose token mixer is an injected module (attention, Primer-EZ, HyperMixing).

A layer is ``x + mixer(norm(x))`` then ``x + ffn(norm(x))``; the stack ends with a layer norm. The token
mixer comes ready-made (or from a factory, one per layer), so a YAML file picks multi-head attention,
Primer's Multi-DConv-Head attention (with ``activation: !name:lobes.attention.SquaredReLU`` for Primer-EZ)
or HyperMixing with ``!name:``. Mixers follow :class:`lobes.mixers.TokenMixer`; the encoder follows
:class:`lobes.mixers.Encoder`, like :class:`lobes.conformer.ConformerEncoder`.

Padded frames are zeroed before every token mixer and the feed-forward block works frame by frame, so a
sequence gives the same output alone or padded inside a batch.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from lobes.mixers import EncoderStack, MixerSpec, PositionwiseFeedForward, TokenMixer, check_token_mixer, mix_tokens

__all__ = ["TransformerEncoder"]


class _TransformerLayer(nn.Module):
    """Pre-norm Transformer layer: ``x + mixer(norm(x))`` then ``x + ffn(norm(x))``."""

    def __init__(
        self, d_model: int, d_ffn: int, mixer: TokenMixer, activation: Callable[[], nn.Module], dropout: float
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.mixer = check_token_mixer(mixer)
        self.drop = nn.Dropout(dropout)
        self.ffn = nn.Sequential(
            nn.LayerNorm(d_model), PositionwiseFeedForward(d_model, d_ffn, activation, dropout), nn.Dropout(dropout)
        )

    def forward(
        self,
        x: torch.Tensor,
        src_mask: Optional[torch.Tensor],
        pad_mask: Optional[torch.Tensor],
        pos_embs: Optional[torch.Tensor],
        return_attn_weights: bool,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(B, T, D) -> (B, T, D) and the mixer's weights (``None`` unless requested)."""
        mixed, weights = mix_tokens(self.mixer, self.norm1(x), src_mask, pad_mask, pos_embs, return_attn_weights)
        x = x + self.drop(mixed)
        return x + self.ffn(x), weights


class TransformerEncoder(EncoderStack):
    """Pre-norm Transformer encoder with an injected token mixer, followed by a layer norm.

    Same call and return value as :class:`lobes.conformer.ConformerEncoder` (:class:`lobes.mixers.Encoder`).

    Arguments
    ---------
    num_layers : int
        Number of layers.
    d_model : int
        Model dimension D.
    d_ffn : int
        Feed-forward hidden size.
    mixer : MixerSpec
        A token mixer (:class:`lobes.mixers.TokenMixer`, deep-copied per layer) or a factory called once per
        layer.
    activation : Callable[[], nn.Module]
        Feed-forward activation class (``lobes.attention.SquaredReLU`` for Primer).
    dropout : float
        Dropout rate.
    pos_encoding : nn.Module, optional
        Module mapping the input (B, T, D) to relative positional embeddings given to every mixer, as in
        :class:`lobes.conformer.ConformerEncoder`. Ignored when ``pos_embs`` is passed to ``forward``.

    Example
    -------
    >>> from functools import partial
    >>> from lobes.attention import MultiDConvHeadAttention, SquaredReLU
    >>> from lobes.masks import lengths_to_padding_mask
    >>> enc = TransformerEncoder(2, 16, 32, partial(MultiDConvHeadAttention, 2, 16), activation=SquaredReLU)
    >>> out, _ = enc(torch.rand(2, 5, 16), src_key_padding_mask=lengths_to_padding_mask(torch.tensor([5, 3]), 5))
    >>> out.shape
    torch.Size([2, 5, 16])
    """

    def __init__(
        self,
        num_layers: int,
        d_model: int,
        d_ffn: int,
        mixer: MixerSpec,
        activation: Callable[[], nn.Module] = nn.GELU,
        dropout: float = 0.0,
        pos_encoding: Optional[nn.Module] = None,
    ):
        def make_layer(m: TokenMixer) -> _TransformerLayer:
            return _TransformerLayer(d_model, d_ffn, m, activation, dropout)

        super().__init__(num_layers, d_model, mixer, make_layer, nn.LayerNorm(d_model, eps=1e-6), pos_encoding)
