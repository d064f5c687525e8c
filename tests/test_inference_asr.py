"""Pretrained ASR folders: packaging a tiny recipe run, loading it with speechbrain (same and new process,
EncoderASR and foreign_class) and with Transcriber, the recipe's own greedy / beam words, timestamps, windows
for long audio, sample rates, and clear errors for broken folders."""

import csv
import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from _builders import RATE, ROOT, asr_recipe_args, letter_tone_corpus, run_asr_recipe
from torch import nn

from lobes.inference.pretrained import PretrainedError
from lobes.inference.sources import audio_sources


# --------------------------------------------------------------------------------------------------------------
# A tiny trained run (shared by the test files of this area through the session's temporary folder)
# --------------------------------------------------------------------------------------------------------------
def tiny_run(tmp_path_factory) -> Path:
    """A finished recipe run (CSV tone corpus, 1-layer HyperConformer, lexicon + LM test decoder), made once per
    test session."""
    base = tmp_path_factory.getbasetemp() / "tiny_asr"
    out = base / "run"
    if (out / "test_wer.txt").exists():
        return out
    corpus = letter_tone_corpus(base / "tones", test_size=6)
    run_asr_recipe(asr_recipe_args(corpus, out, 20), timeout=600)
    return out


def tiny_pretrained(tmp_path_factory) -> Path:
    """The tiny run packaged (once per session)."""
    from lobes.inference.asr import package_asr_run

    out = tmp_path_factory.getbasetemp() / "tiny_asr" / "pretrained"
    if not (out / "package.json").exists():
        package_asr_run(tiny_run(tmp_path_factory), out)
    return out


def test_files(run: Path) -> list[dict]:
    """Rows of the run's test manifest."""
    with open(run.parent / "tones" / "test.csv") as f:
        return list(csv.DictReader(f))


test_files.__test__ = False  # a helper, not a test


def recipe_hypotheses(path: Path) -> dict[str, list[str]]:
    """Words per utterance from speechbrain's ``ErrorRateStats.write_stats`` file the recipe writes."""
    hyps = {}
    for block in path.read_text().split("=" * 80):
        lines = block.strip().splitlines()
        if len(lines) >= 4 and "%WER" in lines[0]:
            hyps[lines[0].split(",")[0]] = [w.strip() for w in lines[3].split(";") if w.strip() not in ("", "<eps>")]
    return hyps


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return tiny_pretrained(tmp_path_factory)


@pytest.fixture(scope="module")
def transcriber(pretrained):
    from lobes.inference import Transcriber

    return Transcriber.from_pretrained(pretrained, device="cpu")


# --------------------------------------------------------------------------------------------------------------
# The folder
# --------------------------------------------------------------------------------------------------------------
def test_folder_layout_weights_only_and_no_paths_of_the_run(run, pretrained):
    names = sorted(p.name for p in pretrained.iterdir())
    assert names == [
        "README.md",
        "custom.py",
        "hyperparams.yaml",
        "model.ckpt",
        "package.json",
        "tokenizer.ckpt",
        "transcripts.ckpt",
    ]
    state = torch.load(pretrained / "model.ckpt", weights_only=True)
    ckpt = next((run / "save").glob("CKPT+*"))
    original = torch.load(ckpt / "model.ckpt", weights_only=True)
    assert list(state) == list(original) and all(torch.equal(state[k], original[k]) for k in state)
    for name in ("hyperparams.yaml", "README.md", "package.json", "custom.py"):
        text = (pretrained / name).read_text()
        assert str(run) not in text and str(run.parent) not in text
    for name in ("hyperparams.yaml", "package.json"):
        assert "optimizer" not in (pretrained / name).read_text() and "augment" not in (pretrained / name).read_text()
    info = json.loads((pretrained / "package.json").read_text())["info"]
    wer_lines = (run / "test_wer.txt").read_text().split()
    assert (
        info["test_wer"]["test"] == float(wer_lines[0])
        and f"{float(wer_lines[0]):.2f} %" in (pretrained / "README.md").read_text()
    )
    assert info["frame_shift"] == 0.04 and info["sample_rate"] == RATE
    # the corpus named from the run's `prepare` entry (a manifest by its file name only)
    assert info["training"]["dataset"] == "the CSV manifest train.csv" and info["training"]["utterances"] == 32
    assert "- training data: the CSV manifest train.csv (32 utterances" in (pretrained / "README.md").read_text()
    with open(run.parent / "tones" / "train.csv") as f:
        assert (pretrained / "transcripts.ckpt").read_text().splitlines() == [r["wrd"] for r in csv.DictReader(f)]


