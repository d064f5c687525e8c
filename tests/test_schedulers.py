"""lobes.schedulers.WarmupCosineScheduler: shape, checkpoint round trip, a longer run on resume, bad arguments."""

import math

import pytest
import torch
from speechbrain.utils.checkpoints import Checkpointer

from lobes.schedulers import WarmupCosineScheduler


def _opt():
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=123.0)


def test_warmup_then_half_cosine_to_final_lr():
    sched, opt = WarmupCosineScheduler(lr=2e-3, n_warmup_steps=10, total_steps=110, final_lr=1e-4), _opt()
    lrs = [sched(opt)[1] for _ in range(130)]
    assert lrs[0] == pytest.approx(2e-4) and lrs[9] == pytest.approx(2e-3)  # linear warm-up
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # never rises after the peak
    mid = 10 + 50  # half way through the decay: the mean of peak and final
    assert lrs[mid - 1] == pytest.approx((2e-3 + 1e-4) / 2)
    assert lrs[109] == pytest.approx(1e-4) and lrs[-1] == pytest.approx(1e-4)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4) and sched.current_lr == lrs[-1]
    ref = [1e-4 + 0.5 * (2e-3 - 1e-4) * (1 + math.cos(math.pi * (s - 10) / 100)) for s in range(10, 111)]
    assert lrs[9:110] == pytest.approx(ref)


def test_checkpoint_round_trip_and_longer_run_on_resume(tmp_path):
    sched, opt = WarmupCosineScheduler(lr=1.0, n_warmup_steps=5, total_steps=50), _opt()
    for _ in range(20):
        sched(opt)
    ckpt = Checkpointer(tmp_path, {"sched": sched})
    ckpt.save_checkpoint()

    same = WarmupCosineScheduler(lr=1.0, n_warmup_steps=5)  # length unknown: taken from the checkpoint
    Checkpointer(tmp_path, {"sched": same}).recover_if_possible()
    assert (same.current_step, same.total_steps) == (20, 50)
    assert same(_opt())[1] == pytest.approx(sched(opt)[1])

    longer = WarmupCosineScheduler(lr=1.0, n_warmup_steps=5, total_steps=100)  # e.g. more epochs on resume
    Checkpointer(tmp_path, {"sched": longer}).recover_if_possible()
    assert (longer.current_step, longer.total_steps) == (20, 100)
    assert longer.lr_at(100) == 0.0 and longer.lr_at(60) > sched.lr_at(60)


def test_bad_arguments():
    with pytest.raises(ValueError, match="final_lr"):
        WarmupCosineScheduler(lr=1e-3, n_warmup_steps=1, final_lr=2e-3)
    with pytest.raises(ValueError, match="n_warmup_steps"):
        WarmupCosineScheduler(lr=1e-3, n_warmup_steps=-1)
    with pytest.raises(ValueError, match="total_steps must be >= 1"):
        WarmupCosineScheduler(lr=1e-3, n_warmup_steps=10, total_steps=0)
    with pytest.raises(RuntimeError, match="total_steps is not set"):
        WarmupCosineScheduler(lr=1e-3, n_warmup_steps=10)(_opt())


def test_a_run_shorter_than_the_warmup_warms_up_over_its_first_quarter(caplog):
    sched, opt = WarmupCosineScheduler(lr=1.0, n_warmup_steps=400), _opt()
    sched.set_total_steps(29)
    assert "warming up over 7 steps" in caplog.text
    lrs = [sched(opt)[1] for _ in range(29)]
    assert lrs[6] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.0)
