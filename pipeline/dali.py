"""DALI loader: webdataset shards -> decode + random crop -> resize -> flip + normalise, on the
GPU ("mixed" nvJPEG decode) or, with no GPU, the same graph with CPU operators (device_id=None).

    loader = DaliLoader(cfg, "train", dist, train=True)
    for images, labels in loader: ...     # N x 3 x H x W channels-last, cfg.dtype, on dist.device

Choices, with reasons:
- Channels-last for free: DALI emits HWC (its native layout); `permute(0, 3, 1, 2)` of an NHWC
  tensor *is* an NCHW tensor in channels_last memory format, no copy.
- bfloat16: DALI 2.4 has no BFLOAT16 type (types.DALIDataType lists FLOAT16, FLOAT, FLOAT64), so
  the graph emits float16 on the GPU (half the bytes of float32; normalised values lie in
  [-2.2, 2.7], far inside fp16's range and finer than bf16's 8-bit mantissa) and the wrapper casts
  on the device. On the CPU it emits float32: torch casts fp32 -> bf16 twice as fast as
  fp16 -> bf16 (9.8 vs 19.3 ms per 64 x 224 px batch on one core here), and that cast runs on
  the main thread.
- Exactly once per epoch across ranks: the reader shards by sample range (rank r reads
  [N*r//W, N*(r+1)//W)), `pad_last_batch=True` pads every rank to the largest share and the
  iterator's `reader_name` trims the padding. Measured (1-7 ranks, shuffled or not): every key
  once, equal batch counts. One case DALI gets wrong for a training loop: a rank whose share is a
  multiple of the batch size while another rank has one sample more gets a trailing *empty*
  batch (seen: 5 ranks, 96 samples, batch 19 -> [19, 0] vs [19, 1]). The wrapper splits that
  rank's last full batch in two instead, so every rank yields len(loader) non-empty batches.
- Epochs and shuffling: after each epoch the reader reorders the tar files (`shuffle_after_epoch`,
  one seed on every rank, so the ranges stay disjoint) and rank r again reads the r-th sample
  range of the new order (measured: with this option DALI no longer rotates ranges between
  ranks, so a rank's share size is fixed); samples are then shuffled through an `initial_fill`
  buffer with a per-rank seed. The pipeline is a continuous stream: epoch e's order is a function
  of (seed, rank, world, e - first epoch of this pipeline). `set_epoch(e)` keeps the stream when
  e is the next epoch and rebuilds it seeded by (seed, e) otherwise (resume, jumping epochs). So a
  mid-epoch resume cannot replay the interrupted epoch's order: the rest of that epoch comes from a
  fresh order (train.run says so); rebuilding every epoch would make the order a pure function of
  (seed, e) at the price of a pipeline start and buffer refill per epoch, which was not measured on a
  GPU, so the continuous stream stays.
  Validation reads the stored order with `stick_to_shard`.
- EXIF orientation is ignored (`adjust_orientation=False`), as torchvision/PIL's ImageFolder
  does, so both loaders (and pretrained torchvision weights) see the same pixels.
- Resolution: the crop size is fixed per pipeline; `set_resolution(px)` rebuilds the pipeline at
  the next epoch boundary. A runtime input (external_source) would not work: the iterator
  prefetches the next epoch's first batches before the loop can call set_resolution, so they
  would come out at the old size. Progressive resizing changes size a handful of times per run,
  and a rebuild costs a pipeline start (about 0.2 s on the CPU here) plus refilling the buffer.
"""
from __future__ import annotations

import math
import re
from typing import Iterator

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from .common import MEAN, STD, load_split, rank_batches, torch_dtype
from .config import DataConfig
from .manifest import read_index

# nvJPEG buffers sized for the largest ImageNet training image (NVIDIA's RN50 example), so the
# decoder never reallocates, and device memory does not grow, during the first epoch.
DEVICE_MEMORY_PADDING = 211_025_920
HOST_MEMORY_PADDING = 140_544_512
PREALLOCATE_WIDTH, PREALLOCATE_HEIGHT = 5980, 6430


def _seed(*parts: int) -> int:
    """Deterministic 31-bit seed from integers (DALI takes a non-negative int)."""
    s = 0x9E3779B9
    for p in parts:
        s = (s * 1_000_003 + int(p) + 1) % (2**31 - 1)
    return s


