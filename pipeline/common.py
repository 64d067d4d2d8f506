"""Pieces every loader shares: the Loader protocol, ImageNet statistics, dtype names."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Protocol

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

def _last_index_entry(index: Path) -> list[str]:
    """The last non-empty line of a wds2idx file, read from its tail (indexes of big shards are
    hundreds of KB; the tail is all we need)."""
    with open(index, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - 8192))
        lines = [ln for ln in f.read().splitlines() if ln.strip()]
    return lines[-1].decode(errors="replace").split() if lines else []


def check_shard_pair(shard: "Shard", split: str, root: Path, adopted: bool = False) -> None:
    """Cheap proof that an index belongs to its tar: its last component's tar header (the 512
    bytes before the data offset) must name the member the index names, and the data must end
    inside the tar. Catches truncated tars, stale or swapped indexes (one seek + read each)."""
    from .manifest import ManifestError

    hint = (f"run `imt-verify-shards {root}` to list every damaged file, then "
            f"`imt-make-shards --src <data> --out {root}` to rebuild")
    entry = _last_index_entry(shard.index)
    if len(entry) < 4 or len(entry) % 4:
        raise ManifestError(f"{shard.index}: last line is not `<ext> <offset> <size> <name>`...; {hint}")
    ext, offset, size, name = entry[-4:]
    offset, size = int(offset), int(size)
    tar_size = shard.tar.stat().st_size
    if offset + size > tar_size or offset < 512:
        raise ManifestError(f"{shard.tar}: {tar_size} bytes, but {shard.index} places {name} at "
                            f"{offset}+{size}: the tar is truncated or the index is stale; {hint}")
    with open(shard.tar, "rb") as f:
        f.seek(offset - 512)
        header_name = f.read(100).split(b"\0", 1)[0].decode(errors="replace")
    if header_name != name:
        raise ManifestError(f"{shard.index} does not match {shard.tar}: the index puts {name} at "
                            f"{offset} but the tar holds {header_name!r} there; {hint}")
    if not adopted and not name.startswith(f"{split}_"):  # adopted shards keep their maker's keys
        raise ManifestError(f"{shard.index}: member {name} is not from split {split!r}; {hint}")


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
        check_shard_pair(shard, split, manifest.root, manifest.adopted)
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
