"""Pieces every loader shares: the Loader protocol, ImageNet statistics, dtype names."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Protocol

import numpy as np
import torch

if TYPE_CHECKING:
    from .manifest import Manifest, Shard, Split

# ImageNet channel statistics in 0..1 units (torchvision's); DALI wants them times 255.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"DataConfig.dtype={name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


@functools.lru_cache(maxsize=None)
def _normalise_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """MEAN * 255 and 1 / (STD * 255) as 1 x 3 x 1 x 1 float32 tensors, built once per device: made per
    batch, they cost two blocking host-to-device copies inside every `next(loader)` on a GPU."""
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
    inv_std = 1 / (torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255)
    return mean, inv_std


def normalise(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 N x 3 x H x W (any layout; an NHWC batch viewed as NCHW is already channels-last) ->
    normalised `dtype`, channels-last, on images' device. The one cast + normalise + layout step of every
    loader that hands uint8 to the device (a quarter of float32's bytes over PCIe or the pipe)."""
    mean, inv_std = _normalise_constants(images.device)
    x = images.contiguous(memory_format=torch.channels_last).float()
    return x.sub_(mean).mul_(inv_std).to(dtype)


class Loader(Protocol):
    """What the training loop sees; every backend converts its own batch format to this."""

    num_samples: int                # samples this rank yields per epoch (no padding duplicates)
    classes: tuple[str, ...]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...
    def __len__(self) -> int: ...  # batches per epoch on this rank, equal on every rank
    def set_epoch(self, epoch: int) -> None: ...
    def set_resolution(self, px: int) -> None: ...


