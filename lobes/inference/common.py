"""What the pretrained-model loaders share: audio inputs, devices, precision, writing and reading folders.

Inputs
    :func:`audio_sources` turns what a user passes (file paths, torch tensors, numpy arrays, or a list of
    them) into :class:`AudioSource` objects that load mono float32 audio at the model's rate on demand.
    The rule, the same for every loader:

    * a ``str`` / ``os.PathLike`` is an audio file: any format soundfile reads, any rate, any channel count
      (channels are averaged, the rate is converted); ``sample_rate=`` is ignored for files, whose header
      states their rate;
    * a tensor or array is one recording and needs ``sample_rate=`` (its rate in Hz; there is no default,
      so a 44.1 kHz waveform is never read as 16 kHz): shape ``(samples,)``, or ``(channels, samples)`` /
      ``(samples, channels)`` with at most :data:`MAX_CHANNELS` channels, told apart by which axis is
      short. A 2-D shape whose both axes are short or both long is refused as ambiguous: pass a list for a
      batch of recordings. Integer samples are scaled to [-1, 1] (int16 by 2**15, ...);
    * a ``list`` / ``tuple`` is a batch whose items follow the two rules above (no nesting).

Devices and precision
    :func:`resolve_device` (``auto``, ``cpu``, ``cuda``, ``cuda:N``; a clear error for ``cuda`` on a machine
    without GPU) and :func:`autocast` for ``fp32`` / ``bf16``.

Pretrained folders
    :class:`PretrainedWriter` stages every file of a folder, writes them with :mod:`lobes.io`'s atomic
    writers and moves the folder into place; the same inputs always give byte-identical files (state dicts
    saved in a fixed order, no timestamps). :func:`load_pretrained` reads a folder's ``hyperparams.yaml``,
    checks that every loadable of its ``pretrainer`` has its ``<name>.ckpt`` file and that the files are the
    ones packaged (``package.json`` checksums), and loads them (modules strictly: every key, every shape).

Example
-------
>>> import torch
>>> [s] = audio_sources(torch.zeros(2, 44100), sample_rate=44100, target_rate=16000)
>>> s.name, s.duration, tuple(s.load().shape)
('<input 0>', 1.0, (16000,))
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from lobes.inputs import UsageError, length_batches
from lobes.io import AudioError, atomic_write_bytes, atomic_write_text, audio_duration, load_audio

__all__ = [
    "HPARAMS_FILE",
    "MANIFEST_FILE",
    "MAX_CHANNELS",
    "PRECISIONS",
    "AudioSource",
    "PretrainedError",
    "PretrainedWriter",
    "audio_sources",
    "autocast",
    "batches_by_length",
    "check_no_absolute_paths",
    "load_pretrained",
    "read_manifest",
    "read_segment",
    "resolve_device",
    "resolve_precision",
    "state_dict_bytes",
    "to_mono_float",
    "yaml_text",
]

logger = logging.getLogger(__name__)

MAX_CHANNELS = 8
"""Most channels a 2-D waveform may have; the other axis is time."""
PRECISIONS = ("fp32", "bf16")
"""Inference precisions: full float32, or bfloat16 autocast (the feature front-ends stay float32)."""
HPARAMS_FILE = "hyperparams.yaml"
"""The folder's HyperPyYAML file, as speechbrain's ``from_hparams`` reads it."""
MANIFEST_FILE = "package.json"
"""What the folder is (``kind``), the checksum of every file, and facts for the loaders."""
FORMAT = "lobes-pretrained"
FORMAT_VERSION = 1


class PretrainedError(UsageError):
    """A pretrained folder that cannot be used (missing file, mismatched weights, ...), found before any work."""


# --------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------
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
    import math

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
    import math

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


# --------------------------------------------------------------------------------------------------------------
# Devices and precision
# --------------------------------------------------------------------------------------------------------------
def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The torch device for ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` (``auto``: the GPU when there is one).

    Raises
    ------
    lobes.inputs.UsageError
        An unknown name, or a CUDA device on a machine where torch sees none (or not that many).

    Example
    -------
    >>> resolve_device("cpu")
    device(type='cpu')
    >>> resolve_device("tpu")
    Traceback (most recent call last):
    ...
    lobes.inputs.UsageError: device 'tpu': expected auto, cpu, cuda or cuda:N
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"device {device!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise UsageError(f"device {device!r}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UsageError(
            f"device {device!r}: torch sees no CUDA GPU on this machine "
            "(torch.cuda.is_available() is False); use device 'cpu' or 'auto'"
        )
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


def resolve_precision(precision: str) -> torch.dtype:
    """``fp32`` -> ``torch.float32``, ``bf16`` -> ``torch.bfloat16`` (a ``ValueError`` lists the valid names).

    Example
    -------
    >>> resolve_precision("bf16")
    torch.bfloat16
    """
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if precision not in dtypes:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    return dtypes[precision]


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """A context that runs the model at ``precision`` on ``device`` (no-op for ``fp32``).

    Example
    -------
    >>> with autocast(torch.device("cpu"), "bf16"):
    ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
    torch.bfloat16
    """
    dtype = resolve_precision(precision)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# --------------------------------------------------------------------------------------------------------------
# Writing a pretrained folder
# --------------------------------------------------------------------------------------------------------------
def state_dict_bytes(state_dict: Mapping[str, torch.Tensor]) -> bytes:
    """``torch.save`` bytes of a state dict that are the same every time for the same values.

    Tensors are detached, moved to the CPU and made contiguous copies (so no view saves a larger storage),
    in the given key order.

    Example
    -------
    >>> sd = {"w": torch.arange(6.0).view(2, 3)[:, :2]}
    >>> state_dict_bytes(sd) == state_dict_bytes({"w": sd["w"].clone()})
    True
    """
    clean = {}
    for key, value in state_dict.items():
        if not torch.is_tensor(value):
            raise TypeError(f"state dict entry {key!r} is a {type(value).__name__}, expected a tensor")
        clean[key] = value.detach().to("cpu", copy=True).contiguous()
    buffer = io.BytesIO()
    torch.save(clean, buffer)
    return buffer.getvalue()


def check_no_absolute_paths(text: str, what: str, forbidden: Sequence[str | os.PathLike] = ()) -> None:
    """Refuse a text file that names an absolute path (or one of the ``forbidden`` folders).

    A pretrained folder is copied to other machines; a path of the training machine in it is either
    useless or a leak. Absolute paths are found as YAML / JSON string values that start with ``/`` (or a
    drive letter) and contain another separator.

    Example
    -------
    >>> check_no_absolute_paths("a: 3\\nb: relative/file.txt\\nsee https://example.org/a/b\\n", "hyperparams.yaml")
    >>> check_no_absolute_paths("csv_file: /home/me/noise.csv\\n", "hyperparams.yaml")
    Traceback (most recent call last):
    ...
    ValueError: hyperparams.yaml names an absolute path of this machine ('/home/me/noise.csv'); ...
    """
    import re

    for folder in forbidden:
        folder = os.path.abspath(os.fspath(folder))
        if len(folder) > 1 and folder in text:
            raise ValueError(f"{what} names {folder!r} of this machine; a pretrained folder must not")
    found = re.search(
        r"""(?:^|(?<=[\s'"`=\[,(]))((?:/|[A-Za-z]:\\)[^\s/\\'",\]\)]+[/\\][^\s'",\]\)]*)""", text, re.MULTILINE
    )  # /a/b or C:\a\b; not the // of a URL
    if found:
        raise ValueError(
            f"{what} names an absolute path of this machine ({found.group(1)!r}); a pretrained folder must not"
        )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class PretrainedWriter:
    """Collects the files of a pretrained folder and writes them all at once.

    Files are written (atomically, with :mod:`lobes.io`) into a staging folder beside ``out_dir``, then
    ``package.json`` (kind, checksums, ``info``), then the staging folder takes the place of ``out_dir``.
    An existing ``out_dir`` is replaced only if it is an earlier pretrained folder (it has a
    ``package.json`` of this format) or empty; anything else is refused, so no user data is deleted.
    The same files give byte-identical folders: contents are bytes the caller made deterministic
    (:func:`state_dict_bytes`), names are written sorted, and ``package.json`` holds no time or path.

    Arguments
    ---------
    out_dir : str or PathLike
        The folder to create or replace.
    kind : str
        What the folder holds (``"asr"``, ``"classification"``, ...), recorded in ``package.json``.

    Example
    -------
    >>> import tempfile, os
    >>> out = os.path.join(tempfile.mkdtemp(), "pretrained")
    >>> w = PretrainedWriter(out, kind="demo")
    >>> w.add_text("README.md", "# demo\\n")
    >>> w.add_state_dict("model.ckpt", {"w": torch.zeros(2)})
    >>> sorted(os.listdir(w.commit(info={"sample_rate": 16000})))
    ['README.md', 'model.ckpt', 'package.json']
    >>> read_manifest(out)["kind"]
    'demo'
    """

    def __init__(self, out_dir: str | os.PathLike, kind: str):
        self.out_dir = Path(out_dir)
        self.kind = kind
        self._files: dict[str, bytes] = {}
        if self.out_dir.exists():
            self._check_replaceable()

    def _check_replaceable(self) -> None:
        if not self.out_dir.is_dir():
            raise PretrainedError(f"{self.out_dir} exists and is not a folder; choose another output folder")
        if any(self.out_dir.iterdir()) and not _is_package(self.out_dir):
            raise PretrainedError(
                f"{self.out_dir} is a non-empty folder that is not a pretrained folder; choose a new "
                "or empty output folder (it would be replaced)"
            )

    def _add(self, name: str, data: bytes) -> None:
        if name in self._files:
            raise ValueError(f"{name} was added twice")
        if name == MANIFEST_FILE or "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(
                f"unusable file name {name!r} in a pretrained folder: expected a plain file name "
                f"other than {MANIFEST_FILE}"
            )
        self._files[name] = data

    def add_bytes(self, name: str, data: bytes) -> None:
        """Add a file with the given contents."""
        self._add(name, bytes(data))

    def add_text(
        self, name: str, text: str, check_paths: bool = True, forbidden: Sequence[str | os.PathLike] = ()
    ) -> None:
        """Add a UTF-8 text file; with ``check_paths``, refuse absolute paths in it (see
        :func:`check_no_absolute_paths`)."""
        if check_paths:
            check_no_absolute_paths(text, name, forbidden)
        self._add(name, text.encode("utf-8"))

    def add_state_dict(self, name: str, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Add a state dict (weights only: no optimizer or scheduler state) saved by :func:`state_dict_bytes`."""
        self._add(name, state_dict_bytes(state_dict))

    def add_file(self, name: str, source: str | os.PathLike) -> None:
        """Add a copy of an existing file."""
        self._add(name, Path(source).read_bytes())

    def commit(self, info: Mapping[str, Any] | None = None) -> Path:
        """Write every file and put the folder in place; ``info`` (JSON values) goes into ``package.json``.

        Returns
        -------
        Path
            ``out_dir``.
        """
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "kind": self.kind,
            "files": {name: _sha256(self._files[name]) for name in sorted(self._files)},
            "info": json.loads(json.dumps(dict(info or {}))),
        }
        text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
        check_no_absolute_paths(text, MANIFEST_FILE)
        parent = self.out_dir.parent
        parent.mkdir(parents=True, exist_ok=True)
        stage = parent / f".{self.out_dir.name}.{os.getpid()}-{secrets.token_hex(4)}.staging"
        old = parent / f".{self.out_dir.name}.{os.getpid()}-{secrets.token_hex(4)}.old"
        stage.mkdir()
        try:
            for name in sorted(self._files):
                atomic_write_bytes(stage / name, self._files[name])
            atomic_write_text(stage / MANIFEST_FILE, text)
            if self.out_dir.exists():
                self._check_replaceable()
                self.out_dir.rename(old)  # a folder cannot be replaced in one step: move the old one aside first
            stage.rename(self.out_dir)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            if old.exists() and not self.out_dir.exists():
                old.rename(self.out_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)
        logger.info("wrote %s (%d files)", self.out_dir, len(self._files) + 1)
        return self.out_dir


