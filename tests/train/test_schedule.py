"""Learning-rate schedules and the progressive-resizing ramp, against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from imt.train.config import ConfigError, OptimConfig, RunConfig, load_config
from imt.train.model import param_groups
from imt.train.schedule import LRSchedule, describe_schedule, fit_schedule, lr_factor, peak_lr, resolution_at


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


SYNTH = {"data.loader": "synthetic"}


def test_warmup_longer_than_half_the_run_is_clamped_so_the_peak_is_reached():
    """Issue 14: `imt-train --epochs 4` with the default 5-epoch warm-up never reached its peak lr."""
    cfg, notes = fit_schedule(load_config(None, {**SYNTH, "run.epochs": 4}))
    assert cfg.optim.warmup_epochs == 2 and len(notes) == 1 and "warm-up clamped to 2 epochs" in notes[0]
    f = [lr_factor(s, cfg.optim, steps_per_epoch=10, epochs=4) for s in range(40)]
    assert max(f) == pytest.approx(1.0) and f.index(max(f)) == 20
    same, none = fit_schedule(load_config(None, {**SYNTH, "run.epochs": 10}))
    assert same.optim.warmup_epochs == 5 and none == []  # exactly half: left alone


def test_step_milestones_after_the_end_are_refused_or_noted():
    over = {**SYNTH, "optim.schedule": "step", "optim.warmup_epochs": 0}
    with pytest.raises(ConfigError, match=r"never decay.*milestones=\[3, 6, 8\]"):
        fit_schedule(load_config(None, {**over, "run.epochs": 9}))  # default milestones 30, 60, 80
    cfg, notes = fit_schedule(load_config(None, {**over, "run.epochs": 40}))
    assert notes == ["note: optim.milestones [60, 80] are at or after run.epochs=40 and never apply"]
    assert "x0.1 at epochs [30]" in describe_schedule(cfg, 10, 0.1)


def test_resolution_from_the_cli_wins_over_the_recipes_ramp():
    """Issue 14: `--recipe imagenette_quick --resolution 96 --epochs 4` trained at 128 px and validated at 96.
    The overrides are the ones train.run's --resolution sets."""
    cli = {"data.path": "x", "data.resolution": 96, "data.val_resolution": 96, "run.end_res": 96, "run.epochs": 4}
    cfg, notes = fit_schedule(load_config("imagenette_quick", cli))
    assert [resolution_at(e, cfg.run, cfg.data.resolution) for e in range(4)] == [96] * 4
    assert any("progressive resizing off" in n for n in notes)
    assert "train px per epoch: 96 x4 | val 96 px" in describe_schedule(cfg, 10, 0.4)


def test_a_ramp_past_the_last_epoch_moves_to_fit():
    cfg, notes = fit_schedule(load_config("imagenette_quick", {"data.path": "x", "run.epochs": 6}))  # ramp 2-12
    assert (cfg.run.ramp_start, cfg.run.ramp_end) == (0, 5) and any("moved to epochs 0-5" in n for n in notes)
    res = [resolution_at(e, cfg.run, cfg.data.resolution) for e in range(6)]
    assert res[0] == 128 and res[-1] == 192 and res == sorted(res)
    full, none = fit_schedule(load_config("imagenette_quick", {"data.path": "x"}))  # as written: left alone
    assert none == [] and full == load_config("imagenette_quick", {"data.path": "x"})


def test_describe_schedule_names_warmup_steps_peak_and_resolutions():
    cfg = load_config("imagenette_quick", {"data.path": "x"})
    line = describe_schedule(cfg, steps_per_epoch=10, peak=0.4)
    assert line.startswith("schedule: warm-up 20 steps (2 epochs) to peak lr 0.4, then linear to 0 over 140 steps")
    assert line.endswith("train px per epoch: 128 x5, 160 x5, 192 x6 | val 192 px")  # rounded to res_step 32
