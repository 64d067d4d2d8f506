"""Mixup and CutMix on the device, after the loader: one implementation for every loader (DALI, torch,
folder, synthetic), as in torchvision's classification references (RandomChoice of MixUp and CutMix).

    mix = build_mix(cfg.optim, num_classes)   # None when both are off
    images, soft_labels = mix(images, labels)

Labels become float32 class probabilities (N x classes), which nn.CrossEntropyLoss takes as targets,
label smoothing included. Images keep their dtype and channels-last layout."""
from __future__ import annotations

from typing import Callable

import torch
from torchvision.transforms import v2

from .config import OptimConfig

BatchTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def build_mix(cfg: OptimConfig, num_classes: int) -> BatchTransform | None:
    """torchvision.transforms.v2 MixUp(alpha=optim.mixup) and/or CutMix(alpha=optim.cutmix); with both, each
    batch gets one of them with equal chance (torchvision references, timm's switch_prob 0.5). None when
    both alphas are 0. The mixing weight is drawn on the host (a Beta sample): no device sync."""
    chosen = [t(alpha=a, num_classes=num_classes) for t, a in ((v2.MixUp, cfg.mixup), (v2.CutMix, cfg.cutmix)) if a]
    if not chosen:
        return None
    mix = chosen[0] if len(chosen) == 1 else v2.RandomChoice(chosen)

    def apply(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mixed, soft = mix(images, labels.long())  # one_hot needs int64; DALI hands int32 labels
        return mixed.contiguous(memory_format=torch.channels_last), soft.float()

    return apply
