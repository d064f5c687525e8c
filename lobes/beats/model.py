"""BEATs audio encoder (Chen et al., "BEATs: Audio Pre-Training with Acoustic Tokenizers", arXiv 2212.09058).

Loads and saves Microsoft's checkpoint files (``{"cfg", "model"[, "label_dict"]}``) and returns the same
tuples as SpeechBrain's ``speechbrain.lobes.models.beats.BEATs``, with three differences that matter:

* padding is exact: a row's valid tokens are derived from its valid sample count (frames from samples,
  a token is valid when its whole 16-frame time patch lies inside the valid frames), padded keys are
  masked, and a clip padded inside a batch gives the same valid-token features as the clip alone;
* ``wav_lens`` may be omitted, and bad input (empty batch, too short, NaN, stereo, integer PCM, bad lengths)
  raises a ``ValueError`` / ``TypeError`` that says what was expected; float input far outside [-1, 1]
  (int16 sample values not divided by 32768) is warned about once per process;
* attention runs through ``scaled_dot_product_attention`` with the gated relative-position bias and
  the key padding mask folded into one additive mask; the bucket table is computed once per length.

Reduced precision: ``with torch.autocast("cpu", dtype=torch.bfloat16)`` or ``model.to(torch.bfloat16)``
(CPU), ``torch.autocast("cuda", dtype=torch.float16 / torch.bfloat16)`` (GPU). The filterbank is always
computed in float32.

Outputs with ``output_all_hiddens=True`` are ``(layers + 1, B, T, C)`` (the projected patch embeddings
after the positional convolution first). Tokens are ordered time-major: token ``t * 8 + f`` holds time
patch ``t`` (160 ms) and frequency patch ``f``.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lobes.beats.checkpoint import BEATsCheckpointError, check_config_against_weights, load_checkpoint
from lobes.beats.config import BEATsConfig
from lobes.beats.pooling import NUM_MEL_BINS, masked_mean, min_num_samples, token_padding_mask, top_k_labels
from lobes.checkpoints import state_dict_mismatches
from lobes.features import kaldi_fbank
from lobes.io import atomic_save
from lobes.masks import to_sample_lengths

__all__ = [
    "FBANK_MEAN",
    "FBANK_STD",
    "LOUD_INPUT_PEAK",
    "BEATs",
    "BEATsCheckpointError",
    "BEATsConfig",
    "load_checkpoint",
]

logger = logging.getLogger(__name__)

FBANK_MEAN = 15.41663
FBANK_STD = 6.55582


LOUD_INPUT_PEAK = 4.0
"""Peak ``|x|`` above which float input is taken for unscaled integer PCM (warned once per process)."""
_loud_input_warned = False


def _warn_loud_input(peak: float) -> None:
    global _loud_input_warned
    if _loud_input_warned:
        return
    _loud_input_warned = True
    logger.warning(
        "BEATs input peaks at |x| = %.4g, far outside [-1, 1]: this looks like int16 PCM values stored as floats "
        "without dividing by 32768, and the features will be wrong. Scale with wav / 32768 (or read files with "
        "lobes.io.load_audio). This warning is shown once per process.",
        peak,
    )


def _check_input(wav: Tensor, wav_lens: Tensor | None, patch_size: int) -> tuple[Tensor, Tensor | None]:
    if not torch.is_tensor(wav):
        raise TypeError(f"wav must be a float tensor of shape (B, N), got {type(wav).__name__}")
    if not wav.is_floating_point():
        raise TypeError(
            f"wav must be floating point 16 kHz audio in [-1, 1] of shape (B, N), got {wav.dtype}; "
            "convert integer PCM with wav.float() / 32768"
        )
    if wav.dim() == 1:
        wav = wav.unsqueeze(0)
    if wav.dim() != 2:
        raise ValueError(
            f"wav must have shape (B, N) (mono, 16 kHz), got {tuple(wav.shape)}; mix or pick one channel first"
        )
    if wav.shape[0] == 0:
        raise ValueError(f"empty batch: wav has shape {tuple(wav.shape)}; expected (B, N) with at least one row")
    need = min_num_samples(patch_size)
    if wav.shape[1] < need:
        raise ValueError(
            f"audio too short for BEATs: got {wav.shape[1]} samples, need at least {need} (16 kHz) for one patch"
        )
    peak = wav.detach().abs().amax()  # NaN propagates, so one reduction checks both
    if not torch.isfinite(peak):
        raise ValueError("wav contains NaN or Inf values")
    if peak > LOUD_INPUT_PEAK:
        _warn_loud_input(float(peak))
    if wav_lens is not None:
        if not torch.is_tensor(wav_lens) or not wav_lens.is_floating_point():
            raise TypeError("wav_lens must be a float tensor of relative lengths in (0, 1], shape (B,)")
        if wav_lens.dim() != 1 or wav_lens.shape[0] != wav.shape[0]:
            raise ValueError(f"wav_lens must have shape ({wav.shape[0]},), got {tuple(wav_lens.shape)}")
        if not torch.isfinite(wav_lens).all() or (wav_lens <= 0).any() or (wav_lens > 1.0 + 1e-6).any():
            raise ValueError(f"wav_lens must be relative lengths in (0, 1], got {wav_lens.tolist()}")
        samples = to_sample_lengths(wav_lens, wav.shape[0], wav.shape[1])
        short = (samples < need).nonzero().flatten().tolist()
        if short:
            raise ValueError(
                f"rows {short} have {samples[short].tolist()} valid samples; BEATs needs at least {need} "
                "(16 kHz) for one patch"
            )
    return wav, wav_lens


# --------------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------------
class _GradScale(torch.autograd.Function):
    """Identity forward, gradient multiplied by ``scale`` (layer-wise gradient decay)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def _activation(name: str):
    acts = {
        "gelu": F.gelu,
        "relu": F.relu,
        "tanh": torch.tanh,
        "linear": lambda x: x,
        "gelu_accurate": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    }
    if name not in acts:
        raise ValueError(f"unsupported activation_fn {name!r}; expected one of {sorted(acts)}")
    return acts[name]


