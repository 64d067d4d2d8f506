"""DALI loader: webdataset shards -> decode + random crop -> resize -> flip + normalise, on the
GPU ("mixed" nvJPEG decode) or, with no GPU, the same graph with CPU operators (device_id=None).

Where the stages run, by data.dali_device (see `placement`):
    gpu          decode "mixed" (nvJPEG, hardware decoder), resize/flip/normalise on the GPU
    cpu-decode   decode + random crop on CPU threads (libjpeg-turbo), the uint8 crop crosses to the GPU,
                 resize/flip/normalise on the GPU: NVIDIA's DeepLearningExamples "dali-cpu" backend, which
                 leaves the GPU's decoders to the model (recommended there for ResNet-50 on DGX A100)
    cpu          everything on CPU threads; with a GPU to train on, the pipeline emits uint8 (a quarter of
                 float32's bytes) and pipeline.common.normalise runs on the GPU
    auto         gpu with a CUDA training device, cpu otherwise

    loader = DaliLoader(cfg, "train", dist, train=True)
    for images, labels in loader: ...     # N x 3 x H x W channels-last, cfg.dtype, on dist.device

Choices, with reasons:
- Channels-last for free: DALI emits HWC (its native layout); `permute(0, 3, 1, 2)` of an NHWC
  tensor *is* an NCHW tensor in channels_last memory format, no copy.
- bfloat16: DALI 2.4 has no BFLOAT16 type (types.DALIDataType lists FLOAT16, FLOAT, FLOAT64), so
  the graph emits float16 on the GPU (half the bytes of float32; normalised values lie in
  [-2.2, 2.7], far inside fp16's range and finer than bf16's 8-bit mantissa) and the wrapper casts
  on the device. A CPU graph emits float32 for CPU training and uint8 for a GPU (`output_type`).
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
  e is the next epoch and rebuilds it seeded by (seed, e) otherwise (jumping epochs). The loader
  resets DALI's iterator itself when it hands out an epoch's last batch, so the stream continues
  whether or not its consumer asks for one more batch.
- Resume: the training pipeline is built with `enable_checkpointing=True`, and `state_dict()` holds
  DALI's checkpoint of it (reader positions and shuffle buffers, every random generator's state: a few
  hundred bytes) taken at the last batch handed out, mid-epoch or between epochs. `load_state_dict`
  rebuilds the pipeline with the seeds it was first built with and restores that checkpoint, so the
  resumed run yields the batches the uninterrupted one would have: same keys, and on the CPU the same
  pixels (tests/pipeline/test_resume.py). DALI's checkpoint restores only an identical pipeline, and
  its sample order is internal to the reader, so training pipelines also output each sample's key and
  the state records the samples trained this epoch. On another number of ranks or batch size, what no
  rank trained is split among the new ranks (common.split_rest) and each builds a one-epoch pipeline over
  index files that list exactly its samples (lines of the shards' own .idx files: no data is copied).
  Validation reads the stored order with `stick_to_shard`.
- Shards on object storage larger than data.cache_limit (pipeline/remote.py): the epoch's order is
  common.windowed_order's, and each window's batches are read by a pipeline built over them once their tars
  are in the cache (`_stream_epoch`).
- EXIF orientation is ignored (`adjust_orientation=False`), as torchvision/PIL's ImageFolder
  does, so both loaders (and pretrained torchvision weights) see the same pixels.
- Resolution: the crop size is fixed per pipeline; `set_resolution(px)` rebuilds the pipeline at
  the next epoch boundary. A runtime input (external_source) would not work: the iterator
  prefetches the next epoch's first batches before the loop can call set_resolution, so they
  would come out at the old size. Progressive resizing changes size a handful of times per run,
  and a rebuild costs a pipeline start (about 0.2 s on the CPU here) plus refilling the buffer.
- GPU outputs are copied into tensors torch allocates (`exec_dynamic=False`, see `executor_args`).
"""
from __future__ import annotations

import math
import re
from typing import Iterator

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from .augment import dali_auto_augment, dali_random_erase
from .common import (MEAN, STD, Position, epoch_order, label_outside, load_split, mix_seed, normalise,
                     rank_batches, read_label, seeded_plan, split_rest, torch_dtype)
from .config import DataConfig
from .manifest import ManifestError, read_index

# nvJPEG buffers sized for the largest ImageNet training image (NVIDIA's RN50 example), so the
# decoder never reallocates, and device memory does not grow, during the first epoch.
DEVICE_MEMORY_PADDING = 211_025_920
HOST_MEMORY_PADDING = 140_544_512
PREALLOCATE_WIDTH, PREALLOCATE_HEIGHT = 5980, 6430


