"""An offline audio-event classification corpus: spoken keywords and synthetic sound events.

Twelve classes (:data:`EVENT_CLASSES`): six keywords spoken by espeak-ng voices ("yes", "no",
"stop", "go", "left", "right") and six non-speech events (pure tone, chirp, click train, noise
burst, siren, knock). Each clip lasts ``clip_seconds`` (1.0 s) at 16 kHz: the event sits at a random
offset over random background noise at a random SNR, with a random peak level. Keyword voices are
split by variant (no test or valid variant is heard in training, see
:func:`lobes.data.speech.split_variants`), and every split draws its parameters from its own random
stream, so no test clip's random draw is seen in training.

Layout written under ``data_folder``: ``train.csv valid.csv test.csv`` (columns
``ID, duration, wav, label``), ``train/ valid/ test/`` wavs, ``voices.json`` (the keyword voice
variants of each split), completion markers.

Example
-------
>>> import tempfile
>>> from lobes.data.manifest import load_manifest
>>> with tempfile.TemporaryDirectory() as folder:
...     paths = prepare_event_corpus(folder, 1, 1, 1, classes=["yes", "tone"])
...     sorted(row["label"] for row in load_manifest(paths["train"], required=EVENT_COLUMNS))
['tone', 'yes']
"""

from __future__ import annotations

import json
import os

import numpy as np

from lobes.data.audio import scale_to_peak, synthetic_noise, trim_silence
from lobes.data.corpus import SAMPLE_RATE, build_split, write_if_changed
from lobes.data.espeak import list_base_voices, list_voice_variants, synthesize_batch
from lobes.data.speech import split_variants

__all__ = [
    "EVENT_CLASSES",
    "EVENT_COLUMNS",
    "KEYWORDS",
    "SOUND_EVENTS",
    "prepare_event_corpus",
    "render_event",
    "render_events",
]

KEYWORDS = ["yes", "no", "stop", "go", "left", "right"]
"""Spoken keyword classes."""

SOUND_EVENTS = ["tone", "chirp", "click_train", "noise_burst", "siren", "knock"]
"""Synthetic non-speech classes."""

EVENT_CLASSES: list[str] = KEYWORDS + SOUND_EVENTS
"""Label order of the event corpus (index = class id)."""

EVENT_COLUMNS = ["ID", "duration", "wav", "label"]
"""Columns of the event manifests."""

_SPLITS = ("train", "valid", "test")

_DEFAULTS = {
    "classes": None,  # None: EVENT_CLASSES
    "clip_seconds": 1.0,
    "base_voices": None,  # None: every English base voice but en-shaw
    "variants": None,  # None: every bundled variant
    "valid_variant_fraction": 0.1,
    "test_variant_fraction": 0.15,
    "rate_range": (140, 260),
    "noise_probability": 0.8,
    "noise_kinds": ("white", "pink", "brown", "hum", "rumble"),
    "snr_range": (5.0, 30.0),
    "peak_dbfs_range": (-20.0, -1.0),
    "num_workers": None,
    "chunk_size": 16,
}


def _fade(wav: np.ndarray, seconds: float = 0.01) -> np.ndarray:
    n = min(int(seconds * SAMPLE_RATE), wav.shape[0] // 2)
    if n > 0:
        ramp = np.linspace(0.0, 1.0, n)
        wav[:n] *= ramp
        wav[-n:] *= ramp[::-1]
    return wav


def _tone(rng: np.random.Generator) -> np.ndarray:
    seconds = rng.uniform(0.2, 0.8)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    freq = np.exp(rng.uniform(np.log(300.0), np.log(3000.0)))
    wav = np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
    wav += rng.uniform(0.0, 0.3) * np.sin(4 * np.pi * freq * t)  # a little second harmonic
    return _fade(wav)


def _chirp(rng: np.random.Generator) -> np.ndarray:
    seconds = rng.uniform(0.3, 0.8)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    low, high = np.exp(rng.uniform(np.log(200.0), np.log(800.0))), np.exp(rng.uniform(np.log(1500.0), np.log(5000.0)))
    f0, f1 = (low, high) if rng.random() < 0.5 else (high, low)
    if rng.random() < 0.5:  # linear sweep
        phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds))
    else:  # exponential sweep
        k = np.log(f1 / f0) / seconds
        phase = 2 * np.pi * f0 * (np.exp(k * t) - 1) / k
    return _fade(np.sin(phase))


