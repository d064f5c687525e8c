"""lobes.decoding: Kneser-Ney word n-gram LM and the CTC lexicon beam search (checked against exhaustive search)."""

import itertools
import math

import numpy as np
import pytest
import torch

from lobes.decoding import CTCLexiconDecoder, WordNgramLM, spelling_lm

SENTENCES = ["THE DOG SAW THE CAT", "THE CAT SAW A DOG", "A DOG RAN", "THE CAT RAN AWAY", "A CAT SAW THE DOG"]


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_lm_distributions_sum_to_one(order):
    lm = WordNgramLM(SENTENCES, order=order)
    for context in [(), ("THE",), ("SAW", "THE"), ("RAN", "AWAY", "A"), ("UNSEEN",), ("DOG", "UNSEEN")]:
        p = np.exp(lm.log_probs(context))
        assert p.shape == (len(lm.words) + 2,)  # words, </s>, <unk>
        assert abs(p.sum() - 1.0) < 1e-9
        assert (p > 0).all()


def test_lm_bigram_by_hand():
    lm = WordNgramLM(["THE DOG SAW THE CAT", "THE CAT SAW THE DOG"], order=2, discount=0.5)
    # continuation counts: THE {<s>, SAW}, DOG {THE}, CAT {THE}, SAW {DOG, CAT}, </s> {CAT, DOG}: 8 in all
    # unigram: max(N - D, 0) / 8 + D * 5 / 8 * uniform(1 / 6: 4 words, </s>, <unk>)
    uniform = 0.5 * 5 / 8 / 6
    p_uni = {"THE": 1.5 / 8 + uniform, "DOG": 0.5 / 8 + uniform, "SAW": 1.5 / 8 + uniform}
    # after THE: DOG 2, CAT 2 (total 4, 2 types)
    p = np.exp(lm.log_probs(("THE",)))
    assert p[lm.index["DOG"]] == pytest.approx(1.5 / 4 + 0.5 * 2 / 4 * p_uni["DOG"])
    assert p[lm.index["SAW"]] == pytest.approx(0.5 * 2 / 4 * p_uni["SAW"])
    # an unseen context falls back to the unigram level
    assert np.exp(lm.log_probs(("CAT", "UNSEEN"))[lm.index["THE"]]) == pytest.approx(p_uni["THE"])
    assert np.exp(lm.log_probs(("CAT", "UNSEEN"))[lm.unk]) == pytest.approx(uniform)
    # the sentence start is a context of its own (raw counts: THE starts both sentences)
    assert np.exp(lm.log_probs(())[lm.index["THE"]]) == pytest.approx(1.5 / 2 + 0.5 * 1 / 2 * p_uni["THE"])
    assert lm.sentence_log_prob("THE DOG SAW THE CAT") > lm.sentence_log_prob("CAT THE SAW DOG THE")


def test_lm_bad_arguments():
    with pytest.raises(ValueError, match="order"):
        WordNgramLM(SENTENCES, order=0)
    with pytest.raises(ValueError, match="discount"):
        WordNgramLM(SENTENCES, discount=1.0)
    with pytest.raises(ValueError, match="non-empty"):
        WordNgramLM(["", " "])


# Tiny token set: 0 blank, 1 "|" (starts every word), 2.. letters
LETTERS = "ABCD"
LEXICON = ["AB", "ABC", "BA", "C", "DD"]


def _spell(word):
    return [1] + [2 + LETTERS.index(ch) for ch in word]


def _ctc_log_likelihood(log_probs, tokens):
    """log p(tokens | log_probs) by torch's CTC loss (the independent reference)."""
    lp = torch.from_numpy(log_probs).unsqueeze(1)  # (T, 1, V)
    target = torch.tensor([tokens])
    loss = torch.nn.functional.ctc_loss(
        lp,
        target,
        torch.tensor([lp.shape[0]]),
        torch.tensor([len(tokens)]),
        blank=0,
        reduction="sum",
        zero_infinity=False,
    )
    return -float(loss)