def test_packaging_twice_gives_identical_files(run, pretrained, tmp_path):
    from lobes.inference.asr import package_asr_run

    again = package_asr_run(run, tmp_path / pretrained.name)
    names = sorted(p.name for p in pretrained.iterdir())
    assert sorted(p.name for p in again.iterdir()) == names
    _, mismatch, errors = filecmp.cmpfiles(pretrained, again, names, shallow=False)
    assert mismatch == [] and errors == []
    package_asr_run(run, again)  # replacing an earlier package in place
    assert filecmp.cmpfiles(pretrained, again, names, shallow=False)[1] == []


def test_packaging_errors_name_the_missing_piece(run, tmp_path):
    from lobes.inference.asr import package_asr_run
    from lobes.inputs import UsageError
    from lobes.package import main

    with pytest.raises(UsageError, match="no hyperparams.yaml"):
        package_asr_run(tmp_path, tmp_path / "out")
    broken = tmp_path / "no_ckpt"
    shutil.copytree(run, broken, ignore=shutil.ignore_patterns("CKPT+*"))
    with pytest.raises(PretrainedError, match=r"CKPT\+\*/model.ckpt"):
        package_asr_run(broken, tmp_path / "out")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("keep me")
    with pytest.raises(PretrainedError, match="not a pretrained folder"):
        package_asr_run(run, tmp_path / "user")
    assert (tmp_path / "user" / "notes.txt").read_text() == "keep me"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "hyperparams.yaml").write_text("lr: 0.1\n")
    assert main([str(tmp_path / "other"), str(tmp_path / "out")]) == 2
    assert main([str(run), str(tmp_path / "cli_out")]) == 0 and (tmp_path / "cli_out" / "model.ckpt").exists()


# --------------------------------------------------------------------------------------------------------------
# speechbrain's loaders give the recipe's words
# --------------------------------------------------------------------------------------------------------------
def test_encoder_asr_gives_the_recipes_greedy_words(run, pretrained, tmp_path):
    from speechbrain.inference.ASR import EncoderASR

    asr = EncoderASR.from_hparams(source=str(pretrained), savedir=str(tmp_path / "sb"))
    greedy = recipe_hypotheses(run / "wer_greedy.txt")
    rows = test_files(run)
    assert any(greedy[r["ID"]] for r in rows), "the tiny model should recognise something"
    for row in rows:
        assert asr.transcribe_file(row["wav"]).split() == greedy[row["ID"]]
    waves = [torch.from_numpy(sf.read(r["wav"], dtype="float32")[0]) for r in rows]
    batch = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
    lens = torch.tensor([w.numel() / batch.shape[1] for w in waves])
    texts, _ = asr.transcribe_batch(batch, lens)
    assert [t.split() for t in texts] == [greedy[r["ID"]] for r in rows]
    # a 44.1 kHz stereo file: speechbrain's audio normaliser converts it to the folder's sample_rate
    import torchaudio.functional as AF

    stereo = AF.resample(waves[1], RATE, 44100).numpy()
    sf.write(tmp_path / "stereo.wav", np.stack([stereo, stereo], axis=1), 44100)
    assert asr.transcribe_file(str(tmp_path / "stereo.wav")).split() == greedy[rows[1]["ID"]]


