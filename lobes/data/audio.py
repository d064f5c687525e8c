"""Signal functions for corpus synthesis: coloured noise, hum, mixing at a given SNR, gain, wav I/O.

Every generator takes a ``numpy.random.Generator`` so that a corpus is a function of its seed.

Example
-------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> noise = colored_noise(rng, 16000, "pink")
>>> noise.shape, noise.dtype
((16000,), dtype('float32'))
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from lobes.io import atomic_open

__all__ = [
    "NOISE_COLORS",
    "colored_noise",
    "hum",
    "mix_at_snr",
    "read_wav_info",
    "resample",
    "scale_to_peak",
    "synthetic_noise",
    "trim_silence",
    "write_wav_atomic",
]

NOISE_COLORS = ("white", "pink", "brown", "blue")
"""Spectral slopes of :func:`colored_noise` (power ∝ f^0, f^-1, f^-2, f^1)."""

_SYNTHETIC_KINDS = NOISE_COLORS + ("hum", "rumble")


def colored_noise(rng: np.random.Generator, num_samples: int, color: str = "white") -> np.ndarray:
    """Gaussian noise with the spectral slope of ``color``, unit RMS.

    Arguments
    ---------
    rng : numpy.random.Generator
        Source of randomness.
    num_samples : int
        Length of the output.
    color : str
        One of ``"white"``, ``"pink"``, ``"brown"``, ``"blue"``.

    Returns
    -------
    numpy.ndarray
        float32 array of shape ``(num_samples,)`` with RMS 1.

    Example
    -------
    >>> import numpy as np
    >>> x = colored_noise(np.random.default_rng(1), 8000, "brown")
    >>> round(float(np.sqrt(np.mean(x ** 2))), 3)
    1.0
    """
    if color not in NOISE_COLORS:
        raise ValueError(f"unknown noise color {color!r}; expected one of {NOISE_COLORS}")
    if num_samples <= 0:
        return np.zeros(0, dtype=np.float32)
    if color == "white":
        out = rng.standard_normal(num_samples)
    else:
        from scipy.fft import irfft, next_fast_len, rfft

        size = next_fast_len(num_samples, real=True)  # FFTs of prime lengths are slow
        spectrum = rfft(rng.standard_normal(size))
        freqs = np.arange(spectrum.shape[0], dtype=np.float64)
        exponent = {"pink": -0.5, "brown": -1.0, "blue": 0.5}[color]
        # floor the lowest bins so that brown noise does not drift (about 20 Hz at 16 kHz)
        floor = max(1.0, size * 20.0 / 16000.0)
        spectrum *= np.maximum(freqs, floor) ** exponent
        out = irfft(spectrum, n=size)[:num_samples]
    rms = np.sqrt(np.mean(out**2)) + 1e-12
    return (out / rms).astype(np.float32)


def hum(rng: np.random.Generator, num_samples: int, sample_rate: int = 16000) -> np.ndarray:
    """Mains hum: 50 or 60 Hz and random harmonics, with a little white noise; unit RMS.

    Example
    -------
    >>> import numpy as np
    >>> hum(np.random.default_rng(0), 16000).shape
    (16000,)
    """
    t = np.arange(num_samples) / sample_rate
    base = 50.0 if rng.random() < 0.5 else 60.0
    out = np.zeros(num_samples)
    for harmonic in range(1, 8):
        amplitude = rng.uniform(0.05, 1.0) / harmonic
        out += amplitude * np.sin(2 * np.pi * base * harmonic * t + rng.uniform(0, 2 * np.pi))
    out += 0.05 * rng.standard_normal(num_samples)
    rms = np.sqrt(np.mean(out**2)) + 1e-12
    return (out / rms).astype(np.float32)


def _rumble(rng: np.random.Generator, num_samples: int, sample_rate: int) -> np.ndarray:
    """Engine / fan-like noise: brown noise whose loudness is modulated at a few Hz."""
    t = np.arange(num_samples) / sample_rate
    modulation = 1.0 + rng.uniform(0.2, 0.8) * np.sin(2 * np.pi * rng.uniform(0.5, 8.0) * t)
    out = colored_noise(rng, num_samples, "brown") * modulation
    rms = np.sqrt(np.mean(out**2)) + 1e-12
    return (out / rms).astype(np.float32)


def synthetic_noise(rng: np.random.Generator, num_samples: int, kind: str, sample_rate: int = 16000) -> np.ndarray:
    """Unit-RMS noise of ``kind``: a colour of :data:`NOISE_COLORS`, ``"hum"`` or ``"rumble"``.

    Example
    -------
    >>> import numpy as np
    >>> synthetic_noise(np.random.default_rng(0), 4000, "rumble").shape
    (4000,)
    """
    if kind in NOISE_COLORS:
        return colored_noise(rng, num_samples, kind)
    if kind == "hum":
        return hum(rng, num_samples, sample_rate)
    if kind == "rumble":
        return _rumble(rng, num_samples, sample_rate)
    raise ValueError(f"unknown noise kind {kind!r}; expected one of {_SYNTHETIC_KINDS}")


def mix_at_snr(signal: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """``signal + noise`` with the noise scaled to ``snr_db`` (powers over the whole signal).

    The noise is tiled or cut to the signal's length.

    Example
    -------
    >>> import numpy as np
    >>> s = np.sin(np.linspace(0, 100, 1000)).astype(np.float32)
    >>> n = np.random.default_rng(0).standard_normal(300).astype(np.float32)
    >>> mix_at_snr(s, n, 10.0).shape
    (1000,)
    """
    if signal.size == 0:
        return signal.astype(np.float32)
    if noise.size == 0:
        raise ValueError("cannot mix an empty noise signal")
    if noise.shape[0] < signal.shape[0]:
        noise = np.tile(noise, int(np.ceil(signal.shape[0] / noise.shape[0])))
    noise = noise[: signal.shape[0]]
    p_signal = float(np.mean(signal.astype(np.float64) ** 2))
    p_noise = float(np.mean(noise.astype(np.float64) ** 2)) + 1e-20
    scale = np.sqrt(p_signal / (p_noise * 10 ** (snr_db / 10.0)))
    return (signal + scale * noise).astype(np.float32)


def scale_to_peak(wav: np.ndarray, peak_dbfs: float) -> np.ndarray:
    """Scale ``wav`` so that its absolute peak is ``peak_dbfs`` dB full scale (≤ 0).

    Example
    -------
    >>> import numpy as np
    >>> y = scale_to_peak(np.array([0.1, -0.5], dtype=np.float32), -6.0)
    >>> round(float(abs(y).max()), 3)
    0.501
    """
    if peak_dbfs > 0:
        raise ValueError(f"peak_dbfs must be <= 0 dB full scale, got {peak_dbfs}")
    peak = float(np.max(np.abs(wav))) if wav.size else 0.0
    if peak <= 0.0:
        return wav.astype(np.float32)
    return (wav * (10 ** (peak_dbfs / 20.0) / peak)).astype(np.float32)


def trim_silence(wav: np.ndarray, threshold: float = 0.01, margin: int = 160) -> np.ndarray:
    """Cut leading and trailing samples quieter than ``threshold`` × peak, keeping ``margin`` samples.

    Example
    -------
    >>> import numpy as np
    >>> trim_silence(np.r_[np.zeros(1000), np.ones(100), np.zeros(1000)], margin=10).shape
    (120,)
    """
    if wav.size == 0:
        return wav
    peak = float(np.max(np.abs(wav)))
    if peak == 0.0:
        return wav[:0]
    loud = np.flatnonzero(np.abs(wav) > threshold * peak)
    start = max(0, int(loud[0]) - margin)
    stop = min(wav.shape[0], int(loud[-1]) + 1 + margin)
    return wav[start:stop]


@lru_cache(maxsize=8)
def _resample_filter(orig: int, new: int) -> tuple[int, int, np.ndarray]:
    """(up, down, low-pass FIR) of scipy's ``resample_poly`` default design, computed once."""
    from scipy.signal import firwin

    g = int(np.gcd(orig, new))
    up, down = new // g, orig // g
    max_rate = max(up, down)
    taps = firwin(2 * 10 * max_rate + 1, 1.0 / max_rate, window=("kaiser", 5.0))
    return up, down, taps


