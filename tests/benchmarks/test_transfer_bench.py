"""benchmarks.transfer end to end on a tiny class-per-folder tree: pretraining, every fine-tuning and scratch
run per seed, the table, and the verdict's exit status (the real figures come from the 30-minute run); and that
evaluating only after the last epoch, as the benchmark does, trains the same weights."""
from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from imt.benchmarks.transfer import RUNS, main
from imt.train.checkpoint import list_checkpoints, load_checkpoint
from imt.train.config import load_config
from imt.train.run import train
from tests.train.conftest import one_thread  # noqa: F401 - autouse: one intra-op thread, as the trainer tests


def test_transfer_benchmark_runs_every_pair_per_seed(synthetic_root, tmp_path):
    args = ["--data", str(synthetic_root), "--work", str(tmp_path / "w"), "--resolution", "32", "--per-class", "3",
            "--seed", "0", "--seed", "1", "--pretrain-epochs", "2", "--finetune-epochs", "1", "--batch-size", "8",
            "--workers", "1"]
    r = CliRunner().invoke(main, [*args, "--pretrain-set", "data.min_area=0.5", "--min-gain", "-1000"])
    assert r.exit_code in (0, 1), r.output  # 1: fine-tuning lost in some seed, which one epoch allows
    for name, _, _ in RUNS:
        assert f"| 3 | {name} |" in r.output
        for seed in (0, 1):
            assert (tmp_path / "w" / "runs" / f"3pc-seed{seed}-{name}" / "summary.json").is_file()
    assert "3 images per class: the best fine-tuning run beats" in r.output
    rows = [json.loads(line) for line in (tmp_path / "w" / "runs" / "pretrain" / "metrics.jsonl").open()]
    assert [r.get("val_top1") is not None for r in rows] == [False, True]  # evaluated once, at the end
    assert _config(tmp_path / "w" / "runs" / "pretrain")["data"]["min_area"] == 0.5
    # the same pretraining reused, and a bar no run can clear: exit 1 and say why
    best = tmp_path / "w" / "runs" / "pretrain" / "checkpoints" / "best.pt"
    r = CliRunner().invoke(main, [*args, "--pretrained", str(best), "--min-gain", "1000", "--run", "finetune-full",
                                  "--run", "scratch", "--set", "optim.label_smoothing=0"])
    assert r.exit_code == 1 and "FAIL: expected fine-tuning to win" in r.output and f"reused from {best}" in r.output
    assert "| 3 | finetune-full |" in r.output and "| 3 | scratch |" in r.output and "linear-probe" not in r.output
    assert "with optim.label_smoothing=0 (--set)" in r.output
    for name in ("finetune-full", "scratch"):  # on both sides
        assert _config(tmp_path / "w" / "runs" / f"3pc-seed0-{name}")["optim"]["label_smoothing"] == 0


def test_transfer_benchmark_refuses_a_selection_without_a_verdict(tmp_path):
    for only in (["--run", "linear-probe", "--run", "scratch"], ["--run", "finetune-full"]):
        r = CliRunner().invoke(main, ["--work", str(tmp_path), *only])
        assert r.exit_code == 2 and "choose at least one fine-tuning run besides linear-probe" in r.output
    r = CliRunner().invoke(main, ["--work", str(tmp_path), "--set", "optim.lr"])
    assert r.exit_code == 2 and "expected section.key=value" in r.output


def _config(out) -> dict:
    return json.loads((out / "config.json").read_text())


def test_evaluating_each_epoch_does_not_change_the_training(synthetic_root, tmp_path):
    """The benchmark evaluates only after the last epoch; its final top-1 must be what evaluating after every
    epoch gives (the folder loader's workers seed their augmentations per batch, not from the global RNG that
    the evaluation loader draws from)."""
    results = []
    for every in (1, 2):
        out = tmp_path / f"every{every}"
        summary = train(load_config(None, {
            "data.path": str(synthetic_root), "data.loader": "folder", "data.workers": 1, "data.batch_size": 16,
            "data.resolution": 32, "data.val_resolution": 32, "model.arch": "resnet18", "run.epochs": 2,
            "run.eval_every": every, "run.out": str(out), "run.tensorboard": False, "run.deterministic": True,
            "run.device": "cpu"}))
        last = load_checkpoint(list_checkpoints(out / "checkpoints")[0])
        results.append((summary["final"]["val_top1"], last["epoch"], last["model"]))
    (top1_a, epoch_a, wa), (top1_b, epoch_b, wb) = results
    assert epoch_a == epoch_b == 2 and top1_a == top1_b
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
