"""The inputs of the pretrained-model loaders: file paths, tensors, arrays, or lists of them.

:func:`audio_sources` turns what a user passes into :class:`AudioSource` objects that load mono float32
audio at the model's rate on demand (whole, or a segment at a time for long recordings). The rule, the same
for every loader:

* a ``str`` / ``os.PathLike`` is an audio file: any format soundfile reads, any rate, any channel count
  (channels are averaged, the rate is converted); ``sample_rate=`` is ignored for files, whose header states
  their rate;
* a tensor or array is one recording and needs ``sample_rate=`` (its rate in Hz; there is no default, so a
  44.1 kHz waveform is never read as 16 kHz): shape ``(samples,)``, or ``(channels, samples)`` /
  ``(samples, channels)`` with at most :data:`MAX_CHANNELS` channels, told apart by which axis is short. A
  2-D shape whose both axes are short or both long is refused as ambiguous: pass a list for a batch of
  recordings. Integer samples are scaled to [-1, 1] (int16 by 2**15, ...);
* a ``list`` / ``tuple`` is a batch whose items follow the two rules above (no nesting).

:func:`batches_by_length` groups sources of similar length and :func:`pad_batch` makes one padded batch
with relative lengths, as the models take it.

Example
-------
>>> import torch
>>> [s] = audio_sources(torch.zeros(2, 44100), sample_rate=44100, target_rate=16000)
>>> s.name, s.duration, tuple(s.load().shape)
('<input 0>', 1.0, (16000,))
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Sequence

import numpy as np
import torch

from lobes.inputs import length_batches
from lobes.io import AudioError, audio_duration, load_audio

__all__ = [
    "MAX_CHANNELS",
    "AudioSource",
    "audio_sources",
    "batches_by_length",
    "pad_batch",
    "read_segment",
    "to_mono_float",
]

MAX_CHANNELS = 8
"""Most channels a 2-D waveform may have; the other axis is time."""


@dataclasses.dataclass
class AudioSource:
    """One input recording, read on demand as mono float32 at ``rate``, whole or a segment at a time.

    Attributes
    ----------
    name : str
        The file path, or ``<input i>`` for an in-memory waveform (``i``: its position in the call).
    rate : int
        Sample rate of what :meth:`load` and :meth:`segment` return.
    num_samples : int
        Length at ``rate`` (for files, what resampling the whole file gives).
    path : str, optional
        The file, for file inputs.
    """

    name: str
    rate: int
    num_samples: int
    path: str | None = None
    _waveform: torch.Tensor | None = dataclasses.field(default=None, repr=False)

    @property
    def duration(self) -> float:
        """Seconds."""
        return self.num_samples / self.rate

    def load(self) -> torch.Tensor:
        """The whole waveform ``(num_samples,)``, float32 (raises ``AudioError`` for a bad file)."""
        if self._waveform is not None:
            return self._waveform
        return load_audio(self.path, self.rate)

    def segment(self, start: int, end: int) -> torch.Tensor:
        """Samples ``start:end`` (at :attr:`rate`) without reading the rest of a file.

        A file at another rate is read with a margin and resampled piecewise, aligned so that the samples
        equal those of the whole resampled file (to float rounding).
        """
        start, end = max(start, 0), min(end, self.num_samples)
        if self._waveform is not None:
            return self._waveform[start:end]
        return read_segment(self.path, start, end, self.rate)


def read_segment(path: str, start: int, end: int, rate: int) -> torch.Tensor:
    """Samples ``start:end`` of an audio file as mono float32 at ``rate`` (see :meth:`AudioSource.segment`).

    Example
    -------
    >>> import soundfile as sf, tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "ramp.wav")
    >>> sf.write(p, np.sin(np.arange(44100) / 50.0).astype("float32"), 44100)
    >>> whole = load_audio(p, 16000)
    >>> bool(torch.allclose(read_segment(p, 5000, 6000, 16000), whole[5000:6000], atol=1e-5))
    True
    """
    import soundfile as sf

    try:
        info = sf.info(path)
        native = info.samplerate
        if native == rate:
            data, _ = sf.read(path, start=start, stop=end, dtype="float32", always_2d=True)
            return _mono(data)
        unit = math.gcd(native, rate)
        a, b = native // unit, rate // unit  # a native samples <-> b samples at `rate`
        margin = -(-64 // a) + 1  # units of context on each side for the resampling filter
        u0 = max(start // b - margin, 0)
        u1 = min(-(-end // b) + margin, -(-info.frames // a))
        data, _ = sf.read(path, start=u0 * a, stop=min(u1 * a, info.frames), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises several types
        raise AudioError(f"{path}: cannot decode audio ({type(exc).__name__}: {exc})".replace("\n", " ")) from None
    block = _resampler(native, rate)(_mono(data))
    return block[start - u0 * b : end - u0 * b].contiguous()


def _mono(data: np.ndarray) -> torch.Tensor:
    """(samples, channels) float32 -> (samples,) channel mean."""
    if data.shape[1] == 1:
        return torch.from_numpy(np.ascontiguousarray(data[:, 0]))
    return torch.from_numpy(np.ascontiguousarray(data)).mean(1)


@functools.lru_cache(maxsize=8)
def _resampler(native: int, rate: int) -> torch.nn.Module:
    """torchaudio's resampler with its filter computed once (the same filter as ``torchaudio.functional.resample``)."""
    import torchaudio.transforms

    return torchaudio.transforms.Resample(native, rate)


