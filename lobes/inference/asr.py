"""Speech recognition with a pretrained folder: :class:`Transcriber` gives words and word timestamps.

A folder written by :func:`package_asr_run` (:mod:`lobes.inference.asr_package`) loads three ways:

* ``speechbrain.inference.ASR.EncoderASR.from_hparams(source=FOLDER, savedir=...)``: greedy CTC, the same
  words as the recipe's greedy decoding;
* ``speechbrain.inference.interfaces.foreign_class(source=FOLDER, pymodule_file="custom.py",
  classname="CustomInterface", savedir=...)``: the recipe's test decoding (CTC prefix beam search over the
  training words with their word n-gram LM, rebuilt from the packaged training transcripts);
* :meth:`Transcriber.from_pretrained`: greedy or beam words with word timestamps, any input form and rate,
  batching by length, and recordings of any length in overlapping windows with bounded memory.

What the folder's ``hyperparams.yaml`` builds (:class:`CTCEncoder`, :func:`greedy_decode`,
:class:`TrainingTranscripts`, :class:`LexiconBeamASR`) lives in :mod:`lobes.inference.asr_modules`; folders
name it ``lobes.inference.asr.X``, so it is exported here too.

Word timestamps come from the CTC alignment: a model frame is ``ASRModel.frame_samples`` samples (10 ms
fbank hop, 4x subsampling: 40 ms); a word starts at the first frame of its first letter-bearing token and
ends after the last frame of its last one (greedy: the best path; beam: a Viterbi alignment of the beam's
tokens).

Long recordings (longer than ``window_seconds``) are cut into windows of ``window_seconds`` whose centres
(``window_seconds - 2 * context_seconds`` long, on a 40 ms grid) tile the recording; each window is run with
``context_seconds`` of audio on either side and only the frames of its centre are kept, so every frame of the
recording comes from exactly one window and nothing is duplicated or dropped at the seams. Every window is
normalised with the fbank statistics of the whole recording (``ASRModel.features(..., stats=...)``). Greedy
decoding runs over the joined best path; beam search decodes pieces cut in the longest blank stretch of each
``window_seconds``. Memory is bounded by the batch of windows, whatever the length.

Example
-------
>>> Transcript("HI", [Word("HI", 0.12, 0.4)]).to_dict()
{'text': 'HI', 'words': [{'word': 'HI', 'start': 0.12, 'end': 0.4}]}
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from lobes.inference.asr_modules import (
    KIND,
    ArpaLanguageModel,
    CTCEncoder,
    LexiconBeamASR,
    TrainingTranscripts,
    check_tokenizer,
    greedy_decode,
)
from lobes.inference.asr_package import package_asr_run
from lobes.inference.precision import autocast, resolve_precision
from lobes.inference.pretrained import HPARAMS_FILE, PretrainedError, load_pretrained
from lobes.inference.sources import AudioSource, audio_sources, batches_by_length, pad_batch
from lobes.inference.words import Transcript, Word, windowed_fbank_stats
from lobes.inference.words import collapse as _collapse
from lobes.inference.words import ctc_align as _ctc_align
from lobes.inference.words import text as _text
from lobes.inference.words import words as _words
from lobes.inputs import resolve_device

__all__ = [
    "DECODERS",
    "ArpaLanguageModel",
    "CTCEncoder",
    "LexiconBeamASR",
    "Transcriber",
    "Transcript",
    "TrainingTranscripts",
    "Word",
    "greedy_decode",
    "package_asr_run",
]

logger = logging.getLogger(__name__)

DECODERS = ("greedy", "beam")
"""``greedy``: best CTC path; ``beam``: the recipe's lexicon + word-LM beam search."""


def _best_path(log_probs: np.ndarray) -> np.ndarray:
    """Best token of each frame of (T, V) log-probs (torch's ``max``, as speechbrain's greedy decoding)."""
    return torch.from_numpy(np.ascontiguousarray(log_probs)).max(dim=-1)[1].numpy()