def decoder_args(cfg: DataConfig, decode: str, train: bool) -> dict:
    """The decoder's device and nvJPEG settings. The paddings are per DALI thread (211 MB of device memory
    and 2 x 140 MB of pinned host memory each: at 16 threads 3.4 GB and 4.5 GB) and only the training
    pipeline, which decodes every image of every epoch, gets them, as in NVIDIA's RN50 example. The validation
    pipeline keeps DALI's defaults (16 MB device, 2 x 8 MB pinned host per thread): it decodes one pass per
    evaluation, so nvJPEG growing its buffers during the first pass costs little."""
    if decode != "mixed":
        return dict(device="cpu")
    if not train:
        return dict(device="mixed", hw_decoder_load=cfg.hw_decoder_load)
    return dict(device="mixed", hw_decoder_load=cfg.hw_decoder_load, device_memory_padding=DEVICE_MEMORY_PADDING,
                host_memory_padding=HOST_MEMORY_PADDING, preallocate_width_hint=PREALLOCATE_WIDTH,
                preallocate_height_hint=PREALLOCATE_HEIGHT)


@pipeline_def(enable_conditionals=True)  # nvidia.dali.auto_aug picks operations with `if`
def _graph(tars, indexes, *, train: bool, decode: str, augment_gpu: bool, out_type, size: int,
           resize_shorter: int, cfg: DataConfig, shard_id: int, num_shards: int, reader_seed: int,
           order_seed: int, keys: bool, label_ext: str = "lbl", one_epoch: bool = False):
    reader_args = dict(random_shuffle=True, initial_fill=cfg.shuffle_buffer, seed=reader_seed,
                       shuffle_after_epoch=True, shuffle_after_epoch_seed=order_seed) if train else \
        dict(stick_to_shard=True)
    if one_epoch:  # the rest of an epoch after a change of ranks: this rank's own samples, shuffled once
        reader_args = dict(random_shuffle=True, initial_fill=cfg.shuffle_buffer, seed=reader_seed)
    jpegs, labels = fn.readers.webdataset(
        paths=tars, index_paths=indexes, ext=["jpg", label_ext],
        dtypes=[types.UINT8, types.INT64 if label_ext == "lbl" else types.UINT8],
        shard_id=shard_id, num_shards=num_shards, pad_last_batch=True, name="Reader",
        missing_component_behavior="error", **reader_args)
    if label_ext == "lblsize":  # adopted shards: the label is the component's byte count - 1 (index_shards)
        labels = labels.shape(dtype=types.INT64) - 1
    decode_args = decoder_args(cfg, decode, train)
    to_gpu = augment_gpu and decode == "cpu"  # cpu-decode: the uint8 decoded crop crosses here
    if train:
        images = fn.decoders.image_random_crop(
            jpegs, output_type=types.RGB, random_area=[cfg.min_area, 1.0],
            random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10, adjust_orientation=False,
            **decode_args)
        images = images.gpu() if to_gpu else images
        # Antialiased bilinear, as torchvision's RandomResizedCrop (antialias=True).
        images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR,
                           antialias=True)
        mirror = fn.random.coin_flip(probability=0.5)
        images = dali_auto_augment(images, cfg, size, seed=None)  # RandAugment / TrivialAugment or nothing
        crop = {}
    else:
        images = fn.decoders.image(jpegs, output_type=types.RGB, adjust_orientation=False,
                                   **decode_args)
        images = images.gpu() if to_gpu else images
        resize, crop = _torchvision_resize_crop(
            fn.peek_image_shape(jpegs, adjust_orientation=False), resize_shorter, size)
        images = fn.resize(images, **resize, interp_type=types.INTERP_LINEAR, antialias=True)
        mirror = 0
    norm = {} if out_type == types.UINT8 else dict(mean=[255 * m for m in MEAN], std=[255 * s for s in STD])
    images = fn.crop_mirror_normalize(images, mirror=mirror, dtype=out_type, output_layout="HWC", **norm, **crop)
    if train:  # erased to the mean colour: 0 once normalised, the mean's uint8 value before (normalised on the GPU)
        images = dali_random_erase(images, cfg, fill=[round(255 * m) for m in MEAN] if norm == {} else 0.0)
    # With GPU outputs the labels also come out on the host, for the range check in DaliLoader._convert (B int64
    # per batch; checking the device copy would cost a host sync per step).
    outputs = [images, labels.gpu(), labels] if augment_gpu else [images, labels]
    if keys:  # "<tar>:<offset>:<key>.jpg", zero-padded to a dense batch: which samples were trained
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


DALI_DEVICES = ("auto", "gpu", "cpu-decode", "cpu")


