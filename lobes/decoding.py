"""CTC prefix beam search over lexicon words and, optionally, freely spelled new words.

:class:`CTCLexiconDecoder` is a CTC prefix beam search whose words are lexicon words (a trie over the
tokenizer's spellings of the words), scored by the acoustic log-probability plus ``lm_weight`` times a word
n-gram language model (:class:`lobes.lm.NgramLM`: Kneser-Ney from the training transcripts, or an ARPA file)
plus ``word_bonus`` per word. While a word is being spelled, the language model contributes the best
log-probability of any word it can still become (look-ahead), so partial words compete fairly with
hypotheses that just completed one.

With a spelling model (``spelling_lm``: an n-gram model over the tokens of a word, e.g. letters), the
vocabulary is open: a word that is not in the lexicon may be spelled token by token. It is scored as the
word LM's ``<unk>`` plus ``spelling_weight`` times the spelling model's log-probability of its tokens (and
of the word's end) plus ``unk_score``; while it is spelled, that score so far is its look-ahead. A word of
the lexicon always takes its lexicon score. When every hypothesis left after the last frame ends inside a word
that cannot end there, the best one without that unfinished word is returned (rather than no words).

``benchmarks/ctc_decoders.py`` compares this search with torchaudio's flashlight-text decoder (with a lexicon
and an ARPA word LM, and lexicon-free with a token n-gram LM) on the same CTC outputs.

Example
-------
>>> from lobes.lm import WordNgramLM
>>> lm = WordNgramLM(["THE DOG SAW THE CAT", "THE CAT SAW THE DOG"], order=2)
>>> dec = CTCLexiconDecoder({"THE": [1, 2], "CAT": [1, 3]}, [1], lm=lm)
>>> sorted(dec.trie.words)
['CAT', 'THE']
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np
import torch

from lobes.lm import NgramLM, WordNgramLM, read_arpa

__all__ = ["WordNgramLM", "CTCLexiconDecoder", "spelling_lm"]

_CACHE_FLOATS = 1 << 24  # per-context distributions kept (float64 values, ~128 MB) before a cache is reset
_CACHE_ENTRIES = 1 << 20  # look-ahead values kept per (context, trie node) before that cache is reset
_NEG = -math.inf


def _logaddexp(a: float, b: float) -> float:
    """log(exp(a) + exp(b)) of two Python floats (5x faster than ``np.logaddexp`` on scalars)."""
    if a < b:
        a, b = b, a
    if b == _NEG:
        return a
    return a + math.log1p(math.exp(b - a))


WORD_MARKER = "\u2581"  # SentencePiece's word-start mark


def spelling_lm(spellings: Iterable[Sequence[str]], order: int = 4, pieces: Iterable[str] = ()) -> WordNgramLM:
    """Kneser-Ney n-gram model over the pieces of words (one "sentence" per word), for unknown words.

    ``pieces``: more pieces that may spell a word although no spelling holds them (e.g. every letter).

    Example
    -------
    >>> lm = spelling_lm([["\u2581", "C", "A", "T"], ["\u2581", "C", "A", "R"]], order=3)
    >>> float(np.exp(lm.log_probs(("\u2581", "C"))[lm.index["A"]])) > 0.5
    True
    """
    return WordNgramLM((" ".join(p) for p in spellings), order=order, vocabulary=pieces)


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
    """CTC prefix beam search over lexicon words (and new words when ``spelling_lm`` is given), with a word LM.

    Arguments
    ---------
    spellings : dict[str, Sequence[int]]
        Token ids of every lexicon word, as the tokenizer spells the word on its own.
    word_start_tokens : Iterable[int]
        Tokens that begin a word (for SentencePiece, the pieces starting with "▁"); every other
        token continues the current word.
    lm : lobes.lm.NgramLM, optional
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
    spelling_lm : lobes.lm.NgramLM, optional
        Model of the pieces of a word (its "words" are ``pieces`` strings, a sentence is one word); opens
        the vocabulary. Only tokens in its vocabulary can spell a new word. ``None``: lexicon words only.
    pieces : Sequence[str], optional
        The text of every token id (needed with ``spelling_lm``); a new word is the concatenation of its
        pieces without ``▁``.
    unk_score : float
        Added to the score of every word that is not in the lexicon: the unknown-word penalty, relative to the
        word LM's ``<unk>`` log-probability (which a model estimated on text without unknown words makes
        very small, so the tuned value may well be positive).
    spelling_weight : float
        Weight of the spelling model's log-probability of a new word.
    spelling_prune : float
        A token spells (or starts) a new word only where its log-probability is within this of the frame's best.

    Example
    -------
    >>> spell = {"AB": [1, 2], "B": [1, 3]}  # token 1 starts words; 2 and 3 are letters
    >>> dec = CTCLexiconDecoder(spell, word_start_tokens=[1], beam_size=4)
    >>> probs = torch.tensor([[.1, .8, .05, .05], [.1, .1, .5, .3], [.9, .05, .025, .025],
    ...                       [.1, .8, .05, .05], [.1, .1, .3, .5]])
    >>> dec(probs.log().unsqueeze(0), torch.tensor([5]))
    [['AB', 'B']]
    >>> pieces = ["<b>", "\u2581", "A", "B"]
    >>> open_dec = CTCLexiconDecoder({"A": [1, 2], "B": [1, 3]}, [1], beam_size=4, pieces=pieces, unk_score=0.0,
    ...     spelling_lm=spelling_lm([["\u2581", "A", "B"], ["\u2581", "B"], ["\u2581", "B", "A"]], order=2))
    >>> probs = torch.tensor([[.1, .8, .05, .05], [.001, .001, .001, .997], [.001, .001, .997, .001],
    ...                       [.9, .05, .025, .025]])
    >>> open_dec(probs.log().unsqueeze(0), torch.tensor([4]))  # "BA" is not in the lexicon
    [['BA']]
    """

    def __init__(
        self,
        spellings: dict[str, Sequence[int]],
        word_start_tokens: Iterable[int],
        lm: NgramLM | None = None,
        blank_index: int = 0,
        beam_size: int = 16,
        lm_weight: float = 0.5,
        word_bonus: float = 1.0,
        token_prune: float = 10.0,
        spelling_lm: NgramLM | None = None,
        pieces: Sequence[str] | None = None,
        unk_score: float = 3.0,
        spelling_weight: float = 0.5,
        spelling_prune: float = 3.0,
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
        if spelling_lm is not None and pieces is None:
            raise ValueError("spelling_lm needs pieces (the text of every token id)")
        self.trie = _Trie(spellings)
        self.word_start_tokens = starts
        self.lm = lm
        self.blank_index = blank_index
        self.beam_size = beam_size
        self.lm_weight = lm_weight
        self.word_bonus = word_bonus
        self.token_prune = token_prune
        self.spelling_lm = spelling_lm
        self.pieces = list(pieces) if pieces is not None else None
        self.unk_score = unk_score
        self.spelling_weight = spelling_weight
        self.spelling_prune = spelling_prune
        # LM index of each DFS-ordered lexicon word (with </s> appended, for the final step)
        if lm is not None:
            self._lm_ids = np.array([lm.index[w] for w in self.trie.words], dtype=np.int64)
        self._lookahead_cache: dict[tuple, np.ndarray] = {}
        self._best_cache: dict[tuple, float] = {}
        # spelling-model id of each token (-1: the token cannot spell a new word)
        self._spell_ids: dict[int, int] = {}
        if spelling_lm is not None:
            specials = {spelling_lm.eos, spelling_lm.unk, spelling_lm.bos}
            for token, piece in enumerate(self.pieces):
                sid = spelling_lm.index.get(piece, -1)
                if sid >= 0 and sid not in specials and token != blank_index:
                    self._spell_ids[token] = sid

    @classmethod
    def from_sentencepiece(
        cls,
        sp,
        transcripts: Iterable[str],
        lm_order: int = 3,
        lm_path: str | None = None,
        spelling_order: int = 0,
        lm: NgramLM | None = None,
        **kwargs,
    ) -> "CTCLexiconDecoder":
        """Lexicon, word LM and spelling model from training transcripts; spellings from a
        ``sentencepiece.SentencePieceProcessor``; ``kwargs`` go to the constructor.

        ``lm_order``: order of the word LM estimated on the transcripts (0: none). ``lm_path``: an ARPA file
        (``.gz`` too) to use instead, or ``lm``: such a model already read (or an object holding it as ``.lm``);
        the lexicon is then its words that the tokenizer can spell.
        ``spelling_order``: order of the spelling model of new words, estimated on the lexicon's spellings
        (0: closed vocabulary).
        """
        transcripts = [t for t in transcripts if t.strip()]
        lm = getattr(lm, "lm", lm)  # a loadable holding the model
        given = bool(lm_path) or lm is not None
        if given:
            if lm is None:
                lm = read_arpa(lm_path)
            words = lm.words
        else:
            words = sorted({w for t in transcripts for w in t.split()})
            lm = WordNgramLM(transcripts, order=lm_order) if lm_order > 0 else None
        unk = sp.unk_id()
        spellings = {w: ids for w in words if (ids := sp.encode_as_ids(w)) and unk not in ids}
        if given and not spellings:
            raise ValueError(f"{lm_path or 'the language model'}: none of its words can be spelled with the tokenizer")
        pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        starts = [i for i, p in enumerate(pieces) if p.startswith(WORD_MARKER)]
        speller = None
        if spelling_order > 0:
            regular = [p for i, p in enumerate(pieces) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i))]
            speller = spelling_lm(
                ([pieces[t] for t in spellings[w]] for w in spellings), order=spelling_order, pieces=regular
            )
        return cls(spellings, starts, lm=lm, spelling_lm=speller, pieces=pieces, **kwargs)

    # --- language-model scores -------------------------------------------------------------------
    def _dfs_log_probs(self, context: tuple[int, ...]) -> np.ndarray:
        """LM log-probabilities of the lexicon words in DFS order, then </s> and <unk>, after LM ids."""
        cached = self._lookahead_cache.get(context)
        if cached is None:
            if len(self._lookahead_cache) * (len(self._lm_ids) + 2) > _CACHE_FLOATS:
                self._lookahead_cache.clear()
                self._best_cache.clear()
            lp = self.lm.log_probs_ids(context)
            cached = np.append(lp[self._lm_ids], (lp[self.lm.eos], lp[self.lm.unk]))
            self._lookahead_cache[context] = cached
        return cached

    def _next_context(self, context: tuple[int, ...], word: object) -> tuple[int, ...]:
        """The LM context after ``word`` (a lexicon word's DFS index, or a new word's text: ``<unk>``)."""
        if self.lm is None or self.lm.order == 1:
            return ()
        lm_id = int(self._lm_ids[word]) if isinstance(word, int) else self.lm.unk
        return (context + (lm_id,))[1 - self.lm.order :]

    def _new_word_score(self, context: tuple[int, ...]) -> float:
        """Weighted LM log-probability of ``<unk>`` plus the unknown-word penalty."""
        lm = 0.0 if self.lm is None else self.lm_weight * float(self._dfs_log_probs(context)[-1])
        return lm + self.unk_score

    def _lookahead(self, context: tuple[int, ...], node: int, spell: float) -> float:
        """Best LM score the current word can still get (a lexicon word below its trie node, or a new word);
        ``node`` 0: no current word, -1: off the lexicon."""
        if node == 0:
            return 0.0
        best = -math.inf
        if node > 0:
            best = self._best_cache.get((context, node))
            if best is None:
                best = 0.0
                if self.lm is not None:
                    lp = self._dfs_log_probs(context)
                    best = self.lm_weight * float(lp[self.trie.lo[node] : self.trie.hi[node]].max())
                if len(self._best_cache) > _CACHE_ENTRIES:
                    self._best_cache.clear()
                self._best_cache[(context, node)] = best
        if spell > -math.inf:
            best = max(best, self._new_word_score(context) + self.spelling_weight * spell)
        return best

    def _finish_word(
        self, context: tuple[int, ...], partial: tuple, node: int, spell: float, spell_context: tuple
    ) -> tuple[object, float]:
        """The finished current word (DFS index, or its text when new) and its score, or ``(None, -inf)``."""
        if node > 0 and self.trie.word[node] >= 0:
            word = self.trie.word[node]
            if self.lm is None:
                return word, self.word_bonus
            return word, self.lm_weight * float(self._dfs_log_probs(context)[word]) + self.word_bonus
        if spell == -math.inf:
            return None, -math.inf
        text = "".join(self.pieces[t] for t in partial).replace(WORD_MARKER, "")
        if not text:
            return None, -math.inf  # a word-start mark alone is no word
        spell += float(self.spelling_lm.log_probs_ids(spell_context)[self.spelling_lm.eos])
        return text, self._new_word_score(context) + self.spelling_weight * spell + self.word_bonus

    def _end_score(self, context: tuple[int, ...]) -> float:
        if self.lm is None:
            return 0.0
        return self.lm_weight * float(self._dfs_log_probs(context)[-2])

    # --- search --------------------------------------------------------------------------------------
    def decode_one(self, log_probs: np.ndarray) -> list[str]:
        """Best word sequence for one utterance's (T, V) CTC log-probabilities (valid frames only)."""
        trie, blank, neg = self.trie, self.blank_index, -math.inf
        lse = _logaddexp
        speller, spell_ids = self.spelling_lm, self._spell_ids
        spell_k = speller.order - 1 if speller is not None else 0
        root_context = () if self.lm is None or self.lm.order == 1 else (self.lm.bos,)
        # key (finished words, tokens of the current word) ->
        # [0 log p ending in blank, 1 log p ending in a token, 2 last token, 3 LM score of the finished words,
        #  4 trie node of the current word (0: none, -1: off the lexicon), 5 spelling log-prob of the current
        #  word, 6 LM context, 7 spelling-model context, 8 look-ahead]
        beams = {((), ()): [0.0, neg, -1, 0.0, 0, neg, root_context, (), 0.0]}
        for frame in log_probs:
            best = float(frame.max())
            tokens = [int(c) for c in np.nonzero(frame >= best - self.token_prune)[0] if c != blank]
            p_blank = float(frame[blank])
            spell_floor = best - self.spelling_prune
            nxt: dict[tuple, list] = {}
            for key, beam in beams.items():
                pb, pnb, last, lm, node, spell, context, spell_context, _ = beam
                words, partial = key
                total = lse(pb, pnb)
                entry = nxt.get(key)
                if entry is None:
                    entry = nxt[key] = [neg, neg, *beam[2:]]
                entry[0] = lse(entry[0], total + p_blank)
                spell_next = speller.log_probs_ids(spell_context) if spell > neg else None
                for c in tokens:
                    pc = float(frame[c])
                    if c == last:
                        entry[1] = lse(entry[1], pnb + pc)  # repeated token merges into the same prefix
                        source = pb  # the same token again only after a blank
                    else:
                        source = total
                    if source == neg:
                        continue
                    new_words, new_lm, new_context = words, lm, context
                    if c in self.word_start_tokens:
                        if partial:
                            word, score = self._finish_word(context, partial, node, spell, spell_context)
                            if word is None:
                                continue  # the current word is incomplete
                            new_words, new_lm = words + (word,), lm + score
                            new_context = self._next_context(context, word)
                        new_partial = (c,)
                        child = trie.children[0].get(c, -1)
                        new_spell, new_spell_context = neg, ()
                        if c in spell_ids and pc >= spell_floor:
                            sid = spell_ids[c]
                            new_spell = float(speller.log_probs_ids(())[sid])
                            new_spell_context = (sid,) if spell_k else ()
                    else:
                        if not partial:
                            continue  # a word begins with a word-start token
                        new_partial = partial + (c,)
                        child = trie.children[node].get(c, -1) if node > 0 else -1
                        new_spell, new_spell_context = neg, ()
                        if spell_next is not None and c in spell_ids and pc >= spell_floor:
                            sid = spell_ids[c]
                            new_spell = spell + float(spell_next[sid])
                            new_spell_context = (spell_context + (sid,))[-spell_k:] if spell_k else ()
                    if child < 0 and new_spell == neg:
                        continue
                    new_key = (new_words, new_partial)
                    target = nxt.get(new_key)
                    if target is None:
                        lookahead = self._lookahead(new_context, child, new_spell)
                        target = nxt[new_key] = [
                            neg, neg, c, new_lm, child, new_spell, new_context, new_spell_context, lookahead,
                        ]  # fmt: skip
                    target[1] = lse(target[1], source + pc)
            beams = dict(
                heapq.nlargest(
                    self.beam_size, nxt.items(), key=lambda kv: lse(kv[1][0], kv[1][1]) + kv[1][3] + kv[1][8]
                )
            )
        # the best hypothesis whose last word is complete; when every beam ends inside a word, the best one
        # with that unfinished word left out (rather than no words at all)
        best_words, best_score, best_cut, cut_score = (), neg, (), neg
        for (words, partial), (pb, pnb, _, lm, node, spell, context, spell_context, _) in beams.items():
            if partial:
                word, score = self._finish_word(context, partial, node, spell, spell_context)
                if word is None:
                    score = lse(pb, pnb) + lm + self._end_score(context)
                    if score > cut_score:
                        best_cut, cut_score = words, score
                    continue
                lm += score
                words = words + (word,)
                context = self._next_context(context, word)
            score = lse(pb, pnb) + lm + self._end_score(context)
            if score > best_score:
                best_words, best_score = words, score
        if best_score == neg:
            best_words = best_cut
        return [trie.words[w] if isinstance(w, int) else w for w in best_words]

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
