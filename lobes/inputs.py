"""What the project's commands share: finding the audio inputs, batching them by length, exit codes, run
settings that a resumed run must match, the ``--device`` they run on.

``python -m lobes.extract``, ``lobes.transcribe`` and ``lobes.classify`` all take files, folders
(searched recursively) or CSV manifests, batch the inputs by duration, report unreadable files with a
reason while every good file is still processed, and exit with :data:`EXIT_OK`, :data:`EXIT_FAILED_FILES`
or :data:`EXIT_USAGE`.

Example
-------
>>> import numpy as np, soundfile as sf, tempfile, os
>>> root = tempfile.mkdtemp()
>>> sf.write(os.path.join(root, "a.wav"), np.zeros(8000, dtype="float32"), 16000)
>>> files, errors = collect_inputs(root)
>>> [(f.key, round(f.duration, 2)) for f in files], errors
([('a.wav', 0.5)], [])
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from lobes.io import AudioError, atomic_write_text, audio_duration

if TYPE_CHECKING:
    import torch

__all__ = [
    "AUDIO_EXTENSIONS",
    "EXIT_FAILED_FILES",
    "EXIT_OK",
    "EXIT_USAGE",
    "AudioInput",
    "SettingsMismatch",
    "UsageError",
    "check_run_settings",
    "collect_inputs",
    "fingerprint",
    "length_batches",
    "parse_shard",
    "resolve_device",
    "write_csv",
]

logger = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".au")
"""File endings picked up in folders (case-insensitive)."""

EXIT_OK = 0
"""Every input was processed."""
EXIT_FAILED_FILES = 1
"""Some inputs could not be read or were invalid; they are listed with the reason, the others were done."""
EXIT_USAGE = 2
"""Bad arguments, a missing or malformed input list, an unusable model, or a settings mismatch with
earlier outputs: reported before any work."""


class UsageError(ValueError):
    """A problem with the command's arguments or set-up, found before any work (exit code 2)."""


class SettingsMismatch(UsageError):
    """An output folder or file holds results made with other settings."""


@dataclasses.dataclass
class AudioInput:
    """One input file: where it is, a unique relative name for its outputs, its duration in seconds."""

    path: str
    key: str
    duration: float


def _safe_rel(name: str) -> str:
    """A relative name that cannot leave an output folder."""
    parts = [p for p in Path(name).parts if p not in ("", ".", "/")]
    if not parts or any(p == ".." for p in parts):
        raise UsageError(f"unusable output name {name!r}: expected a relative path without '..'")
    return str(Path(*parts))


