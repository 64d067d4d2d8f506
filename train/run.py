"""Train a torchvision classifier on shards (or a folder, or synthetic tensors): the CLI and its wiring.

One process:
    python train/run.py --recipe synthetic_quick --data work/shards --out runs/quick
    python -m imt.train.run --recipe resnet50_fast --data /data/imagenet-shards --out runs/r50
    imt-train --recipe resnet18_16ep --data ... --set optim.lr=0.6 --set run.tta_flip=true

One node, 8 GPUs:
    torchrun --nproc_per_node 8 -m imt.train.run --recipe resnet50_imagenet --data /data/shards --out runs/r50

Two nodes, 8 GPUs each (run the same command on both; `host` is a node every node can reach, e.g. node 0;
--out must be on a shared file system for --resume auto, and only global rank 0 writes to it):
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint host:29500 \\
        --rdzv_id r50-run1 -m imt.train.run --recipe resnet50_imagenet --data /data/shards --out /shared/runs/r50

--batch-size is per GPU; the learning rate scales with the global batch (optim.lr is per 256 images).
SIGTERM/SIGINT (preemption) saves a checkpoint at the next step boundary (under torchrun the ranks agree
at every step, over a gloo group: set GLOO_SOCKET_IFNAME where nodes have several network interfaces) and
exits with 143/130; `--resume auto` continues from it.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script (`python train/run.py`): import from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click
import numpy as np
import torch

from imt.pipeline import LOADERS, build_loader
from imt.train import dist
from imt.train.checkpoint import (CheckpointDir, CheckpointError, StopFlag, check_compatible, find_resume,
                              list_checkpoints, load_checkpoint, rng_state, set_rng_state)
from imt.train.cli import CONTEXT, recipe_default
from imt.train.config import Config, ConfigError, load_config, parse_override, resolve
from imt.train.evaluate import EvalResult, evaluate, save_report
from imt.train.loop import NonFiniteLoss, train_one_epoch
from imt.train.model import build_model, build_step_parts, prepare, unwrap
from imt.train.monitor import MetricsLog, Progress
from imt.train.schedule import LRSchedule, peak_lr, resolution_at


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


def restore(resumed: tuple[Path, dict], model, optimizer, scaler, schedule: LRSchedule, ema, classes: list[str],
            cfg: Config, info: dist.DistInfo, say: Progress) -> tuple[int, int, dict]:
    """Load a checkpoint into the run's objects; returns (epoch to start, batches to skip in it, best so far)."""
    path, state = resumed
    check_compatible(state, cfg.model.arch, classes, str(path))
    configured = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
                  for g in optimizer.param_groups]
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])  # parameter groups differ: another --finetune / freezing
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema"):
            ema.load_state_dict(state["ema"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"{path} does not fit this run ({type(e).__name__}: {str(e).splitlines()[0][:300]}). It was saved by "
            "another configuration (model, fine-tuning mode, optimizer groups): resume with the settings it was "
            "made with (its config.json), or start a fresh --out") from e
    # load_state_dict brings back the saved hyperparameters; this run's config (saved as its config.json) wins.
    changed = sorted({f"{k} {g[k]} -> {want[k]}" for g, want in zip(optimizer.param_groups, configured)
                      for k in want if g.get(k) != want[k]})
    for g, want in zip(optimizer.param_groups, configured):
        g.update(want)
    if changed:
        say.write(f"resume: this run's optimizer settings replace the checkpoint's: {', '.join(changed)}")
    steps, saved_steps = schedule.steps_per_epoch, int(state["schedule"]["steps_per_epoch"])
    start_epoch, step = int(state["epoch"]), int(state["step"])
    skip = step - start_epoch * saved_steps  # batches of epoch `start_epoch` already trained (preemption)
    if skip and saved_steps != steps:
        say.write(f"warning: {path.name} was saved {skip} steps into an epoch of {saved_steps} steps; this run "
                  f"has {steps} steps/epoch (batch or world size changed): epoch {start_epoch + 1} restarts")
        skip = 0
    schedule.load_state_dict({"step_count": start_epoch * steps + skip})
    rngs = state["rng"]  # one per rank of the saving run
    set_rng_state(rngs[info.rank] if len(rngs) == info.world_size else rngs[0])
    say.write(f"resumed from {path} (" + (f"{skip} steps into epoch {start_epoch + 1}" if skip else
                                          f"epoch {start_epoch} done") + f", global step {step})")
    return start_epoch, skip, dict(state.get("best", {"val_top1": -1.0, "epoch": 0}))


def train(cfg: Config, stop: StopFlag | None = None) -> dict:
    """Run the configured training; returns the summary (also written to <out>/summary.json)."""
    info = dist_setup(cfg.run.device)
    own_flag = stop is None
    stop = (StopFlag().install() if own_flag else stop)
    try:
        return _train(resolve(cfg, info.device), info, stop)
    finally:
        if own_flag:
            stop.restore()
        dist.cleanup()


def _train(cfg: Config, info: dist.DistInfo, stop: StopFlag) -> dict:
    t_start = time.perf_counter()
    run, device = cfg.run, info.device
    out = Path(run.out)
    say = Progress(info.is_main, info.world_size)
    seed_everything(run.seed, run.deterministic)  # same seed on every rank: identical initial weights

    train_loader = build_loader(cfg.data, "train", info, train=True)
    val_loader = build_loader(cfg.data, "val", info, train=False)
    classes = list(train_loader.classes)
    if list(val_loader.classes) != classes:  # labels would mean other classes: every metric wrong, silently
        raise ConfigError(f"the val split's classes differ from train's ({len(val_loader.classes)} vs "
                          f"{len(classes)}): make both splits from the same class list")
    # ---- resume: every rank reads the same file
    ckpts = CheckpointDir(out / "checkpoints", run.keep_last, info.is_main)
    start_epoch, skip, best = 0, 0, {"val_top1": -1.0, "epoch": 0}
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
    if run.resume:
        from imt.train.transfer import finetune_of_checkpoint
        cfg = replace(cfg, model=finetune_of_checkpoint(cfg.model, resumed[1] if resumed else None))

    model = build_model(cfg.model.arch, len(classes), zero_init_residual=cfg.model.zero_init_residual)
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
    global_batch = cfg.data.batch_size * info.world_size
    schedule = LRSchedule(optimizer, o, peak_lr(o, global_batch), steps, run.epochs)
    dtype = cfg.precision.dtype
    ema = None
    if o.ema_decay:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(o.ema_decay), use_buffers=True)

    if resumed is not None:
        start_epoch, skip, best = restore(resumed, model, optimizer, scaler, schedule, ema, classes, cfg, info, say)
        if start_epoch >= run.epochs:  # a job re-queued after it finished: keep its results as they are
            say.write(f"{out}: all {run.epochs} epochs are done ({resumed[0].name}); nothing to train. Raise "
                      "--epochs to train further.")
            saved = out / "summary.json"
            summary = json.loads(saved.read_text()) if saved.is_file() else {
                "arch": cfg.model.arch, "epochs": run.epochs, "out": str(out), "world_size": info.world_size,
                "best": best, "final": None, "images_per_sec": None, "wall_time": 0.0}
            return {**summary, "rank": info.rank, "already_done": True}
        if skip and cfg.data.loader == "dali":
            say.write(f"note: DALI cannot replay epoch {start_epoch + 1}'s sample order (its pipeline shuffles one "
                      "continuous stream across epochs), so the rest of that epoch draws from a fresh order: in "
                      "this one epoch some samples are seen twice and some not at all; later epochs see each "
                      "sample once. --loader torch resumes exactly.")
    else:
        seed_everything(run.seed + info.rank, run.deterministic)  # per-rank randomness from here on

    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.json")
    net = dist.wrap_ddp(model, info)
    if cfg.model.compile:
        net = torch.compile(net)
    metrics = MetricsLog(out, info.is_main, run.tensorboard, start_epoch)
    should_stop = make_should_stop(stop, info)
    say.write(f"{cfg.model.arch} | {len(classes)} classes | {cfg.data.loader} loader | {info.world_size} rank(s) "
              f"on {device} | {dtype} | {steps} steps/epoch x {run.epochs} epochs | global batch {global_batch} "
              f"| peak lr {schedule.peak:.4g} | out {out}")

    def checkpoint(epoch: int, step: int, is_best: bool = False, mid_epoch: bool = False) -> Path | None:
        """`epoch`: epochs completed (what resume counts from); the file is named after the epoch as the screen
        numbers it: the one just finished, or (mid_epoch) the one in progress."""
        rngs = dist.all_gather_object(rng_state(), info)  # collective: every rank gets here
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "schedule": schedule.state_dict(), "ema": ema.state_dict() if ema is not None else {},
                 "epoch": epoch, "step": step, "rng": rngs, "config": cfg.to_dict(), "classes": classes,
                 "arch": cfg.model.arch, "best": best, "world_size": info.world_size,
                 "resolution": cfg.data.val_resolution, "resize_ratio": cfg.data.val_resize_ratio}
        return ckpts.save(state, epoch + mid_epoch, step, best=is_best)

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
        say.start(epoch, run.epochs, steps, res, skip)
        stats = train_one_epoch(net, train_loader, optimizer, schedule, scaler, autocast, loss_fn, ema,
                                steps=steps, log_every=run.log_every, should_stop=should_stop, log=say.log,
                                skip=skip, mean_across=lambda t: dist.mean_across(t, info))
        say.close()
        skip = 0
        global_step = epoch * steps + stats.steps
        if stats.stopped:  # preempted mid-epoch: save where we are; resume skips the batches already seen
            return stopped(checkpoint(epoch, global_step, mid_epoch=True), global_step)
        train_time = time.perf_counter() - t_epoch
        images = dist.all_reduce_sum(torch.tensor([stats.images], device=device), info).item()
        row = {"epoch": epoch + 1, "train_loss": stats.loss, "lr": schedule.lr(global_step - 1),
               "resolution": res, "images_per_sec": images / stats.seconds,
               "data_wait_fraction": stats.data_wait / stats.seconds, "train_time": train_time}
        is_best = False
        # The loss is checked before each update, so the last one of the epoch could still have broken the
        # weights: never evaluate or checkpoint them (a resume would fail on them again and again).
        if not torch.isfinite(torch.stack([p.detach().float().sum() for p in model.parameters()]).sum()):
            raise NonFiniteLoss(f"the weights hold NaN/inf after epoch {epoch + 1}; stopping without saving them "
                                "(the last checkpoint is kept). Lower optim.lr or raise optim.warmup_epochs, then "
                                "resume with --resume auto")
        dist.broadcast_buffers(model, info)  # rank 0's BN statistics everywhere: eval = checkpoint
        if ema is not None:
            dist.broadcast_buffers(ema.module, info)  # not n_averaged: a CPU tensor NCCL cannot send
        if (epoch + 1) % run.eval_every == 0 or epoch + 1 == run.epochs:
            t_eval = time.perf_counter()
            last_eval = evaluate(ema.module if ema is not None else model, val_loader, autocast, info,
                                 len(classes), tta_flip=run.tta_flip)
            row.update(last_eval.as_dict(), eval_time=time.perf_counter() - t_eval)
            is_best = last_eval.top1 > best["val_top1"]
            if is_best:
                best = {"val_top1": last_eval.top1, "val_top5": last_eval.top5, "epoch": epoch + 1}
        else:
            row.update(val_top1=None, val_top5=None)
        row["epoch_time"] = time.perf_counter() - t_epoch
        path = checkpoint(epoch + 1, global_step, is_best)
        metrics.write(row)
        history.append(row)
        say.write(f"epoch {epoch + 1}/{run.epochs}: loss {stats.loss:.4f}"
                  + (f" | val top-1 {row['val_top1']:.2f}% top-5 {row['val_top5']:.2f}%" if last_eval else "")
                  + f" | {row['images_per_sec']:.0f} img/s | data wait {100 * row['data_wait_fraction']:.0f}%"
                  + f" | {res}px | {row['epoch_time']:.1f}s")
        if dist.any_true(stop.requested, info):  # the signal came during the epoch's last steps or eval
            return stopped(path, global_step)

    metrics.close()
    summary = {"rank": info.rank, "arch": cfg.model.arch, "epochs": run.epochs, "out": str(out),
               "world_size": info.world_size,
               "best": best, "final": last_eval.as_dict() if last_eval else None,
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


def print_summary(summary: dict) -> None:
    if "stopped" in summary or summary["rank"] != 0:
        return
    best, final = summary["best"], summary["final"] or {}
    lines = [f"done: {summary['arch']}, {summary['epochs']} epochs, {summary['wall_time'] / 60:.1f} min, "
             f"{summary['world_size']} rank(s)"]
    if final:
        lines.append(f"  final  val top-1 {final['val_top1']:.2f}%  top-5 {final['val_top5']:.2f}%  "
                     f"({final['val_count']} images)")
        lines.append(f"  best   val top-1 {best['val_top1']:.2f}%  (epoch {best['epoch']})")
    if summary["images_per_sec"]:
        lines.append(f"  train throughput {summary['images_per_sec']:.0f} img/s (mean over epochs)")
    if summary["world_size"] > 1:
        lines.append(f"  ranks agree on the final weights: {summary['ranks_agree']}")
    out = Path(summary["out"])
    lines.append(f"  files: {out / 'metrics.jsonl'}, {out / 'checkpoints'}/ (best.pt), {out / 'report'}/ "
                 f"(per-class P/R/F1, confusion), {out / 'config.json'}, {out / 'tensorboard'}/")
    click.echo("\n".join(lines))


@click.command(context_settings=CONTEXT)
@click.option("--recipe", help="YAML recipe: a path or a name in recipes/ (e.g. resnet50_fast).")
@click.option("--data", "data_path", show_default=recipe_default('data.path'),
              help="Shard folder from imt-make-shards (train and val splits); for "
              "--loader folder an ImageFolder root with train/ and val/.")
@click.option("--arch", show_default=recipe_default('model.arch'),
              help="torchvision model name: resnet18/34/50/101/152, vgg16_bn, densenet121, ...")
@click.option("--epochs", show_default=recipe_default('run.epochs'), type=int)
@click.option("--batch-size", show_default=recipe_default('data.batch_size'),
              type=int, help="Per rank (GPU); the lr scales with the global batch.")
@click.option("--lr", show_default=recipe_default('optim.lr'),
              type=float, help="Peak learning rate per 256 images of global batch.")
@click.option("--resolution", show_default=recipe_default('data.resolution'),
              type=int, help="Final training resolution (end of any progressive ramp) and "
              "validation crop, in pixels.")
@click.option("--loader", show_default=recipe_default('data.loader'), type=click.Choice(LOADERS))
@click.option("--out", show_default=recipe_default('run.out'),
              help="Run directory (config.json, metrics.jsonl, checkpoints/, report/, tensorboard/).")
@click.option("--resume", show_default=recipe_default('run.resume'),
              help="'auto' (newest valid checkpoint in --out) or a checkpoint path.")
@click.option("--precision", show_default=recipe_default('precision.dtype'),
              type=click.Choice(["auto", "bfloat16", "float16", "float32"]))
@click.option("--workers", show_default=recipe_default('data.workers'),
              type=int, help="Loader threads/processes per rank.")
@click.option("--compile/--no-compile", "compile_", show_default=recipe_default('model.compile'),
              default=None, help="torch.compile the model.")
@click.option("--seed", show_default=recipe_default('run.seed'), type=int)
@click.option("--device", show_default=recipe_default('run.device'), type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--pretrained", show_default=recipe_default('model.pretrained'),
              help="Start from these weights: one of our checkpoints, a torchvision state dict "
              "file, a timm / Lightning / torchvision-references checkpoint, or torchvision:<arch> from the torch "
              "hub cache (nothing is downloaded). The classifier is replaced when the classes differ; every key "
              "that does not fit is reported.")
@click.option("--finetune", show_default=recipe_default('model.finetune'),
              type=click.Choice(["full", "linear"]), help="With --pretrained: 'full' trains "
              "everything (backbone at optim.backbone_lr_mult x the lr), 'linear' only the new classifier.")
@click.option("--freeze-bn/--no-freeze-bn", show_default=recipe_default('model.freeze_bn'),
              default=None, help="Keep BN statistics at their pretrained values.")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override any config key, e.g. --set optim.ema_decay=0.9999 --set run.tta_flip=true.")
def main(recipe, data_path, arch, epochs, batch_size, lr, resolution, loader, out, resume, precision, workers,
         compile_, seed, device, pretrained, finetune, freeze_bn, sets):
    """Train an image classifier; metrics, checkpoints and reports go to --out."""
    options = {"data.path": data_path, "model.arch": arch, "run.epochs": epochs, "data.batch_size": batch_size,
               "optim.lr": lr, "data.resolution": resolution, "data.val_resolution": resolution,
               "run.end_res": resolution,  # a progressive-resizing ramp ends at the final size
               "data.loader": loader, "run.out": out, "run.resume": resume, "precision.dtype": precision,
               "data.workers": workers, "model.compile": compile_, "run.seed": seed, "data.seed": seed,
               "run.device": device, "model.pretrained": pretrained, "model.finetune": finetune,
               "model.freeze_bn": freeze_bn}
    overrides = {k: v for k, v in options.items() if v is not None}
    try:
        overrides.update(parse_override(s) for s in sets)  # --set wins over the named options
        cfg = load_config(recipe, overrides)
        summary = train(cfg)
    except (ConfigError, CheckpointError, NonFiniteLoss) as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from None
    except Exception as exc:
        if type(exc).__name__ in ("ManifestError", "PretrainedError"):  # the message says what to do
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from None
        raise
    print_summary(summary)
    if "stopped" in summary:
        sys.exit(128 + int(summary["stopped"]))


if __name__ == "__main__":
    main()
