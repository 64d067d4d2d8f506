"""The torchvision baseline: DataLoader workers decode with libjpeg-turbo (torchvision.io) and
augment uint8 tensors with transforms.v2, over the same shards DALI reads ("torch") or over an
ImageFolder tree ("folder").

    loader = ShardLoader(cfg, "train", dist, train=True)     # or FolderLoader(...)
    for images, labels in loader: ...   # N x 3 x H x W channels-last, cfg.dtype, on dist.device

Training crops whose size is at least twice the output on both sides are decoded at 1/2, 1/4 or 1/8 scale
(libjpeg-turbo's DCT scaling, through PIL's draft(); torchvision.io cannot): see train_sample.

The usual care, no handicap: `cfg.workers` processes, pinned memory on CUDA, persistent
workers, `prefetch_factor=cfg.prefetch`, uint8 batches over the pipe (4x fewer bytes than
float32) and normalisation on the GPU. With no GPU the workers normalise (the main process is
one core; the workers are many).

Exactly once per epoch, across ranks *and* workers: each epoch has one sample order, the same on
every rank (a permutation seeded by (seed, epoch) for training, the stored order for
validation); rank r takes the range [N*r//W, N*(r+1)//W), cuts it into batches
(common.rank_batches: every rank gets the same number of non-empty batches, no padding
duplicates), and worker k builds batches k, k + workers, ..., which the DataLoader returns in
order. Samples are read from the tars by offset through their DALI index (the bytes DALI reads),
so the split is exact by sample rather than by shard as webdataset's splitters would be.
Augmentations are seeded per (seed, epoch, rank, batch), so the output does not depend on the
number of workers. Resume (`state_dict` / `load_state_dict`): the plan is a function of (seed, epoch),
so a resumed epoch starts at its next batch by index, reading none of the skipped ones; after a change
of ranks or batch size, common.epoch_plan splits the samples no rank had reached among the new ranks.
Shards on object storage larger than data.cache_limit: the order is common.windowed_order's, and a
remote.Feeder thread in the trainer's process fetches the tars of the batches ahead; a worker waits until its
batch's tars are in the cache (`ready`) and closes them after the batch (an evicted tar held open would keep
its disk space). Epoch, resolution and the resume point live in shared memory, so `set_epoch`, `set_resolution` and
`load_state_dict` reach persistent workers without restarting them.
"""
from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms import v2

from .augment import torch_transforms
from .common import (Position, label_outside, load_split, mix_seed, normalise, num_batches, read_label, seeded_plan,
                     torch_dtype)
from .config import DataConfig
from .manifest import MANIFEST_NAME, ManifestError, read_index
from .orphans import exit_with_parent


class ShardSource:
    """Random access to the samples of one split's shards through their index files."""

    def __init__(self, split, num_classes: int, label_ext: str = "lbl"):
        self.num_classes = num_classes
        # shard, offset, size, label's offset (an int64 there) or -1 - label (adopted: label from the index), key
        self.entries: list[tuple[int, int, int, int, str]] = []
        self.tars = [str(s.tar) for s in split.shards]
        for si, shard in enumerate(split.shards):
            index = read_index(shard.index)
            jpg, lbl, c = index.column("jpg"), index.column(label_ext), len(index.exts)
            labels = index.offsets[:, lbl] if label_ext == "lbl" else -index.sizes[:, lbl]  # size = label + 1
            columns = (index.offsets[:, jpg].tolist(), index.sizes[:, jpg].tolist(), labels.tolist())
            for i, (off, size, lbl_off) in enumerate(zip(*columns)):
                self.entries.append((si, off, size, lbl_off, index.names[i * c + jpg].rsplit(".", 1)[0]))
        self._files: dict[int, object] = {}  # opened lazily, per worker process
        self._labels: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def key(self, i: int) -> str:
        return self.entries[i][4]

    def read(self, i: int) -> tuple[torch.Tensor, int]:
        data, label = self.raw(i)
        return self.decode(i, data), label

    def raw(self, i: int) -> tuple[torch.Tensor, int]:
        """The sample's JPEG bytes (uint8 tensor) and label."""
        si, off, size, lbl_off, key = self.entries[i]
        f = self._files.get(si) or self._files.setdefault(si, open(self.tars[si], "rb"))
        label = -1 - lbl_off if lbl_off < 0 else read_label(f, lbl_off)
        if not 0 <= label < self.num_classes:  # per sample, in the worker: names it before the loss fails
            raise label_outside(label, self.num_classes, key, self.tars[si])
        f.seek(off)
        return torch.frombuffer(bytearray(f.read(size)), dtype=torch.uint8), label

    def decode(self, i: int, data: torch.Tensor) -> torch.Tensor:
        si, key = self.entries[i][0], self.entries[i][4]
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB)
        except RuntimeError as e:
            raise RuntimeError(f"sample {key} in {self.tars[si]} does not decode ({e}); run "
                               f"`imt-verify-shards {Path(self.tars[si]).parent}` and remake the "
                               "shards with `imt-make-shards`") from e

    def close(self) -> None:
        """Close the tars this process has open (a streamed tar may be evicted: an open one would keep its
        disk space in use)."""
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __getstate__(self):  # open files stay behind; each worker opens its own
        return {**self.__dict__, "_files": {}}


