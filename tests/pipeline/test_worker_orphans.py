"""The torch loaders' DataLoader workers, their forkserver and the resource tracker end within seconds when
the trainer is killed with kill -9 (they used to live on for minutes, holding gigabytes)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .._procs import HAS_PROC, children, running

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not HAS_PROC, reason="reads processes from /proc (Linux)")
def test_workers_and_forkserver_end_with_a_killed_trainer(synthetic_shards):
    trainer = f"""
import sys, time
from imt.pipeline.config import DataConfig
from imt.pipeline.torch_baseline import ShardLoader
from imt.train.dist import DistInfo
if __name__ == "__main__":
    cfg = DataConfig(path={str(synthetic_shards)!r}, batch_size=8, resolution=32, val_resolution=32, workers=2,
                     dtype="float32")
    it = iter(ShardLoader(cfg, "train", DistInfo(), train=True))
    next(it)
    print("ready", flush=True)
    time.sleep(300)
"""
    p = subprocess.Popen([sys.executable, "-c", trainer], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    leftovers: set[int] = set()
    try:
        assert p.stdout.readline().strip() == "ready"
        kids = children(p.pid)  # the forkserver and the resource tracker
        leftovers = kids | {g for k in kids for g in children(k)}  # and the workers, children of the forkserver
        assert len(leftovers) >= 4, leftovers
        p.kill()
        p.wait()
        deadline = time.monotonic() + 10
        while any(running(q) for q in leftovers) and time.monotonic() < deadline:
            time.sleep(0.1)
        alive = [q for q in leftovers if running(q)]
        assert not alive, f"still running after the trainer's kill -9: {alive}"
    finally:
        p.kill()
        for q in leftovers:
            if running(q):
                os.kill(q, signal.SIGKILL)
