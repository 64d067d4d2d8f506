"""What a checkpoint holds (one typed definition) and the training state it is made from.

`Checkpoint` is the only description of a checkpoint's contents: the trainer writes one (`TrainState.capture`),
resume reads one (`TrainState.restore`), and `--pretrained`, export and predict read their weights and metadata
through `Checkpoint.from_dict` too. A new field is added here, once. On disk a checkpoint stays a plain dict of
tensors, numbers, strings and lists (`torch.load(weights_only=True)` reads it without unpickling code); the files
themselves (atomic writes, sha256 sidecars, rotation) are train/checkpoint.py's business.

Versions: 1 = written before loaders had a state (no "loaders" key): such a checkpoint resumes at its epoch
boundary (a mid-epoch one restarts the interrupted epoch, with a message); 2 = every rank's loader state.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from imt.pipeline.common import MEAN, STD
from imt.train.checkpoint import CheckpointError, check_compatible, describe, set_rng_state
from imt.train.ema import averaged_weights

VERSION = 2


@dataclass(frozen=True)
class Checkpoint:
    """A training checkpoint, or (optimizer, schedule, ... left empty) an exported model bundle."""
    model: dict[str, torch.Tensor]
    arch: str
    classes: list[str]
    model_kwargs: dict = field(default_factory=dict)  # model.kwargs: build_model(arch, kwargs=...) rebuilds it
    epoch: int = 0                 # epochs completed when saved
    step: int = 0                  # global optimizer steps done
    optimizer: dict = field(default_factory=dict)
    scaler: dict = field(default_factory=dict)
    schedule: dict = field(default_factory=dict)  # LRSchedule.state_dict(): step_count, steps_per_epoch, epochs
    ema: dict = field(default_factory=dict)       # train.ema.EMA state dict ({} without EMA)
    rng: list[dict] = field(default_factory=list)  # one per rank of the saving run
    loaders: list[dict] = field(default_factory=list)  # the training loader's state_dict(), one per rank
    best: dict = field(default_factory=lambda: {"val_top1": -1.0, "epoch": 0})
    world_size: int = 1
    config: dict = field(default_factory=dict)    # train.config.Config.to_dict() of the saving run
    resolution: int = 224          # what validation (and so inference) used: crop size ...
    resize_ratio: float = 0.875    # ... and shorter side = resolution / resize_ratio
    mean: list[float] = field(default_factory=lambda: list(MEAN))
    std: list[float] = field(default_factory=lambda: list(STD))
    version: int = VERSION

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict, source: str | Path = "checkpoint") -> "Checkpoint":
        """Read a loaded checkpoint or export bundle. Keys this code does not know are ignored; missing ones take
        their defaults, and a dict without "loaders" is a version 1 checkpoint (see the module docstring)."""
        if not isinstance(d, dict) or not isinstance(d.get("model"), dict) or "arch" not in d:
            raise CheckpointError(f"{source} is not a checkpoint of this project (no model/arch inside)")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        values.setdefault("classes", [])
        if "loaders" not in d:
            values["version"] = 1
        values["best"] = dict(values.get("best") or {"val_top1": -1.0, "epoch": 0})
        return cls(**values)

    @property
    def is_training(self) -> bool:
        """A trainer's checkpoint (resumable), not an export bundle."""
        return bool(self.optimizer) and bool(self.schedule)

    def weights(self, ema: bool = True) -> tuple[dict[str, torch.Tensor], str]:
        """(state dict, "EMA" or "raw"): the EMA weights when there are some and `ema` (they are what the run's
        evaluation reported), with AveragedModel's "module." prefix and counter removed."""
        if ema and self.ema:
            return averaged_weights(self.ema), "EMA"
        return dict(self.model), "raw"

    def bundle(self) -> dict[str, Any]:
        """The inference fields alone (what imt-export writes as model.pt)."""
        return {k: getattr(self, k)
                for k in ("model", "arch", "model_kwargs", "classes", "resolution", "resize_ratio", "mean", "std")}

    def meta(self) -> dict[str, Any]:
        """What export, predict and --pretrained report and use besides the weights."""
        return {"arch": self.arch, "model_kwargs": dict(self.model_kwargs), "classes": list(self.classes),
                "epoch": self.epoch,
                "resolution": self.resolution, "resize_ratio": self.resize_ratio, "mean": list(self.mean),
                "std": list(self.std), "config": self.config}


