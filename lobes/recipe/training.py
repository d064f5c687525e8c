"""Training plumbing shared by the recipes: processes, data preparation, checkpoints and learning rates.

Data-parallel facts come from speechbrain (:func:`world_size`); CPU workers from :mod:`lobes.launch`; the
checkpoint guard from :mod:`lobes.checkpoints`.

Example
-------
>>> round(warmup_cosine_factor(step=50, warmup_steps=10, total_steps=100), 3)
0.5
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import torch

__all__ = [
    "ParamGroupSchedule",
    "count_optimizer_steps",
    "guard_checkpoints",
    "prepare_on_main",
    "resolve_training_precision",
    "set_schedule_length",
    "spawn_workers_if_asked",
    "warmup_cosine_factor",
    "world_size",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def resolve_training_precision(hparams: Mapping, run_opts: T, device: str | None = None) -> T:
    """The run options of a recipe run with its training precision settled: its ``precision`` (command line
    first, then the YAML), but ``fp32`` where the device only emulates bfloat16 (see
    :func:`lobes.inference.precision.native_bfloat16`).

    The YAMLs ask for ``bf16`` because it is faster on CPUs with AVX512-BF16 / AMX and on GPUs; on an AVX2-only
    CPU the same run would take many times longer than in float32, so the run switches to ``fp32`` and logs
    it (``LOBES_FORCE_BF16=1`` keeps bf16). ``hparams["precision"]`` is updated in place; speechbrain's
    ``RunOptions`` is frozen, so a copy is returned: pass it to the ``Brain``.

    Example
    -------
    >>> from speechbrain.core import RunOptions
    >>> resolve_training_precision({"precision": "fp32"}, RunOptions()).precision
    'fp32'
    """
    import dataclasses

    from lobes.inference.precision import FORCE_BF16_ENV, native_bfloat16

    overridden = getattr(run_opts, "overridden_args", set())
    from_command_line = "precision" in overridden
    precision = run_opts.precision if from_command_line else hparams.get("precision", run_opts.precision)
    if device is None:
        device = run_opts.device if "device" in overridden else hparams.get("device", run_opts.device or "cpu")
    if precision == "bf16" and not native_bfloat16(device) and os.environ.get(FORCE_BF16_ENV) != "1":
        logger.warning(
            "precision bf16 asked, but %s has no native bfloat16 (AVX512-BF16 / AMX on CPUs): training in fp32, "
            "which is many times faster here (set %s=1 to keep bf16)",
            device,
            FORCE_BF16_ENV,
        )
        if "precision" in hparams:
            hparams["precision"] = "fp32"
        if from_command_line:
            run_opts = dataclasses.replace(run_opts, precision="fp32")
    return run_opts


def world_size() -> int:
    """Number of data-parallel processes (1 outside torchrun / ``cpu_processes``), from speechbrain's view.

    Example
    -------
    >>> world_size()
    1
    """
    from speechbrain.utils.distributed import is_distributed_initialized

    return torch.distributed.get_world_size() if is_distributed_initialized() else 1


def unwrap_ddp(module: torch.nn.Module) -> torch.nn.Module:
    """The module itself, also when ``DistributedDataParallel`` wraps it (speechbrain wraps ``modules`` under DDP).

    Example
    -------
    >>> layer = torch.nn.Linear(2, 2)
    >>> unwrap_ddp(layer) is layer
    True
    """
    return getattr(module, "module", module)


def spawn_workers_if_asked(script: str | os.PathLike, argv: list[str], hparams: Mapping, run_opts: dict) -> int | None:
    """Start ``cpu_processes`` DDP workers running ``script`` when a plain ``python`` command on CPU asks for
    more than one (:mod:`lobes.launch`); returns their exit status, or None when this process trains itself.

    Example
    -------
    >>> spawn_workers_if_asked("train.py", [], {"cpu_processes": 1}, {"device": "cpu"}) is None
    True
    """
    from lobes.launch import should_spawn, spawn_cpu_workers

    processes = hparams.get("cpu_processes", 1)
    if not should_spawn(processes, run_opts):
        return None
    return spawn_cpu_workers(os.path.abspath(script), argv, int(processes))


def prepare_on_main(prepare: Callable[[], T]) -> T:
    """Run a data preparation on the main process, then return its result on every process.

    ``prepare`` must be idempotent (the corpus functions of :mod:`lobes.data` are: a second call finds the
    work done and only returns the paths).

    Example
    -------
    >>> prepare_on_main(lambda: {"train": "train.csv"})
    {'train': 'train.csv'}
    """
    from speechbrain.utils.distributed import run_on_main

    run_on_main(prepare)
    return prepare()


def guard_checkpoints(checkpointer) -> None:
    """Discard checkpoints cut off by a kill (main process) and mark every new one complete once written
    (:mod:`lobes.checkpoints`), so that resuming after ``kill -9`` loads the last complete checkpoint.

    Example
    -------
    >>> import tempfile
    >>> from speechbrain.utils.checkpoints import Checkpointer
    >>> checkpointer = Checkpointer(tempfile.mkdtemp(), recoverables={"model": torch.nn.Linear(2, 2)})
    >>> guard_checkpoints(checkpointer)
    >>> from lobes.checkpoints import COMPLETE_MARKER
    >>> (checkpointer.save_checkpoint().path / COMPLETE_MARKER).exists()
    True
    """
    from speechbrain.utils.distributed import run_on_main

    from lobes.checkpoints import mark_complete_on_save, remove_incomplete_checkpoints

    run_on_main(remove_incomplete_checkpoints, args=[checkpointer.checkpoints_dir])
    mark_complete_on_save(checkpointer)


# --------------------------------------------------------------------------------------------------------------
# Learning rates
# --------------------------------------------------------------------------------------------------------------


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up times a cosine decay to zero, as a factor of a base learning rate.

    ``step`` counts the optimizer steps already taken (0 before the first).

    Example
    -------
    >>> [round(warmup_cosine_factor(s, 2, 4), 3) for s in range(5)]
    [0.5, 0.854, 0.5, 0.146, 0.0]
    """
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    progress = min(1.0, step / max(1, total_steps))
    return warm * 0.5 * (1.0 + math.cos(math.pi * progress))