def placement(cfg: DataConfig, device: torch.device) -> tuple[str, bool]:
    """(decoder device "mixed" | "cpu", whether resize/flip/normalise run on the GPU) for data.dali_device
    on the training `device` (the table in the module docstring)."""
    mode = cfg.dali_device
    if mode not in DALI_DEVICES:
        raise ValueError(f"DataConfig.dali_device={mode!r}: expected one of {', '.join(DALI_DEVICES)}")
    if mode in ("gpu", "cpu-decode") and device.type != "cuda":
        raise ValueError(f"DataConfig.dali_device={mode!r} puts {'decoding and ' if mode == 'gpu' else ''}"
                         f"resize/flip/normalise on a GPU, but the training device is {device}; use "
                         "dali_device='cpu' (or 'auto') without a GPU")
    if mode == "auto":
        mode = "gpu" if device.type == "cuda" else "cpu"
    return {"gpu": ("mixed", True), "cpu-decode": ("cpu", True), "cpu": ("cpu", False)}[mode]


def output_type(cfg: DataConfig, augment_gpu: bool, device: torch.device):
    """The DALI dtype the graph emits. On the GPU float16 for bf16/fp16 runs (DALI has no bfloat16; the
    wrapper casts on the device), else float32. A CPU graph feeding a GPU emits uint8 (a quarter of float32's
    bytes through the host-to-device copy; normalised there). A CPU graph for CPU training normalises in
    DALI's threads and emits float32, which torch casts to bf16 twice as fast as float16 (9.8 vs 19.3 ms per
    64 x 224 px batch on one core here)."""
    if augment_gpu:
        return types.FLOAT16 if cfg.dtype in ("float16", "bfloat16") else types.FLOAT
    if device.type == "cuda":
        return types.UINT8
    return types.FLOAT16 if cfg.dtype == "float16" else types.FLOAT


def executor_args(gpu_outputs: bool) -> dict:
    """DALI executor settings: a pipeline with GPU outputs runs DALI's classic executor.

    DALI 2.4's default dynamic executor makes DALIGenericIterator hand out zero-copy DLPack views of DALI's
    own buffers (nvidia/dali/plugin/pytorch/__init__.py: `copy = not is_exec_dynamic`). When torch drops the
    last reference, the DLPack deleter returns the buffer to DALI in *DALI's* stream order, while the host has
    run ahead and torch's kernels that read the batch (the cast, the loss reading the labels, backward reading
    the first convolution's input) may still be queued on torch's stream: a later batch could overwrite them.
    DLPack cannot pass the consumer's stream to the deleter (dmlc/dlpack#176); DALI had the same class of bug
    in its JAX plugin (NVIDIA/DALI#5617).

    With `exec_dynamic=False` the iterator allocates each output with torch (`torch.empty` on the caching
    allocator, so torch's own stream-ordered lifetime rules apply) and copies into it on torch's current
    stream (`feed_ndarray(..., cuda_stream=torch.cuda.current_stream())`); DALI's `copy_to_external` makes
    that stream wait for the data and then makes the source buffer's order wait for the copy
    (dali/python/backend_impl.cc, CopyToExternalImplGPU: `wait_order.wait(copy_order)`), so DALI cannot
    recycle its buffer before the copy has run either. Safe by construction, for one device-to-device copy
    per batch (77 MB at 256 x 224 x 224 x 3 float16: well under a millisecond at H100 bandwidth; not yet
    measured here). The other fix, keeping each batch's DALI outputs alive until a CUDA event recorded after
    torch's last use of them has completed, needs the loader to learn when the training step is done with a
    batch, which the Loader contract does not tell it.

    CPU-only pipelines keep the dynamic executor: their outputs are host memory that torch's CPU operators are
    done with when they return, and a copy to a GPU from pageable host memory has staged its source before it
    returns."""
    return {"exec_dynamic": False} if gpu_outputs else {}


