"""Conformer encoder whose token mixer is an injected module (HyperConformer = Conformer + HyperMixing).

A Conformer layer is: half-step feed-forward, token mixer, convolution module, half-step
feed-forward, layer norm (Gulati et al., 2020). The token mixer is not chosen by a string: the layer
receives a ready-made module (or the encoder receives a factory that makes one per layer), so a YAML file
picks HyperMixing, multi-head attention, relative-position attention or Primer-EZ attention with
``!new:`` / ``!name:``. Mixers follow :class:`lobes.mixers.TokenMixer` (speechbrain's attention call);
the encoder follows :class:`lobes.mixers.Encoder`. The plain Transformer encoder is
:class:`lobes.transformer.TransformerEncoder`.

Padding never leaks into valid frames: padded frames are zeroed before the token mixer and before the
depthwise convolution (the only two places where frames meet), and all normalisations are per frame, so a
sequence gives the same output alone or padded inside a batch.

Submodule names follow speechbrain's ``ConformerEncoder`` (``layers.N.mha_layer``,
``convolution_module``, ``ffn_module1`` ...), so a speechbrain checkpoint loads after
:func:`lobes.compat.convert_speechbrain_state_dict`.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from speechbrain.nnet.normalization import LayerNorm
from torch import nn

from lobes.hypermixing import HyperMixing
from lobes.masks import zero_padding
from lobes.mixers import EncoderStack, MixerSpec, PositionwiseFeedForward, TokenMixer, check_token_mixer, mix_tokens

__all__ = [
    "ConvolutionModule",
    "ConformerEncoderLayer",
    "ConformerEncoder",
    "hyperconformer_encoder",
]


def _half_step_ffn(d_model: int, d_ffn: int, activation: Callable[[], nn.Module], dropout: float) -> nn.Sequential:
    """Pre-norm feed-forward block of a Conformer layer (its output is scaled by 1/2 by the layer)."""
    return nn.Sequential(
        nn.LayerNorm(d_model),
        PositionwiseFeedForward(d_model, d_ffn, activation, dropout),
        nn.Dropout(dropout),
    )


class ConvolutionModule(nn.Module):
    """Conformer convolution module: norm, pointwise conv + GLU, depthwise conv, norm, activation, linear.

    The batch normalisation of the original Conformer is a per-frame layer norm here (as in speechbrain),
    and padded frames are zeroed before the depthwise convolution, so valid frames never see padding.

    Arguments
    ---------
    d_model : int
        Channels D.
    kernel_size : int
        Odd kernel size of the depthwise convolution.
    activation : Callable[[], nn.Module]
        Activation class applied after the depthwise convolution.
    dropout : float
        Dropout after the last linear layer.
    bias : bool
        Biases in the convolutions and the linear layer.
    causal : bool
        Left-padded (causal) depthwise convolution.

    Example
    -------
    >>> conv = ConvolutionModule(16, kernel_size=5)
    >>> conv(torch.rand(2, 7, 16), torch.tensor([[False] * 7, [False] * 4 + [True] * 3])).shape
    torch.Size([2, 7, 16])
    """

    def __init__(
        self,
        d_model: int,
        kernel_size: int = 31,
        activation: Callable[[], nn.Module] = nn.SiLU,
        dropout: float = 0.0,
        bias: bool = True,
        causal: bool = False,
    ):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.causal = causal
        self.padding = kernel_size - 1 if causal else (kernel_size - 1) // 2
        self.layer_norm = nn.LayerNorm(d_model)
        self.bottleneck = nn.Sequential(nn.Conv1d(d_model, 2 * d_model, kernel_size=1, bias=bias), nn.GLU(dim=1))
        self.conv = nn.Conv1d(d_model, d_model, kernel_size, padding=self.padding, groups=d_model, bias=bias)
        self.after_conv = nn.Sequential(
            nn.LayerNorm(d_model), activation(), nn.Linear(d_model, d_model, bias=bias), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor, pad_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, T, D) and an optional (B, T) padding mask (``True`` = padding) -> (B, T, D)."""
        out = self.bottleneck(self.layer_norm(x).transpose(1, 2))  # (B, D, T)
        if pad_mask is not None:
            out = out.masked_fill(pad_mask.unsqueeze(1), 0.0)  # padded frames must not enter the conv
        out = self.conv(out)
        if self.causal:
            out = out[..., : -self.padding]  # drop the look-ahead frames of the left-padded conv
        out = self.after_conv(out.transpose(1, 2))  # (B, T, D)
        return zero_padding(out, pad_mask)