class FolderSource:
    """torchvision ImageFolder's listing (sorted classes, its extensions), decoded with torchvision.io.
    Labels are indices into the class folders of `classes_root` (the training split), so a validation
    split that lacks a class, or lists them in another order, keeps the training labels."""

    def __init__(self, root: Path, classes_root: Path | None = None):
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

        # ManifestError (a ValueError), as for shards: the trainer's CLI prints its message without a traceback.
        if (root.parent / MANIFEST_NAME).is_file():  # `--loader folder` given a shard folder
            raise ManifestError(f"{root.parent} holds shards ({MANIFEST_NAME}), not an ImageFolder tree: read it "
                                "with --loader dali or --loader torch (--loader folder reads "
                                "<path>/<split>/<class>/*.JPEG)")
        for folder in (root, classes_root):
            if folder is not None and not folder.is_dir():
                raise ManifestError(f"{folder}: no such folder (loader='folder' reads "
                                    f"<path>/<split>/<class>/*.JPEG)")
        self.classes, class_to_idx = find_classes(str(classes_root or root))
        unknown = sorted(set(find_classes(str(root))[0]) - set(self.classes))
        if unknown:
            raise ManifestError(f"{root} has class folders that {classes_root} lacks ({', '.join(unknown[:5])}"
                             f"{', ...' if len(unknown) > 5 else ''}): the model cannot predict them. Add them "
                             "to the training split or remove them here")
        self.samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        if not self.samples:
            raise ManifestError(f"{root} holds no image files ({', '.join(IMG_EXTENSIONS)})")
        self.root = root

    def __len__(self) -> int:
        return len(self.samples)

    def key(self, i: int) -> str:
        return str(Path(self.samples[i][0]).relative_to(self.root))

    def read(self, i: int) -> tuple[torch.Tensor, int]:
        data, label = self.raw(i)
        return self.decode(i, data), label

    def raw(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8), label

    def decode(self, i: int, data: torch.Tensor) -> torch.Tensor:
        try:
            return decode_image(data, mode=ImageReadMode.RGB)
        except RuntimeError as e:
            raise RuntimeError(f"{self.samples[i][0]} does not decode ({e}); remove or replace it") from e


def _transform(train: bool, px: int, cfg: DataConfig):
    """Training: the augmentations after the crop and flip (train_sample makes those), or None. Validation:
    torchvision's Resize + CenterCrop."""
    if train:
        extra = torch_transforms(cfg)
        return v2.Compose(extra) if extra else None
    return v2.Compose([v2.Resize(int(cfg.val_resolution / cfg.val_resize_ratio), antialias=True),
                       v2.CenterCrop(cfg.val_resolution)])


def dct_scale(crop_h: int, crop_w: int, px: int) -> int:
    """libjpeg's DCT scaling factor for a crop of crop_h x crop_w resized to px: the largest s in 1, 2, 4, 8 that
    still decodes the crop at px or more on both sides (decoding at 1/s skips most of the inverse DCT and colour
    conversion, and the resize then shrinks s times less)."""
    s = 1
    while s < 8 and min(crop_h, crop_w) >= 2 * s * px:
        s *= 2
    return s