class DaliLoader:
    """The Loader contract over a DALI pipeline (see the module docstring for the semantics)."""

    def __init__(self, cfg: DataConfig, split: str, dist, *, train: bool, keys: bool = False, cache=None):
        self.cfg, self.split_name, self.train, self.keys = cfg, split, train, keys
        self.rank, self.world, self.device = dist.rank, dist.world_size, torch.device(dist.device)
        self.manifest, self.split = load_split(cfg.path, split, check_tars=cache is None)
        self.stream = None  # a data set larger than data.cache_limit: a remote.Stream (see _stream_epoch)
        if cache is not None:
            from .remote import Stream
            self.stream = Stream(cache, self.split, self.manifest)
        self.classes = self.manifest.classes
        self.decode, self.gpu = placement(cfg, self.device)  # gpu: the pipeline's outputs are on the GPU
        self.out_type = output_type(cfg, self.gpu, self.device)
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
        self.pos = Position("dali", world=w, rank=self.rank, batch=b, drop_last=self.drop_last, seed=cfg.seed,
                            samples=n)
        self._left_at: dict | None = None  # the DALI checkpoint of a pipeline left mid-epoch (stop, step cap)
        # Samples (index in the split: make_shards names them <split>_<index>) trained this epoch: what a
        # resume on other ranks must not train again. DALI's own order is internal to its reader.
        self._consumed: list[int] = []
        self._elastic: tuple | None = None  # (epoch, state, this rank's batches) of a resume on other ranks
        self._index_of: dict[bytes, int] | None = None  # adopted data sets: sample name -> index in the split

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

    def state_dict(self) -> dict:
        """The position plus DALI's own checkpoint of the pipeline at that point (reader positions, shuffle
        buffers, every random generator: `enable_checkpointing`), and what the pipeline was built with."""
        extra = {"dali": b"", "built_epoch": self._first_epoch, "resolution": self._built_resolution or 0,
                 "consumed": torch.tensor(self._consumed if self.pos.done else [], dtype=torch.int32),
                 "one_epoch": self._first_epoch < 0 and self.stream is None}
        if self._left_at is not None and (self._left_at["epoch"], self._left_at["done"]) == \
                (self.pos.epoch, self.pos.done):
            extra.update(dali=self._left_at["dali"], built_epoch=self._left_at["built_epoch"],
                         resolution=self._left_at["resolution"])
        elif self._iter is not None and self.train and self._first_epoch >= 0:
            extra["dali"] = self._checkpoint()
        return self.pos.state_dict(**extra)

    def load_state_dict(self, state: dict) -> str:
        """Same ranks and batch size: the pipeline is rebuilt from DALI's checkpoint, so the epoch continues
        with exactly the samples and augmentations the interrupted run would have produced next. DALI's
        checkpoint restores only an identical pipeline: on other ranks or another batch size (`state` then
        joins every old rank's "consumed", common.combine_states), the samples no rank trained are split among
        the new ranks (rank_batches) and each rank's pipeline reads exactly its part, once."""
        self._elastic = None
        note = self.pos.load(state, elastic=True)
        if self.stream is not None:  # the plan is a function of (seed, epoch, ranks): epoch_plan resumes it
            return note
        if self.pos.pending is not None and (state.get("one_epoch") or not self.pos.same_run(state)):
            if "consumed_all" not in state:
                self.pos.pending = None
                return (f"epoch {int(state['epoch']) + 1} restarts from its beginning: the state does not say "
                        "which samples every rank trained (pass all ranks' states through "
                        "pipeline.common.combine_states)")
            epoch = int(state["epoch"])
            trained = set(torch.as_tensor(state["consumed_all"]).tolist())
            rest = [i for i in range(self.split.num_samples) if i not in trained]
            order = [rest[i] for i in epoch_order(len(rest), self.cfg.seed, epoch, train=True,
                                                  salt=(len(trained),))[0]]
            self._elastic = (epoch, sorted(trained), split_rest(order, self.world, self.rank,
                                                                self.cfg.batch_size, self.drop_last))
        return note

    def position(self) -> tuple[int, int]:
        resume = self.pos.resume_for(self.epoch)
        if self.stream is not None:
            left = len(self._stream_plan(self.epoch, resume[0])[0]) - resume[1] if resume else self._len
            return self._len - left, left
        if resume is not None and self._elastic is not None and self._elastic[0] == self.epoch:
            return self._len - len(self._elastic[2]), len(self._elastic[2])
        start = resume[1] if resume else 0
        return start, self._len - start

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.stream is not None:
            yield from self._stream_epoch()
            return
        resume = self.pos.pending if self.pos.resume_for(self.epoch) else None
        elastic = self._elastic if resume is not None and self._elastic and self._elastic[0] == self.epoch \
            else None
        self._elastic = None
        _, start = self.pos.begin(self.epoch)
        self.pos.end = self._len
        self._consumed = [int(i) for i in torch.as_tensor(resume["consumed"]).tolist()] if resume else []
        try:  # the iterator runs the first batches when it is built: a bad sample can fail already
            if elastic is not None:
                self.pos.done = start = 0
                self.pos.end = len(elastic[2])
                # Rank 0 carries what the earlier runs trained, so all ranks' states together still say it all.
                self._consumed = list(elastic[1]) if self.rank == 0 else []
                self._build_rest([i for b in elastic[2] for i in b])
            elif resume is not None and resume.get("dali") and int(resume["resolution"]) == self.resolution:
                self._build(checkpoint=resume["dali"], built_epoch=int(resume["built_epoch"]))
            elif resume is not None:  # made at another resolution: the uninterrupted run rebuilt here too
                self.pos.done = start = 0
                self._build()
            # Validation reads the same samples in the same order every pass: its pipeline is kept (rebuilding
            # it for each evaluation redid the decoder's start-up every epoch).
            elif (self._iter is None or self._built_resolution != self.resolution
                    or (self.train and self.epoch != self._first_epoch + self._epochs_done)):
                self._build()
        except RuntimeError as e:
            self._iter = self._pipe = None
            if (why := self._explain(e)) is None:
                raise
            raise RuntimeError(why) from e
        if elastic is not None:
            yield from self._epoch_batches(0, size=sum(map(len, elastic[2])), length=len(elastic[2]))
            return
        yield from self._epoch_batches(start)

    # --- internals ----------------------------------------------------------------------------
    def _share(self) -> tuple[int, int]:
        """DALI's sample range for this rank: [N*r//W, N*(r+1)//W)."""
        n, w, r = self.split.num_samples, self.world, self.rank
        return n * r // w, n * (r + 1) // w

    def _free(self) -> None:
        """Shut the pipeline down now (DALI's own teardown, what Pipeline.__del__ runs), so its nvJPEG
        buffers (device and pinned host, per thread) are released before another pipeline allocates its own,
        not whenever Python collects the old objects."""
        if self._pipe is not None:
            self._pipe._shutdown()
        self._iter = self._pipe = None

    def _build(self, checkpoint: bytes | None = None, built_epoch: int | None = None) -> None:
        """A pipeline seeded by (seed, epoch) whose stream starts at this epoch; or, from `checkpoint`, the
        pipeline first built at `built_epoch` (same seeds) restored to where its checkpoint was taken."""
        self._free()  # the old pipeline's buffers go before the new one's are allocated
        self._left_at = None
        cfg, size = self.cfg, self.resolution
        first = self.epoch if built_epoch is None else built_epoch
        pipe = _graph(
            self.split.tars, self.split.indexes, train=self.train, decode=self.decode,
            augment_gpu=self.gpu, out_type=self.out_type, size=size,
            resize_shorter=int(cfg.val_resolution / cfg.val_resize_ratio), cfg=cfg,
            shard_id=self.rank, num_shards=self.world,
            reader_seed=mix_seed(cfg.seed, first, self.rank), order_seed=mix_seed(cfg.seed, first),
            keys=self.keys or self.train, label_ext=self.manifest.label_ext, batch_size=cfg.batch_size,
            num_threads=max(1, cfg.workers),
            device_id=(self.device.index or 0) if self.gpu else None,
            prefetch_queue_depth=cfg.prefetch, seed=mix_seed(cfg.seed, first, self.rank, 1),
            enable_checkpointing=self.train, checkpoint=checkpoint or None, **executor_args(self.gpu))
        pipe.build()
        names = self._names(self.keys or self.train)
        policy = LastBatchPolicy.DROP if self.drop_last else LastBatchPolicy.PARTIAL
        self._pipe = pipe
        self._iter = DALIGenericIterator([pipe], names, reader_name="Reader",
                                         last_batch_policy=policy, auto_reset=False)
        self._first_epoch, self._epochs_done = first, self.epoch - first
        self._built_resolution = size

    def _stream_plan(self, epoch: int, segments: list) -> tuple[list[list[int]], list[list[int]]]:
        """This rank's batches of a streamed epoch and the epoch's windows (shard numbers), as the torch loader
        plans them."""
        return seeded_plan(self.split.num_samples, self.cfg.seed, epoch, train=self.train, world=self.world,
                           rank=self.rank, batch=self.cfg.batch_size, drop_last=self.drop_last, segments=segments,
                           windows=self.stream.windows)

    def _stream_epoch(self):
        """An epoch of a data set larger than the cache. DALI's readers open their files when the pipeline is
        built, so the plan's batches are read in groups, one per window (a batch goes with its first sample's
        window), each by a pipeline over exactly its samples (_build_rest), built once the Feeder has the
        group's tars in the cache; it fetches the next window's meanwhile. Within a group DALI's reader
        shuffles through its buffer (data.shuffle_buffer), as the whole-data-set pipeline does, so a batch
        holds the group's samples but not the plan's exact batch. A resume inside a group rebuilds that group's
        pipeline and drops the batches already trained (decoded again: at most one window's share of this
        rank), so the keys, and on the CPU the pixels, are the uninterrupted run's."""
        import threading

        segments, start = self.pos.begin(self.epoch)
        plan, windows = self._stream_plan(self.pos.epoch, segments)
        self.pos.end = len(plan)
        if start >= len(plan):
            return
        window_of = {s: k for k, w in enumerate(windows) for s in w}
        first_window = [window_of[s] for s in self.stream.shard_of([b[0] for b in plan])]
        cuts = [0] + [j for j in range(1, len(plan)) if first_window[j] != first_window[j - 1]] + [len(plan)]
        ready, cond = [0], threading.Condition()

        def on_ready(k: int) -> None:
            with cond:
                ready[0] = k
                cond.notify_all()

        feeder = self.stream.feeder(plan[start:], on_ready)
        try:
            for first, stop in zip(cuts, cuts[1:]):
                if stop <= start:
                    continue
                with cond:
                    cond.wait_for(lambda: ready[0] < 0 or ready[0] >= stop - start)
                if ready[0] < 0:
                    raise feeder.error
                samples = [i for b in plan[first:stop] for i in b]
                self._build_rest(samples, part=first)
                skip, before = max(0, start - first), len(self._consumed)
                self.pos.done = first
                for j, piece in enumerate(self._epoch_batches(0, size=len(samples), length=stop - first)):
                    if j < skip:  # trained before the resume: its samples are in the state's "consumed"
                        continue
                    if j == skip and skip:
                        del self._consumed[before:before + sum(map(len, plan[first:start]))]
                    yield piece
                    feeder.consumed += 1
                self._free()  # its tars may be evicted now: files it held open would keep their disk space
        finally:
            feeder.close()

    def _build_rest(self, samples: list[int], part: int | None = None) -> None:
        """A pipeline for one epoch that reads exactly `samples` (indices in the split), through index files
        that list only them (the shard's own .idx lines: DALI reads them by offset, nothing is copied).
        `part`: which group of a streamed epoch (_stream_epoch), in the seeds."""
        import tempfile
        from pathlib import Path

        self._free()
        self._left_at = None
        wanted = set(samples)
        tars, indexes, first = [], [], 0
        with tempfile.TemporaryDirectory(prefix="imt-rest-") as tmp:
            for si, shard in enumerate(self.split.shards):
                lines = Path(shard.index).read_text().splitlines()[1:]
                mine = [ln for j, ln in enumerate(lines) if first + j in wanted]
                first += len(lines)
                if mine:
                    index = Path(tmp) / f"{si:06d}.idx"
                    index.write_text(f"v1.2 {len(mine)}\n" + "\n".join(mine) + "\n")
                    tars.append(str(shard.tar))
                    indexes.append(str(index))
            cfg = self.cfg
            seeds = (cfg.seed, self.epoch, self.rank) + (() if part is None else (part,))
            pipe = _graph(
                tars, indexes, train=self.train, decode=self.decode, augment_gpu=self.gpu, out_type=self.out_type,
                size=self.resolution, resize_shorter=int(cfg.val_resolution / cfg.val_resize_ratio), cfg=cfg,
                shard_id=0, num_shards=1, reader_seed=mix_seed(*seeds, 2), order_seed=0,
                keys=True, label_ext=self.manifest.label_ext, one_epoch=True, batch_size=cfg.batch_size,
                num_threads=max(1, cfg.workers), device_id=(self.device.index or 0) if self.gpu else None,
                prefetch_queue_depth=cfg.prefetch, seed=mix_seed(*seeds, 3),
                **executor_args(self.gpu))
            pipe.build()  # reads the index files now
        self._pipe = pipe
        names = self._names(True)
        policy = LastBatchPolicy.DROP if self.drop_last else LastBatchPolicy.PARTIAL
        self._iter = DALIGenericIterator([pipe], names, reader_name="Reader", last_batch_policy=policy,
                                         auto_reset=False)
        self._first_epoch, self._epochs_done = -1, 0  # never continued into another epoch
        self._built_resolution = self.resolution

    def _names(self, keys: bool) -> list[str]:
        """The iterator's output names, in the graph's output order."""
        return ["images", "labels"] + (["host_labels"] if self.gpu else []) + (["keys"] if keys else [])

    def _checkpoint(self) -> bytes:
        return self._iter.checkpoints()[0]  # serialized protobuf (a few hundred bytes)

    def _convert(self, out: dict):
        # NHWC -> NCHW view: the memory is already channels-last, so this is free.
        images = out["images"].permute(0, 3, 1, 2)
        if images.dtype == torch.uint8:  # dali_device=cpu feeding a GPU: normalise there
            images = normalise(images.to(self.device, non_blocking=True), self.dtype)
        else:
            images = images.to(self.device, self.dtype, non_blocking=True)
        # An out-of-range label would make cross_entropy fail naming no sample (on a GPU: a device-side assert
        # that ends the process), so it is checked first: one comparison over the batch's labels on the host.
        host = out["host_labels" if self.gpu else "labels"]
        if bool(((host < 0) | (host >= len(self.classes))).any()):
            raise self._label_error(host)
        labels = out["labels"].reshape(-1).to(self.device, non_blocking=True)
        if "keys" not in out:
            return images, labels
        keys = [bytes(k.cpu().numpy()).rstrip(b"\0").decode().rsplit(":", 1)[-1].split(".")[0]
                for k in out["keys"]]
        return (images, labels, keys) if self.keys else (images, labels)

    def _epoch_batches(self, yielded: int = 0, size: int | None = None, length: int | None = None):
        start, stop = self._share()
        b, length = self.cfg.batch_size, self._len if length is None else length
        size = stop - start if size is None else size
        # This rank's real batches; fewer than `length` only in the empty-trailing-batch case.
        mine = length if self.drop_last else math.ceil(size / b)
        finished = False
        try:
            for out in self._iter:
                batch = self._convert(out[0])
                n = batch[1].shape[0]
                if n == 0:
                    continue  # DALI's all-padding batch
                keys = self._keys(out[0]) if self.train else []
                pieces = [(batch, keys)]
                if mine < length and yielded == mine - 1:
                    # Split the last full batch so this rank also yields `length` batches.
                    half = (n + 1) // 2
                    pieces = [(tuple(x[:half] for x in batch), keys[:half]),
                              (tuple(x[half:] for x in batch), keys[half:])]
                for piece, trained in pieces:
                    self._consumed.extend(trained)
                    if yielded + 1 == length:
                        # The epoch's last batch: run DALI's iterator to its end (padding, or with drop_last
                        # the batches past it) and reset it before handing the batch out, so the next epoch
                        # continues the stream instead of rebuilding the pipeline, whether or not the
                        # consumer asks for another batch. Its tensors are the iterator's new ones.
                        for _ in self._iter:
                            pass
                        self._iter.reset()
                        self._epochs_done += 1
                        finished = True
                    yielded += 1
                    self.pos.step()
                    yield piece
                if finished:
                    break
            finished = True
        except RuntimeError as e:
            why = self._explain(e)
            if why is None:
                raise
            raise RuntimeError(why) from e
        finally:
            if not finished:  # loop left mid-epoch (stop, step cap, error): keep DALI's checkpoint of this point
                self._left_at = None
                if self._iter is not None and self.train and self._first_epoch >= 0:
                    try:
                        self._left_at = {"epoch": self.pos.epoch, "done": self.pos.done, "dali": self._checkpoint(),
                                         "built_epoch": self._first_epoch, "resolution": self._built_resolution}
                    except (RuntimeError, AttributeError):  # AttributeError: DALI's pipeline already shut down
                        pass  # (the pipeline failed, or the interpreter is exiting): resume from the epoch's start
                self._free()  # DALI cannot rewind: start afresh (or from that checkpoint)
        if yielded != length:
            raise RuntimeError(f"DALI yielded {yielded} batches on rank {self.rank}, expected "
                               f"{length}: ranks would fall out of step (please report this)")

    def _keys(self, out: dict) -> list[int]:
        """The batch's samples as indices in the split. make_shards names sample i `<split>_<i:08d>`, so the
        index is read from the name (one bytes object per batch: 0.3 ms per 256 keys here, against 2 ms row by
        row, measured); an adopted data set's names are looked up in its index files (read once)."""
        a = out["keys"].cpu().numpy()
        raw, width = a.tobytes(), a.shape[1]
        names = [raw[i:i + width].rstrip(b"\0").rsplit(b":", 1)[-1].rsplit(b".", 1)[0]
                 for i in range(0, len(raw), width)]
        if not self.manifest.adopted:
            return [int(n.rsplit(b"_", 1)[-1]) for n in names]
        if self._index_of is None:
            from .manifest import read_index
            self._index_of, first = {}, 0
            for shard in self.split.shards:
                idx = read_index(shard.index)
                col, c = idx.column("jpg"), len(idx.exts)
                for j in range(len(idx)):
                    self._index_of[idx.names[j * c + col].rsplit(".", 1)[0].encode()] = first + j
                first += len(idx)
        return [self._index_of[n] for n in names]

    def _label_error(self, labels: torch.Tensor):
        """The error for a batch holding a label outside [0, classes): DALI does not say which sample it read,
        so the split's labels are searched (this rank's range first), as for an undecodable sample."""
        n = len(self.classes)
        value = int(labels[(labels < 0) | (labels >= n)].reshape(-1)[0])
        found = find_label_outside(self._search_order(), n, budget_s=SEARCH_BUDGET_S,
                                       label_ext=self.manifest.label_ext)
        if found:
            return label_outside(found[2], n, found[1], found[0])
        return ManifestError(f"a batch of split {self.split_name!r} holds label {value}, outside [0, {n}) for the "
                             f"{n} classes of {self.manifest.root / 'manifest.json'}; the sample was not found "
                             f"within {SEARCH_BUDGET_S:.0f} s. Run `imt-verify-shards {self.manifest.root}`, then "
                             "remake the shards with `imt-make-shards`")

    def _search_order(self):
        """The split's shards, this rank's own range first: where a bad sample of its batch most likely is."""
        first = self.rank * len(self.split.shards) // self.world
        return self.split.shards[first:] + self.split.shards[:first]

    def _explain(self, e: RuntimeError) -> str | None:
        """A message that says what to do, or None to let the error through as it is."""
        said = str(e)
        if _OUT_OF_MEMORY.search(said):  # not a bad file: searching the shards would only delay the error
            return (f"DALI ran out of memory on rank {self.rank}: lower --batch-size (per GPU), or "
                    f"data.prefetch ({self.cfg.prefetch}), or the hardware decoder's share "
                    f"(data.hw_decoder_load={self.cfg.hw_decoder_load}).\nDALI said:\n{e}")
        if _MISSING_LIBRARY.search(said):  # no sample is at fault: searching the shards would only delay this
            return (f"DALI could not load a library it needs (its decoders use nvImageCodec, and nvJPEG on the "
                    f"GPU): install the one named below for DALI's CUDA version, e.g. `pip install "
                    f"nvidia-nvimgcodec-cu12` (-cu13 for DALI's CUDA 13 build).\nDALI said:\n{e}")
        if "decoders." not in said or not _DECODE_FAILURE.search(said):
            return None  # not a decoder failing on its input: nothing to look for in the shards
        # DALI reports "nvImageCodec failure" without naming the sample, and its shuffle buffer
        # hides which one it was, so look for it: this rank's own range first.
        found = find_undecodable(self._search_order(), budget_s=SEARCH_BUDGET_S)
        where = (f"sample {found[1]} in {found[0]} does not decode ({found[2]})" if found else
                 f"no undecodable sample found within {SEARCH_BUDGET_S:.0f} s of searching the "
                 f"{len(self.split.shards)} shards of split {self.split_name!r}")
        return (f"DALI failed while decoding a training batch: {where}. Run `imt-verify-shards "
                f"{self.manifest.root}` to check every shard, then remake them with `imt-make-shards` "
                f"(it skips undecodable images).\nDALI said:\n{e}")


