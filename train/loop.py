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

import contextlib
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
    first_wait: float    # of which on the first batch: the loader's start-up (workers, pipeline build), paid once
    stopped: bool        # left early because a stop was requested (preemption)


def train_step(model, images, labels, loss_fn, optimizer, scaler, autocast, *, grad_clip: float = 0.0,
               loss_scale: float = 1.0, update: bool = True) -> torch.Tensor:
    """Forward and backward; with `update`, also clip and step. Gradient accumulation: `loss_scale` = 1 / the
    batches of this update (their gradients add up in .grad), `update` only on its last batch. Clipping
    unscales first (fp16), so `grad_clip` bounds the true global norm; clip_grad_norm_ returns a device
    tensor, and its result is never read: no host sync. Returns the detached (unscaled) loss, on the device."""
    with autocast:
        loss = loss_fn(model(images), labels)
    scaler.scale(loss * loss_scale if loss_scale != 1.0 else loss).backward()
    if update:
        if grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip,
                                           foreach=True)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def train_one_epoch(model, loader: Iterable, optimizer, schedule, scaler, autocast, loss_fn, ema=None, *,
                    steps: int, log_every: int, should_stop: Callable[[], bool] = lambda: False,
                    log: Callable[[LogPoint], None] = lambda p: None, start: int = 0,
                    mean_across: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
                    grad_clip: float = 0.0, grad_accum: int = 1,
                    batch_transform: Callable | None = None) -> EpochStats:
    """Run steps `start` .. `steps` of an epoch on the batches `loader` yields (a resumed epoch starts at
    `start`: the loader yields only the rest). `should_stop()` is called at step boundaries; `mean_across`
    averages the loss sum over ranks.
    A step is one batch; the optimizer updates every `grad_accum` batches (and on the epoch's last one), and
    a stop waits for the end of the update it is in, so a checkpoint never holds half-accumulated gradients.
    `batch_transform(images, labels)` runs on each batch before the step (train.mix: mixup/cutmix)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    batches = iter(loader)
    loss_sum, n_images, wait, first_wait, done, stopped, stopping = None, 0, 0.0, 0.0, start, False, False
    t0 = time.perf_counter()
    for step in range(start, steps):
        t = time.perf_counter()
        images, labels = next(batches)
        waited = time.perf_counter() - t
        if step == start:
            first_wait = waited
        wait += waited
        if batch_transform is not None:
            images, labels = batch_transform(images, labels)
        first = step - step % grad_accum  # the update's first batch (epoch-relative, as checkpoints count)
        last = min(first + grad_accum, steps) - 1
        update = step == last
        sync = contextlib.nullcontext() if update or not hasattr(model, "no_sync") else model.no_sync()
        with sync:  # DDP: all-reduce the gradients once per update, not once per batch
            loss = train_step(model, images, labels, loss_fn, optimizer, scaler, autocast, grad_clip=grad_clip,
                              loss_scale=1.0 / (last - first + 1), update=update)
        schedule.step()
        if ema is not None and update:
            ema.update_parameters(model)
        loss_sum = loss if loss_sum is None else loss_sum + loss  # device-side; any NaN stays in the sum
        n_images += images.shape[0]
        done = step + 1
        if done % log_every == 0 or done == steps:
            mean = check_finite(mean_across(loss_sum), done - start, done)
            log(LogPoint(done, mean, schedule.lr(schedule.step_count - 1), n_images / (time.perf_counter() - t0)))
        stopping = should_stop() or stopping  # asked every step: under DDP a collective every rank joins
        if stopping and update:
            stopped = done < steps
            break
    mean = check_finite(mean_across(loss_sum), done - start, done) if loss_sum is not None else float("nan")
    return EpochStats(mean, done, n_images, time.perf_counter() - t0, wait, first_wait, stopped)


def check_finite(loss_sum: torch.Tensor, count: int, step: int) -> float:
    """The one host sync of a log point."""
    mean = loss_sum.item() / max(1, count)
    if not math.isfinite(mean):
        raise NonFiniteLoss(
            f"training loss is {mean} by step {step} of this epoch; stopping without saving these weights "
            "(the last checkpoint is kept). Lower optim.lr, raise optim.warmup_epochs, or try "
            "precision bfloat16/float32 instead of float16; resume with --resume auto")
    return mean
