"""An offline English speech corpus synthesized with espeak-ng, in SpeechBrain's CSV format.

Each utterance is a random sentence (:mod:`lobes.data.text`) spoken by a random voice — a base
voice (English accent) combined with a voice variant — at a random speaking rate, pitch and pitch
range, padded with a little silence, mixed with noise at a random SNR and scaled to a random peak
level. The splits are disjoint by voice variant: no variant of the test (or valid) set is heard in
training, so a test voice is never seen in training. No valid or test sentence is a training sentence.
With ``train_formant_jitter`` every training utterance gets a voice of its own: the formants of its
drawn voice moved by random factors, so training hears many more voices than the bundled variants.
With ``train_echo_share`` a share of the training utterances takes the echo of another training
variant, so echo and voice are drawn apart.
The optional ``test_new_words`` split is spoken by the test voices and every sentence of it holds at
least one noun the grammar never produces, for measuring open-vocabulary decoding.

Layout written under ``data_folder``::

    train.csv valid.csv test.csv       columns ID, duration, wav, spk_id, wrd
    test_new_words.csv                 (with num_test_new_words > 0) test voices, sentences holding words
                                       that no training sentence has (:data:`lobes.data.text.HELD_OUT_WORDS`)
    train/ valid/ test/ ...            16 kHz mono 16-bit wavs
    voices.json                        the variant of each split
    .train.csv.done ...                completion markers (written last)

Example
-------
>>> import tempfile
>>> with tempfile.TemporaryDirectory() as folder:
...     paths = prepare_speech_corpus(folder, num_train=2, num_valid=1, num_test=1)
>>> sorted(paths)
['test', 'train', 'valid']
"""

from __future__ import annotations

import json
import numbers
import os
import re

import numpy as np

from lobes.data.audio import mix_at_snr, scale_to_peak, synthetic_noise
from lobes.data.corpus import SAMPLE_RATE, build_split, write_if_changed
from lobes.data.espeak import list_base_voices, list_voice_variants, synthesize_batch, variant_echo
from lobes.data.noise import prepare_noise_corpus
from lobes.data.text import random_sentence, with_new_words

__all__ = ["SPEECH_COLUMNS", "render_utterances", "prepare_noise_corpus", "prepare_speech_corpus", "split_variants"]

SPEECH_COLUMNS = ["ID", "duration", "wav", "spk_id", "wrd"]
"""Columns of the speech manifests (LibriSpeech-style)."""

_SPLITS = ("train", "valid", "test", "test_new_words")  # the index seeds each split's plan

_DEFAULTS = {
    "language_prefix": "en",
    "base_voices": None,  # None: every base voice of language_prefix except exclude_base_voices
    "exclude_base_voices": ("en-shaw",),  # Shavian-alphabet voice
    "variants": None,  # None: every bundled variant
    "valid_variant_fraction": 0.1,
    "test_variant_fraction": 0.15,
    "rate_range": (130, 230),  # words per minute
    "pitch_range": (20, 80),  # espeak pitch, 0..100
    "intonation_range": (20, 90),  # espeak pitch range, 0..100
    "noise_probability": 0.8,
    "noise_kinds": ("white", "pink", "brown", "hum", "rumble"),
    "snr_range": (10.0, 35.0),  # dB
    "peak_dbfs_range": (-20.0, -1.0),
    "pad_range": (0.0, 0.3),  # seconds of silence added at each end
    "max_words": None,
    "num_workers": None,
    "chunk_size": 16,  # utterances per load of the synthesizer (part of the plan)
    "train_formant_jitter": (0.0, 0.0),  # (frequency, strength): largest |log factor| for formants 0-5
    "train_echo_share": 0.0,  # share of training utterances given the echo of a random training variant
}
_JITTERED_FORMANTS = range(6)  # 1-3 shape the vowels, 0 and 4-5 the voice quality


def _family(variant: str) -> str:
    if re.fullmatch(r"m\d+", variant):
        return "male"
    if re.fullmatch(r"f\d+", variant):
        return "female"
    if variant.startswith("klatt"):
        return "klatt"
    return "named"


