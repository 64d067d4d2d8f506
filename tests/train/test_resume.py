"""Exact resume through the trainer: for each loader a run stopped at a random step and resumed trains the
same batches, epoch by epoch, as the uninterrupted run (labels and pixels), and ends with bitwise-equal weights
(run.deterministic, CPU); SIGTERM and kill -9 to a CLI run then --resume auto give the uninterrupted weights;
checkpoints written before loaders had a state resume at their epoch boundary with a message."""
from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import imt.train.trainer as trainer_mod
from imt.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from imt.train.config import load_config
from imt.train.trainer import train

from .test_run import SYNTH, StopAfter, _assert_same, _params

REPO = Path(__file__).resolve().parents[2]


def _record(monkeypatch) -> list[list[tuple]]:
    """Every batch the model trains on, per train_one_epoch call: (labels, sum of the pixels)."""
    seen: list[list[tuple]] = []
    real = trainer_mod.train_one_epoch

    def spy(net, loader, *args, **kwargs):
        batches: list[tuple] = []
        seen.append(batches)

        class Watched:
            def __len__(self):
                return len(loader)

            def __iter__(self):
                for b in loader:
                    batches.append((tuple(b[1].tolist()), float(b[0].double().sum())))
                    yield b
        return real(net, Watched(), *args, **kwargs)

    monkeypatch.setattr(trainer_mod, "train_one_epoch", spy)
    return seen


def _data(loader: str, request) -> dict:
    if loader == "synthetic":
        return {}
    path = request.getfixturevalue("synthetic_root" if loader == "folder" else "synthetic_shards")
    return {"data.loader": loader, "data.path": str(path), "data.dali_device": "cpu", "data.shuffle_buffer": 32}


@pytest.mark.parametrize("loader", ["dali", pytest.param("torch", marks=pytest.mark.slow),  # ~60 s each here
                                    pytest.param("folder", marks=pytest.mark.slow)])
def test_stop_anywhere_and_resume_trains_the_same_batches(tmp_path, loader, request, monkeypatch):
    over = {**SYNTH, **_data(loader, request), "data.batch_size": 16, "run.epochs": 2, "optim.ema_decay": 0.9,
            "data.seed": 5}
    steps = 6  # 96 samples, batch 16
    at = random.Random(loader).randrange(1, 2 * steps - 1)  # any step but the run's last
    seen = _record(monkeypatch)
    train(load_config(None, {**over, "run.out": str(tmp_path / "whole")}))
    whole, seen[:] = list(seen), []
    stopped = train(load_config(None, {**over, "run.out": str(tmp_path / "split")}), stop=StopAfter(at))
    assert stopped["stopped"] == signal.SIGTERM, f"asked to stop after step {at}"
    train(load_config(None, {**over, "run.out": str(tmp_path / "split"), "run.resume": "auto"}))
    split = list(seen)
    # The stopped run's calls, then the resumed run's: joined, epoch by epoch the uninterrupted batches.
    assert [b for call in split for b in call] == [b for call in whole for b in call]
    assert len(split) == len(whole) + (at % steps != 0)  # the interrupted epoch came in two parts
    _assert_same(_params(tmp_path / "whole"), _params(tmp_path / "split"))


def _cli(out: Path, shards: Path) -> list[str]:
    return [sys.executable, "-m", "imt.train.run", "--loader", "torch", "--data", str(shards), "--arch", "resnet18",
            "--epochs", "2", "--batch-size", "16", "--resolution", "32", "--out", str(out), "--device", "cpu",
            "--workers", "1", "--set", "run.log_every=1", "--set", "run.tensorboard=false", "--set",
            "run.deterministic=true", "--set", "data.dtype=float32", "--set", "optim.warmup_epochs=0",
            "--set", "optim.label_smoothing=0.0"]


@pytest.mark.slow  # 2-4 min on the shared 2-core machine: three CLI runs
@pytest.mark.parametrize("how", ["sigterm", "kill9"])
def test_cli_stopped_by_a_signal_then_resume_auto_ends_with_the_uninterrupted_weights(tmp_path, synthetic_shards,
                                                                                     how):
    """SIGTERM: a mid-epoch checkpoint, and the resumed epoch starts at the next batch. kill -9 (of the whole
    process group, DataLoader workers included, as a lost node): no checkpoint for the epoch under way; the
    resume repeats it from the last epoch checkpoint. Either way the final weights are bitwise the uninterrupted
    run's (torch loader, deterministic CPU run)."""
    import os

    whole = subprocess.run(_cli(tmp_path / "whole", synthetic_shards), cwd=REPO, capture_output=True, text=True,
                           timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    out, log = tmp_path / "split", tmp_path / "split.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(_cli(out, synthetic_shards), cwd=REPO, stdout=sink, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            deadline = time.monotonic() + 400
            while "epoch 2 step 1:" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if how == "sigterm":
                proc.send_signal(signal.SIGTERM)
            else:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    said = log.read_text()
    newest = load_checkpoint(list_checkpoints(out / "checkpoints")[0])
    if how == "sigterm":
        assert proc.returncode == 128 + signal.SIGTERM, said[-3000:]
        assert newest["epoch"] == 1 and newest["loaders"][0]["done"] > 0, "not stopped mid-epoch"
    else:
        assert proc.returncode == -signal.SIGKILL and newest["step"] == 6  # the end of epoch 1
    r = subprocess.run(_cli(out, synthetic_shards) + ["--resume", "auto"], cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    if how == "sigterm":
        assert f"resume: epoch 2 continues at batch {newest['loaders'][0]['done'] + 1}" in r.stdout
    _assert_same(_params(tmp_path / "whole"), _params(out))


def test_a_checkpoint_from_before_loader_states_resumes_at_its_epoch_boundary(tmp_path, capsys):
    cfg = load_config(None, {**SYNTH, "run.epochs": 2, "run.out": str(tmp_path / "run")})
    train(cfg, stop=StopAfter(5))  # 4 steps per epoch: stops at step 2 of epoch 2
    path = list_checkpoints(tmp_path / "run" / "checkpoints")[0]
    old = {k: v for k, v in load_checkpoint(path).items() if k not in ("loaders", "version", "mean", "std")}
    save_checkpoint(old, path)
    capsys.readouterr()
    summary = train(load_config(None, {**SYNTH, "run.epochs": 2, "run.out": str(tmp_path / "run"),
                                       "run.resume": "auto"}))
    said = capsys.readouterr().out
    assert "written before checkpoints kept the loaders' state" in said and "epoch 2, which restarts" in said
    assert summary["final"] is not None and "Traceback" not in said
    assert load_checkpoint(list_checkpoints(tmp_path / "run" / "checkpoints")[0])["step"] == 8


def test_weights_only_bundle_is_refused_as_a_resume_with_what_to_do(tmp_path):
    from imt.train.checkpoint import CheckpointError
    train(load_config(None, {**SYNTH, "run.epochs": 1, "run.out": str(tmp_path / "run")}))
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    bundle = tmp_path / "bundle.pt"
    save_checkpoint({"model": state["model"], "arch": state["arch"], "classes": state["classes"]}, bundle)
    with pytest.raises(CheckpointError, match="weights only .*--pretrained"):
        train(load_config(None, {**SYNTH, "run.epochs": 2, "run.out": str(tmp_path / "again"),
                                 "run.resume": str(bundle)}))
