"""lobes.inputs: the settings record that guards resumed outputs."""

import json

import pytest

from lobes.inputs import SettingsMismatch, check_run_settings


def test_overwrite_clears_the_old_outputs_before_writing_the_new_record(tmp_path):
    record = tmp_path / "settings.json"
    assert check_run_settings(record, {"layer": 1}) is True
    seen = []
    kept = check_run_settings(record, {"layer": 2}, overwrite=True, clear=lambda: seen.append(record.read_text()))
    assert kept is False
    assert [json.loads(text) for text in seen] == [{"layer": 1}]  # cleared while the old record still stood
    assert json.loads(record.read_text()) == {"layer": 2}


def test_a_run_killed_while_clearing_keeps_refusing_the_new_settings(tmp_path):
    record = tmp_path / "settings.json"
    check_run_settings(record, {"layer": 1})

    def killed():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        check_run_settings(record, {"layer": 2}, overwrite=True, clear=killed)
    with pytest.raises(SettingsMismatch, match="layer: 1 before, 2 now"):
        check_run_settings(record, {"layer": 2})  # old outputs may remain: never resumed under the new record
    assert check_run_settings(record, {"layer": 1}) is True


def test_overwrite_without_a_record_clears_outputs_of_unknown_settings(tmp_path):
    cleared = []
    assert check_run_settings(tmp_path / "settings.json", {"x": 0}, overwrite=True, clear=lambda: cleared.append(1))
    assert cleared == [1]
    with pytest.raises(ValueError, match="overwrite needs clear"):
        check_run_settings(tmp_path / "other.json", {"x": 0}, overwrite=True)