def train_sample(source, i: int, px: int, cfg: DataConfig) -> tuple[torch.Tensor, int]:
    """RandomResizedCrop(px) + horizontal flip of sample i, as v2.RandomResizedCrop + RandomHorizontalFlip draw
    them (torch's RNG), decoding a JPEG at 1/2, 1/4 or 1/8 scale (PIL's draft(): libjpeg-turbo's DCT scaling)
    when the crop is at least twice the output on both sides; otherwise torchvision.io decodes it in full.
    Measured (benchmarks.stages, 2026-12-02): on ImageNet-sized JPEGs 55% of crops qualify at 112 px, 3% at 224.
    Both paths resize with antialiased bilinear filtering (PIL's, which torch's antialias=True reproduces)."""
    import io

    import numpy as np
    from PIL import Image
    from torchvision.transforms import RandomResizedCrop
    from torchvision.transforms.v2 import functional as F

    data, label = source.raw(i)
    img = None
    try:
        with Image.open(io.BytesIO(data.numpy())) as im:  # reads the header only
            top, left, h, w = RandomResizedCrop.get_params(im, [cfg.min_area, 1.0], [3 / 4, 4 / 3])
            s = dct_scale(h, w, px) if im.format == "JPEG" else 1
            if s > 1:
                full_w, full_h = im.size
                im.draft("RGB", (-(-full_w // s), -(-full_h // s)))
                sx, sy = full_w / im.size[0], full_h / im.size[1]
                out = im.convert("RGB").resize((px, px), Image.BILINEAR,
                                               box=(left / sx, top / sy, (left + w) / sx, (top + h) / sy))
                img = torch.from_numpy(np.array(out)).permute(2, 0, 1)
    except (OSError, ValueError, SyntaxError):  # PIL cannot read it: torchvision's decoder says why, with the sample
        top, left, h, w = 0, 0, 0, 0
    if img is None:
        full = source.decode(i, data)
        if h == 0:
            top, left, h, w = RandomResizedCrop.get_params(full, [cfg.min_area, 1.0], [3 / 4, 4 / 3])
        img = F.resized_crop(full, top, left, h, w, [px, px], antialias=True)
    return (F.horizontal_flip(img) if torch.rand(1) < 0.5 else img), label


class _Batches(IterableDataset):
    """Yields this rank's batches for the current epoch; worker k makes batches k, k+W, ..."""

    def __init__(self, source, cfg: DataConfig, *, train: bool, rank: int, world: int,
                 normalise_to: torch.dtype | None, keys: bool):
        self.source, self.cfg, self.train, self.rank, self.world = source, cfg, train, rank, world
        self.normalise_to, self.keys = normalise_to, keys
        # Shared with the workers (persistent or not): written by set_epoch / set_resolution, and by the
        # loader before each epoch's iteration: where it starts (earlier runs' segments, first batch).
        self.epoch = mp.Value("q", 0, lock=False)
        self.resolution = mp.Value("q", cfg.resolution if train else cfg.val_resolution, lock=False)
        self.start = mp.Value("q", 0, lock=False)
        self.segments = mp.Array("q", 1 + 3 * MAX_SEGMENTS, lock=False)  # count, then (world, batch, done)...
        # Streamed from object storage (ShardLoader with a cache): (samples per shard, bytes per shard, window
        # bytes) for common.windowed_order; `ready` counts the batches of this iteration whose tars the Feeder
        # has in the cache (-1: it failed), `gen` changes when an iteration starts or is left.
        self.windows: tuple | None = None
        self.ready = mp.Value("q", 0, lock=False)
        self.gen = mp.Value("q", 0, lock=False)

    def plan(self, epoch: int, segments=()) -> list[list[int]]:
        """This rank's batches of the epoch (common.seeded_plan: a function of (seed, epoch) for training)."""
        return seeded_plan(len(self.source), self.cfg.seed, epoch, train=self.train, world=self.world, rank=self.rank,
                           batch=self.cfg.batch_size, drop_last=self.train and self.cfg.drop_last, segments=segments,
                           windows=self.windows)[0]

    def _wait(self, k: int, gen: int) -> bool:
        """Streamed data: wait until the Feeder has the tars of this iteration's batch k in the cache; False
        when the iteration was left meanwhile (its reader stopped: this worker's part ends)."""
        while True:
            ready = self.ready.value
            if self.gen.value != gen:
                return False
            if ready > k:
                return True
            if ready < 0:
                raise RuntimeError("the trainer's process could not fetch the shards of this batch: its error "
                                   "follows")
            time.sleep(0.002)

    def set_start(self, segments: list, start: int) -> None:
        if len(segments) > MAX_SEGMENTS:
            raise ValueError(f"an epoch resumed {len(segments)} times on other ranks or batch sizes: at most "
                             f"{MAX_SEGMENTS} are kept; let this epoch finish on the same ranks")
        flat = [len(segments)] + [int(x) for seg in segments for x in seg]
        self.segments[:len(flat)] = flat
        self.start.value = start

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        epoch, px, start, gen = self.epoch.value, self.resolution.value, self.start.value, self.gen.value
        count = self.segments[0]
        segments = [tuple(self.segments[1 + 3 * i: 4 + 3 * i]) for i in range(count)]
        tf = _transform(self.train, px, self.cfg)
        plan = self.plan(epoch, segments)
        # Batch b's augmentation seed is (seed, epoch, rank, b): the same whether the epoch runs through or
        # resumes at batch `start`, so a resumed epoch is bitwise the uninterrupted one (skipped batches are
        # never read). A plan re-split after a change of ranks adds its segment count to the seed.
        for b in range(start, len(plan)):
            if (b - start) % nw != wid:
                continue
            if self.windows is not None and not self._wait(b - start, gen):
                return
            idx = plan[b]
            # The transforms draw from torch's global RNG. With workers=0 they run in the training process:
            # fork it, or seeding each batch would reset the trainer's RNG (and what its checkpoints save).
            with torch.random.fork_rng(devices=[], enabled=info is None):
                torch.manual_seed(mix_seed(self.cfg.seed, epoch, self.rank, b, *([count] if count else [])))
                images, labels = [], []
                for i in idx:
                    img, label = (train_sample(self.source, i, px, self.cfg) if self.train else
                                  self.source.read(i))
                    images.append(tf(img) if tf is not None else img)
                    labels.append(label)
            if self.windows is not None:
                self.source.close()
            images = torch.stack(images)
            if self.normalise_to is not None:
                images = normalise(images, self.normalise_to)
            out = (images, torch.tensor(labels, dtype=torch.int64))
            yield out + ((tuple(self.source.key(i) for i in idx),) if self.keys else ())


def _worker_context():
    """The forkserver imports torch and this module once; each worker is then a cheap fork of it
    (without the preload every worker imported torch itself: the pipeline tests took 100 s instead of 30).
    It also imports _forkserver_preload, which makes it end when the trainer dies (kill -9 included)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torchvision", __name__, "imt.pipeline._forkserver_preload"])
    return ctx


def _init_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: the worker ends when its parent, the forkserver, does (pipeline.orphans)."""
    exit_with_parent()


MAX_SEGMENTS = 16  # resumes of one epoch on another number of ranks or batch size


class _TorchLoader:
    kind = "torch"

    def __init__(self, source, classes, cfg: DataConfig, dist, *, train: bool, keys: bool = False,
                 feed=None):
        self.cfg, self.train = cfg, train
        self.feed = feed  # streamed data: a remote.Stream (windows, and a Feeder per iteration)
        self.device, self.dtype = torch.device(dist.device), torch_dtype(cfg.dtype)
        self.classes = tuple(classes)
        n, w, b = len(source), dist.world_size, cfg.batch_size
        self._len = num_batches(n, w, b, train and cfg.drop_last)
        if n < w or self._len == 0:
            raise ValueError(f"{n} samples: too few for {w} ranks with batch size {b}"
                             f"{' and drop_last' if train and cfg.drop_last else ''}")
        on_cpu = self.device.type == "cpu"
        self.dataset = _Batches(source, cfg, train=train, rank=dist.rank, world=w,
                                normalise_to=self.dtype if on_cpu else None, keys=keys)
        if feed is not None:
            self.dataset.windows = feed.windows
        self.num_samples = sum(len(x) for x in self.dataset.plan(0))
        self.pos = Position(self.kind, world=w, rank=dist.rank, batch=b, drop_last=train and cfg.drop_last,
                            seed=cfg.seed, samples=n)
        workers = max(0, cfg.workers)
        # Workers start from a forkserver, not by fork(): a process that already runs DALI, OpenMP or
        # tqdm threads can fork a child holding one of their locks, and the worker then waits forever
        # (seen in this project's test suite: a worker stuck at 0% CPU after DALI tests had run in the
        # same process). Persistent workers pay the start-up (importing torch) once per loader. As with
        # any non-fork start method, a script that builds these loaders (or calls train.run.train) needs
        # the `if __name__ == "__main__":` guard: the workers import the main module.
        self.loader = DataLoader(
            self.dataset, batch_size=None, num_workers=workers,
            pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
            prefetch_factor=max(1, cfg.prefetch) if workers > 0 else None,
            multiprocessing_context=_worker_context() if workers > 0 else None,
            worker_init_fn=_init_worker if workers > 0 else None)

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        self.dataset.epoch.value = epoch

    def set_resolution(self, px: int) -> None:
        if not self.train:
            raise ValueError("set_resolution is for training loaders; validation uses cfg.val_resolution")
        self.dataset.resolution.value = int(px)

    def state_dict(self) -> dict:
        return self.pos.state_dict()

    def load_state_dict(self, state: dict) -> str:
        return self.pos.load(state)

    def _planned(self, epoch: int, segments: list) -> int:
        return len(self.dataset.plan(epoch, segments)) if segments else self._len

    def position(self) -> tuple[int, int]:
        epoch = self.dataset.epoch.value
        resume = self.pos.resume_for(epoch)
        if resume is None:
            return 0, self._len
        left = self._planned(epoch, resume[0]) - resume[1]
        return self._len - left, left

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        segments, start = self.pos.begin(self.dataset.epoch.value)
        self.pos.end = self._planned(self.pos.epoch, segments)
        self.dataset.set_start(segments, start)  # read by every worker when this iteration starts
        if start >= self.pos.end:
            return
        feeder = None
        if self.feed is not None:  # fetches the tars of the batches ahead (pipeline/remote.py)
            self.dataset.gen.value += 1
            self.dataset.ready.value = 0
            feeder = self.feed.feeder(self.dataset.plan(self.pos.epoch, segments)[start:],
                                      lambda k: setattr(self.dataset.ready, "value", k))
        try:
            for batch in self.loader:
                images, labels = batch[0], batch[1]
                if self.device.type != "cpu":
                    images = normalise(images.to(self.device, non_blocking=True), self.dtype)
                    labels = labels.to(self.device, non_blocking=True)
                self.pos.step()
                if feeder is not None:
                    feeder.consumed += 1
                yield (images, labels) + tuple(batch[2:])
        except Exception as e:
            if feeder is not None and feeder.error is not None:
                raise feeder.error from e
            raise
        finally:
            if feeder is not None:
                self.dataset.gen.value += 1  # workers waiting for a batch of this iteration end it
                feeder.close()


class ShardLoader(_TorchLoader):
    """loader="torch": the shards of cfg.path (manifest.json), read by the DataLoader workers."""

    def __init__(self, cfg: DataConfig, split: str, dist, *, train: bool, keys: bool = False, cache=None):
        manifest, sp = load_split(cfg.path, split, check_tars=cache is None)
        source = ShardSource(sp, manifest.num_classes, manifest.label_ext)
        feed = None
        if cache is not None:
            from .remote import Stream
            feed = Stream(cache, sp, manifest)
        super().__init__(source, manifest.classes, cfg, dist, train=train, keys=keys, feed=feed)


class FolderLoader(_TorchLoader):
    """loader="folder": torchvision ImageFolder's layout, cfg.path/<split>/<class>/*."""
    kind = "folder"

    def __init__(self, cfg: DataConfig, split: str, dist, *, train: bool, keys: bool = False):
        root = Path(cfg.path)
        source = FolderSource(root / split, None if split == "train" else root / "train")
        super().__init__(source, source.classes, cfg, dist, train=train, keys=keys)
