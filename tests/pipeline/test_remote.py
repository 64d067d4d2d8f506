"""Shards on a web server and on S3 (servers on 127.0.0.1 started by the tests): the manifest read there,
tars fetched into a local cache, verified, retried after a dropped connection, never refetched when
cached, and a size-limited cache that keeps part of the data resident across epochs (not LRU)."""
from __future__ import annotations

import hashlib
import http.server
import os
import random
import threading
import time
from functools import partial
from pathlib import Path

import pytest

from imt.pipeline import remote
from imt.pipeline.manifest import ManifestError, load_manifest
from imt.pipeline.remote import Feeder, ShardCache, is_remote, victims

pytest.importorskip("fsspec")


def _simulate(policy, orders, limit) -> list[int]:
    """Misses per epoch of a cache of `limit` equal shards read in `orders`."""
    resident, recent, out = {}, [], []
    for order in orders:
        misses = 0
        for i, name in enumerate(order):
            if name not in resident:
                misses += 1
                for v in policy(resident, 1, limit, order[i:], recent):
                    del resident[v]
                resident[name] = 1
            if name in recent:
                recent.remove(name)
            recent.append(name)
        out.append(misses)
    return out


def _lru(resident, need, limit, upcoming, recent):
    order = [n for n in recent if n in resident]
    return order[:max(0, len(resident) + need - limit)]


def test_eviction_keeps_part_of_the_data_resident_where_lru_refetches_everything():
    """Mosaic Streaming #658: the same shard order every epoch (validation, or shards read in turn) through a
    cache of half the data: LRU misses every shard of every epoch; ours fetches only what does not fit."""
    shards = [f"s{i}" for i in range(10)]
    cyclic = [shards] * 4
    assert _simulate(_lru, cyclic, 5) == [10, 10, 10, 10]
    ours = _simulate(victims, cyclic, 5)
    assert ours[0] == 10 and all(m <= 6 for m in ours[1:]), ours
    rng = random.Random(0)
    shuffled = [rng.sample(shards, len(shards)) for _ in range(6)]
    assert sum(_simulate(victims, shuffled, 5)[1:]) <= sum(_simulate(_lru, shuffled, 5)[1:])
    assert victims({"a": 1, "b": 1}, 1, 2, ["a", "b"], ["a", "b"]) == ["b"]  # never the shard needed next


class _FlakyHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; the first GET of each .tar sends the full Content-Length, half the bytes, and drops
    the connection (a reset mid-shard)."""
    dropped: set = set()
    requests: list = []

    def do_GET(self):
        type(self).requests.append(self.path)
        if self.path.endswith(".tar") and self.path not in self.dropped:
            type(self).dropped.add(self.path)
            data = Path(self.translate_path(self.path)).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture()
def http_shards(synthetic_shards):
    pytest.importorskip("aiohttp")
    _FlakyHandler.dropped, _FlakyHandler.requests = set(), []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             partial(_FlakyHandler, directory=str(synthetic_shards.parent)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{synthetic_shards.name}", synthetic_shards
    server.shutdown()
    server.server_close()


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_evicting_a_tar_deletes_its_pin_and_lock_files_unless_a_reader_holds_them(tmp_path):
    """The zero-byte .pin/.lock files of a tar go with it (they used to add up, one pair per tar ever fetched),
    but never while a reader's pin holds the tar; a lock file a fetch holds stays."""
    import fcntl

    cache = ShardCache(str(tmp_path / "store"), tmp_path / "cache")
    cache.dir.mkdir(parents=True)
    tar, pin, lock = (cache.dir / n for n in ("a.tar", ".a.tar.pin", ".a.tar.lock"))
    for f in (tar, pin, lock):
        f.touch()
    with remote._locked(pin, fcntl.LOCK_SH):  # a Feeder reading it
        assert not cache._evict("a.tar") and tar.is_file() and pin.is_file() and lock.is_file()
    assert cache._evict("a.tar") and not tar.exists() and not pin.exists() and not lock.exists()
    for f in (tar, pin, lock):
        f.touch()
    with remote._locked(lock, fcntl.LOCK_EX):  # another rank's fetch
        assert cache._evict("a.tar") and not tar.exists() and not pin.exists() and lock.is_file()


def test_a_batch_is_admitted_whole_or_not_at_all(tmp_path):
    """Two ranks' caches on one folder of 3 tars' room. A batch whose missing tars do not fit reserves and pins
    nothing (it used to reserve its tars one at a time and pin its resident ones: two ranks each holding part
    of a batch deadlocked); one that fits reserves all its missing tars and pins its resident ones before the
    folder's lock is released, so the other rank cannot evict them to admit its own batch."""
    import fcntl

    ranks = [ShardCache(str(tmp_path / "store"), tmp_path / "cache", 300 / 2**30) for _ in range(2)]
    folder = ranks[0].dir
    folder.mkdir(parents=True)
    specs = {f"{n}.tar": {"bytes": 100, "sha256": None} for n in "abcd"}
    for n in ("a.tar", "b.tar"):
        (folder / n).write_bytes(b"x" * 100)
    pins = []

    def pin(names):
        pins.extend(remote._locked(folder / f".{n}.pin", fcntl.LOCK_SH) for n in names)

    with remote._locked(folder / ".a.tar.pin", fcntl.LOCK_SH):  # a reader of the other rank holds a.tar
        assert ranks[0]._admit(["b.tar", "c.tar", "d.tar"], ["b.tar", "c.tar", "d.tar"], {}, specs, pin=pin) is None
        assert not pins and not list(folder.glob(".*.want*")) and (folder / "b.tar").is_file()
        assert ranks[0]._admit(["b.tar", "c.tar"], ["b.tar", "c.tar"], {}, specs, pin=pin) == ["c.tar"]
        assert len(pins) == 1 and [p.name for p in folder.glob(".*.want*")] == [ranks[0]._want("c.tar").name]
        # the other rank: a.tar and b.tar pinned, c.tar on its way: no room for d.tar, nothing of it taken
        assert ranks[1]._admit(["d.tar"], ["d.tar", "a.tar", "b.tar"], {}, specs) is None
        assert (folder / "a.tar").is_file() and (folder / "b.tar").is_file() and len(list(folder.glob(".*.want*"))) == 1
    ranks[0]._unwant("c.tar")
    for f in pins:
        f.close()


