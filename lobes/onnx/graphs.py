"""The modules that ONNX graphs are traced from: each model with its front-end inside, no length ceiling.

Every graph takes the waveform and the valid sample count of each row and makes no decision on the data
(no ``if`` on a tensor, no cache keyed by a length, no preallocated buffer), so one exported graph serves
every batch size and length:

* :class:`BEATsGraph`: ``waveforms (B, S)``, ``lengths (B,)`` -> ``features`` (B, T, C) (or every layer,
  ``(B, L + 1, T, C)``), ``token_lengths`` (B,) and, for an AudioSet fine-tuned model, ``probs``
  (B, classes). The Kaldi fbank runs inside (:class:`lobes.features.DFTKaldiFbank`).
* :class:`ClassifierGraph`: a classification folder's BEATs, layer mix, pooling and head ->
  ``probs`` (B, classes) and ``embeddings`` (B, C).
* :class:`ASRGraph`: an :class:`lobes.asr.ASRModel` -> CTC ``log_probs`` (B, T', V) (frames past a row's
  end are the blank) and ``frames`` (B,). The fbank (speechbrain's ``Fbank``) is rewritten as
  :class:`DFTSpeechBrainFbank`; optional fbank statistics ``stats_mean`` / ``stats_var`` (F,) replace each
  row's own when ``use_stats`` is 1 (long recordings cut into windows).

Sinusoidal position tables are computed from the length inside the graph
(:class:`ComputedPositionalEncoding` replaces every :class:`lobes.attention.PositionalEncoding` of the
traced copy), so the graph has no length ceiling.

Example
-------
>>> from lobes.beats import BEATs, BEATsConfig
>>> cfg = BEATsConfig.released(encoder_layers=1, encoder_embed_dim=32, encoder_ffn_embed_dim=64, embed_dim=16,
...                            encoder_attention_heads=4, conv_pos=8, conv_pos_groups=2, num_buckets=32)
>>> graph = BEATsGraph(BEATs(cfg=cfg))
>>> feats, counts = graph(torch.randn(2, 16000) * 0.1, torch.tensor([16000, 8000]))
>>> feats.shape, counts.tolist()
(torch.Size([2, 48, 32]), [48, 24])
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from lobes.features import DFTKaldiFbank

__all__ = [
    "ASRGraph",
    "BEATsGraph",
    "ClassifierGraph",
    "ComputedPositionalEncoding",
    "DFTSpeechBrainFbank",
    "ExportError",
    "without_length_ceiling",
]


class ExportError(ValueError):
    """A model (or an option) that cannot be exported; the message says what and why."""


# --------------------------------------------------------------------------------------------------
# positions without a ceiling
# --------------------------------------------------------------------------------------------------
class ComputedPositionalEncoding(nn.Module):
    """:class:`lobes.attention.PositionalEncoding` computed from the input's length in the graph.

    The values are :func:`lobes.attention.sinusoidal_table`'s (same float32 operations: positions times a
    constant frequency row, then sine and cosine interleaved), without a precomputed table to outgrow.

    Example
    -------
    >>> from lobes.attention import PositionalEncoding
    >>> x = torch.zeros(1, 4000, 16)
    >>> torch.allclose(ComputedPositionalEncoding(16)(x), PositionalEncoding(16, max_len=100)(x), atol=1e-6)
    True
    """

    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        inv = torch.exp(torch.arange(0, input_size, 2).float() * -(math.log(10000.0) / input_size))
        self.register_buffer("frequencies", inv, persistent=False)  # (d / 2,)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, L, d)`` -> ``(1, L, d)`` in ``x``'s dtype."""
        positions = torch.arange(x.shape[1], device=x.device).float().unsqueeze(1)  # (L, 1)
        angles = positions * self.frequencies  # (L, d / 2)
        table = torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).flatten(1)  # (L, d): sin, cos, ...
        return table.unsqueeze(0).to(x.dtype)


