"""data.verify / --verify: the shards are hashed against the manifest before the first step; a tampered
shard stops the run naming it, and the cost is printed."""
from __future__ import annotations

import shutil

import pytest

from imt.pipeline.config import DataConfig
from imt.pipeline.manifest import ManifestError
from imt.train.config import ConfigError, load_config
from imt.train.dist import DistInfo
from imt.train.preflight import verify_data


def test_verify_prints_its_cost_and_is_off_by_default(synthetic_shards):
    said = []
    assert verify_data(DataConfig(path=str(synthetic_shards)), DistInfo(), said.append) is None and not said
    seconds = verify_data(DataConfig(path=str(synthetic_shards), verify=True), DistInfo(), said.append)
    assert seconds > 0
    assert len(said) == 1 and "data.verify: 4 shards" in said[0] and " MB/s)" in said[0], said


def test_a_tampered_shard_stops_the_run_before_training(synthetic_shards, tmp_path):
    from tests.train.test_run import TINY
    from imt.train.run import train

    shards = tmp_path / "shards"
    shutil.copytree(synthetic_shards, shards)
    with open(shards / "train-000001.tar", "r+b") as f:  # one byte of one image: the loaders would not notice
        f.seek(5000)
        byte = f.read(1)
        f.seek(5000)
        f.write(bytes([byte[0] ^ 0xFF]))
    cfg = load_config(None, {**TINY, "data.loader": "torch", "data.path": str(shards), "data.verify": True,
                             "run.out": str(tmp_path / "run"), "run.epochs": 1})
    with pytest.raises(ManifestError, match=r"(?s)data.verify: 1 problem\(s\).*train-000001.tar: sha256 differs"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
    from click.testing import CliRunner

    from imt.train.run import main
    r = CliRunner().invoke(main, ["--data", str(shards), "--loader", "torch", "--verify", "--out",
                                  str(tmp_path / "run"), "--device", "cpu", "--arch", "resnet18"])
    assert r.exit_code == 1 and "sha256 differs" in r.output and "Traceback" not in r.output, r.output


def test_verify_needs_shards():
    with pytest.raises(ConfigError, match="data.verify checks shards"):
        load_config(None, {"data.loader": "synthetic", "data.verify": True})
