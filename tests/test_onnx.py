"""ONNX export and the onnxruntime path: the exportable fbanks against torchaudio / speechbrain, BEATs (fbank in
the graph) and the ASR model against torch eager at several lengths (not only the traced one, and past the
3000-frame positional table), batch with padding = alone, the int8 variant, ``--backend onnx`` of the commands on
a folder with a corrupt file (same outputs and errors as the torch backend) in a process where torch cannot be
imported, and clear errors for what cannot be exported."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from _builders import TINY_BEATS_CFG
from test_inference_asr import test_files, tiny_pretrained, tiny_run
from test_inference_classify import microsoft_checkpoint

from lobes.beats import BEATs, BEATsConfig
from lobes.export_onnx import main as export_main
from lobes.features import DFTKaldiFbank, kaldi_fbank
from lobes.onnx.export import ExportError, export_beats
from lobes.onnx.graphs import ComputedPositionalEncoding, DFTSpeechBrainFbank
from lobes.onnx.runtime import OnnxModel

ROOT = Path(__file__).resolve().parents[1]
# BEATs' loud input (wav * 2**15) leaves the lowest pre-emphasised bins tiny next to the frame's energy: there the
# float32 FFT of the reference is off by up to a few 1e-4 in log energy, and the float64 DFT is the exact one.
FBANK_TOL = 2e-3


def _rows(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in lengths]


# --------------------------------------------------------------------------------------------------
# exportable front-ends
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [400, 2800, 16000, 50_001])
def test_dft_kaldi_fbank_equals_torchaudio(length):
    wav = torch.from_numpy(np.stack(_rows([length, length], seed=length))) * 2**15
    ref = torch.stack([torchaudio.compliance.kaldi.fbank(row[None], num_mel_bins=128) for row in wav])
    ours = DFTKaldiFbank(num_mel_bins=128)(wav)
    assert ours.shape == ref.shape == kaldi_fbank(wav, num_mel_bins=128).shape
    diff = (ours - ref).abs()
    assert diff.max() < FBANK_TOL and diff.mean() < 2e-5


def test_dft_speechbrain_fbank_equals_speechbrain():
    from speechbrain.lobes.features import Fbank

    ref = Fbank(n_mels=80)
    for length in (1000, 16000, 33333):
        wav = torch.from_numpy(np.stack(_rows([length, length], seed=length)))
        ours, expected = DFTSpeechBrainFbank(ref)(wav), ref(wav)
        assert ours.shape == expected.shape and (ours - expected).abs().max() < 1e-3  # dB: 1e-3 dB = 2.3e-4 relative


def test_computed_positions_equal_the_table_and_have_no_ceiling():
    from lobes.attention import PositionalEncoding

    table = PositionalEncoding(64, max_len=5000)
    x = torch.zeros(1, 5000, 64)
    assert (ComputedPositionalEncoding(64)(x) - table(x)).abs().max() < 2e-6
    assert ComputedPositionalEncoding(64)(torch.zeros(1, 9000, 64)).shape == (1, 9000, 64)


# --------------------------------------------------------------------------------------------------
# BEATs
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def beats_files(tmp_path_factory):
    """A tiny pre-trained and a tiny fine-tuned BEATs checkpoint, each exported once."""
    root = tmp_path_factory.mktemp("onnx_beats")
    pre = microsoft_checkpoint(root / "pre.pt", finetuned=False)
    tagger = microsoft_checkpoint(root / "as2m.pt", finetuned=True, classes=5)
    assert export_main([str(pre), str(root / "pre.onnx")]) == 0
    assert export_main([str(tagger), str(root / "as2m.onnx")]) == 0
    return {"pre": pre, "as2m": tagger, "pre_onnx": root / "pre.onnx", "as2m_onnx": root / "as2m.onnx"}


def _torch_beats(path):
    return BEATs(ckp_path=path, freeze=True).eval()


@pytest.mark.parametrize("lengths", [[2800], [16000 * 3 + 7, 9000], [16000 * 70]])
def test_beats_fbank_in_graph_equals_torch_at_several_lengths(beats_files, lengths):
    onnx_model = OnnxModel(beats_files["as2m_onnx"], threads=1)
    model = _torch_beats(beats_files["as2m"])
    waves = _rows(lengths, seed=len(lengths))
    out = onnx_model.run(waves)
    wav = torch.zeros(len(waves), max(lengths))
    for i, w in enumerate(waves):
        wav[i, : len(w)] = torch.from_numpy(w)
    with torch.no_grad():
        feats, probs, pad = model.extract_features(wav, torch.tensor(lengths, dtype=torch.float64) / max(lengths))
    counts = (~pad).sum(1)
    assert out["token_lengths"].tolist() == counts.tolist()
    for row, n in enumerate(counts.tolist()):
        assert np.abs(out["features"][row, :n] - feats[row, :n].numpy()).max() < 1e-4
    assert np.abs(out["probs"] - probs.numpy()).max() < 1e-5


def test_beats_graph_has_dynamic_axes_and_metadata(beats_files):
    model = OnnxModel(beats_files["as2m_onnx"])
    shape = model.session.get_inputs()[0].shape
    assert len(shape) == 2 and all(isinstance(d, str) for d in shape)  # (batch, samples): both symbolic
    assert model.kind == "beats" and model.labels == [f"/m/{i:02d}x" for i in range(5)] and model.min_samples == 2800
    assert OnnxModel(beats_files["pre_onnx"]).outputs == ["features", "token_lengths"]


def test_beats_batch_with_padding_equals_alone(beats_files):
    model = OnnxModel(beats_files["pre_onnx"], threads=1)
    waves = _rows([41000, 5000, 16000], seed=3)
    batch = model.run(waves)
    for row, wav in enumerate(waves):
        alone = model.run([wav])
        n = int(alone["token_lengths"][0])
        assert int(batch["token_lengths"][row]) == n
        assert np.abs(batch["features"][row, :n] - alone["features"][0, :n]).max() < 1e-5


def test_beats_layer_choice_and_int8_variant(beats_files, tmp_path):
    model = _torch_beats(beats_files["pre"])
    wav = _rows([20000], seed=5)
    assert export_main([str(beats_files["pre"]), str(tmp_path / "l1.onnx"), "--layer", "1"]) == 0
    out = OnnxModel(tmp_path / "l1.onnx").run(wav)["features"]
    with torch.no_grad():
        ref = model.extract_features(torch.from_numpy(wav[0])[None], layer=1)[0]
    assert np.abs(out - ref.numpy()).max() < 1e-4
    assert export_main([str(beats_files["as2m"]), str(tmp_path / "q.onnx"), "--quantize", "int8"]) == 0
    quant, full = OnnxModel(tmp_path / "q.onnx"), OnnxModel(beats_files["as2m_onnx"])
    assert (
        quant.meta["precision"] == "int8"
        and (tmp_path / "q.onnx").stat().st_size < beats_files["as2m_onnx"].stat().st_size
    )
    diff = np.abs(quant.run(wav)["probs"] - full.run(wav)["probs"]).max()
    assert 0 < diff < 0.02  # quantized: changed, but not broken


# --------------------------------------------------------------------------------------------------
# ASR
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def asr(tmp_path_factory):
    pretrained = tiny_pretrained(tmp_path_factory)
    out = tmp_path_factory.mktemp("onnx_asr") / "asr.onnx"
    assert export_main([str(pretrained), str(out)]) == 0
    return pretrained, out


def test_asr_log_probs_equal_torch_also_past_the_positional_table(asr):
    from lobes.inference.asr import Transcriber

    pretrained, path = asr
    encoder = Transcriber.from_pretrained(pretrained, device="cpu").encoder
    model = OnnxModel(path, threads=1)
    for lengths in ([16000 * 2 + 33, 7000], [16000 * 125]):  # 125 s: 3125 frames, past max_length 3000
        waves = _rows(lengths, seed=len(lengths))
        n_mels = int(model.meta["n_mels"])
        out = model.run(
            waves,
            stats_mean=np.zeros(n_mels, np.float32),
            stats_var=np.ones(n_mels, np.float32),
            use_stats=np.zeros(1, np.float32),
        )
        wav = torch.zeros(len(waves), max(lengths))
        for i, w in enumerate(waves):
            wav[i, : len(w)] = torch.from_numpy(w)
        with torch.no_grad():
            ref, frames = encoder.log_probs(wav, torch.tensor(lengths, dtype=torch.float64) / max(lengths))
        assert out["frames"].tolist() == frames.tolist()
        assert np.abs(out["log_probs"] - ref.numpy()).max() < 1e-4


def test_onnx_transcriber_equals_torch_in_windows(asr, tmp_path_factory):
    """A recording longer than the window: same windows, same whole-recording statistics, same words."""
    from lobes.inference.asr import Transcriber
    from lobes.io import read_audio
    from lobes.onnx.tasks import OnnxTranscriber

    pretrained, path = asr
    rows = test_files(tiny_run(tmp_path_factory))
    long = np.concatenate([read_audio(r["wav"]) for r in rows])
    torch_side = Transcriber.from_pretrained(pretrained, device="cpu", window_seconds=2.0, context_seconds=0.5)
    onnx_side = OnnxTranscriber(OnnxModel(path), window_seconds=2.0, context_seconds=0.5)
    assert len(long) > onnx_side.window
    expected = torch_side.transcribe(torch.from_numpy(long), sample_rate=16000).to_dict()
    assert onnx_side.transcribe([long])[0].to_dict() == expected
    assert expected["text"]


# --------------------------------------------------------------------------------------------------
# the commands with --backend onnx
# --------------------------------------------------------------------------------------------------
_NO_TORCH = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchaudio", "speechbrain"):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, _Block())
from lobes.{command} import main
code = main(sys.argv[1:])
assert not any(m.split(".")[0] in ("torch", "speechbrain") for m in sys.modules), "torch was imported"
sys.exit(code)
"""