def without_length_ceiling(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose :class:`lobes.attention.PositionalEncoding` submodules are replaced by
    :class:`ComputedPositionalEncoding` (for tracing; ``module`` itself is unchanged)."""
    from lobes.attention import PositionalEncoding

    module = copy.deepcopy(module)
    for name, child in list(module.named_modules()):
        if isinstance(child, PositionalEncoding):
            parent = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
            replacement = ComputedPositionalEncoding(child.input_size).to(child.pe.device)
            if name:
                setattr(parent, name.rpartition(".")[2], replacement)
            else:
                module = replacement
    return module


# --------------------------------------------------------------------------------------------------
# BEATs
# --------------------------------------------------------------------------------------------------
def _valid_tokens_per_row(lengths: Tensor, patch_size: int, window: int = 400, shift: int = 160) -> Tensor:
    """``(B,)`` samples -> valid time patches (a patch is valid when its frames lie inside the samples)."""
    frames = torch.where(lengths >= window, torch.div(lengths - window, shift, rounding_mode="floor") + 1, 0)
    return torch.div(frames, patch_size, rounding_mode="floor")


class _BEATsCore(nn.Module):
    """Waveforms and sample counts -> what :meth:`lobes.beats.BEATs.encode_fbank` returns, traceably."""

    def __init__(self, model: nn.Module, layer: int | None = None, dft_dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        from lobes.beats.model import FBANK_MEAN, FBANK_STD
        from lobes.beats.pooling import NUM_MEL_BINS

        self.model = model.eval()
        self.layer = layer
        self.mean, self.std = FBANK_MEAN, FBANK_STD
        self.fbank = DFTKaldiFbank(num_mel_bins=NUM_MEL_BINS, dft_dtype=dft_dtype)
        self.patch = model.cfg.input_patch_size
        self.freq_patches = NUM_MEL_BINS // self.patch

    def forward(self, waveforms: Tensor, lengths: Tensor) -> tuple:
        fbank = (self.fbank(waveforms * 2**15) - self.mean) / (2 * self.std)  # (B, frames, 128)
        B = waveforms.shape[0]
        t_total = fbank.shape[1] // self.patch
        t_valid = _valid_tokens_per_row(lengths, self.patch)  # (B,)
        pad_time = torch.arange(t_total, device=waveforms.device).unsqueeze(0) >= t_valid.unsqueeze(1)  # (B, t)
        pad = pad_time.unsqueeze(-1).expand(B, t_total, self.freq_patches).reshape(B, t_total * self.freq_patches)
        out = self.model.encode_fbank(fbank, pad, pad, layer=self.layer, traceable=True)
        return out, t_valid * self.freq_patches


class BEATsGraph(nn.Module):
    """BEATs with the fbank inside: ``waveforms (B, S)``, ``lengths (B,)`` int64 samples ->
    ``features``, ``token_lengths`` (and ``probs`` for a fine-tuned model).

    Arguments
    ---------
    model : lobes.beats.BEATs
        The model (not changed).
    layer : int, optional
        Output of this layer (0 = after the positional convolution) instead of the last one; with a
        model built with ``output_all_hiddens=True`` and no ``layer``, every layer ``(B, L + 1, T, C)``.
    dft_dtype : torch.dtype
        Precision of the fbank's DFT (see :class:`lobes.features.DFTKaldiFbank`).
    """

    def __init__(self, model: nn.Module, layer: int | None = None, dft_dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.core = _BEATsCore(model, layer, dft_dtype)
        self.finetuned = model.predictor is not None

    def forward(self, waveforms: Tensor, lengths: Tensor) -> tuple:
        out, token_lengths = self.core(waveforms, lengths)
        feats = out[0]
        if feats.dim() == 4:
            feats = feats.transpose(0, 1)  # (B, L + 1, T, C)
        if self.finetuned:
            return feats, token_lengths, out[1]
        return feats, token_lengths


class ClassifierGraph(nn.Module):
    """A classification folder's model: ``waveforms (B, S)``, ``lengths (B,)`` -> ``probs`` (B, classes)
    and ``embeddings`` (B, C).

    Arguments
    ---------
    embedding_model : lobes.inference.classify.BEATsEmbedding
        BEATs encoder, layer mix and pooling.
    classifier : lobes.inference.classify.ClassifierHead, optional
        The head; without it, ``probs`` is left out.
    dft_dtype : torch.dtype
        Precision of the fbank's DFT.
    """

    def __init__(self, embedding_model: nn.Module, classifier: nn.Module | None, dft_dtype=torch.float64) -> None:
        super().__init__()
        self.core = _BEATsCore(embedding_model.encoder, None, dft_dtype)
        self.layer_mix, self.pooling, self.classifier = (
            embedding_model.layer_mix,
            embedding_model.pooling,
            classifier,
        )

    def forward(self, waveforms: Tensor, lengths: Tensor) -> tuple:
        out, _ = self.core(waveforms, lengths)
        feats = out[0]
        if feats.dim() == 4:
            feats = self.layer_mix(feats)  # (B, T, C)
        B, T = feats.shape[:2]
        t_valid = _valid_tokens_per_row(lengths, self.core.patch)
        pad_time = torch.arange(T // self.core.freq_patches, device=feats.device)
        pad = (pad_time.unsqueeze(0) >= t_valid.unsqueeze(1)).unsqueeze(-1).expand(B, -1, self.core.freq_patches)
        emb = self.pooling(feats, pad.reshape(B, T))  # (B, C)
        if self.classifier is None:
            return (emb,)
        return self.classifier(emb).exp(), emb


# --------------------------------------------------------------------------------------------------
# ASR
# --------------------------------------------------------------------------------------------------
class DFTSpeechBrainFbank(nn.Module):
    """speechbrain's ``Fbank`` (centred STFT, power spectrum, triangular mel filters, dB with ``top_db``) as
    a real DFT matrix product: ``(B, S)`` -> ``(B, S // hop + 1, n_mels)``.

    Built from an existing ``speechbrain.lobes.features.Fbank`` (its window, filter matrix and dB settings);
    only the plain configuration (no deltas, no context, frozen triangular filters) is supported.

    Example
    -------
    >>> from speechbrain.lobes.features import Fbank
    >>> ref = Fbank(n_mels=40)
    >>> wav = torch.randn(2, 8000) * 0.1
    >>> bool((DFTSpeechBrainFbank(ref)(wav) - ref(wav)).abs().max() < 1e-3)
    True
    """

    def __init__(self, fbank: nn.Module, dft_dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        stft, fb = fbank.compute_STFT, fbank.compute_fbanks
        problems = []
        if getattr(fbank, "deltas", False) or getattr(fbank, "context", False):
            problems.append("deltas / context")
        if not stft.center or stft.pad_mode != "constant" or stft.normalized_stft or not stft.onesided:
            problems.append("an STFT other than centred, zero-padded, one-sided, not normalised")
        if fb.filter_shape != "triangular" or not fb.freeze or fb.param_rand_factor != 0:
            problems.append("filters other than frozen triangular ones")
        if stft.win_length > stft.n_fft:
            problems.append("a window longer than n_fft")
        if problems:
            raise ExportError(f"the ASR fbank uses {', '.join(problems)}; the exported fbank supports none of these")
        self.n_fft, self.hop = int(stft.n_fft), int(stft.hop_length)
        window = torch.zeros(self.n_fft, dtype=torch.float64)
        lead = (self.n_fft - stft.win_length) // 2  # torch.stft centres a shorter window in n_fft
        window[lead : lead + stft.win_length] = stft.window.double()
        bins = self.n_fft // 2 + 1
        n = torch.arange(self.n_fft, dtype=torch.float64).unsqueeze(1)
        k = torch.arange(bins, dtype=torch.float64).unsqueeze(0)
        angle = (2 * math.pi / self.n_fft) * torch.remainder(n * k, self.n_fft)
        dft = torch.cat([torch.cos(angle), -torch.sin(angle)], dim=1) * window.unsqueeze(1)  # window folded in
        self.register_buffer("dft", dft.to(dft_dtype))
        self.dft_dtype = dft_dtype
        with torch.no_grad():  # the filter matrix exactly as Filterbank.forward builds it
            f_central = fb.f_central.repeat(fb.all_freqs_mat.shape[1], 1).transpose(0, 1)
            band = fb.band.repeat(fb.all_freqs_mat.shape[1], 1).transpose(0, 1)
            matrix = fb._create_fbank_matrix(f_central, band)  # (bins, n_mels)
        self.register_buffer("mel", matrix.float().contiguous())
        self.log_mel = bool(fb.log_mel)
        self.multiplier, self.db_multiplier = float(fb.multiplier), float(fb.db_multiplier)
        self.amin, self.top_db = float(fb.amin), float(fb.top_db)

    def forward(self, wavs: Tensor) -> Tensor:
        """``(B, S)`` -> ``(B, S // hop + 1, n_mels)`` float32."""
        half = self.n_fft // 2
        x = torch.nn.functional.pad(wavs.float(), (half, half))  # centred frames, zero padding
        count = wavs.shape[1] // self.hop + 1
        index = torch.arange(count, device=x.device).unsqueeze(1) * self.hop + torch.arange(self.n_fft, device=x.device)
        frames = x[:, index]  # (B, M, n_fft)
        spec = torch.matmul(frames.to(self.dft_dtype), self.dft)  # (B, M, 2 * bins)
        re, im = spec.chunk(2, dim=-1)
        power = (re * re + im * im).float()
        feats = torch.matmul(power, self.mel)  # (B, M, n_mels)
        if not self.log_mel:
            return feats
        db = self.multiplier * torch.log10(feats.clamp_min(self.amin)) - self.multiplier * self.db_multiplier
        floor = db.amax(dim=(-2, -1), keepdim=True) - self.top_db  # (B, 1, 1)
        return torch.maximum(db, floor)


class ASRGraph(nn.Module):
    """An :class:`lobes.asr.ASRModel` for export: waveforms and sample counts -> CTC log-probabilities.

    Inputs ``waveforms (B, S)``, ``lengths (B,)`` int64 samples, ``stats_mean``, ``stats_var`` (F,) and
    ``use_stats`` (1,) (1: normalise every row with the given statistics, 0: with its own); outputs
    ``log_probs`` (B, T', V), frames past a row's end set to the blank as :class:`lobes.inference.asr.CTCEncoder`
    does, and ``frames`` (B,).

    Arguments
    ---------
    model : lobes.asr.ASRModel
        The model (a copy is traced, with :func:`without_length_ceiling`).
    blank_index : int
        The CTC blank.
    pad_log_prob : float
        Log-probability of the other tokens on padded frames.
    """

    def __init__(self, model: nn.Module, blank_index: int = 0, pad_log_prob: float = -1e4, dft_dtype=torch.float64):
        super().__init__()
        self.model = without_length_ceiling(model).eval()  # an attention decoder is never called: not exported
        self.fbank = DFTSpeechBrainFbank(model.compute_fbank, dft_dtype)
        self.hop = int(model.hop_length)
        blank = torch.full((int(model.ctc_lin.out_features),), pad_log_prob)
        blank[blank_index] = 0.0
        self.register_buffer("blank_row", blank)

    def forward(self, waveforms: Tensor, lengths: Tensor, stats_mean: Tensor, stats_var: Tensor, use_stats: Tensor):
        from lobes.masks import lengths_to_mask

        feats = self.fbank(waveforms)  # (B, T, F)
        frames = torch.div(lengths, self.hop, rounding_mode="floor") + 1
        frames = frames.clamp(max=feats.shape[1])
        keep = lengths_to_mask(frames, feats.shape[1]).unsqueeze(-1).float()  # (B, T, 1)
        n = frames.view(-1, 1, 1).float()
        mean = (feats * keep).sum(1, keepdim=True) / n  # (B, 1, F)
        var = (((feats - mean) * keep) ** 2).sum(1, keepdim=True) / n
        given = use_stats.view(1, 1, 1) > 0.5
        mean = torch.where(given, stats_mean.view(1, 1, -1), mean)
        var = torch.where(given, stats_var.view(1, 1, -1), var)
        feats = (feats - mean) / torch.sqrt(var + self.model.norm_eps) * keep
        enc, out_frames = self.model.encode(feats, frames)
        log_probs = self.model.ctc_log_probs(enc)  # (B, T', V)
        pad = ~lengths_to_mask(out_frames, log_probs.shape[1])  # (B, T')
        return torch.where(pad.unsqueeze(-1), self.blank_row, log_probs), out_frames
