"""Unlabeled audio for self-supervised training: folders, audio files or CSVs -> train / valid manifests.

Example
-------
>>> import os, tempfile, numpy as np, soundfile as sf
>>> folder = tempfile.mkdtemp()
>>> for i in range(4):
...     sf.write(os.path.join(folder, f"{i}.wav"), np.zeros(16000, dtype="float32"), 16000)
>>> paths = prepare_unlabeled_audio([folder], os.path.join(folder, "manifests"), valid_fraction=0.25)
>>> [len(open(paths[s]).read().splitlines()) - 1 for s in ("train", "valid")]
[3, 1]
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence

from lobes.data.manifest import write_manifest
from lobes.inputs import UsageError, collect_inputs

__all__ = ["UNLABELED_COLUMNS", "prepare_unlabeled_audio"]

UNLABELED_COLUMNS = ["ID", "duration", "wav"]
"""Columns of the manifests written by :func:`prepare_unlabeled_audio`."""


def prepare_unlabeled_audio(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    save_folder: str | os.PathLike,
    valid_fraction: float = 0.02,
    seed: int = 0,
    data_root: str | None = None,
) -> dict[str, str]:
    """List audio inputs (:func:`lobes.inputs.collect_inputs`: folders searched recursively, audio files, CSVs
    with a ``wav`` column) and write ``train.csv`` / ``valid.csv`` (``ID, duration, wav``) under ``save_folder``.

    A random ``valid_fraction`` of the inputs (at least one) is held out for validation; unreadable inputs are
    left out (a usage error if none is readable).

    Returns
    -------
    dict
        ``{"train": path, "valid": path}``.
    """
    if not 0.0 < valid_fraction < 1.0:
        raise UsageError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    files, errors = collect_inputs(inputs, data_root)
    if len(files) < 2:
        raise UsageError(
            f"{inputs}: found {len(files)} readable audio inputs ({len(errors)} unreadable); need at least 2 "
            "(one for validation)"
        )
    order = list(range(len(files)))
    random.Random(seed).shuffle(order)
    n_valid = max(1, round(valid_fraction * len(files)))
    held = set(order[:n_valid])
    rows = {"train": [], "valid": []}
    for i, f in enumerate(files):
        rows["valid" if i in held else "train"].append({"ID": f.key, "duration": f.duration, "wav": f.path})
    paths = {}
    for split, items in rows.items():
        paths[split] = os.path.join(os.fspath(save_folder), f"{split}.csv")
        write_manifest(paths[split], items, UNLABELED_COLUMNS)
    return paths