def _exhaustive(log_probs, lm, lm_weight, word_bonus, max_words=4):
    best, best_score = None, -math.inf
    for n in range(0, max_words + 1):  # 4 words of 2 tokens fill the 9 frames; 5 cannot fit
        for words in itertools.product(LEXICON, repeat=n):
            tokens = [t for w in words for t in _spell(w)]
            acoustic = _ctc_log_likelihood(log_probs, tokens) if tokens else float(log_probs[:, 0].sum())
            if not math.isfinite(acoustic):
                continue
            lm_score = 0.0 if lm is None else lm.sentence_log_prob(" ".join(words))
            score = acoustic + lm_weight * lm_score + word_bonus * n
            if score > best_score:
                best, best_score = list(words), score
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("with_lm", [False, True])
def test_unpruned_search_equals_exhaustive_search(seed, with_lm):
    rng = np.random.default_rng(seed)
    T, V = 9, 2 + len(LETTERS)
    logits = rng.normal(size=(T, V)) * 2.0
    log_probs = (logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)).astype(np.float64)
    lm = WordNgramLM(["AB C", "BA DD AB", "C C", "ABC BA"], order=2) if with_lm else None
    lm_weight, word_bonus = (0.8, 1.5) if with_lm else (0.0, 0.7)
    dec = CTCLexiconDecoder(
        {w: _spell(w) for w in LEXICON},
        [1],
        lm=lm,
        beam_size=10_000,
        lm_weight=lm_weight,
        word_bonus=word_bonus,
        token_prune=math.inf,
    )
    expected = _exhaustive(log_probs, lm, lm_weight, word_bonus)
    assert dec.decode_one(log_probs) == expected


def test_batched_call_and_lexicon_constraint():
    dec = CTCLexiconDecoder({w: _spell(w) for w in LEXICON}, [1], beam_size=8)
    # greedy path spells |A B D: "ABD" is not a word; the search must return lexicon words only
    frames = [1, 2, 3, 5, 0]
    probs = np.full((len(frames), 6), 0.02)
    for t, tok in enumerate(frames):
        probs[t, tok] = 0.9
    probs[2, 4] = 0.06  # C is a weaker second choice at the third frame
    lp = torch.from_numpy(np.log(probs / probs.sum(1, keepdims=True))).float()
    padded = torch.cat([lp, torch.zeros(3, 6)]).unsqueeze(0).repeat(2, 1, 1)
    hyps = dec(padded, torch.tensor([5, 2]))
    assert all(w in LEXICON for h in hyps for w in h)
    assert hyps[0] in (["AB"], ["ABC"])
    # the second utterance has 2 valid frames (the padding would favour anything): "|A" is not a word,
    # "|C" is the only lexicon word that fits
    assert hyps[1] == ["C"]


def test_language_model_breaks_acoustic_ties():
    # the acoustics cannot tell "AB" from "BA" at the second word; the LM has only seen "C AB"
    spell = {w: _spell(w) for w in LEXICON}
    lm = WordNgramLM(["C AB", "C AB", "BA C", "ABC DD"], order=2)
    frames = np.full((6, 6), 1e-3)
    frames[0, 1], frames[1, 4], frames[2, 1] = 1, 1, 1
    frames[3, 2] = frames[3, 3] = 0.5
    frames[4, 2] = frames[4, 3] = 0.5
    frames[5, 0] = 1
    lp = np.log(frames / frames.sum(1, keepdims=True))
    with_lm = CTCLexiconDecoder(spell, [1], lm=lm, beam_size=16, lm_weight=1.0, word_bonus=0.0)
    assert with_lm.decode_one(lp) == ["C", "AB"]


def test_from_sentencepiece(tmp_path):
    import sentencepiece as spm

    text = tmp_path / "text.txt"
    text.write_text("\n".join(SENTENCES * 4))
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(tmp_path / "m"),
        vocab_size=16,
        hard_vocab_limit=False,
        model_type="char",
        character_coverage=1.0,
        bos_id=-1,
        eos_id=-1,
        unk_id=0,
    )
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "m.model"))
    dec = CTCLexiconDecoder.from_sentencepiece(sp, SENTENCES, lm_order=2, beam_size=8)
    assert sorted(dec.trie.words) == sorted({w for s in SENTENCES for w in s.split()})
    # a clean one-hot path for a training sentence decodes to it
    ids = sp.encode_as_ids("THE CAT RAN")
    frames = []
    for i, tok in enumerate(ids):
        frames += [tok] if i == 0 or ids[i - 1] != tok else [0, tok]
    lp = np.full((len(frames), sp.get_piece_size()), -12.0)
    lp[np.arange(len(frames)), frames] = 0.0
    assert dec.decode_one(lp) == ["THE", "CAT", "RAN"]


def test_bad_lexicons_and_inputs():
    spell = {w: _spell(w) for w in LEXICON}
    with pytest.raises(ValueError, match="empty"):
        CTCLexiconDecoder({}, [1])
    with pytest.raises(ValueError, match="word-start token"):
        CTCLexiconDecoder({"AB": [2, 3]}, [1])
    with pytest.raises(ValueError, match="no tokens"):
        CTCLexiconDecoder({"AB": []}, [1])
    with pytest.raises(ValueError, match="same token spelling"):
        CTCLexiconDecoder({"AB": [1, 2, 3], "ab": [1, 2, 3]}, [1])
    with pytest.raises(ValueError, match="missing from the language model"):
        CTCLexiconDecoder(spell, [1], lm=WordNgramLM(["AB C"], order=2))
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        CTCLexiconDecoder(spell, [1])(torch.zeros(5, 6), torch.tensor([5]))


