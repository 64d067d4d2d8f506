"""Transfer learning: load pretrained weights into a freshly built model, replace the classifier,
and choose what trains (linear probe, full fine-tuning, frozen BN statistics).

Sources `--pretrained` accepts:
- one of our checkpoints (a dict with a "model" state dict, an "arch" and "classes"),
- a plain torchvision-format state dict file, such as the official `resnet50-11ad3fa6.pth`,
- checkpoints of other tools, for torchvision architectures: timm's train.py (`state_dict`, `state_dict_ema`,
  `args`), Lightning (`state_dict` with the LightningModule's attribute as prefix, e.g. `model.`), torchvision's
  reference scripts (`model`, `model_ema`, `args`); see `_FOREIGN`,
- `torchvision:<arch>` or `torchvision:<WeightsEnum>.<NAME>` (e.g. `torchvision:ResNet50_Weights.IMAGENET1K_V2`):
  taken from the torch hub cache only. Clusters often have no internet, so nothing is downloaded; a missing
  file stops the run with its URL and the path to put it at.

Every file is read with `torch.load(weights_only=True)`: nothing in it is unpickled as code. The one class
allowed besides torch's tensors and containers is `argparse.Namespace` (the `args` that timm's and torchvision's
training scripts save): building one runs no code of the file. Anything else is refused with the names of the
classes and how to convert the file. Every key that
does not fit is reported by name (replaced classifier, missing, unexpected, shape mismatch), never dropped
silently.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torchvision
from torch import nn

from imt.train.checkpoint import CheckpointError, read_tensors, refuse_nonfinite, verify_sidecar
from imt.train.ema import averaged_weights
from imt.train.state import Checkpoint

# Prefixes that wrappers add to parameter names: DDP and EMA wrappers ("module.") and torch.compile
# ("_orig_mod."). A LightningModule's attribute name ("model.", "net.", ...) is found by `_submodule`.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# Other tools' checkpoints: (format, key of the EMA weights, key of the raw weights, key that marks the format).
# timm: timm/utils/checkpoint_saver.py (+ "args": argparse.Namespace); Lightning: "pytorch-lightning_version"
# and "state_dict"; torchvision references/classification/train.py: "model", "model_ema" (an AveragedModel:
# "module." + "n_averaged"), "args". Without the marker, "state_dict" or "model" alone still unwraps.
_FOREIGN = (("timm", "state_dict_ema", "state_dict", "version"),
            ("Lightning", None, "state_dict", "pytorch-lightning_version"),
            ("torchvision references", "model_ema", "model", "args"),
            ("checkpoint", "state_dict_ema", "state_dict", None),
            ("checkpoint", "model_ema", "model", None))
_SAFE_CLASSES = (argparse.Namespace,)


class PretrainedError(ValueError):
    """A pretrained source that cannot be used; the message says what to do."""


@dataclass(frozen=True)
class TransferReport:
    source: str
    loaded: tuple[str, ...]
    replaced: tuple[str, ...]    # classifier keys re-initialised for the new classes
    missing: tuple[str, ...]     # in the model, not in the source: left at their initial values
    unexpected: tuple[str, ...]  # in the source, not in the model: not used
    mismatched: tuple[str, ...] = field(default=())  # same name, other shape, outside the classifier

    def lines(self) -> list[str]:
        out = [f"pretrained {self.source}: {len(self.loaded)} tensors loaded"]
        for label, keys in (("classifier replaced (new classes)", self.replaced),
                            ("missing from the source (kept at init)", self.missing),
                            ("unexpected in the source (ignored)", self.unexpected),
                            ("shape mismatch (kept at init)", self.mismatched)):
            if keys:
                out.append(f"  {label}: {', '.join(keys)}")
        return out


def head_names(model: nn.Module) -> list[str]:
    """Qualified names of the classifier Linear layers: the last Linear (torchvision's fc / classifier[-1] /
    heads.head) plus the auxiliary classifiers' output layers, if any (Inception's AuxLogits.fc, GoogLeNet's
    aux1.fc2 and aux2.fc2: the Linear layers there with as many outputs as the model has classes)."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise PretrainedError(f"{type(model).__name__} has no Linear classifier to replace")
    last, last_module = linears[-1]
    return [last] + [n for n, m in linears if n != last and n.startswith(("AuxLogits.", "aux"))
                     and m.out_features == last_module.out_features]


def _strip(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        for p in _WRAPPER_PREFIXES:
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def _hub_file(spec: str, arch: str) -> Path:
    """Resolve `torchvision:<arch>` / `torchvision:<Enum>.<NAME>` to the file in the hub cache."""
    name = spec.split(":", 1)[1] or arch
    try:
        if "." in name:
            weights = torchvision.models.get_weight(name)
        else:
            weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError) as exc:
        raise PretrainedError(f"unknown torchvision weights {name!r} ({exc}); use e.g. "
                              f"'torchvision:{arch}' or 'torchvision:ResNet50_Weights.IMAGENET1K_V2'") from exc
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not path.is_file():
        raise PretrainedError(
            f"torchvision weights {weights} are not in the torch hub cache and nothing is downloaded here. "
            f"Fetch {weights.url} on a machine with internet and copy it to {path} "
            f"(or pass --pretrained /path/to/{path.name}).")
    return path


