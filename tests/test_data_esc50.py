"""ESC-50 preparation on a fake 44.1 kHz tree: resampling, fold selection, reuse, errors."""

import csv
import os

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import resample_poly

from lobes.data.esc50 import ESC50_COLUMNS, prepare_esc50
from lobes.data.manifest import load_manifest

CATEGORIES = {0: "dog", 1: "rooster", 2: "rain"}


def _make_tree(parent, clips_per_class_and_fold=2):
    """<parent>/ESC-50-master/{audio/*.wav, meta/esc50.csv}: 5 folds x 3 classes x 2 clips of 0.3 s at 44.1 kHz."""
    root = os.path.join(parent, "ESC-50-master")
    os.makedirs(os.path.join(root, "audio"))
    os.makedirs(os.path.join(root, "meta"))
    rng = np.random.default_rng(0)
    rows = []
    for fold in range(1, 6):
        for target, category in CATEGORIES.items():
            for take in range(clips_per_class_and_fold):
                name = f"{fold}-{1000 + 10 * target + take}-{'AB'[take]}-{target}.wav"
                t = np.arange(int(0.3 * 44100)) / 44100
                tone = 0.5 * np.sin(2 * np.pi * (300 + 200 * target + 10 * fold) * t)
                wav = tone + 0.05 * rng.standard_normal(t.size)
                sf.write(os.path.join(root, "audio", name), wav, 44100, subtype="PCM_16")
                rows.append([name, fold, target, category, target == 0, 1000 + target, "AB"[take]])
    with open(os.path.join(root, "meta", "esc50.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "fold", "target", "category", "esc10", "src_file", "take"])
        writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    parent = tmp_path_factory.mktemp("esc")
    return str(parent), _make_tree(str(parent))


@pytest.fixture(scope="module")
def prepared(tree, tmp_path_factory):
    parent, root = tree
    save = tmp_path_factory.mktemp("esc_out")
    return str(save), prepare_esc50(parent, str(save), test_fold=5, valid_fold=4, num_workers=0)


def test_resampled_to_16k_like_scipy(tree, prepared):
    _, root = tree
    save, paths = prepared
    rows = load_manifest(paths["test"], required=ESC50_COLUMNS)
    assert rows
    for row in rows:
        info = sf.info(row["wav"])
        assert info.samplerate == 16000 and info.channels == 1
        assert row["wav"].startswith(os.path.join(save, "audio_16000"))
        assert float(row["duration"]) == info.frames / 16000 and abs(float(row["duration"]) - 0.3) < 1e-3
        original, rate = sf.read(os.path.join(root, "audio", row["ID"] + ".wav"), dtype="float32")
        reference = resample_poly(original, 160, 441)
        ours, _ = sf.read(row["wav"], dtype="float32")
        assert ours.shape == reference.shape
        np.testing.assert_allclose(ours, reference, atol=1.0 / 32768 + 1e-6)  # 16-bit quantisation


def test_fold_selection(prepared):
    _, paths = prepared
    rows = {name: load_manifest(path, required=ESC50_COLUMNS) for name, path in paths.items()}
    assert {r["fold"] for r in rows["test"]} == {"5"}
    assert {r["fold"] for r in rows["valid"]} == {"4"}
    assert {r["fold"] for r in rows["train"]} == {"1", "2", "3"}
    assert [len(rows[k]) for k in ("train", "valid", "test")] == [18, 6, 6]
    assert {r["label"] for r in rows["test"]} == set(CATEGORIES.values())
    with open(paths["train"]) as handle:
        assert handle.readline().strip() == "ID,duration,wav,label,fold"


@pytest.mark.parametrize("test_fold", [1, 3])
def test_cross_validation_folds_and_reuse(tree, prepared, test_fold):
    parent, root = tree
    save, _ = prepared
    audio = os.path.join(save, "audio_16000")
    mtimes = {name: os.stat(os.path.join(audio, name)).st_mtime_ns for name in os.listdir(audio)}
    paths = prepare_esc50(root, save, test_fold=test_fold, valid_fold=None, num_workers=0)
    # the resampled clips are reused, not written again
    assert {name: os.stat(os.path.join(audio, name)).st_mtime_ns for name in os.listdir(audio)} == mtimes
    rows = {name: load_manifest(path, required=ESC50_COLUMNS) for name, path in paths.items()}
    assert {r["fold"] for r in rows["test"]} == {str(test_fold)}
    train_ids, valid_ids = {r["ID"] for r in rows["train"]}, {r["ID"] for r in rows["valid"]}
    assert valid_ids and not train_ids & valid_ids
    assert {r["fold"] for r in rows["valid"]} | {r["fold"] for r in rows["train"]} == {"1", "2", "3", "4", "5"} - {
        str(test_fold)
    }
    assert len(train_ids) + len(valid_ids) + len(rows["test"]) == 30
    # valid taken from every class of the training folds
    assert {r["label"] for r in rows["valid"]} == set(CATEGORIES.values())


def test_errors(tree, tmp_path):
    parent, root = tree
    with pytest.raises(FileNotFoundError, match="ESC-50 meta file not found"):
        prepare_esc50(str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="test_fold must be one of the folds \\[1, 2, 3, 4, 5\\], got 6"):
        prepare_esc50(root, str(tmp_path / "out"), test_fold=6)
    with pytest.raises(ValueError, match="valid_fold must be None or a fold"):
        prepare_esc50(root, str(tmp_path / "out"), test_fold=2, valid_fold=2)
    broken_parent = tmp_path / "broken"
    broken = _make_tree(str(broken_parent), clips_per_class_and_fold=1)
    victim = sorted(os.listdir(os.path.join(broken, "audio")))[0]
    os.remove(os.path.join(broken, "audio", victim))
    with pytest.raises(FileNotFoundError, match=f"1 ESC-50 clips listed .* are missing .*{victim}"):
        prepare_esc50(str(broken_parent), str(tmp_path / "out"))
