"""Use a trained model: pretrained folders, loaders and the commands built on them.

``Transcriber`` (speech recognition, :mod:`lobes.inference.asr`) and ``AudioClassifier`` (audio
classification, :mod:`lobes.inference.classify`) load a folder written by ``python -m lobes.package`` in one
line. The modules, by idea:

* ``asr`` / ``classify``: the loaders (``Transcriber``, ``AudioClassifier``); they also export what folders
  name in their ``hyperparams.yaml`` (``lobes.inference.asr.CTCEncoder``, ``lobes.inference.classify.X``);
* ``asr_modules`` / ``classify_modules``: what a folder's ``hyperparams.yaml`` builds;
* ``asr_package`` / ``classify_package``: turning a recipe run (or a BEATs checkpoint) into a folder;
* ``pretrained``: writing and reading folders (``package.json`` checksums, strict weight loading, YAML text);
* ``runs``: what the packagers read from a run (its best checkpoint, its training data);
* ``sources``: the inputs (files, tensors, arrays, lists) as audio sources at the model's rate, batches;
* ``precision``: fp32 / bf16 autocast (the device comes from :func:`lobes.inputs.resolve_device`);
* ``cli``: the runner behind ``python -m lobes.transcribe`` and ``python -m lobes.classify``.

The classes are imported on first use, so ``import lobes.inference`` stays cheap.

Example
-------
>>> import lobes.inference
>>> lobes.inference.Transcriber.__name__
'Transcriber'
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["AudioClassifier", "Transcriber"]

_WHERE = {"Transcriber": "lobes.inference.asr", "AudioClassifier": "lobes.inference.classify"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