@pipeline_def(enable_conditionals=False)
def _graph(tars, indexes, *, train: bool, gpu: bool, size: int, resize_shorter: int,
           cfg: DataConfig, shard_id: int, num_shards: int, reader_seed: int, order_seed: int,
           keys: bool, label_ext: str = "lbl"):
    reader_args = dict(random_shuffle=True, initial_fill=cfg.shuffle_buffer, seed=reader_seed,
                       shuffle_after_epoch=True, shuffle_after_epoch_seed=order_seed) if train else \
        dict(stick_to_shard=True)
    jpegs, labels = fn.readers.webdataset(
        paths=tars, index_paths=indexes, ext=["jpg", label_ext],
        dtypes=[types.UINT8, types.INT64 if label_ext == "lbl" else types.UINT8],
        shard_id=shard_id, num_shards=num_shards, pad_last_batch=True, name="Reader",
        missing_component_behavior="error", **reader_args)
    if label_ext == "lblsize":  # adopted shards: the label is the component's byte count - 1 (index_shards)
        labels = labels.shape(dtype=types.INT64) - 1
    decode_args = dict(device="mixed", hw_decoder_load=cfg.hw_decoder_load,
                       device_memory_padding=DEVICE_MEMORY_PADDING,
                       host_memory_padding=HOST_MEMORY_PADDING,
                       preallocate_width_hint=PREALLOCATE_WIDTH,
                       preallocate_height_hint=PREALLOCATE_HEIGHT) if gpu else dict(device="cpu")
    if train:
        images = fn.decoders.image_random_crop(
            jpegs, output_type=types.RGB, random_area=[cfg.min_area, 1.0],
            random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10, adjust_orientation=False,
            **decode_args)
        # Antialiased bilinear, as torchvision's RandomResizedCrop (antialias=True).
        images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR,
                           antialias=True)
        mirror = fn.random.coin_flip(probability=0.5)
        crop = {}
    else:
        images = fn.decoders.image(jpegs, output_type=types.RGB, adjust_orientation=False,
                                   **decode_args)
        resize, crop = _torchvision_resize_crop(
            fn.peek_image_shape(jpegs, adjust_orientation=False), resize_shorter, size)
        images = fn.resize(images, **resize, interp_type=types.INTERP_LINEAR, antialias=True)
        mirror = 0
    images = fn.crop_mirror_normalize(
        images, mirror=mirror, mean=[255 * m for m in MEAN], std=[255 * s for s in STD],
        dtype=types.FLOAT16 if cfg.dtype == "float16" or (cfg.dtype == "bfloat16" and gpu) else types.FLOAT,
        output_layout="HWC", **crop)
    outputs = [images, labels.gpu() if gpu else labels]
    if keys:  # tests only: "<tar>:<offset>:<key>.jpg", zero-padded to a dense batch
        outputs.append(fn.pad(fn.get_property(jpegs, key="source_info"), fill_value=0))
    return tuple(outputs)


