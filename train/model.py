"""Models: any torchvision classification model by name, in channels-last, plus the pieces of the recipe
that live on the model (zero-init residuals, SyncBN, compile, optimizer parameter groups)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

# Auxiliary-classifier weights in the loss (torchvision's references: Inception v3 0.4, GoogLeNet 0.3).
AUX_WEIGHT = {"inception_v3": 0.4, "googlenet": 0.3}


TIMM = "timm:"  # model.arch prefix: a model from timm's registry (timm.list_models()) instead of torchvision's


def known_arch(arch: str) -> bool:
    """A torchvision classification model name, or timm:<name> of a model timm can build."""
    if arch.startswith(TIMM):
        import timm

        return timm.is_model(arch[len(TIMM):])
    return arch in torchvision.models.list_models(module=torchvision.models)


def build_model(arch: str, num_classes: int, *, zero_init_residual: bool = False,
                kwargs: dict | None = None) -> nn.Module:
    """A randomly initialised model with a `num_classes` head (on the CPU, float32): torchvision's `arch`, or
    timm's for `timm:<name>`. `kwargs` go to the model's constructor (model.kwargs, as timm's own train.py
    --model-kwargs), e.g. timm ResNets' `channels` and `stem_width` for a narrower network."""
    kwargs = dict(kwargs or {})
    if arch in ("inception_v3", "googlenet"):
        kwargs.setdefault("init_weights", True)  # torchvision warns when left implicit
    if not known_arch(arch):
        raise ValueError(f"unknown model {arch!r}: use a name from torchvision.models.list_models(module="
                         "torchvision.models), or timm:<name> with a name from timm.list_models()")
    try:
        if arch.startswith(TIMM):
            model = _build_timm(arch[len(TIMM):], num_classes, zero_init_residual, kwargs)
        else:
            model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    except TypeError as exc:  # a keyword the constructor does not take
        raise ValueError(f"model.kwargs {kwargs} do not fit {arch}: {exc}. Give only its constructor's arguments "
                         "(--set 'model.kwargs={}' clears a recipe's)") from exc
    if zero_init_residual:
        zero_init_last_bn(model)
    return model


def _build_timm(name: str, num_classes: int, zero_init_residual: bool, kwargs: dict) -> nn.Module:
    """timm.create_model without pretrained weights. timm's residual networks zero their blocks' last BN
    themselves (zero_init_last=True by default); model.zero_init_residual=false is passed on as
    zero_init_last=False to the models that take it."""
    import timm

    if not zero_init_residual and "zero_init_last" not in kwargs:
        try:
            return timm.create_model(name, pretrained=False, num_classes=num_classes, zero_init_last=False, **kwargs)
        except TypeError as exc:
            if "zero_init_last" not in str(exc):
                raise
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


def fixed_input_size(arch: str) -> int | None:
    """The one input size a model takes, for those torchvision builds for a single size when no weights are
    given: ViTs (position embeddings; `_vision_transformer` defaults image_size to 224) and MaxViT (attention
    grids; `_maxvit` defaults input_size to (224, 224)). Checked with torchvision 0.29: vit_b_16 at 64 px
    fails with "Wrong image height! Expected 224 but got 64!", maxvit_t at 64 and 256 px with a reshape error.
    None: any size works."""
    return 224 if arch.startswith(("vit_", "maxvit_")) else None


def built_input_size(model: nn.Module) -> int | tuple[int, int] | None:
    """The one input size a built model takes: timm's patch-embedding models (ViT, DeiT, BEiT, EVA, Swin, ...)
    check it at every forward (PatchEmbed.strict_img_size; `dynamic_img_size=True` turns that off). An int for
    a square size. None: any size works (or the model is not built on timm's PatchEmbed)."""
    for m in model.modules():
        size = getattr(m, "img_size", None)
        if getattr(m, "strict_img_size", False) and size is not None:
            h, w = (size, size) if isinstance(size, int) else tuple(size)
            return h if h == w else (h, w)
    return None


def zero_init_last_bn(model: nn.Module) -> int:
    """Zero the last BN gamma of each ResNet-style block so each residual branch starts as the identity
    (Goyal et al. 2017): torchvision's BasicBlock/Bottleneck, and timm's blocks through their own
    `zero_init_last()`. Returns how many blocks were found (0 for non-residual models)."""
    n = 0
    for m in model.modules():
        bn = m.bn3 if isinstance(m, Bottleneck) else m.bn2 if isinstance(m, BasicBlock) else None
        if bn is not None:
            nn.init.zeros_(bn.weight)
            n += 1
        elif callable(getattr(m, "zero_init_last", None)):
            m.zero_init_last()
            n += 1
    return n


def prepare(model: nn.Module, device: torch.device, *, sync_bn: bool = False, distributed: bool = False) -> nn.Module:
    """Move to the device in channels-last (NHWC: the layout tensor cores and oneDNN convolutions want)."""
    if sync_bn and distributed:
        if device.type != "cuda":
            raise ValueError("model.sync_bn needs CUDA devices (torch's SyncBatchNorm has no CPU/gloo path); "
                             "set model.sync_bn=false for CPU runs")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(device, memory_format=torch.channels_last)


def loss_function(arch: str, label_smoothing: float):
    """Cross-entropy on the logits; for Inception/GoogLeNet in training mode (which return a namedtuple
    with auxiliary logits) the auxiliary losses are added with torchvision's reference weights."""
    ce = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    aux_weight = AUX_WEIGHT.get(arch, 0.0)

    def loss_fn(output, labels: torch.Tensor) -> torch.Tensor:
        if isinstance(output, torch.Tensor):
            return ce(output, labels)
        logits, *aux = output  # InceptionOutputs(logits, aux_logits) / GoogLeNetOutputs(logits, aux2, aux1)
        loss = ce(logits, labels)
        for a in aux:
            if a is not None:
                loss = loss + aux_weight * ce(a, labels)
        return loss

    return loss_fn


