"""LibriSpeech preparation on a tiny fake tree (flac written with soundfile)."""

import os

import numpy as np
import pytest
import soundfile as sf

from lobes.data.librispeech import LIBRISPEECH_COLUMNS, prepare_librispeech
from lobes.data.manifest import load_manifest

WORDS = ["HELLO WORLD", "A TALE OF TWO CITIES", "IT WAS THE BEST OF TIMES", "I DON'T KNOW"]


def _make_split(root, split, speakers=("19", "84"), chapters=("198", "121123"), utts=2):
    """<root>/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac + trans.txt; returns {id: (frames, words)}."""
    rng = np.random.default_rng(len(split))
    expected = {}
    for speaker in speakers:
        for chapter in chapters:
            folder = os.path.join(root, split, speaker, chapter)
            os.makedirs(folder)
            lines = []
            for index in range(utts):
                uid = f"{speaker}-{chapter}-{index:04d}"
                frames = int(rng.integers(1600, 8000))
                sf.write(os.path.join(folder, uid + ".flac"), rng.uniform(-0.3, 0.3, frames), 16000)
                words = WORDS[int(rng.integers(len(WORDS)))]
                lines.append(f"{uid} {words}")
                expected[uid] = (frames, words)
            with open(os.path.join(folder, f"{speaker}-{chapter}.trans.txt"), "w") as handle:
                handle.write("\n".join(lines) + "\n")
    return expected


@pytest.fixture()
def tree(tmp_path):
    root = tmp_path / "LibriSpeech"
    expected = {}
    for index, split in enumerate(("train-clean-100", "train-clean-360", "dev-clean", "test-clean")):
        expected[split] = _make_split(str(root), split, speakers=(f"{19 + index}", f"{840 + index}"))
    return tmp_path, expected


def test_manifests_match_the_tree(tree):
    parent, expected = tree
    save = parent / "csv"
    # the parent of LibriSpeech/ is accepted as well as LibriSpeech/ itself
    paths = prepare_librispeech(
        str(parent),
        str(save),
        tr_splits=("train-clean-100", "train-clean-360"),
        dev_splits=("dev-clean",),
        te_splits=("test-clean",),
    )
    assert paths == {role: str(save / f"{role}.csv") for role in ("train", "valid", "test")}
    for role, splits in (
        ("train", ("train-clean-100", "train-clean-360")),
        ("valid", ("dev-clean",)),
        ("test", ("test-clean",)),
    ):
        with open(paths[role]) as handle:
            assert handle.readline().strip() == ",".join(LIBRISPEECH_COLUMNS)
        rows = load_manifest(paths[role], required=LIBRISPEECH_COLUMNS)
        want = {uid: v for split in splits for uid, v in expected[split].items()}
        assert len(rows) == len(want) == 8 * len(splits)
        by_id = {row["ID"]: row for row in rows}
        for uid, (frames, words) in want.items():
            row = by_id[uid]
            assert float(row["duration"]) == frames / 16000
            assert row["wrd"] == words and row["spk_id"] == uid.split("-")[0]
            assert os.path.isabs(row["wav"]) and row["wav"].endswith(uid + ".flac")
            assert sf.info(row["wav"]).frames == frames


def test_second_call_does_not_rewrite(tree):
    parent, _ = tree
    root = str(parent / "LibriSpeech")
    paths = prepare_librispeech(root, str(parent / "csv"), ("train-clean-100",), ("dev-clean",), ("test-clean",))
    mtimes = {p: os.stat(p).st_mtime_ns for p in paths.values()}
    splits = (("train-clean-100",), ("dev-clean",), ("test-clean",))
    assert prepare_librispeech(root, str(parent / "csv"), *splits) == paths
    assert {p: os.stat(p).st_mtime_ns for p in paths.values()} == mtimes
    # other splits for a role: rewritten
    prepare_librispeech(root, str(parent / "csv"), ("train-clean-360",), ("dev-clean",), ("test-clean",))
    assert all("train-clean-360" in r["wav"] for r in load_manifest(paths["train"]))


def test_duplicate_ids_across_splits_are_refused(tmp_path):
    _make_split(str(tmp_path), "train-clean-100", speakers=("7",), chapters=("1",), utts=1)
    _make_split(str(tmp_path), "train-other-500", speakers=("7",), chapters=("1",), utts=1)
    with pytest.raises(ValueError, match="duplicate utterance IDs .*7-1-0000"):
        prepare_librispeech(str(tmp_path), str(tmp_path / "csv"), ("train-clean-100", "train-other-500"), (), ())


def test_skip_prep_touches_nothing(tmp_path):
    paths = prepare_librispeech(str(tmp_path / "nowhere"), str(tmp_path / "csv"), skip_prep=True)
    assert set(paths) == {"train", "valid", "test"} and not (tmp_path / "csv").exists()


def test_errors_name_the_problem(tree):
    parent, _ = tree
    root = parent / "LibriSpeech"
    with pytest.raises(FileNotFoundError, match="split folder 'train-other-500' not found"):
        prepare_librispeech(str(root), str(parent / "csv"), tr_splits=("train-other-500",))
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        prepare_librispeech(str(parent / "missing"), str(parent / "csv"))
    # a flac without its transcript line
    trans = root / "dev-clean" / "842" / "198" / "842-198.trans.txt"
    lines = trans.read_text().splitlines()
    trans.write_text(lines[0] + "\n")
    missing_uid = lines[1].split()[0]
    with pytest.raises(ValueError, match=f"no transcript line for {missing_uid} in .*842-198.trans.txt"):
        prepare_librispeech(str(root), str(parent / "csv"), tr_splits=(), dev_splits=("dev-clean",), te_splits=())
    # a chapter without any transcript file
    os.remove(trans)
    with pytest.raises(FileNotFoundError, match="transcript file .*842-198.trans.txt missing"):
        prepare_librispeech(str(root), str(parent / "csv"), tr_splits=(), dev_splits=("dev-clean",), te_splits=())
    # a transcript line whose flac is gone
    trans = root / "test-clean" / "22" / "198" / "22-198.trans.txt"
    uid = trans.read_text().split()[0]
    os.remove(root / "test-clean" / "22" / "198" / f"{uid}.flac")
    with pytest.raises(FileNotFoundError, match=f"lists \\['{uid}'\\] whose .flac files are missing"):
        prepare_librispeech(str(root), str(parent / "csv"), tr_splits=(), dev_splits=(), te_splits=("test-clean",))
