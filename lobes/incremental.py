"""Incremental (token-by-token) decoding of :class:`lobes.asr.AttentionDecoder` with a carried state.

The full decoder reruns every layer over the whole prefix for each new token. Here each step feeds only the
newest token and carries, per layer:

* causal HyperMixing self-attention (``AttentionDecoder(self_attention=ChunkCausalHyperMixing, chunk_size=1)``):
  its running sums (:class:`lobes.hypermixing.HyperMixingState`), of constant size, so a step costs the same
  at token 5 and at token 5000;
* multi-head self-attention: the projected keys and values of the prefix (a cache that grows by one row per
  token; a step attends over all of them);
* the cross-attention's projected encoder keys and values, computed once.

:class:`IncrementalDecoder` does the steps; :class:`IncrementalBeamSearcher` plugs them into speechbrain's
``S2SBeamSearcher`` (beam search, EOS handling, length normalisation, optional CTC / LM scorers), reordering
the carried states as beams are kept or dropped. The outputs equal the full decoder's on the same prefixes
(``tests/test_streaming_decoder.py``).

Example
-------
>>> from lobes.attention import PositionalEncoding
>>> from lobes.asr import AttentionDecoder
>>> from lobes.hypermixing import ChunkCausalHyperMixing
>>> from functools import partial
>>> dec = AttentionDecoder(10, 16, 2, 2, 32, PositionalEncoding(16), dropout=0.0,
...                        self_attention=partial(ChunkCausalHyperMixing, 16, 32, num_heads=2, chunk_size=1)).eval()
>>> enc, lens = torch.rand(2, 7, 16), torch.tensor([7, 4])
>>> steps = IncrementalDecoder(dec)
>>> state = steps.start(enc, lens)
>>> log_probs, state = steps.step(torch.tensor([1, 1]), state)
>>> log_probs.shape, state.position
(torch.Size([2, 10]), 1)
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from speechbrain.decoders.seq2seq import S2SBeamSearcher
from torch import nn

from lobes.hypermixing import ChunkCausalHyperMixing, HyperMixingState
from lobes.masks import lengths_to_padding_mask

__all__ = ["DecoderState", "IncrementalDecoder", "IncrementalBeamSearcher"]


class DecoderState(NamedTuple):
    """What incremental decoding carries from one token to the next.

    Attributes
    ----------
    self_states : tuple
        Per layer: a :class:`HyperMixingState` (causal HyperMixing) or the ``(keys, values)`` cache
        (B, heads, tokens, head_dim) each (attention).
    cross : tuple
        Per layer: the cross-attention's projected encoder ``(keys, values)``, (B, heads, T, head_dim) each.
    memory_pad : torch.Tensor
        (B, T) bool, True on padded encoder frames.
    position : int
        Tokens fed so far.
    """

    self_states: tuple
    cross: tuple
    memory_pad: torch.Tensor
    position: int


def _mha(module: nn.Module) -> nn.Module:
    """The module holding ``in_proj_weight`` / ``out_proj``: torch's inside speechbrain's wrapper, or ours."""
    mha = getattr(module, "att", module)
    if getattr(mha, "in_proj_weight", None) is None or getattr(mha, "bias_k", None) is not None:
        raise ValueError(
            f"incremental decoding supports causal HyperMixing and plain multi-head attention with one input "
            f"projection, not {type(module).__name__}"
        )
    return mha


def _project(mha: nn.Module, x: torch.Tensor, part: slice) -> torch.Tensor:
    """Rows ``part`` of the input projection applied to (B, L, D) -> (B, heads, L, head_dim)."""
    D = mha.embed_dim
    bias = None if mha.in_proj_bias is None else mha.in_proj_bias[part]
    y = F.linear(x, mha.in_proj_weight[part], bias)  # (B, L, n * D)
    B, L, _ = y.shape
    return y.view(B, L, -1, mha.num_heads, D // mha.num_heads).permute(2, 0, 3, 1, 4)  # (n, B, H, L, hd)


def _attend(mha: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad: Optional[torch.Tensor]):
    """(B, H, 1, hd) query over (B, H, S, hd) keys / values -> (B, 1, D) after the output projection."""
    mask = None if pad is None else ~pad[:, None, None, :]  # (B, 1, 1, S), True = may attend
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, 1, hd)
    B = out.size(0)
    return mha.out_proj(out.transpose(1, 2).reshape(B, 1, mha.embed_dim))


class IncrementalDecoder:
    """Token-by-token decoding of an :class:`lobes.asr.AttentionDecoder` (or of an ``ASRModel``'s decoder).

    Arguments
    ---------
    decoder : AttentionDecoder or ASRModel
        The decoder (in evaluation mode: dropout is not applied here).
    """

    def __init__(self, decoder: nn.Module):
        decoder = getattr(decoder, "decoder", decoder) if not hasattr(decoder, "embedding") else decoder
        if not hasattr(decoder, "embedding") or not hasattr(decoder, "decoder"):
            raise ValueError(f"expected an AttentionDecoder or an ASRModel with one, got {type(decoder).__name__}")
        self.dec = decoder
        self.layers = list(decoder.decoder.layers)
        for layer in self.layers:
            if not isinstance(layer.self_attn, ChunkCausalHyperMixing):
                _mha(layer.self_attn)
            elif layer.self_attn.chunk_size != 1:
                raise ValueError("the decoder's HyperMixing self-attention must be causal (chunk_size=1)")
            _mha(layer.multihead_attn)

    def start(self, memory: torch.Tensor, memory_lengths: Optional[torch.Tensor] = None) -> DecoderState:
        """State before the first token, for (B, T, D) encoder frames and (B,) valid frames (default: all)."""
        B, T, _ = memory.shape
        if memory_lengths is None:
            memory_lengths = torch.full((B,), T, device=memory.device)
        pad = lengths_to_padding_mask(memory_lengths.round().long().to(memory.device), T)
        with torch.no_grad():
            cross = tuple(
                tuple(_project(_mha(la.multihead_attn), memory, slice(_mha(la.multihead_attn).embed_dim, None)))
                for la in self.layers
            )
        return DecoderState(tuple(None for _ in self.layers), cross, pad, 0)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, state: DecoderState) -> tuple[torch.Tensor, DecoderState]:
        """Feed (B,) tokens; return (B, V) log-probabilities of the next token and the new state."""
        dec = self.dec
        tokens = tokens.long().view(-1, 1)  # (B, 1)
        x = dec.embedding(tokens) * dec.scale  # (B, 1, D)
        x = x + dec.pos_encoding.rows(state.position, x)
        new_self = []
        for layer, self_state, (ck, cv) in zip(self.layers, state.self_states, state.cross):
            y = layer.norm1(x)
            if isinstance(layer.self_attn, ChunkCausalHyperMixing):
                mixed, self_state = layer.self_attn.forward_chunk(y, self_state, chunk_size=1)
            else:
                mha = _mha(layer.self_attn)
                q, k, v = _project(mha, y, slice(None))
                if self_state is not None:
                    k, v = torch.cat([self_state[0], k], dim=2), torch.cat([self_state[1], v], dim=2)
                mixed, self_state = _attend(mha, q, k, v, None), (k, v)
            new_self.append(self_state)
            x = x + mixed
            cross = _mha(layer.multihead_attn)
            q = _project(cross, layer.norm2(x), slice(0, cross.embed_dim))[0]
            x = x + _attend(cross, q, ck, cv, state.memory_pad)
            x = x + layer.pos_ffn(layer.norm3(x))
        hidden = dec.decoder.norm(x)  # (B, 1, D)
        log_probs = torch.log_softmax(dec.seq_lin(hidden).float(), dim=-1)[:, 0]  # (B, V)
        return log_probs, DecoderState(tuple(new_self), state.cross, state.memory_pad, state.position + 1)

    @staticmethod
    def reorder(state: DecoderState, index: torch.Tensor) -> DecoderState:
        """The state of rows ``index`` (beam search keeps, drops and duplicates hypotheses)."""

        def pick(s):
            if s is None:
                return None
            if isinstance(s, HyperMixingState):
                return HyperMixingState(s.sums.index_select(0, index), s.count.index_select(0, index), s.offset)
            return tuple(t.index_select(0, index) for t in s)

        return DecoderState(
            tuple(pick(s) for s in state.self_states),
            tuple(pick(c) for c in state.cross),
            state.memory_pad.index_select(0, index),
            state.position,
        )


class IncrementalBeamSearcher(S2SBeamSearcher):
    """speechbrain's beam search over :class:`IncrementalDecoder` steps: every step feeds one token per
    hypothesis and carries the decoder state, instead of rerunning the decoder over the whole prefix as
    ``S2STransformerBeamSearcher`` does. Same arguments as ``S2SBeamSearcher`` plus the model.

    Arguments
    ---------
    model : ASRModel or AttentionDecoder
        The model whose decoder searches.
    temperature : float
        Softmax temperature.
    **kwargs
        ``S2SBeamSearcher``'s (``bos_index``, ``eos_index``, ``min_decode_ratio``, ``max_decode_ratio``,
        ``beam_size``, ...).
    """

    def __init__(self, model: nn.Module, temperature: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.steps = IncrementalDecoder(model)
        self.fc = self.steps.dec.seq_lin  # speechbrain reads the vocabulary size from it
        self.temperature = temperature

    def reset_mem(self, batch_size: int, device: torch.device) -> None:
        """No state before the encoder frames are seen (the first step builds it)."""
        return None

    def permute_mem(self, memory: Optional[DecoderState], index: torch.Tensor) -> Optional[DecoderState]:
        """Reorder the carried state along the kept hypotheses."""
        return None if memory is None else self.steps.reorder(memory, index)

    def forward_step(self, inp_tokens, memory, enc_states, enc_lens):
        """One token per hypothesis -> (log-probs, state, no attention weights)."""
        if memory is None:
            memory = self.steps.start(enc_states, enc_lens)
        log_probs, memory = self.steps.step(inp_tokens, memory)
        if self.temperature != 1.0:
            log_probs = torch.log_softmax(log_probs / self.temperature, dim=-1)
        return log_probs, memory, None
