"""Files in and out: one audio loader and one atomic writer for the whole project.

:func:`load_audio` turns anything soundfile reads (wav, flac, ogg, ...; any rate, any channel count) into
a mono float32 waveform at the requested rate; :func:`read_audio` does the same in numpy alone (no torch
import: the ONNX runtime path), resampling with :func:`resample_array`, a port of torchaudio's default
``resample`` that equals it to float32 rounding. :func:`atomic_open` and its shorthands write a file under a
temporary name in the same folder, flush it to disk and move it into place with ``os.replace``, so a
reader (or a rerun after ``kill -9``) only ever sees a complete file. New files get the permissions the
umask gives (``0o666 & ~umask``), as ``open`` would, not ``mkstemp``'s private ``0o600``.

Example
-------
>>> import tempfile, os
>>> folder = tempfile.mkdtemp()
>>> path = atomic_write_text(os.path.join(folder, "out.txt"), "hello\\n")
>>> open(path).read(), sorted(os.listdir(folder))
('hello\\n', ['out.txt'])
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import secrets
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np

__all__ = [
    "AudioError",
    "atomic_open",
    "atomic_save",
    "atomic_write_bytes",
    "atomic_write_text",
    "audio_duration",
    "exclusive_lock",
    "load_audio",
    "read_audio",
    "remove_stale_temporaries",
    "resample_array",
]

_LOG = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"
"""Ending of the temporary names :func:`atomic_open` writes (``.<name>.<random>.tmp``)."""


class AudioError(ValueError):
    """An audio file that cannot be used: the message names the file and what was expected."""


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on a clean exit it replaces ``path``.

    The data is flushed and ``fsync``-ed before the rename; on an exception the temporary file is removed
    and ``path`` is left as it was. Parent folders are created. Permissions follow the umask.

    Arguments
    ---------
    path : str or PathLike
        Final location.
    mode : str
        ``"wb"`` (bytes) or ``"w"`` (text).
    encoding : str, optional
        Text encoding for ``mode="w"`` (default UTF-8).

    Yields
    ------
    file object
        Write to it; do not close it yourself.

    Example
    -------
    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "sub", "a.bin")
    >>> with atomic_open(p) as f:
    ...     _ = f.write(b"abc")
    >>> open(p, "rb").read()
    b'abc'
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as with open()
    try:
        with os.fdopen(
            fd, mode, encoding=(encoding or "utf-8") if mode == "w" else None, newline="" if mode == "w" else None
        ) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_open`); returns the path."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_open`); returns the path."""
    with atomic_open(path, "w") as f:
        f.write(text)
    return Path(path)


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`atomic_open`); returns the path."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed :func:`atomic_open` writers left in ``folder`` (not recursive).

    Returns
    -------
    list of Path
        The files removed.
    """
    removed = []
    for tmp in Path(folder).glob(f".*{TMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    return removed


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str = "") -> Iterator[None]:
    """Hold an exclusive advisory lock on the file ``path`` (created if missing) for the ``with`` block.

    Another process asking for the same lock waits until the holder leaves its block or dies (the system
    releases the lock of a killed process), and logs once that it waits, naming ``what`` (default: the
    path). Used where two runs may build the same files at once (e.g. two trainings preparing one corpus).
    Where the system has no ``fcntl`` (Windows) the block runs unlocked.

    Example
    -------
    >>> import tempfile, os
    >>> lock = os.path.join(tempfile.mkdtemp(), ".corpus.lock")
    >>> with exclusive_lock(lock):
    ...     os.path.isfile(lock)
    True
    """
    try:
        import fcntl
    except ImportError:  # no advisory locks here
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _LOG.info("waiting for another process that holds %s", what or path)
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def audio_duration(path: str | os.PathLike) -> float:
    """Duration in seconds of an audio file, read from its header.

    Raises
    ------
    AudioError
        The file is missing or soundfile cannot read its header.
    """
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except Exception as exc:  # soundfile raises several types (LibsndfileError, RuntimeError, ...)
        raise AudioError(
            f"{path}: cannot read audio header ({_reason(exc)}); expected a file soundfile reads (wav, flac, ogg, ...)"
        ) from None
    if info.samplerate <= 0:
        raise AudioError(f"{path}: invalid sample rate {info.samplerate}")
    return info.frames / info.samplerate


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")


def _read_mono(path: str | os.PathLike, sample_rate: int) -> tuple[np.ndarray, int]:
    """(T,) float32 mean of the channels and the file's rate; the checks of :func:`load_audio`."""
    import soundfile as sf

    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if not os.path.exists(path):
        raise AudioError(f"{path}: no such audio file")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (T, channels)
    except Exception as exc:
        raise AudioError(
            f"{path}: cannot decode audio ({_reason(exc)}); expected a file soundfile reads (wav, flac, ogg, ...)"
        ) from None
    if data.shape[0] == 0:
        raise AudioError(f"{path}: the file holds no samples")
    return np.ascontiguousarray(data).mean(axis=1, dtype=np.float32), rate