def split_variants(
    variants: list[str], seed: int = 1234, valid_fraction: float = 0.1, test_fraction: float = 0.15
) -> dict[str, list[str]]:
    """Partition voice variants into disjoint train / valid / test sets, stratified by family.

    Families are male (m1-m8), female (f1-f5), klatt* and named variants; each family with at least
    three members gives at least one variant to valid and to test.

    Arguments
    ---------
    variants : list of str
        Variant names (see :func:`lobes.data.espeak.list_voice_variants`).
    seed : int
        Seed of the shuffle.
    valid_fraction, test_fraction : float
        Share of each family held out for valid and test.

    Returns
    -------
    dict
        ``{"train": [...], "valid": [...], "test": [...]}``, each sorted.

    Example
    -------
    >>> parts = split_variants(["m1", "m2", "m3", "f1", "f2", "f3"], seed=0)
    >>> [len(parts[k]) for k in ("train", "valid", "test")]
    [2, 2, 2]
    """
    if not 0 <= valid_fraction < 1 or not 0 <= test_fraction < 1 or valid_fraction + test_fraction >= 1:
        raise ValueError(
            f"valid_fraction and test_fraction must be in [0, 1) with a sum below 1, got "
            f"{valid_fraction} and {test_fraction}"
        )
    families: dict[str, list[str]] = {}
    for variant in sorted(set(variants)):
        families.setdefault(_family(variant), []).append(variant)
    rng = np.random.default_rng([seed, 7])
    out: dict[str, list[str]] = {split: [] for split in _SPLITS}
    for family in sorted(families):
        members = families[family]
        order = [members[i] for i in rng.permutation(len(members))]
        n = len(order)
        n_test = max(1, round(test_fraction * n)) if n >= 3 and test_fraction > 0 else 0
        n_valid = max(1, round(valid_fraction * n)) if n >= 3 and valid_fraction > 0 else 0
        n_valid = min(n_valid, n - n_test - 1)
        out["test"] += order[:n_test]
        out["valid"] += order[n_test : n_test + n_valid]
        out["train"] += order[n_test + n_valid :]
    return {split: sorted(names) for split, names in out.items()}