def param_groups(model: nn.Module, weight_decay: float, *, no_bn_bias_decay: bool = True,
                 head_names: tuple[str, ...] | list[str] = (), backbone_lr_mult: float = 1.0) -> list[dict]:
    """Optimizer groups: {backbone, head} x {decay, no decay}. 1-d tensors (BN gamma/beta, biases) get no
    weight decay when `no_bn_bias_decay` (decaying BN scales only fights the normalisation). Parameters
    under `head_names` (module names, e.g. train.transfer.head_names(model)) keep the full lr; the rest is
    scaled by `backbone_lr_mult`. Each group carries `lr_mult` for the schedule. Frozen parameters are left
    out. Empty groups are dropped."""
    heads = tuple(f"{h}." for h in head_names)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (bool(heads) and name.startswith(heads), not (no_bn_bias_decay and p.ndim <= 1))
        groups.setdefault(key, []).append(p)
    out = []
    for (is_head, decay), params in sorted(groups.items()):
        out.append({"params": params, "weight_decay": weight_decay if decay else 0.0,
                    "lr_mult": 1.0 if (is_head or not heads) else backbone_lr_mult,
                    "name": f"{'head' if is_head else 'backbone'}{'' if decay else '_no_decay'}"})
    if not out:
        raise ValueError("the model has no trainable parameters")
    return out


def build_optimizer(o, groups: list[dict], fused: bool = False) -> torch.optim.Optimizer:
    """The optimizer `o.optimizer` (a train.config.OptimConfig) over `groups` (param_groups: each carries its
    weight decay; the schedule sets each group's lr before every step, so the lr given here is a start value).
    sgd: momentum, Nesterov. adamw: decoupled weight decay. lars (timm.optim.Lars, trust coefficient 0.001
    as DLE's and MLPerf's ResNet-50): the layer-wise trust ratio applies only to groups with weight decay, so
    BN and biases (no_bn_bias_decay) are excluded as in those references. lamb (timm.optim.Lamb): its own
    gradient-norm clip is off (max_grad_norm=None); optim.grad_clip is the one clip, in train.loop.
    `fused` (CUDA): torch's fused SGD/AdamW kernels take GradScaler's found_inf on the device; the plain ones
    make the scaler read it on the host (found_inf.item()) every fp16 step. The CPU keeps the plain path."""
    fused = fused or None  # None: torch's default implementation choice
    if o.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0,
                               fused=fused)
    if o.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), fused=fused)
    from timm.optim import Lamb, Lars

    if o.optimizer == "lars":
        return Lars(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0, trust_coeff=0.001)
    if o.optimizer == "lamb":
        return Lamb(groups, lr=o.lr, betas=tuple(o.betas), max_grad_norm=None)
    raise ValueError(f"optim.optimizer={o.optimizer!r}: expected sgd, adamw, lars or lamb")


@dataclass(frozen=True)
class StepParts:
    """What train.loop.train_step needs besides the model and the batch, built once per run."""
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: torch.autocast
    loss_fn: Callable


def build_step_parts(cfg, model: nn.Module, device: torch.device, heads: tuple[str, ...] | list[str] = ()) -> StepParts:
    """optim.optimizer over `param_groups` (no decay on BN/bias; `heads` keep the full lr, the backbone gets
    optim.backbone_lr_mult), and one precision code path: `autocast` enabled for bf16/fp16, a GradScaler
    that is a no-op unless fp16 (bf16 has fp32's exponent range). `cfg` is a resolved train.config.Config.
    The trainer and the benchmarks both build their step here, so they measure the same thing."""
    from imt.pipeline.common import torch_dtype

    o, dtype = cfg.optim, cfg.precision.dtype
    optimizer = build_optimizer(o, param_groups(model, o.weight_decay, no_bn_bias_decay=o.no_bn_bias_decay,
                                                head_names=heads, backbone_lr_mult=o.backbone_lr_mult),
                                fused=device.type == "cuda")
    return StepParts(optimizer=optimizer,
                     scaler=torch.amp.GradScaler(device.type, enabled=dtype == "float16"),
                     autocast=torch.autocast(device.type, dtype=torch_dtype(dtype), enabled=dtype != "float32"),
                     loss_fn=loss_function(cfg.model.arch, o.label_smoothing))


def compile_model(model: nn.Module, shapes: int = 1, **kwargs) -> nn.Module:
    """torch.compile for training, one static graph per input shape.

    With torch's default `dynamic=None` the second input shape makes dynamo recompile with symbolic shapes,
    and that one graph then serves every later shape: the full batches too, with kernels generated for an
    unknown size. The shapes a training run presents, case by case:
    - the partial last batch and DaliLoader's split batch: gone, compiled training drops the partial last batch
      (train.config.resolve sets data.drop_last), so every batch has the full size;
    - progressive resizing: a new resolution is a new shape; `dynamic=False` gives each its own static graph
      (one compile per resolution, a handful per run), and the recompile limit (8 in torch 2.x) is raised to
      `shapes`, the number of distinct resolutions, so no resolution falls back to eager;
    - evaluation: runs the uncompiled module (train.trainer passes it), so its partial batches compile nothing.
    tests/train/test_model.py counts the graphs."""
    import torch._dynamo.config as dynamo

    name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"  # renamed in torch 2.6
    setattr(dynamo, name, max(getattr(dynamo, name), shapes))
    return torch.compile(model, dynamic=False, **kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`), whose state-dict keys carry
    no wrapper prefixes."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
