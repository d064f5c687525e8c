"""The README's "Use a trained model" lines, run verbatim on a tiny trained run."""

import contextlib
import importlib
import io
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
from test_inference_asr import ROOT, test_files, tiny_run

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


def test_speech_recognition_lines(tmp_path_factory, tmp_path, monkeypatch):
    blocks = code_blocks("### Speech recognition")
    assert [lang for lang, _ in blocks] == ["shell", "python", "shell"]
    python_lines = [line for line in blocks[1][1].splitlines() if line.strip()]
    assert len(python_lines) == 3 and all(
        len(code.strip().splitlines()) == 1 for lang, code in blocks if lang == "shell"
    )
    run = tiny_run(tmp_path_factory)
    monkeypatch.chdir(tmp_path)
    results = Path("results/ASR/hyperconformer/1234")
    results.parent.mkdir(parents=True)
    results.symlink_to(run, target_is_directory=True)
    rows = test_files(run)
    shutil.copy(rows[0]["wav"], "speech.wav")
    Path("recordings").mkdir()
    for row in rows[1:3]:
        shutil.copy(row["wav"], Path("recordings") / Path(row["wav"]).name)

    assert run_shell_line(blocks[0][1]) == 0  # package the run
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(blocks[1][1], "README.md", "exec"), {})
    from lobes.inference import Transcriber

    expected = Transcriber.from_pretrained("pretrained/asr", device="cpu").transcribe("speech.wav")
    assert printed.getvalue() == expected.text + "\n"
    assert run_shell_line(blocks[2][1]) == 0  # transcribe a file and a folder
    records = [json.loads(line) for line in Path("transcripts.jsonl").read_text().splitlines()]
    assert sorted(Path(r["path"]).name for r in records) == sorted(
        ["speech.wav"] + [Path(r["wav"]).name for r in rows[1:3]]
    )
    assert next(r for r in records if r["path"] == "speech.wav")["text"] == expected.text


@pytest.mark.parametrize("section", ["### Speech recognition"])
def test_sections_exist_under_use_a_trained_model(section):
    text = README.read_text(encoding="utf-8")
    assert text.index("## Use a trained model") < text.index(section)
