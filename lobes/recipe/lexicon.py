"""The ASR recipe's test-time decoder: a CTC beam search over the training words and new words, with a word LM.

Example
-------
>>> decoder = TranscriptLexiconDecoder(lm_order=3, spelling_order=4, beam_size=16)
>>> decoder.decoder is None  # until fit(sp, transcripts)
True
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["TranscriptLexiconDecoder"]


class TranscriptLexiconDecoder:
    """A :class:`lobes.decoding.CTCLexiconDecoder` whose lexicon, word LM and spelling model come from the
    training transcripts (or whose word LM is an ARPA file).

    Built in the YAML with the decoding settings; ``train.py`` gives it the tokenizer and the transcripts with
    :meth:`fit` once they exist, then calls it like the decoder: ``decoder(log_probs, lengths)``.

    Arguments
    ---------
    lm_order : int
        Order of the word n-gram LM estimated on the transcripts (0: lexicon only, no LM).
    spelling_order : int
        Order of the n-gram model over the tokens of a word that spells words absent from the lexicon
        (0: closed vocabulary, only lexicon words).
    lm_path : str, optional
        An ARPA file (plain or ``.gz``, e.g. LibriSpeech's ``3-gram.arpa.gz``) to use as the word LM instead;
        the lexicon is then its words that the tokenizer can spell.
    **decoder_options
        Passed to ``CTCLexiconDecoder`` (``lm_weight``, ``word_bonus``, ``unk_score``, ``spelling_weight``,
        ``beam_size``, ``blank_index``, ...).

    Example
    -------
    >>> import io, sentencepiece as spm
    >>> model = io.BytesIO()
    >>> spm.SentencePieceTrainer.train(sentence_iterator=iter(["A B", "AB BA"]), model_writer=model, vocab_size=6,
    ...     model_type="char", bos_id=-1, eos_id=-1, unk_id=0, minloglevel=2)
    >>> sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    >>> decoder = TranscriptLexiconDecoder(lm_order=2, beam_size=4).fit(sp, ["A B", "AB BA"])
    >>> sorted(decoder.decoder.trie.words)
    ['A', 'AB', 'B', 'BA']
    """

    def __init__(self, lm_order: int = 3, spelling_order: int = 0, lm_path: str | None = None, **decoder_options):
        if lm_order < 0:
            raise ValueError(f"lm_order must be >= 0 (0: no LM); got {lm_order}")
        if spelling_order < 0:
            raise ValueError(f"spelling_order must be >= 0 (0: closed vocabulary); got {spelling_order}")
        if lm_path and not Path(lm_path).is_file():
            raise FileNotFoundError(
                f"lm_path {lm_path}: no such file; expected an ARPA language model (.arpa or .arpa.gz)"
            )
        self.lm_order = int(lm_order)
        self.spelling_order = int(spelling_order)
        self.lm_path = str(lm_path) if lm_path else None
        self.decoder_options = decoder_options
        self.decoder = None

    def fit(self, sp, transcripts) -> TranscriptLexiconDecoder:
        """Build the lexicon (spelled by the SentencePiece processor ``sp``), the LM and the spelling model from
        ``transcripts`` (or read the LM from ``lm_path``).

        Raises
        ------
        lobes.lm.ArpaError
            ``lm_path`` is not a well-formed ARPA file.
        """
        from lobes.decoding import CTCLexiconDecoder

        self.decoder = CTCLexiconDecoder.from_sentencepiece(
            sp,
            transcripts,
            lm_order=self.lm_order,
            lm_path=self.lm_path,
            spelling_order=self.spelling_order,
            **self.decoder_options,
        )
        return self

    def __call__(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[str]]:
        """Words per utterance from ``(B, T, V)`` CTC log-probabilities and ``(B,)`` valid frame counts."""
        if self.decoder is None:
            raise RuntimeError("TranscriptLexiconDecoder has no lexicon yet: call fit(sp, transcripts) first")
        return self.decoder(log_probs, lengths)