SEARCH_BUDGET_S = 120.0  # time spent naming the bad sample after a decode failure
# A decoder rejecting its input (what a bad sample causes), e.g. "nvImageCodec failure: '#3'" from DALI 2.4's
# CPU decoder on a corrupt JPEG (seen here); other errors raised in a decoder (CUDA errors, arguments) are not.
_DECODE_FAILURE = re.compile(r"nvImageCodec failure|nvjpeg.{0,20}(error|status)|failed to decode|cannot decode|"
                             r"could not decode|unsupported (image|format|jpeg)|corrupt|invalid (jpeg|marker|image)",
                             re.IGNORECASE)
# Libraries that did not load: DALI's "dlopen libnvimgcodec.so failed!. Please install nvimagecodec ..."
# (dali/nvimgcodec/nvimgcodec_wrap.cc), the loader's own "cannot open shared object file", a too-old version.
_MISSING_LIBRARY = re.compile(r"dlopen|cannot open shared object|please install|could not load (the )?librar|"
                              r"failed to load (the )?librar|undefined symbol|requires nvimagecodec|"
                              r"nvimagecodec.{0,40}(version|not (found|available|installed))", re.IGNORECASE)
_OUT_OF_MEMORY = re.compile(r"out of memory|cudaErrorMemoryAllocation|bad_alloc|CUDA_ERROR_OUT_OF_MEMORY",
                            re.IGNORECASE)


