"""The decode-only limit: what libjpeg-turbo alone does with the same JPEGs on the same cores.

Every CPU input pipeline (DALI's CPU operators, the torchvision DataLoader) has to decode each JPEG, so
full-image decoding in a tight loop bounds them all; how far a pipeline stays below it is the time it spends
on everything else (crop, resize, normalisation, collation, copies between processes and threads). The
limit is measured in the same run, over the same shards and with the same number of processes as the
pipelines' `workers`, so a shared machine's load hits it as it hits them.

`DecodeOnly` follows the Loader protocol that benchmarks.run times (set_epoch, __iter__, __len__), so it gets
the same warm-up, windows, interleaving and load records as the loaders. Its work is the product's own
reading code: pipeline.torch_baseline.ShardSource.read (the tar by offset through its index, then
torchvision.io.decode_jpeg to RGB), in DataLoader worker processes started as the baseline starts its own.
A worker decodes a whole batch and hands back only its size (an empty tensor), so nothing but decoding is
timed: no crop, resize, normalisation, collation or image bytes between processes.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from imt.pipeline.common import load_split
from imt.pipeline.config import DataConfig
from imt.pipeline.torch_baseline import ShardSource, _worker_context

NAME = "decode-only"


class _DecodeBatches(IterableDataset):
    """Worker k decodes batches k, k + workers, ... of the split in stored order; yields their sizes."""

    def __init__(self, source: ShardSource, batch_size: int):
        self.source, self.batch_size = source, batch_size

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        n = len(self.source)
        for b, start in enumerate(range(0, n - self.batch_size + 1, self.batch_size)):  # full batches only
            if b % nw != wid:
                continue
            for i in range(start, start + self.batch_size):
                self.source.read(i)
            yield torch.empty(self.batch_size, 0, dtype=torch.uint8)


class DecodeOnly:
    """Full-image JPEG decoding of `cfg.path`'s split in `cfg.workers` processes (see the module docstring).
    Built like a loader, `DecodeOnly(cfg, split, dist, train=...)`, so benchmarks.run times it as one."""

    def __init__(self, cfg: DataConfig, split: str, dist=None, *, train: bool = True):
        manifest, sp = load_split(cfg.path, split)
        self.source = ShardSource(sp, manifest.num_classes, manifest.label_ext)
        self.num_samples = len(self.source) // cfg.batch_size * cfg.batch_size
        if self.num_samples == 0:
            raise ValueError(f"{cfg.path}: {len(self.source)} samples, fewer than one batch of {cfg.batch_size}")
        workers = max(1, cfg.workers)
        self.loader = DataLoader(_DecodeBatches(self.source, cfg.batch_size), batch_size=None,
                                 num_workers=workers, persistent_workers=True, prefetch_factor=max(1, cfg.prefetch),
                                 multiprocessing_context=_worker_context())
        self._len = math.ceil(self.num_samples / cfg.batch_size)

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        pass  # one fixed order: the files stay in the page cache, and decoding cost does not depend on order

    def set_resolution(self, px: int) -> None:
        pass  # decoding does not depend on the output size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for sizes in self.loader:
            yield sizes, torch.empty(sizes.shape[0], dtype=torch.int64)
