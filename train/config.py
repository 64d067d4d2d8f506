"""The run's configuration: frozen dataclasses by concern, loaded from a YAML recipe, overridden from the
command line, checked, resolved for the machine, and saved as `<out>/config.json` with the run.

    cfg = load_config("resnet50_fast", {"data.path": "/data/shards", "run.epochs": 16})

A recipe is YAML with one mapping per section (`data`, `model`, `optim`, `precision`, `run`); any key left
out keeps the default below. Unknown sections or keys are refused with the valid names, so a typo never
silently trains with a default.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import json
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from imt.pipeline.augment import check as augment_problems
from imt.pipeline.config import DataConfig

RECIPES = importlib.resources.files("imt.recipes")  # recipes/*.yaml: package data of the wheel, or the checkout's
SCHEDULES = ("cosine", "step", "linear")
PRECISIONS = ("auto", "bfloat16", "float16", "float32")
FINETUNE_MODES = ("full", "linear")
OPTIMIZERS = ("sgd", "adamw", "lars", "lamb")


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names the key and the valid choices."""


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "resnet50"            # a torchvision classification model name (torchvision.models.list_models),
    #                                   or timm:<name> for one of timm's (timm.list_models())
    # Keyword arguments for the model's constructor (timm's train.py --model-kwargs), e.g. a narrower timm ResNet:
    # {channels: [32, 64, 128, 256], stem_width: 32}. Saved in checkpoints and exports with the weights.
    kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None     # checkpoint / state dict / "torchvision:<arch>" (see train.transfer)
    finetune: str = "full"            # with pretrained: full (everything trains) | linear (probe: head only)
    freeze_bn: bool = False           # keep BN running statistics at their pretrained values (small data)
    zero_init_residual: bool = True   # last BN gamma of each residual block = 0: every block starts as identity
    compile: bool = False             # torch.compile the model (first steps are slow while it compiles)
    # SyncBatchNorm across ranks (small per-GPU batches); needs CUDA. Not free: besides an all-gather per BN
    # layer, torch's SyncBatchNorm forward syncs the host once per BN layer (it drops empty ranks' statistics
    # with a boolean mask, whose result size the host must read: torch/nn/modules/_functions.py,
    # pytorch#78549), so 53 host syncs per ResNet-50 step. The cost on a GPU is not measured yet.
    sync_bn: bool = False


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 0.1                   # peak learning rate per 256 images of *global* batch (Goyal et al.)
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-5
    no_bn_bias_decay: bool = True     # no weight decay on BN parameters and biases (1-d tensors)
    label_smoothing: float = 0.1
    warmup_epochs: float = 5.0        # linear warm-up from ~0 to the peak, per iteration
    schedule: str = "cosine"          # after warm-up: cosine | step | linear (to zero)
    milestones: tuple[int, ...] = (30, 60, 80)  # step schedule: epochs where lr *= gamma
    gamma: float = 0.1
    ema_decay: float = 0.0            # EMA of the weights, per step (0 = off); eval then uses the EMA
    backbone_lr_mult: float = 1.0     # lr multiplier for everything but the classifier (fine-tuning)
    # Optimizer (train.model.build_optimizer): sgd (momentum, nesterov) | adamw | lars (LARS, You et al. 2017:
    # DLE and MLPerf ResNet-50 at global batch 3,200+) | lamb (You et al. 2019); lars/lamb from timm.optim.
    optimizer: str = "sgd"
    betas: tuple[float, ...] = (0.9, 0.999)  # adamw, lamb
    grad_clip: float = 0.0            # clip the global gradient norm to this (0 = off); unscaled first under fp16
    grad_accum: int = 1               # batches per optimizer step: global batch = batch x ranks x grad_accum
    mixup: float = 0.0                # mixup Beta alpha (0 = off; torchvision's references: 0.2), train.mix
    cutmix: float = 0.0               # cutmix Beta alpha (0 = off; torchvision's references: 1.0)


