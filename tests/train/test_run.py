"""The trainer end to end on the CPU: loss goes down with each loader, stop-and-resume is exact, SIGTERM
leaves a loadable checkpoint, a NaN loss stops the run keeping the last good checkpoint, and the CLI runs
as a script, a module and with bad options."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from imt.train.checkpoint import StopFlag, list_checkpoints, load_checkpoint
from imt.train.config import load_config
from imt.train.run import train

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
TINY = {"model.arch": "resnet18", "data.batch_size": 8, "data.resolution": 32, "data.val_resolution": 32,
        "data.workers": 1, "optim.warmup_epochs": 0, "optim.label_smoothing": 0.0, "run.log_every": 2,
        "run.tensorboard": False, "run.deterministic": True, "run.device": "cpu"}
SYNTH = {**TINY, "data.loader": "synthetic", "data.synthetic_samples": 32, "data.synthetic_classes": 4,
         "data.dtype": "float32"}


def _cfg(tmp_path, name="run", **over):
    return load_config(None, {**SYNTH, "run.out": str(tmp_path / name), **over})


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_synthetic_run_learns_and_writes_everything(tmp_path):
    summary = train(_cfg(tmp_path, **{"run.epochs": 3, "optim.lr": 0.4}))
    out = tmp_path / "run"
    rows = _rows(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    for key in ("train_loss", "val_top1", "val_top5", "images_per_sec", "data_wait_fraction", "lr", "resolution",
                "epoch_time"):
        assert key in rows[0]
    assert 0 <= rows[0]["data_wait_fraction"] < 1 and rows[0]["images_per_sec"] > 0
    assert 0 <= rows[0]["first_batch_wait"] <= rows[0]["data_wait_fraction"] * rows[0]["train_time"] + 1e-6
    assert json.loads((out / "config.json").read_text())["precision"]["dtype"] in ("float32", "bfloat16")
    assert (out / "report" / "per_class.csv").is_file() and (out / "report" / "confusion.csv").is_file()
    assert (out / "checkpoints" / "best.pt").is_file() and summary["best"]["epoch"] >= 1
    state = load_checkpoint(list_checkpoints(out / "checkpoints")[0])
    assert state["epoch"] == 3 and state["step"] == 12 and state["arch"] == "resnet18"
    assert len(state["classes"]) == 4 and state["config"]["run"]["epochs"] == 3


def test_eval_every_0_evaluates_only_the_last_epoch_and_skipped_epochs_print(tmp_path):
    train(_cfg(tmp_path, **{"run.epochs": 3, "run.eval_every": 0}))
    assert [r["val_top1"] is None for r in _rows(tmp_path / "run")] == [True, True, False]
    # an epoch without evaluation after one with it (the progress line once formatted the missing top-1)
    train(_cfg(tmp_path, "every2", **{"run.epochs": 4, "run.eval_every": 2}))
    assert [r["val_top1"] is None for r in _rows(tmp_path / "every2")] == [True, False, True, False]
    with pytest.raises(ValueError, match="run.eval_every=-1"):
        _cfg(tmp_path, **{"run.eval_every": -1})


class StopAfter(StopFlag):
    """Asks to stop after `n` looks (the loop looks once per step in one process): a simulated preemption."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.looks = n, 0

    @property
    def requested(self) -> bool:
        self.looks += 1
        if self.looks > self.n and self.signum is None:
            self.signum = signal.SIGTERM
        return self.signum is not None


def _params(out: Path) -> dict:
    state = load_checkpoint(list_checkpoints(out / "checkpoints")[0])
    return {**{f"model.{k}": v for k, v in state["model"].items()},
            **{f"momentum.{k}": v["momentum_buffer"] for k, v in state["optimizer"]["state"].items()},
            **{f"ema.{k}": v for k, v in state["ema"].items()}}


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"