def find_label_outside(shards, num_classes: int, budget_s: float,
                       label_ext: str = "lbl") -> tuple[str, str, int] | None:
    """(tar, key, label) of the first sample whose label is outside [0, num_classes), read through the
    index (adopted shards, label_ext "lblsize": the component's size - 1); None if none is found within
    budget_s seconds."""
    import time

    deadline = time.monotonic() + budget_s
    for shard in shards:
        index = read_index(shard.index)
        with open(shard.tar, "rb") as tar:
            for i in range(len(index)):
                sample = index.sample(i)
                (offset, size, _), name = sample[label_ext], sample["jpg"][2]
                label = read_label(tar, offset) if label_ext == "lbl" else size - 1
                if not 0 <= label < num_classes:
                    return str(shard.tar), name.rsplit(".", 1)[0], label
                if time.monotonic() > deadline:
                    return None
    return None


def find_undecodable(shards, budget_s: float) -> tuple[str, str, str] | None:
    """(tar, key, error) of the first JPEG that libjpeg-turbo (DALI's CPU decoder) rejects,
    reading samples through their index; None if none is found within budget_s seconds."""
    import time

    from torchvision.io import decode_jpeg

    deadline = time.monotonic() + budget_s
    for shard in shards:
        index = read_index(shard.index)
        with open(shard.tar, "rb") as tar:
            for i in range(len(index)):
                offset, size, name = index.sample(i)["jpg"]
                tar.seek(offset)
                data = torch.frombuffer(bytearray(tar.read(size)), dtype=torch.uint8)
                try:
                    decode_jpeg(data)
                except RuntimeError as e:
                    return str(shard.tar), name.rsplit(".", 1)[0], str(e).strip()
                if time.monotonic() > deadline:
                    return None
    return None
