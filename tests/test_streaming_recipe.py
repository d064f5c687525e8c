"""Streaming recipes end to end: dynamic chunk training on a tiny tone corpus, the test WER per chunk size, the
pretrained folder streamed by ``python -m lobes.transcribe --streaming`` (files and raw PCM on stdin); and the
chunk configuration each stage gets."""

import io
import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import speechbrain as sb
import torch
from _builders import ROOT, asr_recipe_args, letter_tone_corpus, recipe_env, run_asr_recipe

from lobes.chunking import ChunkConfig, DynamicChunkSampler
from lobes.recipe.streaming import chunk_kwargs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return letter_tone_corpus(tmp_path_factory.mktemp("tones"), test_size=4)


@pytest.fixture(scope="module")
def streaming_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("streaming_run")
    args = asr_recipe_args(corpus, out, 1, yaml="recipes/ASR/hparams/hyperconformer_streaming.yaml")
    run_asr_recipe([*args, "--test_chunk_ms=[160, 320]"])
    return out


def test_chunk_kwargs_per_stage():
    torch.manual_seed(0)
    sampler = DynamicChunkSampler(chunked_prob=1.0, chunk_size_min=3, chunk_size_max=3, valid_config=ChunkConfig(5))
    brain = SimpleNamespace(hparams=SimpleNamespace(dynamic_chunk_training=sampler), test_chunk=None)
    assert chunk_kwargs(brain, sb.Stage.TRAIN) == {"chunk": ChunkConfig(3)}
    assert chunk_kwargs(brain, sb.Stage.VALID) == {"chunk": ChunkConfig(5)}
    assert chunk_kwargs(brain, sb.Stage.TEST) == {}
    brain.test_chunk = ChunkConfig(8)
    assert chunk_kwargs(brain, sb.Stage.TEST) == {"chunk": ChunkConfig(8)}
    assert chunk_kwargs(SimpleNamespace(hparams=SimpleNamespace()), sb.Stage.TRAIN) == {}  # other recipes


def test_streaming_run_reports_wer_per_chunk_size(streaming_run):
    lines = (streaming_run / "test_wer.txt").read_text().splitlines()
    assert any(line.startswith("greedy: ") for line in lines)
    assert [line.split(":")[0] for line in lines[-2:]] == ["chunk 160 ms", "chunk 320 ms"]
    table = (streaming_run / "test_wer_chunks.txt").read_text().splitlines()
    assert [row.split("\t")[0] for row in table[2:]] == ["full", "160ms", "320ms"]
    assert (streaming_run / "chunks" / "320ms" / "wer.txt").exists()
    assert (streaming_run / "pretrained" / "hyperparams.yaml").exists()


def _transcribe(*args, stdin=None):
    cmd = [sys.executable, "-m", "lobes.transcribe", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=recipe_env(), input=stdin, capture_output=True, timeout=120)


def test_streaming_transcription_of_a_file_and_of_stdin(streaming_run, corpus):
    import csv

    with open(corpus["test"]) as f:
        wav = next(csv.DictReader(f))["wav"]
    folder = streaming_run / "pretrained"
    done = _transcribe(folder, wav, "--streaming", "--chunk-ms", "160", "--piece-ms", "100")
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    records = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert records[-1]["final"] and not any(r["final"] for r in records[:-1])
    duration = sf.info(wav).frames / sf.info(wav).samplerate
    assert records[-1]["time"] == pytest.approx(duration, abs=1e-3)
    times = [r["time"] for r in records]
    assert times == sorted(times)

    audio, rate = sf.read(wav, dtype="int16")
    assert rate == 16000
    raw = io.BytesIO()
    raw.write(np.asarray(audio, dtype="<i2").tobytes())
    piped = _transcribe(folder, "-", "--streaming", "--chunk-ms", "160", "--piece-ms", "100", stdin=raw.getvalue())
    assert piped.returncode == 0, piped.stderr.decode()[-2000:]
    last = json.loads(piped.stdout.decode().splitlines()[-1])
    assert last["text"] == records[-1]["text"] and last["path"] == "-"


def test_streaming_usage_errors(streaming_run):
    bad_chunk = _transcribe(streaming_run / "pretrained", "x.wav", "--streaming", "--chunk-ms", "100")
    assert bad_chunk.returncode == 2 and b"whole number" in bad_chunk.stderr
    no_model = _transcribe(streaming_run / "nothing", "x.wav", "--streaming")
    assert no_model.returncode == 2
