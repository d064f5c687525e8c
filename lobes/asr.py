"""End-to-end ASR model: fbank -> CNN front-end (4x subsampling) -> encoder -> CTC head (+ attention decoder).

The encoder is injected (any :class:`lobes.mixers.Encoder`), so one model class serves HyperConformer,
Conformer, Transformer and Primer encoders. Every stage carries the number of valid frames and zeroes what
lies beyond it, so an utterance decodes the same alone or padded inside a batch: per-utterance feature
normalisation over valid frames only, a front-end that clears padded frames after each strided convolution,
and a padding-invariant encoder.

Decoding reuses speechbrain's searchers: :func:`ctc_greedy_decode` wraps
``speechbrain.decoders.ctc.ctc_greedy_decode``; ``speechbrain.decoders.ctc.CTCBeamSearcher`` takes
:meth:`ASRModel.ctc_log_probs`, and ``speechbrain.decoders.S2STransformerBeamSearcher`` takes
``[model, model.seq_lin]`` (``ASRModel.decode`` has the signature it expects).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from speechbrain.lobes.features import Fbank
from speechbrain.nnet.linear import Linear
from torch import nn

from lobes.masks import lengths_to_mask, lengths_to_padding_mask, relative_to_absolute, zero_padding
from lobes.mixers import Encoder

__all__ = ["ConvFrontEnd", "AttentionDecoder", "ASRModel", "LexiconCorrector", "ctc_greedy_decode"]


def _mask_frames(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Zero frames of ``x`` (B, T, ...) at or beyond ``lengths`` (B,)."""
    return zero_padding(x, lengths_to_padding_mask(lengths, x.shape[1]))


def ctc_greedy_decode(log_probs: torch.Tensor, lengths: torch.Tensor, blank_index: int = 0) -> list[list[int]]:
    """Best path per utterance with repeats merged and blanks removed.

    Arguments
    ---------
    log_probs : torch.Tensor
        (B, T, V) CTC log-probabilities.
    lengths : torch.Tensor
        (B,) valid frames (absolute).
    blank_index : int
        Index of the CTC blank.

    Returns
    -------
    list[list[int]]
        Token ids per utterance.

    Example
    -------
    >>> lp = torch.log(torch.tensor([[[.1, .9], [.1, .9], [.9, .1], [.1, .9]]]))
    >>> ctc_greedy_decode(lp, torch.tensor([4]))
    [[1, 1]]
    """
    from speechbrain.decoders.ctc import ctc_greedy_decode as _sb_greedy

    return _sb_greedy(log_probs, lengths.float() / log_probs.shape[1], blank_id=blank_index)


class LexiconCorrector:
    """Replaces each hypothesis word that is outside a closed vocabulary by the nearest vocabulary word.

    Distance is the character Levenshtein distance; ties go to the word seen most often (then to the
    alphabetically first). Useful when the task's vocabulary is known, e.g. the words of the training
    transcripts of the embedded corpus. Words farther than ``max_distance`` (if given) are kept as they are.

    Arguments
    ---------
    words : Iterable[str]
        The vocabulary, with repetitions (repetitions count as frequency for tie-breaking).
    max_distance : int, optional
        Largest edit distance that is corrected.

    Example
    -------
    >>> fix = LexiconCorrector("THE DOG SAW THE CAT".split())
    >>> fix("THE DOQ SAV THF CAT".split())
    ['THE', 'DOG', 'SAW', 'THE', 'CAT']
    """

    def __init__(self, words: Iterable[str], max_distance: Optional[int] = None):
        counts = Counter(w for w in words if w)
        if not counts:
            raise ValueError("LexiconCorrector needs at least one non-empty word")
        self.words = sorted(counts, key=lambda w: (-counts[w], w))  # tie-break order
        self.vocabulary = set(self.words)
        self.max_distance = max_distance
        width = max(len(w) for w in self.words)
        codes = np.zeros((len(self.words), width), dtype=np.int32)
        for i, w in enumerate(self.words):
            codes[i, : len(w)] = [ord(c) for c in w]
        self._codes = codes
        self._lengths = np.array([len(w) for w in self.words])
        self._cache: dict[str, str] = {}

    @classmethod
    def from_transcripts(cls, transcripts: Iterable[str], max_distance: Optional[int] = None) -> "LexiconCorrector":
        """A corrector whose vocabulary is the words of ``transcripts`` (strings of space-separated words)."""
        return cls((w for t in transcripts for w in t.split()), max_distance)

    def distances(self, word: str) -> np.ndarray:
        """Levenshtein distance from ``word`` to every vocabulary word (in :attr:`words` order)."""
        n, width = self._codes.shape
        # prev[k, j]: distance between the prefix of `word` read so far and the first j letters of entry k
        prev = np.broadcast_to(np.arange(width + 1), (n, width + 1)).copy()
        for i, char in enumerate(word, start=1):
            cur = np.empty_like(prev)
            cur[:, 0] = i
            substitution = prev[:, :-1] + (self._codes != ord(char))
            deletion = prev[:, 1:] + 1
            best = np.minimum(substitution, deletion)
            for j in range(1, width + 1):  # insertions run along the entry
                cur[:, j] = np.minimum(best[:, j - 1], cur[:, j - 1] + 1)
            prev = cur
        return prev[np.arange(n), self._lengths]

    def correct_word(self, word: str) -> str:
        """``word`` itself if it is in the vocabulary, else its nearest vocabulary word."""
        if word in self.vocabulary:
            return word
        hit = self._cache.get(word)
        if hit is None:
            dist = self.distances(word)
            best = int(np.argmin(dist))  # first minimum = most frequent among the nearest
            hit = word if self.max_distance is not None and dist[best] > self.max_distance else self.words[best]
            self._cache[word] = hit
        return hit

    def __call__(self, words: Sequence[str]) -> list[str]:
        return [self.correct_word(w) for w in words]


