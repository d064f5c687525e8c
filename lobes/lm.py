"""Back-off n-gram language models: Kneser-Ney estimation from text, ARPA files in and out.

:class:`NgramLM` is a back-off n-gram model in the form of an ARPA file: each listed n-gram has its
probability (and, if it can be a context, a back-off weight); an n-gram that is not listed gets the back-off
weight of its context times its probability under the next shorter context. :func:`read_arpa` and
:meth:`NgramLM.write_arpa` read and write that format (plain or ``.gz``), so a model from KenLM, SRILM or
LibriSpeech's ``3-gram.arpa.gz`` can be used, and one estimated here can be used by those tools.
:class:`WordNgramLM` estimates one from sentences: interpolated Kneser-Ney (Chen & Goodman 1998) with the
adjusted counts of KenLM's ``lmplz`` (the highest order uses raw counts, lower orders the number of distinct
words before an n-gram, n-grams that begin with ``<s>`` their raw counts) but one fixed discount instead of
lmplz's three estimated ones; each order is interpolated with the next lower one, the unigrams with a
uniform distribution over the vocabulary, ``</s>`` and ``<unk>``.

Sentences are wrapped in ``<s>`` ... ``</s>``; a context is the preceding words, ``<s>`` included (at most
``order - 1``). The words of a model may be anything without white space: the decoders of
:mod:`lobes.decoding` also use character and subword models whose "words" are SentencePiece pieces.

Example
-------
>>> lm = WordNgramLM(["THE DOG SAW THE CAT", "THE CAT SAW THE DOG"], order=2)
>>> p = np.exp(lm.log_probs(("THE",)))  # every word, then </s> and <unk>
>>> round(float(p.sum()), 6), round(float(p[lm.index["CAT"]]), 3)
(1.0, 0.354)
"""

from __future__ import annotations

import gzip
import itertools
import logging
import math
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

__all__ = ["ArpaError", "NgramLM", "WordNgramLM", "read_arpa"]

logger = logging.getLogger(__name__)

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
_LN10 = math.log(10.0)
_CACHE_FLOATS = 1 << 24  # per-context distributions kept (float64 values, ~128 MB) before the cache is reset


class ArpaError(ValueError):
    """A malformed ARPA file; the message names the file, the line and what was expected."""


