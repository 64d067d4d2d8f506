"""Worker processes that end with the process that started them.

    ProcessPoolExecutor(n, initializer=exit_with_parent, initargs=(os.getpid(),))   # tools/make_shards.py
    DataLoader(..., worker_init_fn=lambda _: exit_with_parent())                     # a trainer's workers

Without it, a `kill -9` of the main process left make_shards' workers running (9 of 9 trials, issue 11),
and the multiprocessing resource tracker with them: the tracker exits by itself once every process holding
its pipe (the main process and the workers) is gone, so ending the workers ends it too.

Imports nothing heavy (no torch): make_shards' spawned workers import it.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def exit_with_parent(parent: int | None = None, *, poll_s: float = 1.0) -> None:
    """Make this process die (SIGKILL) when its parent process dies. Call it first thing in a child.

    `parent`: the pid this process should have as its parent; the pool's creator passes its own
    `os.getpid()` as the initializer's argument, so that a parent that died before this call is noticed
    (the process then exits at once). None: whatever the parent is now (e.g. under a forkserver, whose own
    exit follows the main process's).

    Linux: prctl(PR_SET_PDEATHSIG, SIGKILL), so the kernel kills this process the moment the parent goes.
    The kernel ties it to the parent *thread* that created this process: create the workers from a thread
    that lives as long as they do (the main thread, as make_shards and DataLoader do). Elsewhere, or if prctl
    fails, a daemon thread checks every `poll_s` seconds whether the parent changed.
    """
    expected = os.getppid() if parent is None else parent
    if not _set_pdeathsig(signal.SIGKILL):
        threading.Thread(target=_watch, args=(expected, poll_s), name="exit-with-parent", daemon=True).start()
    if os.getppid() != expected:  # the parent died before the signal was armed
        _die()


def _set_pdeathsig(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):  # no libc symbol table (static builds, odd sandboxes)
        return False


def _watch(parent: int, poll_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(poll_s)
    _die()


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