def _options(options: dict) -> dict:
    unknown = sorted(set(options) - set(_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown options {unknown} for prepare_speech_corpus; valid options: {sorted(_DEFAULTS)}")
    merged = {**_DEFAULTS, **options}
    for name in ("rate_range", "pitch_range", "intonation_range", "snr_range", "peak_dbfs_range", "pad_range"):
        low, high = merged[name]
        if low > high:
            raise ValueError(f"{name} must be (low, high) with low <= high, got {merged[name]}")
    jitter = merged["train_formant_jitter"]
    try:
        ok = len(jitter) == 2 and all(0 <= float(v) < 2 for v in jitter)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            "train_formant_jitter must be (frequency, strength), each the largest |natural-log factor| "
            f"in [0, 2), e.g. (0.15, 0.3); got {jitter!r}"
        )
    share = merged["train_echo_share"]
    if isinstance(share, bool) or not isinstance(share, numbers.Real) or not 0 <= share <= 1:
        raise ValueError(f"train_echo_share must be a number in [0, 1], e.g. 0.3; got {share!r}")
    if merged["peak_dbfs_range"][1] > 0:
        raise ValueError(f"peak_dbfs_range must stay at or below 0 dBFS, got {merged['peak_dbfs_range']}")
    return merged


def _base_voices(opts: dict) -> list[str]:
    available = list_base_voices(opts["language_prefix"])
    if opts["base_voices"] is not None:
        unknown = [v for v in opts["base_voices"] if v not in available]
        if unknown:
            raise ValueError(f"unknown base voices {unknown}; available: {available}")
        chosen = list(opts["base_voices"])
    else:
        chosen = [v for v in available if v not in set(opts["exclude_base_voices"])]
    if not chosen:
        raise ValueError(f"no base voice left for language prefix {opts['language_prefix']!r}")
    return chosen


def _plan_split(
    split: str,
    num: int,
    folder: str,
    seed: int,
    bases: list[str],
    variants: list,
    opts: dict,
    exclude: frozenset = frozenset(),
) -> list[dict]:
    """Every random choice of a split, drawn up front so that rendering is a pure function of the item.
    A sentence in ``exclude`` (the training sentences, for the other splits) is drawn again."""
    rng = np.random.default_rng([seed, _SPLITS.index(split), 1])
    items = []
    for index in range(num):
        base = bases[int(rng.integers(len(bases)))]
        variant = variants[int(rng.integers(len(variants)))]
        text = _draw_sentence(rng, opts["max_words"], split == "test_new_words", exclude)
        noise = None
        if opts["noise_kinds"] and rng.random() < opts["noise_probability"]:
            noise = opts["noise_kinds"][int(rng.integers(len(opts["noise_kinds"])))]
        uid = f"{split}_{index:05d}"
        items.append(
            {
                "ID": uid,
                "wav": os.path.join(folder, split, uid + ".wav"),
                "spk_id": base if variant is None else f"{base}+{variant}",
                "wrd": text,
                "base": base,
                "variant": variant,
                "rate": int(rng.integers(opts["rate_range"][0], opts["rate_range"][1] + 1)),
                "pitch": int(rng.integers(opts["pitch_range"][0], opts["pitch_range"][1] + 1)),
                "intonation": int(rng.integers(opts["intonation_range"][0], opts["intonation_range"][1] + 1)),
                "noise": noise,
                "snr": round(float(rng.uniform(*opts["snr_range"])), 3),
                "peak_dbfs": round(float(rng.uniform(*opts["peak_dbfs_range"])), 3),
                "pad_start": round(float(rng.uniform(*opts["pad_range"])), 4),
                "pad_end": round(float(rng.uniform(*opts["pad_range"])), 4),
                "seed": int(rng.integers(2**31 - 1)),
            }
        )
    frequency, strength = (float(v) for v in opts["train_formant_jitter"])
    if split == "train" and (frequency or strength):
        # a stream of its own, so the rest of the plan (texts, voices, prosody) is the same with or without
        jitter_rng = np.random.default_rng([seed, _SPLITS.index(split), 2])
        for item in items:
            item["formant_scales"] = [
                [
                    number,
                    round(float(np.exp(jitter_rng.uniform(-frequency, frequency))), 4),
                    round(float(np.exp(jitter_rng.uniform(-strength, strength))), 4),
                ]
                for number in _JITTERED_FORMANTS
            ]
    share = float(opts["train_echo_share"])
    if split == "train" and share:
        echoes = [variant_echo(v) for v in variants if v is not None and variant_echo(v) != (0, 0)]
        if not echoes:
            named = [v for v in variants if v is not None]
            raise ValueError(
                f"train_echo_share needs a training voice variant with an echo; none of {named} has one "
                "(see lobes.data.espeak.variant_echo)"
            )
        echo_rng = np.random.default_rng([seed, _SPLITS.index(split), 3])  # a stream of its own, as above
        for item in items:
            taken, which = echo_rng.random() < share, int(echo_rng.integers(len(echoes)))
            if taken:
                item["echo"] = list(echoes[which])
    return items


def _draw_sentence(rng: np.random.Generator, max_words, new_words: bool, exclude: frozenset) -> str:
    while True:
        text = random_sentence(rng, max_words)
        if new_words:
            changed = with_new_words(rng, text)
            if changed == text:  # no noun to replace: draw another sentence
                continue
            text = changed
        if text not in exclude:
            return text


def render_utterances(items: list[dict]) -> list[np.ndarray]:
    """The waveforms (16 kHz float32) of a chunk of planned utterances, a pure function of the chunk."""
    speech = synthesize_batch(
        [
            {
                "text": item["wrd"].lower(),  # lower case: espeak spells out some all-capital words
                "voice": item["base"],
                "variant": item["variant"],
                "rate": item["rate"],
                "pitch": item["pitch"],
                "pitch_range": item["intonation"],
                "seed": item["seed"],
                "formant_scales": item.get("formant_scales"),
                "echo": item.get("echo"),
            }
            for item in items
        ],
        sample_rate=SAMPLE_RATE,
    )
    return [_finish(item, wav) for item, wav in zip(items, speech)]


def _finish(item: dict, speech: np.ndarray) -> np.ndarray:
    """Silence padding, background noise at the planned SNR, and the planned peak level."""
    start = np.zeros(int(item["pad_start"] * SAMPLE_RATE), dtype=np.float32)
    end = np.zeros(int(item["pad_end"] * SAMPLE_RATE), dtype=np.float32)
    wav = np.concatenate([start, speech, end])
    if item["noise"] is not None:
        rng = np.random.default_rng(item["seed"])
        wav = mix_at_snr(wav, synthetic_noise(rng, wav.shape[0], item["noise"], SAMPLE_RATE), item["snr"])
    return scale_to_peak(wav, item["peak_dbfs"])


def prepare_speech_corpus(
    data_folder: str,
    num_train: int = 6000,
    num_valid: int = 300,
    num_test: int = 600,
    seed: int = 1234,
    num_test_new_words: int = 0,
    **options,
) -> dict[str, str]:
    """Synthesize (or complete) the speech corpus and return its manifests.

    Arguments
    ---------
    data_folder : str
        Where the wavs and CSVs go (created if needed).
    num_train, num_valid, num_test : int
        Number of utterances per split.
    seed : int
        Everything (texts, voices, prosody, noise) is a function of the seed: the same seed gives
        byte-identical manifests and audio.
    num_test_new_words : int
        Utterances of the ``test_new_words`` split (test voices; every sentence holds at least one of
        :data:`lobes.data.text.HELD_OUT_WORDS`, which no other split has); 0: no such split.
    **options
        ``base_voices`` (list of base voices; default all of ``language_prefix="en"`` but
        ``exclude_base_voices=("en-shaw",)``), ``variants`` (default all bundled variants),
        ``valid_variant_fraction`` (0.1), ``test_variant_fraction`` (0.15), ``rate_range``
        ((130, 230) words/min), ``pitch_range`` ((20, 80)), ``intonation_range`` ((20, 90)),
        ``noise_probability`` (0.8), ``noise_kinds`` (white, pink, brown, hum, rumble),
        ``snr_range`` ((10, 35) dB), ``peak_dbfs_range`` ((-20, -1)), ``pad_range`` ((0, 0.3) s),
        ``max_words`` (None), ``num_workers`` (None: worker processes for large splits),
        ``chunk_size`` (16 utterances share one load of the synthesizer; changing it changes the
        audio slightly and regenerates the corpus), ``train_formant_jitter`` ((0, 0): training
        utterances speak with the bundled voices; (f, s): each training utterance scales the
        frequency of formants 0-5 of its voice by factors drawn log-uniformly in [e^-f, e^f] and
        their strength in [e^-s, e^s], a voice of its own; valid and test voices are never changed),
        ``train_echo_share`` (0: each training voice keeps its variant's echo; p: each training
        utterance, with probability p, takes instead the echo (delay, amplitude) of a training variant
        drawn at random among those that have one, :func:`lobes.data.espeak.variant_echo`).

    Returns
    -------
    dict
        ``{"train": path, "valid": path, "test": path}`` (and ``"test_new_words"`` when asked) of CSVs with columns
        ``ID, duration, wav, spk_id, wrd`` (wav: absolute path of a 16 kHz mono wav; spk_id: the
        voice, e.g. ``en-gb-scotland+m3``; wrd: upper-case words).

    Example
    -------
    >>> import tempfile
    >>> from lobes.data.manifest import load_manifest
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     paths = prepare_speech_corpus(folder, num_train=3, num_valid=1, num_test=1, seed=5)
    ...     rows = load_manifest(paths["train"], required=SPEECH_COLUMNS)
    >>> len(rows), rows[0]["wrd"] == rows[0]["wrd"].upper()
    (3, True)
    """
    sizes = {"train": num_train, "valid": num_valid, "test": num_test, "test_new_words": num_test_new_words}
    for name, value in ((f"num_{split}", size) for split, size in sizes.items()):
        if not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    opts = _options(options)
    data_folder = os.path.abspath(data_folder)
    os.makedirs(data_folder, exist_ok=True)
    bases = _base_voices(opts)
    available = list_voice_variants()
    if opts["variants"] is not None:
        unknown = [v for v in opts["variants"] if v not in available]
        if unknown:
            raise ValueError(f"unknown voice variants {unknown}; available: {available}")
        variants = list(opts["variants"])
    else:
        variants = available
    parts = split_variants(variants, seed, opts["valid_variant_fraction"], opts["test_variant_fraction"])
    for split in ("valid", "test"):
        if not parts[split] and {"valid": num_valid, "test": num_test}[split] > 0:
            raise ValueError(
                f"too few variants ({len(variants)}) to hold out voices for the {split} split; pass at least "
                "three variants of one family (e.g. m1, m2, m3)"
            )
    voice_sets = {
        "train": [None] + parts["train"],  # the plain base voice is a training voice
        "valid": parts["valid"],
        "test": parts["test"],
        "test_new_words": parts["test"],
    }
    write_if_changed(
        os.path.join(data_folder, "voices.json"),
        json.dumps({"base_voices": bases, "variants": parts, "seed": seed}, indent=1) + "\n",
    )
    paths = {}
    training_sentences = frozenset()
    for split in _SPLITS:
        if split == "test_new_words" and not num_test_new_words:
            continue
        items = _plan_split(
            split, sizes[split], data_folder, seed, bases, voice_sets[split], opts, exclude=training_sentences
        )
        if split == "train":
            training_sentences = frozenset(item["wrd"] for item in items)
        paths[split] = build_split(
            items,
            render_utterances,
            os.path.join(data_folder, split),
            os.path.join(data_folder, f"{split}.csv"),
            SPEECH_COLUMNS,
            num_workers=opts["num_workers"],
            chunk_size=opts["chunk_size"],
            extra={"sample_rate": SAMPLE_RATE, "version": 1},
        )
    return paths