# --- open vocabulary: lexicon words, or new words spelled token by token -------------------------------
PIECES = ["<blank>", "\u2581"] + list(LETTERS)  # token 1 starts every word
SPELLER_WORDS = ["AB", "ABC", "BA", "CAB", "DAD"]


def _speller(order=3):
    return spelling_lm([["\u2581"] + list(w) for w in SPELLER_WORDS], order=order)


def _open_score(words, lm, speller, lm_weight, word_bonus, unk_score, spelling_weight):
    """The open decoder's LM score of a word sequence, computed independently of the search."""
    context, score = ["<s>"], 0.0
    for word in words:
        h = tuple(context[len(context) - lm.order + 1 :]) if lm.order > 1 else ()
        if word in LEXICON:
            score += lm_weight * float(lm.log_probs(h)[lm.index[word]])
        else:
            score += lm_weight * float(lm.log_probs(h)[lm.unk]) + unk_score
            score += spelling_weight * speller.sentence_log_prob(" ".join(["\u2581"] + list(word)))
        score += word_bonus
        context.append(word if word in LEXICON else "<unk>")
    h = tuple(context[len(context) - lm.order + 1 :]) if lm.order > 1 else ()
    return score + lm_weight * float(lm.log_probs(h)[lm.eos])


@pytest.mark.parametrize("seed", range(8))
def test_open_vocabulary_search_equals_exhaustive_search(seed):
    """Unpruned, the open search finds the best of every token sequence that fits the frames."""
    rng = np.random.default_rng(seed)
    T, V = 6, 2 + len(LETTERS)
    logits = rng.normal(size=(T, V)) * 2.0
    logits[:, 1] += 1.0  # more word starts, so that several words fit
    log_probs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    lm = WordNgramLM(["AB C", "BA DD AB", "C C", "ABC BA"], order=2)
    speller = _speller()
    options = dict(lm_weight=0.8, word_bonus=1.5, unk_score=3.0, spelling_weight=0.5)
    dec = CTCLexiconDecoder(
        {w: _spell(w) for w in LEXICON},
        [1],
        lm=lm,
        beam_size=100_000,
        token_prune=math.inf,
        spelling_prune=math.inf,
        spelling_lm=speller,
        pieces=PIECES,
        **options,
    )
    best, best_score = None, -math.inf
    for n in range(1, T + 1):
        for tokens in itertools.product(range(1, V), repeat=n):
            if tokens[0] != 1 or any(a == 1 and b == 1 for a, b in zip(tokens, tokens[1:])) or tokens[-1] == 1:
                continue  # every word has a letter
            acoustic = _ctc_log_likelihood(log_probs, list(tokens))
            if not math.isfinite(acoustic):
                continue
            words = "".join(PIECES[t] for t in tokens).split("\u2581")[1:]
            score = acoustic + _open_score(words, lm, speller, **options)
            if score > best_score:
                best, best_score = words, score
    empty = float(log_probs[:, 0].sum()) + options["lm_weight"] * float(lm.log_probs(())[lm.eos])
    if empty > best_score:
        best = []
    assert dec.decode_one(log_probs) == best


def _sentencepiece_char(tmp_path, sentences):
    import sentencepiece as spm

    text = tmp_path / "text.txt"
    text.write_text("\n".join(sentences * 4))
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(tmp_path / "m"),
        vocab_size=40,
        hard_vocab_limit=False,
        model_type="char",
        character_coverage=1.0,
        bos_id=-1,
        eos_id=-1,
        unk_id=0,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_file=str(tmp_path / "m.model"))


def _posterior(sp, sentence, peak=0.9, seed=0):
    """CTC log-probs whose best path spells ``sentence`` (a blank between tokens), with random runner-ups."""
    rng = np.random.default_rng(seed)
    frames = []
    for tok in sp.encode_as_ids(sentence):
        frames += [tok, 0]
    V = sp.get_piece_size()
    probs = rng.dirichlet(np.ones(V), size=len(frames)) * (1 - peak)
    probs[np.arange(len(frames)), frames] += peak
    return np.log(probs)


