"""Learning-rate schedules and the progressive-resizing ramp, against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from imt.train.config import OptimConfig, RunConfig
from imt.train.model import param_groups
from imt.train.schedule import LRSchedule, lr_factor, peak_lr, resolution_at


def test_peak_lr_scales_with_global_batch():
    assert peak_lr(OptimConfig(lr=0.1), 1024) == pytest.approx(0.4)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "step"])
def test_warmup_then_decay(schedule):
    cfg = OptimConfig(warmup_epochs=1, schedule=schedule, milestones=(2, 3), gamma=0.1)
    f = [lr_factor(s, cfg, steps_per_epoch=10, epochs=4) for s in range(40)]
    assert f[0] == pytest.approx(1 / 11) and f[9] == pytest.approx(10 / 11)  # linear ramp
    assert f[10] == pytest.approx(1.0)
    if schedule == "cosine":
        assert f[25] == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 30)))
    elif schedule == "linear":
        assert f[25] == pytest.approx(0.5) and f[39] == pytest.approx(1 / 30)
    else:
        assert f[19] == 1.0 and f[20] == pytest.approx(0.1) and f[30] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # never rises after warm-up


def test_schedule_sets_group_lrs_with_multiplier():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2))
    groups = param_groups(model, 1e-4, head_names=["3"], backbone_lr_mult=0.1)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
    assert by_name["backbone_no_decay"]["weight_decay"] == 0.0 and by_name["backbone"]["weight_decay"] == 1e-4
    # conv weight decays; conv bias + BN weight/bias do not; head weight decays, head bias does not
    assert len(by_name["backbone"]["params"]) == 1 and len(by_name["backbone_no_decay"]["params"]) == 3
    opt = torch.optim.SGD(groups, lr=1.0)
    sched = LRSchedule(opt, OptimConfig(warmup_epochs=0, schedule="linear"), peak=2.0, steps_per_epoch=4, epochs=1)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["head"] == pytest.approx(2.0) and lrs["backbone"] == pytest.approx(0.2)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(sched.lr() * opt.param_groups[0]["lr_mult"])
    state = sched.state_dict()
    sched2 = LRSchedule(opt, OptimConfig(warmup_epochs=0, schedule="linear"), peak=2.0, steps_per_epoch=4, epochs=1)
    sched2.load_state_dict(state)
    assert sched2.lr() == sched.lr() == pytest.approx(1.5)


def test_progressive_resizing_ramp():
    run = RunConfig(start_res=160, end_res=192, ramp_start=2, ramp_end=6, res_step=32)
    assert [resolution_at(e, run, 224) for e in range(8)] == [160, 160, 160, 160, 192, 192, 192, 192]
    run = RunConfig(start_res=64, end_res=0, ramp_start=0, ramp_end=4, res_step=16)
    assert [resolution_at(e, run, 128) for e in range(6)] == [64, 80, 96, 112, 128, 128]
    assert resolution_at(3, RunConfig(), 176) == 176  # off: the data resolution
    run = RunConfig(start_res=128, end_res=0, ramp_start=0, ramp_end=2, res_step=32)
    assert [resolution_at(e, run, 176) for e in range(4)] == [128, 160, 176, 176]  # ends at the size asked for