def even_split(n: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of rank's share when n items are split as evenly as possible: the first
    n % world ranks get one more. No item is repeated or dropped."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


# ---- shard checks shared by the DALI and webdataset loaders --------------------------------------

TAR_BLOCK = 512


def check_shard_pair(shard: "Shard", split: str, root: Path) -> None:
    """Proof, before DALI sees them, that an index describes its tar. From the index alone (vectorised: about
    a second for ImageNet's 1.28 M lines, see read_index): every line holds the same components, .jpg and .lbl
    among them; every member's data starts on a 512-byte tar block after the previous member's data and its
    own 512-byte header, and ends inside the tar (DALI given an offset moved by 512 bytes segfaulted in 3 of 6
    runs). Then one read: the last member's tar header (the 512 bytes before its data) must name the member
    the index names, which catches a stale or swapped index of the same shape."""
    from .manifest import ManifestError, read_index

    hint = (f"run `imt-verify-shards {root}` to list every damaged file, then "
            f"`imt-make-shards --src <data> --out {root}` to rebuild")
    index = read_index(shard.index)
    if len(index) != index.count or not len(index):
        raise ManifestError(f"{shard.index}: header says {index.count} samples but it has {len(index)} lines; "
                            f"{hint}")
    index.column("jpg"), index.column("lbl")  # what the loaders read
    tar_size = shard.tar.stat().st_size
    offsets, sizes = index.offsets.reshape(-1), index.sizes.reshape(-1)  # every member, in tar order
    ends = offsets + sizes
    if (ends > tar_size).any():
        i = int(np.flatnonzero(ends > tar_size)[0])
        raise ManifestError(f"{shard.tar}: {tar_size} bytes, but {shard.index} places {index.names[i]} at "
                            f"{offsets[i]}+{sizes[i]}: the tar is truncated or the index is stale; {hint}")
    # Data starts on a tar block, after the previous member's data (rounded up to a block) and a header.
    earliest = np.concatenate(([0], ends[:-1] + (-ends[:-1] % TAR_BLOCK))) + TAR_BLOCK
    bad = (offsets % TAR_BLOCK != 0) | (offsets < earliest) | (sizes < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        previous = f"{index.names[i - 1]}, whose data ends at {ends[i - 1]}" if i else "none"
        raise ManifestError(
            f"{shard.index} line {i // len(index.exts) + 2}: {index.names[i]} at byte {offsets[i]} (+{sizes[i]}) is "
            f"not where a member of {shard.tar.name} can start: offsets must be 512-byte aligned, after the "
            f"previous member ({previous}) and its own header. The index is stale or edited; {hint}")
    offset, name = int(offsets[-1]), index.names[-1]
    with open(shard.tar, "rb") as f:
        f.seek(offset - TAR_BLOCK)
        header_name = f.read(100).split(b"\0", 1)[0].decode(errors="replace")
    if header_name != name:
        raise ManifestError(f"{shard.index} does not match {shard.tar}: the index puts {name} at "
                            f"{offset} but the tar holds {header_name!r} there; {hint}")
    if not name.startswith(f"{split}_"):
        raise ManifestError(f"{shard.index}: member {name} is not from split {split!r}; {hint}")


def label_outside(label: int, num_classes: int, key: str, tar: str | Path) -> "ManifestError":
    """The error for a sample whose label is not in [0, num_classes): cross_entropy would fail on it with
    `IndexError: Target 200 is out of bounds` (on a GPU: a device-side assert) naming no sample."""
    from .manifest import ManifestError

    root = Path(tar).parent
    return ManifestError(f"sample {key} in {tar} has label {label}, outside [0, {num_classes}) for the "
                         f"{num_classes} classes of {root / 'manifest.json'}: the shard was edited or made with "
                         f"another class list. Run `imt-verify-shards {root}`, then remake the shards with "
                         "`imt-make-shards`")


def read_label(tar, offset: int) -> int:
    """The int64 of a sample's .lbl member (little-endian) at `offset` of the open tar file."""
    tar.seek(offset)
    return int.from_bytes(tar.read(8), "little", signed=True)


def load_split(path: str | Path, split: str) -> tuple["Manifest", "Split"]:
    """The manifest and one split, with every shard/index pair checked, before any loader
    starts: a bad folder fails here with the file's name, not deep inside DALI."""
    from .manifest import ManifestError, load_manifest

    if not str(path):
        raise ManifestError("DataConfig.path is empty: point it at a folder made by "
                            "`imt-make-shards --src <data> --out <folder>`")
    manifest = load_manifest(path)
    sp = manifest.split(split)
    if sp.num_samples == 0 or not sp.shards:
        raise ManifestError(f"{manifest.root / 'manifest.json'}: split {split!r} has no samples; "
                            f"rebuild with `imt-make-shards --src <data> --out {manifest.root}`")
    if not manifest.classes:
        raise ManifestError(f"{manifest.root / 'manifest.json'}: no classes listed; rebuild with "
                            f"`imt-make-shards --src <data> --out {manifest.root}`")
    for shard in sp.shards:
        check_shard_pair(shard, split, manifest.root)
    return manifest, sp


# ---- exact per-rank batch plans (torch loaders; DALI's reader does the same by sample range) --

def num_batches(n: int, world: int, batch: int, drop_last: bool) -> int:
    """Batches per epoch on every rank when n samples are split in ranges of n//world or
    n//world + 1: the largest share's batch count, or (drop_last) the smallest share's full ones."""
    return n // world // batch if drop_last else -(-(-(-n // world)) // batch)


def rank_batches(order: list[int], world: int, rank: int, batch: int, drop_last: bool) -> list[list[int]]:
    """This rank's batches of `order` (the epoch's sample order, the same on every rank): its
    contiguous range [N*r//W, N*(r+1)//W) cut into batches. Every rank returns exactly
    num_batches(...) non-empty batches: when the largest share needs one batch more than this
    rank's (share a multiple of batch, another rank has one sample more) the last full batch is
    split in two, rather than yielding an empty batch or a padding duplicate."""
    n = len(order)
    mine = order[n * rank // world: n * (rank + 1) // world]
    total = num_batches(n, world, batch, drop_last)
    out = [mine[i:i + batch] for i in range(0, len(mine), batch)][:total]
    if len(out) < total and out and len(out[-1]) > 1:
        last = out.pop()
        out += [last[:(len(last) + 1) // 2], last[(len(last) + 1) // 2:]]
    if len(out) != total:
        raise ValueError(f"{n} samples cannot give {world} ranks {total} non-empty batches of "
                         f"{batch}: lower the batch size or the number of ranks")
    return out
