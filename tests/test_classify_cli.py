"""python -m lobes.classify: jsonl / csv outputs, failed files (exit 1, the good ones written), usage errors
(exit 2), resuming and --overwrite; a wrapped AS2M-style BEATs checkpoint and a packaged recipe run."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from test_inference_classify import microsoft_checkpoint

from lobes.classify import main
from lobes.inference.classify import AudioClassifier, package_beats_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    root = tmp_path_factory.mktemp("tagger")
    names = root / "class_labels_indices.csv"
    names.write_text("index,mid,display_name\n" + "".join(f"{i},/m/{i:02d}x,Sound {i}\n" for i in range(5)))
    checkpoint = microsoft_checkpoint(root / "as2m.pt", finetuned=True, classes=5)
    return package_beats_checkpoint(checkpoint, root / "pretrained", names)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Three good files (16 kHz wav, 44.1 kHz stereo wav, 8 kHz flac in a subfolder), a corrupt and a too-short one."""
    root = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    sf.write(root / "tone.wav", (0.4 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    noise = 0.2 * rng.standard_normal((66150, 2)).astype(np.float32)
    sf.write(root / "noise_stereo.wav", noise, 44100)
    (root / "sub").mkdir()
    sf.write(root / "sub" / "chirp.flac", (0.3 * np.sin(2 * np.pi * 200 * t[:12000] ** 2 * 8)).astype(np.float32), 8000)
    (root / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage")
    sf.write(root / "short.wav", np.zeros(400, dtype=np.float32), 16000)  # 25 ms: under BEATs' one patch
    good = sorted(str(p) for p in (root / "tone.wav", root / "noise_stereo.wav", root / "sub" / "chirp.flac"))
    return root, good


def _read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_folder_with_a_corrupt_file_exits_1_and_writes_the_good_ones(tagger, clips, tmp_path):
    root, good = clips
    out = tmp_path / "tags.jsonl"
    assert main([str(tagger), str(root), "--top-k", "3", "--output", str(out), "--device", "cpu", "-q"]) == 1
    records = _read_jsonl(out)
    assert sorted(r["path"] for r in records) == good
    model = AudioClassifier.from_pretrained(tagger, device="cpu")
    expected = dict(zip(good, model.classify(good, top_k=3)))
    for record in records:
        assert list(record) == ["path", "labels"]
        assert [x["label"] for x in record["labels"]] == [label for label, _ in expected[record["path"]]]
        assert [x["score"] for x in record["labels"]] == pytest.approx(
            [s for _, s in expected[record["path"]]], abs=1e-5
        )
        assert all(x["label"].startswith("Sound ") for x in record["labels"])
    with open(f"{out}.errors.csv", newline="") as f:
        errors = {Path(row["path"]).name: row["reason"] for row in csv.DictReader(f)}
    assert set(errors) == {"corrupt.wav", "short.wav"}
    assert "too short" in errors["short.wav"]

    # a rerun skips what is done (the bad files still fail); other settings are refused, --overwrite restarts
    before = out.read_text()
    assert main([str(tagger), str(root), "--top-k", "3", "--output", str(out), "--device", "cpu", "-q"]) == 1
    assert out.read_text() == before
    assert main([str(tagger), *good, "--top-k", "3", "--output", str(out), "--device", "cpu", "-q"]) == 0
    assert sorted(_read_jsonl(out), key=lambda r: r["path"]) == sorted(records, key=lambda r: r["path"])
    before = out.read_text()
    assert main([str(tagger), *good, "--top-k", "2", "--output", str(out), "-q"]) == 2
    assert out.read_text() == before
    assert main([str(tagger), good[0], "--top-k", "2", "--output", str(out), "--overwrite", "-q"]) == 0
    records = _read_jsonl(out)
    assert [r["path"] for r in records] == [good[0]] and len(records[0]["labels"]) == 2


def test_csv_output_and_standard_output(tagger, clips, tmp_path, capsys):
    _, good = clips
    out = tmp_path / "tags.csv"
    assert main([str(tagger), *good, "--top-k", "2", "--output", str(out), "-q"]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["path"] for r in rows) == good and all(len(json.loads(r["labels"])) == 2 for r in rows)
    capsys.readouterr()
    assert main([str(tagger), good[0], "--top-k", "1", "-q"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["path"] for r in lines] == [good[0]] and len(lines[0]["labels"]) == 1


def test_usage_errors_exit_2_before_any_work(tagger, clips, tmp_path):
    _, good = clips
    out = tmp_path / "o.jsonl"
    assert main([str(tmp_path / "no_model"), good[0], "--output", str(out)]) == 2
    assert main([str(tagger), str(tmp_path / "missing.wav"), "--output", str(out)]) == 2
    assert main([str(tagger), good[0], "--top-k", "0", "--output", str(out)]) == 2
    assert main([str(tagger), good[0], "--output", str(tmp_path / "o.txt")]) == 2
    assert main([str(tagger), good[0], "--precision", "fp8"]) == 2
    assert main([str(tagger)]) == 2  # no inputs
    checkpoint = microsoft_checkpoint(tmp_path / "iter3.pt", finetuned=False)
    embeddings = package_beats_checkpoint(checkpoint, tmp_path / "emb")
    assert main([str(embeddings), good[0], "--output", str(out)]) == 2
    assert not out.exists()


def test_python_dash_m_in_a_new_process(tagger, clips):
    _, good = clips
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "lobes.classify", str(tagger), *good, "--top-k", "2", "--device", "cpu", "-q"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = {r["path"]: r["labels"] for r in map(json.loads, proc.stdout.splitlines())}
    model = AudioClassifier.from_pretrained(tagger, device="cpu")
    expected = {p: [label for label, _ in tags] for p, tags in zip(good, model.classify(good, top_k=2))}
    assert {p: [x["label"] for x in labels] for p, labels in records.items()} == expected
