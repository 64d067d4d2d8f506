"""The run folder lock: a second run into a busy --out refuses naming the holder; the lock of a killed run
(kill -9) is taken over with a message, also when a leftover child of it still holds the old flock."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from imt.train.runlock import LOCK_NAME, RunLock, RunLockedError

REPO = Path(__file__).resolve().parents[2]


def _holder(out: Path, code: str = "") -> subprocess.Popen:
    """A second process that takes the lock of `out` (or runs `code`), says 'ready', then waits."""
    code = code or f"from train.runlock import RunLock; lock = RunLock({str(out)!r}).acquire()"
    script = textwrap.dedent(code) + "\nimport sys, time; print('ready', flush=True); time.sleep(120)\n"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_second_run_refuses_then_takes_over_after_kill9(tmp_path):
    out = tmp_path / "run"
    proc = _holder(out)
    try:
        with pytest.raises(RunLockedError, match=rf"in use by another training run \(pid {proc.pid} on host "
                                                 rf"{socket.gethostname()}, started .*another --out"):
            RunLock(out).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    said = []
    with RunLock(out, say=said.append):  # the kernel dropped the dead holder's flock
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):  # a second lock in the same process too
            RunLock(out).acquire()
    assert said and f"lock of pid {proc.pid}" in said[0] and "ended without releasing it" in said[0]
    assert (out / LOCK_NAME).read_text() == ""  # released cleanly: nothing to take over next time
    with RunLock(out, say=said.append):
        pass
    assert len(said) == 1


def test_stale_lock_held_by_an_orphaned_child_is_taken_over(tmp_path):
    """The holder recorded in the file is dead but a process that inherited its descriptor still holds the
    flock (a forked worker that outlived its parent): the file is replaced, with a message."""
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    proc = _holder(out, f"""
        import fcntl, json, os, socket
        fd = os.open({str(out / LOCK_NAME)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps({{"pid": {dead.pid}, "host": socket.gethostname()}}).encode())
        """)
    try:
        said = []
        with RunLock(out, say=said.append):
            assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
        assert f"stale lock of pid {dead.pid}" in said[0]
    finally:
        proc.kill()
        proc.wait()


def test_train_refuses_a_busy_out(tmp_path):
    from imt.train.config import load_config
    from imt.train.run import train
    from tests.train.test_run import SYNTH

    out = tmp_path / "run"
    proc = _holder(out)
    try:
        with pytest.raises(RunLockedError, match=f"pid {proc.pid}"):
            train(load_config(None, {**SYNTH, "run.out": str(out), "run.epochs": 1}))
        assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
    finally:
        proc.kill()
        proc.wait()
