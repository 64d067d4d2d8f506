"""The wheel works like the checkout: built from the tracked files, installed into a fresh virtualenv outside
the repository, its commands make shards, train with a named recipe and predict, run from another directory;
only the `imt` package lands in site-packages."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO


def _run(cmd, cwd, timeout=600):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(cwd), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.mark.slow  # builds a wheel and a virtualenv, trains one epoch: about 2 minutes on 2 shared cores
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    if not shutil.which("git"):
        pytest.skip("git is needed to list the tracked files")
    src = tmp_path / "src"
    for rel in subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.splitlines():
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist",
          src], tmp_path)
    wheel = next((tmp_path / "dist").glob("imt-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"imt", wheel.name.split("-py3")[0] + ".dist-info"}
    assert "imt/recipes/synthetic_quick.yaml" in names and "imt/train/run.py" in names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], tmp_path)
    py = venv / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).strip())
    # torch, DALI and the rest come from the test's environment, appended after the venv's own packages
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], tmp_path)

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run([py, "-c", "import imt.train.run, imt.recipes, importlib.util as u; print(imt.train.run.__file__);"
                  "print([n for n in ('train', 'tools', 'pipeline', 'benchmarks') if u.find_spec(n)])"], work)
    assert where.splitlines() == [str(site / "imt" / "train" / "run.py"), "[]"]
    bin_ = venv / "bin"
    _run([bin_ / "imt-make-synthetic", "--out", "syn", "--train-per-class", "4", "--val-per-class", "2"], work)
    _run([bin_ / "imt-make-shards", "--src", "syn", "--out", "shards", "--workers", "1", "--no-progress"], work)
    _run([bin_ / "imt-train", "--recipe", "synthetic_quick", "--data", "shards", "--out", "run", "--epochs", "1",
          "--device", "cpu", "--set", "run.tensorboard=false"], work)
    _run([bin_ / "imt-export", "--checkpoint", "run/checkpoints/best.pt", "--out", "exported", "--no-onnx"], work)
    image = next((work / "syn" / "val").rglob("*.JPEG"))
    out = _run([bin_ / "imt-predict", "--model", "exported", image, "--device", "cpu", "--json", "--topk", "2"],
               work)
    assert len(json.loads(out.splitlines()[0])["top"]) == 2