def _file_samples(path: str, rate: int) -> int:
    """Length of a file at ``rate`` (``AudioError`` for a missing, unreadable or empty file)."""
    import soundfile as sf

    audio_duration(path)  # the project's message for a missing or unreadable file
    info = sf.info(path)
    if info.frames <= 0:
        raise AudioError(f"{path}: the file holds no samples")
    return math.ceil(info.frames * rate / info.samplerate)


def to_mono_float(waveform: torch.Tensor | np.ndarray, name: str = "waveform") -> torch.Tensor:
    """One recording as a 1-D float32 tensor, following the shape and dtype rule of this module.

    Arguments
    ---------
    waveform : torch.Tensor or numpy.ndarray
        ``(samples,)``, ``(channels, samples)`` or ``(samples, channels)`` with at most ``MAX_CHANNELS``
        channels; float, or integer samples (scaled to [-1, 1]).
    name : str
        Named in error messages.

    Returns
    -------
    torch.Tensor
        ``(samples,)`` float32 (channels averaged).

    Example
    -------
    >>> stereo = np.stack([np.full(10, 16384), np.zeros(10)], axis=1).astype(np.int16)  # (samples, channels)
    >>> to_mono_float(stereo)[:3].tolist()
    [0.25, 0.25, 0.25]
    >>> to_mono_float(torch.zeros(20, 30))
    Traceback (most recent call last):
    ...
    ValueError: waveform: ambiguous shape (20, 30): expected (samples,), (channels, samples) or ...
    """
    if isinstance(waveform, np.ndarray):
        if waveform.dtype.kind not in "fiu":
            raise ValueError(f"{name}: expected numeric samples, got a numpy array of dtype {waveform.dtype}")
        scale = _integer_scale(waveform.dtype)
        tensor = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float64 if scale else None))
    elif torch.is_tensor(waveform):
        if waveform.is_complex() or waveform.dtype == torch.bool:
            raise ValueError(f"{name}: expected real samples, got a tensor of dtype {waveform.dtype}")
        scale = None if waveform.is_floating_point() else _integer_scale(np.dtype(str(waveform.dtype)[6:]))
        tensor = waveform.detach().cpu()
    else:
        raise TypeError(f"{name}: expected a file path, a torch tensor or a numpy array, got {type(waveform).__name__}")
    if scale is not None:
        offset, factor = scale
        tensor = (tensor.double() - offset) / factor
    tensor = tensor.float()
    if tensor.dim() == 2:
        short = [d <= MAX_CHANNELS for d in tensor.shape]
        if short == [True, False]:
            tensor = tensor.mean(0)  # (channels, samples)
        elif short == [False, True]:
            tensor = tensor.mean(1)  # (samples, channels)
        else:
            raise ValueError(
                f"{name}: ambiguous shape {tuple(tensor.shape)}: expected (samples,), (channels, samples) "
                f"or (samples, channels) with at most {MAX_CHANNELS} channels; pass a list of 1-D "
                "waveforms for a batch"
            )
    elif tensor.dim() != 1:
        raise ValueError(
            f"{name}: expected (samples,), (channels, samples) or (samples, channels), got shape "
            f"{tuple(tensor.shape)}; pass a list of 1-D waveforms for a batch"
        )
    if tensor.numel() == 0:
        raise ValueError(f"{name}: the waveform holds no samples")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name}: the waveform holds NaN or infinite samples")
    return tensor.contiguous()