class ConformerEncoderLayer(nn.Module):
    """One Conformer layer with an injected token mixer.

    ``x + ffn/2 -> x + mixer(norm(x)) -> x + conv(x) -> norm(x + ffn/2)``, laid out like speechbrain's
    ``ConformerEncoderLayer`` (pre-norm, layer-norm convolution module).

    Arguments
    ---------
    d_model : int
        Model dimension D.
    d_ffn : int
        Hidden size of the two feed-forward blocks.
    mixer : TokenMixer
        Token mixer (:class:`lobes.mixers.TokenMixer`), e.g. ``HyperMixing`` or ``MultiHeadAttention``.
    kernel_size : int
        Depthwise convolution kernel size.
    activation : Callable[[], nn.Module]
        Activation class of the feed-forward and convolution modules (Swish / SiLU by default).
    dropout : float
        Dropout rate.
    bias : bool
        Biases in the convolution module.
    causal : bool
        Causal depthwise convolution.

    Example
    -------
    >>> from lobes.hypermixing import HyperMixing
    >>> layer = ConformerEncoderLayer(16, 32, HyperMixing(16, 32, num_heads=2), kernel_size=3)
    >>> out, _ = layer(torch.rand(2, 5, 16))
    >>> out.shape
    torch.Size([2, 5, 16])
    """

    def __init__(
        self,
        d_model: int,
        d_ffn: int,
        mixer: TokenMixer,
        kernel_size: int = 31,
        activation: Callable[[], nn.Module] = nn.SiLU,
        dropout: float = 0.0,
        bias: bool = True,
        causal: bool = False,
    ):
        super().__init__()
        self.ffn_module1 = _half_step_ffn(d_model, d_ffn, activation, dropout)
        self.norm1 = LayerNorm(d_model)
        self.mha_layer = check_token_mixer(mixer)  # the token mixer (name kept for speechbrain checkpoints)
        self.convolution_module = ConvolutionModule(d_model, kernel_size, activation, dropout, bias, causal)
        self.ffn_module2 = _half_step_ffn(d_model, d_ffn, activation, dropout)
        self.norm2 = LayerNorm(d_model)

    def forward(
        self,
        x: torch.Tensor,
        src_mask: Optional[torch.Tensor] = None,
        src_key_padding_mask: Optional[torch.Tensor] = None,
        pos_embs: Optional[torch.Tensor] = None,
        return_attn_weights: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Apply the layer.

        Arguments
        ---------
        x : torch.Tensor
            (B, T, D) input frames.
        src_mask : torch.Tensor, optional
            (T, T) attention mask passed to the mixer.
        src_key_padding_mask : torch.Tensor, optional
            (B, T) bool, ``True`` on padded frames.
        pos_embs : torch.Tensor, optional
            Relative positional embeddings for mixers that use them, e.g. (1, 2T-1, D).
        return_attn_weights : bool
            Ask the mixer for its weights.

        Returns
        -------
        tuple[torch.Tensor, torch.Tensor | None]
            (B, T, D) output and the mixer's weights (``None`` unless requested).
        """
        x = x + 0.5 * self.ffn_module1(x)
        mixed, weights = mix_tokens(
            self.mha_layer, self.norm1(x), src_mask, src_key_padding_mask, pos_embs, return_attn_weights
        )
        x = x + mixed
        x = x + self.convolution_module(x, src_key_padding_mask)
        x = self.norm2(x + 0.5 * self.ffn_module2(x))
        return x, weights


class ConformerEncoder(EncoderStack):
    """Stack of Conformer layers with an injected token mixer, followed by a layer norm.

    Arguments
    ---------
    num_layers : int
        Number of layers.
    d_model : int
        Model dimension D.
    d_ffn : int
        Hidden size of the feed-forward blocks.
    mixer : MixerSpec
        A token mixer (:class:`lobes.mixers.TokenMixer`, deep-copied for every layer) or a factory called once
        per layer, e.g.
        ``!name:lobes.hypermixing.HyperMixing {input_output_dim: 144, hypernet_size: 576, num_heads: 8}``.
    kernel_size : int
        Depthwise convolution kernel size.
    activation : Callable[[], nn.Module]
        Activation class (Swish / SiLU by default, as in speechbrain).
    dropout : float
        Dropout rate.
    bias : bool
        Biases in the convolution modules.
    causal : bool
        Causal depthwise convolutions.
    pos_encoding : nn.Module, optional
        Module mapping the input (B, T, D) to relative positional embeddings given to every mixer
        (e.g. ``speechbrain.nnet.attention.RelPosEncXL`` for ``RelPosMHAXL``). Ignored when ``pos_embs`` is
        passed to ``forward``.

    Example
    -------
    >>> from functools import partial
    >>> from lobes.hypermixing import HyperMixing
    >>> enc = ConformerEncoder(2, 16, 32, partial(HyperMixing, 16, 32, num_heads=2), kernel_size=3)
    >>> from lobes.masks import lengths_to_padding_mask
    >>> out, _ = enc(torch.rand(2, 9, 16), src_key_padding_mask=lengths_to_padding_mask(torch.tensor([9, 4]), 9))
    >>> out.shape
    torch.Size([2, 9, 16])
    """

    def __init__(
        self,
        num_layers: int,
        d_model: int,
        d_ffn: int,
        mixer: MixerSpec,
        kernel_size: int = 31,
        activation: Callable[[], nn.Module] = nn.SiLU,
        dropout: float = 0.0,
        bias: bool = True,
        causal: bool = False,
        pos_encoding: Optional[nn.Module] = None,
    ):
        def make_layer(m: TokenMixer) -> ConformerEncoderLayer:
            return ConformerEncoderLayer(d_model, d_ffn, m, kernel_size, activation, dropout, bias, causal)

        super().__init__(num_layers, d_model, mixer, make_layer, LayerNorm(d_model, eps=1e-6), pos_encoding)


def hyperconformer_encoder(
    num_layers: int,
    d_model: int,
    d_ffn: int,
    nhead: int,
    kernel_size: int = 31,
    dropout: float = 0.0,
    activation: Callable[[], nn.Module] = nn.SiLU,
    bias: bool = True,
    causal: bool = False,
) -> ConformerEncoder:
    """HyperConformer encoder laid out like speechbrain's ``ConformerEncoder(attention_type="hypermixing")``.

    Every layer's mixer is ``HyperMixing(d_model, hypernet_size=d_ffn, tied=False, num_heads=nhead,
    fix_tm_hidden_size=False)``, so the state dict of speechbrain's encoder loads after
    :func:`lobes.compat.convert_speechbrain_state_dict`.

    Arguments
    ---------
    num_layers : int
        Number of Conformer layers.
    d_model : int
        Model dimension.
    d_ffn : int
        Feed-forward hidden size, also the HyperMixing hypernetwork size.
    nhead : int
        HyperMixing heads.
    kernel_size : int
        Depthwise convolution kernel size.
    dropout : float
        Dropout rate.
    activation : Callable[[], nn.Module]
        Activation class.
    bias : bool
        Biases in the convolution modules.
    causal : bool
        Causal depthwise convolutions.

    Returns
    -------
    ConformerEncoder

    Example
    -------
    >>> enc = hyperconformer_encoder(2, 16, 32, nhead=2, kernel_size=3)
    >>> enc(torch.rand(1, 1, 16))[0].shape
    torch.Size([1, 1, 16])
    """

    def make_mixer() -> HyperMixing:
        return HyperMixing(d_model, hypernet_size=d_ffn, tied=False, num_heads=nhead, fix_tm_hidden_size=False)

    return ConformerEncoder(num_layers, d_model, d_ffn, make_mixer, kernel_size, activation, dropout, bias, causal)
