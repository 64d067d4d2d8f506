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

from imt.train.checkpoint import list_checkpoints, load_checkpoint

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
           f"127.0.0.1:{_free_port()}", "-m", "imt.train.run", *data, "--arch", "resnet18", "--epochs", "2",
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


def test_torchrun_sigterm_stops_every_rank_at_the_same_step_and_resumes(tmp_path):
    """Preemption under torchrun: SIGTERM to the launcher reaches both ranks, which agree to stop within a
    step (not at the next log point, here only at the end of the epoch), save one mid-epoch checkpoint,
    and exit; the same command with --resume auto finishes the run with both ranks in step."""
    import signal
    import time

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    out = tmp_path / "run"
    cmd = [torchrun, "--nproc_per_node", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint",
           f"127.0.0.1:{_free_port()}", "-m", "imt.train.run", "--loader", "synthetic", "--set",
           "data.synthetic_samples=240", "--set", "data.synthetic_classes=4", "--arch", "resnet18", "--epochs", "2",
           "--batch-size", "4", "--resolution", "32", "--device", "cpu", "--out", str(out),
           "--set", "run.log_every=1000", "--set", "run.tensorboard=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 180
        while not list_checkpoints(out / "checkpoints") and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        first = list_checkpoints(out / "checkpoints")
        assert first, "no end-of-epoch checkpoint appeared"
        steps_per_epoch = load_checkpoint(first[0])["step"]
        time.sleep(1.5)  # into epoch 2 (60 steps of about 0.1 s)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert output.count("stopped by signal 15") == 1, output[-3000:]  # rank 0 speaks for both
    assert "Traceback" not in output.split("stopped by signal 15")[0], output[-3000:]  # no rank failed first
    stopped = load_checkpoint(list_checkpoints(out / "checkpoints")[0])
    assert stopped["epoch"] == 1 and 0 < stopped["step"] - steps_per_epoch < steps_per_epoch, (
        f"stopped at step {stopped['step']} of epoch 2 ({steps_per_epoch} steps each): not mid-epoch")
    steps = {line.rsplit("at step ", 1)[1].split(";")[0] for line in output.splitlines() if "stopped by" in line}
    assert steps == {str(stopped["step"])}

    r = subprocess.run([*cmd, "--resume", "auto"], cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ranks_agree"] is True
    assert load_checkpoint(list_checkpoints(out / "checkpoints")[0])["step"] == 2 * steps_per_epoch
