"""espeak-ng synthesis through ctypes: audio, voices, errors, determinism; and the signal functions."""

import numpy as np
import pytest
from scipy.signal import resample_poly

from lobes.data import audio, espeak

SENTENCE = "the quick brown fox jumps over the lazy dog"


@pytest.mark.parametrize(
    "voice, variant",
    [("en-us", None), ("en-gb-scotland", "f2"), ("en-029", "klatt"), ("en", "m3"), ("en-us-nyc", "whisper")],
)
def test_synthesize_gives_speech_at_16k(voice, variant):
    wav = espeak.synthesize(SENTENCE, voice=voice, variant=variant)
    assert wav.dtype == np.float32 and wav.ndim == 1
    # 9 words at 175 words/min: roughly 2-4 s of audio at 16 kHz
    assert 1.5 * 16000 < wav.shape[0] < 5 * 16000
    assert np.abs(wav).max() <= 1.0
    rms = float(np.sqrt(np.mean(wav**2)))
    assert rms > 0.01, f"near-silent output for {voice}+{variant}"
    # speech has energy in the voice band, not only DC or clicks
    spectrum = np.abs(np.fft.rfft(wav))
    freqs = np.fft.rfftfreq(wav.shape[0], 1 / 16000)
    band = spectrum[(freqs > 80) & (freqs < 4000)].sum()
    assert band > 0.5 * spectrum.sum()


def test_sample_rate_and_prosody_parameters():
    native = espeak.synthesize(SENTENCE, "en-us", sample_rate=espeak.ESPEAK_SAMPLE_RATE)
    at_8k = espeak.synthesize(SENTENCE, "en-us", sample_rate=8000)
    assert abs(at_8k.shape[0] - native.shape[0] * 8000 / 22050) <= 2
    slow = espeak.synthesize(SENTENCE, "en-us", rate=100)
    fast = espeak.synthesize(SENTENCE, "en-us", rate=300)
    assert slow.shape[0] > 1.8 * fast.shape[0]
    low = espeak.synthesize("aaaa", "en-us", pitch=0, pitch_range=0)
    high = espeak.synthesize("aaaa", "en-us", pitch=100, pitch_range=0)
    assert _dominant_pitch(high) > 1.3 * _dominant_pitch(low)


def _dominant_pitch(wav: np.ndarray, sr: int = 16000) -> float:
    """Fundamental frequency (40-600 Hz) from the autocorrelation: the shortest lag whose
    correlation is within 10 % of the best one (avoids octave-down errors)."""
    x = wav - wav.mean()
    corr = np.correlate(x, x, mode="full")[x.shape[0] - 1 :]
    lo, hi = sr // 600, sr // 40
    window = corr[lo:hi]
    lag = lo + int(np.flatnonzero(window >= 0.9 * window.max())[0])
    return sr / lag


