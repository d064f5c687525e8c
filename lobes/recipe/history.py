"""Training history of a run: ``history.json`` and ``curves.png``, written atomically.

Example
-------
>>> import tempfile
>>> history = TrainingHistory(tempfile.mkdtemp(), "valid_wer", "valid WER (%)")
>>> history.record(1, train_loss=2.0, valid_loss=1.8, valid_wer=60.0)
>>> history.load()["1"]["valid_wer"]
60.0
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

from lobes.io import atomic_open, atomic_write_text

__all__ = ["TrainingHistory", "save_figure"]


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write a matplotlib figure as PNG atomically (a reader never sees half an image) and close it.

    Example
    -------
    >>> import os, tempfile
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import matplotlib.pyplot as plt
    >>> path = save_figure(plt.figure(figsize=(1, 1)), os.path.join(tempfile.mkdtemp(), "f.png"))
    >>> path.read_bytes()[:4]
    b'\\x89PNG'
    """
    import matplotlib.pyplot as plt

    try:
        with atomic_open(path, "wb") as handle:
            fig.savefig(handle, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return Path(path)


class TrainingHistory:
    """The per-epoch figures of a run in ``<folder>/history.json``, drawn in ``<folder>/curves.png``.

    Each :meth:`record` (main process only) stores one epoch, keyed by its number, so a resumed run that
    trains an epoch again replaces it; then it redraws the figure: train / valid loss, and the valid metric.

    Arguments
    ---------
    folder : str or PathLike
        The run's output folder.
    metric : str
        Name of the valid metric in the records (e.g. ``valid_wer``), drawn in the second panel.
    metric_label : str
        Its axis label.

    Example
    -------
    >>> import tempfile
    >>> history = TrainingHistory(tempfile.mkdtemp(), "valid_acc", "valid accuracy (%)")
    >>> history.record(1, train_loss=2.0, valid_loss=1.5, valid_acc=40.0)
    >>> history.record(2, train_loss=1.0, valid_loss=0.9, valid_acc=70.0)
    >>> sorted(history.load()), (history.folder / "curves.png").exists()
    (['1', '2'], True)
    """

    def __init__(self, folder: str | os.PathLike, metric: str, metric_label: str):
        self.folder = Path(folder)
        self.metric = metric
        self.metric_label = metric_label

    @property
    def path(self) -> Path:
        """The JSON file."""
        return self.folder / "history.json"

    def load(self) -> dict[str, dict[str, float]]:
        """``{epoch: {name: value}}`` as recorded so far (empty before the first epoch)."""
        if not self.path.exists():
            return {}
        with open(self.path, encoding="utf-8") as handle:
            return json.load(handle)

    def record(self, epoch: int, **values: float) -> None:
        """Store the figures of ``epoch`` (``train_loss``, ``valid_loss``, the metric) and redraw the curves."""
        from speechbrain.utils.distributed import if_main_process

        if not if_main_process():
            return
        history = self.load()
        history[str(int(epoch))] = {name: float(value) for name, value in values.items()}
        atomic_write_text(self.path, json.dumps(history, indent=1))
        self.plot(history)

    def plot(self, history: Mapping[str, Mapping[str, float]]) -> Path:
        """Draw ``curves.png``: losses per epoch on the left, the valid metric on the right."""
        logging.getLogger("matplotlib").setLevel(logging.WARNING)  # before the import, which logs its set-up
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = sorted(history, key=int)
        x = [int(e) for e in epochs]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        for name, label in (("train_loss", "train"), ("valid_loss", "valid")):
            ax1.plot(x, [history[e].get(name, math.nan) for e in epochs], marker="o", label=label)
        ax1.set_xlabel("epoch")
        ax1.set_ylabel("loss")
        ax1.legend()
        ax2.plot(x, [history[e].get(self.metric, math.nan) for e in epochs], marker="o", color="C2")
        ax2.set_xlabel("epoch")
        ax2.set_ylabel(self.metric_label)
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
        fig.tight_layout()
        return save_figure(fig, self.folder / "curves.png")
