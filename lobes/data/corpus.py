"""Resumable, deterministic generation of one split of a synthetic corpus.

A split is planned first (a list of items, each a dict of plain values), then rendered in fixed
chunks of consecutive items: the audio of an item is a function of its chunk (a chunk shares one
load of the synthesizer), and chunk boundaries depend only on the item index, never on what is
missing or on the number of workers. Every chunk with a missing wav is rendered again as a whole,
possibly in worker processes, and its wavs are written atomically (:mod:`lobes.io`); then the
manifest is written and, last, a completion marker holding a hash of the plan. A later call with the
same plan finds the marker and does nothing; a call after an interruption renders only the chunks
with missing files and ends with the same bytes as an uninterrupted run; a call with a different
plan (other seed or size) removes the old split's wavs first. Two processes building the same split (two
trainings started together on one corpus) take turns: the second waits for the first, then finds the split
complete.

Example
-------
>>> import os, tempfile
>>> folder = tempfile.mkdtemp()
>>> items = [{"ID": f"u{i}", "wav": os.path.join(folder, "w", f"u{i}.wav"), "n": 800 * (i + 1)} for i in range(2)]
>>> path = build_split(items, _example_render, os.path.join(folder, "w"), os.path.join(folder, "s.csv"),
...                   ["ID", "duration", "wav"], num_workers=0)
>>> open(path).read().splitlines()[1:]  # doctest: +ELLIPSIS
['u0,0.05,.../w/u0.wav', 'u1,0.1,.../w/u1.wav']
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_all_start_methods, get_context

import numpy as np

from lobes.data.audio import read_wav_info, write_wav_atomic
from lobes.data.manifest import write_manifest
from lobes.io import atomic_write_text, exclusive_lock, remove_stale_temporaries

__all__ = [
    "SAMPLE_RATE",
    "build_split",
    "default_num_workers",
    "is_complete",
    "lock_path",
    "marker_path",
    "plan_hash",
    "write_if_changed",
]

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
"""Sample rate of every synthesized corpus."""

_PLAN_FILE = ".plan"


def _example_render(items: list[dict]) -> list[np.ndarray]:
    return [np.zeros(item["n"], dtype=np.float32) for item in items]


def plan_hash(items: Sequence[dict], extra: object = None) -> str:
    """SHA-256 of the plan (items and any extra settings), as hex."""
    payload = json.dumps({"items": list(items), "extra": extra}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def default_num_workers(num_items: int) -> int:
    """Worker processes for ``num_items`` renders: none for small jobs, else up to the CPU count."""
    if num_items < 200:
        return 0
    return max(1, min(4, os.cpu_count() or 1))


def _worker_context():
    """``fork`` where available: workers need no re-import of the calling script (which ``spawn`` runs
    again, breaking scripts without a ``__main__`` guard) and only use numpy and espeak, never torch."""
    return get_context("fork" if "fork" in get_all_start_methods() else "spawn")


def _render_chunk(
    render: Callable[[list[dict]], list[np.ndarray]], items: list[dict], sample_rate: int = SAMPLE_RATE
) -> list[tuple[str, int]]:
    waves = render(items)
    if len(waves) != len(items):
        raise RuntimeError(f"rendering {len(items)} items gave {len(waves)} waveforms")
    out = []
    for item, wav in zip(items, waves):
        if wav.ndim != 1 or wav.size == 0:
            raise RuntimeError(f"rendering {item['ID']} gave an empty or non-mono waveform of shape {wav.shape}")
        write_wav_atomic(item["wav"], wav, sample_rate)
        out.append((item["ID"], int(wav.shape[0])))
    return out


def _existing_length(path: str, sample_rate: int) -> int | None:
    if not os.path.isfile(path):
        return None
    try:
        frames, rate = read_wav_info(path)
    except RuntimeError:  # unreadable (e.g. truncated by a crash outside our atomic writes)
        return None
    if rate != sample_rate or frames <= 0:
        return None
    return frames


def _reset_folder(folder: str, digest: str) -> None:
    """Make ``folder`` belong to the plan ``digest``: wavs of another plan are removed."""
    os.makedirs(folder, exist_ok=True)
    plan_path = os.path.join(folder, _PLAN_FILE)
    previous = None
    if os.path.isfile(plan_path):
        with open(plan_path, encoding="utf-8") as handle:
            previous = handle.read().strip()
    if previous != digest:
        stale = glob.glob(os.path.join(folder, "*.wav"))
        if stale:
            logger.info("removing %d wav files of a different plan in %s", len(stale), folder)
        for path in stale:
            os.remove(path)
        atomic_write_text(plan_path, digest + "\n")
    remove_stale_temporaries(folder)  # left by writers killed in the middle of a file


def write_if_changed(path: str, text: str) -> None:
    """Atomically write ``text`` to ``path`` unless the file already holds exactly that text."""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            if handle.read() == text:
                return
    atomic_write_text(path, text)


def _hidden_beside(manifest_path: str, ending: str) -> str:
    folder, name = os.path.split(os.path.abspath(manifest_path))
    return os.path.join(folder, f".{name}{ending}")


def marker_path(manifest_path: str) -> str:
    """Completion marker of a manifest: ``<folder>/.<name>.done``."""
    return _hidden_beside(manifest_path, ".done")


def lock_path(manifest_path: str) -> str:
    """Lock file of a manifest's build: ``<folder>/.<name>.lock`` (:func:`lobes.io.exclusive_lock`)."""
    return _hidden_beside(manifest_path, ".lock")


