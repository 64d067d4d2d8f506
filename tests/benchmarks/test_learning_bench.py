"""benchmarks.learning end to end on a tiny class-per-folder tree with its default recipe (recipes/cpu_small.yaml)
cut to two steps: the per-epoch table, the budget check and the exit status (the real figures come from the
6-minute Imagenette run in benchmarks/RESULTS.md)."""
from __future__ import annotations

import json

from click.testing import CliRunner

from imt.benchmarks.learning import budget_check, main
from tests.train.conftest import one_thread  # noqa: F401 - autouse: one intra-op thread, as the trainer tests

TINY = ["--epochs", "2", "--threads", "1", "--nproc", "1", "--set", "run.max_steps_per_epoch=2",
        "--set", "data.batch_size=8", "--set", "data.workers=1", "--set", "run.start_res=0",
        "--set", "data.resolution=32", "--set", "data.val_resolution=32"]


def test_budget_check_says_which_half_missed():
    assert budget_check(5.9 * 60, 75.0) == (True, "budget check: wall time 5.90 min vs 6 min (within); "
                                                  "top-1 75.0% vs 75% (reached)")
    ok, line = budget_check(6.1 * 60, 80.0)
    assert not ok and "(OVER)" in line and "(reached)" in line
    ok, line = budget_check(60, 74.9, budget_min=2, target_top1=75)
    assert not ok and "vs 2 min (within)" in line and "(MISSED)" in line


def test_learning_benchmark_runs_the_recipe_and_reports(synthetic_root, tmp_path):
    r = CliRunner().invoke(main, ["--data", str(synthetic_root), "--out", str(tmp_path / "run"), *TINY,
                                  "--min-top1", "-1", "--target-top1", "101"])
    assert r.exit_code == 0, r.output
    assert "| 1 |" in r.output and "| 2 |" in r.output  # one row per epoch
    assert "budget check: wall time" in r.output and "vs 101% (MISSED)" in r.output
    assert "Learning check: " in r.output and "seed 0" in r.output
    # a chance-level bar no run clears: exit status 1 and say why
    r = CliRunner().invoke(main, ["--data", str(synthetic_root), "--out", str(tmp_path / "run2"), *TINY,
                                  "--min-top1", "100"])
    assert r.exit_code == 1 and "FAIL: final top-1" in r.output


def test_learning_benchmark_runs_ranks_under_torchrun(synthetic_root, tmp_path):
    """--nproc 2 (the default on a 2-core CPU machine): two ranks under torchrun, as a user would launch them; the
    report reads their summary and says how many ranks ran and at which global lr."""
    args = list(TINY)
    args[args.index("--nproc") + 1] = "2"
    r = CliRunner().invoke(main, ["--data", str(synthetic_root), "--out", str(tmp_path / "run"), *args,
                                  "--min-top1", "-1", "--target-top1", "101"])
    assert r.exit_code == 0, r.output
    assert "2 rank(s) of 1 torch thread(s)" in r.output and "batch 8 per rank" in r.output
    assert "| 2 |" in r.output and "budget check: wall time" in r.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_agree"] is True


def test_learning_benchmark_refuses_a_bad_override(synthetic_root, tmp_path):
    r = CliRunner().invoke(main, ["--data", str(synthetic_root), "--out", str(tmp_path / "run"),
                                  "--set", "optim.learning_rate=1"])
    assert r.exit_code != 0 and "optim.learning_rate" in r.output