def test_same_arguments_same_samples_whatever_came_before():
    first = espeak.synthesize(SENTENCE, "en-us", "m3")
    espeak.synthesize("something else entirely, with a pause!", "en-gb-x-rp", "klatt", rate=300, pitch=5)
    espeak.synthesize("and more words", "en", "whisper")
    again = espeak.synthesize(SENTENCE, "en-us", "m3")
    assert np.array_equal(first, again)
    assert np.array_equal(espeak.synthesize(SENTENCE, "en-us+m3"), first)
    # the noise generator of breathy variants follows the seed
    a = espeak.synthesize(SENTENCE, "en-us", "whisper", seed=1)
    b = espeak.synthesize(SENTENCE, "en-us", "whisper", seed=1)
    c = espeak.synthesize(SENTENCE, "en-us", "whisper", seed=2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_voice_listings():
    variants = espeak.list_voice_variants()
    for name in [f"m{i}" for i in range(1, 9)] + [f"f{i}" for i in range(1, 6)] + ["klatt"]:
        assert name in variants
    assert len(variants) > 50
    bases = espeak.list_base_voices("en")
    assert {"en", "en-us", "en-gb-scotland", "en-029"} <= set(bases)
    assert all(b == "en" or b.startswith("en-") for b in bases)
    assert espeak.list_base_voices("fr") and "en-us" not in espeak.list_base_voices("fr")
    for base in bases:  # every listed English voice is usable
        assert np.abs(espeak.synthesize("hello", base)).max() > 0.05


def test_bad_input_errors():
    with pytest.raises(ValueError, match="unknown espeak-ng voice 'xx-nowhere'"):
        espeak.synthesize("hello", "xx-nowhere")
    with pytest.raises(ValueError, match="unknown espeak-ng voice variant 'm99'"):
        espeak.synthesize("hello", "en-us", "m99")
    with pytest.raises(ValueError, match="already names a variant"):
        espeak.synthesize("hello", "en-us+m1", variant="m2")
    with pytest.raises(ValueError, match="non-empty text"):
        espeak.synthesize("   ", "en-us")
    with pytest.raises(ValueError, match="rate must be within"):
        espeak.synthesize("hello", "en-us", rate=10)
    with pytest.raises(ValueError, match="pitch must be within"):
        espeak.synthesize("hello", "en-us", pitch=150)


def test_resample_matches_scipy_reference():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(22050).astype(np.float32)
    ours = audio.resample(x, 22050, 16000)
    reference = resample_poly(x, 320, 441).astype(np.float32)
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    assert audio.resample(x, 16000, 16000) is not x and np.array_equal(audio.resample(x, 16000, 16000), x)


@pytest.mark.parametrize("color, slope", [("white", 0.0), ("pink", -1.0), ("brown", -2.0), ("blue", 1.0)])
def test_colored_noise_spectral_slope(color, slope):
    x = audio.colored_noise(np.random.default_rng(0), 1 << 16, color)
    assert x.dtype == np.float32 and abs(float(np.sqrt(np.mean(x**2))) - 1) < 1e-3
    power = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(x.shape[0], 1 / 16000)
    keep = (freqs > 100) & (freqs < 7000)
    fitted = np.polyfit(np.log(freqs[keep]), np.log(power[keep]), 1)[0]
    assert abs(fitted - slope) < 0.15


def test_mix_at_snr_and_gain():
    rng = np.random.default_rng(1)
    signal = np.sin(np.linspace(0, 300, 8000)).astype(np.float32)
    noise = rng.standard_normal(3000).astype(np.float32)
    mixed = audio.mix_at_snr(signal, noise, 12.0)
    added = mixed - signal
    snr = 10 * np.log10(np.mean(signal.astype(np.float64) ** 2) / np.mean(added.astype(np.float64) ** 2))
    assert abs(snr - 12.0) < 0.01
    scaled = audio.scale_to_peak(mixed, -6.0)
    assert abs(20 * np.log10(np.abs(scaled).max()) + 6.0) < 1e-4
    with pytest.raises(ValueError, match="peak_dbfs"):
        audio.scale_to_peak(mixed, 3.0)


def test_write_wav_atomic_leaves_nothing_on_failure(tmp_path, monkeypatch):
    import soundfile as sf

    path = tmp_path / "x.wav"
    audio.write_wav_atomic(str(path), np.full(100, 0.5, dtype=np.float32))
    data, rate = sf.read(path)
    assert rate == 16000 and np.allclose(data, 0.5, atol=1e-4)

    def broken_write(file, *args, **kwargs):
        assert kwargs.get("format") == "WAV"  # written into a file object: the format must be explicit
        file.write(b"RIFF")  # a partial file...
        raise OSError("disk full")

    monkeypatch.setattr(sf, "write", broken_write)
    with pytest.raises(OSError, match="disk full"):
        audio.write_wav_atomic(str(tmp_path / "y.wav"), np.zeros(10, dtype=np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.wav"]  # ...never left behind


def test_noisy_variants_are_deterministic():
    """Variants with breath noise or the Klatt synthesizer (Reed, caleb: libc's rand()) stay reproducible."""
    import os

    folder = os.path.join(espeak._data_path(), "voices", "!v")
    noisy = [
        v
        for v in espeak.list_voice_variants()
        if any(line.split()[:1] in (["klatt"], ["breath"]) for line in open(os.path.join(folder, v), errors="replace"))
    ]
    assert {"Reed", "caleb", "whisper", "klatt"} <= set(noisy)
    first = {v: espeak.synthesize("yes", "en-us", v, seed=3) for v in noisy}
    for variant in noisy:
        assert np.array_equal(espeak.synthesize("yes", "en-us", variant, seed=3), first[variant]), variant


def test_synthesize_batch():
    requests = [
        {"text": "yes", "voice": "en-us", "variant": "m3", "seed": 1},
        {"text": "go left", "voice": "en-gb-scotland", "variant": "Reed", "rate": 220, "seed": 2},
        {"text": "stop", "voice": "en-029", "pitch": 80, "pitch_range": 10},
    ]
    first = espeak.synthesize_batch(requests)
    assert len(first) == 3 and all(w.dtype == np.float32 and np.abs(w).max() > 0.05 for w in first)
    again = espeak.synthesize_batch(requests)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    # the head of a batch starts from a fresh library, like a single call
    assert np.array_equal(first[0], espeak.synthesize("yes", "en-us", "m3", seed=1))
    assert espeak.synthesize_batch([]) == []
    with pytest.raises(TypeError, match="unknown keys \\['speed'\\]"):
        espeak.synthesize_batch([{"text": "yes", "speed": 3}])
    with pytest.raises(ValueError, match="unknown espeak-ng voice 'zz'"):
        espeak.synthesize_batch([{"text": "yes"}, {"text": "no", "voice": "zz"}])


def _centroid(wav: np.ndarray, sr: int = 16000) -> float:
    """Spectral centroid of the 150-5000 Hz band (moves with the formant frequencies)."""
    spectrum = np.abs(np.fft.rfft(wav)) ** 2
    freqs = np.fft.rfftfreq(wav.shape[0], 1 / sr)
    band = (freqs > 150) & (freqs < 5000)
    return float((spectrum[band] * freqs[band]).sum() / spectrum[band].sum())


def test_formant_scales_make_a_new_voice():
    import os

    # factors of one give the bundled voice, sample for sample (a variant, and a base voice with formants of its own)
    for voice, variant in (("en-us", "m3"), ("en-029", None), ("en-gb-scotland", "norbert")):
        bundled = espeak.synthesize(SENTENCE, voice, variant, seed=2)
        same = espeak.synthesize(SENTENCE, voice, variant, seed=2, formant_scales=[(1, 1.0, 1.0), (2, 1, 1)])
        assert np.array_equal(bundled, same), (voice, variant)
    assert np.array_equal(espeak.synthesize("hello", "en-us", formant_scales=[]), espeak.synthesize("hello", "en-us"))
    # moving the vowel formants moves the spectrum, the words keep their timing
    vowels = "ah ee oo ah ee oo"
    centroids = {}
    for factor in (0.75, 1.0, 1.3):
        wav = espeak.synthesize(vowels, "en-us", "m1", formant_scales=[(n, factor, 1.0) for n in (1, 2, 3)])
        centroids[factor] = _centroid(wav)
        assert abs(wav.shape[0] - espeak.synthesize(vowels, "en-us", "m1").shape[0]) < 0.05 * wav.shape[0]
    assert centroids[0.75] < 0.92 * centroids[1.0] and centroids[1.3] > 1.08 * centroids[1.0], centroids
    # a scaled voice is a pure function of the arguments, in a batch or alone
    scales = [(0, 1.1, 0.8), (4, 0.9, 1.4)]
    batch = espeak.synthesize_batch(
        [{"text": "yes"}, {"text": SENTENCE, "voice": "en-us", "variant": "Reed", "seed": 4, "formant_scales": scales}]
    )
    assert np.array_equal(batch[0], espeak.synthesize("yes"))
    assert not np.array_equal(batch[1], espeak.synthesize(SENTENCE, "en-us", "Reed", seed=4))
    assert np.array_equal(
        espeak.synthesize_batch([{"text": SENTENCE, "voice": "en-us+Reed", "seed": 4, "formant_scales": scales}])[0],
        espeak.synthesize(SENTENCE, "en-us", "Reed", seed=4, formant_scales=scales),
    )
    # the voice files made for a call are gone after it, and never listed as variants
    overlay_variants = os.path.join(espeak._overlay_data_path(), "voices", "!v")
    assert sorted(os.listdir(overlay_variants)) == espeak.list_voice_variants()


def _child_overlay(_):
    return espeak._overlay_data_path()


def test_forked_workers_write_their_voices_apart():
    import multiprocessing
    import os

    parent = espeak._overlay_data_path()
    pool = multiprocessing.get_context("fork").Pool(2)
    children = pool.map(_child_overlay, range(4), chunksize=1)
    pool.close()
    pool.join()  # workers that end normally remove their overlays
    assert parent not in children
    assert not any(os.path.exists(child) for child in children)


@pytest.mark.parametrize(
    "scales",
    [[(9, 1.0, 1.0)], [(1, 0.0, 1.0)], [(1, 1.0, -0.5)], [(1, 1.0)], [(1.5, 1.0, 1.0)], 3, [(1, float("nan"), 1)]],
)
def test_formant_scales_errors(scales):
    with pytest.raises(ValueError, match="formant_scales must be a sequence of \\(formant 0-8"):
        espeak.synthesize("hello", "en-us", formant_scales=scales)


def _echo_strength(wav: np.ndarray, delay_ms: int, sr: int = 16000) -> float:
    """Normalized autocorrelation of the waveform at the echo's delay."""
    lag = delay_ms * sr // 1000
    return float(np.dot(wav[:-lag], wav[lag:]) / np.dot(wav, wav))


def test_echo_makes_a_new_voice():
    assert espeak.variant_echo("m1") == (0, 0)
    assert espeak.variant_echo("Alicia") == (40, 50)
    assert espeak.variant_echo("anikaRobot") == (10, 100)  # the file says 10000; espeak-ng caps it at 100
    # a variant's own echo given again gives the bundled voice, sample for sample
    bundled = espeak.synthesize(SENTENCE, "en-us", "anikaRobot", seed=3)
    assert np.array_equal(bundled, espeak.synthesize(SENTENCE, "en-us", "anikaRobot", seed=3, echo=(10, 100)))
    # (0, 0) takes the variant's echo away; an echo on a voice without one rings at its delay
    plain = espeak.synthesize(SENTENCE, "en-us", "anikaRobot", seed=3, echo=(0, 0))
    assert _echo_strength(plain, 10) < _echo_strength(bundled, 10) - 0.2
    m3 = espeak.synthesize(SENTENCE, "en-us", "m3")
    for delay in (10, 40):
        echoed = espeak.synthesize(SENTENCE, "en-us", "m3", echo=(delay, 100))
        assert _echo_strength(echoed, delay) > _echo_strength(m3, delay) + 0.2, delay
    # with formant scales, in a batch or alone, and nothing left behind
    request = {"text": SENTENCE, "voice": "en-029", "echo": (20, 60), "formant_scales": [(1, 1.1, 1.0)]}
    alone = espeak.synthesize(SENTENCE, "en-029", echo=(20, 60), formant_scales=[(1, 1.1, 1)])
    assert np.array_equal(espeak.synthesize_batch([request])[0], alone)
    batch = espeak.synthesize_batch([{"text": "yes"}, request])
    assert np.array_equal(batch[0], espeak.synthesize("yes"))
    assert _echo_strength(batch[1], 20) > _echo_strength(espeak.synthesize(SENTENCE, "en-029"), 20) + 0.2
    import os

    overlay_variants = os.path.join(espeak._overlay_data_path(), "voices", "!v")
    assert sorted(os.listdir(overlay_variants)) == espeak.list_voice_variants()


@pytest.mark.parametrize("echo", [(10,), (-1, 50), (250, 50), (10, 101), (10.5, 50), "ab", (True, 50), 7])
def test_echo_errors(echo):
    with pytest.raises(ValueError, match="echo must be \\(delay in ms, 0-249; amplitude"):
        espeak.synthesize("hello", "en-us", echo=echo)


def test_variant_echo_of_an_unknown_variant():
    with pytest.raises(ValueError, match="unknown espeak-ng voice variant 'zz9'"):
        espeak.variant_echo("zz9")