def _run_without_torch(command, args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", _NO_TORCH.replace("{command}", command), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )


def _jsonl(path):
    return {Path(r["path"]).name: r for r in map(json.loads, Path(path).read_text().splitlines())}


def _errors(out):
    return {Path(r["path"]).name: r["reason"] for r in csv.DictReader(open(f"{out}.errors.csv"))}


def test_transcribe_backend_onnx_without_torch(asr, tmp_path, tmp_path_factory):
    from lobes.transcribe import main

    pretrained, path = asr
    folder = tmp_path / "inputs"
    folder.mkdir()
    for row in test_files(tiny_run(tmp_path_factory)):
        wav, rate = sf.read(row["wav"], dtype="float32")
        sf.write(folder / Path(row["wav"]).name, wav, rate)
    (folder / "not_audio.wav").write_bytes(b"this is not a wav file")
    sf.write(folder / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    ref = tmp_path / "torch.jsonl"
    assert main([str(pretrained), str(folder), "--output", str(ref), "--device", "cpu", "-q"]) == 1
    out = tmp_path / "onnx.jsonl"
    proc = _run_without_torch("transcribe", [path, folder, "--output", out, "--backend", "onnx", "-q"])
    assert proc.returncode == 1, proc.stderr
    got, expected = _jsonl(out), _jsonl(ref)
    assert got == {k: {**v, "path": got[k]["path"]} for k, v in expected.items()} and len(got) == len(expected) > 0
    assert _errors(out) == _errors(ref)
    assert json.loads(Path(f"{out}.settings.json").read_text())["backend"] == "onnx"
    bad = _run_without_torch("transcribe", [path, folder, "--backend", "onnx", "--decoder", "beam"])
    assert bad.returncode == 2 and "--decoder beam" in bad.stderr
    assert _run_without_torch("transcribe", [tmp_path / "no.onnx", folder, "--backend", "onnx"]).returncode == 2


def test_classify_backend_onnx_without_torch(beats_files, tmp_path):
    from lobes.classify import main
    from lobes.inference.classify import package_beats_checkpoint

    folder = tmp_path / "clips"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    sf.write(folder / "noise.wav", (0.2 * rng.standard_normal(24000)).astype(np.float32), 16000)
    sf.write(folder / "stereo_44k.wav", (0.2 * rng.standard_normal((60000, 2))).astype(np.float32), 44100)
    sf.write(folder / "sub" / "tone.flac", (0.3 * np.sin(np.arange(12000) * 0.3)).astype(np.float32), 8000)
    (folder / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage")
    sf.write(folder / "short.wav", np.zeros(400, dtype=np.float32), 16000)
    pretrained = package_beats_checkpoint(beats_files["as2m"], tmp_path / "pretrained")
    assert export_main([str(pretrained), str(tmp_path / "cls.onnx")]) == 0
    ref = tmp_path / "torch.jsonl"
    assert main([str(pretrained), str(folder), "--output", str(ref), "--device", "cpu", "-q", "--top-k", "3"]) == 1
    for model in (tmp_path / "cls.onnx", beats_files["as2m_onnx"]):  # the folder's export, the checkpoint's
        out = tmp_path / f"{model.stem}.jsonl"
        proc = _run_without_torch("classify", [model, folder, "--output", out, "--backend", "onnx", "--top-k", "3"])
        assert proc.returncode == 1, proc.stderr
        got, expected = _jsonl(out), _jsonl(ref)
        assert sorted(got) == sorted(expected) == ["noise.wav", "stereo_44k.wav", "tone.flac"]
        for name, record in expected.items():
            assert [x["label"] for x in got[name]["labels"]] == [x["label"] for x in record["labels"]]
            scores = [x["score"] for x in got[name]["labels"]]
            assert np.abs(np.array(scores) - [x["score"] for x in record["labels"]]).max() < 1e-4
        assert _errors(out) == _errors(ref)
    pre = _run_without_torch("classify", [beats_files["pre_onnx"], folder, "--backend", "onnx"])
    assert pre.returncode == 2 and "without class probabilities" in pre.stderr


# --------------------------------------------------------------------------------------------------
# what cannot be exported
# --------------------------------------------------------------------------------------------------
def test_clear_errors_for_what_cannot_be_exported(tmp_path, caplog):
    from speechbrain.lobes.features import Fbank

    from lobes.inference.pretrained import PretrainedWriter
    from lobes.onnx.export import _trace

    with pytest.raises(ExportError, match="deltas / context"):
        DFTSpeechBrainFbank(Fbank(n_mels=40, deltas=True))

    class PublicCall(torch.nn.Module):  # BEATs' public call checks its input on the data: not traceable
        def __init__(self):
            super().__init__()
            self.beats = BEATs(cfg=BEATsConfig.released(**TINY_BEATS_CFG))

        def forward(self, waveforms, lengths):
            return self.beats(waveforms, lengths.double() / waveforms.shape[1])[0]

    with pytest.raises(ExportError, match="PublicCall: torch.onnx.export"):
        args = (torch.zeros(2, 4000), torch.tensor([4000, 3000]))
        _trace(PublicCall(), args, ["waveforms", "lengths"], ["o"], ({0: "batch", 1: "samples"}, {0: "batch"}))
    writer = PretrainedWriter(tmp_path / "demo", kind="demo")
    writer.add_text("hyperparams.yaml", "a: 1\n")
    folder = writer.commit()
    assert export_main([str(folder), str(tmp_path / "demo.onnx")]) == 2
    assert "holds a 'demo' model; ONNX export exists for asr, classification" in caplog.text
    assert export_main([str(tmp_path / "missing.pt"), str(tmp_path / "x.onnx")]) == 2
    model = BEATs(cfg=BEATsConfig.released(**TINY_BEATS_CFG))
    with pytest.raises(ExportError, match="layer 7"):
        export_beats(model, tmp_path / "x.onnx", layer=7)
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "demo.onnx").exists()


def test_extract_backend_onnx_without_torch(beats_files, tmp_path):
    from lobes.extract import main

    folder = tmp_path / "clips"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    sf.write(folder / "a.wav", (0.2 * rng.standard_normal(40000)).astype(np.float32), 16000)
    sf.write(folder / "sub" / "b_22k.flac", (0.2 * rng.standard_normal(30000)).astype(np.float32), 22050)
    (folder / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage")
    sf.write(folder / "short.wav", np.zeros(400, dtype=np.float32), 16000)
    common = ["--input", folder, "--tags", "2", "--quiet"]
    ref = tmp_path / "torch"
    assert main([str(a) for a in common] + ["--output", str(ref), "--checkpoint", str(beats_files["as2m"])]) == 1
    out = tmp_path / "onnx"
    args = common + ["--output", out, "--checkpoint", beats_files["as2m_onnx"], "--backend", "onnx", "--threads", "1"]
    proc = _run_without_torch("extract", args)
    assert proc.returncode == 1, proc.stderr
    for name in ("a.wav", "sub/b_22k.flac"):
        got, expected = np.load(out / f"{name}.npy"), np.load(ref / f"{name}.npy")
        assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-4
        tags, expected_tags = (json.loads((d / f"{name}.tags.json").read_text()) for d in (out, ref))
        assert [t["label"] for t in tags] == [t["label"] for t in expected_tags]
    read = lambda d: sorted((Path(r["input"]).name, r["reason"]) for r in csv.DictReader(open(d / "errors.csv")))  # noqa: E731
    assert read(out) == read(ref) and len(read(out)) == 2
    wrong_layer = _run_without_torch("extract", args[:-2] + ["--layer", "1", "--overwrite"])
    assert wrong_layer.returncode == 2 and "exported with layer last" in wrong_layer.stderr


def test_readme_export_lines_run(asr, beats_files, tmp_path, tmp_path_factory, monkeypatch):
    """The README's "Export to ONNX" block, verbatim, on the tiny models."""
    import shutil

    from test_readme import code_blocks, run_shell_line

    from lobes.inference.classify import package_beats_checkpoint

    [(lang, code)] = code_blocks("### Export to ONNX")
    monkeypatch.chdir(tmp_path)
    Path("pretrained").mkdir()
    Path("pretrained/asr").symlink_to(asr[0], target_is_directory=True)
    package_beats_checkpoint(beats_files["as2m"], "pretrained/events")
    shutil.copy(beats_files["as2m"], "BEATs_iter3_plus_AS2M.pt")
    rows = test_files(tiny_run(tmp_path_factory))
    for folder in ("recordings", "clips"):
        Path(folder).mkdir()
        for row in rows[1:3]:
            shutil.copy(row["wav"], Path(folder) / Path(row["wav"]).name)
    shutil.copy(rows[0]["wav"], "speech.wav")
    shutil.copy(rows[0]["wav"], "clip.wav")
    lines = [line for line in code.splitlines() if line.strip()]
    assert lang == "shell" and len(lines) == 6
    for line in lines:
        assert run_shell_line(line) == 0, line
    assert len(Path("transcripts.jsonl").read_text().splitlines()) == 3
    assert len(Path("labels.jsonl").read_text().splitlines()) == 3
    assert len(list(Path("features").glob("*.npy"))) == 2