def test_encoder_asr_in_a_new_process(run, pretrained, tmp_path):
    rows = test_files(run)
    code = (
        "import json, sys\nfrom speechbrain.inference.ASR import EncoderASR\n"
        "asr = EncoderASR.from_hparams(source=sys.argv[1], savedir=sys.argv[2])\n"
        "print(json.dumps([asr.transcribe_file(p) for p in sys.argv[3:]]))\n"
    )
    wavs = [r["wav"] for r in rows]
    proc = subprocess.run(
        [sys.executable, "-c", code, str(pretrained), str(tmp_path / "sb"), *wavs],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    greedy = recipe_hypotheses(run / "wer_greedy.txt")
    assert [t.split() for t in json.loads(proc.stdout.strip().splitlines()[-1])] == [greedy[r["ID"]] for r in rows]


def test_foreign_class_gives_the_recipes_beam_words(run, pretrained, tmp_path):
    from speechbrain.inference.interfaces import foreign_class

    asr = foreign_class(
        source=str(pretrained), pymodule_file="custom.py", classname="CustomInterface", savedir=str(tmp_path / "sb")
    )
    beam = recipe_hypotheses(run / "wer.txt")
    rows = test_files(run)
    assert any(beam[r["ID"]] for r in rows)
    for row in rows:
        assert asr.transcribe_file(row["wav"]).split() == beam[row["ID"]]
    # a waveform at 44.1 kHz, converted because its rate is given
    wav = torch.from_numpy(sf.read(rows[0]["wav"], dtype="float32")[0])
    import torchaudio.functional as AF

    texts, words = asr.transcribe_batch(AF.resample(wav, RATE, 44100)[None], torch.ones(1), sample_rate=44100)
    assert words[0] == beam[rows[0]["ID"]]


# --------------------------------------------------------------------------------------------------------------
# Transcriber
# --------------------------------------------------------------------------------------------------------------
def test_transcriber_greedy_and_beam_words_and_timestamps(run, transcriber):
    rows = test_files(run)
    greedy, beam = recipe_hypotheses(run / "wer_greedy.txt"), recipe_hypotheses(run / "wer.txt")
    paths = [r["wav"] for r in rows]
    batched = transcriber.transcribe(paths)
    assert [t.text.split() for t in batched] == [greedy[r["ID"]] for r in rows]
    assert [t.text.split() for t in transcriber.transcribe(paths, decoder="beam")] == [beam[r["ID"]] for r in rows]
    for row, result in zip(rows, batched):
        alone = transcriber.transcribe(row["wav"])
        assert alone == result  # same words and timestamps alone as in a batch
        assert [w.word for w in result.words] == result.text.split()
        duration = float(row["duration"])
        starts = [w.start for w in result.words]
        assert starts == sorted(starts)
        assert all(0.0 <= w.start < w.end <= duration + 0.04 for w in result.words)
        assert all(round(w.start / 0.04, 6).is_integer() for w in result.words)  # on the 40 ms frame grid
    tb = transcriber.transcribe(paths[0], decoder="beam")
    assert [w.word for w in tb.words] == beam[rows[0]["ID"]]
    with pytest.raises(ValueError, match="decoder 'viterbi'"):
        transcriber.transcribe(paths[0], decoder="viterbi")


def test_every_input_form_and_rate_gives_the_same_words(run, transcriber, tmp_path):
    import torchaudio.functional as AF

    row = test_files(run)[1]
    reference = transcriber.transcribe(row["wav"])
    wav, _ = sf.read(row["wav"], dtype="float32")
    resampled = AF.resample(torch.from_numpy(wav), RATE, 44100)
    stereo_44k = tmp_path / "stereo_44k.flac"
    sf.write(stereo_44k, np.stack([resampled.numpy()] * 2, axis=1), 44100)
    int16 = (np.clip(wav, -1, 1) * 32767).astype(np.int16)
    for result in [
        transcriber.transcribe(str(stereo_44k)),
        transcriber.transcribe(resampled, sample_rate=44100),
        transcriber.transcribe(np.stack([wav, wav]), sample_rate=RATE),  # (channels, samples)
        transcriber.transcribe(int16, sample_rate=RATE),
        transcriber.transcribe([torch.from_numpy(wav)], sample_rate=RATE)[0],
    ]:
        assert result.text == reference.text
    with pytest.raises(ValueError, match="needs sample_rate="):
        transcriber.transcribe(torch.from_numpy(wav))
    with pytest.raises(ValueError, match="ambiguous shape"):
        transcriber.transcribe(np.zeros((20, 30), dtype=np.float32), sample_rate=RATE)
    assert (
        transcriber.transcribe(str(stereo_44k), decoder="beam").text
        == transcriber.transcribe(row["wav"], decoder="beam").text
    )


def test_precision_and_device(transcriber, pretrained, run):
    from lobes.inference import Transcriber
    from lobes.inputs import UsageError, resolve_device

    bf16 = Transcriber.from_pretrained(pretrained, device="cpu", precision="bf16")
    result = bf16.transcribe(test_files(run)[0]["wav"])
    assert isinstance(result.text, str)
    with pytest.raises(ValueError, match="precision 'fp16'"):
        Transcriber.from_pretrained(pretrained, precision="fp16")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_broken_folders_are_refused_clearly(pretrained, tmp_path):
    from lobes.inference import Transcriber

    def copy(name):
        folder = tmp_path / name
        shutil.copytree(pretrained, folder)
        return folder

    no_weights = copy("no_weights")
    (no_weights / "model.ckpt").unlink()
    with pytest.raises(PretrainedError, match="model.ckpt is missing"):
        Transcriber.from_pretrained(no_weights)
    swapped = copy("swapped")
    (swapped / "tokenizer.ckpt").write_bytes(b"another tokenizer")
    with pytest.raises(PretrainedError, match="tokenizer.ckpt is not the file that was packaged"):
        Transcriber.from_pretrained(swapped)
    other_kind = copy("other_kind")
    manifest = json.loads((other_kind / "package.json").read_text())
    manifest["kind"] = "classification"
    (other_kind / "package.json").write_text(json.dumps(manifest))
    with pytest.raises(PretrainedError, match="holds a 'classification' model, expected 'asr'"):
        Transcriber.from_pretrained(other_kind)
    unlisted = copy("missing_loadable")
    text = (unlisted / "hyperparams.yaml").read_text()
    text = text.replace("transcripts: !ref <transcripts>", "transcripts: !ref <transcripts>\n        lm: !ref <model>")
    (unlisted / "hyperparams.yaml").write_text(text)
    from lobes.inference.pretrained import load_pretrained

    with pytest.raises(PretrainedError, match=r"no weights for lm: expected lm.ckpt"):
        load_pretrained(unlisted, verify=False)
    with pytest.raises(PretrainedError, match="no package.json"):
        Transcriber.from_pretrained(tmp_path)


# --------------------------------------------------------------------------------------------------------------
# Long audio: windows
# --------------------------------------------------------------------------------------------------------------
class _LocalEncoder(nn.Module):
    """An encoder that sees two frames on each side, so windows with context must reproduce the whole exactly."""

    def __init__(self, d: int):
        super().__init__()
        self.conv = nn.Conv1d(d, d, 5, padding=2)

    def forward(self, x, src_key_padding_mask=None):
        if src_key_padding_mask is not None:
            x = x.masked_fill(src_key_padding_mask[..., None], 0.0)
        return (torch.tanh(self.conv(x.transpose(1, 2)).transpose(1, 2)),)  # (B, T, D)


def _local_transcriber(pretrained, **kwargs):
    import sentencepiece

    from lobes.asr import ASRModel
    from lobes.inference.asr import CTCEncoder, Transcriber

    sp = sentencepiece.SentencePieceProcessor()
    sp.load(str(pretrained / "tokenizer.ckpt"))
    torch.manual_seed(0)
    model = ASRModel(_LocalEncoder(16), vocab_size=sp.get_piece_size(), d_model=16, frontend_channels=(8, 8))
    with torch.no_grad():
        model.ctc_lin.weight.mul_(30)  # confident, varied tokens
        model.ctc_lin.bias.zero_()
        space, letter = sp.piece_to_id("\u2581"), sp.piece_to_id("B")  # word boundaries where "B" is likely
        model.ctc_lin.weight[space] = model.ctc_lin.weight[letter] + 0.3 * torch.randn(16)
    return Transcriber(CTCEncoder(model.eval()), sp, device="cpu", **kwargs)


def test_windows_reproduce_the_whole_recording_for_a_local_model(pretrained, tmp_path):
    rng = np.random.default_rng(0)
    wav = (rng.standard_normal(RATE * 7 + 123) * np.linspace(0.05, 1.0, RATE * 7 + 123)).astype(np.float32)
    whole = _local_transcriber(pretrained, window_seconds=60).transcribe(wav, sample_rate=RATE)
    assert len(whole.words) >= 5
    path = tmp_path / "long_44k.wav"
    import torchaudio.functional as AF

    sf.write(path, AF.resample(torch.from_numpy(wav), RATE, 44100).numpy(), 44100)
    whole_file = _local_transcriber(pretrained, window_seconds=60).transcribe(str(path))
    for window, context in [(2.0, 0.4), (1.0, 0.2)]:
        windowed = _local_transcriber(pretrained, window_seconds=window, context_seconds=context)
        assert windowed.transcribe(wav, sample_rate=RATE) == whole  # words and timestamps, seams included
        if window == 2.0:
            assert windowed.transcribe(str(path)) == whole_file  # read a window at a time, resampled piecewise
        source = audio_sources(wav, sample_rate=RATE)[0]
        joined = np.concatenate(list(windowed._windows(source, per_batch=2)))
        reference, lengths = windowed._log_probs([torch.from_numpy(wav)])
        assert joined.shape == reference[0].shape and lengths == [len(joined)]
        np.testing.assert_allclose(joined, reference[0], atol=1e-4)
    # a short file goes through the whole path, windows or not
    short = wav[:RATE]
    assert _local_transcriber(pretrained, window_seconds=2.0, context_seconds=0.4).transcribe(
        short, sample_rate=RATE
    ) == _local_transcriber(pretrained).transcribe(short, sample_rate=RATE)


def test_long_recording_with_the_beam_decoder(run, transcriber, pretrained):
    from lobes.inference import Transcriber

    rows = test_files(run)
    gap = np.zeros(RATE // 2, dtype=np.float32)
    wav = np.concatenate([np.concatenate([sf.read(r["wav"], dtype="float32")[0], gap]) for r in rows] * 2)
    windowed = Transcriber.from_pretrained(pretrained, device="cpu", window_seconds=2.0, context_seconds=0.5)
    for decoder in ("greedy", "beam"):
        result = windowed.transcribe(wav, sample_rate=RATE, decoder=decoder)
        assert [w.word for w in result.words] == result.text.split() and result.words
        starts = [w.start for w in result.words]
        assert starts == sorted(starts) and result.words[-1].end <= len(wav) / RATE + 0.04
        if decoder == "beam" and windowed.beam_decoder.spelling_lm is None:  # a closed-vocabulary decoder
            lexicon = set((pretrained / "transcripts.ckpt").read_text().split())
            assert set(result.text.split()) <= lexicon
