"""benchmarks/shards.py runs end to end on a tiny count and writes its JSON (figures: RESULTS.md)."""
from __future__ import annotations

import json

from click.testing import CliRunner

from imt.benchmarks.shards import main


def test_shards_benchmark_smoke(imagenet_sample, tmp_path):
    out = tmp_path / "shards.json"
    r = CliRunner().invoke(main, ["--count", "60", "--workers", "1", "--src", str(imagenet_sample),
                                  "--tmp", str(tmp_path), "--json", str(out), "--cost-reps", "0"])
    assert r.exit_code == 0, r.output
    assert "workers=1: 60 images" in r.output
    result = json.loads(out.read_text())
    assert result["count"] == 60 and result["runs"][0]["written"] == 60
    assert result["runs"][0]["img_per_s"] > 0 and result["settings"]["validation"]
    assert [p.name for p in tmp_path.iterdir()] == ["shards.json"]  # scratch tree removed
