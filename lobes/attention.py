"""Attention-family token mixers: SDPA multi-head attention, Primer's Multi-DConv-Head attention,
sinusoidal positional encoding without a length ceiling, and squared ReLU.

All modules are batch-first and follow speechbrain's call convention
``forward(query, key, value, attn_mask=None, key_padding_mask=None, return_attn_weights=True,
pos_embs=None)`` (:class:`lobes.mixers.TokenMixer`), so they can replace
``speechbrain.nnet.attention.MultiheadAttention`` in a Transformer or Conformer layer.

Mask conventions (the same as ``torch.nn.MultiheadAttention``):

* ``key_padding_mask`` (B, S): bool or integer, ``True`` / non-zero marks a padded key that is ignored;
  a floating mask is added to the attention scores.
* ``attn_mask`` (L, S) or (B * nhead, L, S): bool or integer, ``True`` / non-zero forbids attending;
  a floating mask is added to the attention scores.

References: Vaswani et al. 2017 (arXiv 1706.03762); So et al. 2021, "Primer: Searching for Efficient
Transformers for Language Modeling" (arXiv 2109.08668).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "squared_relu",
    "SquaredReLU",
    "sinusoidal_table",
    "PositionalEncoding",
    "MultiHeadAttention",
    "MultiDConvHeadAttention",
    "DCONV_VARIANTS",
]

DCONV_VARIANTS = ("per_head", "shared", "per_channel")


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
def squared_relu(x: torch.Tensor) -> torch.Tensor:
    """Squared ReLU, ``relu(x) ** 2`` (Primer, arXiv 2109.08668).

    Arguments
    ---------
    x : torch.Tensor
        Any shape.

    Returns
    -------
    torch.Tensor
        Same shape as ``x``.

    Example
    -------
    >>> squared_relu(torch.tensor([-1.0, 0.5, 2.0]))
    tensor([0.0000, 0.2500, 4.0000])
    """
    return torch.relu(x).square()


class SquaredReLU(nn.Module):
    """Squared ReLU as a module, usable wherever an activation class is expected (for example
    ``activation=SquaredReLU`` in speechbrain's ``PositionalwiseFeedForward``).

    Example
    -------
    >>> act = SquaredReLU()
    >>> act(torch.randn(2, 5, 8)).shape
    torch.Size([2, 5, 8])
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply ``relu(x) ** 2`` element-wise; any shape."""
        return squared_relu(x)


def sinusoidal_table(
    length: int, input_size: int, device: Optional[torch.device] = None, start: int = 0
) -> torch.Tensor:
    """Sinusoidal position table of Vaswani et al., computed in float32 the same way as speechbrain's.

    Arguments
    ---------
    length : int
        Number of positions.
    input_size : int
        Embedding dimension (even).
    device : torch.device, optional
        Where to build the table.
    start : int
        First position (rows ``start .. start + length - 1``, the same values as those rows of a longer table).

    Returns
    -------
    torch.Tensor
        (length, input_size) float32, ``[p, 2i] = sin(p / 10000^(2i/d))``, ``[p, 2i+1] = cos(...)``.

    Example
    -------
    >>> sinusoidal_table(100, 16).shape
    torch.Size([100, 16])
    """
    positions = torch.arange(start, start + length, device=device).unsqueeze(1).float()  # (length, 1)
    denominator = torch.exp(
        torch.arange(0, input_size, 2, device=device).float() * -(math.log(10000.0) / input_size)
    )  # (input_size / 2,)
    angles = positions * denominator  # (length, input_size / 2)
    table = torch.empty(length, input_size, device=device)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles)
    return table


def _check_seq(name: str, x: torch.Tensor, features: int) -> None:
    if x.dim() != 3:
        raise ValueError(f"{name}: expected a (batch, time, {features}) tensor, got shape {tuple(x.shape)}")
    if x.size(-1) != features:
        raise ValueError(f"{name}: expected {features} features in the last dimension, got shape {tuple(x.shape)}")


def _as_additive_or_bool(mask: torch.Tensor) -> torch.Tensor:
    """Bool masks stay bool (True = blocked); integer masks become bool; floating masks stay additive."""
    if mask.dtype == torch.bool or mask.is_floating_point():
        return mask
    return mask != 0


def _merge_masks(masks: list[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Merge broadcastable masks into one: bool (True = blocked) if all are bool, else additive float."""
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):
        merged = masks[0]
        for m in masks[1:]:
            merged = merged | m
        return merged
    merged = None
    for m in masks:
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(m, float("-inf"))
        else:
            m = m.to(dtype)
        merged = m if merged is None else merged + m
    return merged