def resample(wav: np.ndarray, orig: int, new: int) -> np.ndarray:
    """Polyphase resampling of a 1-D waveform from ``orig`` Hz to ``new`` Hz (float32 out).

    Same result as ``scipy.signal.resample_poly`` with its default Kaiser window; the filter is
    designed once per rate pair.

    Example
    -------
    >>> import numpy as np
    >>> resample(np.zeros(44100, dtype=np.float32), 44100, 16000).shape
    (16000,)
    """
    if orig <= 0 or new <= 0:
        raise ValueError(f"sample rates must be positive, got {orig} -> {new}")
    if orig == new or wav.size == 0:
        return wav.astype(np.float32)
    from scipy.signal import resample_poly

    up, down, taps = _resample_filter(int(orig), int(new))
    return resample_poly(wav, up, down, window=taps.astype(wav.dtype)).astype(np.float32)


def write_wav_atomic(path: str, wav: np.ndarray, sample_rate: int = 16000) -> None:
    """Write a mono 16-bit PCM wav atomically (:func:`lobes.io.atomic_open`: a reader never sees half a file).

    Example
    -------
    >>> import os, tempfile, numpy as np
    >>> path = os.path.join(tempfile.mkdtemp(), "x.wav")
    >>> write_wav_atomic(path, np.zeros(160, dtype=np.float32))
    >>> read_wav_info(path)
    (160, 16000)
    """
    import soundfile as sf

    if wav.ndim != 1:
        raise ValueError(f"expected a mono waveform of shape (num_samples,), got shape {wav.shape} for {path}")
    with atomic_open(path, "wb") as handle:
        sf.write(handle, np.clip(wav, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")


def read_wav_info(path: str) -> tuple[int, int]:
    """(number of frames, sample rate) from an audio file's header."""
    import soundfile as sf

    info = sf.info(path)
    return int(info.frames), int(info.samplerate)