@dataclass(frozen=True)
class PrecisionConfig:
    # auto: bfloat16 on GPUs that support it, float16 (with a gradient scaler) on older GPUs; on the CPU
    # bfloat16 only where it has native bf16 (AVX512-BF16/AMX), else float32. Measured on this project's
    # 2-core AMD EPYC without AVX512-BF16: ResNet-18, 64 px, batch 64, one SGD step 0.77 s in float32 vs
    # 11.6 s under bfloat16 autocast (emulated), so "auto" must not pick bf16 there.
    dtype: str = "auto"


@dataclass(frozen=True)
class RunConfig:
    epochs: int = 90
    out: str = "runs/default"
    resume: str = ""                  # "" (fresh) | "auto" (newest valid checkpoint in out) | path
    seed: int = 0
    deterministic: bool = False       # deterministic kernels, no cudnn autotuning (slower)
    device: str = "auto"              # auto | cpu | cuda
    log_every: int = 50               # steps between host syncs (loss over ranks, NaN check, progress)
    keep_last: int = 3                # periodic checkpoints kept (best.pt is kept besides)
    # epochs between evaluations; the last epoch is always evaluated, and 0 evaluates only the last. Not free on
    # small data: Imagenette's 1,500 val images with tta_flip took 13-35% of a 4,000-image epoch's training time
    # on the CPU (RESULTS.md, "CPU learning recipe and DALI-vs-torch agreement (issue 14)").
    eval_every: int = 1
    # Progressive resizing (FFCV): the training resolution rises linearly from start_res to end_res between
    # epochs ramp_start and ramp_end, rounded to res_step. start_res 0 = off (data.resolution throughout);
    # end_res 0 = data.resolution.
    start_res: int = 0
    end_res: int = 0
    ramp_start: int = 0
    ramp_end: int = 0
    res_step: int = 32
    tta_flip: bool = False            # evaluation averages the logits of the image and its mirror
    tensorboard: bool = True
    max_steps_per_epoch: int = 0      # cap on steps per epoch (0 = the whole epoch); smoke tests, profiling
    # torch intra-op threads per rank; 0 = auto (resolve): this rank's share of the usable cores minus the loader's
    # data.workers, at least 1. torch's default (every core) makes its OpenMP threads spin against the loader's
    # threads and other jobs: measured on 2 contended cores, ResNet-18 at 112 px, 16 img/s with torch's default
    # against 112 with one thread (issue 15).
    threads: int = 0


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")


SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig,
                             "precision": PrecisionConfig, "run": RunConfig}


