"""benchmarks.transfer end to end on a tiny class-per-folder tree: pretraining, every fine-tuning and scratch
run per seed, the table, and the verdict's exit status (the real figures come from the 30-minute run)."""
from __future__ import annotations

from click.testing import CliRunner

from imt.benchmarks.transfer import RUNS, main
from tests.train.conftest import one_thread  # noqa: F401 - autouse: one intra-op thread, as the trainer tests


def test_transfer_benchmark_runs_every_pair_per_seed(synthetic_root, tmp_path):
    args = ["--data", str(synthetic_root), "--work", str(tmp_path / "w"), "--resolution", "32", "--per-class", "3",
            "--seed", "0", "--seed", "1", "--pretrain-epochs", "1", "--finetune-epochs", "1", "--batch-size", "8",
            "--workers", "1"]
    r = CliRunner().invoke(main, [*args, "--min-gain", "-1000"])
    assert r.exit_code in (0, 1), r.output  # 1: fine-tuning lost in some seed, which one epoch allows
    for name, _, _ in RUNS:
        assert f"| 3 | {name} |" in r.output
        for seed in (0, 1):
            assert (tmp_path / "w" / "runs" / f"3pc-seed{seed}-{name}" / "summary.json").is_file()
    assert "3 images per class: the best fine-tuning run beats" in r.output
    # the same pretraining reused, and a bar no run can clear: exit 1 and say why
    best = tmp_path / "w" / "runs" / "pretrain" / "checkpoints" / "best.pt"
    r = CliRunner().invoke(main, [*args, "--pretrained", str(best), "--min-gain", "1000"])
    assert r.exit_code == 1 and "FAIL: expected fine-tuning to win" in r.output and f"reused from {best}" in r.output
