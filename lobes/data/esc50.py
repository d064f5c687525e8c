"""ESC-50 preparation: 16 kHz copies of the clips and fold-based CSV manifests.

Expected layout (the GitHub archive of ESC-50)::

    ESC-50-master/audio/<fold>-<clip>-<take>-<target>.wav     44.1 kHz mono, 5 s
    ESC-50-master/meta/esc50.csv   filename, fold, target, category, esc10, src_file, take

``data_folder`` may be ``ESC-50-master`` itself or its parent. Five-fold cross-validation is five
runs with ``test_fold`` = 1..5.

Example
-------
>>> import os, tempfile, numpy as np, soundfile as sf
>>> root = tempfile.mkdtemp()
>>> os.makedirs(os.path.join(root, "audio")); os.makedirs(os.path.join(root, "meta"))
>>> lines = ["filename,fold,target,category,esc10,src_file,take"]
>>> for fold in range(1, 4):
...     name = f"{fold}-100-A-0.wav"
...     sf.write(os.path.join(root, "audio", name), np.zeros(4410), 44100)
...     lines.append(f"{name},{fold},0,dog,True,100,A")
>>> _ = open(os.path.join(root, "meta", "esc50.csv"), "w").write("\\n".join(lines) + "\\n")
>>> paths = prepare_esc50(root, os.path.join(root, "out"), test_fold=3, valid_fold=2)
>>> open(paths["test"]).read().splitlines()[1].split(",")[-2:]
['dog', '3']
"""

from __future__ import annotations

import csv
import logging
import os

import numpy as np

from lobes.data.audio import read_wav_info, resample
from lobes.data.corpus import build_split
from lobes.data.manifest import write_manifest

__all__ = ["ESC50_COLUMNS", "prepare_esc50", "read_esc50_meta"]

logger = logging.getLogger(__name__)

ESC50_COLUMNS = ["ID", "duration", "wav", "label", "fold"]
"""Columns of the ESC-50 manifests (label = category name, e.g. ``dog``)."""

_META_COLUMNS = ("filename", "fold", "target", "category")


def _find_root(data_folder: str) -> str:
    for candidate in (data_folder, os.path.join(data_folder, "ESC-50-master")):
        if os.path.isfile(os.path.join(candidate, "meta", "esc50.csv")):
            return candidate
    raise FileNotFoundError(
        f"ESC-50 meta file not found: expected {os.path.join(data_folder, 'meta', 'esc50.csv')} or "
        f"{os.path.join(data_folder, 'ESC-50-master', 'meta', 'esc50.csv')}"
    )


