"""CSV manifests: round trip, SpeechBrain compatibility, clear errors, atomic writes."""

import os

import pytest

from lobes.data.manifest import ManifestError, check_manifest, load_manifest, write_manifest


def test_round_trip_with_awkward_values(tmp_path):
    path = str(tmp_path / "m.csv")
    rows = [
        {"ID": "a", "duration": 2.7174375, "wav": "/data/a b.wav", "wrd": 'SAID "HELLO", THEN LEFT'},
        {"ID": "b", "duration": 1.0, "wav": "/data/b.wav", "wrd": "I DON'T KNOW"},
    ]
    write_manifest(path, rows, ["ID", "duration", "wav", "wrd"])
    back = load_manifest(path, required=("ID", "duration", "wav", "wrd"))
    assert [r["wrd"] for r in back] == [r["wrd"] for r in rows]
    assert [float(r["duration"]) for r in back] == [2.7174375, 1.0]  # exact, not rounded
    assert check_manifest(path, ["ID", "wav"]) == ["ID", "duration", "wav", "wrd"]


def test_speechbrain_reads_what_we_write(tmp_path):
    from speechbrain.dataio.dataset import DynamicItemDataset

    path = str(tmp_path / "m.csv")
    write_manifest(
        path, [{"ID": "x1", "duration": 0.5, "wav": "/w.wav", "label": "dog"}], ["ID", "duration", "wav", "label"]
    )
    data = DynamicItemDataset.from_csv(path)
    data.set_output_keys(["id", "duration", "label"])
    assert data[0] == {"id": "x1", "duration": 0.5, "label": "dog"}


def test_missing_columns_name_file_and_columns(tmp_path):
    path = tmp_path / "classes.csv"
    path.write_text("ID,wav\nu1,/a.wav\n")
    with pytest.raises(ManifestError, match=r"classes\.csv lacks required columns \['label'\]; it has \['ID', 'wav'\]"):
        check_manifest(str(path), ("ID", "wav", "label"))
    with pytest.raises(ManifestError, match="lacks required columns \\['duration', 'wrd'\\]"):
        load_manifest(str(path), required=("ID", "duration", "wav", "wrd"))
    assert issubclass(ManifestError, ValueError)


def test_other_errors(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found: .*nope.csv"):
        load_manifest(str(tmp_path / "nope.csv"))
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ManifestError, match="is empty"):
        load_manifest(str(empty))
    dup = tmp_path / "dup.csv"
    dup.write_text("ID,wav\nu1,/a.wav\nu1,/b.wav\n")
    with pytest.raises(ManifestError, match="line 3: duplicate ID 'u1' \\(first on line 2\\)"):
        load_manifest(str(dup))
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("ID,wav\nu1,/a.wav,extra\n")
    with pytest.raises(ManifestError, match="line 2: expected 2 fields"):
        load_manifest(str(ragged))
    blank = tmp_path / "blank.csv"
    blank.write_text("ID,wav\nu1,\n")
    with pytest.raises(ManifestError, match="line 2: empty value in columns \\['wav'\\]"):
        load_manifest(str(blank))
    with pytest.raises(ManifestError, match="row 1 .* lacks columns \\['wav'\\]"):
        write_manifest(str(tmp_path / "w.csv"), [{"ID": "a", "wav": "x"}, {"ID": "b"}], ["ID", "wav"])


def test_write_is_atomic(tmp_path):
    path = tmp_path / "m.csv"
    write_manifest(str(path), [{"ID": "a", "wav": "/a.wav"}], ["ID", "wav"])
    before = path.read_text()
    with pytest.raises(ManifestError):
        write_manifest(str(path), [{"ID": "b", "wav": "/b.wav"}, {"ID": "c"}], ["ID", "wav"])
    assert path.read_text() == before  # a failed write leaves the old manifest whole
    assert os.listdir(tmp_path) == ["m.csv"]  # and no temporary file
