"""Conformer encoder whose token mixer is an injected module (HyperConformer = Conformer + HyperMixing).

A Conformer layer is: half-step feed-forward, token mixer, convolution module, half-step
feed-forward, layer norm (Gulati et al., 2020). The token mixer is not chosen by a string: the layer
receives a ready-made module (or the encoder receives a factory that makes one per layer), so a YAML file
picks HyperMixing, multi-head attention, relative-position attention or Primer-EZ attention with
``!new:`` / ``!name:``. Every mixer is called with speechbrain's attention signature
``mixer(q, k, v, attn_mask=None, key_padding_mask=None, return_attn_weights=..., pos_embs=None)``.

Padding never leaks into valid frames: padded frames are zeroed before the token mixer and before the
depthwise convolution (the only two places where frames meet), and all normalisations are per frame, so a
sequence gives the same output alone or padded inside a batch.

Submodule names follow speechbrain's ``ConformerEncoder`` (``layers.N.mha_layer``,
``convolution_module``, ``ffn_module1`` ...), so a speechbrain checkpoint loads after
:func:`lobes.compat.convert_speechbrain_state_dict`.
"""

from __future__ import annotations

import copy
import logging
from typing import Callable, Optional, Union

import torch
from speechbrain.nnet.normalization import LayerNorm
from torch import nn

from lobes.features import lengths_to_padding_mask  # re-exported: the encoder's callers build masks with it

__all__ = [
    "ConvolutionModule",
    "ConformerEncoderLayer",
    "ConformerEncoder",
    "TransformerEncoder",
    "hyperconformer_encoder",
    "lengths_to_padding_mask",
]

logger = logging.getLogger(__name__)

MixerSpec = Union[nn.Module, Callable[[], nn.Module]]


