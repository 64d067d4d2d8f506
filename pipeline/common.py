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
    # The torchdata `Stateful` convention: everything that decides what the rest of the epoch yields, as plain
    # values (a checkpoint stores one per rank). After load_state_dict, the iteration of the state's epoch yields
    # only the batches not yet trained, without producing the skipped ones; any other epoch is unaffected.
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> str: ...  # one line for the log: how the epoch resumes
    def position(self) -> tuple[int, int]: ...  # (batches of the epoch counted as done, batches the next pass yields)


def even_split(n: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of rank's share when n items are split as evenly as possible: the first
    n % world ranks get one more. No item is repeated or dropped."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


# ---- shard checks shared by the DALI and webdataset loaders --------------------------------------

TAR_BLOCK = 512


def check_shard_pair(shard: "Shard", split: str, root: Path, label_ext: str = "lbl") -> None:
    """Proof, before DALI sees them, that an index describes its tar. From the index alone (vectorised: about
    a second for ImageNet's 1.28 M lines, see read_index): every line holds the same components, .jpg and .lbl
    among them; every member's data starts on a 512-byte tar block after the previous member's data and its
    own 512-byte header, and ends inside the tar (DALI given an offset moved by 512 bytes segfaulted in 3 of 6
    runs). Then one read: the last member's tar header (the 512 bytes before its data) must name the member
    the index names, which catches a stale or swapped index of the same shape. `label_ext` "lblsize" (shards
    adopted by tools/index_shards.py): the label component is `label + 1` bytes at offset 0 of the tar, not a
    member, so it is left out of the member checks, and the keys are the maker's, not `<split>_...`."""
    from .manifest import ManifestError, read_index

    hint = (f"run `imt-verify-shards {root}` to list every damaged file, then "
            f"`imt-make-shards --src <data> --out {root}` to rebuild")
    index = read_index(shard.index)
    if len(index) != index.count or not len(index):
        raise ManifestError(f"{shard.index}: header says {index.count} samples but it has {len(index)} lines; "
                            f"{hint}")
    index.column("jpg"), index.column(label_ext)  # what the loaders read
    tar_size = shard.tar.stat().st_size
    members = [k for k, ext in enumerate(index.exts) if ext != "lblsize"]
    offsets, sizes = index.offsets[:, members].reshape(-1), index.sizes[:, members].reshape(-1)  # in tar order
    names = index.names if len(members) == len(index.exts) else \
        np.array(index.names, dtype=object).reshape(len(index), -1)[:, members].reshape(-1).tolist()
    ends = offsets + sizes
    if (ends > tar_size).any():
        i = int(np.flatnonzero(ends > tar_size)[0])
        raise ManifestError(f"{shard.tar}: {tar_size} bytes, but {shard.index} places {names[i]} at "
                            f"{offsets[i]}+{sizes[i]}: the tar is truncated or the index is stale; {hint}")
    # Data starts on a tar block, after the previous member's data (rounded up to a block) and a header.
    earliest = np.concatenate(([0], ends[:-1] + (-ends[:-1] % TAR_BLOCK))) + TAR_BLOCK
    bad = (offsets % TAR_BLOCK != 0) | (offsets < earliest) | (sizes < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        previous = f"{names[i - 1]}, whose data ends at {ends[i - 1]}" if i else "none"
        raise ManifestError(
            f"{shard.index} line {i // len(members) + 2}: {names[i]} at byte {offsets[i]} (+{sizes[i]}) is "
            f"not where a member of {shard.tar.name} can start: offsets must be 512-byte aligned, after the "
            f"previous member ({previous}) and its own header. The index is stale or edited; {hint}")
    offset, name = int(offsets[-1]), names[-1]
    with open(shard.tar, "rb") as f:
        f.seek(offset - TAR_BLOCK)
        header_name = f.read(100).split(b"\0", 1)[0].decode(errors="replace")
    if header_name != name:
        raise ManifestError(f"{shard.index} does not match {shard.tar}: the index puts {name} at "
                            f"{offset} but the tar holds {header_name!r} there; {hint}")
    if label_ext == "lbl" and not name.startswith(f"{split}_"):  # adopted shards keep their maker's keys
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


def load_split(path: str | Path, split: str, *, check_tars: bool = True) -> tuple["Manifest", "Split"]:
    """The manifest and one split, with every shard/index pair checked, before any loader
    starts: a bad folder fails here with the file's name, not deep inside DALI. `check_tars` False (streamed
    from object storage): only the indexes are there yet; each pair is checked as its tar arrives."""
    from .manifest import ManifestError, load_manifest

    if not str(path):
        raise ManifestError("DataConfig.path is empty: point it at a folder made by "
                            "`imt-make-shards --src <data> --out <folder>`")
    manifest = load_manifest(path, check_tars=check_tars)
    sp = manifest.split(split)
    if sp.num_samples == 0 or not sp.shards:
        raise ManifestError(f"{manifest.root / 'manifest.json'}: split {split!r} has no samples; "
                            f"rebuild with `imt-make-shards --src <data> --out {manifest.root}`")
    if not manifest.classes:
        raise ManifestError(f"{manifest.root / 'manifest.json'}: no classes listed; rebuild with "
                            f"`imt-make-shards --src <data> --out {manifest.root}`")
    for shard in sp.shards if check_tars else ():
        check_shard_pair(shard, split, manifest.root, manifest.label_ext)
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


# ---- where a loader is in its epoch (state_dict / load_state_dict), shared by every loader ---------

STATE_VERSION = 2
# The oldest state version whose epoch each kind of loader still replays exactly (1 where not listed). Version 2
# (2026-12-02): the torch and folder loaders' orders and augmentation seeds come from mix_seed (31-bit; theirs was
# 63-bit), so a version-1 state of theirs would resume with another rest of its epoch (samples trained twice,
# others not at all): that epoch restarts instead. DALI's seeds were already mix_seed's.
REPLAYS_SINCE = {"torch": 2, "folder": 2}


def epoch_plan(order: list[int], world: int, rank: int, batch: int, drop_last: bool,
               segments: list | tuple = ()) -> list[list[int]]:
    """This rank's batches of an epoch whose sample order is `order` (the same on every rank).

    `segments` are the earlier runs that trained part of this epoch, oldest first, as (world, batch,
    batches done on each rank): each split what the one before had left with rank_batches and stopped
    after `done` batches. What the last of them left, in the order its ranks would have read it, is
    split among this run's ranks by rank_batches again: every sample of the epoch is trained exactly
    once across all the runs, and every rank of this run gets the same number of non-empty batches.
    Without segments it is the whole epoch. When the rest is too small to give every rank equal non-empty
    batches (fewer samples than ranks, say), the first world - 1 at most are repeated to fill it: trained
    twice rather than lost."""
    todo = list(order)
    for w, b, done in segments:
        todo = [i for r in range(w) for part in rank_batches(todo, w, r, b, drop_last)[done:] for i in part]
    return split_rest(todo, world, rank, batch, drop_last) if segments else \
        rank_batches(todo, world, rank, batch, drop_last)


def windowed_order(counts: list[int], sizes: list[int], budget: int, world: int,
                   seed: int | None) -> tuple[list[int], list[list[int]]]:
    """An epoch's sample order for shards read through a cache smaller than the data set (pipeline/remote.py),
    and its windows (each a list of shard numbers, in reading order). Shard s holds samples
    [sum(counts[:s]), sum(counts[:s + 1])) and `sizes[s]` bytes.

    The shards in a random order seeded by `seed` (None: the stored order, nothing shuffled: validation), cut
    into consecutive windows of at most `budget` bytes (one shard per window if a shard is larger), and the
    samples of each window shuffled among themselves: Mosaic Streaming's py1b ("shuffles shards, then divides
    them into fixed-size blocks and shuffles the samples within each block": mosaicml/streaming#223, and its
    shuffling guide, docs.mosaicml.com/projects/streaming/en/stable/dataset_configuration/shuffling.html), with
    blocks cut at shard boundaries by bytes rather than by sample count, so that one window is what the cache
    holds. The loaders pass about half the cache as `budget`, so the next window is fetched while this one is
    read. The trade-off, against the global shuffle used when the data fits: a batch only mixes samples of one
    window (budget / shard size shards) instead of the whole data set, and two samples of one shard are never
    more than a window apart. ImageNet as make_shards cuts it by default (~140 train shards of 1 GB, ~9 k
    samples each, classes mixed: it shuffles before writing) through a 20 GiB cache: windows of ~10 shards,
    ~90 k samples, from which every batch is drawn uniformly.

    Every rank reads the same window at the same time: window after window, its samples are dealt to the ranks
    in turn (rank r takes positions r, r + world, ...), and the order returned is rank 0's samples, then rank 1's,
    ..., each share exactly as long as rank_batches cuts it (n*(r+1)//world - n*r//world). So it stays a plain
    list for rank_batches / epoch_plan: the rank split, exact resume (an index into the plan) and the rest-
    splitting after a change of ranks (common.epoch_plan) work on it unchanged. It depends on `world`: a
    loader passes the number of ranks that began the epoch (the first resume segment's, or its own)."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    firsts = np.concatenate(([0], np.cumsum(counts)))
    shards = torch.randperm(len(counts), generator=g).tolist() if g is not None else list(range(len(counts)))
    windows: list[list[int]] = []
    used = 0
    for s in shards:
        if not windows or used + sizes[s] > budget:
            windows.append([])
            used = 0
        windows[-1].append(s)
        used += sizes[s]
    parts = []
    for window in windows:
        samples = np.concatenate([np.arange(firsts[s], firsts[s + 1]) for s in window])
        parts.append(samples[torch.randperm(len(samples), generator=g).numpy()] if g is not None else samples)
    seq = np.concatenate(parts)
    # Dealt in whole rounds (rank r takes positions r, r + world, ... of the first `full`), then the n % world
    # samples left over one each, in order, to the ranks whose share (rank_batches') is one longer.
    n = len(seq)
    full = n // world * world
    longer = [r for r in range(world) if n * (r + 1) // world - n * r // world > n // world]
    last = {r: seq[full + k:full + k + 1] for k, r in enumerate(longer)}
    shares = [np.concatenate((seq[r:full:world], last.get(r, seq[:0]))) for r in range(world)]
    return np.concatenate(shares).tolist(), windows


def first_world(segments: list | tuple, world: int) -> int:
    """The number of ranks that began an epoch (what its windowed_order was dealt to): the first earlier run's
    (epoch_plan's segments), or this run's."""
    return int(segments[0][0]) if segments else world


def mix_seed(*parts: int) -> int:
    """One deterministic seed from integers (the run's seed, an epoch, a rank, a batch, ...), in [0, 2**31 - 1):
    DALI's `seed` arguments take a non-negative int32, and torch.Generator / torch.manual_seed take it too. Every
    seed a loader derives goes through here, so the same parts give the same seed in every loader."""
    s, m = 0x9E3779B9, 2**31 - 1
    for p in parts:
        s = (s * 1_000_003 + int(p) + 1) % m
    return s % m


def epoch_order(n: int, seed: int, epoch: int, *, train: bool, windows: tuple | None = None, world: int = 1,
                salt: tuple[int, ...] = ()) -> tuple[list[int], list[list[int]]]:
    """The sample order of one epoch, the same on every rank, and its windows (shard numbers; [] unless
    streamed). Training: a permutation of range(n) seeded by (seed, epoch, *salt); validation (train False): the
    stored order. `windows` (a data set larger than its cache: samples per shard, bytes per shard, window
    bytes, pipeline/remote.Stream.windows): windowed_order's, dealt to `world` ranks (the ranks that began the
    epoch, see first_world). The one place a loader turns (seed, epoch) into an order."""
    mixed = mix_seed(seed, epoch, *salt) if train else None
    if windows is not None:
        return windowed_order(*windows, world, mixed)
    if mixed is None:
        return list(range(n)), []
    return torch.randperm(n, generator=torch.Generator().manual_seed(mixed)).tolist(), []


def seeded_plan(n: int, seed: int, epoch: int, *, train: bool, world: int, rank: int, batch: int, drop_last: bool,
                segments: list | tuple = (), windows: tuple | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """This rank's batches of epoch `epoch` (epoch_plan of epoch_order, continuing the earlier runs' `segments`)
    and the epoch's windows: what the torch loaders read, and the DALI loader when streaming."""
    order, wins = epoch_order(n, seed, epoch, train=train, windows=windows, world=first_world(segments, world))
    return epoch_plan(order, world, rank, batch, drop_last, segments), wins


def split_rest(todo: list[int], world: int, rank: int, batch: int, drop_last: bool) -> list[list[int]]:
    """rank_batches of what is left of an epoch; when that rest cannot give every rank equal non-empty
    batches (fewer samples than ranks, say), at most world - 1 of its samples are repeated to fill it,
    decided alike on every rank."""
    if not todo:
        return []
    try:
        for r in range(world):
            rank_batches(todo, world, r, batch, drop_last)
    except ValueError:
        todo = todo + todo[:(-len(todo)) % world]  # equal shares: every rank the same batches, none to split
    return rank_batches(todo, world, rank, batch, drop_last)


def combine_states(states: list[dict], world: int, rank: int) -> dict:
    """The loader state for `rank` of a run on `world` ranks, from the states a checkpoint keeps (one per rank
    of the run that saved it): that rank's own when the number of ranks is the same, else rank 0's; plus, where
    the loader records which samples it trained this epoch ("consumed"), all ranks' together
    ("consumed_all"), from which a loader can tell what is left of the epoch."""
    out = dict(states[rank] if len(states) == world else states[0])
    if all("consumed" in s for s in states):
        out["consumed_all"] = torch.cat([torch.as_tensor(s["consumed"], dtype=torch.int64).reshape(-1)
                                         for s in states]).unique()
    return out


class Position:
    """The state every loader keeps: the epoch, the batches yielded in it (`done`), the earlier runs that
    trained part of it (`segments`, see epoch_plan), and a pending resume from load_state_dict. A loader
    calls `begin(epoch)` when an epoch's iteration starts, `step()` per batch it yields."""

    def __init__(self, kind: str, *, world: int, rank: int, batch: int, drop_last: bool, seed: int,
                 samples: int):
        self.kind, self.world, self.rank, self.batch = kind, world, rank, batch
        self.drop_last, self.seed, self.samples = drop_last, seed, samples
        self.epoch, self.done, self.segments = 0, 0, []
        self.end = 0  # `done` at the end of the current epoch's iteration
        self.pending: dict | None = None  # a loaded state not yet used

    def state_dict(self, **extra) -> dict:
        return {"version": STATE_VERSION, "kind": self.kind, "epoch": self.epoch, "world": self.world,
                "rank": self.rank, "batch_size": self.batch, "done": self.done,
                "segments": [list(s) for s in self.segments], "seed": self.seed, "samples": self.samples,
                "drop_last": self.drop_last, **extra}

    def same_run(self, state: dict) -> bool:
        """The state was saved by ranks that read this epoch exactly as this run's would (same world and batch)."""
        return (int(state["world"]), int(state["batch_size"])) == (self.world, self.batch)

    def load(self, state: dict, *, elastic: bool = True) -> str:
        """Keep `state` for the next iteration of its epoch; returns how that epoch will resume. `elastic`:
        the loader can split the rest of an epoch among another number of ranks or another batch size."""
        if not state or int(state.get("done", 0)) == 0 and not state.get("dali"):
            self.pending = None
            return ""
        epoch = int(state["epoch"])
        why = None
        if state.get("version") not in range(REPLAYS_SINCE.get(self.kind, 1), STATE_VERSION + 1):
            why = (f"its loader state has version {state.get('version')!r}, and the {self.kind} loader replays "
                   f"versions {REPLAYS_SINCE.get(self.kind, 1)} to {STATE_VERSION}")
        elif state.get("kind") != self.kind:
            why = (f"it was made by the {state.get('kind')} loader, whose sample order the {self.kind} loader "
                   "cannot replay")
        elif (int(state["seed"]), int(state["samples"]), bool(state["drop_last"])) != \
                (self.seed, self.samples, self.drop_last):
            why = (f"the data or its order changed (seed, samples, drop_last: {state['seed']}, {state['samples']}, "
                   f"{state['drop_last']} then, {self.seed}, {self.samples}, {self.drop_last} now)")
        elif not elastic and not self.same_run(state):
            why = (f"it was saved by {state['world']} rank(s) at batch size {state['batch_size']} and this run has "
                   f"{self.world} at {self.batch}: the {self.kind} loader resumes mid-epoch only with the same")
        if why:
            self.pending = None
            return (f"epoch {epoch + 1} restarts from its beginning ({why}): in this one epoch the samples "
                    f"already trained are seen again")
        self.pending = dict(state)
        if int(state["done"]) == 0:
            return f"epoch {epoch + 1} continues the {self.kind} loader's sample stream from its checkpoint"
        if self.same_run(state):
            return f"epoch {epoch + 1} continues at batch {int(state['done']) + 1}"
        return (f"epoch {epoch + 1} continues on {self.world} rank(s) at batch size {self.batch} (saved by "
                f"{state['world']} at {state['batch_size']}): its untrained samples are split among the ranks")

    def resume_for(self, epoch: int) -> tuple[list, int] | None:
        """(segments for epoch_plan, first batch index) when a loaded state continues `epoch`, else None."""
        state = self.pending
        if state is None or int(state["epoch"]) != epoch:
            return None
        segments = [tuple(int(x) for x in s) for s in state["segments"]]
        if self.same_run(state):
            return segments, int(state["done"])
        return segments + [(int(state["world"]), int(state["batch_size"]), int(state["done"]))], 0

    def begin(self, epoch: int) -> tuple[list, int]:
        """An epoch's iteration starts: (segments, first batch index) it continues from; the pending state is
        used up. The loader then sets `end` (first index + the batches it will yield)."""
        resume = self.resume_for(epoch)
        self.pending = None
        self.epoch = epoch
        self.segments, self.done = resume if resume else ([], 0)
        return list(self.segments), self.done

    def step(self) -> None:
        """One batch yielded; after the epoch's last one the state points at the start of the next epoch."""
        self.done += 1
        if self.done >= self.end:
            self.epoch, self.done, self.segments = self.epoch + 1, 0, []