def test_open_vocabulary_emits_an_unseen_word(tmp_path):
    training = SENTENCES + ["THE DOG RAN"]
    sp = _sentencepiece_char(tmp_path, training + ["WOLF"])  # F: a letter of no training word
    closed = CTCLexiconDecoder.from_sentencepiece(sp, training, lm_order=2, beam_size=16, lm_weight=1.0)
    opened = CTCLexiconDecoder.from_sentencepiece(
        sp, training, lm_order=2, spelling_order=3, beam_size=16, lm_weight=1.0, unk_score=-2.0
    )
    assert "WOLF" not in opened.trie.words
    seen = _posterior(sp, "THE CAT SAW THE DOG")
    assert closed.decode_one(seen) == opened.decode_one(seen) == "THE CAT SAW THE DOG".split()
    new = _posterior(sp, "THE WOLF SAW THE CAT", peak=0.995)  # clear acoustics
    assert opened.decode_one(new) == "THE WOLF SAW THE CAT".split()
    assert closed.decode_one(new) != "THE WOLF SAW THE CAT".split()  # the closed lexicon cannot spell it


@pytest.mark.parametrize("seed", range(4))
def test_open_vocabulary_with_a_prohibitive_penalty_is_the_closed_search(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(12, 2 + len(LETTERS))) * 2.0
    log_probs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    lm = WordNgramLM(["AB C", "BA DD AB", "C C", "ABC BA"], order=3)
    spell = {w: _spell(w) for w in LEXICON}
    closed = CTCLexiconDecoder(spell, [1], lm=lm, beam_size=8)
    opened = CTCLexiconDecoder(spell, [1], lm=lm, beam_size=8, spelling_lm=_speller(), pieces=PIECES, unk_score=-1e6)
    assert opened.decode_one(log_probs) == closed.decode_one(log_probs)


def _sentencepiece_bpe(tmp_path, sentences):
    import sentencepiece as spm

    text = tmp_path / "bpe.txt"
    text.write_text("\n".join(sentences * 4))
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(tmp_path / "bpe"),
        vocab_size=40,
        model_type="bpe",
        character_coverage=1.0,
        bos_id=-1,
        eos_id=-1,
        unk_id=0,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_file=str(tmp_path / "bpe.model"))


def test_open_vocabulary_with_subword_tokens(tmp_path):
    training = SENTENCES + ["THE DOG RAN"]
    sp = _sentencepiece_bpe(tmp_path, training + ["WOLF"])
    assert sp.encode_as_pieces("WOLF") == ["\u2581WOLF"]  # a piece no lexicon word has
    opened = CTCLexiconDecoder.from_sentencepiece(
        sp, training, lm_order=2, spelling_order=3, beam_size=16, lm_weight=1.0, unk_score=1.0
    )
    seen = _posterior(sp, "THE CAT SAW THE DOG")
    assert opened.decode_one(seen) == "THE CAT SAW THE DOG".split()
    new = _posterior(sp, "THE WOLF SAW THE CAT", peak=0.995)
    assert opened.decode_one(new) == "THE WOLF SAW THE CAT".split()


def test_transcript_decoder_settings_and_arpa_files(tmp_path):
    from lobes.lm import ArpaError
    from lobes.recipe import TranscriptLexiconDecoder

    sp = _sentencepiece_char(tmp_path, SENTENCES)
    fitted = TranscriptLexiconDecoder(lm_order=2, spelling_order=3, unk_score=1.5, beam_size=4).fit(sp, SENTENCES)
    assert fitted.decoder.spelling_lm.order == 3 and fitted.decoder.unk_score == 1.5 and fitted.decoder.lm.order == 2
    closed = TranscriptLexiconDecoder(lm_order=2).fit(sp, SENTENCES)
    assert closed.decoder.spelling_lm is None
    arpa = WordNgramLM(["A CAT", "THE DOG RAN AWAY"], order=2).write_arpa(tmp_path / "user.arpa")
    own = TranscriptLexiconDecoder(lm_path=str(arpa), spelling_order=3).fit(sp, SENTENCES)
    assert sorted(own.decoder.trie.words) == ["A", "AWAY", "CAT", "DOG", "RAN", "THE"]  # the LM's words
    with pytest.raises(FileNotFoundError, match="lm_path .*missing.arpa: no such file"):
        TranscriptLexiconDecoder(lm_path=str(tmp_path / "missing.arpa"))
    (tmp_path / "bad.arpa").write_text("\\data\\\nngram 1=2\n\n\\1-grams:\n-0.5 A\n")
    with pytest.raises(ArpaError, match=r"bad.arpa: the file ends before"):
        TranscriptLexiconDecoder(lm_path=str(tmp_path / "bad.arpa")).fit(sp, SENTENCES)
    with pytest.raises(ValueError, match="spelling_order"):
        TranscriptLexiconDecoder(spelling_order=-1)
