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

from typing import Callable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from speechbrain.nnet.normalization import LayerNorm
from torch import nn

from lobes.chunking import ChunkConfig, chunk_attention_mask
from lobes.hypermixing import ChunkCausalHyperMixing, HyperMixing, HyperMixingState
from lobes.masks import zero_padding
from lobes.mixers import EncoderStack, MixerSpec, PositionwiseFeedForward, TokenMixer, check_token_mixer, mix_tokens

__all__ = [
    "ConvolutionModule",
    "ConformerEncoderLayer",
    "ConformerEncoder",
    "ConformerLayerState",
    "ConformerStreamState",
    "hyperconformer_encoder",
]


# --------------------------------------------------------------------------------------------------
# Chunked mode: the token mixer sees its own chunk and earlier ones
# --------------------------------------------------------------------------------------------------
def _as_chunk(chunk: Union[ChunkConfig, int, None]) -> Optional[ChunkConfig]:
    """A :class:`ChunkConfig` from a config, a chunk size in frames, or None (full context)."""
    return ChunkConfig(chunk) if isinstance(chunk, int) and not isinstance(chunk, bool) else chunk


def _merge_attn_masks(chunk_mask: torch.Tensor, src_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The chunk mask (bool, True = blocked) combined with a caller's (T, T) bool or additive mask."""
    if src_mask is None:
        return chunk_mask
    if src_mask.dtype == torch.bool:
        return chunk_mask | src_mask
    return src_mask.masked_fill(chunk_mask, float("-inf"))


def _mix_chunked(
    mixer: TokenMixer,
    x: torch.Tensor,
    src_mask: Optional[torch.Tensor],
    pad_mask: Optional[torch.Tensor],
    pos_embs: Optional[torch.Tensor],
    chunk: ChunkConfig,
    return_attn_weights: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The token-mixing step of a layer in chunked mode: chunk-causal HyperMixing gets the chunk size, any
    other mixer (attention) gets the chunk mask as ``attn_mask``."""
    if isinstance(mixer, ChunkCausalHyperMixing):
        if chunk.left_context_chunks is not None:
            raise ValueError(
                "ChunkCausalHyperMixing always sees the whole past (a running sum); use left_context_chunks=None"
            )
        x = zero_padding(x, pad_mask)
        out, weights = mixer(x, x, x, key_padding_mask=pad_mask, chunk_size=chunk.chunk_size)
        return out, (weights if return_attn_weights else None)
    if isinstance(mixer, HyperMixing):
        raise ValueError(
            "HyperMixing mixes the whole sequence and has no chunked mode; build the encoder with "
            "lobes.hypermixing.ChunkCausalHyperMixing (chunk_size: null keeps the full-context behaviour)"
        )
    mask = _merge_attn_masks(chunk_attention_mask(x.size(1), chunk, x.device), src_mask)
    return mix_tokens(mixer, x, mask, pad_mask, pos_embs, return_attn_weights)


# --------------------------------------------------------------------------------------------------
# Depthwise convolution over frames, on (B, T, D) tensors
# --------------------------------------------------------------------------------------------------
# A (B, T, D) tensor is, without a copy, a channels-last (B, D, 1, T) image, the layout in which oneDNN's
# depthwise convolution is fast on CPU (a forward about 15x faster than nn.Conv1d on a (B, D, T) tensor at a
# Conformer layer's sizes). autograd's gradient of the kernel in that layout is slow, so the training path
# computes it as one more depthwise convolution (the inputs convolved with the output gradient).


def _as_image(x: torch.Tensor) -> torch.Tensor:
    """(B, T, D) -> the same memory as a channels-last (B, D, 1, T) image."""
    return x.transpose(1, 2).unsqueeze(2).contiguous(memory_format=torch.channels_last)


def _grouped_conv2d(image: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.conv2d`` with one group per channel, in the inputs' dtype even under autocast (float32 here: oneDNN's
    bfloat16 depthwise kernel in the channels-last layout stalls on a batch of one)."""
    with torch.autocast(image.device.type, enabled=False):
        return F.conv2d(image, weight, groups=weight.size(0))


def _depthwise_image(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Valid (unpadded) depthwise convolution of (B, T, D) by (D, K) -> (B, T - K + 1, D)."""
    weight = kernel.reshape(kernel.size(0), 1, 1, kernel.size(1)).contiguous(memory_format=torch.channels_last)
    return _grouped_conv2d(_as_image(x), weight)[:, :, 0].transpose(1, 2)


class _DepthwiseConvTraining(torch.autograd.Function):
    """Depthwise convolution of padded (B, T + K - 1, D) frames by a (D, K) kernel, with its gradients as
    depthwise convolutions too (float32)."""

    @staticmethod
    def forward(ctx, padded: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(padded, kernel)
        return _depthwise_image(padded, kernel)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        padded, kernel = ctx.saved_tensors
        grad = grad.float().contiguous()
        K = kernel.size(1)
        grad_input = grad_kernel = None
        if ctx.needs_input_grad[0]:  # each padded frame collects the outputs it entered, flipped kernel
            grad_input = _depthwise_image(F.pad(grad, (0, 0, K - 1, K - 1)), kernel.flip(1))
        if ctx.needs_input_grad[1]:  # tap k of channel d: sum over b, t of grad[b, t, d] * padded[b, t + k, d]
            frames = padded.permute(2, 0, 1).unsqueeze(0).contiguous(memory_format=torch.channels_last)
            taps = grad.permute(2, 0, 1).unsqueeze(1).contiguous(memory_format=torch.channels_last)
            grad_kernel = _grouped_conv2d(frames, taps)[0, :, 0]  # (D, K)
        return grad_input, grad_kernel


def _depthwise_conv_frames(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], left: int, right: int
) -> torch.Tensor:
    """Depthwise convolution over the frames of (B, T, D) ``x`` -> (B, T + left + right - K + 1, D).

    ``weight`` is an ``nn.Conv1d(D, D, K, groups=D)`` weight, (D, 1, K); ``left`` / ``right`` zero frames
    are added before / after ``x``. Equal to ``conv1d(pad(x.transpose(1, 2)), weight, bias, groups=D)``
    transposed back, computed in float32 (oneDNN's float32 kernel is the faster one here) and returned in
    the dtype of ``x``.

    Example
    -------
    >>> conv = nn.Conv1d(4, 4, 3, padding=1, groups=4)
    >>> x = torch.rand(2, 6, 4)
    >>> ref = conv(x.transpose(1, 2)).transpose(1, 2)
    >>> torch.allclose(_depthwise_conv_frames(x, conv.weight, conv.bias, 1, 1), ref, atol=1e-6)
    True
    """
    dtype = x.dtype
    x = F.pad(x.float(), (0, 0, left, right))
    kernel = weight.float().reshape(weight.size(0), weight.size(-1))
    if torch.is_grad_enabled() and (x.requires_grad or kernel.requires_grad):
        out = _DepthwiseConvTraining.apply(x, kernel)
    else:
        out = _depthwise_image(x, kernel)
    return (out if bias is None else out + bias.float()).to(dtype)


class ConformerLayerState(NamedTuple):
    """What a streaming Conformer layer carries from one chunk to the next.

    Attributes
    ----------
    mixer : HyperMixingState or torch.Tensor or None
        HyperMixing's running sums, or for an attention mixer the layer inputs (B, frames, D) of the left
        context it may still see (None before the first chunk).
    conv : torch.Tensor or None
        The last inputs of the depthwise convolution, (B, D, kernel_size - 1) for a causal one and
        (B, D, (kernel_size - 1) / 2) for a chunk convolution (None before the first chunk).
    """

    mixer: Union[HyperMixingState, torch.Tensor, None]
    conv: Optional[torch.Tensor]


class ConformerStreamState(NamedTuple):
    """State of a streaming :class:`ConformerEncoder`: one :class:`ConformerLayerState` per layer and the
    number of frames seen. Its size is constant for HyperMixing (and for attention with a limited left
    context)."""

    layers: tuple
    offset: int


def _half_step_ffn(d_model: int, d_ffn: int, activation: Callable[[], nn.Module], dropout: float) -> nn.Sequential:
    """Pre-norm feed-forward block of a Conformer layer (its output is scaled by 1/2 by the layer)."""
    return nn.Sequential(
        nn.LayerNorm(d_model),
        PositionwiseFeedForward(d_model, d_ffn, activation, dropout),
        nn.Dropout(dropout),
    )


def _check_causal(causal: Union[bool, str]) -> Union[bool, str]:
    """The ``causal`` option of the convolution module: ``False``, ``True`` or ``"chunk"``."""
    if isinstance(causal, bool) or causal == "chunk":
        return causal
    raise ValueError(f'causal must be False, True or "chunk", got {causal!r}')


class ConvolutionModule(nn.Module):
    """Conformer convolution module: norm, pointwise conv + GLU, depthwise conv, norm, activation, linear.

    The batch normalisation of the original Conformer is a per-frame layer norm here (as in speechbrain),
    and padded frames are zeroed before the depthwise convolution, so valid frames never see padding.
    The module keeps speechbrain's submodules and state-dict keys, but its forward works on (B, T, D) frames
    throughout: the pointwise convolution is a linear layer, and the depthwise convolution runs as a
    channels-last image in float32 with gradients of its own (several times faster on CPU than
    ``nn.Conv1d`` and its autograd; same results).

    The depthwise convolution comes in three kinds (``causal``):

    * ``False``: centred (``(kernel_size - 1) / 2`` frames on each side); cannot stream;
    * ``True``: causal (``kernel_size - 1`` past frames), whatever the chunking; streams with a cache of
      ``kernel_size - 1`` inputs;
    * ``"chunk"``: dynamic chunk convolution (Li et al., ICASSP 2023, "Dynamic Chunk Convolution for Unified
      Streaming and Non-streaming Conformer ASR"): centred, but in chunked mode (``chunk_size`` given) a
      frame sees the future only up to the end of its own chunk, the inputs past it counting as zeros. With
      full context it is exactly the centred convolution (same weights as ``causal=False``); in chunked mode
      it streams with a cache of the last ``(kernel_size - 1) / 2`` inputs.

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
    causal : bool or str
        ``False`` (centred), ``True`` (left-padded, causal) or ``"chunk"`` (centred, cut at chunk ends).

    Example
    -------
    >>> conv = ConvolutionModule(16, kernel_size=5)
    >>> conv(torch.rand(2, 7, 16), torch.tensor([[False] * 7, [False] * 4 + [True] * 3])).shape
    torch.Size([2, 7, 16])
    >>> chunk_conv = ConvolutionModule(16, kernel_size=5, causal="chunk")
    >>> x = torch.rand(1, 7, 16)
    >>> whole = chunk_conv(x, chunk_size=4)
    >>> first, cache = chunk_conv.forward_chunk(x[:, :4])
    >>> rest, cache = chunk_conv.forward_chunk(x[:, 4:], cache)
    >>> torch.allclose(torch.cat([first, rest], 1), whole, atol=1e-6), cache.shape
    (True, torch.Size([1, 16, 2]))
    """

    def __init__(
        self,
        d_model: int,
        kernel_size: int = 31,
        activation: Callable[[], nn.Module] = nn.SiLU,
        dropout: float = 0.0,
        bias: bool = True,
        causal: Union[bool, str] = False,
    ):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.causal = _check_causal(causal)
        self.chunk_conv = causal == "chunk"  # dynamic chunk convolution
        self.padding = kernel_size - 1 if causal is True else (kernel_size - 1) // 2
        self.layer_norm = nn.LayerNorm(d_model)
        self.bottleneck = nn.Sequential(nn.Conv1d(d_model, 2 * d_model, kernel_size=1, bias=bias), nn.GLU(dim=1))
        self.conv = nn.Conv1d(d_model, d_model, kernel_size, padding=self.padding, groups=d_model, bias=bias)
        self.after_conv = nn.Sequential(
            nn.LayerNorm(d_model), activation(), nn.Linear(d_model, d_model, bias=bias), nn.Dropout(dropout)
        )

    def _chunk_conv(self, x: torch.Tensor, chunk_size: int) -> torch.Tensor:
        """Depthwise convolution of (B, D, T) where every chunk sees zeros past its end -> (B, D, T)."""
        B, D, T = x.shape
        C, p = chunk_size, self.padding
        n = -(-T // C)  # chunks
        x = F.pad(x, (p, n * C - T + p))  # (B, D, p + nC + p)
        windows = x.unfold(2, C + 2 * p, C)  # (B, D, n, C + 2p): frames [cC - p, (c + 1)C + p) of chunk c
        windows = windows[..., : C + p]  # inputs past the chunk's end count as zeros
        windows = F.pad(windows, (0, p))
        windows = windows.permute(0, 2, 1, 3).reshape(B * n, D, C + 2 * p)
        out = F.conv1d(windows, self.conv.weight, self.conv.bias, groups=self.conv.groups)  # (B n, D, C)
        return out.reshape(B, n, D, C).permute(0, 2, 1, 3).reshape(B, D, n * C)[..., :T]

    def forward(
        self, x: torch.Tensor, pad_mask: Optional[torch.Tensor] = None, chunk_size: Optional[int] = None
    ) -> torch.Tensor:
        """(B, T, D) and an optional (B, T) padding mask (``True`` = padding) -> (B, T, D).

        ``chunk_size`` (chunked mode, chunks from frame 0) matters only to the chunk convolution
        (``causal="chunk"``); the other kinds ignore it.
        """
        pointwise = self.bottleneck[0]  # a 1x1 Conv1d: a linear layer over the (B, T, D) frames
        out = F.glu(F.linear(self.layer_norm(x), pointwise.weight.squeeze(-1), pointwise.bias), dim=-1)
        if pad_mask is not None:
            out = out.masked_fill(pad_mask.unsqueeze(-1), 0.0)  # padded frames must not enter the conv
        if self.chunk_conv and chunk_size is not None and chunk_size < out.size(1):
            out = self._chunk_conv(out.transpose(1, 2), chunk_size).transpose(1, 2)
        else:  # centred: padding on both sides; causal: kernel_size - 1 frames before, none after
            right = 0 if self.causal is True else self.padding
            out = _depthwise_conv_frames(out, self.conv.weight, self.conv.bias, self.padding, right)
        out = self.after_conv(out)  # (B, T, D)
        return zero_padding(out, pad_mask)

    def forward_chunk(self, x: torch.Tensor, cache: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Streaming: the next (B, T, D) frames of a stream, given the previous call's cache.

        Returns the (B, T, D) output, equal to :meth:`forward`'s on these frames of the whole stream (with the
        same chunks, for the chunk convolution), and the new cache: the last ``padding`` inputs of the
        depthwise convolution, (B, D, padding) (``kernel_size - 1`` causal, ``(kernel_size - 1) / 2`` chunk).
        For ``causal="chunk"`` the frames must be one whole chunk (the last of a stream may be shorter): the
        convolution runs over [cache, chunk, zeros].
        """
        if not self.causal:
            raise ValueError(
                'ConvolutionModule.forward_chunk: only a causal (causal=True) or chunk (causal="chunk") module '
                "can stream"
            )
        out = self.bottleneck(self.layer_norm(x).transpose(1, 2))  # (B, D, T)
        if cache is None:  # the left zero padding of forward
            cache = out.new_zeros(out.size(0), out.size(1), self.padding)
        full = torch.cat([cache, out], dim=-1)  # (B, D, padding + T)
        new_cache = full[..., full.size(-1) - self.padding :]
        if self.chunk_conv:  # nothing past the chunk's end
            full = F.pad(full, (0, self.padding))
        out = F.conv1d(full, self.conv.weight, self.conv.bias, groups=self.conv.groups)  # (B, D, T)
        out = self.after_conv(out.transpose(1, 2))  # (B, T, D)
        return out, new_cache


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
    causal : bool or str
        Depthwise convolution: ``False`` centred, ``True`` causal, ``"chunk"`` centred but cut at the end of
        each chunk in chunked mode (:class:`ConvolutionModule`).

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
        causal: Union[bool, str] = False,
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
        chunk: Optional[ChunkConfig] = None,
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
        chunk : ChunkConfig, optional
            Chunked mode (needs a causal or chunk convolution module); None: full context.

        Returns
        -------
        tuple[torch.Tensor, torch.Tensor | None]
            (B, T, D) output and the mixer's weights (``None`` unless requested).
        """
        x = x + 0.5 * self.ffn_module1(x)
        if chunk is None:
            mixed, weights = mix_tokens(
                self.mha_layer, self.norm1(x), src_mask, src_key_padding_mask, pos_embs, return_attn_weights
            )
        else:
            if not self.convolution_module.causal:
                raise ValueError(
                    "chunked mode needs causal or chunk convolution modules: build the encoder with causal=True or "
                    'causal="chunk"'
                )
            mixed, weights = _mix_chunked(
                self.mha_layer, self.norm1(x), src_mask, src_key_padding_mask, pos_embs, chunk, return_attn_weights
            )
        x = x + mixed
        x = x + self.convolution_module(x, src_key_padding_mask, None if chunk is None else chunk.chunk_size)
        x = self.norm2(x + 0.5 * self.ffn_module2(x))
        return x, weights

    def forward_chunk(
        self,
        x: torch.Tensor,
        state: ConformerLayerState,
        chunk: ChunkConfig,
        pos_embs: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, ConformerLayerState]:
        """The next chunk (B, T <= chunk_size, D) of a stream; equals :meth:`forward` in chunked mode there.

        An attention mixer attends from the chunk's frames to [kept left context + chunk] without a mask
        (exactly the keys the chunk mask leaves them), ``pos_embs`` being the relative positions of that
        concatenation; HyperMixing continues its running sum.
        """
        T = x.size(1)
        x = x + 0.5 * self.ffn_module1(x)
        mixer = self.mha_layer
        if isinstance(mixer, ChunkCausalHyperMixing):
            mixed, mixer_state = mixer.forward_chunk(self.norm1(x), state.mixer, chunk_size=chunk.chunk_size)
        else:
            context = x if state.mixer is None else torch.cat([state.mixer, x], dim=1)  # (B, S, D)
            y = self.norm1(context)
            out = mixer(y, y, y, attn_mask=None, key_padding_mask=None, return_attn_weights=False, pos_embs=pos_embs)
            mixed = (out[0] if isinstance(out, tuple) else out)[:, -T:]
            keep = chunk.left_context_frames
            mixer_state = context if keep is None else context[:, context.size(1) - min(keep, context.size(1)) :]
        x = x + mixed
        conv, conv_state = self.convolution_module.forward_chunk(x, state.conv)
        x = x + conv
        x = self.norm2(x + 0.5 * self.ffn_module2(x))
        return x, ConformerLayerState(mixer_state, conv_state)


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
    causal : bool or str
        Depthwise convolutions: ``False`` centred, ``True`` causal, ``"chunk"`` centred but cut at the end of
        each chunk in chunked mode (dynamic chunk convolution, :class:`ConvolutionModule`). Chunked mode and
        streaming need ``True`` or ``"chunk"``.
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
        causal: Union[bool, str] = False,
        pos_encoding: Optional[nn.Module] = None,
    ):
        def make_layer(m: TokenMixer) -> ConformerEncoderLayer:
            return ConformerEncoderLayer(d_model, d_ffn, m, kernel_size, activation, dropout, bias, causal)

        super().__init__(num_layers, d_model, mixer, make_layer, LayerNorm(d_model, eps=1e-6), pos_encoding)

    def forward(
        self,
        src: torch.Tensor,
        src_mask: Optional[torch.Tensor] = None,
        src_key_padding_mask: Optional[torch.Tensor] = None,
        pos_embs: Optional[torch.Tensor] = None,
        return_attn_weights: bool = False,
        chunk: Union[ChunkConfig, int, None] = None,
    ) -> tuple[torch.Tensor, list]:
        """Encode a padded batch, with full context or in chunked mode.

        Arguments
        ---------
        src : torch.Tensor
            (B, T, D) input frames.
        src_mask : torch.Tensor, optional
            (T, T) attention mask given to every mixer (combined with the chunk mask in chunked mode).
        src_key_padding_mask : torch.Tensor, optional
            (B, T) bool, ``True`` on padded frames.
        pos_embs : torch.Tensor, optional
            Relative positional embeddings; computed with ``pos_encoding`` when omitted.
        return_attn_weights : bool
            Collect each mixer's weights.
        chunk : ChunkConfig or int, optional
            Chunked mode: every frame sees its own chunk and earlier ones (:mod:`lobes.chunking`); an int is a
            chunk size in frames with unlimited left context. Needs causal or chunk convolutions and chunk-capable
            mixers (``ChunkCausalHyperMixing``, attention). None (default): full context, :class:`EncoderStack`'s
            forward unchanged.

        Returns
        -------
        tuple[torch.Tensor, list]
            (B, T, D) output and the list of mixer weights (empty unless requested).

        Example
        -------
        >>> from functools import partial
        >>> enc = ConformerEncoder(1, 16, 32, partial(ChunkCausalHyperMixing, 16, 32, chunk_size=None), 3, causal=True)
        >>> x = torch.rand(1, 10, 16)
        >>> full, _ = enc(x, chunk=4)
        >>> first, state = enc.forward_chunk(x[:, :8], chunk=4)
        >>> rest, state = enc.forward_chunk(x[:, 8:], state, chunk=4)
        >>> torch.allclose(torch.cat([first, rest], 1), full, atol=1e-5), state.offset
        (True, 10)
        """
        chunk = _as_chunk(chunk)
        if chunk is None:
            return super().forward(src, src_mask, src_key_padding_mask, pos_embs, return_attn_weights)
        return self.run_layers(src, src_mask, src_key_padding_mask, pos_embs, return_attn_weights, chunk=chunk)

    def forward_chunk(
        self,
        src: torch.Tensor,
        state: Optional[ConformerStreamState] = None,
        chunk: Union[ChunkConfig, int] = 1,
    ) -> tuple[torch.Tensor, ConformerStreamState]:
        """Encode the next frames of a stream (no padding); the outputs of the pieces, concatenated, are
        :meth:`forward`'s output with the same ``chunk``.

        Every piece but the last must end on a chunk boundary; a piece may hold several chunks (they are
        encoded one after the other, one chunk per layer call, as the chunk convolution needs).

        Arguments
        ---------
        src : torch.Tensor
            (B, T, D) the next frames.
        state : ConformerStreamState, optional
            What the previous call returned; None starts a stream.
        chunk : ChunkConfig or int
            The chunk configuration, the same for the whole stream.

        Returns
        -------
        tuple[torch.Tensor, ConformerStreamState]
            (B, T, D) output and the state to pass with the next piece.
        """
        chunk = _as_chunk(chunk)
        if chunk is None:
            raise ValueError("ConformerEncoder.forward_chunk: streaming needs a chunk configuration")
        if src.dim() != 3 or src.shape[-1] != self.d_model:
            raise ValueError(f"expected input of shape (B, T, {self.d_model}), got {tuple(src.shape)}")
        if state is None:
            if not all(layer.convolution_module.causal for layer in self.layers):
                raise ValueError(
                    "streaming needs causal or chunk convolution modules: build the encoder with causal=True or "
                    'causal="chunk"'
                )
            state = ConformerStreamState(tuple(ConformerLayerState(None, None) for _ in self.layers), 0)
        elif state.offset % chunk.chunk_size and src.size(1):
            raise ValueError(
                f"ConformerEncoder.forward_chunk: the previous piece ended inside a chunk (frame {state.offset}, "
                f"chunk_size {chunk.chunk_size}); only the last piece of a stream may hold a partial chunk"
            )
        C = chunk.chunk_size
        outs, layers, offset = [], list(state.layers), state.offset
        for piece in src.split(C, dim=1) if src.size(1) else ():
            pos_embs = None
            if self.pos_encoding is not None:  # relative positions over [left context + piece]
                context = layers[0].mixer
                seen = context.size(1) if isinstance(context, torch.Tensor) else 0
                pos_embs = self.pos_encoding(piece[:, :1].expand(-1, seen + piece.size(1), -1))
            out = piece
            for i, layer in enumerate(self.layers):
                out, layers[i] = layer.forward_chunk(out, layers[i], chunk, pos_embs)
            outs.append(self.norm(out))
            offset += piece.size(1)
        out = torch.cat(outs, dim=1) if outs else self.norm(src)
        return out, ConformerStreamState(tuple(layers), offset)


def hyperconformer_encoder(
    num_layers: int,
    d_model: int,
    d_ffn: int,
    nhead: int,
    kernel_size: int = 31,
    dropout: float = 0.0,
    activation: Callable[[], nn.Module] = nn.SiLU,
    bias: bool = True,
    causal: Union[bool, str] = False,
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
    causal : bool or str
        Depthwise convolutions: ``False`` centred, ``True`` causal, ``"chunk"`` chunk convolution.

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
