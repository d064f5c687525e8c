"""Checkpoints that survive ``kill -9`` while they are being written.

speechbrain's ``Checkpointer`` writes a checkpoint's metadata before its parameter files, so a run
killed in the middle of a save leaves a folder that looks like a checkpoint but cannot be loaded, and
the next run crashes trying to recover from it. Recipes call :func:`remove_incomplete_checkpoints` (on
the main process) before recovery and :func:`mark_complete_on_save` once: every checkpoint then gets a
``COMPLETE`` marker after its last file is on disk, and folders without it are discarded.

Example
-------
>>> import tempfile, torch
>>> from speechbrain.utils.checkpoints import Checkpointer
>>> folder = tempfile.mkdtemp()
>>> checkpointer = Checkpointer(folder, recoverables={"model": torch.nn.Linear(2, 2)})
>>> mark_complete_on_save(checkpointer)
>>> ckpt = checkpointer.save_checkpoint()
>>> os.path.exists(os.path.join(ckpt.path, COMPLETE_MARKER))
True
>>> remove_incomplete_checkpoints(folder)
[]
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from typing import Any

from lobes.io import atomic_write_text

__all__ = ["COMPLETE_MARKER", "mark_complete_on_save", "remove_incomplete_checkpoints", "state_dict_mismatches"]

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"


def mark_complete_on_save(checkpointer) -> None:
    """Wrap ``checkpointer.save_checkpoint`` (used by every save, intra-epoch ones included) so that each
    checkpoint folder gets the ``COMPLETE`` marker once all of its files are written."""
    save = checkpointer.save_checkpoint

    def save_and_mark(*args, **kwargs):
        ckpt = save(*args, **kwargs)
        if ckpt is not None:  # None on processes other than the main one
            atomic_write_text(os.path.join(ckpt.path, COMPLETE_MARKER), "")
        return ckpt

    checkpointer.save_checkpoint = save_and_mark


def remove_incomplete_checkpoints(folder: str | os.PathLike) -> list[str]:
    """Delete the ``CKPT*`` folders of ``folder`` that lack the marker (a save that was interrupted), so
    that recovery loads the last complete checkpoint. Returns the removed paths."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith("CKPT") and os.path.isdir(path) and not os.path.exists(os.path.join(path, COMPLETE_MARKER)):
            logger.warning("removing incomplete checkpoint %s (the run was stopped while saving it)", path)
            shutil.rmtree(path)
            removed.append(path)
    return removed


def state_dict_mismatches(expected: Mapping[str, Any], given: Mapping[str, Any], limit: int = 8) -> list[str]:
    """What keeps ``given`` from loading strictly where ``expected`` (a module's state dict) is: missing keys,
    unexpected keys, wrong shapes, each naming the keys (empty when it fits).

    Arguments
    ---------
    expected : mapping
        The state dict of the module that will load the weights.
    given : mapping
        The weights read from a file.
    limit : int
        Keys named per kind of problem (the count is always given).

    Returns
    -------
    list of str
        One entry per kind of problem.

    Example
    -------
    >>> import torch
    >>> state_dict_mismatches(torch.nn.Linear(2, 3).state_dict(), {"weight": torch.zeros(3, 4), "scale": torch.ones(1)})
    ["missing keys ['bias'] (1)", "unexpected keys ['scale'] (1)", 'wrong shapes weight: expected (3, 2), got (3, 4)']
    """
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k}: expected {tuple(expected[k].shape)}, got {tuple(getattr(given[k], 'shape', ()))}"
        for k in expected
        if k in given and tuple(getattr(given[k], "shape", ())) != tuple(expected[k].shape)
    ]
    problems = []
    for kind, keys in (("missing keys", missing), ("unexpected keys", unexpected)):
        if keys:
            problems.append(f"{kind} {keys[:limit]}{' ...' if len(keys) > limit else ''} ({len(keys)})")
    if shapes:
        problems.append("wrong shapes " + "; ".join(shapes[:limit]) + (" ..." if len(shapes) > limit else ""))
    return problems
