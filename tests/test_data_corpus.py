"""lobes.data.corpus: two builders of one split take turns instead of undoing each other's files."""

import os
import threading
import time

import numpy as np

from lobes.data.corpus import build_split, lock_path
from lobes.data.manifest import load_manifest
from lobes.io import exclusive_lock

RENDERED: list[str] = []


def _slow_render(items: list[dict]) -> list[np.ndarray]:
    RENDERED.extend(item["ID"] for item in items)
    time.sleep(0.3)  # long enough for the other builder to arrive while this one works
    return [np.full(400 * (int(item["ID"][1:]) + 1), 0.1, dtype=np.float32) for item in items]


def test_two_builders_of_one_split_take_turns(tmp_path, caplog):
    folder = tmp_path / "wavs"
    items = [{"ID": f"u{i}", "wav": str(folder / f"u{i}.wav")} for i in range(4)]
    manifest = str(tmp_path / "split.csv")
    RENDERED.clear()
    results, errors = [], []

    def build():
        try:
            results.append(build_split(items, _slow_render, str(folder), manifest, ["ID", "duration", "wav"], 0, 2))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    caplog.set_level("INFO")
    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join(timeout=30)
    assert not errors and results == [manifest, manifest]
    assert sorted(RENDERED) == [f"u{i}" for i in range(4)], "each file is rendered once"
    assert "waiting for another process" in caplog.text and "completed by another process" in caplog.text
    rows = load_manifest(manifest, ("ID", "duration", "wav"))
    assert [(r["ID"], float(r["duration"])) for r in rows] == [(f"u{i}", 400 * (i + 1) / 16000) for i in range(4)]
    assert os.path.isfile(lock_path(manifest))


def test_a_held_lock_blocks_until_released(tmp_path):
    path = tmp_path / ".x.lock"
    order = []

    def second():
        with exclusive_lock(path):
            order.append("second")

    with exclusive_lock(path):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.2)
        order.append("first")
    thread.join(timeout=10)
    assert order == ["first", "second"]
