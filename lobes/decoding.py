"""CTC decoding with a closed lexicon and a word n-gram language model.

:class:`WordNgramLM` is an interpolated Kneser-Ney n-gram model over words, estimated from training
transcripts (Chen & Goodman 1998, fixed discount). :class:`CTCLexiconDecoder` is a CTC prefix beam search
whose hypotheses can only spell words of the lexicon (a trie over the tokenizer's spellings of the words);
each hypothesis is scored by the acoustic log-probability plus ``lm_weight`` times the language model
log-probability of its words plus ``word_bonus`` per word. While a word is being spelled, the language
model contributes the best log-probability of any word it can still become (look-ahead), so partial words
compete fairly with hypotheses that just completed one.

Example
-------
>>> lm = WordNgramLM(["THE DOG SAW THE CAT", "THE CAT SAW THE DOG"], order=2)
>>> round(float(np.exp(lm.log_probs(("THE",))[lm.index["CAT"]])), 3)
0.359
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np
import torch

__all__ = ["WordNgramLM", "CTCLexiconDecoder"]

_CACHE_FLOATS = 1 << 24  # per-context distributions kept (float64 values, ~128 MB) before a cache is reset


class WordNgramLM:
    """Interpolated Kneser-Ney word n-gram model estimated from sentences.

    The highest order uses raw counts, lower orders continuation counts (how many different words
    precede an n-gram); every order is interpolated with the next lower one using the discount mass.
    The unigram level is interpolated with a uniform distribution over the vocabulary and ``</s>``, so
    no word of the vocabulary has zero probability.

    Arguments
    ---------
    sentences : Iterable[str]
        Training text, one sentence per item, words separated by spaces.
    order : int
        n of the n-gram (2: bigram, 3: trigram, ...).
    discount : float
        Absolute discount D in (0, 1).

    Example
    -------
    >>> lm = WordNgramLM(["A B", "A C", "A B"], order=2)
    >>> lm.words
    ['A', 'B', 'C']
    >>> p = np.exp(lm.log_probs(("A",)))  # over words + </s>
    >>> round(float(p.sum()), 6), bool(p[lm.index["B"]] > p[lm.index["C"]])
    (1.0, True)
    """

    def __init__(self, sentences: Iterable[str], order: int = 3, discount: float = 0.75):
        if order < 1:
            raise ValueError(f"order must be >= 1; got {order}")
        if not 0.0 < discount < 1.0:
            raise ValueError(f"discount must be in (0, 1); got {discount}")
        sentences = [s.split() for s in sentences]
        self.words = sorted({w for s in sentences for w in s})
        if not self.words:
            raise ValueError("WordNgramLM needs at least one non-empty sentence")
        self.index = {w: i for i, w in enumerate(self.words)}
        self.eos = len(self.words)  # </s> is predicted after the last word
        self.order, self.discount = order, discount
        size = len(self.words) + 1
        bos = -1  # <s> only ever appears in contexts
        # counts[k][context] -> {word: count} for contexts of length k (k = order - 1: raw counts,
        # k < order - 1: continuation counts, the number of distinct words before context + word)
        raw: dict[tuple, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        left: dict[tuple, set] = defaultdict(set)
        for sentence in sentences:
            ids = [bos] * (order - 1) + [self.index[w] for w in sentence] + [self.eos]
            for i in range(order - 1, len(ids)):
                gram = tuple(ids[i - order + 1 : i + 1])
                raw[gram[:-1]][gram[-1]] += 1
                for k in range(1, order):  # lower-order n-grams gram[k:], preceded by gram[k - 1]
                    left[gram[k:]].add(gram[k - 1])
        self._counts: dict[tuple, dict[int, int]] = {ctx: dict(ws) for ctx, ws in raw.items()}
        cont: dict[tuple, dict[int, int]] = defaultdict(dict)
        for gram, before in left.items():
            cont[gram[:-1]][gram[-1]] = len(before)
        self._cont = dict(cont)
        self._uniform = np.full(size, 1.0 / size)
        self._bos = bos
        self._cache: dict[tuple, np.ndarray] = {}

    def _probs(self, context: tuple, top: bool) -> np.ndarray:
        if not context:
            lower = self._uniform
        else:
            lower = self._probs(context[1:], top=False)
        table = (self._counts if top else self._cont).get(context)
        if not table:
            return lower
        total = sum(table.values())
        probs = lower * (self.discount * len(table) / total)
        idx = np.fromiter(table.keys(), dtype=np.int64, count=len(table))
        cnt = np.fromiter(table.values(), dtype=np.float64, count=len(table))
        probs[idx] += np.maximum(cnt - self.discount, 0.0) / total
        return probs

    def log_probs(self, context: Sequence[str]) -> np.ndarray:
        """Natural-log probabilities of every word (in :attr:`words` order) and of ``</s>`` (last entry)
        after ``context`` (the preceding words; fewer than ``order - 1`` means sentence start)."""
        return self.log_probs_ids(tuple(self.index.get(w, -2) for w in context))

    def log_probs_ids(self, context: tuple[int, ...]) -> np.ndarray:
        """:meth:`log_probs` for word indices (read-only array, cached per context)."""
        k = self.order - 1
        context = ((self._bos,) * k + tuple(context))[len(context) :] if k else ()
        cached = self._cache.get(context)
        if cached is None:
            if len(self._cache) * (len(self.words) + 1) > _CACHE_FLOATS:  # bounded for large vocabularies
                self._cache.clear()
            cached = np.log(self._probs(context, top=True))
            cached.flags.writeable = False
            self._cache[context] = cached
        return cached

    def sentence_log_prob(self, sentence: str) -> float:
        """Natural-log probability of a whole sentence, ``</s>`` included."""
        ids = [self.index[w] for w in sentence.split()]
        total = 0.0
        for i, w in enumerate(ids + [self.eos]):
            total += float(self.log_probs_ids(tuple(ids[max(0, i - self.order + 1) : i]))[w])
        return total


class _Trie:
    """Token-spelling trie; word indices are numbered in depth-first order so a node's words form a range."""

    def __init__(self, spellings: dict[str, Sequence[int]]):
        children: list[dict[int, int]] = [{}]
        ends: dict[int, list[str]] = defaultdict(list)
        for word, tokens in spellings.items():
            node = 0
            for token in tokens:
                nxt = children[node].get(token)
                if nxt is None:
                    nxt = len(children)
                    children.append({})
                    children[node][token] = nxt
                node = nxt
            ends[node].append(word)
        self.children = children
        self.word = [-1] * len(children)  # DFS word index ending at the node (-1: none)
        self.lo = [0] * len(children)
        self.hi = [0] * len(children)
        self.words: list[str] = []
        duplicates = {node: ws for node, ws in ends.items() if len(ws) > 1}
        if duplicates:
            clash = next(iter(duplicates.values()))
            raise ValueError(f"words {clash} have the same token spelling; the lexicon cannot tell them apart")
        stack = [(0, False)]
        while stack:  # iterative DFS: lo on entry, hi on exit
            node, done = stack.pop()
            if done:
                self.hi[node] = len(self.words)
                continue
            self.lo[node] = len(self.words)
            if node in ends:
                self.word[node] = len(self.words)
                self.words.append(ends[node][0])
            stack.append((node, True))
            for token in sorted(children[node], reverse=True):
                stack.append((children[node][token], False))


