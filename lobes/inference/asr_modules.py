"""What an ASR pretrained folder's ``hyperparams.yaml`` builds, and speechbrain's interface with the beam search.

:class:`CTCEncoder` is the folder's ``encoder`` (waveforms -> CTC log-probabilities of a trained
:class:`lobes.asr.ASRModel`), :func:`greedy_decode` its ``decoding_function`` and :class:`TrainingTranscripts`
the loadable from which the beam decoder's lexicon and word LM are rebuilt; :class:`LexiconBeamASR` is the
``EncoderASR`` that ``custom.py`` loads through speechbrain's ``foreign_class``. Folders name these classes
``lobes.inference.asr.X``: :mod:`lobes.inference.asr` exports them.

Example
-------
>>> from lobes.asr import ASRModel
>>> from lobes.conformer import hyperconformer_encoder
>>> model = ASRModel(hyperconformer_encoder(1, 16, 32, 2, kernel_size=3), vocab_size=6, d_model=16)
>>> encoder = CTCEncoder(model.eval())
>>> encoder(torch.rand(2, 8000), torch.tensor([1.0, 0.5])).shape, encoder.frame_shift
(torch.Size([2, 13, 6]), 0.04)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from speechbrain.inference.ASR import EncoderASR
from speechbrain.utils.checkpoints import mark_as_loader, mark_as_transfer, register_checkpoint_hooks
from torch import nn

from lobes.inference.pretrained import PretrainedError
from lobes.masks import lengths_to_padding_mask

__all__ = [
    "KIND",
    "ArpaLanguageModel",
    "CTCEncoder",
    "LexiconBeamASR",
    "TrainingTranscripts",
    "check_tokenizer",
    "greedy_decode",
]

KIND = "asr"
"""``kind`` of the folders (``package.json``)."""
PAD_LOG_PROB = -1e4  # log-probability of non-blank tokens on padded frames (blank gets 0)


def greedy_decode(
    log_probs: torch.Tensor, wav_lens: torch.Tensor | None = None, blank_index: int = 0
) -> list[list[int]]:
    """Best-path CTC tokens of every row (speechbrain's ``decoding_function`` for :class:`CTCEncoder` outputs).

    Every frame is read: :class:`CTCEncoder` sets frames beyond a row's length to the blank, which is exact
    where relative ``wav_lens`` would round to a frame too few or too many.

    Arguments
    ---------
    log_probs : torch.Tensor
        (B, T, V) CTC log-probabilities from :class:`CTCEncoder`.
    wav_lens : torch.Tensor, optional
        (B,) relative lengths (unused, see above).
    blank_index : int
        The CTC blank.

    Returns
    -------
    list[list[int]]
        Token ids per row.

    Example
    -------
    >>> lp = torch.log(torch.tensor([[[.1, .9], [.1, .9], [.9, .1], [.1, .9]]]))
    >>> greedy_decode(lp)
    [[1, 1]]
    """
    from lobes.asr import ctc_greedy_decode

    full = torch.full((log_probs.shape[0],), log_probs.shape[1], device=log_probs.device)
    return ctc_greedy_decode(log_probs, full, blank_index)


@register_checkpoint_hooks
class TrainingTranscripts:
    """The training transcripts (one per line) from which the beam decoder's lexicon and word LM are built.

    A loadable of the pretrained folder's ``pretrainer`` (file ``transcripts.ckpt``, UTF-8 text).

    Example
    -------
    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "transcripts.ckpt")
    >>> _ = open(p, "w").write("THE CAT\\nA DOG\\n")
    >>> t = TrainingTranscripts(); t.load(p); t.sentences
    ['THE CAT', 'A DOG']
    """

    def __init__(self, sentences: Sequence[str] = ()):
        self.sentences = list(sentences)

    @mark_as_transfer
    def load(self, path: str | os.PathLike) -> None:
        """Read the transcripts from ``path``."""
        self.sentences = Path(path).read_text(encoding="utf-8").splitlines()

    @mark_as_loader
    def _recover(self, path: str | os.PathLike, end_of_epoch: bool = False) -> None:
        self.load(path)


@register_checkpoint_hooks
class ArpaLanguageModel:
    """A word language model read from an ARPA file: the beam decoder's ``lm`` when the run used ``lm_path``.

    A loadable of the pretrained folder's ``pretrainer`` (file ``word_lm.ckpt``, the ARPA text, plain or
    gzip-compressed); :attr:`lm` is the :class:`lobes.lm.NgramLM` once loaded.

    Example
    -------
    >>> import tempfile, os
    >>> from lobes.lm import WordNgramLM
    >>> p = WordNgramLM(["THE CAT", "A DOG"], order=2).write_arpa(os.path.join(tempfile.mkdtemp(), "word_lm.ckpt"))
    >>> m = ArpaLanguageModel(); m.load(p); m.lm.words
    ['A', 'CAT', 'DOG', 'THE']
    """

    def __init__(self):
        self.lm = None

    @mark_as_transfer
    def load(self, path: str | os.PathLike) -> None:
        """Read the ARPA file ``path`` (:func:`lobes.lm.read_arpa`)."""
        from lobes.lm import read_arpa

        self.lm = read_arpa(path)

    @mark_as_loader
    def _recover(self, path: str | os.PathLike, end_of_epoch: bool = False) -> None:
        self.load(path)


class CTCEncoder(nn.Module):
    """An :class:`lobes.asr.ASRModel` as speechbrain's ``EncoderASR`` encoder: waveforms -> CTC log-probs.

    Arguments
    ---------
    model : lobes.asr.ASRModel
        The trained model.
    blank_index : int
        The CTC blank; frames beyond a row's valid length get log-probability 0 for it.

    Example
    -------
    >>> from lobes.asr import ASRModel
    >>> from lobes.conformer import hyperconformer_encoder
    >>> enc = CTCEncoder(ASRModel(hyperconformer_encoder(1, 16, 32, 2, kernel_size=3), 5, 16).eval())
    >>> lp, lens = enc.log_probs(torch.rand(2, 6400), torch.tensor([1.0, 0.5]))
    >>> lp.shape, lens.tolist(), lp[1, -1].exp().round().tolist()
    (torch.Size([2, 11, 5]), [11, 6], [1.0, 0.0, 0.0, 0.0, 0.0])
    """

    def __init__(self, model: nn.Module, blank_index: int = 0):
        super().__init__()
        missing = [
            a for a in ("features", "encode", "ctc_log_probs", "sample_rate", "frame_samples") if not hasattr(model, a)
        ]
        if missing:
            raise TypeError(f"CTCEncoder needs a lobes.asr.ASRModel; {type(model).__name__} lacks {missing}")
        self.model = model
        self.blank_index = blank_index

    @property
    def sample_rate(self) -> int:
        """Rate of the waveforms the model expects."""
        return int(self.model.sample_rate)

    @property
    def frame_samples(self) -> int:
        """Samples per output frame (:attr:`lobes.asr.ASRModel.frame_samples`)."""
        return int(self.model.frame_samples)

    @property
    def frame_shift(self) -> float:
        """Seconds per output frame."""
        return self.frame_samples / self.sample_rate

    @property
    def vocab_size(self) -> int:
        """Outputs of the CTC head."""
        return int(self.model.ctc_lin.out_features)

    def log_probs(
        self,
        wavs: torch.Tensor,
        wav_lens: torch.Tensor,
        stats: tuple[torch.Tensor, torch.Tensor] | None = None,
        sample_rate: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CTC log-probabilities of a batch.

        Arguments
        ---------
        wavs : torch.Tensor
            (B, S) waveforms.
        wav_lens : torch.Tensor
            (B,) relative lengths.
        stats : (torch.Tensor, torch.Tensor), optional
            (F,) mean and variance of the fbank to normalise with, instead of each row's own (the model's
            default): the windows of a long recording use the statistics of the whole recording.
        sample_rate : int, optional
            Rate of ``wavs``, checked against the model's (a ``ValueError`` on mismatch).

        Returns
        -------
        tuple
            (B, T, V) log-probs (float32; padded frames are blank) and (B,) valid frames.
        """
        feats, lengths = self.model.features(wavs, wav_lens, stats=stats, sample_rate=sample_rate)
        enc, lengths = self.model.encode(feats, lengths)
        log_probs = self.model.ctc_log_probs(enc)  # (B, T, V)
        pad = lengths_to_padding_mask(lengths, log_probs.shape[1])  # (B, T), True = padding
        if pad.any():
            blank = torch.full_like(log_probs[0, 0], PAD_LOG_PROB)
            blank[self.blank_index] = 0.0
            log_probs = torch.where(pad[..., None], blank, log_probs)
        return log_probs, lengths

    def forward(self, wavs: torch.Tensor, wav_lens: torch.Tensor) -> torch.Tensor:
        """(B, S) waveforms, (B,) relative lengths -> (B, T, V) CTC log-probs (padded frames are blank)."""
        return self.log_probs(wavs, wav_lens)[0]


