"""Elastic resume under torchrun (gloo, CPU): a run stopped mid-epoch on W ranks and resumed on W' trains each
sample of the interrupted epoch exactly once across the two runs, every later epoch covers every sample once,
and no rank hangs (every rank has the same number of batches)."""
from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imt.train.checkpoint import list_checkpoints, load_checkpoint

from .test_ddp import _free_port

REPO = Path(__file__).resolve().parents[2]
RECORDER = str(Path(__file__).with_name("_record_keys.py"))


def _launch(world: int, out: Path, shards: Path, log: Path, epochs: int, loader: str, *extra: str) -> list[str]:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    return [torchrun, "--nproc_per_node", str(world), "--rdzv_backend", "c10d", "--rdzv_endpoint",
            f"127.0.0.1:{_free_port()}", RECORDER, "--loader", loader, "--set", "data.dali_device=cpu", "--data",
            str(shards), "--workers", "1",
            "--arch", "resnet18", "--epochs", str(epochs), "--batch-size", "8", "--resolution", "32", "--device",
            "cpu", "--out", str(out), "--set", "run.log_every=1", "--set", "run.tensorboard=false", *extra]


def _keys(log: Path) -> dict[int, collections.Counter]:
    per_epoch: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for f in log.parent.glob(f"{log.name}-rank*.jsonl"):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            per_epoch[row["epoch"]].update(row["keys"])
    return per_epoch


@pytest.mark.slow  # 4 torchrun launches: several minutes on the shared 2-core machine
@pytest.mark.parametrize("loader,before,after", [("torch", 2, 3), ("torch", 3, 1), ("dali", 2, 3)])
def test_elastic_resume_trains_every_sample_of_the_interrupted_epoch_once(tmp_path, synthetic_shards, loader, before,
                                                                          after):
    out, first, second = tmp_path / "run", tmp_path / "keys1", tmp_path / "keys2"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    stdout = tmp_path / "first.log"
    with open(stdout, "w") as sink:
        proc = subprocess.Popen(_launch(before, out, synthetic_shards, first, 2, loader), cwd=REPO, stdout=sink,
                                stderr=subprocess.STDOUT, text=True, env={**env, "IMT_KEYS_LOG": str(first)})
        try:
            deadline = time.monotonic() + 400
            while "epoch 2 step 1:" not in stdout.read_text() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=300)
        finally:
            proc.kill()
    said = stdout.read_text()
    assert "stopped by signal 15" in said, said[-3000:]
    state = load_checkpoint(list_checkpoints(out / "checkpoints")[0])
    assert state["epoch"] == 1 and len(state["loaders"]) == before and state["loaders"][0]["done"] > 0

    r = subprocess.run(_launch(after, out, synthetic_shards, second, 3, loader, "--resume", "auto"), cwd=REPO,
                       capture_output=True, text=True, timeout=600, env={**env, "IMT_KEYS_LOG": str(second)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]  # no rank hung or failed
    assert f"continues on {after} rank(s)" in r.stdout
    everything = {f"train_{i:08d}" for i in range(96)}
    one, two = _keys(first), _keys(second)
    assert set(one[0]) == everything and set(one[0].values()) == {1}
    interrupted = one[1] + two[1]
    assert set(interrupted) == everything and set(interrupted.values()) == {1}, "a sample was lost or repeated"
    assert set(two[2]) == everything and set(two[2].values()) == {1}  # a whole epoch on the new ranks
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == after and summary["ranks_agree"] is True
