"""The ASR recipe's test-time decoder: a lexicon + word-LM CTC beam search built from the training transcripts.

Example
-------
>>> decoder = TranscriptLexiconDecoder(lm_order=3, beam_size=16)
>>> decoder.decoder is None  # until fit(sp, transcripts)
True
"""

from __future__ import annotations

import torch

__all__ = ["TranscriptLexiconDecoder"]


class TranscriptLexiconDecoder:
    """A :class:`lobes.decoding.CTCLexiconDecoder` whose lexicon and word LM come from the training transcripts.

    Built in the YAML with the decoding settings; ``train.py`` gives it the tokenizer and the transcripts with
    :meth:`fit` once they exist, then calls it like the decoder: ``decoder(log_probs, lengths)``.

    Arguments
    ---------
    lm_order : int
        Order of the word n-gram LM (0: lexicon only, no LM).
    **decoder_options
        Passed to ``CTCLexiconDecoder`` (``lm_weight``, ``word_bonus``, ``beam_size``, ``blank_index``, ...).

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

    def __init__(self, lm_order: int = 3, **decoder_options):
        if lm_order < 0:
            raise ValueError(f"lm_order must be >= 0 (0: no LM); got {lm_order}")
        self.lm_order = int(lm_order)
        self.decoder_options = decoder_options
        self.decoder = None

    def fit(self, sp, transcripts) -> TranscriptLexiconDecoder:
        """Build the lexicon (spelled by the SentencePiece processor ``sp``) and the LM from ``transcripts``."""
        from lobes.decoding import CTCLexiconDecoder

        self.decoder = CTCLexiconDecoder.from_sentencepiece(
            sp, transcripts, lm_order=self.lm_order, **self.decoder_options
        )
        return self

    def __call__(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[str]]:
        """Words per utterance from ``(B, T, V)`` CTC log-probabilities and ``(B,)`` valid frame counts."""
        if self.decoder is None:
            raise RuntimeError("TranscriptLexiconDecoder has no lexicon yet: call fit(sp, transcripts) first")
        return self.decoder(log_probs, lengths)