class NgramLM:
    """Back-off n-gram language model (the content of an ARPA file).

    Word ids: the words in :attr:`words` order, then ``</s>`` (:attr:`eos`), ``<unk>`` (:attr:`unk`) and
    ``<s>`` (:attr:`bos`, only ever a context). Distributions cover the first ``len(words) + 2`` ids.

    Arguments
    ---------
    order : int
        The longest n-gram.
    ngrams : Sequence[dict]
        ``ngrams[n - 1]`` maps each listed n-gram (a tuple of n word strings) to ``(log10 probability,
        log10 back-off weight)``, as in an ARPA file. The unigrams must list ``</s>``; ``<s>`` and
        ``<unk>`` are optional (a missing ``<unk>`` gets the smallest unigram probability).

    Example
    -------
    >>> lm = NgramLM(1, [{("A",): (-0.3, 0.0), ("</s>",): (-0.3, 0.0)}])
    >>> lm.words, round(float(np.exp(lm.log_probs(())[lm.index["A"]])), 3)
    (['A'], 0.501)
    """

    def __init__(self, order: int, ngrams: Sequence[dict[tuple[str, ...], tuple[float, float]]]):
        if order < 1 or len(ngrams) != order:
            raise ValueError(f"expected one n-gram table per order 1..{order}; got {len(ngrams)} tables")
        unigrams = ngrams[0]
        if (EOS,) not in unigrams:
            raise ValueError(f"the unigrams must list {EOS}")
        self.order = order
        self.words = sorted(w for (w,) in unigrams if w not in (BOS, EOS, UNK))
        self.index = {w: i for i, w in enumerate(self.words)}
        self.eos, self.unk, self.bos = len(self.words), len(self.words) + 1, len(self.words) + 2
        self.index.update({EOS: self.eos, UNK: self.unk, BOS: self.bos})
        size = len(self.words) + 2
        uni = np.full(size, -np.inf)
        for (w,), (lp, _) in unigrams.items():
            if w != BOS:
                uni[self.index[w]] = lp * _LN10
        if (UNK,) not in unigrams:
            uni[self.unk] = float(uni[: self.unk].min())
            logger.info("the language model has no %s; it gets the smallest unigram probability", UNK)
        self._unigram = uni
        self._bow: dict[tuple[int, ...], float] = {}
        self._next: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}
        for n, table in enumerate(ngrams, start=1):
            grouped: dict[tuple[int, ...], list[tuple[int, float]]] = defaultdict(list)
            for gram, (lp, bow) in table.items():
                try:
                    ids = tuple(self.index[w] for w in gram)
                except KeyError as exc:
                    raise ValueError(f"{n}-gram {' '.join(gram)!r}: word {exc.args[0]!r} is not a unigram") from None
                if bow:
                    self._bow[ids] = bow * _LN10
                if n > 1:
                    grouped[ids[:-1]].append((ids[-1], lp * _LN10))
            for context, pairs in grouped.items():
                idx = np.fromiter((i for i, _ in pairs), dtype=np.int64, count=len(pairs))
                lps = np.fromiter((p for _, p in pairs), dtype=np.float64, count=len(pairs))
                self._next[context] = (idx, lps)
        self._cache: dict[tuple[int, ...], np.ndarray] = {}

    # --- queries ---------------------------------------------------------------------------------------
    def _ids(self, context: Sequence[str]) -> tuple[int, ...]:
        return tuple(self.index.get(w, self.unk) for w in context)

    def log_probs(self, context: Sequence[str]) -> np.ndarray:
        """Natural-log probabilities of every word (in :attr:`words` order), ``</s>`` and ``<unk>`` after
        ``context`` (the preceding words; fewer than ``order - 1`` means the sentence starts before them)."""
        return self.log_probs_ids(self._ids(context))

    def log_probs_ids(self, context: tuple[int, ...]) -> np.ndarray:
        """:meth:`log_probs` for word ids (read-only array, cached per context)."""
        k = self.order - 1
        context = tuple(context)
        if len(context) < k:
            context = (self.bos,) + context
        context = context[len(context) - k :] if k else ()
        cached = self._cache.get(context)
        if cached is None:
            if len(self._cache) * len(self._unigram) > _CACHE_FLOATS:  # bounded for large vocabularies
                self._cache.clear()
            cached = self._unigram.copy()
            for j in range(1, len(context) + 1):  # shorter contexts first: p(w|h) = bow(h) p(w|h[1:]) unless listed
                suffix = context[len(context) - j :]
                cached += self._bow.get(suffix, 0.0)
                listed = self._next.get(suffix)
                if listed is not None:
                    cached[listed[0]] = listed[1]
            cached.flags.writeable = False
            self._cache[context] = cached
        return cached

    def sentence_log_prob(self, sentence: str) -> float:
        """Natural-log probability of a whole sentence, ``</s>`` included (unknown words count as ``<unk>``)."""
        ids = list(self._ids(sentence.split())) + [self.eos]
        context = [self.bos]
        total = 0.0
        for w in ids:
            total += float(self.log_probs_ids(tuple(context[max(0, len(context) - self.order + 1) :]))[w])
            context.append(w)
        return total

    # --- ARPA --------------------------------------------------------------------------------------------
    def ngrams(self) -> list[dict[tuple[str, ...], tuple[float, float]]]:
        """The listed n-grams per order, ``{words: (log10 probability, log10 back-off weight)}``."""
        names = self.words + [EOS, UNK, BOS]
        tables: list[dict[tuple[str, ...], tuple[float, float]]] = [{} for _ in range(self.order)]
        for i, lp in enumerate(self._unigram):
            tables[0][(names[i],)] = (float(lp) / _LN10, self._bow.get((i,), 0.0) / _LN10)
        if (self.bos,) in self._bow or any(c[0] == self.bos for c in self._next):
            tables[0][(BOS,)] = (-99.0, self._bow.get((self.bos,), 0.0) / _LN10)
        for context, (idx, lps) in self._next.items():
            for i, lp in zip(idx.tolist(), lps.tolist()):
                gram = context + (i,)
                tables[len(gram) - 1][tuple(names[g] for g in gram)] = (lp / _LN10, self._bow.get(gram, 0.0) / _LN10)
        return tables

    def write_arpa(self, path: str | os.PathLike) -> Path:
        """Write the model as an ARPA file (gzip-compressed when ``path`` ends in ``.gz``), atomically."""
        from lobes.io import atomic_write_bytes

        tables = self.ngrams()
        lines = ["", "\\data\\"] + [f"ngram {n}={len(t)}" for n, t in enumerate(tables, start=1)] + [""]
        for n, table in enumerate(tables, start=1):
            lines.append(f"\\{n}-grams:")
            for gram in sorted(table):
                lp, bow = table[gram]
                fields = [f"{lp:.9g}", " ".join(gram)] + ([f"{bow:.9g}"] if bow and n < self.order else [])
                lines.append("\t".join(fields))
            lines.append("")
        lines.append("\\end\\\n")
        data = "\n".join(lines).encode("utf-8")
        return atomic_write_bytes(path, gzip.compress(data, mtime=0) if str(path).endswith(".gz") else data)


