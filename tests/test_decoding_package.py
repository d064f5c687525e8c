"""Pretrained folders carry the open-vocabulary decoder and a run's own ARPA word LM (``lm_path``)."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from lobes.checkpoints import COMPLETE_MARKER

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = ["THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG", "PACK MY BOX WITH FIVE DOZEN LIQUOR JUGS"] * 5


def _run(folder: Path, decoder: str) -> Path:
    """A run folder (1-layer small preset, random weights, char tokenizer) whose YAML has ``decoder``."""
    import sentencepiece as spm
    from hyperpyyaml import load_hyperpyyaml, resolve_references

    run = folder / "run"
    save = run / "save"
    (save / "CKPT+test").mkdir(parents=True)
    with open(ROOT / "hparams" / "hyperconformer_small.yaml") as f:
        preset = resolve_references(f, {"num_encoder_layers": 1}).getvalue()
    text = (
        "sample_rate: 16000\nblank_index: 0\n"
        + decoder
        + "preset:\n"
        + "".join(f"    {line}\n" for line in preset.splitlines())
        + "model: !ref <preset[model]>\n"
    )
    text = resolve_references(text).getvalue()  # as a run writes it
    (run / "hyperparams.yaml").write_text(text)
    torch.manual_seed(0)
    model = load_hyperpyyaml(text)["model"]
    torch.save(model.state_dict(), save / "CKPT+test" / "model.ckpt")
    (save / "CKPT+test" / COMPLETE_MARKER).touch()
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES),
        model_writer=buffer,
        vocab_size=31,
        model_type="char",
        bos_id=-1,
        eos_id=-1,
        unk_id=0,
        minloglevel=2,
    )
    (save / "40_char.model").write_bytes(buffer.getvalue())
    (save / "train.txt").write_text("\n".join(SENTENCES) + "\n")
    return run


def test_open_vocabulary_decoder_in_the_pretrained_folder(tmp_path):
    from lobes.inference import Transcriber
    from lobes.inference.asr import package_asr_run

    decoder = (
        "test_decoder: !new:lobes.recipe.TranscriptLexiconDecoder\n"
        "    lm_order: 2\n    spelling_order: 3\n    unk_score: 2.5\n    beam_size: 4\n"
    )
    folder = package_asr_run(_run(tmp_path, decoder), tmp_path / "pretrained")
    assert not (folder / "word_lm.ckpt").exists()
    transcriber = Transcriber.from_pretrained(folder, device="cpu")
    beam = transcriber.beam_decoder
    assert beam.spelling_lm is not None and beam.spelling_lm.order == 3 and beam.unk_score == 2.5
    assert sorted(beam.trie.words) == sorted({w for s in SENTENCES for w in s.split()})
    assert "new words spelled" in (folder / "README.md").read_text()
    result = transcriber.transcribe(np.random.default_rng(0).normal(size=8000).astype(np.float32) * 0.1, 16000, "beam")
    assert [w.word for w in result.words] == result.text.split()


def test_a_runs_arpa_file_travels_with_the_folder(tmp_path):
    from lobes.inference import Transcriber
    from lobes.inference.asr import package_asr_run
    from lobes.inference.pretrained import PretrainedError
    from lobes.lm import WordNgramLM

    arpa = WordNgramLM(["THE LAZY FOX", "A QUICK DOG JUMPS", "THE DOG"], order=3).write_arpa(tmp_path / "user.arpa.gz")
    decoder = f"test_decoder: !new:lobes.recipe.TranscriptLexiconDecoder\n    lm_path: {arpa}\n    spelling_order: 3\n"
    run = _run(tmp_path, decoder)
    folder = package_asr_run(run, tmp_path / "pretrained")
    assert (folder / "word_lm.ckpt").read_bytes() == arpa.read_bytes()
    assert str(arpa) not in (folder / "hyperparams.yaml").read_text()  # the folder does not need the original
    arpa.rename(tmp_path / "moved.arpa.gz")
    beam = Transcriber.from_pretrained(folder, device="cpu").beam_decoder
    assert sorted(beam.trie.words) == ["A", "DOG", "FOX", "JUMPS", "LAZY", "QUICK", "THE"]  # the LM's words
    assert beam.lm.order == 3
    from speechbrain.inference.interfaces import foreign_class

    asr = foreign_class(
        source=str(folder), pymodule_file="custom.py", classname="CustomInterface", savedir=str(tmp_path / "sb")
    )
    assert sorted(asr.beam.trie.words) == sorted(beam.trie.words) and asr.beam.spelling_lm.order == 3
    with pytest.raises(PretrainedError, match="lm_path"):  # the file is gone: refused before anything is written
        package_asr_run(run, tmp_path / "again")
