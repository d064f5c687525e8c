"""Learning-rate schedules that know the length of the run.

Noam's inverse-square-root decay never reaches zero, so a short run ends at a learning rate still large
enough to keep the weights moving. :class:`WarmupCosineScheduler` warms up linearly and then follows a
half cosine down to ``final_lr`` at the last step, which anneals the weights before evaluation.
The recipe sets ``total_steps`` from the training loader when the YAML leaves it ``null``; a run resumed
with a higher epoch limit stretches the remaining cosine over the new length.

Example
-------
>>> import torch
>>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
>>> sched = WarmupCosineScheduler(lr=1.0, n_warmup_steps=2, total_steps=6)
>>> [round(sched(opt)[1], 3) for _ in range(7)]
[0.5, 1.0, 0.854, 0.5, 0.146, 0.0, 0.0]
"""

from __future__ import annotations

import logging
import math

import torch
from speechbrain.utils import checkpoints

from lobes.io import atomic_save

__all__ = ["WarmupCosineScheduler"]

logger = logging.getLogger(__name__)


@checkpoints.register_checkpoint_hooks
class WarmupCosineScheduler:
    """Linear warm-up to ``lr`` over ``n_warmup_steps``, then a half cosine to ``final_lr`` at ``total_steps``.

    Called once per optimizer step, like speechbrain's ``NoamScheduler``: ``scheduler(optimizer)`` sets
    the learning rate of every parameter group and returns ``(previous_lr, new_lr)``. Past
    ``total_steps`` the rate stays at ``final_lr``. Saved and restored by speechbrain's ``Checkpointer``.

    Arguments
    ---------
    lr : float
        Peak learning rate, reached at the end of warm-up.
    n_warmup_steps : int
        Steps of linear warm-up (0: start at the peak).
    total_steps : int, optional
        Length of the run in optimizer steps. May be set later (before the first call) through
        :meth:`set_total_steps`, once the training loader is known.
    final_lr : float
        Learning rate at ``total_steps`` and after.

    Example
    -------
    >>> sched = WarmupCosineScheduler(lr=4e-3, n_warmup_steps=100)
    >>> sched.set_total_steps(1000)
    >>> round(sched.lr_at(100), 6), round(sched.lr_at(550), 6), sched.lr_at(1000)
    (0.004, 0.002, 0.0)
    """

    def __init__(self, lr: float, n_warmup_steps: int, total_steps: int | None = None, final_lr: float = 0.0):
        if lr <= 0 or final_lr < 0 or final_lr > lr:
            raise ValueError(f"expected 0 <= final_lr <= lr and lr > 0; got lr={lr}, final_lr={final_lr}")
        if n_warmup_steps < 0:
            raise ValueError(f"n_warmup_steps must be >= 0; got {n_warmup_steps}")
        self.lr = float(lr)
        self.final_lr = float(final_lr)
        self.n_warmup_steps = int(n_warmup_steps)
        self.total_steps = None
        if total_steps is not None:
            self.set_total_steps(total_steps)
        self.current_step = 0
        self.current_lr = 0.0

    def set_total_steps(self, total_steps: int) -> None:
        """Fix the length of the run (optimizer steps, warm-up included). A run no longer than the warm-up
        (a small dataset, a quick check) warms up over its first quarter instead, with a warning."""
        total_steps = int(total_steps)
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1; got {total_steps}")
        if total_steps <= self.n_warmup_steps:
            shorter = total_steps // 4
            logger.warning(
                "the run has %d optimizer steps, no more than n_warmup_steps (%d): warming up over %d steps instead",
                total_steps,
                self.n_warmup_steps,
                shorter,
            )
            self.n_warmup_steps = shorter
        self.total_steps = total_steps

    def lr_at(self, step: int) -> float:
        """The learning rate after ``step`` optimizer steps (step 1 is the first)."""
        if self.total_steps is None:
            raise RuntimeError("total_steps is not set: pass it to the constructor or call set_total_steps()")
        if step < self.n_warmup_steps:
            return self.lr * step / self.n_warmup_steps
        progress = min(1.0, (step - self.n_warmup_steps) / (self.total_steps - self.n_warmup_steps))
        return self.final_lr + 0.5 * (self.lr - self.final_lr) * (1.0 + math.cos(math.pi * progress))

    def __call__(self, opt: torch.optim.Optimizer) -> tuple[float, float]:
        previous = opt.param_groups[0]["lr"]
        self.current_step += 1
        lr = self.lr_at(self.current_step)
        for group in opt.param_groups:
            group["lr"] = lr
        self.current_lr = lr
        return previous, lr

    @checkpoints.mark_as_saver
    def save(self, path: str) -> None:
        atomic_save(
            {
                "lr": self.lr,
                "final_lr": self.final_lr,
                "n_warmup_steps": self.n_warmup_steps,
                "total_steps": self.total_steps,
                "current_step": self.current_step,
                "current_lr": self.current_lr,
            },
            path,
        )

    @checkpoints.mark_as_loader
    def load(self, path: str, end_of_epoch: bool = False) -> None:
        del end_of_epoch
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("lr", "final_lr", "n_warmup_steps", "current_step", "current_lr"):
            setattr(self, key, state[key])
        if self.total_steps is None:  # a length set for this run (e.g. more epochs on resume) wins
            self.total_steps = state["total_steps"]