def test_a_lock_on_a_file_deleted_meanwhile_is_taken_on_the_one_now_there(tmp_path, monkeypatch):
    """A reader opens a pin file, an eviction deletes it before the reader's flock: the reader must end up
    holding the file now at that path, or the next eviction would take the tar it reads."""
    import fcntl

    pin = tmp_path / ".a.tar.pin"
    real, deleted = fcntl.flock, []

    def flock(f, flags):
        if not deleted:  # the eviction runs between this open and this lock
            deleted.append(pin.stat().st_ino)
            pin.unlink()
        real(f, flags)

    monkeypatch.setattr(fcntl, "flock", flock)
    with remote._locked(pin, fcntl.LOCK_SH) as held:
        monkeypatch.setattr(fcntl, "flock", real)
        assert deleted and os.fstat(held.fileno()).st_ino == pin.stat().st_ino
        with pytest.raises(BlockingIOError):  # the next eviction sees the pin
            remote._locked(pin, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_http_shards_are_cached_verified_and_retried(http_shards, tmp_path, monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)
    url, src = http_shards
    assert is_remote(url) and not is_remote(str(src))
    cache = ShardCache(url, tmp_path / "cache")
    local = cache.stage()
    m, theirs = load_manifest(local), load_manifest(src)
    assert m.classes == theirs.classes
    for split in ("train", "val"):
        assert [_sha(s.tar) for s in m.split(split).shards] == [_sha(s.tar) for s in theirs.split(split).shards]
    tars = [r for r in _FlakyHandler.requests if r.endswith(".tar")]
    assert len(tars) == 2 * len(set(tars))  # every tar: dropped mid-transfer once, fetched again
    assert not list(local.glob(".*.part*"))  # no partial file left behind
    again = ShardCache(url, tmp_path / "cache")
    again.stage()
    assert again.fetches == 0  # cached: nothing fetched twice
    with pytest.raises(ManifestError, match="stage.. copies the whole data set"):
        ShardCache(url, tmp_path / "small", limit_gib=1e-6).stage()


def test_loaders_read_a_url_through_the_cache(http_shards, tmp_path):
    from imt.pipeline import build_loader
    from imt.pipeline.config import DataConfig
    from imt.train.dist import DistInfo

    url, _ = http_shards
    cfg = DataConfig(path=url, loader="torch", batch_size=8, resolution=32, val_resolution=32, workers=1,
                     dtype="float32", cache_dir=str(tmp_path / "cache"))
    loader = build_loader(cfg, "val", DistInfo(), train=False)
    assert sum(len(labels) for _, labels in loader) == 32


def _read_in_order(cache: ShardCache, order: list[str]):
    """The local path of each tar of `order`, read one at a time through a Feeder (one tar per batch)."""
    ready = [0]
    feeder = Feeder(cache, [[n] for n in order], lambda k: ready.__setitem__(0, k))
    try:
        for i, name in enumerate(order):
            while ready[0] <= i:
                assert ready[0] >= 0, feeder.error
                time.sleep(0.001)
            yield cache.dir / name
            feeder.consumed = i + 1
    finally:
        feeder.close()


def test_feeder_stays_within_the_limit_and_refetches_less_than_everything(http_shards, tmp_path, monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)
    url, src = http_shards
    probe = ShardCache(url, tmp_path / "c")
    tars = sorted(n for n in probe.shards() if n.endswith(".tar"))
    sizes = {n: probe.shards()[n]["bytes"] for n in tars}
    limit = (sum(sizes.values()) // 2 + max(sizes.values())) / 2**30
    cache = ShardCache(url, tmp_path / "c", limit_gib=limit)
    for _ in range(3):  # three epochs in the same order
        for path in _read_in_order(cache, tars):
            assert path.is_file()
            assert sum(p.stat().st_size for p in path.parent.glob("*.tar")) <= cache.limit
    assert len(tars) < cache.fetches < 3 * len(tars)


def test_s3_shards_through_moto(synthetic_shards, tmp_path, monkeypatch):
    pytest.importorskip("s3fs")
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(k, v)
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="data")
        for p in synthetic_shards.iterdir():
            s3.upload_file(str(p), "data", f"shards/{p.name}")
        local = ShardCache("s3://data/shards", tmp_path / "cache").stage()
        m = load_manifest(local)
        assert m.split("train").num_samples == load_manifest(synthetic_shards).split("train").num_samples
        with pytest.raises(ManifestError, match="manifest.json not found"):
            ShardCache("s3://data/nothing", tmp_path / "cache").stage()
    finally:
        server.stop()
