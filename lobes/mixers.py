"""Token mixers and encoders: the interfaces the encoder stacks rely on, and the pieces they share.

A *token mixer* moves information between the frames of a sequence (self-attention, Primer's
Multi-DConv-Head attention, HyperMixing); a *channel mixer* transforms every frame on its own (the
position-wise feed-forward block). :class:`lobes.conformer.ConformerEncoder` and
:class:`lobes.transformer.TransformerEncoder` alternate the two and receive the token mixer ready-made, so
anything that implements :class:`TokenMixer` plugs into them, and anything that implements
:class:`Encoder` plugs into :class:`lobes.asr.ASRModel`.

Padding convention (the one of :func:`lobes.masks.lengths_to_padding_mask`): a padding mask is a bool
``(B, T)`` tensor, ``True`` on padded frames. A module that takes it gives every valid frame the same
output whatever the padded frames hold, i.e. the same output for a sequence alone as for that sequence
padded inside a batch. What it returns on padded frames is unspecified.

``isinstance(obj, TokenMixer)`` only checks that ``obj`` has a ``forward`` method (``typing`` checks the
presence of protocol members, not their signatures), so every ``nn.Module`` passes it;
:func:`signature_mismatches` and :func:`check_token_mixer` check that ``forward`` accepts the call.
"""

from __future__ import annotations

import copy
import inspect
from typing import Callable, Optional, Protocol, Union, runtime_checkable

import torch
from torch import nn

from lobes.masks import zero_padding

__all__ = [
    "TokenMixer",
    "Encoder",
    "MixerSpec",
    "signature_mismatches",
    "check_token_mixer",
    "make_mixers",
    "mix_tokens",
    "PositionwiseFeedForward",
    "EncoderStack",
]


@runtime_checkable
class TokenMixer(Protocol):
    """A module that mixes the frames of a sequence with one another; speechbrain's attention call.

    Encoder layers call it as ``mixer(x, x, x, attn_mask=..., key_padding_mask=...,
    return_attn_weights=..., pos_embs=...)``: query, key and value by position, everything else by keyword
    (speechbrain's ``RelPosMHAXL`` takes ``pos_embs`` as its fourth positional parameter, so the order of
    the keyword arguments is not part of the interface). Implemented by :class:`lobes.hypermixing.HyperMixing`,
    :class:`lobes.attention.MultiHeadAttention`, :class:`lobes.attention.MultiDConvHeadAttention` and
    ``speechbrain.nnet.attention.RelPosMHAXL`` / ``MultiheadAttention``.

    Arguments
    ---------
    query : torch.Tensor
        ``(B, L, D)``.
    key, value : torch.Tensor
        ``(B, S, D)``; encoder layers pass the query three times (self-mixing, ``S = L = T``). Mixers that
        only mix their input with itself (HyperMixing) ignore them.
    attn_mask : torch.Tensor, optional
        ``(L, S)`` or ``(B * heads, L, S)``: bool (``True`` = may not attend) or float (added to the scores).
        Mixers without attention scores ignore it.
    key_padding_mask : torch.Tensor, optional
        ``(B, S)`` bool, ``True`` on padded frames. Every valid query frame's output is the one of the
        sequence alone (see the module docstring); padded frames' outputs are unspecified.
    return_attn_weights : bool
        Whether the caller wants the weights.
    pos_embs : torch.Tensor, optional
        Relative positional embeddings computed once per batch by the encoder (e.g. speechbrain's
        ``RelPosEncXL`` output ``(1, 2T - 1, D)`` for ``RelPosMHAXL``); mixers without relative positions
        ignore them.

    Returns
    -------
    tuple or torch.Tensor
        With ``return_attn_weights=True``: ``(output, weights)``, output ``(B, L, D)`` and the mixer's own
        weights (``(B, L, S)`` head-averaged for :mod:`lobes.attention`, ``(B, heads, L, S)`` for
        ``RelPosMHAXL``, a ``(B, L, L)`` stride-0 view of zeros for HyperMixing). With
        ``return_attn_weights=False``: the output alone (attention modules, as speechbrain's) or the same
        tuple (HyperMixing); callers accept both.
    """

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        attn_mask: Optional[torch.Tensor] = None,
        key_padding_mask: Optional[torch.Tensor] = None,
        return_attn_weights: bool = True,
        pos_embs: Optional[torch.Tensor] = None,
    ) -> Union[torch.Tensor, tuple[torch.Tensor, Optional[torch.Tensor]]]: ...


