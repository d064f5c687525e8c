"""The chunk-step ONNX graph of the streaming HyperConformer: streamed chunk by chunk through onnxruntime it gives
the log-probabilities and greedy tokens of the torch streaming model (several lengths, a batch with padding, past
the 3000-frame positional table), the same partial hypotheses piece by piece, a state of constant size, the same
``--streaming`` lines from ``--backend onnx`` in a process where torch cannot be imported, the export of a
streaming pretrained folder, and clear errors for what has no chunk graph."""

import io
import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from _builders import LETTERS, asr_recipe_args, letter_tone_corpus, run_asr_recipe
from test_inference_asr import tiny_pretrained
from test_onnx import _NO_TORCH

from lobes.asr import ASRModel
from lobes.attention import PositionalEncoding
from lobes.conformer import ConformerEncoder
from lobes.export_onnx import main as export_main
from lobes.hypermixing import ChunkCausalHyperMixing
from lobes.inference import asr_streaming
from lobes.onnx.export import ExportError, export_streaming_model
from lobes.onnx.runtime import OnnxModel
from lobes.onnx.streaming import OnnxStreamingASR, stream_log_probs
from lobes.onnx.streaming_graph import StreamingASRGraph
from lobes.streaming import GlobalNormalization, StreamingASR

ROOT = Path(__file__).resolve().parents[1]
D = 16
TOL = 1e-4  # log-probabilities, onnxruntime vs torch streaming (measured ~1e-6)


def _tokenizer():
    import sentencepiece as spm

    buffer = io.BytesIO()
    words = ["".join(LETTERS[(i * j) % len(LETTERS)] for j in range(1, 2 + i % 3)) for i in range(40)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(" ".join(words[i : i + 3]) for i in range(0, 40, 3)),
        model_writer=buffer,
        model_type="char",
        vocab_size=len(LETTERS) + 2,
        unk_id=0,
        bos_id=-1,
        eos_id=-1,
        minloglevel=2,
    )
    return buffer.getvalue()


