"""benchmarks.gpu_check on the CPU: every CPU-runnable check passes, the GPU ones are listed as skipped."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

pytest.importorskip("nvidia.dali")
from imt.benchmarks.gpu_check import CHECKS, main  # noqa: E402


def test_cpu_run_passes_and_lists_the_checks_it_skipped(synthetic_shards, tmp_path):
    out = tmp_path / "check.json"
    r = CliRunner().invoke(main, ["--device", "cpu", "--data", str(synthetic_shards), "--json", str(out),
                                  "--budget", "900"])
    assert r.exit_code == 0, r.output + (repr(r.exception) if r.exception else "")
    doc = json.loads(out.read_text())
    status = {c["check"]: c["status"] for c in doc["checks"]}
    assert list(status) == [name for name, _, _ in CHECKS]  # priority order, every check accounted for
    gpu_only = {name for name, needs_gpu, _ in CHECKS if needs_gpu}
    assert gpu_only == {"buffer_lifetime", "host_syncs", "hw_decoder", "dali_memory"}
    assert all(status[n] == "SKIP" for n in gpu_only) and all(status[n] == "PASS" for n in status if n not in gpu_only)
    assert doc["gpu_figures_measured"] is False and doc["environment"]["gpu"] is None
    figures = {c["check"]: c.get("figure") for c in doc["checks"]}
    assert figures["recompiles"]["graphs"] == 2 and figures["dali_smoke"]["cpu"]["channels_last"]
    assert figures["end_to_end"]["resnet18 eager"]["dali-cpu"]["img_per_s"] > 0
    assert "SKIP buffer_lifetime" in r.output and "needs a CUDA GPU" in r.output and "4 skipped" in r.output


def test_checks_past_the_budget_are_skipped_not_dropped(tmp_path):
    out = tmp_path / "check.json"
    r = CliRunner().invoke(main, ["--device", "cpu", "--json", str(out), "--budget", "0", "--only", "environment"])
    assert r.exit_code == 0, r.output
    (rec,) = json.loads(out.read_text())["checks"]
    assert rec["status"] == "SKIP" and "budget" in rec["reason"]
