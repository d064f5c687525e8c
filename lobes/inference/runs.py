"""What the packagers read from a recipe run: its YAML, the checkpoint it was tested with, its training data.

A run's ``hyperparams.yaml`` is read as a YAML tree (``lobes.package.read_run_yaml``: tags kept, nothing
built); :func:`build_entries` builds only the entries a pretrained folder needs, :func:`best_checkpoint`
picks the checkpoint the recipe tested (best validation metric among complete ones) and
:func:`describe_training_data` names the corpus from the run's ``prepare`` entry for the folder's README.

Example
-------
>>> import ruamel.yaml
>>> tree = ruamel.yaml.YAML().load("prepare: !name:lobes.data.librispeech.prepare_librispeech\\n"
...                                "    tr_splits: [train-clean-100, train-clean-360]\\n")
>>> describe_training_data(tree)
'LibriSpeech train-clean-100, train-clean-360'
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from lobes.checkpoints import COMPLETE_MARKER
from lobes.inference.pretrained import PretrainedError, yaml_text

__all__ = ["best_checkpoint", "build_entries", "describe_training_data", "yaml_tag"]

logger = logging.getLogger(__name__)

_CORPORA = {
    "lobes.data.speech.prepare_speech_corpus": "the embedded speech corpus (read sentences synthesized offline "
    "with espeak-ng, lobes.data.speech)",
    "lobes.data.events.prepare_event_corpus": "the sound-event corpus (spoken keywords and synthetic events "
    "synthesized offline, lobes.data.events)",
}


def yaml_tag(node: Any) -> str:
    """The tag of a node of a ruamel YAML tree (``!new:module.Class``), or ``""``."""
    return getattr(getattr(node, "tag", None), "value", None) or ""


def build_entries(tree: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """Build only ``keys`` of a run's YAML tree (those it has): no seeding, data, logger or checkpointer.

    The random initialisations of what is built leave the caller's random generator alone.

    Example
    -------
    >>> import ruamel.yaml
    >>> tree = ruamel.yaml.YAML().load("lin: !new:torch.nn.Linear [2, 3]\\nlr: 0.1\\nseed: 4\\n")
    >>> sorted(build_entries(tree, ["lin", "lr", "other"]))
    ['lin', 'lr']
    """
    from hyperpyyaml import load_hyperpyyaml

    text = yaml_text({key: tree[key] for key in keys if key in tree})
    with torch.random.fork_rng(devices=[]):
        return dict(load_hyperpyyaml(text))


def best_checkpoint(save: str | os.PathLike, metric: str, maximize: bool, needs: str | None = None) -> Path:
    """The checkpoint a recipe tests: among the complete ``CKPT+*`` folders (``COMPLETE`` marker, and the file
    ``needs`` when given), the best ``metric`` of ``CKPT.yaml``, then the newest.

    Without any ``metric`` recorded the newest complete checkpoint is taken (with a warning).

    Raises
    ------
    PretrainedError
        No complete checkpoint (the message says what was expected).

    Example
    -------
    >>> best_checkpoint("no/such/save", "WER", maximize=False, needs="model.ckpt")
    Traceback (most recent call last):
    ...
    lobes.inference.pretrained.PretrainedError: no/such/save: no complete checkpoint (expected CKPT+*/COMPLETE and ...
    """
    import yaml

    save = Path(save)
    found = []
    for folder in sorted(save.glob("CKPT+*")):
        if (folder / COMPLETE_MARKER).exists() and (needs is None or (folder / needs).is_file()):
            try:
                meta = yaml.safe_load((folder / "CKPT.yaml").read_text(encoding="utf-8")) or {}
            except (OSError, yaml.YAMLError):
                meta = {}
            found.append((folder, meta if isinstance(meta, dict) else {}))
    if not found:
        expected = f"CKPT+*/{COMPLETE_MARKER}" + (f" and CKPT+*/{needs}" if needs else "")
        raise PretrainedError(f"{save}: no complete checkpoint (expected {expected}); has the run finished an epoch?")
    sign = 1.0 if maximize else -1.0
    scored = [
        (sign * float(meta[metric]), float(meta.get("unixtime", 0.0)), folder.name, folder)
        for folder, meta in found
        if isinstance(meta.get(metric), (int, float))
    ]
    if scored:
        return max(scored)[-1]
    logger.warning("%s: no checkpoint records %s; packaging the newest", save, metric)
    return max((float(meta.get("unixtime", 0.0)), folder.name, folder) for folder, meta in found)[-1]


def describe_training_data(tree: Mapping[str, Any]) -> str:
    """The training corpus of a run, from the tag and settings of its ``prepare`` entry (for a README).

    Only names go into the text (a CSV manifest by its file name), never a folder of the training machine.

    Example
    -------
    >>> import ruamel.yaml
    >>> tree = ruamel.yaml.YAML().load("prepare: !name:lobes.data.manifest.manifest_paths\\n"
    ...                                "    train: /data/mine/train.csv\\n")
    >>> describe_training_data(tree), describe_training_data({})
    ('the CSV manifest train.csv', "not recorded (the run's hyperparams.yaml has no 'prepare')")
    """
    node = tree.get("prepare")
    tag = yaml_tag(node)
    if not tag:
        return "not recorded (the run's hyperparams.yaml has no 'prepare')"
    target = tag.split(":", 1)[-1]
    settings = node if isinstance(node, Mapping) else {}
    if target in _CORPORA:
        return _CORPORA[target]
    if target == "lobes.data.librispeech.prepare_librispeech":
        splits = settings.get("tr_splits")
        return "LibriSpeech " + (", ".join(map(str, splits)) if splits else "(the default training splits)")
    if target == "lobes.data.esc50.prepare_esc50":
        return f"ESC-50, fold {settings.get('test_fold', 5)} held out for testing"
    if target == "lobes.data.manifest.manifest_paths":
        train = settings.get("train")
        return f"the CSV manifest {Path(str(train)).name}" if train else "CSV manifests"
    return f"data prepared by {target}"
