"""``python -m lobes.transcribe``: folders with a corrupt file, usage errors, resuming, settings records,
jsonl / csv / srt outputs, standard output, and the console scripts."""

import csv
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from test_inference_asr import ROOT, test_files, tiny_pretrained, tiny_run

from lobes.transcribe import main


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return tiny_pretrained(tmp_path_factory)


@pytest.fixture(scope="module")
def expected(tmp_path_factory, pretrained):
    """Transcriber's results for the tiny run's test files, by file name."""
    from lobes.inference import Transcriber

    rows = test_files(tiny_run(tmp_path_factory))
    transcriber = Transcriber.from_pretrained(pretrained, device="cpu")
    return {Path(r["wav"]).name: transcriber.transcribe(r["wav"]).to_dict() for r in rows}


@pytest.fixture()
def folder(tmp_path, tmp_path_factory):
    """The test files in a folder tree, plus a file that is not audio and one without samples."""
    rows = test_files(tiny_run(tmp_path_factory))
    root = tmp_path / "inputs"
    (root / "sub").mkdir(parents=True)
    for i, row in enumerate(rows):
        shutil.copy(row["wav"], root / ("sub" if i % 2 else "") / Path(row["wav"]).name)
    (root / "not_audio.wav").write_bytes(b"this is not a wav file")
    sf.write(root / "sub" / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    return root


def _jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_folder_with_a_corrupt_file(folder, expected, pretrained, tmp_path):
    out = tmp_path / "out.jsonl"
    assert main([str(pretrained), str(folder), "--output", str(out), "--device", "cpu"]) == 1
    records = _jsonl(out)
    assert sorted(Path(r["path"]).name for r in records) == sorted(expected)
    for record in records:
        assert list(record) == ["path", "text", "words"]
        assert {k: record[k] for k in ("text", "words")} == expected[Path(record["path"]).name]
    errors = list(csv.DictReader(open(f"{out}.errors.csv")))
    reasons = {Path(e["path"]).name: e["reason"] for e in errors}
    assert sorted(reasons) == ["empty.wav", "not_audio.wav"]
    assert "cannot read audio" in reasons["not_audio.wav"] and "no samples" in reasons["empty.wav"]
    settings = json.loads(Path(f"{out}.settings.json").read_text())
    assert settings["decoder"] == "greedy" and settings["precision"] == "fp32" and len(settings["model"]) == 64


def test_usage_errors_exit_2_before_any_work(folder, pretrained, tmp_path):
    out = tmp_path / "o.jsonl"
    good = str(next(folder.glob("*.wav")))
    assert main([str(tmp_path / "no_model"), good, "--output", str(out)]) == 2
    assert main([str(pretrained), str(tmp_path / "missing.wav"), "--output", str(out)]) == 2
    assert main([str(pretrained), good, "--output", str(tmp_path / "o.txt")]) == 2
    assert main([str(pretrained), good, "--output", str(out), "--batch-seconds", "0"]) == 2
    assert main([str(pretrained), str(folder), "--output", str(tmp_path / "o.srt")]) == 2  # srt: one recording
    assert main([str(pretrained), good, "--output", str(out), "--window-seconds", "1", "--context-seconds", "1"]) == 2
    assert main([str(pretrained), good, "--decoder", "nope"]) == 2  # argparse
    if not torch.cuda.is_available():
        assert main([str(pretrained), good, "--output", str(out), "--device", "cuda"]) == 2
    assert not out.exists() and not (tmp_path / "o.srt").exists()
    assert main(["--help"]) == 0


def test_resume_skips_done_inputs_and_other_settings_are_refused(folder, expected, pretrained, tmp_path):
    out = tmp_path / "out.jsonl"
    args = [str(pretrained), str(folder), "--output", str(out), "--device", "cpu"]
    assert main(args) == 1
    records = _jsonl(out)
    records[0]["text"] = "EDITED"  # a rerun must keep it (the input counts as done) ...
    removed = records.pop()  # ... and redo only the missing one
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(args) == 1
    again = _jsonl(out)
    assert again[0]["text"] == "EDITED" and again[-1] == removed and len(again) == len(expected)
    before = out.read_text()
    assert main(args + ["--decoder", "beam"]) == 2  # other settings: refused, output untouched
    assert out.read_text() == before
    assert main(args + ["--decoder", "beam", "--overwrite"]) == 1
    beam = _jsonl(out)
    assert len(beam) == len(expected) and all(r["text"] != "EDITED" for r in beam)
    assert json.loads(Path(f"{out}.settings.json").read_text())["decoder"] == "beam"
    (folder / "not_audio.wav").unlink()
    (folder / "sub" / "empty.wav").unlink()
    assert main(args + ["--decoder", "beam"]) == 0 and not Path(f"{out}.errors.csv").exists()


def test_csv_srt_and_standard_output(folder, expected, pretrained, tmp_path, capsys):
    out = tmp_path / "out.csv"
    assert main([str(pretrained), str(folder), "--output", str(out), "--device", "cpu", "-q"]) == 1
    rows = list(csv.DictReader(open(out)))
    assert list(rows[0]) == ["path", "text", "words"]
    for row in rows:
        assert row["text"] == expected[Path(row["path"]).name]["text"]
        assert json.loads(row["words"]) == expected[Path(row["path"]).name]["words"]
    name, result = max(expected.items(), key=lambda kv: len(kv[1]["words"]))
    wav = next(folder.rglob(name))
    srt = tmp_path / "subtitles.srt"
    assert main([str(pretrained), str(wav), "--output", str(srt)]) == 0
    cues = srt.read_text().strip().split("\n\n")
    assert cues[0].splitlines()[0] == "1"
    first_word = result["words"][0]
    start = cues[0].splitlines()[1].split(" --> ")[0]
    assert start == f"00:00:{int(first_word['start']):02d},{round(first_word['start'] % 1 * 1000):03d}"
    assert " ".join(c.splitlines()[2] for c in cues) == result["text"]
    capsys.readouterr()
    assert main([str(pretrained), str(wav)]) == 0  # no --output: JSON lines on standard output
    assert json.loads(capsys.readouterr().out) == {"path": str(wav), **result}


def test_command_line_in_a_new_process(folder, expected, pretrained, tmp_path):
    out = tmp_path / "out.jsonl"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lobes.transcribe",
            str(pretrained),
            str(folder),
            "--output",
            str(out),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "not_audio.wav" in proc.stderr and "empty.wav" in proc.stderr
    assert {Path(r["path"]).name: r["text"] for r in _jsonl(out)} == {k: v["text"] for k, v in expected.items()}
    scripts = {e.name: e.value for e in metadata.entry_points(group="console_scripts") if e.name.startswith("lobes-")}
    assert scripts.get("lobes-transcribe") == "lobes.transcribe:main"
    assert scripts.get("lobes-package") == "lobes.package:main"
