"""The hot loop. One code path for every precision: `autocast` is a context built once (bf16/fp16/fp32 =
enabled or not) and `scaler` a `torch.amp.GradScaler(enabled=...)` that is a no-op unless fp16.

Host syncs: none per step. The loss is summed on the device and read (`.item()`) only every `log_every`
steps, averaged over ranks (`mean_across`), so every rank logs the same loss and notices a non-finite one
at the same log point: they stop together instead of one rank raising while the others wait in the next
collective. A NaN at step k is reported at the next log point; the weights from then on are never
checkpointed (the caller keeps the last good checkpoint). Stop requests are looked at every step through
`should_stop`, which under DDP is a CPU all-reduce (no GPU sync).

Data wait = host time blocked in `next(loader)`. On the CPU that is the whole story. On CUDA the host
runs ahead of the GPU and only blocks at the log-point sync, so the figure measures how long the *host*
waited for the loader: when the GPU is the bottleneck it stays near 0, when decoding is, it grows. That is
the question it answers ("is the input pipeline the bottleneck?"), without a per-step sync.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN/inf; the run stops without checkpointing the broken weights."""


@dataclass(frozen=True)
class LogPoint:
    step: int           # steps done this epoch
    loss: float         # mean training loss since the start of the epoch
    lr: float
    images_per_sec: float


@dataclass(frozen=True)
class EpochStats:
    loss: float
    steps: int
    images: int          # on this rank
    seconds: float
    data_wait: float     # seconds blocked in next(loader)
    stopped: bool        # left early because a stop was requested (preemption)


def train_step(model, images, labels, loss_fn, optimizer, scaler, autocast) -> torch.Tensor:
    """Forward, backward, update; returns the detached loss (still on the device)."""
    with autocast:
        loss = loss_fn(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def train_one_epoch(model, loader: Iterable, optimizer, schedule, scaler, autocast, loss_fn, ema=None, *,
                    steps: int, log_every: int, should_stop: Callable[[], bool] = lambda: False,
                    log: Callable[[LogPoint], None] = lambda p: None, start: int = 0,
                    mean_across: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> EpochStats:
    """Run steps `start` .. `steps` of an epoch on the batches `loader` yields (a resumed epoch starts at
    `start`: the loader yields only the rest). `should_stop()` is called at step boundaries; `mean_across`
    averages the loss sum over ranks."""
    model.train()
    batches = iter(loader)
    loss_sum, n_images, wait, done, stopped = None, 0, 0.0, start, False
    t0 = time.perf_counter()
    for step in range(start, steps):
        t = time.perf_counter()
        images, labels = next(batches)
        wait += time.perf_counter() - t
        loss = train_step(model, images, labels, loss_fn, optimizer, scaler, autocast)
        schedule.step()
        if ema is not None:
            ema.update_parameters(model)
        loss_sum = loss if loss_sum is None else loss_sum + loss  # device-side; any NaN stays in the sum
        n_images += images.shape[0]
        done = step + 1
        if done % log_every == 0 or done == steps:
            mean = check_finite(mean_across(loss_sum), done - start, done)
            log(LogPoint(done, mean, schedule.lr(schedule.step_count - 1), n_images / (time.perf_counter() - t0)))
        if should_stop():
            stopped = done < steps
            break
    mean = check_finite(mean_across(loss_sum), done - start, done) if loss_sum is not None else float("nan")
    return EpochStats(mean, done, n_images, time.perf_counter() - t0, wait, stopped)


def check_finite(loss_sum: torch.Tensor, count: int, step: int) -> float:
    """The one host sync of a log point."""
    mean = loss_sum.item() / max(1, count)
    if not math.isfinite(mean):
        raise NonFiniteLoss(
            f"training loss is {mean} by step {step} of this epoch; stopping without saving these weights "
            "(the last checkpoint is kept). Lower optim.lr, raise optim.warmup_epochs, or try "
            "precision bfloat16/float32 instead of float16; resume with --resume auto")
    return mean
