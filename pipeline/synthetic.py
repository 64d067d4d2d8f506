"""The model-bound ceiling: one batch of random normalised images made once on the device and
yielded again and again, so the loop measures the model and nothing else."""
from __future__ import annotations

import math
from typing import Iterator

import torch

from .common import Position, mix_seed, torch_dtype
from .config import DataConfig

DEFAULT_BATCHES = 50  # per epoch when cfg.synthetic_samples == 0


class SyntheticLoader:
    """Follows the Loader contract. `cfg.synthetic_samples` counts samples per epoch *per rank*
    (0: 50 full batches); the last batch is partial when it does not divide evenly, and dropped when
    training with cfg.drop_last, as the other loaders do."""

    def __init__(self, cfg: DataConfig, device: torch.device, *, train: bool, rank: int = 0):
        self.cfg, self.device, self.train, self.rank = cfg, torch.device(device), train, rank
        self.dtype = torch_dtype(cfg.dtype)
        self.num_samples = cfg.synthetic_samples or DEFAULT_BATCHES * cfg.batch_size
        self.classes = tuple(f"class_{i:04d}" for i in range(cfg.synthetic_classes))
        if train and cfg.drop_last:
            self.num_samples -= self.num_samples % cfg.batch_size
        if self.num_samples == 0:
            raise ValueError(f"synthetic_samples={cfg.synthetic_samples} is less than one batch of "
                             f"{cfg.batch_size} with drop_last: raise it or lower the batch size")
        self.epoch = 0
        self.pos = Position("synthetic", world=1, rank=rank, batch=cfg.batch_size, drop_last=train and cfg.drop_last,
                            seed=cfg.seed, samples=self.num_samples)
        self._make(cfg.resolution if train else cfg.val_resolution)

    def _make(self, px: int) -> None:
        g = torch.Generator(device="cpu").manual_seed(mix_seed(self.cfg.seed, self.rank))
        n = self.cfg.batch_size
        # Made on the CPU with a seeded generator (same values on any device), copied once.
        images = torch.randn(n, 3, px, px, generator=g).to(self.device, self.dtype)
        self.images = images.contiguous(memory_format=torch.channels_last)
        self.labels = torch.randint(0, self.cfg.synthetic_classes, (n,), generator=g).to(self.device)
        self.resolution = px

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.cfg.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        _, start = self.pos.begin(self.epoch)
        self.pos.end = len(self)
        left = self.num_samples - start * self.cfg.batch_size
        while left > 0:
            n = min(left, self.cfg.batch_size)
            left -= n
            self.pos.step()
            yield self.images[:n], self.labels[:n]

    def state_dict(self) -> dict:
        return self.pos.state_dict()

    def load_state_dict(self, state: dict) -> str:
        return self.pos.load(state, elastic=False)

    def position(self) -> tuple[int, int]:
        resume = self.pos.resume_for(self.epoch)
        start = resume[1] if resume else 0
        return start, len(self) - start

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # nothing to reshuffle: the data carries no information

    def set_resolution(self, px: int) -> None:
        if px != self.resolution:
            self._make(px)