def _zero_padding(x: torch.Tensor, pad_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Zero the padded frames of ``x`` (B, T, D); ``pad_mask`` (B, T) is ``True`` on padding."""
    if pad_mask is None:
        return x
    return x.masked_fill(pad_mask.unsqueeze(-1), 0.0)


def _make_mixers(mixer: MixerSpec, num_layers: int) -> list[nn.Module]:
    """One mixer per layer: deep copies of a module, or the products of a factory."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if isinstance(mixer, nn.Module):
        return [mixer] + [copy.deepcopy(mixer) for _ in range(num_layers - 1)]
    if callable(mixer):
        return [mixer() for _ in range(num_layers)]
    raise TypeError(f"mixer must be an nn.Module or a callable returning one, got {type(mixer).__name__}")


class _PositionwiseFeedForward(nn.Module):
    """Linear -> activation -> dropout -> linear, applied to every frame."""

    def __init__(self, d_model: int, d_ffn: int, activation: Callable[[], nn.Module], dropout: float):
        super().__init__()
        self.ffn = nn.Sequential(
            nn.Linear(d_model, d_ffn), activation(), nn.Dropout(dropout), nn.Linear(d_ffn, d_model)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(x)


def _half_step_ffn(d_model: int, d_ffn: int, activation: Callable[[], nn.Module], dropout: float) -> nn.Sequential:
    """Pre-norm feed-forward block of a Conformer layer (its output is scaled by 1/2 by the layer)."""
    return nn.Sequential(
        nn.LayerNorm(d_model),
        _PositionwiseFeedForward(d_model, d_ffn, activation, dropout),
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

    def __init__(self, d_model: int, kernel_size: int = 31, activation: Callable[[], nn.Module] = nn.SiLU,
                 dropout: float = 0.0, bias: bool = True, causal: bool = False):
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
        return _zero_padding(out, pad_mask)


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
    mixer : nn.Module
        Token mixer with speechbrain's attention signature, returning ``(output, weights)``.
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

    def __init__(self, d_model: int, d_ffn: int, mixer: nn.Module, kernel_size: int = 31,
                 activation: Callable[[], nn.Module] = nn.SiLU, dropout: float = 0.0, bias: bool = True,
                 causal: bool = False):
        super().__init__()
        if not isinstance(mixer, nn.Module):
            raise TypeError(f"mixer must be an nn.Module, got {type(mixer).__name__}")
        self.ffn_module1 = _half_step_ffn(d_model, d_ffn, activation, dropout)
        self.norm1 = LayerNorm(d_model)
        self.mha_layer = mixer  # the token mixer (name kept for speechbrain checkpoints)
        self.convolution_module = ConvolutionModule(d_model, kernel_size, activation, dropout, bias, causal)
        self.ffn_module2 = _half_step_ffn(d_model, d_ffn, activation, dropout)
        self.norm2 = LayerNorm(d_model)

    def forward(self, x: torch.Tensor, src_mask: Optional[torch.Tensor] = None,
                src_key_padding_mask: Optional[torch.Tensor] = None, pos_embs: Optional[torch.Tensor] = None,
                return_attn_weights: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
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
        mixed = _zero_padding(self.norm1(x), src_key_padding_mask)
        mixed = self.mha_layer(mixed, mixed, mixed, attn_mask=src_mask, key_padding_mask=src_key_padding_mask,
                               return_attn_weights=return_attn_weights, pos_embs=pos_embs)
        # speechbrain's attention returns (output, weights), or the output alone without weights
        mixed, weights = mixed if isinstance(mixed, tuple) else (mixed, None)
        x = x + mixed
        x = x + self.convolution_module(x, src_key_padding_mask)
        x = self.norm2(x + 0.5 * self.ffn_module2(x))
        return x, (weights if return_attn_weights else None)


class ConformerEncoder(nn.Module):
    """Stack of Conformer layers with an injected token mixer, followed by a layer norm.

    Arguments
    ---------
    num_layers : int
        Number of layers.
    d_model : int
        Model dimension D.
    d_ffn : int
        Hidden size of the feed-forward blocks.
    mixer : nn.Module or Callable[[], nn.Module]
        A token mixer (deep-copied for every layer) or a factory called once per layer, e.g.
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
    >>> out, _ = enc(torch.rand(2, 9, 16), src_key_padding_mask=lengths_to_padding_mask(torch.tensor([9, 4]), 9))
    >>> out.shape
    torch.Size([2, 9, 16])
    """

    def __init__(self, num_layers: int, d_model: int, d_ffn: int, mixer: MixerSpec, kernel_size: int = 31,
                 activation: Callable[[], nn.Module] = nn.SiLU, dropout: float = 0.0, bias: bool = True,
                 causal: bool = False, pos_encoding: Optional[nn.Module] = None):
        super().__init__()
        mixers = _make_mixers(mixer, num_layers)
        self.d_model = d_model
        self.layers = nn.ModuleList(
            ConformerEncoderLayer(d_model, d_ffn, m, kernel_size, activation, dropout, bias, causal) for m in mixers
        )
        self.pos_encoding = pos_encoding
        self.norm = LayerNorm(d_model, eps=1e-6)

    def forward(self, src: torch.Tensor, src_mask: Optional[torch.Tensor] = None,
                src_key_padding_mask: Optional[torch.Tensor] = None, pos_embs: Optional[torch.Tensor] = None,
                return_attn_weights: bool = False) -> tuple[torch.Tensor, list]:
        """Encode a padded batch.

        Arguments
        ---------
        src : torch.Tensor
            (B, T, D) input frames.
        src_mask : torch.Tensor, optional
            (T, T) attention mask given to every mixer.
        src_key_padding_mask : torch.Tensor, optional
            (B, T) bool, ``True`` on padded frames.
        pos_embs : torch.Tensor, optional
            Relative positional embeddings; computed with ``pos_encoding`` when omitted.
        return_attn_weights : bool
            Collect each mixer's weights.

        Returns
        -------
        tuple[torch.Tensor, list]
            (B, T, D) output (padded frames are zero before the final norm) and the list of mixer weights
            (empty unless requested), like speechbrain's ``ConformerEncoder``.
        """
        if src.dim() != 3 or src.shape[-1] != self.d_model:
            raise ValueError(f"expected input of shape (B, T, {self.d_model}), got {tuple(src.shape)}")
        if src_key_padding_mask is not None and src_key_padding_mask.shape != src.shape[:2]:
            raise ValueError(f"expected src_key_padding_mask of shape {tuple(src.shape[:2])}, "
                             f"got {tuple(src_key_padding_mask.shape)}")
        if pos_embs is None and self.pos_encoding is not None:
            pos_embs = self.pos_encoding(src)
        out = _zero_padding(src, src_key_padding_mask)
        weights = []
        for layer in self.layers:
            out, w = layer(out, src_mask, src_key_padding_mask, pos_embs, return_attn_weights)
            if return_attn_weights:
                weights.append(w)
        return self.norm(out), weights


class _TransformerLayer(nn.Module):
    """Pre-norm Transformer layer: ``x + mixer(norm(x))`` then ``x + ffn(norm(x))``."""

    def __init__(self, d_model: int, d_ffn: int, mixer: nn.Module, activation: Callable[[], nn.Module],
                 dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.mixer = mixer
        self.drop = nn.Dropout(dropout)
        self.ffn = nn.Sequential(nn.LayerNorm(d_model), _PositionwiseFeedForward(d_model, d_ffn, activation, dropout),
                                 nn.Dropout(dropout))

    def forward(self, x, src_mask, pad_mask, pos_embs):
        mixed = _zero_padding(self.norm1(x), pad_mask)
        mixed = self.mixer(mixed, mixed, mixed, attn_mask=src_mask, key_padding_mask=pad_mask,
                           return_attn_weights=False, pos_embs=pos_embs)
        mixed = mixed[0] if isinstance(mixed, tuple) else mixed
        x = x + self.drop(mixed)
        return x + self.ffn(x)


class TransformerEncoder(nn.Module):
    """Pre-norm Transformer encoder with an injected token mixer (attention, Primer-EZ DConv attention,
    HyperMixing), followed by a layer norm. Same call signature as :class:`ConformerEncoder`.

    Arguments
    ---------
    num_layers : int
        Number of layers.
    d_model : int
        Model dimension D.
    d_ffn : int
        Feed-forward hidden size.
    mixer : nn.Module or Callable[[], nn.Module]
        A token mixer (deep-copied per layer) or a factory called once per layer.
    activation : Callable[[], nn.Module]
        Feed-forward activation class (``lobes.attention.SquaredReLU`` for Primer).
    dropout : float
        Dropout rate.
    pos_encoding : nn.Module, optional
        Relative positional embeddings for the mixers, as in :class:`ConformerEncoder`.

    Example
    -------
    >>> from functools import partial
    >>> from lobes.attention import MultiDConvHeadAttention, SquaredReLU
    >>> enc = TransformerEncoder(2, 16, 32, partial(MultiDConvHeadAttention, 2, 16), activation=SquaredReLU)
    >>> enc(torch.rand(2, 5, 16))[0].shape
    torch.Size([2, 5, 16])
    """

    def __init__(self, num_layers: int, d_model: int, d_ffn: int, mixer: MixerSpec,
                 activation: Callable[[], nn.Module] = nn.GELU, dropout: float = 0.0,
                 pos_encoding: Optional[nn.Module] = None):
        super().__init__()
        self.d_model = d_model
        self.layers = nn.ModuleList(_TransformerLayer(d_model, d_ffn, m, activation, dropout)
                                    for m in _make_mixers(mixer, num_layers))
        self.pos_encoding = pos_encoding
        self.norm = nn.LayerNorm(d_model, eps=1e-6)

    def forward(self, src: torch.Tensor, src_mask: Optional[torch.Tensor] = None,
                src_key_padding_mask: Optional[torch.Tensor] = None,
                pos_embs: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, list]:
        """(B, T, D) frames and an optional (B, T) padding mask -> ((B, T, D), [])."""
        if src.dim() != 3 or src.shape[-1] != self.d_model:
            raise ValueError(f"expected input of shape (B, T, {self.d_model}), got {tuple(src.shape)}")
        if pos_embs is None and self.pos_encoding is not None:
            pos_embs = self.pos_encoding(src)
        out = _zero_padding(src, src_key_padding_mask)
        for layer in self.layers:
            out = layer(out, src_mask, src_key_padding_mask, pos_embs)
        return self.norm(out), []


def hyperconformer_encoder(num_layers: int, d_model: int, d_ffn: int, nhead: int, kernel_size: int = 31,
                           dropout: float = 0.0, activation: Callable[[], nn.Module] = nn.SiLU,
                           bias: bool = True, causal: bool = False) -> ConformerEncoder:
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
    from lobes.hypermixing import HyperMixing

    def make_mixer() -> nn.Module:
        return HyperMixing(d_model, hypernet_size=d_ffn, tied=False, num_heads=nhead, fix_tm_hidden_size=False)

    return ConformerEncoder(num_layers, d_model, d_ffn, make_mixer, kernel_size, activation, dropout, bias, causal)
