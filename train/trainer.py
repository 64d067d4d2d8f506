"""The epoch driver: builds the run's parts from a Config, resumes, trains epoch after epoch (train/loop.py's
`train_one_epoch`), evaluates, checkpoints (train/state.py's `Checkpoint`) and stops cleanly on a signal.
train/run.py is only the CLI around `train(cfg)`."""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from imt.pipeline import build_loader
from imt.pipeline.common import combine_states
from imt.train import dist
from imt.train.checkpoint import CheckpointDir, CheckpointError, StopFlag, find_resume, list_checkpoints, \
    load_checkpoint, rng_state
from imt.train.config import Config, ConfigError, check_input_size, resolve, usable_cores
from imt.train.evaluate import EvalResult, evaluate, save_report
from imt.train.loop import NonFiniteLoss, train_one_epoch
from imt.train.mix import build_mix
from imt.train.model import build_model, build_step_parts, built_input_size, compile_model, prepare, unwrap
from imt.train.monitor import MetricsLog, Progress, data_wait_note
from imt.train.preflight import verify_data
from imt.train.runlock import locked_run
from imt.train.schedule import LRSchedule, describe_schedule, fit_schedule, peak_lr, resolution_at
from imt.train.state import Checkpoint, TrainState


def seed_everything(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic  # autotuned convolutions: fixed shapes per epoch


def dist_setup(device: str) -> dist.DistInfo:
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device=cuda but torch sees no CUDA device; use --device cpu")
    return dist.setup({"auto": None, "cpu": "cpu", "cuda": "cuda:0"}[device])


def make_should_stop(stop: StopFlag, info: dist.DistInfo):
    """One process: look at the flag every step (a Python bool, no sync). Under DDP: agree every step with
    one tiny CPU all-reduce (gloo, no GPU sync), so all ranks leave the loop at the same step, within a
    step of the signal."""
    if not info.distributed:
        return lambda: stop.requested
    return lambda: dist.any_true(stop.requested, info)


def agree_on_resume(directory: Path, info: dist.DistInfo) -> tuple[Path, dict] | None:
    """`--resume auto` under torchrun: rank 0 picks the checkpoint, every rank loads that same file. Each rank
    picking its own newest one would start the ranks from different steps when --out is not shared (each
    node sees only its own files) or while a copy is still arriving."""
    found, error = None, None
    if info.is_main:
        try:
            found = find_resume(directory)
        except CheckpointError as exc:  # told to every rank, so none waits for the others forever
            error = str(exc)
    choice, error = dist.broadcast_object((str(found[0]) if found else None, error), info)
    if error:
        raise CheckpointError(error)
    if info.is_main or choice is None:
        return found
    path = Path(choice)
    if not path.is_file():
        raise CheckpointError(f"rank {info.rank} cannot read {path}, the checkpoint rank 0 resumes from: --out "
                              "must be on a file system every node shares (or copy the checkpoints folder to "
                              "the same path on every node)")
    return path, load_checkpoint(path)


def fingerprint(model: torch.nn.Module) -> list[float]:
    """Per-tensor sums of parameters and buffers: equal on every rank when DDP kept them in sync."""
    with torch.no_grad():
        return [float(t.double().sum()) for t in unwrap(model).state_dict().values() if t.is_floating_point()]


def restore(resumed: tuple[Path, dict], state: TrainState, train_loader, classes: list[str], cfg: Config,
            info: dist.DistInfo, say: Progress) -> int:
    """Load a checkpoint into the run's state and its training loader; returns the epoch to start. The loader
    continues that epoch where the checkpoint left it (or says why it cannot); the trainer takes the epoch's
    position from the loader."""
    path, raw = resumed
    ckpt = Checkpoint.from_dict(raw, path)
    state.restore(ckpt, path, cfg, classes, info.rank, info.world_size)
    start_epoch, step = ckpt.epoch, ckpt.step
    into = step - start_epoch * int(ckpt.schedule.get("steps_per_epoch", 0))  # steps of the next epoch done
    if ckpt.version < 2:
        say.write(f"resume: {path.name} was written before checkpoints kept the loaders' state, so epoch "
                  f"{start_epoch + 1} starts from its beginning with a fresh sample order"
                  + (f" (the checkpoint was taken after {into} of its steps: those batches are trained again)"
                     if into > 0 else ""))
    elif ckpt.loaders:
        mine = combine_states(ckpt.loaders, info.world_size, info.rank)
        if int(mine.get("epoch", -1)) == start_epoch:  # else it ended the epoch before: nothing to continue
            note = train_loader.load_state_dict(mine)
            if note:
                say.write(f"resume: {note}")
    say.write(f"resumed from {path} (" + (f"{into} steps into epoch {start_epoch + 1}" if into > 0 else
                                          f"epoch {start_epoch} done") + f", global step {step})")
    return start_epoch


def train(cfg: Config, stop: StopFlag | None = None) -> dict:
    """Run the configured training; returns the summary (also written to <out>/summary.json)."""
    info = dist_setup(cfg.run.device)
    own_flag = stop is None
    stop = (StopFlag().install() if own_flag else stop)
    try:
        with locked_run(cfg.run.out, info):  # one run per --out at a time
            return _train(resolve(cfg, info.device, info.local_world_size), info, stop)
    finally:
        if own_flag:
            stop.restore()
        dist.cleanup()


def _train(cfg: Config, info: dist.DistInfo, stop: StopFlag) -> dict:
    t_start = time.perf_counter()
    say = Progress(info.is_main, info.world_size)
    cfg, notes = fit_schedule(cfg)  # the schedule made to fit this run's length, one note per change
    run, device = cfg.run, info.device
    torch.set_num_threads(run.threads)  # resolved: see RunConfig.threads
    out = Path(run.out)
    seed_everything(run.seed, run.deterministic)  # same seed on every rank: identical initial weights

    verify_data(cfg.data, info, say.write)  # data.verify / --verify: hash the shards first
    train_loader = build_loader(cfg.data, "train", info, train=True)
    val_loader = build_loader(cfg.data, "val", info, train=False)
    classes = list(train_loader.classes)
    if list(val_loader.classes) != classes:  # labels would mean other classes: every metric wrong, silently
        raise ConfigError(f"the val split's classes differ from train's ({len(val_loader.classes)} vs "
                          f"{len(classes)}): make both splits from the same class list")
    # ---- resume: every rank reads the same file
    ckpts = CheckpointDir(out / "checkpoints", run.keep_last, info.is_main)
    start_epoch = 0
    resumed = None
    if run.resume == "auto":
        resumed = agree_on_resume(ckpts.dir, info)
        if resumed is None:
            say.write(f"--resume auto: no checkpoint in {ckpts.dir} yet; starting from scratch")
    elif run.resume:
        resumed = (Path(run.resume), load_checkpoint(run.resume))
    elif newest := dist.broadcast_object(next((p.name for p in list_checkpoints(ckpts.dir)), None)
                                         if info.is_main else None, info):
        # A fresh run here would rotate the old run's checkpoints away and mix its best.pt and config.json
        # with theirs, and a later --resume auto could pick the old run's newest checkpoint. Rank 0's view is
        # told to all: a rank on another node may not see the folder's files.
        raise ConfigError(f"{out} already holds checkpoints of a run ({newest} ...): continue it with "
                          "--resume auto, or start this one in a new --out")
    if run.resume:  # a fine-tuning run resumed without --pretrained: its checkpoint says how it was set up
        from imt.train.transfer import finetune_of_checkpoint
        cfg = replace(cfg, model=finetune_of_checkpoint(cfg.model, resumed[1] if resumed else None))

    model = build_model(cfg.model.arch, len(classes), zero_init_residual=cfg.model.zero_init_residual,
                        kwargs=cfg.model.kwargs)
    if fixed := built_input_size(model):  # before any step: timm would only fail at the first forward
        check_input_size(cfg, fixed, "timm builds its position embeddings for that size",
                         ", or --set 'model.kwargs={dynamic_img_size: true}' where the model supports it")
    heads: list[str] = []
    if cfg.model.pretrained:
        from imt.train.transfer import setup_finetune
        heads = setup_finetune(model, cfg, classes, say.write, load=resumed is None)
    elif cfg.optim.backbone_lr_mult != 1.0:  # e.g. --recipe finetune with --pretrained forgotten
        say.write(f"note: no --pretrained weights, so this run trains from scratch and optim.backbone_lr_mult="
                  f"{cfg.optim.backbone_lr_mult:g} does not apply (every layer learns at the full lr)")
    model = prepare(model, device, sync_bn=cfg.model.sync_bn, distributed=info.distributed)
    o = cfg.optim
    parts = build_step_parts(cfg, model, device, heads)
    optimizer, scaler, autocast, loss_fn = parts.optimizer, parts.scaler, parts.autocast, parts.loss_fn
    steps = len(train_loader) if not run.max_steps_per_epoch else min(len(train_loader), run.max_steps_per_epoch)
    global_batch = cfg.data.batch_size * info.world_size * cfg.optim.grad_accum  # images per optimizer update
    schedule = LRSchedule(optimizer, o, peak_lr(o, global_batch), steps, run.epochs)
    dtype = cfg.precision.dtype
    ema = None
    if o.ema_decay:
        from imt.train.ema import EMA
        ema = EMA(model, o.ema_decay)
    state = TrainState(model, optimizer, scaler, schedule, ema, say=say.write)

    if resumed is not None:
        start_epoch = restore(resumed, state, train_loader, classes, cfg, info, say)
        if start_epoch >= run.epochs:  # a job re-queued after it finished: keep its results as they are
            say.write(f"{out}: all {run.epochs} epochs are done ({resumed[0].name}); nothing to train. Raise "
                      "--epochs to train further.")
            saved = out / "summary.json"
            summary = json.loads(saved.read_text()) if saved.is_file() else {
                "arch": cfg.model.arch, "epochs": run.epochs, "out": str(out), "world_size": info.world_size,
                "best": state.best, "final": None, "images_per_sec": None, "wall_time": 0.0}
            return {**summary, "rank": info.rank, "already_done": True}
    else:
        seed_everything(run.seed + info.rank, run.deterministic)  # per-rank randomness from here on

    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.json")
    net = dist.wrap_ddp(model, info)
    if cfg.model.compile:
        net = compile_model(net, shapes=len({resolution_at(e, run, cfg.data.resolution) for e in range(run.epochs)}))
    metrics = MetricsLog(out, info.is_main, run.tensorboard, start_epoch)
    should_stop = make_should_stop(stop, info)
    say.write(f"{cfg.model.arch} | {len(classes)} classes | {cfg.data.loader} loader | {info.world_size} rank(s) "
              f"on {device} | {dtype} | {steps} steps/epoch x {run.epochs} epochs | global batch {global_batch} "
              f"| peak lr {schedule.peak:.4g} | out {out}")
    for line in [*notes, describe_schedule(cfg, steps, schedule.peak)]:
        say.write(line)
    if device.type == "cpu" and info.world_size == 1 and (cores := usable_cores()) > 1:
        say.write(f"note: one process on {cores} CPU cores; one rank per core, each of one thread, trained at 1.7x "
                  f"the img/s on a 2-core machine (benchmarks/RESULTS.md): torchrun --standalone --nproc_per_node "
                  f"{cores} -m imt.train.run ... (the global batch becomes ranks x data.batch_size)")

    def checkpoint(epoch: int, step: int, is_best: bool = False, mid_epoch: bool = False) -> Path | None:
        """`epoch`: epochs completed (what resume counts from); the file is named after the epoch as the screen
        numbers it: the one just finished, or (mid_epoch) the one in progress."""
        rngs = dist.all_gather_object(rng_state(), info)  # collective: every rank gets here
        loaders = dist.all_gather_object(train_loader.state_dict(), info)
        ckpt = state.capture(epoch=epoch, step=step, rngs=rngs, loaders=loaders, cfg=cfg, classes=classes,
                             world_size=info.world_size)
        return ckpts.save(ckpt.to_dict(), epoch + mid_epoch, step, best=is_best)

    def stopped(path: Path | None, step: int) -> dict:
        metrics.close()
        say.write(f"stopped by signal {stop.signum} at step {step}; checkpoint {path}; "
                  "continue with the same command and --resume auto")
        return {"rank": info.rank, "stopped": stop.signum or 15, "step": step,
                "checkpoint": str(path) if path else None}

    last_eval: EvalResult | None = None
    history = []
    for epoch in range(start_epoch, run.epochs):
        t_epoch = time.perf_counter()
        res = resolution_at(epoch, run, cfg.data.resolution)
        train_loader.set_resolution(res)
        train_loader.set_epoch(epoch)
        # A resumed epoch starts where the loader continues it; the schedule follows (after a change of ranks,
        # from the share of the epoch's samples already trained).
        start, left = train_loader.position()
        schedule.load_state_dict({"step_count": epoch * steps + start})
        say.start(epoch, run.epochs, steps, res, start)
        stats = train_one_epoch(net, train_loader, optimizer, schedule, scaler, autocast, loss_fn, ema,
                                steps=min(steps, start + left), log_every=run.log_every, should_stop=should_stop,
                                log=say.log, start=start, mean_across=lambda t: dist.mean_across(t, info),
                                grad_clip=o.grad_clip, grad_accum=o.grad_accum,
                                batch_transform=build_mix(o, len(classes)))
        say.close()
        # Optimizer steps done over the whole run, across resumes: what checkpoints are named and ordered by. Not
        # epoch * steps + steps into it: after a resume with fewer steps per epoch (more ranks, a bigger batch)
        # the end of an epoch would get a smaller number than a mid-epoch checkpoint of the same epoch.
        global_step = state.steps_done = state.steps_done + stats.steps - start
        if stats.stopped:  # preempted mid-epoch: save where we are (the loaders' states say where to go on)
            return stopped(checkpoint(epoch, global_step, mid_epoch=True), global_step)
        train_time = time.perf_counter() - t_epoch
        images = dist.all_reduce_sum(torch.tensor([stats.images], device=device), info).item()
        last_lr = schedule.lr(epoch * steps + stats.steps - 1)  # the schedule's position, in this run's steps
        row = {"epoch": epoch + 1, "train_loss": stats.loss, "lr": last_lr,
               "resolution": res, "images_per_sec": images / stats.seconds,
               "data_wait_fraction": stats.data_wait / stats.seconds, "first_batch_wait": stats.first_wait,
               "train_time": train_time}
        is_best = False
        # The loss is checked before each update, so the last one of the epoch could still have broken the
        # weights: never evaluate or checkpoint them (a resume would fail on them again and again).
        if not torch.isfinite(torch.stack([p.detach().float().sum() for p in model.parameters()]).sum()):
            raise NonFiniteLoss(f"the weights hold NaN/inf after epoch {epoch + 1}; stopping without saving them "
                                "(the last checkpoint is kept). Lower optim.lr or raise optim.warmup_epochs, then "
                                "resume with --resume auto")
        dist.broadcast_buffers(model, info)  # rank 0's BN statistics everywhere: eval = checkpoint
        if ema is not None:
            dist.broadcast_buffers(ema.module, info)
        if (run.eval_every and (epoch + 1) % run.eval_every == 0) or epoch + 1 == run.epochs:
            t_eval = time.perf_counter()
            last_eval = evaluate(ema.module if ema is not None else model, val_loader, autocast, info,
                                 len(classes), tta_flip=run.tta_flip)
            row.update(last_eval.as_dict(), eval_time=time.perf_counter() - t_eval)
            is_best = last_eval.top1 > state.best["val_top1"]
            if is_best:
                state.best = {"val_top1": last_eval.top1, "val_top5": last_eval.top5, "epoch": epoch + 1}
        else:
            row.update(val_top1=None, val_top5=None)
        row["epoch_time"] = time.perf_counter() - t_epoch
        path = checkpoint(epoch + 1, global_step, is_best)
        metrics.write(row)
        history.append(row)
        say.write(f"epoch {epoch + 1}/{run.epochs}: loss {stats.loss:.4f}"
                  + (f" | val top-1 {row['val_top1']:.2f}% top-5 {row['val_top5']:.2f}%"
                     if row["val_top1"] is not None else "")
                  + f" | {row['images_per_sec']:.0f} img/s | data wait {100 * row['data_wait_fraction']:.0f}%"
                  + f" | {res}px | {row['epoch_time']:.1f}s")
        if epoch == start_epoch and (note := data_wait_note(stats.data_wait, stats.first_wait, stats.seconds,
                                                                cfg.data.path)):
            say.write(note)
        if dist.any_true(stop.requested, info):  # the signal came during the epoch's last steps or eval
            return stopped(path, global_step)

    metrics.close()
    summary = {"rank": info.rank, "arch": cfg.model.arch, "epochs": run.epochs, "out": str(out),
               "world_size": info.world_size,
               "best": state.best, "final": last_eval.as_dict() if last_eval else None,
               "images_per_sec": (sum(r["images_per_sec"] for r in history) / len(history)) if history else None,
               "wall_time": time.perf_counter() - t_start}
    prints = dist.all_gather_object(fingerprint(model), info)
    summary["ranks_agree"] = all(p == prints[0] for p in prints)  # exact: DDP keeps them bitwise equal
    if info.is_main:
        if last_eval is not None:
            summary["report"] = [str(p) for p in save_report(last_eval, classes, out / "report",
                                                                f"{cfg.model.arch}, epoch {run.epochs}")]
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
