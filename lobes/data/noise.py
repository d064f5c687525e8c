"""A corpus of synthetic background noises for SpeechBrain's ``AddNoise`` augmentation.

Kinds: white, pink, brown and blue noise, mains hum, engine-like rumble, and babble (several espeak
voices speaking different sentences at once). The CSV has SpeechBrain's noise columns
``ID, duration, wav`` (plus ``wav_format, wav_opts``, which ``AddNoise``'s CSV reader needs) and can be
passed as ``AddNoise(csv_file=...)``.

Example
-------
>>> import tempfile
>>> from lobes.data.manifest import load_manifest
>>> with tempfile.TemporaryDirectory() as folder:
...     path = prepare_noise_corpus(folder, num=2, duration=0.5)
...     [row["ID"] for row in load_manifest(path, required=("ID", "duration", "wav"))]
['noise_0000_white', 'noise_0001_pink']
"""

from __future__ import annotations

import os

import numpy as np

from lobes.data.audio import NOISE_COLORS, scale_to_peak, synthetic_noise
from lobes.data.corpus import SAMPLE_RATE, build_split
from lobes.data.espeak import list_base_voices, list_voice_variants, synthesize
from lobes.data.text import random_sentence

__all__ = ["NOISE_COLUMNS", "NOISE_KINDS", "babble", "prepare_noise_corpus"]

NOISE_COLUMNS = ["ID", "duration", "wav", "wav_format", "wav_opts"]
"""Columns of the noise CSV: SpeechBrain's ``AddNoise`` reads it with its legacy CSV reader, which
wants ``<name>, <name>_format, <name>_opts`` triples after ``ID, duration``."""

NOISE_KINDS = NOISE_COLORS + ("hum", "rumble", "babble")
"""Kinds of noise of :func:`prepare_noise_corpus`, cycled in this order."""


def babble(rng: np.random.Generator, num_samples: int, num_talkers: int = 4) -> np.ndarray:
    """Several espeak voices talking at once (random sentences, voices and offsets), unit RMS.

    Example
    -------
    >>> import numpy as np
    >>> babble(np.random.default_rng(0), 8000, num_talkers=2).shape
    (8000,)
    """
    bases = [v for v in list_base_voices("en") if v != "en-shaw"]
    variants = list_voice_variants()
    out = np.zeros(num_samples, dtype=np.float64)
    for _ in range(num_talkers):
        position = int(rng.integers(0, max(1, num_samples // 4)))
        while position < num_samples:
            speech = synthesize(
                random_sentence(rng).lower(),
                voice=bases[int(rng.integers(len(bases)))],
                variant=variants[int(rng.integers(len(variants)))],
                rate=int(rng.integers(140, 240)),
                pitch=int(rng.integers(10, 90)),
                pitch_range=int(rng.integers(10, 90)),
                sample_rate=SAMPLE_RATE,
                seed=int(rng.integers(1 << 30)),
            )
            speech = speech / (np.sqrt(np.mean(speech.astype(np.float64) ** 2)) + 1e-9)
            stop = min(num_samples, position + speech.shape[0])
            out[position:stop] += speech[: stop - position]
            position = stop + int(rng.integers(0, SAMPLE_RATE // 4))
    rms = np.sqrt(np.mean(out**2)) + 1e-12
    return (out / rms).astype(np.float32)


def render_noises(items: list[dict]) -> list[np.ndarray]:
    """The waveforms of a chunk of planned noise clips."""
    return [render_noise(item) for item in items]


def render_noise(item: dict) -> np.ndarray:
    """The waveform of one planned noise clip (16 kHz float32)."""
    rng = np.random.default_rng(item["seed"])
    num_samples = int(round(item["seconds"] * SAMPLE_RATE))
    if item["kind"] == "babble":
        wav = babble(rng, num_samples, item["talkers"])
    else:
        wav = synthetic_noise(rng, num_samples, item["kind"], SAMPLE_RATE)
    return scale_to_peak(wav, item["peak_dbfs"])


def prepare_noise_corpus(
    data_folder: str,
    num: int = 60,
    seed: int = 1234,
    duration: float = 5.0,
    kinds: tuple[str, ...] = NOISE_KINDS,
    num_workers: int | None = None,
) -> str:
    """Write ``num`` synthetic noise clips and their CSV (``ID, duration, wav, wav_format, wav_opts``).

    Arguments
    ---------
    data_folder : str
        The clips go to ``<data_folder>/noise/`` and the CSV to ``<data_folder>/noise.csv``.
    num : int
        Number of clips; the kinds are cycled so that each is equally represented.
    seed : int
        Same seed, same clips (byte-identical).
    duration : float
        Length of each clip in seconds (``AddNoise`` crops or pads them to the batch length).
    kinds : tuple of str
        Subset of :data:`NOISE_KINDS`.
    num_workers : int, optional
        Worker processes (None: automatic).

    Returns
    -------
    str
        Path of the CSV, for ``speechbrain.augment.time_domain.AddNoise(csv_file=...)``.
    """
    unknown = [k for k in kinds if k not in NOISE_KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown or no noise kinds {unknown or list(kinds)}; expected a subset of {NOISE_KINDS}")
    if num <= 0 or duration <= 0:
        raise ValueError(f"num and duration must be positive, got num={num}, duration={duration}")
    data_folder = os.path.abspath(data_folder)
    rng = np.random.default_rng([seed, 11])
    items = []
    for index in range(num):
        kind = kinds[index % len(kinds)]
        uid = f"noise_{index:04d}_{kind}"
        items.append(
            {
                "ID": uid,
                "wav": os.path.join(data_folder, "noise", uid + ".wav"),
                "kind": kind,
                "seconds": float(duration),
                "talkers": int(rng.integers(3, 7)),
                "peak_dbfs": round(float(rng.uniform(-12.0, -1.0)), 3),
                "seed": int(rng.integers(2**31 - 1)),
                "wav_format": "wav",
                "wav_opts": "",
            }
        )
    return build_split(
        items,
        render_noises,
        os.path.join(data_folder, "noise"),
        os.path.join(data_folder, "noise.csv"),
        NOISE_COLUMNS,
        num_workers=num_workers,
        extra={"sample_rate": SAMPLE_RATE, "version": 1},
    )