def read_state(source: str | Path, arch: str = "", ema: bool = True) -> tuple[dict, dict]:
    """Return (state_dict, metadata) from a checkpoint, a state-dict file or a hub-cache name. Of our
    checkpoints, the EMA weights when it has them and `ema` (they are what its evaluation reported;
    metadata["weights"] says which were taken)."""
    src = str(source)
    path = _hub_file(src, arch) if src.startswith("torchvision:") else Path(src)
    if not path.is_file():
        raise PretrainedError(f"--pretrained {src}: no such file")
    try:
        verify_sidecar(path)  # our checkpoints have one; a corrupt copy must not quietly become the start
    except CheckpointError as exc:
        raise PretrainedError(f"{exc}. Copy it again, or use another checkpoint of that run") from exc
    obj = _load_weights_only(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and isinstance(obj.get("arch"), str):
        ckpt = Checkpoint.from_dict(obj, path)  # ours: train/state.py
        state, which = ckpt.weights(ema)
        state, meta = _strip(state), {**ckpt.meta(), "weights": which}
    elif _is_state_dict(obj):
        state, meta = _strip(obj), {}
    else:
        state, meta = _foreign(obj, path, ema)
    try:
        refuse_nonfinite(state, path)
    except CheckpointError as exc:
        raise PretrainedError(str(exc)) from exc
    return state, meta


def _foreign(obj, path: Path, ema: bool) -> tuple[dict, dict]:
    """The weights in another tool's checkpoint (_FOREIGN), or PretrainedError saying how to convert it."""
    if isinstance(obj, dict):
        for fmt, ema_key, raw_key, marker in _FOREIGN:
            if marker is not None and marker not in obj:
                continue
            for key, which in ((ema_key, "EMA"), (raw_key, "raw")):
                if key and (ema or which == "raw") and _is_state_dict(obj.get(key)):
                    args = obj.get("args")
                    arch = obj.get("arch") or getattr(args, "model", None) or getattr(args, "arch", None)
                    state = _strip(averaged_weights(obj[key]))
                    return state, {"weights": which, "format": f"{fmt} ({key!r})",
                                   **({"source_arch": arch} if isinstance(arch, str) else {})}
    keys = f" (top-level keys: {', '.join(map(str, list(obj)[:8]))})" if isinstance(obj, dict) else ""
    raise PretrainedError(f"{path} holds no state dict of tensors this reader knows{keys}. Save the model's "
                          "weights alone, e.g. torch.save(model.state_dict(), 'weights.pth'), and pass that file")


def _is_state_dict(obj) -> bool:
    return (isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) for k in obj)
            and all(isinstance(v, torch.Tensor) for v in obj.values()))


def _load_weights_only(path: Path):
    """torch.load(weights_only=True), allowing argparse.Namespace; a file that needs other classes is refused
    naming them (torch's own message is a thousand characters about a default that changed)."""
    try:
        with torch.serialization.safe_globals(list(_SAFE_CLASSES)):
            return read_tensors(path)  # also names an empty file (a copy that never finished)
    except CheckpointError as exc:  # empty, truncated, tampered, or holding pickled objects of other classes
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # not a zip torch can read at all
            names = []
        allowed = {f"{c.__module__}.{c.__qualname__}" for c in _SAFE_CLASSES}
        names = [n for n in names if n not in allowed]
        if names:
            raise PretrainedError(
                f"{path} holds pickled objects of {', '.join(names[:6])}{' ...' if len(names) > 6 else ''} "
                "besides the weights, which weights_only=True does not build (they could run code). If you trust "
                "the file, convert it where those classes import: c = torch.load(path, weights_only=False); "
                "torch.save(c['state_dict'], 'weights.pth') (or c['model'], or model.state_dict()), "
                "then pass weights.pth") from exc
        raise PretrainedError(f"{exc} Weights from elsewhere: save them as plain tensors with "
                              "torch.save(model.state_dict(), path)") from exc


def load_pretrained(model: nn.Module, source: str | Path, arch: str = "",
                    classes: list[str] | None = None) -> TransferReport:
    """Copy every fitting tensor of `source` into `model`; the classifier keeps its fresh init when its
    shape differs (new number of classes) or when `source` is one of our checkpoints whose class names
    are not `classes` (as many classes, other ones: its head's rows mean other things). Returns what
    happened to each key."""
    state, meta = read_state(source, arch)
    new_classes = classes is not None and meta.get("classes") is not None and list(meta["classes"]) != list(classes)
    if meta.get("arch") and arch and meta["arch"] != arch:
        raise PretrainedError(f"{source} holds a {meta['arch']} but the model is {arch}; "
                              f"pass --arch {meta['arch']} or another checkpoint")
    target = model.state_dict()
    state, prefix = _submodule(state, target)
    heads = tuple(f"{h}." for h in head_names(model))
    loaded, replaced, mismatched, fit = [], [], [], {}
    for k, v in state.items():
        if k not in target:
            continue
        if k.startswith(heads) and (new_classes or target[k].shape != v.shape):
            replaced.append(k)
        elif target[k].shape == v.shape:
            fit[k] = v
            loaded.append(k)
        else:
            mismatched.append(k)
    if not loaded:
        raise PretrainedError(f"no tensor of {source} fits the model ({type(model).__name__}); "
                              f"wrong --arch? first keys in the file: {list(state)[:5]}")
    model.load_state_dict(fit, strict=False)
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in target]
    what = [meta.get("format"), meta.get("source_arch") and f"arch {meta['source_arch']}",
            meta.get("weights") and f"{meta['weights']} weights", prefix and f"under {prefix!r}"]
    name = f"{source} ({', '.join(w for w in what if w)})" if any(what) else str(source)
    return TransferReport(name, tuple(loaded), tuple(replaced), tuple(missing), tuple(unexpected),
                          tuple(mismatched))


