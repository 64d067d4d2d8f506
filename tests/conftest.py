"""Shared fixtures: the embedded synthetic dataset, its shards, and the real images in ../shared/data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("IMT_SHARED_DATA", REPO.parent / "shared" / "data"))


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow (bash scripts/test.sh --slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small copy of the embedded dataset: 8 classes, 12 train + 4 val images each."""
    from imt.tools.make_synthetic import make_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root, train_per_class=12, val_per_class=4, seed=0)
    return root


@pytest.fixture(scope="session")
def synthetic_shards(synthetic_root, tmp_path_factory) -> Path:
    """Shards of `synthetic_root` (train: 96 samples over several shards; val: 32)."""
    from imt.tools.make_shards import make_shards

    out = tmp_path_factory.mktemp("shards")
    make_shards(synthetic_root, out, shard_samples=40, workers=1, seed=0, progress=False)
    return out


def _shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} not found (the real images live in ../shared/data; see its README)")
    return path


@pytest.fixture(scope="session")
def imagenet_sample() -> Path:
    """400 real ImageNet JPEGs, one per class, odd files included."""
    return _shared("imagenet-sample")


@pytest.fixture(scope="session")
def imagenette() -> Path:
    """Imagenette at 224 px: train/ and val/ with 10 wnid folders."""
    return _shared("imagenette-224")
