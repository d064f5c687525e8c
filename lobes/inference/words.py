"""Words from CTC outputs, in numpy alone: best path, Viterbi alignment, SentencePiece pieces to timed words;
and the whole-recording fbank statistics of a long recording read window by window.

Shared by :class:`lobes.inference.asr.Transcriber` (torch) and the ONNX runtime path
(:mod:`lobes.onnx.tasks`), which must not import torch.

Example
-------
>>> Transcript("HI", [Word("HI", 0.12, 0.4)]).to_dict()
{'text': 'HI', 'words': [{'word': 'HI', 'start': 0.12, 'end': 0.4}]}
>>> collapse(np.array([0, 2, 2, 0, 2, 3]), blank=0)
([2, 2, 3], [(1, 2), (4, 4), (5, 5)])
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

__all__ = ["Transcript", "Word", "best_path", "collapse", "ctc_align", "text", "windowed_fbank_stats", "words"]


# --------------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Word:
    """One recognised word and where it is, in seconds from the start of the recording."""

    word: str
    start: float
    end: float


@dataclasses.dataclass
class Transcript:
    """The words of one recording: ``text`` (words joined by spaces) and ``words`` with timestamps."""

    text: str
    words: list[Word]

    def to_dict(self) -> dict:
        """``{"text": ..., "words": [{"word", "start", "end"}, ...]}`` (JSON-able)."""
        return {"text": self.text, "words": [dataclasses.asdict(w) for w in self.words]}


# --------------------------------------------------------------------------------------------------------------
# Alignment and words
# --------------------------------------------------------------------------------------------------------------
def best_path(log_probs: np.ndarray) -> np.ndarray:
    """Best token of each frame of (T, V) log-probs (the first of equal maxima, as torch's ``max``).

    Example
    -------
    >>> best_path(np.log(np.array([[0.2, 0.8], [0.9, 0.1]]))).tolist()
    [1, 0]
    """
    return np.asarray(log_probs).argmax(axis=-1)


def collapse(path: np.ndarray, blank: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Tokens of a best path and the (first, last) frame of each token's run."""
    tokens, spans = [], []
    prev = -1
    for t, c in enumerate(path.tolist()):
        if c != blank:
            if c == prev:
                spans[-1] = (spans[-1][0], t)
            else:
                tokens.append(c)
                spans.append((t, t))
        prev = c
    return tokens, spans


def ctc_align(log_probs: np.ndarray, tokens: Sequence[int], blank: int) -> list[tuple[int, int]]:
    """(first, last) frame of each token on the Viterbi CTC alignment of ``tokens`` to (T, V) log-probs."""
    if not tokens:
        return []
    labels = np.full(2 * len(tokens) + 1, blank, dtype=np.int64)
    labels[1::2] = tokens
    n_states = len(labels)
    # a state may skip the blank before it when its token differs from the token two states back
    skip = np.zeros(n_states, dtype=bool)
    skip[3::2] = labels[3::2] != labels[1:-2:2]
    emit = log_probs[:, labels]  # (T, S)
    score = np.full(n_states, -np.inf)
    score[0], score[1] = emit[0, 0], emit[0, 1]
    back = np.zeros((len(log_probs), n_states), dtype=np.int8)  # 0: stay, 1: from s-1, 2: from s-2
    for t in range(1, len(log_probs)):
        stay = score
        step = np.concatenate(([-np.inf], score[:-1]))
        jump = np.where(skip, np.concatenate(([-np.inf, -np.inf], score[:-2])), -np.inf)
        choice = np.argmax(np.stack([stay, step, jump]), axis=0)
        score = np.choose(choice, [stay, step, jump]) + emit[t]
        back[t] = choice
    state = n_states - 1 if score[-1] >= score[-2] else n_states - 2
    spans: dict[int, list[int]] = {}
    for t in range(len(log_probs) - 1, -1, -1):
        if state % 2 == 1:
            first_last = spans.setdefault(state // 2, [t, t])
            first_last[0] = t
        state -= int(back[t, state])
    return [tuple(spans.get(i, (0, 0))) for i in range(len(tokens))]


def words(
    tokenizer, tokens: Sequence[int], spans: Sequence[tuple[int, int]], frame_shift: float, offset_frames: int = 0
) -> list[Word]:
    """Words of a token sequence (a word starts at a piece beginning with the SentencePiece boundary "▁"),
    timed by the frames of the pieces that carry letters."""
    words: list[Word] = []
    text, first, last = "", None, None

    def close():
        if text:
            start = offset_frames + (first if first is not None else 0)
            end = offset_frames + (last if last is not None else start) + 1
            words.append(Word(text, round(start * frame_shift, 3), round(end * frame_shift, 3)))

    for token, (a, b) in zip(tokens, spans):
        piece = tokenizer.id_to_piece(int(token))
        for i, part in enumerate(piece.split("\u2581")):
            if i > 0:  # a boundary: the word so far is complete
                close()
                text, first, last = "", None, None
            if part:
                text += part
                first = a if first is None else first
                last = b
    close()
    return words


def text(tokenizer, tokens: Sequence[int]) -> str:
    """The recipe's hypothesis text: SentencePiece's decoding, split into words and joined by one space."""
    return " ".join(tokenizer.decode_ids([int(t) for t in tokens]).split())


# --------------------------------------------------------------------------------------------------------------
# Long recordings
# --------------------------------------------------------------------------------------------------------------
def windowed_fbank_stats(
    num_samples: int, hop: int, window: int, pad: int, fbank: Callable[[int, int], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """(F,) mean and variance (float32) of a whole recording's fbank, computed one window at a time.

    ``fbank(a, b)`` gives the ``(frames, F)`` fbank of samples ``[a, b)``, frames centred every ``hop`` samples
    from ``a``. Each window of ``window`` samples is read with ``pad`` samples of context on either side (a
    multiple of ``hop``, longer than half an FFT window), so the frames kept from it (those centred in the
    window; the last window also keeps the frame at the end) equal those of the fbank of the whole recording.

    Example
    -------
    >>> x = np.random.default_rng(0).random(1001)
    >>> frames = lambda a, b: x[a : b + 1 : 10, None]  # (frames, 1): one value at each hop from a to b
    >>> mean, var = windowed_fbank_stats(1000, 10, 300, 20, frames)
    >>> bool(np.allclose(mean, frames(0, 1000).mean(0)) and np.allclose(var, frames(0, 1000).var(0)))
    True
    """
    total = total_sq = 0.0
    count = 0
    for b0 in range(0, num_samples, window):
        b1 = min(b0 + window, num_samples)
        a = max(b0 - pad, 0)
        feats = np.asarray(fbank(a, min(b1 + pad, num_samples)), dtype=np.float64)
        first = (b0 - a) // hop  # frames centred in [b0, b1); the last block also keeps the frame at the end
        last = (num_samples // hop if b1 == num_samples else -(-b1 // hop) - 1) - a // hop
        block = feats[first : last + 1]
        total = total + block.sum(0)
        total_sq = total_sq + (block**2).sum(0)
        count += block.shape[0]
    mean = total / count
    return mean.astype(np.float32), np.maximum(total_sq / count - mean**2, 0.0).astype(np.float32)
