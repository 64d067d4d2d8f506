"""Shards on object storage or a web server: `--data s3://bucket/shards`, `gs://bucket/shards`,
`https://host/shards` (any folder made by imt-make-shards or imt-index-shards, uploaded as it is).

    root, cache = open_remote(cfg)   # a local shard folder in data.cache_dir: what both loaders read;
                                     # cache: None if it holds every tar, else the ShardCache to stream through
    feeder = Stream(cache, split, manifest).feeder(batches, ready)   # per epoch: tars fetched ahead

Transport: fsspec (s3fs for s3://, gcsfs for gs://, aiohttp for http(s)://), so credentials, endpoints
and regions come from each store's usual configuration (AWS_* variables and ~/.aws, gcloud's, ...).

The manifest is read from the store on every start (it is small, and the data may have been remade); the
index files and tars are kept in `data.cache_dir/<hash of the URL>/`, named `<sha256[:16]>-<name>` so
a tar that changed on the store is never taken for the cached one. A download goes to a temporary name,
is hashed, checked against the manifest's size and sha256, and only then renamed: a loader never sees a
partial tar, so never a partial sample. A dropped connection, a timeout or a short or corrupt transfer is
retried (RETRIES tries, with backoff); ranks of one node share the cache through a lock per file, a lock
on deciding what to evict, and pins on the tars each is reading (see Feeder).

Cache size and eviction (`data.cache_limit`, GiB, 0 = no limit). A `Feeder` reads the tars of a sequence of
batches, fetching ahead within the limit and evicting by `victims`: first shards not needed again in the
rest of the epoch, most recently used first; then the one needed farthest ahead (Belady).
Under LRU a cache smaller than the data set misses on every shard of every epoch once the order cycles
(Mosaic Streaming issue #658); most-recently-used-first keeps a fixed part of the data set resident across
epochs, so each epoch after the first fetches only what does not fit.

A data set that fits the limit is staged whole (`stage`) and the loaders shuffle it globally. One that does not
is streamed (`open_remote` returns the cache): its indexes are staged, each epoch's order becomes windows of
shards of about half the cache (common.windowed_order), and a `Feeder` thread in the trainer's process keeps
the tars of the batches ahead in the cache, the next window's while the current one is read.
"""
from __future__ import annotations

import collections
import fcntl
import functools
import hashlib
import json
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .manifest import MANIFEST_NAME, ManifestError

SCHEMES = ("s3://", "gs://", "gcs://", "http://", "https://")
RETRIES = 5
BACKOFF_S = 0.5  # first retry after 0.5 s, then 1, 2, 4 s
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imt" / "shards"


def is_remote(path: str) -> bool:
    return str(path).startswith(SCHEMES)


def _join(base: str, rel: str) -> str:
    """`base`/`rel` for URLs and bucket paths, resolving `..` (adopted shards may name ../x.tar)."""
    parts = base.rstrip("/").split("/")
    for p in rel.split("/"):
        if p == "..":
            parts.pop()
        elif p not in ("", "."):
            parts.append(p)
    return "/".join(parts)


def _locked(path: Path, flags: int):
    """`path` opened (created if missing) and flock'ed with `flags`; the open file, whose closing releases the lock.
    The per-tar lock and pin files are deleted when their tar is evicted (ShardCache._evict), so a process may
    open one just before it is deleted and then lock that deleted file, which no other process can see: such a
    lock is dropped and taken again on the file now at `path`. With LOCK_NB, BlockingIOError when it is held."""
    while True:
        f = open(path, "a")
        try:
            fcntl.flock(f, flags)
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                return f
        except FileNotFoundError:  # deleted after this open: lock the next one
            pass
        except BaseException:
            f.close()
            raise
        f.close()