class ParamGroupSchedule:
    """Sets the learning rate of every parameter group to its own ``base_lr`` times :func:`warmup_cosine_factor`.

    For optimizers whose groups train at different rates (layer-wise decay): each group holds its
    ``base_lr``; call the schedule before each step with the number of steps taken. It keeps no state of its
    own (the step count comes from ``Brain.optimizer_step``, which speechbrain checkpoints).

    Arguments
    ---------
    warmup_steps : int
        Optimizer steps of linear warm-up.
    total_steps : int, optional
        Length of the run; set later with :meth:`set_total_steps` (:func:`set_schedule_length`) when None.

    Example
    -------
    >>> params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    >>> opt = torch.optim.SGD([{"params": params[:1], "base_lr": 1.0}, {"params": params[1:], "base_lr": 0.1}])
    >>> schedule = ParamGroupSchedule(warmup_steps=2, total_steps=4)
    >>> schedule(opt, step=1)  # the largest rate
    0.8535533905932737
    >>> round(opt.param_groups[1]["lr"], 4)
    0.0854
    """

    def __init__(self, warmup_steps: int, total_steps: int | None = None):
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0; got {warmup_steps}")
        self.warmup_steps = int(warmup_steps)
        self.total_steps = None if total_steps is None else int(total_steps)

    def set_total_steps(self, total_steps: int) -> None:
        """Fix the length of the run in optimizer steps."""
        if int(total_steps) < 1:
            raise ValueError(f"total_steps must be >= 1; got {total_steps}")
        self.total_steps = int(total_steps)

    def __call__(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set each group's rate for the step after ``step`` taken steps; returns the largest rate."""
        if self.total_steps is None:
            raise RuntimeError("total_steps is not set: pass it to the constructor or call set_total_steps()")
        factor = warmup_cosine_factor(step, self.warmup_steps, self.total_steps)
        for index, group in enumerate(optimizer.param_groups):
            if "base_lr" not in group:
                raise KeyError(f"parameter group {index} has no 'base_lr'; give every group its base learning rate")
            group["lr"] = group["base_lr"] * factor
        return max(group["lr"] for group in optimizer.param_groups)


def count_optimizer_steps(brain, train_set, loader_kwargs: Mapping, epochs: int) -> int:
    """Optimizer steps of ``epochs`` epochs over ``train_set`` in this process, as ``brain.fit`` will take them.

    Counts the batches of the loader (its ``batch_sampler`` when there is one, else ``batch_size``), the
    process's share of them under DDP (speechbrain's distributed samplers split them evenly) and gradient
    accumulation.

    Example
    -------
    >>> from types import SimpleNamespace
    >>> count_optimizer_steps(SimpleNamespace(grad_accumulation_factor=1), range(10), {"batch_size": 4}, 3)
    9
    """
    sampler = loader_kwargs.get("batch_sampler")
    batches = len(sampler) if sampler is not None else math.ceil(len(train_set) / loader_kwargs["batch_size"])
    batches = math.ceil(batches / world_size())
    return math.ceil(batches / brain.grad_accumulation_factor) * int(epochs)


def set_schedule_length(scheduler, brain, train_set, loader_kwargs: Mapping, epochs: int) -> int | None:
    """Give a schedule that needs the length of the run (``total_steps: null`` in the YAML) its number of
    optimizer steps (:func:`count_optimizer_steps`); returns it, or None when the schedule has its length.

    Example
    -------
    >>> from types import SimpleNamespace
    >>> schedule = ParamGroupSchedule(warmup_steps=10)
    >>> set_schedule_length(schedule, SimpleNamespace(grad_accumulation_factor=2), range(8), {"batch_size": 2}, 5)
    10
    """
    if not hasattr(scheduler, "set_total_steps") or getattr(scheduler, "total_steps", None) is not None:
        return None
    steps = count_optimizer_steps(brain, train_set, loader_kwargs, epochs)
    scheduler.set_total_steps(steps)
    logger.info("learning-rate schedule: %d optimizer steps", steps)
    return steps


def write_pretrained(brain, output_folder: str | os.PathLike) -> Path | None:
    """Package a finished run into ``<output_folder>/pretrained/`` (on the main process).

    The folder is what ``python -m lobes.package`` writes (see :func:`lobes.package.package_run`): it loads
    with speechbrain's ``from_hparams`` and with :mod:`lobes.inference`. A ``--debug`` run keeps its
    checkpoints in a temporary folder (speechbrain's rule, unless ``--debug_persistently``), so it has nothing
    to package: it is skipped with a log line.

    Arguments
    ---------
    brain : speechbrain.Brain
        The recipe's Brain after its test stage.
    output_folder : str or PathLike
        The run's output folder.

    Returns
    -------
    Path or None
        The pretrained folder, or None where nothing was written (debug run, or not the main process).
    """
    from speechbrain.utils.distributed import if_main_process, run_on_main

    from lobes.package import package_run

    output_folder = Path(output_folder).resolve()
    checkpoints = Path(brain.checkpointer.checkpoints_dir).resolve()
    if output_folder not in checkpoints.parents:
        logger.info(
            "no pretrained folder: this run's checkpoints are in %s, outside %s (a --debug run; add "
            "--debug_persistently to keep them)",
            checkpoints,
            output_folder,
        )
        return None
    target = output_folder / "pretrained"
    run_on_main(package_run, args=[output_folder, target])
    return target if if_main_process() else None
