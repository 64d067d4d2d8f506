"""benchmarks/run.py: a tiny real run over every CPU loader + the ceiling, its JSON/PNG/config outputs, sweeps,
cache reuse, and the timing/failure bookkeeping. Figures themselves are checked in RESULTS.md, not here."""
from __future__ import annotations

import json
import math
import time

import pytest
import torch
from click.testing import CliRunner

from imt.benchmarks.common import Windows, summarise, time_windows
from imt.benchmarks.run import Bench, Item, main, measure, parse_sweep
from imt.pipeline.config import DataConfig
from imt.train.config import from_dict

TINY = ["--count", "64", "--arch", "resnet18", "--resolution", "32", "--batch-size", "8", "--workers", "1",
        "--warmup", "1", "--repeats", "1", "--batches", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-cache")


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()  # --threads sets it process-wide; give the next tests theirs back
    yield
    torch.set_num_threads(n)


def invoke(args):
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output + (repr(r.exception) if r.exception else "")
    return r


def test_tiny_run_all_cpu_loaders(imagenet_sample, cache, tmp_path):
    try:
        import nvidia.dali  # noqa: F401
        dali = True
    except ImportError:
        dali = False
    out, png = tmp_path / "res" / "cpu.json", tmp_path / "res" / "cpu.png"
    r = invoke(["--images", str(imagenet_sample), "--cache", str(cache), *TINY, "--device", "cpu",
                "--profile", "torch", "--profile-steps", "2", "--json", str(out), "--plot", str(png)])
    res = json.loads(out.read_text())

    env = res["environment"]
    assert env["gpu"] is None and env["cpu_count"] >= 1 and env["versions"]["torch"] == torch.__version__
    assert env["versions"]["torchvision"] and "commit" in env["git"] and env["python"]
    ds = res["dataset"]
    assert ds["samples"] == 64 and ds["classes"] > 1
    assert 10_000 < ds["mean_jpeg_bytes"] < 1_000_000 and 100 < ds["mean_width"] < 2000  # real ImageNet JPEGs
    assert res["settings"]["batch_size"] == 8 and res["settings"]["modes"] == ["eager"]

    pipes = {p["loader"]: p for p in res["pipelines"]}
    assert pipes["dali-mixed"]["status"] == "skipped" and "CUDA" in pipes["dali-mixed"]["reason"]
    assert pipes["dali-cpu-decode"]["status"] == "skipped" and "CUDA" in pipes["dali-cpu-decode"]["reason"]
    ran = ["torch", "folder"] + (["dali-cpu"] if dali else [])
    for kind in ran:
        s = pipes[kind]["img_per_s"]
        assert pipes[kind]["status"] == "ok" and 0 < s["min"] <= s["median"] <= s["max"]
        assert pipes[kind]["ceiling_ratio_eager"] > 0
        # Every CPU pipeline against the decode-only limit timed in the same run (above 1 only by noise).
        assert 0.01 < pipes[kind]["limit_fraction"] < 3
    limit = pipes["decode-only"]
    assert limit["status"] == "ok" and limit["img_per_s"]["median"] > 0 and limit["images_per_window"] == 2 * 8

    train = {(t["mode"], t["loader"]): t for t in res["train"]}
    ceiling = train[("eager", "synthetic")]
    assert ceiling["status"] == "ok" and res["ceiling"]["eager"] == ceiling["img_per_s"]["median"] > 0
    for kind in ran:
        t = train[("eager", kind)]
        assert t["status"] == "ok" and t["img_per_s"]["median"] > 0
        # Same step, real data: near the ceiling or below it; >1 only by noise on a shared machine.
        assert 0.05 < t["ceiling_fraction"] < 3
        assert 0 <= t["data_wait"]["median"] <= 1 and math.isfinite(t["final_loss"])
        assert t["images_per_window"] == 2 * 8
    assert res["errors"] == []

    prof = res["profile"]
    assert prof["status"] == "ok" and prof["loader"] == "torch" and prof["top_ops"]
    assert 0 < prof["split"]["step_host_s"] <= prof["split"]["wall_s"]

    cfg = from_dict(json.loads((out.parent / "cpu.config.json").read_text()))
    assert cfg.model.arch == "resnet18" and cfg.data.batch_size == 8 and cfg.precision.dtype != "auto"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200_000
    assert "| eager | torch |" in r.output and "100% (ceiling)" in r.output and "100% (limit)" in r.output and "Profile (torch" in r.output


def test_sweep_pipelines_only_reuses_cache(imagenet_sample, cache, tmp_path):
    out = tmp_path / "sweep.json"
    r = invoke(["--images", str(imagenet_sample), "--cache", str(cache), *TINY, "--device", "cpu",
                "--only", "pipelines", "--loader", "torch", "--loader", "dali-mixed",
                "--sweep", "batch_size=4,8", "--sweep", "hw_decoder_load=0.5", "--json", str(out)])
    res = json.loads(out.read_text())
    assert "reusing" in r.output  # the first test's data set (same images, count)
    assert res["train"] == [] and res["ceiling"] == {}
    sw = [s for s in res["sweeps"] if s["status"] == "ok"]
    assert [(s["sweep"]["batch_size"], s["loader"], s["images_per_window"]) for s in sw] == [
        (4, "torch", 8), (8, "torch", 16)]
    # hw_decoder_load only changes dali-mixed, which needs a GPU: said once, not dropped.
    skipped = [s for s in res["sweeps"] if s["status"] == "skipped"]
    assert [s["loader"] for s in skipped] == ["dali-mixed", "dali-mixed"]
    assert "CUDA" in skipped[0]["reason"]


def test_failed_loader_is_recorded(tmp_path):
    bench = Bench(loaders=("torch",), sections=("pipelines",), modes=("eager",), warmup=0, repeats=1, batches=1)
    errors: list[str] = []
    item = Item({"section": "pipelines", "loader": "torch"}, DataConfig(path=str(tmp_path), loader="torch"))
    rec, = measure([item], torch.device("cpu"), bench, errors)
    assert rec["status"] == "error" and "manifest" in rec["reason"].lower()
    assert len(errors) == 1 and "loader=torch" in errors[0]


def test_parse_sweep():
    assert parse_sweep("workers=1,2,4") == ("workers", (1, 2, 4))
    assert parse_sweep("hw-decoder-load=0,0.65") == ("hw_decoder_load", (0.0, 0.65))
    with pytest.raises(Exception, match="one of"):
        parse_sweep("threads=2")
    with pytest.raises(Exception, match="ints"):
        parse_sweep("batch_size=a")


def test_time_windows_counts_images_and_data_wait():
    def batches():
        while True:
            time.sleep(0.01)  # the loader's share of each step
            yield torch.zeros(3, 1), torch.zeros(3)

    w = time_windows(batches(), lambda x, y: time.sleep(0.01), torch.device("cpu"), warmup=1, repeats=2,
                     per_repeat=5)
    assert isinstance(w, Windows) and len(w.img_per_s) == 2 and w.images == 15
    assert all(0 < r < 15 / 0.1 for r in w.img_per_s)  # 5 x 20 ms per window at best
    assert all(0.2 < f < 0.8 for f in w.data_wait)      # half the time in next(loader), give or take load


def test_summarise():
    s = summarise([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["runs"]) == (2.0, 1.0, 3.0, [3.0, 1.0, 2.0]) and "q1" not in s
    assert summarise([1.0, 2.0, 3.0, 4.0])["q3"] >= 3.0
