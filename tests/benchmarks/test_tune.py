"""benchmarks/tune.py (imt-tune): the diagnosis from measurements (input-bound with a tiny model on real JPEGs,
model-bound with the synthetic loader), a search within a small budget, and a YAML overlay imt-train applies."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner

from imt.benchmarks.tune import classify, main
from imt.train.config import load_config
from imt.train.run import train

SMALL = ["--count", "64", "--resolution", "32", "--batch-size", "8", "--set", "data.workers=1", "--warmup", "1",
         "--batches", "2", "--threads", "1", "--device", "cpu"]


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()  # the tuner sets them process-wide
    yield
    torch.set_num_threads(n)


def _tiny_model(arch, num_classes, **_):
    """A model far cheaper than decoding a batch of real JPEGs: pool, then a linear layer."""
    return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, num_classes))


def invoke(args):
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output + (repr(r.exception) if r.exception else "")
    return r


@pytest.mark.slow  # 1-2 minutes on the shared 2-core machine
def test_tiny_model_is_input_bound_and_the_yaml_trains(imagenet_sample, synthetic_shards, tmp_path, monkeypatch):
    pytest.importorskip("nvidia.dali")
    monkeypatch.setattr("imt.benchmarks.run.build_model", _tiny_model)
    out = tmp_path / "tune"
    r = invoke(["--images", str(imagenet_sample), "--cache", str(tmp_path / "cache"), *SMALL, "--loader", "dali",
                "--budget-s", "90", "--out", str(out)])
    res = json.loads((out / "tune.json").read_text())
    diag = res["diagnosis"]
    assert diag["kind"] == "input-bound", diag["paragraph"]
    assert diag["figures"]["decode_only"]["median"] > 0 and "Input-bound" in r.output
    tried = [s for s in res["search"] if "tried" in s]
    assert tried and all(len(s["tried"]) >= 2 for s in tried)  # at least one setting searched within the budget
    dv = res["default_vs_tuned"]
    assert dv["default"]["median"] > 0 and dv["tuned"]["median"] > 0 and dv["ratio"] > 0
    assert (out / "tune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    overlay = yaml.safe_load((out / "tune.yaml").read_text())
    assert set(overlay) == {"data"} and overlay["data"] == res["tuned_settings"]
    # imt-train --tune: the overlay's loader settings over a recipe, on other data (the test's shards).
    cfg = load_config("synthetic_quick", {"data.path": str(synthetic_shards), "run.out": str(tmp_path / "run"),
                                          "run.epochs": 1, "run.max_steps_per_epoch": 2, "run.device": "cpu",
                                          "run.tensorboard": False, "data.resolution": 32, "data.val_resolution": 32},
                      overlays=(out / "tune.yaml",))
    for key, value in overlay["data"].items():
        assert getattr(cfg.data, key) == value
    summary = train(cfg)
    assert summary["final"] is not None and summary["epochs"] == 1


def test_synthetic_loader_is_model_bound(tmp_path, synthetic_shards):
    out = tmp_path / "tune"
    invoke(["--data", str(synthetic_shards), *SMALL, "--arch", "resnet18", "--loader", "synthetic",
            "--batches", "3", "--budget-s", "20", "--out", str(out)])
    res = json.loads((out / "tune.json").read_text())
    assert res["diagnosis"]["kind"] == "model-bound", res["diagnosis"]["paragraph"]
    assert res["search"] == [] and res["default_vs_tuned"]["same_settings"]  # the ceiling has nothing to tune
    assert yaml.safe_load((out / "tune.yaml").read_text())["data"]["loader"] == "synthetic"


def _s(median, spread=0.02):
    return {"median": median, "min": median * (1 - spread), "max": median * (1 + spread)}


def test_classify_from_figures():
    assert classify(_s(1000), _s(5000), _s(980), 0.01)["kind"] == "model-bound"
    v = classify(_s(1000), _s(300), _s(290), 0.7, limit=_s(350))
    assert (v["kind"], v["stage"]) == ("input-bound", "decode") and "decode-only limit 350" in v["paragraph"]
    assert classify(_s(1000), _s(300), _s(290), 0.7, limit=_s(900))["stage"] == "augmentation/transfer"
    v = classify(_s(1000), _s(2000), _s(600), 0.3)
    assert v["kind"] == "host-bound" and "60% of the ceiling" in v["paragraph"]