class ConvFrontEnd(nn.Module):
    """Strided 2-D convolutions over (time, mel) that subsample time by ``2 ** len(channels)``.

    Each block is conv (kernel 3, stride 2, zero padding 1) -> per-frame layer norm over (mel, channel) ->
    LeakyReLU -> dropout, then frames beyond the new valid length are zeroed, which is exactly what the
    zero padding of the convolution shows an utterance that is alone in its batch.

    Arguments
    ---------
    n_mels : int
        Mel bins F of the input.
    channels : Sequence[int]
        Output channels of each block; speechbrain's LibriSpeech recipes use (64, 32).
    kernel_size : int
        Odd kernel size of every convolution.
    dropout : float
        Dropout after each block.
    activation : Callable[[], nn.Module]
        Activation class.

    Example
    -------
    >>> fe = ConvFrontEnd(80)
    >>> out, lens = fe(torch.rand(2, 101, 80), torch.tensor([101, 37]))
    >>> out.shape, lens.tolist(), fe.output_size
    (torch.Size([2, 26, 640]), [26, 10], 640)
    """

    def __init__(
        self,
        n_mels: int = 80,
        channels: Sequence[int] = (64, 32),
        kernel_size: int = 3,
        dropout: float = 0.1,
        activation: Callable[[], nn.Module] = nn.LeakyReLU,
    ):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.n_mels = n_mels
        self.convs, self.norms = nn.ModuleList(), nn.ModuleList()
        in_ch, freq = 1, n_mels
        for out_ch in channels:
            self.convs.append(nn.Conv2d(in_ch, out_ch, kernel_size, stride=2, padding=kernel_size // 2))
            freq = (freq - 1) // 2 + 1
            self.norms.append(nn.LayerNorm([freq, out_ch]))
            in_ch = out_ch
        self.activation = activation()
        self.dropout = nn.Dropout(dropout)
        self.output_size = freq * in_ch

    @property
    def subsampling(self) -> int:
        """Input frames per output frame: ``2 ** len(channels)``."""
        return 2 ** len(self.convs)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, F) features and (B,) valid frames -> (B, T', C*F') and (B,) valid frames."""
        if feats.dim() != 3 or feats.shape[-1] != self.n_mels:
            raise ValueError(f"expected features of shape (B, T, {self.n_mels}), got {tuple(feats.shape)}")
        x = _mask_frames(feats, lengths).unsqueeze(1)  # (B, 1, T, F)
        for conv, norm in zip(self.convs, self.norms):
            x = conv(x)  # (B, C, T', F')
            lengths = torch.div(lengths - 1, 2, rounding_mode="floor") + 1
            x = self.dropout(self.activation(norm(x.permute(0, 2, 3, 1))))  # (B, T', F', C)
            x = _mask_frames(x, lengths).permute(0, 3, 1, 2)  # (B, C, T', F')
        x = x.permute(0, 2, 3, 1)  # (B, T', F', C)
        return x.reshape(x.shape[0], x.shape[1], -1), lengths  # (B, T', F'*C)


class AttentionDecoder(nn.Module):
    """Transformer decoder for joint CTC/attention training: embedding + positions + speechbrain's
    ``TransformerDecoder`` (pre-norm) + output projection.

    Arguments
    ---------
    vocab_size : int
        Output tokens V.
    d_model : int
        Model dimension.
    num_layers : int
        Decoder layers.
    nhead : int
        Attention heads.
    d_ffn : int
        Feed-forward hidden size.
    pos_encoding : nn.Module
        Absolute positional encoding returning (1, U, d_model), e.g. ``lobes.attention.PositionalEncoding``.
    dropout : float
        Dropout rate.
    activation : Callable[[], nn.Module]
        Activation class.
    self_attention : MixerSpec, optional
        Causal token mixer replacing every layer's self-attention (a module deep-copied per layer, or a
        factory), e.g. ``lobes.hypermixing.ChunkCausalHyperMixing`` with ``chunk_size=1``: causal HyperMixing,
        whose incremental decoding carries a state of constant size (:mod:`lobes.incremental`). Default:
        speechbrain's multi-head attention under the causal mask.

    Example
    -------
    >>> from lobes.attention import PositionalEncoding
    >>> dec = AttentionDecoder(10, 16, 1, 2, 32, PositionalEncoding(16))
    >>> h, _ = dec(torch.randint(0, 10, (2, 4)), torch.rand(2, 7, 16), torch.tensor([7, 3]))
    >>> h.shape
    torch.Size([2, 4, 16])
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        num_layers: int,
        nhead: int,
        d_ffn: int,
        pos_encoding: nn.Module,
        dropout: float = 0.1,
        activation: Callable[[], nn.Module] = nn.GELU,
        self_attention: Optional[Any] = None,
    ):
        super().__init__()
        from speechbrain.lobes.models.transformer.Transformer import TransformerDecoder

        self.embedding = nn.Embedding(vocab_size, d_model)
        self.scale = d_model**0.5
        self.pos_encoding = pos_encoding
        self.decoder = TransformerDecoder(
            num_layers, nhead, d_ffn, d_model, dropout=dropout, activation=activation, normalize_before=True
        )
        if self_attention is not None:
            from lobes.hypermixing import HyperMixing
            from lobes.mixers import make_mixers

            for layer, mixer in zip(self.decoder.layers, make_mixers(self_attention, num_layers)):
                if isinstance(mixer, HyperMixing) and getattr(mixer, "chunk_size", None) != 1:
                    raise ValueError(
                        "the decoder's self-attention must be causal: use lobes.hypermixing.ChunkCausalHyperMixing "
                        f"with chunk_size=1, got {type(mixer).__name__} "
                        f"(chunk_size={getattr(mixer, 'chunk_size', None)})"
                    )
                layer.self_attn = mixer  # HyperMixing ignores the causal mask: its chunk_size=1 is causal itself
        # speechbrain's Linear (weights under ``.w``): its S2S searchers read ``seq_lin.w.out_features``
        self.seq_lin = Linear(input_size=d_model, n_neurons=vocab_size)

    def forward(
        self, tokens: torch.Tensor, memory: torch.Tensor, memory_lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, U) input tokens, (B, T, D) encoder output, (B,) valid encoder frames ->
        (B, U, D) hidden states and the last layer's cross-attention weights."""
        tokens = tokens.long()  # speechbrain's searchers keep their token memory as floats
        tgt = self.embedding(tokens) * self.scale  # (B, U, D)
        tgt = tgt + self.pos_encoding(tgt)
        causal = torch.triu(
            torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool, device=tokens.device), diagonal=1
        )  # (U, U), True = hidden
        causal = torch.zeros(causal.shape, device=tokens.device).masked_fill(causal, float("-inf"))
        mem_pad = lengths_to_padding_mask(memory_lengths.to(memory.device), memory.shape[1])
        hidden, _, cross = self.decoder(tgt, memory, tgt_mask=causal, memory_key_padding_mask=mem_pad)
        return hidden, cross[-1]