def victims(resident: dict[str, int], need: int, limit: int, upcoming: list[str], recent: list[str]) -> list[str]:
    """Resident shards (name -> bytes) to delete so `need` more bytes fit in `limit`. First those not in
    `upcoming` (the rest of the order), the most recently used first (`recent`: oldest use first); then the
    one needed farthest ahead. Never one needed next."""
    free = limit - sum(resident.values())
    if free >= need:
        return []
    ahead = {}
    for i, name in enumerate(upcoming):
        ahead.setdefault(name, i)
    used = {name: i for i, name in enumerate(recent)}
    candidates = sorted((n for n in resident if not upcoming or n != upcoming[0]),
                        key=lambda n: (n not in ahead, ahead.get(n, 0), used.get(n, -1)), reverse=True)
    out = []
    for name in candidates:
        if free >= need:
            break
        out.append(name)
        free += resident[name]
    return out


class ShardCache:
    """The shard folder at `url`, mirrored on demand into `cache_dir` (see the module's docstring)."""

    def __init__(self, url: str, cache_dir: str | Path = "", limit_gib: float = 0.0, *, workers: int = 4,
                 retries: int = RETRIES, ranks: int = 1):
        import fsspec

        self.url = url.rstrip("/")
        try:
            self.fs, self.base = fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError) as e:  # e.g. s3fs or gcsfs not installed
            raise ManifestError(f"cannot read {self.url}: {e}. Install the store's fsspec backend: "
                                "pip install 'imt[remote]' (s3fs, gcsfs, aiohttp)") from e
        self.dir = Path(cache_dir or DEFAULT_CACHE) / hashlib.sha256(self.url.encode()).hexdigest()[:16]
        self.limit = int(limit_gib * 2**30)
        self.workers, self.retries = workers, retries
        self.ranks = max(1, ranks)  # processes of this node sharing the folder (torchrun's LOCAL_WORLD_SIZE)
        self.fetches = 0  # downloads done (tests, logs)
        self._recent: list[str] = []
        self._manifest: dict | None = None

    # -------------------------------------------------------------------------------- manifest
    def manifest(self) -> dict:
        if self._manifest is None:
            where = _join(self.base, MANIFEST_NAME)
            try:
                raw = self._retry(lambda: self.fs.cat_file(where), where)
            except FileNotFoundError:
                raise ManifestError(f"{self.url}/{MANIFEST_NAME} not found: upload a whole folder made by "
                                    "imt-make-shards or imt-index-shards (manifest.json, .tar and .idx)") from None
            try:
                self._manifest = json.loads(raw)
            except ValueError as e:
                raise ManifestError(f"{self.url}/{MANIFEST_NAME}: not JSON ({e})") from e
        return self._manifest

    def shards(self) -> dict[str, dict]:
        """Local name of every tar and index -> {remote, bytes, sha256 (tars only)}."""
        out = {}
        for split in self.manifest().get("splits", {}).values():
            for s in split.get("shards", []):
                name = f"{s['sha256'][:16]}-{Path(s['file']).name}"
                out[name] = {"remote": s["file"], "bytes": s.get("bytes"), "sha256": s["sha256"]}
                out[f"{name[:-4]}.idx"] = {"remote": s["index"], "bytes": s.get("index_bytes"), "sha256": None}
        return out

    # -------------------------------------------------------------------------------- files
    def _retry(self, action, what: str):
        for attempt in range(self.retries):
            try:
                return action()
            except FileNotFoundError:
                raise
            except Exception as e:  # noqa: BLE001 - every transport raises its own kinds (aiohttp, botocore, ...)
                if attempt == self.retries - 1:
                    raise OSError(f"could not fetch {what} after {self.retries} tries: {type(e).__name__}: {e}. "
                                  "Check the network and the store's credentials, then start again (the files "
                                  "already fetched are kept)") from e
                time.sleep(BACKOFF_S * 2**attempt)

    def fetch(self, name: str) -> Path:
        """The local copy of shard file `name` (see `shards()`), downloaded and verified if need be."""
        spec = self.shards()[name]
        path = self.dir / name
        if path.is_file() and (spec["bytes"] is None or path.stat().st_size == spec["bytes"]):
            self._used(name)
            return path
        self.dir.mkdir(parents=True, exist_ok=True)
        with _locked(self.dir / f".{name}.lock", fcntl.LOCK_EX):  # another rank of this node may be fetching it
            if not path.is_file():
                self._retry(lambda: self._download(_join(self.base, spec["remote"]), path, spec), spec["remote"])
        self._used(name)
        return path

    def _download(self, remote: str, path: Path, spec: dict) -> None:
        tmp = path.with_name(f".{path.name}.part{os.getpid()}")
        try:
            self.fs.get_file(remote, str(tmp))
            size = tmp.stat().st_size
            if spec["bytes"] is not None and size != spec["bytes"]:
                raise OSError(f"{remote}: {size} bytes arrived, the manifest says {spec['bytes']}")
            if spec["sha256"]:
                h = hashlib.sha256()
                with open(tmp, "rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        h.update(block)
                if h.hexdigest() != spec["sha256"]:
                    raise OSError(f"{remote}: sha256 {h.hexdigest()[:16]}... differs from the manifest's")
            os.replace(tmp, path)
            self.fetches += 1
        finally:
            tmp.unlink(missing_ok=True)

    def _used(self, name: str) -> None:
        if name in self._recent:
            self._recent.remove(name)
        self._recent.append(name)

    def _resident(self, ext: str = ".tar") -> dict[str, int]:
        """Name -> bytes of the cached files ending in `ext` (a file another rank evicts meanwhile is left out)."""
        out = {}
        for p in self.dir.glob(f"*{ext}") if self.dir.is_dir() else ():
            try:
                out[p.name] = p.stat().st_size
            except FileNotFoundError:
                pass
        return out

    # -------------------------------------------------------------------------------- readers
    def _admit(self, names: list[str], rest: list[str], pending: dict, specs: dict, keep=frozenset(),
               pin=lambda names: None) -> list[str] | None:
        """Room for every tar of one batch (`names`), decided at once under the folder's `.room.lock`: the bytes
        of all its tars not in the cache and not already on their way (this object's `pending`, or marked by
        another process of this node: `_wanted`) are made to fit the limit beside the index files, the
        downloads in flight and the tars in `keep`, evicting by `victims` (`rest`: the tars in order of next
        use). Then, still under the lock, its missing tars are marked as on their way (`_want`) and `pin` is
        called with its resident ones, so ranks of this node sharing the cache decide one at a time, never both
        spend the same free bytes, and nothing admitted can be evicted afterwards (evictions run under this lock
        and need a tar's pin exclusively; a resident tar another process still marks as wanted is not evicted
        either: it was admitted for that process, which pins it once its download ends). Returns the tars to
        fetch, or None, with nothing marked or pinned, when the room is not there now. A tar pinned by a reader
        of this node (Feeder) is never evicted, nor chosen as a victim: unpinned ones are evicted in its place
        (else one rank's pins on the tars `victims` ranks first could refuse another rank room that unpinned
        tars held, for as long as the first waits for the second: see Feeder._loop)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".room.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            resident = self._resident()
            coming = self._wanted() | {n for n, f in pending.items() if not f.done()}
            have = [n for n in names if n in resident]
            fetch = [n for n in names if n not in resident and n not in pending]
            if self.limit:
                need = sum(specs[n]["bytes"] or 0 for n in fetch if n not in coming)
                in_flight = sum(specs[n]["bytes"] or 0 for n in coming - resident.keys())
                kept = sum(resident.pop(n) for n in list(resident) if n in keep or n in names or n in coming)
                limit = self.limit - kept - self._index_bytes()
                while True:  # victims another reader of this node has pinned are kept, and others chosen
                    drop = victims(resident, need + in_flight, limit, rest, self._recent)
                    if sum(resident.values()) - sum(resident[n] for n in drop) + in_flight + need > limit:
                        return None
                    held = [n for n in drop if self._pinned(n)]
                    if not held:
                        break
                    for n in held:
                        limit -= resident.pop(n)
                for n in drop:
                    if not self._evict(n):
                        return None
            for n in fetch:
                self._want(n).touch()
            pin(have)
            return fetch

    def _want(self, name: str) -> Path:
        """The mark of a download this object has room for (removed by `_unwant` when it ends)."""
        return self.dir / f".{name}.want{os.getpid()}-{id(self):x}"

    def _unwant(self, name: str) -> None:
        self._want(name).unlink(missing_ok=True)

    def _wanted(self) -> set[str]:
        """Tars some process of this node has made room for and is fetching. A mark left by a process that
        died is removed."""
        out = set()
        for p in self.dir.glob(".*.want*"):
            name, _, owner = p.name[1:].rpartition(".want")
            try:
                os.kill(int(owner.split("-")[0]), 0)
            except ProcessLookupError:
                p.unlink(missing_ok=True)
                continue
            except (ValueError, PermissionError):
                pass
            out.add(name)
        return out

    def _index_bytes(self) -> int:
        return sum(self._resident(".idx").values())

    def _pinned(self, name: str) -> bool:
        """A reader of this node holds a pin on cached tar `name` (Feeder._pin). Called under the folder's
        .room.lock, where no pin file is deleted (`_evict`) and no unprotected tar gets a pin."""
        try:
            f = open(self.dir / f".{name}.pin")
        except FileNotFoundError:
            return False
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released as `f` closes
            except BlockingIOError:
                return True
        return False

    def _evict(self, name: str) -> bool:
        """Delete a cached tar unless a reader of this node has pinned it (Feeder: a shared flock on its .pin), and
        with it its pin file and download lock file (left behind, they added up to a pair per tar ever fetched).
        Each is deleted while this holds its lock exclusively, so no reader holds that pin and no fetch that
        lock; whoever opened it meanwhile locks the next one (`_locked`). A lock file a fetch holds is left to it.
        Called under the folder's .room.lock, so evictions on the node run one at a time."""
        pin_path, lock_path = self.dir / f".{name}.pin", self.dir / f".{name}.lock"
        try:
            pin = _locked(pin_path, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        with pin:
            (self.dir / name).unlink(missing_ok=True)
            pin_path.unlink()
            if lock_path.exists():
                try:
                    with _locked(lock_path, fcntl.LOCK_EX | fcntl.LOCK_NB):
                        lock_path.unlink()
                except BlockingIOError:  # another rank is fetching it again: its lock stays until the next eviction
                    pass
        return True

    def fits(self) -> bool:
        """Every tar and index of the data set fits data.cache_limit (then `stage` copies it whole)."""
        return not self.limit or sum(s["bytes"] or 0 for s in self.shards().values()) <= self.limit

    def index_bytes(self) -> int:
        """The bytes of the data set's index files (all staged, and never evicted, while it is streamed)."""
        return sum(s["bytes"] or 0 for n, s in self.shards().items() if n.endswith(".idx"))

    def window_bytes(self) -> int:
        """The bytes of tars per window of common.windowed_order: half of what the limit leaves beside the
        index files, so the next window is fetched while this one is read."""
        return max(1, (self.limit - self.index_bytes()) // 2)

    def quota(self) -> int:
        """The bytes of tars each of the node's `ranks` readers may hold admitted and not yet read (Feeder._loop):
        an equal share of what the limit leaves beside the index files; 0 without a limit."""
        return max(0, self.limit - self.index_bytes()) // self.ranks if self.limit else 0

    def stage(self, tars: bool = True) -> Path:
        """A local shard folder for the loaders: every index and (`tars`) every tar fetched (in parallel),
        a manifest naming the local copies; tars of older versions in the cache are removed. Without `tars`
        the tars are fetched as they are read (Feeder), for a data set larger than the limit."""
        m, specs = self.manifest(), self.shards()
        if tars and not self.fits():
            total = sum(s["bytes"] or 0 for s in specs.values())
            raise ManifestError(f"{self.url} holds {total / 2**30:.1f} GiB of shards but data.cache_limit is "
                                f"{self.limit / 2**30:.1f} GiB: stage() copies the whole data set. Stream it "
                                "instead (pipeline.remote.open_remote), or raise data.cache_limit")
        self.dir.mkdir(parents=True, exist_ok=True)
        for old in self.dir.glob("*.tar"):
            if old.name not in specs:
                old.unlink()
                old.with_name(f"{old.name[:-4]}.idx").unlink(missing_ok=True)
        if not tars:
            specs = {n: spec for n, spec in specs.items() if n.endswith(".idx")}
        missing = [n for n, spec in specs.items()
                   if not ((self.dir / n).is_file() and spec["bytes"] in (None, (self.dir / n).stat().st_size))]
        from tqdm import tqdm

        with ThreadPoolExecutor(self.workers) as pool, \
                tqdm(total=sum(specs[n]["bytes"] or 0 for n in missing), unit="B", unit_scale=True,
                     desc=f"fetch {self.url}", disable=not missing) as bar:
            for path in pool.map(self.fetch, specs):
                if path.name in missing:
                    bar.update(specs[path.name]["bytes"] or 0)
        local = json.loads(json.dumps(m))
        for split in local.get("splits", {}).values():
            for s in split.get("shards", []):
                s["file"] = f"{s['sha256'][:16]}-{Path(s['file']).name}"
                s["index"] = f"{s['file'][:-4]}.idx"
        tmp = self.dir / f".{MANIFEST_NAME}.{os.getpid()}"
        tmp.write_text(json.dumps(local, indent=1) + "\n")
        os.replace(tmp, self.dir / MANIFEST_NAME)
        return self.dir


class Feeder:
    """Keeps the tars a reader's batches need in the cache ahead of it: a thread of the trainer's process (one
    per loader iteration), so DataLoader workers only ever open local, verified files.

    `needs[k]`: the local tar names batch k of this iteration reads. `ready(k)` is called once batches [0, k)
    have every tar in the cache (`ready(-1)`: failed, the exception is in `error`); the reader sets `consumed`
    to the number of batches it has received. Tars of the batches admitted and not yet received, [consumed,
    scheduled), are kept (never evicted) and pinned (a shared flock on `.<name>.pin`, so other ranks of this node
    sharing the cache do not evict them either); batches are admitted whole, ahead until they would hold more than
    this rank's share of the cache (ShardCache.quota) or the limit leaves no room, evicting by `victims` (first
    tars not needed again this epoch, most recently used first; then the one needed farthest ahead); see `_loop`
    for why ranks sharing a cache cannot deadlock. `check(name)` runs once per tar that arrives (the loader's
    proof that index and tar agree)."""

    def __init__(self, cache: ShardCache, needs: list[list[str]], ready, check=None):
        self.cache, self.needs, self._ready, self._check = cache, needs, ready, check or (lambda name: None)
        self.consumed = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._pins: dict[str, object] = {}
        when: dict[str, list[int]] = {}
        for k, names in enumerate(needs):
            for n in names:
                when.setdefault(n, []).append(k)
        self._when = when
        self._held, self._span = collections.Counter(), [0, 0]  # tars of batches [span[0], span[1]), counted
        self._quota, self._index = cache.quota(), cache.index_bytes()  # once: shards() is rebuilt per call
        self._thread = threading.Thread(target=self._run, name="imt-shard-feeder", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._pin(set())

    def _run(self) -> None:
        try:
            self._feed()
        except BaseException as e:  # noqa: BLE001 - handed to the reader, which raises it
            self.error = e
            self._ready(-1)

    def _next_use(self, name: str, now: int) -> int | None:
        import bisect

        ks = self._when.get(name, [])
        i = bisect.bisect_left(ks, now)
        return ks[i] if i < len(ks) else None

    def _keep(self, lo: int, hi: int) -> set[str]:
        """The tars of batches [lo, hi), kept up to date as both ends move forward (recounting them at every
        batch would cost a window's batches times their tars, per batch)."""
        held, span = self._held, self._span
        for k in range(span[1], hi):
            held.update(self.needs[k])
        for k in range(span[0], lo):
            held.subtract(self.needs[k])
        span[:] = lo, max(hi, span[1])
        return {n for n, c in held.items() if c > 0}

    def _pin(self, names, drop: bool = True) -> None:
        """Hold a pin on each tar in `names`; with `drop`, release those on any other tar."""
        for n in [n for n in self._pins if drop and n not in names]:
            self._pins.pop(n).close()  # closing the file releases its flock
        for n in set(names) - self._pins.keys():
            self._pins[n] = _locked(self.cache.dir / f".{n}.pin", fcntl.LOCK_SH)

    def _feed(self) -> None:
        self.cache.dir.mkdir(parents=True, exist_ok=True)
        pending: dict = {}  # tar -> its download (a future of cache.fetch)
        pool = ThreadPoolExecutor(self.cache.workers)
        try:
            self._loop(pool, pending, self.cache.shards())
        finally:
            pool.shutdown(wait=True)  # downloads under way end (each leaves a whole tar or nothing)
            for n in pending:
                self.cache._unwant(n)

    def _loop(self, pool, pending: dict, specs: dict) -> None:
        """Batches are admitted in order, each whole (ShardCache._admit: room for all its missing tars, its
        resident ones pinned, under one lock) or not at all; the tars of the admitted batches the reader has not
        consumed, [now, scheduled), are pinned, never those of the batch being tried. Those tars may take at
        most q = ShardCache.quota() bytes, the limit less the index files shared by the node's L ranks; with
        none held, the batch the reader needs next is always tried (`_too_big` refuses one that can never fit).

        Why ranks sharing the cache cannot deadlock, even when each reader waits for all the others at every
        step (DDP's gradient all-reduce): an admitted batch completes without anything from another rank (its
        bytes were made to fit and nothing of it can be evicted). A rank whose reader waits for its next batch
        holds nothing ahead; every other rank holds at most q (pins and downloads under way), so at most (L-1)q
        in all, and `_admit` evicts the unpinned tars in the rest: at least q bytes, which fit the batch if it is
        no larger than q. So the waiting rank is admitted whatever the others' readers do. A batch larger than q
        (up to the limit) is still admitted when the room is there, and with common.windowed_order it mostly is:
        the ranks read the same window at once, so what the others hold ahead is largely the tars the waiting
        rank needs; but only a limit of index files + L x the largest batch excludes the wait (the figure
        `_too_big` gives). Without the quota, a rank whose reader had moved on to the next all-reduce pinned its
        future batches until the cache was full, the rank it waited for found no room, and both waited for ever
        (test_ranks_in_lockstep_share_the_cache: hung on every run).
        Before batches were admitted whole, a Feeder pinned the tried batch's resident tars and
        reserved its missing ones one at a time; two ranks each holding part of a batch waited on each other
        for ever (2 runs in 5 of test_two_ranks_share_the_cache_and_read_the_same_window hung)."""
        from concurrent.futures import FIRST_COMPLETED, wait

        cache, needs = self.cache, self.needs
        ready = scheduled = 0  # batches [0, ready) are in the cache; [0, scheduled) are fetched or on their way
        while ready < len(needs) and not self._stop.is_set():
            progressed = False
            now = min(self.consumed, ready)
            self._pin(self._keep(now, scheduled))  # the admitted batches' tars, resident or on their way
            # at most cache.workers downloads waiting: the bound on how far ahead batches are admitted
            while scheduled < len(needs) and len(pending) < cache.workers:
                keep = self._keep(now, scheduled)
                if not keep:
                    self._too_big(needs[scheduled], specs)
                elif cache.limit and sum(specs[n]["bytes"] or 0 for n in keep.union(needs[scheduled])) > self._quota:
                    break  # this rank's share of the cache is spent: retried once its reader has moved on
                resident = sorted((n for n in cache._resident() if self._next_use(n, now) is not None),
                                  key=lambda n: self._next_use(n, now))
                fetch = cache._admit(needs[scheduled], needs[scheduled] + resident, pending, specs,
                                     keep=keep | set(pending), pin=functools.partial(self._pin, drop=False))
                if fetch is None:
                    break  # no room yet: retried once the reader (or another rank's) has moved on
                for n in fetch:
                    pending[n] = pool.submit(cache.fetch, n)
                scheduled += 1
                self._pin(self._keep(now, scheduled))  # before a download ends and its _want mark goes
                progressed = True
            for n in [n for n, f in pending.items() if f.done()]:
                cache._unwant(n)
                pending.pop(n).result()  # raises what the fetch raised (after its retries)
                self._check(n)
            while ready < scheduled and not any(n in pending for n in needs[ready]):
                for n in needs[ready]:
                    cache._used(n)  # the order of use that `victims` evicts by
                ready += 1
                self._ready(ready)
                progressed = True
            if not progressed:
                if pending:
                    wait(list(pending.values()), timeout=0.05, return_when=FIRST_COMPLETED)
                else:
                    time.sleep(0.005)  # waiting for the reader (or another rank) to free room

    def _too_big(self, names: list[str], specs: dict) -> None:
        """Raise when one batch's tars cannot fit the limit beside the index files, with the limit at which the
        node's ranks cannot wait on each other (each batch within ShardCache.quota: see `_loop`)."""
        need, cache, idx = sum(specs[n]["bytes"] or 0 for n in names), self.cache, self._index
        if cache.limit and need > cache.limit - idx:
            at_least = max(0.01, math.ceil((idx + cache.ranks * need) / 2**30 * 100) / 100)
            raise ManifestError(
                f"one batch reads {len(names)} shards ({need / 2**30:.2f} GiB), more than data.cache_limit "
                f"({cache.limit / 2**30:.2f} GiB) leaves beside the index files ({idx / 2**30:.2f} GiB): raise "
                f"data.cache_limit to at least {at_least:.2f} GiB for {cache.ranks} rank(s) of this node (each may "
                "hold a share of it), or make smaller shards (imt-make-shards --shard-bytes)")


class Stream:
    """One split of a data set larger than the cache, as both loaders read it: the windows its epochs are cut
    into (`windows`: the arguments of common.windowed_order before `world` and `seed`) and a Feeder per
    iteration, which checks each tar as it arrives (common.check_shard_pair: the index describes the tar)."""

    def __init__(self, cache: ShardCache, split, manifest):
        import numpy as np

        self.cache, self.split, self.manifest = cache, split, manifest
        self.names = [Path(s.tar).name for s in split.shards]
        sizes = [cache.shards()[n]["bytes"] or 0 for n in self.names]
        counts = [s.num_samples for s in split.shards]
        self.windows = (counts, sizes, cache.window_bytes())
        self._ends = np.cumsum(counts)  # sample i lies in shard searchsorted(ends, i, "right")
        self._checked: set[str] = set()

    def shard_of(self, samples) -> list[int]:
        import numpy as np

        return np.searchsorted(self._ends, np.asarray(samples, dtype=np.int64), side="right").tolist()

    def feeder(self, plan: list[list[int]], ready) -> Feeder:
        """A started Feeder for the batches `plan` (sample indices) of one iteration."""
        needs = [sorted({self.names[s] for s in self.shard_of(batch)}) for batch in plan]
        return Feeder(self.cache, needs, ready, check=self._check)

    def _check(self, name: str) -> None:
        if name not in self._checked:  # once per tar and process
            from .common import check_shard_pair

            shard = self.split.shards[self.names.index(name)]
            check_shard_pair(shard, self.split.name, self.manifest.root, self.manifest.label_ext)
            self._checked.add(name)


def open_remote(cfg, ranks: int = 1) -> tuple[str, ShardCache | None]:
    """(local shard folder, None) for a local `cfg.path` or a remote data set that fits data.cache_limit (staged
    whole); (folder of its manifest and indexes, the cache to stream its tars through) for a larger one. One
    cache per data set in a process, so its training and validation loaders share what it has seen. `ranks`: the
    processes of this node sharing the cache (DistInfo.local_world_size), each given an equal share of it."""
    if not is_remote(cfg.path):
        return cfg.path, None
    cache = _cache(cfg.path, cfg.cache_dir, cfg.cache_limit, max(1, min(8, cfg.workers)), ranks)
    if cache.fits():
        return str(cache.stage()), None
    return str(cache.stage(tars=False)), cache


@functools.lru_cache(maxsize=None)
def _cache(url: str, cache_dir: str, limit_gib: float, workers: int, ranks: int = 1) -> ShardCache:
    return ShardCache(url, cache_dir, limit_gib, workers=workers, ranks=ranks)