def _click_train(rng: np.random.Generator) -> np.ndarray:
    seconds = rng.uniform(0.3, 0.9)
    wav = np.zeros(int(seconds * SAMPLE_RATE))
    rate = rng.uniform(5.0, 30.0)
    click_len = int(rng.uniform(0.001, 0.004) * SAMPLE_RATE)
    click = rng.standard_normal(click_len) * np.exp(-np.arange(click_len) / (click_len / 4))
    period = int(SAMPLE_RATE / rate)
    for start in range(0, wav.shape[0] - click_len, period):
        onset = start + int(rng.integers(0, max(1, period // 10)))
        gain = rng.uniform(0.6, 1.0)
        n = min(click_len, wav.shape[0] - onset)  # a click jittered past the end is cut (or dropped)
        if n > 0:
            wav[onset : onset + n] += click[:n] * gain
    return wav


def _noise_burst(rng: np.random.Generator) -> np.ndarray:
    seconds = rng.uniform(0.1, 0.5)
    num = int(seconds * SAMPLE_RATE)
    wav = synthetic_noise(rng, num, ("white", "pink", "blue")[int(rng.integers(3))]).astype(np.float64)
    decay = rng.uniform(0.0, 8.0)  # from flat to strongly decaying
    wav *= np.exp(-decay * np.arange(num) / num)
    return _fade(wav, 0.005)


def _siren(rng: np.random.Generator) -> np.ndarray:
    seconds = rng.uniform(0.6, 0.95)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    centre, deviation, rate = rng.uniform(600.0, 1500.0), rng.uniform(150.0, 500.0), rng.uniform(1.5, 5.0)
    freq = centre + deviation * np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi))
    phase = 2 * np.pi * np.cumsum(freq) / SAMPLE_RATE
    return _fade(np.sin(phase) + 0.2 * np.sin(3 * phase))


def _knock(rng: np.random.Generator) -> np.ndarray:
    count = int(rng.integers(2, 5))
    gap = rng.uniform(0.1, 0.22)
    strike_len = int(0.12 * SAMPLE_RATE)
    t = np.arange(strike_len) / SAMPLE_RATE
    strike = np.zeros(strike_len)
    for _ in range(int(rng.integers(2, 5))):  # damped resonances of the door
        strike += rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * rng.uniform(120.0, 900.0) * t) * np.exp(
            -t / rng.uniform(0.01, 0.04)
        )
    wav = np.zeros(int((gap * (count - 1)) * SAMPLE_RATE) + strike_len)
    for index in range(count):
        start = int(index * gap * SAMPLE_RATE)
        wav[start : start + strike_len] += strike * rng.uniform(0.7, 1.0)
    return wav


_EVENT_RENDERERS = {
    "tone": _tone,
    "chirp": _chirp,
    "click_train": _click_train,
    "noise_burst": _noise_burst,
    "siren": _siren,
    "knock": _knock,
}


def render_events(items: list[dict]) -> list[np.ndarray]:
    """The clips (16 kHz float32, ``clip_seconds`` long) of a chunk of planned items."""
    keywords = [item for item in items if item["label"] not in _EVENT_RENDERERS]
    spoken = synthesize_batch(
        [
            {
                "text": item["label"],
                "voice": item["base"],
                "variant": item["variant"],
                "rate": item["rate"],
                "pitch": item["pitch"],
                "pitch_range": item["intonation"],
                "seed": item["seed"],
            }
            for item in keywords
        ],
        sample_rate=SAMPLE_RATE,
    )
    speech = {id(item): wav for item, wav in zip(keywords, spoken)}
    return [render_event(item, speech.get(id(item))) for item in items]


