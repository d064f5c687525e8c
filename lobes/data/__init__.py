"""Offline corpora and dataset preparation shared by the recipes.

- :mod:`lobes.data.espeak`: speech synthesis with espeak-ng (``synthesize``, voice listings).
- :mod:`lobes.data.speech`: synthetic English ASR corpus (``prepare_speech_corpus``) and noise corpus.
- :mod:`lobes.data.events`: synthetic audio-event / keyword classification corpus.
- :mod:`lobes.data.librispeech`, :mod:`lobes.data.esc50`: manifests for the real datasets.
- :mod:`lobes.data.manifest`: reading, checking and writing CSV manifests; ``manifest_paths`` hands CSVs
  prepared elsewhere to a recipe.

A recipe names its preparation in its YAML (``prepare: !name:lobes.data.speech.prepare_speech_corpus`` with
the arguments); each function returns ``{"train", "valid", "test"}`` CSV paths and is idempotent.

The public functions are also reachable from here, imported on first use.
"""

from __future__ import annotations

import importlib

__all__ = [
    "EVENT_CLASSES",
    "check_manifest",
    "list_base_voices",
    "list_voice_variants",
    "load_manifest",
    "manifest_paths",
    "prepare_esc50",
    "prepare_event_corpus",
    "prepare_librispeech",
    "prepare_noise_corpus",
    "prepare_speech_corpus",
    "synthesize",
    "write_manifest",
]

_HOME = {
    "EVENT_CLASSES": "events",
    "check_manifest": "manifest",
    "list_base_voices": "espeak",
    "list_voice_variants": "espeak",
    "load_manifest": "manifest",
    "manifest_paths": "manifest",
    "prepare_esc50": "esc50",
    "prepare_event_corpus": "events",
    "prepare_librispeech": "librispeech",
    "prepare_noise_corpus": "noise",
    "prepare_speech_corpus": "speech",
    "synthesize": "espeak",
    "write_manifest": "manifest",
}


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f"lobes.data.{_HOME[name]}"), name)
    raise AttributeError(f"module 'lobes.data' has no attribute {name!r}")
