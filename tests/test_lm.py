"""lobes.lm: ARPA files written and read back, read by KenLM (the independent reference), malformed files."""

import math

import numpy as np
import pytest

from lobes.lm import ArpaError, NgramLM, WordNgramLM, read_arpa

SENTENCES = ["THE DOG SAW THE CAT", "THE CAT SAW A DOG", "A DOG RAN", "THE CAT RAN AWAY", "A CAT SAW THE DOG"]
CONTEXTS = [(), ("THE",), ("SAW", "THE"), ("RAN", "AWAY", "A"), ("UNSEEN",), ("DOG", "UNSEEN"), ("<s>", "A")]


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("suffix", [".arpa", ".arpa.gz"])
def test_arpa_round_trip(tmp_path, order, suffix):
    lm = WordNgramLM(SENTENCES, order=order, vocabulary=["ZEBRA"])
    again = read_arpa(lm.write_arpa(tmp_path / f"lm{suffix}"))
    assert again.words == lm.words and again.order == order
    for context in CONTEXTS:
        np.testing.assert_allclose(again.log_probs(context), lm.log_probs(context), rtol=0, atol=1e-7)
    assert again.sentence_log_prob("THE ZEBRA RAN") == pytest.approx(lm.sentence_log_prob("THE ZEBRA RAN"))
    # and once more: the second file is the first one
    assert again.write_arpa(tmp_path / f"again{suffix}").read_bytes() == (tmp_path / f"lm{suffix}").read_bytes()


def test_kenlm_reads_our_arpa_files_the_same(tmp_path):
    """flashlight-text's KenLM scores every word of a sentence as our model does (log10, float32)."""
    kenlm = pytest.importorskip("flashlight.lib.text.decoder.kenlm")
    from flashlight.lib.text.dictionary import Dictionary

    lm = WordNgramLM(SENTENCES, order=3)
    path = lm.write_arpa(tmp_path / "lm.arpa")
    vocab = Dictionary()
    for word in lm.words + ["</s>", "<unk>", "<s>"]:
        vocab.add_entry(word)
    reference = kenlm.KenLM(str(path), vocab)
    state, context = reference.start(False), []
    for word in "THE CAT SAW A DOG RAN UNSEEN THE".split() + ["</s>"]:
        if word == "</s>":
            state, expected = reference.finish(state)
        else:
            state, expected = reference.score(state, vocab.get_index(word if word in lm.index else "<unk>"))
        ours = lm.log_probs(tuple(context[-2:]))[lm.index.get(word, lm.unk)] / math.log(10)
        assert ours == pytest.approx(expected, abs=2e-6), word
        context.append(word)


def test_back_off_rule_on_a_file_written_by_hand(tmp_path):
    text = """
\\data\\
ngram 1=4
ngram 2=2

\\1-grams:
-1.0\t<s>\t-0.5
-0.5\tA\t-0.25
-0.5\t</s>
-1.0\tB
\\2-grams:
-0.1\t<s> A
-0.2\tA B

\\end\\
"""
    (tmp_path / "hand.arpa").write_text(text)
    lm = read_arpa(tmp_path / "hand.arpa")
    assert isinstance(lm, NgramLM) and lm.words == ["A", "B"]
    ln10 = math.log(10)
    assert lm.log_probs(())[lm.index["A"]] == pytest.approx(-0.1 * ln10)  # listed bigram after <s>
    assert lm.log_probs(())[lm.index["B"]] == pytest.approx((-0.5 - 1.0) * ln10)  # back-off(<s>) * p(B)
    assert lm.log_probs(("A",))[lm.index["B"]] == pytest.approx(-0.2 * ln10)
    assert lm.log_probs(("A",))[lm.eos] == pytest.approx((-0.25 - 0.5) * ln10)
    assert lm.log_probs(("B",))[lm.eos] == pytest.approx(-0.5 * ln10)  # B has no back-off weight: 1
    # no <unk> in the file: it gets the smallest unigram probability
    assert lm.log_probs(("B",))[lm.unk] == pytest.approx(-1.0 * ln10)


GOOD_HEADER = "\\data\\\nngram 1=2\nngram 2=1\n\n\\1-grams:\n-0.3\tA\t-0.1\n-0.3\t</s>\n\n\\2-grams:\n-0.2\tA </s>\n\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no '\\\\data\\\\' line"),
        ("just some text\n", "no '\\\\data\\\\' line"),
        ("\\data\\\nngram one=2\n", ":2: expected 'ngram N=COUNT'"),
        ("\\data\\\nngram 2=1\n\n", "ngram N=COUNT' for N = 1, 2"),
        (GOOD_HEADER, "ends before '\\\\end\\\\'"),
        (GOOD_HEADER.replace("-0.2\tA </s>", "-0.2\tA"), ":10: expected a 2-gram line"),
        (GOOD_HEADER.replace("-0.3\tA\t-0.1", "minus\tA"), ":6: expected numbers"),
        (GOOD_HEADER.replace("-0.3\tA\t-0.1", "0.3\tA"), ":6: expected a log10 probability <= 0"),
        (GOOD_HEADER.replace("ngram 1=2", "ngram 1=3") + "\\end\\\n", "announces 3 1-grams; the file lists 2"),
        (GOOD_HEADER.replace("A </s>", "C </s>") + "\\end\\\n", "word 'C' is not a unigram"),
        (GOOD_HEADER.replace("-0.3\t</s>\n", "-0.3\tB\n") + "\\end\\\n", "do not list </s>"),
        (GOOD_HEADER.replace("\\2-grams:", "\\3-grams:") + "\\end\\\n", "expected '\\\\2-grams:'"),
    ],
)
def test_malformed_arpa_files_are_refused_with_the_line(tmp_path, text, message):
    path = tmp_path / "bad.arpa"
    path.write_text(text)
    with pytest.raises(ArpaError, match=message) as info:
        read_arpa(path)
    assert str(path) in str(info.value)


def test_not_a_text_file_and_no_file(tmp_path):
    path = tmp_path / "binary.arpa"
    path.write_bytes(b"\x1f\x8b\x08\x00garbage")  # gzip magic, then nonsense
    with pytest.raises(ArpaError, match="not an ARPA text file"):
        read_arpa(path)
    (tmp_path / "latin1.arpa").write_bytes(b"\\data\\\n\xff\xfe\n")
    with pytest.raises(ArpaError, match="not an ARPA text file"):
        read_arpa(tmp_path / "latin1.arpa")
    with pytest.raises(FileNotFoundError, match="no such ARPA file"):
        read_arpa(tmp_path / "missing.arpa")


def test_the_header_may_run_into_the_first_section(tmp_path):
    path = tmp_path / "tight.arpa"
    path.write_text(GOOD_HEADER.replace("ngram 2=1\n\n", "ngram 2=1\n") + "\\end\\\n")
    assert read_arpa(path).order == 2