def read_esc50_meta(data_folder: str) -> tuple[str, list[dict]]:
    """(root folder, rows of ``meta/esc50.csv``) with ``fold`` and ``target`` as ints.

    Every listed clip must exist under ``<root>/audio/``.
    """
    root = _find_root(data_folder)
    meta = os.path.join(root, "meta", "esc50.csv")
    with open(meta, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in _META_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{meta} lacks columns {missing}; expected at least {list(_META_COLUMNS)}")
        rows = []
        for number, row in enumerate(reader, start=2):
            try:
                row["fold"], row["target"] = int(row["fold"]), int(row["target"])
            except ValueError as err:
                raise ValueError(f"{meta}, line {number}: fold and target must be integers, got {row}") from err
            rows.append(row)
    if not rows:
        raise ValueError(f"{meta} lists no clips")
    absent = [r["filename"] for r in rows if not os.path.isfile(os.path.join(root, "audio", r["filename"]))]
    if absent:
        raise FileNotFoundError(
            f"{len(absent)} ESC-50 clips listed in {meta} are missing from {os.path.join(root, 'audio')}, "
            f"e.g. {absent[:3]}"
        )
    return root, rows


def render_resampled(items: list[dict]) -> list[np.ndarray]:
    """Read each ``item["src"]`` (:func:`lobes.io.load_audio`, mixed to mono at its own rate) and resample it to
    ``item["rate"]`` Hz with :func:`lobes.data.audio.resample` (scipy's polyphase filter)."""
    from lobes.io import load_audio

    out = []
    for item in items:
        rate = read_wav_info(item["src"])[1]
        out.append(resample(load_audio(item["src"], rate).numpy(), rate, item["rate"]))
    return out


def prepare_esc50(
    data_folder: str,
    save_folder: str,
    test_fold: int = 5,
    valid_fold: int | None = 4,
    sample_rate: int = 16000,
    valid_fraction: float = 0.1,
    num_workers: int | None = None,
) -> dict[str, str]:
    """Resample ESC-50 to ``sample_rate`` (once) and write fold-based manifests.

    Arguments
    ---------
    data_folder : str
        ``ESC-50-master`` or its parent.
    save_folder : str
        Receives ``audio_<rate>/`` (resampled clips, converted once and reused) and the CSVs.
    test_fold : int
        Fold of the test set (1..5).
    valid_fold : int or None
        Fold of the valid set; None takes ``valid_fraction`` of every class of the training folds
        instead (a fixed, seeded choice).
    sample_rate : int
        Output sample rate.
    valid_fraction : float
        Share of the training folds used for valid when ``valid_fold`` is None.
    num_workers : int, optional
        Worker processes for the resampling (None: automatic).

    Returns
    -------
    dict
        ``{"train": path, "valid": path, "test": path}`` of CSVs with columns
        ``ID, duration, wav, label, fold``; train holds the folds other than test and valid.
    """
    root, meta = read_esc50_meta(data_folder)
    folds = sorted({row["fold"] for row in meta})
    if test_fold not in folds:
        raise ValueError(f"test_fold must be one of the folds {folds}, got {test_fold}")
    if valid_fold is not None and (valid_fold not in folds or valid_fold == test_fold):
        raise ValueError(
            f"valid_fold must be None or a fold of {folds} other than test_fold={test_fold}, got {valid_fold}"
        )
    if valid_fold is None and not 0 < valid_fraction < 1:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    save_folder = os.path.abspath(save_folder)
    audio_folder = os.path.join(save_folder, f"audio_{sample_rate}")
    items = []
    for row in sorted(meta, key=lambda r: r["filename"]):
        uid = os.path.splitext(row["filename"])[0]
        items.append(
            {
                "ID": uid,
                "wav": os.path.join(audio_folder, uid + ".wav"),
                "src": os.path.abspath(os.path.join(root, "audio", row["filename"])),
                "rate": int(sample_rate),
                "label": row["category"],
                "fold": row["fold"],
                "target": row["target"],
            }
        )
    all_path = build_split(
        items,
        render_resampled,
        audio_folder,
        os.path.join(save_folder, f"all_{sample_rate}.csv"),
        ESC50_COLUMNS,
        num_workers=num_workers,
        sample_rate=sample_rate,
    )
    with open(all_path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    test = [r for r in rows if int(r["fold"]) == test_fold]
    if valid_fold is not None:
        valid = [r for r in rows if int(r["fold"]) == valid_fold]
        train = [r for r in rows if int(r["fold"]) not in (test_fold, valid_fold)]
    else:
        pool = [r for r in rows if int(r["fold"]) != test_fold]
        rng = np.random.default_rng([test_fold, 50])
        chosen = set()
        for label in sorted({r["label"] for r in pool}):
            members = [r["ID"] for r in pool if r["label"] == label]
            count = max(1, int(round(valid_fraction * len(members)))) if len(members) > 1 else 0
            chosen.update(members[i] for i in rng.permutation(len(members))[:count])
        valid = [r for r in pool if r["ID"] in chosen]
        train = [r for r in pool if r["ID"] not in chosen]
    paths = {}
    for name, subset in (("train", train), ("valid", valid), ("test", test)):
        paths[name] = os.path.join(save_folder, f"{name}.csv")
        write_manifest(paths[name], subset, ESC50_COLUMNS)
    logger.info(
        "ESC-50: %d train, %d valid, %d test clips (test fold %d)", len(train), len(valid), len(test), test_fold
    )
    return paths