def load_audio(path: str | os.PathLike, sample_rate: int = 16000) -> "torch.Tensor":  # noqa: F821
    """Read an audio file as mono float32 at ``sample_rate``.

    Channels are averaged; other rates are resampled with ``torchaudio.functional.resample``;
    integer formats are scaled to ``[-1, 1]``.

    Arguments
    ---------
    path : str or PathLike
        Any file soundfile reads (wav, flac, ogg, ...).
    sample_rate : int
        Rate of the result in Hz.

    Returns
    -------
    torch.Tensor
        Waveform ``(T,)``, float32.

    Raises
    ------
    AudioError
        Missing, unreadable or empty file (the message names it).

    Example
    -------
    >>> import soundfile as sf, tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "s.wav")
    >>> sf.write(p, np.zeros((4410, 2), dtype="float32"), 44100)
    >>> load_audio(p).shape
    torch.Size([1600])
    """
    import torch

    data, rate = _read_mono(path, sample_rate)
    wav = torch.from_numpy(data)  # (T,)
    if rate != sample_rate:
        import torchaudio.functional as AF

        wav = AF.resample(wav, rate, sample_rate)
    return wav.contiguous()


def read_audio(path: str | os.PathLike, sample_rate: int = 16000) -> np.ndarray:
    """:func:`load_audio` without torch: a ``(T,)`` float32 numpy array at ``sample_rate``.

    Resampling uses :func:`resample_array` (torchaudio's default resampler, ported).

    Example
    -------
    >>> import soundfile as sf, tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "s.wav")
    >>> sf.write(p, np.zeros((4410, 2), dtype="float32"), 44100)
    >>> read_audio(p).shape, read_audio(p).dtype
    ((1600,), dtype('float32'))
    """
    data, rate = _read_mono(path, sample_rate)
    return resample_array(data, rate, sample_rate) if rate != sample_rate else data


def resample_array(x: np.ndarray, orig_freq: int, new_freq: int) -> np.ndarray:
    """Resample the last axis of float32 ``x`` like ``torchaudio.functional.resample(x, orig_freq, new_freq)``
    with its defaults (windowed sinc, Hann window, 6 zero crossings, roll-off 0.99), in numpy.

    The kernel is built with torchaudio's float32 operations in its order; the polyphase filtering is one
    matrix product per output phase block, so results equal torchaudio's to float32 rounding (~1e-7).

    Example
    -------
    >>> resample_array(np.ones(441, dtype=np.float32), 44100, 16000).shape
    (160,)
    """
    orig_freq, new_freq = int(orig_freq), int(new_freq)
    if orig_freq <= 0 or new_freq <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_freq} and {new_freq}")
    x = np.asarray(x, dtype=np.float32)
    if orig_freq == new_freq:
        return x
    import math

    gcd = math.gcd(orig_freq, new_freq)
    orig, new = orig_freq // gcd, new_freq // gcd
    zeros, rolloff = 6, 0.99
    base = min(orig, new) * rolloff
    width = math.ceil(zeros * orig / base)
    f32 = np.float32
    idx = np.arange(-width, width + orig, dtype=f32)[None, :] / f32(orig)  # (1, K)
    t = np.arange(0, -new, -1, dtype=f32)[:, None] / f32(new) + idx  # (new, K)
    t = np.clip(t * f32(base), -zeros, zeros).astype(f32)
    window = np.cos(t * f32(math.pi) / f32(zeros) / f32(2)) ** 2
    t = t * f32(math.pi)
    with np.errstate(divide="ignore", invalid="ignore"):
        kernel = np.where(t == 0, f32(1.0), np.sin(t) / t).astype(f32)
    kernel = kernel * (window * f32(base / orig))  # (new, K)
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    length = rows.shape[1]
    padded = np.pad(rows, ((0, 0), (width, width + orig)))
    blocks = np.lib.stride_tricks.sliding_window_view(padded, kernel.shape[1], axis=1)[:, ::orig]  # (N, n, K)
    out = np.matmul(blocks, kernel.T).reshape(rows.shape[0], -1)  # (N, n * new)
    target = math.ceil(new * length / orig)
    return np.ascontiguousarray(out[:, :target]).reshape(shape[:-1] + (-1,)).astype(np.float32)
