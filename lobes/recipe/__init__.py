"""What every recipe shares: its YAML files, output folder, training history, learning rates and processes.

- :mod:`lobes.recipe.hparams`: reading a recipe YAML (:func:`load_hparams`): a model file extends a base
  file, relative paths are taken from the repository root, ``--debug`` has its own settings; the resolved
  copy saved in the output folder (:func:`save_hyperparams`) loads back anywhere.
- :mod:`lobes.recipe.training`: data-parallel facts from speechbrain (:func:`world_size`, :func:`unwrap_ddp`),
  CPU workers (:func:`spawn_workers_if_asked`), data preparation on the main process (:func:`prepare_on_main`),
  checkpoints that survive ``kill -9`` (:func:`guard_checkpoints`), schedules that need the run's length
  (:func:`set_schedule_length`), per-parameter-group learning rates (:class:`ParamGroupSchedule`) and the
  run's pretrained folder (:func:`write_pretrained`).
- :mod:`lobes.recipe.history`: ``history.json`` + ``curves.png`` (:class:`TrainingHistory`) and atomic figures
  (:func:`save_figure`).
- :mod:`lobes.recipe.lexicon`: the test-time lexicon + word-LM decoder built in the YAML and fitted on the
  training transcripts (:class:`TranscriptLexiconDecoder`).

Every name is importable from ``lobes.recipe``, as the recipe YAMLs do (``!new:lobes.recipe.ParamGroupSchedule``).

Example
-------
>>> from lobes.recipe import load_hparams, world_size
>>> world_size()
1
"""

from lobes.recipe.history import TrainingHistory, save_figure
from lobes.recipe.hparams import (
    PATH_SUFFIXES,
    RecipeHparams,
    load_hparams,
    repository_root,
    resolve_hparams,
    save_hyperparams,
)
from lobes.recipe.lexicon import TranscriptLexiconDecoder
from lobes.recipe.training import (
    ParamGroupSchedule,
    count_optimizer_steps,
    guard_checkpoints,
    prepare_on_main,
    resolve_training_precision,
    set_schedule_length,
    spawn_workers_if_asked,
    unwrap_ddp,
    warmup_cosine_factor,
    world_size,
    write_pretrained,
)

__all__ = [
    "PATH_SUFFIXES",
    "ParamGroupSchedule",
    "RecipeHparams",
    "TrainingHistory",
    "TranscriptLexiconDecoder",
    "count_optimizer_steps",
    "guard_checkpoints",
    "load_hparams",
    "prepare_on_main",
    "resolve_training_precision",
    "repository_root",
    "resolve_hparams",
    "save_figure",
    "save_hyperparams",
    "set_schedule_length",
    "spawn_workers_if_asked",
    "unwrap_ddp",
    "warmup_cosine_factor",
    "world_size",
    "write_pretrained",
]