def _relative_buckets(length: int, num_buckets: int, max_distance: int, device: torch.device | None = None) -> Tensor:
    """Bucket of ``key - query`` for every pair, ``(length, length)`` int64 (T5-style, bidirectional)."""
    pos = torch.arange(length, device=device)
    rel = pos[None, :] - pos[:, None]  # (T, T) key - query
    half = num_buckets // 2
    buckets = (rel > 0).long() * half
    rel = rel.abs()
    exact = half // 2
    # same float32 op order as the reference so bucket boundaries agree exactly; the floor of 1 only touches
    # the distances below ``exact`` (whose bucket is the distance itself), keeping log(0) out of exported graphs
    large = (
        exact + (torch.log(rel.clamp_min(1).float() / exact) / math.log(max_distance / exact) * (half - exact)).long()
    )
    large = torch.clamp(large, max=half - 1)
    return buckets + torch.where(rel < exact, rel, large)


class _WeightNormConv1d(nn.Module):
    """Grouped Conv1d with weight norm over dim 2 (parameters ``weight_g``, ``weight_v``, ``bias``)."""

    def __init__(self, channels: int, kernel_size: int, groups: int) -> None:
        super().__init__()
        self.padding, self.groups = kernel_size // 2, groups
        v = torch.randn(channels, channels // groups, kernel_size) * math.sqrt(4.0 / (kernel_size * channels))
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(torch.linalg.vector_norm(v.reshape(-1, kernel_size), dim=0).view(1, 1, -1))
        self.bias = nn.Parameter(torch.zeros(channels))

    def weight(self) -> Tensor:
        """``g * v / ||v||`` with the norm over every dim but 2, ``(C, C / groups, K)``."""
        return torch._weight_norm(self.weight_v, self.weight_g, 2)

    def _reduced_precision_is_wrong(self, x: Tensor) -> bool:
        # torch's CPU bf16/fp16 grouped conv1d returns wrong values (errors as large as the signal) when a
        # group is not a multiple of 16 channels wide; the released size (768 / 16 = 48) is not affected.
        reduced = x.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled("cpu")
        return x.device.type == "cpu" and reduced and (self.weight_v.shape[1] % 16) != 0

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, T)`` -> ``(B, C, T + 1)`` (even kernel; the caller drops the last step)."""
        if self._reduced_precision_is_wrong(x):
            with torch.autocast("cpu", enabled=False):
                out = F.conv1d(
                    x.float(), self.weight().float(), self.bias.float(), padding=self.padding, groups=self.groups
                )
            return out.to(x.dtype)
        w = self.weight().to(x.dtype)
        return F.conv1d(x, w, self.bias.to(x.dtype), padding=self.padding, groups=self.groups)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # torch.nn.utils.parametrizations.weight_norm names (SpeechBrain) -> weight_g / weight_v (Microsoft)
        for new, old in (
            ("weight_g", "parametrizations.weight.original0"),
            ("weight_v", "parametrizations.weight.original1"),
        ):
            if prefix + old in state_dict and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class _DropLast(nn.Module):
    """Drop the last time step (an even-kernel 'same' convolution yields one extra)."""

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :, :-1]


class _SelfAttention(nn.Module):
    """Multi-head self-attention with an optional gated relative-position bias, through SDPA."""

    def __init__(self, cfg: BEATsConfig, rel_bias: nn.Embedding | None) -> None:
        super().__init__()
        d, h = cfg.encoder_embed_dim, cfg.encoder_attention_heads
        if d % h:
            raise ValueError(f"encoder_embed_dim ({d}) must be divisible by encoder_attention_heads ({h})")
        self.num_heads, self.head_dim, self.dropout = h, d // h, cfg.attention_dropout
        self.k_proj, self.v_proj, self.q_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        self.gru_rel_pos = bool(cfg.gru_rel_pos)
        if rel_bias is not None:
            self.relative_attention_bias = rel_bias  # shared by every layer
        if self.gru_rel_pos:
            self.grep_a = nn.Parameter(torch.ones(1, h, 1, 1))
            self.grep_linear = nn.Linear(self.head_dim, 8)

    def forward(self, x: Tensor, pos_bias: Tensor | None, key_mask: Tensor | None) -> Tensor:
        """``x`` (B, T, C); ``pos_bias`` (H, T, T); ``key_mask`` additive (B, 1, 1, T) -> (B, T, C)."""
        B, T, C = x.shape
        w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])  # fused projection
        b = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
        qkv = F.linear(x, w, b).view(B, T, 3, self.num_heads, self.head_dim)  # (B, T, 3, H, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, hs)
        # the (B, H, T, T) additive mask is written once, directly in the attention dtype
        dt = q.dtype
        mask = None if key_mask is None else key_mask.to(dt)
        if pos_bias is not None:
            pos_bias = pos_bias.to(dt)
            if self.gru_rel_pos:
                gates = torch.sigmoid(self.grep_linear(q).view(B, self.num_heads, T, 2, 4).sum(-1))  # (B, H, T, 2)
                gate_a, gate_b = gates.unbind(-1)
                gate = (gate_a * (gate_b * self.grep_a.squeeze(-1) - 1.0) + 2.0).unsqueeze(-1)  # (B, H, T, 1)
                gate = gate.to(dt)
                mask = gate * pos_bias if mask is None else torch.addcmul(mask, gate, pos_bias)  # (B, H, T, T)
            else:
                mask = pos_bias.unsqueeze(0) if mask is None else mask + pos_bias
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, scale=self.head_dim**-0.5
        )  # (B, H, T, hs)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class _EncoderLayer(nn.Module):
    """Transformer layer: post-LN (optionally deep-norm scaled residuals) or pre-LN."""

    def __init__(self, cfg: BEATsConfig, rel_bias: nn.Embedding | None) -> None:
        super().__init__()
        d = cfg.encoder_embed_dim
        if cfg.activation_fn == "glu":
            raise ValueError("activation_fn 'glu' is not supported; expected gelu, relu, tanh, linear, gelu_accurate")
        self.self_attn = _SelfAttention(cfg, rel_bias)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_embed_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.act = _activation(cfg.activation_fn)
        self.pre_norm = bool(cfg.layer_norm_first)
        self.alpha = math.pow(2 * cfg.encoder_layers, 0.25) if cfg.deep_norm else 1.0
        self.dropout, self.act_dropout = cfg.dropout, cfg.activation_dropout

    def _ffn(self, x: Tensor) -> Tensor:
        x = F.dropout(self.act(self.fc1(x)), self.act_dropout, self.training)
        return F.dropout(self.fc2(x), self.dropout, self.training)

    def forward(self, x: Tensor, pos_bias: Tensor | None, key_mask: Tensor | None) -> Tensor:
        """``(B, T, C)`` -> ``(B, T, C)``."""
        if self.pre_norm:
            x = x + F.dropout(
                self.self_attn(self.self_attn_layer_norm(x), pos_bias, key_mask), self.dropout, self.training
            )
            return x + self._ffn(self.final_layer_norm(x))
        a = F.dropout(self.self_attn(x, pos_bias, key_mask), self.dropout, self.training)
        x = self.self_attn_layer_norm(torch.add(a, x, alpha=self.alpha))  # alpha * x + a in one pass
        return self.final_layer_norm(torch.add(self._ffn(x), x, alpha=self.alpha))


class _Encoder(nn.Module):
    """Positional convolution + layer stack; the relative bias is computed once and shared."""

    def __init__(self, cfg: BEATsConfig) -> None:
        super().__init__()
        d = cfg.encoder_embed_dim
        if d % cfg.conv_pos_groups:
            raise ValueError(f"encoder_embed_dim ({d}) must be divisible by conv_pos_groups ({cfg.conv_pos_groups})")
        conv = _WeightNormConv1d(d, cfg.conv_pos, cfg.conv_pos_groups)
        self.pos_conv = nn.Sequential(conv, _DropLast() if cfg.conv_pos % 2 == 0 else nn.Identity(), nn.GELU())
        self.relative = bool(cfg.relative_position_embedding)
        self.num_buckets, self.max_distance = cfg.num_buckets, cfg.max_distance
        rel = nn.Embedding(cfg.num_buckets, cfg.encoder_attention_heads) if self.relative else None
        self.layers = nn.ModuleList(_EncoderLayer(cfg, rel) for _ in range(cfg.encoder_layers))
        self.layer_norm = nn.LayerNorm(d)
        self.pre_norm = bool(cfg.layer_norm_first)
        self.dropout, self.layerdrop = cfg.dropout, cfg.encoder_layerdrop
        self.grad_decay = cfg.layer_wise_gradient_decay_ratio
        self._buckets: dict[tuple[int, str], Tensor] = {}

    def position_bias(self, length: int, device: torch.device, cached: bool = True) -> Tensor | None:
        """Relative-position bias ``(H, T, T)`` (None without relative positions).

        The bucket table is kept per length; ``cached=False`` computes it afresh, as a graph traced for
        export must (a cached table would pin the traced length).
        """
        if not self.relative:
            return None
        if not cached:
            buckets = _relative_buckets(length, self.num_buckets, self.max_distance, device)
            emb = self.layers[0].self_attn.relative_attention_bias.weight
            return emb[buckets].permute(2, 0, 1)  # (H, T, T)
        key = (length, str(device))
        buckets = self._buckets.get(key)
        if buckets is None:
            if len(self._buckets) > 16:
                self._buckets.clear()
            buckets = _relative_buckets(length, self.num_buckets, self.max_distance).to(device)
            self._buckets[key] = buckets
        emb = self.layers[0].self_attn.relative_attention_bias.weight
        return emb[buckets].permute(2, 0, 1).contiguous()  # (H, T, T)

    def forward(
        self,
        x: Tensor,
        padding_mask: Tensor | None,
        num_layers: int | None = None,
        all_hiddens: bool = False,
        traceable: bool = False,
    ) -> tuple[Tensor, list[Tensor]]:
        """``x`` (B, T, C), ``padding_mask`` (B, T) -> last hidden (B, T, C) and the list of hiddens.

        ``traceable=True`` (graph export) makes no decision on the data: the key mask is always built from
        ``padding_mask`` and the relative-position buckets are computed for the traced length.
        """
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)  # (B, T, C)
        if not self.pre_norm:
            x = self.layer_norm(x)
        x = F.dropout(x, self.dropout, self.training)
        key_mask = None
        if padding_mask is not None and (traceable or bool(padding_mask.any())):
            key_mask = torch.zeros(padding_mask.shape, dtype=torch.float32, device=x.device)
            key_mask = key_mask.masked_fill(padding_mask, float("-inf"))[:, None, None, :]  # (B, 1, 1, T)
        pos_bias = self.position_bias(x.shape[1], x.device, cached=not traceable)
        hiddens = [x] if all_hiddens else []
        layers = self.layers if num_layers is None else self.layers[:num_layers]
        for layer in layers:
            if self.grad_decay != 1.0:
                x = _GradScale.apply(x, self.grad_decay)
            if not (self.training and self.layerdrop > 0 and torch.rand(()) < self.layerdrop):
                x = layer(x, pos_bias, key_mask)
            if all_hiddens:
                hiddens.append(x)
        if self.pre_norm and num_layers is None:
            x = self.layer_norm(x)
        return x, hiddens


class BEATs(nn.Module):
    """BEATs encoder with Microsoft checkpoint I/O; a drop-in for SpeechBrain's ``BEATs``.

    Arguments
    ---------
    ckp_path : str or path-like, optional
        Microsoft BEATs checkpoint (pre-trained iter1/2/3/3+, or AS2M fine-tuned with ``label_dict``).
    freeze : bool
        If True, ``forward`` runs without gradients and the model stays in eval mode.
    output_all_hiddens : bool
        If True, features are ``(layers + 1, B, T, C)``; otherwise the last layer ``(B, T, C)``.
    cfg : BEATsConfig or dict, optional
        Architecture. Without ``ckp_path``: a randomly initialised model of this configuration (default
        ``BEATsConfig()``, the reference defaults). With ``ckp_path``: overrides applied on top of the
        checkpoint's cfg (e.g. dropouts for fine-tuning).

    Example
    -------
    >>> cfg = BEATsConfig.released(encoder_layers=2, encoder_embed_dim=64, encoder_ffn_embed_dim=128,
    ...                            encoder_attention_heads=4, embed_dim=32, conv_pos=16, conv_pos_groups=4)
    >>> model = BEATs(cfg=cfg)
    >>> wav = torch.randn(2, 16000)
    >>> feats, = model(wav, torch.tensor([1.0, 0.6]))
    >>> feats.shape
    torch.Size([2, 48, 64])
    """

    def __init__(
        self,
        ckp_path: str | os.PathLike | None = None,
        freeze: bool = True,
        output_all_hiddens: bool = False,
        cfg: BEATsConfig | dict | None = None,
    ) -> None:
        super().__init__()
        ckpt = load_checkpoint(ckp_path) if ckp_path is not None else None
        config = BEATsConfig(ckpt["cfg"]) if ckpt is not None else BEATsConfig()
        if cfg is not None:
            config.update(cfg)
        if ckpt is not None:
            overrides = cfg.to_dict() if isinstance(cfg, BEATsConfig) else (cfg or {})
            check_config_against_weights(config, ckpt["model"], set(ckpt["cfg"]) | set(overrides), str(ckp_path))
        if config.deep_norm and config.layer_norm_first:
            raise ValueError("BEATs cfg: deep_norm and layer_norm_first cannot both be True")
        if NUM_MEL_BINS % config.input_patch_size:
            raise ValueError(f"input_patch_size must divide {NUM_MEL_BINS}, got {config.input_patch_size}")
        self.cfg = config
        self.freeze, self.output_all_hiddens = freeze, output_all_hiddens
        self.label_dict: dict | None = ckpt.get("label_dict") if ckpt is not None else None
        p, e, d = config.input_patch_size, config.embed_dim, config.encoder_embed_dim
        self.patch_embedding = nn.Conv2d(1, e, kernel_size=p, stride=p, bias=config.conv_bias)
        self.layer_norm = nn.LayerNorm(e)
        self.post_extract_proj = nn.Linear(e, d) if e != d else None
        self.dropout_input = nn.Dropout(config.dropout_input)
        self.encoder = _Encoder(config)
        if config.finetuned_model:
            self.predictor_dropout = nn.Dropout(config.predictor_dropout)
            self.predictor = nn.Linear(d, config.predictor_class)
        else:
            self.predictor = None
        self._init_weights()
        if ckpt is not None:
            self.load_beats_state_dict(ckpt["model"], source=str(ckp_path))
        if freeze:
            self.eval()

    # ---------------------------------------------------------------- weights / checkpoints
    def _init_weights(self) -> None:
        """BERT-style init, deep-norm scaled projections (as the reference initialises a new model)."""
        beta = math.pow(8 * self.cfg.encoder_layers, -0.25) if self.cfg.deep_norm else 1.0
        for layer in self.encoder.layers:
            for lin in (layer.fc1, layer.fc2):
                if self.cfg.deep_norm:
                    nn.init.xavier_normal_(lin.weight, gain=beta)
                else:
                    nn.init.normal_(lin.weight, 0, 0.02)
                nn.init.zeros_(lin.bias)
            att = layer.self_attn
            for lin, gain in ((att.q_proj, 1.0), (att.k_proj, 1.0), (att.v_proj, beta), (att.out_proj, beta)):
                nn.init.xavier_normal_(lin.weight, gain=gain)
                nn.init.zeros_(lin.bias)
        if self.encoder.relative:
            nn.init.xavier_normal_(self.encoder.layers[0].self_attn.relative_attention_bias.weight)

    def load_beats_state_dict(self, state_dict: dict, source: str = "state dict") -> None:
        """Load a Microsoft / SpeechBrain BEATs state dict, checking every key and shape.

        Both weight-norm spellings of the positional convolution load (``weight_g`` / ``weight_v`` and
        ``parametrizations.weight.original0`` / ``original1``).

        Raises
        ------
        BEATsCheckpointError
            Missing or unexpected keys, or shape mismatches (all listed, with ``source``).
        """
        sd = dict(state_dict)
        for new, old in (
            ("weight_g", "parametrizations.weight.original0"),
            ("weight_v", "parametrizations.weight.original1"),
        ):
            old_key, new_key = f"encoder.pos_conv.0.{old}", f"encoder.pos_conv.0.{new}"
            if old_key in sd and new_key not in sd:
                sd[new_key] = sd.pop(old_key)
        problems = state_dict_mismatches(self.state_dict(), sd)
        if problems:
            raise BEATsCheckpointError(f"{source}: does not match the BEATs cfg: " + " | ".join(problems))
        self.load_state_dict(sd, strict=True)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, **kwargs: Any) -> "BEATs":
        """``BEATs(ckp_path=path, **kwargs)``."""
        return cls(ckp_path=path, **kwargs)

    def save_checkpoint(self, path: str | os.PathLike) -> Path:
        """Write ``{"cfg", "model"[, "label_dict"]}`` in Microsoft's format, atomically.

        The file loads with this class, SpeechBrain's ``BEATs`` and Microsoft's code.
        """
        path = Path(path)
        state = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}
        ckpt: dict[str, Any] = {"cfg": copy.deepcopy(self.cfg.to_dict()), "model": state}
        if self.label_dict is not None:
            ckpt["label_dict"] = dict(self.label_dict)
        return atomic_save(ckpt, path)

    def train(self, mode: bool = True) -> "BEATs":
        """Set train mode; a frozen model stays in eval mode (deterministic features)."""
        return super().train(mode and not self.freeze)

    # ---------------------------------------------------------------- forward pass
    def preprocess(self, wav: Tensor, fbank_mean: float = FBANK_MEAN, fbank_std: float = FBANK_STD) -> Tensor:
        """Normalised 128-bin Kaldi fbank of ``wav * 2**15``: ``(B, N)`` -> ``(B, frames, 128)`` float32."""
        fbank = kaldi_fbank(
            wav * 2**15, num_mel_bins=NUM_MEL_BINS, sample_frequency=16000.0, frame_length=25.0, frame_shift=10.0
        )
        return (fbank - fbank_mean) / (2 * fbank_std)

    def embed_patches(self, fbank: Tensor) -> Tensor:
        """16x16 patches -> token embeddings: ``(B, frames, 128)`` -> ``(B, T, embed_dim)`` (T = t * 8 + f)."""
        p = self.cfg.input_patch_size
        B, n_frames, n_bins = fbank.shape
        t, f = n_frames // p, n_bins // p
        w = self.patch_embedding.weight  # (E, 1, p, p)
        x = fbank[:, : t * p].to(w.dtype).reshape(B, t, p, f, p)  # (B, t, p_time, f, p_freq)
        x = x.permute(0, 1, 3, 2, 4).reshape(B, t * f, p * p)  # (B, T, p*p), time-major tokens
        return F.linear(x, w.reshape(w.shape[0], -1), self.patch_embedding.bias)  # (B, T, E)

    def forward(
        self, wav: Tensor, wav_lens: Tensor | None = None, fbank_mean: float = FBANK_MEAN, fbank_std: float = FBANK_STD
    ) -> tuple:
        """Encode a batch; without gradients when frozen. See :meth:`extract_features`."""
        if self.freeze:
            with torch.no_grad():
                return self.extract_features(wav, wav_lens, fbank_mean, fbank_std)
        return self.extract_features(wav, wav_lens, fbank_mean, fbank_std)

    def extract_features(
        self,
        wav: Tensor,
        wav_lens: Tensor | None = None,
        fbank_mean: float = FBANK_MEAN,
        fbank_std: float = FBANK_STD,
        *,
        layer: int | None = None,
    ) -> tuple:
        """Encode a batch of 16 kHz waveforms.

        Arguments
        ---------
        wav : torch.Tensor
            ``(B, N)`` float audio in [-1, 1] at 16 kHz, ``N >= 2800`` (a 1-D signal is a batch of one).
        wav_lens : torch.Tensor, optional
            ``(B,)`` relative lengths in ``(0, 1]``; ``None`` = all rows full length.
        fbank_mean, fbank_std : float
            Filterbank normalisation (BEATs' fixed statistics).
        layer : int, optional
            Return the output of this layer (0 = after the positional convolution) instead; later layers
            are skipped (all layers run for fine-tuned models, whose head needs the last one).

        Returns
        -------
        tuple
            ``(features,)`` for pre-trained models, ``(features, probs, padding_mask)`` for fine-tuned ones:
            features ``(B, T, C)`` (``(layers + 1, B, T, C)`` with ``output_all_hiddens``), class
            probabilities ``(B, classes)`` averaged over valid tokens, token padding mask ``(B, T)`` bool.
        """
        wav, wav_lens = _check_input(wav, wav_lens, self.cfg.input_patch_size)
        n_layers = len(self.encoder.layers)
        if layer is not None and not 0 <= layer <= n_layers:
            raise ValueError(f"layer must be in [0, {n_layers}], got {layer}")
        pad = token_padding_mask(wav, wav_lens, self.cfg.input_patch_size)  # (B, T)
        fbank = self.preprocess(wav, fbank_mean, fbank_std)  # (B, frames, 128)
        return self.encode_fbank(fbank, pad, pad if bool(pad.any()) else None, layer=layer)

    def encode_fbank(
        self,
        fbank: Tensor,
        pad: Tensor,
        key_padding: Tensor | None,
        *,
        layer: int | None = None,
        traceable: bool = False,
    ) -> tuple:
        """The part of :meth:`extract_features` after the filterbank, without input checks.

        Arguments
        ---------
        fbank : torch.Tensor
            ``(B, frames, 128)`` normalised filterbank (:meth:`preprocess`).
        pad : torch.Tensor
            ``(B, T)`` token padding mask (``True`` = padded), used for the tag probabilities.
        key_padding : torch.Tensor, optional
            The mask the encoder applies (``None`` when no token is padded).
        layer : int, optional
            As in :meth:`extract_features` (checked there).
        traceable : bool
            No decision on the data (graph export; see ``_Encoder.forward``).

        Returns
        -------
        tuple
            As :meth:`extract_features`.
        """
        x = self.layer_norm(self.embed_patches(fbank))  # (B, T, E)
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)
        x = self.dropout_input(x)
        finetuned = self.predictor is not None
        stop = None if (layer is None or finetuned) else layer
        all_hiddens = self.output_all_hiddens or (layer is not None and finetuned)
        x, hiddens = self.encoder(x, key_padding, num_layers=stop, all_hiddens=all_hiddens, traceable=traceable)
        if layer is not None:
            feats = hiddens[layer] if finetuned else x
        elif self.output_all_hiddens:
            feats = torch.stack(hiddens, dim=0)  # (L + 1, B, T, C)
        else:
            feats = x
        if not finetuned:
            return (feats,)
        logits = self.predictor(self.predictor_dropout(x))  # (B, T, classes)
        probs = torch.sigmoid(masked_mean(logits.float(), pad))  # (B, classes)
        return feats, probs, pad

    # ---------------------------------------------------------------- tagging
    @property
    def labels(self) -> list[str] | None:
        """Class names in predictor order (from the checkpoint's ``label_dict``), or None."""
        if self.label_dict is None:
            return None
        return [str(self.label_dict[i]) for i in range(len(self.label_dict))]

    def tag(self, wav: Tensor, wav_lens: Tensor | None = None, k: int = 5) -> list[list[tuple[str, float]]]:
        """Top-``k`` labels and probabilities per clip (fine-tuned AudioSet checkpoints).

        Arguments
        ---------
        wav : torch.Tensor
            ``(B, N)`` 16 kHz audio.
        wav_lens : torch.Tensor, optional
            ``(B,)`` relative lengths.
        k : int
            Labels per clip.

        Returns
        -------
        list of list of (str, float)
            Per clip, ``(label, probability)`` by decreasing probability.
        """
        if self.predictor is None:
            raise ValueError("tagging needs a fine-tuned BEATs checkpoint (cfg finetuned_model=True with a predictor)")
        with torch.no_grad():
            probs = self.extract_features(wav, wav_lens)[1]
        return top_k_labels(probs, self.label_dict, k)
