"""Class names of fine-tuned BEATs models (AudioSet AS2M): label ids in predictor order, display names.

An AS2M checkpoint's ``label_dict`` maps predictor index -> AudioSet label id (``/m/09x0r``); its order is
not the order of AudioSet's ``class_labels_indices.csv``, which maps ids to display names ("Speech").
"""

from __future__ import annotations

import csv
import logging
import os
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from lobes.beats.model import BEATs

__all__ = ["label_names", "read_audioset_names"]

logger = logging.getLogger(__name__)


def read_audioset_names(path: str | os.PathLike) -> dict[str, str]:
    """Label id -> display name from AudioSet's ``class_labels_indices.csv`` (columns ``mid``, ``display_name``).

    Arguments
    ---------
    path : str or PathLike
        The CSV (``index,mid,display_name``; extra columns are ignored).

    Returns
    -------
    dict
        ``{mid: display_name}``.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        The CSV lacks a ``mid`` or ``display_name`` column (the message lists the columns found).

    Example
    -------
    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "class_labels_indices.csv")
    >>> _ = open(p, "w").write('index,mid,display_name\\n0,/m/09x0r,"Speech"\\n1,/m/0bt9lr,Dog\\n')
    >>> read_audioset_names(p)
    {'/m/09x0r': 'Speech', '/m/0bt9lr': 'Dog'}
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"label names {path}: no such file (expected AudioSet's class_labels_indices.csv)")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        if "mid" not in columns or "display_name" not in columns:
            raise ValueError(
                f"label names {path}: expected columns 'mid' and 'display_name' (AudioSet's "
                f"class_labels_indices.csv), got {columns}"
            )
        names = {}
        for row in reader:
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            if row["mid"]:
                names[row["mid"]] = row["display_name"] or row["mid"]
    return names


def label_names(model: "BEATs", display_names: str | os.PathLike | Mapping[str, str] | None = None) -> list[str]:
    """Class names of a fine-tuned model's predictor outputs, in predictor order.

    Arguments
    ---------
    model : BEATs
        A model with a predictor (``cfg.finetuned_model``). Without a ``label_dict`` the names are
        ``class_<i>`` (with a warning).
    display_names : path or mapping, optional
        ``{label id: display name}`` or AudioSet's ``class_labels_indices.csv`` (see
        :func:`read_audioset_names`); ids it lacks are kept as they are.

    Returns
    -------
    list of str
        One name per predictor output.

    Raises
    ------
    ValueError
        The model has no predictor.

    Example
    -------
    >>> from lobes.beats import BEATs, BEATsConfig
    >>> cfg = BEATsConfig.released(encoder_layers=1, encoder_embed_dim=32, encoder_ffn_embed_dim=64,
    ...                            encoder_attention_heads=4, embed_dim=16, conv_pos=8, conv_pos_groups=2,
    ...                            finetuned_model=True, predictor_class=2)
    >>> model = BEATs(cfg=cfg)
    >>> model.label_dict = {0: "/m/09x0r", 1: "/m/0bt9lr"}
    >>> label_names(model, {"/m/09x0r": "Speech"})
    ['Speech', '/m/0bt9lr']
    """
    if getattr(model, "predictor", None) is None:
        raise ValueError(
            "class names need a fine-tuned BEATs checkpoint (cfg finetuned_model=True, with "
            "label_dict and predictor.weight); this model has no predictor"
        )
    labels = model.labels
    if labels is None:
        logger.warning("the checkpoint has no label_dict: classes are named by index (class_0, class_1, ...)")
        labels = [f"class_{i}" for i in range(model.predictor.out_features)]
    if display_names is None:
        return labels
    source = "the given names"
    if not isinstance(display_names, Mapping):
        source = str(display_names)
        display_names = read_audioset_names(display_names)
    if labels and not any(label in display_names for label in labels):
        logger.warning(
            "none of the model's %d label ids (e.g. %s) appear in %s: label ids kept", len(labels), labels[0], source
        )
    return [display_names.get(label, label) for label in labels]
