"""CSV manifests for LibriSpeech (and mini-LibriSpeech) in SpeechBrain's format.

Expected layout (as distributed on openslr.org)::

    <data_folder>/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac
    <data_folder>/<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt

``data_folder`` may also be the ``LibriSpeech`` folder's parent. The manifests have the columns of
the synthetic speech corpus (``ID, duration, wav, spk_id, wrd``), so recipes take either.

Example
-------
>>> import os, tempfile, numpy as np, soundfile as sf
>>> root = tempfile.mkdtemp()
>>> chapter = os.path.join(root, "dev-clean", "84", "121123")
>>> os.makedirs(chapter)
>>> sf.write(os.path.join(chapter, "84-121123-0000.flac"), np.zeros(8000), 16000)
>>> with open(os.path.join(chapter, "84-121123.trans.txt"), "w") as f:
...     _ = f.write("84-121123-0000 GO DO YOU HEAR\\n")
>>> paths = prepare_librispeech(root, os.path.join(root, "csv"), tr_splits=(), dev_splits=("dev-clean",), te_splits=())
>>> open(paths["valid"]).read().splitlines()[1].split(",")[-2:]
['84', 'GO DO YOU HEAR']
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Sequence

from lobes.data.corpus import is_complete, marker_path, plan_hash
from lobes.data.manifest import write_manifest
from lobes.io import atomic_write_text

__all__ = ["LIBRISPEECH_COLUMNS", "prepare_librispeech", "read_split"]

logger = logging.getLogger(__name__)

LIBRISPEECH_COLUMNS = ["ID", "duration", "wav", "spk_id", "wrd"]
"""Columns of the manifests (same as the synthetic speech corpus)."""


def _split_folder(data_folder: str, split: str) -> str:
    for candidate in (os.path.join(data_folder, split), os.path.join(data_folder, "LibriSpeech", split)):
        if os.path.isdir(candidate):
            return candidate
    raise FileNotFoundError(
        f"LibriSpeech split folder {split!r} not found in {data_folder} (expected "
        f"{os.path.join(data_folder, split)}/<speaker>/<chapter>/*.flac, or the same under LibriSpeech/)"
    )


def _read_transcripts(path: str) -> dict[str, str]:
    out = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line:
                continue
            uid, _, words = line.partition(" ")
            if not words.strip():
                raise ValueError(f"{path}, line {number}: expected '<utterance id> <WORDS>', got {line!r}")
            out[uid] = " ".join(words.split())
    return out


def read_split(data_folder: str, split: str) -> list[dict]:
    """Rows (``ID, duration, wav, spk_id, wrd``) of one LibriSpeech split, sorted by ID.

    Durations come from the file headers (``soundfile.info``); a flac without a transcript line,
    or a transcript line without its flac, is an error naming the file.
    """
    import soundfile as sf

    folder = _split_folder(data_folder, split)
    audio = sorted(glob.glob(os.path.join(folder, "*", "*", "*.flac")))
    if not audio:
        raise FileNotFoundError(f"no .flac files under {folder}/<speaker>/<chapter>/ for split {split!r}")
    transcripts: dict[str, dict[str, str]] = {}
    rows = []
    for path in audio:
        uid = os.path.splitext(os.path.basename(path))[0]
        parts = uid.split("-")
        if len(parts) != 3:
            raise ValueError(f"unexpected LibriSpeech file name {path}; expected <speaker>-<chapter>-<utt>.flac")
        chapter_folder = os.path.dirname(path)
        trans = os.path.join(chapter_folder, f"{parts[0]}-{parts[1]}.trans.txt")
        if trans not in transcripts:
            if not os.path.isfile(trans):
                raise FileNotFoundError(f"transcript file {trans} missing for {path}")
            transcripts[trans] = _read_transcripts(trans)
        if uid not in transcripts[trans]:
            raise ValueError(f"no transcript line for {uid} in {trans}")
        info = sf.info(path)
        rows.append(
            {
                "ID": uid,
                "duration": info.frames / info.samplerate,
                "wav": os.path.abspath(path),
                "spk_id": parts[0],
                "wrd": transcripts[trans][uid].upper(),
            }
        )
    known = {os.path.splitext(os.path.basename(p))[0] for p in audio}
    for trans, lines in transcripts.items():
        orphans = sorted(set(lines) - known)
        if orphans:
            raise FileNotFoundError(f"{trans} lists {orphans[:3]} whose .flac files are missing")
    return rows


def prepare_librispeech(
    data_folder: str,
    save_folder: str,
    tr_splits: Sequence[str] = ("train-clean-100",),
    dev_splits: Sequence[str] = ("dev-clean",),
    te_splits: Sequence[str] = ("test-clean",),
    skip_prep: bool = False,
) -> dict[str, str]:
    """Write ``train.csv``, ``valid.csv`` and ``test.csv`` for LibriSpeech splits.

    Arguments
    ---------
    data_folder : str
        Folder holding the split folders (or their ``LibriSpeech/`` parent).
    save_folder : str
        Where the CSVs go.
    tr_splits, dev_splits, te_splits : sequence of str
        Splits concatenated into the train, valid and test manifests (an empty sequence writes an
        empty manifest).
    skip_prep : bool
        Return the paths without reading or writing anything.

    Returns
    -------
    dict
        ``{"train": path, "valid": path, "test": path}``.
    """
    save_folder = os.path.abspath(save_folder)
    roles = {"train": tuple(tr_splits), "valid": tuple(dev_splits), "test": tuple(te_splits)}
    paths = {role: os.path.join(save_folder, f"{role}.csv") for role in roles}
    if skip_prep:
        return paths
    if not os.path.isdir(data_folder):
        raise FileNotFoundError(f"LibriSpeech data folder not found: {data_folder}")
    os.makedirs(save_folder, exist_ok=True)
    for splits in roles.values():
        for split in splits:
            _split_folder(data_folder, split)  # fail early, before any work
    for role, splits in roles.items():
        digest = plan_hash([], {"data_folder": os.path.abspath(data_folder), "splits": splits})
        if is_complete(paths[role], digest):
            logger.info("%s is complete, skipping", paths[role])
            continue
        rows = []
        for split in splits:
            rows.extend(read_split(data_folder, split))
        seen: set[str] = set()
        duplicates = sorted({row["ID"] for row in rows if row["ID"] in seen or seen.add(row["ID"])})
        if duplicates:
            raise ValueError(f"duplicate utterance IDs in splits {list(splits)} for {role}: {duplicates[:3]}")
        write_manifest(paths[role], rows, LIBRISPEECH_COLUMNS)
        atomic_write_text(marker_path(paths[role]), digest + "\n")
        logger.info("wrote %s (%d utterances from %s)", paths[role], len(rows), json.dumps(splits))
    return paths