def _integer_scale(dtype: np.dtype) -> tuple[float, float] | None:
    """``(offset, factor)`` that map integer samples to [-1, 1]; ``None`` for floats."""
    if dtype.kind == "f":
        return None
    info = np.iinfo(dtype)
    if dtype.kind == "u":  # unsigned PCM (8-bit WAV) is centred on half the range
        half = (int(info.max) + 1) / 2
        return half, half
    return 0.0, float(-int(info.min))


def audio_sources(
    inputs: Any,
    sample_rate: int | None = None,
    target_rate: int = 16000,
) -> list[AudioSource]:
    """Normalise one input or a list of inputs (see the module docstring for the rule).

    Files are not read here (only their headers, for the duration); in-memory waveforms are converted and
    resampled right away.

    Arguments
    ---------
    inputs : path, tensor, array, or list / tuple of them
        What to process.
    sample_rate : int, optional
        Rate in Hz of the tensors / arrays (required when there are any).
    target_rate : int
        The model's rate.

    Returns
    -------
    list of AudioSource
        One per recording, in the order given.

    Raises
    ------
    ValueError
        A waveform without ``sample_rate``, an ambiguous shape, an empty list.
    lobes.io.AudioError
        A missing or unreadable file.

    Example
    -------
    >>> audio_sources(np.zeros(8000, dtype=np.float32))
    Traceback (most recent call last):
    ...
    ValueError: <input 0>: a waveform needs sample_rate= (its rate in Hz); the model expects 16000 Hz
    >>> [s.duration for s in audio_sources([np.zeros(8000), np.zeros(4000)], sample_rate=8000)]
    [1.0, 0.5]
    """
    if isinstance(inputs, (list, tuple)):
        items = list(inputs)
        if not items:
            raise ValueError("no inputs: expected a file path, a waveform, or a non-empty list of them")
    else:
        items = [inputs]
    if sample_rate is not None and (not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0):
        raise ValueError(f"sample_rate must be a positive integer (Hz), got {sample_rate!r}")
    sources = []
    for i, item in enumerate(items):
        if isinstance(item, (list, tuple)):
            raise ValueError(f"input {i} is itself a list: pass a flat list of paths / waveforms")
        if isinstance(item, (str, os.PathLike)):
            path = os.fspath(item)
            sources.append(AudioSource(path, target_rate, _file_samples(path, target_rate), path=path))
            continue
        name = f"<input {i}>"
        if sample_rate is None:
            raise ValueError(
                f"{name}: a waveform needs sample_rate= (its rate in Hz); the model expects {target_rate} Hz"
            )
        wav = to_mono_float(item, name)
        if sample_rate != target_rate:
            import torchaudio.functional as AF

            wav = AF.resample(wav, int(sample_rate), target_rate)
        sources.append(AudioSource(name, target_rate, wav.numel(), _waveform=wav))
    return sources


def batches_by_length(sources: Sequence[AudioSource], batch_seconds: float) -> list[list[int]]:
    """Indices of ``sources`` grouped by :func:`lobes.inputs.length_batches` (longest first)."""
    return length_batches([s.duration for s in sources], batch_seconds)


def pad_batch(waves: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A zero-padded batch of 1-D waveforms and their relative lengths, as speechbrain-style models take them.

    Arguments
    ---------
    waves : sequence of torch.Tensor
        1-D waveforms, at least one.

    Returns
    -------
    wavs : torch.Tensor
        (B, S) float32, S the longest length.
    wav_lens : torch.Tensor
        (B,) float64 lengths relative to S (float64: exact for any length; ``lobes.masks.relative_to_absolute``
        gives back the sample counts).

    Example
    -------
    >>> wavs, wav_lens = pad_batch([torch.ones(4), torch.ones(2)])
    >>> wavs.tolist(), wav_lens.tolist()
    ([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]], [1.0, 0.5])
    """
    lengths = torch.tensor([w.numel() for w in waves], dtype=torch.float64)
    wavs = torch.zeros(len(waves), int(lengths.max()))
    for row, wav in enumerate(waves):
        wavs[row, : wav.numel()] = wav
    return wavs, lengths / lengths.max()