@runtime_checkable
class Encoder(Protocol):
    """A stack of layers that maps ``(B, T, D)`` frames to ``(B, T, D)`` frames; speechbrain's encoder call.

    :class:`lobes.conformer.ConformerEncoder` and :class:`lobes.transformer.TransformerEncoder` implement
    it, and take one more keyword, ``return_attn_weights=False``. speechbrain's ``ConformerEncoder`` and
    ``TransformerEncoder`` have the same call and return value but are not padding invariant.

    Arguments
    ---------
    src : torch.Tensor
        ``(B, T, D)`` input frames.
    src_mask : torch.Tensor, optional
        ``(T, T)`` attention mask handed to every token mixer (see :class:`TokenMixer`).
    src_key_padding_mask : torch.Tensor, optional
        ``(B, T)`` bool, ``True`` on padded frames; valid frames come out as for the sequence alone.
    pos_embs : torch.Tensor, optional
        Relative positional embeddings for the mixers; the encoder computes them when it has a
        positional module and none are given.

    Returns
    -------
    tuple[torch.Tensor, list]
        ``(output, weights)``: output ``(B, T, D)`` and a list of the token mixers' weights, one entry per
        layer. The project's encoders return an empty list unless called with ``return_attn_weights=True``;
        speechbrain's always fill it.
    """

    def forward(
        self,
        src: torch.Tensor,
        *,
        src_mask: Optional[torch.Tensor] = None,
        src_key_padding_mask: Optional[torch.Tensor] = None,
        pos_embs: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, list]: ...


#: A token mixer (deep-copied for every layer) or a factory that makes one per call, e.g.
#: ``functools.partial(HyperMixing, 144, 576, num_heads=8)`` or, in YAML, ``!name:lobes.hypermixing.HyperMixing``.
MixerSpec = Union[TokenMixer, Callable[[], TokenMixer]]