def render_event(item: dict, speech: np.ndarray | None = None) -> np.ndarray:
    """One clip: the event (or the given keyword ``speech``) at its offset, noise, and peak level."""
    rng = np.random.default_rng(item["seed"])
    clip = int(round(item["clip_seconds"] * SAMPLE_RATE))
    if item["label"] in _EVENT_RENDERERS:
        event = _EVENT_RENDERERS[item["label"]](rng)
    else:
        if speech is None:
            raise ValueError(f"keyword item {item['ID']} needs its synthesized speech")
        event = trim_silence(speech, threshold=0.02, margin=int(0.01 * SAMPLE_RATE))
    event = np.asarray(event, dtype=np.float64)[:clip]
    peak = np.max(np.abs(event)) if event.size else 0.0
    if peak > 0:
        event = event / peak
    wav = np.zeros(clip)
    offset = int(item["offset"] * (clip - event.shape[0]))
    wav[offset : offset + event.shape[0]] = event
    wav = wav.astype(np.float32)
    if item["noise"] is not None:
        # SNR over the event itself, not the whole clip (short events stay audible)
        noise = synthetic_noise(rng, clip, item["noise"], SAMPLE_RATE)
        event_power = float(np.mean(event**2)) if event.size else 0.0
        scale = np.sqrt(event_power / 10 ** (item["snr"] / 10.0))
        wav = wav + (scale * noise).astype(np.float32)
    return scale_to_peak(wav, item["peak_dbfs"])


