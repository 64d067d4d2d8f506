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

def _last_index_entry(index: Path) -> list[str]:
    """The last non-empty line of a wds2idx file, read from its tail (indexes of big shards are
    hundreds of KB; the tail is all we need)."""
    with open(index, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - 8192))
        lines = [ln for ln in f.read().splitlines() if ln.strip()]
    return lines[-1].decode(errors="replace").split() if lines else []


def check_shard_pair(shard: "Shard", split: str, root: Path) -> None:
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
    if not name.startswith(f"{split}_"):
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


# ---- where a loader is in its epoch (state_dict / load_state_dict), shared by every loader ---------

STATE_VERSION = 1


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
        if state.get("version") != STATE_VERSION:
            why = f"its loader state has version {state.get('version')!r}, this code reads {STATE_VERSION}"
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