# --------------------------------------------------------------------------------------------------------------
# Transcriber
# --------------------------------------------------------------------------------------------------------------
class Transcriber:
    """Transcribe speech with a pretrained folder: words and word timestamps, any input, any length.

    Arguments
    ---------
    encoder : CTCEncoder
        The model.
    tokenizer : sentencepiece.SentencePieceProcessor
        Its tokenizer.
    beam_decoder : lobes.decoding.CTCLexiconDecoder, optional
        For ``decoder="beam"``.
    device : str or torch.device
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    precision : str
        ``fp32`` or ``bf16`` (autocast; the fbank stays float32).
    window_seconds : float
        Longest recording processed in one piece; longer ones go through overlapping windows this long.
    context_seconds : float
        Audio on either side of a window's centre that is seen but not kept.

    Example
    -------
    >>> Transcriber.from_pretrained("no/such/folder")
    Traceback (most recent call last):
    ...
    lobes.inference.pretrained.PretrainedError: no/such/folder: no such folder; expected a pretrained folder ...
    """

    def __init__(
        self,
        encoder: CTCEncoder,
        tokenizer,
        beam_decoder=None,
        device: str | torch.device = "auto",
        precision: str = "fp32",
        window_seconds: float = 30.0,
        context_seconds: float = 5.0,
    ):
        resolve_precision(precision)
        self.device = resolve_device(device)
        self.precision = precision
        self.encoder = encoder.to(self.device).eval()
        self.tokenizer = tokenizer
        self.beam_decoder = beam_decoder
        step = self.encoder.frame_samples
        self.window = max(int(round(window_seconds * self.sample_rate / step)), 3) * step
        self.context = int(round(context_seconds * self.sample_rate / step)) * step
        if self.window - 2 * self.context < step:
            raise ValueError(
                f"window_seconds ({window_seconds}) must exceed 2 * context_seconds ({context_seconds}) "
                f"by at least one frame ({self.encoder.frame_shift} s)"
            )

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike, device: str | torch.device = "auto", precision: str = "fp32", **kwargs: Any
    ) -> "Transcriber":
        """Load a folder written by :func:`package_asr_run` (``kwargs`` go to the constructor).

        Raises
        ------
        lobes.inference.pretrained.PretrainedError
            Not a speech-recognition folder, a missing or altered file, weights that do not fit, or a
            tokenizer with more pieces than the model has outputs.
        """
        hparams, _ = load_pretrained(folder, kind=KIND)
        for key in ("encoder", "tokenizer"):
            if key not in hparams:
                raise PretrainedError(f"{Path(folder) / HPARAMS_FILE}: no '{key}'")
        encoder, tokenizer = hparams["encoder"], hparams["tokenizer"]
        check_tokenizer(tokenizer, encoder, folder)
        beam = None
        if hparams.get("beam_decoder") is not None and hparams.get("transcripts") is not None:
            beam = hparams["beam_decoder"](tokenizer, hparams["transcripts"].sentences)
        return cls(encoder, tokenizer, beam, device=device, precision=precision, **kwargs)

    @property
    def sample_rate(self) -> int:
        """The model's rate; other rates are converted."""
        return self.encoder.sample_rate

    @property
    def frame_shift(self) -> float:
        """Seconds between two CTC frames (the resolution of the timestamps)."""
        return self.encoder.frame_shift

    def transcribe(
        self, inputs: Any, sample_rate: int | None = None, decoder: str = "greedy", batch_seconds: float = 60.0
    ) -> Transcript | list[Transcript]:
        """Transcribe one recording or a list.

        Arguments
        ---------
        inputs : path, tensor, array, or list of them
            See :mod:`lobes.inference.sources` for the rule (files: any format, rate and channels; waveforms:
            ``(samples,)`` or with a short channel axis, and ``sample_rate``).
        sample_rate : int, optional
            Rate of the tensors / arrays (required for them).
        decoder : str
            ``greedy`` or ``beam``.
        batch_seconds : float
            Padded audio per batch.

        Returns
        -------
        Transcript or list of Transcript
            One per input (a list when ``inputs`` is a list or tuple).
        """
        sources = audio_sources(inputs, sample_rate, self.sample_rate)
        results = self.transcribe_sources(sources, decoder, batch_seconds)
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results if isinstance(inputs, (list, tuple)) else results[0]

    def transcribe_sources(
        self, sources: Sequence[AudioSource], decoder: str = "greedy", batch_seconds: float = 60.0
    ) -> list[Transcript | Exception]:
        """:meth:`transcribe` for prepared :class:`AudioSource` objects; a source that fails to load gives its
        exception in its place instead of stopping the others."""
        if decoder not in DECODERS:
            raise ValueError(f"decoder {decoder!r}: expected one of {', '.join(DECODERS)}")
        if decoder == "beam" and self.beam_decoder is None:
            raise ValueError(
                "decoder 'beam': this pretrained folder has no lexicon / language model (the run was "
                "tested without test_decoder); use decoder 'greedy'"
            )
        if not batch_seconds > 0:
            raise ValueError(f"batch_seconds must be positive, got {batch_seconds}")
        results: list[Transcript | Exception | None] = [None] * len(sources)
        window_s = self.window / self.sample_rate
        short = [i for i, s in enumerate(sources) if s.num_samples <= self.window]
        for batch in batches_by_length([sources[i] for i in short], batch_seconds):
            ids = [short[j] for j in batch]
            waves = {}
            for i in ids:
                try:
                    waves[i] = sources[i].load()
                except Exception as exc:  # reported in the result list
                    results[i] = exc
            if waves:
                for i, transcript in zip(waves, self._transcribe_short(list(waves.values()), decoder)):
                    results[i] = transcript
        for i, source in enumerate(sources):
            if source.num_samples > self.window:
                try:
                    results[i] = self._transcribe_long(source, decoder, max(1, int(batch_seconds // window_s)))
                except Exception as exc:
                    results[i] = exc
        return results  # type: ignore[return-value]

    # --- model calls ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _fbank_stats(self, source: AudioSource) -> tuple[torch.Tensor, torch.Tensor]:
        """(F,) mean and variance of the whole recording's fbank, read one window at a time.

        Each block is read with enough audio on either side that its frames equal those of the whole
        recording's fbank, so the statistics are the ones ``ASRModel.features`` would compute on it whole.
        """
        model = self.encoder.model
        mean, var = windowed_fbank_stats(
            source.num_samples,
            int(model.hop_length),
            self.window,
            self.encoder.frame_samples,  # a multiple of the hop, longer than half an FFT window
            lambda a, b: model.fbank(source.segment(a, b)[None].to(self.device))[0].double().cpu().numpy(),
        )
        return torch.from_numpy(mean), torch.from_numpy(var)

    @torch.no_grad()
    def _log_probs(
        self,
        waves: Sequence[torch.Tensor],
        stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[np.ndarray, list[int]]:
        """(B, T, V) log-probs (numpy float32) and valid frames of a list of 1-D waveforms at the model's rate."""
        wavs, wav_lens = pad_batch(waves)
        with autocast(self.device, self.precision):
            log_probs, lengths = self.encoder.log_probs(
                wavs.to(self.device), wav_lens.float().to(self.device), stats, sample_rate=self.sample_rate
            )
        return log_probs.float().cpu().numpy(), lengths.cpu().tolist()

    def _transcribe_short(self, waves: Sequence[torch.Tensor], decoder: str) -> list[Transcript]:
        log_probs, lengths = self._log_probs(waves)
        return [self._decode(log_probs[b, :n], decoder) for b, n in enumerate(lengths)]

    def _decode(self, log_probs: np.ndarray, decoder: str, offset: int = 0) -> Transcript:
        """Words of one stretch of (T, V) log-probs whose first frame is frame ``offset`` of the recording."""
        blank = self.encoder.blank_index
        if decoder == "greedy":  # outputs beyond the tokenizer's pieces spell nothing: left out of the best path
            tokens, spans = _collapse(_best_path(log_probs[:, : self.tokenizer.get_piece_size()]), blank)
            text = _text(self.tokenizer, tokens)
        else:
            words = self.beam_decoder.decode_one(log_probs)
            tokens = [t for w in words for t in self.tokenizer.encode_as_ids(w)]
            spans = _ctc_align(log_probs, tokens, blank)
            text = " ".join(words)
        return Transcript(text, _words(self.tokenizer, tokens, spans, self.frame_shift, offset))

    def _windows(self, source: AudioSource, per_batch: int) -> Iterator[np.ndarray]:
        """Log-probs of the recording's frames, in order, one window centre at a time."""
        step, n = self.encoder.frame_samples, source.num_samples
        stride = self.window - 2 * self.context
        cores = [(c, min(c + stride, n)) for c in range(0, n, stride)]
        stats = self._fbank_stats(source)
        for first in range(0, len(cores), per_batch):
            group = cores[first : first + per_batch]
            spans = [(max(c0 - self.context, 0), min(c1 + self.context, n)) for c0, c1 in group]
            log_probs, lengths = self._log_probs([source.segment(a, b) for a, b in spans], stats)
            _release_freed_memory()
            for (c0, c1), (a, _), lp, length in zip(group, spans, log_probs, lengths):
                lo = (c0 - a) // step
                hi = length if c1 == n else (c1 - a) // step
                yield lp[lo:hi]

    def _transcribe_long(self, source: AudioSource, decoder: str, per_batch: int) -> Transcript:
        pieces = self.tokenizer.get_piece_size()
        if decoder == "greedy":
            path = np.concatenate([_best_path(lp[:, :pieces]) for lp in self._windows(source, per_batch)])
            tokens, spans = _collapse(path, self.encoder.blank_index)
            return Transcript(_text(self.tokenizer, tokens), _words(self.tokenizer, tokens, spans, self.frame_shift))
        pieces: list[Transcript] = []
        pending: list[np.ndarray] = []
        offset = 0
        limit = self.window // self.encoder.frame_samples
        for chunk in self._windows(source, per_batch):
            pending.append(chunk)
            buffered = np.concatenate(pending)
            while len(buffered) > limit:
                cut = self._cut(buffered[:limit])
                pieces.append(self._decode(buffered[:cut], decoder, offset))
                offset += cut
                buffered = buffered[cut:]
            pending = [buffered]
        if pending and len(pending[0]):
            pieces.append(self._decode(pending[0], decoder, offset))
        words = [w for p in pieces for w in p.words]
        return Transcript(" ".join(p.text for p in pieces if p.text), words)

    def _cut(self, log_probs: np.ndarray) -> int:
        """A frame in the middle of the longest run of best-path blanks in the second half of ``log_probs``."""
        is_blank = np.append(log_probs.argmax(-1) == self.encoder.blank_index, False)
        best, best_len, run_start = len(log_probs), 0, None
        for t in range(len(log_probs) // 2, len(is_blank)):
            if is_blank[t] and run_start is None:
                run_start = t
            elif not is_blank[t] and run_start is not None:
                if t - run_start > best_len:
                    best, best_len = (run_start + t) // 2, t - run_start
                run_start = None
        return max(best, 1)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim``, or ``None`` on other C libraries."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _release_freed_memory() -> None:
    """Give the memory freed by the last window batch back to the system.

    glibc keeps freed blocks below its mmap threshold (up to 32 MiB) in the heap, and a long run of window
    batches fragments it: the resident size then creeps up with the length of the recording although no
    data are kept. ``malloc_trim(0)`` returns the free pages (a few milliseconds per batch).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