def is_complete(manifest_path: str, digest: str) -> bool:
    """Whether ``manifest_path`` was completed for the plan ``digest``."""
    marker = marker_path(manifest_path)
    if not (os.path.isfile(manifest_path) and os.path.isfile(marker)):
        return False
    with open(marker, encoding="utf-8") as handle:
        return handle.read().strip() == digest


def build_split(
    items: Sequence[dict],
    render: Callable[[list[dict]], list[np.ndarray]],
    wav_folder: str,
    manifest_path: str,
    columns: Sequence[str],
    num_workers: int | None = None,
    chunk_size: int = 16,
    extra: object = None,
    sample_rate: int = SAMPLE_RATE,
) -> str:
    """Render the missing wavs of ``items`` and write their manifest (resumable, atomic).

    Arguments
    ---------
    items : sequence of dict
        The plan: each item holds ``"ID"``, ``"wav"`` (an absolute path inside ``wav_folder``) and
        whatever ``render`` needs; manifest columns other than ``duration`` are read from it.
    render : callable
        A module-level function ``list of items -> list of float32 waveforms`` (picklable for
        workers), called once per chunk.
    wav_folder : str
        Folder of the split's wavs.
    manifest_path : str
        The CSV to write.
    columns : sequence of str
        Manifest columns; ``duration`` is computed from the audio.
    num_workers : int, optional
        Worker processes (0 = render in this process); default :func:`default_num_workers`.
    chunk_size : int
        Items per chunk (part of the plan: the audio may depend on it).
    extra : object
        Settings that do not appear in the items but change the audio (part of the plan hash).
    sample_rate : int
        Rate of the rendered audio (and of the wavs written).

    Returns
    -------
    str
        ``manifest_path``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    digest = plan_hash(items, {"extra": extra, "sample_rate": sample_rate, "chunk_size": chunk_size})
    if is_complete(manifest_path, digest):
        logger.info("%s is complete, skipping", manifest_path)
        return manifest_path
    ids = [item["ID"] for item in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate IDs in the plan of {manifest_path}")
    # one builder at a time per split: a second run preparing the same corpus waits, then finds it complete
    with exclusive_lock(lock_path(manifest_path), what=f"the lock of {manifest_path} (building it)"):
        if is_complete(manifest_path, digest):
            logger.info("%s was completed by another process", manifest_path)
            return manifest_path
        _reset_folder(wav_folder, digest)
        marker = marker_path(manifest_path)
        if os.path.exists(marker):
            os.remove(marker)

        lengths: dict[str, int] = {}
        chunks = []
        for first in range(0, len(items), chunk_size):
            chunk = list(items[first : first + chunk_size])
            frames = [_existing_length(item["wav"], sample_rate) for item in chunk]
            if any(f is None for f in frames):
                chunks.append(chunk)
            else:
                lengths.update((item["ID"], f) for item, f in zip(chunk, frames))
        if chunks:
            start = time.time()
            todo = sum(len(chunk) for chunk in chunks)
            workers = default_num_workers(todo) if num_workers is None else num_workers
            workers = min(workers, len(chunks))
            logger.info("rendering %d of %d files for %s (%d workers)", todo, len(items), manifest_path, workers)
            if workers <= 0:
                for chunk in chunks:
                    lengths.update(_render_chunk(render, chunk, sample_rate))
            else:
                with ProcessPoolExecutor(max_workers=workers, mp_context=_worker_context()) as pool:
                    for result in pool.map(_render_chunk, [render] * len(chunks), chunks, [sample_rate] * len(chunks)):
                        lengths.update(result)
            logger.info("rendered %d files in %.1f s", todo, time.time() - start)

        rows = []
        for item in items:
            row = {name: item[name] for name in columns if name != "duration"}
            if "duration" in columns:
                row["duration"] = lengths[item["ID"]] / sample_rate
            rows.append(row)
        write_manifest(manifest_path, rows, columns)
        atomic_write_text(marker, digest + "\n")
        return manifest_path