def _model(vocab: int, causal=True) -> ASRModel:
    """A random 2-layer streaming HyperConformer with feature statistics that are not 0 / 1."""
    torch.manual_seed(0)
    mixer = partial(ChunkCausalHyperMixing, D, 32, num_heads=2, chunk_size=None)
    encoder = ConformerEncoder(2, D, 32, mixer, kernel_size=5, causal=causal)
    model = ASRModel(
        encoder,
        vocab,
        D,
        frontend_channels=(4, 4),
        fbank_top_db=None,
        feature_norm=GlobalNormalization(80),
        pos_encoding=PositionalEncoding(D),
    )
    model.train()
    model.normalise(torch.randn(2, 40, 80) * 2 + 1, torch.tensor([40, 25]))
    with torch.no_grad():
        model.ctc_lin.bias[0] -= 1.0  # fewer blanks: partial hypotheses that change often
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The random model, its tokenizer and its chunk graphs of 8 frames (320 ms) and 3 frames (120 ms)."""
    import sentencepiece as spm

    proto = _tokenizer()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    model = _model(sp.get_piece_size())
    root = tmp_path_factory.mktemp("onnx_streaming")
    paths = {c: export_streaming_model(model, root / f"chunk{c}.onnx", c, 0, proto, source="tiny") for c in (8, 3)}
    return model, sp, paths


def _waves(lengths, seed=0):
    """Tones with noise (a random model then emits changing tokens), one per length."""
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        t = np.arange(n) / 16000
        wav = 0.3 * np.sin(2 * np.pi * 300 * (1 + 3 * t) * t) + 0.05 * rng.standard_normal(n)
        out.append(wav.astype(np.float32))
    return out


def _torch_stream(model, wav, chunk, piece):
    stream = StreamingASR(model, chunk)
    steps = [stream.accept(p) for p in torch.from_numpy(wav).split(piece)] + [stream.finish()]
    return steps


def _greedy(log_probs):
    path = log_probs.argmax(-1).tolist()
    return [t for i, t in enumerate(path) if t != 0 and (i == 0 or t != path[i - 1])]


# --------------------------------------------------------------------------------------------------
# the graph against torch streaming
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [8, 3])
def test_chunks_equal_torch_streaming_in_a_batch_with_padding(tiny, chunk):
    model, _, paths = tiny
    onnx_model = OnnxModel(paths[chunk], threads=1)
    S, look = onnx_model.meta["chunk_samples"], onnx_model.meta["lookahead"]
    lengths = [1, look, S - look, S, 3 * S + 7, 16000 + 123, 2 * 16000 + 5]
    waves = _waves(lengths)
    got, _ = stream_log_probs(onnx_model.session, onnx_model.meta, waves)
    for wav, out in zip(waves, got):
        ref = torch.cat([s.log_probs for s in _torch_stream(model, wav, chunk, S)], dim=1)[0].numpy()
        assert out.shape == ref.shape, len(wav)
        assert np.abs(out - ref).max() <= TOL
        assert _greedy(out) == _greedy(ref)
    assert sum(len(_greedy(out)) for out in got) > 5  # the comparison saw tokens
    alone, _ = stream_log_probs(onnx_model.session, onnx_model.meta, waves[4:5])
    assert np.abs(alone[0] - got[4]).max() <= 1e-5  # padding rows of other lengths change nothing


@pytest.mark.parametrize("chunk", [4, 1])
def test_chunk_convolution_graph_equals_torch_streaming(tmp_path, chunk):
    """The dynamic chunk convolution (causal="chunk"): a cache of (kernel_size - 1) / 2 frames, zeros past the
    chunk's end; a batch whose rows end in different chunks."""
    model = _model(9, causal="chunk")
    path = export_streaming_model(model, tmp_path / "chunk_conv.onnx", chunk, 0, None, source="tiny")
    onnx_model = OnnxModel(path, threads=1)
    conv_caches = [s for s in onnx_model.meta["state"] if s["name"].endswith("_conv_cache")]
    assert [s["shape"] for s in conv_caches] == [[D, 2], [D, 2]]
    S, look = onnx_model.meta["chunk_samples"], onnx_model.meta["lookahead"]
    waves = _waves([look, S + 5, 3 * S + 7, 16000 + 123], seed=4)
    got, _ = stream_log_probs(onnx_model.session, onnx_model.meta, waves)
    for wav, out in zip(waves, got):
        ref = torch.cat([s.log_probs for s in _torch_stream(model, wav, chunk, S)], dim=1)[0].numpy()
        assert out.shape == ref.shape, len(wav)
        assert np.abs(out - ref).max() <= TOL
    with torch.no_grad():  # and the torch streaming reference is the chunked forward of the whole utterance
        wav = torch.from_numpy(waves[-1]).unsqueeze(0)
        feats, lens = model.features(wav, torch.ones(1))
        full = model.ctc_log_probs(model.encode(feats, lens, chunk)[0])[0].numpy()
    assert np.abs(got[-1] - full).max() <= TOL


def test_no_length_ceiling(tiny):
    """Positions come from the frame counter: a stream past the 3000-frame positional table (130 s)."""
    model, _, paths = tiny
    onnx_model = OnnxModel(paths[8], threads=1)
    [wav] = _waves([16000 * 130 + 321], seed=1)
    [out], _ = stream_log_probs(onnx_model.session, onnx_model.meta, [wav])
    ref = torch.cat([s.log_probs for s in _torch_stream(model, wav, 8, 5120)], dim=1)[0].numpy()
    assert out.shape == ref.shape and out.shape[0] > 3200
    assert np.abs(out - ref).max() <= TOL


@pytest.mark.parametrize("piece", [1000, 5120, 7777])
def test_partial_hypotheses_equal_torch_piece_by_piece(tiny, piece):
    model, sp, paths = tiny
    [wav] = _waves([16000 * 3 + 17], seed=2)
    ref = _torch_stream(model, wav, 8, piece)
    ours = OnnxStreamingASR(OnnxModel(paths[8], threads=1))
    steps = [ours.accept(p) for p in np.array_split(wav, range(piece, len(wav), piece))] + [ours.finish()]
    assert len(steps) == len(ref)
    for a, b in zip(steps, ref):
        assert a.log_probs.shape[1] == b.log_probs.shape[1]  # the same chunks come out after the same samples
        assert a.tokens == b.tokens and a.final == b.final
        assert a.text == [sp.decode_ids(t) if t else "" for t in b.tokens]
    assert steps[-1].text[0] and len({s.text[0] for s in steps}) > 2