class ASRModel(nn.Module):
    """fbank -> per-utterance mean/variance normalisation -> :class:`ConvFrontEnd` -> linear -> (absolute
    positions) -> encoder -> CTC head, with an optional :class:`AttentionDecoder`.

    Arguments
    ---------
    encoder : Encoder
        Called as ``encoder(x, src_key_padding_mask=mask)`` and returning ``(output, ...)``
        (:class:`lobes.mixers.Encoder`), e.g. :class:`lobes.conformer.ConformerEncoder` or
        :class:`lobes.transformer.TransformerEncoder`.
    vocab_size : int
        Output tokens V (index ``blank_index`` is the CTC blank).
    d_model : int
        Encoder dimension.
    n_mels : int
        Mel bins.
    frontend_channels : Sequence[int]
        Channels of the front-end blocks (each halves the frame rate).
    dropout : float
        Dropout after the input projection (and in the front-end unless ``frontend_dropout`` is given).
    pos_encoding : nn.Module, optional
        Absolute positional encoding added before the encoder (for mixers without their own positions).
    decoder : AttentionDecoder, optional
        Attention decoder for joint CTC/attention training.
    sample_rate : int
        Rate of the waveforms the fbank is set for (recorded as :attr:`sample_rate`; :meth:`features` and
        :meth:`forward` refuse waveforms said to be at another rate).
    n_fft : int
        FFT size of the fbank (25 ms at 16 kHz by default); the hop is 10 ms.
    frontend_dropout : float, optional
        Dropout inside the front-end (default: ``dropout``). Its activations are the largest tensors of the
        model, so dropout there costs a sizeable share of a CPU training step.
    fbank_top_db : float, optional
        The fbank clips every value to at least its utterance's maximum minus this many dB (speechbrain's
        default, 80). None: no clipping, so every fbank frame depends on its own samples only, as streaming
        needs (:mod:`lobes.streaming`).
    feature_norm : nn.Module, optional
        Frame-wise feature normalisation called as ``feature_norm(feats, lengths) -> (feats, lengths)``
        (e.g. :class:`lobes.streaming.GlobalNormalization`, whose statistics do not depend on the utterance);
        default: per-utterance mean and variance (which needs the whole utterance).

    The fbank and its normalisation always run in float32, also inside ``torch.autocast``.

    Example
    -------
    >>> from lobes.conformer import hyperconformer_encoder
    >>> model = ASRModel(hyperconformer_encoder(1, 16, 32, 2, kernel_size=3), vocab_size=10, d_model=16)
    >>> feats, lens = model.features(torch.rand(2, 8000), torch.tensor([1.0, 0.5]))
    >>> enc, enc_lens = model.encode(feats, lens)
    >>> model.ctc_log_probs(enc).shape, enc_lens.tolist(), model.frame_samples
    (torch.Size([2, 13, 10]), [13, 7], 640)
    >>> model(torch.rand(1, 8000), torch.ones(1), sample_rate=44100)
    Traceback (most recent call last):
    ...
    ValueError: expected 16000 Hz audio, got 44100 Hz
    """

    norm_eps: float = 1e-5
    """Variance floor of the feature normalisation."""

    def __init__(
        self,
        encoder: Encoder,
        vocab_size: int,
        d_model: int,
        n_mels: int = 80,
        frontend_channels: Sequence[int] = (64, 32),
        dropout: float = 0.1,
        pos_encoding: Optional[nn.Module] = None,
        decoder: Optional[AttentionDecoder] = None,
        sample_rate: int = 16000,
        n_fft: int = 400,
        frontend_dropout: Optional[float] = None,
        fbank_top_db: Optional[float] = 80.0,
        feature_norm: Optional[nn.Module] = None,
    ):
        super().__init__()
        self.sample_rate = sample_rate
        self.hop_length = sample_rate // 100  # 10 ms
        self.compute_fbank = Fbank(sample_rate=sample_rate, n_fft=n_fft, n_mels=n_mels)
        self.fbank_top_db = fbank_top_db
        if fbank_top_db != 80.0:  # speechbrain's Filterbank clips at (utterance maximum - top_db); inf: never
            self.compute_fbank.compute_fbanks.top_db = float("inf") if fbank_top_db is None else float(fbank_top_db)
        self.feature_norm = feature_norm  # None registers nothing: the state dict keeps its keys
        self.frontend = ConvFrontEnd(
            n_mels, frontend_channels, dropout=dropout if frontend_dropout is None else frontend_dropout
        )
        self.proj = nn.Sequential(nn.Linear(self.frontend.output_size, d_model), nn.Dropout(dropout))
        self.pos_encoding = pos_encoding
        self.encoder = encoder
        self.ctc_lin = nn.Linear(d_model, vocab_size)
        self.decoder = decoder

    @property
    def seq_lin(self) -> nn.Module:
        """Output projection of the attention decoder (for speechbrain's S2S searchers)."""
        if self.decoder is None:
            raise AttributeError("this ASRModel has no attention decoder")
        return self.decoder.seq_lin

    @property
    def frame_samples(self) -> int:
        """Waveform samples per encoder frame: the fbank hop times the front-end's subsampling (40 ms)."""
        return self.hop_length * self.frontend.subsampling

    def check_sample_rate(self, sample_rate: Optional[int]) -> None:
        """Raise a ``ValueError`` when ``sample_rate`` (if given) is not the rate the model is set for."""
        if sample_rate is not None and int(sample_rate) != self.sample_rate:
            raise ValueError(f"expected {self.sample_rate} Hz audio, got {int(sample_rate)} Hz")

    def fbank(self, wavs: torch.Tensor) -> torch.Tensor:
        """(B, S) waveforms -> (B, S // hop + 1, n_mels) fbank, float32 (also under autocast), not normalised."""
        with torch.autocast(wavs.device.type, enabled=False):
            return self.compute_fbank(wavs.float())

    def features(
        self,
        wavs: torch.Tensor,
        wav_lens: torch.Tensor,
        stats: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        sample_rate: Optional[int] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S) waveforms and (B,) relative lengths -> (B, T, n_mels) normalised fbank and (B,) frames.

        Arguments
        ---------
        wavs : torch.Tensor
            (B, S) waveforms.
        wav_lens : torch.Tensor
            (B,) relative lengths.
        stats : (torch.Tensor, torch.Tensor), optional
            (n_mels,) mean and variance to normalise every row with (see :meth:`normalise`).
        sample_rate : int, optional
            Rate of ``wavs``; a ``ValueError`` when it is not :attr:`sample_rate`.

        Returns
        -------
        tuple
            (B, T, n_mels) features (float32, padded frames zero) and (B,) valid frames.
        """
        self.check_sample_rate(sample_rate)
        if wavs.dim() != 2:
            raise ValueError(f"expected waveforms of shape (B, samples), got {tuple(wavs.shape)}")
        if wav_lens.shape != wavs.shape[:1]:
            raise ValueError(f"expected wav_lens of shape ({wavs.shape[0]},), got {tuple(wav_lens.shape)}")
        samples = relative_to_absolute(wav_lens.float(), wavs.shape[1])
        lengths = torch.div(samples, self.hop_length, rounding_mode="floor") + 1  # centred frames
        return self.normalise(self.fbank(wavs), lengths, stats)

    def normalise(
        self, feats: torch.Tensor, lengths: torch.Tensor, stats: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean/variance normalisation of (B, T, F) fbank with (B,) valid frames; padded frames become zero.

        Each row is normalised with the mean and variance of its own valid frames, or with ``stats``, a
        (F,) mean and variance given for every row (e.g. those of a whole recording cut into windows).
        Returns the features and the frame counts clamped to T.

        Example
        -------
        >>> from lobes.conformer import hyperconformer_encoder
        >>> model = ASRModel(hyperconformer_encoder(1, 16, 32, 2, kernel_size=3), vocab_size=10, d_model=16)
        >>> feats, lens = model.normalise(torch.rand(2, 50, 80), torch.tensor([50, 20]))
        >>> bool(feats[0].mean(0).abs().max() < 1e-4), feats[1, 20:].abs().sum().item(), lens.tolist()
        (True, 0.0, [50, 20])
        """
        if self.feature_norm is not None:  # frame-wise statistics of their own (streaming models)
            with torch.autocast(feats.device.type, enabled=False):
                return self.feature_norm(feats.float(), lengths.clamp(max=feats.shape[1]))
        with torch.autocast(feats.device.type, enabled=False):
            feats = feats.float()
            lengths = lengths.clamp(max=feats.shape[1])
            keep = lengths_to_mask(lengths, feats.shape[1]).unsqueeze(-1).to(feats.dtype)  # (B, T, 1)
            if stats is None:
                n = lengths.view(-1, 1, 1).to(feats.dtype)
                mean = (feats * keep).sum(1, keepdim=True) / n  # (B, 1, F)
                var = (((feats - mean) * keep) ** 2).sum(1, keepdim=True) / n
            else:
                mean, var = (s.to(feats) for s in stats)  # (F,)
            return (feats - mean) / torch.sqrt(var + self.norm_eps) * keep, lengths

    def encode(
        self, feats: torch.Tensor, lengths: torch.Tensor, chunk: Optional[Any] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, n_mels) features and (B,) frames -> (B, T/4, D) encoder output and (B,) valid frames.

        ``chunk`` (a :class:`lobes.chunking.ChunkConfig` or a chunk size in encoder frames) runs the encoder in
        chunked mode (it must accept ``chunk=``, as :class:`lobes.conformer.ConformerEncoder` does); None: full
        context."""
        x, lengths = self.frontend(feats, lengths)
        x = self.proj(x)  # (B, T', D)
        if self.pos_encoding is not None:
            x = x + self.pos_encoding(x)
        pad_mask = lengths_to_padding_mask(lengths, x.shape[1])
        if chunk is None:
            out = self.encoder(x, src_key_padding_mask=pad_mask)
        else:
            out = self.encoder(x, src_key_padding_mask=pad_mask, chunk=chunk)
        out = out[0] if isinstance(out, tuple) else out
        return out, lengths

    def stream(self, chunk: Any, tokenizer: Any = None, blank_index: int = 0, batch: int = 1) -> Any:
        """A :class:`lobes.streaming.StreamingASR` over this model: feed audio pieces, get encoder frames and
        CTC greedy partial hypotheses chunk by chunk (``chunk``: a :class:`lobes.chunking.ChunkConfig` or a chunk
        size in encoder frames). The model must be built for streaming (``fbank_top_db=None``, a
        ``feature_norm``, a chunk-capable encoder with causal convolutions)."""
        from lobes.streaming import StreamingASR

        return StreamingASR(self, chunk, tokenizer=tokenizer, blank_index=blank_index, batch=batch)

    def ctc_log_probs(self, enc: torch.Tensor) -> torch.Tensor:
        """(B, T', D) -> (B, T', V) CTC log-probabilities (float32, also under autocast)."""
        return torch.log_softmax(self.ctc_lin(enc).float(), dim=-1)

    def decode(
        self, tokens: torch.Tensor, enc: torch.Tensor, enc_lens: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention-decoder states (B, U, D) for input tokens (B, U) given the encoder output (B, T', D)
        and (B,) absolute valid frames (the signature speechbrain's ``S2STransformerBeamSearcher`` uses)."""
        if self.decoder is None:
            raise RuntimeError("this ASRModel has no attention decoder; build it with decoder=AttentionDecoder(...)")
        if enc_lens is None:
            enc_lens = torch.full((enc.shape[0],), enc.shape[1], device=enc.device)
        return self.decoder(tokens, enc, enc_lens.round().long())

    def forward(
        self,
        wavs: torch.Tensor,
        wav_lens: torch.Tensor,
        tokens_bos: Optional[torch.Tensor] = None,
        feature_augment: Optional[Callable] = None,
        sample_rate: Optional[int] = None,
        chunk: Optional[Any] = None,
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Run the whole model.

        Arguments
        ---------
        wavs : torch.Tensor
            (B, S) waveforms.
        wav_lens : torch.Tensor
            (B,) relative lengths.
        tokens_bos : torch.Tensor, optional
            (B, U) decoder inputs (BOS + tokens); requires a decoder.
        feature_augment : Callable, optional
            Applied to the normalised features as ``feature_augment(feats, relative_lengths)`` (e.g. a
            speechbrain ``Augmenter`` of ``SpectrogramDrop``); must keep their shape.
        sample_rate : int, optional
            Rate of ``wavs``; a ``ValueError`` when it is not :attr:`sample_rate`.
        chunk : lobes.chunking.ChunkConfig or int, optional
            Chunked encoder (see :meth:`encode`); None: full context.

        Returns
        -------
        tuple
            CTC log-probs (B, T', V), (B,) valid frames, decoder log-probs (B, U, V) or ``None``.
        """
        feats, lengths = self.features(wavs, wav_lens, sample_rate=sample_rate)
        if feature_augment is not None:
            augmented = feature_augment(feats, lengths.float() / feats.shape[1])
            augmented = augmented[0] if isinstance(augmented, tuple) else augmented
            if augmented.shape != feats.shape:
                raise ValueError(
                    f"feature_augment must keep the shape {tuple(feats.shape)}, got {tuple(augmented.shape)}"
                )
            feats = augmented
        enc, lengths = self.encode(feats, lengths, chunk)
        seq = None
        if tokens_bos is not None:
            hidden, _ = self.decode(tokens_bos, enc, lengths)
            seq = torch.log_softmax(self.seq_lin(hidden).float(), dim=-1)
        return self.ctc_log_probs(enc), lengths, seq