class CTCLexiconDecoder:
    """CTC prefix beam search restricted to lexicon words, with an optional word n-gram language model.

    Arguments
    ---------
    spellings : dict[str, Sequence[int]]
        Token ids of every lexicon word, as the tokenizer spells the word on its own.
    word_start_tokens : Iterable[int]
        Tokens that begin a word (for SentencePiece, the pieces starting with "▁"); every other
        token continues the current word.
    lm : WordNgramLM, optional
        Word language model; its vocabulary must include every lexicon word. ``None``: lexicon only.
    blank_index : int
        Index of the CTC blank.
    beam_size : int
        Hypotheses kept after each frame.
    lm_weight : float
        Weight of the language-model log-probability.
    word_bonus : float
        Added per word (counters the language model's preference for short hypotheses).
    token_prune : float
        Tokens whose log-probability at a frame is below the frame's best minus this are not extended.

    Example
    -------
    >>> spell = {"AB": [1, 2], "B": [1, 3]}  # token 1 starts words; 2 and 3 are letters
    >>> dec = CTCLexiconDecoder(spell, word_start_tokens=[1], beam_size=4)
    >>> probs = torch.tensor([[.1, .8, .05, .05], [.1, .1, .5, .3], [.9, .05, .025, .025],
    ...                       [.1, .8, .05, .05], [.1, .1, .3, .5]])
    >>> dec(probs.log().unsqueeze(0), torch.tensor([5]))
    [['AB', 'B']]
    """

    def __init__(
        self,
        spellings: dict[str, Sequence[int]],
        word_start_tokens: Iterable[int],
        lm: WordNgramLM | None = None,
        blank_index: int = 0,
        beam_size: int = 16,
        lm_weight: float = 0.5,
        word_bonus: float = 1.0,
        token_prune: float = 10.0,
    ):
        if not spellings:
            raise ValueError("the lexicon is empty")
        empty = [w for w, toks in spellings.items() if len(toks) == 0]
        if empty:
            raise ValueError(f"lexicon words with no tokens: {empty[:5]}")
        starts = set(int(t) for t in word_start_tokens)
        bad = [w for w, toks in spellings.items() if toks[0] not in starts or any(t in starts for t in toks[1:])]
        if bad:
            raise ValueError(
                f"each spelling must begin with a word-start token and contain no other; offending words: {bad[:5]}"
            )
        if lm is not None:
            missing = [w for w in spellings if w not in lm.index]
            if missing:
                raise ValueError(f"lexicon words missing from the language model: {missing[:5]}")
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1; got {beam_size}")
        self.trie = _Trie(spellings)
        self.word_start_tokens = starts
        self.lm = lm
        self.blank_index = blank_index
        self.beam_size = beam_size
        self.lm_weight = lm_weight
        self.word_bonus = word_bonus
        self.token_prune = token_prune
        # LM index of each DFS-ordered lexicon word (with </s> appended, for the final step)
        if lm is not None:
            self._lm_ids = np.array([lm.index[w] for w in self.trie.words], dtype=np.int64)
        self._lookahead_cache: dict[tuple, np.ndarray] = {}

    @classmethod
    def from_sentencepiece(cls, sp, transcripts: Iterable[str], lm_order: int = 3, **kwargs) -> "CTCLexiconDecoder":
        """Lexicon and language model (``lm_order`` = 0: none) from training transcripts, spellings from a
        ``sentencepiece.SentencePieceProcessor``; ``kwargs`` go to the constructor."""
        transcripts = [t for t in transcripts if t.strip()]
        words = sorted({w for t in transcripts for w in t.split()})
        spellings = {w: sp.encode_as_ids(w) for w in words}
        starts = [i for i in range(sp.get_piece_size()) if sp.id_to_piece(i).startswith("\u2581")]
        lm = WordNgramLM(transcripts, order=lm_order) if lm_order > 0 else None
        return cls(spellings, starts, lm=lm, **kwargs)

    # --- language-model scores -------------------------------------------------------------------
    def _dfs_log_probs(self, context: tuple[int, ...]) -> np.ndarray:
        """LM log-probabilities of the lexicon words in DFS order (then </s>) after a context of LM ids."""
        cached = self._lookahead_cache.get(context)
        if cached is None:
            if len(self._lookahead_cache) * (len(self._lm_ids) + 1) > _CACHE_FLOATS:
                self._lookahead_cache.clear()
            lp = self.lm.log_probs_ids(context)
            cached = np.append(lp[self._lm_ids], lp[self.lm.eos])
            self._lookahead_cache[context] = cached
        return cached

    def _context(self, words: tuple[int, ...]) -> tuple[int, ...]:
        k = self.lm.order - 1
        return tuple(int(self._lm_ids[w]) for w in words[len(words) - k :]) if k else ()

    def _lookahead(self, words: tuple[int, ...], node: int) -> float:
        if self.lm is None or node == 0:
            return 0.0
        lp = self._dfs_log_probs(self._context(words))
        return self.lm_weight * float(lp[self.trie.lo[node] : self.trie.hi[node]].max())

    def _word_score(self, words: tuple[int, ...], word: int) -> float:
        """Weighted LM log-probability of ``word`` after ``words``, plus the word bonus."""
        if self.lm is None:
            return self.word_bonus
        return self.lm_weight * float(self._dfs_log_probs(self._context(words))[word]) + self.word_bonus

    def _end_score(self, words: tuple[int, ...]) -> float:
        if self.lm is None:
            return 0.0
        return self.lm_weight * float(self._dfs_log_probs(self._context(words))[-1])

    # --- search --------------------------------------------------------------------------------------
    def decode_one(self, log_probs: np.ndarray) -> list[str]:
        """Best word sequence for one utterance's (T, V) CTC log-probabilities (valid frames only)."""
        trie, blank, neg = self.trie, self.blank_index, -math.inf
        lse = np.logaddexp
        # key (committed words, trie node) -> [log p ending in blank, log p ending in a token, last token, lm]
        beams = {((), 0): [0.0, neg, -1, 0.0]}
        for frame in log_probs:
            best = float(frame.max())
            tokens = [int(c) for c in np.nonzero(frame >= best - self.token_prune)[0] if c != blank]
            p_blank = float(frame[blank])
            nxt: dict[tuple, list] = {}
            for key, (pb, pnb, last, lm) in beams.items():
                words, node = key
                total = lse(pb, pnb)
                entry = nxt.get(key)
                if entry is None:
                    entry = nxt[key] = [neg, neg, last, lm]
                entry[0] = lse(entry[0], total + p_blank)
                for c in tokens:
                    pc = float(frame[c])
                    if c == last:
                        entry[1] = lse(entry[1], pnb + pc)  # repeated token merges into the same prefix
                        source = pb  # the same token again only after a blank
                    else:
                        source = total
                    if source == neg:
                        continue
                    new_words, new_lm = words, lm
                    if c in self.word_start_tokens:
                        if node != 0:
                            if trie.word[node] < 0:
                                continue  # the current word is incomplete
                            new_words = words + (trie.word[node],)
                            new_lm = lm + self._word_score(words, trie.word[node])
                        child = trie.children[0].get(c)
                    else:
                        child = trie.children[node].get(c) if node != 0 else None
                    if child is None:
                        continue
                    new_key = (new_words, child)
                    target = nxt.get(new_key)
                    if target is None:
                        target = nxt[new_key] = [neg, neg, c, new_lm]
                    target[1] = lse(target[1], source + pc)
            scored = sorted(
                nxt.items(), key=lambda kv: -(lse(kv[1][0], kv[1][1]) + kv[1][3] + self._lookahead(kv[0][0], kv[0][1]))
            )
            beams = dict(scored[: self.beam_size])
        best_words, best_score = (), neg
        for (words, node), (pb, pnb, _, lm) in beams.items():
            if node != 0:
                if trie.word[node] < 0:
                    continue
                lm += self._word_score(words, trie.word[node])
                words = words + (trie.word[node],)
            score = lse(pb, pnb) + lm + self._end_score(words)
            if score > best_score:
                best_words, best_score = words, score
        return [trie.words[w] for w in best_words]

    def __call__(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[str]]:
        """Words per utterance.

        Arguments
        ---------
        log_probs : torch.Tensor
            (B, T, V) CTC log-probabilities.
        lengths : torch.Tensor
            (B,) valid frames per utterance (absolute).

        Returns
        -------
        list[list[str]]
            The best word sequence of each utterance.
        """
        if log_probs.dim() != 3:
            raise ValueError(f"expected (B, T, V) log-probabilities; got shape {tuple(log_probs.shape)}")
        lp = log_probs.detach().float().cpu().numpy()
        return [self.decode_one(lp[i, : int(n)]) for i, n in enumerate(lengths.tolist())]