def test_state_keeps_its_size_and_metadata_say_what_a_client_needs(tiny):
    _, sp, paths = tiny
    onnx_model = OnnxModel(paths[8], threads=1)
    meta = onnx_model.meta
    assert meta["kind"] == "asr_streaming" and meta["sample_rate"] == 16000 and meta["chunk_ms"] == 320.0
    assert meta["chunk_samples"] == 8 * 640 and meta["chunk_frames"] == 8 and meta["lookahead"] == 40
    assert onnx_model.tokenizer().serialized_model_proto() == sp.serialized_model_proto()
    names = [s["name"] for s in meta["state"]]
    assert names[-2:] == ["samples", "frame"] and "layer1_mixer_sums" in names and "layer1_conv_cache" in names
    inputs = {i.name: i for i in onnx_model.session.get_inputs()}
    assert list(inputs) == ["chunk", "lengths", *names] == meta["inputs"]
    for spec in meta["state"]:
        shape = inputs[spec["name"]].shape
        assert isinstance(shape[0], str) and list(shape[1:]) == spec["shape"]  # dynamic batch, fixed rest
    assert inputs["chunk"].shape[1] == meta["chunk_samples"]

    stream = OnnxStreamingASR(onnx_model)
    shapes, sizes = [], []
    for piece in np.array_split(_waves([16000 * 20], seed=3)[0], 20):
        stream.accept(piece)
        shapes.append([s.shape for s in stream.stepper.state])
        sizes.append(stream.stepper.state_elements())
    assert stream.stepper.steps > 60
    assert all(s == shapes[0] for s in shapes) and len(set(sizes)) == 1
    assert shapes[0] == [(1, *spec["shape"]) for spec in meta["state"]]


def test_export_refuses_models_without_a_chunk_graph(tiny):
    model, _, _ = tiny
    clipped = _model(5)
    clipped.fbank_top_db = 80.0
    with pytest.raises(ExportError, match="fbank clips"):
        StreamingASRGraph(clipped, 8)
    from lobes.attention import MultiHeadAttention

    attention = ASRModel(
        ConformerEncoder(1, D, 32, partial(MultiHeadAttention, 2, D), kernel_size=5, causal=True),
        5,
        D,
        frontend_channels=(4, 4),
        fbank_top_db=None,
        feature_norm=GlobalNormalization(80),
    )
    with pytest.raises(ExportError, match="MultiHeadAttention"):
        StreamingASRGraph(attention.eval(), 8)
    with pytest.raises(ExportError, match="chunk_frames"):
        StreamingASRGraph(model, 0)


# --------------------------------------------------------------------------------------------------
# python -m lobes.transcribe ... --streaming --backend onnx, without torch
# --------------------------------------------------------------------------------------------------
def _run_without_torch(args, stdin=None):
    return subprocess.run(
        [sys.executable, "-c", _NO_TORCH.replace("{command}", "transcribe"), *map(str, args)],
        capture_output=True,
        input=stdin,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        cwd=ROOT,
        timeout=300,
    )


def _torch_lines(model, sp, path, pieces, chunk=8):
    return [
        {"path": path, "time": round(t, 3), "text": text, "final": final}
        for t, text, final in asr_streaming.transcribe_stream(model, sp, pieces, chunk)
    ]


