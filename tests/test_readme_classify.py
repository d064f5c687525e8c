"""The README's "### Audio classification" lines, run verbatim on a tiny trained classification run."""

import contextlib
import io
import json
import shutil
from pathlib import Path

from test_inference_classify import held_out_items, tiny_classification_run
from test_readme import README, code_blocks, run_shell_line


def test_audio_classification_lines(tmp_path_factory, tmp_path, monkeypatch):
    blocks = code_blocks("### Audio classification")
    assert [lang for lang, _ in blocks] == ["shell", "python", "shell"]
    assert len([line for line in blocks[1][1].splitlines() if line.strip()]) == 3
    assert all(len(code.strip().splitlines()) == 1 for lang, code in blocks if lang == "shell")
    run, corpus = tiny_classification_run(tmp_path_factory)
    monkeypatch.chdir(tmp_path)
    results = Path("results/audio_classification/beats_tiny/1234")
    results.parent.mkdir(parents=True)
    results.symlink_to(run, target_is_directory=True)
    paths = [p for p, _ in held_out_items(corpus)]
    shutil.copy(paths[0], "clip.wav")
    Path("clips").mkdir()
    for path in paths[1:3]:
        shutil.copy(path, Path("clips") / Path(path).name)

    assert run_shell_line(blocks[0][1]) == 0  # package the run
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(blocks[1][1], "README.md", "exec"), {})
    from lobes.inference import AudioClassifier

    expected = AudioClassifier.from_pretrained("pretrained/events", device="cpu").classify("clip.wav", top_k=3)
    assert printed.getvalue() == f"{expected}\n"
    assert run_shell_line(blocks[2][1]) == 0  # classify a file and a folder
    records = [json.loads(line) for line in Path("labels.jsonl").read_text().splitlines()]
    assert sorted(Path(r["path"]).name for r in records) == sorted(["clip.wav"] + [Path(p).name for p in paths[1:3]])
    clip = next(r for r in records if r["path"] == "clip.wav")
    assert [x["label"] for x in clip["labels"]] == [label for label, _ in expected]


def test_section_is_under_use_a_trained_model():
    text = README.read_text(encoding="utf-8")
    assert (
        text.index("## Use a trained model") < text.index("### Audio classification") < text.index("## What is inside")
    )
