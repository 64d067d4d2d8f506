"""`torchrun --nproc_per_node 2` with gloo on the CPU: the run finishes, every validation sample is counted
once, and both ranks end with bit-identical weights (checked inside the run, reported in summary.json)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from train.checkpoint import list_checkpoints, load_checkpoint

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("loader", ["synthetic", pytest.param("torch", marks=pytest.mark.slow)])
def test_torchrun_two_ranks_agree(tmp_path, loader, request):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    out = tmp_path / "run"
    data = ["--loader", "synthetic", "--set", "data.synthetic_samples=24", "--set", "data.synthetic_classes=4"]
    if loader == "torch":
        pytest.importorskip("webdataset")
        data = ["--loader", "torch", "--data", str(request.getfixturevalue("synthetic_shards")), "--workers", "1"]
    cmd = [torchrun, "--nproc_per_node", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint",
           f"127.0.0.1:{_free_port()}", "-m", "train.run", *data, "--arch", "resnet18", "--epochs", "2",
           "--batch-size", "8", "--resolution", "32", "--device", "cpu", "--out", str(out),
           "--set", "run.log_every=2", "--set", "run.tensorboard=false", "--set", "optim.ema_decay=0.9"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_agree"] is True
    if loader == "torch":
        assert summary["final"]["val_count"] == 32  # 32 validation images, each counted once over 2 ranks
    assert r.stdout.count("done: resnet18") == 1  # rank 0 alone reports
    state = load_checkpoint(list_checkpoints(out / "checkpoints")[0])
    assert state["world_size"] == 2 and len(state["rng"]) == 2  # every rank's RNG state is kept
