"""Per-iteration learning rate and per-epoch resolution: plain functions of the step/epoch, so a resumed
run recomputes exactly what an uninterrupted one would have used (the only state is the step count)."""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from .config import Config, ConfigError, OptimConfig, RunConfig


def peak_lr(cfg: OptimConfig, global_batch: int) -> float:
    """Linear scaling rule (Goyal et al. 2017): cfg.lr is per 256 images of the global batch."""
    return cfg.lr * global_batch / 256


def lr_factor(step: int, cfg: OptimConfig, steps_per_epoch: int, epochs: int) -> float:
    """Multiplier of the peak lr at iteration `step` (0-based): linear warm-up, then cosine to zero, step
    decay at `milestones`, or linear to zero (warm-up + linear = FFCV's triangular schedule)."""
    total = max(1, steps_per_epoch * epochs)
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total - 1)
    if step < warmup:
        return (step + 1) / (warmup + 1)  # never exactly 0: the first step already moves
    t = (step - warmup) / max(1, total - warmup)  # 0 -> 1 over the rest of training
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if cfg.schedule == "linear":
        return max(0.0, 1.0 - t)
    if cfg.schedule == "step":
        epoch = step / steps_per_epoch
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    raise ValueError(f"optim.schedule={cfg.schedule!r}")


class LRSchedule:
    """Sets every parameter group's lr to peak * group["lr_mult"] * lr_factor(step) before each step."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, peak: float, steps_per_epoch: int,
                 epochs: int):
        self.optimizer, self.cfg, self.peak = optimizer, cfg, peak
        self.steps_per_epoch, self.epochs = steps_per_epoch, epochs
        self.step_count = 0
        self._apply()

    def lr(self, step: int | None = None) -> float:
        """The peak-group lr at `step` (default: the next step to run)."""
        s = self.step_count if step is None else step
        return self.peak * lr_factor(s, self.cfg, self.steps_per_epoch, self.epochs)

    def _apply(self) -> None:
        lr = self.lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "steps_per_epoch": self.steps_per_epoch, "epochs": self.epochs}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self._apply()


def resolution_at(epoch: int, run: RunConfig, final: int) -> int:
    """FFCV's progressive resizing: linear from start_res (at ramp_start) to end_res (at ramp_end), rounded
    to a multiple of res_step. Low resolution early makes early epochs several times cheaper; ending at
    the final size (and evaluating at val_resolution, often larger: "FixRes" effect) keeps accuracy."""
    if not run.start_res:
        return final
    end = run.end_res or final
    if epoch <= run.ramp_start:
        return run.start_res
    if epoch >= run.ramp_end:
        return end  # exactly the size asked for, even when it is not a multiple of res_step
    px = run.start_res + (end - run.start_res) * (epoch - run.ramp_start) / (run.ramp_end - run.ramp_start)
    return max(run.res_step, int(round(px / run.res_step)) * run.res_step)


def fit_schedule(cfg: Config) -> tuple[Config, list[str]]:
    """Make the schedule fit this run's length, or refuse what cannot be fitted; returns the config that
    runs (saved as config.json) and one note per change. A recipe's schedule is written for its own
    length, and a shorter `--epochs` or another `--resolution` would otherwise silently undo it: a 5-epoch
    warm-up in a 4-epoch run never reaches the peak lr, a ramp from 128 px to `--resolution 96` trains at
    128 throughout, a step schedule whose milestones lie past the end never decays."""
    o, r, d = cfg.optim, cfg.run, cfg.data
    notes: list[str] = []
    if o.warmup_epochs > r.epochs / 2:
        half = r.epochs / 2
        notes.append(f"note: optim.warmup_epochs={o.warmup_epochs:g} is more than half of run.epochs={r.epochs} "
                     f"(the lr would barely reach its peak); warm-up clamped to {half:g} epochs")
        o = replace(o, warmup_epochs=half)
    if o.schedule == "step":
        late = [m for m in o.milestones if m >= r.epochs]
        if late and len(late) == len(o.milestones):
            # the same fractions of this run (30/60/80 of 90 epochs -> 1/3, 2/3, 8/9 of it)
            scaled = sorted({min(r.epochs - 1, max(1, round(m * r.epochs * 8 / (9 * max(o.milestones)))))
                             for m in o.milestones})
            raise ConfigError(f"optim.schedule=step with optim.milestones={list(o.milestones)}, all at or after "
                              f"run.epochs={r.epochs}: the lr would never decay. Set milestones inside the run, "
                              f"e.g. --set optim.milestones={scaled}, or use --set optim.schedule=cosine")
        if late:
            notes.append(f"note: optim.milestones {late} are at or after run.epochs={r.epochs} and never apply")
    if r.start_res:
        end = r.end_res or d.resolution
        if r.start_res >= end:
            notes.append(f"note: progressive resizing off: its start ({r.start_res} px) is not below its end "
                         f"({end} px, e.g. from --resolution); every epoch trains at {end} px")
            r = replace(r, start_res=0, end_res=0, ramp_start=0, ramp_end=0)
            if end != d.resolution:
                d = replace(d, resolution=end)
        elif r.ramp_end > r.epochs - 1:
            last = r.epochs - 1
            start = min(int(r.ramp_start * last / r.ramp_end), last)
            notes.append(f"note: the resolution ramp (epochs {r.ramp_start}-{r.ramp_end}) ends after the last "
                         f"epoch ({last}, 0-based); moved to epochs {start}-{last} so training ends at {end} px")
            r = replace(r, ramp_start=start, ramp_end=last)
    return replace(cfg, optim=o, run=r, data=d), notes


def _runs(values: list[int]) -> str:
    """[128, 128, 160, 192, 192] -> '128 x2, 160, 192 x2'."""
    out: list[str] = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[i]:
            j += 1
        out.append(f"{values[i]}" + (f" x{j - i + 1}" if j > i else ""))
        i = j + 1
    return ", ".join(out)


def describe_schedule(cfg: Config, steps_per_epoch: int, peak: float) -> str:
    """One line, printed at start: warm-up steps, peak lr, decay, resolution per epoch."""
    o, r = cfg.optim, cfg.run
    total = max(1, steps_per_epoch * r.epochs)
    warmup = min(int(round(o.warmup_epochs * steps_per_epoch)), total - 1)
    decay = {"cosine": "cosine to 0", "linear": "linear to 0",
             "step": f"x{o.gamma:g} at epochs {[m for m in o.milestones if m < r.epochs]}"}.get(o.schedule, o.schedule)
    res = _runs([resolution_at(e, r, cfg.data.resolution) for e in range(r.epochs)])
    return (f"schedule: warm-up {warmup} steps ({o.warmup_epochs:g} epochs) to peak lr {peak:.4g}, then {decay} "
            f"over {total - warmup} steps | train px per epoch: {res} | val {cfg.data.val_resolution} px")