def _causal_mask(length: int, source_length: int, device: torch.device) -> torch.Tensor:
    """(L, S) bool mask, True above the diagonal: position t never sees t + 1 or later."""
    return torch.ones(length, source_length, dtype=torch.bool, device=device).triu_(1)


# --------------------------------------------------------------------------------------------------
# Public modules
# --------------------------------------------------------------------------------------------------
class PositionalEncoding(nn.Module):
    """Absolute sinusoidal positional encoding (Vaswani et al.) with no length ceiling.

    Same output convention as speechbrain's ``PositionalEncoding``: for an input of shape (B, L, d) it
    returns the table (1, L, d), to be added to the input. ``max_len`` only sets how many positions are
    precomputed; longer inputs get a table computed on demand (and cached for the next call). The
    table is a non-persistent buffer, so it never appears in a ``state_dict``.

    Arguments
    ---------
    input_size : int
        Embedding dimension ``d`` (must be even).
    max_len : int
        Number of precomputed positions.

    Example
    -------
    >>> enc = PositionalEncoding(input_size=64)
    >>> enc(torch.rand(2, 4000, 64)).shape
    torch.Size([1, 4000, 64])
    """

    def __init__(self, input_size: int, max_len: int = 2500) -> None:
        super().__init__()
        if input_size <= 0 or input_size % 2 != 0:
            raise ValueError(f"PositionalEncoding: input_size must be a positive even number, got {input_size}")
        if max_len < 0:
            raise ValueError(f"PositionalEncoding: max_len must be >= 0, got {max_len}")
        self.input_size = input_size
        self.max_len = max_len
        self.register_buffer("pe", sinusoidal_table(max_len, input_size).unsqueeze(0), persistent=False)
        self._longer: Optional[torch.Tensor] = None  # (1, L', d) cache for inputs beyond max_len

    def table(self, length: int, device: Optional[torch.device] = None) -> torch.Tensor:
        """The (1, length, d) float32 table, on ``device`` (default: the buffer's device)."""
        device = self.pe.device if device is None else torch.device(device)
        if length <= self.pe.size(1) and self.pe.device == device:
            return self.pe[:, :length]
        cached = self._longer
        if cached is None or cached.size(1) < length or cached.device != device:
            # grow geometrically so that a slowly increasing length does not recompute every call
            grown = max(length, 2 * self.pe.size(1), 1)
            cached = sinusoidal_table(grown, self.input_size, device=device).unsqueeze(0)
            self._longer = cached
        return cached[:, :length]

    def rows(self, start: int, x: torch.Tensor) -> torch.Tensor:
        """(1, L, d) encoding of positions ``start .. start + L - 1`` for ``x`` (B, L, d), in ``x``'s dtype: what
        :meth:`forward` gives those frames of a longer input, without building the rows before ``start``
        (a stream adds it to each new piece).

        Example
        -------
        >>> enc = PositionalEncoding(16, max_len=10)
        >>> torch.equal(enc.rows(30, torch.zeros(1, 5, 16)), enc(torch.zeros(1, 35, 16))[:, 30:])
        True
        """
        _check_seq("PositionalEncoding input", x, self.input_size)
        length = x.size(1)
        if start + length <= self.pe.size(1) and self.pe.device == x.device:
            table = self.pe[:, start : start + length]
        else:
            table = sinusoidal_table(length, self.input_size, device=x.device, start=start).unsqueeze(0)
        return table.to(x.dtype) if x.is_floating_point() else table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Arguments
        ---------
        x : torch.Tensor
            (B, L, d) input features.

        Returns
        -------
        torch.Tensor
            (1, L, d) positional encoding in ``x``'s dtype (do not modify it in place).
        """
        _check_seq("PositionalEncoding input", x, self.input_size)
        table = self.table(x.size(1), x.device)
        return table.to(x.dtype) if x.is_floating_point() else table


class MultiHeadAttention(nn.Module):
    """Multi-head attention backed by ``torch.nn.functional.scaled_dot_product_attention``.

    A drop-in for speechbrain's ``MultiheadAttention`` wrapper (same constructor and call signature,
    batch-first) whose parameters have the names and layout of ``torch.nn.MultiheadAttention``, so a
    torch module's ``state_dict`` loads as is (see :meth:`load_from` and :meth:`from_torch`).

    When ``return_attn_weights=False`` the fused SDPA kernel is used and only the output is returned
    (as speechbrain does). When weights are requested they are computed explicitly and averaged over
    heads, (B, L, S), like torch's ``need_weights=True``.

    Fully masked queries (every key blocked by the masks) attend to nothing: their attention weights
    are all 0 and their output is the output projection's bias. ``torch.nn.MultiheadAttention`` returns
    NaN for such rows instead.

    Arguments
    ---------
    nhead : int
        Number of heads.
    d_model : int
        Model (query) dimension, divisible by ``nhead``.
    dropout : float
        Dropout on the attention probabilities (training only).
    bias : bool
        Biases in the input and output projections.
    add_bias_kv : bool
        Append a learned key and value to the key / value sequences.
    add_zero_attn : bool
        Append an all-zero key and value (after the heads split).
    kdim : int, optional
        Key feature size (default ``d_model``).
    vdim : int, optional
        Value feature size (default ``d_model``).

    Example
    -------
    >>> x = torch.rand(8, 60, 512)
    >>> net = MultiHeadAttention(nhead=8, d_model=512)
    >>> out, attn = net(x, x, x)
    >>> out.shape, attn.shape
    (torch.Size([8, 60, 512]), torch.Size([8, 60, 60]))
    """

    def __init__(
        self,
        nhead: int,
        d_model: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: Optional[int] = None,
        vdim: Optional[int] = None,
    ) -> None:
        super().__init__()
        if nhead <= 0 or d_model <= 0 or d_model % nhead != 0:
            raise ValueError(
                f"{type(self).__name__}: d_model ({d_model}) must be a positive multiple of nhead ({nhead})"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{type(self).__name__}: dropout must be in [0, 1), got {dropout}")
        self.embed_dim = d_model
        self.num_heads = nhead
        self.head_dim = d_model // nhead
        self.kdim = d_model if kdim is None else kdim
        self.vdim = d_model if vdim is None else vdim
        self.dropout = dropout
        self.add_zero_attn = add_zero_attn
        self.causal = False  # subclasses may attend causally (position t never sees t + 1)
        self._qkv_same_embed_dim = self.kdim == d_model and self.vdim == d_model

        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(d_model, d_model))
            self.k_proj_weight = nn.Parameter(torch.empty(d_model, self.kdim))
            self.v_proj_weight = nn.Parameter(torch.empty(d_model, self.vdim))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * d_model))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, d_model))
            self.bias_v = nn.Parameter(torch.empty(1, 1, d_model))
        else:
            self.bias_k = self.bias_v = None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # the initialisation of torch.nn.MultiheadAttention
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    # ---------------------------------------------------------------- weight loading
    def load_from(self, source: nn.Module) -> "MultiHeadAttention":
        """Copy the weights of a ``torch.nn.MultiheadAttention`` (any ``batch_first``) or of speechbrain's
        ``MultiheadAttention`` wrapper (which holds one as ``.att``). Returns ``self``.

        Example
        -------
        >>> ref = torch.nn.MultiheadAttention(64, 4, batch_first=True)
        >>> ours = MultiHeadAttention(nhead=4, d_model=64).load_from(ref)
        >>> x = torch.rand(2, 10, 64)
        >>> torch.allclose(ours(x, x, x)[0], ref(x, x, x)[0], atol=1e-5)
        True
        """
        mha = getattr(source, "att", source)
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(
                "load_from: expected torch.nn.MultiheadAttention or a module holding one as `.att`, "
                f"got {type(source).__name__}"
            )
        ours = (
            self.embed_dim,
            self.num_heads,
            self.kdim,
            self.vdim,
            self.in_proj_bias is not None,
            self.bias_k is not None,
            self.add_zero_attn,
        )
        theirs = (
            mha.embed_dim,
            mha.num_heads,
            mha.kdim,
            mha.vdim,
            mha.in_proj_bias is not None,
            mha.bias_k is not None,
            mha.add_zero_attn,
        )
        if ours != theirs:
            names = ("d_model", "nhead", "kdim", "vdim", "bias", "add_bias_kv", "add_zero_attn")
            diff = ", ".join(f"{n}: ours {a} vs source {b}" for n, a, b in zip(names, ours, theirs) if a != b)
            raise ValueError(f"load_from: configurations differ ({diff})")
        self.load_state_dict(mha.state_dict())
        return self

    @classmethod
    def from_torch(cls, source: nn.Module) -> "MultiHeadAttention":
        """Build a module with the configuration and weights of a ``torch.nn.MultiheadAttention`` (or of
        speechbrain's wrapper around one).

        Example
        -------
        >>> ours = MultiHeadAttention.from_torch(torch.nn.MultiheadAttention(32, 2))
        >>> ours(torch.rand(1, 3, 32), torch.rand(1, 3, 32), torch.rand(1, 3, 32))[1].shape
        torch.Size([1, 3, 3])
        """
        mha = getattr(source, "att", source)
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"from_torch: expected torch.nn.MultiheadAttention, got {type(source).__name__}")
        module = cls(
            nhead=mha.num_heads,
            d_model=mha.embed_dim,
            dropout=mha.dropout,
            bias=mha.in_proj_bias is not None,
            add_bias_kv=mha.bias_k is not None,
            add_zero_attn=mha.add_zero_attn,
            kdim=mha.kdim,
            vdim=mha.vdim,
        )
        module.to(device=mha.out_proj.weight.device, dtype=mha.out_proj.weight.dtype)
        return module.load_from(mha)

    # ---------------------------------------------------------------- forward pieces
    def _project(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input projections: (B, L, d), (B, S, d), (B, S, d)."""
        d = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:d], b[d : 2 * d], b[2 * d :])
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            if query is key and key is value:  # self-attention: one matmul
                return F.linear(query, w, b).chunk(3, dim=-1)
            return F.linear(query, w[:d], bq), F.linear(key, w[d : 2 * d], bk), F.linear(value, w[2 * d :], bv)
        return (
            F.linear(query, self.q_proj_weight, bq),
            F.linear(key, self.k_proj_weight, bk),
            F.linear(value, self.v_proj_weight, bv),
        )

    def _mix_time(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hook applied to the projected (B, T, d) sequences; identity here."""
        return q, k, v

    def _check_inputs(self, query, key, value, attn_mask, key_padding_mask, pos_embs) -> None:
        _check_seq("query", query, self.embed_dim)
        _check_seq("key", key, self.kdim)
        _check_seq("value", value, self.vdim)
        B, L, S = query.size(0), query.size(1), key.size(1)
        if key.size(0) != B or value.size(0) != B:
            raise ValueError(
                f"query, key and value must share the batch size, got {query.size(0)}, {key.size(0)}, {value.size(0)}"
            )
        if value.size(1) != S:
            raise ValueError(f"key and value must share the length, got {S} and {value.size(1)}")
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, S):
            raise ValueError(
                f"key_padding_mask: expected shape (batch, source length) = ({B}, {S}), "
                f"got {tuple(key_padding_mask.shape)}"
            )
        for name, m in (("attn_mask", attn_mask), ("pos_embs", pos_embs)):
            if m is not None and tuple(m.shape) not in ((L, S), (B * self.num_heads, L, S)):
                raise ValueError(
                    f"{name}: expected shape (L, S) = ({L}, {S}) or (batch * nhead, L, S) = "
                    f"({B * self.num_heads}, {L}, {S}), got {tuple(m.shape)}"
                )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        key_padding_mask: Optional[torch.Tensor] = None,
        return_attn_weights: bool = True,
        pos_embs: Optional[torch.Tensor] = None,
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """
        Arguments
        ---------
        query : torch.Tensor
            (B, L, d_model).
        key : torch.Tensor
            (B, S, kdim).
        value : torch.Tensor
            (B, S, vdim).
        attn_mask : torch.Tensor, optional
            (L, S) or (B * nhead, L, S); bool / integer (True = blocked) or float (added to the scores).
        key_padding_mask : torch.Tensor, optional
            (B, S); bool / integer (True = padded) or float (added to the scores).
        return_attn_weights : bool
            Also return the head-averaged attention weights (slower: the fused kernel is not used).
        pos_embs : torch.Tensor, optional
            Float (L, S) or (B * nhead, L, S) added to the scores, as speechbrain's wrapper does.

        Returns
        -------
        output : torch.Tensor
            (B, L, d_model).
        weights : torch.Tensor
            (B, L, S') head-averaged attention weights, only when ``return_attn_weights`` (S' counts the
            extra keys of ``add_bias_kv`` / ``add_zero_attn``).
        """
        self._check_inputs(query, key, value, attn_mask, key_padding_mask, pos_embs)
        B, L, S = query.size(0), query.size(1), key.size(1)
        H, hd = self.num_heads, self.head_dim

        q, k, v = self._project(query, key, value)  # (B, L, d), (B, S, d), (B, S, d)
        q, k, v = self._mix_time(q, k, v, key_padding_mask)

        # masks, broadcastable to (B, H, L, S); a causal mask alone goes to the fused kernel as is_causal
        only_causal = (
            self.causal
            and not return_attn_weights
            and attn_mask is None
            and pos_embs is None
            and key_padding_mask is None
            and self.bias_k is None
            and not self.add_zero_attn
        )
        masks: list[torch.Tensor] = []
        if self.causal and not only_causal:
            masks.append(_causal_mask(L, S, q.device).view(1, 1, L, S))
        for m in (attn_mask, pos_embs):
            if m is not None:
                m = _as_additive_or_bool(m)
                masks.append(m.view(1, 1, L, S) if m.dim() == 2 else m.view(B, H, L, S))
        if key_padding_mask is not None:
            masks.append(_as_additive_or_bool(key_padding_mask).view(B, 1, 1, S))
        extra_keys = 0
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(B, 1, -1)], dim=1)  # (B, S + 1, d)
            v = torch.cat([v, self.bias_v.expand(B, 1, -1)], dim=1)
            extra_keys += 1

        q = q.view(B, L, H, hd).transpose(1, 2)  # (B, H, L, hd)
        k = k.view(B, -1, H, hd).transpose(1, 2)  # (B, H, S', hd)
        v = v.view(B, -1, H, hd).transpose(1, 2)  # (B, H, S', hd)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(B, H, 1, hd)], dim=2)
            v = torch.cat([v, v.new_zeros(B, H, 1, hd)], dim=2)
            extra_keys += 1
        if extra_keys:  # the appended keys are never masked
            masks = [F.pad(m, (0, extra_keys)) for m in masks]
        mask = _merge_masks(masks, q.dtype)

        # queries with every key blocked attend to nothing (instead of producing NaN)
        dead = None
        if mask is not None:
            blocked = mask if mask.dtype == torch.bool else torch.isneginf(mask)
            dead = blocked.all(dim=-1, keepdim=True)  # broadcastable to (B, H, L, 1)
            if bool(dead.any()):
                mask = mask.masked_fill(dead, False if mask.dtype == torch.bool else 0.0)
            else:
                dead = None
        p_drop = self.dropout if self.training else 0.0

        if return_attn_weights:
            scores = torch.matmul(q * (1.0 / math.sqrt(hd)), k.transpose(-2, -1))  # (B, H, L, S')
            if mask is not None:
                scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
            weights = torch.softmax(scores, dim=-1)
            if dead is not None:
                weights = weights.masked_fill(dead, 0.0)
            if p_drop > 0:
                weights = F.dropout(weights, p=p_drop)
            out = torch.matmul(weights, v)  # (B, H, L, hd)
        else:
            sdpa_mask = None if mask is None else (~mask if mask.dtype == torch.bool else mask)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, dropout_p=p_drop, is_causal=only_causal)
            if dead is not None:
                out = out.masked_fill(dead, 0.0)
        out = out.transpose(1, 2).reshape(B, L, self.embed_dim)  # (B, L, d)
        out = self.out_proj(out)
        if return_attn_weights:
            return out, weights.mean(dim=1)  # (B, L, S')
        return out


class MultiDConvHeadAttention(MultiHeadAttention):
    """Multi-DConv-Head Attention (Primer / Primer-EZ, arXiv 2109.08668).

    Multi-head attention where each of the Q, K and V projections is followed by a depthwise
    convolution along time (kernel size 3 by default). ``variant`` chooses how kernels are shared:

    * ``"per_head"`` (Primer's): every channel of every head has its own kernel, (d_model, k) weights.
    * ``"per_channel"``: one kernel per channel *within a head*, shared by all heads: channel ``c`` of
      head 0, head 1, ... uses the same kernel, (d_model / nhead, k) weights. ``per_head`` lets each head
      filter its channel ``c`` differently; ``per_channel`` ties those filters across heads.
    * ``"shared"``: a single kernel for all channels and heads, (1, k) weights.

    With ``causal=True`` the convolution only looks back (left padding ``k - 1``) and a causal attention
    mask is added, so position ``t`` never sees ``t + 1`` (decoders, language models). With
    ``causal=False`` the kernel is centred (encoders). Padded frames (``key_padding_mask``) are zeroed
    after the projections and before the convolutions, so they never leak into valid frames; when the
    query and key lengths are equal (self-attention) the same mask also zeroes padded query frames.

    Arguments
    ---------
    nhead : int
        Number of heads.
    d_model : int
        Model dimension, divisible by ``nhead``.
    dropout : float
        Dropout on the attention probabilities.
    bias : bool
        Biases in the projections.
    kdim, vdim : int, optional
        Key and value feature sizes (default ``d_model``).
    kernel_size : int
        Depthwise convolution width.
    variant : str
        One of ``"per_head"``, ``"per_channel"``, ``"shared"``.
    causal : bool
        Causal convolution and attention.

    Example
    -------
    >>> x = torch.rand(4, 50, 256)
    >>> net = MultiDConvHeadAttention(nhead=4, d_model=256, causal=True)
    >>> out, attn = net(x, x, x)
    >>> out.shape
    torch.Size([4, 50, 256])
    """

    def __init__(
        self,
        nhead: int,
        d_model: int,
        dropout: float = 0.0,
        bias: bool = True,
        kdim: Optional[int] = None,
        vdim: Optional[int] = None,
        kernel_size: int = 3,
        variant: str = "per_head",
        causal: bool = False,
    ) -> None:
        if variant not in DCONV_VARIANTS:
            raise ValueError(
                f"MultiDConvHeadAttention: variant must be one of {', '.join(map(repr, DCONV_VARIANTS))}, "
                f"got {variant!r}"
            )
        if kernel_size < 1:
            raise ValueError(f"MultiDConvHeadAttention: kernel_size must be >= 1, got {kernel_size}")
        super().__init__(nhead, d_model, dropout=dropout, bias=bias, kdim=kdim, vdim=vdim)
        self.kernel_size = kernel_size
        self.variant = variant
        self.causal = causal
        rows = {"per_head": d_model, "per_channel": d_model // nhead, "shared": 1}[variant]
        bound = 1.0 / math.sqrt(kernel_size)  # nn.Conv1d's default for a depthwise kernel
        self.q_dconv = nn.Parameter(torch.empty(rows, kernel_size).uniform_(-bound, bound))
        self.k_dconv = nn.Parameter(torch.empty(rows, kernel_size).uniform_(-bound, bound))
        self.v_dconv = nn.Parameter(torch.empty(rows, kernel_size).uniform_(-bound, bound))

    def _kernel(self, weight: torch.Tensor) -> torch.Tensor:
        """(rows, k) parameter -> (d_model, 1, k) depthwise conv weight (channel index = head * hd + c)."""
        if self.variant == "per_channel":
            weight = weight.repeat(self.num_heads, 1)  # (d, k): same kernel for channel c of every head
        return weight.expand(self.embed_dim, self.kernel_size).unsqueeze(1)  # (d, 1, k)

    def _dconv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Depthwise conv along time of (B, T, C) with a (C, 1, k) kernel, causal or centred."""
        k = self.kernel_size
        left = k - 1 if self.causal else (k - 1) // 2
        y = F.pad(x.transpose(1, 2), (left, k - 1 - left))  # (B, C, T + k - 1)
        y = F.conv1d(y, weight, groups=x.size(-1))  # (B, C, T)
        return y.transpose(1, 2)  # (B, T, C)

    def _mix_time(self, q, k, v, key_padding_mask):
        if key_padding_mask is not None:
            m = _as_additive_or_bool(key_padding_mask)
            keep = ~m if m.dtype == torch.bool else torch.isfinite(m)  # a float mask pads with -inf
            keep = keep.unsqueeze(-1).to(k.dtype)  # (B, S, 1)
            k, v = k * keep, v * keep
            if q.size(1) == k.size(1):
                q = q * keep
        if q.size(1) == k.size(1) and k.size(1) == v.size(1):  # one conv over the stacked q, k, v
            qkv = torch.cat([q, k, v], dim=-1)  # (B, T, 3d)
            w = torch.cat([self._kernel(self.q_dconv), self._kernel(self.k_dconv), self._kernel(self.v_dconv)])
            # contiguous parts: strided views would push SDPA off its fused path onto the (L, S) one
            return tuple(part.contiguous() for part in self._dconv(qkv, w).chunk(3, dim=-1))
        return (
            self._dconv(q, self._kernel(self.q_dconv)),
            self._dconv(k, self._kernel(self.k_dconv)),
            self._dconv(v, self._kernel(self.v_dconv)),
        )
