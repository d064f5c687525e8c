"""The synthetic audio-event corpus: classes, balance, determinism, disjoint voices and seeds, resume."""

import collections
import hashlib
import json
import os

import numpy as np
import pytest
import soundfile as sf

from lobes.data import events
from lobes.data.manifest import load_manifest

PER_CLASS = (2, 1, 1)


def _checksums(paths):
    return {
        (split, row["ID"]): hashlib.md5(open(row["wav"], "rb").read()).hexdigest()
        for split, path in paths.items()
        for row in load_manifest(path, required=events.EVENT_COLUMNS)
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("events_a")
    return folder, events.prepare_event_corpus(str(folder), *PER_CLASS, seed=9, num_workers=0)


def test_classes():
    assert len(events.EVENT_CLASSES) >= 10 and len(set(events.EVENT_CLASSES)) == len(events.EVENT_CLASSES)
    assert set(events.KEYWORDS) >= {"yes", "no", "stop", "go", "left", "right"}
    assert events.EVENT_CLASSES == events.KEYWORDS + events.SOUND_EVENTS


def test_balanced_one_second_clips(corpus):
    folder, paths = corpus
    for split, per_class in zip(("train", "valid", "test"), PER_CLASS):
        with open(paths[split]) as handle:
            assert handle.readline().strip() == "ID,duration,wav,label"
        rows = load_manifest(paths[split], required=events.EVENT_COLUMNS)
        counts = collections.Counter(row["label"] for row in rows)
        assert counts == {label: per_class for label in events.EVENT_CLASSES}
        for row in rows:
            info = sf.info(row["wav"])
            assert info.samplerate == 16000 and info.channels == 1 and info.frames == 16000
            assert float(row["duration"]) == 1.0
            wav, _ = sf.read(row["wav"])
            assert 0.05 < np.abs(wav).max() <= 1.0


def _band_energy_share(wav, low, high):
    power = np.abs(np.fft.rfft(wav)) ** 2
    freqs = np.fft.rfftfreq(wav.shape[0], 1 / 16000)
    return power[(freqs >= low) & (freqs < high)].sum() / power.sum()


def test_sound_events_have_their_signature():
    """Without background noise, each synthetic event shows the property that defines it."""

    def clip(label, seed=0):
        item = {
            "label": label,
            "clip_seconds": 1.0,
            "offset": 0.5,
            "noise": None,
            "snr": 0.0,
            "peak_dbfs": -3.0,
            "seed": seed,
        }
        return events.render_event(item)

    tone = clip("tone")
    spectrum = np.abs(np.fft.rfft(tone))
    assert spectrum.max() > 0.3 * spectrum.sum() / 20  # a few bins hold the energy
    siren = clip("siren")
    assert _band_energy_share(siren, 300, 2500) > 0.7
    knock = clip("knock")
    assert _band_energy_share(knock, 80, 1000) > 0.8
    burst = clip("noise_burst")
    active = np.abs(burst) > 1e-4
    assert 0.05 < active.mean() < 0.6  # a burst, not a continuous noise
    clicks = clip("click_train")
    assert (np.abs(clicks) > 0.5 * np.abs(clicks).max()).sum() >= 3
    for label in events.SOUND_EVENTS:
        assert not np.array_equal(clip(label, 0), clip(label, 1))


def test_keyword_voices_and_random_draws_are_disjoint(corpus, tmp_path):
    folder, _ = corpus
    parts = json.load(open(os.path.join(str(folder), "voices.json")))["variants"]
    assert not set(parts["train"]) & set(parts["test"]) and not set(parts["train"]) & set(parts["valid"])
    opts = events._options({})
    bases = ["en-us", "en"]
    voice_sets = {"train": [None] + parts["train"], "valid": parts["valid"], "test": parts["test"]}
    plans = {s: events._plan_split(s, 30, str(tmp_path), 9, bases, voice_sets[s], opts) for s in voice_sets}
    train_variants = {i["variant"] for i in plans["train"] if i["label"] in events.KEYWORDS}
    test_variants = {i["variant"] for i in plans["test"] if i["label"] in events.KEYWORDS}
    assert test_variants <= set(parts["test"]) and not train_variants & test_variants
    assert not {i["seed"] for i in plans["train"]} & {i["seed"] for i in plans["test"]}
    # and no test clip's audio equals a training clip's
    sums = _checksums(corpus[1])
    train_sums = {v for (split, _), v in sums.items() if split == "train"}
    assert not train_sums & {v for (split, _), v in sums.items() if split == "test"}


def test_determinism_and_no_regeneration(corpus, tmp_path, monkeypatch):
    folder, paths = corpus
    again = events.prepare_event_corpus(str(tmp_path / "b"), *PER_CLASS, seed=9, num_workers=0)
    assert _checksums(again) == _checksums(paths)
    assert open(again["test"]).read().replace(str(tmp_path / "b"), "") == open(paths["test"]).read().replace(
        str(folder), ""
    )
    other = events.prepare_event_corpus(str(tmp_path / "c"), 1, 0, 0, seed=10, num_workers=0)
    first = {k[1]: v for k, v in _checksums(paths).items() if k[0] == "train"}
    assert all(first[key[1]] != value for key, value in _checksums(other).items() if key[0] == "train")

    mtimes = {p: os.stat(p).st_mtime_ns for p in map(str, folder.rglob("*"))}
    monkeypatch.setattr(events, "render_events", lambda items: (_ for _ in ()).throw(AssertionError("rendered")))
    events.prepare_event_corpus(str(folder), *PER_CLASS, seed=9, num_workers=0)
    assert {p: os.stat(p).st_mtime_ns for p in map(str, folder.rglob("*"))} == mtimes


def test_interrupted_run_resumes(corpus, tmp_path, monkeypatch):
    folder, paths = corpus
    real = events.render_events
    calls = {"n": 0}

    def crash_in_second_chunk(items):
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("killed")
        return real(items)

    monkeypatch.setattr(events, "render_events", crash_in_second_chunk)
    with pytest.raises(RuntimeError, match="killed"):
        events.prepare_event_corpus(str(tmp_path), *PER_CLASS, seed=9, num_workers=0)
    # the first chunk (16 clips) is on disk, no manifest yet
    assert len(list((tmp_path / "train").glob("*.wav"))) == 16 and not (tmp_path / "train.csv").exists()
    monkeypatch.setattr(events, "render_events", real)
    resumed = events.prepare_event_corpus(str(tmp_path), *PER_CLASS, seed=9, num_workers=0)
    assert _checksums(resumed) == _checksums(paths)


def test_option_errors(tmp_path):
    with pytest.raises(ValueError, match="classes must be distinct names"):
        events.prepare_event_corpus(str(tmp_path), 1, 1, 1, classes=["yes", "meow"])
    with pytest.raises(TypeError, match="unknown options"):
        events.prepare_event_corpus(str(tmp_path), 1, 1, 1, colour="red")
    with pytest.raises(ValueError, match="num_train_per_class"):
        events.prepare_event_corpus(str(tmp_path), -2)


def test_click_train_survives_every_jitter():
    """Clicks jittered past the clip's end are cut, never a shape error (about 1 % of seeds hit it)."""
    for seed in range(3000):
        wav = events._click_train(np.random.default_rng(seed))
        assert np.isfinite(wav).all() and np.abs(wav).max() > 0, seed
