"""benchmarks/resume.py runs end to end on the small shards: one row per loader, position and way of resuming
(figures: RESULTS.md)."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from imt.benchmarks.resume import main


def test_resume_benchmark_smoke(synthetic_shards):
    pytest.importorskip("nvidia.dali")
    r = CliRunner().invoke(main, ["--data", str(synthetic_shards), "--loader", "dali", "--loader", "torch",
                                  "--at", "0.5", "--batch-size", "16", "--resolution", "32", "--workers", "1",
                                  "--repeats", "1"])
    assert r.exit_code == 0, r.output
    rows = [line for line in r.output.splitlines() if line.startswith("| dali") or line.startswith("| torch")]
    assert len(rows) == 4 and all("(batch 3 of 6)" in row for row in rows), r.output