def _read_csv_inputs(csv_path: Path, data_root: str | None) -> list[tuple[str, str | None]]:
    """Rows ``(wav path, ID or None)`` of a manifest; relative paths are taken from the CSV's folder."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in (reader.fieldnames or [])]
        if "wav" not in fields:
            raise UsageError(
                f"{csv_path}: expected a CSV with a 'wav' column (and optionally 'ID'), got columns {fields}"
            )
        rows = []
        for row in reader:
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            wav = row["wav"]
            if data_root is not None:
                wav = wav.replace("$data_root", data_root)
            if not os.path.isabs(wav):
                wav = str(csv_path.parent / wav)
            rows.append((os.path.normpath(wav), row.get("ID") or None))
    return rows


def _entries(source: Path, data_root: str | None) -> list[tuple[str, str]]:
    """``(path, key)`` pairs of one folder, CSV or audio file."""
    if source.is_dir():
        paths = sorted(str(p) for p in source.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
        return [(p, os.path.relpath(p, source)) for p in paths]
    if source.is_file() and source.suffix.lower() == ".csv":
        rows = _read_csv_inputs(source, data_root)
        if any(i is not None for _, i in rows):
            missing = [w for w, i in rows if i is None]
            if missing:
                raise UsageError(f"{source}: empty ID for {missing[:3]}")
            return [(w, _safe_rel(i)) for w, i in rows]
        parents = [os.path.dirname(os.path.abspath(w)) for w, _ in rows]
        common = os.path.commonpath(parents) if parents else ""
        return [(w, os.path.relpath(os.path.abspath(w), common)) for w, _ in rows]
    if source.is_file():
        return [(str(source), source.name)]
    raise UsageError(f"{source}: expected an existing audio file, folder or CSV file")


def collect_inputs(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    data_root: str | None = None,
    shard: tuple[int, int] = (0, 1),
) -> tuple[list[AudioInput], list[tuple[str, str]]]:
    """List the audio inputs of files, folders (recursively) and CSV manifests, in a fixed order.

    Arguments
    ---------
    sources : path or list of paths
        Audio files, folders (files ending in one of ``AUDIO_EXTENSIONS``) or CSVs with a ``wav`` column
        and an optional ``ID`` column (relative paths are read from the CSV's folder).
    data_root : str, optional
        Replaces ``$data_root`` in the CSVs' paths.
    shard : (int, int)
        ``(index, count)``: keep the sorted inputs ``index, index + count, ...`` (see ``parse_shard``).

    Returns
    -------
    files : list of AudioInput
        Inputs whose header reads, sorted by key. The key is the path relative to the folder given, the
        CSV's ``ID``, or the file name; keys are unique (``UsageError`` otherwise).
    errors : list of (str, str)
        ``(path, reason)`` for inputs whose header cannot be read.

    Example
    -------
    >>> collect_inputs("/does/not/exist")
    Traceback (most recent call last):
    ...
    lobes.inputs.UsageError: /does/not/exist: expected an existing audio file, folder or CSV file
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not sources:
        raise UsageError("no inputs given: expected audio files, folders or CSV files")
    entries: list[tuple[str, str]] = []
    for source in sources:
        entries.extend(_entries(Path(source), data_root))
    seen: dict[str, str] = {}
    for path, key in entries:
        if key in seen and seen[key] != path:
            raise UsageError(
                f"{path} and {seen[key]} have the same name {key!r}; pass them separately "
                "or through a CSV with distinct IDs"
            )
        seen[key] = path
    entries = sorted(set(entries), key=lambda e: e[1])
    files, errors = [], []
    for path, key in entries[shard[0] :: shard[1]]:
        try:
            files.append(AudioInput(path, key, audio_duration(path)))
        except AudioError as exc:  # report the file, keep going
            errors.append((path, f"unreadable: {exc}"))
    return files, errors


def length_batches(durations: Sequence[float], batch_seconds: float) -> list[list[int]]:
    """Group indices into batches of similar length whose padded size stays within ``batch_seconds``.

    Indices are sorted by duration (longest first, ties by index), then cut greedily so that
    ``len(batch) * longest_in_batch <= batch_seconds`` (a batch always holds at least one item).

    Arguments
    ---------
    durations : sequence of float
        Duration of each item in seconds.
    batch_seconds : float
        Budget of padded audio per batch, in seconds.

    Returns
    -------
    list of list of int
        Batches of indices into ``durations``.

    Example
    -------
    >>> length_batches([1.0, 5.0, 2.0, 1.5, 4.0], batch_seconds=8.0)
    [[1], [4, 2], [3, 0]]
    """
    if batch_seconds <= 0:
        raise ValueError(f"batch_seconds must be positive, got {batch_seconds}")
    order = sorted(range(len(durations)), key=lambda i: (-durations[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = durations[current[0]] if current else durations[i]
        if current and (len(current) + 1) * longest > batch_seconds:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def parse_shard(text: str | None, env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """Combine ``--shard i/n`` with ``torchrun``'s ``RANK`` / ``WORLD_SIZE`` into one ``(index, count)``.

    Arguments
    ---------
    text : str, optional
        ``"i/n"`` with ``0 <= i < n``, or None for no explicit shard.
    env : mapping, optional
        Environment to read ``RANK`` / ``WORLD_SIZE`` from (default ``os.environ``).

    Returns
    -------
    (int, int)
        This process takes the sorted inputs ``index, index + count, index + 2 * count, ...``.

    Example
    -------
    >>> parse_shard("1/3", env={}), parse_shard("1/3", env={"RANK": "1", "WORLD_SIZE": "2"})
    ((1, 3), (3, 6))
    """
    env = os.environ if env is None else env
    index, count = 0, 1
    if text:
        try:
            index, count = (int(v) for v in text.split("/"))
        except ValueError:
            raise UsageError(f"--shard {text!r}: expected the form i/n, e.g. 0/4") from None
        if not 0 <= index < count:
            raise UsageError(f"--shard {text!r}: expected 0 <= i < n")
    world = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    if not 0 <= rank < world:
        raise UsageError(f"RANK={rank} outside WORLD_SIZE={world}")
    return index * world + rank, count * world


def resolve_device(device: str | torch.device | None = "auto", option: str = "device") -> torch.device:
    """The torch device a command or loader runs on, checked to exist on this machine.

    Arguments
    ---------
    device : str, torch.device or None
        ``auto`` (or ``None``: the GPU when torch sees one, else the CPU), ``cpu``, ``cuda``, ``cuda:N``, or
        another torch device type whose backend is available here (``mps``, ``xpu``, ...).
    option : str
        How the setting is named in messages: ``--device`` for a command-line option, ``device`` for an
        argument.

    Returns
    -------
    torch.device

    Raises
    ------
    UsageError
        Not a torch device, a CUDA device on a machine where torch sees no GPU (or not that many), or a
        backend that is not available here; the message names the device.

    Example
    -------
    >>> resolve_device("cpu")
    device(type='cpu')
    >>> resolve_device("gpu0", option="--device")
    Traceback (most recent call last):
    ...
    lobes.inputs.UsageError: --device 'gpu0': not a torch device; expected auto, cpu, cuda or cuda:N
    """
    import torch  # here, so that the commands' torch-free paths (--backend onnx) can import this module

    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = f"{option} {device}"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"{option} {str(device)!r}: not a torch device; expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"{name}: torch sees no CUDA GPU on this machine (torch.cuda.is_available() is False); "
                f"use {option} cpu or auto"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise UsageError(f"{name}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
        return dev
    backend = getattr(torch.backends, dev.type, None) or getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise UsageError(f"{name}: no {dev.type} device is available here; use {option} cpu or auto")
    return dev


def fingerprint(path: str | os.PathLike | None) -> str | None:
    """SHA-256 of a file, or of every file of a folder (names and contents), to recognise a model.

    Example
    -------
    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "m.ckpt")
    >>> _ = open(p, "wb").write(b"weights")
    >>> fingerprint(p)[:12]
    '9a129038d9a0'
    """
    if path is None:
        return None
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            digest.update(str(f.relative_to(path)).encode("utf-8") + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def check_run_settings(
    record: str | os.PathLike,
    settings: Mapping[str, Any],
    overwrite: bool = False,
    clear: Callable[[], Any] | None = None,
) -> bool:
    """Make sure earlier outputs were made with the same ``settings`` before a run adds to them.

    The first run writes ``settings`` as JSON to ``record``; a later run with the same settings resumes
    (returns ``True``); with other settings it raises :class:`SettingsMismatch` naming each difference,
    unless ``overwrite`` is set: then ``clear()`` discards the old outputs and only afterwards is the record
    replaced (returns ``False``), so a run killed half-way through never leaves old outputs under a record of
    the new settings. With ``overwrite`` and no record yet, ``clear()`` also runs (outputs of unknown settings).

    Arguments
    ---------
    record : str or PathLike
        The JSON file that keeps the settings (e.g. ``OUT/settings.json``).
    settings : mapping
        JSON-serialisable values that change the outputs (model fingerprint, layer, precision, ...).
    overwrite : bool
        Replace earlier outputs made with other settings instead of refusing.
    clear : callable, optional
        Deletes the earlier outputs; required with ``overwrite``.

    Returns
    -------
    bool
        ``True`` when earlier outputs may be kept (no record, or the same settings).

    Example
    -------
    >>> import tempfile, os
    >>> rec = os.path.join(tempfile.mkdtemp(), "settings.json")
    >>> check_run_settings(rec, {"layer": "last"}), check_run_settings(rec, {"layer": "last"})
    (True, True)
    >>> check_run_settings(rec, {"layer": 3})
    Traceback (most recent call last):
    ...
    lobes.inputs.SettingsMismatch: ... was made with other settings: layer: 'last' before, 3 now; ...
    """
    record = Path(record)
    settings = json.loads(json.dumps(dict(settings)))  # normalised as it will read back
    if overwrite and clear is None:
        raise ValueError("check_run_settings: overwrite needs clear, the function that deletes the old outputs")
    if record.exists():
        try:
            old = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SettingsMismatch(
                f"{record}: unreadable settings record ({exc}); remove it or pass --overwrite"
            ) from None
        if old == settings:
            return True
        if not overwrite:
            keys = sorted(set(old) | set(settings))
            diffs = [
                f"{k}: {old.get(k)!r} before, {settings.get(k)!r} now" for k in keys if old.get(k) != settings.get(k)
            ]
            raise SettingsMismatch(
                f"{record.parent} was made with other settings: {'; '.join(diffs)}; use "
                "another output, the same settings to resume, or --overwrite to start over"
            )
        clear()  # before the new record: a kill in between leaves the old record, which refuses a mix
        atomic_write_text(record, json.dumps(settings, indent=1, sort_keys=True))
        return False
    if overwrite:
        clear()
    atomic_write_text(record, json.dumps(settings, indent=1, sort_keys=True))
    return True


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a CSV file atomically (see :func:`lobes.io.atomic_open`)."""
    from lobes.io import atomic_open

    with atomic_open(path, "w") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