@pytest.mark.parametrize("loader", ["synthetic", "torch"])
def test_stop_and_resume_is_exact(tmp_path, loader, request):
    over = {"run.epochs": 2, "optim.ema_decay": 0.9, "optim.schedule": "cosine", "optim.warmup_epochs": 0.5}
    if loader == "torch":
        pytest.importorskip("webdataset")
        shards = request.getfixturevalue("synthetic_shards")
        over.update({"data.loader": "torch", "data.path": str(shards), "data.batch_size": 16,
                     "run.max_steps_per_epoch": 3, "data.dtype": "float32"})
    train(_cfg(tmp_path, "whole", **over))
    stopped = train(_cfg(tmp_path, "split", **over), stop=StopAfter(5))  # epoch 2, step 1 of 4 (or 2 of 3)
    # named after the epoch the screen shows ("epoch 2/2"), not the 0-based index
    assert stopped["stopped"] == signal.SIGTERM and Path(stopped["checkpoint"]).name.startswith("epoch0002-")
    done = train(_cfg(tmp_path, "split", **{**over, "run.resume": "auto"}))
    assert "stopped" not in done
    _assert_same(_params(tmp_path / "whole"), _params(tmp_path / "split"))
    assert [r["epoch"] for r in _rows(tmp_path / "split")] == [1, 2]


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_loss_goes_down_on_shards(tmp_path, synthetic_shards, loader):
    pytest.importorskip("nvidia.dali" if loader == "dali" else "webdataset")
    cfg = load_config(None, {**TINY, "data.loader": loader, "data.path": str(synthetic_shards),
                             "data.dali_device": "cpu", "data.batch_size": 16, "data.min_area": 0.5,
                             "optim.lr": 0.8, "run.epochs": 4, "run.out": str(tmp_path / loader),
                             "run.deterministic": False})
    summary = train(cfg)
    rows = _rows(tmp_path / loader)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"], [r["train_loss"] for r in rows]
    assert summary["final"]["val_count"] == 32  # every validation image exactly once


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    train(_cfg(tmp_path, **{"run.epochs": 1}))
    ckpts = list_checkpoints(tmp_path / "run" / "checkpoints")
    before = {p.name: p.stat().st_mtime_ns for p in ckpts}
    r = subprocess.run([PY, "-m", "imt.train.run", "--loader", "synthetic", "--arch", "resnet18", "--epochs", "2",
                        "--batch-size", "8", "--resolution", "32", "--out", str(tmp_path / "run"), "--resume",
                        "auto", "--device", "cpu", "--lr", "1e30", "--set", "data.synthetic_samples=32",
                        "--set", "data.synthetic_classes=4", "--set", "run.log_every=1", "--set",
                        "run.tensorboard=false"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "NonFiniteLoss" in r.stderr and "last checkpoint is kept" in r.stderr and "Traceback" not in r.stderr
    after = {p.name: p.stat().st_mtime_ns for p in list_checkpoints(tmp_path / "run" / "checkpoints")}
    assert after == before


def test_resume_refuses_another_architecture(tmp_path):
    train(_cfg(tmp_path, **{"run.epochs": 1}))
    from imt.train.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="holds a resnet18 but this run builds a resnet34"):
        train(_cfg(tmp_path, **{"run.epochs": 2, "run.resume": "auto", "model.arch": "resnet34"}))


def test_resume_with_other_optimizer_groups_is_refused_cleanly(tmp_path):
    """A checkpoint of plain training resumed as fine-tuning (head and backbone in separate lr groups):
    a CheckpointError that says what to do, not torch's ValueError traceback."""
    train(_cfg(tmp_path, **{"run.epochs": 1}))
    from imt.train.checkpoint import CheckpointError
    weights = str(tmp_path / "run" / "checkpoints" / "best.pt")
    with pytest.raises(CheckpointError, match="does not fit this run.*settings it was made with"):
        train(_cfg(tmp_path, **{"run.epochs": 2, "run.resume": "auto", "model.pretrained": weights}))


def test_sigterm_saves_a_loadable_checkpoint_and_resumes(tmp_path):
    out = tmp_path / "run"
    cmd = [PY, "train/run.py", "--loader", "synthetic", "--arch", "resnet18", "--batch-size", "8",
           "--resolution", "32", "--out", str(out), "--device", "cpu", "--set", "data.synthetic_samples=80",
           "--set", "data.synthetic_classes=4", "--set", "run.log_every=1", "--set", "run.tensorboard=false"]
    proc = subprocess.Popen(cmd + ["--epochs", "50"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and not (out / "metrics.jsonl").is_file():
            time.sleep(0.2)
        time.sleep(1.0)  # into the second epoch
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by signal" in stdout and "Traceback" not in stderr
    state = load_checkpoint(list_checkpoints(out / "checkpoints")[0])
    assert state["step"] > 10 and state["epoch"] >= 1
    r = subprocess.run(cmd + ["--epochs", str(state["epoch"] + 1), "--resume", "auto"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout and "done: resnet18" in r.stdout


def test_cli_errors_are_clear(tmp_path):
    r = subprocess.run([PY, "train/run.py", "--loader", "synthetic", "--out", str(tmp_path), "--set",
                        "optim.learnign_rate=1"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "optim.learnign_rate" in r.stderr and "valid keys" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([PY, "-m", "imt.train.run", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--recipe" in r.stdout and "--set" in r.stdout


def test_finetune_from_our_checkpoint_linear_and_full(tmp_path):
    """--pretrained through the CLI: a 4-class run's checkpoint fine-tuned on 3 classes. Linear probe: only the
    new head moves (BN statistics too stay put); full: the backbone trains at backbone_lr_mult x the lr."""
    from click.testing import CliRunner

    from imt.train.run import main

    train(_cfg(tmp_path, "pre", **{"run.epochs": 1}))
    pre = load_checkpoint(tmp_path / "pre" / "checkpoints" / "best.pt")
    common = ["--loader", "synthetic", "--set", "data.synthetic_samples=24", "--set", "data.synthetic_classes=3",
              "--set", "data.dtype=float32", "--arch", "resnet18", "--epochs", "1", "--batch-size", "8",
              "--resolution", "32", "--device", "cpu", "--set", "run.tensorboard=false",
              "--set", "optim.warmup_epochs=0", "--pretrained", str(tmp_path / "pre" / "checkpoints" / "best.pt")]
    r = CliRunner().invoke(main, [*common, "--finetune", "linear", "--out", str(tmp_path / "lin")])
    assert r.exit_code == 0, r.output
    assert "classifier replaced (new classes): fc.weight, fc.bias" in r.output
    assert "fine-tuning (linear, BN statistics frozen): 2 of 62 parameter tensors train" in r.output
    lin = load_checkpoint(list_checkpoints(tmp_path / "lin" / "checkpoints")[0])
    assert lin["model"]["fc.weight"].shape == (3, 512) and len(lin["classes"]) == 3
    for k, v in pre["model"].items():
        if not k.startswith("fc."):
            assert torch.equal(lin["model"][k], v), k  # weights and running statistics untouched

    r = CliRunner().invoke(main, [*common, "--finetune", "full", "--set", "optim.backbone_lr_mult=0.25",
                                  "--set", "optim.schedule=step", "--set", "optim.milestones=[]",  # constant lr
                                  "--out", str(tmp_path / "full")])
    assert r.exit_code == 0, r.output
    full = load_checkpoint(list_checkpoints(tmp_path / "full" / "checkpoints")[0])
    assert not torch.equal(full["model"]["conv1.weight"], pre["model"]["conv1.weight"])
    groups = {g["name"]: g for g in full["optimizer"]["param_groups"]}
    assert groups["backbone"]["lr"] == pytest.approx(0.25 * groups["head"]["lr"]) and groups["head"]["lr"] > 0


def test_finetune_resumes_without_repeating_pretrained(tmp_path, capsys):
    """The checkpoint knows it was a fine-tune: a resume without --pretrained (its file gone meanwhile) rebuilds
    the same parameter groups and frozen modules and continues, for a linear probe and for full fine-tuning."""
    import shutil

    from imt.train.transfer import PretrainedError

    train(_cfg(tmp_path, "pre", **{"run.epochs": 1}))
    weights = tmp_path / "weights.pt"
    shutil.copy(tmp_path / "pre" / "checkpoints" / "best.pt", weights)
    ft = {"data.synthetic_classes": 3, "data.synthetic_samples": 24}
    for mode, extra in (("linear", {}), ("full", {"optim.backbone_lr_mult": 0.25})):
        name = f"ft-{mode}"
        train(_cfg(tmp_path, name, **ft, **extra, **{"run.epochs": 1, "model.pretrained": str(weights),
                                                      "model.finetune": mode}))
        first = load_checkpoint(list_checkpoints(tmp_path / name / "checkpoints")[0])
        hidden = weights.rename(tmp_path / "elsewhere.pt")
        capsys.readouterr()
        summary = train(_cfg(tmp_path, name, **ft, **extra, **{"run.epochs": 2, "run.resume": "auto"}))
        out = capsys.readouterr().out
        hidden.rename(weights)
        assert summary["epochs"] == 2 and "trains from scratch" not in out
        assert f"fine-tuning ({mode}" in out and "set up as in the checkpoint" in out
        second = load_checkpoint(list_checkpoints(tmp_path / name / "checkpoints")[0])
        assert second["epoch"] == 2 and second["config"]["model"]["pretrained"] == str(weights)
        assert [g["name"] for g in second["optimizer"]["param_groups"]] == \
            [g["name"] for g in first["optimizer"]["param_groups"]]
        if mode == "linear":  # still a probe: the backbone and its BN statistics did not move
            bn = "layer1.0.bn1.running_mean"
            assert torch.equal(second["model"][bn], first["model"][bn])
            assert torch.equal(second["model"]["conv1.weight"], first["model"]["conv1.weight"])
    with pytest.raises(PretrainedError, match="no fine-tuning checkpoint to resume from"):
        train(_cfg(tmp_path, "nothing-yet", **{"run.resume": "auto", "model.finetune": "linear"}))


def test_linear_probe_needs_pretrained_weights(tmp_path):
    from imt.train.config import ConfigError
    with pytest.raises(ConfigError, match="need pretrained weights: pass --pretrained"):
        _cfg(tmp_path, **{"model.finetune": "linear"})


def test_progressive_resizing_reaches_the_loader_and_tensorboard_gets_the_scalars(tmp_path, synthetic_shards,
                                                                                   monkeypatch):
    """A real run with run.start_res: the batches the model sees grow 32 -> 48 -> 64 px over the epochs (not only
    the logged number), and TensorBoard receives every metric per epoch."""
    import imt.train.trainer as run_mod

    seen: list[set] = []
    real_epoch = run_mod.train_one_epoch

    def spy(net, loader, *args, **kwargs):
        sizes: set = set()
        seen.append(sizes)

        class Watched:
            def __len__(self):
                return len(loader)

            def __iter__(self):
                for batch in loader:
                    sizes.add(tuple(batch[0].shape[-2:]))
                    yield batch
        return real_epoch(net, Watched(), *args, **kwargs)

    monkeypatch.setattr(run_mod, "train_one_epoch", spy)
    cfg = load_config(None, {**TINY, "data.loader": "torch", "data.path": str(synthetic_shards),
                             "data.resolution": 64, "data.val_resolution": 40, "run.epochs": 3,
                             "run.start_res": 32, "run.ramp_start": 0, "run.ramp_end": 2, "run.res_step": 16,
                             "run.tensorboard": True, "run.out": str(tmp_path / "run")})
    train(cfg)
    assert seen == [{(32, 32)}, {(48, 48)}, {(64, 64)}]
    assert [r["resolution"] for r in _rows(tmp_path / "run")] == [32, 48, 64]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("train_loss", "val_top1", "lr", "images_per_sec", "resolution"):
        match = [t for t in tags if t.split("/")[-1] == tag]
        assert match, f"{tag} not in {tags}"
        assert [e.step for e in events.Scalars(match[0])] == [1, 2, 3]


def test_a_used_out_is_refused_for_a_fresh_run_and_a_finished_run_is_left_alone(tmp_path):
    """A fresh run into a folder with checkpoints would rotate them away and mix best.pt and config.json;
    --resume auto on a run that already did all its epochs (a re-queued job) must keep its summary."""
    from imt.train.config import ConfigError

    first = train(_cfg(tmp_path, **{"run.epochs": 2}))
    out = tmp_path / "run"
    files = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "run.lock"}
    with pytest.raises(ConfigError, match="already holds checkpoints .*--resume auto.*new --out"):
        train(_cfg(tmp_path, **{"run.epochs": 2}))
    again = train(_cfg(tmp_path, **{"run.epochs": 2, "run.resume": "auto"}))
    assert again["already_done"] and again["final"] == first["final"]
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*")
            if p.is_file() and p.name != "run.lock"} == files  # nothing rewritten but the run lock


def test_resume_applies_this_runs_optimizer_settings_and_reads_checkpoints_in_epoch_order(tmp_path, capsys):
    """optimizer.load_state_dict brought back the saved weight decay and momentum while config.json recorded
    the new ones. A resume with a bigger batch has fewer steps per epoch: its later checkpoints must still count
    as the newest (rotation used to delete them); their step is the optimizer steps done over the whole run."""
    train(_cfg(tmp_path, **{"run.epochs": 2, "run.keep_last": 2}))  # 4 steps per epoch at batch 8: steps 4, 8
    train(_cfg(tmp_path, **{"run.epochs": 3, "run.keep_last": 2, "run.resume": "auto", "data.batch_size": 16,
                            "optim.weight_decay": 0.5, "optim.momentum": 0.5}))  # 2 steps per epoch: step 10
    names = [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert names == ["epoch0003-step00000010.pt", "epoch0002-step00000008.pt"]
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / names[0])
    groups = state["optimizer"]["param_groups"]
    assert {g["momentum"] for g in groups} == {0.5} and max(g["weight_decay"] for g in groups) == 0.5
    assert "this run's optimizer settings replace the checkpoint's" in capsys.readouterr().out


def test_broken_weights_are_never_checkpointed(tmp_path, monkeypatch):
    """The loss is checked before each update; weights broken by an epoch's last update must not be saved."""
    import imt.train.trainer as run_mod
    from imt.train.loop import NonFiniteLoss

    real_epoch = run_mod.train_one_epoch

    def breaks_the_weights(net, *args, **kwargs):
        stats = real_epoch(net, *args, **kwargs)
        with torch.no_grad():
            next(net.parameters()).fill_(float("nan"))
        return stats

    monkeypatch.setattr(run_mod, "train_one_epoch", breaks_the_weights)
    with pytest.raises(NonFiniteLoss, match="weights hold NaN/inf after epoch 1"):
        train(_cfg(tmp_path, **{"run.epochs": 1}))
    assert list_checkpoints(tmp_path / "run" / "checkpoints") == []


def test_the_schedule_is_fitted_to_the_run_and_printed_once(tmp_path, capsys):
    """A warm-up longer than half the run is clamped (config.json records what ran) and the resolved schedule
    is printed at start."""
    train(_cfg(tmp_path, **{"run.epochs": 2, "optim.warmup_epochs": 5}))
    out = capsys.readouterr().out
    assert "warm-up clamped to 1 epochs" in out
    assert out.count("schedule: warm-up 4 steps (1 epochs) to peak lr") == 1 and "train px per epoch: 32 x2" in out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["optim"]["warmup_epochs"] == 1


def test_one_cpu_process_on_several_cores_is_told_about_one_rank_per_core(tmp_path, capsys, monkeypatch):
    """One process on a multi-core CPU machine hears once how to run a rank per core; a one-core machine does not."""
    import imt.train.trainer as trainer

    monkeypatch.setattr(trainer, "usable_cores", lambda: 2)
    train(_cfg(tmp_path, **{"run.epochs": 1}))
    assert capsys.readouterr().out.count("torchrun --standalone --nproc_per_node 2 -m imt.train.run") == 1
    monkeypatch.setattr(trainer, "usable_cores", lambda: 1)
    train(_cfg(tmp_path, "one", **{"run.epochs": 1}))
    assert "nproc_per_node" not in capsys.readouterr().out


def test_lamb_with_accumulation_clipping_and_mixing_trains_and_resume_keeps_its_optimizer(tmp_path, capsys,
                                                                                           monkeypatch):
    import imt.train.trainer as run_mod  # the epoch driver calls train_one_epoch

    seen = []
    real_epoch = run_mod.train_one_epoch

    def spy(*args, **kwargs):
        seen.append({k: kwargs[k] for k in ("grad_clip", "grad_accum", "batch_transform")})
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(run_mod, "train_one_epoch", spy)
    over = {"run.epochs": 1, "optim.optimizer": "lamb", "optim.lr": 0.004, "optim.weight_decay": 0.02,
            "optim.grad_accum": 2, "optim.grad_clip": 1.0, "optim.mixup": 0.2, "optim.cutmix": 1.0}
    summary = train(_cfg(tmp_path, **over))
    assert "global batch 16" in capsys.readouterr().out  # 8 per batch x 2 accumulated
    assert seen[0]["grad_clip"] == 1.0 and seen[0]["grad_accum"] == 2 and seen[0]["batch_transform"] is not None
    state = load_checkpoint(list_checkpoints(tmp_path / "run" / "checkpoints")[0])
    assert "exp_avg" in next(iter(state["optimizer"]["state"].values()))  # Lamb's state, not SGD's momentum
    assert summary["final"] is not None
    from imt.train.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="trained with optim.optimizer=lamb.*--set optim.optimizer=lamb"):
        train(_cfg(tmp_path, **{**over, "run.epochs": 2, "optim.optimizer": "sgd", "run.resume": "auto"}))

def test_cli_tune_overlay_threads_and_first_epoch_data_wait_note(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from imt.train.run import main

    monkeypatch.setattr("imt.train.monitor.DATA_WAIT_NOTE", -1.0)  # any data wait counts: the note must come once
    tune = tmp_path / "tune.yaml"
    tune.write_text("data:\n  prefetch: 3\n  batch_size: 8\n")
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["--loader", "synthetic", "--arch", "resnet18", "--epochs", "2", "--resolution", "32",
                                  "--out", str(out), "--device", "cpu", "--threads", "1", "--tune", str(tune),
                                  "--set", "data.synthetic_samples=16", "--set", "data.synthetic_classes=4",
                                  "--set", "run.tensorboard=false", "--set", "optim.warmup_epochs=0"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["prefetch"] == 3 and cfg["data"]["batch_size"] == 8 and cfg["run"]["threads"] == 1
    assert r.output.count("imt-tune") == 1  # after the first epoch only


def test_a_timm_model_built_for_one_size_is_refused_before_training_unless_it_fits(tmp_path):
    """timm's ViTs check the input size at every forward: a run at other sizes stops at start with the fixes,
    and runs when the size fits or the model takes any size (dynamic_img_size)."""
    vit = {"model.arch": "timm:vit_tiny_patch16_224", "run.epochs": 1, "data.synthetic_samples": 8,
           "data.batch_size": 4, "model.zero_init_residual": False}
    small = {"depth": 1, "embed_dim": 32, "num_heads": 2}
    from imt.train.config import ConfigError
    with pytest.raises(ConfigError, match=r"takes 48x48 px images only .*run uses 32 px: pass --resolution 48.*"
                                          r"dynamic_img_size: true"):
        train(_cfg(tmp_path, "wrong", **vit, **{"model.kwargs": {**small, "img_size": 48}}))
    assert not list((tmp_path / "wrong").glob("checkpoints/*.pt"))
    for name, kwargs in (("fits", {"img_size": 32}), ("dynamic", {"img_size": 48, "dynamic_img_size": True})):
        assert train(_cfg(tmp_path, name, **vit, **{"model.kwargs": {**small, **kwargs}}))["final"] is not None