def check_tokenizer(tokenizer, encoder: CTCEncoder, folder: str | os.PathLike) -> None:
    """Refuse a tokenizer with more pieces than the CTC head has outputs, or a blank outside the outputs."""
    pieces = int(tokenizer.get_piece_size())
    if pieces > encoder.vocab_size:
        raise PretrainedError(
            f"{folder}: the tokenizer has {pieces} pieces but the model's CTC head has "
            f"{encoder.vocab_size} outputs; tokenizer.ckpt belongs to another model"
        )
    if not 0 <= encoder.blank_index < encoder.vocab_size:
        raise PretrainedError(
            f"{folder}: blank_index {encoder.blank_index} is outside the model's {encoder.vocab_size} outputs"
        )


class LexiconBeamASR(EncoderASR):
    """``EncoderASR`` that decodes like the recipe's test stage: lexicon + word-LM CTC beam search.

    The folder's ``custom.py`` subclasses it as ``CustomInterface`` so that speechbrain's ``foreign_class``
    loads it. ``transcribe_file`` reads any rate (speechbrain's audio normaliser resamples to the folder's
    ``sample_rate``); ``transcribe_batch`` takes ``sample_rate=`` to convert waveforms at another rate.
    """

    HPARAMS_NEEDED = ["tokenizer", "decoding_function", "beam_decoder", "transcripts"]
    MODULES_NEEDED = ["encoder"]

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.beam = self.hparams.beam_decoder(self.tokenizer, self.hparams.transcripts.sentences)

    def transcribe_batch(
        self, wavs: torch.Tensor, wav_lens: torch.Tensor, sample_rate: int | None = None
    ) -> tuple[list[str], list[list[str]]]:
        """Words of a batch.

        Arguments
        ---------
        wavs : torch.Tensor
            (B, S) waveforms at the folder's ``sample_rate`` (or at ``sample_rate``).
        wav_lens : torch.Tensor
            (B,) relative lengths.
        sample_rate : int, optional
            Rate of ``wavs`` when it is not the model's.

        Returns
        -------
        tuple
            The text of each row and its words.
        """
        expected = int(self.hparams.sample_rate)
        if sample_rate is not None and sample_rate != expected:
            import torchaudio.functional as AF

            wavs = AF.resample(wavs.float(), int(sample_rate), expected)
        with torch.no_grad():
            log_probs, lengths = self.mods.encoder.log_probs(wavs.float().to(self.device), wav_lens.to(self.device))
            words = self.beam(log_probs, lengths)
        return [" ".join(w) for w in words], words
