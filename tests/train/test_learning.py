"""Slow: the trainer really learns. benchmarks.learning's recipe (recipes/cpu_small.yaml: a half-width
ResNet-10 from scratch at low resolution) on Imagenette (chance 10%), CPU, cut to 3 epochs: a few minutes
(benchmarks/learning.py records the full run's figures in benchmarks/RESULTS.md)."""
from __future__ import annotations

import pytest


@pytest.mark.slow
def test_cpu_small_learns_imagenette(imagenette, tmp_path):
    from imt.benchmarks.learning import run

    # two ranks, as the recipe is meant to run (and benchmarks.learning runs it on a 2-core CPU machine)
    summary = run(imagenette, overrides={"data.loader": "folder", "run.epochs": 3}, out=tmp_path / "run", nproc=2)
    rows = summary["rows"]
    assert summary["final"]["val_count"] == 1500  # 150 per class, each counted once over the two ranks
    assert summary["world_size"] == 2 and summary["ranks_agree"] is True
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert summary["final"]["val_top1"] > 20.0, rows  # chance is 10%; 3 epochs reach well above it
