"""Slow: the trainer really learns. ResNet-18 from scratch at 64 px on Imagenette (chance 10%), CPU,
a few minutes (benchmarks/learning.py records the figures in benchmarks/RESULTS.md)."""
from __future__ import annotations

import pytest


@pytest.mark.slow
def test_resnet18_learns_imagenette(imagenette, tmp_path):
    from imt.benchmarks.learning import run

    summary = run(imagenette, loader="folder", resolution=64, epochs=3, batch_size=64, out=tmp_path / "run")
    rows = summary["rows"]
    assert summary["final"]["val_count"] == 1500  # 150 per class, each counted once
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert summary["final"]["val_top1"] > 20.0, rows  # chance is 10%; 3 epochs reach well above it