def signature_mismatches(module: object, protocol: type) -> list[str]:
    """Why ``module.forward`` cannot be called the way ``protocol.forward`` says (empty: it can).

    ``protocol.forward``'s parameters without a default are passed by position, its keyword-only ones by
    name. ``module.forward`` must take that many positional arguments, accept those names (or ``**kwargs``),
    and require nothing else.

    Arguments
    ---------
    module : object
        Anything with a ``forward`` method, usually an ``nn.Module``.
    protocol : type
        :class:`TokenMixer`, :class:`Encoder` or another protocol with a ``forward`` method.

    Returns
    -------
    list[str]
        One sentence per problem.

    Example
    -------
    >>> from lobes.attention import MultiHeadAttention
    >>> signature_mismatches(MultiHeadAttention(2, 16), TokenMixer)
    []
    >>> signature_mismatches(nn.Linear(16, 16), TokenMixer)  # doctest: +NORMALIZE_WHITESPACE
    ['forward takes 1 positional argument(s), the call passes 3 (query, key, value)',
     "forward has no parameter 'attn_mask'", "forward has no parameter 'key_padding_mask'",
     "forward has no parameter 'return_attn_weights'", "forward has no parameter 'pos_embs'"]
    """
    forward = getattr(module, "forward", None)
    if not callable(forward):
        return [f"{type(module).__name__} has no forward method"]
    try:
        actual = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):  # not introspectable (C extension): cannot tell, trust it
        return []
    expected = list(inspect.signature(protocol.forward).parameters.values())[1:]  # without self
    positional = [p.name for p in expected if p.kind is not p.KEYWORD_ONLY and p.default is p.empty]
    keywords = [p.name for p in expected if p.kind is p.KEYWORD_ONLY or p.default is not p.empty]

    kinds = {p.kind for p in actual}
    takes_args, takes_kwargs = inspect.Parameter.VAR_POSITIONAL in kinds, inspect.Parameter.VAR_KEYWORD in kinds
    by_position = [p for p in actual if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    by_name = {p.name for p in actual if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    problems = []
    if len(by_position) < len(positional) and not takes_args:
        problems.append(
            f"forward takes {len(by_position)} positional argument(s), the call passes "
            f"{len(positional)} ({', '.join(positional)})"
        )
    problems += [f"forward has no parameter {name!r}" for name in keywords if name not in by_name and not takes_kwargs]
    filled = {p.name for p in by_position[: len(positional)]} | set(keywords)
    problems += [
        f"forward requires {p.name!r}, which the call does not pass"
        for p in actual
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in filled
    ]
    return problems


def check_token_mixer(mixer: object) -> TokenMixer:
    """Return ``mixer`` if it is an ``nn.Module`` whose ``forward`` takes the :class:`TokenMixer` call.

    Arguments
    ---------
    mixer : object
        The candidate.

    Returns
    -------
    TokenMixer
        ``mixer`` itself.

    Raises
    ------
    TypeError
        Naming the mixer's class and what its ``forward`` lacks.

    Example
    -------
    >>> from lobes.hypermixing import HyperMixing
    >>> check_token_mixer(HyperMixing(16, 32)).__class__.__name__
    'HyperMixing'
    >>> check_token_mixer(nn.GELU())
    Traceback (most recent call last):
    ...
    TypeError: GELU is not a token mixer (lobes.mixers.TokenMixer): forward takes 1 positional argument(s), ...
    """
    if not isinstance(mixer, nn.Module):
        raise TypeError(f"a token mixer must be an nn.Module, got {type(mixer).__name__}")
    problems = signature_mismatches(mixer, TokenMixer)
    if problems:
        raise TypeError(
            f"{type(mixer).__name__} is not a token mixer (lobes.mixers.TokenMixer): " + "; ".join(problems)
        )
    return mixer


def make_mixers(mixer: MixerSpec, num_layers: int) -> list[TokenMixer]:
    """One token mixer per layer: the module and deep copies of it, or the products of a factory.

    Arguments
    ---------
    mixer : MixerSpec
        A token mixer or a callable returning a new one.
    num_layers : int
        How many mixers (at least 1).

    Returns
    -------
    list[TokenMixer]
        ``num_layers`` distinct modules, each checked with :func:`check_token_mixer`.

    Example
    -------
    >>> from functools import partial
    >>> from lobes.hypermixing import HyperMixing
    >>> mixers = make_mixers(partial(HyperMixing, 16, 32, num_heads=2), 3)
    >>> len(mixers), mixers[0] is mixers[1]
    (3, False)
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if isinstance(mixer, nn.Module):
        mixers = [mixer] + [copy.deepcopy(mixer) for _ in range(num_layers - 1)]
    elif callable(mixer):
        mixers = [mixer() for _ in range(num_layers)]
    else:
        raise TypeError(f"mixer must be an nn.Module or a callable returning one, got {type(mixer).__name__}")
    return [check_token_mixer(m) for m in mixers]


class PositionwiseFeedForward(nn.Module):
    """Channel mixer: linear -> activation -> dropout -> linear, applied to every frame on its own.

    Parameter names are those of speechbrain's ``PositionalwiseFeedForward`` (``ffn.0``, ``ffn.3``).

    Arguments
    ---------
    d_model : int
        Input and output features D.
    d_ffn : int
        Hidden features.
    activation : Callable[[], nn.Module]
        Activation class.
    dropout : float
        Dropout after the activation.

    Example
    -------
    >>> ffn = PositionwiseFeedForward(16, 64)
    >>> ffn(torch.rand(2, 5, 16)).shape
    torch.Size([2, 5, 16])
    """

    def __init__(self, d_model: int, d_ffn: int, activation: Callable[[], nn.Module] = nn.GELU, dropout: float = 0.0):
        super().__init__()
        self.ffn = nn.Sequential(
            nn.Linear(d_model, d_ffn), activation(), nn.Dropout(dropout), nn.Linear(d_ffn, d_model)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, D)`` -> ``(B, T, D)``."""
        return self.ffn(x)


def mix_tokens(
    mixer: TokenMixer,
    x: torch.Tensor,
    src_mask: Optional[torch.Tensor],
    pad_mask: Optional[torch.Tensor],
    pos_embs: Optional[torch.Tensor],
    return_attn_weights: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Self-mix ``x`` with ``mixer`` after zeroing its padded frames: the token-mixing step of an encoder layer.

    Arguments
    ---------
    mixer : TokenMixer
        The layer's token mixer.
    x : torch.Tensor
        ``(B, T, D)`` normalised frames, passed as query, key and value.
    src_mask : torch.Tensor, optional
        ``(T, T)`` attention mask.
    pad_mask : torch.Tensor, optional
        ``(B, T)`` bool, ``True`` on padded frames.
    pos_embs : torch.Tensor, optional
        Relative positional embeddings.
    return_attn_weights : bool
        Ask the mixer for its weights.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor | None]
        ``(B, T, D)`` mixed frames and the mixer's weights (``None`` unless requested), whichever of the two
        return forms of :class:`TokenMixer` the mixer uses.

    Example
    -------
    >>> from lobes.attention import MultiHeadAttention
    >>> out, weights = mix_tokens(MultiHeadAttention(2, 16), torch.rand(2, 5, 16), None, None, None, False)
    >>> out.shape, weights
    (torch.Size([2, 5, 16]), None)
    """
    x = zero_padding(x, pad_mask)
    mixed = mixer(
        x,
        x,
        x,
        attn_mask=src_mask,
        key_padding_mask=pad_mask,
        return_attn_weights=return_attn_weights,
        pos_embs=pos_embs,
    )
    mixed, weights = mixed if isinstance(mixed, tuple) else (mixed, None)
    return mixed, (weights if return_attn_weights else None)


class EncoderStack(nn.Module):
    """Layers applied in turn to zero-padded frames, then a norm: the :class:`Encoder` behind the project's encoders.

    :class:`lobes.conformer.ConformerEncoder` and :class:`lobes.transformer.TransformerEncoder` say how a layer
    is built around a token mixer; the stack makes one mixer per layer (:func:`make_mixers`). Every layer is
    called as ``layer(x, src_mask, src_key_padding_mask, pos_embs, return_attn_weights)`` and returns
    ``(x, weights)``. Submodules are registered as ``layers``, ``pos_encoding`` and ``norm``, the names of
    speechbrain's encoders.

    Arguments
    ---------
    num_layers : int
        Number of layers.
    d_model : int
        Model dimension D, checked against the input.
    mixer : MixerSpec
        A token mixer (deep-copied for every layer) or a factory called once per layer.
    make_layer : Callable[[TokenMixer], nn.Module]
        Builds one layer around the token mixer it is given.
    norm : nn.Module
        Normalisation applied to the last layer's output.
    pos_encoding : nn.Module, optional
        Module mapping the input (B, T, D) to relative positional embeddings given to every layer (e.g.
        ``speechbrain.nnet.attention.RelPosEncXL`` for ``RelPosMHAXL``). Ignored when ``pos_embs`` is passed
        to ``forward``.

    Example
    -------
    >>> from functools import partial
    >>> from lobes.conformer import ConformerEncoderLayer
    >>> from lobes.hypermixing import HyperMixing
    >>> enc = EncoderStack(2, 16, partial(HyperMixing, 16, 32), partial(ConformerEncoderLayer, 16, 32, kernel_size=3),
    ...                    nn.LayerNorm(16))
    >>> enc(torch.rand(2, 5, 16))[0].shape
    torch.Size([2, 5, 16])
    """

    def __init__(
        self,
        num_layers: int,
        d_model: int,
        mixer: MixerSpec,
        make_layer: Callable[[TokenMixer], nn.Module],
        norm: nn.Module,
        pos_encoding: Optional[nn.Module] = None,
    ):
        super().__init__()
        self.d_model = d_model
        self.layers = nn.ModuleList(make_layer(m) for m in make_mixers(mixer, num_layers))
        self.pos_encoding = pos_encoding
        self.norm = norm

    def forward(
        self,
        src: torch.Tensor,
        src_mask: Optional[torch.Tensor] = None,
        src_key_padding_mask: Optional[torch.Tensor] = None,
        pos_embs: Optional[torch.Tensor] = None,
        return_attn_weights: bool = False,
    ) -> tuple[torch.Tensor, list]:
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
            (empty unless requested), like speechbrain's encoders.
        """
        return self.run_layers(src, src_mask, src_key_padding_mask, pos_embs, return_attn_weights)

    def run_layers(
        self,
        src: torch.Tensor,
        src_mask: Optional[torch.Tensor],
        src_key_padding_mask: Optional[torch.Tensor],
        pos_embs: Optional[torch.Tensor],
        return_attn_weights: bool,
        **layer_kwargs,
    ) -> tuple[torch.Tensor, list]:
        """:meth:`forward`, with ``layer_kwargs`` (e.g. a chunk configuration) given to every layer."""
        if src.dim() != 3 or src.shape[-1] != self.d_model:
            raise ValueError(f"expected input of shape (B, T, {self.d_model}), got {tuple(src.shape)}")
        if src_key_padding_mask is not None and src_key_padding_mask.shape != src.shape[:2]:
            raise ValueError(
                f"expected src_key_padding_mask of shape {tuple(src.shape[:2])}, "
                f"got {tuple(src_key_padding_mask.shape)}"
            )
        if pos_embs is None and self.pos_encoding is not None:
            pos_embs = self.pos_encoding(src)
        out = zero_padding(src, src_key_padding_mask)
        weights = []
        for layer in self.layers:
            out, w = layer(out, src_mask, src_key_padding_mask, pos_embs, return_attn_weights, **layer_kwargs)
            if return_attn_weights:
                weights.append(w)
        return self.norm(out), weights
