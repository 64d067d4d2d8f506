"""Per-iteration learning rate and per-epoch resolution: plain functions of the step/epoch, so a resumed
run recomputes exactly what an uninterrupted one would have used (the only state is the step count)."""
from __future__ import annotations

import math

import torch

from .config import OptimConfig, RunConfig


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
