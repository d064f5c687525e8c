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

from lobes.io import atomic_write_text

__all__ = ["COMPLETE_MARKER", "mark_complete_on_save", "remove_incomplete_checkpoints"]

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