def _options(options: dict) -> dict:
    unknown = sorted(set(options) - set(_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown options {unknown} for prepare_event_corpus; valid options: {sorted(_DEFAULTS)}")
    merged = {**_DEFAULTS, **options}
    classes = EVENT_CLASSES if merged["classes"] is None else list(merged["classes"])
    bad = [c for c in classes if c not in EVENT_CLASSES]
    if bad or len(set(classes)) != len(classes) or not classes:
        raise ValueError(f"classes must be distinct names from {EVENT_CLASSES}, got {classes}")
    merged["classes"] = classes
    if merged["clip_seconds"] < 0.5:
        raise ValueError(f"clip_seconds must be at least 0.5 s, got {merged['clip_seconds']}")
    return merged


def _plan_split(
    split: str, per_class: int, folder: str, seed: int, bases: list[str], variants: list[str], opts: dict
) -> list[dict]:
    rng = np.random.default_rng([seed, _SPLITS.index(split), 2])
    items = []
    for index in range(per_class):
        for label in opts["classes"]:  # interleaved: any prefix of the manifest is nearly balanced
            noise = None
            if opts["noise_kinds"] and rng.random() < opts["noise_probability"]:
                noise = opts["noise_kinds"][int(rng.integers(len(opts["noise_kinds"])))]
            uid = f"{split}_{label}_{index:04d}"
            item = {
                "ID": uid,
                "wav": os.path.join(folder, split, uid + ".wav"),
                "label": label,
                "clip_seconds": float(opts["clip_seconds"]),
                "offset": round(float(rng.random()), 4),
                "noise": noise,
                "snr": round(float(rng.uniform(*opts["snr_range"])), 3),
                "peak_dbfs": round(float(rng.uniform(*opts["peak_dbfs_range"])), 3),
                "seed": int(rng.integers(2**31 - 1)),
                "base": None,
                "variant": None,
                "rate": 0,
                "pitch": 0,
                "intonation": 0,
            }
            if label in KEYWORDS:
                item["base"] = bases[int(rng.integers(len(bases)))]
                item["variant"] = variants[int(rng.integers(len(variants)))]
                item["rate"] = int(rng.integers(opts["rate_range"][0], opts["rate_range"][1] + 1))
                item["pitch"] = int(rng.integers(10, 91))
                item["intonation"] = int(rng.integers(10, 91))
            items.append(item)
    return items


def prepare_event_corpus(
    data_folder: str,
    num_train_per_class: int = 200,
    num_valid_per_class: int = 20,
    num_test_per_class: int = 40,
    seed: int = 1234,
    **options,
) -> dict[str, str]:
    """Synthesize (or complete) the event corpus and return its manifests.

    Arguments
    ---------
    data_folder : str
        Where the wavs and CSVs go (created if needed).
    num_train_per_class, num_valid_per_class, num_test_per_class : int
        Clips per class and split (the splits are exactly balanced).
    seed : int
        Same seed, byte-identical manifests and audio.
    **options
        ``classes`` (subset of :data:`EVENT_CLASSES`, in that order of labels), ``clip_seconds``
        (1.0), ``base_voices``, ``variants``, ``valid_variant_fraction`` (0.1),
        ``test_variant_fraction`` (0.15), ``rate_range`` ((140, 260) words/min),
        ``noise_probability`` (0.8), ``noise_kinds``, ``snr_range`` ((5, 30) dB),
        ``peak_dbfs_range`` ((-20, -1)), ``num_workers``, ``chunk_size`` (16 clips share one load
        of the synthesizer).

    Returns
    -------
    dict
        ``{"train": path, "valid": path, "test": path}`` of CSVs with columns ``ID, duration, wav, label``.

    Example
    -------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     paths = prepare_event_corpus(folder, 1, 0, 0, classes=["chirp", "knock"])
    ...     open(paths["train"]).readline().strip()
    'ID,duration,wav,label'
    """
    sizes = {"train": num_train_per_class, "valid": num_valid_per_class, "test": num_test_per_class}
    for name, value in sizes.items():
        if not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"num_{name}_per_class must be a non-negative integer, got {value!r}")
    opts = _options(options)
    data_folder = os.path.abspath(data_folder)
    os.makedirs(data_folder, exist_ok=True)
    available_bases = list_base_voices("en")
    bases = [v for v in available_bases if v != "en-shaw"] if opts["base_voices"] is None else list(opts["base_voices"])
    unknown = [v for v in bases if v not in available_bases]
    if unknown or not bases:
        raise ValueError(f"unknown or no base voices {unknown or bases}; available: {available_bases}")
    available = list_voice_variants()
    variants = available if opts["variants"] is None else list(opts["variants"])
    unknown = [v for v in variants if v not in available]
    if unknown:
        raise ValueError(f"unknown voice variants {unknown}; available: {available}")
    parts = split_variants(variants, seed, opts["valid_variant_fraction"], opts["test_variant_fraction"])
    voice_sets = {"train": [None] + parts["train"], "valid": parts["valid"], "test": parts["test"]}
    if any(c in KEYWORDS for c in opts["classes"]):
        for split in ("valid", "test"):
            if sizes[split] > 0 and not voice_sets[split]:
                raise ValueError(
                    f"too few variants ({len(variants)}) to hold out keyword voices for the {split} split"
                )
    write_if_changed(
        os.path.join(data_folder, "voices.json"),
        json.dumps({"base_voices": bases, "variants": parts, "seed": seed}, indent=1) + "\n",
    )
    paths = {}
    for split in _SPLITS:
        items = _plan_split(split, sizes[split], data_folder, seed, bases, voice_sets[split], opts)
        paths[split] = build_split(
            items,
            render_events,
            os.path.join(data_folder, split),
            os.path.join(data_folder, f"{split}.csv"),
            EVENT_COLUMNS,
            num_workers=opts["num_workers"],
            chunk_size=opts["chunk_size"],
            extra={"sample_rate": SAMPLE_RATE, "version": 1},
        )
    return paths