def _is_package(folder: Path) -> bool:
    try:
        return json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


# --------------------------------------------------------------------------------------------------------------
# Reading a pretrained folder
# --------------------------------------------------------------------------------------------------------------
def read_manifest(folder: str | os.PathLike) -> dict:
    """The ``package.json`` of a pretrained folder (``kind``, ``files`` checksums, ``info``).

    Raises
    ------
    PretrainedError
        No such folder, or no readable ``package.json`` of this format.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PretrainedError(
            f"{folder}: no such folder; expected a pretrained folder made by "
            "`python -m lobes.package RESULTS_DIR OUT_DIR`"
        )
    path = folder / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PretrainedError(
            f"{folder}: no {MANIFEST_FILE}; expected a pretrained folder made by "
            "`python -m lobes.package RESULTS_DIR OUT_DIR`"
        ) from None
    except (OSError, ValueError) as exc:
        raise PretrainedError(f"{path}: unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PretrainedError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("version", 0) > FORMAT_VERSION:
        raise PretrainedError(
            f"{path}: format version {manifest['version']} is newer than this lobes reads "
            f"({FORMAT_VERSION}); upgrade lobes"
        )
    return manifest


def _verify_files(folder: Path, manifest: dict) -> None:
    for name, digest in sorted(manifest.get("files", {}).items()):
        path = folder / name
        if not path.is_file():
            raise PretrainedError(f"{folder}: {name} is missing (listed in {MANIFEST_FILE})")
        if _file_sha256(path) != digest:
            raise PretrainedError(
                f"{folder}: {name} is not the file that was packaged (checksum differs); the "
                "folder mixes files of different models. Package the run again"
            )


def _load_module_strict(module: torch.nn.Module, path: Path, name: str) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PretrainedError(f"{path}: cannot read the weights of {name!r} ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, Mapping):
        raise PretrainedError(f"{path}: expected a state dict for {name!r}, got {type(state).__name__}")
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}" + (" ..." if len(unexpected) > 5 else ""))
        if shapes:
            parts.append("shape mismatches " + "; ".join(shapes[:5]))
        raise PretrainedError(f"{path} does not fit the {name!r} that {HPARAMS_FILE} builds: {', '.join(parts)}")
    module.load_state_dict(state, strict=True)


def load_pretrained(
    folder: str | os.PathLike, kind: str | None = None, overrides: Mapping | None = None, verify: bool = True
) -> tuple[dict, dict]:
    """Build a pretrained folder's ``hyperparams.yaml`` and load every loadable of its ``pretrainer``.

    Arguments
    ---------
    folder : str or PathLike
        The pretrained folder.
    kind : str, optional
        Expected ``kind`` of ``package.json`` (e.g. ``"asr"``); another kind is an error.
    overrides : mapping, optional
        HyperPyYAML overrides.
    verify : bool
        Compare every file with the checksums of ``package.json``.

    Returns
    -------
    hparams : dict
        The built objects, loadables loaded (modules in eval mode, on the CPU).
    manifest : dict
        ``package.json``.

    Raises
    ------
    PretrainedError
        A missing ``hyperparams.yaml``, ``pretrainer`` or ``<name>.ckpt`` (the message names it), a file that
        differs from the packaged one, or weights that do not fit the model the YAML builds.
    """
    from hyperpyyaml import load_hyperpyyaml
    from speechbrain.utils.checkpoints import DEFAULT_LOAD_HOOKS, DEFAULT_TRANSFER_HOOKS, get_default_hook

    folder = Path(folder)
    manifest = read_manifest(folder)
    if kind is not None and manifest.get("kind") != kind:
        raise PretrainedError(f"{folder} holds a {manifest.get('kind')!r} model, expected {kind!r}")
    hparams_path = folder / HPARAMS_FILE
    if not hparams_path.is_file():
        raise PretrainedError(f"{folder}: no {HPARAMS_FILE}")
    if verify:
        _verify_files(folder, manifest)
    with open(hparams_path, encoding="utf-8") as f:
        try:
            hparams = load_hyperpyyaml(f, dict(overrides or {}))
        except Exception as exc:
            raise PretrainedError(f"{hparams_path}: cannot build it ({type(exc).__name__}: {exc})") from None
    pretrainer = hparams.get("pretrainer")
    loadables = getattr(pretrainer, "loadables", None)
    if not loadables:
        raise PretrainedError(f"{hparams_path}: expected a 'pretrainer' (speechbrain Pretrainer) with loadables")
    missing = [name for name in loadables if not (folder / f"{name}.ckpt").is_file()]
    if missing:
        raise PretrainedError(
            f"{folder}: no weights for {', '.join(missing)}: expected "
            f"{', '.join(f'{n}.ckpt' for n in missing)} beside {HPARAMS_FILE}"
        )
    for name, obj in loadables.items():
        path = folder / f"{name}.ckpt"
        if isinstance(obj, torch.nn.Module):
            _load_module_strict(obj, path, name)
            obj.eval()
            continue
        hook = get_default_hook(obj, DEFAULT_TRANSFER_HOOKS)
        try:
            if hook is not None:
                hook(obj, path)
            else:
                hook = get_default_hook(obj, DEFAULT_LOAD_HOOKS)
                if hook is None:
                    raise PretrainedError(f"{hparams_path}: no speechbrain loader for {name!r} ({type(obj).__name__})")
                hook(obj, path, False)
        except PretrainedError:
            raise
        except Exception as exc:
            raise PretrainedError(f"{path}: cannot load {name!r} ({type(exc).__name__}: {exc})") from None
    return hparams, manifest


def _strip_yaml_extras(node: Any) -> None:
    """Remove comments and anchor names from a ruamel node tree (in place)."""
    comments = getattr(node, "ca", None)
    if comments is not None:
        comments.items.clear()
        comments.comment = None
        if hasattr(comments, "end"):
            comments.end = []
    anchor = getattr(node, "anchor", None)
    if anchor is not None and getattr(anchor, "value", None) is not None:
        anchor.value = None
    if isinstance(node, dict):
        for value in node.values():
            _strip_yaml_extras(value)
    elif isinstance(node, list):
        for value in node:
            _strip_yaml_extras(value)


def yaml_text(entries: Mapping[str, Any], header: str = "") -> str:
    """HyperPyYAML text of top-level ``entries``: plain values or nodes of a YAML tree read with ruamel
    (for instance the ``model`` of a run's ``hyperparams.yaml``), tags kept, comments dropped.

    The nodes are copied, so the tree they come from is unchanged. Values shared inside the entries become
    YAML anchors and aliases, named in order of appearance (the same entries give the same text).

    Arguments
    ---------
    entries : mapping
        Key -> value (ruamel node, or a plain ``int`` / ``float`` / ``str`` / ``bool`` / ``None`` / list / dict).
    header : str
        Comment lines (without ``#``) put on top.

    Example
    -------
    >>> import ruamel.yaml
    >>> text = "lin: !new:torch.nn.Linear  # a layer\\n    in_features: 2\\n    out_features: 3\\n"
    >>> tree = ruamel.yaml.YAML().load(text)
    >>> print(yaml_text({"sample_rate": 16000, "model": tree["lin"]}, header="demo"), end="")
    # demo
    <BLANKLINE>
    sample_rate: 16000
    model: !new:torch.nn.Linear
        in_features: 2
        out_features: 3
    """
    import copy

    import ruamel.yaml

    document = ruamel.yaml.comments.CommentedMap()
    for key, value in entries.items():
        value = copy.deepcopy(value)
        _strip_yaml_extras(value)
        document[key] = value
    yaml = ruamel.yaml.YAML()
    yaml.indent(mapping=4, sequence=4, offset=2)
    yaml.width = 4096
    buffer = io.StringIO()
    yaml.dump(document, buffer)
    top = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines()) + "\n" if header else ""
    return top + buffer.getvalue()