def read_arpa(path: str | os.PathLike) -> NgramLM:
    """Read an ARPA n-gram file (plain text, or gzip-compressed: ``.arpa.gz``, recognised by its content).

    Raises
    ------
    ArpaError
        When the file does not follow the format (the message gives the line and what was expected).
    FileNotFoundError
        When there is no such file.

    Example
    -------
    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "lm.arpa")
    >>> _ = WordNgramLM(["A B", "B A"], order=2).write_arpa(p)
    >>> read_arpa(p).order
    2
    >>> _ = open(p, "w").write("\\\\data\\\\\\nngram 1=x\\n")
    >>> read_arpa(p)
    Traceback (most recent call last):
    ...
    lobes.lm.ArpaError: ...lm.arpa:2: expected 'ngram N=COUNT' or a blank line ending the header; got 'ngram 1=x'
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ARPA file")
    with open(path, "rb") as f:
        compressed = f.read(2) == b"\x1f\x8b"
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return _parse_arpa(f, str(path))
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as exc:
        raise ArpaError(f"{path}: not an ARPA text file ({type(exc).__name__}: {exc})") from None


_COUNT = re.compile(r"ngram\s+(\d+)\s*=\s*(\d+)$")
_SECTION = re.compile(r"\\(\d+)-grams:$")


def _parse_arpa(lines: Iterable[str], name: str) -> NgramLM:
    def fail(lineno: int, expected: str, got: str) -> ArpaError:
        return ArpaError(f"{name}:{lineno}: expected {expected}; got {got[:80]!r}")

    it = enumerate(lines, start=1)
    for _, line in it:  # anything before \data\ is a comment
        if line.strip() == "\\data\\":
            break
    else:
        raise ArpaError(f"{name}: no '\\data\\' line; expected an ARPA file")
    counts: dict[int, int] = {}
    pending = None  # a section line that ended the header without a blank line
    for lineno, line in it:
        line = line.strip()
        if not line or (counts and _SECTION.match(line)):
            if counts:
                pending = (lineno, line) if line else None
                break
            continue
        match = _COUNT.match(line)
        if not match:
            raise fail(lineno, "'ngram N=COUNT' or a blank line ending the header", line)
        counts[int(match.group(1))] = int(match.group(2))
    order = max(counts, default=0)
    if not counts or sorted(counts) != list(range(1, order + 1)):
        raise ArpaError(f"{name}: the header must give 'ngram N=COUNT' for N = 1, 2, ... in order; got {counts}")
    tables: list[dict[tuple[str, ...], tuple[float, float]]] = [{} for _ in range(order)]
    n = 0
    for lineno, line in itertools.chain([pending] if pending else [], it):
        line = line.strip()
        if not line:
            continue
        if line == "\\end\\":
            break
        match = _SECTION.match(line)
        if match:
            if int(match.group(1)) != n + 1 or n + 1 > order:
                raise fail(lineno, f"'\\{n + 1}-grams:'" if n < order else "'\\end\\'", line)
            if n and len(tables[n - 1]) != counts[n]:
                raise ArpaError(
                    f"{name}: the header announces {counts[n]} {n}-grams; the file lists {len(tables[n - 1])}"
                )
            n += 1
            continue
        if n == 0:
            raise fail(lineno, "'\\1-grams:'", line)
        fields = line.split()
        if len(fields) not in (n + 1, n + 2) or (len(fields) == n + 2 and n == order):
            shape = f"'LOG10PROB {' '.join(f'W{i}' for i in range(1, n + 1))}'" + (
                " [LOG10BACKOFF]" if n < order else ""
            )
            raise fail(lineno, f"a {n}-gram line {shape}", line)
        try:
            lp = float(fields[0])
            bow = float(fields[n + 1]) if len(fields) == n + 2 else 0.0
        except ValueError:
            raise fail(lineno, "numbers for the log10 probability and back-off weight", line) from None
        if lp > 0 or math.isnan(lp) or math.isnan(bow):
            raise fail(lineno, "a log10 probability <= 0", line)
        tables[n - 1][tuple(fields[1 : n + 1])] = (lp, bow)
    else:
        raise ArpaError(f"{name}: the file ends before '\\end\\' (truncated?)")
    if n != order:
        raise ArpaError(f"{name}: the header announces {order}-grams but the file stops after the {n}-grams")
    if len(tables[n - 1]) != counts[n]:
        raise ArpaError(f"{name}: the header announces {counts[n]} {n}-grams; the file lists {len(tables[n - 1])}")
    if (EOS,) not in tables[0]:
        raise ArpaError(f"{name}: the unigrams do not list {EOS}")
    try:
        return NgramLM(order, tables)
    except ValueError as exc:
        raise ArpaError(f"{name}: {exc}") from None


class WordNgramLM(NgramLM):
    """Interpolated Kneser-Ney n-gram model estimated from sentences (an :class:`NgramLM`).

    Arguments
    ---------
    sentences : Iterable[str]
        Training text, one sentence per item, words separated by white space.
    order : int
        n of the n-gram (2: bigram, 3: trigram, ...).
    discount : float
        Absolute discount D in (0, 1), the same for every order.
    vocabulary : Iterable[str]
        More words of the vocabulary that the sentences may lack (they get the uniform share only).

    Example
    -------
    >>> lm = WordNgramLM(["A B", "A C", "A B"], order=2)
    >>> lm.words
    ['A', 'B', 'C']
    >>> p = np.exp(lm.log_probs(("A",)))  # over words + </s> + <unk>
    >>> round(float(p.sum()), 6), bool(p[lm.index["B"]] > p[lm.index["C"]])
    (1.0, True)
    """

    def __init__(
        self, sentences: Iterable[str], order: int = 3, discount: float = 0.75, vocabulary: Iterable[str] = ()
    ):
        if order < 1:
            raise ValueError(f"order must be >= 1; got {order}")
        if not 0.0 < discount < 1.0:
            raise ValueError(f"discount must be in (0, 1); got {discount}")
        sentences = [s.split() for s in sentences]
        sentences = [s for s in sentences if s]
        if not sentences:
            raise ValueError("WordNgramLM needs at least one non-empty sentence")
        vocabulary = [w for w in vocabulary if w not in (EOS, UNK)]
        reserved = ({w for s in sentences for w in s} | set(vocabulary)) & {BOS, EOS, UNK}
        if reserved:
            raise ValueError(f"the sentences hold the reserved words {sorted(reserved)}")
        self.discount = discount
        super().__init__(order, _kneser_ney(sentences, order, discount, vocabulary))


def _kneser_ney(sentences: list[list[str]], order: int, discount: float, extra: Sequence[str] = ()) -> list[dict]:
    """ARPA tables of the interpolated Kneser-Ney estimate (see the module docstring)."""
    raw: list[dict[tuple, int]] = [defaultdict(int) for _ in range(order)]
    for sentence in sentences:
        tokens = [BOS] + sentence + [EOS]
        for i in range(1, len(tokens)):
            for n in range(1, min(order, i + 1) + 1):
                raw[n - 1][tuple(tokens[i - n + 1 : i + 1])] += 1
    # adjusted counts: raw at the highest order and for n-grams that begin with <s>; otherwise the number
    # of distinct words before the n-gram
    adjusted: list[dict[tuple, int]] = [dict(raw[-1])]
    for n in range(order - 1, 0, -1):
        before: dict[tuple, int] = defaultdict(int)
        for gram in raw[n]:
            before[gram[1:]] += 1
        adjusted.insert(0, {g: (c if g[0] == BOS else before[g]) for g, c in raw[n - 1].items()})
    vocabulary = {g[0] for g in adjusted[0]} | {EOS, UNK} | set(extra)
    tables: list[dict[tuple, list[float]]] = [{} for _ in range(order)]
    for n in range(1, order + 1):
        totals: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])  # context -> [sum of counts, types]
        for gram, count in adjusted[n - 1].items():
            entry = totals[gram[:-1]]
            entry[0] += count
            entry[1] += 1
        gammas = {context: discount * types / total for context, (total, types) in totals.items()}
        if n > 1:  # the back-off weight of a context is its discounted mass
            for context, gamma in gammas.items():
                tables[n - 2].setdefault(context, [None, 0.0])[1] = math.log10(gamma)
        for gram, count in adjusted[n - 1].items():
            if n == 1:
                lower = gammas[()] / len(vocabulary)
            else:
                lower = gammas[gram[:-1]] * 10.0 ** _backoff_log10(tables, gram[1:])
            p = max(count - discount, 0.0) / totals[gram[:-1]][0] + lower
            tables[n - 1].setdefault(gram, [None, 0.0])[0] = math.log10(p)
        if n == 1:
            for word in vocabulary - {g[0] for g in adjusted[0]}:  # <unk> and the words of no sentence
                tables[0][(word,)] = [math.log10(gammas[()] / len(vocabulary)), 0.0]
            tables[0][(BOS,)] = [-99.0, 0.0]
    return [{g: (lp, bow) for g, (lp, bow) in table.items()} for table in tables]


def _backoff_log10(tables: list[dict[tuple, list[float]]], gram: tuple) -> float:
    """log10 p(gram[-1] | gram[:-1]) from ARPA tables of the lower orders (back-off rule)."""
    entry = tables[len(gram) - 1].get(gram)
    if entry is not None and entry[0] is not None:
        return entry[0]
    context = tables[len(gram) - 2].get(gram[:-1]) if len(gram) > 1 else None
    bow = context[1] if context is not None else 0.0
    return bow + _backoff_log10(tables, gram[1:])
