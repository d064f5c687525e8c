"""The README's "Use a trained model" lines, run verbatim on tiny trained runs: one case per sub-section
("### Speech recognition", "### Audio classification"), each a shell line that packages the run, three lines of
Python that load the folder and print a result, and a shell line that runs the command on a file and a folder."""

import contextlib
import dataclasses
import importlib
import io
import json
import re
import shlex
import shutil
from pathlib import Path
from typing import Callable

import pytest
from test_inference_asr import ROOT, test_files, tiny_run
from test_inference_classify import held_out_items, tiny_classification_run

README = ROOT / "README.md"


def code_blocks(section: str) -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block under the README heading ``section``, up to the next heading
    of the same or a higher level."""
    text = README.read_text(encoding="utf-8")
    level = len(section) - len(section.lstrip("#"))
    start = text.index(f"\n{section}\n")
    rest = text[start + len(section) + 2 :]
    end = re.search(rf"^#{{1,{level}}} ", rest, flags=re.MULTILINE)
    body = rest[: end.start()] if end else rest
    return re.findall(r"^```(\w+)\n(.*?)^```$", body, flags=re.MULTILINE | re.DOTALL)


def run_shell_line(line: str) -> int:
    """``python -m lobes.X ARGS...`` run in this process (the module's ``main``), comments dropped."""
    argv = shlex.split(line, comments=True)
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("lobes."), f"unexpected README command: {line}"
    return importlib.import_module(argv[2]).main(argv[3:])


# --------------------------------------------------------------------------------------------------------------
# The two sub-sections: where their lines expect the run, the audio and the outputs, and what they must print
# --------------------------------------------------------------------------------------------------------------
def _asr_run(tmp_path_factory) -> tuple[Path, list[str]]:
    run = tiny_run(tmp_path_factory)
    return run, [row["wav"] for row in test_files(run)[:3]]


def _transcript(folder: str, path: str) -> tuple[str, Callable[[dict], bool]]:
    from lobes.inference import Transcriber

    text = Transcriber.from_pretrained(folder, device="cpu").transcribe(path).text
    return text + "\n", lambda record: record["text"] == text


def _classification_run(tmp_path_factory) -> tuple[Path, list[str]]:
    run, corpus = tiny_classification_run(tmp_path_factory)
    return run, [path for path, _ in held_out_items(corpus)[:3]]


def _labels(folder: str, path: str) -> tuple[str, Callable[[dict], bool]]:
    from lobes.inference import AudioClassifier

    labels = AudioClassifier.from_pretrained(folder, device="cpu").classify(path, top_k=3)
    return f"{labels}\n", lambda record: [x["label"] for x in record["labels"]] == [label for label, _ in labels]


@dataclasses.dataclass
class Case:
    section: str
    make_run: Callable  # tmp_path_factory -> (run folder, three audio files)
    results: str  # where the packaging line expects the run
    model: str  # the pretrained folder the lines write and read
    audio: str  # the file the lines name
    folder: str  # the folder the command line names
    output: str  # the command's --output
    expected: Callable  # (model folder, audio file) -> (printed text, check of the command's record)


CASES = [
    Case(
        "### Speech recognition",
        _asr_run,
        "results/ASR/hyperconformer/1234",
        "pretrained/asr",
        "speech.wav",
        "recordings",
        "transcripts.jsonl",
        _transcript,
    ),
    Case(
        "### Audio classification",
        _classification_run,
        "results/audio_classification/beats_tiny/1234",
        "pretrained/events",
        "clip.wav",
        "clips",
        "labels.jsonl",
        _labels,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.section.strip("# "))
def test_use_a_trained_model_lines(case, tmp_path_factory, tmp_path, monkeypatch):
    blocks = code_blocks(case.section)
    assert [lang for lang, _ in blocks] == ["shell", "python", "shell"]
    assert len([line for line in blocks[1][1].splitlines() if line.strip()]) == 3
    assert all(len(code.strip().splitlines()) == 1 for lang, code in blocks if lang == "shell")
    run, audio = case.make_run(tmp_path_factory)
    monkeypatch.chdir(tmp_path)
    results = Path(case.results)
    results.parent.mkdir(parents=True)
    results.symlink_to(run, target_is_directory=True)
    shutil.copy(audio[0], case.audio)
    Path(case.folder).mkdir()
    for path in audio[1:]:
        shutil.copy(path, Path(case.folder) / Path(path).name)

    assert run_shell_line(blocks[0][1]) == 0  # package the run
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(blocks[1][1], "README.md", "exec"), {})
    expected, record_is_right = case.expected(case.model, case.audio)
    assert printed.getvalue() == expected
    assert run_shell_line(blocks[2][1]) == 0  # run the command on a file and a folder
    records = [json.loads(line) for line in Path(case.output).read_text().splitlines()]
    assert sorted(Path(r["path"]).name for r in records) == sorted([case.audio] + [Path(p).name for p in audio[1:]])
    assert record_is_right(next(r for r in records if r["path"] == case.audio))


@pytest.mark.parametrize("section", [case.section for case in CASES])
def test_sections_are_under_use_a_trained_model(section):
    text = README.read_text(encoding="utf-8")
    assert text.index("## Use a trained model") < text.index(f"\n{section}\n") < text.index("## What is inside")