def test_transcribe_streaming_backend_onnx_without_torch(tiny, tmp_path):
    model, sp, paths = tiny
    files = []
    for i, wav in enumerate(_waves([16000 * 2 + 333, 11000], seed=4)):
        files.append(str(tmp_path / f"utt{i}.wav"))
        sf.write(files[-1], wav, 16000, subtype="FLOAT")
    out = tmp_path / "onnx.jsonl"
    proc = _run_without_torch([paths[8], *files, "--streaming", "--backend", "onnx", "--piece-ms", "100",
                               "--output", out, "--threads", "1"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    got = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    expected = []
    for path in files:
        expected += _torch_lines(model, sp, path, asr_streaming.file_pieces(path, 16000, 1600))
    assert got == expected
    assert len([r for r in got if not r["final"] and r["text"]]) > 3  # partial texts that change
    assert [json.loads(line) for line in out.read_text().splitlines()] == [r for r in expected if r["final"]]

    pcm = (np.clip(_waves([16000 + 999], seed=5)[0], -1, 1) * 32767).astype("<i2")
    piped = _run_without_torch([paths[8], "-", "--streaming", "--backend", "onnx"], stdin=pcm.tobytes())
    assert piped.returncode == 0, piped.stderr.decode()[-2000:]
    ref = _torch_lines(model, sp, "-", asr_streaming.pcm_pieces(io.BytesIO(pcm.tobytes()), 5120))
    assert [json.loads(line) for line in piped.stdout.decode().splitlines()] == ref

    wrong_chunk = _run_without_torch([paths[8], files[0], "--streaming", "--backend", "onnx", "--chunk-ms", "160"])
    assert wrong_chunk.returncode == 2 and b"exported with chunks of 320 ms" in wrong_chunk.stderr


def test_backend_onnx_tells_which_graph_a_command_needs(tiny, tmp_path, capsys, caplog):
    from lobes.transcribe import main

    _, _, paths = tiny
    [wav] = _waves([8000])
    sf.write(tmp_path / "a.wav", wav, 16000)
    assert main([str(paths[8]), str(tmp_path / "a.wav"), "--backend", "onnx", "-q"]) == 2
    assert "use it with --streaming" in capsys.readouterr().err + caplog.text  # logged or printed, as configured


# --------------------------------------------------------------------------------------------------
# pretrained folders
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def streaming_folder(tmp_path_factory):
    """A streaming recipe run (tiny preset, one epoch) packaged, made once per test session."""
    from lobes.inference.asr import package_asr_run

    base = tmp_path_factory.getbasetemp() / "tiny_asr_streaming"
    if not (base / "pretrained" / "package.json").exists():
        corpus = letter_tone_corpus(base / "tones", test_size=2)
        yaml = "recipes/ASR/hparams/hyperconformer_streaming.yaml"
        run_asr_recipe(asr_recipe_args(corpus, base / "run", 1, "--test_chunk_ms=[320]", yaml=yaml))
        package_asr_run(base / "run", base / "pretrained")
    return base / "pretrained", base / "tones" / "test" / "test_0.wav"


def test_streaming_folder_exports_and_streams_the_same_lines(streaming_folder, tmp_path, capsys, caplog):
    from lobes.transcribe import main

    folder, wav = streaming_folder
    out = tmp_path / "stream.onnx"
    assert export_main([str(folder), str(out)]) == 0  # a streaming folder: its chunk graph, 320 ms by default
    assert OnnxModel(out).meta["chunk_ms"] == 320.0 and OnnxModel(out).kind == "asr_streaming"
    capsys.readouterr()
    assert main([str(folder), str(wav), "--streaming", "--piece-ms", "100"]) == 0
    expected = capsys.readouterr().out
    assert main([str(out), str(wav), "--streaming", "--backend", "onnx", "--piece-ms", "100"]) == 0
    assert capsys.readouterr().out == expected and expected.count("\n") >= 2
    assert export_main([str(folder), str(tmp_path / "bad.onnx"), "--chunk-ms", "100"]) == 2
    assert "--chunk-ms 100" in caplog.text and "whole number" in caplog.text
    assert not (tmp_path / "bad.onnx").exists()


def test_non_streaming_folder_has_no_chunk_graph(tmp_path_factory, tmp_path, caplog):
    folder = tiny_pretrained(tmp_path_factory)
    assert export_main([str(folder), str(tmp_path / "x.onnx"), "--chunk-ms", "320"]) == 2
    assert "is not a streaming model" in caplog.text and "fbank clips" in caplog.text
    assert not (tmp_path / "x.onnx").exists()