def finetune_of_checkpoint(model_cfg, state: dict | None):
    """The fine-tuning setup of a resumed run (a `ModelConfig`). A checkpoint knows it was a fine-tune: its
    config names the pretrained source, the mode and frozen BN. A resume without --pretrained takes those three
    from it, so the parameter groups and frozen modules are rebuilt as they were (the weights come from the
    checkpoint, not from the source, which need not exist any more)."""
    saved = ((state or {}).get("config") or {}).get("model") or {}
    if not model_cfg.pretrained and saved.get("pretrained"):
        model_cfg = replace(model_cfg, pretrained=saved["pretrained"], finetune=saved.get("finetune", "full"),
                            freeze_bn=bool(saved.get("freeze_bn", False)))
    if not model_cfg.pretrained and (model_cfg.finetune != "full" or model_cfg.freeze_bn):
        raise PretrainedError("model.finetune=linear and model.freeze_bn need pretrained weights, and there is no "
                              "fine-tuning checkpoint to resume from: pass --pretrained <checkpoint, state dict or "
                              "torchvision:<arch>>")
    return model_cfg


def setup_finetune(model: nn.Module, cfg, classes: list[str], say, load: bool = True) -> list[str]:
    """Fine-tuning from `cfg.model.pretrained`: load its weights (not when `load` is False: a resume, whose
    checkpoint brings them), choose what trains, say so. Returns the classifier's names (the head's lr group)."""
    m = cfg.model
    if load:
        for line in load_pretrained(model, m.pretrained, m.arch, classes).lines():
            say(line)
    trainable = set_trainable(model, m.finetune, m.freeze_bn)
    frozen_bn = m.freeze_bn or m.finetune == "linear"  # a probe never updates BN statistics
    say(f"fine-tuning ({m.finetune}{', BN statistics frozen' if frozen_bn else ''}): {len(trainable)} of "
        f"{len(list(model.parameters()))} parameter tensors train; backbone lr x {cfg.optim.backbone_lr_mult:g}"
        + ("" if load else f" (set up as in the checkpoint; pretrained from {m.pretrained})"))
    return head_names(model)


def _submodule(state: dict, target: dict) -> tuple[dict, str]:
    """The part of `state` that is the model: the keys themselves, or those under one first name component
    (a LightningModule's `self.model` / `self.net` / `self.backbone`), whichever matches more of `target`'s
    keys; other keys (a loss module, a teacher) stay and are reported as unexpected. Returns (state, prefix)."""
    best, best_hits = "", sum(k in target for k in state)
    for prefix in {k.split(".", 1)[0] + "." for k in state if "." in k}:
        hits = sum(k[len(prefix):] in target for k in state if k.startswith(prefix))
        if hits > best_hits:
            best, best_hits = prefix, hits
    if not best:
        return state, ""
    return {(k[len(best):] if k.startswith(best) else k): v for k, v in state.items()}, best


class _FrozenStatsBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm that stays in eval mode: it normalises with the pretrained running statistics and never
    updates them, even inside model.train(). Its affine weight and bias may still train."""

    def train(self, mode: bool = True):
        return super().train(False)


def freeze_bn_stats(model: nn.Module) -> int:
    """Keep every BatchNorm's statistics fixed (small fine-tuning sets give noisy batch statistics).
    The modules keep their state-dict layout, so checkpoints stay interchangeable. Returns the count."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, _FrozenStatsBatchNorm):
            m.__class__ = type(f"FrozenStats{type(m).__name__}", (_FrozenStatsBatchNorm, type(m)), {})
            m.eval()
            n += 1
    return n


def set_trainable(model: nn.Module, mode: str, freeze_bn: bool = False) -> list[str]:
    """`full`: everything trains; `linear`: only the classifier trains (a linear probe, which also keeps
    BN statistics frozen). Returns the names of the trainable parameters."""
    if mode not in ("full", "linear"):
        raise ValueError(f"fine-tune mode must be 'full' or 'linear', not {mode!r}")
    heads = tuple(f"{h}." for h in head_names(model))
    for name, p in model.named_parameters():
        p.requires_grad_(mode == "full" or name.startswith(heads))
    if freeze_bn or mode == "linear":
        freeze_bn_stats(model)
    return [n for n, p in model.named_parameters() if p.requires_grad]