def _torchvision_resize_crop(shape, short: int, size: int) -> tuple[dict, dict]:
    """torchvision's Resize(short) + CenterCrop(size) geometry as DALI arguments, computed per
    sample from the JPEG header: the long side is truncated (int(short * long / short_side)),
    not rounded as DALI's resize_shorter does, and the crop offset uses Python's round()
    (half to even). Measured on the 400 imagenet-sample JPEGs at 224 px, mean |DALI - torchvision|
    per image in normalised units: 0.078 (max 0.49) with plain resize_shorter + crop_pos 0.5,
    0.0028 (max 0.0034: filter rounding) with this geometry."""
    h, w = shape[0], shape[1]
    tall = h > w  # portrait: width is the short side
    out_h = tall * ((short * h) // w) + (1 - tall) * short
    out_w = tall * short + (1 - tall) * ((short * w) // h)

    def centre(extent):  # Python's round((extent - size) / 2) as a relative crop position
        k = extent - size
        q = k // 2
        top = q + (k % 2) * (q % 2)
        # +0.25 px so DALI's anchor rounding (nearest or down) lands on `top` exactly.
        return (fn.cast(top, dtype=types.FLOAT) + 0.25) / fn.cast(dmath.max(k, 1), dtype=types.FLOAT)

    resize = dict(resize_x=fn.cast(out_w, dtype=types.FLOAT), resize_y=fn.cast(out_h, dtype=types.FLOAT))
    crop = dict(crop=(size, size), crop_pos_x=centre(out_w), crop_pos_y=centre(out_h))
    return resize, crop


def use_gpu(cfg: DataConfig, device: torch.device) -> bool:
    if cfg.dali_device not in ("auto", "gpu", "cpu"):
        raise ValueError(f"DataConfig.dali_device={cfg.dali_device!r}: expected auto, gpu or cpu")
    if cfg.dali_device == "gpu" and device.type != "cuda":
        raise ValueError(f"DataConfig.dali_device='gpu' but the training device is {device}; "
                         "use dali_device='cpu' (or 'auto') without a GPU")
    return cfg.dali_device != "cpu" and device.type == "cuda"


class DaliLoader:
    """The Loader contract over a DALI pipeline (see the module docstring for the semantics)."""

    def __init__(self, cfg: DataConfig, split: str, dist, *, train: bool, keys: bool = False):
        self.cfg, self.split_name, self.train, self.keys = cfg, split, train, keys
        self.rank, self.world, self.device = dist.rank, dist.world_size, torch.device(dist.device)
        self.manifest, self.split = load_split(cfg.path, split)
        self.classes = self.manifest.classes
        self.gpu = use_gpu(cfg, self.device)
        self.dtype = torch_dtype(cfg.dtype)
        self.drop_last = train and cfg.drop_last
        self.resolution = cfg.resolution if train else cfg.val_resolution
        n, w, b = self.split.num_samples, self.world, cfg.batch_size
        # Rank shares are N*r//W .. N*(r+1)//W: sizes n//w or ceil(n/w). DALI pads each rank to
        # the largest; with drop_last every rank stops after the smallest share's full batches.
        self._len = n // w // b if self.drop_last else math.ceil(math.ceil(n / w) / b)
        if n < w or self._len == 0:
            raise ValueError(
                f"split {split!r} of {self.manifest.root} has {n} samples: too few for {w} ranks "
                f"with batch size {b}{' and drop_last' if self.drop_last else ''}; lower the batch "
                f"size or make more shards")
        for r in range(w):  # the torch loaders' batching must be possible for every rank (no empty batch)
            rank_batches(range(n), w, r, b, self.drop_last)
        self.epoch = 0
        self._pipe = self._iter = None
        self._first_epoch = self._epochs_done = 0  # of the current pipeline
        self._built_resolution = None

    # --- contract ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._len

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch (rank shares differ by at most one)."""
        if self.drop_last:
            return self._len * self.cfg.batch_size
        start, stop = self._share()
        return stop - start

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_resolution(self, px: int) -> None:
        if not self.train:
            raise ValueError("set_resolution is for training loaders; validation uses cfg.val_resolution")
        self.resolution = int(px)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Validation reads the same samples in the same order every pass: its pipeline is kept (rebuilding
        # it for each evaluation redid the decoder's start-up every epoch).
        if (self._iter is None or self._built_resolution != self.resolution
                or (self.train and self.epoch != self._first_epoch + self._epochs_done)):
            self._build()
        yield from self._epoch_batches()

    # --- internals ----------------------------------------------------------------------------
    def _share(self) -> tuple[int, int]:
        """DALI's sample range for this rank: [N*r//W, N*(r+1)//W)."""
        n, w, r = self.split.num_samples, self.world, self.rank
        return n * r // w, n * (r + 1) // w

    def _build(self) -> None:
        self._iter = self._pipe = None  # free the old pipeline (and its GPU buffers) first
        cfg, size = self.cfg, self.resolution
        pipe = _graph(
            self.split.tars, self.split.indexes, train=self.train, gpu=self.gpu, size=size,
            resize_shorter=int(cfg.val_resolution / cfg.val_resize_ratio), cfg=cfg,
            shard_id=self.rank, num_shards=self.world,
            reader_seed=_seed(cfg.seed, self.epoch, self.rank), order_seed=_seed(cfg.seed, self.epoch),
            keys=self.keys, batch_size=cfg.batch_size, num_threads=max(1, cfg.workers),
            label_ext=self.manifest.label_ext,
            device_id=(self.device.index or 0) if self.gpu else None,
            prefetch_queue_depth=cfg.prefetch, seed=_seed(cfg.seed, self.epoch, self.rank, 1))
        pipe.build()
        names = ["images", "labels"] + (["keys"] if self.keys else [])
        policy = LastBatchPolicy.DROP if self.drop_last else LastBatchPolicy.PARTIAL
        self._pipe = pipe
        self._iter = DALIGenericIterator([pipe], names, reader_name="Reader",
                                         last_batch_policy=policy, auto_reset=False)
        self._first_epoch, self._epochs_done = self.epoch, 0
        self._built_resolution = size

    def _convert(self, out: dict):
        # NHWC -> NCHW view: the memory is already channels-last, so this is free.
        images = out["images"].permute(0, 3, 1, 2)
        images = images.to(self.device, self.dtype, non_blocking=True)
        labels = out["labels"].reshape(-1).to(self.device, non_blocking=True)
        if not self.keys:
            return images, labels
        keys = [bytes(k.cpu().numpy()).rstrip(b"\0").decode().rsplit(":", 1)[-1].split(".")[0]
                for k in out["keys"]]
        return images, labels, keys

    def _epoch_batches(self):
        start, stop = self._share()
        b = self.cfg.batch_size
        # This rank's real batches; fewer than len(self) only in the empty-trailing-batch case.
        mine = self._len if self.drop_last else math.ceil((stop - start) / b)
        yielded, finished = 0, False
        try:
            for out in self._iter:
                batch = self._convert(out[0])
                n = batch[1].shape[0]
                if yielded == self._len or n == 0:
                    continue  # DALI's all-padding batch, or (drop_last) batches past the end: drain
                if mine < self._len and yielded == mine - 1:
                    # Split the last full batch so this rank also yields len(self) batches.
                    half = (n + 1) // 2
                    yield tuple(x[:half] for x in batch)
                    batch = tuple(x[half:] for x in batch)
                    yielded += 1
                yield batch
                yielded += 1
            finished = True
        except RuntimeError as e:
            why = self._explain(e)
            if why is None:
                raise
            raise RuntimeError(why) from e
        finally:
            if finished:
                self._iter.reset()
                self._epochs_done += 1
            else:  # loop left mid-epoch (break, error): DALI cannot rewind, start afresh next time
                self._iter = self._pipe = None
        if yielded != self._len:
            raise RuntimeError(f"DALI yielded {yielded} batches on rank {self.rank}, expected "
                               f"{self._len}: ranks would fall out of step (please report this)")

    def _explain(self, e: RuntimeError) -> str | None:
        """A message that says what to do, or None to let the error through as it is."""
        said = str(e)
        if _OUT_OF_MEMORY.search(said):  # not a bad file: searching the shards would only delay the error
            return (f"DALI ran out of memory on rank {self.rank}: lower --batch-size (per GPU), or "
                    f"data.prefetch ({self.cfg.prefetch}), or the hardware decoder's share "
                    f"(data.hw_decoder_load={self.cfg.hw_decoder_load}).\nDALI said:\n{e}")
        if "decoders." not in said and "codec" not in said.lower():
            return None  # not raised by a decoder: nothing to look for in the shards
        # DALI reports "nvImageCodec failure" without naming the sample, and its shuffle buffer
        # hides which one it was, so look for it: this rank's own range first.
        first = self.rank * len(self.split.shards) // self.world
        order = self.split.shards[first:] + self.split.shards[:first]
        found = find_undecodable(order, budget_s=SEARCH_BUDGET_S)
        where = (f"sample {found[1]} in {found[0]} does not decode ({found[2]})" if found else
                 f"no undecodable sample found within {SEARCH_BUDGET_S:.0f} s of searching the "
                 f"{len(self.split.shards)} shards of split {self.split_name!r}")
        return (f"DALI failed while decoding a training batch: {where}. Run `imt-verify-shards "
                f"{self.manifest.root}` to check every shard, then remake them with `imt-make-shards` "
                f"(it skips undecodable images).\nDALI said:\n{e}")


SEARCH_BUDGET_S = 120.0  # time spent naming the bad sample after a decode failure
_OUT_OF_MEMORY = re.compile(r"out of memory|cudaErrorMemoryAllocation|bad_alloc|CUDA_ERROR_OUT_OF_MEMORY",
                            re.IGNORECASE)


def find_undecodable(shards, budget_s: float) -> tuple[str, str, str] | None:
    """(tar, key, error) of the first JPEG that libjpeg-turbo (DALI's CPU decoder) rejects,
    reading samples through their index; None if none is found within budget_s seconds."""
    import time

    from torchvision.io import decode_jpeg

    deadline = time.monotonic() + budget_s
    for shard in shards:
        with open(shard.tar, "rb") as tar:
            for sample in read_index(shard.index):
                offset, size, name = sample["jpg"]
                tar.seek(offset)
                data = torch.frombuffer(bytearray(tar.read(size)), dtype=torch.uint8)
                try:
                    decode_jpeg(data)
                except RuntimeError as e:
                    return str(shard.tar), name.rsplit(".", 1)[0], str(e).strip()
                if time.monotonic() > deadline:
                    return None
    return None