def _coerce(section: str, key: str, hint: Any, value: Any) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or say what was expected."""
    where = f"{section}.{key}"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # X | None
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    try:
        if origin is dict:  # a mapping of keyword arguments: YAML values as they are
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise TypeError
            return dict(value)
        if origin is tuple:
            if isinstance(value, str):
                value = yaml.safe_load(f"[{value.strip('[]()')}]")
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return tuple(_coerce(section, key, args[0], v) for v in value)
        if hint is bool:
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
                return value.lower() in ("true", "yes", "1", "on")
            if not isinstance(value, bool):
                raise TypeError
            return value
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if hint is str:
            if isinstance(value, (dict, list)):
                raise TypeError
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{where}: expected {name}, got {value!r}")


def _section(name: str, cls: type, values: dict) -> Any:
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    for key in values:
        if key not in hints:
            raise ConfigError(f"unknown key {name}.{key}; valid keys in [{name}]: {', '.join(valid)}")
    return cls(**{k: _coerce(name, k, hints[k], v) for k, v in values.items()})


def recipe_names() -> list[str]:
    """The recipes shipped with the package (recipes/*.yaml)."""
    return sorted(p.name[:-5] for p in RECIPES.iterdir() if p.name.endswith(".yaml"))


def recipe_path(recipe: str | Path) -> Path:
    """A YAML file, or the name of one in recipes/ (with or without .yaml)."""
    path = Path(recipe)
    if path.is_file():
        return path
    named = RECIPES / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if named.is_file() and path.parent == Path("."):
        return named
    known = recipe_names()
    raise ConfigError(f"recipe {recipe!r} not found: give a YAML path or one of {', '.join(known)}")


def parse_override(item: str) -> tuple[str, Any]:
    """`section.key=value` (value parsed as YAML: 0.1, true, [30, 60], null) -> ("section.key", value)."""
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. optim.lr=0.2")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(recipe: str | Path | None = None, overrides: dict[str, Any] | None = None,
                overlays: tuple[str | Path, ...] = ()) -> Config:
    """Defaults <- recipe YAML <- overlay YAMLs (e.g. imt-tune's, `imt-train --tune FILE`) <- overrides
    {"section.key": value}; then checked."""
    raw: dict[str, dict] = {name: {} for name in SECTIONS}
    for path in ([recipe_path(recipe)] if recipe else []) + [Path(o) for o in overlays]:
        if not path.is_file():
            raise ConfigError(f"{path}: no such file (an overlay written by imt-tune, or any YAML of sections)")
        doc = yaml.safe_load(path.read_text()) or {}
        if not isinstance(doc, dict):
            raise ConfigError(f"{path}: expected a mapping of sections ({', '.join(SECTIONS)})")
        for name, values in doc.items():
            if name not in SECTIONS:
                raise ConfigError(f"{path}: unknown section {name!r}; valid sections: {', '.join(SECTIONS)}")
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section {name!r} must be a mapping of key: value")
            raw[name].update(values)
    for dotted, value in (overrides or {}).items():
        name, _, key = dotted.partition(".")
        if name not in SECTIONS or not key:
            raise ConfigError(f"unknown override {dotted!r}: expected section.key with section one of "
                              f"{', '.join(SECTIONS)}")
        raw[name][key] = value
    cfg = Config(**{name: _section(name, cls, raw[name]) for name, cls in SECTIONS.items()})
    validate(cfg)
    return cfg


def from_dict(doc: dict) -> Config:
    """Rebuild a Config from `to_dict()` output (config.json, a checkpoint's "config")."""
    return Config(**{name: _section(name, cls, dict(doc.get(name, {}))) for name, cls in SECTIONS.items()})


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def validate(cfg: Config) -> None:
    from imt.pipeline import LOADERS

    d, m, o, p, r = cfg.data, cfg.model, cfg.optim, cfg.precision, cfg.run
    _check(d.loader in LOADERS, f"data.loader={d.loader!r}: expected one of {', '.join(LOADERS)}")
    _check(d.loader == "synthetic" or bool(d.path),
           f"data.path is empty: pass --data <folder written by imt-make-shards> (or --loader synthetic)")
    _check(m.finetune in FINETUNE_MODES, f"model.finetune={m.finetune!r}: expected one of {', '.join(FINETUNE_MODES)}")
    # On --resume the checkpoint's config supplies them (train.transfer.finetune_of_checkpoint checks again).
    _check(m.pretrained or r.resume or (m.finetune == "full" and not m.freeze_bn),
           "model.finetune=linear and model.freeze_bn need pretrained weights: pass --pretrained <checkpoint, "
           "state dict or torchvision:<arch>>")
    # SyncBatchNorm modules replace the frozen ones (convert_sync_batchnorm builds fresh modules), so the
    # pretrained statistics would quietly start updating again.
    _check(not (m.sync_bn and (m.freeze_bn or m.finetune == "linear")),
           "model.sync_bn with frozen BN statistics (--freeze-bn or --finetune linear): frozen statistics are "
           "never synchronised, so SyncBN does nothing there and would unfreeze them; drop model.sync_bn")
    _check(not d.verify or d.loader in ("dali", "torch"), f"data.verify checks shards; loader {d.loader!r} reads "
           "none (drop --verify, or make shards with imt-make-shards and use --loader dali or torch)")
    _check(d.batch_size > 0, f"data.batch_size={d.batch_size}: must be positive")
    _check(d.cache_limit >= 0, f"data.cache_limit={d.cache_limit}: GiB of shards kept from a --data URL, 0 = no limit")
    _check(d.workers >= 0, f"data.workers={d.workers}: loader threads/processes per rank, 0 or more (torch: 0 "
                           "loads in the training process)")
    _check(d.resolution >= 16 and d.val_resolution >= 16, "data.resolution/val_resolution: at least 16 px")
    _check(p.dtype in PRECISIONS, f"precision.dtype={p.dtype!r}: expected one of {', '.join(PRECISIONS)}")
    _check(o.schedule in SCHEDULES, f"optim.schedule={o.schedule!r}: expected one of {', '.join(SCHEDULES)}")
    _check(o.lr > 0, f"optim.lr={o.lr}: must be positive")
    _check(o.backbone_lr_mult >= 0, f"optim.backbone_lr_mult={o.backbone_lr_mult}: must be >= 0 (0 freezes the "
                                    "backbone's weights; --finetune linear also freezes BN statistics)")
    _check(0.0 <= o.momentum < 1.0, f"optim.momentum={o.momentum}: expected in [0, 1)")
    _check(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay}: must be >= 0")
    problems = augment_problems(d)
    _check(not problems, "; ".join(problems))
    _check(0.0 < d.min_area <= 1.0, f"data.min_area={d.min_area}: the crop's area fraction, in (0, 1]")
    _check(0.0 < d.val_resize_ratio <= 1.0, f"data.val_resize_ratio={d.val_resize_ratio}: crop / resized size, "
                                            "in (0, 1] (0.875: resize to 256, crop 224)")
    _check(0.0 <= o.ema_decay < 1.0, f"optim.ema_decay={o.ema_decay}: expected 0 (off) or in (0, 1)")
    _check(0.0 <= o.label_smoothing < 1.0, f"optim.label_smoothing={o.label_smoothing}: expected in [0, 1)")
    _check(o.warmup_epochs >= 0, f"optim.warmup_epochs={o.warmup_epochs}: must be >= 0")
    _check(o.optimizer in OPTIMIZERS, f"optim.optimizer={o.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
    _check(len(o.betas) == 2 and all(0.0 <= b < 1.0 for b in o.betas),
           f"optim.betas={list(o.betas)}: expected two values in [0, 1), e.g. [0.9, 0.999]")
    _check(o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip}: 0 (off) or the largest gradient norm, e.g. 1.0")
    _check(o.grad_accum >= 1, f"optim.grad_accum={o.grad_accum}: batches per optimizer step, at least 1")
    _check(o.mixup >= 0 and o.cutmix >= 0, f"optim.mixup={o.mixup}, optim.cutmix={o.cutmix}: Beta alphas, 0 (off) "
                                           "or positive (torchvision's references: mixup 0.2, cutmix 1.0)")
    _check(r.epochs > 0, f"run.epochs={r.epochs}: must be positive")
    _check(r.max_steps_per_epoch >= 0, f"run.max_steps_per_epoch={r.max_steps_per_epoch}: 0 (whole epochs) or "
                                       "a positive cap")
    _check(r.log_every > 0 and r.keep_last > 0, "run.log_every and run.keep_last must be positive")
    _check(r.eval_every >= 0, f"run.eval_every={r.eval_every}: epochs between evaluations, or 0 for the last only")
    _check(r.device in ("auto", "cpu", "cuda"), f"run.device={r.device!r}: expected auto, cpu or cuda")
    _check(r.res_step > 0, f"run.res_step={r.res_step}: must be positive")
    _check(r.threads >= 0, f"run.threads={r.threads}: 0 (auto) or a positive number of torch threads")
    if r.start_res:
        _check(r.ramp_end >= r.ramp_start, f"run.ramp_end={r.ramp_end} < run.ramp_start={r.ramp_start}")
    from imt.train.model import fixed_input_size, known_arch
    _check(known_arch(m.arch), f"model.arch={m.arch!r} is neither a torchvision classification model (e.g. "
                               "resnet18, resnet50, vgg16_bn, densenet121, inception_v3: "
                               "torchvision.models.list_models(module=torchvision.models)) nor timm:<name> with a "
                               "name from timm.list_models() (e.g. timm:resnet18)")
    if fixed := fixed_input_size(m.arch):
        check_input_size(cfg, fixed, "torchvision builds it for that size")


def used_resolutions(cfg: Config) -> list[int]:
    """Every image size a run feeds the model: training (with the progressive ramp's ends) and validation."""
    d, r = cfg.data, cfg.run
    ramp = {r.start_res, r.end_res or d.resolution} if r.start_res else set()
    return sorted({d.resolution, d.val_resolution} | ramp)


def check_input_size(cfg: Config, fixed: int | tuple[int, int], why: str, other: str = "") -> None:
    """ConfigError unless every size the run uses is `fixed`, the one size the model takes (`why`; `other`: a
    further way out, after the resolution one)."""
    h, w = (fixed, fixed) if isinstance(fixed, int) else fixed
    used = used_resolutions(cfg)
    fix = (f"pass --resolution {h} and no progressive resizing (run.start_res=0)" if h == w
           else "this trainer feeds square images")
    _check(used == [h] and h == w, f"model.arch={cfg.model.arch} takes {h}x{w} px images only ({why}), but this "
                                   f"run uses {', '.join(map(str, used))} px: {fix}{other}")


def cuda_bf16_native(device: "torch.device") -> bool:  # noqa: F821
    """True where the GPU runs bfloat16 natively (compute capability >= 8: A100, H100, ...). Plain
    `torch.cuda.is_bf16_supported()` also says True on V100/T4, where bf16 is emulated through fp32 and
    far slower than fp16 + GradScaler; `including_emulation=False` (torch >= 2.3) excludes that, and
    older torch falls back to the capability check that function makes itself."""
    import torch

    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.3: no including_emulation argument
        return torch.cuda.get_device_capability(device)[0] >= 8


def resolve(cfg: Config, device: "torch.device", local_ranks: int = 1) -> Config:  # noqa: F821
    """Make the machine-dependent choices concrete (precision "auto", run.threads 0 for `local_ranks` ranks on
    this node: DistInfo.local_world_size) and keep the loader's output dtype equal to the compute dtype, so
    config.json says exactly what ran."""
    import torch

    dtype = cfg.precision.dtype
    if dtype == "auto":
        if device.type == "cuda":
            dtype = "bfloat16" if cuda_bf16_native(device) else "float16"
        else:
            dtype = "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"
    if dtype == "float16" and device.type != "cuda":
        raise ConfigError("precision.dtype=float16 needs a CUDA device; use bfloat16 or float32 on the CPU")
    # A compiled model would recompile for the partial last batch (train.model.compile_model): drop it.
    drop_last = cfg.data.drop_last or cfg.model.compile
    run = replace(cfg.run, threads=cfg.run.threads or auto_threads(cfg.data, local_ranks))
    return replace(cfg, precision=replace(cfg.precision, dtype=dtype),
                   data=replace(cfg.data, dtype=dtype, drop_last=drop_last), run=run)


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, as taskset and Slurm set it)."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def auto_threads(data: DataConfig, local_ranks: int = 1) -> int:
    """run.threads=0: this rank's share of the usable cores (`local_ranks` ranks on this node) minus the loader's
    workers (DALI threads or DataLoader processes, which decode on those cores), at least 1; the synthetic loader
    uses no cores, so it leaves them all."""
    share = max(1, usable_cores() // max(1, local_ranks))
    return share if data.loader == "synthetic" else max(1, share - max(0, data.workers))