class TrainState:
    """Everything a resumed run needs to continue as if never stopped: model, optimizer, scaler, lr schedule,
    EMA, RNG states, best result so far, and where in the run it is. The loaders' states are passed in and out
    (the trainer owns the loaders)."""

    def __init__(self, model, optimizer, scaler, schedule, ema, say=print):
        self.model, self.optimizer, self.scaler, self.schedule, self.ema = model, optimizer, scaler, schedule, ema
        self.best: dict = {"val_top1": -1.0, "epoch": 0}
        self.epoch = 0  # epochs completed
        self.steps_done = 0  # optimizer steps over the whole run, across resumes
        self.say = say

    def capture(self, *, epoch: int, step: int, rngs: list[dict], loaders: list[dict], cfg, classes,
                world_size: int) -> Checkpoint:
        return Checkpoint(
            model=self.model.state_dict(), arch=cfg.model.arch, model_kwargs=dict(cfg.model.kwargs),
            classes=list(classes), epoch=epoch, step=step,
            optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(),
            schedule=self.schedule.state_dict(), ema=self.ema.state_dict() if self.ema is not None else {},
            rng=rngs, loaders=loaders, best=dict(self.best), world_size=world_size, config=cfg.to_dict(),
            resolution=cfg.data.val_resolution, resize_ratio=cfg.data.val_resize_ratio)

    def restore(self, ckpt: Checkpoint, path: Path, cfg, classes, rank: int, world_size: int) -> None:
        """Load the checkpoint's model, optimizer (this run's hyperparameters win), scaler, EMA, best and this
        rank's RNG state. The schedule position and the loaders are the trainer's to set (they depend on where
        in the epoch the checkpoint was taken and on the number of ranks)."""
        if not ckpt.is_training:
            raise CheckpointError(f"{path} holds weights only (an export or a state dict), not a training run "
                                  "to continue: start from it with --pretrained instead of --resume")
        check_compatible(ckpt.to_dict(), cfg.model.arch, classes, str(path), kwargs=cfg.model.kwargs)
        saved = ckpt.config.get("optim", {}).get("optimizer", "sgd")  # its state means nothing to another one
        if saved != cfg.optim.optimizer:
            raise CheckpointError(f"{path} was trained with optim.optimizer={saved}, this run asks for "
                                  f"{cfg.optim.optimizer}: resume with --set optim.optimizer={saved}, or start a "
                                  "fresh --out")
        optimizer = self.optimizer
        configured = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
                      for g in optimizer.param_groups]
        try:
            self.model.load_state_dict(ckpt.model)
            optimizer.load_state_dict(ckpt.optimizer)  # parameter groups differ: another --finetune / freezing
            self.scaler.load_state_dict(ckpt.scaler)
            if self.ema is not None and ckpt.ema:
                self.ema.load_state_dict(ckpt.ema)
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(
                f"{path} does not fit this run ({describe(e)}). It was saved "
                "by another configuration (model, fine-tuning mode, optimizer groups): resume with the settings "
                "it was made with (its config.json), or start a fresh --out") from e
        # load_state_dict brings back the saved hyperparameters; this run's config (saved as its config.json) wins.
        changed = sorted({f"{k} {g[k]} -> {want[k]}" for g, want in zip(optimizer.param_groups, configured)
                          for k in want if g.get(k) != want[k]})
        for g, want in zip(optimizer.param_groups, configured):
            g.update(want)
        if changed:
            self.say(f"resume: this run's optimizer settings replace the checkpoint's: {', '.join(changed)}")
        rngs = ckpt.rng  # one per rank of the saving run
        if rngs:
            set_rng_state(rngs[rank] if len(rngs) == world_size else rngs[0])
        self.best = dict(ckpt.best)
        self.epoch, self.steps_done = ckpt.epoch, ckpt.step
