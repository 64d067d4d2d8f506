"""One training run per `--out` folder at a time: an advisory lock held by global rank 0 for the run's life.

Two runs writing into one folder interleave their metrics and overwrite each other's checkpoints and best.pt,
and both "succeed" (issue 11, item 4). The lock is `fcntl.flock` on `<out>/run.lock`, which holds the holder's
pid, host and start time as JSON for the refusal message. The kernel drops a flock when its holder dies, even
by kill -9, so a crashed run never blocks the next one; a lock file whose recorded holder is gone is taken
over with a message. One case keeps a flock alive after its holder died: a child that inherited the
descriptor by fork() and outlived its parent. The lock is then stale when the recorded pid is not alive on
this host; the file is replaced by a fresh one (the orphan keeps its lock on the old, unlinked inode).

flock is advisory: it stops a second imt-train, not other programs. On NFS (Linux >= 2.6.12 emulates flock
with POSIX byte-range locks) it works across nodes; on file systems without locking, flock raises and the
run refuses, saying so.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
from pathlib import Path

from imt.train import dist
from imt.train.config import ConfigError

LOCK_NAME = "run.lock"


class RunLockedError(ConfigError):
    """Another live run holds the folder's lock; the message names its pid and host."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _same_inode(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def _holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode("utf-8", "replace").strip()
    try:
        found = json.loads(text) if text else {}
    except ValueError:
        found = {}
    return found if isinstance(found, dict) else {}


class RunLock:
    """`with RunLock(out, say=print):` holds `<out>/run.lock` (creating `out`); RunLockedError when a live
    run holds it. Released (and the holder record cleared) on leaving the block; the kernel releases it on
    any other exit."""

    def __init__(self, out: str | Path, say=print):
        self.path, self.say, self.fd = Path(out) / LOCK_NAME, say, None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        host, me = socket.gethostname(), os.getpid()
        for _ in range(5):  # retried only when the file was replaced between our open and our lock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held = _holder(fd)
                pid = held.get("pid")
                if held.get("host") == host and isinstance(pid, int) and not _alive(pid) and _same_inode(fd, self.path):
                    # Its holder died; a forked child that outlived it still holds the flock. Replace the file.
                    self.say(f"{self.path}: taking over the stale lock of pid {pid} on {host} (no longer "
                             f"running; a leftover child process of it still holds the old lock file)")
                    self.path.unlink(missing_ok=True)
                    os.close(fd)
                    continue
                os.close(fd)
                who = (f"pid {pid} on host {held.get('host', '?')}, started {held.get('started', '?')}" if held
                       else "a process that has not written its pid yet")
                raise RunLockedError(
                    f"{self.path.parent} is in use by another training run ({who}): two runs in one folder "
                    "overwrite each other's checkpoints and metrics. Wait for it to end or stop it, or give this "
                    "run another --out") from None
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise RunLockedError(f"cannot lock {self.path} ({exc.strerror}): this file system offers no "
                                         "file locks; put --out on one that does (local disk, NFS with locking)"
                                         ) from exc
                raise
            if not _same_inode(fd, self.path):  # a stale file we opened was replaced meanwhile: lock the new one
                os.close(fd)
                continue
            held = _holder(fd)
            if held.get("pid") not in (None, me):
                self.say(f"{self.path}: taking over the lock of pid {held['pid']} on {held.get('host', '?')}, "
                         "which ended without releasing it (killed?)")
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": me, "host": host, "started": datetime.datetime.now().astimezone()
                                      .isoformat(timespec="seconds")}).encode() + b"\n", 0)
            os.fsync(fd)
            self.fd = fd
            return self
        raise RunLockedError(f"{self.path} keeps being replaced by other processes; is another run starting "
                             "in the same --out?")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # an empty record: the next run has nothing to take over
        except OSError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def locked_run(out: str | Path, info: dist.DistInfo, say=print):
    """Global rank 0 holds the lock for the block; every rank learns whether it got it, so all refuse
    together instead of the others waiting at their next collective for a rank 0 that left."""
    lock, error = None, None
    if info.is_main:
        try:
            lock = RunLock(out, say).acquire()
        except RunLockedError as exc:
            error = str(exc)
        except OSError as exc:  # e.g. --out not writable
            error = f"cannot create the run lock {Path(out) / LOCK_NAME} ({exc}); check --out"
    error = dist.broadcast_object(error, info)
    if error:
        raise RunLockedError(error)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
