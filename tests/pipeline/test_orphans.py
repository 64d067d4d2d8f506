"""pipeline/orphans.py: a child that called exit_with_parent() ends when its parent is killed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .._procs import HAS_PROC, running as _running

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def test_a_parent_that_is_already_gone_ends_the_child_at_once():
    code = "from pipeline.orphans import exit_with_parent\nexit_with_parent(parent=1)\nprint('still here')"
    r = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL and "still here" not in r.stdout


@pytest.mark.skipif(not HAS_PROC, reason="reads processes from /proc (Linux)")
@pytest.mark.parametrize("prctl", [True, False], ids=["pdeathsig", "parent-pid-watch"])
def test_child_ends_within_seconds_of_its_parents_kill_9(prctl):
    child = ("import sys, time\nimport pipeline.orphans as o\n"
             + ("" if prctl else "o._set_pdeathsig = lambda sig: False\n")
             + "o.exit_with_parent(poll_s=0.2)\nprint('armed', flush=True)\ntime.sleep(300)\n")
    parent = ("import subprocess, sys, time\n"
              f"c = subprocess.Popen([sys.executable, '-c', {child!r}], stdout=subprocess.PIPE, text=True)\n"
              "assert c.stdout.readline().strip() == 'armed'\nprint(c.pid, flush=True)\ntime.sleep(300)\n")
    p = subprocess.Popen([sys.executable, "-c", parent], env=ENV, stdout=subprocess.PIPE, text=True)
    pid = None
    try:
        pid = int(p.stdout.readline())
        assert _running(pid)
        p.kill()
        p.wait()
        deadline = time.monotonic() + 5
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(pid), "the child outlived its killed parent"
    finally:
        p.kill()
        if pid and _running(pid):
            os.kill(pid, signal.SIGKILL)
